"""Integer kernels for BitLinear inference: RMSNorm folded into per-token int8 activation codes, an int8 x ternary
GEMM with an int32 accumulator, then one rescale per token.

Norm folding: per-token absmax quantization does not change when a token's vector is scaled, so the codes of
``quant(RMSNorm(x) * g)`` are those of ``quant(x * g)``; ``1 / rms(x)`` only scales the output:
``y = (codes(x * g) @ W_codes.T) * w_scale * absmax(x * g) / 127 / rms(x)``. The normalised activations are never
materialised.

The GEMM runs on the fastest backend the device has (:func:`gemm_backend`):

- ``"native"`` (CPUs with AVX512-VNNI or AVX2, where a C compiler is found): ``csrc/ternary_gemm.c``. With
  AVX512-VNNI, ``vpdpbusd`` (64 products per instruction) on weights kept at 2 bits (a quarter of int8's bytes: a
  short query's GEMMs are bound by reading the weights), and on CPUs with AMX-INT8 on AMX tiles at any number of
  tokens (``csrc/ternary_gemm_amx.c``: 16,384 products per instruction; up to 64 tokens the 2-bit weights unpacked 64
  inputs at a time into L1, beyond that per panel into cache); with AVX2, 16-bit accumulators made possible by
  ternary weights, so each 32 products cost one multiply-add and one add where int8 GEMM libraries take three
  instructions (1.1-1.6x FBGEMM for 16-2,048 rows on a 2-core AVX2 CPU). The quantizer writes its uint8 input
  directly and the kernel applies the rescale and bias, so nothing else passes over the activations or the output
  (``benchmarks/kernel_speed.py``); both run in one foreign call per projection, or per group of projections of one
  input (:func:`native_linear`, ``csrc/ternary_linear.c``), which a short query's many small projections notice.
- ``"fbgemm"`` (x86 CPUs where the native kernel cannot be built):
  ``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32``, FBGEMM's
  uint8 x int8 GEMM on weights prepacked once (with their column sums, so the zero point costs nothing per call);
  it takes the float codes and makes them uint8 itself. On a 2-core AVX2 CPU it is 2-2.4x faster than oneDNN for
  16 rows (oneDNN's ``gemm:jit`` packs the weights at every call) and 5-25% slower for 256-2,048 rows
  (``benchmarks/kernel_speed.py``).
- ``"onednn"`` (x86 CPUs without FBGEMM): ``torch.ops.onednn.qlinear_pointwise`` with uint8 activations
  (codes + 128, zero point 128) and prepacked int8 weights; oneDNN picks AVX2 / AVX512-VNNI / AMX kernels.
- ``"int_mm"`` (CUDA): ``torch._int_mm`` (cuBLASLt) between two kernels Inductor generates (Triton), all in one
  compiled call per projection (:mod:`~st_bitembed.quantization.compiled`): one makes the int8 codes
  (:func:`torch_activation_codes`), one rescales the int32 products, adds the bias and casts. In eager operators
  these are some twenty kernel launches and float32 passes over the activations per projection.
- ``"float"`` (anything else): the same integer codes multiplied in float32, which is exact while
  ``127 * in_features`` stays below 2**24 (every BitLinear of the models we target).

All of them are tested against :mod:`st_bitembed.quantization.ternary`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from st_bitembed.quantization.compiled import CompiledWithFallback
from st_bitembed.quantization.native import (
    TORCH_ACTIVATIONS,
    NativeProjection,
    native_activation_codes,
    native_gemm_layout,
    native_projection,
    native_projections,
    native_ternary_gemm,
    native_ternary_linear,
)
from st_bitembed.quantization.ternary import INT8_MAX, MIN_SCALE

logger = logging.getLogger(__name__)

GemmBackend = Literal["native", "fbgemm", "onednn", "int_mm", "float"]
# The uint8 activations of oneDNN, FBGEMM and the native kernel are the signed codes shifted by this zero point.
UINT8_ZERO_POINT = 128
# Activations quantized at a time by ternary_linear (8 MiB of float32): fastest of 2**17..2**21 on a 2-core AVX2 CPU.
CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class TernaryWeight:
    """A BitLinear weight prepared for one GEMM backend: ``W = codes * scale``.

    Attributes:
        backend: The backend ``operand`` is laid out for.
        operand: native: the codes in panels of ``P`` outputs (``native.native_gemm_layout``): int8
            ``[ceil(N / P), ceil(K / 4), P, 4]``, or codes + 1 at 2 bits ``[ceil(N / P), ceil(K / 16), P / 16, 64]``;
            fbgemm / onednn: the prepacked int8 codes; int_mm: int8 codes ``[N, K]``, given to the GEMM transposed
            (cuBLASLt's int8 kernels want the right operand column-major: a row-major one is several times slower);
            float: float32 codes ``[K, N]``.
        scale: 0-d float32 scale of the ternary codes.
        out_features: ``N``.
        onednn_qparams: For onednn, the per-output weight scales (ones: the GEMM returns the integer product) and
            zero points it takes, made once instead of at every call.
        column_sums: For native, each output's int32 sum of codes (padded like the panels), which takes the
            activations' zero point back out.
    """

    backend: GemmBackend
    operand: torch.Tensor
    scale: torch.Tensor
    out_features: int
    onednn_qparams: tuple[torch.Tensor, torch.Tensor] | None = None
    column_sums: torch.Tensor | None = None

    @functools.cached_property
    def scale_value(self) -> float:
        """``scale`` as a Python float, read once (what the native kernel takes)."""
        return float(self.scale)


def _native_works() -> bool:
    if native_ternary_gemm() is None:
        return False
    weight = prepare_ternary_weight(torch.ones(8, 32, dtype=torch.int8), torch.tensor(1.0), "native")
    return bool((integer_product(torch.full((3, 32), -2.0), weight) == -64).all())


def _fbgemm_works() -> bool:
    weight = prepare_ternary_weight(torch.ones(8, 32, dtype=torch.int8), torch.tensor(1.0), "fbgemm")
    return bool((integer_product(torch.full((3, 32), -2.0), weight) == -64).all())


def _onednn_works() -> bool:
    weight = prepare_ternary_weight(torch.ones(8, 32, dtype=torch.int8), torch.tensor(1.0), "onednn")
    product = integer_product(torch.full((3, 32), UINT8_ZERO_POINT + 2.0), weight)
    return bool((product == 64).all())


def _int_mm_works(device_type: str = "cuda") -> bool:
    a = torch.ones(32, 64, dtype=torch.int8, device=device_type)
    return bool((torch._int_mm(a, a.t().contiguous()[:, :32]) == 64).all())


def _candidates(device_type: str) -> list[tuple[GemmBackend, Callable[[], bool]]]:
    if device_type == "cuda":
        return [("int_mm", _int_mm_works)]
    if device_type != "cpu":
        return []
    # The native kernel (AMX tiles for batches where the CPU has them), then the GEMM libraries.
    return [("native", _native_works), ("fbgemm", _fbgemm_works), ("onednn", _onednn_works)]


@functools.cache
def gemm_backend(device_type: str) -> GemmBackend:
    """The integer GEMM used on ``device_type`` (checked once, on a small product; ``"float"`` when none works)."""
    for backend, works in _candidates(device_type):
        try:
            if works():
                return backend
        except (RuntimeError, NotImplementedError, AttributeError) as error:
            logger.info("%s int8 GEMM unavailable (%s)", backend, error)
    return "float"


def prepare_ternary_weight(codes: torch.Tensor, scale: torch.Tensor, backend: GemmBackend) -> TernaryWeight:
    """Lay out ``[N, K]`` int8 ternary ``codes`` (and their 0-d ``scale``) for ``backend``."""
    scale = scale.detach().float().reshape(())
    if backend == "native":
        out_features, in_features = codes.shape
        layout = native_gemm_layout()
        padding = (0, -in_features % layout.input_group, 0, -out_features % layout.panel)
        padded = F.pad(codes.cpu().to(torch.int8), padding)
        column_sums = padded.sum(dim=1, dtype=torch.int32)
        groups = padded.shape[1] // layout.input_group
        if layout.weight_bits == 8:  # [panel, output, input / 4, 4] -> [panel, input / 4, output, 4]
            operand = padded.view(-1, layout.panel, groups, 4).transpose(1, 2).contiguous()
        else:  # 2 bits: [panel, vector, lane, group, step, input] -> [panel, group, vector, lane, input, step]
            shifted = (padded + 1).to(torch.uint8).view(-1, layout.panel // 16, 16, groups, 4, 4)
            shifted = shifted.permute(0, 3, 1, 2, 5, 4)
            operand = shifted[..., 0] | shifted[..., 1] << 2 | shifted[..., 2] << 4 | shifted[..., 3] << 6
            operand = operand.reshape(-1, groups, layout.panel // 16, 64).contiguous()
        return TernaryWeight(backend, operand, scale, out_features, None, column_sums)
    if backend == "fbgemm":
        with warnings.catch_warnings():  # creating the quantized weight tensor warns of that API's deprecation
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
            quantized = torch._make_per_tensor_quantized_tensor(codes.cpu().contiguous(), 1.0, 0)
        return TernaryWeight(backend, torch.ops.quantized.linear_prepack(quantized, None), scale, codes.shape[0])
    if backend == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(codes.cpu().contiguous(), None)
        qparams = torch.ones(codes.shape[0]), torch.zeros(codes.shape[0], dtype=torch.int64)
        return TernaryWeight(backend, packed, scale, codes.shape[0], qparams)
    if backend == "int_mm":  # the scale on the GEMM's device: the compiled projection reads it there
        return TernaryWeight(backend, codes.to(torch.int8).contiguous(), scale.to(codes.device), codes.shape[0])
    return TernaryWeight(backend, codes.t().float().contiguous(), scale, codes.shape[0])


def activation_codes(
    activations: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of ``RMSNorm(activations) * norm_weight`` (or of ``activations`` without a norm) and the
    per-token step that turns them back into values.

    Args:
        activations: ``[..., K]`` activations.
        norm_weight: The RMSNorm's weight; ``None`` for a projection without a norm in front.
        eps: The RMSNorm's epsilon.
        offset: Added to every code (128 gives the uint8 codes of a zero point 128).

    Returns:
        ``(codes, step)``: float32 integer values in ``[-127, 127] + offset`` shaped like ``activations`` (the
        caller casts them to its GEMM's integer type), and float32 ``[..., 1]`` with ``(codes - offset) * step``
        the quantized (normalised) activations, as transformers' ``ActQuant`` after ``RMSNorm`` computes them.
    """
    native = native_activation_codes() if _native_layout(activations, norm_weight) else None
    if native is not None:
        codes, step = native(activations.reshape(-1, activations.shape[-1]), norm_weight, eps, offset)
        return codes.view(activations.shape), step.view(*activations.shape[:-1], 1)
    return torch_activation_codes(activations, norm_weight, eps, offset)


def _native_layout(activations: torch.Tensor, norm_weight: torch.Tensor | None) -> bool:
    """Whether the compiled quantizer reads these tensors as they are: float32 on the CPU, rows of unit stride, no
    gradient to track."""
    tensors = [activations] if norm_weight is None else [activations, norm_weight]
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and (activations.is_contiguous() or (activations.dim() == 2 and activations.stride(1) == 1))
        and (norm_weight is None or norm_weight.is_contiguous())
    )


