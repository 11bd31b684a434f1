from __future__ import annotations

import copy

import pytest
import torch
from sentence_transformers import SentenceTransformer

from st_bitembed import BitEmbed
from st_bitembed.losses import BitEmbedLoss, HiddenStateDistillLoss
from st_bitembed.losses.attention_relation import transformer_blocks
from st_bitembed.losses.bitembed import mergeable
from st_bitembed.losses.hidden_state import aligned_teacher_layers, token_cosine_distance

QUERIES = ["How do ternary weights work?", "What is the capital of France?", "Who wrote Hamlet?"]
DOCUMENTS = [
    "Weights are -1, 0 or +1 times one scale per tensor, so a matrix product needs additions only.",
    "Paris is the capital and largest city of France, on the Seine.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
]


def test_teacher_layers_align_by_relative_depth():
    assert aligned_teacher_layers([0, 1, 2, 3], 4, 4) == [0, 1, 2, 3]
    # a 2-block student of a 6-block teacher learns from teacher blocks 3 and 6 (indices 2 and 5)
    assert aligned_teacher_layers([0, 1], 2, 6) == [2, 5]
    assert aligned_teacher_layers([-1], 3, 12) == [11]


def test_token_distance_counts_real_tokens_only():
    teacher = torch.randn(2, 5, 8)
    student = teacher.clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    student[0, 3:] = -teacher[0, 3:]  # padded positions may be anything
    assert token_cosine_distance(student, teacher, mask).abs() < 1e-6
    student[1, 4] = -teacher[1, 4]  # one real token of eight pointing the other way: distance 2 / 8
    torch.testing.assert_close(token_cosine_distance(student, teacher, mask), torch.tensor(0.25))


def test_zero_for_the_teacher_itself_and_positive_for_the_ternary_student(qwen3_dir, qwen3_teacher):
    twin = copy.deepcopy(qwen3_teacher)
    columns = [twin.preprocess(QUERIES), twin.preprocess(DOCUMENTS)]
    assert HiddenStateDistillLoss(twin, qwen3_teacher)(columns).abs() < 1e-5
    student = BitEmbed.from_backbone(str(qwen3_dir))
    loss = HiddenStateDistillLoss(student, qwen3_teacher, layers=[-1])
    assert loss.layers == [len(transformer_blocks(student)) - 1]
    value = loss([student.preprocess(QUERIES), student.preprocess(DOCUMENTS)])
    assert value > 1e-3
    value.backward()
    assert all(p.grad is None for p in qwen3_teacher.parameters())


def test_refuses_another_tokenizer_or_blocks_the_student_lacks(converted_qwen3, minilm_dir):
    with pytest.raises(ValueError, match="share a tokenizer"):
        HiddenStateDistillLoss(converted_qwen3, SentenceTransformer(str(minilm_dir)))
    with pytest.raises(ValueError, match="layers must name blocks"):
        HiddenStateDistillLoss(converted_qwen3, converted_qwen3, layers=[99])


def test_bitembed_loss_reuses_the_hidden_state_teacher_passes_for_the_pooled_targets(converted_qwen3, qwen3_teacher):
    columns = [converted_qwen3.preprocess(QUERIES), converted_qwen3.preprocess(DOCUMENTS)]
    calls = []
    handle = qwen3_teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        with_hidden = BitEmbedLoss(
            converted_qwen3,
            teacher=qwen3_teacher,
            similarity_kl=1.0,
            attention_relation=1.0,
            embedding_distill=1.0,
            hidden_states=1.0,
        )(columns, None)
        passes = len(calls)
        calls.clear()
        reference = BitEmbedLoss(
            converted_qwen3, teacher=qwen3_teacher, similarity_kl=1.0, attention_relation=1.0, embedding_distill=1.0
        )(columns, None)
    finally:
        handle.remove()
    # one teacher pass per student forward (query and document columns), none for the KL or the relations
    assert passes == 2
    assert set(with_hidden) - set(reference) == {"hidden_states"}
    for term in ("similarity_kl", "embedding_distill", "attention_relation", "infonce/float32"):
        torch.testing.assert_close(with_hidden[term], reference[term], atol=1e-5, rtol=1e-4)


