"""Encoding speed and memory: BitEmbed's int8 x ternary inference path vs the full-precision model in fp32 and bf16.

For Gemma3-270M- and Qwen3-0.6B-shaped backbones (architecture configs from ../shared/models/configs, random
weights: speed does not depend on their values), every (variant, batch, sequence length) runs in a fresh process,
which reports tokens/s (median of the timed forwards after a warm-up) and its peak RSS. Also prints checkpoint sizes:
bf16 save_pretrained vs BitEmbed's 2-bit packed export.

Usage:
    python benchmarks/encode_speed.py [--shapes qwen3-0.6b,gemma3-270m] [--batches 1,8,32] [--lengths 128,512]
        [--repeats 3] [--device cpu] [--threads N]   (BITEMBED_CONFIGS=DIR: other config folder)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "models" / "configs"
VARIANTS = ("fp32", "bf16", "bitembed-int8")


def build_backbone(shape: str):
    import torch
    from transformers import AutoConfig, AutoModel

    config_dict = json.loads((Path(os.environ.get("BITEMBED_CONFIGS", CONFIGS)) / f"{shape}.json").read_text())
    config_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")}
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(0)
    return AutoModel.from_config(config)


def measure(shape: str, variant: str, configs: list[tuple[int, int]], repeats: int, device: str) -> dict:
    """Runs in a child process: build one variant, then for each (batch, length) warm up and time the forward.

    Returns tokens/s per configuration and the process's peak memory (RSS on CPU, allocated memory on CUDA).
    """
    import torch

    from st_bitembed.quantization.bitlinear import install_bitlinear
    from st_bitembed.quantization.convert import convert_to_bitlinear

    model = build_backbone(shape)
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "bitembed-int8":
        convert_to_bitlinear(model, norm="all")
        install_bitlinear(model, "int8")
    model = model.to(device).eval()
    speeds = {}
    with torch.inference_mode():
        for batch, length in configs:
            input_ids = torch.randint(10, model.config.vocab_size - 10, (batch, length), device=device)
            attention_mask = torch.ones_like(input_ids)
            times = []
            for index in range(repeats + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=input_ids, attention_mask=attention_mask)
                if device == "cuda":
                    torch.cuda.synchronize()
                if index > 0:  # the first forward warms up (and caches BitEmbed's ternary codes)
                    times.append(time.perf_counter() - start)
            speeds[f"{batch}x{length}"] = batch * length / statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"tokens_per_s": speeds, "peak_mib": peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def checkpoint_sizes(shape: str) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    from st_bitembed.export import packed_state_dict
    from st_bitembed.quantization.convert import convert_to_bitlinear

    model = build_backbone(shape)
    with tempfile.TemporaryDirectory() as folder:
        model.to(torch.bfloat16).save_pretrained(folder)
        bf16 = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    model = build_backbone(shape)
    convert_to_bitlinear(model, norm="all")
    with tempfile.TemporaryDirectory() as folder:
        save_file(packed_state_dict(model, torch.bfloat16), f"{folder}/model.safetensors")
        packed = (Path(folder) / "model.safetensors").stat().st_size
    return bf16, packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gemma3-270m,qwen3-0.6b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-sizes", action="store_true", help="skip the checkpoint size comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    configs = [(b, n) for n in map(int, args.lengths.split(",")) for b in map(int, args.batches.split(","))]
    if args.child:  # one variant, in its own process so that its peak memory is its own
        import torch

        torch.set_num_threads(args.threads)
        shape, variant = args.child.split(":")
        print(json.dumps(measure(shape, variant, configs, args.repeats, args.device)))
        return

    import torch

    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} threads, median of {args.repeats} forwards"
    )
    for shape in args.shapes.split(","):
        results = {}
        for variant in VARIANTS:
            command = [
                sys.executable,
                __file__,
                "--child",
                f"{shape}:{variant}",
                "--batches",
                args.batches,
                "--lengths",
                args.lengths,
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(output.strip().splitlines()[-1])
        memory = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
        print(
            f"\n## {shape} ({memory}: "
            + ", ".join(f"{v} {r['peak_mib']:,.0f} MiB" for v, r in results.items())
            + ")\n"
        )
        print("| batch | seq | fp32 tokens/s | bf16 tokens/s | BitEmbed int8 tokens/s | x fp32 | x bf16 |")
        print("|---|---|---|---|---|---|---|")
        for batch, length in configs:
            key = f"{batch}x{length}"
            fp32, bf16, bit = (results[v]["tokens_per_s"][key] for v in VARIANTS)
            ratios = f"{bit / fp32:.2f} | {bit / bf16:.2f}"
            print(f"| {batch} | {length} | {fp32:,.0f} | {bf16:,.0f} | {bit:,.0f} | {ratios} |")
        if args.no_sizes:
            continue
        bf16_size, packed_size = checkpoint_sizes(shape)
        print(
            f"\ncheckpoint: bf16 {bf16_size / 2**20:,.0f} MiB, BitEmbed 2-bit packed export (bf16 embeddings) "
            f"{packed_size / 2**20:,.0f} MiB = {100 * packed_size / bf16_size:.0f}% of bf16"
        )


if __name__ == "__main__":
    main()
