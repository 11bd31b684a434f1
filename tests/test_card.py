from __future__ import annotations

import hashlib

import pytest
from mteb.mocks.mock_tasks.sts import MockSTSTask

from st_bitembed.card import push_to_hub, render_model_card, validate_model_card
from st_bitembed.cli import main
from st_bitembed.evaluation import evaluate_precisions

PRECISIONS = ["float32", "int8", "int4", "int2", "binary"]


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


def test_card_state_is_bitembed_card_data(converted_qwen3):
    from sentence_transformers import SentenceTransformerModelCardData

    from st_bitembed import BitEmbed
    from st_bitembed.card import BitEmbedModelCardData

    card_data = converted_qwen3.model_card_data
    assert isinstance(card_data, BitEmbedModelCardData)
    card_data.training_recipe = [{"name": "convert", "description": "tiny"}]
    exported = card_data.to_dict()  # what sentence-transformers' own card is made from
    assert "training_recipe" not in exported and "evaluation_report" not in exported
    with pytest.raises(TypeError, match="model_card_data must be a BitEmbedModelCardData"):
        BitEmbed(modules=list(converted_qwen3), model_card_data=SentenceTransformerModelCardData())


def test_card_shows_the_nested_store_only_for_a_nested_head(converted_qwen3):
    from st_bitembed import Quantize

    assert "NestedCodeIndex" not in render_model_card(converted_qwen3, "org/bitembed-tiny")
    converted_qwen3.set_quantizer(Quantize(converted_qwen3.get_embedding_dimension(), nested=True))
    card = validate_model_card(render_model_card(converted_qwen3, "org/bitembed-tiny"))
    assert 'NestedCodeIndex(model.quantizer, "int4", path="my-index")' in card.text
