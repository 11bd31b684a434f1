from __future__ import annotations

import gzip
import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from test_recipe import tiny_recipe

from st_bitembed import BitEmbed
from st_bitembed.cli import main
from st_bitembed.recipe import DatasetSpec, RecipeError, parse_recipe
from st_bitembed.training import dropout_set_to, load_columns, preflight, run_recipe, teacher_for_training


@pytest.fixture(scope="module")
def teacher_dir(_qwen3_teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    _qwen3_teacher.save(str(path))
    return path


def test_local_compressed_json_lines_keep_rows_with_every_text(tmp_path):
    path = tmp_path / "passages.jsonl.gz"
    rows = [
        {"title": "Paris", "description": "capital of France", "extract": "Paris is the capital of France."},
        {"title": "Nothing", "description": None, "extract": "A row without a description."},
        {"title": "Blank", "description": "  ", "extract": "A row with a blank description."},
        {"title": "Seine", "description": "river in France", "extract": "The Seine flows through Paris."},
    ]
    with gzip.open(path, "wt") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    spec = DatasetSpec(path=str(path), columns=["description", "extract"])
    dataset = load_columns(spec, "tiny.finetune.dataset")
    assert dataset.column_names == ["description", "extract"]
    assert dataset["description"] == ["capital of France", "river in France"]
    with pytest.raises(RecipeError, match=r"unsupported file type '\.parquet\.gz'"):
        load_columns(DatasetSpec(path=str(tmp_path / "x.parquet.gz"), columns=["a", "b"]), "tiny")
    with pytest.raises(RecipeError, match="no file"):
        load_columns(DatasetSpec(path=str(tmp_path / "missing.jsonl"), columns=["a", "b"]), "tiny")


def test_training_on_an_evaluation_task_s_data_is_refused(tmp_path):
    recipe = tiny_recipe("backbone", "teacher", tmp_path)
    recipe["finetune"]["dataset"] = {
        "name": "mteb/stsbenchmark-sts",
        "split": "test",
        "columns": ["sentence1", "sentence2"],
    }
    recipe["evaluation"]["tasks"] = ["STSBenchmark"]
    with pytest.raises(RecipeError, match=r"tiny\.finetune: mteb/stsbenchmark-sts is the data of the evaluation task"):
        preflight(parse_recipe(recipe, "tiny"))


def test_a_stage_mixes_datasets_and_distills_hidden_states_with_the_in_loss_teacher(qwen3_dir, teacher_dir, tmp_path):
    passages = tmp_path / "passages.jsonl"
    passages.write_text(
        "".join(
            json.dumps({"title": f"Topic {i}", "text": f"Topic {i} is a subject with a long description, part {i}."})
            + "\n"
            for i in range(24)
        )
    )
    recipe = tiny_recipe(qwen3_dir, teacher_dir, tmp_path / "run", pretrain=None, evaluation=None)
    finetune = recipe["finetune"]
    finetune["dataset"] = [finetune["dataset"], {"path": str(passages), "columns": ["title", "text"]}]
    finetune["loss"] = {
        "similarity_kl": 1.0,
        "embedding_distill": 1.0,
        "hidden_states": 1.0,
        "precisions": ["float32", "binary"],
    }
    finetune["training"].update(max_steps=3, max_seq_length=12, save_steps=10)
    model, report = run_recipe(parse_recipe(recipe, "tiny"))
    assert report is None
    run = tmp_path / "run"
    # the teacher ran in the loss on every batch, so the dataset was never encoded beforehand
    assert not (run / "finetune" / "teacher_embeddings.safetensors").exists()
    saved = BitEmbed(str(run / "model"))
    assert saved.max_seq_length == BitEmbed(str(run / "converted")).max_seq_length  # training's limit not saved
    description = saved.model_card_data.training_recipe[-1]["description"]
    assert "hidden-state distillation (all blocks)" in description
    assert "sentence-transformers/all-nli (anchor, positive, negative) + passages.jsonl (title, text)" in description


def test_a_token_teacher_teaches_the_tokens_beside_a_teacher_of_another_tokenizer(
    qwen3_dir, teacher_dir, minilm_dir, tmp_path
):
    """Gemma3-270M's CPU recipe in small: all-MiniLM-L6-v2 (another tokenizer and dimension) gives the pooled targets,
    encoded before training; the student's own full-precision model teaches its hidden states token by token."""
    recipe = tiny_recipe(qwen3_dir, minilm_dir, tmp_path / "run", pretrain=None, evaluation=None)
    recipe["token_teacher"] = str(teacher_dir)
    recipe["finetune"]["loss"] = {"infonce": 0.0, "similarity_kl": 1.0, "hidden_states": 1.0}
    recipe["finetune"]["training"].update(max_steps=2, max_seq_length=12, save_steps=10)
    run_recipe(parse_recipe(recipe, "tiny"))
    run = tmp_path / "run"
    with safe_open(str(run / "finetune" / "teacher_embeddings.safetensors"), framework="pt") as file:
        assert file.get_tensor("embeddings").shape[1] == 384  # all-MiniLM-L6-v2's, not the student's dimension
    description = BitEmbed(str(run / "model")).model_card_data.training_recipe[-1]["description"]
    assert f"similarity-distribution KL from {minilm_dir}" in description
    assert f"token-level hidden-state distillation (all blocks) from {teacher_dir}" in description
    recipe["token_teacher"] = str(minilm_dir)
    with pytest.raises(RecipeError, match="needs token_teacher and student to share a tokenizer"):
        preflight(parse_recipe(recipe, "tiny"))


def test_a_bf16_stage_runs_its_own_bf16_copy_of_the_teacher(qwen3_teacher):
    texts = ["A cat sits on the mat.", "Stock markets fell sharply on Monday."]
    assert teacher_for_training(qwen3_teacher, bf16=False) is qwen3_teacher
    reference = qwen3_teacher.encode(texts, convert_to_tensor=True)
    training = teacher_for_training(qwen3_teacher, bf16=True)
    assert training is not qwen3_teacher
    assert {p.dtype for p in training.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in qwen3_teacher.parameters()} == {torch.float32}  # the evaluation's teacher is untouched
    same = torch.nn.functional.cosine_similarity(training.encode(texts, convert_to_tensor=True).float(), reference)
    assert same.min() > 0.99


def test_a_stage_s_dropout_reaches_every_dropout_of_the_student_and_is_given_back(minilm_dir):
    model = BitEmbed.from_backbone(str(minilm_dir)).train()
    features = model.preprocess(["Dropout makes two training forwards of one text differ."])

    def two_forwards_agree() -> bool:
        with torch.no_grad():
            first, second = (model(dict(features))["sentence_embedding"] for _ in range(2))
        return torch.equal(first, second)

    assert not two_forwards_agree()  # all-MiniLM-L6-v2's own dropout, 0.1
    with dropout_set_to(model, 0.0):
        assert two_forwards_agree()  # hidden states and attention probabilities alike
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    with dropout_set_to(model, None):
        assert not two_forwards_agree()


def test_missing_dataset_column_is_named_before_training(qwen3_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(qwen3_dir, teacher_dir, tmp_path)
    recipe["pretrain"]["dataset"]["columns"] = ["anchor", "answer"]
    with pytest.raises(
        RecipeError,
        match=r"pretrain\.dataset\.columns: \['answer'\] not in the dataset, whose columns "
        r"are \['anchor', 'positive'\]",
    ):
        preflight(parse_recipe(recipe, "tiny"))
    assert not (tmp_path / "converted").exists()


def test_attention_distillation_with_another_tokenizer_fails_before_training(qwen3_dir, minilm_dir, tmp_path):
    recipe = parse_recipe(tiny_recipe(qwen3_dir, minilm_dir, tmp_path), "tiny")
    with pytest.raises(
        RecipeError, match=r"finetune\.loss\.attention_relation > 0 .* uses Qwen2Tokenizer .* uses BertTokenizer"
    ):
        run_recipe(recipe)
    assert not (tmp_path / "converted").exists()


def test_end_to_end_tiny_recipe_and_resume_reaches_the_same_model(qwen3_dir, teacher_dir, tmp_path, capsys):
    recipe_path = tmp_path / "tiny.json"
    recipe_path.write_text(json.dumps(tiny_recipe(qwen3_dir, teacher_dir, tmp_path / "run")))
    assert main(["train", str(recipe_path)]) == 0
    printed = capsys.readouterr().out
    assert (
        "| teacher | float32 |" in printed
        and "| BitEmbed head | int4 |" in printed
        and "share of the teacher" in printed
    )
    run = tmp_path / "run"
    card = (run / "model" / "README.md").read_text()
    assert "**pretrain**" in card and "attention-relation distillation" in card and "model-index" in card
    assert json.loads((run / "eval" / "results.json").read_text())["teacher_name"] == str(teacher_dir)
    embeddings = {
        stage: BitEmbed(str(run / stage))[0].auto_model.get_input_embeddings().weight
        for stage in ("converted", "pretrain/final", "finetune/final")
    }
    assert main(["train", str(recipe_path)]) == 2  # again: refused, the earlier run's models are kept
    assert "run/model already holds a saved model; pass --resume to continue that run, or --overwrite" in (
        capsys.readouterr().err
    )
    assert torch.equal(embeddings["converted"], embeddings["pretrain/final"])  # frozen in pre-training
    assert not torch.equal(embeddings["pretrain/final"], embeddings["finetune/final"])  # trained in fine-tuning

    # Interrupt the fine-tuning after its first checkpoint, then resume: the same final model as uninterrupted.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run, interrupted)
    shutil.rmtree(interrupted / "finetune" / "final")
    shutil.rmtree(interrupted / "finetune" / "checkpoint-4")
    recipe_path.write_text(json.dumps(tiny_recipe(qwen3_dir, teacher_dir, interrupted)))
    assert main(["finetune", str(recipe_path), "--resume"]) == 0
    resumed = BitEmbed(str(interrupted / "finetune" / "final")).state_dict()
    reference = BitEmbed(str(run / "finetune" / "final")).state_dict()
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_killed_run_resumes_to_the_same_model_without_encoding_again(qwen3_dir, teacher_dir, tmp_path, stop, caplog):
    """A real `st-bitembed train` process stopped in its fine-tuning, then `--resume`: the same model as a run that
    was never stopped, and the teacher's embeddings of the stage are read back, not computed again."""
    recipes = {}
    for name in ("stopped", "uninterrupted"):
        recipe = tiny_recipe(qwen3_dir, teacher_dir, tmp_path / name, evaluation=None)
        recipe["finetune"]["training"].update(max_steps=16, save_steps=2)
        recipes[name] = tmp_path / f"{name}.json"
        recipes[name].write_text(json.dumps(recipe))
    finetune = tmp_path / "stopped" / "finetune"
    process = subprocess.Popen(
        [sys.executable, "-m", "st_bitembed.cli", "train", str(recipes["stopped"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (finetune / "checkpoint-2" / "trainer_state.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no fine-tuning checkpoint within 5 minutes"
        time.sleep(0.05)
    process.send_signal(stop)
    assert process.wait(timeout=120) != 0
    assert not (finetune / "final").exists() and (finetune / "teacher_embeddings.safetensors").is_file()

    with caplog.at_level(logging.INFO, logger="st_bitembed"):
        assert main(["train", str(recipes["stopped"]), "--resume"]) == 0
    assert "Read the teacher's embeddings" in caplog.text and "Encoding" not in caplog.text
    assert main(["train", str(recipes["uninterrupted"])]) == 0
    resumed = BitEmbed(str(tmp_path / "stopped" / "model")).state_dict()
    reference = BitEmbed(str(tmp_path / "uninterrupted" / "model")).state_dict()
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    from st_bitembed.training import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_train_runs_data_parallel_under_torchrun(qwen3_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(qwen3_dir, teacher_dir, tmp_path / "run", evaluation=None)
    for stage in ("pretrain", "finetune"):
        recipe[stage]["training"]["gather_across_devices"] = True  # in-batch negatives from both processes
    recipe_path = tmp_path / "tiny.json"
    recipe_path.write_text(json.dumps(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521"]
    command += ["-m", "st_bitembed.cli", "train", str(recipe_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Saved ") == 1  # the main process reports and saves, once
    run = tmp_path / "run"
    history = json.loads((run / "finetune" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    # 64 rows, batch 8 per process: two processes go through the data in 4 steps (one process would need 8)
    assert history[-1]["epoch"] == pytest.approx(1.0)
    assert BitEmbed(str(run / "model")).encode(["a text"]).shape == (1, 64)
    assert not list(run.glob(".*.partial-*")) and not list((run / "finetune").glob(".*.partial-*"))
