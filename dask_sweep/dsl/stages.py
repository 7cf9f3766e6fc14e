"""The stage kind the DSL adds to the plan IR: reduction partials.

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

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dask_sweep.plan.ir import Stage
from dask_sweep.runtime.ring import Shape


def partial_shape(ndim: int, axis: int, n: int, k: int) -> tuple[int, ...]:
    """Shape of ``n`` planes of a ``k``-vector partial in an ``ndim``-D volume.

    The sweep axis keeps its place (rings concatenate along it); the vector
    lies along the first other axis.

    >>> partial_shape(3, 0, 10, 4)
    (10, 4, 1)
    >>> partial_shape(3, 2, 10, 4)
    (4, 1, 10)
    """
    s = [1] * max(ndim, 2)
    s[axis] = n
    kax = 0 if axis != 0 else 1
    s[kax] = k
    return tuple(s)


def _out_shape(st: Stage, a: int, b: int, axis: int) -> list[int]:
    s = list(st.shape)
    s[axis] = b - a
    return s


@dataclass(frozen=True, eq=False)
class Reduce(Stage):
    """Per-slab partials of a reduction, laid out as planes (see module docstring).

    Parameters
    ----------
    partial
        ``partial(planes, *values) -> 1-D array of length k``.
    k
        Length of the partial vector.
    identity
        Value of the rows that carry nothing (0 for sums, ``+inf`` for mins).
    combine
        ``"sum"`` or ``"min"``: how rows combine into the global value.
    """

    partial: Callable[..., np.ndarray] | None = None
    k: int = 1
    identity: float = 0.0
    combine: str = "sum"
    scalars: tuple[Any, ...] = ()
    values: tuple[Any, ...] | None = None
    sweep_axis: int = 0
    kind: str = "reduce"

    def temp_factor(self) -> float:
        # the reduction reads its input slab (counted as transient) and keeps a vector
        return 0.0

    def temp_bytes(self, out_bytes: int, in_bytes: int) -> float:
        # partials work in blocks of 65536 voxels (bincount's intp copy, histogram's
        # float64 bin indices and masks): at most ~24 bytes a voxel of one block
        return 24.0 * min(in_bytes, 1 << 16)

    def bind(self, env: dict) -> Reduce:
        if not self.scalars:
            return self
        return replace(self, values=tuple(env[s.uid] for s in self.scalars))

    def compute_planes(
        self, a: int, b: int, axis: int, inputs: list, threads: int, dry: bool
    ) -> np.ndarray | Shape:
        ndim = len(self.shape)
        shape = partial_shape(ndim, axis, b - a, self.k)
        if dry:
            return Shape(shape, np.dtype(self.dtype))
        (x,) = inputs
        out = np.full(shape, self.identity, dtype=self.dtype)
        if b > a:
            vec = np.asarray(self.partial(x, *(self.values or ())), dtype=self.dtype)
            idx = [0] * len(shape)
            kax = 0 if axis != 0 else 1
            idx[kax] = slice(None)
            out[tuple(idx)] = vec
        return out


def combine_partials(planes: np.ndarray, axis: int, how: str) -> np.ndarray:
    """Fold partial planes (any number of steps) into one vector."""
    kax = 0 if axis != 0 else 1
    other = tuple(d for d in range(planes.ndim) if d != kax)
    if how == "sum":
        return planes.sum(axis=other)
    return planes.min(axis=other)
