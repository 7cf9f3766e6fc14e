"""How dask_sweep's numba kernels are compiled: without the GIL, cached on disk.

numba compiles a kernel at its first call in every process; label's kernels took
1.6 s of a fresh process's wall (more than the whole labelling of a 512³ volume
on two cores), the EDT's about as much.  numba's on-disk cache (``__pycache__``
beside the module, else the user's cache directory, or ``NUMBA_CACHE_DIR``) makes
that once per installation; it is keyed on the module's source and the argument
types, and written atomically, so processes started together (a cluster's
workers) share it.  Where no cache location is writable numba refuses caching
when the kernel is defined; the kernel is then compiled per process as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def kernel(fn: Callable[..., Any]) -> Any:
    """``numba.njit(nogil=True)`` with the on-disk cache where one can be written."""
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, nogil=True)(fn)
