"""BitLinear's C kernels (``csrc/``), compiled for this processor at first use.

- ``activation_codes.c``: the fused activation quantizer. PyTorch makes about ten operator calls and as many passes
  over a projection's input to quantize it per token (see :func:`st_bitembed.quantization.kernels.activation_codes`);
  this kernel makes one call and one pass.
- ``ternary_gemm.c``: uint8 activation codes x ternary weights (AVX512-VNNI on 2-bit weights, else AVX2 on int8
  weights with 16-bit accumulators), the GEMM of the ``"native"`` backend (:mod:`st_bitembed.quantization.kernels`).
- ``ternary_gemm_amx.c``: the same products on AMX tiles, where the CPU has them (:func:`native_amx_available`).
- ``rms_norm.c``: the model's own RMSNorms that no BitLinear reads, in one pass (``native_norm.py``).
- ``residual_layer_norm.c``: an encoder block's residual add and LayerNorm, in one pass (``residual_norm.py``).
- ``attention.c``: self-attention, one parallel loop over (sequence, head) pairs (``native_attention.py``,
  ``native_decoder_attention.py``).
- ``rotary.c``: a decoder's rotary position embedding of its query or key heads, after their own RMSNorm, in one pass
  (``native_decoder_attention.py``).
- ``ternary_linear.c``: the two in one call (quantizer into a per-thread buffer, then the GEMM), for one projection
  or several of the same input (q, k and v; gate and up) at once: what BitLinear's inference runs on that backend.

They are built the way Inductor builds its CPU kernels: with the system C compiler (``$CC``, else ``cc``) and
``-march=native``, once per processor, into one library cached in ``$ST_BITEMBED_CACHE`` (default
``~/.cache/st_bitembed``) and loaded with ctypes. Without a compiler (or with ``ST_BITEMBED_NATIVE=0``) the PyTorch
quantizer and the next GEMM backend run instead, with the same codes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from st_bitembed.quantization.ternary import MIN_SCALE

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name
    for name in (
        "activation_codes.c",
        "ternary_gemm.c",
        "ternary_gemm_amx.c",
        "ternary_linear.c",
        "rms_norm.c",
        "residual_layer_norm.c",
        "attention.c",
        "rotary.c",
    )
)
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("ternary_gemm.h", "bfloat16.h", "activations.h"))
# No FMA contraction: the kernel must round exactly as the PyTorch path's separate multiply and add do.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
# Projections of one input per ternary_linear call: csrc/ternary_linear.c's MAX_PROJECTIONS.
MAX_PROJECTIONS = 8

ActivationCodes = Callable[[torch.Tensor, "torch.Tensor | None", float, int], tuple[torch.Tensor, torch.Tensor]]
# (activations, norm weight, eps, uint8 codes to fill, rms weight=None, outer eps=0) -> per-token steps.
Uint8ActivationCodes = Callable[..., torch.Tensor]
# (uint8 codes, rows, packed weight, column sums, out features, steps, scale, bias, out) -> None
TernaryGemm = Callable[..., None]
# (activations, projections, outs, chunk rows, factor=None, activation=None, gated=False) -> None
TernaryLinear = Callable[..., None]
# The activations the kernels apply (to a gated MLP's gate in its own GEMM's output or in the down projection's
# quantizer, to an encoder MLP's first projection in the GEMM's output), by name: PyTorch's function (what the
# kernels' must give) and csrc/activations.h's enum value.
TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}
ACTIVATIONS = {None: 0, "gelu_tanh": 1, "gelu": 2, "silu": 3}
# (activations, float32 scale, eps, round before scale) -> normalised activations
RmsNorm = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]
# (activations, residual, float32 weight, float32 bias, eps) -> LayerNorm(activations + residual)
ResidualLayerNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# (query, key, value, mask or None, scale, causal=False) -> attention output, its heads side by side:
# [batch, queries, heads * dim]
Attention = Callable[..., torch.Tensor]
# (heads [batch, positions, heads, dim], cos, sin, norm: (float32 scale, eps, round before scale) or None) -> the
# rotated heads, a new contiguous tensor of the same shape
RotaryHeads = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "tuple[torch.Tensor, float, bool] | None"],
                       torch.Tensor]  # fmt: skip


def _processor_id() -> str:
    """What ``-march=native`` depends on, so that a cache shared between machines never runs foreign code."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        return next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("ST_BITEMBED_CACHE", Path.home() / ".cache" / "st_bitembed")) / "kernels"


