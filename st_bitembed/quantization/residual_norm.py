"""An encoder block's residual add and LayerNorm in one native pass at inference.

BERT-style encoders end their attention and their MLP alike: ``LayerNorm(dropout(dense(x)) + input)``
(``BertSelfOutput``, ``BertOutput`` and their copies). In PyTorch the add and the norm are two passes over the
block's activations and two fresh tensors (``benchmarks/kernel_speed.py --norm-only``: 1.6-1.8 ms for a batch of 32
MiniLM passages against 1.2 ms for the pass here, twelve per batch, a few percent of it). At inference the stand-in
here runs the projection as the module does, then ``csrc/residual_layer_norm.c``: the sum rounded as PyTorch's add
rounds it, the norm in one pass per row, the same arithmetic but for the order of the sums (within a rounding step
of the output's dtype).

Only the classes :data:`ENCODER_OUTPUTS` names are taken, whose ``LayerNorm`` is a ``torch.nn.LayerNorm`` with a
weight and a bias over the last dimension, each after a probe shows the stand-in gives what the module gives. Training,
gradients, anything but float32 / bfloat16 CPU tensors, and hooks on the dropout or the norm (which want to see what
passes between them) run the module's own forward. Checkpoints do not change: the stand-in holds the module's own
children under their own names.
"""

from __future__ import annotations

from typing import Any

import torch

from st_bitembed.quantization.bitlinear import BitLinear, version_key
from st_bitembed.quantization.native import native_residual_layer_norm
from st_bitembed.quantization.stand_in import StandIn, hooked, outputs_at_inference, put_stand_ins

# Classes whose forward is LayerNorm(dropout(dense(hidden_states)) + input_tensor) (transformers' modeling code).
ENCODER_OUTPUTS = (
    "BertSelfOutput",
    "BertOutput",
    "RobertaSelfOutput",
    "RobertaOutput",
    "XLMRobertaSelfOutput",
    "XLMRobertaOutput",
    "MPNetOutput",
    "ElectraSelfOutput",
    "ElectraOutput",
)


class FusedResidualNorm(StandIn):
    """Stands in for an encoder block's output projection, residual add and LayerNorm at inference (see the module
    docstring).

    Attributes:
        output: The model's module (not a child: its children are this module's), which runs whenever the native
            pass does not apply.
    """

    held_as = "output"
    output: torch.nn.Module
    _affine_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None

    def empty_caches(self) -> dict[str, Any]:
        return {"_affine_cache": None}

    def applies(self, input_tensor: torch.Tensor) -> bool:
        """Whether the native pass adds ``input_tensor`` and normalises (else the module's own forward runs)."""
        return (
            self.at_inference()
            and input_tensor.device.type == "cpu"
            and input_tensor.dtype in (torch.float32, torch.bfloat16)
            and not hooked(self.output.dropout, self.output.LayerNorm)
        )

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm's weight and bias in float32, made once per version of them."""
        norm = self.output.LayerNorm
        key = (*version_key(norm.weight), *version_key(norm.bias))
        if self._affine_cache is None or self._affine_cache[0] != key:
            affine = tuple(t.detach().to(torch.float32, copy=True) for t in (norm.weight, norm.bias))
            self._affine_cache = key, affine
        return self._affine_cache[1]

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if not self.applies(input_tensor):
            return self.output(hidden_states, input_tensor)
        projected = self.output.dense(hidden_states)
        try:
            return native_residual_layer_norm()(projected, input_tensor, *self.affine(), self.output.LayerNorm.eps)
        except ValueError:  # a layout or size the kernel does not take: the module's formula (dropout is off)
            return self.output.LayerNorm(projected + input_tensor)

    def extra_repr(self) -> str:
        return f"{type(self.output).__name__}: residual add and LayerNorm in one native pass at inference"


def takes_its_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of :data:`ENCODER_OUTPUTS` whose projection is a BitLinear and whose norm the kernel
    computes: a ``torch.nn.LayerNorm`` with a weight and a bias over the projection's outputs."""
    dense, norm = getattr(module, "dense", None), getattr(module, "LayerNorm", None)
    return (
        type(module).__name__ in ENCODER_OUTPUTS
        and isinstance(dense, BitLinear)
        and type(norm) is torch.nn.LayerNorm
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (dense.out_features,)
    )


def agrees_with_the_module(stand_in: FusedResidualNorm, module: torch.nn.Module) -> bool:
    """Whether the stand-in gives the module's output on a probe at inference, in the norm's dtype, within a rounding
    step of that dtype (the sums are added in another order)."""
    weight = module.LayerNorm.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, module.dense.in_features, generator=generator).to(weight.dtype)
    residual = (torch.randn(2, 3, module.dense.out_features, generator=generator) * 3).to(weight.dtype)
    fused, expected = outputs_at_inference(stand_in, module, hidden, residual)
    tolerance = 1e-5 if weight.dtype == torch.float32 else 1e-2
    if fused.shape != expected.shape:
        return False
    return torch.allclose(fused.float(), expected.float(), rtol=tolerance, atol=tolerance)


def fuse_residual_norms(model: torch.nn.Module) -> int:
    """Put a :class:`FusedResidualNorm` in place of each module of ``model`` :func:`takes_its_norm` accepts, where the
    native kernels exist and a probe agrees. Returns the number of modules fused (earlier ones included)."""
    if native_residual_layer_norm() is None:
        return 0

    def stand_in_for(module: torch.nn.Module) -> FusedResidualNorm | None:
        if not takes_its_norm(module):
            return None
        stand_in = FusedResidualNorm(module)
        return stand_in if agrees_with_the_module(stand_in, module) else None

    return put_stand_ins(model, FusedResidualNorm, stand_in_for)
