"""tools/offline_kit.py: the kit's datasets and the packaged MiniLM under its Hub name, the Hub switched off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "offline_kit.py"

PROBE = """
import os
from huggingface_hub import try_to_load_from_cache
from datasets import load_dataset
from st_bitembed.hub import check_model_source
assert os.environ["HF_HUB_OFFLINE"] == "1"
check_model_source("sentence-transformers/all-MiniLM-L6-v2")
print(try_to_load_from_cache("sentence-transformers/all-MiniLM-L6-v2", "modules.json"))
print(len(load_dataset("sentence-transformers/stsb", split="test")))
"""


def test_runs_a_command_with_the_kit_as_hub_caches(kit, minilm_dir, tmp_path):
    command = [sys.executable, str(TOOL), "--kit", str(kit), "--cache", str(tmp_path), "--"]
    result = subprocess.run([*command, sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    modules_json, rows = result.stdout.split()
    assert Path(modules_json).resolve() == (minilm_dir / "modules.json").resolve()  # the package's own file
    assert modules_json.startswith(str(tmp_path / "hf-hub" / "models--sentence-transformers--all-MiniLM-L6-v2"))
    assert int(rows) == 1379  # STS-B test pairs
    exports = subprocess.run(command[:-1], capture_output=True, text=True, check=True).stdout
    assert f"export HF_HUB_CACHE={tmp_path / 'hf-hub'}" in exports and "export HF_HUB_OFFLINE=1" in exports


def test_a_missing_kit_is_named(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOL), "--kit", str(tmp_path / "no-kit"), "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no data kit at" in result.stderr and "pass --kit" in result.stderr
