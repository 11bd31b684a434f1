"""Writing model folders without destroying what is there: refusal to replace a model unless asked, and saves
that are written aside and moved into place, so that an interrupted save leaves the previous model intact."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Files whose presence means a folder holds a saved model (sentence-transformers, transformers or BitEmbed).
MODEL_MARKERS = ("modules.json", "config.json", "model.safetensors", "model.safetensors.index.json", "bitembed.json")
# Weight files that a new save replaces as a set: the old ones it did not write again are stale (e.g. old shards).
WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def holds_model(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a saved model in it."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in MODEL_MARKERS)


def check_target(path: str | Path, overwrite: bool, option: str = "--overwrite") -> None:
    """Refuse to write a model into ``path`` when it already holds one, unless ``overwrite``.

    Raises:
        FileExistsError: naming the folder and the way to replace it (``option``).
    """
    if holds_model(path) and not overwrite:
        raise FileExistsError(
            f"{path} already holds a saved model; pass {option} to replace it, or choose another folder."
        )


@contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """Write a model folder aside, then move it into ``path``.

    Yields a new, empty sibling folder of ``path``. When the block ends without an error, every file in it is moved
    to the same place under ``path`` (each with one atomic rename, all within milliseconds, with Ctrl-C held back),
    weight files of an earlier model in ``path`` that were not written again are deleted, and the sibling is removed.
    Other files already in ``path`` stay. If the block fails or the process dies while writing, ``path`` is
    untouched (a hidden ``.NAME.partial-*`` sibling may remain; it can be deleted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        with _sigint_held():
            _move_into(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: Path, path: Path) -> None:
    written = [file for file in staging.rglob("*") if not file.is_dir()]
    folders_with_weights = {file.parent.relative_to(staging) for file in written if _is_weight_file(file)}
    for file in written:
        target = path / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    for folder in folders_with_weights:  # stale weights of the previous model, e.g. shards the new one does not have
        new_names = {file.name for file in written if file.parent.relative_to(staging) == folder}
        for old in (path / folder).iterdir():
            if old.is_file() and _is_weight_file(old) and old.name not in new_names:
                old.unlink()


def _is_weight_file(file: Path) -> bool:
    return any(file.match(pattern) for pattern in WEIGHT_PATTERNS)


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Defer Ctrl-C (SIGINT) until the block ends, where that is possible (the main thread of a POSIX process)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
