"""An encoder's self-attention over short sequences in one native call at inference.

BERT-style encoders run their attention through ``scaled_dot_product_attention``, whose CPU kernels spend a few
microseconds of set-up on each (sequence, head) pair whatever its size: for a batch of sentences (32 x ~25 tokens x
12 heads: 384 pairs of a few thousand multiply-adds each) that set-up is most of the attention's time, a quarter of a
MiniLM student's encode. At inference the stand-in here runs the module's q, k and v projections as its forward does,
then ``csrc/attention.c``, one parallel loop over the pairs, which writes the heads side by side as the module's
output is laid out (no transpose and copy after). Longer sequences, where PyTorch's kernel multiplies in AMX tiles and
this one does not (:data:`MAX_NATIVE_KEYS`), run the module's own forward.

Only the classes :data:`ENCODER_SELF_ATTENTIONS` names are taken, each after a probe shows the stand-in gives what the
module gives (float32 within 1e-5; bf16 within a rounding step: the kernel rounds as PyTorch's does, but sums in
another order). Training, gradients, caches, cross-attention, attention weights asked for, and attention
implementations other than ``sdpa`` and ``eager`` run the module's own forward. Checkpoints do not change: the
stand-in holds the module's own children under their own names.
"""

from __future__ import annotations

import torch

from st_bitembed.quantization.mlp_fusion import outputs_at_inference
from st_bitembed.quantization.native import native_attention

# Classes whose forward is (transformers' modeling code): q, k, v = query / key / value(hidden_states) viewed as
# [batch, heads, positions, attention_head_size]; attention over them with the mask and self.scaling; heads side by
# side; returns (output, attention weights).
ENCODER_SELF_ATTENTIONS = ("BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention",
                           "ElectraSelfAttention")  # fmt: skip
# The longest sequence the native kernel takes here: beyond it PyTorch's kernel, on AMX tiles, is the faster
# (`python benchmarks/kernel_speed.py --attention-only`: MiniLM's heads, batch 32).
MAX_NATIVE_KEYS = 48
# The attention implementations whose masks the kernel reads (boolean, or additive of the activations' dtype).
MASK_IMPLEMENTATIONS = ("sdpa", "eager")


class NativeSelfAttention(torch.nn.Module):
    """Stands in for an encoder's self-attention at inference (see the module docstring).

    Attributes:
        attention: The model's module (not a child: its children are this module's), which runs whenever the native
            kernel does not apply.
    """

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "attention", attention)
        for name, child in attention.named_children():
            self.add_module(name, child)
        self.train(attention.training)

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        """Whether the kernel computes this call's attention (else the module's own forward runs)."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype in (torch.float32, torch.bfloat16)
            and hidden_states.dim() == 3
            and hidden_states.shape[1] <= MAX_NATIVE_KEYS
            and (attention_mask is None or attention_mask.dim() == 4)
            and all(kwargs.get(name) is None for name in ("cache", "past_key_values", "encoder_hidden_states"))
            and not kwargs.get("output_attentions")
            and self.attention.config._attn_implementation in MASK_IMPLEMENTATIONS
        )

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        if not self.applies(hidden_states, attention_mask, kwargs):
            return self.attention(hidden_states, attention_mask, **kwargs)
        heads_shape = (*hidden_states.shape[:-1], -1, self.attention.attention_head_size)
        query, key, value = (
            projection(hidden_states).view(heads_shape).transpose(1, 2)
            for projection in (self.attention.query, self.attention.key, self.attention.value)
        )
        try:
            return native_attention()(query, key, value, attention_mask, self.attention.scaling), None
        except ValueError:  # a size, dtype or mask the kernel does not take: the module's own attention
            return self.attention(hidden_states, attention_mask, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.attention).__name__}: up to {MAX_NATIVE_KEYS} positions in one native call at inference"


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
    taken = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, NativeSelfAttention):
            taken += 1
            continue
        if type(module).__name__ not in ENCODER_SELF_ATTENTIONS:
            continue
        stand_in = NativeSelfAttention(module)
        if module.config._attn_implementation in MASK_IMPLEMENTATIONS and agrees_with_the_module(stand_in, module):
            model.set_submodule(name, stand_in)
            taken += 1
    return taken
