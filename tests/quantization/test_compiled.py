from __future__ import annotations

import logging
import random

import pytest
import torch

from st_bitembed.quantization import kernels
from st_bitembed.quantization.compiled import CompiledWithFallback
from st_bitembed.quantization.kernels import (
    prepare_ternary_weight,
    ternary_linear,
    torch_activation_codes,
)
from st_bitembed.quantization.ternary import ternary_weight_codes

COMPILED = kernels.compiled_int8_projection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False])
def test_compiled_projection_is_the_eager_operators_projection(dtype, with_norm):
    """The compiled quantizer, GEMM and rescale against the same operators run eagerly: a code apart only at rounding
    ties (the sum of squares is added in another order), so outputs within a step of those codes."""
    if not kernels._int_mm_works("cpu"):
        pytest.skip("torch._int_mm does not run on this CPU")
    torch.manual_seed(0)
    activations = (torch.randn(300, 384) * torch.logspace(-2, 2, 300)[:, None]).to(dtype)
    norm_weight = torch.rand(384) * 2 if with_norm else None
    codes, scale = ternary_weight_codes(torch.randn(200, 384))
    arguments = (activations, norm_weight, 1e-6, codes.t(), scale, torch.randn(200), dtype)
    with torch.inference_mode():
        output = COMPILED(*arguments)
        expected = kernels._int8_projection(*arguments)
    assert "cpu" not in COMPILED.failed_device_types, "Inductor could not compile on this CPU"
    assert output.dtype == dtype
    _, step = torch_activation_codes(activations, norm_weight, 1e-6)
    rounding = 1e-2 if dtype == torch.bfloat16 else 1e-5
    tolerance = 2 * step * scale + expected.float().abs() * rounding  # two codes apart, and the output's rounding
    assert ((output.float() - expected.float()).abs() <= tolerance).all()


def test_one_compilation_serves_every_batch_shape_and_layer():
    """20 batches of 1-64 texts of 3-512 tokens through three layer shapes, with and without bias: after one batch
    of each kind, nothing is compiled again (a recompilation would raise and be caught as a failure)."""
    if not kernels._int_mm_works("cpu"):
        pytest.skip("torch._int_mm does not run on this CPU")
    torch.manual_seed(0)
    layers = {}
    for in_features, out_features in ((64, 96), (96, 40), (128, 200)):
        codes, scale = ternary_weight_codes(torch.randn(out_features, in_features))
        layers[in_features] = prepare_ternary_weight(codes, scale, "int_mm"), torch.rand(in_features)

    def run(batch: int, length: int, in_features: int, with_bias: bool) -> torch.Tensor:
        weight, norm_weight = layers[in_features]
        activations = torch.randn(batch, length, in_features)
        bias = torch.randn(weight.out_features) if with_bias else None
        with torch.inference_mode():
            return ternary_linear(activations, weight, bias, norm_weight, 1e-6)

    run(2, 9, 64, True)
    run(3, 5, 96, False)
    generator = random.Random(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(20):
            batch, length = generator.randint(1, 64), generator.randint(3, 512)
            output = run(batch, length, generator.choice(list(layers)), generator.random() < 0.5)
            assert output.shape[:2] == (batch, length)
    assert "cpu" not in COMPILED.failed_device_types, "recompiled, or Inductor failed on this CPU"


def test_a_function_that_cannot_be_compiled_runs_eagerly_with_one_warning(monkeypatch, caplog):
    def no_compiler(function, **kwargs):
        def broken(*args):
            raise RuntimeError("Cannot find a working triton installation")

        return broken

    monkeypatch.setattr(torch, "compile", no_compiler)
    doubled = CompiledWithFallback(lambda tensor: tensor * 2)
    with caplog.at_level(logging.WARNING, logger="st_bitembed.quantization.compiled"):
        assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(doubled(torch.ones(2)), torch.full((2,), 2.0))
    assert doubled.failed_device_types == {"cpu"}
    assert len(caplog.records) == 1 and "triton" in caplog.records[0].getMessage()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_int_mm_path_agrees_with_the_cpu_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    codes, scale = ternary_weight_codes(torch.randn(3072, 1024))
    norm_weight, bias = torch.rand(1024) * 2, torch.randn(3072)
    activations = torch.randn(4, 33, 1024).to(dtype)
    expected = ternary_linear(activations.float(), prepare_ternary_weight(codes, scale, "float"), bias, norm_weight)
    weight = prepare_ternary_weight(codes.cuda(), scale.cuda(), kernels.gemm_backend("cuda"))
    assert weight.backend == "int_mm"
    output = ternary_linear(activations.cuda(), weight, bias.cuda(), norm_weight.cuda())
    assert output.dtype == dtype and not COMPILED.failed_device_types
    torch.testing.assert_close(output.float().cpu(), expected.to(dtype).float(), rtol=2e-2, atol=2e-2)
