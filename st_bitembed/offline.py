"""Offline Hugging Face datasets: build the cache from a local data kit and point datasets / mteb at it.

The kit (``shared/`` beside this repository: ``data/raw`` plus ``tools/build_hf_cache.py``) is turned into a
``datasets`` cache laid out like the Hub's, so unmodified ``load_dataset("sentence-transformers/stsb")`` and
``mteb.get_task("STSBenchmark")`` calls run without the Hub. datasets and huggingface_hub read these variables when
they are imported: call :func:`use_offline_data` before importing them (the CLI does, for ``--offline-data``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

OFFLINE_DATA_ENV = "ST_BITEMBED_OFFLINE_DATA"
BUILD_TOOL = Path("tools") / "build_hf_cache.py"
# What datasets says, twice per load_dataset call, when it reads the offline cache: true by construction here.
CACHE_NOTICES = {
    "datasets.load": "Using the latest cached version of the dataset",
    "datasets.packaged_modules.cache.cache": "Found the latest cached dataset configuration",
}


def _not_a_cache_notice(record: logging.LogRecord) -> bool:
    return not any(record.getMessage().startswith(notice) for notice in CACHE_NOTICES.values())


def use_offline_data(kit: str | os.PathLike, cache_dir: str | os.PathLike = ".cache/hf-datasets") -> Path:
    """Build (or reuse) the datasets cache of the data kit at ``kit`` in ``cache_dir`` and switch to it, offline.

    Raises:
        FileNotFoundError: ``kit`` has no ``tools/build_hf_cache.py``.
        RuntimeError: some of datasets / huggingface_hub is already imported, so the switch would not take effect.
    """
    tool = Path(kit) / BUILD_TOOL
    if not tool.is_file():
        raise FileNotFoundError(
            f"No offline data kit at {kit!r}: expected {tool}. Point --offline-data (or ${OFFLINE_DATA_ENV}) at the "
            "folder holding data/raw and tools/build_hf_cache.py."
        )
    already = [name for name in ("datasets", "huggingface_hub") if name in sys.modules]
    if already and os.environ.get("HF_DATASETS_CACHE") != str(Path(cache_dir).resolve()):
        raise RuntimeError(
            f"{', '.join(already)} is already imported, so its cache location can no longer change: call "
            "use_offline_data() first, or set HF_DATASETS_CACHE, HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 yourself."
        )
    subprocess.run([sys.executable, str(tool), "--out", str(cache_dir), "-q"], check=True)
    cache = Path(cache_dir).resolve()
    os.environ.update(HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for logger_name in CACHE_NOTICES:
        logging.getLogger(logger_name).addFilter(_not_a_cache_notice)
    return cache
