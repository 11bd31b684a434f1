"""Models saved by earlier releases keep loading, with the same embeddings and codes.

The fixtures in ``tests/fixtures/bitembed-0.1.0`` were written by st_bitembed 0.1.0 (commit fdba6af, before the
precision records, the head's listed precisions and the conversion module), with the outputs that code gave
(``make_fixtures.py`` there says how).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from st_bitembed import BitEmbed

FIXTURES = Path(__file__).parent / "fixtures" / "bitembed-0.1.0"
TEXTS = (FIXTURES / "texts.txt").read_text().splitlines()
EXPECTED = dict(np.load(FIXTURES / "expected.npz"))


@pytest.mark.parametrize("variant", ["all", "subln"])
def test_models_saved_by_0_1_give_the_same_embeddings_and_codes(variant):
    model = BitEmbed(str(FIXTURES / f"bitembed-{variant}"))
    assert model.quantizer.precisions == ["int8", "int4", "int2"]  # a config without the list: today's three
    for key, expected in EXPECTED.items():
        saved, _, precision = key.partition("/")
        if saved != variant:
            continue
        precision, _, packed = precision.partition("-")
        got = model.encode(TEXTS, precision=precision, pack=bool(packed))
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=1e-5, err_msg=key)
        else:  # codes: another CPU's float order may move a value across a code boundary, rarely
            assert (got == expected).mean() >= 0.99, key


def test_packed_export_saved_by_0_1_gives_the_same_embeddings():
    model = BitEmbed(str(FIXTURES / "bitembed-all-packed"))
    np.testing.assert_allclose(model.encode(TEXTS), EXPECTED["all-packed/float32"], atol=1e-5)
    assert (model.encode(TEXTS, precision="int4") == EXPECTED["all-packed/int4"]).mean() >= 0.99
