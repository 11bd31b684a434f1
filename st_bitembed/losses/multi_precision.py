"""Apply a base loss to the Quantize head's outputs at several storage precisions, from one forward pass."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from sentence_transformers.base.losses.merged_forward import embed_columns
from torch import Tensor, nn

from st_bitembed.losses.info_nce import BITEMBED_CITATION
from st_bitembed.modules.quantize import Quantize
from st_bitembed.precisions import DEFAULT_PRECISIONS, PrecisionName, get_precision


class MultiPrecisionLoss(nn.Module):
    """Train one model for every storage precision at once, like MatryoshkaLoss does for dimensions.

    The model embeds each text column once; for each precision, the base loss's ``compute_loss_from_embeddings``
    gets fresh straight-through quantize-dequantize copies (``model.quantizer.fake_quantize``) of those embeddings,
    so the cached float output is never modified, and gradients reach both the model and the Quantize head's
    ranges. The head is registered on this loss, so the trainer's optimizer trains it; under DDP its gradients
    are averaged across processes (it lives outside the DDP-wrapped model).

    Args:
        model: A :class:`~st_bitembed.BitEmbed` model (it owns the Quantize head).
        loss: The base loss; it must implement ``compute_loss_from_embeddings(embeddings, labels)``.
        precisions: Storage precisions to train, from :data:`st_bitembed.PRECISIONS`.
        precision_weights: Weight of each precision's loss; defaults to 1 each.

    References:
        - BitNet Text Embeddings: https://arxiv.org/abs/2606.25674
        - Matryoshka Representation Learning: https://arxiv.org/abs/2205.13147

    Inputs:
        Whatever the base loss takes.

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformerTrainer
            from st_bitembed import BitEmbed
            from st_bitembed.losses import InfoNCELoss, MultiPrecisionLoss

            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "anchor": ["It's nice weather outside today.", "He drove to work."],
                "positive": ["It's so sunny.", "He took the car to the office."],
            })
            loss = MultiPrecisionLoss(model, InfoNCELoss(model), precisions=["float32", "int4", "binary"])
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        precisions: Sequence[PrecisionName] = DEFAULT_PRECISIONS,
        precision_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.precisions = [get_precision(p).name for p in precisions]
        if not self.precisions:
            raise ValueError("No precisions to train; name at least one, e.g. precisions=['float32', 'int4'].")
        self.precision_weights = list(precision_weights) if precision_weights is not None else [1.0] * len(precisions)
        if len(self.precision_weights) != len(self.precisions):
            raise ValueError(
                f"Got {len(self.precision_weights)} precision_weights for {len(self.precisions)} precisions."
            )
        if not hasattr(loss, "compute_loss_from_embeddings"):
            raise ValueError(f"{type(loss).__name__} has no compute_loss_from_embeddings, so it cannot be wrapped.")
        quantizer = getattr(model, "quantizer", None)
        if not isinstance(quantizer, Quantize):
            raise ValueError("MultiPrecisionLoss needs a BitEmbed model, whose Quantize head it trains.")
        self.model = model
        self.loss = loss
        self.quantizer = quantizer
        self._gradient_hooks: list[Any] = []

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        embeddings = embed_columns(self.model, sentence_features)
        return torch.stack(list(self.compute_terms(embeddings, labels).values())).sum()

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        return torch.stack(list(self.compute_terms(embeddings, labels).values())).sum()

    def compute_terms(self, embeddings: list[Tensor], labels: Tensor | None) -> Mapping[str, Tensor]:
        """The weighted base loss at each precision, keyed by precision."""
        self._average_head_gradients_across_processes()
        return {
            precision: weight
            * self.loss.compute_loss_from_embeddings(
                [self.quantizer.fake_quantize(e, precision) for e in embeddings], labels
            )
            for precision, weight in zip(self.precisions, self.precision_weights)
        }

    def _average_head_gradients_across_processes(self) -> None:
        if self._gradient_hooks or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world_size = dist.get_world_size()
        # A group of its own, so these all-reduces never interleave with DDP's bucketed ones on the default group.
        group = dist.new_group()

        def average(gradient: Tensor) -> Tensor:
            gradient = gradient.clone()
            dist.all_reduce(gradient, group=group)
            return gradient / world_size

        self._gradient_hooks = [parameter.register_hook(average) for parameter in self.quantizer.parameters()]

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "loss": type(self.loss).__name__,
            "precisions": self.precisions,
            "precision_weights": self.precision_weights,
        }

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION
