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

#: Resident memory the first numba kernel a process loads adds to it: LLVM and numba's
#: typing and target contexts.  Measured loading morphology's kernels from the cache in a
#: fresh process: 49.8 MiB (all the plugin's kernels: 52.3 MiB); rounded up.
LOAD_BYTES = 64 << 20

_KERNELS: list = []


def kernel(fn: Callable[..., Any]) -> Any:
    """``numba.njit(nogil=True)`` with the on-disk cache where one can be written."""
    try:
        out = numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        out = numba.njit(cache=False, nogil=True)(fn)
    _KERNELS.append(out)
    return out


def loaded() -> bool:
    """Whether this process has loaded one of dask_sweep's kernels (LLVM is up)."""
    return any(k.signatures for k in _KERNELS)


def affordable(budget: int, already: bool | None = None) -> bool:
    """Whether a sweep with a budget of ``budget`` bytes may run numba kernels: they are
    loaded already where it runs (``already``; default: in this process, as
    ``dask_sweep.enable()`` does), or loading them takes at most a quarter of the budget
    (the plan then counts :data:`LOAD_BYTES`)."""
    return (loaded() if already is None else already) or 4 * LOAD_BYTES <= budget
