from __future__ import annotations

from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from st_bitembed.losses.teacher import same_tokenizer


def test_same_tokenizer_ignores_the_appended_eos_and_tells_other_vocabularies_apart(
    qwen3_dir, converted_qwen3, minilm_dir
):
    raw = AutoTokenizer.from_pretrained(str(qwen3_dir))  # the backbone's own tokenizer: no EOS appended
    student = converted_qwen3.tokenizer  # appends <|endoftext|> to every text
    assert raw("a")["input_ids"] != student("a")["input_ids"]
    assert same_tokenizer(student, raw) and same_tokenizer(raw, student)
    assert not same_tokenizer(student, SentenceTransformer(str(minilm_dir)).tokenizer)
