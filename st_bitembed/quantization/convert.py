"""Config-driven replacement of a backbone's linear layers by BitNet ``AutoBitLinear`` layers.

The layers are transformers' own (``transformers.integrations.bitnet.AutoBitLinear`` in online mode: ternary
absmean weights, int8 absmax activations, straight-through estimator), so a converted backbone saved with
:func:`bitnet_quantization_config` in its ``config.json`` is rebuilt by plain ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from transformers import BitNetQuantConfig, PreTrainedModel
from transformers.integrations.bitnet import AutoBitLinear
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.quantizers.quantizers_utils import should_convert_module

logger = logging.getLogger(__name__)

NormPlacement = Literal["all", "subln"]
NORM_PLACEMENTS: tuple[str, ...] = ("all", "subln")

# Projections that read the attention output and the FFN's inner activation: where BitDistill's SubLN puts
# its norms. Matched as the last components of a module name (Llama/Qwen/Gemma, BERT, OPT/GPT-style).
SUBLN_TARGETS: tuple[str, ...] = ("o_proj", "down_proj", "output.dense", "out_proj", "fc2")


def find_transformer_blocks(model: nn.Module) -> str:
    """Name of the ``nn.ModuleList`` holding the transformer blocks (the list with the most parameters)."""
    candidates = [
        (sum(p.numel() for p in module.parameters()), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; st_bitembed converts the linear "
            "layers inside the blocks of Hugging Face transformer models."
        )
    return max(candidates)[1]


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def convert_to_bitlinear(
    model: PreTrainedModel,
    norm: NormPlacement = "all",
    subln_targets: Iterable[str] = SUBLN_TARGETS,
    rms_norm_eps: float | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` inside the transformer blocks of ``model`` by an online ``AutoBitLinear``.

    The latent full-precision weights and biases are the original ``nn.Parameter`` objects (copied exactly).
    New RMSNorms (weights initialised to 1) go in front of every converted projection (``norm="all"``) or only in
    front of those matching ``subln_targets`` (``norm="subln"``). Embeddings, existing norms and linears outside
    the blocks (e.g. BERT's pooler) stay full precision.

    Args:
        model: A transformers base model (``AutoModel``), modified in place.
        norm: ``"all"`` or ``"subln"``.
        subln_targets: Module name suffixes that get a norm when ``norm="subln"``.
        rms_norm_eps: Epsilon of the new norms; defaults to the model config's ``rms_norm_eps`` or
            ``layer_norm_eps``, else 1e-6.

    Returns:
        The names of the converted modules.

    Raises:
        ValueError: ``norm`` is unknown, or the transformer blocks contain no ``nn.Linear`` to convert.
    """
    if norm not in NORM_PLACEMENTS:
        raise ValueError(f"Unknown norm placement {norm!r}; choose one of {NORM_PLACEMENTS}.")
    if rms_norm_eps is None:
        rms_norm_eps = default_rms_norm_eps(model)
    blocks = find_transformer_blocks(model)
    # transformers never converts a class's fp32-pinned modules on reload, so neither do we.
    keep_in_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    to_convert = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name.startswith(blocks + ".")
        and should_convert_module(name, keep_in_fp32 or None)
    ]
    if not to_convert:
        found = sorted({type(m).__name__ for m in model.get_submodule(blocks).modules() if not list(m.children())})
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers inside its transformer blocks ('{blocks}'; module types "
            f"found: {', '.join(found)}), so there is nothing to convert to BitLinear. st_bitembed converts "
            "architectures whose projections are torch.nn.Linear (Llama, Qwen, Gemma, Mistral, BERT, ...)."
        )

    for name, linear in to_convert:
        with torch.device("meta"):
            bitlinear = AutoBitLinear(
                linear.in_features, linear.out_features, bias=linear.bias is not None, online_quant=True
            )
        bitlinear.weight = linear.weight
        bitlinear.bias = linear.bias
        if norm == "all" or _matches(name, subln_targets):
            bitlinear.rms_norm = LlamaRMSNorm(linear.in_features, eps=rms_norm_eps).to(
                device=linear.weight.device, dtype=linear.weight.dtype
            )
        model.set_submodule(name, bitlinear)

    if norm == "subln" and not any(_matches(name, subln_targets) for name, _ in to_convert):
        raise ValueError(
            f"norm='subln' puts norms in front of modules named {tuple(subln_targets)}, but none of "
            f"{type(model).__name__}'s converted modules matches; pass subln_targets= with its projection names."
        )
    logger.debug(
        "Converted %d linear layers of %s to BitLinear (norm=%s)", len(to_convert), type(model).__name__, norm
    )
    return [name for name, _ in to_convert]


def default_rms_norm_eps(model: PreTrainedModel) -> float:
    config = model.config
    return float(getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", None) or 1e-6)


def bitnet_quantization_config(model: PreTrainedModel, use_rms_norm: bool, rms_norm_eps: float) -> BitNetQuantConfig:
    """The transformers quantization config under which ``AutoModel.from_pretrained`` rebuilds ``model``'s layers.

    Linears outside the converted set are listed in ``modules_to_not_convert`` by full name.

    Raises:
        RuntimeError: transformers would convert a different set of modules on reload than ``model`` has.
    """
    bitlinears = {name for name, module in model.named_modules() if isinstance(module, AutoBitLinear)}
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    config = BitNetQuantConfig(
        modules_to_not_convert=sorted(linears),
        linear_class="autobitlinear",
        quantization_mode="online",
        use_rms_norm=use_rms_norm,
        rms_norm_eps=rms_norm_eps,
    )
    skipped = config.modules_to_not_convert + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    reconverted = {name for name in bitlinears | linears if should_convert_module(name, skipped)}
    if reconverted != bitlinears:
        raise RuntimeError(
            "The BitNet quantization config would not rebuild the same layers on reload "
            f"(differences: {sorted(reconverted ^ bitlinears)}); please report this architecture."
        )
    return config
