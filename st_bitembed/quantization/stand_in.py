"""What every inference stand-in shares (:mod:`~st_bitembed.quantization.inference_fusions`).

A stand-in takes a model module's place at inference and runs that module whenever its own path does not apply
(training, gradients, hooks, devices or dtypes its kernels do not take). It holds the module as a plain attribute, not
a child, and takes over the module's children and parameters under their own names, so the state dict, checkpoints
and training see what they saw before; it starts in the module's training mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch


class StandIn(torch.nn.Module):
    """Base class of the inference stand-ins (see the module docstring).

    Subclasses name the attribute that holds the model's module (:attr:`held_as`) and list the caches they make from
    its parameters (:meth:`empty_caches`).
    """

    held_as: ClassVar[str]

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, self.held_as, module)
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, parameter in module.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, value in self.empty_caches().items():
            setattr(self, name, value)
        self.train(module.training)

    def empty_caches(self) -> dict[str, Any]:
        """The caches made from the module's parameters (float32 copies, C arrays of the kernels' operands), as they
        are before first use: set at construction, and what a copy (pickle, deepcopy) starts from."""
        return {}

    def at_inference(self) -> bool:
        """Whether a call now is at inference (eval mode, no gradients), where a stand-in's own path may run."""
        return not self.training and not torch.is_grad_enabled()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **self.empty_caches()}


def put_stand_ins(
    model: torch.nn.Module, kind: type[StandIn], stand_in_for: Callable[[torch.nn.Module], StandIn | None]
) -> int:
    """Put ``stand_in_for(module)`` in place of each module of ``model`` it gives a stand-in for (``None``: the module
    stays; it builds and probes the stand-in); modules that already are a ``kind`` stay as they are. Returns the number
    of ``kind`` stand-ins in ``model`` afterwards (earlier ones included)."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            count += 1
            continue
        stand_in = stand_in_for(module)
        if stand_in is not None:
            model.set_submodule(name, stand_in)
            count += 1
    return count


def hooked(*modules: object) -> bool:
    """Whether forward hooks on any of ``modules`` want to see their input or output (then the module's own forward
    must run, not a stand-in's fused path); a plain function, which some configs give as an activation, takes none."""
    return any(getattr(m, "_forward_pre_hooks", None) or getattr(m, "_forward_hooks", None) for m in modules)


def outputs_at_inference(
    stand_in: torch.nn.Module, module: torch.nn.Module, *probe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stand_in``'s and ``module``'s outputs for ``probe`` in eval mode without gradients, every layer's training
    mode restored afterwards: what a stand-in's probe compares before it takes a module."""
    modes = {layer: layer.training for layer in (stand_in, *module.modules())}
    stand_in.eval()
    module.eval()
    try:
        with torch.no_grad():
            return stand_in(*probe), module(*probe)
    finally:
        for layer, training in modes.items():
            layer.training = training
