"""One store, every precision: binary -> int rescoring from a nested store against float32 exact search and
sentence-transformers' own binary -> int8 recipe, and what nesting costs on the kit's tasks.

Search (recall@10 of float32 exact search on the same embeddings, queries/s, bytes per vector), on two corpora:

- SciFact: its 5,183 abstracts and 1,109 queries, real embeddings;
- ``--corpus-size`` vectors (default 1,000,000): real embeddings of the kit's 10,033 Wikipedia lead passages and of
  the all-nli training sentences, then **random vectors drawn from a Gaussian with the real embeddings' mean and
  covariance**, L2-normalised, up to the size; queries: real embeddings of Wikipedia short descriptions.

Methods: float32 exact (faiss ``IndexFlatIP``); a float32 HNSW graph (faiss ``IndexHNSWFlat``, as many neighbours as
the binary graphs: what a graph searched with exact distances gives at each speed, in float32's bytes and its links);
each store alone (every vector's codes decoded and scored: what the codes cap a rescoring's recall at, whatever the
first pass); binary only (sentence-transformers' ``quantize_embeddings`` ubinary, faiss ``IndexBinaryFlat``);
sentence-transformers' binary -> int8 rescoring (its int8 codes with ranges calibrated on the calibration sentences,
float query x int8 codes, as its documentation does), and BitEmbed's :class:`~st_bitembed.index.NestedCodeIndex` on
one store (the nested head's int8 or int4 codes, or :class:`~st_bitembed.pca_codes.PCACodes` at each of ``--pca-bits``
bits per dimension, fitted on ``PCA_SAMPLE`` vectors of the corpus, evenly spread: all of SciFact's 5,183), the binary
first pass derived from it: an exact Hamming scan (faiss ``IndexBinaryFlat``), an HNSW graph on the same bits (faiss
``IndexBinaryHNSW``, ``exact=False``) or inverted lists (faiss ``IndexBinaryIVF``,
``exact=False, clusters=sqrt(corpus size)``, searched with each of ``--probes`` clusters per query); build times are
printed. Each rescoring method reads each of ``--rescore-multipliers`` x 10 candidates. Every search is timed
``--rounds`` times, the median kept (the recall is the first round's: they are all alike).

Cost (``--parts cost``): the model's own head against a nested head (``Quantize(dim, nested=True)``) calibrated on the
same 256 STS-B training sentences the recipes calibrate on, on the kit's seven tasks at int8 / int4 / int2 / binary,
from one encoding pass. With ``--train-steps N`` also both heads trained from there as a recipe with the
multi-precision InfoNCE trains them (``MultiPrecisionLoss(model, InfoNCELoss(model))`` at the default precisions, AdamW
at ``--train-lr``, batches of 32 all-nli training pairs), the model itself frozen: a non-nested head calibrated on the
same sentences (what the recipes' conversion gives) and the nested one, each trained for N steps on the same batches.

Usage (offline, from the repository root):
    python tools/offline_kit.py -- python benchmarks/nested_search.py --model output/minilm-cpu-final/model
        [--corpus-size 1000000] [--queries 1000] [--rescore-multipliers 4,16,64] [--probes 16,64] [--pca-bits 4]
        [--parts search,cost] [--train-steps 540] [--train-lr 3e-4] [--threads 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("ST_BITEMBED_SHARED", Path(__file__).resolve().parents[2] / "shared"))
# Corpus vectors (evenly spread) the PCA codes are fitted on.
PCA_SAMPLE = 20_000
# How many nodes the float32 reference graph's search keeps in view (faiss's efSearch).
FLOAT_GRAPH_EF_SEARCH = (64, 128, 256)
KIT_TASKS = ["STSBenchmark", "SciFact", "SICK-R", "STS12", "STS13", "STS14", "STS15"]


def calibration_sentences() -> list[str]:
    from datasets import load_dataset

    stsb = load_dataset("sentence-transformers/stsb", split="train")
    return list(dict.fromkeys([*stsb["sentence1"], *stsb["sentence2"]]))[:256]  # as the recipes' calibration


def calibrated_head(model, calibration: np.ndarray, nested: bool = True):
    """A Quantize head for ``model``'s embeddings, nested (default) or not, calibrated on ``calibration``."""
    from st_bitembed import Quantize

    head = Quantize(model.get_embedding_dimension(), nested=nested)
    head.calibrate(torch_tensor(calibration))
    return head


