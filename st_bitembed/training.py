"""The BitEmbed recipe: convert -> calibrate -> continual contrastive pre-training -> distillation fine-tuning ->
evaluation, every stage through SentenceTransformerTrainer."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, load_dataset
from safetensors import safe_open
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import AutoTokenizer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from st_bitembed.evaluation import evaluate_precisions
from st_bitembed.hub import check_model_source
from st_bitembed.losses import BitEmbedLoss
from st_bitembed.losses.teacher import same_tokenizer
from st_bitembed.model import BitEmbed
from st_bitembed.quantization.calibration import calibrate_inserted_norms
from st_bitembed.recipe import DatasetSpec, Recipe, RecipeError, StageSpec, stage_datasets
from st_bitembed.saving import check_target, holds_model

logger = logging.getLogger(__name__)

# The teacher's embeddings of a stage's texts, saved in the stage's folder for a resumed run.
TEACHER_EMBEDDINGS_FILE = "teacher_embeddings.safetensors"

STAGES: tuple[str, ...] = ("convert", "pretrain", "finetune", "evaluate")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Compressed text files that datasets' json and csv builders read as they are.
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def load_columns(spec: DatasetSpec, where: str) -> Dataset:
    """The dataset of ``spec`` reduced to its ``columns`` (in that order), to rows with a text in every one of them,
    and to ``max_rows``.

    Raises:
        RecipeError: a named column is missing (the message lists the dataset's columns).
    """
    if spec.path is not None:
        path = Path(spec.path)
        suffix = Path(path.stem).suffix if path.suffix in COMPRESSIONS else path.suffix
        if suffix not in LOCAL_FORMATS or (path.suffix in COMPRESSIONS and suffix == ".parquet"):
            raise RecipeError(
                f"{where}.path: unsupported file type {''.join(path.suffixes)!r}; use one of {sorted(LOCAL_FORMATS)} "
                f"(json, jsonl and csv also compressed: {', '.join(COMPRESSIONS)})."
            )
        if not path.is_file():
            raise RecipeError(f"{where}.path: no file {spec.path} (relative paths start where st-bitembed runs).")
        dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(spec.name, spec.config, split=spec.split)
    columns = spec.columns or dataset.column_names
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise RecipeError(f"{where}.columns: {missing} not in the dataset, whose columns are {dataset.column_names}.")
    dataset = dataset.select_columns(columns)
    complete = dataset.filter(
        lambda row: all(isinstance(row[c], str) and row[c].strip() for c in columns), desc="dropping empty texts"
    )
    if len(complete) < len(dataset):
        logger.info("%s: left out %d rows without a text in every column", where, len(dataset) - len(complete))
    dataset = complete
    if spec.max_rows is not None:
        dataset = dataset.select(range(min(spec.max_rows, len(dataset))))
    if spec.concatenate > 1:
        size = spec.concatenate
        dataset = dataset.map(
            lambda batch: {c: [" ".join(batch[c])] for c in columns},
            batched=True,
            batch_size=size,
            drop_last_batch=True,
            desc=f"joining {size} rows into passages",
        )
    return dataset


def preflight(recipe: Recipe) -> dict[str, Any]:
    """Every check that can fail, before any training: models exist, datasets and columns, tokenizers.

    Returns the loaded datasets: a list per training stage, the calibration dataset.
    """
    _check_not_evaluation_data(recipe)
    for role, name in (
        ("backbone.name", recipe.backbone.name),
        ("teacher", recipe.teacher),
        ("token_teacher", recipe.token_teacher),
    ):
        if name is not None:
            try:
                check_model_source(name)
            except (FileNotFoundError, ConnectionError) as error:
                raise RecipeError(f"{recipe.name}.{role}: {error}") from None
    datasets = {}
    for stage_name, stage in recipe.training_stages():
        where = f"{recipe.name}.{stage_name}.dataset"
        datasets[stage_name] = [load_columns(spec, path) for path, spec in stage_datasets(stage, where)]
        weights = asdict(stage.loss)
        token_terms = BitEmbedLoss.terms_that_need(weights, "same_tokenizer")
        if token_terms:
            _check_same_tokenizer(recipe, stage_name, token_terms)
    if recipe.calibration is not None:
        datasets["calibration"] = load_columns(recipe.calibration.dataset, f"{recipe.name}.calibration.dataset")
    return datasets


def _check_not_evaluation_data(recipe: Recipe) -> None:
    """Refuse to train on a Hub dataset that the recipe's own evaluation scores (SciFact's corpus, say): its scores
    would be meaningless."""
    tasks = recipe.evaluation.tasks if recipe.evaluation is not None else []
    if not tasks:
        return
    import mteb

    evaluated = {mteb.get_task(task).metadata.dataset["path"]: task for task in tasks}
    for where, spec in (pair for name, stage in recipe.training_stages() for pair in stage_datasets(stage, name)):
        if spec.name in evaluated:
            raise RecipeError(
                f"{recipe.name}.{where}: {spec.name} is the data of the evaluation task {evaluated[spec.name]}; "
                "training on an evaluation set makes its scores meaningless. Train on other data."
            )


def _check_same_tokenizer(recipe: Recipe, stage_name: str, terms: list[str]) -> None:
    role, name = ("token_teacher", recipe.token_teacher) if recipe.token_teacher else ("teacher", recipe.teacher)
    student = AutoTokenizer.from_pretrained(recipe.backbone.name)
    teacher = AutoTokenizer.from_pretrained(name)
    if not same_tokenizer(student, teacher):
        names = ", ".join(terms)
        raise RecipeError(
            f"{recipe.name}.{stage_name}.loss.{names} > 0 (token-level distillation) needs {role} and student "
            f"to share a tokenizer: the backbone {recipe.backbone.name} uses {type(student).__name__} "
            f"({len(student)} tokens), the {role} {name} uses {type(teacher).__name__} ({len(teacher)} "
            f"tokens). Set {names} to 0, or set token_teacher to a model with the backbone's tokenizer (its own "
            "full-precision model, say)."
        )


def convert(recipe: Recipe, calibration_texts: list[str] | None) -> BitEmbed:
    """Convert the backbone; calibrate the inserted norms and the Quantize head on the calibration texts."""
    backbone = recipe.backbone
    model = BitEmbed.from_backbone(
        backbone.name,
        norm=backbone.norm,
        pooling=backbone.pooling,
        eos_token=backbone.eos_token,
        nested_codes=backbone.nested_codes,
    )
    model.model_card_data.base_model = hub_name(backbone.name)
    if backbone.max_seq_length is not None:
        model.max_seq_length = backbone.max_seq_length
    if calibration_texts:
        calibrate_inserted_norms(model, calibration_texts)
        model.calibrate_quantizer(calibration_texts)
    return model


def running_processes() -> PartialState:
    """This process among those that ``torchrun`` / ``accelerate launch`` started (or the only one). On a machine
    without an accelerator they train on CPU (gloo), as :func:`train_stage`'s trainer does."""
    return PartialState(cpu=not torch.accelerator.is_available())


