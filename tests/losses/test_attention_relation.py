from __future__ import annotations

import copy

import pytest
import torch
from loss_inputs import QUERIES, features
from sentence_transformers import SentenceTransformer

from st_bitembed import BitEmbed
from st_bitembed.losses import AttentionRelationLoss, BitEmbedLoss


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


def test_attention_distillation_refuses_a_teacher_with_another_tokenizer(converted_qwen3, minilm_dir):
    teacher = SentenceTransformer(str(minilm_dir))
    with pytest.raises(ValueError, match=r"student uses Qwen2Tokenizer\(.*\), the teacher BertTokenizer\("):
        BitEmbedLoss(converted_qwen3, teacher=teacher, attention_relation=1.0)
    BitEmbedLoss(converted_qwen3, teacher=teacher, similarity_kl=1.0)  # the KL term alone is fine across tokenizers