def torch_tensor(values: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def embeddings(model, name: str, texts: list[str], cache: Path) -> np.ndarray:
    """Float32 embeddings of ``texts``, encoded once and kept in ``cache``."""
    path = cache / f"{name}.npy"
    if not path.exists():
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, model.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float32))
        print(f"encoded {len(texts):,} {name} in {time.perf_counter() - start:.0f} s")
    return np.load(path)


def scifact(model, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    from datasets import load_dataset

    corpus = load_dataset("mteb/scifact", "corpus", split="corpus")
    queries = load_dataset("mteb/scifact", "queries", split="queries")
    documents = [f"{title} {text}".strip() for title, text in zip(corpus["title"], corpus["text"])]
    return embeddings(model, "scifact-corpus", documents, cache), embeddings(model, "scifact-queries",
                                                                             queries["text"], cache)  # fmt: skip


def nli_sentences():
    """The all-nli training triplets and their distinct sentences, in order."""
    from datasets import load_dataset

    nli = load_dataset("sentence-transformers/all-nli", "triplet", split="train")
    return nli, list(dict.fromkeys([*nli["anchor"], *nli["positive"], *nli["negative"]]))


def large_corpus(model, cache: Path, size: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(SHARED / "data/raw/wikipedia_vital/vital_articles_en.jsonl.gz", "rt", encoding="utf8") as file:
        articles = [json.loads(line) for line in file]
    real = np.concatenate(
        [
            embeddings(model, "wikipedia-passages", [a["extract"] for a in articles], cache),
            embeddings(model, "all-nli-sentences", nli_sentences()[1], cache),
        ]
    )
    descriptions = [f"{a['title']}: {a['description']}" for a in articles if a.get("description")]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(descriptions), size=min(queries, len(descriptions)), replace=False)
    query_embeddings = embeddings(model, f"wikipedia-queries-{len(chosen)}", [descriptions[i] for i in chosen], cache)
    if size <= len(real):
        return real[:size], query_embeddings
    mean, covariance = real.mean(axis=0), np.cov(real, rowvar=False)
    synthetic = rng.multivariate_normal(mean, covariance, size=size - len(real), method="cholesky").astype(np.float32)
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    return np.concatenate([real, synthetic]), query_embeddings


def timed(function, rounds: int = 1):
    """``function()``'s first result and the median of its run times over ``rounds`` runs."""
    results, seconds = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        results.append(function())
        seconds.append(time.perf_counter() - start)
    return results[0], float(np.median(seconds))


def compare_search(
    model,
    calibration: np.ndarray,
    corpus: np.ndarray,
    queries: np.ndarray,
    multipliers: list[int],
    probes: list[int],
    pca_bits: list[float],
    rounds: int,
) -> None:
    import faiss
    from sentence_transformers.util import quantize_embeddings

    from st_bitembed.index import NestedCodeIndex
    from st_bitembed.pca_codes import PCACodes

    dimension, top_k = corpus.shape[1], 10
    head = calibrated_head(model, calibration)
    float_index = faiss.IndexFlatIP(dimension)
    float_index.add(corpus)
    (_, exact), float_seconds = timed(lambda: float_index.search(queries, top_k), rounds)
    exact_sets = [set(row) for row in exact.tolist()]

    def recall(found: list[list[int]]) -> float:
        return float(np.mean([len(reference & set(row)) / top_k for reference, row in zip(exact_sets, found)]))

    binary_index = faiss.IndexBinaryFlat(dimension)
    binary_index.add(quantize_embeddings(corpus, "ubinary"))
    int8_corpus = quantize_embeddings(corpus, "int8", calibration_embeddings=calibration)
    clusters = max(1, round(len(corpus) ** 0.5))
    first_passes = {"scan": {"exact": True}, "HNSW": {"exact": False}, "IVF": {"exact": False, "clusters": clusters}}
    sample = corpus[np.unique(np.linspace(0, len(corpus) - 1, min(len(corpus), PCA_SAMPLE)).astype(np.int64))]
    stores = {
        "int8": (head, "int8", head.quantize(torch_tensor(corpus), "int8")),
        "int4": (head, "int4", head.quantize(torch_tensor(corpus), "int4", pack=True)),
    }
    for bits in pca_bits:
        pca, fit_seconds = timed(lambda: PCACodes.fit(sample, bits_per_dimension=bits))
        pca_codes, code_seconds = timed(lambda: pca.encode(corpus))
        print(f"PCA codes, {bits:g} bits ({pca.bytes_per_vector} bytes), fitted on {len(sample):,} vectors of the "
              f"corpus in {fit_seconds:.1f} s, the corpus coded in {code_seconds:.1f} s")  # fmt: skip
        stores[f"PCA {bits:g} bits"] = (pca, None, pca_codes)
    nested = {}
    for store, (codes_of, precision, codes) in stores.items():
        for first_pass, options in first_passes.items():
            index = nested[store, first_pass] = NestedCodeIndex(codes_of, precision, backend="faiss", **options)
            _, seconds = timed(lambda: (index.add(codes), index.first_pass_bytes_per_vector))  # IVF: trains here
            if first_pass != "scan":
                print(f"{first_pass} first pass over the {store} store's bits built in {seconds:.0f} s")

    def binary_only() -> list[list[int]]:
        return binary_index.search(quantize_embeddings(queries, "ubinary"), top_k)[1].tolist()

    def binary_then_int8(multiplier: int) -> list[list[int]]:  # sentence-transformers' binary -> int8 rescoring
        _, ids = binary_index.search(quantize_embeddings(queries, "ubinary"), top_k * multiplier)
        scores = np.einsum("qd,qkd->qk", queries, int8_corpus[ids].astype(np.float32))
        return np.take_along_axis(ids, np.argsort(-scores, axis=1, kind="stable")[:, :top_k], axis=1).tolist()

    def nested_search(index, multiplier: int, probes: int | None = None) -> list[list[int]]:
        hits = index.search(queries, top_k=top_k, rescore_multiplier=multiplier, probes=probes)
        return [[hit["corpus_id"] for hit in row] for row in hits]

    binary_recall, binary_seconds = _recall_and_time(binary_only, recall, rounds)
    rows = [
        ("float32 exact (faiss IndexFlatIP)", 4 * dimension, 1.0, float_seconds),
        ("binary only (sentence-transformers ubinary, faiss)", dimension // 8, binary_recall, binary_seconds),
    ]
    rows += float_graph_rows(corpus, queries, recall, rounds)
    for store, (codes_of, precision, codes) in stores.items():  # what each store's codes cap the rescoring at
        scan = faiss.IndexFlatIP(dimension)
        scan.add(decoded_unit_vectors(codes_of, precision, codes))
        rows.append(
            (
                f"BitEmbed {store} store alone: every vector rescored (decoded, faiss IndexFlatIP)",
                nested[store, "scan"].bytes_per_vector,
                *_recall_and_time(lambda: scan.search(queries, top_k)[1].tolist(), recall, rounds),
            )
        )
    for multiplier in multipliers:
        rows.append(
            (
                f"sentence-transformers binary -> int8 rescoring (x{multiplier})",
                dimension // 8 + dimension,
                *_recall_and_time(lambda: binary_then_int8(multiplier), recall, rounds),
            )
        )
        for (store, first_pass), index in nested.items():
            bytes_per_vector = round(index.bytes_per_vector + index.first_pass_bytes_per_vector)
            for probe in sorted({min(p, clusters) for p in probes}) if first_pass == "IVF" else [None]:
                searched = f"binary {first_pass}" + (f" ({clusters} clusters, {probe} probed)" if probe else "")
                rows.append(
                    (
                        f"BitEmbed {store} store: {searched} -> rescoring (x{multiplier})",
                        bytes_per_vector,
                        *_recall_and_time(lambda: nested_search(index, multiplier, probe), recall, rounds),
                    )
                )
    print(f"\n{len(corpus):,} vectors x {dimension}, {len(queries):,} queries, top 10\n")
    print("| method | bytes/vector | recall@10 of float32 exact | queries/s | x float32 exact |")
    print("|---|---|---|---|---|")
    for name, bytes_per_vector, found_recall, seconds in rows:
        print(f"| {name} | {bytes_per_vector:,} | {found_recall:.4f} | {len(queries) / seconds:,.0f} | "
              f"{float_seconds / seconds:.1f} |")  # fmt: skip


def float_graph_rows(
    corpus: np.ndarray, queries: np.ndarray, recall, rounds: int
) -> list[tuple[str, int, float, float]]:
    """What a graph reaches when it is searched with float32 distances, whatever it costs in bytes: the reference of
    speed and recall for a graph of as many links."""
    import faiss

    from st_bitembed.index import HNSW_NEIGHBORS

    graph = faiss.IndexHNSWFlat(corpus.shape[1], HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
    _, seconds = timed(lambda: graph.add(corpus))
    print(f"float32 HNSW graph ({HNSW_NEIGHBORS} neighbours) built in {seconds:.0f} s")
    bytes_per_vector = round(faiss.serialize_index(graph).size / len(corpus))
    rows = []
    for ef_search in FLOAT_GRAPH_EF_SEARCH:
        graph.hnsw.efSearch = ef_search
        name = f"float32 HNSW graph, {HNSW_NEIGHBORS} neighbours, efSearch {ef_search} (faiss IndexHNSWFlat)"
        found = _recall_and_time(lambda: graph.search(queries, 10)[1].tolist(), recall, rounds)
        rows.append((name, bytes_per_vector, *found))
    return rows


def decoded_unit_vectors(codes_of, precision: str | None, codes) -> np.ndarray:
    """The unit vectors a store's codes stand for, as its rescoring scores them."""
    import torch

    if precision is None:  # PCA codes
        decoded = np.concatenate(
            [codes_of.decode(codes[start : start + 65_536]) for start in range(0, len(codes), 65_536)]
        )
    else:
        decoded = codes_of.dequantize(torch.as_tensor(codes), precision).numpy()
    return decoded / np.linalg.norm(decoded, axis=1, keepdims=True)


def _recall_and_time(search, recall, rounds: int) -> tuple[float, float]:
    found, seconds = timed(search, rounds)
    return recall(found), seconds


def training_pairs(model, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the all-nli training (anchor, positive) pairs: the sentences ``large_corpus`` encodes."""
    nli, sentences = nli_sentences()
    encoded = embeddings(model, "all-nli-sentences", sentences, cache)
    row = {sentence: index for index, sentence in enumerate(sentences)}
    return encoded[[row[a] for a in nli["anchor"]]], encoded[[row[p] for p in nli["positive"]]]


def trained_head(model, head, pairs: tuple[np.ndarray, np.ndarray], steps: int, learning_rate: float, seed: int = 0):
    """A copy of ``head`` trained for ``steps`` batches of 32 pairs by the multi-precision InfoNCE, as a recipe
    trains the head (the model's embeddings fixed: they are encoded once)."""
    import copy

    import torch

    from st_bitembed.losses import InfoNCELoss, MultiPrecisionLoss

    own = model.quantizer
    trained = copy.deepcopy(head)
    model.set_quantizer(trained)  # MultiPrecisionLoss trains the model's head
    try:
        loss = MultiPrecisionLoss(model, InfoNCELoss(model))
        optimizer = torch.optim.AdamW(trained.parameters(), lr=learning_rate, weight_decay=0.0)  # the trainer's decay
        anchors, positives = (torch_tensor(values) for values in pairs)
        generator = torch.Generator().manual_seed(seed)  # the same batches for every head
        for _ in range(steps):
            batch = torch.randint(len(anchors), (32,), generator=generator)
            loss.compute_loss_from_embeddings([anchors[batch], positives[batch]], None).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        model.set_quantizer(own)
    return trained.eval()


def nesting_cost(
    model, calibration: np.ndarray, tasks: list[str], pairs: tuple[np.ndarray, np.ndarray] | None = None,
    steps: int = 0, learning_rate: float = 3e-4,
) -> None:  # fmt: skip
    import mteb
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    from st_bitembed.evaluation.encoders import EncodeOnce, QuantizedEncoder

    heads = {"own head": model.quantizer, "nested head": calibrated_head(model, calibration)}
    if steps:
        calibrated = calibrated_head(model, calibration, nested=False)
        heads["calibrated, trained"] = trained_head(model, calibrated, pairs, steps, learning_rate)
        heads["nested, trained"] = trained_head(model, heads["nested head"], pairs, steps, learning_rate)
    precisions = ["int8", "int4", "int2", "binary"]
    encoder = EncodeOnce(SentenceTransformerEncoderWrapper(model))
    scores: dict[tuple[str, str], list[float]] = {}
    for task in mteb.get_tasks(tasks=tasks):
        for head_name, head in heads.items():
            for precision in precisions:
                wrapped = QuantizedEncoder(encoder, precision, f"local/{head_name.replace(' ', '-')}", quantizer=head)
                result = mteb.evaluate(wrapped, task, cache=None, encode_kwargs={"batch_size": 32},
                                       show_progress_bar=False)  # fmt: skip
                scores.setdefault((head_name, precision), []).append(100 * result.task_results[0].get_score())
        encoder.clear()
    trained = f"; trained: {steps} steps at learning rate {learning_rate:g}" if steps else ""
    print(f"\nnesting cost on {', '.join(tasks)} (mean score x 100{trained})\n")
    names = list(heads)
    pairs_of_heads = [(0, 1), (2, 3)] if steps else [(0, 1)]  # nested against the non-nested head it compares with
    print(f"| precision | {' | '.join(names)} | {' | '.join(f'{names[n]} - {names[o]}' for o, n in pairs_of_heads)} |")
    print("|---|" + "---|" * (len(names) + len(pairs_of_heads)))
    for precision in precisions:
        mean = [float(np.mean(scores[(name, precision)])) for name in names]
        differences = [f"{mean[n] - mean[o]:+.2f}" for o, n in pairs_of_heads]
        print(f"| {precision} | {' | '.join(f'{m:.2f}' for m in mean)} | {' | '.join(differences)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a BitEmbed model folder")
    parser.add_argument("--corpus-size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rescore-multipliers", default="4,16,64", help="candidates per hit, comma-separated")
    parser.add_argument("--probes", default="16,64", help="clusters scanned per query by the IVF first pass")
    parser.add_argument("--pca-bits", default="4", help="bits per dimension of each PCA store, comma-separated")
    parser.add_argument("--parts", default="search", help="search, cost (nesting's cost on the kit's tasks) or both")
    parser.add_argument("--train-steps", type=int, default=0, help="cost: also both heads trained this many steps")
    parser.add_argument("--train-lr", type=float, default=3e-4, help="cost: the heads' learning rate (the recipes')")
    parser.add_argument("--cache-dir", default=".cache/nested-search", help="encoded embeddings are kept here")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=1, help="search: each method timed this many times (median)")
    args = parser.parse_args()

    import faiss
    import torch

    from st_bitembed import BitEmbed

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    model = BitEmbed(args.model)
    weights = Path(args.model).resolve() / "model.safetensors"
    key = f"{weights.parent}:{weights.stat().st_mtime_ns if weights.exists() else ''}"
    cache = Path(args.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]  # per model folder and weights
    calibration = embeddings(model, "calibration", calibration_sentences(), cache)
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} threads; model {args.model}")
    multipliers = [int(m) for m in args.rescore_multipliers.split(",")]
    probes = [int(p) for p in args.probes.split(",")]
    pca_bits = [float(b) for b in args.pca_bits.split(",")]
    if "search" in args.parts:
        print("\n## SciFact (real embeddings)")
        compare_search(model, calibration, *scifact(model, cache), multipliers, probes, pca_bits, args.rounds)
        print("\n## Large corpus (real embeddings, then Gaussian vectors with their mean and covariance)")
        corpus, queries = large_corpus(model, cache, args.corpus_size, args.queries)
        compare_search(model, calibration, corpus, queries, multipliers, probes, pca_bits, args.rounds)
    if "cost" in args.parts:
        pairs = training_pairs(model, cache) if args.train_steps else None
        nesting_cost(model, calibration, KIT_TASKS, pairs, args.train_steps, args.train_lr)


if __name__ == "__main__":
    main()
