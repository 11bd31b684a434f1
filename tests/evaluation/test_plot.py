from __future__ import annotations

import matplotlib

from st_bitembed.evaluation import EvaluationReport, Score, plot_precision_scores


def test_plot_writes_a_png_and_leaves_the_callers_backend_alone(tmp_path):
    scores = [
        Score(method, precision, "STS", "STS", "cosine_spearman", value)
        for method, precision, value in [
            ("teacher", "float32", 0.82),
            ("head", "float32", 0.80),
            ("head", "int4", 0.79),
            ("head", "uint8", 0.80),  # the int8 codes again: one point, not two at 8 bits
            ("head", "binary", 0.74),
            ("posthoc", "int4", 0.75),
        ]
    ]
    report = EvaluationReport("local/model", 384, scores, teacher_name="teacher")
    with matplotlib.rc_context({"backend": "svg"}):
        path = plot_precision_scores(report, tmp_path / "scores.png")
        assert matplotlib.get_backend() == "svg"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
