"""Large inference batches on CPU run in parts whose widest activation stays small.

glibc serves an allocation from memory it keeps only up to its mmap threshold, which it raises to the largest block
freed but never beyond 32 MiB on 64-bit systems; a larger tensor is mapped afresh at every call and each of its pages
faulted in again. A float32 batch of 32 MiniLM passages of 256 tokens makes a 48 MiB MLP activation in every layer,
and the page faults cost the float32 model about a fifth of its time on such batches (README, "Fast, small
inference"). On CPU, :meth:`BitEmbed.encode <st_bitembed.BitEmbed.encode>` runs a batch whose widest activation (the
MLP's, at the model's dtype) would pass :data:`ACTIVATION_BUDGET_BYTES` as parts of equal size below it, and joins
their outputs. The parts keep the batch's padded length, so each text is computed as in the whole batch: exactly,
where the forward computes each text on its own (the native kernels: tested), and otherwise within the rounding that
any change of batch size brings (PyTorch's matrix products). A forward called directly (training, calibration's
hooks, which expect to see all their texts in one call) and other devices run the whole batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# The widest activation a part may make: well under glibc's 32 MiB ceiling, so that its blocks come from kept memory,
# and small enough that what glibc keeps after the largest batch stays small (16 MiB kept a float32 MiniLM student's
# peak RSS above the bf16 teacher's, 8 MiB below it: README, "Parts of 8 MiB").
ACTIVATION_BUDGET_BYTES = 8 * 2**20
# Values of a batch's features that every part takes as they are (e.g. sentence-transformers' "modality").
SHARED_VALUES = (str, int, float, bool, type(None))


def widest_activation_bytes_per_token(backbone: torch.nn.Module) -> int:
    """Bytes per token of ``backbone``'s widest activation: its MLP's (``intermediate_size``, else four times the
    hidden size) in the dtype of its input embeddings."""
    config = backbone.config
    config = getattr(config, "text_config", None) or config
    width = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return width * backbone.get_input_embeddings().weight.element_size()


def split_batch(features: dict[str, Any], bytes_per_token: int) -> list[dict[str, Any]] | None:
    """``features`` (a tokenized batch) as parts of equal size (the last one smaller) whose widest activation fits
    :data:`ACTIVATION_BUDGET_BYTES`, or ``None`` where one part holds the whole batch or the batch is not one this
    can split (no ``attention_mask`` of ``[batch, tokens]``, or a value neither a batch-first tensor nor one of
    :data:`SHARED_VALUES`)."""
    mask = features.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None
    batch, tokens = mask.shape
    per_part = max(1, ACTIVATION_BUDGET_BYTES // (tokens * bytes_per_token))
    if per_part >= batch:
        return None
    for value in features.values():
        splits = isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
        if not splits and not isinstance(value, SHARED_VALUES):
            return None
    size = math.ceil(batch / math.ceil(batch / per_part))  # parts of equal size

    def part(start: int) -> dict[str, Any]:
        return {k: v[start : start + size] if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    return [part(start) for start in range(0, batch, size)]


def join_outputs(outputs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The outputs of the parts (of ``sizes`` texts each) as one batch's: batch-first tensors (also in tuples and
    lists, e.g. every layer's hidden states), and lists of one item per text, concatenated; anything else as the
    first part gave it."""

    def join(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch_first = all(v.ndim > 0 and v.shape[0] == size for v, size in zip(values, sizes))
            return torch.cat(values) if batch_first else first
        if isinstance(first, (tuple, list)):
            if all(isinstance(item, torch.Tensor) for v in values for item in v) and len(set(map(len, values))) == 1:
                return type(first)(join(list(items)) for items in zip(*values))  # e.g. each layer's hidden states
            if all(len(v) == size for v, size in zip(values, sizes)):
                return type(first)(item for v in values for item in v)  # one item per text
        return first

    return {key: join([output[key] for output in outputs]) for key in outputs[0]}
