from __future__ import annotations

import torch
from loss_inputs import DOCUMENTS, NEGATIVES, QUERIES, features
from sentence_transformers import SentenceTransformer

from st_bitembed import BitEmbed
from st_bitembed.losses import SimilarityKLLoss


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
