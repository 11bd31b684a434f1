from __future__ import annotations

import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization.calibration import SCALING_EXPONENTS, calibrate_inserted_norms, fit_ternary_weight
from st_bitembed.quantization.ternary import bitlinear_reference

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.", "Hi there"]


def test_every_inserted_norm_is_calibrated_on_the_inputs_of_its_layer(converted_qwen3):
    """The inference path folds the norms and never calls them: calibration must still reach every one."""
    model = converted_qwen3
    layers = [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear) and m.rms_norm is not None]
    first = layers[0]
    captured = []
    handle = first.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    assert calibrate_inserted_norms(model, TEXTS, fit_weights=False) == len(layers) == 14
    handle.remove()
    assert all(not torch.equal(layer.rms_norm.weight, torch.ones_like(layer.rms_norm.weight)) for layer in layers)

    features = model.preprocess(TEXTS)
    tokens = captured[0][features["attention_mask"].bool()].float()  # real tokens only
    rms = tokens.pow(2).mean(dim=-1, keepdim=True).add(first.rms_norm.variance_epsilon).sqrt()
    expected = tokens.abs().mean(dim=0) / (tokens / rms).abs().mean(dim=0)
    torch.testing.assert_close(first.rms_norm.weight.detach(), expected)


def _layers(model) -> list[AutoBitLinear]:
    return [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear) and m.rms_norm is not None]


def test_fitting_the_weights_keeps_each_layers_full_precision_function_up_to_one_factor(converted_qwen3):
    """W diag(g) is what the layer computes before quantization: the fit may scale columns (undone by the norm) and
    the whole layer (its least-squares scale), nothing else. Checked on q, k and v of the first block, whose inputs
    (the token embeddings) do not depend on the layers fitted before them."""
    import copy

    plain = copy.deepcopy(converted_qwen3)
    calibrate_inserted_norms(plain, TEXTS, fit_weights=False)
    calibrate_inserted_norms(converted_qwen3, TEXTS)
    for before, after in zip(_layers(plain)[:3], _layers(converted_qwen3)[:3], strict=True):
        effective_before = before.weight.detach() * before.rms_norm.weight.detach()
        effective_after = after.weight.detach() * after.rms_norm.weight.detach()
        ratio = effective_after / effective_before
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-4, atol=0)
    assert any(not torch.equal(b.weight, a.weight) for b, a in zip(_layers(plain), _layers(converted_qwen3)))


def test_the_fitted_weight_has_a_smaller_ternary_error_than_the_weight_as_it_is():
    torch.manual_seed(0)
    layer = AutoBitLinear(64, 48, bias=False, online_quant=True)
    torch.nn.init.normal_(layer.weight, std=0.05)
    inputs = torch.randn(512, 64) * torch.logspace(-1, 1, 64)  # channels of very different magnitudes
    weight = layer.weight.detach().clone()
    reference = inputs @ weight.T
    plain_error = (bitlinear_reference(inputs, weight) - reference).pow(2).sum()

    channel_scale = fit_ternary_weight(layer, inputs)
    fitted_error = (bitlinear_reference(inputs / channel_scale, layer.weight.detach()) - reference).pow(2).sum()
    assert fitted_error < 0.9 * plain_error
    # The returned factors undo the column scaling: the full-precision product is the original times one factor.
    product = (inputs / channel_scale) @ layer.weight.detach().T
    factor = (product / reference).median()
    torch.testing.assert_close(product, factor * reference, rtol=1e-4, atol=1e-4)
    assert channel_scale.log().mean().abs() < 1e-5  # geometric mean 1
    assert len(SCALING_EXPONENTS) > 1 and SCALING_EXPONENTS[0] == 0
