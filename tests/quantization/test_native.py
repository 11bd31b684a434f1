from __future__ import annotations

import pytest
import torch

from st_bitembed.quantization import native
from st_bitembed.quantization.kernels import (
    UINT8_ZERO_POINT,
    activation_codes,
    torch_activation_codes,
)
from st_bitembed.quantization.native import native_activation_codes, native_ternary_gemm, native_uint8_activation_codes


@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("offset", [0, UINT8_ZERO_POINT])
def test_compiled_quantizer_matches_the_torch_operators(with_norm, offset):
    compiled = native_activation_codes()
    if compiled is None:
        pytest.skip("no C compiler here: the PyTorch quantizer runs (tested above)")
    torch.manual_seed(0)
    norm_weight = torch.rand(384) * 2 if with_norm else None
    activations = torch.randn(300, 400)[:, :384] * torch.logspace(-4, 3, 300)[:, None]  # rows of stride 400
    activations[7] = 0
    codes, step = compiled(activations, norm_weight, 1e-6, offset)
    expected_codes, expected_step = torch_activation_codes(activations, norm_weight, 1e-6, offset)
    assert (codes - expected_codes).abs().max() <= 1  # the sum of squares in another order: a tie may round apart
    assert (codes != expected_codes).float().mean() < 1e-3
    torch.testing.assert_close(step, expected_step, rtol=1e-6, atol=0)
    assert codes.min() >= offset - 127 and codes.max() <= offset + 127 and (codes[7] == offset).all()
    # activation_codes takes the compiled path for float32 CPU input, and the PyTorch one otherwise
    torch.testing.assert_close(activation_codes(activations, norm_weight, 1e-6, offset), (codes, step))
    grad_input = activations.clone().requires_grad_()
    assert activation_codes(grad_input, norm_weight, 1e-6, offset)[0].equal(expected_codes)
    activations[3, 5], activations[4, 6] = float("nan"), float("inf")
    for quantizer in (compiled, torch_activation_codes):  # damage is carried to the output, not hidden in codes
        assert not quantizer(activations, norm_weight, 1e-6, offset)[1][3:5].isfinite().any()


@pytest.mark.parametrize("with_norm", [True, False])
def test_uint8_codes_are_the_float_codes_plus_the_zero_point(with_norm):
    compiled, uint8_codes = native_activation_codes(), native_uint8_activation_codes()
    if compiled is None:
        pytest.skip("no C compiler here")
    torch.manual_seed(1)
    norm_weight = torch.rand(97) * 2 if with_norm else None
    activations = torch.randn(30, 97) * torch.logspace(-3, 2, 30)[:, None]
    activations[4, 9] = float("nan")
    buffer = torch.full((32, 100), 7, dtype=torch.uint8)  # rows and columns beyond the activations stay untouched
    steps = uint8_codes(activations, norm_weight, 1e-6, buffer)
    codes, expected_steps = compiled(activations, norm_weight, 1e-6, UINT8_ZERO_POINT)
    finite = torch.arange(30) != 4
    assert torch.equal(buffer[:30, :97][finite].float(), codes[finite])
    torch.testing.assert_close(steps[finite], expected_steps[finite, 0], rtol=0, atol=0)
    assert steps[4].isnan() and (buffer[4, :97] == UINT8_ZERO_POINT).all()  # damage in the step; codes defined
    assert (buffer[30:] == 7).all() and (buffer[:, 97:] == 7).all()


def _clear() -> None:
    for function in (native._library, native_activation_codes, native_uint8_activation_codes, native_ternary_gemm):
        function.cache_clear()


def test_compiled_kernels_are_cached_and_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path))
    _clear()
    try:
        if native_activation_codes() is None:
            pytest.skip("no C compiler here")
        assert native_uint8_activation_codes() is not None
        assert len(list((tmp_path / "kernels").glob("bitlinear-*.so"))) == 1
        monkeypatch.setenv("ST_BITEMBED_NATIVE", "0")
        _clear()
        assert native_activation_codes() is None and native_ternary_gemm() is None
        monkeypatch.setenv("ST_BITEMBED_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path / "other"))
        _clear()
        assert native_activation_codes() is None  # logged, not raised: the PyTorch path runs
        assert native_ternary_gemm() is None  # and the next GEMM backend
    finally:
        _clear()
