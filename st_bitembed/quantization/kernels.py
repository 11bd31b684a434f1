"""Integer kernels for BitLinear inference: int8 activations x ternary (int8) weights -> int32, then rescale.

``torch._int_mm`` runs the int8 GEMM (oneDNN with AMX / VNNI on CPU, cuBLASLt on CUDA). Where it is missing or
refuses the shapes, the same integer codes are multiplied in float32, which is exact while ``127 * in_features``
stays below 2**24 (every BitLinear of the models we target). Both are tested against
:mod:`st_bitembed.quantization.ternary`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from st_bitembed.quantization.ternary import INT8_MAX, MIN_SCALE

logger = logging.getLogger(__name__)


@functools.cache
def int_mm_available(device_type: str) -> bool:
    """Whether ``torch._int_mm`` works on this device type (checked once, on a small product)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(32, 64, dtype=torch.int8, device=device_type)
        b = torch.ones(64, 32, dtype=torch.int8, device=device_type)
        return bool((torch._int_mm(a, b) == 64).all())
    except (RuntimeError, NotImplementedError) as error:
        logger.info("torch._int_mm unavailable on %s (%s); BitLinear uses the float32 fallback", device_type, error)
        return False


def quantize_activations(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 codes (``[..., K]``) and their float32 step (``[..., 1]``), as in transformers'
    ``ActQuant`` (scale ``127 / absmax``, round, clamp to [-128, 127])."""
    activations = activations.float()
    scale = INT8_MAX / activations.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_SCALE)
    codes = (activations * scale).round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return codes, 1.0 / scale


def int8_linear(
    activations: torch.Tensor,
    weight_codes_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    use_int_mm: bool | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ b)`` for int8-quantized ``x`` and ternary ``W = codes * weight_scale``.

    Args:
        activations: ``[..., K]`` float activations.
        weight_codes_t: ``[K, N]`` int8 ternary codes, transposed (contiguous) for the GEMM.
        weight_scale: 0-d float32 scale of the ternary weights.
        bias: Optional ``[N]`` bias.
        use_int_mm: Force (True) or forbid (False) ``torch._int_mm``; by default used where available.

    Returns:
        ``[..., N]`` in the activations' dtype.
    """
    codes, step = quantize_activations(activations)
    flat = codes.reshape(-1, codes.shape[-1])
    if use_int_mm is None:
        use_int_mm = int_mm_available(flat.device.type)
    if use_int_mm:
        rows = flat.shape[0]
        padded = max(rows, 17) + (-max(rows, 17) % 8) - rows  # cuBLASLt wants more than 16 rows, in multiples of 8
        product = torch._int_mm(F.pad(flat, (0, 0, 0, padded)) if padded else flat, weight_codes_t)[:rows].float()
    else:
        product = flat.float() @ weight_codes_t.float()
    output = product.reshape(*codes.shape[:-1], -1) * (step * weight_scale)
    if bias is not None:
        output = output + bias.float()
    return output.to(activations.dtype)


@functools.cache
def _compiled_int8_linear():
    return torch.compile(int8_linear, dynamic=True)


_COMPILE_FAILED: set[str] = set()


def fused_int8_linear(
    activations: torch.Tensor,
    weight_codes_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`int8_linear` compiled with ``torch.compile`` (activation quantization, GEMM and rescale fused), on the
    eager function where compilation is unavailable or fails (logged once per device type)."""
    device_type = activations.device.type
    use_int_mm = int_mm_available(device_type)
    if device_type not in _COMPILE_FAILED:
        try:
            return _compiled_int8_linear()(activations, weight_codes_t, weight_scale, bias, use_int_mm)
        except Exception as error:  # any compiler / backend failure: the eager kernel computes the same thing
            _COMPILE_FAILED.add(device_type)
            logger.warning(
                "torch.compile of the int8 BitLinear kernel failed on %s (%s); using eager.", device_type, error
            )
    return int8_linear(activations, weight_codes_t, weight_scale, bias, use_int_mm)
