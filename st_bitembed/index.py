"""One store, every precision: a search index over a nested Quantize head's codes (or PCA codes fitted to the
corpus), with a binary first pass in memory (an exact Hamming scan, or an approximate HNSW graph or inverted lists) and
rescoring from the stored codes (in memory, or memory-mapped from disk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from st_bitembed.modules.quantize import Quantize
from st_bitembed.pca_codes import PCACodes
from st_bitembed.precisions import PrecisionName
from st_bitembed.quantization.packing import hamming_distance

FirstPassBackend = Literal["faiss", "usearch", "torch"]
INDEX_FILE = "index.json"
STORE_FILE = "codes.bin"
HEAD_FOLDER = "quantize"
PCA_CODES_FOLDER = "pca_codes"
# An approximate first pass is saved beside the store (a graph takes minutes to build for millions of codes, inverted
# lists their k-means; a scan's codes are read back from the store in seconds).
GRAPH_FILES = {"faiss": "first_pass.faiss", "usearch": "first_pass.usearch"}
# Neighbours per node of the HNSW graph: sentence-transformers' approximate binary search uses 16 too.
HNSW_NEIGHBORS = 16
# Clusters an inverted-list first pass scans per query unless asked (search's ``probes``): with sqrt(N) clusters, 64
# scanned recalled within 0.001 of a scan on SciFact's real embeddings, and 6% of a 1M corpus is scanned per query
# (benchmarks/nested_search.py, README).
DEFAULT_PROBES = 64
# Codes per cluster the k-means of an inverted-list first pass is trained on (faiss's own cap: more are sampled down).
_TRAINING_CODES_PER_CLUSTER = 256
# Rows truncated, added or rescored at a time (bounded memory for corpora larger than it).
_ROWS_PER_BLOCK = 65_536
# Queries compared at a time by the torch first pass (its XOR intermediate is queries x corpus x bytes).
_QUERIES_PER_BLOCK = 8
_STORE_PRECISIONS = ("int8", "int4")


class StoreCodes(Protocol):
    """What the index reads of the codes it stores: a nested head's at one precision, or :class:`PCACodes`."""

    dimension: int
    bytes_per_vector: int

    def encode(self, embeddings: torch.Tensor) -> np.ndarray: ...

    def sign_bits(self, codes: np.ndarray) -> np.ndarray: ...

    def query_bits(self, queries: torch.Tensor) -> np.ndarray: ...

    def rescoring_documents(self, codes: np.ndarray) -> torch.Tensor: ...

    def rescoring_queries(self, queries: torch.Tensor) -> torch.Tensor: ...


class _HeadCodes:
    """A nested Quantize head's codes at one store precision (int8 unpacked, int4 packed), as the index reads them."""

    def __init__(self, head: Quantize, precision: PrecisionName) -> None:
        self.head, self.precision, self.dimension = head, precision, head.embedding_dimension
        self.bytes_per_vector = head.bytes_per_vector(precision)

    def encode(self, embeddings: torch.Tensor) -> np.ndarray:
        return self.head.quantize(embeddings, self.precision, pack=True).numpy()

    def sign_bits(self, codes: np.ndarray) -> np.ndarray:
        return self.head.truncate(codes, self.precision, "ubinary", dimension=self.dimension)

    def query_bits(self, queries: torch.Tensor) -> np.ndarray:
        return self.head.quantize(queries, "ubinary").numpy()

    def rescoring_documents(self, codes: np.ndarray) -> torch.Tensor:
        return F.normalize(self.head.dequantize(torch.from_numpy(codes), self.precision, self.dimension), dim=-1)

    def rescoring_queries(self, queries: torch.Tensor) -> torch.Tensor:
        return F.normalize(queries.float(), dim=-1)


