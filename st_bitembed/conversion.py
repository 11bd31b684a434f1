"""From a pretrained backbone to an (untrained) BitEmbed model: checks, layer conversion, pooling and EOS.

:meth:`st_bitembed.BitEmbed.from_backbone` is this module's :func:`convert_backbone`; the layer-level swap
(``nn.Linear`` -> ``AutoBitLinear`` + RMSNorm) is :mod:`st_bitembed.quantization.convert`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.util import load_file_path
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from st_bitembed.hub import check_model_source
from st_bitembed.modules.quantize import Quantize
from st_bitembed.modules.subln_transformer import SubLNTransformer
from st_bitembed.quantization.bitlinear import install_bitlinear
from st_bitembed.quantization.convert import (
    NORM_PLACEMENTS,
    SUBLN_TARGETS,
    NormPlacement,
    bitnet_quantization_config,
    convert_to_bitlinear,
    default_rms_norm_eps,
)
from st_bitembed.quantization.inference_fusions import use_fused_inference
from st_bitembed.tokenization import append_eos_token, pooling_eos_token

if TYPE_CHECKING:
    from st_bitembed.model import BitEmbed


def convert_backbone(
    model_class: type[BitEmbed],
    name_or_path: str,
    *,
    norm: NormPlacement = "all",
    pooling: Literal["lasttoken", "mean", "cls"] | None = None,
    eos_token: str | None = None,
    subln_targets: Sequence[str] = SUBLN_TARGETS,
    nested_codes: bool = False,
    device: str | None = None,
    revision: str | None = None,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
) -> BitEmbed:
    """Convert a pretrained backbone into an (untrained) BitEmbed model.

    Every ``nn.Linear`` inside the transformer blocks becomes a ``BitLinear`` (transformers' ``AutoBitLinear``,
    online mode): per-tensor absmean ternary weights, per-token absmax int8 activations, straight-through
    estimator in training; the pretrained weights are kept exactly as its latent weights. Token embeddings
    and norms stay full precision; a causal LM's head is dropped.

    Called as ``BitEmbed.from_backbone(name_or_path, ...)`` (``model_class`` is the class it is called on). Every
    check that can fail runs on the config, the tokenizer and a weightless (meta) copy of the architecture before any
    weights load.

    Args:
        name_or_path: A Hub id or local directory: a transformers checkpoint (decoder LLMs such as Qwen3,
            Gemma3, Llama; encoders such as BERT) or a sentence-transformers model.
        norm: ``"all"``: a new RMSNorm (weights 1) in front of every quantized projection, as in the released
            BitNet-embedding models; ``"subln"``: only in front of the projections named in ``subln_targets``
            (o_proj and down_proj: BitDistill's SubLN).
        pooling: For a plain transformers checkpoint, the pooling to add before L2 normalisation; defaults to
            ``"lasttoken"`` for decoders and ``"mean"`` for encoders. A sentence-transformers model keeps its own
            pooling and other modules, and this must be ``None``.
        eos_token: For last-token pooling, the token appended to every text; defaults to ``<|endoftext|>`` for
            the Qwen families and to the tokenizer's ``eos_token`` otherwise.
        subln_targets: Module name suffixes that get a norm when ``norm="subln"``.
        nested_codes: Give the model a nested Quantize head: one range per dimension for all integer precisions,
            so that the int4 / int2 / binary codes are the top bits of the int8 code and one stored array serves
            every precision (:meth:`~st_bitembed.modules.quantize.Quantize.truncate`).
        device: Device to put the model on.
        revision, token, cache_folder, local_files_only: Hub arguments, as for ``SentenceTransformer``.
        model_kwargs, processor_kwargs, config_kwargs: Passed on to ``AutoModel`` / ``AutoTokenizer`` /
            ``AutoConfig.from_pretrained``.

    Returns:
        The converted model. Save it with ``model.save(path)``.

    Raises:
        ValueError: an unknown ``norm`` or ``pooling``, an architecture with no linear layers to convert, or a
            tokenizer without an EOS token for last-token pooling.
        FileNotFoundError, ConnectionError: ``name_or_path`` can be neither found locally nor fetched.
    """
    if norm not in NORM_PLACEMENTS:
        raise ValueError(f"Unknown norm placement {norm!r}; choose one of {NORM_PLACEMENTS}.")
    if pooling is not None and pooling not in Pooling.POOLING_MODES:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {Pooling.POOLING_MODES}.")
    check_model_source(name_or_path, revision=revision, token=token)
    hub_kwargs = {
        "revision": revision,
        "token": token,
        "cache_dir": cache_folder,
        "local_files_only": local_files_only,
    }
    modules_json = load_file_path(
        name_or_path,
        "modules.json",
        token=token,
        cache_folder=cache_folder,
        revision=revision,
        local_files_only=local_files_only,
    )
    st_modules = None
    if modules_json is not None:
        with open(modules_json, encoding="utf8") as file:
            st_modules = json.load(file)
        if pooling is not None:
            raise ValueError(
                f"{name_or_path!r} is a sentence-transformers model, which keeps its own pooling; leave pooling=None."
            )
    subfolder = st_modules[0]["path"] if st_modules else ""

    # Cheap checks on config, tokenizer and a weightless (meta) copy of the architecture, before any weights load.
    config = AutoConfig.from_pretrained(name_or_path, subfolder=subfolder, **hub_kwargs, **(config_kwargs or {}))
    with torch.device("meta"):
        convert_to_bitlinear(AutoModel.from_config(config), norm=norm, subln_targets=subln_targets)
    if pooling is None and st_modules is None:
        pooling = "lasttoken" if is_decoder(config) else "mean"
    if pooling == "lasttoken":
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs, **(processor_kwargs or {}))
        eos_token = pooling_eos_token(tokenizer, config.model_type, eos_token)

    transformer_cls = SubLNTransformer if norm == "subln" else Transformer
    init_kwargs = {"subln_targets": subln_targets} if norm == "subln" else {}
    # What sentence-transformers' loaders take, for the model and for its Transformer module alike.
    load_kwargs = {
        "revision": revision,
        "token": token,
        "cache_folder": cache_folder,
        "local_files_only": local_files_only,
        "model_kwargs": model_kwargs,
        "processor_kwargs": processor_kwargs,
        "config_kwargs": config_kwargs,
    }
    if st_modules is not None:
        model = model_class._load_with_module_classes(
            name_or_path, {st_modules[0]["type"]: transformer_cls}, device=device, **load_kwargs
        )
    else:
        transformer = transformer_cls.load(name_or_path, init_defaults=init_kwargs, **load_kwargs)
        pooling_module = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
        model = model_class(modules=[transformer, pooling_module, Normalize()], device=device)

    transformer = model[0]
    if not isinstance(transformer, Transformer):
        raise ValueError(f"The first module of {name_or_path!r} is {type(transformer).__name__}, not a Transformer.")
    backbone = transformer.auto_model
    rms_norm_eps = default_rms_norm_eps(backbone)
    convert_to_bitlinear(backbone, norm=norm, subln_targets=subln_targets, rms_norm_eps=rms_norm_eps)
    install_bitlinear(backbone)
    use_fused_inference(backbone)
    backbone.config.quantization_config = bitnet_quantization_config(
        backbone, use_rms_norm=norm == "all", rms_norm_eps=rms_norm_eps
    )
    # A sentence-transformers base that pools on its last token must end every text in EOS as well.
    if any(isinstance(m, Pooling) and "lasttoken" in str(m.pooling_mode) for m in model):
        tokenizer = transformer.tokenizer
        eos_token = pooling_eos_token(tokenizer, backbone.config.model_type, eos_token)
        if tokenizer("a")["input_ids"][-1] != tokenizer.convert_tokens_to_ids(eos_token):
            append_eos_token(tokenizer, eos_token)
    if nested_codes:
        model.set_quantizer(Quantize(model.get_embedding_dimension(), nested=True))
    model.to(model.device)  # the new norms were created on the weights' device; keep everything together
    if not os.path.isdir(name_or_path):
        model.model_card_data.base_model = name_or_path
    return model


def is_decoder(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes a causal (decoder-only) language model, which pools on its last token."""
    architectures = config.architectures or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in architectures):
        return True
    return (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
