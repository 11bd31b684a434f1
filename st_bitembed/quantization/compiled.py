"""Element-wise work compiled by Inductor (Triton kernels on CUDA, C++ on CPUs) once for every shape, with the eager
function as the fallback where compiling fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


class CompiledWithFallback:
    """``function`` compiled with ``torch.compile(dynamic=True)`` at its first call on a device type, so that every
    batch size and sequence length (and every layer of a model) reuses one graph per dtype and argument pattern
    instead of compiling again per shape. Where compiling or running the compiled graph fails on a device type
    (no Triton for a GPU, no C++ compiler for a CPU), ``function`` itself runs there from then on, with one warning.

    Args:
        function: Operators on tensors whose first argument is a tensor (its device type picks the path).
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.compiled: Callable[..., Any] | None = None
        self.failed_device_types: set[str] = set()

    def __call__(self, *args: Any) -> Any:
        device_type = args[0].device.type
        if device_type in self.failed_device_types:
            return self.function(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.function, dynamic=True)
        try:
            return self.compiled(*args)
        except torch.OutOfMemoryError:  # the eager function needs at least as much
            raise
        except RuntimeError as error:  # torch._dynamo's and Inductor's failures are RuntimeErrors
            self.failed_device_types.add(device_type)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.warning(
                "Compiling %s for %s failed; running it in eager PyTorch operators, which is slower (%s)",
                self.function.__name__, device_type, reason,
            )  # fmt: skip
            return self.function(*args)
