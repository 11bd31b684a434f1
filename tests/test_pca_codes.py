from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.util import quantize_embeddings

from st_bitembed import Quantize
from st_bitembed.pca_codes import MAX_COMPONENT_BITS, PCACodes

DIMENSION = 32


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    """3,000 unit vectors whose coordinates' spreads fall from 3 to 0.1 (real embeddings' are as unequal), in a random
    basis, around a mean (as real embeddings share a direction), with 4 directions of no variance at all."""
    generator = torch.Generator().manual_seed(0)
    spreads = torch.linspace(3.0, 0.1, DIMENSION)
    spreads[-4:] = 0
    rotation = torch.linalg.qr(torch.randn(DIMENSION, DIMENSION, generator=generator))[0]
    values = (torch.randn(3000, DIMENSION, generator=generator) * spreads + 2.0 * (spreads > 0)) @ rotation
    return F.normalize(values, dim=-1).numpy()


def test_codes_stand_for_the_level_of_each_component_their_cell_holds(corpus):
    codes = PCACodes.fit(corpus[:2000], bits_per_dimension=4)
    packed = codes.encode(corpus)
    assert packed.dtype == np.uint8 and packed.shape == (len(corpus), codes.bytes_per_vector)
    # The uniform midrise quantizer of each component, written out from the fitted mean, basis, widths and steps.
    components = (corpus.astype(np.float64) - codes.mean) @ codes.basis
    lowest, highest = -(2.0 ** (codes.widths - 1)), 2.0 ** (codes.widths - 1) - 1
    cells = np.clip(np.floor(components / codes.steps), lowest, highest)
    expected = np.where(codes.widths > 0, (cells + 0.5) * codes.steps, 0) + codes.mean @ codes.basis
    np.testing.assert_allclose(codes.components(packed), expected, atol=1e-6)
    np.testing.assert_allclose(codes.decode(packed), expected @ codes.basis.T, atol=1e-5)


def test_packed_layout_is_bit_planes_of_each_width_widest_first():
    # Widths 3, 3, 2, 0; identity basis, zero mean, unit steps: codes floor(x) + 2^(width - 1).
    codes = PCACodes(np.zeros(4), np.eye(4), np.array([3, 3, 2, 0]), np.ones(4))
    packed = codes.encode(np.array([[1.2, -2.5, 0.3, 5.0]]))
    # Unsigned codes 5 (101), 1 (001) and 2 (10); planes: top bits 1 0, middle 0 0, low 1 1, then 1, then 0.
    assert packed.tolist() == [[0b10001110]]
    np.testing.assert_allclose(codes.components(packed), [[1.5, -2.5, 0.5, 0.0]])
    # Out of range: the outer levels.
    np.testing.assert_allclose(codes.components(codes.encode(np.array([[9.0, -9.0, 9.0, 0.0]]))),
                               [[3.5, -3.5, 1.5, 0.0]])  # fmt: skip


def test_codes_of_every_width_up_to_the_widest_unpack_to_their_levels():
    # Identity basis, zero mean, unit steps: the level of x is floor(x) + 0.5 within +-2^(width - 1).
    widths = np.array([MAX_COMPONENT_BITS, 9, 9, 8, 5, 1, 0])
    codes = PCACodes(np.zeros(7), np.eye(7), widths, np.ones(7))
    values = np.random.default_rng(0).uniform(-1.2, 1.2, (50, 7)) * 2.0 ** np.maximum(widths - 1, 0)
    limit = 2.0 ** (widths - 1)
    expected = np.where(widths > 0, np.clip(np.floor(values), -limit, limit - 1) + 0.5, 0.0)
    np.testing.assert_array_equal(codes.components(codes.encode(values)), expected)


def test_bits_go_where_a_query_score_depends_on_them(corpus):
    codes = PCACodes.fit(corpus, bits_per_dimension=3)
    assert codes.total_bits == 3 * DIMENSION and codes.bytes_per_vector == 3 * DIMENSION // 8
    variances = np.var((corpus - codes.mean) @ codes.basis, axis=0)
    assert (codes.widths[variances < 1e-10] == 0).all() and (variances < 1e-10).sum() == 4
    # A query's score moves by its component times the error: the weight of a component's squared error is the
    # mean square of queries (as the corpus) along it; more weighted variance, at least as many bits.
    weights = variances * (variances + (codes.mean @ codes.basis) ** 2)
    assert (np.diff(codes.widths[np.argsort(-weights, kind="stable")]) <= 0).all()
    assert codes.widths.max() > 3 + 1 and codes.widths.max() <= MAX_COMPONENT_BITS
    # Bits that cannot be spent (every component with variance at its widest) are not.
    assert (
        PCACodes.fit(corpus, bits_per_dimension=MAX_COMPONENT_BITS).total_bits == (DIMENSION - 4) * MAX_COMPONENT_BITS
    )
    odd = PCACodes.fit(corpus, bits_per_dimension=2.3)
    assert odd.total_bits == round(2.3 * DIMENSION) and odd.bytes_per_vector == math.ceil(round(2.3 * DIMENSION) / 8)


