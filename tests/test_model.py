from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed import BitEmbed
from st_bitembed.quantization.bitlinear import BitLinear

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.", "Hi"]


def encode_in_fresh_process(model_dir: Path, loader: str, output: Path) -> np.ndarray:
    """Load ``model_dir`` in a new Python process (``loader``: "vanilla" or "bitembed") and encode TEXTS."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        if {loader!r} == "vanilla":
            from sentence_transformers import SentenceTransformer as Loader
        else:
            from st_bitembed import BitEmbed as Loader
        model = Loader({str(model_dir)!r})
        np.save({str(output)!r}, model.encode({TEXTS!r}, convert_to_numpy=True))
        assert ("st_bitembed" in sys.modules) == ({loader!r} == "bitembed"), "vanilla load imported the plugin"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return np.load(output)


def train_one_step(model: BitEmbed) -> None:
    """One AdamW step on an in-batch-negatives loss; asserts the latent weights and new norms really changed."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_fn = MultipleNegativesRankingLoss(model)
    features = [model.preprocess(TEXTS), model.preprocess(TEXTS[::-1])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    loss_fn(features, None).backward()
    optimizer.step()
    model.eval()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.endswith("q_proj.weight") for name in changed)
    assert any(name.endswith("rms_norm.weight") for name in changed)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_convert_train_save_reload_in_fresh_process(backbone_dirs, family, tmp_path):
    model = BitEmbed.from_backbone(str(backbone_dirs[family]))
    layers = [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear)]
    assert len(layers) == 7 * model[0].auto_model.config.num_hidden_layers
    assert not hasattr(model[0].auto_model, "lm_head")
    train_one_step(model)
    expected = {"bitembed": model.encode(TEXTS, convert_to_numpy=True)}  # BitEmbed's int8 inference path
    model.set_bitlinear_kernel("reference")
    expected["vanilla"] = model.encode(TEXTS, convert_to_numpy=True)  # transformers' AutoBitLinear forward
    assert np.allclose(np.linalg.norm(expected["vanilla"], axis=1), 1.0, atol=1e-5)
    assert np.abs(expected["bitembed"] - expected["vanilla"]).max() < 1e-3  # same arithmetic up to rounding

    model.save(str(tmp_path / "model"))
    for loader in ("vanilla", "bitembed"):
        reloaded = encode_in_fresh_process(tmp_path / "model", loader, tmp_path / f"{loader}.npy")
        assert np.abs(reloaded - expected[loader]).max() <= 1e-6, loader


def test_subln_model_reloads_with_bitembed_and_vanilla_names_the_plugin(qwen3_dir, tmp_path):
    model = BitEmbed.from_backbone(str(qwen3_dir), norm="subln")
    normed = {n.rsplit(".", 1)[-1] for n, m in model[0].auto_model.named_modules() if getattr(m, "rms_norm", None)}
    assert normed == {"o_proj", "down_proj"}
    train_one_step(model)
    expected = model.encode(TEXTS, convert_to_numpy=True)
    model.save(str(tmp_path / "model"))

    reloaded = encode_in_fresh_process(tmp_path / "model", "bitembed", tmp_path / "bitembed.npy")
    assert np.abs(reloaded - expected).max() <= 1e-6
    with pytest.raises(ValueError, match=r"st_bitembed\.modules\.subln_transformer\.SubLNTransformer"):
        SentenceTransformer(str(tmp_path / "model"))


