from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization import bitlinear
from st_bitembed.quantization.activation_fusion import FusedIntermediate, fuse_intermediate_activations
from st_bitembed.quantization.kernels import (
    gemm_backend,
    native_linear,
    prepare_native_projection,
    prepare_ternary_weight,
)
from st_bitembed.quantization.native import ACTIVATIONS, TORCH_ACTIVATIONS, native_projections
from st_bitembed.quantization.ternary import ternary_weight_codes

needs_native = pytest.mark.skipif(gemm_backend("cpu") != "native", reason="the native kernel is not built here")


def within_rounding(output: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal but for the activation's last float32 bits: a bf16 value a unit in the last place apart where it lies on
    a rounding boundary, a float32 one a few ulps (of 1 where 1 + erf or 1 + exp cancels, far in the negative tail);
    NaNs where the expected output has them."""
    rtol, atol = (2**-7, 4e-5) if output.dtype == torch.bfloat16 else (1e-5, 4e-6)
    return torch.allclose(output.float(), expected.float(), rtol=rtol, atol=atol, equal_nan=True)


@needs_native
@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernels_output_activation_is_pytorchs(activation, dtype, with_bias):
    """The GEMM applies the activation as it writes each output (rounded to bf16 first for a bf16 model, as PyTorch
    holds the output it activates): PyTorch's activation of the plain output, within rounding, on outputs from tiny
    to far past the activations' bends (the exp's clamp included), 100 outputs (two panels and part of a third);
    a token with a NaN or an infinity stays NaN."""
    generator = torch.Generator().manual_seed(0)
    codes, scale = ternary_weight_codes(torch.randn(100, 384, generator=generator))
    weight = prepare_ternary_weight(codes, scale, "native")
    bias = torch.randn(100, generator=generator) if with_bias else None
    plain = native_projections([prepare_native_projection(weight, bias, torch.ones(384), 1e-6)])
    activated = native_projections(
        [prepare_native_projection(weight, bias, torch.ones(384), 1e-6, output_activation=activation)]
    )
    inputs = torch.randn(300, 384, generator=generator)
    inputs[4:] *= torch.logspace(-4, 2, 296)[:, None]  # the norm rescales; the bias then decides the range
    inputs[1, 7], inputs[2, 9], inputs[3, 11] = float("nan"), float("inf"), -float("inf")
    inputs = inputs.to(dtype)
    with torch.no_grad():
        output = native_linear(inputs, activated)[0]
        linear = native_linear(inputs, plain)[0]
        expected = TORCH_ACTIVATIONS[activation](linear)
    assert output.dtype == dtype and output[1:4].isnan().all()
    assert linear[4:].abs().max() > 10 and (linear[4:] < -6).any()  # both tails of the activation are reached
    assert within_rounding(output, expected)
    assert not within_rounding(linear, expected)  # the check tells an activated output from the output


def stand_ins(model: BitEmbed) -> list[FusedIntermediate]:
    return [layer.intermediate for layer in model[0].auto_model.encoder.layer]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_intermediate_gives_what_the_module_gives(minilm_dir, dtype, tmp_path, monkeypatch):
    """MiniLM's GELU in its intermediate projection's kernel: the module's outputs within the activation's rounding,
    the kernel asked for the activation; hooks on the projection see what it gives PyTorch's GELU (the module's own
    forward, exactly); embeddings as without the stand-ins; checkpoint keys unchanged."""
    model = BitEmbed.from_backbone(str(minilm_dir), model_kwargs={"dtype": dtype}).eval()
    backbone = model[0].auto_model
    intermediates = stand_ins(model)
    assert all(isinstance(m, FusedIntermediate) and m.activation == "gelu" for m in intermediates)
    assert fuse_intermediate_activations(backbone) == len(intermediates)  # again: counted, not wrapped twice
    intermediate = intermediates[0]
    hidden = (torch.randn(3, 70, intermediate.dense.in_features) * 2).to(dtype)
    kernel_activations = []  # what the projection asks of the native kernel

    def recording(activations, projections, *args):
        kernel_activations.append(projections[0].output_activation)
        return native_linear(activations, projections, *args)

    monkeypatch.setattr(bitlinear, "native_linear", recording)
    with torch.no_grad():
        assert intermediate.fuses()
        fused = intermediate(hidden)
        expected = intermediate.intermediate(hidden)
    native = gemm_backend("cpu") == "native"
    assert kernel_activations[0] == (ACTIVATIONS["gelu"] if native else None) or not native
    assert fused.dtype == dtype and within_rounding(fused, expected)
    assert not within_rounding(intermediate.dense(hidden), expected)
    seen = []  # a hook on the projection sees its output before the activation: the module's own forward runs
    handle = intermediate.dense.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        assert not intermediate.fuses() and torch.equal(intermediate(hidden), expected)
    handle.remove()
    assert len(seen) == 1 and torch.equal(torch.nn.functional.gelu(seen[0]), expected)
    texts = ["The cat sits on the mat.", "Ternary weights: -1, 0 and +1. " * 20]
    with_stand_ins = model.encode(texts, convert_to_tensor=True)
    model.save(str(tmp_path / "saved"))
    for layer, stand_in in zip(backbone.encoder.layer, intermediates):
        layer.intermediate = stand_in.intermediate
    without = model.encode(texts, convert_to_tensor=True)
    # The outputs within the activation's rounding (above), which the untrained converted student's int8 quantizers
    # carry into a whole-code flip now and then (min 0.9994 on an AMD EPYC, above 0.9999 on a Xeon; README: fidelity)
    assert torch.nn.functional.cosine_similarity(with_stand_ins.float(), without.float()).min() > 0.999
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert all(isinstance(m, FusedIntermediate) for m in stand_ins(reloaded))
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())


def test_training_runs_the_module_itself(minilm_dir):
    model = BitEmbed.from_backbone(str(minilm_dir)).eval()
    intermediate = stand_ins(model)[0]
    del intermediate.intermediate.intermediate_act_fn  # as built from a config whose hidden_act is a function:
    intermediate.intermediate.intermediate_act_fn = torch.nn.functional.gelu  # a plain attribute, without hooks
    with torch.no_grad():
        hidden = torch.randn(2, 5, intermediate.dense.in_features)
        assert intermediate.fuses() and within_rounding(intermediate(hidden), intermediate.intermediate(hidden))
    model.train()
    hidden = torch.randn(2, 5, intermediate.dense.in_features, requires_grad=True)
    assert not intermediate.fuses()
    output = intermediate(hidden)
    torch.testing.assert_close(output, intermediate.intermediate(hidden))
    output.sum().backward()  # gradients reach the input and the projection's latent weight
    assert hidden.grad is not None and intermediate.dense.weight.grad is not None
