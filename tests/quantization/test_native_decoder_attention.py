from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

from st_bitembed import BitEmbed
from st_bitembed.quantization import native_attention as native_attention_module
from st_bitembed.quantization.native import native_attention, native_rotary_heads
from st_bitembed.quantization.native_decoder_attention import (
    NativeDecoderAttention,
    causal_mask,
    use_native_decoder_attention,
)
from st_bitembed.quantization.native_norm import NativeRMSNorm

pytestmark = pytest.mark.skipif(
    native_attention() is None or native_rotary_heads() is None,
    reason="the attention and rotary kernels need AVX-512 and a C compiler",
)

NORMS = {"qwen3": (Qwen3RMSNorm, 0.0, True), "gemma3": (Gemma3RMSNorm, 1.0, False)}


def tables(batch: int, positions: int, head_dim: int, dtype: torch.dtype, generator) -> tuple:
    """cos and sin as a rotary embedding module gives them (``[batch, positions, head_dim]``, halves repeated)."""
    angles = torch.rand(batch, positions, head_dim // 2, generator=generator) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 48])  # 16 features of each half at a time; feature by feature
def test_the_rotary_kernel_rotates_as_transformers_does(dtype, head_dim):
    """Without a norm, exactly transformers' apply_rotary_pos_emb, in place of the heads' own layout (a strided slice
    of a wider projection output), with per-sequence or broadcast tables."""
    generator = torch.Generator().manual_seed(0)
    projected = (torch.randn(3, 7, 5, head_dim, generator=generator) * 3).to(dtype)
    heads = projected[:, :, 1:4]  # 3 of 5 heads: strided rows
    for batch in (3, 1):
        cos, sin = tables(batch, 7, head_dim, dtype, generator)
        expected, _ = apply_rotary_pos_emb(heads.transpose(1, 2), heads.transpose(1, 2), cos, sin)
        rotated = native_rotary_heads()(heads, cos, sin, None)
        assert rotated.is_contiguous() and rotated.dtype == dtype
        assert torch.equal(rotated, expected.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 48])