def test_loaded_model_keeps_only_codes_encodes_the_same_and_still_trains(qwen3_dir, tmp_path):
    """BitEmbed(path) frees the float latent weights; keep_latent_weights=True keeps them; both encode the same, and
    training the released model starts from latent weights rebuilt from the codes (the same quantized model)."""
    source = BitEmbed.from_backbone(str(qwen3_dir))
    train_one_step(source)
    source.save(str(tmp_path / "model"))

    kept = BitEmbed(str(tmp_path / "model"), keep_latent_weights=True)
    released = BitEmbed(str(tmp_path / "model"))
    layers = {name: [m for m in model.modules() if isinstance(m, BitLinear)] for name, model in
              (("kept", kept), ("released", released))}  # fmt: skip
    assert len(layers["released"]) == 14
    assert not any(layer.latent_weight_released for layer in layers["released"])  # until it first encodes
    checkpoint = str((tmp_path / "model" / "model.safetensors").resolve())
    assert checkpoint_mapped(checkpoint) in (None, True)
    expected = kept.encode(TEXTS)
    np.testing.assert_array_equal(released.encode(TEXTS), expected)
    assert all(layer.latent_weight_released for layer in layers["released"])
    assert not any(layer.latent_weight_released for layer in layers["kept"])
    del kept, layers["kept"]  # it keeps its latent weights, which are views of the file
    gc.collect()  # the model holds reference cycles
    # Released: the other weights were copied out of the checkpoint's memory map, which then closed.
    assert checkpoint_mapped(checkpoint) in (None, False)
    latent_bytes = sum(layer.weight.untyped_storage().nbytes() for layer in layers["released"])
    assert latent_bytes == 4 * len(layers["released"])  # one float each instead of in x out
    np.testing.assert_array_equal(released.encode(TEXTS), expected)
    codes_before = [layer.ternary_codes()[0].clone() for layer in layers["released"]]

    released.train()  # what the trainer does first: latent weights come back, rebuilt from the same codes
    assert not any(layer.latent_weight_released for layer in layers["released"])
    assert all(torch.equal(layer.ternary_codes()[0], before) for layer, before in
               zip(layers["released"], codes_before))  # fmt: skip
    released.eval()  # the rebuilt weights' absmean is the scale up to a rounding: the layers keep the exact scale
    np.testing.assert_array_equal(released.encode(TEXTS), expected)
    train_one_step(released)  # asserts that the latent weights and norms changed
    released.encode(TEXTS)  # a model that trained keeps its latent weights through evaluations
    assert not any(layer.latent_weight_released for layer in layers["released"])


def test_latent_weights_rebuilt_while_encoding_train_and_encode_as_trained(qwen3_dir, tmp_path):
    """The reference kernel rebuilds a released model's latent weights inside encode's inference mode; they must
    still be weights that train and whose changes the integer path sees (not inference tensors, which keep no
    version for the layers' caches to check)."""
    BitEmbed.from_backbone(str(qwen3_dir)).save(str(tmp_path / "model"))
    model = BitEmbed(str(tmp_path / "model"))
    model.encode(TEXTS)  # frees the latent weights
    model.set_bitlinear_kernel("reference")
    model.encode(TEXTS)  # rebuilds them, in inference mode
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert not any(layer.latent_weight_released or layer.weight.is_inference() for layer in layers)
    model.set_bitlinear_kernel("int8")
    train_one_step(model)
    model.save(str(tmp_path / "trained"))
    expected = BitEmbed(str(tmp_path / "trained"), keep_latent_weights=True).encode(TEXTS)
    np.testing.assert_array_equal(model.encode(TEXTS), expected)


