from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.util import semantic_search

from st_bitembed import Quantize
from st_bitembed.search import quantized_semantic_search, quantized_similarity

DIMENSION = 64
SEARCH_PRECISIONS = ["float16", "bfloat16", "int8", "uint8", "int4", "int2", "binary", "ubinary"]


@pytest.fixture(scope="module")
def easy_corpus() -> tuple[torch.Tensor, torch.Tensor, Quantize]:
    """400 random unit documents; each query is a slightly perturbed copy of document 3 * i."""
    generator = torch.Generator().manual_seed(0)
    corpus = F.normalize(torch.randn(400, DIMENSION, generator=generator), dim=-1)
    queries = F.normalize(corpus[::3][:50] + 0.05 * torch.randn(50, DIMENSION, generator=generator), dim=-1)
    return queries, corpus, Quantize(DIMENSION)


@pytest.mark.parametrize("precision", SEARCH_PRECISIONS)
def test_symmetric_and_asymmetric_search_find_the_float_top_hit(easy_corpus, precision):
    queries, corpus, head = easy_corpus
    expected = [hits[0]["corpus_id"] for hits in semantic_search(queries, corpus, top_k=1)]
    assert expected == list(range(0, 150, 3))
    corpus_codes = head.quantize(corpus, precision, pack=True)
    for query_input in (queries, head.quantize(queries, precision, pack=True)):  # asymmetric, then symmetric
        results = quantized_semantic_search(query_input, corpus_codes, precision, head, top_k=5)
        assert [hits[0]["corpus_id"] for hits in results] == expected


@pytest.mark.parametrize("precision", ["int4", "int2", "binary"])
def test_chunked_search_equals_unchunked(easy_corpus, precision):
    queries, corpus, head = easy_corpus
    corpus_codes = head.quantize(corpus, precision, pack=True)
    for query_input in (queries, head.quantize(queries, precision, pack=True)):
        whole = quantized_semantic_search(query_input, corpus_codes, precision, head, top_k=10)
        chunked = quantized_semantic_search(query_input, corpus_codes, precision, head, top_k=10, corpus_chunk_size=37)
        assert [[h["corpus_id"] for h in hits] for hits in whole] == [
            [h["corpus_id"] for h in hits] for hits in chunked
        ]


def test_binary_symmetric_similarity_is_popcount_hamming(easy_corpus):
    queries, corpus, head = easy_corpus
    similarity = quantized_similarity(
        head.quantize(queries, "binary"), head.quantize(corpus, "binary"), "binary", head
    )
    signs_q, signs_c = torch.sign(queries), torch.sign(corpus)
    torch.testing.assert_close(similarity, signs_q @ signs_c.T / DIMENSION)


@pytest.mark.parametrize("backend", ["faiss", "usearch"])
def test_binary_corpus_through_sentence_transformers_indexes(easy_corpus, backend):
    pytest.importorskip("faiss" if backend == "faiss" else "usearch")
    queries, corpus, head = easy_corpus
    corpus_codes = head.quantize(corpus, "ubinary")
    expected = quantized_semantic_search(queries, corpus_codes, "ubinary", head, top_k=1)
    results = quantized_semantic_search(
        queries.numpy(), corpus_codes.numpy(), "ubinary", head, top_k=1, backend=backend
    )
    assert [hits[0]["corpus_id"] for hits in results] == [hits[0]["corpus_id"] for hits in expected]
    with pytest.raises(ValueError, match="use backend='torch' for 'int4'"):
        quantized_semantic_search(queries, head.quantize(corpus, "int4"), "int4", head, backend=backend)
