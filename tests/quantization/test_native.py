from __future__ import annotations

import pytest
import torch

from st_bitembed.quantization.kernels import (
    UINT8_ZERO_POINT,
    activation_codes,
    torch_activation_codes,
)
from st_bitembed.quantization.native import native_activation_codes


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


def test_compiled_quantizer_is_cached_and_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path))
    native_activation_codes.cache_clear()
    try:
        if native_activation_codes() is None:
            pytest.skip("no C compiler here")
        assert len(list((tmp_path / "kernels").glob("activation_codes-*.so"))) == 1
        monkeypatch.setenv("ST_BITEMBED_NATIVE", "0")
        native_activation_codes.cache_clear()
        assert native_activation_codes() is None
        monkeypatch.setenv("ST_BITEMBED_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path / "other"))
        native_activation_codes.cache_clear()
        assert native_activation_codes() is None  # logged, not raised: the PyTorch path runs
    finally:
        native_activation_codes.cache_clear()