@pytest.mark.parametrize("kind", list(NORMS))
def test_the_rotary_kernel_normalises_each_head_first(kind, head_dim, dtype):
    """With a head norm (Qwen3 rounds before its weight, Gemma3 after it), what the norm then the rotation give, up to
    the order of the sum of squares: float32 within 1e-5, bf16 a rounding step in a few elements at most."""
    generator = torch.Generator().manual_seed(1)
    norm_class, offset, round_before_scale = NORMS[kind]
    norm = norm_class(head_dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(head_dim, generator=generator) * 0.5)
    norm = norm.to(dtype)
    heads = (torch.randn(2, 9, 4, head_dim, generator=generator) * 3).to(dtype)
    cos, sin = tables(2, 9, head_dim, dtype, generator)
    with torch.no_grad():
        normed = norm(heads)
    expected, _ = apply_rotary_pos_emb(normed.transpose(1, 2), normed.transpose(1, 2), cos, sin)
    scale = (norm.weight.detach().float() + offset).contiguous()
    rotated = native_rotary_heads()(heads, cos, sin, (scale, 1e-6, round_before_scale))
    if dtype == torch.float32:
        torch.testing.assert_close(rotated, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
    else:
        apart = (rotated.float() - expected.transpose(1, 2).float()).abs() > 0
        assert apart.float().mean() < 0.02
        torch.testing.assert_close(rotated.float(), expected.transpose(1, 2).float(), rtol=1e-2, atol=2e-2)


def test_the_rotary_kernel_refuses_what_it_cannot_take():
    rotary = native_rotary_heads()
    heads, cos = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="even head_dim"):
        rotary(torch.randn(1, 4, 2, 15), cos[..., :15], cos[..., :15], None)
    with pytest.raises(ValueError, match="do not go with"):
        rotary(heads, torch.randn(1, 5, 16), torch.randn(1, 5, 16), None)
    with pytest.raises(ValueError, match="dtype"):
        rotary(heads, cos.bfloat16(), cos.bfloat16(), None)
    with pytest.raises(ValueError, match="norm scale"):
        rotary(heads, cos, cos, (torch.ones(8), 1e-6, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_reads_shared_key_heads_in_place(dtype):
    """Query heads sharing key and value heads (8 of 2) read them where they are: what PyTorch's attention gives
    with the keys repeated (enable_gqa), causal or padded, float32 within 1e-5, bf16 within a rounding step."""
    generator = torch.Generator().manual_seed(2)
    query = (torch.randn(2, 11, 8, 64, generator=generator) * 2).to(dtype).transpose(1, 2)
    key, value = ((torch.randn(2, 11, 2, 64, generator=generator) * 2).to(dtype).transpose(1, 2) for _ in range(2))
    padded = causal_mask(11).expand(2, 1, 11, 11).clone()
    padded[1, ..., 8:] = False
    padded[1, :, 8:, 0] = True  # rows of padding keep one key: PyTorch's attention gives NaN for a row with none
    for mask in (causal_mask(11), padded):
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, mask, scale=0.125,
                                                                    enable_gqa=True)  # fmt: skip
        out = native_attention()(query, key, value, mask, 0.125)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), expected.transpose(1, 2).reshape(2, 11, -1).float(), rtol=tolerance,
                                   atol=tolerance)  # fmt: skip
    with pytest.raises(ValueError, match="do not go with"):
        native_attention()(query, key[:, :1].expand(2, 3, 11, 64), value[:, :1].expand(2, 3, 11, 64), None, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bfloat16_path", ["bf16 pairs", "float32"], indirect=True)
@pytest.mark.parametrize("tokens", [5, 37, 130])
def test_a_causal_mask_lets_the_kernel_skip_the_keys_it_masks(tokens, bfloat16_path, dtype):
    """Told that the mask masks every key after each query, the kernel skips those keys: bit for bit the outputs it
    gives without being told (padded sequences, rows with no key left included); it refuses the hint without a mask."""
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(3, tokens, 4, 64, generator=generator).to(dtype).transpose(1, 2)
    key, value = (torch.randn(3, tokens, 2, 64, generator=generator).to(dtype).transpose(1, 2) for _ in range(2))
    mask = causal_mask(tokens).expand(3, 1, tokens, tokens).clone()
    mask[1, ..., tokens // 2 :] = False  # right padding
    mask[2, ..., : tokens // 3] = False  # left padding: the first rows attend to nothing
    for attended in (causal_mask(tokens), mask):
        skipping = native_attention()(query, key, value, attended, 0.125, True)
        assert torch.equal(skipping, native_attention()(query, key, value, attended, 0.125))
    with pytest.raises(ValueError, match="causal"):
        native_attention()(query, key, value, None, 0.125, True)


def test_only_masks_that_hide_every_later_key_are_taken_as_causal(converted_qwen3):
    """The stand-in tells the kernel a mask is causal where it is: sdpa's own causal mask, a model's boolean mask that
    hides every later key (padded or not), never a mask that lets a query see a later key, nor an additive one."""
    attention = decoder_attentions(converted_qwen3[0].auto_model)[0]
    padded = causal_mask(6).expand(2, 1, 6, 6).clone()
    padded[1, ..., 4:] = False
    bidirectional = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~padded, torch.finfo(torch.float32).min)
    mask, causal = attention.kernel_mask(None, 6, {})
    assert torch.equal(mask, causal_mask(6)) and causal
    assert attention.kernel_mask(None, 6, {"is_causal": False}) == (None, False)
    assert attention.kernel_mask(None, 1, {}) == (None, False)
    assert attention.kernel_mask(padded, 6, {})[1]
    assert not attention.kernel_mask(bidirectional, 6, {})[1]
    assert not attention.kernel_mask(additive, 6, {})[1]


def decoder_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.layers]


def without_stand_ins(backbone: torch.nn.Module) -> None:
    for layer in backbone.layers:
        if isinstance(layer.self_attn, NativeDecoderAttention):
            layer.self_attn = layer.self_attn.attention


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a_converted_decoder_runs_its_attention_natively_and_encodes_as_before(backbone_dirs, family, tmp_path):
    """Every self-attention of a converted Qwen3 / Gemma3 is taken (its head norms run in the rotary pass: the norms'
    own forward never runs); texts of either padding side, short and past Gemma3's sliding window (8 tokens here),
    encode as with the modules' own attention; checkpoint keys unchanged; taken again at load."""
    model = BitEmbed.from_backbone(str(backbone_dirs[family])).eval()
    backbone = model[0].auto_model
    attentions = decoder_attentions(backbone)
    assert all(isinstance(m, NativeDecoderAttention) for m in attentions)
    assert use_native_decoder_attention(backbone) == len(attentions)  # again: counted, not wrapped twice
    norms_themselves = []
    for attention in attentions:
        for norm in (attention.q_norm, attention.k_norm):
            assert isinstance(norm, NativeRMSNorm)
            norm.norm.register_forward_pre_hook(lambda *_: norms_themselves.append(1))
    module_calls = []
    attentions[0].attention.register_forward_pre_hook(lambda *_: module_calls.append(1))
    texts = ["A cat.", "Ternary weights: -1, 0 and +1, with eight-bit activations, run fast on a CPU."]
    embeddings = {}
    for side in ("right", "left"):
        model.tokenizer.padding_side = side
        embeddings[side] = model.encode(texts, convert_to_tensor=True)
    assert norms_themselves == [] and module_calls == []
    model.save(str(tmp_path / "saved"))
    without_stand_ins(backbone)
    reference = model.encode(texts, convert_to_tensor=True)
    for side in ("right", "left"):
        assert torch.nn.functional.cosine_similarity(embeddings[side], reference).min() > 0.9999
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert all(isinstance(m, NativeDecoderAttention) for m in decoder_attentions(reloaded[0].auto_model))
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_full_precision_llama_with_grouped_heads_gets_the_module_outputs(implementation):
    """The stand-in needs no BitLinear: a plain Llama with grouped-query heads (4 of 2) and either attention
    implementation, padded or not, gives its own last hidden states (float32 within 1e-5)."""
    config = LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=implementation)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    input_ids = torch.randint(0, 100, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0
    with torch.no_grad():
        expected = [model(input_ids, attention_mask=mask).last_hidden_state for mask in (attention_mask, None)]
        assert use_native_decoder_attention(model) == 2
        assert all(isinstance(m, NativeDecoderAttention) for m in decoder_attentions(model))
        outputs = [model(input_ids, attention_mask=mask).last_hidden_state for mask in (attention_mask, None)]
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out[attention_mask.bool()], reference[attention_mask.bool()], rtol=1e-5, atol=1e-5)