def test_a_training_form_model_loaded_in_bf16_keeps_the_codes_of_its_float32_weights(qwen3_dir, tmp_path):
    """model_kwargs={"dtype": torch.bfloat16} runs the model in bf16, but its ternary codes are those of the saved
    float32 latent weights: rounding them to bf16 first would move some codes across a threshold."""
    from safetensors.torch import load_file

    from st_bitembed.quantization.ternary import ternary_weight_codes

    source = BitEmbed.from_backbone(str(qwen3_dir))
    train_one_step(source)  # latent weights that bf16 no longer holds exactly
    source.save(str(tmp_path / "model"))
    saved = load_file(tmp_path / "model" / "model.safetensors")
    latent = [weight for name, weight in saved.items() if name.endswith("proj.weight")]
    moved = sum(int((ternary_weight_codes(w)[0] != ternary_weight_codes(w.bfloat16())[0]).sum()) for w in latent)
    assert moved > 0  # what loading the latent weights in bf16 would change
    full = BitEmbed(str(tmp_path / "model"))
    half = BitEmbed(str(tmp_path / "model"), model_kwargs={"dtype": torch.bfloat16})
    backbone = half[0].auto_model
    assert backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    full_layers, half_layers = ([m for m in model.modules() if isinstance(m, BitLinear)] for model in (full, half))
    assert all(layer.latent_weight_released and layer.weight.dtype == torch.bfloat16 for layer in half_layers)
    assert all(layer.weight.untyped_storage().nbytes() == 2 for layer in half_layers)  # not materialised
    for full_layer, half_layer in zip(full_layers, half_layers):
        assert torch.equal(half_layer.ternary_codes()[0], full_layer.ternary_codes()[0])
        assert half_layer.ternary_codes()[1] == full_layer.ternary_codes()[1]
    cosine = torch.nn.functional.cosine_similarity(
        torch.as_tensor(half.encode(TEXTS)), torch.as_tensor(full.encode(TEXTS))
    )
    assert cosine.min() > 0.95  # bf16 activations: close, not equal
    # keep_latent_weights=True: the latent weights load in the dtype as given
    kept = BitEmbed(str(tmp_path / "model"), keep_latent_weights=True, model_kwargs={"dtype": torch.bfloat16})
    assert all(m.weight.dtype == torch.bfloat16 and not m.latent_weight_released for m in kept.modules()
               if isinstance(m, BitLinear))  # fmt: skip


def test_a_loaded_packed_export_reads_its_embedding_table_from_the_file(qwen3_dir, tmp_path):
    """A 2-bit export's checkpoint holds no latent weights (transformers unpacks its codes into process memory), so
    after the latent weights are freed the model keeps reading its embedding table from the file's memory map (only
    the rows texts use become resident) instead of copying the whole table."""
    from st_bitembed.export import export_packed

    source = BitEmbed.from_backbone(str(qwen3_dir))
    expected = source.encode(TEXTS)
    export_packed(source, tmp_path / "packed")
    model = BitEmbed(str(tmp_path / "packed"))
    np.testing.assert_allclose(model.encode(TEXTS), expected, atol=1e-5)
    assert all(layer.latent_weight_released for layer in model.modules() if isinstance(layer, BitLinear))
    assert checkpoint_mapped(str((tmp_path / "packed" / "model.safetensors").resolve())) in (None, True)


def checkpoint_mapped(path: str) -> bool | None:
    """Whether this process maps ``path`` (None where /proc/self/maps does not exist)."""
    maps = Path("/proc/self/maps")
    return any(line.rstrip().endswith(path) for line in maps.read_text().splitlines()) if maps.exists() else None


