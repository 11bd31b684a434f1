"""Mean score against bits per dimension (the paper's Figure 1), with bytes per vector and the teacher."""

from __future__ import annotations

from pathlib import Path

from st_bitembed.evaluation.report import METHOD_LABELS, EvaluationReport
from st_bitembed.precisions import get_precision


def plot_precision_scores(report: EvaluationReport, path: str | Path) -> Path:
    """Write a PNG of mean main score (x100) vs bits per dimension, one line per method, the teacher dashed."""
    # A Figure of its own, not pyplot: the caller's matplotlib backend and open figures stay as they were.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    axis = figure.subplots()
    for method, marker in (("head", "o"), ("posthoc", "s")):
        # An unsigned layout scores exactly as its signed twin: one point per distinct code.
        points = sorted(
            (get_precision(p).bits, 100 * m, p)
            for p in report.precisions(method)
            if not get_precision(p).unsigned and (m := report.mean_score(method, p)) is not None
        )
        if not points:
            continue
        bits, scores, precisions = zip(*points)
        axis.plot(bits, scores, marker=marker, label=f"{report.model_name} ({METHOD_LABELS[method]})")
        if method == "head":
            for bit, score, precision in points:
                axis.annotate(
                    f"{precision}\n{report.bytes_per_vector(precision)} B",
                    (bit, score),
                    textcoords="offset points",
                    xytext=(0, 8),
                    ha="center",
                    fontsize=7,
                )
    teacher = [report.mean_score("teacher", p) for p in report.precisions("teacher")]
    if teacher and teacher[0] is not None:
        axis.axhline(100 * teacher[0], color="gray", linestyle="--", label=f"teacher: {report.teacher_name}")
    axis.set_xscale("log", base=2)
    axis.set_xticks([1, 2, 4, 8, 16, 32], labels=["1", "2", "4", "8", "16", "32"])
    axis.set_xlabel("bits per dimension")
    axis.set_ylabel(f"mean main score x 100 ({len(report.tasks)} tasks)")
    axis.set_title("Score vs storage precision")
    axis.margins(y=0.15)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
