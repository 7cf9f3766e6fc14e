"""Keep freed slab memory from lingering in the process (glibc malloc tuning).

A sweep allocates and frees slabs of a few MiB at every step, from several
threads.  glibc's defaults raise the mmap threshold dynamically (up to 32 MiB)
and keep freed memory in per-thread arenas, so resident memory creeps up by
tens of MiB above what is live, and a small budget is overshot although the
live bytes stay within it (measured: +50 MiB on a 24 MiB plan).  Fixing the
thresholds and trimming the heap after each task (:func:`trims`) returns freed
memory to the OS.  This is the remedy dask's documentation gives for workers
(``MALLOC_TRIM_THRESHOLD_``).

The thresholds are 1 MiB: every allocation above the mmap threshold is a fresh
mapping whose pages fault in on first touch, and a kernel's temporaries (scipy's
1-D pass outputs, a decoded chunk, a plane) are allocated again and again within
a task.  At 256 KiB, a float32 uniform filter on 256 KiB planes spent 1.6x the
CPU of its passes (0.49 s against 0.30 s in one thread), most of it in page
faults; at 1 MiB its sweep's compute took 0.24-0.27 s instead of 0.30-0.33 s.
4 MiB was faster still (0.18-0.23 s, and TIFF reads at half the time) but kept
up to 10 MiB more on a 48 MiB plan (the xarray accessor's budget test grew 47.9
MiB; 37.8 at 1 MiB, 38.1 at 256 KiB).  What the heap keeps within a task is
trimmed at its end.  Disabled with ``sweep.tune-malloc: false``; a no-op where
glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = False
_libc = None


def tune_allocator(threshold: int = 1 << 20, trim_threshold: int = 1 << 20,
                   arenas: int = 2) -> bool:
    """Fix glibc's mmap/trim thresholds once per process; return whether it applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    global _libc
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc = libc
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    return _done


def trim() -> None:
    """Return the heap's free pages to the OS (after a task), where tuned."""
    if _done and _libc is not None:
        _libc.malloc_trim(0)


F = TypeVar("F", bound=Callable[..., Any])


def trims(fn: F) -> F:
    """``fn``, then :func:`trim`: for the tasks that allocate a slab's temporaries."""

    @functools.wraps(fn)
    def task(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            trim()

    return task  # type: ignore[return-value]