def torch_activation_codes(
    activations: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`activation_codes` in PyTorch operators (any device and dtype; the reference of the compiled one)."""
    # Few operator calls, in place where possible: at one short query per call, each costs more than its arithmetic.
    activations = activations.float()
    weighted = activations * norm_weight.float() if norm_weight is not None else activations.clone()
    # amax and amin are vectorized reductions; vector_norm(inf) and aminmax were measured 5-15x slower on CPU.
    absmax = torch.maximum(weighted.amax(dim=-1, keepdim=True), weighted.amin(dim=-1, keepdim=True).neg_())
    if norm_weight is None:
        step = absmax.clamp_(min=MIN_SCALE).div_(INT8_MAX)
    else:
        norm = torch.linalg.vector_norm(activations, dim=-1, keepdim=True)  # one pass, no [..., K] temporary
        inverse_rms = norm.mul_(norm).div_(activations.shape[-1]).add_(eps).rsqrt_()
        step = (absmax * inverse_rms).clamp_(min=MIN_SCALE).div_(INT8_MAX)  # the step of the normalised values
    codes = weighted.div_(step) if norm_weight is None else weighted.mul_(inverse_rms.div_(step))
    # round(v) + offset == round(v + offset) for an even offset (ties go to the even integer either way).
    return (codes.add_(offset) if offset else codes).round_(), step


def integer_product(codes: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    """``codes @ W_codes.T`` (exact integers, as float32) for 2-D float32 integer-valued ``codes`` (shifted by
    :data:`UINT8_ZERO_POINT` for the onednn backend), on ``weight.backend``."""
    if weight.backend == "native":
        rows = codes.shape[0]
        uint8_codes = _native_codes_buffer(rows, weight)
        uint8_codes[:rows, : codes.shape[1]] = (codes + UINT8_ZERO_POINT).to(torch.int16)
        product = torch.empty(rows, weight.out_features)
        native_ternary_gemm()(uint8_codes, rows, weight.operand, weight.column_sums, weight.out_features,
                              torch.ones(rows), 1.0, None, product)  # fmt: skip
        return product
    if weight.backend == "fbgemm":  # quantizes the codes with scale 1 and zero point 128: exactly codes + 128
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes, 1.0, UINT8_ZERO_POINT, weight.operand
        )
    if weight.backend == "onednn":
        codes_uint8 = codes.to(torch.int16).to(torch.uint8)  # two steps: float -> uint8 directly is 3x slower
        ones, zero_points = weight.onednn_qparams
        return torch.ops.onednn.qlinear_pointwise(
            codes_uint8, 1.0, UINT8_ZERO_POINT, weight.operand, ones, zero_points, None, 1.0, 0, torch.float32,
            "none", [], "",
        )  # fmt: skip
    if weight.backend == "int_mm":
        rows = codes.shape[0]
        codes_int8 = F.pad(codes.to(torch.int8), (0, 0, 0, int_mm_rows(rows) - rows))
        return torch._int_mm(codes_int8, weight.operand.t())[:rows].float()
    return codes @ weight.operand


def int_mm_rows(rows: int) -> int:
    """The rows ``torch._int_mm`` is given for ``rows`` tokens: cuBLASLt wants more than 16, in multiples of 8."""
    return max(rows, 17) + -max(rows, 17) % 8


def _int8_projection(
    activations: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The int_mm backend's projection of 2-D ``activations`` (rows as ``torch._int_mm`` takes them) by the ``[K, N]``
    int8 ``weight`` codes: compiled into the quantizer's kernel (:func:`torch_activation_codes`), the GEMM, and one
    kernel that rescales the int32 products per token, adds the bias and casts to ``dtype``."""
    codes, step = torch_activation_codes(activations, norm_weight, eps)
    product = torch._int_mm(codes.to(torch.int8), weight)
    output = product.float() * (step * weight_scale)
    return (output if bias is None else output + bias).to(dtype)


compiled_int8_projection = CompiledWithFallback(_int8_projection)


def _int_mm_linear(
    flat: torch.Tensor,
    weight: TernaryWeight,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """:func:`ternary_linear` of 2-D ``flat`` on the int_mm backend, in one compiled call: every token at once (a GPU
    needs no chunks), the activations padded to the GEMM's rows before they are quantized (zeros: codes 0), so that
    the compiled graph never sees a single row (a size-1 dimension would be compiled apart)."""
    rows = flat.shape[0]
    if int_mm_rows(rows) != rows:
        flat = F.pad(flat, (0, 0, 0, int_mm_rows(rows) - rows))
    operand = weight.operand.t()
    return compiled_int8_projection(flat, norm_weight, eps, operand, weight.scale, bias, flat.dtype)[:rows]


def _float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` as the native kernel reads it (float32, contiguous), without a call when it already is."""
    if tensor is None or (tensor.dtype == torch.float32 and tensor.is_contiguous()):
        return tensor
    return tensor.float().contiguous()


def _native_codes_buffer(rows: int, weight: TernaryWeight) -> torch.Tensor:
    """The native kernel's uint8 input for ``rows`` tokens: rows rounded up to its tiles, inputs to its groups."""
    layout = native_gemm_layout()
    padded_rows = rows + -rows % layout.tile_rows
    return torch.empty(padded_rows, weight.operand.shape[1] * layout.input_group, dtype=torch.uint8)


def ternary_linear(
    activations: torch.Tensor,
    weight: TernaryWeight,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rms_weight: torch.Tensor | None = None,
    outer_eps: float = 0.0,
) -> torch.Tensor:
    """``Linear(quant(RMSNorm(x) * norm_weight))`` with ternary weights: what transformers' ``AutoBitLinear``
    computes (with its RMSNorm when ``norm_weight`` is given), on integer codes.

    On CPUs, tokens are processed in chunks of about :data:`CHUNK_ELEMENTS` activations, so that the element-wise
    passes of the quantization reuse memory that is already in cache (and already mapped) instead of streaming the
    whole batch through memory several times (up to 1.9x faster, for 8192 x 1536 inputs on a 2-core AVX2 CPU).

    Args:
        activations: ``[..., K]`` activations.
        weight: The prepared ternary weight (:func:`prepare_ternary_weight`).
        bias: Optional ``[N]`` bias, added after the rescale.
        norm_weight: The weight of the RMSNorm in front of the projection, folded into the quantization.
        eps: That RMSNorm's epsilon.
        rms_weight: The native backend only: the per-channel scale of a model RMSNorm before that one, whose
            output only such projections read (:mod:`~st_bitembed.quantization.norm_folding`); ``activations``
            are then its input, and ``norm_weight`` is ``rms_weight`` times the RMSNorm's own weight.
        outer_eps: That model norm's epsilon.

    Returns:
        ``[..., N]`` in the activations' dtype.
    """
    flat = activations.reshape(-1, activations.shape[-1])
    offset = UINT8_ZERO_POINT if weight.backend == "onednn" else 0
    rows = max(1, CHUNK_ELEMENTS // flat.shape[1])
    if rms_weight is not None and weight.backend != "native":
        raise ValueError(f"A folded model norm (rms_weight) needs the native GEMM backend, not {weight.backend!r}.")
    if weight.backend == "native":
        projection = prepare_native_projection(weight, bias, norm_weight, eps, rms_weight, outer_eps)
        return native_linear(activations, native_projections([projection]))[0]
    if weight.backend == "int_mm":
        output = _int_mm_linear(flat, weight, bias, norm_weight, eps)
        return output.reshape(*activations.shape[:-1], weight.out_features)
    output = torch.empty(flat.shape[0], weight.out_features, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        codes, step = activation_codes(flat[start : start + rows], norm_weight, eps, offset)
        product = integer_product(codes, weight)
        del codes  # its memory serves the next chunk
        if bias is None:
            torch.mul(product, step.mul_(weight.scale), out=output[start : start + rows])
        else:
            torch.addcmul(bias, product, step.mul_(weight.scale), out=output[start : start + rows])
    return output.reshape(*activations.shape[:-1], weight.out_features).to(activations.dtype)


def prepare_native_projection(
    weight: TernaryWeight,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rms_weight: torch.Tensor | None = None,
    outer_eps: float = 0.0,
    output_activation: str | None = None,
) -> NativeProjection:
    """What :func:`native_linear` takes for one projection (arguments as :func:`ternary_linear`'s, ``weight`` laid
    out for the native backend): made once and kept by a layer, since it only changes with the parameters. With
    ``output_activation`` (a :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name) the kernel returns
    ``activation(output)``, applied as it writes the output, rounded as PyTorch rounds the output and then its
    activation (up to an ulp or two of float32 in the activation)."""
    operands = (_float32(t) for t in (bias, norm_weight, rms_weight))
    bias, norm_weight, rms_weight = operands
    return native_projection(weight.operand, weight.column_sums, weight.out_features, weight.scale_value, bias,
                             norm_weight, eps, rms_weight, outer_eps, output_activation)  # fmt: skip


def native_linear(
    activations: torch.Tensor,
    projections: Sequence[NativeProjection],
    factor: torch.Tensor | None = None,
    activation: str | None = None,
    gated: bool = False,
) -> list[torch.Tensor]:
    """:func:`ternary_linear` on the native backend for each of ``projections`` (a
    :func:`~st_bitembed.quantization.native.native_projections` array of :func:`prepare_native_projection` results,
    same in_features) of the same ``[..., K]`` activations, in one foreign call: q, k and v (or gate and up) share
    one call and one parallel loop. Returns each projection's ``[..., N]`` output in the activations' dtype; a bf16
    model's outputs are written in bf16 by the kernel, never as a float32 copy. With ``factor`` (of the activations'
    shape) the input is ``activations * factor``, multiplied as PyTorch multiplies them but row by row as the
    quantizer reads them: a gated MLP's activated gate times its up projection
    (:mod:`~st_bitembed.quantization.mlp_fusion`), never materialised; with ``activation`` too (a
    :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name) it is ``activation(activations) * factor``, the
    gate activated there as well (as PyTorch computes it, up to an ulp or two of float32 in the activation). With
    ``gated``, ``projections`` are a gated MLP's gate (made with its ``output_activation``) and up projection, and
    the one output is ``activation(gate) * up``, multiplied as the GEMM writes them (rounded as PyTorch rounds each
    step): neither output is ever materialised (:mod:`~st_bitembed.quantization.mlp_fusion`)."""
    flat = activations.reshape(-1, activations.shape[-1])
    flat_factor = None if factor is None else factor.reshape(-1, factor.shape[-1])
    if flat_factor is not None and (
        flat.dtype not in (torch.float32, torch.bfloat16)
        or flat_factor.dtype != flat.dtype
        or flat.stride() != flat_factor.stride()
        or flat.stride(-1) != 1
    ):  # what the kernel cannot read in place: the product itself
        activated = flat if activation is None else TORCH_ACTIVATIONS[activation](flat)
        flat, flat_factor, activation = activated * flat_factor, None, None
    if flat.dtype not in (torch.float32, torch.bfloat16) or flat.stride(-1) != 1:  # what the quantizer reads
        flat = flat.float().contiguous()
    # Made in their final shape (the kernel writes rows x out_features of contiguous memory): no view per output
    shape = activations.shape[:-1]
    made = projections.members[-1:] if gated else projections.members
    outputs = [torch.empty((*shape, p.out_features), dtype=flat.dtype) for p in made]
    chunk_rows = max(1, CHUNK_ELEMENTS // flat.shape[1])
    native_ternary_linear()(flat, projections, outputs, chunk_rows, flat_factor, activation, gated)
    return outputs if flat.dtype == activations.dtype else [output.to(activations.dtype) for output in outputs]
