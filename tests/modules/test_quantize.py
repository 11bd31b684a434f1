from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.util import quantize_embeddings

from st_bitembed import PRECISIONS, BitEmbed, Quantize
from st_bitembed.modules.quantize import gaussian_optimal_half_range

CODE_RANGES = {"int8": (-128, 127), "int4": (-8, 7), "int2": (-2, 1), "uint8": (0, 255)}


def unit_vectors(rows: int, dimension: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dimension, generator=generator), dim=-1)


# Max (1960), "Quantizing for minimum distortion", Table II: the optimal uniform step for a unit Gaussian with
# 4 / 8 / 16 levels is 0.9957 / 0.5860 / 0.3352, i.e. half-ranges 1.991 / 2.344 / 2.682.
@pytest.mark.parametrize(("bits", "published"), [(2, 1.99), (3, 2.34), (4, 2.68)])
def test_initial_ranges_are_the_published_optimal_uniform_quantizers(bits, published):
    assert gaussian_optimal_half_range(bits) == pytest.approx(published, abs=0.005)


def test_initial_int8_range_has_less_error_on_gaussian_samples_than_its_neighbours():
    samples = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(half_range: float) -> float:
        step = half_range / 128
        codes = torch.floor(samples / step).clamp(-128, 127)
        return (samples - (codes + 0.5) * step).pow(2).mean().item()

    best = gaussian_optimal_half_range(8)
    assert error(best) < min(error(best - 0.15), error(best + 0.15))


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_codes_are_in_range_and_have_the_storage_size(precision):
    head = Quantize(100)
    embeddings = unit_vectors(64, 100) * 3  # beyond the ranges too: codes must clip, not wrap
    codes = head.quantize(embeddings, precision, pack=True)
    if precision in CODE_RANGES:
        low, high = CODE_RANGES[precision]
        unpacked = head.quantize(embeddings, precision)
        assert unpacked.min() >= low and unpacked.max() <= high
        assert unpacked.min() == low and unpacked.max() == high  # clipping reaches both ends
    assert codes[0].numel() * codes.element_size() == head.bytes_per_vector(precision)


def test_binary_bytes_equal_sentence_transformers():
    head = Quantize(100)
    embeddings = unit_vectors(16, 100)
    for precision in ("binary", "ubinary"):
        expected = quantize_embeddings(embeddings.numpy(), precision)
        assert np.array_equal(head.quantize(embeddings, precision).numpy(), expected)


@pytest.mark.parametrize("precision", ["int4", "int2"])
def test_packed_codes_dequantize_to_the_levels_of_their_codes(precision):
    # 30 dimensions: the last byte is padded; rows in a [2, 25] batch.
    head, embeddings = Quantize(30), unit_vectors(50, 30) * 3  # some beyond the range: the outer levels
    expected = (head.quantize(embeddings, precision).float() + 0.5) * head.step(precision, 30)
    packed = head.quantize(embeddings, precision, pack=True).reshape(2, 25, -1)
    assert torch.equal(head.dequantize(packed, precision, 30), expected.reshape(2, 25, 30))


def test_fake_quantize_matches_storage_codes_and_trains_the_ranges():
    head = Quantize(32)
    embeddings = unit_vectors(8, 32).requires_grad_()
    for precision in PRECISIONS:
        reconstructed = head.dequantize(head.quantize(embeddings.detach(), precision), precision)
        torch.testing.assert_close(head.fake_quantize(embeddings, precision).detach(), reconstructed)
    head.fake_quantize(embeddings, "int4").pow(2).sum().backward()
    assert head.log_half_ranges["int4"].grad.abs().sum() > 0
    assert embeddings.grad.abs().sum() > 0  # straight-through to the model


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown precision 'int3'; valid precisions are float32, float16.*ubinary"):
        Quantize(8).quantize(unit_vectors(1, 8), "int3")


def test_bytes_per_vector_for_a_1024_dimensional_model():
    head = Quantize(1024)
    assert [head.bytes_per_vector(p) for p in ("float32", "float16", "int8", "int4", "int2", "binary")] == [
        4096,
        2048,
        1024,
        512,
        256,
        128,
    ]


