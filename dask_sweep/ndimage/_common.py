"""Shared pieces of the ndimage sweeps: input coercion, slab sizing, the cost record.

Every function in :mod:`dask_sweep.ndimage` cuts its input into *slabs*: runs
of whole axis-0 chunks of the input, whole in the other axes::

    axis 0 (rows)
      |   chunk rows of the input       slabs (whole chunk rows)
      v   +------------------+          +------------------+
          | row 0            |          |                  |
          +------------------+          |   slab 0         |
          | row 1            |          |                  |
          +------------------+          +------------------+
          | row 2            |          |   slab 1         |
          +------------------+          +------------------+
          | ...              |          | ...              |

A slab is the unit of one task: read, compute, emit.  Its thickness is the
largest number of chunk rows whose *footprint* (bytes per voxel of the pass
times voxels, times the slabs a pass may hold at once) fits the budget next to
the fixed costs (carried planes, tables).  When not even one chunk row fits,
:class:`~dask_sweep.errors.BudgetError` is raised at call time, before any I/O.

This module knows nothing of dask graphs beyond ``Array.chunks``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dask_sweep.errors import BudgetError, SweepConfigError
from dask_sweep.utils import format_bytes

# Rows of a numpy input that become one chunk of the wrapping dask array: small,
# so that slab sizing (whole chunk rows) has a fine granularity.
_NUMPY_CHUNK_BYTES = 4 << 20


def as_dask_array(image, name: str, func: str, budget: int | None = None):
    """``image`` as a dask array (numpy inputs are wrapped, never copied).

    Parameters
    ----------
    image
        A dask array, or anything :func:`numpy.asarray` accepts.
    name
        Parameter name for messages (``"input"``, like scipy).
    func
        Public function name for messages.
    budget
        Memory budget: a numpy input is cut into chunk rows of at most
        ``budget / 64`` bytes so that slabs can be sized finely.

    Raises
    ------
    SweepConfigError
        When ``image`` is not array-like, is 0-d, or has an unsupported dtype.
    """
    import dask.array as da

    if not isinstance(image, da.Array):
        if image is None or isinstance(image, (str, bytes, dict, set)):
            raise SweepConfigError(
                f"{func}: expected {name} to be a numpy or dask array. "
                f"Got {type(image).__name__} instead."
            )
        arr = np.asarray(image)
        if arr.dtype == object:
            raise SweepConfigError(
                f"{func}: expected {name} to be a numeric array. Got an object array "
                f"(from {type(image).__name__}) instead."
            )
        if arr.ndim == 0:
            raise SweepConfigError(
                f"{func}: expected {name} with at least one axis. Got a 0-d array instead."
            )
        row_bytes = max(1, arr[0:1].nbytes if arr.shape[0] else 1)
        cap = _NUMPY_CHUNK_BYTES if budget is None else min(_NUMPY_CHUNK_BYTES, budget // 64)
        rows = max(1, cap // row_bytes)
        image = da.from_array(arr, chunks=(rows,) + arr.shape[1:])
    if image.ndim == 0:
        raise SweepConfigError(
            f"{func}: expected {name} with at least one axis. Got a 0-d array instead."
        )
    if image.dtype.kind not in "biuf":
        raise SweepConfigError(
            f"{func}: expected {name} with a bool, integer or float dtype. "
            f"Got dtype {image.dtype} instead."
        )
    if any(math.isnan(c) for c in image.shape) or any(
        math.isnan(c) for cs in image.chunks for c in cs
    ):
        raise SweepConfigError(
            f"{func}: {name} has unknown chunk sizes. Call {name}.compute_chunk_sizes() first."
        )
    return image


@dataclass(frozen=True)
class Footprint:
    """What one pass holds, per voxel of a slab and in fixed bytes.

    Attributes
    ----------
    name
        Pass name shown by ``explain``.
    per_voxel
        Bytes held per voxel of one slab in flight (input, masks, labels...).
    in_flight
        Slabs the pass may hold at once (1 for a carried chain).
    fixed
        Bytes independent of the slab thickness (carried planes, tables).
    what
        One-line description of the work, for ``explain``.
    """

    name: str
    per_voxel: float
    in_flight: int
    fixed: int
    what: str

    def bytes_for(self, voxels: int) -> int:
        return int(math.ceil(self.per_voxel * voxels)) * self.in_flight + self.fixed


@dataclass(frozen=True)
class SweepPlan:
    """The schedule and costs of one ndimage function on one input, fixed at call time.

    Attributes
    ----------
    func
        Public function name.
    shape, dtype, in_chunks0
        The input's shape, dtype and axis-0 chunks.
    slabs
        ``(start, stop)`` rows of each slab, whole input chunk rows.
    passes
        The :class:`Footprint` of each pass over the input, in order.
    budget
        The memory limit in bytes.
    inline
        Whether reads happen inside the slab tasks (input needs no upstream
        computation) or the input blocks are dependencies of the slab tasks.
    bytes_written
        Bytes written to temporary storage (0 when everything stays in memory).
    per_slab
        Bytes held per slab for the whole run (dask's bookkeeping of its tasks).
    notes
        Extra lines for ``explain`` (data-dependent tables, spill decisions).
    """

    func: str
    shape: tuple[int, ...]
    dtype: np.dtype
    in_chunks0: tuple[int, ...]
    slabs: tuple[tuple[int, int], ...]
    passes: tuple[Footprint, ...]
    budget: int
    inline: bool
    bytes_written: int = 0
    per_slab: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def plane_voxels(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def input_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def max_rows(self) -> int:
        return max((b - a for a, b in self.slabs), default=0)

    @property
    def projected_peak(self) -> int:
        """Largest projected footprint over the passes plus the tasks' bookkeeping, in bytes."""
        v = self.max_rows * self.plane_voxels
        passes = max((p.bytes_for(v) for p in self.passes), default=0)
        return passes + self.per_slab * len(self.slabs)

    @property
    def feeding_bytes(self) -> int:
        """Bytes held while the output is consumed: the last pass (which emits the output
        slabs) and the tasks' bookkeeping.  A sweep reading the output gets the rest."""
        v = self.max_rows * self.plane_voxels
        last = self.passes[-1].bytes_for(v) if self.passes else 0
        return last + self.per_slab * len(self.slabs)

    @property
    def bytes_read_ratio(self) -> float:
        """Bytes read ÷ input bytes: each pass reads the input once."""
        return float(len(self.passes))

    def explain(self) -> str:
        """The plan as text: passes, slabs, projected peak vs budget, I/O."""
        rows = [b - a for a, b in self.slabs]
        lines = [
            f"{self.func}: input shape {self.shape} {self.dtype} "
            f"({format_bytes(self.input_bytes)}), axis-0 chunks "
            f"{_fmt_chunks(self.in_chunks0)}",
            f"  {len(self.slabs)} slabs of {min(rows, default=0)}-{max(rows, default=0)} rows "
            f"(whole chunk rows, in-plane whole); reads "
            + ("inline in the slab tasks" if self.inline else "from upstream dask tasks"),
        ]
        v = self.max_rows * self.plane_voxels
        for i, p in enumerate(self.passes, 1):
            lines.append(
                f"  pass {i} {p.name}: {p.what}; {p.per_voxel:g} B/voxel x "
                f"{p.in_flight} slab(s) in flight + {format_bytes(p.fixed)} fixed "
                f"= {format_bytes(p.bytes_for(v))}"
            )
        if self.per_slab:
            lines.append(
                f"  dask's bookkeeping: {len(self.slabs)} slabs x {format_bytes(self.per_slab)} "
                f"= {format_bytes(self.per_slab * len(self.slabs))} for the whole run"
            )
        lines += [f"  {n}" for n in self.notes]
        lines.append(
            f"  projected peak {format_bytes(self.projected_peak)} of "
            f"{format_bytes(self.budget)} budget; bytes read / input bytes = "
            f"{self.bytes_read_ratio:.2f}; bytes written = {format_bytes(self.bytes_written)}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _fmt_chunks(c: Sequence[int]) -> str:
    if len(set(c)) <= 1:
        return f"{len(c)} chunks of {c[0] if c else 0} rows"
    return f"{len(c)} chunks of {min(c)}-{max(c)} rows"


def choose_slabs(
    func: str,
    chunks0: Sequence[int],
    plane_voxels: int,
    passes: Sequence[Footprint],
    budget: int,
    target_voxels: int | None = None,
    per_slab: int = 0,
) -> tuple[tuple[int, int], ...]:
    """Group consecutive chunk rows into slabs whose every pass fits the budget.

    Greedy: a slab grows by whole chunk rows while the largest pass footprint
    stays within ``budget`` (and the slab within ``target_voxels``, which keeps
    slabs small enough to pipeline when the budget is generous).  ``per_slab``
    bytes are held for every slab for the whole run (task bookkeeping), so the
    budget left to the slabs shrinks as their number grows: the grouping is
    repeated with the budget less the bookkeeping of the last count until the
    count stops growing.

    Raises
    ------
    BudgetError
        When even the largest single chunk row does not fit; the message names
        the function, the projected bytes and the budget.

    Examples
    --------
    >>> fp = [Footprint("p", 1.0, 1, 0, "")]
    >>> choose_slabs("f", [2, 2, 2], 10, fp, budget=45)
    ((0, 4), (4, 6))
    >>> choose_slabs("f", [2, 2, 2], 10, fp, budget=45, per_slab=3)
    ((0, 2), (2, 4), (4, 6))
    """
    count = 1
    while True:
        slabs = _group(func, chunks0, plane_voxels, passes, budget, target_voxels, per_slab, count)
        if len(slabs) <= count:
            return slabs
        count = len(slabs)


def _group(func, chunks0, plane_voxels, passes, budget, target_voxels, per_slab, count):
    room = budget - per_slab * count

    def need(rows: int) -> int:
        return max((p.bytes_for(rows * plane_voxels) for p in passes), default=0)

    worst = max(chunks0, default=0)
    if need(worst) > room:
        p = max(passes, key=lambda p: p.bytes_for(worst * plane_voxels))
        book = (
            f" + dask's bookkeeping of {count} slabs x {format_bytes(per_slab)}"
            if per_slab and count > 1
            else ""
        )
        raise BudgetError(
            f"{func}: even the thinnest slab (one chunk row of {worst} rows along axis 0) "
            f"needs a projected {format_bytes(need(worst))} in {p.name} "
            f"({p.per_voxel:g} B/voxel x {p.in_flight} slab(s) + {format_bytes(p.fixed)} "
            f"fixed){book}, over the memory budget of {format_bytes(budget)}. Raise "
            "memory_limit or rechunk the input to thinner rows along axis 0.",
            stage=func,
            projected=need(worst) + per_slab * count,
            budget=budget,
        )
    slabs: list[tuple[int, int]] = []
    start = stop = 0
    for c in chunks0:
        rows = stop - start + c
        fits = need(rows) <= room and (
            target_voxels is None or rows * plane_voxels <= target_voxels
        )
        if stop > start and not fits:
            slabs.append((start, stop))
            start = stop
        stop += c
    if stop > start or not slabs:
        slabs.append((start, stop))
    return tuple(slabs)
