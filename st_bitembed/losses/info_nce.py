"""InfoNCE with in-batch (and hard) negatives: sentence-transformers' MultipleNegativesRankingLoss, named by
temperature, with a symmetric option."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from st_bitembed.losses.term import TermNeeds
from st_bitembed.precisions import DEFAULT_PRECISIONS

BITEMBED_CITATION = """
@article{bitnet-text-embeddings,
    title={BitNet Text Embeddings},
    journal={arXiv preprint arXiv:2606.25674},
    year={2026}
}
"""


class InfoNCELoss(MultipleNegativesRankingLoss):
    """Contrastive InfoNCE over in-batch negatives, optional hard negatives and an optional symmetric term.

    For each query (first column), the positive (second column) must score higher than every other document in
    the batch: the other queries' positives and every hard negative (further columns). With ``symmetric=True``
    each positive must also pick out its query among the batch's queries (document-to-query), averaged with the
    query-to-document term. Under DDP (torchrun / accelerate), ``gather_across_devices=True`` scores each query
    against the documents of every process, with gradients flowing back to their owners.

    This is :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` with BitEmbed's
    parameterisation; use it alone for stage 1 or inside :class:`~st_bitembed.losses.MultiPrecisionLoss`.

    Args:
        model: The model to train.
        temperature: Softmax temperature over cosine similarities (``scale = 1 / temperature``).
        symmetric: Add the document-to-query term.
        gather_across_devices: Gather queries and documents from all processes before scoring.

    References:
        - Representation Learning with Contrastive Predictive Coding: https://arxiv.org/abs/1807.03748
        - BitNet Text Embeddings: https://arxiv.org/abs/2606.25674

    Inputs:
        +-------------------------------------------------+--------+
        | Texts                                           | Labels |
        +=================================================+========+
        | (query, positive) pairs                         | none   |
        +-------------------------------------------------+--------+
        | (query, positive, negative_1, ..., negative_n)  | none   |
        +-------------------------------------------------+--------+

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformerTrainer
            from st_bitembed import BitEmbed
            from st_bitembed.losses import InfoNCELoss

            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "anchor": ["It's nice weather outside today.", "He drove to work."],
                "positive": ["It's so sunny.", "He took the car to the office."],
            })
            loss = InfoNCELoss(model, temperature=0.05, symmetric=True)
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    needs: ClassVar[TermNeeds] = TermNeeds(pairs=True)

    @staticmethod
    def describe(options: Mapping[str, Any], teacher: str | None) -> str:
        precisions = "/".join(options.get("precisions", DEFAULT_PRECISIONS))
        return f"InfoNCE at {precisions} (temperature {options.get('temperature', 0.05)})"

    def __init__(
        self,
        model: SentenceTransformer,
        temperature: float = 0.05,
        symmetric: bool = False,
        gather_across_devices: bool = False,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        super().__init__(
            model,
            scale=1.0 / temperature,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",),
            partition_mode="per_direction",
        )
        self.symmetric = symmetric

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "symmetric": self.symmetric,
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION
