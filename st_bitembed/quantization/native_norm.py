"""The model's own RMSNorms that no BitLinear reads, in one native pass at inference.

Once the ternary GEMMs are fast, what is left of a batch's time is work the model does around them: in a Qwen3 layer
the per-head q and k norms (six PyTorch operators each, each a pass over the activations and a fresh tensor) cost
more than all seven projections together (``benchmarks/encode_speed.py``). At inference such a norm runs
``csrc/rms_norm.c`` instead: one pass per row, the same arithmetic (only the order of the sum of squares differs).

Norms in front of BitLinears are folded into their quantizer instead (:mod:`~st_bitembed.quantization.norm_folding`);
the stand-in here takes the others of the classes :data:`NORM_STYLES` names, each after a probe shows that it
computes the formula. Training, gradients and anything but float32 / bfloat16 CPU tensors run the norm itself.
Checkpoints do not change: the stand-in holds the norm's own parameters under their own names.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization.bitlinear import version_key
from st_bitembed.quantization.native import native_rms_norm
from st_bitembed.quantization.norm_folding import FoldedRMSNorm, norm_epsilon
from st_bitembed.quantization.stand_in import StandIn, put_stand_ins

# Norm class -> (what its weight is added to, whether it rounds the normalised values to the activations' dtype
# before the weight): Llama-style norms compute weight * (x * r).to(dtype), Gemma's ((x * r) * (1 + weight)).to(dtype).
NORM_STYLES: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"), (0.0, True)),
    "Gemma3RMSNorm": (1.0, False),
}


class NativeRMSNorm(StandIn):
    """Stands in for a model RMSNorm at inference (see the module docstring).

    Attributes:
        norm: The model's norm (not a child module: its parameters are this module's), which runs whenever the
            native pass does not apply.
        weight_offset: Added to the norm's weight to give the per-channel scale.
        round_before_scale: Whether the normalised values are rounded to the activations' dtype before the scale.
        eps: The norm's epsilon.
    """

    held_as = "norm"
    norm: torch.nn.Module
    _scale_cache: tuple[tuple, torch.Tensor] | None

    def __init__(self, norm: torch.nn.Module, weight_offset: float, round_before_scale: bool) -> None:
        super().__init__(norm)
        self.weight_offset = weight_offset
        self.round_before_scale = round_before_scale
        self.eps = float(norm_epsilon(norm))

    def empty_caches(self) -> dict[str, Any]:
        return {"_scale_cache": None}

    def applies(self, hidden_states: torch.Tensor) -> bool:
        """Whether the native pass computes this norm of ``hidden_states`` (else the norm itself runs)."""
        return (
            self.at_inference()
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype in (torch.float32, torch.bfloat16)
            and hidden_states.stride(-1) == 1
            # weight * x.to(dtype) promotes to the weight's dtype: a weight of another dtype keeps the norm's own path
            and (not self.round_before_scale or self.weight.dtype == hidden_states.dtype)
        )

    def channel_scale(self) -> torch.Tensor:
        """The per-channel scale (``weight + weight_offset``) in float32, made once per version of the weight."""
        key = version_key(self.weight)
        if self._scale_cache is None or self._scale_cache[0] != key:
            self._scale_cache = key, (self.weight.detach().float() + self.weight_offset).contiguous()
        return self._scale_cache[1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.applies(hidden_states):
            try:
                return native_rms_norm()(hidden_states, self.channel_scale(), self.eps, self.round_before_scale)
            except (RuntimeError, ValueError):  # rows without one common stride: the norm's own operators
                pass
        return self.norm(hidden_states)

    def extra_repr(self) -> str:
        return f"{type(self.norm).__name__} in one native pass at inference"


def computes_its_formula(stand_in: NativeRMSNorm) -> bool:
    """Whether the native pass gives what the norm gives on a probe in the norm's dtype (within a rounding step of
    that dtype: the sum of squares is added in another order)."""
    weight = stand_in.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(5, weight.shape[0], generator=generator) * 3).to(weight.dtype)
    with torch.no_grad():
        expected = stand_in.norm(probe)
        if expected.shape != probe.shape or expected.dtype != probe.dtype:
            return False
        output = native_rms_norm()(probe, stand_in.channel_scale(), stand_in.eps, stand_in.round_before_scale)
    tolerance = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return torch.allclose(output.float(), expected.float(), rtol=tolerance, atol=tolerance)


def use_native_norms(model: torch.nn.Module) -> int:
    """Put a :class:`NativeRMSNorm` in place of each norm of ``model`` of a class :data:`NORM_STYLES` names that is
    not folded into BitLinears (:func:`~st_bitembed.quantization.norm_folding.fold_model_norms` first), where the
    native kernels exist and a probe agrees. Returns the number of norms that run natively (earlier ones included)."""
    if native_rms_norm() is None:
        return 0
    # A BitLinear's own norm is part of its quantizer (folded at inference): not a model norm
    inserted = {id(module.rms_norm) for module in model.modules() if isinstance(module, AutoBitLinear)}

    def stand_in_for(module: torch.nn.Module) -> NativeRMSNorm | None:
        style = NORM_STYLES.get(type(module).__name__)
        if style is None or isinstance(module, FoldedRMSNorm) or id(module) in inserted:
            return None
        stand_in = NativeRMSNorm(module, *style)
        return stand_in if computes_its_formula(stand_in) else None

    return put_stand_ins(model, NativeRMSNorm, stand_in_for)
