from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from st_bitembed import BitEmbed
from st_bitembed.losses import AttentionRelationLoss, BitEmbedLoss, InfoNCELoss, MultiPrecisionLoss, SimilarityKLLoss

QUERIES = ["How do ternary weights work?", "What is the capital of France?", "Who wrote Hamlet?"]
DOCUMENTS = ["Weights are -1, 0 or +1 times a scale.", "Paris is the capital of France.", "Shakespeare wrote it."]
NEGATIVES = ["Bananas are yellow.", "The train was late again.", "Quantum computers use qubits."]


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def features(model, texts):
    return model.preprocess(texts)


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_equals_cross_entropy_over_scaled_similarities(converted_qwen3, symmetric):
    queries, positives, negatives = unit(4, 16, 0), unit(4, 16, 1), unit(4, 16, 2)
    loss = InfoNCELoss(converted_qwen3, temperature=0.1, symmetric=symmetric)
    logits = queries @ torch.cat([positives, negatives]).T / 0.1
    expected = F.cross_entropy(logits, torch.arange(4))
    if symmetric:
        expected = (expected + F.cross_entropy(positives @ queries.T / 0.1, torch.arange(4))) / 2
    value = loss.compute_loss_from_embeddings([queries, positives, negatives], None)
    torch.testing.assert_close(value, expected)


def test_similarity_kl_is_zero_for_the_teacher_itself_and_positive_for_the_student(minilm_dir):
    teacher = SentenceTransformer(str(minilm_dir))
    twin = SentenceTransformer(str(minilm_dir))
    columns = [features(twin, QUERIES), features(twin, DOCUMENTS), features(twin, NEGATIVES)]
    assert SimilarityKLLoss(twin, teacher)(columns, None).abs() < 1e-6
    student = BitEmbed.from_backbone(str(minilm_dir))
    assert SimilarityKLLoss(student, teacher)(columns, None) > 1e-3
    # precomputed teacher embeddings as labels give the same value as the in-loss teacher
    labels = torch.stack([teacher.encode(t, convert_to_tensor=True) for t in (QUERIES, DOCUMENTS, NEGATIVES)], dim=1)
    torch.testing.assert_close(
        SimilarityKLLoss(student)(columns, labels),
        SimilarityKLLoss(student, teacher)(columns, None),
        atol=1e-5,
        rtol=1e-4,
    )


def test_similarity_kl_teacher_with_another_tokenizer(converted_qwen3, minilm_dir):
    teacher = SentenceTransformer(str(minilm_dir))
    loss = SimilarityKLLoss(converted_qwen3, teacher)
    assert not loss.shares_tokenizer
    columns = [features(converted_qwen3, QUERIES), features(converted_qwen3, DOCUMENTS)]
    # the teacher sees the texts themselves, re-tokenized with its own tokenizer
    expected = [teacher.encode(QUERIES, convert_to_tensor=True), teacher.encode(DOCUMENTS, convert_to_tensor=True)]
    for got, want in zip(loss.teacher_embeddings(columns, None), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(loss(columns, None))


def test_attention_relation_is_zero_for_the_teacher_itself_and_positive_for_the_student(qwen3_dir, qwen3_teacher):
    twin = copy.deepcopy(qwen3_teacher)
    columns = [features(twin, QUERIES)]
    assert AttentionRelationLoss(twin, qwen3_teacher)(columns).abs() < 1e-6
    student = BitEmbed.from_backbone(str(qwen3_dir))
    assert AttentionRelationLoss(student, qwen3_teacher)(columns) > 1e-4


def test_attention_relation_ignores_padding(converted_qwen3, qwen3_teacher):
    loss = AttentionRelationLoss(converted_qwen3, qwen3_teacher, relation_heads=2)
    tokenizer = converted_qwen3.tokenizer
    tokenizer.padding_side = "right"
    plain = tokenizer([QUERIES[0]], return_tensors="pt")
    padded = tokenizer(
        [QUERIES[0]], return_tensors="pt", padding="max_length", max_length=plain["input_ids"].shape[1] + 7
    )
    assert padded["attention_mask"].sum() == plain["attention_mask"].sum() < padded["attention_mask"].numel()
    torch.testing.assert_close(loss([dict(padded)]), loss([dict(plain)]), atol=1e-6, rtol=1e-5)


def test_gradients_reach_the_student_and_never_the_teacher(converted_qwen3, qwen3_teacher):
    loss = BitEmbedLoss(converted_qwen3, teacher=qwen3_teacher, similarity_kl=1.0, attention_relation=1.0)
    terms = loss([features(converted_qwen3, QUERIES), features(converted_qwen3, DOCUMENTS)], None)
    assert set(terms) == {f"infonce/{p}" for p in ("float32", "int8", "int4", "int2", "binary")} | {
        "similarity_kl",
        "attention_relation",
    }
    torch.stack(list(terms.values())).sum().backward()
    student_grads = [p.grad for p in converted_qwen3.parameters()]
    assert all(g is not None for g in student_grads) and sum(g.abs().sum() for g in student_grads) > 0
    assert converted_qwen3.quantizer.log_half_ranges["int4"].grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in qwen3_teacher.parameters())
    trainable = {id(p) for p in loss.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in qwen3_teacher.parameters()}


