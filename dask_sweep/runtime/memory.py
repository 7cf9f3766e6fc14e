"""Keep freed slab memory from lingering in the process (glibc malloc tuning).

A sweep allocates and frees slabs of a few MiB at every step, from several
threads.  glibc's defaults raise the mmap threshold dynamically (up to 32 MiB)
and keep freed memory in per-thread arenas, so resident memory creeps up by
tens of MiB above what is live, and a small budget is overshot although the
live bytes stay within it (measured: +50 MiB on a 24 MiB plan).  Fixing the
mmap and trim thresholds returns freed slabs to the OS at once.  This is the
same remedy dask's documentation gives for workers (``MALLOC_TRIM_THRESHOLD_``).
Disabled with ``sweep.tune-malloc: false``; a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = False


def tune_allocator(threshold: int = 256 * 1024, arenas: int = 2) -> bool:
    """Fix glibc's mmap/trim thresholds once per process; return whether it applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    return _done
