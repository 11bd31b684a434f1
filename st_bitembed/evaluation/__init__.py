from __future__ import annotations

from st_bitembed.evaluation.encoders import QuantizedEncoder, posthoc_quantize
from st_bitembed.evaluation.evaluate import evaluate_precisions
from st_bitembed.evaluation.plot import plot_precision_scores
from st_bitembed.evaluation.report import EvaluationReport, Score

__all__ = [
    "EvaluationReport",
    "QuantizedEncoder",
    "Score",
    "evaluate_precisions",
    "plot_precision_scores",
    "posthoc_quantize",
]
