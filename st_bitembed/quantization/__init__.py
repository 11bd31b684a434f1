from __future__ import annotations

from st_bitembed.quantization.convert import (
    NORM_PLACEMENTS,
    SUBLN_TARGETS,
    bitnet_quantization_config,
    convert_to_bitlinear,
    find_transformer_blocks,
)
from st_bitembed.quantization.ternary import bitlinear_reference, int8_activation_codes, ternary_weight_codes

__all__ = [
    "NORM_PLACEMENTS",
    "SUBLN_TARGETS",
    "bitlinear_reference",
    "bitnet_quantization_config",
    "convert_to_bitlinear",
    "find_transformer_blocks",
    "int8_activation_codes",
    "ternary_weight_codes",
]