class NestedCodeIndex:
    """Semantic search over one store of nested codes: a Hamming first pass on the binary codes (the top bit of every
    stored code), then rescoring of ``rescore_multiplier * top_k`` candidates from the stored codes themselves.

    sentence-transformers' own recipe (``semantic_search_faiss(..., corpus_precision="binary", rescore=True)``)
    keeps a binary index and, for accurate rescoring, a second copy of the corpus in int8 or float. With a nested
    head (:class:`~st_bitembed.modules.quantize.Quantize` with ``nested=True``) the binary codes are the top bit of
    the int8 / int4 codes, so the index keeps only the int8 or int4 store: the first pass is derived from it
    (:meth:`Quantize.truncate`), in memory (1 bit per dimension), and the rescoring reads the few candidate rows from
    the store, which may stay on disk (``path``: appended to by :meth:`add`, memory-mapped when searched).

    The first pass scans every binary code (``exact=True``: its candidates are the nearest in Hamming distance, at a
    cost that grows with the corpus) or is approximate, for large corpora (``exact=False``): an HNSW graph on the same
    bits (sentence-transformers' ``exact=False`` builds the same graphs), or, with ``clusters``, faiss's inverted
    lists (``IndexBinaryIVF``): the codes are split into that many k-means clusters and a query scans the codes of its
    ``probes`` nearest clusters. The lists hold each code with an 8-byte id, where a graph adds about 144 bytes of
    links per vector at 16 neighbours, so that the first pass and an int4 store of 384 dimensions fit in 1/6 of
    float32's bytes. Their clusters are trained on the whole store at the first search (or save), not on the first
    chunk added; codes added later join the trained lists. An approximate first pass is saved with the index.

    With :class:`~st_bitembed.pca_codes.PCACodes` (fitted on a sample of the corpus) instead of the head, the store
    holds codes of the corpus's principal components, with more bits where a query's score depends on them more: at
    4 bits per dimension they rescore about as well as the head's int8 codes (benchmarks/nested_search.py, README). The
    first pass is then the sign bits of the vectors the codes stand for, in a rotation fitted with them (ITQ: see
    :class:`PCACodes`), still derived from the store; the codes do not truncate to lower precisions.

    Args:
        quantizer: The model's nested Quantize head (``model.quantizer``), or :class:`PCACodes` fitted to the corpus:
            what the stored codes stand for.
        store_precision: With a head, ``"int8"`` (1 byte per dimension) or ``"int4"`` (packed, 2 codes per byte;
            the default); ``None`` with PCA codes (their bits are theirs).
        path: A folder for the store, written as codes are added (corpora larger than memory); ``None``: in memory
            (:meth:`save` writes it).
        backend: The first pass: faiss (``IndexBinaryFlat``, or ``IndexBinaryHNSW``), usearch
            (``Index(metric="hamming", dtype="b1")``; both optional: ``pip install st_bitembed[search]``) or popcount
            in torch (exact only).
        exact: Scan every code (``True``) or search an approximate first pass (``False``; faiss or usearch).
        clusters: With ``exact=False``, inverted lists over this many clusters instead of an HNSW graph (faiss
            only); a common choice is 4 to 16 x the square root of the corpus size.

    Example:
        ::

            from st_bitembed import BitEmbed
            from st_bitembed.index import NestedCodeIndex

            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2", nested_codes=True)
            index = NestedCodeIndex(model.quantizer, "int4", path="my-index")
            for chunk in (["A man is eating food.", "A cheetah chases prey."], ["A plane is taking off."]):
                index.add(model.encode(chunk, precision="int4", pack=True))
            hits = index.search(model.encode(["Someone eats."]), top_k=2)  # [[{"corpus_id": 0, "score": ...}, ...]]
            index.save()
            same = NestedCodeIndex.load("my-index")

            # PCA codes, 4 bits per dimension, fitted on (a sample of) the corpus; add() takes float embeddings
            from st_bitembed.pca_codes import PCACodes

            documents = model.encode(corpus_sample)  # a few thousand of the corpus's texts
            fitted = NestedCodeIndex(PCACodes.fit(documents, bits_per_dimension=4))
            fitted.add(documents)
    """

    def __init__(
        self,
        quantizer: Quantize | PCACodes,
        store_precision: PrecisionName | None = None,
        path: str | Path | None = None,
        backend: FirstPassBackend = "faiss",
        exact: bool = True,
        clusters: int | None = None,
    ) -> None:
        if isinstance(quantizer, PCACodes):
            if store_precision is not None:
                raise ValueError(
                    f"PCA codes have their own bits per dimension: leave store_precision ({store_precision!r}) out, "
                    "or fit PCACodes with bits_per_dimension=... ."
                )
            self._codes: StoreCodes = quantizer
        elif not quantizer.nested:
            raise ValueError(
                "NestedCodeIndex needs a nested Quantize head, whose binary codes are the top bits of its int8 / int4 "
                "codes: convert with BitEmbed.from_backbone(..., nested_codes=True), or give the model "
                "Quantize(dim, nested=True) with model.set_quantizer and calibrate it; or store PCACodes fitted to "
                "the corpus (st_bitembed.pca_codes)."
            )
        else:
            store_precision = store_precision or "int4"
            if store_precision not in _STORE_PRECISIONS:
                raise ValueError(f"The store holds {' or '.join(_STORE_PRECISIONS)} codes, not {store_precision!r}.")
            quantizer = quantizer.cpu().eval()
            self._codes = _HeadCodes(quantizer, store_precision)
        if backend not in ("faiss", "usearch", "torch"):
            raise ValueError(f"Unknown first-pass backend {backend!r}; choose faiss, usearch or torch.")
        if backend == "torch" and not exact:
            raise ValueError("The torch first pass scans every code (exact=True); HNSW needs faiss or usearch.")
        if clusters is not None and (exact or backend != "faiss" or clusters < 1):
            raise ValueError(
                f"clusters={clusters} asks for inverted lists, an approximate first pass of faiss: give "
                "exact=False, backend='faiss' and at least 1 cluster (or clusters=None for a scan or an HNSW graph)."
            )
        self.quantizer = quantizer
        self.store_precision = store_precision
        self.backend = backend
        self.path = Path(path) if path is not None else None
        self.dimension = self._codes.dimension
        self.count = 0
        self._memory_store: list[np.ndarray] = []
        self.exact = exact
        self.clusters = clusters
        self._first_pass = _FirstPass(backend, self.dimension, exact, clusters)
        if self.path is not None:
            if (self.path / STORE_FILE).exists():
                raise FileExistsError(
                    f"{self.path} already holds an index: open it with NestedCodeIndex.load({str(self.path)!r}), or "
                    "choose another folder."
                )
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / STORE_FILE).touch()

    @property
    def bytes_per_vector(self) -> int:
        """Bytes per vector of the store (the first pass adds :attr:`first_pass_bytes_per_vector` in memory)."""
        return self._codes.bytes_per_vector

    @property
    def first_pass_bytes_per_vector(self) -> float:
        """Bytes per vector the first pass holds in memory: the binary codes (``dimension / 8``), and an HNSW
        graph's links (about 3x the codes' bytes at 384 dimensions) or the inverted lists' ids and centroids."""
        self._train_first_pass()
        return self._first_pass.bytes_per_vector(self.count)

    def add(self, codes: np.ndarray | torch.Tensor) -> None:
        """Append vectors: float embeddings ``[N, dim]`` (coded here), or their codes as
        ``BitEmbed.encode(texts, precision=store_precision, pack=True)`` returns them (int8 codes unpacked; int4 codes
        packed) or :meth:`PCACodes.encode` does. Call it chunk by chunk for corpora larger than memory."""
        codes = codes.cpu() if isinstance(codes, torch.Tensor) else torch.as_tensor(np.asarray(codes))
        if codes.is_floating_point():
            if codes.ndim != 2 or codes.shape[1] != self.dimension:
                raise ValueError(f"Expected embeddings [N, {self.dimension}], got shape {tuple(codes.shape)}.")
            codes = self._codes.encode(codes)
        codes = np.ascontiguousarray(codes.numpy() if isinstance(codes, torch.Tensor) else codes)
        expected = (np.int8, self.dimension) if self.store_precision == "int8" else (np.uint8, self.bytes_per_vector)
        if codes.ndim != 2 or codes.dtype != expected[0] or codes.shape[1] != expected[1]:
            name = self.store_precision or "PCA"
            source = f"encode(..., precision={name!r}, pack=True)" if self.store_precision else "PCACodes.encode"
            raise ValueError(
                f"Expected {name} codes shaped [N, {expected[1]}] of dtype {np.dtype(expected[0])} ({source}) or "
                f"float embeddings [N, {self.dimension}], got {codes.dtype} {codes.shape}."
            )
        for start in range(0, len(codes), _ROWS_PER_BLOCK):
            block = codes[start : start + _ROWS_PER_BLOCK]
            if not self._first_pass.needs_training:  # untrained inverted lists take the store's codes when trained
                self._first_pass.add(self._binary(block), first_id=self.count)
            if self.path is not None:
                with open(self.path / STORE_FILE, "ab") as file:
                    file.write(block.tobytes())
            else:
                self._memory_store.append(block)
            self.count += len(block)

    def _binary(self, codes: np.ndarray) -> np.ndarray:
        return self._codes.sign_bits(codes)

    def _train_first_pass(self) -> None:
        """Inverted lists not trained yet: their clusters from an evenly spread sample of the store's codes, then every
        stored code added to them."""
        if not self._first_pass.needs_training or self.count == 0:
            return
        if self.count < self.clusters:
            raise ValueError(
                f"Inverted lists of {self.clusters} clusters need at least as many codes, and the index holds "
                f"{self.count}: add more codes first, or choose fewer clusters (e.g. 4 x sqrt(corpus size))."
            )
        store = self._store()
        sample = min(self.count, self.clusters * _TRAINING_CODES_PER_CLUSTER)
        rows = np.unique(np.linspace(0, self.count - 1, sample).astype(np.int64))
        self._first_pass.train(self._binary(np.asarray(store[rows])))
        self._add_store_to_first_pass(store)

    def _add_store_to_first_pass(self, store: np.ndarray) -> None:
        """Every stored code's bits into the first pass, block by block (the store may be larger than memory)."""
        for start in range(0, self.count, _ROWS_PER_BLOCK):
            self._first_pass.add(self._binary(np.asarray(store[start : start + _ROWS_PER_BLOCK])), first_id=start)

    def _store(self) -> np.ndarray:
        """The stored codes, ``[count, bytes per vector]``: memory-mapped from disk, or in memory."""
        dtype = np.int8 if self.store_precision == "int8" else np.uint8
        if self.path is not None:
            if self.count == 0:
                return np.empty((0, self.bytes_per_vector), dtype=dtype)
            return np.memmap(self.path / STORE_FILE, dtype=dtype, mode="r", shape=(self.count, self.bytes_per_vector))
        if len(self._memory_store) > 1:
            self._memory_store = [np.concatenate(self._memory_store)]
        return self._memory_store[0] if self._memory_store else np.empty((0, self.bytes_per_vector), dtype=dtype)

    @torch.no_grad()
    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        top_k: int = 10,
        rescore_multiplier: int = 4,
        ef_search: int | None = None,
        probes: int | None = None,
    ) -> list[list[dict[str, int | float]]]:
        """Top-``top_k`` corpus entries per query, best first, as ``sentence_transformers.util.semantic_search``
        returns them (``{"corpus_id", "score"}``).

        Args:
            queries: Float embeddings ``[Q, dim]`` (rescored against the dequantized codes: the more accurate
                choice) or codes as the store holds them.
            top_k: Hits per query.
            rescore_multiplier: Candidates from the binary first pass per hit; ``0`` returns the first pass alone
                (scores ``1 - 2 * hamming / dim``).
            ef_search: For an HNSW first pass, how many nodes its search keeps in view (at least the number of
                candidates, the default): more finds the Hamming-nearest candidates more surely, and takes longer.
            probes: For inverted lists, how many of the clusters nearest to a query are scanned (default
                :data:`DEFAULT_PROBES`, at most all of them, which is an exact scan): more finds the Hamming-nearest
                candidates more surely, and takes longer.
        """
        queries = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries.cpu())
        is_float = queries.is_floating_point()
        if is_float and (queries.ndim != 2 or queries.shape[1] != self.dimension):
            raise ValueError(f"Expected query embeddings [Q, {self.dimension}], got shape {tuple(queries.shape)}.")
        query_bits = self._codes.query_bits(queries) if is_float else self._binary(queries.numpy())
        candidates = min(self.count, top_k * max(rescore_multiplier, 1))
        self._train_first_pass()
        hamming, ids = self._first_pass.search(query_bits, candidates, ef_search, probes)
        if rescore_multiplier == 0:
            return _hits(1 - 2 * hamming.float() / self.dimension, ids, top_k)
        query_vectors = (
            self._codes.rescoring_queries(queries) if is_float else self._codes.rescoring_documents(queries.numpy())
        )
        store = self._store()
        scores = torch.empty(ids.shape, dtype=torch.float32)
        queries_per_block = max(1, _ROWS_PER_BLOCK // max(candidates, 1))
        for start in range(0, len(ids), queries_per_block):
            block = ids[start : start + queries_per_block].clamp(min=0)  # a missing candidate (-1) scores -inf below
            unique, inverse = np.unique(block.numpy(), return_inverse=True)  # sorted reads, each row once
            documents = self._codes.rescoring_documents(np.asarray(store[unique]))
            documents = documents[torch.from_numpy(inverse).reshape(block.shape)]  # [queries, candidates, dim]
            scores[start : start + len(block)] = torch.einsum(
                "qd,qkd->qk", query_vectors[start : start + len(block)], documents
            )
        return _hits(scores.masked_fill(ids < 0, -torch.inf), ids, top_k)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the index (its description, the Quantize head or PCA codes, an approximate first pass and, for an
        in-memory index, the store) to ``path`` (default: the folder it was built in). An exact first pass is not
        saved: :meth:`load` derives it from the store."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("This index is in memory: give save() a folder.")
        if target != self.path:
            if (target / STORE_FILE).exists():
                raise FileExistsError(f"{target} already holds an index; choose another folder.")
            target.mkdir(parents=True, exist_ok=True)
            self._store().tofile(target / STORE_FILE)
        if isinstance(self.quantizer, PCACodes):
            self.quantizer.save(target / PCA_CODES_FOLDER)
        else:
            (target / HEAD_FOLDER).mkdir(exist_ok=True)
            self.quantizer.save(str(target / HEAD_FOLDER))
        for stale in GRAPH_FILES.values():  # a first pass saved before no longer describes the store
            (target / stale).unlink(missing_ok=True)
        if self.count >= (self.clusters or 0):  # fewer codes than clusters: trained at a search once there are more
            self._train_first_pass()
        if not self.exact and not self._first_pass.needs_training:
            self._first_pass.save(target / GRAPH_FILES[self.backend])
        description = {
            "codes": "pca" if isinstance(self.quantizer, PCACodes) else "quantize",
            "store_precision": self.store_precision,
            "dimension": self.dimension,
            "count": self.count,
            "exact": self.exact,
            "clusters": self.clusters,
        }
        (target / INDEX_FILE).write_text(json.dumps(description, indent=2))
        return target

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: FirstPassBackend = "faiss",
        exact: bool | None = None,
        clusters: int | None = None,
    ) -> NestedCodeIndex:
        """Open a saved index: the store stays on disk (memory-mapped); an approximate first pass saved by this
        backend is read back, any other first pass is built from the store.

        Args:
            path: The index's folder.
            backend: As for the constructor.
            exact: The first pass: as the index was saved (``None``), or another (built from the store).
            clusters: With ``exact`` given, as for the constructor.
        """
        path = Path(path)
        if not (path / INDEX_FILE).exists():
            raise FileNotFoundError(f"{path} has no {INDEX_FILE}: it is not a saved NestedCodeIndex.")
        description = json.loads((path / INDEX_FILE).read_text())
        if exact is None:  # as saved (indexes saved before inverted lists existed have no "clusters")
            exact, clusters = description.get("exact", True), description.get("clusters")
        if description.get("codes") == "pca":  # (indexes saved before PCA codes existed have no "codes")
            codes: Quantize | PCACodes = PCACodes.load(path / PCA_CODES_FOLDER)
        else:
            codes = Quantize.load(str(path / HEAD_FOLDER))
        index = cls(codes, description["store_precision"], backend=backend, exact=exact, clusters=clusters)
        index.path, index.count = path, description["count"]
        store = index._store()
        if store.nbytes != (path / STORE_FILE).stat().st_size:
            raise ValueError(
                f"{path / STORE_FILE} holds {(path / STORE_FILE).stat().st_size} bytes, but {INDEX_FILE} describes "
                f"{index.count} vectors of {index.bytes_per_vector} bytes: the index was not saved after its last "
                "add(), or the file is damaged."
            )
        saved_first_pass = path / GRAPH_FILES.get(backend, "")
        if not exact and saved_first_pass.is_file() and clusters == description.get("clusters"):
            index._first_pass.read(saved_first_pass, index.count)
            return index
        if not index._first_pass.needs_training:  # (inverted lists: trained from the store at the first search)
            index._add_store_to_first_pass(store)
        return index


