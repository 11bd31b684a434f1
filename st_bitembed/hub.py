"""Checks that a model name or path can be loaded, before any work, with an error that says what to do."""

from __future__ import annotations

import os

from huggingface_hub import constants, model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

# Either file marks a loadable model: a transformers checkpoint or a sentence-transformers model.
MODEL_MARKER_FILES = ("config.json", "modules.json")


def check_model_source(name_or_path: str, revision: str | None = None, token: bool | str | None = None) -> None:
    """Raise a clear error if ``name_or_path`` is neither a model directory nor a reachable Hub model id.

    Raises:
        FileNotFoundError: a missing local path, a directory without a model, an unknown Hub id, or a Hub id with
            no cached copy while the Hub is offline.
        ConnectionError: the Hub could not be reached to look the id up.
    """
    if os.path.isdir(name_or_path):
        if not any(os.path.isfile(os.path.join(name_or_path, name)) for name in MODEL_MARKER_FILES):
            raise FileNotFoundError(
                f"{name_or_path!r} is a directory but holds no model: neither of {MODEL_MARKER_FILES} is in it."
            )
        return
    if name_or_path.startswith((".", "~", os.sep)):
        raise FileNotFoundError(f"No model directory at {name_or_path!r}.")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(
            f"{name_or_path!r} does not exist locally and is not a valid Hugging Face Hub model id."
        ) from None
    if any(
        isinstance(try_to_load_from_cache(name_or_path, name, revision=revision), str) for name in MODEL_MARKER_FILES
    ):
        return
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory, and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) with "
            "no cached copy of it. Pass a local model directory, or download it first with the Hub reachable."
        )
    try:
        model_info(name_or_path, revision=revision, token=token)
    except GatedRepoError:
        raise
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"There is no model {name_or_path!r} on the Hugging Face Hub (or it is private: log in with `hf auth "
            "login` or pass token=), and no local directory of that name."
        ) from None
    except Exception as error:  # httpx / requests errors differ across huggingface_hub versions
        raise ConnectionError(
            f"{name_or_path!r} is not a local directory and the Hugging Face Hub could not be reached to fetch it "
            f"({type(error).__name__}: {error}). Pass a local model directory, or retry with the Hub reachable."
        ) from error