def with_teacher_embeddings(
    datasets: list[Dataset],
    teacher: SentenceTransformer,
    batch_size: int,
    cache_file: Path | None = None,
    teacher_name: str = "",
    reuse: bool = False,
) -> list[Dataset]:
    """Add a ``label`` column of the teacher's embeddings of every text column, ``(n_columns, dim)`` per row, to each
    of ``datasets``.

    Each distinct text is encoded once, so the teacher's cost is paid once instead of at every training step.
    Computed embeddings are saved to ``cache_file``; with ``reuse``, embeddings saved there for the same texts and
    ``teacher_name`` are read instead of computed (a resumed stage does not encode its data again).
    """
    texts = list(
        dict.fromkeys(text for dataset in datasets for column in dataset.column_names for text in dataset[column])
    )
    fingerprint = hashlib.sha256("\0".join([teacher_name, *texts]).encode()).hexdigest()
    embeddings = _cached_embeddings(cache_file, fingerprint) if cache_file is not None and reuse else None
    if embeddings is None:
        logger.info("Encoding %d distinct texts with the teacher", len(texts))
        embeddings = teacher.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=True)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial = cache_file.with_name(cache_file.name + ".partial")
            save_file({"embeddings": torch.from_numpy(embeddings)}, str(partial), metadata={"texts": fingerprint})
            os.replace(partial, cache_file)  # a run killed while writing leaves no half-written cache
    else:
        logger.info("Read the teacher's embeddings of %d texts from %s", len(texts), cache_file)
    index = {text: i for i, text in enumerate(texts)}
    labelled = []
    for dataset in datasets:
        columns = dataset.column_names
        labels = np.stack([embeddings[[index[t] for t in dataset[column]]] for column in columns], axis=1)
        labelled.append(dataset.add_column("label", labels.tolist()))
    return labelled


