"""BitLinear: transformers' ``AutoBitLinear`` (training form, straight-through estimator) with an integer inference
path that quantizes the weights once instead of at every forward."""

from __future__ import annotations

from typing import Literal

import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.quantization.kernels import fused_int8_linear, int8_linear
from st_bitembed.quantization.ternary import ternary_weight_codes

Kernel = Literal["int8", "int8-eager", "reference"]
KERNELS: tuple[str, ...] = ("int8", "int8-eager", "reference")


class BitLinear(AutoBitLinear):
    """``AutoBitLinear`` whose inference (eval mode, no gradients) runs int8 x ternary integer matmuls.

    Training, and anything that needs gradients, runs transformers' own forward (fake quantization of the latent
    weights with a straight-through estimator). At inference the ternary codes and scale are computed once and
    cached (recomputed whenever the latent weights change), and activations are quantized per token to int8:
    the same arithmetic, with an int32 accumulator instead of float32 sums of quantized values.

    Saved checkpoints do not record this class: transformers rebuilds ``AutoBitLinear`` from the BitNet
    quantization config, and :class:`~st_bitembed.BitEmbed` swaps in this class after loading.

    Attributes:
        kernel: ``"int8"`` (default: the integer path at inference, on ``torch._int_mm`` where it works, else the
            exact float32 product of the integer codes, fused by ``torch.compile`` where that works),
            ``"int8-eager"`` (the same, never compiled) or ``"reference"`` (transformers' float forward always).
    """

    kernel: Kernel = "int8"

    @classmethod
    def from_autobitlinear(cls, layer: AutoBitLinear) -> BitLinear:
        """The same layer (same parameters and norm objects, nothing copied) with the inference path."""
        with torch.device("meta"):
            new = cls(
                layer.in_features, layer.out_features, bias=layer.bias is not None, online_quant=layer.online_quant
            )
        new.weight, new.bias, new.rms_norm = layer.weight, layer.bias, layer.rms_norm
        if not layer.online_quant:
            new.weight_scale = layer.weight_scale
        return new.train(layer.training)

    def _inference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        cache = getattr(self, "_cached_codes", None)
        if cache is None or cache[0] != key:
            if self.online_quant:
                codes, scale = ternary_weight_codes(self.weight)
            else:  # offline checkpoints already hold ternary values, with their scale beside them
                codes, scale = (
                    self.weight.detach().round().to(torch.int8),
                    self.weight_scale.detach().float().reshape(()),
                )
            self._cached_codes = (key, codes.t().contiguous(), scale.to(self.weight.device))
        return self._cached_codes[1], self._cached_codes[2]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference" or self.training or torch.is_grad_enabled():
            return super().forward(input)
        if self.rms_norm is not None:
            input = self.rms_norm(input)
        codes_t, scale = self._inference_weights()
        bias = self.bias
        if bias is not None and not self.online_quant:  # offline layers compute (x W + b) * scale
            bias = bias * scale
        if self.kernel == "int8-eager":
            return int8_linear(input, codes_t, scale, bias)
        return fused_int8_linear(input, codes_t, scale, bias)


def install_bitlinear(model: torch.nn.Module, kernel: Kernel = "int8") -> int:
    """Swap every ``AutoBitLinear`` of ``model`` for :class:`BitLinear` (sharing its parameters) and set ``kernel``
    on all of them. Returns the number of layers."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown BitLinear kernel {kernel!r}; choose one of {KERNELS}.")
    layers = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, AutoBitLinear):
            if not isinstance(module, BitLinear):
                module = BitLinear.from_autobitlinear(module)
                model.set_submodule(name, module)
            module.kernel = kernel
            layers += 1
    return layers