def _build(compiler: str, extra_flags: Sequence[str] = ()) -> Path:
    """The library built from ``SOURCES`` with :data:`FLAGS` and ``extra_flags``, from the cache if built before."""
    flags = [*FLAGS, *extra_flags]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    sources = [source.read_text() for source in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*sources, *flags, version, _processor_id()]).encode()).hexdigest()
    library = _cache_dir() / f"bitlinear-{key[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:  # built aside, moved in at once
            built = Path(build_dir) / library.name
            subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True, check=True)
            os.replace(built, library)
    return library


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _load(path: Path) -> ctypes.CDLL:
    """The built library, with the argument types of its functions declared."""
    library = ctypes.CDLL(str(path))
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.activation_codes.argtypes = [pointer, integer, integer, integer, pointer, real, real, real, pointer]
    library.activation_codes.argtypes += [pointer, ctypes.c_int]
    library.activation_codes_uint8.argtypes = [pointer, pointer, ctypes.c_int, integer, integer, integer, pointer]
    library.activation_codes_uint8.argtypes += [pointer, real, real, real, pointer, integer, pointer, ctypes.c_int]
    library.activation_codes_uint8.argtypes += [ctypes.c_int]
    library.activation_codes_uint8.restype = ctypes.c_int
    library.ternary_gemm.argtypes = [pointer, integer, integer, integer, pointer, pointer, integer, pointer, real]
    library.ternary_gemm.argtypes += [pointer, pointer, ctypes.c_int, ctypes.c_int]
    projections, outs = ctypes.POINTER(NativeProjection), ctypes.POINTER(pointer)
    library.ternary_linear.argtypes = [projections, integer, pointer, pointer, ctypes.c_int, integer, integer]
    library.ternary_linear.argtypes += [integer, ctypes.c_int, real]
    library.ternary_linear.argtypes += [outs, ctypes.c_int, integer, ctypes.c_int, ctypes.c_int]
    library.ternary_linear.restype = ctypes.c_int
    for function in (library.activation_codes, library.ternary_gemm):
        function.restype = None
    library.ternary_gemm_set_amx_min_rows.argtypes = [integer]
    library.ternary_gemm_set_amx_min_rows.restype = integer
    library.ternary_gemm_amx_available.argtypes, library.ternary_gemm_amx_available.restype = [], ctypes.c_int
    library.rms_norm.argtypes = [pointer, integer, integer, integer, pointer, real, ctypes.c_int, ctypes.c_int]
    library.rms_norm.argtypes += [pointer, ctypes.c_int]
    library.rms_norm.restype = None
    library.residual_layer_norm.argtypes = [pointer, pointer, integer, integer, integer, integer, pointer, pointer]
    library.residual_layer_norm.argtypes += [real, ctypes.c_int, pointer, ctypes.c_int]
    library.residual_layer_norm.restype = None
    library.residual_layer_norm_max_cols.argtypes, library.residual_layer_norm_max_cols.restype = [], ctypes.c_int
    strides = ctypes.POINTER(ctypes.c_int64)
    library.attention.argtypes = [pointer, pointer, pointer, pointer, pointer, integer, integer, integer, integer]
    library.attention.argtypes += [integer, integer, strides, strides, strides, strides, strides, ctypes.c_int]
    library.attention.argtypes += [ctypes.c_int, ctypes.c_int]
    library.attention.argtypes += [real, ctypes.c_int]
    library.attention.restype = ctypes.c_int
    library.attention_tiles.argtypes, library.attention_tiles.restype = [integer], ctypes.c_int
    library.rotary_heads.argtypes = [pointer, integer, integer, integer, integer, strides, pointer, real, ctypes.c_int]
    library.rotary_heads.argtypes += [pointer, pointer, strides, ctypes.c_int, pointer, ctypes.c_int]
    library.rotary_heads.restype = ctypes.c_int
    library.attention_set_bfloat16_pairs.argtypes = [ctypes.c_int]
    library.attention_set_bfloat16_pairs.restype = ctypes.c_int
    max_functions = (library.attention_max_keys, library.attention_max_head_dim, library.rotary_max_head_dim)
    for function in (library.attention_available, *max_functions):
        function.argtypes, function.restype = [], ctypes.c_int
    layout_functions = (library.ternary_gemm_panel, library.ternary_gemm_tile_rows, library.ternary_gemm_weight_bits)
    for function in layout_functions:
        function.argtypes, function.restype = [], ctypes.c_int
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` where they cannot be built (the reason is logged at INFO level)."""
    if os.environ.get("ST_BITEMBED_NATIVE", "1") == "0" or platform.system() == "Windows":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("No C compiler found: BitLinear runs its PyTorch quantizer and the next GEMM backend")
        return None
    try:
        return _load(_build(compiler))
    except (OSError, subprocess.CalledProcessError) as error:
        details = getattr(error, "stderr", b"") or b""
        logger.info("BitLinear's C kernels unavailable (%s %s)", error, details.decode(errors="replace")[:500])
        return None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def _strides(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


@functools.cache
def native_activation_codes() -> ActivationCodes | None:
    """The compiled quantizer as a function like ``kernels.activation_codes`` for float32 CPU input with rows of
    unit stride, or ``None`` where it cannot be built."""
    library = _library()
    if library is None:
        return None

    def activation_codes(
        activations: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        codes, steps = torch.empty(activations.shape), torch.empty(activations.shape[0], 1)
        rows, cols = activations.shape
        stride, threads = activations.stride(0), torch.get_num_threads()
        library.activation_codes(activations.data_ptr(), rows, cols, stride, _pointer(norm_weight), eps, MIN_SCALE,
                                 offset, codes.data_ptr(), steps.data_ptr(), threads)  # fmt: skip
        return codes, steps

    return activation_codes


@functools.cache
def native_uint8_activation_codes() -> Uint8ActivationCodes | None:
    """The compiled quantizer writing uint8 codes (signed codes + 128) into the first rows and columns of a given
    ``uint8`` buffer of unit column stride (the ``"native"`` GEMM's input); returns the float32 ``[rows]`` steps.
    Takes float32 or bfloat16 activations (rows of unit stride): a bf16 model's are read as they are. ``rms_weight``
    and ``outer_eps`` fold a model norm in front (``norm_folding.py``; ``norm_weight`` is then its weight times the
    BitLinear norm's)."""
    library = _library()
    if library is None:
        return None

    def activation_codes_uint8(
        activations: torch.Tensor,
        norm_weight: torch.Tensor | None,
        eps: float,
        codes: torch.Tensor,
        rms_weight: torch.Tensor | None = None,
        outer_eps: float = 0.0,
    ) -> torch.Tensor:
        steps = torch.empty(activations.shape[0])
        rows, cols = activations.shape
        stride, in_bfloat16 = activations.stride(0), activations.dtype == torch.bfloat16
        threads = torch.get_num_threads()
        failed = library.activation_codes_uint8(activations.data_ptr(), None, 0, rows, cols, stride,
                                                _pointer(norm_weight), _pointer(rms_weight), eps, outer_eps,
                                                MIN_SCALE, codes.data_ptr(), codes.stride(0), steps.data_ptr(),
                                                in_bfloat16, threads)  # fmt: skip
        if failed:
            raise MemoryError(f"BitLinear's native quantizer could not allocate a row of {cols} floats")
        return steps

    return activation_codes_uint8


class NativeLayout(NamedTuple):
    """How the compiled ``ternary_gemm.c`` wants its operands (see its layouts)."""

    panel: int  # outputs per weight panel
    tile_rows: int  # the activation codes' rows are padded to a multiple of this
    weight_bits: int  # 2: codes + 1, four steps per byte (AVX512-VNNI); 8: int8 codes (AVX2)

    @property
    def input_group(self) -> int:
        """Inputs per index of the packed weight's second dimension; in_features are padded to a multiple of it."""
        return 16 if self.weight_bits == 2 else 4


@functools.cache
def native_gemm_layout() -> NativeLayout | None:
    """The layout of the compiled ``ternary_gemm.c``: panels of 48 outputs, tiles of 8 rows and 2-bit weights with
    AVX512-VNNI, 24 / 4 / int8 with AVX2; ``None`` where it is not built or this processor has neither."""
    library = _library()
    if library is None or library.ternary_gemm_panel() == 0:
        return None
    panel, tile_rows, weight_bits = (
        library.ternary_gemm_panel(),
        library.ternary_gemm_tile_rows(),
        library.ternary_gemm_weight_bits(),
    )
    return NativeLayout(panel, tile_rows, weight_bits)


def native_amx_available() -> bool:
    """Whether the native GEMM runs batches on AMX tiles here (``csrc/ternary_gemm_amx.c``: built for a processor
    with AMX-INT8, and Linux granted the process the tile state)."""
    layout = native_gemm_layout()
    return layout is not None and layout.weight_bits == 2 and bool(_library().ternary_gemm_amx_available())


def set_amx_min_rows(min_rows: int) -> int:
    """Sets from how many rows (tokens) the native GEMM multiplies on AMX tiles where :func:`native_amx_available`
    (fewer rows run on AVX512-VNNI); a negative number: never, 0: always (the default: the tiles are faster at every
    size). Returns the previous setting (-1 where there is no AMX build). For tests and benchmarks of either path."""
    library = _library()
    return -1 if library is None else library.ternary_gemm_set_amx_min_rows(min_rows)


@functools.cache
def native_ternary_gemm() -> TernaryGemm | None:
    """``csrc/ternary_gemm.c`` (see its layouts; :func:`native_gemm_layout`) where this processor has AVX512-VNNI or
    AVX2, else ``None``. ``out`` is float32 or bfloat16."""
    library = _library()
    if native_gemm_layout() is None:
        return None

    def ternary_gemm(
        codes: torch.Tensor,
        rows: int,
        packed: torch.Tensor,
        column_sums: torch.Tensor,
        out_features: int,
        steps: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        library.ternary_gemm(
            codes.data_ptr(),
            rows,
            codes.stride(0),
            packed.shape[1] * native_gemm_layout().input_group,
            packed.data_ptr(),
            column_sums.data_ptr(),
            out_features,
            steps.data_ptr(),
            scale,
            _pointer(bias),
            out.data_ptr(),
            out.dtype == torch.bfloat16,
            torch.get_num_threads(),
        )

    return ternary_gemm


class NativeProjection(ctypes.Structure):
    """One projection's operands as ``csrc/ternary_linear.c`` reads them (``struct ternary_projection``): its
    inserted RMSNorm's weight and epsilon, a folded model norm in front (``rms_weight`` and ``outer_eps``, see
    :func:`native_uint8_activation_codes`), the weight laid out for :func:`native_ternary_gemm`, and the
    activation applied to its outputs (an :data:`ACTIVATIONS` value). It holds raw pointers: made by
    :func:`native_projection`, which keeps the tensors they point to alive with it."""

    _fields_ = [
        ("norm_weight", ctypes.c_void_p),
        ("rms_weight", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("outer_eps", ctypes.c_float),
        ("packed", ctypes.c_void_p),
        ("column_sums", ctypes.c_void_p),
        ("k_padded", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("bias", ctypes.c_void_p),
        ("output_activation", ctypes.c_int),
    ]


def native_projection(
    packed: torch.Tensor,
    column_sums: torch.Tensor,
    out_features: int,
    scale: float,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    rms_weight: torch.Tensor | None = None,
    outer_eps: float = 0.0,
    output_activation: str | None = None,
) -> NativeProjection:
    """A :class:`NativeProjection` of these operands (float32 contiguous bias, norm and rms weights, or ``None``;
    ``output_activation``: an :data:`ACTIVATIONS` name), holding on to them."""
    k_padded = packed.shape[1] * native_gemm_layout().input_group
    projection = NativeProjection(_pointer(norm_weight), _pointer(rms_weight), eps, outer_eps, packed.data_ptr(),
                                  column_sums.data_ptr(), k_padded, out_features, scale, _pointer(bias),
                                  ACTIVATIONS[output_activation])  # fmt: skip
    projection.tensors = packed, column_sums, bias, norm_weight, rms_weight  # what its pointers point to
    return projection


def native_projections(projections: Sequence[NativeProjection]) -> ctypes.Array:
    """The C array of ``projections`` that :func:`native_ternary_linear` takes (holding on to them).

    Raises:
        ValueError: none, or more than :data:`MAX_PROJECTIONS`.
    """
    if not 1 <= len(projections) <= MAX_PROJECTIONS:
        raise ValueError(
            f"The native kernel takes 1 to {MAX_PROJECTIONS} projections of one input per call, got "
            f"{len(projections)}; call it once per group of at most {MAX_PROJECTIONS}."
        )
    array = (NativeProjection * len(projections))(*projections)
    array.members = tuple(projections)
    return array


@functools.cache
def native_ternary_linear() -> TernaryLinear | None:
    """``csrc/ternary_linear.c``: projections of one input, each its quantizer and GEMM, in one call, where
    :func:`native_ternary_gemm` exists, else ``None``. Activations are 2-D float32 or bfloat16 rows of unit stride;
    ``projections`` a :func:`native_projections` array (of the same in_features); ``outs`` one contiguous float32
    or bfloat16 tensor of ``rows x out_features`` values per projection (of any shape), all of one dtype; tokens are
    quantized ``chunk_rows`` at a time. With ``factor`` (of the activations' shape, dtype and strides) the input is
    ``activations * factor``, or ``activation(activations) * factor`` (an :data:`ACTIVATIONS` name), computed row by
    row as the quantizer reads it, never materialised. With ``gated``, ``projections`` are a gated MLP's gate (whose
    output activation is the MLP's) and up projection, of as many outputs, and ``outs`` one tensor, which receives
    ``activation(gate) * up``: the GEMM multiplies them as it writes, and neither is ever materialised."""
    library = _library()
    if native_gemm_layout() is None:
        return None

    def ternary_linear(
        activations: torch.Tensor,
        projections: ctypes.Array,
        outs: Sequence[torch.Tensor],
        chunk_rows: int,
        factor: torch.Tensor | None = None,
        activation: str | None = None,
        gated: bool = False,
    ) -> None:
        rows, cols = activations.shape
        if gated and (len(projections) != 2 or len(outs) != 1):
            raise ValueError("A gated call takes a gate and an up projection and one output for their product")
        if gated and projections[0].out_features != projections[1].out_features:
            raise ValueError("A gated MLP's gate and up projections must have as many outputs")
        if activation is not None and factor is None:
            raise ValueError("An activation is applied only before a product: give the factor too")
        if factor is not None and (
            factor.shape != activations.shape
            or factor.dtype != activations.dtype
            or factor.stride() != activations.stride()
        ):
            raise ValueError("The factor must have the activations' shape, dtype and strides")
        out_pointers = (ctypes.c_void_p * len(outs))(*[out.data_ptr() for out in outs])
        failed = library.ternary_linear(projections, len(projections), activations.data_ptr(), _pointer(factor),
                                        ACTIVATIONS[activation], rows, cols, activations.stride(0),
                                        activations.dtype == torch.bfloat16, MIN_SCALE, out_pointers,
                                        outs[0].dtype == torch.bfloat16, chunk_rows,
                                        torch.get_num_threads(), gated)  # fmt: skip
        if failed:
            raise MemoryError(f"BitLinear's native kernel could not allocate buffers for {chunk_rows} x {cols} inputs")

    return ternary_linear


@functools.cache
def native_rms_norm() -> RmsNorm | None:
    """``csrc/rms_norm.c``: an RMSNorm over the last dimension of float32 or bfloat16 activations whose last dimension
    has unit stride and whose rows, taken in the order they lie in memory, have one stride (anything else:
    ``ValueError`` or ``RuntimeError``), or ``None`` where the kernels cannot be built. ``scale`` is the per-channel
    float32 factor (the norm's weight, plus 1 for Gemma); ``round_before_scale``: the normalised values are rounded
    to the activations' dtype before the scale (Llama, Qwen), else only the product is (Gemma). Returns a new tensor
    of the activations' shape, dtype and strides (as PyTorch's element-wise operators keep a dense layout)."""
    library = _library()
    if library is None:
        return None

    def rms_norm(activations: torch.Tensor, scale: torch.Tensor, eps: float, round_before_scale: bool) -> torch.Tensor:
        features = activations.shape[-1]
        try:
            flat, order = activations.view(-1, features), None
        except RuntimeError:
            # The leading dimensions in memory order: heads split off and moved before the tokens ([B, H, L, D] of a
            # [B, L, H, D] tensor, Gemma3's q and k norms) are rows of one stride again.
            order = sorted(range(activations.dim() - 1), key=activations.stride, reverse=True)
            flat = activations.permute(*order, activations.dim() - 1).view(-1, features)  # raises if still not rows
        if flat.stride(-1) != 1:
            raise ValueError("rms_norm reads rows of unit stride")
        out = torch.empty(flat.shape, dtype=activations.dtype)
        library.rms_norm(flat.data_ptr(), flat.shape[0], features, flat.stride(0), scale.data_ptr(), eps,
                         round_before_scale, activations.dtype == torch.bfloat16, out.data_ptr(),
                         torch.get_num_threads())  # fmt: skip
        if order is None:
            return out.view(activations.shape)
        in_memory_order = out.view([activations.shape[dim] for dim in order] + [features])
        return in_memory_order.permute(*sorted(range(len(order) + 1), key=[*order, len(order)].__getitem__))

    return rms_norm


@functools.cache
def native_residual_layer_norm() -> ResidualLayerNorm | None:
    """``csrc/residual_layer_norm.c``: ``LayerNorm(activations + residual)`` over the last dimension, both float32 or
    both bfloat16 of one shape, each viewable as rows of unit stride (anything else, or more features than the kernel
    takes: ``ValueError``), with float32 ``weight`` and ``bias``; or ``None`` where the kernels cannot be built.
    Returns a new contiguous tensor of the activations' shape and dtype."""
    library = _library()
    if library is None:
        return None
    max_features = library.residual_layer_norm_max_cols()

    def residual_layer_norm(
        activations: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        features = activations.shape[-1]
        if activations.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"residual_layer_norm takes float32 or bfloat16 activations, not {activations.dtype}")
        if residual.shape != activations.shape or residual.dtype != activations.dtype:
            raise ValueError("The residual must have the activations' shape and dtype")
        if features > max_features or weight.shape != (features,) or bias.shape != (features,):
            raise ValueError(f"residual_layer_norm takes up to {max_features} features and a weight and bias of each")
        try:
            rows, skip = activations.view(-1, features), residual.view(-1, features)
        except RuntimeError as error:
            raise ValueError("residual_layer_norm reads rows of one stride") from error
        if rows.stride(-1) != 1 or skip.stride(-1) != 1:
            raise ValueError("residual_layer_norm reads rows of unit stride")
        out = torch.empty(activations.shape, dtype=activations.dtype)
        library.residual_layer_norm(rows.data_ptr(), skip.data_ptr(), rows.shape[0], features, rows.stride(0),
                                    skip.stride(0), weight.data_ptr(), bias.data_ptr(), eps,
                                    activations.dtype == torch.bfloat16, out.data_ptr(),
                                    torch.get_num_threads())  # fmt: skip
        return out

    return residual_layer_norm


@functools.cache
def native_attention_max_keys() -> int:
    """The most keys per sequence :func:`native_attention` takes (0 where it is unavailable)."""
    library = _library()
    return library.attention_max_keys() if library is not None and library.attention_available() else 0


def native_attention_tiles(head_dim: int) -> bool:
    """Whether :func:`native_attention` runs bf16 heads of ``head_dim`` features on AMX tiles (else on vectors)."""
    library = _library()
    return library is not None and bool(library.attention_tiles(head_dim))


def set_attention_bfloat16_pairs(enabled: bool) -> int:
    """Sets whether :func:`native_attention` multiplies bf16 heads off the AMX tiles as bf16 pairs (AVX512-BF16's
    vdpbf16ps, the default where the CPU has it) or as float32 values widened from them, and returns the previous
    setting (1 or 0; -1 where the build has no pairs). For tests and benchmarks of either path."""
    library = _library()
    return -1 if library is None else library.attention_set_bfloat16_pairs(int(enabled))


# csrc/attention.c's enum attention_mask_kind, by the mask's dtype (an additive mask has the query's dtype).
ATTENTION_MASK_KINDS = {None: 0, torch.bool: 1}
ADDITIVE_MASK = 2
# csrc/attention.c's LANES: the kernel reads a head's features 16 at a time.
ATTENTION_FEATURE_GROUP = 16


@functools.cache
def native_attention() -> Attention | None:
    """``csrc/attention.c``: ``softmax(query @ key^T * scale + mask) @ value`` per sequence and head. The query, key
    and value: ``[batch, heads, positions, head_dim]`` tensors of one dtype (float32 or bfloat16) whose last dimension
    is contiguous (any other strides, as a transposed view of a projection's output has), the key and value of
    ``key_heads`` heads, a divisor of ``heads`` (grouped-query attention: query head ``h`` reads key head
    ``h // (heads // key_heads)``, as ``repeat_kv`` lays them out); the mask: ``None``, boolean
    (``True``: attend, as in ``scaled_dot_product_attention``) or additive of the query's dtype, broadcastable to
    ``[batch, heads, queries, keys]``; anything else, or more keys or features per head than the kernel takes:
    ``ValueError``. ``causal``: the mask masks every key after each query's position (``keys - queries`` ahead of its
    index; a decoder's mask), which the kernel then skips (blocks of queries score only the keys up to their last
    row's: the same outputs, about half the work of a long sequence); a mask is required with it. ``None`` where the
    kernels cannot be built or the CPU lacks AVX-512 (the kernel's only build). Returns a new ``[batch, queries, heads
    * head_dim]`` tensor (the heads side by side, as an attention module's output projection reads them)."""
    library = _library()
    if library is None or not library.attention_available():
        return None
    max_keys, max_head_dim = library.attention_max_keys(), library.attention_max_head_dim()

    def attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        causal: bool = False,
    ) -> torch.Tensor:
        if query.dim() != 4 or query.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"attention takes 4-dim float32 or bfloat16 queries, not {query.dtype} "
                             f"{tuple(query.shape)}")  # fmt: skip
        batch, heads, queries, head_dim = query.shape
        key_heads, keys = (key.shape[1], key.shape[2]) if key.dim() == 4 else (0, 0)
        if key.shape != (batch, key_heads, keys, head_dim) or value.shape != key.shape or heads % max(key_heads, 1):
            raise ValueError(f"Keys and values of shape {tuple(key.shape)} and {tuple(value.shape)} do not go with "
                             f"queries of shape {tuple(query.shape)}")  # fmt: skip
        if key.dtype != query.dtype or value.dtype != query.dtype:
            raise ValueError("attention takes queries, keys and values of one dtype")
        if not 0 < keys <= max_keys or not 0 < head_dim <= max_head_dim or head_dim % ATTENTION_FEATURE_GROUP:
            raise ValueError(f"attention takes 1 to {max_keys} keys of up to {max_head_dim} features per head, a "
                             f"multiple of {ATTENTION_FEATURE_GROUP}")  # fmt: skip
        if any(tensor.stride(-1) != 1 for tensor in (query, key, value)):
            raise ValueError("attention reads features of unit stride")
        if causal and mask is None:
            raise ValueError("A causal attention takes the mask that masks the keys after each query")
        mask_kind, mask_strides = ATTENTION_MASK_KINDS[None], (0, 0, 0, 0)
        if mask is not None:
            if mask.dtype not in (torch.bool, query.dtype) or mask.dim() != 4:
                raise ValueError(f"attention takes a 4-dim boolean or {query.dtype} mask, not {mask.dtype} "
                                 f"{tuple(mask.shape)}")  # fmt: skip
            try:
                mask = mask.expand(batch, heads, queries, keys)
            except RuntimeError as error:
                raise ValueError(f"A mask of shape {tuple(mask.shape)} does not broadcast to the scores") from error
            mask_kind = ATTENTION_MASK_KINDS.get(mask.dtype, ADDITIVE_MASK)
            mask_strides = mask.stride()
        out = torch.empty(batch, queries, heads, head_dim, dtype=query.dtype)
        failed = library.attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), _pointer(mask), out.data_ptr(),
                                   batch, heads, key_heads, queries, keys, head_dim, _strides(query.stride()[:3]),
                                   _strides(key.stride()[:3]), _strides(value.stride()[:3]), _strides(mask_strides),
                                   _strides((out.stride(0), out.stride(2), out.stride(1))),
                                   query.dtype == torch.bfloat16, mask_kind, causal, scale,
                                   torch.get_num_threads())  # fmt: skip
        if failed:
            raise MemoryError("attention could not allocate its buffers")
        return out.view(batch, queries, heads * head_dim)

    return attention


@functools.cache
def native_rotary_heads() -> RotaryHeads | None:
    """``csrc/rotary.c``: a decoder's rotary position embedding of ``[batch, positions, heads, head_dim]`` query or key
    heads (float32 or bfloat16, the last dimension contiguous, any other strides), as transformers'
    ``apply_rotary_pos_emb`` computes it with ``cos`` and ``sin`` of the heads' dtype (``[batch or 1, positions,
    head_dim]``, the last dimension contiguous); with ``norm`` (the float32 per-feature scale, eps, and whether the
    normalised values are rounded before the scale: as :func:`native_rms_norm`), each head normalised first (Qwen3's
    and Gemma3's q_norm and k_norm). Anything else: ``ValueError``. ``None`` where the kernels cannot be built.
    Returns a new contiguous tensor of the heads' shape and dtype."""
    library = _library()
    if library is None:
        return None
    max_head_dim = library.rotary_max_head_dim()

    def rotary_heads(
        heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: tuple[torch.Tensor, float, bool] | None
    ) -> torch.Tensor:
        if heads.dim() != 4 or heads.dtype not in (torch.float32, torch.bfloat16) or heads.stride(-1) != 1:
            raise ValueError(f"rotary_heads takes 4-dim float32 or bfloat16 heads of contiguous features, not "
                             f"{heads.dtype} {tuple(heads.shape)} of strides {heads.stride()}")  # fmt: skip
        batch, positions, count, head_dim = heads.shape
        if not 2 <= head_dim <= max_head_dim or head_dim % 2:
            raise ValueError(f"rotary_heads takes an even head_dim of at most {max_head_dim}, not {head_dim}")
        try:
            cos, sin = (table.expand(batch, positions, head_dim) for table in (cos, sin))
        except RuntimeError as error:
            raise ValueError(f"cos and sin of shape {tuple(cos.shape)} do not go with heads of shape "
                             f"{tuple(heads.shape)}") from error  # fmt: skip
        if cos.dtype != heads.dtype or sin.dtype != heads.dtype or cos.stride() != sin.stride() or cos.stride(-1) != 1:
            raise ValueError("rotary_heads takes cos and sin of the heads' dtype and one layout, features contiguous")
        scale, eps, round_before_scale = norm if norm is not None else (None, 0.0, False)
        if scale is not None and (scale.dtype != torch.float32 or scale.shape != (head_dim,) or scale.stride(0) != 1):
            raise ValueError(f"rotary_heads takes a norm scale of {head_dim} contiguous float32 values")
        out = torch.empty(heads.shape, dtype=heads.dtype)
        failed = library.rotary_heads(heads.data_ptr(), batch, positions, count, head_dim,
                                      _strides(heads.stride()[:3]), _pointer(scale), eps, round_before_scale,
                                      cos.data_ptr(), sin.data_ptr(), _strides(cos.stride()[:2]),
                                      heads.dtype == torch.bfloat16, out.data_ptr(),
                                      torch.get_num_threads())  # fmt: skip
        if failed:
            raise ValueError(f"rotary_heads does not take heads of {head_dim} features")
        return out

    return rotary_heads
