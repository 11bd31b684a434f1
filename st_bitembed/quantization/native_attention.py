"""An encoder's self-attention in one native call at inference.

BERT-style encoders run their attention through ``scaled_dot_product_attention``, whose CPU kernel makes small GEMM
calls per (sequence, head, block of queries), each with microseconds of set-up whatever its size: for a batch of
sentences (32 x ~25 tokens x 12 heads: 384 pairs of a few thousand multiply-adds each) that set-up is most of the
attention's time, a quarter of a MiniLM student's encode. At inference the stand-in here runs the module's q, k and v
projections (in one native call where they are BitLinears), then ``csrc/attention.c``: one parallel loop over the
pairs (bf16 on AMX tiles where the CPU has them), which writes the heads side by side as the module's output is laid
out (no transpose and copy after). On a CPU with AMX, bf16 sequences longer than :data:`MAX_VECTOR_BFLOAT16_KEYS` whose
heads the kernel's tiles do not take run the module's own forward (PyTorch's kernel is then on tiles); so does any
sequence longer than the kernel takes (512).

Only the classes :data:`ENCODER_SELF_ATTENTIONS` names are taken, each after a probe shows the stand-in gives what the
module gives (float32 within 1e-5; bf16 within a rounding step: the kernel rounds as PyTorch's does, but sums in
another order). Training, gradients, caches, cross-attention, attention weights asked for, and attention
implementations other than ``sdpa`` and ``eager`` run the module's own forward. Checkpoints do not change: the
stand-in holds the module's own children under their own names.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.kernels import native_linear
from st_bitembed.quantization.native import (
    native_amx_available,
    native_attention,
    native_attention_max_keys,
    native_attention_tiles,
    native_projections,
)
from st_bitembed.quantization.stand_in import StandIn, hooked, outputs_at_inference, put_stand_ins

# Classes whose forward is (transformers' modeling code): q, k, v = query / key / value(hidden_states) viewed as
# [batch, heads, positions, attention_head_size]; attention over them with the mask and self.scaling; heads side by
# side; returns (output, attention weights).
ENCODER_SELF_ATTENTIONS = ("BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention",
                           "ElectraSelfAttention")  # fmt: skip
# The longest bf16 sequence handed to the kernel's vectors on a CPU with AMX tiles, which PyTorch's kernel then uses:
# PyTorch's was the faster from 64 tokens in probes while developing (MiniLM's heads, batch 32). The kernel's own
# tiles, float32, and bf16 on CPUs without AMX (where PyTorch's bf16 attention has no tiles either) are the faster at
# every length measured (`python benchmarks/kernel_speed.py --attention-only`).
MAX_VECTOR_BFLOAT16_KEYS = 48
# The attention implementations whose masks the kernel reads (boolean, or additive of the activations' dtype).
MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def max_kernel_keys(head_dim: int, dtype: torch.dtype) -> int:
    """The longest sequence of ``dtype`` heads of ``head_dim`` features handed to the kernel (at most the kernel's own
    maximum; the module runs longer ones)."""
    on_vectors = not native_attention_tiles(head_dim)
    if dtype == torch.bfloat16 and on_vectors and native_amx_available():  # PyTorch's kernel on the tiles
        return min(MAX_VECTOR_BFLOAT16_KEYS, native_attention_max_keys())
    return native_attention_max_keys()


def kernel_takes(
    stand_in: StandIn, hidden_states: torch.Tensor, head_dim: int, attention_mask: torch.Tensor | None, kwargs: dict
) -> bool:
    """Whether the kernel takes a self-attention call of a stand-in's module (its ``attention``): at inference, float32
    or bf16 CPU activations of a sequence no longer than :func:`max_kernel_keys`, a 4-dim mask or none, the module's
    implementation one of :data:`MASK_IMPLEMENTATIONS`, no cache, cross-attention or attention weights asked for."""
    return (
        stand_in.at_inference()
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype in (torch.float32, torch.bfloat16)
        and hidden_states.dim() == 3
        and hidden_states.shape[1] <= max_kernel_keys(head_dim, hidden_states.dtype)
        and (attention_mask is None or attention_mask.dim() == 4)
        and all(kwargs.get(name) is None for name in ("cache", "past_key_values", "encoder_hidden_states"))
        and not kwargs.get("output_attentions")
        and stand_in.attention.config._attn_implementation in MASK_IMPLEMENTATIONS
    )


class NativeSelfAttention(StandIn):
    """Stands in for an encoder's self-attention at inference (see the module docstring).

    Attributes:
        attention: The model's module (not a child: its children are this module's), which runs whenever the native
            kernel does not apply.
    """

    held_as = "attention"
    attention: torch.nn.Module
    _projections: tuple[tuple, ctypes.Array] | None  # (the projections' ids, their C array)

    def empty_caches(self) -> dict[str, Any]:
        return {"_projections": None}

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        """Whether the kernel computes this call's attention (else the module's own forward runs)."""
        return kernel_takes(self, hidden_states, self.attention.attention_head_size, attention_mask, kwargs)

    def projections(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """The query, key and value projections of ``hidden_states``: in one native call where all three are
        BitLinears that would run the native kernel and no hooks watch them (one foreign call and one parallel loop
        instead of three; each output exactly its projection's own), else each its own forward."""
        layers = (self.attention.query, self.attention.key, self.attention.value)
        members = tuple(layer.native_projection() if isinstance(layer, BitLinear) else None for layer in layers)
        if any(member is None for member in members) or hooked(*layers):
            return [layer(hidden_states) for layer in layers]
        key = tuple(map(id, members))
        if self._projections is None or self._projections[0] != key:
            self._projections = key, native_projections(members)  # holds them: their ids stay theirs
        return native_linear(hidden_states, self._projections[1])

    def max_keys(self, dtype: torch.dtype) -> int:
        """The longest sequence of ``dtype`` activations handed to the kernel (:func:`max_kernel_keys`)."""
        return max_kernel_keys(self.attention.attention_head_size, dtype)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        if not self.applies(hidden_states, attention_mask, kwargs):
            return self.attention(hidden_states, attention_mask, **kwargs)
        heads_shape = (*hidden_states.shape[:-1], -1, self.attention.attention_head_size)
        query, key, value = (x.view(heads_shape).transpose(1, 2) for x in self.projections(hidden_states))
        try:
            return native_attention()(query, key, value, attention_mask, self.attention.scaling), None
        except ValueError:  # a size, dtype or mask the kernel does not take: the module's own attention
            return self.attention(hidden_states, attention_mask, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.attention).__name__}: in one native call at inference"


