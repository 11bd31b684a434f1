from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from st_bitembed import Quantize
from st_bitembed.index import STORE_FILE, NestedCodeIndex
from st_bitembed.pca_codes import PCACodes
from st_bitembed.search import quantized_semantic_search

DIMENSION = 64


@pytest.fixture(scope="module")
def corpus_and_head() -> tuple[torch.Tensor, torch.Tensor, Quantize]:
    """500 random unit documents, 40 queries near documents 7 * i, and a nested head calibrated on the corpus."""
    generator = torch.Generator().manual_seed(0)
    corpus = F.normalize(torch.randn(500, DIMENSION, generator=generator), dim=-1)
    queries = F.normalize(corpus[::7][:40] + 0.3 * torch.randn(40, DIMENSION, generator=generator), dim=-1)
    head = Quantize(DIMENSION, nested=True)
    head.calibrate(corpus)
    return queries, corpus, head


def ids(results: list[list[dict]]) -> list[list[int]]:
    return [[hit["corpus_id"] for hit in hits] for hits in results]


def backends() -> list[str]:
    available = ["torch"]
    for backend in ("faiss", "usearch"):
        try:
            __import__(backend)
            available.append(backend)
        except ImportError:
            pass
    return available


@pytest.mark.parametrize("store_precision", ["int8", "int4"])
@pytest.mark.parametrize("backend", backends())
def test_rescoring_every_candidate_equals_searching_the_store_directly(corpus_and_head, store_precision, backend):
    queries, corpus, head = corpus_and_head
    codes = head.quantize(corpus, store_precision, pack=True)
    index = NestedCodeIndex(head, store_precision, backend=backend)
    index.add(codes[:123])  # in chunks
    index.add(codes[123:])
    # Enough candidates to cover the corpus: the binary first pass then drops nothing.
    found = index.search(queries, top_k=10, rescore_multiplier=50)
    expected = quantized_semantic_search(queries, codes, store_precision, head, top_k=10)
    assert ids(found) == ids(expected)
    np.testing.assert_allclose(
        [[h["score"] for h in hits] for hits in found], [[h["score"] for h in hits] for hits in expected], atol=1e-6
    )


@pytest.mark.parametrize("backend", backends())
def test_first_pass_alone_is_the_hamming_search_of_the_truncated_codes(corpus_and_head, backend):
    queries, corpus, head = corpus_and_head
    index = NestedCodeIndex(head, "int4", backend=backend)
    index.add(head.quantize(corpus, "int4", pack=True))
    found = index.search(queries, top_k=5, rescore_multiplier=0)
    expected = quantized_semantic_search(
        head.quantize(queries, "ubinary"), head.quantize(corpus, "ubinary"), "ubinary", head, top_k=5
    )
    # Equal distances may come in another order from another backend: compare the scores, and the ids where unique.
    np.testing.assert_allclose(
        [[h["score"] for h in hits] for hits in found], [[h["score"] for h in hits] for hits in expected]
    )
    for found_hits, expected_hits in zip(found, expected):
        last = expected_hits[-1]["score"]
        assert {h["corpus_id"] for h in found_hits if h["score"] > last} == {
            h["corpus_id"] for h in expected_hits if h["score"] > last
        }


def test_code_queries_are_rescored_from_their_dequantized_values(corpus_and_head):
    queries, corpus, head = corpus_and_head
    index = NestedCodeIndex(head, "int8", backend="torch")
    index.add(head.quantize(corpus, "int8"))
    query_codes = head.quantize(queries, "int8")
    found = index.search(query_codes, top_k=10, rescore_multiplier=50)
    expected = quantized_semantic_search(query_codes, head.quantize(corpus, "int8"), "int8", head, top_k=10)
    assert ids(found) == ids(expected)


