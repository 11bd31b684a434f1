"""Direct embedding distillation as a BitEmbedLoss term: sentence-transformers' EmbedDistillLoss, declared."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss

from st_bitembed.losses.term import TermNeeds


class EmbeddingDistillLoss(EmbedDistillLoss):
    """``1 - cos(student, teacher)`` per text: sentence-transformers'
    :class:`~sentence_transformers.sentence_transformer.losses.EmbedDistillLoss` with ``distance_metric="cosine"``,
    with what it needs declared for :class:`~st_bitembed.losses.BitEmbedLoss` (the teacher's embeddings, of the
    student's dimension). Not in the paper's objective; it speeds up recovery a lot when the teacher is the
    backbone's own full-precision model.
    """

    needs: ClassVar[TermNeeds] = TermNeeds(teacher=True)

    @staticmethod
    def describe(options: Mapping[str, Any], teacher: str | None) -> str:
        return f"embedding distillation (cosine) from {teacher}"
