"""Pure-torch reference of BitNet b1.58 W1.58A8 arithmetic.

This is the specification the layers are tested against: transformers' ``AutoBitLinear`` (training form)
and any faster inference kernel must reproduce it. Nothing here is on a hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The same clamps transformers' WeightQuant / ActQuant use, so that all-zero rows do not divide by zero.
MIN_SCALE = 1e-5
INT8_MAX = 127


def ternary_weight_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight tensor per tensor to {-1, 0, +1} with absmean scaling.

    Returns:
        ``(codes, scale)``: int8 codes in {-1, 0, 1} with the weight's shape, and a 0-d float32 scale such that
        ``codes * scale`` is the dequantized weight.
    """
    weight = weight.detach().float()
    scale = weight.abs().mean().clamp(min=MIN_SCALE)
    codes = (weight / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale


def int8_activation_codes(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token (last dimension) to int8 with absmax scaling.

    Returns:
        ``(codes, scale)``: int8 codes in [-127, 127] and a float32 scale per token (shape ``[..., 1]``) such that
        ``codes * scale`` is the dequantized activation.
    """
    activations = activations.detach().float()
    scale = activations.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_SCALE) / INT8_MAX
    codes = (activations / scale).round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return codes, scale


def bitlinear_reference(
    activations: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` on int8-quantized activations and ternary-quantized weights, computed in float32."""
    activation_codes, activation_scale = int8_activation_codes(activations)
    weight_codes, weight_scale = ternary_weight_codes(weight)
    output = F.linear(activation_codes.float() * activation_scale, weight_codes.float() * weight_scale)
    if bias is not None:
        output = output + bias.float()
    return output