def _cached_embeddings(cache_file: Path, fingerprint: str) -> np.ndarray | None:
    if not cache_file.is_file():
        return None
    with safe_open(str(cache_file), framework="pt") as file:
        if file.metadata().get("texts") != fingerprint:  # other texts or another teacher: not these embeddings
            return None
        return file.get_tensor("embeddings").numpy()


def train_stage(
    model: BitEmbed,
    stage: StageSpec,
    datasets: list[Dataset],
    teacher: SentenceTransformer | None,
    output_dir: Path,
    resume: bool,
    teacher_name: str = "",
    token_teacher: SentenceTransformer | None = None,
) -> BitEmbed:
    """One SentenceTransformerTrainer run of ``stage`` on ``datasets`` (several: each batch from one of them, drawn
    in proportion to their sizes); the trained model is saved to ``output_dir/final``.

    The teacher's embeddings of the stage's texts are saved in ``output_dir`` (:data:`TEACHER_EMBEDDINGS_FILE`);
    with ``resume`` they are read from there when they match these texts and ``teacher_name``. ``token_teacher``
    (None: ``teacher``) is the model the token-level terms learn from."""
    options = asdict(stage.loss)
    if not BitEmbedLoss.terms_that_need(options, "teacher_in_loss"):
        token_teacher = None
    elif token_teacher is None:
        token_teacher = teacher
    # Hidden-state distillation runs the teacher on every batch anyway, and those passes give the pooled targets too:
    # encoding the whole dataset beforehand would only add the cost of the texts the stage never reaches. Not so when
    # the token-level terms learn from another model.
    pooled_from_token_passes = options["hidden_states"] > 0 and token_teacher is teacher
    needs_teacher_embeddings = bool(BitEmbedLoss.pooled_terms(options)) and not pooled_from_token_passes
    processes = running_processes()
    if needs_teacher_embeddings and stage.precompute_teacher_embeddings:
        cache_file = output_dir / TEACHER_EMBEDDINGS_FILE
        with processes.main_process_first():  # the main process encodes and saves them, the others read them
            datasets = with_teacher_embeddings(
                datasets,
                teacher,
                stage.training.batch_size,
                cache_file,
                teacher_name,
                reuse=resume or not processes.is_main_process,
            )
    pooled_in_loss = needs_teacher_embeddings and not stage.precompute_teacher_embeddings
    teacher_in_loss = pooled_in_loss or (token_teacher is not None and token_teacher is teacher)
    spec = stage.training
    # LossSpec's fields are BitEmbedLoss's keyword arguments, by design.
    loss = BitEmbedLoss(
        model,
        teacher=teacher_for_training(teacher, spec.bf16) if teacher_in_loss else None,
        token_teacher=None if token_teacher is teacher else teacher_for_training(token_teacher, spec.bf16),
        gather_across_devices=spec.gather_across_devices,
        **options,
    )
    if spec.freeze_embeddings:
        model[0].auto_model.get_input_embeddings().requires_grad_(False)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup_ratio,  # transformers 5 takes the ratio here (warmup_ratio is deprecated)
        weight_decay=spec.weight_decay,
        lr_scheduler_type=spec.lr_scheduler,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        logging_steps=spec.logging_steps,
        save_steps=spec.save_steps,
        save_total_limit=2,
        seed=spec.seed,
        bf16=spec.bf16,
        report_to="none",
        dataloader_drop_last=True,
        dataloader_pin_memory=torch.accelerator.is_available(),  # pinned memory only helps copies to a device
        use_cpu=not torch.accelerator.is_available(),  # else torchrun on a CPU-only machine trains each process alone
        batch_sampler="no_duplicates",  # duplicate texts would be false in-batch negatives
    )
    train_dataset = (
        datasets[0]
        if len(datasets) == 1
        else DatasetDict(
            {f"{i}_{spec.label}": d for i, (d, (_, spec)) in enumerate(zip(datasets, stage_datasets(stage, "")))}
        )
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    max_seq_length = model.max_seq_length
    if spec.max_seq_length is not None:
        model.max_seq_length = min(spec.max_seq_length, max_seq_length or spec.max_seq_length)
    try:
        with dropout_set_to(model, spec.dropout):
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        model.max_seq_length = max_seq_length
    processes = running_processes()  # the trainer's arguments set the processes' state up again
    if processes.is_main_process:
        model.save(str(output_dir / "final"))
    processes.wait_for_everyone()
    return model


@contextmanager
def dropout_set_to(model: torch.nn.Module, probability: float | None) -> Iterator[None]:
    """Within the block every ``nn.Dropout`` of ``model`` drops with ``probability`` (None: as they are); then each
    has its own again. Attention implementations read their dropout module's probability too (BERT's)."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    own = [layer.p for layer in layers]
    if probability is not None:
        for layer in layers:
            layer.p = probability
    try:
        yield
    finally:
        for layer, p in zip(layers, own):
            layer.p = p


def teacher_for_training(teacher: SentenceTransformer | None, bf16: bool) -> SentenceTransformer | None:
    """The teacher as a stage's loss runs it: in bf16 when the stage trains in bf16, else as it is.

    The trainer's mixed precision (accelerate's autocast) wraps the student's forward only, so a teacher run inside
    the loss would compute in float32 beside a bf16 student (on the default CPU recipe, most of a step's matrix
    products). The bf16 copy is the stage's alone: the evaluation still scores the float32 teacher."""
    if teacher is None or not bf16:
        return teacher
    return copy.deepcopy(teacher).to(torch.bfloat16)


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The trainer checkpoint in ``output_dir`` with the most steps among those written to the end.

    The trainer writes ``trainer_state.json`` last: a folder without it is a checkpoint that a killed run left half
    written, which resuming from would fail on (or silently restart from the wrong optimizer state)."""
    steps = {
        path: int(path.name.rsplit("-", 1)[-1])
        for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.name.rsplit("-", 1)[-1].isdigit()
    }
    complete = {path: step for path, step in steps.items() if (path / TRAINER_STATE_NAME).is_file()}
    for partial in steps.keys() - complete.keys():
        logger.info("Ignoring %s: a checkpoint left half written", partial)
    return str(max(complete, key=complete.get)) if complete else None


def describe_stage(
    name: str, stage: StageSpec, teacher: str | None, token_teacher: str | None = None
) -> dict[str, str]:
    terms = BitEmbedLoss.describe(asdict(stage.loss), teacher, token_teacher)
    data = " + ".join(f"{spec.label} ({', '.join(spec.columns)})" for _, spec in stage_datasets(stage, ""))
    t = stage.training
    schedule = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs} epoch(s)"
    return {
        "name": name,
        "description": f"{' + '.join(terms)}; {data}, {schedule}, batch {t.batch_size}, lr {t.learning_rate}",
    }


def run_recipe(
    recipe: Recipe, stages: tuple[str, ...] = STAGES, resume: bool = False, overwrite: bool = False
) -> tuple[BitEmbed, Any]:
    """Run ``stages`` of ``recipe``; each stage starts from the previous stage's saved model.

    With ``resume``, a stage whose final model exists is skipped and an interrupted stage continues from its last
    checkpoint. Without it, models that an earlier run saved where this one would save are only replaced with
    ``overwrite``. Returns the final model and the evaluation report (None without an evaluate stage).

    Under ``torchrun`` / ``accelerate launch`` every process runs this function: the stages train data-parallel,
    and the main process alone converts, saves and evaluates (the others return no report).

    Raises:
        FileExistsError: the output folder holds an earlier run's models, and neither ``resume`` nor ``overwrite``.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RecipeError(f"Unknown stage(s) {unknown}; stages are {list(STAGES)}.")
    output = Path(recipe.output_dir)
    if not resume:
        written = [output / "model"] + [output / "converted"] * ("convert" in stages)
        written += [output / name / "final" for name, _ in recipe.training_stages() if name in stages]
        for folder in written:
            check_target(folder, overwrite, "--resume to continue that run, or --overwrite to start over")
    datasets = preflight(recipe)
    teacher = SentenceTransformer(recipe.teacher) if recipe.teacher else None
    token_teacher = SentenceTransformer(recipe.token_teacher) if recipe.token_teacher else None
    for frozen in (teacher, token_teacher):
        if frozen is not None:
            frozen.eval()
    converted = output / "converted"
    calibration = datasets.get("calibration")
    calibration_texts = (
        [t for column in calibration.column_names for t in calibration[column]][: recipe.calibration.texts]
        if calibration
        else None
    )
    processes = running_processes()
    if processes.is_main_process and "convert" in stages and not (resume and holds_model(converted)):
        logger.info("Stage convert: %s -> %s", recipe.backbone.name, converted)
        convert(recipe, calibration_texts).save(str(converted))
    processes.wait_for_everyone()
    previous = converted
    recipe_summary = []
    for stage_name, stage in recipe.training_stages():
        final = output / stage_name / "final"
        if stage_name not in stages:
            previous = final if holds_model(final) else previous
            continue
        recipe_summary.append(describe_stage(stage_name, stage, recipe.teacher, recipe.token_teacher))
        if resume and holds_model(final):
            logger.info("Stage %s already done: %s", stage_name, final)
        else:
            if not holds_model(previous):
                raise RecipeError(f"No model at {previous} to start {stage_name} from: run the earlier stages first.")
            logger.info("Stage %s: %s -> %s", stage_name, previous, final)
            model = BitEmbed(str(previous), keep_latent_weights=True)
            if calibration_texts:  # the head's ranges start each stage fitted to the current embeddings
                model.calibrate_quantizer(calibration_texts)
            train_stage(
                model,
                stage,
                datasets[stage_name],
                teacher,
                output / stage_name,
                resume,
                recipe.teacher or "",
                token_teacher,
            )
        previous = final
    if not holds_model(previous):
        raise RecipeError(f"No model at {previous}: run the earlier stages first (st-bitembed train / pretrain).")
    model = BitEmbed(str(previous), keep_latent_weights=True)  # saved again below: with its own latent weights
    if calibration_texts and recipe_summary:
        # Training moves the embedding distribution further than the ranges' own gradient steps follow (int2
        # suffered most: 71.1 -> 75.4 STS-B after refitting, minilm-cpu); refit them to the final embeddings.
        model.calibrate_quantizer(calibration_texts)
    model.model_card_data.training_recipe = [
        {"name": "convert", "description": _convert_description(recipe)},
        *recipe_summary,
    ]
    describe_origin(model, recipe)
    report = None
    if not running_processes().is_main_process:
        return model, None
    if "evaluate" in stages and recipe.evaluation is not None:
        evaluation = recipe.evaluation
        report = evaluate_precisions(
            model,
            tasks=evaluation.tasks or None,
            benchmark=evaluation.benchmark,
            precisions=evaluation.precisions,
            teacher=teacher,
            output_dir=output / "eval",
            posthoc=evaluation.posthoc,
            batch_size=evaluation.batch_size,
            name=f"local/{recipe.name}",
            teacher_name=recipe.teacher,
        )
    model.save(str(output / "model"), model_name=f"bitembed-{recipe.name}")
    return model, report


