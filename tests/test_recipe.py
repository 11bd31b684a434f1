from __future__ import annotations

import pytest
import yaml

from st_bitembed.cli import main
from st_bitembed.recipe import RecipeError, apply_overrides, builtin_recipes, load_recipe, parse_recipe


def tiny_recipe(backbone, teacher, output_dir, **overrides) -> dict:
    recipe = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "backbone": {"name": str(backbone)},
        "teacher": str(teacher),
        "calibration": {"dataset": {"name": "sentence-transformers/stsb", "columns": ["sentence1"]}, "texts": 32},
        "pretrain": {
            "dataset": {
                "name": "sentence-transformers/all-nli",
                "config": "pair",
                "columns": ["anchor", "positive"],
                "max_rows": 64,
            },
            "loss": {"similarity_kl": 1.0, "embedding_distill": 1.0, "precisions": ["float32", "int4", "binary"]},
            "training": {
                "max_steps": 2,
                "batch_size": 8,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "save_steps": 2,
                "freeze_embeddings": True,
            },
        },
        "finetune": {
            "dataset": {
                "name": "sentence-transformers/all-nli",
                "config": "triplet",
                "columns": ["anchor", "positive", "negative"],
                "max_rows": 64,
            },
            "loss": {
                "similarity_kl": 1.0,
                "attention_relation": 1.0,
                "embedding_distill": 1.0,
                "precisions": ["float32", "int4", "binary"],
            },
            "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2},
        },
        "evaluation": {"tasks": ["STS13"], "precisions": ["float32", "int4", "binary"]},
    }
    recipe.update(overrides)
    return recipe


def test_builtin_recipes_are_valid():
    assert set(builtin_recipes()) >= {"minilm-cpu", "qwen3-0.6b", "gemma3-270m"}
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.finetune is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["finetune"]["training"].update(lr=1e-3), r"tiny\.finetune\.training: unknown key\(s\) \['lr'\]"),
        (lambda r: r.update(teachr="x"), r"tiny: unknown key\(s\) \['teachr'\]"),
        (
            lambda r: r["pretrain"]["loss"].update(similarity_kl="big"),
            r"tiny\.pretrain\.loss\.similarity_kl: expected float",
        ),
        (lambda r: r["pretrain"].pop("dataset"), r"tiny\.pretrain: missing required key\(s\) \['dataset'\]"),
        (
            lambda r: r.pop("teacher"),
            r"tiny\.pretrain\.loss: similarity_kl, embedding_distill > 0 needs a top-level teacher",
        ),
        (lambda r: r["finetune"].update(dataset=[]), r"tiny\.finetune\.dataset: an empty list"),
        (
            lambda r: r["finetune"].update(dataset=[r["finetune"]["dataset"], {"path": "x.jsonl", "colums": ["a"]}]),
            r"tiny\.finetune\.dataset\[1\]: unknown key\(s\) \['colums'\]",
        ),
        (
            lambda r: r["pretrain"]["dataset"].update(columns=["anchor"]),
            r"tiny\.pretrain\.dataset\.columns: name the \(query, positive",
        ),
        (
            lambda r: r["pretrain"]["loss"].update(infonce=0.0, similarity_kl=0.0, embedding_distill=0.0),
            r"tiny\.pretrain\.loss: every weight is 0",
        ),
        (
            lambda r: r["finetune"]["loss"].update(kl_precisions=["float32", "int3"]),
            r"tiny\.finetune\.loss\.kl_precisions: Unknown precision 'int3'",
        ),
        (
            lambda r: r["finetune"]["loss"].update(kl_precisions=["float32", "int4"], similarity_kl=0.0),
            r"tiny\.finetune\.loss\.kl_precisions: kl_precisions given while similarity_kl is 0",
        ),
        (
            lambda r: r["finetune"]["training"].update(dropout=1.0),
            r"tiny\.finetune\.training\.dropout: a probability in \[0, 1\), got 1\.0",
        ),
        (
            lambda r: (r.update(token_teacher="fp"), r["finetune"]["loss"].update(attention_relation=0.0)),
            r"tiny\.token_teacher: no stage has a token-level term on \(hidden_states, attention_relation\)",
        ),
        (
            lambda r: (r.pop("teacher"), r["pretrain"]["loss"].update(similarity_kl=0.0, embedding_distill=0.0)),
            r"tiny\.finetune\.loss: attention_relation > 0 needs a top-level teacher or token_teacher",
        ),
        (
            lambda r: r["evaluation"].update(precisions=["bnary"]),
            r"tiny\.evaluation\.precisions: Unknown precision 'bnary'",
        ),
    ],
)
def test_bad_recipes_are_refused_with_the_key_path(change, message, tmp_path):
    recipe = tiny_recipe("backbone", "teacher", tmp_path)
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe, "tiny")


