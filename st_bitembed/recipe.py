"""Recipe files for ``st-bitembed train``: a typed schema, loaded from YAML or JSON and validated strictly.

Unknown keys are errors (a typo must not silently fall back to a default), at every level, with the path of the key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from st_bitembed.losses.bitembed import RENAMED_WEIGHTS, BitEmbedLoss, renamed
from st_bitembed.precisions import DEFAULT_PRECISIONS, KL_DEFAULT_PRECISIONS, get_precision

RECIPE_PACKAGE = "st_bitembed.recipes"
# The training stages a recipe may have, in the order they run.
TRAINING_STAGES = ("pretrain", "finetune")


class RecipeError(ValueError):
    """A recipe that cannot run, with the key path that is wrong."""


class RecipeLoader(yaml.SafeLoader):
    """YAML as recipes are written: ``1e-4`` is a number, as in YAML 1.2 and JSON (PyYAML follows YAML 1.1, where a
    float needs a dot, ``1.0e-4``, and ``1e-4`` is the string "1e-4")."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class DatasetSpec:
    """A Hub dataset (``name`` / ``config`` / ``split``) or a local file (``path``: json, jsonl, csv or parquet,
    optionally compressed: ``.jsonl.gz``). Rows with an empty or missing value in one of the ``columns`` are left
    out."""

    name: str | None = None
    config: str | None = None
    split: str = "train"
    path: str | None = None
    columns: list[str] = field(default_factory=list)
    max_rows: int | None = None
    # Join every ``concatenate`` consecutive rows of each column into one passage: long training texts from a
    # dataset of sentences (row i of every column still belongs together).
    concatenate: int = 1

    @property
    def label(self) -> str:
        """The Hub name, or the local file's name."""
        return self.name or Path(self.path).name


@dataclass
class LossSpec:
    """Weights and options of :class:`~st_bitembed.losses.BitEmbedLoss`: its keyword arguments, with its defaults."""

    infonce: float = 1.0
    similarity_kl: float = 0.0
    attention_relation: float = 0.0
    embedding_distill: float = 0.0
    temperature: float = 0.05
    symmetric: bool = False
    student_temperature: float = 0.05
    teacher_temperature: float = 0.05
    teacher_layer: int = -1
    student_layer: int = -1
    relation_heads: int | None = None
    hidden_states: float = 0.0
    hidden_state_layers: list[int] | None = None
    precisions: list[str] = field(default_factory=lambda: list(DEFAULT_PRECISIONS))
    precision_weights: list[float] | None = None
    kl_precisions: list[str] = field(default_factory=lambda: list(KL_DEFAULT_PRECISIONS))


@dataclass
class TrainingSpec:
    """SentenceTransformerTrainingArguments of one stage (the rest keep their defaults)."""

    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    save_steps: int = 100
    seed: int = 0
    bf16: bool = False
    gather_across_devices: bool = False
    # Keep the token embeddings fixed: a large vocabulary (Gemma3: 262k x 640) dominates the optimizer's work.
    freeze_embeddings: bool = False
    # Dropout probability of every dropout layer of the student while it trains (None: the backbone's own, e.g.
    # all-MiniLM-L6-v2's 0.1); the saved model's config keeps the backbone's. Distilling token by token from a teacher
    # that runs without dropout, 0 gives the student the same inputs as its targets.
    dropout: float | None = None
    # Truncate training texts to this many tokens (the saved model keeps its own max_seq_length): on CPU a batch
    # costs in proportion to its longest text, and long passages teach long inputs well before their end.
    max_seq_length: int | None = None