def hub_name(name: str) -> str | None:
    """``name`` if it names a Hub repository (what the card's ``base_model`` links to), None for a local folder."""
    return None if Path(name).exists() else name


def describe_origin(model: BitEmbed, recipe: Recipe) -> None:
    """What the model card's metadata says the model was made from and with: the backbone as the recipe names it,
    the datasets of the training stages (Hub names; local files are described in the card's text), language and
    licence."""
    card_data = model.model_card_data
    card_data.base_model = hub_name(recipe.backbone.name)
    names = [spec.name for _, stage in recipe.training_stages() for _, spec in stage_datasets(stage, "") if spec.name]
    card_data.train_datasets = [{"id": name} for name in dict.fromkeys(names)]
    card_data.language = recipe.language or None
    card_data.license = recipe.license


def _convert_description(recipe: Recipe) -> str:
    calibration = recipe.calibration
    text = f"{recipe.backbone.name} -> W1.58A8 BitLinear, norm={recipe.backbone.norm}"
    if recipe.backbone.nested_codes:
        text += ", nested output codes (int4 / int2 / binary codes are the top bits of the int8 code)"
    if calibration is not None:
        data = calibration.dataset.name or calibration.dataset.path
        text += f"; inserted norms and Quantize head calibrated on {calibration.texts} texts of {data}"
    return text
