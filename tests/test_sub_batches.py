from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed, sub_batches
from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.calibration import calibrate_inserted_norms
from st_bitembed.quantization.kernels import gemm_backend
from st_bitembed.sub_batches import join_outputs, split_batch, widest_activation_bytes_per_token

needs_native = pytest.mark.skipif(gemm_backend("cpu") != "native", reason="the native kernel is not built here")

TEXTS = [f"Sentence number {i} says {'a good deal more ' * (i % 4)}about the weather." for i in range(10)]


def batch_sizes_seen(model: BitEmbed) -> list[int]:
    """The batch sizes the model's first module (the transformer) gets, recorded from now on."""
    sizes: list[int] = []
    model[0].register_forward_pre_hook(lambda _, args: sizes.append(len(args[0]["input_ids"])))
    return sizes


def budget_for(model: BitEmbed, texts_per_part: int, monkeypatch) -> None:
    """Set the activation budget so that a part of this batch (``TEXTS``, padded) holds ``texts_per_part`` texts."""
    tokens = model.preprocess(TEXTS)["attention_mask"].shape[1]
    per_token = widest_activation_bytes_per_token(model[0].auto_model)
    monkeypatch.setattr(sub_batches, "ACTIVATION_BUDGET_BYTES", texts_per_part * tokens * per_token)


@needs_native
@pytest.mark.parametrize("source", ["qwen3", "minilm"])
def test_a_large_batch_runs_in_parts_and_gives_what_the_whole_batch_gives(source, converted_qwen3, minilm_dir,
                                                                          monkeypatch):  # fmt: skip
    model = converted_qwen3 if source == "qwen3" else BitEmbed.from_backbone(str(minilm_dir))
    model.eval()
    whole = {value: model.encode(TEXTS, batch_size=10, output_value=value) for value in ("sentence_embedding", None)}
    sizes = batch_sizes_seen(model)
    budget_for(model, 6, monkeypatch)
    in_parts = {
        value: model.encode(TEXTS, batch_size=10, output_value=value) for value in ("sentence_embedding", None)
    }
    assert sizes == [5, 5] * 2  # parts of equal size, not 6 + 4
    # The native kernels compute each text on its own: the parts give exactly the whole batch's outputs.
    assert (in_parts["sentence_embedding"] == whole["sentence_embedding"]).all()
    for part_text, whole_text in zip(in_parts[None], whole[None]):
        assert part_text.keys() == whole_text.keys()
        for key, value in whole_text.items():
            assert torch.equal(part_text[key], value) if isinstance(value, torch.Tensor) else part_text[key] == value


def test_a_forward_called_directly_runs_the_whole_batch(converted_qwen3, monkeypatch):
    budget_for(converted_qwen3, 3, monkeypatch)
    sizes = batch_sizes_seen(converted_qwen3)
    features = converted_qwen3.preprocess(TEXTS)
    converted_qwen3.eval()
    with torch.no_grad():
        converted_qwen3(features)
    converted_qwen3.encode(TEXTS, batch_size=10)
    assert sizes == [10, 3, 3, 3, 1]


def test_calibration_sees_all_its_texts_in_one_forward_whatever_the_budget(qwen3_dir, monkeypatch):
    """Calibration's hooks set each norm from the first forward they see: parts would calibrate on a third."""
    norms = []
    for texts_per_part in (len(TEXTS), 3):
        model = BitEmbed.from_backbone(str(qwen3_dir))
        budget_for(model, texts_per_part, monkeypatch)
        calibrate_inserted_norms(model, TEXTS)
        layers = [layer for layer in model.modules() if isinstance(layer, BitLinear)]
        norms.append([layer.rms_norm.weight.clone() for layer in layers])
    assert len(norms[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*norms, strict=True))


def test_a_batch_is_split_only_where_every_value_can_be():
    features = {
        "input_ids": torch.ones(4, 8, dtype=torch.long),
        "attention_mask": torch.ones(4, 8),
        "modality": "text",
    }
    per_token = sub_batches.ACTIVATION_BUDGET_BYTES // 16  # two texts of 8 tokens per part
    parts = split_batch(features, per_token)
    assert [len(part["input_ids"]) for part in parts] == [2, 2]
    assert all(part["modality"] == "text" for part in parts)
    assert torch.equal(torch.cat([part["attention_mask"] for part in parts]), features["attention_mask"])
    assert split_batch(features, per_token // 2) is None  # the whole batch fits
    assert split_batch({**features, "texts": ["a", "b", "c", "d"]}, per_token) is None  # one item per text
    assert split_batch({**features, "pixel_values": torch.ones(1, 3)}, per_token) is None  # not batch-first
    assert split_batch({"input_ids": features["input_ids"]}, per_token) is None  # no attention mask


def test_outputs_of_parts_join_as_the_batch_would_give_them():
    hidden = [torch.randn(5, 4, 2) for _ in range(3)]
    parts = [
        {"sentence_embedding": hidden[0][:3, 0], "all_layer_embeddings": tuple(h[:3] for h in hidden),
         "texts": ["a", "b", "c"], "modality": "text", "scale": torch.tensor(2.0), "table": torch.ones(7)},
        {"sentence_embedding": hidden[0][3:, 0], "all_layer_embeddings": tuple(h[3:] for h in hidden),
         "texts": ["d", "e"], "modality": "text", "scale": torch.tensor(2.0), "table": torch.ones(7)},
    ]  # fmt: skip
    joined = join_outputs(parts, [3, 2])
    assert torch.equal(joined["sentence_embedding"], hidden[0][:, 0])
    assert isinstance(joined["all_layer_embeddings"], tuple)
    assert all(torch.equal(j, h) for j, h in zip(joined["all_layer_embeddings"], hidden, strict=True))
    assert joined["texts"] == ["a", "b", "c", "d", "e"]
    assert joined["modality"] == "text" and joined["scale"] == 2.0 and torch.equal(joined["table"], torch.ones(7))
