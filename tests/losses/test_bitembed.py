from __future__ import annotations

import pytest
import torch
from loss_inputs import DOCUMENTS, QUERIES, features

from st_bitembed.losses import BitEmbedLoss, InfoNCELoss, SimilarityKLLoss


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
    weights = {"similarity_kl": 1.0, "attention_relation": 1.0, "embedding_distill": 1.0, "hidden_states": 2.0}
    assert BitEmbedLoss.pooled_terms(weights) == ["similarity_kl", "embedding_distill"]  # readable from labels
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


def test_similarity_kl_at_several_precisions_trains_the_head_without_contrastive_labels(
    converted_qwen3, qwen3_teacher
):
    model, columns = converted_qwen3, [features(converted_qwen3, QUERIES), features(converted_qwen3, DOCUMENTS)]
    kl_only = {"teacher": qwen3_teacher, "infonce": 0.0, "similarity_kl": 1.0}
    plain = BitEmbedLoss(model, **kl_only)(columns, None)
    loss = BitEmbedLoss(model, **kl_only, kl_precisions=["float32", "int4", "binary"])
    terms = loss(columns, None)
    assert set(plain) == {"similarity_kl"}
    assert set(terms) == {"similarity_kl/float32", "similarity_kl/int4", "similarity_kl/binary"}
    torch.testing.assert_close(terms["similarity_kl/float32"], plain["similarity_kl"])
    # Each term is the KL of the values that precision stores, against the teacher's float embeddings.
    with torch.no_grad():
        student = [model(dict(f))["sentence_embedding"] for f in columns]
        teacher = [qwen3_teacher(dict(f))["sentence_embedding"] for f in columns]
        kl = SimilarityKLLoss(model)
        for precision in ("int4", "binary"):
            stored = [model.quantizer.fake_quantize(e, precision) for e in student]
            expected = kl.compute_loss_from_embeddings(stored, teacher)
            torch.testing.assert_close(terms[f"similarity_kl/{precision}"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.isclose(terms["similarity_kl/binary"], terms["similarity_kl/float32"])
    model.zero_grad(set_to_none=True)
    model.quantizer.zero_grad(set_to_none=True)
    torch.stack(list(terms.values())).sum().backward()
    assert model.quantizer.log_half_ranges["int4"].grad.abs().sum() > 0
    assert (
        "at float32/int4/binary"
        in BitEmbedLoss.describe({"similarity_kl": 1.0, "kl_precisions": ["float32", "int4", "binary"]}, "t")[0]
    )
    model.zero_grad(set_to_none=True)
    model.quantizer.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="kl_precisions given while similarity_kl is 0"):  # would do nothing
        BitEmbedLoss(model, teacher=qwen3_teacher, infonce=0.0, embedding_distill=1.0, kl_precisions=["binary"])
