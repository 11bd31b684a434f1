from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from st_bitembed import allocator

# Allocates, frees and allocates again 64 MiB (through malloc, as PyTorch's CPU allocator does), touching every page,
# and prints the page faults of the second allocation; with an argument, after keep_freed_memory().
REUSE_PROBE = """
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
kept = allocator.keep_freed_memory() if len(sys.argv) > 2 else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20
first = libc.malloc(size); ctypes.memset(first, 1, size); libc.free(ctypes.c_void_p(first))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = libc.malloc(size); ctypes.memset(second, 1, size)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_second_allocation(*args: str) -> tuple[str, int]:
    printed = subprocess.run(
        [sys.executable, "-c", REUSE_PROBE, str(Path(allocator.__file__)), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return printed[0], int(printed[1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc settings: this system's C library is not glibc")
def test_kept_freed_memory_is_reused_without_faulting_its_pages_in_again():
    _, default_faults = faults_of_a_second_allocation()
    kept, kept_faults = faults_of_a_second_allocation("keep")
    pages = 64 * 2**20 // 4096
    assert default_faults > pages // 2  # glibc's default: a fresh memory map, every page faulted in again
    assert kept == "True" and kept_faults < pages // 20


def test_malloc_settings_of_the_user_are_left_as_they_are(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
