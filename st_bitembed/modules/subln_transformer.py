"""A sentence-transformers ``Transformer`` whose BitNet backbone has RMSNorms only where SubLN puts them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from safetensors.torch import load_file, save_file
from sentence_transformers.base.modules import Transformer
from transformers import PretrainedConfig, PreTrainedModel
from transformers.integrations.bitnet import AutoBitLinear
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import cached_file

from st_bitembed.quantization.convert import SUBLN_TARGETS

SUBLN_NORMS_FILE = "subln_norms.safetensors"


class SubLNTransformer(Transformer):
    """``Transformer`` for ``norm="subln"`` BitEmbed models (norms only in front of o_proj / down_proj).

    transformers' BitNet config can put an RMSNorm in front of every quantized projection or none, not a subset.
    So the backbone is saved as a standard BitNet checkpoint without norms, and the SubLN norms go to
    ``subln_norms.safetensors`` beside it; this module adds them back on load. Vanilla sentence-transformers
    refuses this class without ``trust_remote_code=True`` (and names it), so such a model never loads silently
    without its norms; ``BitEmbed(path)`` loads it directly.

    Args:
        model_name_or_path: As for ``Transformer``.
        subln_targets: Module name suffixes of the projections that carry a norm.
        **kwargs: Passed to ``Transformer``.
    """

    config_keys: list[str] = [*Transformer.config_keys, "subln_targets"]

    def __init__(self, model_name_or_path: str, *, subln_targets: Sequence[str] = SUBLN_TARGETS, **kwargs: Any):
        self.subln_targets = list(subln_targets)
        super().__init__(model_name_or_path, **kwargs)

    def _load_model(
        self,
        model_name_or_path: str,
        transformer_task: str,
        config: PretrainedConfig,
        backend: str,
        is_peft_model: bool,
        **model_kwargs: Any,
    ) -> PreTrainedModel:
        model = super()._load_model(
            model_name_or_path, transformer_task, config, backend, is_peft_model, **model_kwargs
        )
        norms_file = cached_file(
            model_name_or_path,
            SUBLN_NORMS_FILE,
            _raise_exceptions_for_missing_entries=False,
            **{
                key: model_kwargs[key]
                for key in ("subfolder", "revision", "token", "cache_dir", "local_files_only")
                if model_kwargs.get(key) is not None
            },
        )
        if norms_file is None:  # an unconverted backbone, about to be converted by BitEmbed.from_backbone
            return model
        norm_weights = load_file(norms_file)
        quantization_config = model.config.quantization_config
        eps = (
            quantization_config["rms_norm_eps"]
            if isinstance(quantization_config, dict)
            else quantization_config.rms_norm_eps
        )
        for name, module in model.named_modules():
            weight = norm_weights.get(f"{name}.rms_norm.weight")
            if isinstance(module, AutoBitLinear) and weight is not None:
                module.rms_norm = LlamaRMSNorm(module.in_features, eps=eps).to(module.weight.device)
                module.rms_norm.weight.data.copy_(weight)
        return model

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        state_dict = self.model.state_dict()
        norms = {key: state_dict.pop(key).contiguous() for key in list(state_dict) if key.endswith(".rms_norm.weight")}
        self.model.save_pretrained(output_path, state_dict=state_dict, safe_serialization=safe_serialization)
        save_file(norms, os.path.join(output_path, SUBLN_NORMS_FILE))
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)
