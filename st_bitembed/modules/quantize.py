"""The Quantize head: trainable, batch-independent quantization of sentence embeddings to 16/8/4/2/1 bits."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from sentence_transformers.base.modules import Module
from torch import nn

from st_bitembed.precisions import INTEGER_PRECISIONS, Precision, PrecisionName, get_precision, to_signed, to_unsigned
from st_bitembed.quantization.packing import byte_codes, pack_codes, unpack_codes

try:
    from typing import Self
except ImportError:  # Python 3.10
    from typing_extensions import Self

INT8_RANGES_FILE = "int8_ranges.npy"
# What a head saved before its config listed its precisions holds.
UNLISTED_PRECISIONS = ("int8", "int4", "int2")


# Beyond this many standard deviations a standard Gaussian has no mass in float64: the outer cells' bounds.
_GAUSSIAN_TAIL = 40.0
# The candidate half-ranges (in standard deviations) of the initial ranges.
_HALF_RANGE_GRID = (0.3, 8.0, 771)
# The key of the one range that all precisions of a nested head share.
NESTED_RANGE = "nested"


def _half_range_grid() -> torch.Tensor:
    return torch.linspace(*_HALF_RANGE_GRID, dtype=torch.float64)


def _least_relative_error(errors: list[torch.Tensor]) -> torch.Tensor:
    """Index (along dim 0, the candidates) of the least sum of each precision's error relative to its own least: the
    one range nested precisions share, each counting alike."""
    return sum(e / e.min(dim=0).values.clamp(min=1e-30) for e in errors).argmin(dim=0)


def _gaussian_midrise_errors(bits: int) -> torch.Tensor:
    """MSE of the uniform midrise quantizer on a standard Gaussian, for each half-range of the grid.

    Integrated exactly, cell by cell: over ``[a, b]`` with centre ``c``, ``E[(x - c)^2]`` is ``m2 - 2 c m1 + c^2 m0``
    with the Gaussian's partial moments ``m0 = Phi(b) - Phi(a)``, ``m1 = phi(a) - phi(b)`` and
    ``m2 = m0 + a phi(a) - b phi(b)`` (a few hundred candidates x levels: no sampling, no large temporaries).
    """
    half_ranges = _half_range_grid()[:, None]
    step = half_ranges / 2 ** (bits - 1)
    cells = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float64)
    lower, upper = cells * step, (cells + 1) * step
    lower[:, 0], upper[:, -1] = -_GAUSSIAN_TAIL, _GAUSSIAN_TAIL  # the outer cells take the tails
    centre = (cells + 0.5) * step

    def density(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    m0 = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    m1 = density(lower) - density(upper)
    m2 = m0 + lower * density(lower) - upper * density(upper)
    return (m2 - 2 * centre * m1 + centre**2 * m0).sum(dim=-1)


@lru_cache
def gaussian_optimal_half_range(bits: int) -> float:
    """Half-range (in standard deviations, on a 0.01 grid) of the uniform midrise quantizer with least MSE on a
    standard Gaussian."""
    return float(_half_range_grid()[_gaussian_midrise_errors(bits).argmin()])


@lru_cache
def gaussian_least_mse(bits: int) -> float:
    """MSE of the uniform midrise quantizer with ``bits`` bits on a standard Gaussian, at its least-MSE half-range."""
    return float(_gaussian_midrise_errors(bits).min())


@lru_cache
def nested_gaussian_half_range(bits: tuple[int, ...]) -> float:
    """The one half-range that nested precisions of these widths share on a standard Gaussian: the least sum of each
    precision's MSE relative to its own optimum (so that each precision counts alike)."""
    return float(_half_range_grid()[_least_relative_error([_gaussian_midrise_errors(b) for b in bits])])


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

    A **nested** head (``nested=True``) gives all its integer precisions one range per dimension, so that each
    lower precision's code is the top bits of a higher one's: ``floor(x / (2**k s)) = floor(floor(x / s) / 2**k)``,
    so the int4 code is the int8 code shifted right by 4, the int2 code by 6, and the sign bit is the binary code
    (``x >= 0``; a non-nested head's binary code is ``x > 0``, as in sentence-transformers, which differs only at
    exactly 0). One stored int8 (or int4) array then serves every precision (:meth:`truncate`); the price is one
    range where each precision had its own best one (on a Gaussian, at the range that minimises the sum of the three
    precisions' MSE relative to their own optimum: 1.3x the MSE at int8, 1.4x at int4, 2.2x at int2).

    The ranges start at the MSE-optimal clipping for coordinates of a random unit vector (standard deviation
    ``1 / sqrt(dim)``), so an untrained head already works; :meth:`calibrate` fits them to real embeddings, and
    :meth:`fake_quantize` (straight-through estimator) lets training optimise them with the model.

    This head is kept out of ``modules.json`` so that vanilla sentence-transformers still loads a BitEmbed model;
    :class:`~st_bitembed.BitEmbed` saves it in the ``quantize/`` folder of the model and reads it back.

    Args:
        embedding_dimension: Dimension of the sentence embeddings.
        precisions: The integer precisions the head holds ranges for (a nested head: fits its shared range for).
        nested: One range shared by all integer precisions, so that codes truncate (see above).

    Example:
        ::

            import torch
            from st_bitembed.modules.quantize import Quantize

            head = Quantize(384)
            embeddings = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
            codes = head.quantize(embeddings, "int4")  # int8 tensor with values in [-8, 7]
            reconstructed = head.dequantize(codes, "int4")

            nested = Quantize(384, nested=True)
            int8_codes = nested.quantize(embeddings, "int8")  # the one array to store
            assert torch.equal(nested.truncate(int8_codes, "int8", "int4"), nested.quantize(embeddings, "int4"))
    """

    config_keys: list[str] = ["embedding_dimension", "precisions", "nested"]

    def __init__(
        self, embedding_dimension: int, precisions: Sequence[str] = INTEGER_PRECISIONS, nested: bool = False
    ) -> None:
        super().__init__()
        records = [get_precision(p) for p in precisions]
        if not records or any(not p.is_integer or p.unsigned for p in records):
            raise ValueError(
                f"A Quantize head holds ranges for signed integer precisions ({', '.join(INTEGER_PRECISIONS)}), "
                f"got {list(precisions)}."
            )
        self.embedding_dimension = embedding_dimension
        self.precisions = [p.name for p in records]
        self.nested = nested
        # In standard deviations of a coordinate of a random unit vector (1 / sqrt(dim)).
        if nested:
            half_ranges = {NESTED_RANGE: nested_gaussian_half_range(tuple(sorted(p.bits for p in records)))}
        else:
            half_ranges = {p.name: gaussian_optimal_half_range(p.bits) for p in records}
        self.log_half_ranges = nn.ParameterDict(
            {
                key: nn.Parameter(
                    torch.full((embedding_dimension,), math.log(half_range) - 0.5 * math.log(embedding_dimension))
                )
                for key, half_range in half_ranges.items()
            }
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.log_half_ranges.values())).device

    def step(self, precision: PrecisionName | Precision, dimension: int | None = None) -> torch.Tensor:
        """Quantization step per dimension of an integer precision (for the first ``dimension`` dimensions)."""
        precision = get_precision(precision)
        name = NESTED_RANGE if self.nested else precision.code_precision
        if name not in self.log_half_ranges:
            raise ValueError(
                f"This Quantize head has no range for {name} (it holds {', '.join(self.precisions)}): it was saved "
                f"before {name} existed or without it. Calibrate a new head with Quantize(dim).calibrate(embeddings)."
            )
        half_range = self.log_half_ranges[name][: dimension or self.embedding_dimension].exp()
        return half_range / 2 ** (precision.bits - 1)

    def _check_dimension(self, embeddings: torch.Tensor) -> int:
        dimension = embeddings.shape[-1]
        if dimension > self.embedding_dimension:
            raise ValueError(
                f"Embeddings have {dimension} dimensions; this head quantizes {self.embedding_dimension}."
            )
        return dimension

    def fake_quantize(self, embeddings: torch.Tensor, precision: PrecisionName | Precision) -> torch.Tensor:
        """Differentiable quantize-dequantize: forward gives exactly ``dequantize(quantize(x))``, backward passes
        gradients straight through the rounding to the embeddings and to the per-dimension steps."""
        precision = get_precision(precision)
        dimension = self._check_dimension(embeddings)
        if precision.is_float:
            rounded = embeddings.to(precision.dtype).to(embeddings.dtype)
            return embeddings + (rounded - embeddings).detach()
        if precision.is_binary:
            signs = torch.where(self._sign_bits(embeddings), 1.0, -1.0).to(embeddings.dtype) / math.sqrt(dimension)
            return embeddings + (signs - embeddings).detach()
        bits, step = precision.bits, self.step(precision, dimension)
        scaled = embeddings / step
        floored = scaled + (torch.floor(scaled) - scaled).detach()
        return (floored.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 0.5) * step

    @torch.no_grad()
    def quantize(
        self, embeddings: torch.Tensor, precision: PrecisionName | Precision, pack: bool = False
    ) -> torch.Tensor:
        """Storage codes of ``embeddings`` (``[..., dim]``).

        Returns float tensors for float precisions; int8 codes for int8 / int4 / int2 (uint8 for uint8), or with
        ``pack=True`` uint8 bytes holding 2 (int4) or 4 (int2) codes; binary / ubinary always packed 8 per byte.
        """
        precision = get_precision(precision)
        dimension = self._check_dimension(embeddings)
        if precision.is_float:
            return embeddings.to(precision.dtype)
        if precision.is_binary:
            return _binary_layout(self._sign_bits(embeddings), precision)
        codes = _codes(embeddings.float(), self.step(precision, dimension), precision.bits).to(torch.int8)
        if pack and precision.bits < 8:
            return pack_codes(codes, precision.bits)
        return to_unsigned(codes) if precision.unsigned else codes

    def _sign_bits(self, embeddings: torch.Tensor) -> torch.Tensor:
        # A nested head's binary code is the sign bit of its integer codes (floor(x / s) >= 0 exactly when x >= 0).
        return embeddings >= 0 if self.nested else embeddings > 0

    @torch.no_grad()
    def truncate(
        self,
        codes: torch.Tensor | np.ndarray,
        source: PrecisionName | Precision,
        target: PrecisionName | Precision,
        dimension: int | None = None,
        pack: bool = False,
    ) -> torch.Tensor | np.ndarray:
        """The ``target`` codes of the embeddings whose ``source`` codes are ``codes``, from the codes alone: a
        nested head's lower precisions are the top bits of its higher ones, so one stored array serves them all.

        Args:
            codes: Codes as :meth:`quantize` (or ``BitEmbed.encode``) returns them at ``source`` (int8 / uint8, or
                int4 / int2, unpacked or packed), as a tensor or a NumPy array (a memory-mapped store, say).
            source: Their integer precision.
            target: An integer precision of at most ``source``'s bits, or ``binary`` / ``ubinary``.
            dimension: For packed ``codes``, the embedding dimension, unless it is the head's.
            pack: Pack int4 / int2 results, as ``quantize(..., pack=True)`` does.

        Returns:
            Exactly ``quantize(embeddings, target, pack)``, as a tensor or array like ``codes``.

        Raises:
            ValueError: the head is not nested, or ``target`` is not a lower precision of ``source``.
        """
        source, target = get_precision(source), get_precision(target)
        if not self.nested:
            raise ValueError(
                "Only a nested head's codes truncate to another precision: this head has a range per precision. "
                "Quantize the embeddings at the target precision instead, or use a nested head "
                "(Quantize(dim, nested=True); BitEmbed.from_backbone(..., nested_codes=True))."
            )
        if not source.is_integer or target.is_float or target.bits > source.bits:
            raise ValueError(
                f"Cannot truncate {source.name} codes to {target.name}: the target must be an integer precision of "
                f"at most {source.bits} bits, or binary."
            )
        if isinstance(codes, np.ndarray):
            array = np.asarray(codes)  # a memmap's pages; torch refuses to wrap a read-only one silently
            array = array if array.flags.writeable else array.copy()
            return self.truncate(torch.from_numpy(array), source, target, dimension, pack).numpy()
        if source.unsigned:
            codes = to_signed(codes)
        if codes.dtype == torch.uint8:  # packed int4 / int2
            codes = unpack_codes(codes, source.bits, dimension or self.embedding_dimension)
        if target.is_binary:
            return _binary_layout(codes >= 0, target)
        truncated = codes >> (source.bits - target.bits)  # arithmetic shift: floor division by a power of two
        if pack and target.bits < 8:
            return pack_codes(truncated, target.bits)
        return to_unsigned(truncated) if target.unsigned else truncated

    @torch.no_grad()
    def dequantize(
        self, codes: torch.Tensor, precision: PrecisionName | Precision, dimension: int | None = None
    ) -> torch.Tensor:
        """Float32 embeddings that ``codes`` stand for. Packed codes (binary, or int4 / int2 given as uint8 bytes)
        need ``dimension`` unless it is the head's full dimension."""
        precision = get_precision(precision)
        dimension = dimension or self.embedding_dimension
        if precision.is_float:
            return codes.float()
        if precision.is_binary:  # packed bytes: ubinary's as they are, binary's shifted back
            bits = unpack_codes(codes if precision.unsigned else to_unsigned(codes), bits=1, dimension=dimension)
            return (bits.float() * 2 - 1) / math.sqrt(dimension)
        if precision.unsigned:
            codes = to_signed(codes)
        if codes.dtype == torch.uint8:  # packed int4 / int2: every byte's levels at once, from a table of all 256
            levels = byte_codes(precision.bits).to(codes.device).float() + 0.5
            values = nn.functional.embedding(codes.int(), levels).flatten(-2)[..., :dimension]
            return values * self.step(precision, values.shape[-1])
        return (codes.float() + 0.5) * self.step(precision, codes.shape[-1])

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor, candidates: int = 64) -> None:
        """Set every integer precision's per-dimension range to the least-MSE one on ``embeddings`` (``[N, dim]``),
        searched among multiples (0.25 to 8) of each dimension's root mean square. A nested head's one range per
        dimension is the candidate with the least sum of its precisions' MSE, each relative to its own best."""
        embeddings = embeddings.float().to(self.device)
        root_mean_square = embeddings.pow(2).mean(dim=0).sqrt().clamp(min=1e-8)
        multiples = torch.linspace(0.25, 8.0, candidates, device=embeddings.device)

        def errors(bits: int) -> torch.Tensor:  # [candidates, dim]
            return torch.stack(
                [
                    (embeddings - _midrise(embeddings, multiple * root_mean_square / 2 ** (bits - 1), bits))
                    .pow(2)
                    .mean(dim=0)
                    for multiple in multiples
                ]
            )

        if self.nested:
            per_precision = [errors(get_precision(name).bits) for name in self.precisions]
            best = multiples[_least_relative_error(per_precision)] * root_mean_square
            self.log_half_ranges[NESTED_RANGE].copy_(best.log()[: self.embedding_dimension])
            return
        for name in self.precisions:
            best = multiples[errors(get_precision(name).bits).argmin(dim=0)] * root_mean_square
            self.log_half_ranges[name].copy_(best.log()[: self.embedding_dimension])

    def int8_ranges(self) -> torch.Tensor:
        """``[2, dim]`` per-dimension (min, max) for sentence-transformers' ``quantize_embeddings(embeddings, "int8",
        ranges=...)``: with them it computes this head's int8 (and uint8) codes, up to float rounding at a code
        boundary, instead of ranges fitted to each batch. Saved as ``quantize/int8_ranges.npy``."""
        step = self.step("int8").detach().float()
        return torch.stack([-128 * step, 127 * step])  # its step (max - min) / 255 is then exactly ours

    def bytes_per_vector(self, precision: PrecisionName | Precision, dimension: int | None = None) -> int:
        """Storage of one embedding at ``precision``, in bytes (packed for sub-byte precisions)."""
        return get_precision(precision).bytes_per_vector(dimension or self.embedding_dimension)

    def forward(
        self, features: dict[str, Any], precision: PrecisionName | Precision = "int8", **kwargs: Any
    ) -> dict[str, Any]:
        """Replace ``features["sentence_embedding"]`` by its differentiable quantize-dequantize at ``precision`` (the
        Module contract; BitEmbed itself calls :meth:`quantize` and :meth:`fake_quantize`)."""
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
        config.setdefault("precisions", UNLISTED_PRECISIONS)
        head = cls(**{key: value for key, value in config.items() if key in cls.config_keys})
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, model=head, **hub_kwargs)


def _binary_layout(sign_bits: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Sign bits packed 8 per byte, in sentence-transformers' layout: ``ubinary`` the bytes, ``binary`` bytes - 128."""
    packed = pack_codes(sign_bits.to(torch.int8), bits=1)
    return packed if precision.unsigned else to_signed(packed)
