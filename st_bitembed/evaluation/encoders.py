"""mteb encoders that serve a model's embeddings at one storage precision: from its Quantize head or post hoc."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import numpy as np
import torch

from st_bitembed.modules.quantize import Quantize
from st_bitembed.precisions import Precision, PrecisionName, get_precision

QuantizationMethod = Literal["head", "posthoc"]


def posthoc_quantize(embeddings: torch.Tensor, precision: PrecisionName | Precision) -> torch.Tensor:
    """The after-the-fact baseline: quantize float embeddings with ranges calibrated on the embeddings themselves.

    Integer precisions use per-dimension min / max of ``embeddings`` (as mteb's CompressionWrapper does), then
    uniform codes, returned as the values they stand for; binary is the sign (+-1, Hamming-equivalent under cosine).
    """
    precision = get_precision(precision)
    if precision.is_float:
        return embeddings.to(precision.dtype).float()
    if precision.is_binary:
        return torch.where(embeddings > 0, 1.0, -1.0)
    levels = 2**precision.bits
    minimum, maximum = embeddings.min(dim=0).values, embeddings.max(dim=0).values
    step = (maximum - minimum).clamp(min=1e-12) / levels
    codes = torch.floor((embeddings - minimum) / step).clamp(0, levels - 1)
    return minimum + (codes + 0.5) * step


class EncodeOnce:
    """Wraps an mteb encoder so that a repeated encode call (same task, split, subset, prompt type and texts) is
    served from memory: evaluating many precisions then costs one encoding pass.

    (mteb's own ``CachedEmbeddingWrapper`` re-joins retrieval documents' titles onto texts that already carry them,
    which shifts SciFact nDCG@10 from 0.6451 to 0.6492 for all-MiniLM-L6-v2, so it is not used here.)
    """

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.mteb_model_meta = encoder.mteb_model_meta
        self._embeddings: dict[tuple, np.ndarray] = {}

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str, **kwargs: Any) -> np.ndarray:
        dataset = getattr(inputs, "dataset", None)
        if dataset is None or "text" not in getattr(dataset, "column_names", ()):
            return self.encoder.encode(
                inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset, **kwargs
            )
        texts = hashlib.sha256("\x1f".join(map(str, dataset["text"])).encode()).hexdigest()
        key = (task_metadata.name, hf_split, hf_subset, str(kwargs.get("prompt_type")), texts)
        if key not in self._embeddings:
            self._embeddings[key] = np.asarray(
                self.encoder.encode(
                    inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset, **kwargs
                )
            )
        return self._embeddings[key]

    def clear(self) -> None:
        """Forget the stored embeddings (after a task, so memory holds one task's embeddings at a time)."""
        self._embeddings.clear()

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        return self.encoder.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        return self.encoder.similarity_pairwise(embeddings1, embeddings2)


class QuantizedEncoder:
    """Wraps an mteb encoder so that every embedding is stored at ``precision`` before mteb scores it.

    ``method="head"`` uses the model's trained Quantize head: codes are dequantized to the values they stand for
    (binary to +-1 / sqrt(dim), so cosine equals the Hamming ranking; int4 / int2 to their levels), never scored
    as packed bytes. ``method="posthoc"`` is the baseline :func:`posthoc_quantize`. The wrapped encoder is meant to
    be an :class:`EncodeOnce`, so that every precision reuses one encoding pass.

    The result namespace (``ModelMeta.name`` / ``revision``) is the model's name with ``{method}-{precision}`` as
    revision (``{method}-{precision}-{fingerprint}`` with a ``fingerprint`` of the weights), so that results of
    different precisions, or of different weights under one name, never stand for each other in an mteb
    ``ResultCache``.
    """

    def __init__(
        self,
        encoder: Any,
        precision: PrecisionName,
        name: str,
        method: QuantizationMethod = "head",
        quantizer: Quantize | None = None,
        fingerprint: str = "",
    ) -> None:
        get_precision(precision)
        if method == "head" and quantizer is None and precision != "float32":
            raise ValueError("method='head' needs the model's Quantize head (quantizer=model.quantizer).")
        self.encoder = encoder
        self.precision = precision
        self.method = method
        self.quantizer = quantizer
        self.mteb_model_meta = encoder.mteb_model_meta.model_copy(
            update={"name": name, "revision": "-".join(filter(None, (method, precision, fingerprint)))}
        )

    def encode(self, inputs: Any, **kwargs: Any) -> np.ndarray:
        embeddings = torch.as_tensor(np.asarray(self.encoder.encode(inputs, **kwargs)), dtype=torch.float32)
        if self.precision == "float32":
            return embeddings.numpy()
        if self.method == "posthoc":
            return posthoc_quantize(embeddings, self.precision).numpy()
        codes = self.quantizer.quantize(embeddings.to(self.quantizer.device), self.precision)
        return self.quantizer.dequantize(codes, self.precision, embeddings.shape[-1]).cpu().numpy()

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        return self.encoder.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        return self.encoder.similarity_pairwise(embeddings1, embeddings2)
