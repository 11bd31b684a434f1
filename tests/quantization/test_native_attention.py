from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization import native_attention as native_attention_module
from st_bitembed.quantization.native import (
    native_amx_available,
    native_attention,
    native_attention_max_keys,
    native_attention_tiles,
)
from st_bitembed.quantization.native_attention import (
    MAX_VECTOR_BFLOAT16_KEYS,
    NativeSelfAttention,
    use_native_attention,
)

needs_kernel = pytest.mark.skipif(native_attention() is None, reason="the attention kernel needs AVX-512, a compiler")


def reference(query, key, value, mask, scale) -> torch.Tensor:
    """The attention in float64 from the formula, heads side by side; rows whose keys are all masked are 0; for bf16
    inputs the weights of the values rounded to bf16, not their sum (as PyTorch's flash kernel rounds them)."""
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask.double()
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp().nan_to_num(0.0)
    total = weights.sum(dim=-1, keepdim=True)
    if query.dtype == torch.bfloat16:
        weights = weights.bfloat16().double()
    out = (weights @ value.double() / total).nan_to_num(0.0)
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def projected(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, generator) -> tuple:
    """Query, key and value as an attention module makes them: strided [batch, heads, tokens, head_dim] views."""
    qkv = (torch.randn(3, batch, tokens, heads, head_dim, generator=generator) * 2).to(dtype)
    return tuple(x.transpose(1, 2) for x in qkv)


SIZES = [(3, 2, 1, 16), (2, 3, 5, 32), (4, 12, 25, 32), (2, 2, 33, 48), (1, 2, 17, 256), (2, 1, 300, 64)]


@needs_kernel
@pytest.mark.parametrize(
    ("dtype", "bfloat16_path"),
    [(torch.float32, "widened"), (torch.bfloat16, "bf16 pairs"), (torch.bfloat16, "widened")],
    indirect=["bfloat16_path"],
)
@pytest.mark.parametrize(("batch", "heads", "tokens", "head_dim"), SIZES)
def test_the_kernel_is_the_attention_formula(dtype, batch, heads, tokens, head_dim, bfloat16_path):
    """Every mask the kernel takes (none; boolean padding, broadcast over heads and queries; boolean per head and
    query, with rows that attend to nothing; additive), against the formula in float64: float32 within 1e-4, bf16
    within a rounding step of the output, on both paths of bf16 heads off the tiles."""
    generator = torch.Generator().manual_seed(tokens)
    query, key, value = projected(batch, heads, tokens, head_dim, dtype, generator)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    padding = (torch.arange(tokens) < lengths[:, None])[:, None, None, :]
    per_query = torch.rand(batch, heads, tokens, tokens, generator=generator) > 0.3
    per_query[..., 0, :] = False  # the first query of every head attends to nothing
    additive = (torch.randn(batch, 1, tokens, tokens, generator=generator) - padding.logical_not() * 1e4).to(dtype)
    kernel = native_attention()
    for mask in (None, padding, padding.expand(batch, 1, tokens, tokens), per_query, additive):
        out = kernel(query, key, value, mask, head_dim**-0.5)
        expected = reference(query, key, value, mask, head_dim**-0.5)
        assert out.shape == (batch, tokens, heads * head_dim) and out.dtype == dtype and out.is_contiguous()
        tolerance = expected.abs() * 2**-8 + 2e-3 if dtype == torch.bfloat16 else 1e-4
        assert ((out.double() - expected).abs() <= tolerance).all()
        if mask is per_query:
            assert (out.view(batch, tokens, heads, head_dim)[:, 0] == 0).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 48])  # bf16: tiles (where AMX is) and vectors
