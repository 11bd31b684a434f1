"""A decoder's self-attention at inference: its heads' norms and rotary position embedding in one native pass each for
q and k, then the attention in one native call.

For one short query (Qwen3-0.6B, 16 tokens) a layer's attention spent about as long around its projections as in them:
transformers' q and k norms, the rotary embedding (about seven PyTorch operators for each of q and k), the transposes
and ``scaled_dot_product_attention`` (whose CPU kernel's set-up per call outweighs 16 tokens' arithmetic), with Python
between them. At inference the stand-in here calls the module's q, k and v projections as the module does (behind a
folded norm that is one native call for the three), then ``csrc/rotary.c`` for q and for k (the head's norm and the
rotation in one pass) and ``csrc/attention.c`` (grouped-query heads read in place: no ``repeat_kv`` copies), then the
module's output projection. A head norm that is not a :class:`~st_bitembed.quantization.native_norm.NativeRMSNorm`
(or that hooks watch) runs itself first.

The mask is the one the module would use: the model's, else (``sdpa`` with no mask, several queries, a causal module)
the causal one that ``scaled_dot_product_attention`` applies. Where it masks every key after each query (causal:
checked for the model's boolean masks), the kernel skips those keys: about half the work of a long sequence.

Only the classes :data:`DECODER_SELF_ATTENTIONS` names are taken, each after a probe shows the stand-in gives what the
module gives (the output projection's input: float32 within 1e-5, bf16 within a rounding step, of each value or of
the largest). Training, gradients, a cache, attention weights asked for, sequences longer than the kernel takes, logit
soft-capping and attention implementations other than ``sdpa`` and ``eager`` run the module's own forward.
Checkpoints do not change: the stand-in holds the module's own children under their own names.
"""

from __future__ import annotations

import functools

import torch

from st_bitembed.quantization.native import native_attention, native_rotary_heads
from st_bitembed.quantization.native_attention import MASK_IMPLEMENTATIONS, kernel_takes
from st_bitembed.quantization.native_norm import NativeRMSNorm
from st_bitembed.quantization.stand_in import StandIn, hooked, outputs_at_inference, put_stand_ins

# Classes whose forward is (transformers' modeling code): q, k, v = q_proj / k_proj / v_proj(hidden_states) viewed as
# [batch, positions, heads, head_dim]; q_norm / k_norm over each head where the class has them; apply_rotary_pos_emb
# (rotate_half) with the given cos and sin; attention with the mask and self.scaling (key heads shared by
# num_key_value_groups query heads); heads side by side into o_proj; returns (output, attention weights).
DECODER_SELF_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma3Attention")


@functools.lru_cache(maxsize=16)
def causal_mask(length: int) -> torch.Tensor:
    """``[1, 1, length, length]``, ``True`` where a query attends to a key: itself and the keys before it (as
    ``scaled_dot_product_attention`` with ``is_causal`` masks them). One per length, shared by every layer."""
    with torch.inference_mode(False):  # an ordinary tensor, whatever mode first asks for it
        return torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)


