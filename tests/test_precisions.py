from __future__ import annotations

import numpy as np
import pytest
import torch

from st_bitembed import Quantize
from st_bitembed.precisions import (
    DEFAULT_PRECISIONS,
    INTEGER_PRECISIONS,
    PRECISIONS,
    get_precision,
    to_signed,
    to_unsigned,
)


def test_records_hold_the_facts_of_each_precision():
    assert {p: PRECISIONS[p].bits for p in PRECISIONS} == {
        "float32": 32,
        "float16": 16,
        "bfloat16": 16,
        "int8": 8,
        "uint8": 8,
        "int4": 4,
        "int2": 2,
        "binary": 1,
        "ubinary": 1,
    }
    assert INTEGER_PRECISIONS == ("int8", "int4", "int2")
    assert get_precision("uint8").code_precision == "int8" and get_precision("int4").code_precision == "int4"
    assert [p for p in PRECISIONS if PRECISIONS[p].unsigned] == ["uint8", "ubinary"]
    assert set(DEFAULT_PRECISIONS) <= set(PRECISIONS)
    assert get_precision("int4").bytes_per_vector(1023) == 512 and get_precision("binary").bytes_per_vector(9) == 2


def test_unknown_precision_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown precision 'int3'; valid precisions are float32, .*ubinary"):
        get_precision("int3")


def test_unsigned_layout_is_codes_plus_128_for_tensors_and_arrays():
    codes = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    shifted = to_unsigned(codes)
    assert shifted.dtype == torch.uint8 and torch.equal(shifted.to(torch.int16), codes.to(torch.int16) + 128)
    assert torch.equal(to_signed(shifted), codes)
    array = codes.numpy()
    assert to_unsigned(array).dtype == np.uint8
    np.testing.assert_array_equal(to_unsigned(array).astype(np.int16), array.astype(np.int16) + 128)
    np.testing.assert_array_equal(to_signed(to_unsigned(array)), array)


def test_head_records_its_precisions_and_refuses_one_it_lacks(tmp_path):
    head = Quantize(8, precisions=["int8", "int2"])
    head.save(str(tmp_path))
    loaded = Quantize.load(str(tmp_path))
    assert loaded.precisions == ["int8", "int2"] and set(loaded.log_half_ranges) == {"int8", "int2"}
    embeddings = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert loaded.quantize(embeddings, "uint8").dtype == torch.uint8
    with pytest.raises(ValueError, match="no range for int4 \\(it holds int8, int2\\)"):
        loaded.quantize(embeddings, "int4")
    with pytest.raises(ValueError, match="signed integer precisions"):
        Quantize(8, precisions=["uint8"])


def test_a_precision_added_as_one_record_works_through_head_search_and_reports(monkeypatch):
    from st_bitembed.evaluation import EvaluationReport, Score, posthoc_quantize
    from st_bitembed.precisions import Precision
    from st_bitembed.search import quantized_semantic_search

    monkeypatch.setitem(PRECISIONS, "int6", Precision("int6", 6, "integer", torch.int8))
    head = Quantize(16, precisions=["int8", "int6"])
    embeddings = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    head.calibrate(embeddings)
    codes = head.quantize(embeddings, "int6")
    assert codes.min() >= -32 and codes.max() <= 31 and len(codes.unique()) > 16
    restored = head.dequantize(codes, "int6")
    assert (restored - embeddings).abs().max() < (
        head.dequantize(head.quantize(embeddings, "int8"), "int8") - embeddings
    ).abs().max() * 8
    hits = quantized_semantic_search(embeddings, codes, "int6", head, top_k=1)
    assert [h[0]["corpus_id"] for h in hits] == list(range(5))
    assert head.bytes_per_vector("int6") == 12 and len(posthoc_quantize(embeddings, "int6").unique()) > 16
    report = EvaluationReport("m", 16, [Score("head", "int6", "t", "STS", "spearman", 0.5)])
    assert "| BitEmbed head | int6 | 6 | 12 |" in report.to_markdown()