def test_a_nan_spoils_its_own_sequence_and_head_only(dtype, head_dim):
    """Damaged input: a NaN in one attended key makes every output of its (sequence, head) NaN, as PyTorch's attention
    gives, and leaves the others as they were; a key masked out is never read."""
    query, key, value = projected(3, 2, 20, head_dim, dtype, torch.Generator().manual_seed(1))
    padding = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    padding[2, ..., 15:] = False
    kernel = native_attention()
    clean = kernel(query, key, value, padding, head_dim**-0.5).view(3, 20, 2, head_dim)
    damaged = key.clone()
    damaged[0, 1, 7, 3] = float("nan")  # attended
    damaged[2, 0, 17, 0] = float("nan")  # masked out
    out = kernel(query, damaged, value, padding, head_dim**-0.5).view(3, 20, 2, head_dim)
    expected = torch.nn.functional.scaled_dot_product_attention(query, damaged, value, attn_mask=padding)
    assert out[0, :, 1].isnan().all() and expected[0, 1].isnan().all()
    spoiled = torch.zeros(3, 2, dtype=torch.bool)
    spoiled[0, 1] = True
    assert torch.equal(out.transpose(1, 2)[~spoiled], clean.transpose(1, 2)[~spoiled])


@needs_kernel
def test_bf16_heads_run_on_tiles_where_the_cpu_has_them():
    """The sizes above cover both paths: heads of a multiple of 32 features on tiles (where AMX is), others on
    vectors."""
    amx = native_amx_available()
    assert [native_attention_tiles(d) for d in (16, 32, 48, 64, 256)] == [False, amx, False, amx, amx]


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_read():
    kernel = native_attention()
    query, key, value = projected(2, 2, 8, 32, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel(query[..., :24], key[..., :24], value[..., :24], None, 0.2)
    with pytest.raises(ValueError, match="1 to 512 keys"):
        long = torch.randn(1, 1, 513, 32)
        kernel(long, long, long, None, 0.2)
    with pytest.raises(ValueError, match="one dtype"):
        kernel(query, key.bfloat16(), value, None, 0.2)
    with pytest.raises(ValueError, match="do not go with"):
        kernel(query, key[:1], value[:1], None, 0.2)
    with pytest.raises(ValueError, match="unit stride"):
        kernel(query, key.transpose(-1, -2).contiguous().transpose(-1, -2), value, None, 0.2)
    with pytest.raises(ValueError, match="boolean or torch.float32 mask"):
        kernel(query, key, value, torch.ones(2, 1, 8, 8, dtype=torch.int64), 0.2)
    with pytest.raises(ValueError, match="does not broadcast"):
        kernel(query, key, value, torch.ones(2, 1, 8, 7, dtype=torch.bool), 0.2)


def self_attentions(model: BitEmbed) -> list[torch.nn.Module]:
    return [layer.attention.self for layer in model[0].auto_model.encoder.layer]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stand_in_gives_what_the_module_gives(minilm_dir, dtype, tmp_path):
    """MiniLM's self-attention: the module's output within rounding on short padded batches, the module's own forward
    on longer ones; embeddings as without the stand-ins;
    checkpoint keys unchanged and the stand-ins taken again at load."""
    model = BitEmbed.from_backbone(str(minilm_dir), model_kwargs={"dtype": dtype}).eval()
    backbone = model[0].auto_model
    attentions = self_attentions(model)
    assert all(isinstance(m, NativeSelfAttention) for m in attentions) and len(attentions) == 6
    assert use_native_attention(backbone) == 6  # again: counted, not wrapped twice
    attention = attentions[0]
    module_calls = []  # the module's own forward, run by the stand-in where the kernel does not apply
    attention.attention.register_forward_hook(lambda *_: module_calls.append(1))
    generator = torch.Generator().manual_seed(0)
    longest = attention.max_keys(dtype)  # 48 for bf16 on vectors, else up to the kernel's 512
    for tokens in (7, 48, 49, 300, 513):
        hidden = torch.randn(3, tokens, 384, generator=generator).to(dtype)
        mask = torch.ones(3, 1, tokens, tokens, dtype=torch.bool)
        mask[1, ..., tokens // 2 :] = False
        module_calls.clear()
        with torch.no_grad():
            out, weights = attention(hidden, mask)
            assert len(module_calls) == (tokens > min(longest, 512))
            expected, _ = attention.attention(hidden, mask)
        assert weights is None and out.shape == expected.shape == (3, tokens, 384)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a rounding step (the sums' order differs)
        torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)
    hidden = torch.randn(2, 9, 384, generator=generator).to(dtype)
    layers = (attention.query, attention.key, attention.value)
    with torch.no_grad():  # q, k and v in one native call: each exactly its projection's own output
        together = attention.projections(hidden)
        assert all(torch.equal(out, layer(hidden)) for out, layer in zip(together, layers, strict=True))
        seen = []  # a hook on one of them: each runs its own forward, and the hook sees it
        handle = attention.key.register_forward_hook(lambda module, args, out: seen.append(out))
        apart = attention.projections(hidden)
        handle.remove()
        assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(apart, together, strict=True))
    texts = ["The cat sits on the mat.", "Ternary weights: -1, 0 and +1, and eight-bit activations."]
    with_stand_ins = model.encode(texts, convert_to_tensor=True)
    model.save(str(tmp_path / "saved"))
    for layer in backbone.encoder.layer:
        layer.attention.self = layer.attention.self.attention
    without = model.encode(texts, convert_to_tensor=True)
    # Each attention's output is within rounding of the module's (above), but summed in another order: float32 a last
    # bit apart now and then (min 0.9994 on an AMD EPYC, above 0.9999 on a Xeon), bf16 a rounding step apart in 1-2% of
    # the outputs (both as far from float32's), which the untrained converted student's int8 quantizers carry into
    # whole-code flips layer after layer (README: fidelity)
    bound = 0.999 if dtype == torch.float32 else 0.99
    assert torch.nn.functional.cosine_similarity(with_stand_ins.float(), without.float()).min() > bound
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert all(isinstance(m, NativeSelfAttention) for m in self_attentions(reloaded))
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())


