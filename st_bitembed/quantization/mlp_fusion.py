"""A gated MLP's product folded into its down projection's quantizer at inference.

Llama-style MLPs compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: the product is a tensor as large as the
gate's, written once and read once by the down projection's quantizer. At inference the stand-in here hands the
activated gate and the up projection to :meth:`BitLinear.forward_of_product
<st_bitembed.quantization.bitlinear.BitLinear.forward_of_product>`, whose native quantizer multiplies them row by row
as it reads them (``csrc/activation_codes.c``), rounded as PyTorch rounds the product: the same outputs, one pass
and one tensor less per layer.

Only the classes :data:`GATED_MLPS` names are taken, each after a probe shows the stand-in gives exactly what the
module gives. Training, gradients, other kernels and hooks on the down projection (which want to see its input) run
the module's own forward. Checkpoints do not change: the
stand-in holds the module's own children under their own names.
"""

from __future__ import annotations

import torch

from st_bitembed.quantization.bitlinear import BitLinear

# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (transformers' modeling code).
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP")


class FusedGatedMLP(torch.nn.Module):
    """Stands in for a gated MLP at inference (see the module docstring).

    Attributes:
        mlp: The model's module (not a child: its children are this module's), which runs whenever the fused path
            does not apply.
    """

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "mlp", mlp)
        for name, child in mlp.named_children():
            self.add_module(name, child)
        for name, parameter in mlp.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        self.train(mlp.training)

    def fuses(self) -> bool:
        """Whether the product goes to the down projection's quantizer (else the module's own forward runs): at
        inference, unless hooks on the down projection want to see its input (e.g. calibration's)."""
        down = self.mlp.down_proj
        hooked = bool(down._forward_pre_hooks or down._forward_hooks)
        return not self.training and not torch.is_grad_enabled() and isinstance(down, BitLinear) and not hooked

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.fuses():
            return self.mlp(hidden_states)
        activated = self.mlp.act_fn(self.mlp.gate_proj(hidden_states))
        return self.mlp.down_proj.forward_of_product(activated, self.mlp.up_proj(hidden_states))

    def extra_repr(self) -> str:
        return f"{type(self.mlp).__name__}: its product taken by down_proj's quantizer at inference"


def gives_what_the_module_gives(stand_in: FusedGatedMLP) -> bool:
    """Whether the fused path gives exactly the module's output on a probe, at inference, in the module's dtype."""
    mlp = stand_in.mlp
    weight = mlp.gate_proj.weight
    if weight.device.type != "cpu" or not weight.is_floating_point():
        return False
    probe = torch.randn(2, 3, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    modes = {module: module.training for module in mlp.modules()}
    mlp.eval()
    try:
        with torch.no_grad():
            fused = mlp.down_proj.forward_of_product(mlp.act_fn(mlp.gate_proj(probe)), mlp.up_proj(probe))
            return torch.equal(fused, mlp(probe))
    finally:
        for module, training in modes.items():
            module.training = training


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Put a :class:`FusedGatedMLP` in place of each MLP of ``model`` of a class :data:`GATED_MLPS` names whose down
    projection is a BitLinear, where a probe agrees. Returns the number of MLPs fused (earlier ones included)."""
    fused = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedGatedMLP):
            fused += 1
            continue
        if type(module).__name__ not in GATED_MLPS or not isinstance(getattr(module, "down_proj", None), BitLinear):
            continue
        stand_in = FusedGatedMLP(module)
        if gives_what_the_module_gives(stand_in):
            model.set_submodule(name, stand_in)
            fused += 1
    return fused