def agrees_with_the_module(stand_in: NativeSelfAttention, module: torch.nn.Module) -> bool:
    """Whether the stand-in gives the module's output on a probe at inference (two sequences, one padded, in the
    query projection's dtype): float32 within 1e-5, bf16 within a rounding step."""
    weight = module.query.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 20, module.query.in_features, generator=generator).to(weight.dtype)
    attended = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    attended[1, ..., 13:] = False
    mask = attended if module.config._attn_implementation == "sdpa" else (~attended).to(weight.dtype) * -1e4
    (fused, _), (expected, _) = outputs_at_inference(stand_in, module, hidden, mask)
    tolerance = 1e-5 if weight.dtype == torch.float32 else 1e-2
    if fused.shape != expected.shape:
        return False
    return torch.allclose(fused.float(), expected.float(), rtol=tolerance, atol=tolerance)


def use_native_attention(model: torch.nn.Module) -> int:
    """Put a :class:`NativeSelfAttention` in place of each module of ``model`` of a class
    :data:`ENCODER_SELF_ATTENTIONS` names, where the kernel exists and a probe agrees. Returns the number of modules
    taken (earlier ones included)."""
    if native_attention() is None:
        return 0

    def stand_in_for(module: torch.nn.Module) -> NativeSelfAttention | None:
        if type(module).__name__ not in ENCODER_SELF_ATTENTIONS:
            return None
        stand_in = NativeSelfAttention(module)
        agrees = module.config._attn_implementation in MASK_IMPLEMENTATIONS and agrees_with_the_module(
            stand_in, module
        )
        return stand_in if agrees else None

    return put_stand_ins(model, NativeSelfAttention, stand_in_for)
