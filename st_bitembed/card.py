"""Hub model cards for BitEmbed models: render from the Jinja template, validate, and push to the Hub."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results
from sentence_transformers import SentenceTransformerModelCardData

from st_bitembed.precisions import PRECISIONS

if TYPE_CHECKING:  # both import this module: BitEmbed for its card data, evaluation for the model it reports on
    from st_bitembed.evaluation.report import EvaluationReport
    from st_bitembed.model import BitEmbed


@dataclass
class BitEmbedModelCardData(SentenceTransformerModelCardData):
    """What a BitEmbed model's card says beyond sentence-transformers' card data: the training recipe's stages
    (saved beside the model in ``bitembed.json``, set by ``st-bitembed train``) and the evaluation at every
    precision (set by :func:`~st_bitembed.evaluation.evaluate_precisions`). ``BitEmbed.save`` renders the card.

    Args:
        training_recipe: One ``{"name", "description"}`` per stage (convert, pretrain, finetune).
        evaluation_report: Scores per task and precision (trained head, post-hoc baseline, teacher).
    """

    training_recipe: list[dict[str, str]] | None = None
    evaluation_report: EvaluationReport | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        # sentence-transformers' own card metadata is built from this; ours renders these two itself.
        data = super().to_dict()
        data.pop("training_recipe", None)
        data.pop("evaluation_report", None)
        return data


TEMPLATE = "bitembed.md.jinja"
PLOT_FILE = "precision_scores.png"
TAGS = [
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "bitnet",
    "ternary",
    "1.58-bit",
    "embeddings",
    "st-bitembed",
]


def _model_index(report: EvaluationReport, model_name: str) -> list[dict[str, Any]]:
    """mteb results in the Hub's model-index format: one entry per task, one metric per method and precision."""
    results = []
    for task in report.tasks:
        scores = [s for s in report.scores if s.task == task and s.method == "head"]
        first = scores[0]
        results.append(
            {
                "task": {"type": first.task_type},
                "dataset": {"name": f"MTEB {task}", "type": first.dataset or task, "split": "test"},
                "metrics": [
                    {"type": s.metric, "value": round(100 * s.score, 2), "name": f"{s.metric} ({s.precision})"}
                    for s in scores
                ],
            }
        )
    return [{"name": model_name, "results": results}]


def render_model_card(model: BitEmbed, repo_id: str | None = None, report: EvaluationReport | None = None) -> str:
    """The README.md of ``model``: YAML metadata, usage, precision / storage / score table, recipe, citation."""
    from jinja2 import Template

    from st_bitembed.modules.subln_transformer import SubLNTransformer

    card_data = model.model_card_data
    base_model = card_data.base_model
    repo_id = repo_id or card_data.model_id or "path/to/model"
    model_name = repo_id.rsplit("/", 1)[-1]
    portable = not isinstance(model[0], SubLNTransformer)
    metadata: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": TAGS,
    }
    if base_model:
        metadata["base_model"] = base_model
        # Weights trained from the base model's (by distillation): a fine-tune in the Hub's model tree.
        metadata["base_model_relation"] = "finetune"
    if card_data.language:
        metadata["language"] = card_data.language
    if card_data.license:
        metadata["license"] = card_data.license
    datasets = [d["id"] for d in card_data.train_datasets if d.get("id")] if card_data.train_datasets else []
    if datasets:
        metadata["datasets"] = datasets
    if report is not None and report.scores:
        metadata["model-index"] = _model_index(report, model_name)
    pooling = next((m.pooling_mode for m in model if hasattr(m, "pooling_mode")), "its")
    dimension = model.get_embedding_dimension()
    context = {
        "metadata": yaml.safe_dump(metadata, sort_keys=False).strip(),
        "model_name": model_name,
        "repo_id": repo_id,
        "base_model": base_model,
        "portable": portable,
        "num_layers": getattr(model[0].auto_model.config, "num_hidden_layers", "all"),
        "norm_description": "an RMSNorm in front of o_proj and down_proj (SubLN)"
        if not portable
        else "an RMSNorm in front of every quantized projection",
        "pooling": {"lasttoken": "last-token (EOS)"}.get(str(pooling), str(pooling)),
        "dimension": dimension,
        "bytes_int4": model.bytes_per_vector("int4"),
        "nested_codes": model.quantizer.nested,
        "results_table": report.to_markdown() if report is not None and report.scores else None,
        "storage_rows": [
            {"precision": p.name, "bits": p.bits, "bytes": model.bytes_per_vector(p)}
            for p in PRECISIONS.values()
            if not p.unsigned  # an unsigned layout stores its signed twin's codes in the same bytes
        ],
        "recipe": card_data.training_recipe,
        "teacher": report.teacher_name if report is not None else None,
        "architecture": str(model),
    }
    template = Template((files("st_bitembed.model_cards") / TEMPLATE).read_text(), trim_blocks=True)
    return template.render(**context)


def validate_model_card(text: str) -> ModelCard:
    """Check the card's metadata as the Hub would: YAML header, required keys, and a parseable model-index.

    Raises:
        ValueError: naming what is missing or malformed.
    """
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    missing = [key for key in ("library_name", "pipeline_tag", "tags") if not data.get(key)]
    if missing:
        raise ValueError(f"Model card metadata lacks {missing}.")
    if data.get("model-index"):
        model_index_to_eval_results(data["model-index"])
    return card


def write_model_card(
    model: BitEmbed, model_dir: str | Path, report: EvaluationReport | None = None, repo_id: str | None = None
) -> Path:
    """Render, validate and write ``model_dir/README.md`` (and the precision plot next to it, if any)."""
    model_dir = Path(model_dir)
    text = render_model_card(model, repo_id, report)
    validate_model_card(text)
    (model_dir / "README.md").write_text(text)
    if report is not None and report.plot_path and Path(report.plot_path).is_file():
        if Path(report.plot_path).resolve() != (model_dir / PLOT_FILE).resolve():
            shutil.copy(report.plot_path, model_dir / PLOT_FILE)
    return model_dir / "README.md"


def push_to_hub(model_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload ``model_dir`` to the Hub repository ``repo_id`` (created if needed). Never modifies the folder.

    Raises:
        ConnectionError: the Hub is offline or unreachable.
        FileNotFoundError: ``model_dir`` is not a saved model.
    """
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved sentence-transformers model (no modules.json).")
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            f"Cannot push {model_dir} to {repo_id}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1). "
            "The local folder is unchanged; push again with the Hub reachable."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, commit_message="Upload BitEmbed model")
    except HfHubHTTPError:
        raise  # the Hub answered (authentication, permissions, ...): its message says what to do
    except Exception as error:
        raise ConnectionError(
            f"Cannot push {model_dir} to {repo_id}: the Hugging Face Hub could not be reached "
            f"({type(error).__name__}: {error}). The local folder is unchanged."
        ) from error
    return commit.commit_url
