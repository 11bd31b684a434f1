from __future__ import annotations

import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization.calibration import calibrate_inserted_norms

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.", "Hi there"]


def test_every_inserted_norm_is_calibrated_on_the_inputs_of_its_layer(converted_qwen3):
    """The inference path folds the norms and never calls them: calibration must still reach every one."""
    model = converted_qwen3
    layers = [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear) and m.rms_norm is not None]
    first = layers[0]
    captured = []
    handle = first.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    assert calibrate_inserted_norms(model, TEXTS) == len(layers) == 14
    handle.remove()
    assert all(not torch.equal(layer.rms_norm.weight, torch.ones_like(layer.rms_norm.weight)) for layer in layers)

    features = model.preprocess(TEXTS)
    tokens = captured[0][features["attention_mask"].bool()].float()  # real tokens only
    rms = tokens.pow(2).mean(dim=-1, keepdim=True).add(first.rms_norm.variance_epsilon).sqrt()
    expected = tokens.abs().mean(dim=0) / (tokens / rms).abs().mean(dim=0)
    torch.testing.assert_close(first.rms_norm.weight.detach(), expected)