def test_heads_of_large_values_are_taken_within_their_own_scale():
    """Values of a few hundred (real heads reach several units) differ from the module's by float32 rounding of their
    own size, not by 1e-5 absolute: such a module is still taken, and gives its own outputs within that rounding."""
    config = LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    with torch.no_grad():
        model.layers[0].self_attn.v_proj.weight.mul_(1000.0)
        input_ids = torch.randint(0, 100, (2, 30))
        expected = model(input_ids).last_hidden_state
        assert use_native_decoder_attention(model) == 1
        out = model(input_ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_what_the_kernels_do_not_take_runs_the_module_itself(converted_qwen3, monkeypatch):
    """Training, gradients, attention weights asked for, a cache and sequences longer than the kernel takes run the
    module's own forward; a head norm that hooks watch runs itself, and the rotation then runs without it."""
    backbone = converted_qwen3.eval()[0].auto_model
    attention = decoder_attentions(backbone)[0]
    module_calls, norm_calls = [], []
    attention.attention.register_forward_pre_hook(lambda *_: module_calls.append(1))
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 10, attention.q_proj.in_features, generator=generator)
    cos, sin = tables(2, 10, attention.attention.head_dim, torch.float32, generator)

    def run(**kwargs) -> torch.Tensor:
        module_calls.clear()
        return attention(hidden, position_embeddings=(cos, sin), attention_mask=None, **kwargs)[0]

    with torch.no_grad():
        native = run()
        assert module_calls == []
        torch.testing.assert_close(run(output_attentions=True), native, rtol=1e-5, atol=1e-5)
        assert module_calls == [1]
        cache = DynamicCache()
        torch.testing.assert_close(run(cache=cache), native, rtol=1e-5, atol=1e-5)
        assert module_calls == [1] and cache.get_seq_length() == 10  # the module's own forward filled it
        monkeypatch.setattr(native_attention_module, "max_kernel_keys", lambda head_dim, dtype: 9)
        torch.testing.assert_close(run(), native, rtol=1e-5, atol=1e-5)
        assert module_calls == [1]
        monkeypatch.undo()
        handle = attention.q_norm.register_forward_hook(lambda *_: norm_calls.append(1))
        torch.testing.assert_close(run(), native, rtol=1e-5, atol=1e-5)
        assert module_calls == [] and norm_calls == [1]
        handle.remove()
    attention.train()  # the module's forward, its BitLinears on the training path (a code apart at rounding ties)
    trained = run()
    assert module_calls == [1] and trained.requires_grad
    assert torch.nn.functional.cosine_similarity(trained.detach().flatten(), native.flatten(), dim=0) > 0.999
