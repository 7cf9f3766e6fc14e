"""How the DSL uses the IR's reduction partials (:class:`~dask_sweep.plan.ir.Reduce`).

Maps and zips lower to the IR's :class:`~dask_sweep.plan.ir.Pointwise`, windows
to its :class:`~dask_sweep.plan.ir.Kernel`.  A pointwise stage reads the same
planes ``[a, b)`` of each of its inputs (window ``(0, 0)``), so a zip of
branches with different total windows needs no special machinery: the pull
model asks each branch for ``[a, b)``, the branch with the wider window pulls
further ahead from the shared source, and the source's ring holds the planes
the other branch has not consumed yet::

    source ring  [a-12 ........................ b+12)
                  │ gaussian(3) pulls [a-12, b+12)   ─► [a, b) ─┐
                  └ gaussian(1) pulls [a-4,  b+4)    ─► [a, b) ─┴► zip ─► [a, b)

A **reduction partial** stage turns planes ``[a, b)`` into a small vector (a
histogram, a sum and a count, a min and a max) that is *laid out as planes*,
so it travels through rings, outputs and dask blocks like any other array::

    partial planes [a, b):  row a = the vector of the whole slab [a, b)
                            rows a+1 .. b-1 = the combine identity (0 or +inf)

Combining all rows of all steps (sum, or min) gives the global reduction,
whatever the step boundaries.  Scalars found by a reduction are *bound* into
later stages (:meth:`bind`) before the pass that uses them runs.
"""

from __future__ import annotations

import numpy as np

from dask_sweep.plan.ir import Reduce, partial_shape

__all__ = ["Reduce", "combine_partials", "partial_shape"]


def combine_partials(planes: np.ndarray, axis: int, how: str) -> np.ndarray:
    """Fold partial planes (any number of steps) into one vector."""
    kax = 0 if axis != 0 else 1
    other = tuple(d for d in range(planes.ndim) if d != kax)
    if how == "sum":
        return planes.sum(axis=other)
    return planes.min(axis=other)
