"""Similarity and semantic search over quantized embeddings, without expanding a whole corpus to float32."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from st_bitembed.modules.quantize import Quantize
from st_bitembed.precisions import Precision, PrecisionName, get_precision, to_unsigned
from st_bitembed.quantization.packing import hamming_distance

# Bytes of XOR intermediate allowed per block in popcount Hamming search.
_HAMMING_BLOCK_BYTES = 2**25


def _as_tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values) if isinstance(values, np.ndarray) else values


def quantized_similarity(
    queries: torch.Tensor | np.ndarray,
    documents: torch.Tensor | np.ndarray,
    precision: PrecisionName | Precision,
    quantizer: Quantize,
    dimension: int | None = None,
) -> torch.Tensor:
    """Cosine similarity ``[Q, N]`` between queries and documents stored at ``precision``.

    Symmetric when ``queries`` are codes of the same precision (binary: ``1 - 2 * hamming / dim`` from popcount,
    exactly the cosine of the +-1 vectors); asymmetric when ``queries`` are float embeddings (float query against
    dequantized documents, the more accurate choice when queries are encoded on the fly).

    Args:
        queries: Float embeddings ``[Q, dim]`` or codes at ``precision`` as returned by ``BitEmbed.encode``.
        documents: Codes ``[N, ...]`` at ``precision`` (packed or not).
        precision: One of :data:`st_bitembed.PRECISIONS`.
        quantizer: The model's Quantize head (``model.quantizer``), which defines what codes stand for.
        dimension: Embedding dimension, for packed codes of a truncated model; defaults to the head's.
    """
    precision = get_precision(precision)
    queries, documents = _as_tensor(queries), _as_tensor(documents)
    dimension = dimension or quantizer.embedding_dimension
    symmetric = not queries.is_floating_point() or precision.is_float
    if symmetric and precision.is_binary:
        per_block = max(1, _HAMMING_BLOCK_BYTES // max(1, documents.shape[0] * documents.shape[1]))
        distances = torch.cat([hamming_distance(block, documents) for block in queries.split(per_block)])
        return 1 - 2 * distances.float() / dimension
    query_vectors = quantizer.dequantize(queries, precision, dimension) if symmetric else queries.float()
    document_vectors = quantizer.dequantize(documents, precision, dimension)
    return F.normalize(query_vectors, dim=-1) @ F.normalize(document_vectors, dim=-1).T


def quantized_semantic_search(
    queries: torch.Tensor | np.ndarray,
    corpus: torch.Tensor | np.ndarray,
    precision: PrecisionName | Precision,
    quantizer: Quantize,
    top_k: int = 10,
    corpus_chunk_size: int = 50_000,
    dimension: int | None = None,
    backend: Literal["torch", "faiss", "usearch"] = "torch",
) -> list[list[dict[str, int | float]]]:
    """Top-``top_k`` corpus entries per query over a corpus stored at ``precision``, in the format of
    ``sentence_transformers.util.semantic_search``: one list per query of ``{"corpus_id", "score"}``, best first.

    The corpus is scored ``corpus_chunk_size`` rows at a time (only one chunk is ever dequantized), and a running
    top-k is merged across chunks, so chunked and unchunked searches return the same hits.

    Args:
        queries: Float embeddings (asymmetric search) or codes at ``precision`` (symmetric search).
        corpus: Codes at ``precision``, e.g. ``model.encode(documents, precision="int4", pack=True)``.
        precision: One of :data:`st_bitembed.PRECISIONS`.
        quantizer: The model's Quantize head (``model.quantizer``).
        top_k: Hits per query.
        corpus_chunk_size: Corpus rows scored at a time.
        dimension: Embedding dimension, for packed codes of a truncated model; defaults to the head's.
        backend: ``"torch"`` (any precision), or for binary / ubinary corpora sentence-transformers'
            ``semantic_search_faiss`` / ``semantic_search_usearch`` (Hamming indexes; float queries are rescored).
    """
    precision = get_precision(precision)
    if backend != "torch":
        return _search_binary_index(queries, corpus, precision, top_k, backend)
    queries, corpus = _as_tensor(queries), _as_tensor(corpus)
    scores = torch.empty(queries.shape[0], 0)
    indices = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, corpus.shape[0], corpus_chunk_size):
        chunk_scores = quantized_similarity(
            queries, corpus[start : start + corpus_chunk_size], precision, quantizer, dimension
        )
        # Stable sorts: on equal scores (common with int2 / binary codes) the lower corpus id wins, in any chunking.
        chunk_scores, chunk_indices = chunk_scores.cpu().sort(dim=1, descending=True, stable=True)
        scores = torch.cat([scores, chunk_scores[:, :top_k]], dim=1)
        indices = torch.cat([indices, chunk_indices[:, :top_k] + start], dim=1)
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        scores, indices = scores[:, :top_k], indices.gather(1, order)[:, :top_k]
    return [
        [{"corpus_id": int(i), "score": float(s)} for s, i in zip(query_scores, query_indices)]
        for query_scores, query_indices in zip(scores.tolist(), indices.tolist())
    ]


def _search_binary_index(
    queries: torch.Tensor | np.ndarray,
    corpus: torch.Tensor | np.ndarray,
    precision: Precision,
    top_k: int,
    backend: str,
) -> list[list[dict[str, int | float]]]:
    if not precision.is_binary:
        raise ValueError(
            f"backend={backend!r} searches binary / ubinary corpora (its native Hamming index); use backend='torch' "
            f"for {precision.name!r}."
        )
    from sentence_transformers.util.quantization import semantic_search_faiss, semantic_search_usearch

    # Our binary codes are sentence-transformers' layout, so its indexes take them as they are (as ubinary bytes).
    corpus = np.asarray(corpus) if precision.unsigned else to_unsigned(np.asarray(corpus))
    queries = np.asarray(queries)
    if not np.issubdtype(queries.dtype, np.floating) and not precision.unsigned:
        queries = to_unsigned(queries)
    search = semantic_search_faiss if backend == "faiss" else semantic_search_usearch
    results, *_ = search(
        queries,
        corpus_embeddings=corpus,
        corpus_precision="ubinary",
        top_k=top_k,
        rescore=np.issubdtype(queries.dtype, np.floating),
    )
    return results
