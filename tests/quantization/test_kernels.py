from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization import kernels
from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.kernels import (
    UINT8_ZERO_POINT,
    activation_codes,
    gemm_backend,
    integer_product,
    prepare_ternary_weight,
)
from st_bitembed.quantization.ternary import bitlinear_reference, int8_activation_codes, ternary_weight_codes


def available(backend: str) -> bool:
    try:
        works = {"native": kernels._native_works, "fbgemm": kernels._fbgemm_works, "onednn": kernels._onednn_works,
                 "int_mm": lambda: kernels._int_mm_works("cpu")}  # fmt: skip
        return works[backend]()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


CPU_BACKENDS = [backend for backend in ("native", "fbgemm", "onednn") if available(backend)] + ["float"]
# The CUDA backend's path (quantizer, torch._int_mm and rescale in one compiled call) also runs on CPUs, in tests.
TESTED_BACKENDS = CPU_BACKENDS + (["int_mm"] if available("int_mm") else [])


def layer(in_features: int = 96, out_features: int = 40, seed: int = 0, bias: bool = True) -> BitLinear:
    torch.manual_seed(seed)
    bitlinear = BitLinear.from_autobitlinear(
        AutoBitLinear(in_features, out_features, bias=bias, online_quant=True, use_rms_norm=True)
    )
    bitlinear.rms_norm.weight.data = torch.rand(in_features) * 2  # calibrated norms are not all ones
    return bitlinear


def test_the_cpu_backend_is_an_integer_gemm_where_one_works():
    if len(CPU_BACKENDS) == 1:
        pytest.skip("no integer GEMM here: no AVX2 and C compiler, and neither FBGEMM nor oneDNN in this torch build")
    assert gemm_backend("cpu") == CPU_BACKENDS[0]  # the native kernel first (AMX tiles included), then the libraries


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_folded_norm_codes_equal_the_codes_of_the_normalised_activations(scale):
    """quant(RMSNorm(x) * g) == quant(x * g): the norm only rescales the output (one code off at rounding ties)."""
    bitlinear = layer(256, 8)
    activations = torch.randn(6, 50, 256) * scale
    norm = bitlinear.rms_norm
    expected_codes, expected_step = int8_activation_codes(norm(activations))
    codes, step = activation_codes(activations, norm.weight, norm.variance_epsilon)
    differing = codes != expected_codes.float()
    assert (codes - expected_codes.float()).abs().max() <= 1
    assert differing.float().mean() < 1e-3
    torch.testing.assert_close(step, expected_step, rtol=1e-5, atol=0)
    shifted, _ = activation_codes(activations, norm.weight, norm.variance_epsilon, offset=UINT8_ZERO_POINT)
    torch.testing.assert_close(shifted - UINT8_ZERO_POINT, codes)


def test_codes_without_a_norm_and_of_a_zero_token():
    activations = torch.randn(5, 64)
    activations[2] = 0
    codes, step = activation_codes(activations)
    expected_codes, expected_step = int8_activation_codes(activations)
    torch.testing.assert_close(codes, expected_codes.float())
    torch.testing.assert_close(step, expected_step)
    assert codes[2].abs().sum() == 0 and codes.abs().max() == 127


