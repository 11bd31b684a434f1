from __future__ import annotations

from st_bitembed.losses.attention_relation import AttentionRelationLoss
from st_bitembed.losses.bitembed import BitEmbedLoss
from st_bitembed.losses.embedding_distill import EmbeddingDistillLoss
from st_bitembed.losses.hidden_state import HiddenStateDistillLoss
from st_bitembed.losses.info_nce import InfoNCELoss
from st_bitembed.losses.multi_precision import MultiPrecisionLoss
from st_bitembed.losses.similarity_kl import SimilarityKLLoss

__all__ = [
    "AttentionRelationLoss",
    "BitEmbedLoss",
    "EmbeddingDistillLoss",
    "HiddenStateDistillLoss",
    "InfoNCELoss",
    "MultiPrecisionLoss",
    "SimilarityKLLoss",
]
