"""The Quantize head: trainable, batch-independent quantization of sentence embeddings to 16/8/4/2/1 bits."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from sentence_transformers.base.modules import Module
from torch import nn

from st_bitembed.quantization.packing import pack_codes, unpack_codes

try:
    from typing import Self
except ImportError:  # Python 3.10
    from typing_extensions import Self

# Storage precisions and their bits per dimension. "uint8" is the int8 code shifted by 128 (sentence-transformers'
# unsigned layout); "binary" / "ubinary" are the sign bits packed 8 per byte as by sentence_transformers'
# quantize_embeddings (int8 = byte - 128, uint8 = byte).
PRECISIONS: dict[str, int] = {
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "int8": 8,
    "uint8": 8,
    "int4": 4,
    "int2": 2,
    "binary": 1,
    "ubinary": 1,
}
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INTEGER_BITS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2}
INT8_RANGES_FILE = "int8_ranges.npy"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; valid precisions are {', '.join(PRECISIONS)}.")


@lru_cache
def gaussian_optimal_half_range(bits: int) -> float:
    """Half-range (in standard deviations) of the uniform midrise quantizer with least MSE on a standard Gaussian."""
    probabilities = torch.linspace(0, 1, 40_003, dtype=torch.float64)[1:-1]
    samples = math.sqrt(2) * torch.erfinv(2 * probabilities - 1)
    candidates = torch.linspace(0.3, 8.0, 771, dtype=torch.float64)
    errors = [
        (samples - _midrise(samples, half_range / 2 ** (bits - 1), bits)).pow(2).mean() for half_range in candidates
    ]
    return float(candidates[int(torch.stack(errors).argmin())])


def _codes(values: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.floor(values / step).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _midrise(values: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    return (_codes(values, step, bits) + 0.5) * step


class Quantize(Module):
    """Quantizes L2-normalised sentence embeddings for storage at 16, 8, 4, 2 or 1 bit per dimension.

    Integer precisions use a uniform midrise quantizer per dimension: code ``c = clamp(floor(x / s_d), -2**(b-1),
    2**(b-1) - 1)`` stands for ``(c + 0.5) * s_d``, with a trainable step ``s_d`` (stored as a log half-range per
    dimension and precision). Every level is used (no wasted zero), so 2 bits give 4 levels and 1 bit is the sign.
    Binary codes are the sign bits in sentence-transformers' packed layout and stand for ``+-1 / sqrt(dim)``.
    A text's codes depend only on its own embedding, never on the rest of the batch.

    The ranges start at the MSE-optimal clipping for coordinates of a random unit vector (standard deviation
    ``1 / sqrt(dim)``), so an untrained head already works; :meth:`calibrate` fits them to real embeddings, and
    :meth:`fake_quantize` (straight-through estimator) lets training optimise them with the model.

    This head is kept out of ``modules.json`` so that vanilla sentence-transformers still loads a BitEmbed model;
    :class:`~st_bitembed.BitEmbed` saves it in the ``quantize/`` folder of the model and reads it back.

    Args:
        embedding_dimension: Dimension of the sentence embeddings.

    Example:
        ::

            import torch
            from st_bitembed.modules.quantize import Quantize

            head = Quantize(384)
            embeddings = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
            codes = head.quantize(embeddings, "int4")  # int8 tensor with values in [-8, 7]
            reconstructed = head.dequantize(codes, "int4")
    """

    config_keys: list[str] = ["embedding_dimension"]

    def __init__(self, embedding_dimension: int) -> None:
        super().__init__()
        self.embedding_dimension = embedding_dimension
        self.log_half_ranges = nn.ParameterDict(
            {
                precision: nn.Parameter(
                    torch.full(
                        (embedding_dimension,),
                        math.log(gaussian_optimal_half_range(bits)) - 0.5 * math.log(embedding_dimension),
                    )
                )
                for precision, bits in INTEGER_BITS.items()
            }
        )

    @property
    def device(self) -> torch.device:
        return self.log_half_ranges["int8"].device

    def step(self, precision: str, dimension: int | None = None) -> torch.Tensor:
        """Quantization step per dimension of an integer precision (for the first ``dimension`` dimensions)."""
        half_range = self.log_half_ranges[precision][: dimension or self.embedding_dimension].exp()
        return half_range / 2 ** (INTEGER_BITS[precision] - 1)

    def _integer_precision(self, precision: str) -> str:
        return "int8" if precision == "uint8" else precision

    def _check_dimension(self, embeddings: torch.Tensor) -> int:
        dimension = embeddings.shape[-1]
        if dimension > self.embedding_dimension:
            raise ValueError(
                f"Embeddings have {dimension} dimensions; this head quantizes {self.embedding_dimension}."
            )
        return dimension

    def fake_quantize(self, embeddings: torch.Tensor, precision: str) -> torch.Tensor:
        """Differentiable quantize-dequantize: forward gives exactly ``dequantize(quantize(x))``, backward passes
        gradients straight through the rounding to the embeddings and to the per-dimension steps."""
        check_precision(precision)
        dimension = self._check_dimension(embeddings)
        if precision in FLOAT_DTYPES:
            rounded = embeddings.to(FLOAT_DTYPES[precision]).to(embeddings.dtype)
            return embeddings + (rounded - embeddings).detach()
        if PRECISIONS[precision] == 1:
            signs = torch.where(embeddings > 0, 1.0, -1.0).to(embeddings.dtype) / math.sqrt(dimension)
            return embeddings + (signs - embeddings).detach()
        precision = self._integer_precision(precision)
        bits, step = INTEGER_BITS[precision], self.step(precision, dimension)
        scaled = embeddings / step
        floored = scaled + (torch.floor(scaled) - scaled).detach()
        return (floored.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 0.5) * step

    @torch.no_grad()
    def quantize(self, embeddings: torch.Tensor, precision: str, pack: bool = False) -> torch.Tensor:
        """Storage codes of ``embeddings`` (``[..., dim]``).

        Returns float tensors for float precisions; int8 codes for int8 / int4 / int2 (uint8 for uint8), or with
        ``pack=True`` uint8 bytes holding 2 (int4) or 4 (int2) codes; binary / ubinary always packed 8 per byte.
        """
        check_precision(precision)
        dimension = self._check_dimension(embeddings)
        if precision in FLOAT_DTYPES:
            return embeddings.to(FLOAT_DTYPES[precision])
        if PRECISIONS[precision] == 1:
            packed = pack_codes((embeddings > 0).to(torch.int8), bits=1)
            return packed if precision == "ubinary" else (packed.to(torch.int16) - 128).to(torch.int8)
        integer_precision = self._integer_precision(precision)
        bits = INTEGER_BITS[integer_precision]
        codes = _codes(embeddings.float(), self.step(integer_precision, dimension), bits).to(torch.int8)
        if precision == "uint8":
            return (codes.to(torch.int16) + 128).to(torch.uint8)
        return pack_codes(codes, bits) if pack and bits < 8 else codes

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor, precision: str, dimension: int | None = None) -> torch.Tensor:
        """Float32 embeddings that ``codes`` stand for. Packed codes (binary, or int4 / int2 given as uint8 bytes)
        need ``dimension`` unless it is the head's full dimension."""
        check_precision(precision)
        dimension = dimension or self.embedding_dimension
        if precision in FLOAT_DTYPES:
            return codes.float()
        if PRECISIONS[precision] == 1:
            packed = (
                codes.view(torch.uint8) if precision == "ubinary" else (codes.to(torch.int16) + 128).to(torch.uint8)
            )
            bits = unpack_codes(packed, bits=1, dimension=dimension)
            return (bits.float() * 2 - 1) / math.sqrt(dimension)
        integer_precision = self._integer_precision(precision)
        bits = INTEGER_BITS[integer_precision]
        if precision == "uint8":
            codes = (codes.to(torch.int16) - 128).to(torch.int8)
        elif codes.dtype == torch.uint8:  # packed int4 / int2
            codes = unpack_codes(codes, bits, dimension)
        return (codes.float() + 0.5) * self.step(integer_precision, codes.shape[-1])

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor, candidates: int = 64) -> None:
        """Set every integer precision's per-dimension range to the least-MSE one on ``embeddings`` (``[N, dim]``),
        searched among multiples (0.25 to 8) of each dimension's root mean square."""
        embeddings = embeddings.float().to(self.device)
        root_mean_square = embeddings.pow(2).mean(dim=0).sqrt().clamp(min=1e-8)
        multiples = torch.linspace(0.25, 8.0, candidates, device=embeddings.device)
        for precision, bits in INTEGER_BITS.items():
            errors = torch.stack(
                [
                    (embeddings - _midrise(embeddings, multiple * root_mean_square / 2 ** (bits - 1), bits))
                    .pow(2)
                    .mean(dim=0)
                    for multiple in multiples
                ]
            )
            best = multiples[errors.argmin(dim=0)] * root_mean_square
            self.log_half_ranges[precision].copy_(best.log()[: self.embedding_dimension])

    def int8_ranges(self) -> torch.Tensor:
        """``[2, dim]`` per-dimension (min, max) for sentence-transformers' ``quantize_embeddings(embeddings, "int8",
        ranges=...)``: with them it computes this head's int8 (and uint8) codes, up to float rounding at a code
        boundary, instead of ranges fitted to each batch. Saved as ``quantize/int8_ranges.npy``."""
        step = self.step("int8").detach().float()
        return torch.stack([-128 * step, 127 * step])  # its step (max - min) / 255 is then exactly ours

    def bytes_per_vector(self, precision: str, dimension: int | None = None) -> int:
        """Storage of one embedding at ``precision``, in bytes (packed for sub-byte precisions)."""
        check_precision(precision)
        return math.ceil((dimension or self.embedding_dimension) * PRECISIONS[precision] / 8)

    def forward(self, features: dict[str, Any], precision: str = "int8", **kwargs: Any) -> dict[str, Any]:
        """Replace ``features["sentence_embedding"]`` by its differentiable quantize-dequantize at ``precision``."""
        features["sentence_embedding"] = self.fake_quantize(features["sentence_embedding"], precision)
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)
        # For vanilla sentence-transformers users: np.load it and pass it as quantize_embeddings(..., ranges=...).
        np.save(os.path.join(output_path, INT8_RANGES_FILE), self.int8_ranges().cpu().numpy())

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> Self:
        hub_kwargs = {
            "subfolder": subfolder,
            "token": token,
            "cache_folder": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
        }
        config = cls.load_config(model_name_or_path=model_name_or_path, **hub_kwargs)
        head = cls(**{key: value for key, value in config.items() if key in cls.config_keys})
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, model=head, **hub_kwargs)
