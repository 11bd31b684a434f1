from __future__ import annotations

import pytest
from conftest import materialize_tokenizer
from transformers import AutoTokenizer

from st_bitembed.tokenization import append_eos_token, pooling_eos_token


@pytest.mark.parametrize(
    ("family", "model_type", "expected"), [("qwen3", "qwen3", "<|endoftext|>"), ("gemma3", "gemma3_text", "<eos>")]
)
def test_pooling_token_is_the_familys_and_is_appended_once_keeping_bos(family, model_type, expected, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(materialize_tokenizer(family, tmp_path))
    assert pooling_eos_token(tokenizer, model_type) == expected
    before = tokenizer("Hello world")["input_ids"]
    append_eos_token(tokenizer, expected)
    after = tokenizer("Hello world")["input_ids"]
    eos_id = tokenizer.convert_tokens_to_ids(expected)
    assert after == before + [eos_id] and after.count(eos_id) == 1  # BOS (Gemma) kept, EOS added once


def test_an_eos_token_outside_the_vocabulary_or_missing_is_refused(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(materialize_tokenizer("qwen3", tmp_path))
    with pytest.raises(ValueError, match="'<not-a-token>' is not in the vocabulary"):
        pooling_eos_token(tokenizer, "qwen3", eos_token="<not-a-token>")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="has no EOS token, which last-token pooling needs"):
        pooling_eos_token(tokenizer, "llama")