def recall_at_10(scores: np.ndarray, exact: np.ndarray) -> float:
    found = np.argsort(-scores, axis=1)[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))


def test_at_four_bits_they_rank_better_than_int4_codes_of_the_same_bytes(corpus):
    queries, documents = corpus[:200], corpus[200:]
    exact = np.argsort(-(queries @ documents.T), axis=1)[:, :10]
    codes = PCACodes.fit(documents, bits_per_dimension=4)
    rescoring = (
        codes.rescoring_queries(torch.from_numpy(queries)) @ codes.rescoring_documents(codes.encode(documents)).T
    )
    head = Quantize(DIMENSION, nested=True)
    head.calibrate(torch.from_numpy(documents))  # on the corpus too: the same chance
    int4 = F.normalize(head.dequantize(head.quantize(torch.from_numpy(documents), "int4"), "int4"), dim=-1)
    assert codes.bytes_per_vector == head.bytes_per_vector("int4")
    pca_recall, int4_recall = recall_at_10(rescoring.numpy(), exact), recall_at_10(queries @ int4.numpy().T, exact)
    assert pca_recall > int4_recall + 0.05, (pca_recall, int4_recall)
    # The rescoring vectors are the decoded embeddings in the principal basis: the same dot products.
    decoded = F.normalize(torch.from_numpy(codes.decode(codes.encode(documents))), dim=-1)
    np.testing.assert_allclose(rescoring.numpy(), queries @ decoded.numpy().T, atol=1e-5)


def packed_signs(values: np.ndarray) -> list[list[int]]:
    return [[int("".join("1" if v >= 0 else "0" for v in row[i : i + 8]), 2) for i in range(0, row.size, 8)]
            for row in values]  # fmt: skip


def test_sign_bits_are_those_of_the_decoded_embeddings_in_the_binary_rotation(corpus):
    codes = PCACodes.fit(corpus, bits_per_dimension=4)
    packed = codes.encode(corpus[:50])
    decoded = codes.decode(packed)
    expected = packed_signs(decoded.astype(np.float64) @ codes.binary_rotation)
    assert codes.sign_bits(packed).tolist() == expected
    assert codes.query_bits(torch.from_numpy(decoded)).tolist() == expected
    # Without a rotation: sentence-transformers' binary codes of the decoded embeddings.
    plain = PCACodes(codes.mean, codes.basis, codes.widths, codes.steps)
    assert plain.sign_bits(packed).tolist() == quantize_embeddings(decoded, "ubinary").tolist()


def test_binary_rotation_is_orthogonal_and_loses_less_to_sign_bits_than_the_coordinates(corpus):
    rotation = PCACodes.fit(corpus, bits_per_dimension=4).binary_rotation.astype(np.float64)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(DIMENSION), atol=1e-5)

    def sign_loss(values: np.ndarray) -> float:  # ITQ's objective: how far the values are from their sign bits
        return float(np.square(np.sign(values) - values).sum())

    scale = np.sqrt(DIMENSION)  # unit vectors' coordinates scaled to +-1 on average, as sign bits
    assert sign_loss(corpus @ rotation * scale) < 0.9 * sign_loss(corpus * scale)


def test_saved_codes_load_as_they_were(corpus, tmp_path):
    codes = PCACodes.fit(corpus, bits_per_dimension=4)
    codes.save(tmp_path / "codes")
    loaded = PCACodes.load(tmp_path / "codes")
    np.testing.assert_array_equal(loaded.encode(corpus), codes.encode(corpus))
    np.testing.assert_array_equal(loaded.widths, codes.widths)


def test_bad_input_is_refused_with_what_to_do(corpus):
    with pytest.raises(ValueError, match="at least as many as dimensions"):
        PCACodes.fit(corpus[:10])
    broken = corpus.copy()
    broken[3, 2] = np.nan
    with pytest.raises(ValueError, match="finite embeddings"):
        PCACodes.fit(broken)
    with pytest.raises(ValueError, match="bits_per_dimension must lie"):
        PCACodes.fit(corpus, bits_per_dimension=0)
    with pytest.raises(ValueError, match="not increasing"):
        PCACodes(np.zeros(4), np.eye(4), np.array([2, 3, 2, 0]), np.ones(4))
    codes = PCACodes.fit(corpus, bits_per_dimension=4)
    with pytest.raises(ValueError, match=rf"Expected embeddings \[N, {DIMENSION}\]"):
        codes.encode(corpus[:, :16])
    with pytest.raises(ValueError, match="NaN or infinite"):
        codes.encode(broken)
    with pytest.raises(ValueError, match="Expected packed PCA codes"):
        codes.components(codes.encode(corpus)[:, :-1])
