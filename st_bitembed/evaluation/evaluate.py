"""mteb evaluation of a BitEmbed model at every storage precision, from one encoding pass."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from st_bitembed.evaluation.encoders import EncodeOnce, QuantizedEncoder
from st_bitembed.evaluation.plot import plot_precision_scores
from st_bitembed.evaluation.report import EvaluationReport, Score
from st_bitembed.model import BitEmbed
from st_bitembed.precisions import DEFAULT_PRECISIONS, PrecisionName, get_precision
from st_bitembed.quantization.bitlinear import BitLinear

logger = logging.getLogger(__name__)

REPORT_FILES = {"json": "results.json", "markdown": "results.md", "plot": "precision_scores.png"}


def model_label(model: SentenceTransformer, name_or_path: str | None = None) -> str:
    """An mteb model name ("org/name") for a Hub id or a local folder."""
    name = name_or_path or getattr(model.model_card_data, "model_id", None) or model.model_card_data.base_model
    name = str(name or "model").rstrip("/")
    if name.count("/") == 1 and not os.path.exists(name):
        return name
    folder = Path(name)
    # a package's generic "model" folder says less than its parent's name
    return f"local/{folder.parent.name if folder.name == 'model' and folder.parent.name else folder.name}"


@torch.no_grad()
def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A short hash of what the modules compute with: every parameter and buffer, and for each BitLinear its ternary
    codes and scale instead of its latent weight (so a model that freed its latent weights hashes like one that
    kept them). Results are cached under it: a model retrained or converted again under the same name is scored
    anew, never given the scores of the model that was there before."""
    digest = hashlib.blake2b(digest_size=6)
    for module in (child for module in modules for child in module.modules()):
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, BitLinear):
            tensors = [t for t in tensors if t is not module.weight] + list(module.ternary_codes())
        for tensor in tensors:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _resolve_tasks(tasks: Sequence | None, benchmark: str | None, languages: Sequence[str] | None = None) -> list:
    import mteb

    if (tasks is None) == (benchmark is None):
        raise ValueError("Pass either tasks (names or mteb task objects) or benchmark (e.g. 'MTEB(eng, v2)').")
    resolved = (
        list(mteb.get_benchmark(benchmark).tasks)
        if benchmark is not None
        else [mteb.get_task(task) if isinstance(task, str) else task for task in tasks]
    )
    if not languages:
        return resolved
    # Only the subsets wholly in these languages (en-en, not en-de, for ["eng"]); tasks with none are dropped.
    kept = []
    for task in resolved:
        try:
            kept.append(task.filter_languages(languages, exclusive_language_filter=True))
        except ValueError:  # mteb: no subset of the task is in these languages
            logger.info("Skipping %s: no subset in %s", task.metadata.name, ", ".join(languages))
    if not kept:
        raise ValueError(f"None of the tasks has a subset in the languages {list(languages)} (ISO 639-3, e.g. 'eng').")
    return kept


def _scores(encoder, tasks: list, method: str, precision: str, cache, batch_size: int, progress: bool) -> list[Score]:
    import mteb

    result = mteb.evaluate(
        encoder,
        tasks,
        cache=cache,
        overwrite_strategy="only-missing",
        encode_kwargs={"batch_size": batch_size},
        show_progress_bar=progress,
    )
    metadata = {task.metadata.name: task.metadata for task in tasks}
    return [
        Score(
            method=method,
            precision=precision,
            task=task_result.task_name,
            task_type=metadata[task_result.task_name].type,
            metric=metadata[task_result.task_name].main_score,
            score=float(task_result.get_score()),
            dataset=metadata[task_result.task_name].dataset.get("path", ""),
        )
        for task_result in result.task_results
    ]