def test_binary_first_pass_then_rescoring_recovers_float_search(corpus_and_head):
    queries, corpus, head = corpus_and_head
    index = NestedCodeIndex(head, "int4", backend="torch")
    index.add(head.quantize(corpus, "int4", pack=True))
    float_top = (queries @ corpus.T).topk(10).indices.tolist()
    recall = {}
    for multiplier in (1, 4, 16):  # 1: the first pass's top 10, reordered
        found = ids(index.search(queries, top_k=10, rescore_multiplier=multiplier))
        recall[multiplier] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, float_top)])
    assert recall[1] < recall[4] < recall[16] and recall[16] > 0.8  # 64 random dimensions: a weak first pass


def test_on_disk_index_is_written_as_it_grows_and_loads_memory_mapped(corpus_and_head, tmp_path):
    queries, corpus, head = corpus_and_head
    codes = head.quantize(corpus, "int4", pack=True)
    index = NestedCodeIndex(head, "int4", path=tmp_path / "index", backend="torch")
    for start in range(0, len(codes), 200):
        index.add(codes[start : start + 200].numpy())
    assert (tmp_path / "index" / STORE_FILE).stat().st_size == len(corpus) * DIMENSION // 2
    with pytest.raises(FileNotFoundError, match="not a saved NestedCodeIndex"):
        NestedCodeIndex.load(tmp_path / "index")
    index.save()
    loaded = NestedCodeIndex.load(tmp_path / "index", backend="torch")
    assert isinstance(loaded._store(), np.memmap) and loaded.count == len(corpus)
    assert ids(loaded.search(queries, top_k=10)) == ids(index.search(queries, top_k=10))
    with pytest.raises(FileExistsError, match="already holds an index"):
        NestedCodeIndex(head, "int4", path=tmp_path / "index")
    loaded.add(codes[:5])  # added, not saved: the description no longer matches the store
    with pytest.raises(ValueError, match="not saved after its last"):
        NestedCodeIndex.load(tmp_path / "index")


def test_in_memory_index_saves_to_a_folder(corpus_and_head, tmp_path):
    queries, corpus, head = corpus_and_head
    index = NestedCodeIndex(head, "int8", backend="torch")
    index.add(head.quantize(corpus, "int8"))
    index.save(tmp_path / "saved")
    loaded = NestedCodeIndex.load(tmp_path / "saved", backend="torch")
    assert ids(loaded.search(queries, top_k=10)) == ids(index.search(queries, top_k=10))
    with pytest.raises(FileExistsError):
        index.save(tmp_path / "saved")


def test_bad_heads_and_codes_are_refused(corpus_and_head):
    _, corpus, head = corpus_and_head
    with pytest.raises(ValueError, match="needs a nested Quantize head"):
        NestedCodeIndex(Quantize(DIMENSION))
    with pytest.raises(ValueError, match="holds int8 or int4"):
        NestedCodeIndex(head, "int2")
    index = NestedCodeIndex(head, "int4", backend="torch")
    with pytest.raises(ValueError, match="Expected int4 codes"):
        index.add(head.quantize(corpus, "int4"))  # unpacked


def graph_backends() -> list[str]:
    return [backend for backend in backends() if backend != "torch"]