def test_several_datasets_and_a_single_column_of_passages_for_distillation_alone(tmp_path):
    recipe = tiny_recipe("backbone", "teacher", tmp_path)
    passages = {"path": "passages.jsonl", "columns": ["text"]}
    recipe["finetune"]["dataset"] = [recipe["finetune"]["dataset"], passages]
    recipe["finetune"]["loss"] = {
        "infonce": 0.0,
        "embedding_distill": 1.0,
        "hidden_states": 1.0,
        "hidden_state_layers": [-1],
    }
    stage = parse_recipe(recipe, "tiny").finetune
    assert [spec.columns for spec in stage.dataset] == [["anchor", "positive", "negative"], ["text"]]
    assert stage.loss.hidden_state_layers == [-1]


def test_overrides_change_nested_keys_and_are_validated(tmp_path):
    data = tiny_recipe("backbone", "teacher", tmp_path)
    overrides = ["finetune.training.max_steps=7", "finetune.loss.hidden_states=2", "evaluation=null"]
    apply_overrides(data, [*overrides, "finetune.training.learning_rate=1e-4"])  # a number, as in YAML 1.2 and JSON
    recipe = parse_recipe(data, "tiny")
    assert recipe.finetune.training.max_steps == 7 and recipe.finetune.loss.hidden_states == 2.0
    assert recipe.finetune.training.learning_rate == 1e-4
    assert recipe.evaluation is None
    with pytest.raises(RecipeError, match="write it as key.path=value"):
        apply_overrides(data, ["finetune.training.max_steps"])
    with pytest.raises(RecipeError, match="name is not a mapping"):
        apply_overrides(data, ["name.first=x"])
    with pytest.raises(RecipeError, match=r"finetune\.training: unknown key\(s\) \['max_step'\]"):
        parse_recipe(apply_overrides(data, ["finetune.training.max_step=3"]), "tiny")


def test_cli_reports_a_bad_recipe_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "output_dir": "x", "backbone": {"name": "b", "nrom": "all"}}))
    assert main(["train", str(path)]) == 2
    assert "bad.backbone: unknown key(s) ['nrom']" in capsys.readouterr().err
    assert main(["train", "minilm-cpu", "--set", "finetune.training.max_steps"]) == 2
    assert "write it as key.path=value" in capsys.readouterr().err
    assert main(["train", "minilm-cpu", "--set", "finetune.training.max_step=3"]) == 2
    assert "minilm-cpu.finetune.training: unknown key(s) ['max_step']" in capsys.readouterr().err


def test_loss_weights_named_before_0_2_are_read_with_a_warning(tmp_path):
    recipe = tiny_recipe("backbone", "teacher", tmp_path)
    recipe["finetune"]["loss"] = {"alpha": 0.5, "beta": 2.0, "gamma": 1.0}
    with pytest.warns(FutureWarning, match=r"tiny\.finetune\.loss: 'beta' is now called 'attention_relation'"):
        loss = parse_recipe(recipe, "tiny").finetune.loss
    assert (loss.similarity_kl, loss.attention_relation, loss.embedding_distill) == (0.5, 2.0, 1.0)
    recipe["finetune"]["loss"] = {"alpha": 0.5, "similarity_kl": 1.0}
    with pytest.raises(RecipeError, match="alpha and similarity_kl are the same weight"):
        parse_recipe(recipe, "tiny")