def test_reconstruction_error_rises_with_fewer_bits_on_real_minilm_embeddings(minilm_dir, sts_sentences):
    model = BitEmbed(str(minilm_dir))
    embeddings = model.encode(sts_sentences, convert_to_tensor=True)
    errors = []
    for precision in ("float16", "int8", "int4", "int2", "binary"):
        codes = model.encode(sts_sentences, precision=precision, convert_to_tensor=True)
        errors.append((model.quantizer.dequantize(codes, precision) - embeddings).pow(2).sum(-1).mean().item())
    assert errors == sorted(errors) and len(set(errors)) == len(errors), errors
    model.quantizer.calibrate(embeddings)  # fitting the ranges to real embeddings lowers the integer errors
    for precision, before in zip(("int8", "int4", "int2"), errors[1:4]):
        codes = model.quantizer.quantize(embeddings, precision)
        assert (model.quantizer.dequantize(codes, precision) - embeddings).pow(2).sum(-1).mean() < before


def test_codes_of_a_text_do_not_depend_on_the_batch(converted_qwen3):
    text = "The same text, alone and in a batch."
    others = ["Something else entirely, and quite a bit longer than the text itself.", "Short."]
    for precision in ("int8", "int4", "int2", "binary"):
        alone = converted_qwen3.encode([text], precision=precision)
        in_batch = converted_qwen3.encode([*others, text], precision=precision)
        assert np.array_equal(alone[0], in_batch[-1]), precision


def test_head_saves_with_the_model_and_vanilla_still_loads(converted_qwen3, tmp_path):
    from sentence_transformers import SentenceTransformer

    with torch.no_grad():
        converted_qwen3.quantizer.log_half_ranges["int4"].add_(0.3)  # as if trained
    expected = converted_qwen3.encode(["a text"], precision="int4")
    converted_qwen3.save(str(tmp_path))
    reloaded = BitEmbed(str(tmp_path))
    torch.testing.assert_close(
        reloaded.quantizer.log_half_ranges["int4"], converted_qwen3.quantizer.log_half_ranges["int4"]
    )
    assert np.array_equal(reloaded.encode(["a text"], precision="int4"), expected)
    vanilla = SentenceTransformer(str(tmp_path))
    assert np.allclose(vanilla.encode(["a text"]), converted_qwen3.encode(["a text"]), atol=1e-6)


def test_head_parameters_travel_in_the_state_dict(converted_qwen3):
    state = converted_qwen3.state_dict()
    assert "quantize_head.log_half_ranges.int4" in state
    state["quantize_head.log_half_ranges.int4"] = state["quantize_head.log_half_ranges.int4"] + 1.0
    converted_qwen3.load_state_dict(state)
    torch.testing.assert_close(
        converted_qwen3.quantizer.log_half_ranges["int4"], state["quantize_head.log_half_ranges.int4"]
    )