@pytest.mark.parametrize("backend", TESTED_BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("shape", [(96, 40), (601, 50)])  # (in, out): 601 inputs are 3 blocks of 16-bit sums
def test_integer_product_is_exact(backend, rows, shape):
    torch.manual_seed(rows)
    in_features, out_features = shape
    codes = torch.randint(-127, 128, (rows, in_features)).float()
    weight_codes, weight_scale = ternary_weight_codes(torch.randn(out_features, in_features))
    weight = prepare_ternary_weight(weight_codes, weight_scale, backend)
    offset = UINT8_ZERO_POINT if backend == "onednn" else 0
    product = integer_product(codes + offset, weight)
    assert torch.equal(product.double(), codes.double() @ weight_codes.double().T)  # the int32 accumulator, exactly


@pytest.mark.parametrize("backend", TESTED_BACKENDS)
@pytest.mark.parametrize("code", [127.0, -127.0])
def test_integer_product_is_exact_at_the_largest_sums(backend, code):
    """Every code at its extreme and weights of one sign: the largest sums the accumulators meet (the native kernel's
    16-bit sums reach 64 * 510 per block)."""
    in_features = 1030
    weight_codes = torch.ones(30, in_features, dtype=torch.int8)
    weight_codes[10:20] = -1
    weight_codes[20:, ::3] = 0
    weight = prepare_ternary_weight(weight_codes, torch.tensor(1.0), backend)
    codes = torch.full((9, in_features), code)
    offset = UINT8_ZERO_POINT if backend == "onednn" else 0
    product = integer_product(codes + offset, weight)
    assert torch.equal(product.double(), codes.double() @ weight_codes.double().T)
    assert product.abs().max() == 127 * in_features


@pytest.mark.parametrize("backend", TESTED_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_inference_path_agrees_with_the_reference_and_training_uses_the_reference(backend, bias, monkeypatch):
    monkeypatch.setattr(kernels, "gemm_backend", lambda device_type: backend)
    monkeypatch.setattr("st_bitembed.quantization.bitlinear.gemm_backend", lambda device_type: backend)
    bitlinear = layer(bias=bias).eval()
    inputs = torch.randn(3, 7, 96)
    with torch.no_grad():
        fast = bitlinear(inputs)
        bitlinear.kernel = "reference"
        reference = bitlinear(inputs)
    assert bitlinear._ternary.backend == backend
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


@pytest.mark.parametrize("backend", TESTED_BACKENDS)
@pytest.mark.parametrize("out_features", [40, 100])  # the native kernel: a partial panel only; whole panels too
def test_bfloat16_activations_give_the_float32_output_in_bfloat16(backend, out_features, monkeypatch):
    monkeypatch.setattr("st_bitembed.quantization.bitlinear.gemm_backend", lambda device_type: backend)
    bitlinear = layer(96, out_features).eval()
    inputs = torch.randn(3, 7, 96).bfloat16()
    inputs[1, 2, 5] = float("nan")
    with torch.no_grad():
        output = bitlinear(inputs)
        expected = bitlinear(inputs.float())
    assert output.dtype == torch.bfloat16
    assert output[1, 2].isnan().all() and output.isnan().sum() == out_features  # a damaged token stays damaged
    torch.testing.assert_close(output, expected.bfloat16(), atol=0, rtol=0, equal_nan=True)


def test_chunks_of_tokens_give_the_same_output_and_empty_input_is_empty(monkeypatch):
    bitlinear = layer().eval()
    inputs = torch.randn(5, 7, 96)
    with torch.no_grad():
        whole = bitlinear(inputs)
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 96 * 4)  # 4 tokens a chunk: 9 chunks, the last one short
        torch.testing.assert_close(bitlinear(inputs), whole, atol=0, rtol=0)
        assert bitlinear(torch.randn(0, 96)).shape == (0, 40)


def test_cached_weight_codes_follow_weight_updates():
    bitlinear = layer().eval()
    inputs = torch.randn(4, 96)
    with torch.no_grad():
        before = bitlinear(inputs)
        bitlinear.weight.mul_(-1)  # an optimizer step changes the latent weights in place
        after = bitlinear(inputs)
    torch.testing.assert_close(after - bitlinear.bias, -(before - bitlinear.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("amx", [True, False])
def test_each_cpu_backend_falls_back_to_the_next(monkeypatch, amx):
    if len(CPU_BACKENDS) < 4:
        pytest.skip("the native kernel, FBGEMM or oneDNN int8 GEMMs are missing here")
    bitlinear = layer().eval()
    inputs = torch.randn(20, 96)
    with torch.no_grad():
        default = bitlinear(inputs)

    def broken(*args, **kwargs):
        raise RuntimeError("not in this build")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    order = ["onednn", "native", "fbgemm"] if amx else ["native", "fbgemm", "onednn"]
    try:
        for failing, expected in zip(order, [*order[1:], "float"]):
            monkeypatch.setattr(kernels, f"_{failing}_works", broken)
            kernels.gemm_backend.cache_clear()
            assert gemm_backend("cpu") == expected
        with torch.no_grad():
            torch.testing.assert_close(bitlinear(inputs), default, atol=1e-5, rtol=1e-5)
        assert bitlinear._ternary.backend == "float"
    finally:
        monkeypatch.undo()
        kernels.gemm_backend.cache_clear()
