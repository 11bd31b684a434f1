"""What a term of :class:`~st_bitembed.losses.BitEmbedLoss` needs to run, declared by the term's own class.

Recipe validation, the pre-training checks, the training stage and the model card ask these declarations instead of
knowing each term: adding a term is its class (with ``needs`` and ``describe``), one entry in ``BitEmbedLoss.TERMS``
and its weight in the recipe's loss section.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class TermNeeds:
    """Requirements of a loss term.

    Args:
        pairs: At least two text columns (it ranks each query against the batch's documents).
        teacher: The teacher's sentence embeddings (precomputed into the labels, or from a teacher in the loss).
        teacher_in_loss: The teacher model itself, run on every batch (token-level signals).
        same_tokenizer: The teacher reads the student's token ids, so both must tokenize alike.
    """

    pairs: bool = False
    teacher: bool = False
    teacher_in_loss: bool = False
    same_tokenizer: bool = False

    def __or__(self, other: TermNeeds) -> TermNeeds:
        return TermNeeds(**{f.name: getattr(self, f.name) or getattr(other, f.name) for f in fields(self)})


class LossTerm(Protocol):
    """A loss class usable as a term of BitEmbedLoss."""

    needs: ClassVar[TermNeeds]

    @staticmethod
    def describe(options: Mapping[str, Any], teacher: str | None) -> str:
        """One line for the model card, from BitEmbedLoss's keyword arguments and the teacher's name."""
