from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import ActQuant, AutoBitLinear, WeightQuant

from st_bitembed.quantization import bitlinear_reference, int8_activation_codes, ternary_weight_codes


def test_weight_quantization_is_ternary_times_absmean():
    torch.manual_seed(0)
    weight = torch.randn(48, 32) * 0.05
    quantized = WeightQuant.apply(weight)
    absmean = weight.abs().mean()
    values = torch.unique(quantized)
    assert len(values) <= 3
    torch.testing.assert_close(values, torch.tensor([-1.0, 0.0, 1.0]) * absmean)
    codes, scale = ternary_weight_codes(weight)
    torch.testing.assert_close(codes.float() * scale, quantized)
    # round-clip: every weight goes to the nearest of {-s, 0, s}, large ones clip to +-s
    assert torch.equal(codes, (weight / absmean).round().clamp(-1, 1).to(torch.int8))


def test_activation_quantization_has_at_most_255_levels_per_token():
    torch.manual_seed(0)
    activations = torch.randn(4, 7, 4096) * torch.logspace(-2, 2, 7).view(1, 7, 1)
    quantized = ActQuant.apply(activations)
    for token in quantized.reshape(-1, 4096):
        assert len(torch.unique(token)) <= 255
    # per token: the largest magnitude maps exactly onto code 127
    torch.testing.assert_close(quantized.abs().amax(-1), activations.abs().amax(-1))
    codes, scale = int8_activation_codes(activations)
    assert codes.abs().max() == 127
    torch.testing.assert_close(codes.float() * scale, quantized)


@pytest.mark.parametrize("use_rms_norm", [False, True])
def test_autobitlinear_equals_reference(use_rms_norm):
    torch.manual_seed(0)
    layer = AutoBitLinear(32, 24, bias=True, online_quant=True, use_rms_norm=use_rms_norm)
    activations = torch.randn(3, 5, 32)
    expected_input = layer.rms_norm(activations) if use_rms_norm else activations
    torch.testing.assert_close(
        layer(activations), bitlinear_reference(expected_input, layer.weight, layer.bias), atol=1e-5, rtol=1e-5
    )


def test_straight_through_estimator_passes_gradients_to_latent_weights_and_norm():
    torch.manual_seed(0)
    layer = AutoBitLinear(32, 24, bias=False, online_quant=True, use_rms_norm=True)
    layer(torch.randn(2, 32)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.rms_norm.weight.grad is not None and layer.rms_norm.weight.grad.abs().sum() > 0
