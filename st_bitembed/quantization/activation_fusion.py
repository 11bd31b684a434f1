"""An encoder MLP's activation applied by its first projection's kernel at inference.

BERT-style encoders compute ``intermediate_act_fn(dense(x))`` (``BertIntermediate`` and its copies): the activation is
a PyTorch pass that reads and writes a tensor four times the hidden size, one of the largest element-wise passes of
an encoder's forward. At inference the stand-in here asks the BitLinear for the activated output
(:meth:`BitLinear.forward_activated <st_bitembed.quantization.bitlinear.BitLinear.forward_activated>`), which the
native kernel computes as it writes each output, rounded as PyTorch rounds the output and then the activation's
(``csrc/ternary_gemm.c``): one tensor and one pass less per layer.

Only the classes :data:`ENCODER_INTERMEDIATES` names are taken, whose activation a probe finds among
:data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` (bit for bit), each after a probe shows the stand-in gives
what the module gives within rounding (the kernel's activation is its own, an ulp or two of float32 from PyTorch's).
Training, gradients, other kernels and hooks on the projection or the activation (which want to see their input or
output) run the module's own forward. Checkpoints do not change: the stand-in holds the module's own children under
their own names.
"""

from __future__ import annotations

import torch

from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.mlp_fusion import activation_name, gives_what_the_module_gives
from st_bitembed.quantization.stand_in import StandIn, hooked, put_stand_ins

# Classes whose forward is intermediate_act_fn(dense(x)) (transformers' modeling code).
ENCODER_INTERMEDIATES = (
    "BertIntermediate",
    "RobertaIntermediate",
    "XLMRobertaIntermediate",
    "MPNetIntermediate",
    "ElectraIntermediate",
)


class FusedIntermediate(StandIn):
    """Stands in for an encoder MLP's first half at inference (see the module docstring).

    Attributes:
        intermediate: The model's module (not a child: its children are this module's), which runs whenever the
            fused path does not apply.
        activation: The :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name of its
            ``intermediate_act_fn``, which the kernel applies.
    """

    held_as = "intermediate"
    intermediate: torch.nn.Module

    def __init__(self, intermediate: torch.nn.Module, activation: str) -> None:
        super().__init__(intermediate)
        self.activation = activation

    def fuses(self) -> bool:
        """Whether the kernel applies the activation (else the module's own forward runs): at inference, unless hooks
        on the projection or the activation want to see what passes between them."""
        dense, act_fn = self.intermediate.dense, self.intermediate.intermediate_act_fn
        return self.at_inference() and isinstance(dense, BitLinear) and not hooked(dense, act_fn)  # act_fn: a callable

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.fuses():
            return self.intermediate(hidden_states)
        return self.intermediate.dense.forward_activated(hidden_states, self.activation)

    def extra_repr(self) -> str:
        return f"{type(self.intermediate).__name__}: its activation ({self.activation}) applied by dense's kernel"


def fuse_intermediate_activations(model: torch.nn.Module) -> int:
    """Put a :class:`FusedIntermediate` in place of each module of ``model`` of a class :data:`ENCODER_INTERMEDIATES`
    names whose projection is a BitLinear and whose activation the kernel computes, where a probe agrees. Returns
    the number of modules fused (earlier ones included)."""

    def stand_in_for(module: torch.nn.Module) -> FusedIntermediate | None:
        dense = getattr(module, "dense", None)
        if type(module).__name__ not in ENCODER_INTERMEDIATES or not isinstance(dense, BitLinear):
            return None
        activation = activation_name(module.intermediate_act_fn, dense.weight.dtype)
        if activation is None:
            return None
        stand_in = FusedIntermediate(module, activation)
        return stand_in if gives_what_the_module_gives(stand_in, module, exact=False) else None

    return put_stand_ins(model, FusedIntermediate, stand_in_for)