def test_attention_distillation_refuses_a_teacher_with_another_tokenizer(converted_qwen3, minilm_dir):
    teacher = SentenceTransformer(str(minilm_dir))
    with pytest.raises(ValueError, match=r"student uses Qwen2Tokenizer\(.*\), the teacher BertTokenizer\("):
        BitEmbedLoss(converted_qwen3, teacher=teacher, attention_relation=1.0)
    BitEmbedLoss(converted_qwen3, teacher=teacher, similarity_kl=1.0)  # the KL term alone is fine across tokenizers


def test_multi_precision_serves_copies_and_leaves_the_embeddings_alone(converted_qwen3):
    loss = MultiPrecisionLoss(converted_qwen3, InfoNCELoss(converted_qwen3), precisions=["float32", "int2", "binary"])
    embeddings = [unit(4, 64, 0), unit(4, 64, 1)]
    originals = [e.clone() for e in embeddings]
    terms = loss.compute_terms(embeddings, None)
    assert all(torch.equal(e, o) for e, o in zip(embeddings, originals))
    assert len({round(t.item(), 6) for t in terms.values()}) == 3  # each precision really scores different vectors
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        MultiPrecisionLoss(converted_qwen3, InfoNCELoss(converted_qwen3), precisions=["int3"])
    with pytest.raises(ValueError, match="No precisions to train"):
        MultiPrecisionLoss(converted_qwen3, InfoNCELoss(converted_qwen3), precisions=[])


def test_non_finite_loss_is_named(converted_qwen3):
    loss = BitEmbedLoss(converted_qwen3, similarity_kl=0.0, attention_relation=0.0, temperature=1e-45)
    with pytest.raises(FloatingPointError, match=r"term 'infonce/float32' is (nan|inf)"):
        loss([features(converted_qwen3, QUERIES), features(converted_qwen3, DOCUMENTS)], None)


def test_bad_arguments_are_refused(converted_qwen3):
    with pytest.raises(ValueError, match="temperature must be positive"):
        InfoNCELoss(converted_qwen3, temperature=0)
    with pytest.raises(ValueError, match="attention_relation > 0 .* needs teacher="):
        BitEmbedLoss(converted_qwen3, attention_relation=1.0)
    with pytest.raises(ValueError, match="needs precomputed teacher embeddings as the 'label' column"):
        SimilarityKLLoss(converted_qwen3)(
            [features(converted_qwen3, QUERIES), features(converted_qwen3, DOCUMENTS)], None
        )


def test_weights_named_before_0_2_still_work_with_a_warning(converted_qwen3, qwen3_teacher):
    with pytest.warns(FutureWarning, match="'alpha' is now called 'similarity_kl'"):
        old = BitEmbedLoss(converted_qwen3, teacher=qwen3_teacher, alpha=0.5, beta=2.0, gamma=1.0)
    new = BitEmbedLoss(
        converted_qwen3, teacher=qwen3_teacher, similarity_kl=0.5, attention_relation=2.0, embedding_distill=1.0
    )
    assert old.get_config_dict() == new.get_config_dict()
    assert old.weights == {
        "infonce": 1.0,
        "similarity_kl": 0.5,
        "attention_relation": 2.0,
        "embedding_distill": 1.0,
        "hidden_states": 0.0,
    }
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['delta'\]"):
        BitEmbedLoss(converted_qwen3, delta=1.0)


def test_terms_declare_what_they_need_and_describe_themselves():
    needs = BitEmbedLoss.needs({"infonce": 0.0, "embedding_distill": 1.0})
    assert needs.teacher and not needs.pairs and not needs.teacher_in_loss and not needs.same_tokenizer
    needs = BitEmbedLoss.needs({"infonce": 1.0, "hidden_states": 2.0})
    assert needs.pairs and needs.teacher_in_loss and needs.same_tokenizer
    options = {"infonce": 1.0, "attention_relation": 0.5, "precisions": ["float32", "int4"], "temperature": 0.02}
    assert BitEmbedLoss.describe(options, "teacher/x") == [
        "InfoNCE at float32/int4 (temperature 0.02)",
        "0.5 x attention-relation distillation (layer -1 -> -1) from teacher/x",
    ]


def test_recipe_loss_section_is_bitembed_loss_keywords_with_its_defaults():
    import dataclasses
    import inspect

    from st_bitembed.recipe import LossSpec

    signature = inspect.signature(BitEmbedLoss.__init__).parameters
    for spec_field in dataclasses.fields(LossSpec):
        default = spec_field.default_factory() if spec_field.default is dataclasses.MISSING else spec_field.default
        expected = signature[spec_field.name].default
        assert default == (list(expected) if isinstance(expected, tuple) else expected), spec_field.name
    assert set(BitEmbedLoss.TERMS) <= {f.name for f in dataclasses.fields(LossSpec)}
