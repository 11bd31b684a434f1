"""A gated MLP's activation and product folded into its projections' kernels at inference.

Llama-style MLPs compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: the gate, its activation, the up
projection and their product are four tensors as large as the gate, each written once and read once or twice. In a
decoder layer the MLP's input comes through a folded model norm (:mod:`~st_bitembed.quantization.norm_folding`),
and there, where the activation is one the kernels compute (one of
:data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS`: a probe finds which gives exactly the module's
``act_fn``), the gate and up projections run as one gated GEMM
(:meth:`FoldedRMSNorm.gated_product <st_bitembed.quantization.norm_folding.FoldedRMSNorm.gated_product>`): each
item of its parallel loop computes a block of the gate's outputs, activates them and keeps them in a buffer of its
own, then multiplies the up projection's same outputs by them as it writes them. Only the product is ever written
(``benchmarks/kernel_speed.py --mlp-only`` times the MLP both ways). The activation is the kernel's (vectorized;
PyTorch's exp is SLEEF's), an ulp or two of float32 from PyTorch's, which moves a bf16 value only on a rounding
boundary.

Called on activations no folded norm let through, the stand-in hands the gate (activated there too) and the up
projection to :meth:`BitLinear.forward_of_product <st_bitembed.quantization.bitlinear.BitLinear.forward_of_product>`,
whose native quantizer multiplies them row by row as it reads them (``csrc/activation_codes.c``), rounded as PyTorch
rounds the product; with an activation the kernels do not compute, PyTorch's runs first.

Only the classes :data:`GATED_MLPS` names are taken, each after a probe shows the stand-in gives what the module gives
(exactly with PyTorch's activation; within rounding with the quantizer's). Training, gradients, other kernels and
hooks on the down projection (which want to see its input) run the module's own forward; hooks on the gate or up
projection run the two projections on their own. Checkpoints do not change: the stand-in holds the module's own
children under their own names.
"""

from __future__ import annotations

import torch

from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.native import TORCH_ACTIVATIONS
from st_bitembed.quantization.norm_folding import FoldedRMSNorm
from st_bitembed.quantization.stand_in import StandIn, hooked, outputs_at_inference, put_stand_ins

# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (transformers' modeling code).
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP")


class FusedGatedMLP(StandIn):
    """Stands in for a gated MLP at inference (see the module docstring).

    Attributes:
        mlp: The model's module (not a child: its children are this module's), which runs whenever the fused path
            does not apply.
        activation: The :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name of ``mlp.act_fn``, which
            the quantizer then applies; ``None``: ``act_fn`` runs in PyTorch.
    """

    held_as = "mlp"
    mlp: torch.nn.Module

    def __init__(self, mlp: torch.nn.Module, activation: str | None = None) -> None:
        super().__init__(mlp)
        self.activation = activation

    def fuses(self) -> bool:
        """Whether a fused path runs (the gated GEMM, else the down projection's quantizer; otherwise the module's
        own forward): at inference, unless hooks on the down projection want to see its input (e.g. calibration's)."""
        down = self.mlp.down_proj
        return self.at_inference() and isinstance(down, BitLinear) and not hooked(down)

    def gated_norm(self, hidden_states: torch.Tensor) -> FoldedRMSNorm | None:
        """The folded model norm that let ``hidden_states`` through to both the gate and the up projection, where
        their GEMM can make the product itself (the activation is one the kernels apply, no hooks on either
        projection), else ``None``."""
        gate, up = self.mlp.gate_proj, self.mlp.up_proj
        norm = getattr(gate, "folded_norm", None)
        if self.activation is None or norm is None or getattr(up, "folded_norm", None) is not norm:
            return None
        return norm if norm.let_through(hidden_states) and not hooked(gate, up) else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.fuses():
            return self.mlp(hidden_states)
        norm = self.gated_norm(hidden_states)
        if norm is not None:  # the product made by the gate and up projections' GEMM as it writes them
            product = norm.gated_product(hidden_states, self.mlp.gate_proj, self.mlp.up_proj, self.activation)
            return self.mlp.down_proj(product)
        gate = self.mlp.gate_proj(hidden_states)
        if self.activation is None:
            gate = self.mlp.act_fn(gate)
        return self.mlp.down_proj.forward_of_product(gate, self.mlp.up_proj(hidden_states), self.activation)

    def extra_repr(self) -> str:
        name = type(self.mlp).__name__
        if self.activation is None:
            return f"{name}: its product taken by down_proj's quantizer at inference"
        return (
            f"{name}: its activation ({self.activation}) and product made by gate_proj and up_proj's GEMM behind a"
            " folded norm, else taken by down_proj's quantizer, at inference"
        )


def activation_name(act_fn: torch.nn.Module, dtype: torch.dtype) -> str | None:
    """The :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name of the function ``act_fn`` computes
    (bit for bit, on a probe in ``dtype`` that spans its range), or ``None``."""
    probe = torch.linspace(-12, 12, 4097).to(dtype)
    with torch.no_grad():
        expected = act_fn(probe)
        return next((name for name, f in TORCH_ACTIVATIONS.items() if torch.equal(f(probe), expected)), None)


def gives_what_the_module_gives(stand_in: torch.nn.Module, module: torch.nn.Module, exact: bool) -> bool:
    """Whether ``stand_in`` gives ``module``'s output on a probe, at inference, in the dtype of the module's first
    BitLinear: exactly (``exact``), or within the output's rounding (a kernel's activation: a code apart at a
    rounding tie)."""
    first = next(layer for layer in module.modules() if isinstance(layer, BitLinear))
    weight = first.weight
    if weight.device.type != "cpu" or not weight.is_floating_point():
        return False
    probe = torch.randn(2, 3, first.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    fused, expected = outputs_at_inference(stand_in, module, probe)
    if exact:
        return torch.equal(fused, expected)
    rounding = 1e-2 if weight.dtype == torch.bfloat16 else 1e-3
    return bool((fused - expected).abs().max() <= rounding * expected.abs().max())


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Put a :class:`FusedGatedMLP` in place of each MLP of ``model`` of a class :data:`GATED_MLPS` names whose down
    projection is a BitLinear, where a probe agrees. Returns the number of MLPs fused (earlier ones included)."""

    def stand_in_for(module: torch.nn.Module) -> FusedGatedMLP | None:
        if type(module).__name__ not in GATED_MLPS or not isinstance(getattr(module, "down_proj", None), BitLinear):
            return None
        activation = activation_name(module.act_fn, module.down_proj.weight.dtype)
        stand_in = FusedGatedMLP(module, activation)
        if activation is not None and not gives_what_the_module_gives(stand_in, module, exact=False):
            stand_in = FusedGatedMLP(module)  # the quantizer's activation strays: PyTorch's, with the product fused
        return stand_in if gives_what_the_module_gives(stand_in, module, exact=stand_in.activation is None) else None

    return put_stand_ins(model, FusedGatedMLP, stand_in_for)
