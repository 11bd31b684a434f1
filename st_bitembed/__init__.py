"""st_bitembed: BitNet (ternary-weight, 8-bit-activation) text-embedding models for sentence-transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["PRECISIONS", "BitEmbed", "Quantize", "__version__"]

if TYPE_CHECKING:
    from st_bitembed.model import BitEmbed
    from st_bitembed.modules.quantize import Quantize
    from st_bitembed.precisions import PRECISIONS

# Imported on first use, so that the CLI can set up the offline Hugging Face environment (read by datasets and
# huggingface_hub when they are imported) before any of them loads.
_LAZY = {
    "BitEmbed": "st_bitembed.model",
    "PRECISIONS": "st_bitembed.precisions",
    "Quantize": "st_bitembed.modules.quantize",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'st_bitembed' has no attribute {name!r}")
