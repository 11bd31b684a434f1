"""A frozen full-precision teacher run inside a loss: freezing, tokenizer checks, and its inputs."""

from __future__ import annotations

from typing import Any

from sentence_transformers import SentenceTransformer
from torch import Tensor
from transformers import PreTrainedTokenizerBase


def freeze(teacher: SentenceTransformer) -> SentenceTransformer:
    """Put ``teacher`` in eval mode with no trainable parameters (so the trainer's optimizer skips it)."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def describe_tokenizer(model: SentenceTransformer) -> str:
    tokenizer = model.tokenizer
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or 'unnamed'})"


def same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> bool:
    """Whether both tokenizers turn text into the same token ids (same vocabulary and the same ids for a probe),
    the condition for a teacher to read the student's token ids. Special tokens around a text are left out of the
    probe: a converted decoder appends an EOS that its raw backbone's tokenizer does not, and the teacher reads the
    student's ids, EOS included, either way."""
    probe = "BitEmbed: ternary weights, 8-bit activations - 1.58 bits!"
    ids = [tokenizer(probe, add_special_tokens=False)["input_ids"] for tokenizer in (student, teacher)]
    return student.get_vocab() == teacher.get_vocab() and ids[0] == ids[1]


def teacher_inputs(
    student: SentenceTransformer, teacher: SentenceTransformer, features: dict[str, Any], shares_tokenizer: bool
) -> dict[str, Any]:
    """The teacher's inputs for one text column: the student's own features when the tokenizers agree, else the
    column's texts (decoded from the student's tokens) tokenized again by the teacher."""
    if shares_tokenizer:
        return {key: value for key, value in features.items() if key != "sentence_embedding"}
    input_ids: Tensor = features["input_ids"]
    texts = student.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return {
        key: value.to(input_ids.device) if isinstance(value, Tensor) else value
        for key, value in teacher.preprocess(texts).items()
    }
