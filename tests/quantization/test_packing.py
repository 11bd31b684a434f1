from __future__ import annotations

import pytest
import torch

from st_bitembed.quantization.packing import hamming_distance, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("dimension", [64, 37])
def test_pack_unpack_round_trips_exactly(bits, dimension):
    low = 0 if bits == 1 else -(2 ** (bits - 1))
    high = 1 if bits == 1 else 2 ** (bits - 1) - 1
    codes = torch.randint(low, high + 1, (5, dimension), dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-dimension * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, dimension), codes)


def test_hamming_distance_counts_differing_bits_of_packed_codes():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(0, 2, (3, 45), generator=generator, dtype=torch.int8)
    documents = torch.randint(0, 2, (5, 45), generator=generator, dtype=torch.int8)
    expected = (queries.unsqueeze(1) != documents.unsqueeze(0)).sum(dim=-1)
    distances = hamming_distance(pack_codes(queries, bits=1), pack_codes(documents, bits=1))
    assert distances.dtype == torch.int32 and torch.equal(distances, expected.int())
