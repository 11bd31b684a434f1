"""The fused activation quantizer (``csrc/activation_codes.c``), compiled for this processor at first use.

PyTorch makes about ten operator calls and as many passes over a projection's input to quantize it per token (see
:func:`st_bitembed.quantization.kernels.activation_codes`); this C kernel makes one call and one pass. It is built
the way Inductor builds its CPU kernels: with the system C compiler (``$CC``, else ``cc``) and ``-march=native``,
once per processor, cached in ``$ST_BITEMBED_CACHE`` (default ``~/.cache/st_bitembed``) and loaded with ctypes.
Without a compiler (or with ``ST_BITEMBED_NATIVE=0``) the PyTorch path runs instead, with the same codes.
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
from collections.abc import Callable
from pathlib import Path

import torch

from st_bitembed.quantization.ternary import MIN_SCALE

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "activation_codes.c"
# No FMA contraction: the kernel must round exactly as the PyTorch path's separate multiply and add do.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

ActivationCodes = Callable[[torch.Tensor, "torch.Tensor | None", float, int], tuple[torch.Tensor, torch.Tensor]]


def _processor_id() -> str:
    """What ``-march=native`` depends on, so that a cache shared between machines never runs foreign code."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        return next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("ST_BITEMBED_CACHE", Path.home() / ".cache" / "st_bitembed")) / "kernels"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _processor_id()]).encode()).hexdigest()
    library = _cache_dir() / f"activation_codes-{key[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:  # built aside, moved in at once
            built = Path(build_dir) / library.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, check=True)
            os.replace(built, library)
    return library


@functools.cache
def native_activation_codes() -> ActivationCodes | None:
    """The compiled quantizer as a function like ``kernels.activation_codes`` for contiguous float32 CPU input, or
    ``None`` where it cannot be built (the reason is logged at INFO level)."""
    if os.environ.get("ST_BITEMBED_NATIVE", "1") == "0" or platform.system() == "Windows":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("No C compiler found: BitLinear quantizes activations with PyTorch operators")
        return None
    try:
        kernel = ctypes.CDLL(str(_build(compiler))).activation_codes
    except (OSError, subprocess.CalledProcessError) as error:
        details = getattr(error, "stderr", b"") or b""
        logger.info("Fused activation quantizer unavailable (%s %s)", error, details.decode(errors="replace")[:500])
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    kernel.argtypes = [pointer, integer, integer, integer, pointer, ctypes.c_float, ctypes.c_float, ctypes.c_float]
    kernel.argtypes += [pointer, pointer, ctypes.c_int]
    kernel.restype = None

    def activation_codes(
        activations: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = activations.shape
        codes = torch.empty(rows, cols)
        steps = torch.empty(rows, 1)
        weight_pointer = norm_weight.data_ptr() if norm_weight is not None else None
        threads = torch.get_num_threads()
        kernel(activations.data_ptr(), rows, cols, activations.stride(0), weight_pointer, eps, MIN_SCALE, offset,
               codes.data_ptr(), steps.data_ptr(), threads)  # fmt: skip
        return codes, steps

    return activation_codes
