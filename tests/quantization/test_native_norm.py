from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from st_bitembed import BitEmbed
from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.native import native_rms_norm
from st_bitembed.quantization.native_norm import NativeRMSNorm, use_native_norms
from st_bitembed.quantization.norm_folding import FoldedRMSNorm

pytestmark = pytest.mark.skipif(native_rms_norm() is None, reason="no C compiler here: the norms run in PyTorch")


def _norm(kind: str, size: int, dtype: torch.dtype) -> torch.nn.Module:
    norm = Qwen3RMSNorm(size, eps=1e-6) if kind == "qwen3" else Gemma3RMSNorm(size, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size) * 0.5 + (1.0 if kind == "qwen3" else 0.0))
    return norm.to(dtype).eval()


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_pass_computes_the_norm(kind, dtype):
    """Same outputs as transformers' norm (Qwen3 rounds before its weight, Gemma3 after), up to the order of the
    sum of squares: float32 within 1e-6, bf16 one rounding step in a few elements at most."""
    torch.manual_seed(0)
    norm = _norm(kind, 128, dtype)
    stand_in = NativeRMSNorm(norm, *((0.0, True) if kind == "qwen3" else (1.0, False)))
    hidden = (torch.randn(3, 50, 8, 128) * torch.logspace(-2, 2, 8)[:, None]).to(dtype)  # q of 8 heads
    with torch.no_grad():
        assert stand_in.applies(hidden)
        output, expected = stand_in(hidden), norm(hidden)
    assert output.dtype == expected.dtype == dtype and output.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    else:
        differ = output != expected
        assert differ.float().mean() < 5e-3
        ulp = expected.float().abs() * 2**-7
        assert ((output.float() - expected.float()).abs()[differ] <= ulp[differ] * 1.01).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heads_split_before_the_norm_run_natively_in_their_layout(dtype):
    """Gemma3 norms q and k after moving the heads before the tokens ([B, H, L, D] views of [B, L, H, D] tensors):
    the rows, taken in memory order, still have one stride, so the native pass takes them, and its output keeps the
    input's strides (as PyTorch's operators do); an expanded tensor (rows that repeat) is refused."""
    torch.manual_seed(2)
    norm = _norm("gemma3", 128, dtype)
    scale = NativeRMSNorm(norm, 1.0, False).channel_scale()
    hidden = (torch.randn(3, 50, 8, 128) * 3).to(dtype).transpose(1, 2)
    output = native_rms_norm()(hidden, scale, 1e-6, False)
    assert output.shape == hidden.shape and output.stride() == hidden.stride()
    assert torch.equal(output, native_rms_norm()(hidden.contiguous(), scale, 1e-6, False))
    with torch.no_grad():
        rounding = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(output.float(), norm(hidden).float(), rtol=rounding, atol=rounding)
    with pytest.raises(RuntimeError):
        native_rms_norm()(torch.randn(4, 1, 128).to(dtype).expand(4, 3, 128), scale, 1e-6, False)


def test_whatever_the_native_pass_cannot_take_runs_the_norm_itself():
    torch.manual_seed(1)
    norm = _norm("qwen3", 64, torch.bfloat16)
    stand_in = NativeRMSNorm(norm, 0.0, True)
    hidden = torch.randn(4, 64, 10).bfloat16().transpose(1, 2)  # last dimension not of unit stride
    with torch.no_grad():
        assert not stand_in.applies(hidden) and torch.equal(stand_in(hidden), norm(hidden))
        promoted = torch.randn(4, 64)  # float32 activations, bf16 weight: the norm's output is float32... of bf16
        assert not stand_in.applies(promoted) and torch.equal(stand_in(promoted), norm(promoted))
    hidden = torch.randn(4, 64).bfloat16().requires_grad_()
    stand_in(hidden).float().sum().backward()  # with gradients: the norm itself, which trains its weight
    assert hidden.grad is not None and stand_in.weight.grad is not None and norm.weight.grad is stand_in.weight.grad
    stand_in.train()
    with torch.no_grad():
        assert not stand_in.applies(torch.randn(4, 64).bfloat16())


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a_loaded_model_runs_its_other_norms_natively_and_encodes_as_before(backbone_dirs, family, tmp_path):
    """BitEmbed takes every model norm that no BitLinear reads (Qwen3: q_norm, k_norm, the final norm; Gemma3 also
    the norms of the attention's and MLP's outputs), never the folded ones nor BitLinears' own; the checkpoint keys
    stay; the embeddings stay those of the norms run in PyTorch."""
    model = BitEmbed.from_backbone(str(backbone_dirs[family])).eval()
    backbone = model[0].auto_model
    layer = backbone.layers[0]
    assert isinstance(layer.self_attn.q_norm, NativeRMSNorm) and isinstance(layer.self_attn.k_norm, NativeRMSNorm)
    assert isinstance(backbone.norm, NativeRMSNorm) and isinstance(layer.input_layernorm, FoldedRMSNorm)
    if family == "gemma3":
        assert isinstance(layer.post_attention_layernorm, NativeRMSNorm)
    norms_themselves = []  # calls of a stand-in's own norm: where the native pass did not apply
    for stand_in in (layer.self_attn.q_norm, layer.self_attn.k_norm):
        stand_in.norm.register_forward_pre_hook(lambda module, args: norms_themselves.append(args[0]))
    assert not any(isinstance(m.rms_norm, NativeRMSNorm) for m in backbone.modules() if isinstance(m, BitLinear))
    natives = [m for m in backbone.modules() if isinstance(m, NativeRMSNorm)]
    assert use_native_norms(backbone) == len(natives)  # again: counted, not wrapped twice
    texts = ["A short sentence.", "Another, somewhat longer sentence about the weather in spring."]
    with torch.no_grad():
        native = model.encode(texts, convert_to_tensor=True)
        assert norms_themselves == []  # Gemma3's q and k, normed with their heads split, included
        for stand_in in natives:
            stand_in.train()  # training mode: the norm's own operators
        reference = model.encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(native, reference).min() > 0.9999
    model.save(str(tmp_path / "saved"))
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert isinstance(reloaded[0].auto_model.norm, NativeRMSNorm)
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())
