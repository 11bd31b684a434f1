"""Evaluation results by task and precision: JSON, markdown tables, means."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean

from st_bitembed.precisions import get_precision

METHOD_LABELS = {"head": "BitEmbed head", "posthoc": "post-hoc", "teacher": "teacher"}


@dataclass(frozen=True)
class Score:
    """One main score: a model (``method``: "head", "posthoc" or "teacher") at one precision on one task."""

    method: str
    precision: str
    task: str
    task_type: str
    metric: str
    score: float
    dataset: str = ""


@dataclass
class EvaluationReport:
    """Main scores of a model at every precision (trained head and post-hoc baseline), and of its teacher."""

    model_name: str
    embedding_dimension: int
    scores: list[Score] = field(default_factory=list)
    teacher_name: str | None = None
    plot_path: str | None = None

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(s.task for s in self.scores))

    def precisions(self, method: str = "head") -> list[str]:
        return list(dict.fromkeys(s.precision for s in self.scores if s.method == method))

    def score(self, method: str, precision: str, task: str) -> float | None:
        return next(
            (s.score for s in self.scores if (s.method, s.precision, s.task) == (method, precision, task)), None
        )

    def mean_score(self, method: str, precision: str) -> float | None:
        values = [s.score for s in self.scores if s.method == method and s.precision == precision]
        return mean(values) if values and len(values) == len(self.tasks) else None

    def bytes_per_vector(self, precision: str) -> int:
        return get_precision(precision).bytes_per_vector(self.embedding_dimension)

    def rows(self) -> list[tuple[str, str]]:
        """(method, precision) rows in display order: teacher, then the head's, then the post-hoc baseline's."""
        order = ["teacher", "head", "posthoc"]
        return [(m, p) for m in order for p in self.precisions(m)]

    def to_markdown(self) -> str:
        """Table of main scores (x100) by task, with the mean, bits and bytes per vector of each row."""
        tasks = self.tasks
        header = ["model", "precision", "bits", "bytes/vector", *tasks, "mean"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, precision in self.rows():
            cells = [self.score(method, precision, task) for task in tasks]
            average = self.mean_score(method, precision)
            lines.append(
                "| "
                + " | ".join(
                    [
                        METHOD_LABELS[method],
                        precision,
                        str(get_precision(precision).bits),
                        str(self.bytes_per_vector(precision)),
                        *(f"{100 * c:.2f}" if c is not None else "-" for c in cells),
                        f"{100 * average:.2f}" if average is not None else "-",
                    ]
                )
                + " |"
            )
        types = ", ".join(f"{t} ({s.task_type})" for t, s in {s.task: s for s in self.scores}.items())
        return "\n".join(lines) + f"\n\nTasks: {types}. Scores are each task's mteb main score x 100."

    def to_markdown_with_shares(self) -> str:
        """:meth:`to_markdown`, then the trained head's mean at each precision as a share of the teacher's."""
        teacher_mean = self.mean_score("teacher", "float32")
        lines = [self.to_markdown()]
        if teacher_mean:
            shares = [
                f"{p}: {100 * m / teacher_mean:.1f}%"
                for p in self.precisions("head")
                if (m := self.mean_score("head", p)) is not None
            ]
            lines.append(f"\nStudent mean as a share of the teacher's ({100 * teacher_mean:.2f}): {', '.join(shares)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "embedding_dimension": self.embedding_dimension,
            "teacher_name": self.teacher_name,
            "plot_path": self.plot_path,
            "scores": [asdict(s) for s in self.scores],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        data = json.loads(Path(path).read_text())
        return cls(
            model_name=data["model_name"],
            embedding_dimension=data["embedding_dimension"],
            teacher_name=data.get("teacher_name"),
            plot_path=data.get("plot_path"),
            scores=[Score(**s) for s in data["scores"]],
        )
