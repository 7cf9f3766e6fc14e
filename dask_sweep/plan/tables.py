"""The plan of a table-pass algorithm (label, EDT): slabs, per-pass footprints, notes.

A table-pass algorithm (:mod:`dask_sweep.multipass`) reads its input once per
pass, slab by slab along axis 0; what one pass holds is a :class:`Footprint`
(bytes per voxel of a slab in flight, times the slabs in flight, plus fixed
bytes such as carried planes).  The :class:`SweepPlan` is fixed when sized
(:mod:`dask_sweep.passes.tables`) and printed by ``explain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dask_sweep.plan.printer import table_plan_lines

__all__ = ["Footprint", "SweepPlan"]


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
    consumer
        Bytes per voxel of one slab left to a sweep that reads the pass's output
        while the pass runs (a write of the labels): counted when the slabs are
        sized, not in what the pass itself holds (:meth:`held_for`).
    """

    name: str
    per_voxel: float
    in_flight: int
    fixed: int
    what: str
    consumer: float = 0.0

    def held_for(self, voxels: int) -> int:
        """Bytes the pass holds with slabs of ``voxels``."""
        return int(math.ceil(self.per_voxel * voxels)) * self.in_flight + self.fixed

    def bytes_for(self, voxels: int) -> int:
        """Bytes the pass and a sweep consuming its output hold together."""
        return self.held_for(voxels) + int(math.ceil(self.consumer * voxels))


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
    input_reads
        Times the input is read (default: once per pass); 1 when the first pass keeps
        what it read for the others (in ``bytes_written`` of temporary storage).
    kept
        What the first pass keeps for the others: ``"labels"`` (label's local labels,
        only mapped again), ``"masks"`` (its input masks, labelled again) or ``""``.
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
    input_reads: int | None = None
    kept: str = ""

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
        last = self.passes[-1].held_for(v) if self.passes else 0
        return last + self.per_slab * len(self.slabs)

    @property
    def bytes_read_ratio(self) -> float:
        """Bytes read ÷ input bytes: each pass reads the input once (or ``input_reads``
        times)."""
        return float(self.input_reads or len(self.passes))

    def explain(self) -> str:
        """The plan as text: passes, slabs, projected peak vs budget, I/O."""
        return "\n".join(table_plan_lines(self))

    def __str__(self) -> str:
        return self.explain()
