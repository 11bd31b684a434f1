from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization import kernels
from st_bitembed.quantization.bitlinear import BitLinear, install_bitlinear
from st_bitembed.quantization.kernels import int8_linear, int_mm_available, quantize_activations
from st_bitembed.quantization.ternary import bitlinear_reference, ternary_weight_codes


def layer(in_features: int = 96, out_features: int = 40, seed: int = 0) -> BitLinear:
    torch.manual_seed(seed)
    return BitLinear.from_autobitlinear(
        AutoBitLinear(in_features, out_features, bias=True, online_quant=True, use_rms_norm=True)
    )


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64])
def test_integer_product_is_exact(rows):
    torch.manual_seed(rows)
    activations, weight = torch.randn(rows, 96), torch.randn(40, 96)
    codes, step = quantize_activations(activations)
    weight_codes, weight_scale = ternary_weight_codes(weight)
    exact = (codes.double() @ weight_codes.double().T) * step.double() * weight_scale.double()
    for use_int_mm in (False, True) if int_mm_available("cpu") else (False,):
        got = int8_linear(activations, weight_codes.t().contiguous(), weight_scale, use_int_mm=use_int_mm)
        torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=1e-6)
    if int_mm_available("cpu"):  # the int32 accumulator itself equals the exact integer product
        integer = torch._int_mm(
            torch.nn.functional.pad(codes, (0, 0, 0, -rows % 8 + (8 if rows <= 16 else 0))),
            weight_codes.t().contiguous(),
        )[:rows]
        assert torch.equal(integer.double(), codes.double() @ weight_codes.double().T)


def test_inference_path_agrees_with_the_reference_and_training_uses_the_reference():
    bitlinear = layer().eval()
    inputs = torch.randn(3, 7, 96)
    with torch.no_grad():
        fast = bitlinear(inputs)
        bitlinear.kernel = "reference"
        reference = bitlinear(inputs)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        fast,
        bitlinear_reference(bitlinear.rms_norm(inputs), bitlinear.weight, bitlinear.bias).detach(),
        atol=1e-5,
        rtol=1e-5,
    )
    bitlinear.kernel = "int8"
    bitlinear.train()
    bitlinear(inputs).sum().backward()  # gradients still flow: the training path is transformers' STE forward
    assert bitlinear.weight.grad is not None and bitlinear.weight.grad.abs().sum() > 0


def test_cached_weight_codes_follow_weight_updates():
    bitlinear = layer().eval()
    inputs = torch.randn(4, 96)
    with torch.no_grad():
        before = bitlinear(inputs)
        bitlinear.weight.mul_(-1)  # an optimizer step changes the latent weights in place
        after = bitlinear(inputs)
    torch.testing.assert_close(after - bitlinear.bias, -(before - bitlinear.bias), atol=1e-5, rtol=1e-5)


def test_fallback_when_int_mm_is_unavailable(monkeypatch):
    bitlinear = layer().eval()
    inputs = torch.randn(20, 96)
    with torch.no_grad():
        with_int_mm = bitlinear(inputs)
    monkeypatch.delattr(torch, "_int_mm", raising=False)
    kernels.int_mm_available.cache_clear()
    try:
        assert not int_mm_available("cpu")
        with torch.no_grad():
            torch.testing.assert_close(bitlinear(inputs), with_int_mm, atol=1e-5, rtol=1e-5)
    finally:
        monkeypatch.undo()
        kernels.int_mm_available.cache_clear()


def test_install_swaps_layers_without_copying_parameters(converted_qwen3):
    backbone = converted_qwen3[0].auto_model
    weights = {name: p for name, p in backbone.named_parameters()}
    assert install_bitlinear(backbone, "reference") == 14
    assert all(type(m) is BitLinear for m in backbone.modules() if isinstance(m, AutoBitLinear))
    assert all(weights[name] is p for name, p in backbone.named_parameters())
    backbone.eval()
    install_bitlinear(backbone, "int8")  # swapping keeps each layer's train / eval mode (a new Module would train)
    assert not any(m.training for m in backbone.modules() if isinstance(m, BitLinear))
    with pytest.raises(ValueError, match="Unknown BitLinear kernel 'cuda'"):
        install_bitlinear(backbone, "cuda")
