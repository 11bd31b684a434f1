"""Classification from stored codes: does the scale at which codes are turned back into numbers change what a
classifier learns from them?

mteb's classification tasks fit scikit-learn's logistic regression (``max_iter=100``, L2 with ``C=1``) on 8 texts per
label and score accuracy on the test split, 10 times over. The regularisation's strength relative to the data depends
on the features' scale: BitEmbed's evaluation turns binary codes back into +-1/sqrt(d) (unit norm, as the float
embeddings), a user's index hands a classifier the signs, +-1; int4 codes become their levels in the embedding's
units, or the integer codes themselves. This script runs that protocol on real text whose labels the kit holds:
Wikipedia titles (never training text: the recipes train on the descriptions and lead sections) -> the article's
field (11 topics; "Uncategorized" left out), half of each field to sample training texts from, half to test on.

Usage:
    python tools/offline_kit.py -- python benchmarks/code_classification.py [--model PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import numpy as np
import torch

WIKIPEDIA = Path("data") / "raw" / "wikipedia_vital" / "vital_articles_en.jsonl.gz"


def accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, seeds: int) -> float:
    """mteb's classification protocol: per seed, 8 random training texts per label, a logistic regression, accuracy
    on every test text; the mean over seeds."""
    from sklearn.linear_model import LogisticRegression

    scores = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        per_label = [rng.choice(train[labels[train] == label], 8, replace=False) for label in np.unique(labels)]
        chosen = np.concatenate(per_label)
        classifier = LogisticRegression(max_iter=100).fit(features[chosen], labels[chosen])
        scores.append((classifier.predict(features[test]) == labels[test]).mean())
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a BitEmbed model (default: all-MiniLM-L6-v2 converted, head calibrated)")
    parser.add_argument("--teacher", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from st_bitembed import BitEmbed
    from st_bitembed.quantization.calibration import calibrate_inserted_norms

    with gzip.open(Path(args.shared) / WIKIPEDIA, "rt", encoding="utf8") as file:
        rows = [row for row in map(json.loads, file) if row["topic"] != "Uncategorized" and row["title"]]
    titles = [row["title"] for row in rows]
    topics = sorted({row["topic"] for row in rows})
    labels = np.array([topics.index(row["topic"]) for row in rows])
    order = np.random.default_rng(0).permutation(len(rows))
    train, test = np.sort(order[: len(rows) // 2]), np.sort(order[len(rows) // 2 :])

    if args.model:
        model = BitEmbed(args.model)
    else:
        model = BitEmbed.from_backbone(args.teacher)
        calibration = [row["description"] for row in rows if row["description"]][:256]
        calibrate_inserted_norms(model, calibration)
        model.calibrate_quantizer(calibration)
    model.eval()
    teacher = SentenceTransformer(args.teacher)
    teacher_embeddings = teacher.encode(titles, batch_size=64, convert_to_tensor=True).float()
    embeddings = model.encode(titles, batch_size=64, convert_to_tensor=True).float()
    quantizer, dimension = model.quantizer, embeddings.shape[-1]

    @torch.no_grad()
    def decoded(precision: str) -> torch.Tensor:
        return quantizer.dequantize(quantizer.quantize(embeddings, precision), precision, dimension)

    int4_levels = decoded("int4")
    with torch.no_grad():
        int4_units = int4_levels / quantizer.step("int4", dimension)
    features = {
        "teacher float32": teacher_embeddings,
        "student float32": embeddings,
        "binary as +-1/sqrt(d) (the evaluation's)": decoded("binary"),
        "binary as +-1 (the signs)": decoded("binary") * math.sqrt(dimension),
        "int4 at its levels (the evaluation's)": int4_levels,
        "int4 in code units (code + 1/2)": int4_units,
    }
    print(f"{len(titles)} Wikipedia titles, {len(topics)} fields; train half {len(train)}, test half {len(test)}")
    print(f"accuracy, mean of {args.seeds} draws of 8 titles per field (mteb's protocol):")
    for name, values in features.items():
        print(f"  {name:42s} {accuracy(values.cpu().numpy(), labels, train, test, args.seeds):.4f}")


if __name__ == "__main__":
    main()