@pytest.mark.parametrize("backend", graph_backends())
def test_hnsw_first_pass_finds_the_exact_scans_candidates(corpus_and_head, backend):
    queries, corpus, head = corpus_and_head
    codes = head.quantize(corpus, "int4", pack=True)
    exact = NestedCodeIndex(head, "int4", backend=backend)
    graph = NestedCodeIndex(head, "int4", backend=backend, exact=False)
    exact.add(codes)
    graph.add(codes)
    # Exploring the whole graph, its 40 nearest codes are never nearer than the scan's and as near but for a rare
    # code out of reach (usearch's graph, built by several threads); ids differ among equal distances (64 bits leave
    # many ties). The default exploration (the candidates) is approximate, nearly as near.
    scores = [[[h["score"] for h in hits] for hits in result] for result in (
        exact.search(queries, top_k=40, rescore_multiplier=0),
        graph.search(queries, top_k=40, rescore_multiplier=0, ef_search=len(corpus)),
        graph.search(queries, top_k=40, rescore_multiplier=0),
    )]  # fmt: skip
    expected, explored, approximate = (np.array(result) for result in scores)
    assert (explored <= expected + 1e-6).all() and explored.mean() > expected.mean() - 0.002
    assert approximate.mean() > expected.mean() - 0.02

    # A graph search may find fewer codes than asked (asked for more than there are; usearch's graph may also leave
    # a few out of reach): the rest comes as id -1, which the rescoring leaves out.
    distances, found_ids = graph._first_pass.search(head.quantize(queries[:3], "ubinary").numpy(), len(corpus) + 20)
    assert (found_ids[:, -20:] == -1).all()
    for row in found_ids:
        found = row[row >= 0]
        assert len(found) >= 0.9 * len(corpus) and len(found.unique()) == len(found) and found.max() < len(corpus)


@pytest.mark.parametrize("backend", graph_backends())
def test_hnsw_first_pass_is_saved_and_read_back(corpus_and_head, tmp_path, backend):
    queries, corpus, head = corpus_and_head
    index = NestedCodeIndex(head, "int8", path=tmp_path / "index", backend=backend, exact=False)
    index.add(head.quantize(corpus, "int8"))
    index.save()
    graph_file = tmp_path / "index" / f"first_pass.{backend}"
    assert graph_file.is_file()
    loaded = NestedCodeIndex.load(tmp_path / "index", backend=backend)
    assert not loaded.exact and loaded.count == len(corpus)
    assert ids(loaded.search(queries, top_k=10, rescore_multiplier=2)) == ids(
        index.search(queries, top_k=10, rescore_multiplier=2)
    )
    # Asked for an exact first pass, the same folder scans the store: the graph is not used.
    scanned = NestedCodeIndex.load(tmp_path / "index", backend=backend, exact=True)
    expected = quantized_semantic_search(queries, head.quantize(corpus, "int8"), "int8", head, top_k=10)
    assert ids(scanned.search(queries, top_k=10, rescore_multiplier=50)) == ids(expected)
    # A graph over another number of codes than the store's is refused, naming the file.
    other = NestedCodeIndex(head, "int8", backend=backend, exact=False)
    other.add(head.quantize(corpus[:100], "int8"))
    other._first_pass.save(graph_file)
    with pytest.raises(ValueError, match="first pass over 100 codes"):
        NestedCodeIndex.load(tmp_path / "index", backend=backend)


def test_torch_has_no_hnsw_first_pass(corpus_and_head):
    with pytest.raises(ValueError, match="HNSW needs faiss or usearch"):
        NestedCodeIndex(corpus_and_head[2], "int4", backend="torch", exact=False)


faiss_only = pytest.mark.skipif("faiss" not in backends(), reason="inverted lists are faiss's (pip install faiss-cpu)")


def hamming_scores(results: list[list[dict]]) -> np.ndarray:
    return np.array([[hit["score"] for hit in hits] for hits in results])


