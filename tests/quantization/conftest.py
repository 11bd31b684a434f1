from __future__ import annotations

import pytest

from st_bitembed.quantization.native import set_attention_bfloat16_pairs


@pytest.fixture
def bfloat16_path(request):
    """For tests parametrized with it (``indirect=True``): bf16 heads off the attention kernel's tiles multiplied as
    bf16 pairs (AVX512-BF16, the default where the CPU has it) or widened to float32 (elsewhere): both paths, where
    the CPU has the pairs."""
    pairs = request.param == "bf16 pairs"
    previous = set_attention_bfloat16_pairs(pairs)
    if previous < 0 and pairs:
        pytest.skip("no AVX512-BF16 here: bf16 heads off the tiles are widened to float32 (the other case)")
    yield request.param
    if previous >= 0:
        set_attention_bfloat16_pairs(bool(previous))
