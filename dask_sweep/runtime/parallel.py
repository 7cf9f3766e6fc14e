"""Threads inside one slab task: a process-wide pool, and a map over it.

Kernels split their in-plane work (pieces, 1-D passes, voxel blocks) across
``sweep.threads`` threads; numpy and scipy release the GIL, so the threads
share the cores.  ``DASK_SWEEP_NO_THREADS=1`` runs everything in the calling
thread (for debugging and profiling).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache


@lru_cache(maxsize=8)
def pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool for in-plane work inside one slab task."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sweep")


def pmap(fn, items: list, threads: int) -> list:
    if threads <= 1 or len(items) <= 1 or os.environ.get("DASK_SWEEP_NO_THREADS"):
        return [fn(x) for x in items]
    return list(pool(threads).map(fn, items))