@faiss_only
def test_inverted_lists_train_on_the_whole_store_and_scan_their_probed_clusters(corpus_and_head, capfd):
    queries, corpus, head = corpus_and_head
    codes = head.quantize(corpus, "int4", pack=True)
    scan = NestedCodeIndex(head, "int4")
    lists = NestedCodeIndex(head, "int4", exact=False, clusters=20)
    for start in range(0, len(codes), 100):  # in chunks, the first too small to train 20 clusters on
        scan.add(codes[start : start + 100])
        lists.add(codes[start : start + 100])
    assert lists._first_pass.needs_training  # not trained on the first chunk: on the whole store, at first search
    expected = hamming_scores(scan.search(queries, top_k=40, rescore_multiplier=0))
    # Every cluster probed is a scan: the same Hamming distances (ids differ among equal ones: 64 bits leave ties).
    every = hamming_scores(lists.search(queries, top_k=40, rescore_multiplier=0, probes=20))
    np.testing.assert_allclose(every, expected)
    assert lists._first_pass._index.ntotal == len(corpus)
    rescored = lists.search(queries, top_k=10, rescore_multiplier=50, probes=20)
    assert ids(rescored) == ids(quantized_semantic_search(queries, codes, "int4", head, top_k=10))
    # Fewer clusters: approximate, never nearer than the scan, nearer the more are probed (random codes have no
    # clusters to speak of: real embeddings lose far less, README).
    few, more = (hamming_scores(lists.search(queries, top_k=40, rescore_multiplier=0, probes=n)) for n in (4, 10))
    assert (few <= expected + 1e-6).all() and (more <= expected + 1e-6).all()
    assert few.mean() < more.mean() < expected.mean()
    lists.add(codes[:10])  # once trained, codes join the lists
    assert lists._first_pass._index.ntotal == lists.count == len(corpus) + 10
    assert capfd.readouterr().err == ""  # 25 codes per cluster: faiss would warn on stderr


@faiss_only
def test_inverted_lists_are_saved_read_back_and_smaller_than_a_graph(corpus_and_head, tmp_path):
    queries, corpus, head = corpus_and_head
    codes = head.quantize(corpus, "int8")
    index = NestedCodeIndex(head, "int8", path=tmp_path / "index", exact=False, clusters=16)
    index.add(codes)
    index.save()  # trains the lists
    assert (tmp_path / "index" / "first_pass.faiss").is_file()
    loaded = NestedCodeIndex.load(tmp_path / "index")
    assert (loaded.exact, loaded.clusters) == (False, 16) and not loaded._first_pass.needs_training
    assert ids(loaded.search(queries, top_k=10, probes=3)) == ids(index.search(queries, top_k=10, probes=3))
    # Asked for a graph, the same folder builds one from the store (the lists are not read as one).
    graph = NestedCodeIndex.load(tmp_path / "index", exact=False)
    assert graph.clusters is None and graph._first_pass._index.ntotal == len(corpus)
    # Each code (8 bytes at 64 dimensions) with its 8-byte id, and the centroids: less than the graph's links.
    assert 16 <= loaded.first_pass_bytes_per_vector < 18 < graph.first_pass_bytes_per_vector


def test_inverted_lists_need_faiss_an_approximate_first_pass_and_enough_codes(corpus_and_head, tmp_path):
    queries, corpus, head = corpus_and_head
    with pytest.raises(ValueError, match="clusters=8 asks for inverted lists"):
        NestedCodeIndex(head, "int4", exact=True, clusters=8)
    with pytest.raises(ValueError, match="clusters=8 asks for inverted lists"):
        NestedCodeIndex(head, "int4", backend="torch", clusters=8)
    if "faiss" in backends():
        index = NestedCodeIndex(head, "int4", exact=False, clusters=100)
        index.add(head.quantize(corpus[:50], "int4", pack=True))
        index.save(tmp_path / "early")  # a checkpoint of a growing index: saved without lists, trained later
        assert not (tmp_path / "early" / "first_pass.faiss").exists()
        with pytest.raises(ValueError, match="need at least as many codes, and the index holds 50"):
            index.search(queries)
        loaded = NestedCodeIndex.load(tmp_path / "early")
        loaded.add(head.quantize(corpus[50:], "int4", pack=True))
        assert ids(loaded.search(queries, top_k=10, rescore_multiplier=50, probes=100)) == ids(
            quantized_semantic_search(queries, head.quantize(corpus, "int4", pack=True), "int4", head, top_k=10)
        )