def test_a_token_teacher_teaches_the_tokens_and_the_teacher_the_pooled_targets(
    converted_qwen3, qwen3_teacher, minilm_dir
):
    """A teacher of another tokenizer and dimension (all-MiniLM-L6-v2 for a Qwen3 student) gives the pooled targets,
    precomputed or run in the loss; the hidden states come from the token teacher, which shares the tokenizer."""
    teacher = SentenceTransformer(str(minilm_dir))
    columns = [converted_qwen3.preprocess(QUERIES), converted_qwen3.preprocess(DOCUMENTS)]
    labels = torch.stack([teacher.encode(texts, convert_to_tensor=True) for texts in (QUERIES, DOCUMENTS)], dim=1)
    calls = {"teacher": 0, "token_teacher": 0}
    handles = [
        model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, model in (("teacher", teacher), ("token_teacher", qwen3_teacher))
    ]
    options = {"infonce": 0.0, "similarity_kl": 1.0, "hidden_states": 1.0}
    try:
        precomputed = BitEmbedLoss(converted_qwen3, token_teacher=qwen3_teacher, **options)(columns, labels)
        assert calls == {"teacher": 0, "token_teacher": 2}  # one token-teacher pass per column
        in_loss = BitEmbedLoss(converted_qwen3, teacher=teacher, token_teacher=qwen3_teacher, **options)(columns, None)
        assert calls == {"teacher": 2, "token_teacher": 4}  # the teacher reads the columns' texts, tokenized its way
    finally:
        for handle in handles:
            handle.remove()
    kl_alone = BitEmbedLoss(converted_qwen3, infonce=0.0, similarity_kl=1.0)(columns, labels)["similarity_kl"]
    hidden_alone = HiddenStateDistillLoss(converted_qwen3, qwen3_teacher)(columns)
    for terms in (precomputed, in_loss):
        assert set(terms) == {"similarity_kl", "hidden_states"}
        torch.testing.assert_close(terms["similarity_kl"], kl_alone, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(terms["hidden_states"], hidden_alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs precomputed teacher embeddings"):  # no teacher and no labels
        BitEmbedLoss(converted_qwen3, token_teacher=qwen3_teacher, **options)(columns, None)
    with pytest.raises(ValueError, match="token_teacher= is given but no token-level term is on"):
        BitEmbedLoss(converted_qwen3, teacher=teacher, token_teacher=qwen3_teacher, similarity_kl=1.0)


def test_contrastive_weight_zero_leaves_distillation_only(converted_qwen3, qwen3_teacher):
    loss = BitEmbedLoss(
        converted_qwen3,
        teacher=qwen3_teacher,
        infonce=0.0,
        similarity_kl=0.0,
        attention_relation=0.0,
        hidden_states=1.0,
    )
    terms = loss([converted_qwen3.preprocess(DOCUMENTS)], None)  # one column of unlabeled passages
    assert set(terms) == {"hidden_states"}
    with pytest.raises(ValueError, match="at least one > 0"):
        BitEmbedLoss(converted_qwen3, infonce=0.0, similarity_kl=0.0, attention_relation=0.0)
    with pytest.raises(ValueError, match="hidden_states > 0"):
        BitEmbedLoss(converted_qwen3, hidden_states=1.0, attention_relation=0.0)


def test_columns_of_very_different_lengths_are_not_merged():
    def column(width: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.ones(4, width, dtype=torch.long)}

    assert mergeable([column(10), column(12), column(11)])
    assert not mergeable([column(10), column(8), column(120)])  # a short query column beside long passages
    assert mergeable([column(10), column(120)])  # one column after the anchor: nothing to merge
