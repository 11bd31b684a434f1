"""st_bitembed: BitNet (ternary-weight, 8-bit-activation) text-embedding models for sentence-transformers."""

from __future__ import annotations

__version__ = "0.1.0"

from st_bitembed.model import BitEmbed  # noqa: E402
from st_bitembed.modules.quantize import PRECISIONS, Quantize  # noqa: E402

__all__ = ["PRECISIONS", "BitEmbed", "Quantize", "__version__"]