class NativeDecoderAttention(StandIn):
    """Stands in for a decoder's self-attention at inference (see the module docstring).

    Attributes:
        attention: The model's module (not a child: its children are this module's), which runs whenever the native
            kernels do not apply.
    """

    held_as = "attention"
    attention: torch.nn.Module

    def applies(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        kwargs: dict,
    ) -> bool:
        """Whether the kernels compute this call's attention (else the module's own forward runs)."""
        return (
            kernel_takes(self, hidden_states, self.attention.head_dim, attention_mask, kwargs)
            and position_embeddings is not None
            and all(table.dtype == hidden_states.dtype for table in position_embeddings)
        )

    def rotated(
        self, heads: torch.Tensor, norm: torch.nn.Module | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``heads`` (``[batch, positions, heads, head_dim]``) normalised by ``norm`` (if any) and rotated, in one
        native pass where the norm is a native one that no hooks watch."""
        native_norm = None
        if isinstance(norm, NativeRMSNorm) and norm.applies(heads) and not hooked(norm):
            native_norm = norm.channel_scale(), norm.eps, norm.round_before_scale
        elif norm is not None:
            heads = norm(heads)
        return native_rotary_heads()(heads, cos, sin, native_norm)

    def kernel_mask(
        self, attention_mask: torch.Tensor | None, queries: int, kwargs: dict
    ) -> tuple[torch.Tensor | None, bool]:
        """The mask the module's attention applies: the model's; with none, ``sdpa``'s causal one for a causal module
        and several queries (as transformers' ``sdpa_attention_forward`` decides), else none (``eager``). And whether
        it masks every key after each query, which the kernel then skips (a boolean mask is checked)."""
        if attention_mask is not None:
            square = attention_mask.shape[-1] == attention_mask.shape[-2] == queries
            masks_the_future = attention_mask.dtype == torch.bool and square and not attention_mask.triu(1).any()
            return attention_mask, masks_the_future
        if self.attention.config._attn_implementation != "sdpa" or queries < 2:
            return None, False
        is_causal = kwargs.get("is_causal")
        causal = getattr(self.attention, "is_causal", True) if is_causal is None else is_causal
        return (causal_mask(queries), True) if causal else (None, False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        module = self.attention
        if not self.applies(hidden_states, position_embeddings, attention_mask, kwargs):
            return module(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                          **kwargs)  # fmt: skip
        heads_shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        query, key, value = (
            projection(hidden_states).view(heads_shape) for projection in (module.q_proj, module.k_proj, module.v_proj)
        )
        cos, sin = position_embeddings
        try:
            query = self.rotated(query, getattr(module, "q_norm", None), cos, sin)
            key = self.rotated(key, getattr(module, "k_norm", None), cos, sin)
            mask, causal = self.kernel_mask(attention_mask, hidden_states.shape[1], kwargs)
            heads = native_attention()(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                                       module.scaling, causal)  # fmt: skip
        except ValueError:  # a size, layout or mask the kernels do not take: the module's own forward
            return module(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                          **kwargs)  # fmt: skip
        return module.o_proj(heads), None

    def extra_repr(self) -> str:
        return f"{type(self.attention).__name__}: head norms, rotary embedding and attention natively at inference"


def agrees_with_the_module(stand_in: NativeDecoderAttention, module: torch.nn.Module) -> bool:
    """Whether the stand-in gives the module's attention at inference on a probe in the query projection's dtype (two
    sequences, one padded, random rotary tables; with ``sdpa`` also without a mask): the output projection's input,
    float32 within 1e-5, bf16 within a rounding step, of each value and of the largest (sums in another order)."""
    weight = module.q_proj.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 20, module.q_proj.in_features, generator=generator).to(weight.dtype)
    cos, sin = (torch.randn(2, 20, module.head_dim, generator=generator).to(weight.dtype) for _ in range(2))
    attended = torch.ones(2, 1, 20, 20, dtype=torch.bool).tril()
    attended[1, ..., 13:] = False
    sdpa = module.config._attn_implementation == "sdpa"
    masks = [attended, None] if sdpa else [(~attended).to(weight.dtype) * torch.finfo(weight.dtype).min]
    # The output projection's inputs, and the query projection's calls: a stand-in that fell back to the module
    # (sizes the kernels do not take) calls it twice.
    seen: list[torch.Tensor] = []
    queries: list[None] = []
    watches = (module.o_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0])),
               module.q_proj.register_forward_pre_hook(lambda *_: queries.append(None)))  # fmt: skip
    tolerance = 1e-5 if weight.dtype == torch.float32 else 1e-2
    try:
        for mask in masks:
            seen.clear()
            queries.clear()
            outputs_at_inference(stand_in, module, hidden, (cos, sin), mask)
            if len(queries) != 2 or len(seen) != 2 or seen[0].shape != seen[1].shape:
                return False
            largest = max(float(seen[1].abs().max()), 1.0)  # real heads' outputs reach several units
            if not torch.allclose(seen[0].float(), seen[1].float(), rtol=tolerance, atol=tolerance * largest):
                return False
    finally:
        for watch in watches:
            watch.remove()
    return True


def use_native_decoder_attention(model: torch.nn.Module) -> int:
    """Put a :class:`NativeDecoderAttention` in place of each module of ``model`` of a class
    :data:`DECODER_SELF_ATTENTIONS` names (without logit soft-capping), where the kernels exist and a probe agrees
    (after :func:`~st_bitembed.quantization.native_norm.use_native_norms`, whose head norms it runs in its own pass).
    Returns the number of modules taken (earlier ones included)."""
    if native_attention() is None or native_rotary_heads() is None:
        return 0

    def stand_in_for(module: torch.nn.Module) -> NativeDecoderAttention | None:
        if type(module).__name__ not in DECODER_SELF_ATTENTIONS or getattr(module, "attn_logit_softcapping", None):
            return None
        stand_in = NativeDecoderAttention(module)
        agrees = module.config._attn_implementation in MASK_IMPLEMENTATIONS and agrees_with_the_module(
            stand_in, module
        )
        return stand_in if agrees else None

    return put_stand_ins(model, NativeDecoderAttention, stand_in_for)
