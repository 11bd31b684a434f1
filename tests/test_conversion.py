from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed import BitEmbed


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_pooling_is_padding_invariant_and_pools_on_eos(backbone_dirs, family, padding_side):
    model = BitEmbed.from_backbone(str(backbone_dirs[family]))
    tokenizer = model.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>" if family == "qwen3" else "<eos>")
    assert tokenizer("some text")["input_ids"][-1] == eos_id

    text = "Short one."
    alone = model.encode([text], convert_to_tensor=True)[0]
    tokenizer.padding_side = padding_side
    batch = [text, "A much longer text, so that the short one has to be padded in this batch.", "Another long text."]
    features = model.preprocess(batch)
    assert features["attention_mask"][0].sum() < features["attention_mask"].shape[1]  # it really is padded
    last_real = features["attention_mask"][0].nonzero().max()
    assert features["input_ids"][0, last_real] == eos_id
    in_batch = model.encode(batch, batch_size=len(batch), convert_to_tensor=True)[0]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=0)


def test_real_minilm_converts_keeps_its_modules_and_encodes(minilm_dir):
    teacher = SentenceTransformer(str(minilm_dir))
    model = BitEmbed.from_backbone(str(minilm_dir))
    assert [type(m).__name__ for m in model] == [type(m).__name__ for m in teacher]
    assert model[1].pooling_mode == "mean"
    layers = [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear)]
    assert len(layers) == 6 * 6
    pairs = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    embeddings = model.encode(pairs, convert_to_tensor=True)
    assert embeddings.shape == (3, 384) and torch.isfinite(embeddings).all()
    # Ternary, untrained, it still differs from the teacher but is not degenerate.
    assert not torch.allclose(embeddings, teacher.encode(pairs, convert_to_tensor=True), atol=1e-3)
    assert (embeddings @ embeddings.T).min() < 0.999


def test_tokenizer_without_eos_is_refused_before_loading_weights(gemma3_dir, minilm_dir, tmp_path):
    # A decoder checkpoint whose tokenizer (BERT's WordPiece) has no EOS token.
    model_dir = tmp_path / "decoder-with-bert-tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((gemma3_dir / name).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model_dir / name).write_bytes((minilm_dir / name).read_bytes())
    (model_dir / "model.safetensors").write_bytes(b"not weights: the check must fail before they are read")
    with pytest.raises(ValueError, match=r"tokenizer \(BertTokenizer, model type 'gemma3_text'\) has no EOS token"):
        BitEmbed.from_backbone(str(model_dir))
    with pytest.raises(ValueError, match=r"EOS token '<\|endoftext\|>' is not in the vocabulary of BertTokenizer"):
        BitEmbed.from_backbone(str(model_dir), eos_token="<|endoftext|>")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"norm": "half"}, "Unknown norm placement 'half'"), ({"pooling": "median"}, "Unknown pooling 'median'")],
)
def test_bad_arguments_are_refused(qwen3_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BitEmbed.from_backbone(str(qwen3_dir), **kwargs)


def test_nested_codes_survive_saving_and_truncate_to_what_encode_gives(qwen3_dir, tmp_path):
    model = BitEmbed.from_backbone(str(qwen3_dir), nested_codes=True)
    texts = ["A man is playing a guitar.", "Ternary weights, nested codes."]
    model.calibrate_quantizer(texts * 4)
    model.save(str(tmp_path / "nested"))
    loaded = BitEmbed(str(tmp_path / "nested"))
    assert loaded.quantizer.nested
    stored = loaded.encode(texts, precision="int8", convert_to_tensor=True)
    assert torch.equal(stored, model.encode(texts, precision="int8", convert_to_tensor=True))
    for precision in ("int4", "int2", "binary"):
        truncated = loaded.quantizer.truncate(stored, "int8", precision)
        assert torch.equal(truncated, loaded.encode(texts, precision=precision, convert_to_tensor=True))
