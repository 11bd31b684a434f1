"""The ``st-bitembed`` command line: thin wrappers that parse arguments and call the library.

Each command imports what it runs only once the arguments are parsed (mteb, datasets and transformers take
seconds to import), so ``st-bitembed --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from st_bitembed.allocator import keep_freed_memory
from st_bitembed.precisions import DEFAULT_PRECISIONS

# What datasets and huggingface_hub say at every load when offline mode makes them read their caches (twice per
# dataset, twice per model): true by construction when the user switched the Hub off.
OFFLINE_CACHE_NOTICES = {
    "datasets.load": "Using the latest cached version of the dataset",
    "datasets.packaged_modules.cache.cache": "Found the latest cached dataset configuration",
    "huggingface_hub.hf_api": "offline mode is enabled. To disable it, please unset the `HF_HUB_OFFLINE`",
}


def _not_an_offline_cache_notice(record: logging.LogRecord) -> bool:
    return not any(notice in record.getMessage() for notice in OFFLINE_CACHE_NOTICES.values())


def _convert(args: argparse.Namespace) -> None:
    from transformers.integrations.bitnet import AutoBitLinear

    from st_bitembed import BitEmbed
    from st_bitembed.saving import check_target

    check_target(args.output_dir, args.overwrite)
    model = BitEmbed.from_backbone(
        args.base, norm=args.norm, pooling=args.pooling, eos_token=args.eos_token, nested_codes=args.nested_codes
    )
    model.save(args.output_dir)
    layers = sum(1 for module in model[0].auto_model.modules() if isinstance(module, AutoBitLinear))
    print(f"Converted {args.base} ({layers} BitLinear layers, norm={args.norm}) -> {args.output_dir}")


def _export(args: argparse.Namespace) -> None:
    from st_bitembed.export import export_packed

    output = export_packed(args.model_dir, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    print(f"Exported {args.model_dir} -> {output} (2-bit packed BitLinear weights, {size / 2**20:.1f} MiB of tensors)")


def _evaluate(args: argparse.Namespace) -> None:
    from st_bitembed.evaluation import evaluate_precisions

    report = evaluate_precisions(
        args.model,
        tasks=args.tasks.split(",") if args.tasks else None,
        benchmark=args.benchmark,
        precisions=args.precisions.split(","),
        teacher=args.teacher,
        output_dir=args.output_dir,
        posthoc=not args.no_posthoc,
        batch_size=args.batch_size,
        name=args.name,
        languages=args.languages.split(",") if args.languages else None,
    )
    print(report.to_markdown())
    print(f"\nResults, table and plot in {args.output_dir}")


def _card(args: argparse.Namespace) -> None:
    from st_bitembed import BitEmbed
    from st_bitembed.card import write_model_card
    from st_bitembed.evaluation import EvaluationReport

    card_file = Path(args.model_dir) / "README.md"
    if card_file.is_file() and not args.overwrite:
        raise FileExistsError(f"{card_file} exists; pass --overwrite to replace it with the card written now.")
    report = EvaluationReport.load(Path(args.results) / "results.json") if args.results else None
    path = write_model_card(BitEmbed(args.model_dir), args.model_dir, report, repo_id=args.repo_id)
    print(f"Wrote {path}")


def _train(args: argparse.Namespace) -> None:
    import time

    from st_bitembed.recipe import load_recipe
    from st_bitembed.training import STAGES, run_recipe, running_processes

    recipe = load_recipe(args.recipe, args.set)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    stages = {"train": STAGES, "pretrain": ("convert", "pretrain"), "finetune": ("finetune",)}[args.command]
    start = time.perf_counter()
    model, report = run_recipe(recipe, stages=stages, resume=args.resume, overwrite=args.overwrite)
    if not running_processes().is_main_process:  # under torchrun, the main process reports
        return
    if report is not None:
        print(report.to_markdown_with_shares())
    print(f"\nSaved {recipe.output_dir}/model; wall time {time.perf_counter() - start:.0f} s")


def _push(args: argparse.Namespace) -> None:
    from st_bitembed.card import push_to_hub

    print(f"Pushed: {push_to_hub(args.model_dir, args.repo_id, token=args.token, private=args.private)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-bitembed", description="BitNet text-embedding models.")
    parser.add_argument("--verbose", action="store_true", help="log INFO messages of every library, not only ours")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a Hugging Face backbone into an (untrained) BitEmbed model")
    convert.add_argument("base", help="Hub id or local directory of a transformers or sentence-transformers model")
    convert.add_argument("output_dir", help="where to save the converted sentence-transformers model")
    convert.add_argument("--norm", default="all", help="where to insert RMSNorms: all (default) or subln")
    convert.add_argument("--pooling", default=None, help="pooling of a plain transformers backbone (lasttoken, mean)")
    convert.add_argument("--eos-token", default=None, help="token appended to every text for last-token pooling")
    convert.add_argument(
        "--nested-codes", action="store_true", help="one range for all integer precisions: codes truncate"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace a model already in output_dir")
    convert.set_defaults(run=_convert)

    export = commands.add_parser("export", help="deployment copy with ternary weights packed 2 bits per weight")
    export.add_argument("model_dir")
    export.add_argument("output_dir")
    export.add_argument("--dtype", default="float32", help="dtype of embeddings and norms: float32 (exact), bfloat16")
    export.add_argument("--overwrite", action="store_true", help="replace a model already in output_dir")
    export.set_defaults(run=_export)

    evaluate = commands.add_parser("evaluate", help="mteb scores at every storage precision, table and plot")
    evaluate.add_argument("model", help="BitEmbed model directory or Hub id")
    selection = evaluate.add_mutually_exclusive_group(required=True)
    selection.add_argument("--tasks", help="comma-separated mteb task names, e.g. STSBenchmark,SciFact")
    selection.add_argument("--benchmark", help='an mteb benchmark, e.g. "MTEB(eng, v2)"')
    evaluate.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS))
    evaluate.add_argument("--teacher", default=None, help="full-precision reference model")
    evaluate.add_argument("--output-dir", default="bitembed-eval")
    evaluate.add_argument("--no-posthoc", action="store_true", help="skip the post-hoc quantization baseline")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--name", default=None, help='model name in the results ("org/name")')
    evaluate.add_argument("--languages", default=None, help="only these languages' subsets, e.g. eng (ISO 639-3)")
    evaluate.set_defaults(run=_evaluate)

    card = commands.add_parser("card", help="write a Hub-ready README.md model card into a saved model")
    card.add_argument("model_dir")
    card.add_argument("--results", default=None, help="output directory of `st-bitembed evaluate`")
    card.add_argument("--repo-id", default=None, help="Hub repository id shown in the usage examples")
    card.add_argument("--overwrite", action="store_true", help="replace the folder's README.md")
    card.set_defaults(run=_card)

    for name, help_text in (
        ("train", "run a recipe: convert, pre-train, fine-tune, evaluate (default recipe: minilm-cpu)"),
        ("pretrain", "run a recipe's conversion and continual contrastive pre-training only"),
        ("finetune", "run a recipe's distillation fine-tuning only (after pretrain, or after convert)"),
    ):
        stage = commands.add_parser(name, help=help_text)
        stage.add_argument(
            "recipe",
            nargs="?" if name == "train" else None,
            default="minilm-cpu",
            help="built-in recipe name (minilm-cpu, qwen3-0.6b, gemma3-270m) or a YAML / JSON file",
        )
        stage.add_argument("--resume", action="store_true", help="skip finished stages, continue from checkpoints")
        stage.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
        stage.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="change one recipe key, e.g. --set finetune.loss.hidden_states=0 (repeatable; value read as YAML)",
        )
        stage.add_argument(
            "--overwrite", action="store_true", help="start over where an earlier run of the recipe saved models"
        )
        stage.set_defaults(run=_train)

    push = commands.add_parser("push", help="upload a saved model to the Hugging Face Hub")
    push.add_argument("model_dir")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.set_defaults(run=_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Quiet by default: progress bars, warnings, and this package's few lines (stages, tasks being evaluated).
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("st_bitembed").setLevel(logging.INFO)
    if "1" in (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE")):
        for logger_name in OFFLINE_CACHE_NOTICES:
            logging.getLogger(logger_name).addFilter(_not_an_offline_cache_notice)
    # The process is the command's own: a training step, or a batch being encoded, reuses the last one's memory.
    keep_freed_memory()
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, RuntimeError) as error:
        print(f"st-bitembed {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