@needs_kernel
def test_long_bf16_sequences_leave_the_vectors_only_for_pytorch_on_amx_tiles(minilm_dir, monkeypatch):
    """bf16 heads the kernel's tiles do not take stay on its vectors at every length, unless the CPU has AMX tiles,
    which PyTorch's kernel then uses (beyond MAX_VECTOR_BFLOAT16_KEYS keys the module's own forward runs); never more
    than the kernel's own maximum."""
    attention = self_attentions(BitEmbed.from_backbone(str(minilm_dir)).eval())[0]
    for tiles, amx, bfloat16_keys in ((False, False, 512), (False, True, MAX_VECTOR_BFLOAT16_KEYS), (True, True, 512)):
        monkeypatch.setattr(native_attention_module, "native_attention_tiles", lambda head_dim, tiles=tiles: tiles)
        monkeypatch.setattr(native_attention_module, "native_amx_available", lambda amx=amx: amx)
        assert native_attention_max_keys() == 512
        assert attention.max_keys(torch.bfloat16) == bfloat16_keys
        assert attention.max_keys(torch.float32) == 512


@needs_kernel
def test_other_implementations_and_training_run_the_module_itself(minilm_dir):
    model = BitEmbed.from_backbone(str(minilm_dir))
    attention = self_attentions(model)[0]
    hidden = torch.randn(2, 5, 384, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model.train()
    assert not attention.applies(hidden, None, {})
    out, _ = attention(hidden, None)
    out.sum().backward()  # gradients reach the input and the projections
    assert hidden.grad is not None and attention.query.weight.grad is not None
    model.eval()
    backbone = model[0].auto_model
    with torch.no_grad():
        assert attention.applies(hidden, None, {})
        assert not attention.applies(hidden, None, {"output_attentions": True})
        backbone.set_attn_implementation("eager")  # an additive mask, which the kernel reads too
        # padding as transformers masks it: -1e4 on the padded keys only (shifting every key of a row by -1e4 would
        # round its float32 scores to steps of 1e-3, where the sums' order shows)
        additive = torch.zeros(2, 1, 1, 5)
        additive[0, ..., 3:] = -1e4
        assert attention.applies(hidden, additive, {})
        torch.testing.assert_close(attention(hidden, additive)[0], attention.attention(hidden, additive)[0])
        backbone.set_attn_implementation("flex_attention")  # masks the kernel does not read
        assert not attention.applies(hidden, None, {})
