"""What the native decoder attention gives a decoder, and what the teacher would gain from the same stand-in.

The stand-in: ``st_bitembed/quantization/native_decoder_attention.py``.

The random-weight Qwen3-0.6B- and Gemma3-270M-shaped backbones, saved as ``encode_speed.py``'s shapes suite saves them
(the bf16 checkpoint and the BitEmbed model's 2-bit packed export), loaded in one process: the teacher with
``SentenceTransformer(path)`` in bf16 (its attention modules then taken by ``use_native_decoder_attention``, its q and
k norms running as PyTorch modules before the rotary pass) and the packed export with ``BitEmbed(path)``. Each forward
(batch 32 x 128 random tokens, one 16- and one 64-token query) is timed with the stand-ins in place and with the
modules' own attention, taking turns, ``--rounds`` times; medians (each timing: the median of passes filling at least
a second, after a warm-up of each shape).

Usage:
    python benchmarks/decoder_attention.py [--shapes qwen3-0.6b,gemma3-270m] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from encode_speed import SHAPE_CONFIGS, save_shape, timed


def attention_switch(backbone: torch.nn.Module):
    """A function that puts the native stand-ins (``True``) or the modules' own attention (``False``) in place."""
    from st_bitembed.quantization.native_decoder_attention import NativeDecoderAttention

    stand_ins = {name: m for name, m in backbone.named_modules() if isinstance(m, NativeDecoderAttention)}
    if not stand_ins:
        raise SystemExit("No attention module was taken by the native stand-in (no AVX-512 or no C compiler here?)")

    def use(native: bool) -> None:
        for name, stand_in in stand_ins.items():
            backbone.set_submodule(name, stand_in if native else stand_in.attention)

    return use


def measure(model, use, rounds: int) -> dict[tuple[int, int], tuple[float, float]]:
    """(batch, tokens) -> median seconds per forward with the stand-ins and with the modules' own attention."""
    vocabulary = model[0].auto_model.config.vocab_size
    results = {}
    with torch.inference_mode():
        for batch, length in SHAPE_CONFIGS:
            input_ids = torch.randint(10, vocabulary - 10, (batch, length))
            features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(rounds):
                for native in (True, False):
                    use(native)
                    model(dict(features))  # warm-up
                    seconds[native].append(timed(lambda: model(dict(features)), 1, min_seconds=1.0))
            results[batch, length] = statistics.median(seconds[True]), statistics.median(seconds[False])
    use(True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3-0.6b,gemma3-270m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from st_bitembed import BitEmbed
    from st_bitembed.quantization.native_decoder_attention import use_native_decoder_attention

    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.rounds} rounds taking turns\n")
    print("| shape | model | batch x tokens | own attention | native attention | speed-up |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            paths = save_shape(shape, Path(folder))
            teacher = SentenceTransformer(paths["bf16"], device="cpu", model_kwargs={"dtype": torch.bfloat16})
            use_native_decoder_attention(teacher[0].auto_model)
            models = {"teacher bf16": teacher, "BitEmbed packed": BitEmbed(paths["bitembed-packed"], device="cpu")}
            for label, model in models.items():
                model.eval()
                results = measure(model, attention_switch(model[0].auto_model), args.rounds)
                for (batch, length), (native, own) in results.items():
                    print(f"| {shape} | {label} | {batch} x {length} | {own * 1e3:.1f} ms | {native * 1e3:.1f} ms "
                          f"| {own / native:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