def test_encode_returns_tensors_numpy_and_single_vectors(converted_qwen3):
    tensor = converted_qwen3.encode(["a", "b"], precision="int4", pack=True, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 and tensor.shape == (2, 32)
    single = converted_qwen3.encode("a", precision="binary")
    assert isinstance(single, np.ndarray) and single.shape == (8,) and single.dtype == np.int8
    with pytest.raises(ValueError, match="Unknown precision 'int16'"):
        converted_qwen3.encode(["a"], precision="int16")


def test_saved_int8_ranges_give_vanilla_users_the_heads_int8_codes(converted_qwen3, sts_sentences, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import quantize_embeddings

    converted_qwen3.calibrate_quantizer(sts_sentences[:64])
    converted_qwen3.save(str(tmp_path))
    ranges = np.load(tmp_path / "quantize" / "int8_ranges.npy")
    vanilla = SentenceTransformer(str(tmp_path))
    texts = sts_sentences[100:200]
    embeddings = converted_qwen3.encode(texts)
    for precision in ("int8", "uint8"):
        expected = converted_qwen3.encode(texts, precision=precision)
        codes = quantize_embeddings(embeddings, precision, ranges=ranges)
        assert codes.dtype == expected.dtype
        assert (codes != expected).mean() < 1e-3  # float rounding at a code boundary may differ
        assert np.abs(codes.astype(int) - expected.astype(int)).max() <= 1
        # what a vanilla user runs: the codes of a text do not depend on the rest of the batch
        in_batch = quantize_embeddings(vanilla.encode(texts), precision, ranges=ranges)
        alone = quantize_embeddings(vanilla.encode(texts[:1]), precision, ranges=ranges)
        assert np.array_equal(alone[0], in_batch[0])


def nested_head_and_embeddings(precisions=("int8", "int4", "int2")) -> tuple[Quantize, torch.Tensor]:
    head = Quantize(100, precisions=precisions, nested=True)
    embeddings = unit_vectors(300, 100)
    head.calibrate(embeddings)
    embeddings[:5] *= 4  # beyond the ranges: clipping must nest too
    embeddings[5, :10] = 0.0  # exactly zero: the sign bit of a code that floors to 0
    return head, embeddings


@pytest.mark.parametrize("target", ["int4", "int2", "binary", "ubinary", "uint8", "int8"])
@pytest.mark.parametrize("source", ["int8", "uint8"])
def test_nested_codes_truncate_to_exactly_the_lower_precisions_codes(source, target):
    head, embeddings = nested_head_and_embeddings()
    stored = head.quantize(embeddings, source)
    assert torch.equal(head.truncate(stored, source, target), head.quantize(embeddings, target))


def test_packed_nested_codes_truncate_packed():
    head, embeddings = nested_head_and_embeddings()
    int4_packed = head.quantize(embeddings, "int4", pack=True)
    int2_packed = head.truncate(int4_packed, "int4", "int2", pack=True)
    assert torch.equal(int2_packed, head.quantize(embeddings, "int2", pack=True))
    assert torch.equal(head.truncate(int2_packed, "int2", "binary"), head.quantize(embeddings, "binary"))
    as_array = head.truncate(int4_packed.numpy(), "int4", "int2", pack=True)  # a NumPy (memory-mapped) store
    assert isinstance(as_array, np.ndarray) and np.array_equal(as_array, int2_packed.numpy())
    # Truncated codes mean what the head's own codes mean.
    own_codes = head.quantize(embeddings, "int2")
    assert torch.equal(head.dequantize(int2_packed, "int2"), head.dequantize(own_codes, "int2"))


def test_truncating_is_refused_where_codes_do_not_nest():
    embeddings = unit_vectors(8, 100)
    with pytest.raises(ValueError, match="Only a nested head"):
        Quantize(100).truncate(Quantize(100).quantize(embeddings, "int8"), "int8", "int4")
    head, _ = nested_head_and_embeddings()
    codes = head.quantize(embeddings, "int4")
    for source, target in [("int4", "int8"), ("int4", "float32"), ("binary", "binary")]:
        with pytest.raises(ValueError, match="Cannot truncate"):
            head.truncate(codes, source, target)


def test_nested_head_shares_one_trainable_range_and_fits_one_precision_as_a_plain_head_does():
    head, embeddings = nested_head_and_embeddings()
    assert list(head.log_half_ranges) == ["nested"]
    assert torch.allclose(head.step("int4"), 16 * head.step("int8")) and torch.allclose(
        head.step("int2"), 64 * head.step("int8")
    )
    loss = sum((head.fake_quantize(embeddings, p) - embeddings).pow(2).sum() for p in ("int8", "int4", "int2"))
    loss.backward()
    assert head.log_half_ranges["nested"].grad.abs().sum() > 0
    single, plain = Quantize(100, ["int4"], nested=True), Quantize(100, ["int4"])
    single.calibrate(embeddings)
    plain.calibrate(embeddings)
    assert torch.equal(single.step("int4"), plain.step("int4"))


def test_nested_range_lies_between_the_precisions_own_optima():
    shared = Quantize(64, nested=True).step("int8") * 128  # its half-range
    own = {p: Quantize(64).step(p) * 2 ** (PRECISIONS[p].bits - 1) for p in ("int8", "int2")}
    assert (own["int2"] < shared).all() and (shared < own["int8"]).all()


def test_nested_head_saves_and_loads_nested(tmp_path):
    head, embeddings = nested_head_and_embeddings()
    head.save(str(tmp_path))
    loaded = Quantize.load(str(tmp_path))
    assert loaded.nested and torch.equal(loaded.quantize(embeddings, "int4"), head.quantize(embeddings, "int4"))
