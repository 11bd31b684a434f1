from __future__ import annotations

import json

from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed import BitEmbed
from st_bitembed.cli import main


def test_convert_writes_a_loadable_subln_model(qwen3_dir, tmp_path, capsys):
    output = tmp_path / "converted"
    assert main(["convert", str(qwen3_dir), str(output), "--norm", "subln"]) == 0
    assert "14 BitLinear layers, norm=subln" in capsys.readouterr().out
    model = BitEmbed(str(output))
    normed = [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear) and m.rms_norm is not None]
    assert len(normed) == 4  # o_proj and down_proj in each of the 2 layers
    requirements = json.loads((output / "config_sentence_transformers.json").read_text())["requirements"]
    assert "st_bitembed" in requirements


def test_convert_default_norm_needs_no_plugin_to_load(qwen3_dir, tmp_path):
    output = tmp_path / "converted"
    assert main(["convert", str(qwen3_dir), str(output)]) == 0
    assert "requirements" not in json.loads((output / "config_sentence_transformers.json").read_text())
    quantization = json.loads((output / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "bitnet" and quantization["use_rms_norm"] is True


def test_convert_reports_bad_input_and_exits_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "st-bitembed convert: error: No model directory at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_offline_mode_hides_datasets_cache_notices_only(tmp_path, monkeypatch):
    import logging

    from st_bitembed.cli import OFFLINE_CACHE_NOTICES

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loggers = [logging.getLogger(name) for name in OFFLINE_CACHE_NOTICES]
    before = [list(logger.filters) for logger in loggers]
    try:
        assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
        logger = logging.getLogger("datasets.load")
        notice = logger.makeRecord(
            "datasets.load", logging.WARNING, "", 0, OFFLINE_CACHE_NOTICES["datasets.load"], (), None
        )
        other = logger.makeRecord("datasets.load", logging.WARNING, "", 0, "Something else happened", (), None)
        assert not logger.filter(notice) and logger.filter(other)
    finally:
        for logger, filters in zip(loggers, before):
            logger.filters[:] = filters
