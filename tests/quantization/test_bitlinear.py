from __future__ import annotations

import random

import pytest
import torch
from test_kernels import layer
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization.bitlinear import BitLinear, install_bitlinear, release_latent_weights
from st_bitembed.quantization.ternary import ternary_weight_codes


def test_released_layer_keeps_only_codes_and_computes_the_same():
    bitlinear = layer(512, 256).eval()
    inputs = torch.randn(9, 512)
    with torch.no_grad():
        before = bitlinear(inputs)
        codes, scale = bitlinear.ternary_codes()
        bitlinear.release_latent_weight()
        assert bitlinear.latent_weight_released
        assert bitlinear.weight.untyped_storage().nbytes() == 4  # one float, not 512 x 256
        assert bitlinear.weight.shape == (256, 512) and bitlinear.weight.dtype == torch.float32
        torch.testing.assert_close(bitlinear(inputs), before, atol=0, rtol=0)
        saved = bitlinear.state_dict()["weight"]  # the latent weight it stands for, not the placeholder
    assert saved.shape == (256, 512) and bitlinear.latent_weight_released
    assert torch.equal(ternary_weight_codes(saved)[0], codes)
    torch.testing.assert_close(ternary_weight_codes(saved)[1], scale)
    # Training materialises a latent weight with the same codes and scale: the model it trains is the same model.
    bitlinear.train()
    assert not bitlinear.latent_weight_released and bitlinear.weight.untyped_storage().nbytes() == 4 * 256 * 512
    assert torch.equal(ternary_weight_codes(bitlinear.weight)[0], codes)
    with torch.no_grad():
        torch.testing.assert_close(bitlinear.eval()(inputs), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_follows_changes_to_the_weight_norm_weight_and_bias(dtype):
    """The prepared weight and the float32 norm weight and bias the GEMMs read are made once, and again whenever a
    parameter changes in place."""
    bitlinear = layer(96, 40).to(dtype).eval()
    inputs = torch.randn(5, 96).to(dtype)

    def reference() -> torch.Tensor:
        bitlinear.kernel = "reference"
        output = bitlinear(inputs)
        bitlinear.kernel = "int8"
        return output

    with torch.no_grad():
        first = bitlinear(inputs)
        torch.testing.assert_close(first, reference(), atol=0.05, rtol=0.02)
        bitlinear.rms_norm.weight.mul_(torch.linspace(0.1, 3, 96).to(dtype))
        bitlinear.bias.add_(10)
        changed = bitlinear(inputs)
        assert (changed - first).abs().min() > 1  # the bias moved every output
        torch.testing.assert_close(changed, reference(), atol=0.05, rtol=0.02)
        operands = bitlinear._operands()
        assert all(again is made for again, made in zip(bitlinear._operands(), operands))  # nothing changed
        bitlinear.weight.mul_(-1)  # every ternary code flips sign
        flipped = bitlinear(inputs)
        assert not torch.allclose(flipped, changed, atol=0.5)
        torch.testing.assert_close(flipped, reference(), atol=0.05, rtol=0.02)


def test_loading_a_state_dict_into_a_released_layer():
    source, target = layer(seed=1), layer(seed=2).eval()
    target.release_latent_weight()
    target.load_state_dict(source.state_dict())
    assert not target.latent_weight_released
    assert torch.equal(target.weight, source.weight)


def test_no_compilation_for_any_batch_or_length(converted_qwen3):
    """The inference path is eager: no torch.compile graphs (hence no recompilation) whatever the shapes."""
    backbone = converted_qwen3[0].auto_model.eval()
    release_latent_weights(backbone)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rng = random.Random(0)
    # The suite disables torch.compile (TORCH_COMPILE_DISABLE=1): enable it here, so that compilations would count.
    with torch._dynamo.config.patch(disable=False), torch.inference_mode():
        for _ in range(20):
            batch, length = rng.randint(1, 64), rng.randint(3, 512)
            input_ids = torch.randint(10, 1000, (batch, length))
            backbone(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


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
