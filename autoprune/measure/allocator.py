"""glibc's allocator held steady for inference on a CPU, so that a model runs as fast where it is served as where
it was timed.

By default glibc serves an allocation of 128 KiB or more with a fresh `mmap` and returns freed memory at the top of
the heap to the system, then adapts both thresholds to what the process has freed so far. A forward pass allocates
and frees its activations every call, so with the defaults each call can page-fault its activations in again, and
how often it does depends on the process's history: the same small ResNet (batch 32, one thread) ran 4.4–4.9 ms in
a fresh process and in a search's trial workers, and 3.3–3.5 ms in a process that had loaded a model from the
registry first (`autoprune bench serve`: served at 0.70× its registered latency). Fixing both thresholds makes a
pass reuse the heap after its first calls, in every process that prepares a model (`prepared.apply_backend`):
timing, evaluation and serving alike. It keeps up to `TRIM_THRESHOLD` of freed memory in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): bigger blocks are mmapped
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # freed memory kept at the heap's top before it is returned

_steady: bool | None = None  # None: not tried yet in this process


def steady_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once). False where the C library is not glibc (macOS,
    musl), which keeps its own behaviour."""
    global _steady
    if _steady is None:
        _steady = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            except (OSError, AttributeError):  # no glibc: musl has no mallopt
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _steady = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _steady