def evaluate_precisions(
    model: str | BitEmbed,
    *,
    tasks: Sequence | None = None,
    benchmark: str | None = None,
    precisions: Sequence[PrecisionName] = DEFAULT_PRECISIONS,
    teacher: str | SentenceTransformer | None = None,
    output_dir: str | Path = "bitembed-eval",
    posthoc: bool = True,
    batch_size: int = 32,
    show_progress_bar: bool = False,
    name: str | None = None,
    teacher_name: str | None = None,
    languages: Sequence[str] | None = None,
) -> EvaluationReport:
    """Evaluate ``model`` with mteb at each storage precision; write a JSON and markdown table and a PNG plot.

    Every text is encoded once (:class:`~st_bitembed.evaluation.encoders.EncodeOnce`); each precision
    is then derived from that float output by the model's Quantize head (a deterministic function of it), so five
    precisions cost about one encoding pass. Results go to an mteb ``ResultCache`` under ``output_dir/mteb``, one
    namespace per method, precision and model weights (:func:`weights_fingerprint`: reruns of the same model skip
    what is done; another model under the same name is evaluated). With ``posthoc=True`` the same float embeddings
    are also quantized after the fact (:func:`~st_bitembed.evaluation.encoders.posthoc_quantize`), the baseline that
    shows what the trained head adds. A ``teacher`` is evaluated at float32, as the reference line.

    Args:
        model: A BitEmbed model or its path / Hub id.
        tasks: mteb task names (e.g. ``["STSBenchmark", "SciFact"]``) or task objects; or ``benchmark``.
        benchmark: An mteb benchmark name, e.g. ``"MTEB(eng, v2)"`` (needs the Hub, or its datasets cached).
        precisions: Storage precisions, from :data:`st_bitembed.PRECISIONS`.
        teacher: Full-precision reference model (or its path / Hub id).
        output_dir: Where mteb results, ``results.json``, ``results.md`` and the plot go.
        posthoc: Also evaluate the post-hoc quantization baseline.
        batch_size: Encoding batch size.
        show_progress_bar: Show mteb's progress bars.
        name: The model's name in results ("org/name"); by default its Hub id or folder name.
        teacher_name: The teacher's name in results and plots; by default its Hub id or folder name.
        languages: Evaluate only the subsets of these languages (ISO 639-3 codes, e.g. ``["eng"]``); tasks with
            none of them are skipped.

    Returns:
        The scores of every task, method and precision.
    """
    from mteb.cache import ResultCache
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    for precision in precisions:
        get_precision(precision)
    tasks = _resolve_tasks(tasks, benchmark, languages)
    path = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = BitEmbed(model)
    label = name or model_label(model, path)
    output_dir = Path(output_dir)
    cache = ResultCache(output_dir / "mteb")
    report = EvaluationReport(model_name=label, embedding_dimension=model.get_embedding_dimension())
    encoder = EncodeOnce(SentenceTransformerEncoderWrapper(model))
    fingerprint = weights_fingerprint(model, model.quantizer)
    rows = [("head", p) for p in precisions] + [("posthoc", p) for p in precisions if posthoc and p != "float32"]
    if teacher is not None:
        teacher_path = teacher if isinstance(teacher, str) else None
        teacher = SentenceTransformer(teacher) if isinstance(teacher, str) else teacher
        report.teacher_name = teacher_name or model_label(teacher, teacher_path)
        teacher_encoder = QuantizedEncoder(
            SentenceTransformerEncoderWrapper(teacher),
            "float32",
            report.teacher_name,
            "teacher",
            fingerprint=weights_fingerprint(teacher),
        )

    for number, task in enumerate(tasks, 1):  # task by task, so that only one task's embeddings are held in memory
        logger.info("Task %d/%d: %s (%s)", number, len(tasks), task.metadata.name, ", ".join(task.hf_subsets))
        for method, precision in rows:
            logger.debug("Evaluating %s on %s at %s (%s)", label, task.metadata.name, precision, method)
            wrapped = QuantizedEncoder(encoder, precision, label, method, model.quantizer, fingerprint)
            report.scores += _scores(wrapped, [task], method, precision, cache, batch_size, show_progress_bar)
        encoder.clear()
        if teacher is not None:
            report.scores += _scores(
                teacher_encoder, [task], "teacher", "float32", cache, batch_size, show_progress_bar
            )

    output_dir.mkdir(parents=True, exist_ok=True)
    report.plot_path = str(plot_precision_scores(report, output_dir / REPORT_FILES["plot"]))
    report.save(output_dir / REPORT_FILES["json"])
    (output_dir / REPORT_FILES["markdown"]).write_text(report.to_markdown() + "\n")
    model.model_card_data.evaluation_report = report  # model.save() now writes these results into its model card
    return report