@pytest.fixture(scope="module")
def pca_corpus() -> tuple[torch.Tensor, np.ndarray, PCACodes]:
    """40 queries and 500 unit documents of unequal spreads (as real embeddings), and PCA codes fitted on them."""
    generator = torch.Generator().manual_seed(1)
    corpus = F.normalize(torch.randn(540, DIMENSION, generator=generator) * torch.linspace(3, 0.1, DIMENSION), dim=-1)
    return corpus[:40], corpus[40:].numpy(), PCACodes.fit(corpus[40:], bits_per_dimension=4)


@pytest.mark.parametrize("backend", backends())
def test_pca_store_rescores_the_vectors_its_codes_stand_for(pca_corpus, backend):
    queries, corpus, codes = pca_corpus
    index = NestedCodeIndex(codes, backend=backend)
    index.add(corpus[:123])  # float embeddings, coded by the index, in chunks
    index.add(torch.from_numpy(codes.encode(corpus[123:])))  # or codes
    np.testing.assert_array_equal(index._store(), codes.encode(corpus))
    assert index.bytes_per_vector == DIMENSION // 2
    decoded = F.normalize(torch.from_numpy(codes.decode(codes.encode(corpus))), dim=-1)
    expected = (F.normalize(queries, dim=-1) @ decoded.T).topk(10)
    found = index.search(queries, top_k=10, rescore_multiplier=50)  # every document a candidate
    assert ids(found) == expected.indices.tolist()
    np.testing.assert_allclose([[h["score"] for h in hits] for hits in found], expected.values, atol=1e-5)
    # The first pass alone: Hamming distances between the queries' sign bits and the decoded vectors'.
    first = index.search(queries, top_k=5, rescore_multiplier=0)
    rotation = torch.from_numpy(codes.binary_rotation)  # the sign bits are taken in the codes' binary rotation
    signs = (decoded @ rotation >= 0).float() * 2 - 1
    agreement = ((queries @ rotation >= 0).float() * 2 - 1) @ signs.T / DIMENSION  # 1 - 2 * hamming / dim
    np.testing.assert_allclose(hamming_scores(first), agreement.topk(5).values, atol=1e-6)


def test_pca_index_saves_and_loads_with_its_codes(pca_corpus, tmp_path):
    queries, corpus, codes = pca_corpus
    index = NestedCodeIndex(codes, path=tmp_path / "index", backend="torch")
    index.add(corpus)
    index.save()
    loaded = NestedCodeIndex.load(tmp_path / "index", backend="torch")
    assert isinstance(loaded.quantizer, PCACodes) and loaded.store_precision is None
    assert ids(loaded.search(queries, top_k=10)) == ids(index.search(queries, top_k=10))
    query_codes = codes.encode(queries)  # code queries: rescored from what they stand for
    assert ids(loaded.search(query_codes, top_k=10, rescore_multiplier=50)) == ids(
        index.search(codes.decode(query_codes), top_k=10, rescore_multiplier=50)
    )
    with pytest.raises(ValueError, match="PCA codes have their own bits"):
        NestedCodeIndex(codes, "int4")
    with pytest.raises(ValueError, match="Expected PCA codes"):
        index.add(np.zeros((2, DIMENSION), np.int8))
    with pytest.raises(ValueError, match=rf"Expected query embeddings \[Q, {DIMENSION}\]"):
        index.search(queries[:, :-8])


def test_an_index_saved_before_pca_codes_still_loads(corpus_and_head, tmp_path):
    queries, corpus, head = corpus_and_head
    index = NestedCodeIndex(head, "int4", path=tmp_path / "index", backend="torch")
    index.add(head.quantize(corpus, "int4", pack=True))
    index.save()
    description = json.loads((tmp_path / "index" / "index.json").read_text())
    del description["codes"]  # as written before
    (tmp_path / "index" / "index.json").write_text(json.dumps(description))
    loaded = NestedCodeIndex.load(tmp_path / "index", backend="torch")
    assert isinstance(loaded.quantizer, Quantize) and loaded.store_precision == "int4"
    assert ids(loaded.search(queries, top_k=10)) == ids(index.search(queries, top_k=10))
