"""The process's memory allocator (glibc malloc): keeping freed memory for reuse, and giving it back."""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Environment variables through which a user configures glibc's malloc; set, they decide.
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
# As high as glibc accepts for both (in bytes): a training step's activations, a few hundred MiB, stay in the heap.
KEEP_THRESHOLD = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not a glibc system
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory in the process for the next allocations, instead of returning every large
    block to the system at once and taking it again, zeroed page by page, at the next one. Returns whether it did.

    A training step allocates and frees the same few hundred MiB of activations and gradients; with glibc's
    defaults each large tensor is a fresh memory map whose pages fault in again, and keeping them made a step of
    the default CPU recipe 10-20% faster (README: the default run, measured). A process-wide setting, so only
    programs that own their process call it (the ``st-bitembed`` commands), never the library. Nothing changes where
    the user configured malloc through its environment variables (:data:`MALLOC_SETTINGS`), or without glibc."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in MALLOC_SETTINGS):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_THRESHOLD))


def return_freed_memory() -> None:
    """Ask glibc to give the memory it keeps free back to the system (it keeps freed blocks of a few MiB)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
