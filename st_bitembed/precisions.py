"""Storage precisions of sentence embeddings: one record per precision, the one place their facts live.

A precision is how many bits one embedding dimension takes in an index, and how its codes are laid out:

- float (``float32`` / ``float16`` / ``bfloat16``): the embedding cast to that dtype;
- integer (``int8`` / ``int4`` / ``int2``): one signed code per dimension from the Quantize head's trained ranges
  (``uint8``: the int8 code in sentence-transformers' unsigned layout, shifted by :data:`UNSIGNED_OFFSET`);
- binary (``binary`` / ``ubinary``): the sign bits packed 8 per byte, as sentence-transformers'
  ``quantize_embeddings`` packs them (``binary`` stores each byte minus 128 as int8, ``ubinary`` the byte).

Adding a precision is one entry in :data:`PRECISIONS` (and, for a new integer width, nothing else: new Quantize
heads hold a range for every integer precision, and heads saved before keep the ones they were trained with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

PrecisionName = Literal["float32", "float16", "bfloat16", "int8", "uint8", "int4", "int2", "binary", "ubinary"]
PrecisionKind = Literal["float", "integer", "binary"]
# sentence-transformers' unsigned layouts are the signed codes plus 128 (uint8 = int8 + 128, ubinary = binary + 128).
UNSIGNED_OFFSET = 128

Codes = TypeVar("Codes", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class Precision:
    """The facts of one storage precision.

    Args:
        name: As passed to ``encode(precision=...)``.
        bits: Bits per embedding dimension in storage.
        kind: ``"float"``, ``"integer"`` or ``"binary"``.
        dtype: dtype of the codes ``encode`` returns (for integer precisions before any packing).
        unsigned: The codes of another precision (``signed``) plus :data:`UNSIGNED_OFFSET`, in unsigned bytes.
        signed: For an unsigned layout, the precision whose codes it shifts; otherwise the precision itself.
    """

    name: str
    bits: int
    kind: PrecisionKind
    dtype: torch.dtype
    unsigned: bool = False
    signed: str | None = None

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_integer(self) -> bool:
        return self.kind == "integer"

    @property
    def is_binary(self) -> bool:
        return self.kind == "binary"

    @property
    def code_precision(self) -> str:
        """The signed precision whose codes these are (``int8`` for ``uint8``): the Quantize head's range to use."""
        return self.signed or self.name

    def bytes_per_vector(self, dimension: int) -> int:
        """Bytes one ``dimension``-dimensional embedding takes (sub-byte precisions packed)."""
        return math.ceil(dimension * self.bits / 8)


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("float32", 32, "float", torch.float32),
        Precision("float16", 16, "float", torch.float16),
        Precision("bfloat16", 16, "float", torch.bfloat16),
        Precision("int8", 8, "integer", torch.int8),
        Precision("uint8", 8, "integer", torch.uint8, unsigned=True, signed="int8"),
        Precision("int4", 4, "integer", torch.int8),
        Precision("int2", 2, "integer", torch.int8),
        Precision("binary", 1, "binary", torch.int8),
        Precision("ubinary", 1, "binary", torch.uint8, unsigned=True, signed="binary"),
    )
}
# Trained (by the multi-precision loss) and evaluated when nobody says otherwise.
DEFAULT_PRECISIONS: tuple[PrecisionName, ...] = ("float32", "int8", "int4", "int2", "binary")
# Where the similarity KL is applied when nobody says otherwise: the float output alone (BitEmbedLoss.kl_precisions).
KL_DEFAULT_PRECISIONS: tuple[PrecisionName, ...] = ("float32",)
# The signed integer precisions: the Quantize head holds a trained range per dimension for each.
INTEGER_PRECISIONS: tuple[str, ...] = tuple(p.name for p in PRECISIONS.values() if p.is_integer and not p.unsigned)


def get_precision(precision: str | Precision) -> Precision:
    """The record of ``precision``.

    Raises:
        ValueError: an unknown name, with the valid ones.
    """
    if isinstance(precision, Precision):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; valid precisions are {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def to_unsigned(codes: Codes) -> Codes:
    """Signed int8 codes (or packed binary bytes) as sentence-transformers' unsigned bytes: ``codes + 128``."""
    return _flip_top_bit(codes, torch.uint8 if isinstance(codes, torch.Tensor) else np.uint8)


def to_signed(codes: Codes) -> Codes:
    """Unsigned bytes back to the signed codes: ``codes - 128``."""
    return _flip_top_bit(codes, torch.int8 if isinstance(codes, torch.Tensor) else np.int8)


def _flip_top_bit(codes: Codes, dtype: torch.dtype | type) -> Codes:
    # Adding or subtracting 128 modulo 256 flips the top bit of the byte: no wider intermediate needed.
    unsigned = codes.view(torch.uint8 if isinstance(codes, torch.Tensor) else np.uint8)
    return (unsigned ^ UNSIGNED_OFFSET).view(dtype)