class _FirstPass:
    """Hamming search over packed sign bits (ubinary bytes): a scan of every code (faiss ``IndexBinaryFlat``, usearch's
    exact search, torch popcount), an HNSW graph (faiss ``IndexBinaryHNSW``, usearch's ``Index``) or inverted lists
    (faiss ``IndexBinaryIVF``, with ``clusters``: to be trained before codes are added)."""

    def __init__(self, backend: FirstPassBackend, dimension: int, exact: bool, clusters: int | None = None) -> None:
        self.backend, self.exact, self.clusters = backend, exact, clusters
        self.bits = -(-dimension // 8) * 8  # the packed codes' whole bytes
        self._blocks: list[torch.Tensor] = []  # the torch backend's codes
        if backend == "faiss":
            import faiss

            if clusters is not None:
                self._index: Any = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(self.bits), self.bits, clusters)
                # faiss warns on stderr below 39 training codes per cluster; the console stays quiet (the index
                # refuses fewer codes than clusters, where k-means cannot run)
                self._index.cp.min_points_per_centroid = 1
            else:
                self._index = (
                    faiss.IndexBinaryFlat(self.bits) if exact else faiss.IndexBinaryHNSW(self.bits, HNSW_NEIGHBORS)
                )
        elif backend == "usearch":
            from usearch.index import Index

            self._index = Index(ndim=self.bits, metric="hamming", dtype="b1", connectivity=HNSW_NEIGHBORS)

    @property
    def needs_training(self) -> bool:
        return self.clusters is not None and not self._index.is_trained

    def train(self, bits: np.ndarray) -> None:
        self._index.train(bits)

    def add(self, bits: np.ndarray, first_id: int) -> None:
        if self.backend == "faiss":
            self._index.add(bits)  # faiss numbers vectors in the order they are added
        elif self.backend == "usearch":
            self._index.add(np.arange(first_id, first_id + len(bits)), bits)
        else:
            self._blocks.append(torch.from_numpy(bits.copy()))

    def search(
        self, queries: np.ndarray, k: int, ef_search: int | None = None, probes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hamming distances and ids, each ``[Q, k]``, nearest first (ties: the lower id, when exact); an approximate
        search that finds fewer than ``k`` codes pads with id -1."""
        explored = max(k, ef_search or 0)
        if self.backend == "faiss":
            if self.clusters is not None:
                self._index.nprobe = min(self.clusters, probes or DEFAULT_PROBES)
            elif not self.exact:
                self._index.hnsw.efSearch = explored
            distances, ids = self._index.search(queries, k)
        elif self.backend == "usearch":
            if not self.exact:
                self._index.expansion_search = explored
            matches = self._index.search(queries, k, exact=self.exact)
            found = np.arange(k)[None, :] < np.asarray(matches.counts)[:, None]
            distances, ids = np.where(found, matches.distances, 0), np.where(found, matches.keys.astype(np.int64), -1)
        else:
            if len(self._blocks) != 1:  # joined once, not at every search
                self._blocks = [torch.cat(self._blocks) if self._blocks else torch.empty(0, self.bits // 8).byte()]
            documents = self._blocks[0]
            hamming = torch.cat(
                [hamming_distance(block, documents) for block in torch.from_numpy(queries).split(_QUERIES_PER_BLOCK)]
            )
            nearest = hamming.sort(dim=1, stable=True)
            return nearest.values[:, :k], nearest.indices[:, :k]
        return torch.from_numpy(np.asarray(distances, dtype=np.int64)), torch.from_numpy(np.asarray(ids, np.int64))

    def bytes_per_vector(self, count: int) -> float:
        if self.exact or count == 0:
            return self.bits / 8
        if self.backend == "faiss":
            import faiss

            return faiss.serialize_index_binary(self._index).size / count
        return self._index.serialized_length / count

    def save(self, file: Path) -> None:
        if self.backend == "faiss":
            import faiss

            faiss.write_index_binary(self._index, str(file))
        else:
            self._index.save(str(file))

    def read(self, file: Path, count: int) -> None:
        """Replace the (empty) graph by the one saved in ``file``, which must hold ``count`` codes."""
        if self.backend == "faiss":
            import faiss

            self._index = faiss.read_index_binary(str(file))
            saved = self._index.ntotal
        else:
            self._index.load(str(file))
            saved = len(self._index)
        if saved != count:
            raise ValueError(
                f"{file} holds a first pass over {saved} codes, but the store {count}: it was saved by another index. "
                "Delete it to build the first pass from the store."
            )


def _hits(scores: torch.Tensor, ids: torch.Tensor, top_k: int) -> list[list[dict[str, int | float]]]:
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :top_k]
    return [
        [{"corpus_id": int(i), "score": float(s)} for s, i in zip(row_scores, row_ids) if i >= 0]
        for row_scores, row_ids in zip(scores.gather(1, order).tolist(), ids.gather(1, order).tolist())
    ]
