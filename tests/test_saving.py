from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.cli import main
from st_bitembed.export import export_packed
from st_bitembed.modules.quantize import Quantize
from st_bitembed.saving import check_target, holds_model, staged_folder

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def two_models(qwen3_dir, tmp_path_factory):
    """A saved model ("old") and a different one to save over it ("new")."""
    old = BitEmbed.from_backbone(str(qwen3_dir))
    new = BitEmbed.from_backbone(str(qwen3_dir))
    with torch.no_grad():
        for layer in new[0].auto_model.layers:
            layer.mlp.down_proj.weight.mul_(-1)
    new.quantizer.calibrate(new.encode(TEXTS * 8, convert_to_tensor=True))
    folder = tmp_path_factory.mktemp("saving") / "old"
    old.save(str(folder))
    return folder, new


def test_check_target_refuses_only_a_folder_that_holds_a_model(tmp_path, two_models):
    folder, _ = two_models
    check_target(tmp_path / "new", overwrite=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    check_target(tmp_path / "notes", overwrite=False)  # files of other kinds are left alone by a save
    with pytest.raises(FileExistsError, match="already holds a saved model; pass --overwrite to replace it"):
        check_target(folder, overwrite=False)
    check_target(folder, overwrite=True)


def copy_of(folder, destination):
    import shutil

    shutil.copytree(folder, destination)
    return destination


def test_a_save_killed_while_writing_leaves_the_previous_model_intact(two_models, tmp_path):
    folder, new = two_models
    target = copy_of(folder, tmp_path / "model")
    before = BitEmbed(str(target)).encode(TEXTS)
    new.save(str(tmp_path / "new-model"))
    started = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import pathlib, time
        from st_bitembed import BitEmbed
        from st_bitembed.modules.quantize import Quantize
        model = BitEmbed({str(tmp_path / "new-model")!r})
        def slow_save(self, *args, **kwargs):  # the backbone's weights are written by now
            pathlib.Path({str(started)!r}).touch()
            time.sleep(60)
        Quantize.save = slow_save
        model.save({str(target)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started.exists(), "the save never reached the head"
    process.kill()
    process.wait()
    np.testing.assert_array_equal(BitEmbed(str(target)).encode(TEXTS), before)
    assert {p.name for p in target.iterdir()} == {p.name for p in folder.iterdir()}


def test_an_interrupted_save_in_process_leaves_the_previous_model_intact(two_models, tmp_path, monkeypatch):
    folder, new = two_models
    target = copy_of(folder, tmp_path / "model")
    before = BitEmbed(str(target)).encode(TEXTS)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Quantize, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save(str(target))
    monkeypatch.undo()
    np.testing.assert_array_equal(BitEmbed(str(target)).encode(TEXTS), before)
    assert not list(tmp_path.glob(".model.partial-*"))  # the staging folder is cleaned up


def test_saving_over_a_model_replaces_its_weights_and_keeps_other_files(two_models, tmp_path):
    folder, new = two_models
    target = copy_of(folder, tmp_path / "model")
    (target / "my-notes.txt").write_text("kept")
    (target / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard of an earlier model")
    new.save(str(target))
    assert (target / "my-notes.txt").read_text() == "kept"
    assert not (target / "model-00002-of-00002.safetensors").exists()
    np.testing.assert_allclose(BitEmbed(str(target)).encode(TEXTS), new.encode(TEXTS), atol=1e-6)
    assert holds_model(target) and not list(tmp_path.glob(".model.partial-*"))


def test_staged_folder_moves_files_into_place_only_on_success(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("failed while writing")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    with staged_folder(tmp_path / "out") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "model.safetensors").write_text("x")
    assert (tmp_path / "out" / "sub" / "model.safetensors").read_text() == "x"


def test_writers_refuse_to_replace_a_model_unless_asked(qwen3_dir, two_models, tmp_path, capsys):
    folder, _ = two_models
    target = copy_of(folder, tmp_path / "model")
    config_before = (target / "config.json").read_bytes()
    assert main(["convert", str(qwen3_dir), str(target)]) == 2
    assert "already holds a saved model; pass --overwrite" in capsys.readouterr().err
    assert (target / "config.json").read_bytes() == config_before
    assert main(["export", str(folder), str(target)]) == 2
    assert "already holds a saved model" in capsys.readouterr().err
    with pytest.raises(FileExistsError):
        export_packed(str(folder), target)
    assert main(["card", str(target)]) == 2
    assert "README.md exists; pass --overwrite" in capsys.readouterr().err
    assert (target / "config.json").read_bytes() == config_before
    assert main(["convert", str(qwen3_dir), str(target), "--overwrite"]) == 0
    assert main(["card", str(target), "--overwrite"]) == 0
    assert main(["export", str(target), str(tmp_path / "packed")]) == 0
    assert main(["export", str(target), str(tmp_path / "packed"), "--overwrite"]) == 0
