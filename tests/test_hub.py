from __future__ import annotations

import pytest

from st_bitembed import BitEmbed


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model directory at"):
        BitEmbed.from_backbone(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        BitEmbed.from_backbone(str(tmp_path / "empty"))


def test_unknown_hub_id_offline_says_offline():
    with pytest.raises(FileNotFoundError, match=r"'example-org/no-such-model'.*Hub is offline \(HF_HUB_OFFLINE=1\)"):
        BitEmbed.from_backbone("example-org/no-such-model")


def test_check_model_source_accepts_models_and_names_what_is_wrong(minilm_dir, tmp_path):
    from st_bitembed.hub import check_model_source

    check_model_source(str(minilm_dir))  # a sentence-transformers folder (modules.json)
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    check_model_source(str(tmp_path / "config-only"))  # a transformers folder
    with pytest.raises(FileNotFoundError, match="not a valid Hugging Face Hub model id"):
        check_model_source("not a valid id!")
    with pytest.raises(FileNotFoundError, match="No model directory at"):
        check_model_source("./no-such-folder")
