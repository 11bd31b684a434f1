from __future__ import annotations

import logging
import os

import pytest
from conftest import DATASETS_CACHE

from st_bitembed.offline import CACHE_NOTICES, use_offline_data


def test_a_missing_kit_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No offline data kit at .*expected .*build_hf_cache.py"):
        use_offline_data(tmp_path / "no-kit")


def test_offline_data_loads_without_cache_notices(kit):
    from datasets import load_dataset

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    loggers = [logging.getLogger(name) for name in CACHE_NOTICES]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        load_dataset("sentence-transformers/stsb", split="train")
        assert any(notice in r.getMessage() for r in records for notice in CACHE_NOTICES.values())  # datasets says it
        records.clear()
        assert use_offline_data(kit, DATASETS_CACHE) == DATASETS_CACHE.resolve()
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_CACHE"] == str(DATASETS_CACHE.resolve())
        assert len(load_dataset("sentence-transformers/stsb", split="train")) > 5000
        assert not records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.filters.clear()
