"""The stand-ins a converted or loaded backbone gets for inference, in the one order they depend on.

Each stand-in (a :class:`~st_bitembed.quantization.stand_in.StandIn`) keeps the module it replaces (and its children
and parameters, under their own names) and runs it whenever its own path does not apply (training, gradients, hooks,
devices or dtypes its kernels do not take): checkpoints and training do not change.
"""

from __future__ import annotations

import torch

from st_bitembed.quantization.activation_fusion import fuse_intermediate_activations
from st_bitembed.quantization.mlp_fusion import fuse_gated_mlps
from st_bitembed.quantization.native_attention import use_native_attention
from st_bitembed.quantization.native_decoder_attention import use_native_decoder_attention
from st_bitembed.quantization.native_norm import use_native_norms
from st_bitembed.quantization.norm_folding import fold_model_norms
from st_bitembed.quantization.residual_norm import fuse_residual_norms


def use_fused_inference(backbone: torch.nn.Module) -> None:
    """Put the inference stand-ins into ``backbone`` (its BitLinears installed): model norms folded into the
    BitLinears that read them first (a folded norm is not run on its own), then the other RMSNorms in one native pass,
    the gated MLPs' products in their down projections' quantizers, the encoder MLPs' activations in their first
    projections' kernels, the encoder blocks' residual adds and LayerNorms in one native pass, the encoders'
    self-attention in one native call, and the decoders' head norms, rotary embedding and attention natively (after
    the native norms, whose head norms they run in their own pass). Taking them again changes nothing."""
    fold_model_norms(backbone)
    use_native_norms(backbone)
    fuse_gated_mlps(backbone)
    fuse_intermediate_activations(backbone)
    fuse_residual_norms(backbone)
    use_native_attention(backbone)
    use_native_decoder_attention(backbone)