@pytest.fixture(scope="module")
def saved_model(qwen3_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model"
    model = BitEmbed.from_backbone(str(qwen3_dir))
    model.calibrate_quantizer(TEXTS * 4)
    model.save(str(path))
    return path


def damaged_copy(source: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(source, destination)
    return destination


def test_a_model_whose_config_lost_its_quantization_config_is_refused(saved_model, tmp_path):
    import json

    model_dir = damaged_copy(saved_model, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    del config["quantization_config"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no BitNet layers: its config.json lacks the 'quantization_config'"):
        BitEmbed(str(model_dir))


def test_a_head_without_its_config_is_refused(saved_model, tmp_path):
    model_dir = damaged_copy(saved_model, tmp_path / "model")
    (model_dir / "quantize" / "config.json").unlink()
    with pytest.raises(ValueError, match="no quantize/config.json: the head cannot be rebuilt"):
        BitEmbed(str(model_dir))


@pytest.mark.parametrize("damaged_file", ["model.safetensors", "quantize/model.safetensors"])
def test_non_finite_weights_are_refused(saved_model, tmp_path, damaged_file):
    from safetensors.torch import load_file, save_file

    model_dir = damaged_copy(saved_model, tmp_path / "model")
    tensors = load_file(model_dir / damaged_file)
    name = next(name for name, tensor in tensors.items() if tensor.numel() > 16 and "embed" not in name)
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, model_dir / damaged_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"hold NaN or infinite values \(.*\): a weights file"):
        BitEmbed(str(model_dir))


def test_a_damaged_embedding_row_is_refused_when_a_text_uses_it(saved_model, tmp_path):
    """The embedding table is not scanned at load (it would become resident): its damaged rows show in the
    embeddings of the texts whose tokens read them, which encode refuses."""
    from safetensors.torch import load_file, save_file

    model_dir = damaged_copy(saved_model, tmp_path / "model")
    tensors = load_file(model_dir / "model.safetensors")
    name = next(name for name in tensors if name.endswith("embed_tokens.weight"))
    tokens = BitEmbed(str(saved_model)).tokenizer(TEXTS)["input_ids"]
    damaged_token = next(token for token in tokens[1] if token not in tokens[0] + tokens[2])  # one of TEXTS[1] only
    tensors[name][damaged_token, 3] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    model = BitEmbed(str(model_dir))
    assert np.isfinite(model.encode([TEXTS[0], TEXTS[2]])).all()
    with pytest.raises(ValueError, match="1 of 3 embeddings are NaN or infinite"):
        model.encode(TEXTS)


@pytest.mark.parametrize("precision", ["float32", "int8", "int4", "binary"])
def test_non_finite_embeddings_never_become_codes(saved_model, precision):
    model = BitEmbed(str(saved_model))
    with torch.no_grad():
        model[0].auto_model.norm.weight[5] = float("nan")  # damage after loading: NaN in every embedding
    with pytest.raises(ValueError, match="3 of 3 embeddings are NaN or infinite"):
        model.encode(TEXTS, precision=precision)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize(
    "precision", ["float32", "float16", "bfloat16", "int8", "uint8", "int4", "int2", "binary", "ubinary"]
)
def test_empty_input_gives_an_empty_result_of_the_right_dtype_and_width(saved_model, precision, pack):
    model = BitEmbed(str(saved_model))
    expected = model.encode(TEXTS[:1], precision=precision, pack=pack)
    empty = model.encode([], precision=precision, pack=pack)
    assert empty.shape == (0, expected.shape[1]) and empty.dtype == expected.dtype
    as_tensor = model.encode([], precision=precision, pack=pack, convert_to_tensor=True)
    assert as_tensor.shape == (0, expected.shape[1])


def test_loading_does_not_warn_of_weight_unpacking(saved_model):
    """transformers warns that BitNet inference on CPU unpacks weights; BitEmbed's does not, so it drops that line."""
    stderr = {}
    loaders = ("sentence_transformers import SentenceTransformer as Loader", "st_bitembed import BitEmbed as Loader")
    for loader in loaders:
        script = f"from {loader}\nLoader({str(saved_model)!r}).encode(['a'])"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        stderr[loader.split()[0]] = result.stderr
    if not torch.cuda.is_available():  # transformers' own load says it (on CPU)
        assert "weight unpacking" in stderr["sentence_transformers"]
    assert "weight unpacking" not in stderr["st_bitembed"]


def test_multi_process_encoding_gives_the_codes_of_one_process(saved_model):
    """sentence-transformers' pool (2 CPU processes, spawned: the model is pickled to them after it released its
    latent weights) with precision=: each chunk is one batch, so one process encoding the same batches must give
    exactly the same codes (BitEmbed's embeddings depend on a batch's padding at the level of float rounding,
    amplified by the int8 activation codes)."""
    model = BitEmbed(str(saved_model))
    texts = [f"{text} {i}" for i in range(6) for text in TEXTS]
    single = np.concatenate([model.encode(texts[i : i + 4], precision="int4", batch_size=4) for i in range(0, 18, 4)])
    assert all(layer.latent_weight_released for layer in model.modules() if isinstance(layer, BitLinear))
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        pooled = model.encode(texts, precision="int4", batch_size=4, chunk_size=4, pool=pool)
    finally:
        model.stop_multi_process_pool(pool)
    np.testing.assert_array_equal(pooled, single)
