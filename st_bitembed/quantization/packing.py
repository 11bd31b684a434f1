"""Bit packing of low-precision embedding codes into bytes, and popcount for binary codes."""

from __future__ import annotations

from functools import cache

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit codes (last dimension) into uint8 bytes, first code in the highest bits.

    ``bits`` is 1, 2 or 4; codes lie in ``[-2**(bits-1), 2**(bits-1) - 1]`` (for 1 bit: 0 or 1, used as is).
    The last dimension is zero-padded to a whole number of bytes, as ``numpy.packbits`` does for 1 bit.
    """
    per_byte = 8 // bits
    offset = 0 if bits == 1 else 2 ** (bits - 1)
    unsigned = (codes.to(torch.int16) + offset).to(torch.uint8)
    padding = -unsigned.shape[-1] % per_byte
    unsigned = torch.nn.functional.pad(unsigned, (0, padding))
    groups = unsigned.reshape(*unsigned.shape[:-1], unsigned.shape[-1] // per_byte, per_byte)  # 0 rows too
    shifts = torch.arange(per_byte - 1, -1, -1, device=codes.device, dtype=torch.uint8) * bits
    return (groups << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dimension: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of the first ``dimension`` positions."""
    per_byte = 8 // bits
    offset = 0 if bits == 1 else 2 ** (bits - 1)
    shifts = torch.arange(per_byte - 1, -1, -1, device=packed.device, dtype=torch.uint8) * bits
    unsigned = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    unsigned = unsigned.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :dimension]
    return (unsigned.to(torch.int16) - offset).to(torch.int8)


@cache
def byte_codes(bits: int) -> torch.Tensor:
    """The codes :func:`unpack_codes` gives for each of the 256 bytes, int8 ``[256, 8 // bits]``: a lookup table that
    unpacks a byte in one gather."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8)[:, None], bits, 8 // bits)


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.uint8)


def hamming_distance(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances between packed bit codes: ``[Q, B]`` x ``[N, B]`` -> ``[Q, N]`` int32."""
    queries, documents = queries.view(torch.uint8), documents.view(torch.uint8)
    popcount = _POPCOUNT.to(queries.device)
    differing = torch.bitwise_xor(queries.unsqueeze(1), documents.unsqueeze(0))
    return popcount[differing.long()].sum(dim=-1, dtype=torch.int32)
