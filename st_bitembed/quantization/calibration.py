"""Calibration of the RMSNorms that conversion inserts in front of every quantized projection.

An inserted RMSNorm with weight 1 rescales each token's input to unit RMS, while the pretrained projection expects
the original scale. Setting the norm's weight per channel to ``E|x_i| / E|x_i / rms(x)|`` (over real tokens of a few
hundred sentences) restores that scale on average: all-MiniLM-L6-v2 converted and calibrated on 256 STS-B train
sentences scores 64.7 on STS-B test before any training, 30.3 uncalibrated (Spearman x 100 of the cosines of the
1,379 pairs), which makes the distillation that follows far shorter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor
from transformers.integrations.bitnet import AutoBitLinear


@torch.no_grad()
def calibrate_inserted_norms(model: SentenceTransformer, texts: Sequence[str], max_texts: int = 256) -> int:
    """Set every inserted RMSNorm's weight from its input statistics on ``texts``, in one forward pass.

    Each norm is calibrated by a forward pre-hook just before it first runs, so every later layer already sees the
    calibrated earlier ones. Returns the number of norms calibrated.

    Raises:
        ValueError: the model has no inserted norms, or no texts were given.
    """
    texts = list(texts)[:max_texts]
    layers = [m for m in model[0].auto_model.modules() if isinstance(m, AutoBitLinear) and m.rms_norm is not None]
    if not layers:
        raise ValueError("The model has no RMSNorms in front of BitLinear layers to calibrate.")
    if not texts:
        raise ValueError("Calibration needs some texts.")
    features = model.preprocess(texts)
    features = {k: v.to(model.device) if isinstance(v, Tensor) else v for k, v in features.items()}
    real_tokens = features["attention_mask"].bool()
    calibrated: set[int] = set()

    # Hooked on the layer, not on its norm: the integer inference path folds the norm and never calls it.
    def calibrate(layer: AutoBitLinear, args: tuple[Tensor, ...]) -> None:
        norm = layer.rms_norm
        inputs = args[0].float()
        tokens = inputs[real_tokens] if inputs.shape[:2] == real_tokens.shape else inputs.reshape(-1, inputs.shape[-1])
        rms = tokens.pow(2).mean(dim=-1, keepdim=True).add(norm.variance_epsilon).sqrt()
        scale = tokens.abs().mean(dim=0) / (tokens / rms).abs().mean(dim=0).clamp(min=1e-12)
        norm.weight.copy_(scale.to(norm.weight.dtype))
        calibrated.add(id(layer))

    was_training = model.training
    model.eval()
    handles = [layer.register_forward_pre_hook(calibrate) for layer in layers]
    try:
        model(features)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if len(calibrated) != len(layers):
        raise RuntimeError(f"Only {len(calibrated)} of {len(layers)} norms saw the calibration texts.")
    return len(layers)
