"""The model's own RMSNorm in front of BitLinears, folded into their quantizer at inference.

In a Llama-style decoder layer the norm in front of attention feeds only q/k/v, and the one in front of the MLP only
gate/up. Each of those BitLinears normalises its input again (its inserted RMSNorm) and quantizes it per token, which
ignores a token's scale. So the model norm's ``1 / rms(x)`` cancels and only its per-channel weight ``w`` remains:
``RMSNorm_g(RMSNorm_w(x)) = u * g / sqrt(mean(u^2) + eps * (mean(x^2) + e))`` with ``u = x * w`` (``eps``, ``e``: the
two norms' epsilons), exactly. At inference such a norm returns its input as it is, and each BitLinear behind it
quantizes the raw residual stream with ``w`` folded in (``csrc/activation_codes.c``): the norm's own passes over the
activations (a float32 copy, squares, products, a copy back, each a fresh tensor) are never made.

Only layers known to use the norm's output for those projections alone are folded (:data:`FOLDABLE_NORMS`), and a
norm is folded only if it computes what the formula assumes (checked on a probe). Training, gradients, the reference
kernel and GEMM backends other than ``"native"`` run the norm as before. Checkpoints do not change: the stand-in
holds the norm's own parameters under their own names.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from st_bitembed.quantization.bitlinear import BitLinear, version_key
from st_bitembed.quantization.kernels import gemm_backend, native_linear
from st_bitembed.quantization.native import native_projections
from st_bitembed.quantization.stand_in import StandIn

_ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")
# Decoder layer class -> (norm attribute, the projections that alone read its output), read from transformers'
# modeling code of each architecture. Gemma3's post_attention_layernorm normalises the attention's output: not here.
FOLDABLE_NORMS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    **dict.fromkeys(
        ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"),
        (("input_layernorm", _ATTENTION_INPUTS), ("post_attention_layernorm", _MLP_INPUTS)),
    ),
    "Gemma3DecoderLayer": (("input_layernorm", _ATTENTION_INPUTS), ("pre_feedforward_layernorm", _MLP_INPUTS)),
}
# Norm class -> what its weight is added to before it scales (Gemma's norms scale by 1 + weight).
NORM_WEIGHT_OFFSETS = {"LlamaRMSNorm": 0.0, "MistralRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "Qwen3RMSNorm": 0.0}
NORM_WEIGHT_OFFSETS["Gemma3RMSNorm"] = 1.0


class FoldedRMSNorm(StandIn):
    """Stands in for a model RMSNorm whose output only BitLinears read (see the module docstring).

    It holds the norm's parameters under their own names (the state dict does not change) and runs the norm itself
    whenever :meth:`folds` is false: in training, with gradients, or when a projection behind it cannot fold it.
    The projections fold it only for the very tensor it let through (:meth:`let_through`), per thread: a projection
    called on its own, on activations that did not come through this norm, computes as it always did.

    Attributes:
        norm: The model's norm (not a child module: its parameters are this module's).
        weight_offset: Added to the norm's weight to give the per-channel scale it applies.
        eps: The norm's epsilon.
        consumers: The BitLinears that read its output.
    """

    held_as = "norm"
    norm: torch.nn.Module
    _scale_cache: tuple[tuple, torch.Tensor] | None
    _let_through: dict[int, weakref.ref]  # thread -> the tensor it last let through (while it lives)
    # thread -> (that tensor, its version, consumer -> its output not yet taken): what project() computed for the
    # consumers that have not asked yet.
    _pending: dict[int, tuple[weakref.ref, tuple, dict[BitLinear, torch.Tensor]]]
    # The consumers' projections as one C array: (their ids, array), made again when one of them changes.
    _projections: tuple[tuple[int, ...], Any] | None
    _gated_projections: tuple[tuple[int, ...], Any] | None  # the same, for gated_product

    def __init__(self, norm: torch.nn.Module, weight_offset: float, consumers: tuple[BitLinear, ...]) -> None:
        super().__init__(norm)
        self.weight_offset = weight_offset
        self.eps = float(norm_epsilon(norm))
        object.__setattr__(self, "consumers", consumers)

    def empty_caches(self) -> dict[str, Any]:
        return {"_scale_cache": None, "_let_through": {}, "_pending": {}, "_projections": None,
                "_gated_projections": None}  # fmt: skip

    def folds(self, hidden_states: torch.Tensor) -> bool:
        """Whether the projections behind can fold this norm for these activations (it then returns them as they
        are, and they fold it for that tensor: :meth:`let_through`)."""
        return (
            self.at_inference()
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype in (torch.float32, torch.bfloat16)
            and gemm_backend("cpu") == "native"
            and all(layer.kernel == "int8" and not layer.training for layer in self.consumers)
        )

    def channel_scale(self) -> torch.Tensor:
        """The per-channel scale the norm applies (``weight + weight_offset``) in float32, made once per version."""
        key = version_key(self.weight)
        if self._scale_cache is None or self._scale_cache[0] != key:
            self._scale_cache = key, self.weight.detach().float() + self.weight_offset
        return self._scale_cache[1]

    def let_through(self, hidden_states: torch.Tensor) -> bool:
        """Whether ``hidden_states`` is the tensor this norm last returned unnormalised in this thread."""
        reference = self._let_through.get(threading.get_ident())
        return reference is not None and reference() is hidden_states

    def project(self, consumer: BitLinear, hidden_states: torch.Tensor) -> torch.Tensor:
        """``consumer``'s output for ``hidden_states``, the tensor this norm let through (:meth:`let_through`).

        The first consumer to ask runs every consumer's projection in one call of the native kernel (q, k and v;
        gate and up: one foreign call and one parallel loop instead of three or two), and the others' outputs wait
        for them, kept for this thread and this very tensor (unchanged since) only."""
        thread = threading.get_ident()
        version = version_key(hidden_states)
        pending = self._pending.get(thread)
        if pending is not None and pending[0]() is hidden_states and pending[1] == version:
            output = pending[2].pop(consumer, None)
            if output is not None:
                return output
        scale = self.channel_scale()
        projections = [layer.folded_projection(scale, self.eps) for layer in self.consumers]
        key = tuple(map(id, projections))
        if self._projections is None or self._projections[0] != key:
            self._projections = key, native_projections(projections)  # holds them: their ids stay theirs
        outputs = native_linear(hidden_states, self._projections[1])
        waiting = {layer: output for layer, output in zip(self.consumers, outputs) if layer is not consumer}
        self._pending[thread] = weakref.ref(hidden_states), version, waiting
        return outputs[self.consumers.index(consumer)]

    def gated_product(
        self, hidden_states: torch.Tensor, gate: BitLinear, up: BitLinear, activation: str
    ) -> torch.Tensor:
        """``activation(gate(x)) * up(x)`` for ``hidden_states``, the tensor this norm let through
        (:meth:`let_through`), ``gate`` and ``up`` two of its consumers: a gated MLP's product
        (:mod:`~st_bitembed.quantization.mlp_fusion`), in one call of the native kernel, which multiplies them as it
        writes them: neither projection's output is ever made."""
        scale = self.channel_scale()
        projections = [gate.folded_projection(scale, self.eps, activation), up.folded_projection(scale, self.eps)]
        key = tuple(map(id, projections))
        if self._gated_projections is None or self._gated_projections[0] != key:
            self._gated_projections = key, native_projections(projections)  # holds them: their ids stay theirs
        return native_linear(hidden_states, self._gated_projections[1], gated=True)[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        thread = threading.get_ident()
        self._pending.pop(thread, None)  # outputs of the last input nobody took: not kept any longer
        if self.folds(hidden_states):
            self._let_through[thread] = weakref.ref(hidden_states)
            return hidden_states
        self._let_through.pop(thread, None)
        return self.norm(hidden_states)

    def extra_repr(self) -> str:
        return f"folds {type(self.norm).__name__} into {len(self.consumers)} BitLinears"


def norm_epsilon(norm: torch.nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def computes_rms_norm(norm: torch.nn.Module, weight_offset: float) -> bool:
    """Whether ``norm`` computes ``x / sqrt(mean(x^2) + eps) * (weight + weight_offset)`` (on a float32 probe)."""
    weight = norm.weight.detach().float()
    if weight.device.type == "meta":
        return False
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        output = norm(probe.to(norm.weight.dtype)).float()
    expected = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + norm_epsilon(norm)) * (weight + weight_offset)
    tolerance = 1e-5 if norm.weight.dtype == torch.float32 else 2e-2
    return output.shape == expected.shape and torch.allclose(output, expected, rtol=tolerance, atol=tolerance)


def fold_model_norms(model: torch.nn.Module) -> int:
    """Put a :class:`FoldedRMSNorm` in place of each model norm of ``model`` that :data:`FOLDABLE_NORMS` names and
    that only BitLinears with an inserted RMSNorm read. Returns the number of norms folded (already folded ones
    included)."""
    folded = 0
    for layer in list(model.modules()):
        for norm_name, consumer_names in FOLDABLE_NORMS.get(type(layer).__name__, ()):
            norm = getattr(layer, norm_name, None)
            if isinstance(norm, FoldedRMSNorm):
                folded += 1
                continue
            consumers = tuple(_submodule(layer, name) for name in consumer_names)
            offset = NORM_WEIGHT_OFFSETS.get(type(norm).__name__)
            foldable = offset is not None and all(
                isinstance(c, BitLinear) and c.rms_norm is not None and c.in_features == norm.weight.shape[0]
                for c in consumers
            )
            if not foldable or not computes_rms_norm(norm, offset):
                continue
            stand_in = FoldedRMSNorm(norm, offset, consumers)
            setattr(layer, norm_name, stand_in)
            for consumer in consumers:
                object.__setattr__(consumer, "folded_norm", stand_in)  # not a child: it belongs to the layer
            folded += 1
    return folded


def _submodule(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
