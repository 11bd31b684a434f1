"""Deployment export: ternary weights packed 2 bits per weight in transformers' offline BitNet format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.integrations.bitnet import AutoBitLinear, pack_weights

from st_bitembed.model import BitEmbed
from st_bitembed.modules.subln_transformer import SubLNTransformer
from st_bitembed.quantization.bitlinear import BitLinear
from st_bitembed.quantization.ternary import ternary_weight_codes
from st_bitembed.saving import check_target, staged_folder

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packed_state_dict(backbone: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The backbone's state dict in the offline BitNet layout: each BitLinear's weight as 2-bit ternary codes packed
    4 per byte (transformers' ``pack_weights``) plus a ``weight_scale``; every other tensor cast to ``dtype``.

    transformers' offline ``AutoBitLinear`` computes ``(x_q @ W_t.T + b) * weight_scale``, so biases are stored
    divided by the scale, which gives back ``x_q @ (W_t * scale).T + b``.
    """
    layers = {name: m for name, m in backbone.named_modules() if isinstance(m, AutoBitLinear)}
    state = {key: value.detach().to(dtype).contiguous() for key, value in backbone.state_dict().items()}
    for name, layer in layers.items():
        if not layer.online_quant:
            raise ValueError(f"{name} is already an offline (exported) layer; export the training-form model.")
        codes, scale = layer.ternary_codes() if isinstance(layer, BitLinear) else ternary_weight_codes(layer.weight)
        state[f"{name}.weight"] = pack_weights(codes.clone())
        state[f"{name}.weight_scale"] = scale.reshape(1).to(dtype)
        if layer.bias is not None:
            state[f"{name}.bias"] = (layer.bias.detach().float() / scale).to(dtype)
    return state


def export_packed(
    model: str | BitEmbed, output_dir: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Save ``model`` with its BitLinear weights packed 2 bits per weight, loadable by vanilla
    ``SentenceTransformer(output_dir)`` (transformers rebuilds offline ``AutoBitLinear`` layers) and by ``BitEmbed``.

    Args:
        model: A BitEmbed model (training form) or its path.
        output_dir: Where to write the deployment model.
        dtype: dtype of everything that is not a packed weight (embeddings, norms, scales): "float32" reproduces the
            training-form embeddings up to float rounding; "bfloat16" halves those tensors.
        overwrite: Replace a model already in ``output_dir`` (otherwise refused). The export is written aside and
            moved in when complete (:func:`st_bitembed.saving.staged_folder`).

    Returns:
        ``output_dir``.

    Raises:
        FileExistsError: ``output_dir`` holds a model and ``overwrite`` is False.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"Unknown export dtype {dtype!r}; choose one of {list(EXPORT_DTYPES)}.")
    check_target(output_dir, overwrite, "overwrite=True (--overwrite)")
    model = BitEmbed(model) if isinstance(model, str) else model
    with staged_folder(output_dir) as staging:
        _write_packed(model, staging, dtype)
    return Path(output_dir)


def _write_packed(model: BitEmbed, output_dir: Path, dtype: str) -> None:
    model.save(str(output_dir))
    backbone = model[0].auto_model
    state = packed_state_dict(backbone, EXPORT_DTYPES[dtype])
    if isinstance(model[0], SubLNTransformer):  # its norms live in subln_norms.safetensors, written by save()
        state = {key: value for key, value in state.items() if not key.endswith(".rms_norm.weight")}
    for stale in output_dir.glob("model*.safetensors*"):
        stale.unlink()
    save_file(state, str(output_dir / "model.safetensors"), metadata={"format": "pt"})

    config = json.loads((output_dir / "config.json").read_text())
    config["quantization_config"] = {**config["quantization_config"], "quantization_mode": "offline"}
    config["dtype"] = dtype
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))