@dataclass
class StageSpec:
    # One dataset, or several mixed in one stage (each batch from one of them, in proportion to their sizes).
    dataset: DatasetSpec | list[DatasetSpec]
    loss: LossSpec = field(default_factory=LossSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    # Encode every text with the teacher once, before training (moot with hidden_states > 0 and no token_teacher: the
    # teacher runs on every batch then, and those passes give the pooled targets).
    precompute_teacher_embeddings: bool = True


@dataclass
class BackboneSpec:
    name: str
    norm: str = "all"
    pooling: str | None = None
    eos_token: str | None = None
    max_seq_length: int | None = None
    nested_codes: bool = False


@dataclass
class CalibrationSpec:
    dataset: DatasetSpec
    texts: int = 256


@dataclass
class EvaluationSpec:
    tasks: list[str] = field(default_factory=list)
    benchmark: str | None = None
    precisions: list[str] = field(default_factory=lambda: list(DEFAULT_PRECISIONS))
    posthoc: bool = False
    batch_size: int = 64


@dataclass
class Recipe:
    name: str
    backbone: BackboneSpec
    output_dir: str
    teacher: str | None = None
    # The model the token-level terms (hidden states, attention relations) learn from, when the teacher cannot teach
    # token by token (another tokenizer or hidden size): e.g. the backbone's own full-precision model. The pooled
    # terms keep the teacher's embeddings, encoded before training. None: the teacher teaches both.
    token_teacher: str | None = None
    calibration: CalibrationSpec | None = None
    pretrain: StageSpec | None = None
    finetune: StageSpec | None = None
    evaluation: EvaluationSpec | None = None
    description: str = ""
    # What the model card's metadata says of the trained model (ISO 639-1 codes; a Hub licence identifier).
    language: list[str] = field(default_factory=list)
    license: str | None = None

    def training_stages(self) -> list[NamedStage]:
        """The training stages this recipe has, in the order they run."""
        return [NamedStage(name, getattr(self, name)) for name in TRAINING_STAGES if getattr(self, name) is not None]


class NamedStage(NamedTuple):
    """A training stage of a recipe with its name (its key in the recipe, its folder in the output)."""

    name: str
    spec: StageSpec


def _build(kind: Any, value: Any, where: str) -> Any:
    """Build ``kind`` (a dataclass or a typing form) from plain data, rejecting unknown keys and wrong types."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _build(option, value, where)
            except RecipeError as error:
                errors.append(str(error))
        # The error of the option the value was shaped like (a mapping, a list), not "expected a list".
        shaped = [e for e in errors if not e.startswith(f"{where}: expected")]
        raise RecipeError((shaped or errors)[0])
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}.")
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}.")
        required = [
            f.name
            for f in dataclasses.fields(kind)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in value]
        if missing:
            raise RecipeError(f"{where}: missing required key(s) {missing}.")
        return kind(**{key: _build(hints[key], item, f"{where}.{key}") for key, item in value.items()})
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}.")
        (item_kind,) = typing.get_args(kind)
        return [_build(item_kind, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (str, int, float, bool) and not (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    ):
        raise RecipeError(f"{where}: expected {kind.__name__}, got {value!r}.")
    return value


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as plain data (as read from YAML or JSON).

    Raises:
        RecipeError: with the path of the first wrong key.
    """
    for stage_name in TRAINING_STAGES:
        _rename_loss_weights(data.get(stage_name), f"{source}.{stage_name}.loss")
    recipe = _build(Recipe, data, source)
    for stage_name, stage in recipe.training_stages():
        weights = dataclasses.asdict(stage.loss)
        needs = BitEmbedLoss.needs(weights)
        least_columns = 2 if needs.pairs else 1
        if stage.dataset == []:
            raise RecipeError(f"{source}.{stage_name}.dataset: an empty list; name at least one dataset.")
        for where, spec in stage_datasets(stage, f"{source}.{stage_name}.dataset"):
            if spec.concatenate < 1:
                raise RecipeError(f"{where}.concatenate: must be >= 1, got {spec.concatenate}.")
            if (spec.name is None) == (spec.path is None):
                raise RecipeError(f"{where}: give exactly one of name (Hub) or path (local file).")
            if len(spec.columns) < least_columns:
                pairs = BitEmbedLoss.terms_that_need(weights, "pairs")
                raise RecipeError(
                    f"{where}.columns: name the (query, positive[, negatives]) columns: {', '.join(pairs)} rank "
                    "queries against documents (one text column is enough for the other terms alone)."
                )
        dropout = stage.training.dropout
        if dropout is not None and not 0 <= dropout < 1:
            raise RecipeError(f"{source}.{stage_name}.training.dropout: a probability in [0, 1), got {dropout}.")
        if not BitEmbedLoss.active_terms(weights):
            raise RecipeError(f"{source}.{stage_name}.loss: every weight is 0; turn at least one loss term on.")
        for key in ("precisions", "kl_precisions"):
            _check_precisions(getattr(stage.loss, key), f"{source}.{stage_name}.loss.{key}")
        unused = BitEmbedLoss.unused_kl_precisions(weights, stage.loss.kl_precisions)
        if unused:
            raise RecipeError(f"{source}.{stage_name}.loss.kl_precisions: {unused}")
        token_terms = BitEmbedLoss.terms_that_need(weights, "teacher_in_loss")
        pooled_terms = BitEmbedLoss.pooled_terms(weights)
        if token_terms and recipe.teacher is None and recipe.token_teacher is None:
            raise RecipeError(
                f"{source}.{stage_name}.loss: {', '.join(token_terms)} > 0 needs a top-level teacher or token_teacher."
            )
        if pooled_terms and recipe.teacher is None:
            raise RecipeError(f"{source}.{stage_name}.loss: {', '.join(pooled_terms)} > 0 needs a top-level teacher.")
    token_level = any(
        BitEmbedLoss.terms_that_need(dataclasses.asdict(stage.loss), "teacher_in_loss")
        for _, stage in recipe.training_stages()
    )
    if recipe.token_teacher is not None and not token_level:
        raise RecipeError(
            f"{source}.token_teacher: no stage has a token-level term on (hidden_states, attention_relation), so it "
            "would be unused; turn one on or remove token_teacher."
        )
    if recipe.evaluation is not None and not recipe.evaluation.tasks and recipe.evaluation.benchmark is None:
        raise RecipeError(f"{source}.evaluation: give tasks or a benchmark.")
    if recipe.evaluation is not None:
        _check_precisions(recipe.evaluation.precisions, f"{source}.evaluation.precisions")
    return recipe


def _check_precisions(names: list[str], where: str) -> None:
    """Unknown precision names fail here, before any work, not in the middle of a run."""
    for name in names:
        try:
            get_precision(name)
        except ValueError as error:
            raise RecipeError(f"{where}: {error}") from None


def _rename_loss_weights(stage: Any, where: str) -> None:
    """Move a stage's loss weights given under their names before 0.2 (alpha, beta, gamma) to today's, warning."""
    loss = stage.get("loss") if isinstance(stage, dict) else None
    if not isinstance(loss, dict):
        return
    old = {key: loss[key] for key in RENAMED_WEIGHTS if key in loss}
    both = [f"{key} and {RENAMED_WEIGHTS[key]}" for key in old if RENAMED_WEIGHTS[key] in loss]
    if both:
        raise RecipeError(f"{where}: {', '.join(both)} are the same weight (old and new name); keep only the new one.")
    for key, value in renamed(old, where).items():
        loss[key] = value
    for key in old:
        del loss[key]


def stage_datasets(stage: StageSpec, where: str) -> list[tuple[str, DatasetSpec]]:
    """The stage's datasets, each with its key path in the recipe."""
    if isinstance(stage.dataset, DatasetSpec):
        return [(where, stage.dataset)]
    return [(f"{where}[{i}]", spec) for i, spec in enumerate(stage.dataset)]


def builtin_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in files(RECIPE_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` of ``overrides`` set (the value read as YAML: numbers, lists, null).

    Raises:
        RecipeError: an override without ``=``, or one whose path runs through a value that is not a mapping.
    """
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise RecipeError(
                f"Override {override!r}: write it as key.path=value, e.g. finetune.training.max_steps=50."
            )
        *parents, last = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"Override {override!r}: {'.'.join(parents[: depth + 1])} is not a mapping.")
        node[last] = yaml.load(text, RecipeLoader)
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a built-in recipe by name (``minilm-cpu``, ``qwen3-0.6b``, ``gemma3-270m``) or a YAML / JSON file, with
    ``overrides`` (``key.path=value``) applied before validation."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    elif name_or_path in builtin_recipes():
        text = (files(RECIPE_PACKAGE) / f"{name_or_path}.yaml").read_text()
    else:
        raise RecipeError(
            f"No recipe file {name_or_path!r}, and no built-in recipe of that name ({builtin_recipes()})."
        )
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, RecipeLoader)
        return parse_recipe(apply_overrides(data, overrides or []), path.stem)
    except (ValueError, yaml.YAMLError) as error:  # RecipeError included
        raise RecipeError(f"{name_or_path}: {error}") from None
