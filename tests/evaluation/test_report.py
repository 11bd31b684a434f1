from __future__ import annotations

import pytest

from st_bitembed.evaluation import EvaluationReport, Score


def report() -> EvaluationReport:
    scores = [
        Score(method, precision, task, "STS", "spearman", value)
        for method, precision, task, value in [
            ("teacher", "float32", "A", 0.80),
            ("teacher", "float32", "B", 0.60),
            ("head", "float32", "A", 0.76),
            ("head", "float32", "B", 0.57),
            ("head", "int4", "A", 0.70),
            ("head", "int4", "B", 0.56),
            ("head", "binary", "A", 0.60),  # B missing: no mean for binary
        ]
    ]
    return EvaluationReport("local/m", 384, scores, teacher_name="teacher")


def test_means_bytes_and_the_share_of_the_teacher():
    result = report()
    assert result.mean_score("head", "int4") == pytest.approx(0.63) and result.mean_score("head", "binary") is None
    assert result.bytes_per_vector("int4") == 192 and result.bytes_per_vector("binary") == 48
    table = result.to_markdown_with_shares()
    assert "| BitEmbed head | int4 | 4 | 192 | 70.00 | 56.00 | 63.00 |" in table
    assert "share of the teacher's (70.00): float32: 95.0%, int4: 90.0%" in table  # binary has no mean


def test_save_and_load_round_trip(tmp_path):
    result = report()
    result.save(tmp_path / "results.json")
    assert EvaluationReport.load(tmp_path / "results.json") == result
