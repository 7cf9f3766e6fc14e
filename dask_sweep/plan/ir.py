"""The sweep plan: one intermediate representation for both front ends.

A plan is a small DAG of *stages*.  Every stage produces an array of the same
extent along the sweep axis, plane by plane, in increasing order::

    source ──► stage ──► stage ──► output
                 │                   ▲
                 └──────► stage ─────┘        (tee and zip are just fan-out / fan-in)

A stage declares, per input, the *window* it needs along the sweep axis
(``lo`` planes before and ``hi`` planes after the planes it produces) and a
*grid*: the plane indices at which its computation must start and stop
(``None`` means any boundary will do; a block-exact stage that must reproduce
dask's own block decomposition uses dask's chunk boundaries).  The runtime keeps
for every stage a ring buffer of exactly the planes that its consumers' windows
still need.

The dataclasses here are frozen descriptions; what a stage *does* lives in
:mod:`dask_sweep.runtime`.  Front ends (the dask graph patterns, the DSL) build
these objects; passes and the runtime never know which front end made them.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

BoundaryT = Any  # "none" | "reflect" | "periodic" | "nearest" | a constant value


class PlanInfo(dict):
    """A plan's notes for the layers after sizing (read-only; picklable).

    Copies of a plan (``dataclasses.replace``) share it, so writing to it would
    change every copy: :meth:`Plan.with_info` makes a new plan instead.
    """

    __slots__ = ()

    def _frozen(self, *_: Any, **__: Any) -> None:
        raise TypeError("Plan.info is read-only: use plan.with_info(key=value).")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _frozen
    __ior__ = _frozen

    def __reduce__(self):
        return (PlanInfo, (dict(self),))


@dataclass(frozen=True, eq=False)
class Stage:
    """Base of every stage.

    Parameters
    ----------
    label
        Human-readable name shown by ``explain``.
    shape, dtype
        Shape and dtype of the array the stage produces.
    inputs
        Indices of the stages it reads, in the plan's ``stages`` tuple.
    """

    label: str
    shape: tuple[int, ...]
    dtype: np.dtype
    inputs: tuple[int, ...] = ()

    def window(self, i: int) -> tuple[int, int]:
        """Planes of input ``i`` needed before and after the produced range."""
        return (0, 0)

    def grid(self, axis: int) -> tuple[int, ...] | None:
        """Plane boundaries the stage must compute between (``None``: free)."""
        return None

    def plane_bytes(self, axis: int) -> int:
        n = math.prod(s for i, s in enumerate(self.shape) if i != axis)
        return n * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, eq=False)
class Source(Stage):
    """Planes read from storage (or from upstream dask blocks) one chunk row at a time.

    ``read_row(r)`` returns the planes of chunk row ``r`` (along the sweep axis);
    ``row_bounds`` are the chunk boundaries along the sweep axis.  ``external``
    rows are not read by the stage but handed to the slab task by the scheduler
    (their keys are ``reader.row_keys(r)``): a row's blocks, or the upstream values
    (computed by dask for another output too) that a row evaluated in the step needs.
    """

    row_bounds: tuple[int, ...] = ()
    reader: Any = None  # object with .read_row(r, externals) -> ndarray
    external: bool = False
    bytes_per_row: tuple[int, ...] = ()
    chunks: tuple[tuple[int, ...], ...] = ()  # the source's chunks (for in-plane tiling)

    def grid(self, axis: int) -> tuple[int, ...] | None:
        return self.row_bounds


@dataclass(frozen=True, eq=False)
class Blocked(Stage):
    """A stage evaluated block by block, exactly as dask would evaluate it.

    Used for opaque functions (``map_overlap`` / ``map_blocks`` / elementwise
    Blockwise layers): the function sees the very same block, with the very
    same halo and boundary padding, as under stock dask, so results are
    bit-identical whatever the function does.

    Parameters
    ----------
    chunks
        dask's chunks of the stage's *output* (= of each input; block grid).
    depth
        Per input, per axis ``(lo, hi)`` halo depth.
    boundary
        Per input, per axis boundary kind as dask spells it.
    block_fn
        ``block_fn(index, *regions) -> ndarray``: evaluate one block.
    origin
        In an in-plane tile: where the stage's planes start in the whole array, per
        axis (``chunks`` stay the whole array's); empty: the whole array.
    interior
        In a tile: per axis, the ``(start, stop)`` of the tile's interior in the whole
        array.  Only the blocks inside it are evaluated; the halo around them repeats
        their edges (no later stage reads it, see :mod:`dask_sweep.passes.tiling`).
    """

    chunks: tuple[tuple[int, ...], ...] = ()
    depth: tuple[tuple[tuple[int, int], ...], ...] = ()
    boundary: tuple[tuple[BoundaryT, ...], ...] = ()
    block_fn: Callable[..., np.ndarray] | None = None
    kind: str = "blockwise"
    origin: tuple[int, ...] = ()
    interior: tuple[tuple[int, int], ...] = ()

    def window(self, i: int) -> tuple[int, int]:
        return self._axis_depth[i]

    @property
    def _axis_depth(self) -> tuple[tuple[int, int], ...]:
        return tuple(d[self.sweep_axis] for d in self.depth)

    sweep_axis: int = 0

    def grid(self, axis: int) -> tuple[int, ...] | None:
        return tuple(np.cumsum((0,) + tuple(self.chunks[axis])).tolist())


@dataclass(frozen=True, eq=False)
class Kernel(Stage):
    """A windowed kernel known to equal one global operation on the whole volume.

    The kernel (a scipy.ndimage filter whose footprint fits in the halo, or a
    DSL window) gives the same bits whatever the slab boundaries, so the sweep
    chooses them from the memory budget.  ``fn(padded_slab) -> slab`` runs on a
    slab padded by ``depth`` on every side (boundary padding at the volume's
    faces, real neighbours elsewhere) and the result is cropped by ``depth``.
    How it runs (kept planes, in-plane pieces) is
    :mod:`dask_sweep.runtime.kernel`'s business.

    Parameters
    ----------
    fn
        The N-D call on a padded block.
    depth
        Symmetric halo per axis (at least the footprint's radius).
    boundary
        Per axis: dask's boundary padding, or ``'none'`` (the kernel's own mode
        acts at the volume's faces).
    temps
        Temporaries of one ``fn`` call, as a multiple of its output.
    passes
        Separable form: scipy's own 1-D passes ``((axis, fn1d), ...)`` in its order.
    edges
        Per axis ``(lo, hi)``: is that side a face of the volume (in-plane tiles)?
    in_dtype
        Dtype of the input (for the cost of its copies).
    """

    fn: Callable[[np.ndarray], np.ndarray] | None = None
    depth: tuple[int, ...] = ()
    boundary: tuple[BoundaryT, ...] = ()
    temps: float = 2.0
    kind: str = "kernel"
    passes: tuple | None = None
    edges: tuple | None = None
    sweep_axis: int = 0
    in_dtype: Any = None

    def window(self, i: int) -> tuple[int, int]:
        d = self.depth[self.sweep_axis]
        return (d, d)


@dataclass(frozen=True, eq=False)
class Running(Stage):
    """scipy's uniform filter on floats, as dask computes it block by block, on any slab.

    Its sum runs along each line of a block, so it is carried from step to step
    (``State.carry``) and restarted where each of dask's blocks starts its line
    (:mod:`dask_sweep.runtime.running`).  The sweep axis is the first; every boundary
    is ``'none'`` (scipy's ``mode`` acts at the faces of each block's line).

    Parameters
    ----------
    size, mode, cval
        The sweep-axis pass: ``uniform_filter1d(size=, mode=, cval=)``.
    inplane
        The in-plane passes on dask's in-plane blocks (a
        :class:`~dask_sweep.patterns.kernels.SeparableBlockFn` without a sweep-axis halo).
    chunks
        dask's blocks (of the input and the output).
    depth
        The halo dask gives each block, per axis.
    reach
        Input planes a step needs before and after its own (``runtime.running.reach``).
    blocked
        The same stage on dask's blocks, for in-plane tiles.
    note, blocked_note
        What ``explain`` says of the stage, and of it on dask's blocks in tiles
        (:func:`~dask_sweep.passes.tiling.on_blocks` swaps one for the other).
    """

    size: int = 1
    mode: str = "reflect"
    cval: float = 0.0
    inplane: Any = None
    chunks: tuple[tuple[int, ...], ...] = ()
    depth: tuple[int, ...] = ()
    reach: tuple[int, int] = (0, 0)
    blocked: Blocked | None = None
    note: str = ""
    blocked_note: str = ""
    sweep_axis: int = 0
    kind: str = "running"

    def window(self, i: int) -> tuple[int, int]:
        return self.reach

    def restarts(self) -> tuple[int, ...]:
        """Where the carried sums start afresh: dask's block boundaries."""
        return tuple(np.cumsum((0,) + tuple(self.chunks[self.sweep_axis])).tolist())


@dataclass(frozen=True, eq=False)
class Pointwise(Stage):
    """``fn(*input_planes, *values)`` on the same planes of every input: any slab will do.

    Elementwise work (ufuncs, comparisons, ``astype``, ``where``, ``clip``, the
    DSL's maps and zips) has no window and no grid, so it runs on whatever
    planes its consumer asks for, and holds no ring of its own beyond them.

    Parameters
    ----------
    fn
        Elementwise function of the input planes (and of ``values``).
    scalars
        Values computed by earlier passes that ``fn`` needs (the DSL's scalars).
    values
        Their values, once bound; ``None`` before.
    """

    fn: Callable[..., np.ndarray] | None = None
    scalars: tuple[Any, ...] = ()
    values: tuple[Any, ...] | None = None
    cast: bool = True  # cast results to ``dtype`` (the DSL); the plugin keeps dask's own
    temps: float = 1.0  # temporaries, as a multiple of the result (0: one numpy call)
    kind: str = "pointwise"

    def bind(self, env: dict) -> Pointwise:
        """This stage with the values of its scalars taken from ``env``."""
        if not self.scalars:
            return self
        return replace(self, values=tuple(env[s.uid] for s in self.scalars))


# The collection annotation under which a drop-in (ndimage.label, distance_transform_edt)
# records the bytes it holds while its output is consumed (its last pass and the bookkeeping
# of its tasks): a sweep reading that output plans for the budget less that.
FEEDING = "dask_sweep_feeding"
# ... and the budget it was given: a sweep that reads the output runs the drop-in's last
# pass inside its steps, so it plans within that budget too.
FEEDING_BUDGET = "dask_sweep_feeding_budget"
# ... and its own plan (a :class:`~dask_sweep.plan.tables.SweepPlan`), which ``explain``
# prints for that layer (the plugin leaves the drop-in's tasks as they are).
DROPIN_PLAN = "dask_sweep_plan"

# In dask's array-expression mode a drop-in's output is an expression over its tasks,
# which holds no layer annotations: they are kept here by the output's layer name (the
# expression's name prefix; recent outputs only) for the recogniser to find.
EXPR_ANNOTATIONS: OrderedDict = OrderedDict()
EXPR_ANNOTATIONS_KEPT = 4096


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


def combine_partials(planes: np.ndarray, axis: int, how: str) -> np.ndarray:
    """Fold :class:`Reduce` partial planes (any number of steps) into one vector."""
    kax = 0 if axis != 0 else 1
    other = tuple(d for d in range(planes.ndim) if d != kax)
    return planes.sum(axis=other) if how == "sum" else planes.min(axis=other)


@dataclass(frozen=True, eq=False)
class Reduce(Stage):
    """Per-slab partials of a reduction (a histogram, a sum and a count...), laid out as planes.

    Planes ``[a, b)`` become a small vector stored as planes, so it travels
    through rings, outputs and dask blocks like any other array::

        partial planes [a, b):  row a = the vector of the whole slab [a, b)
                                rows a+1 .. b-1 = the combine identity (0 or +inf)

    Combining all rows of all steps (sum, or min) gives the global reduction,
    whatever the step boundaries.

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
    scalars, values
        As for :class:`Pointwise`.
    """

    partial: Callable[..., np.ndarray] | None = None
    k: int = 1
    identity: float = 0.0
    combine: str = "sum"
    scalars: tuple[Any, ...] = ()
    values: tuple[Any, ...] | None = None
    sweep_axis: int = 0
    kind: str = "reduce"

    def bind(self, env: dict) -> Reduce:
        """This stage with the values of its scalars taken from ``env``."""
        if not self.scalars:
            return self
        return replace(self, values=tuple(env[s.uid] for s in self.scalars))


@dataclass(frozen=True, eq=False)
class Identity(Stage):
    """Same values, other chunks (a rechunk): a sweep sees planes, not chunks."""

    kind: str = "rechunk"


@dataclass(frozen=True, eq=False)
class Output:
    """Where a stage's planes go: dask blocks for output keys, or a store."""

    stage: int
    name: str  # dask key name of the output blocks
    chunks: tuple[tuple[int, ...], ...]
    sink: Any = None  # object with .write_block(idx, data) or .write_planes(a, planes)
    align: tuple[int, ...] | None = None  # plane boundaries the sink wants slabs cut at

    def grid(self, axis: int) -> tuple[int, ...]:
        """Plane boundaries at which this output can be emitted."""
        return self.align if self.align is not None else bounds(self.chunks[axis])


@dataclass(frozen=True, eq=False)
class Plan:
    """A sweep: stages in topological order, outputs, sweep axis and step bounds."""

    stages: tuple[Stage, ...]
    outputs: tuple[Output, ...]
    axis: int
    steps: tuple[int, ...] = ()  # plane boundaries of the slab steps (0 < b1 < ... = N)
    notes: tuple[str, ...] = ()
    fallbacks: tuple[tuple[str, str], ...] = ()
    budget: int = 0
    threads: int = 1
    info: PlanInfo = field(default_factory=PlanInfo)
    rings: tuple[int, ...] = ()  # per stage: planes of its folded ring buffer (0: transient)
    segments: tuple[int, ...] = ()  # steps that start an independent chain (besides 0)

    def __post_init__(self) -> None:
        if not isinstance(self.info, PlanInfo):
            object.__setattr__(self, "info", PlanInfo(self.info))

    def with_info(self, **entries: Any) -> Plan:
        """This plan with ``entries`` added to (or replacing those of) its :attr:`info`."""
        return replace(self, info=PlanInfo({**self.info, **entries}))

    @property
    def extent(self) -> int:
        return self.stages[0].shape[self.axis]

    def reach(self) -> list[tuple[int, int]]:
        """Per stage, the planes beyond an output's it must produce (behind, ahead)."""
        reach = [(-1, -1)] * len(self.stages)
        for o in self.outputs:
            reach[o.stage] = (max(reach[o.stage][0], 0), max(reach[o.stage][1], 0))
        for j in reversed(range(len(self.stages))):
            if reach[j][0] < 0:
                continue
            for pos, i in enumerate(self.stages[j].inputs):
                lo, hi = self.stages[j].window(pos)
                reach[i] = (max(reach[i][0], reach[j][0] + lo),
                            max(reach[i][1], reach[j][1] + hi))
        return [(max(0, a), max(0, b)) for a, b in reach]

    def lead(self) -> list[tuple[int, int]]:
        """Per stage, the source planes one of its planes depends on (behind, ahead)."""
        lead: list[tuple[int, int]] = []
        for st in self.stages:
            lo = hi = 0
            for pos, i in enumerate(st.inputs):
                w = st.window(pos)
                lo = max(lo, lead[i][0] + w[0])
                hi = max(hi, lead[i][1] + w[1])
            lead.append((lo, hi))
        return lead

    def segment_steps(self) -> list[range]:
        """The steps of each segment (one chain of slab tasks each), in order."""
        cuts = [0, *self.segments, len(self.steps)]
        return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:])]

    def consumers(self) -> list[list[tuple[int, int]]]:
        """For each stage, the ``(consumer, input position)`` pairs that read it."""
        out: list[list[tuple[int, int]]] = [[] for _ in self.stages]
        for j, st in enumerate(self.stages):
            for pos, i in enumerate(st.inputs):
                out[i].append((j, pos))
        return out


def bounds(chunks: Sequence[int]) -> tuple[int, ...]:
    """Cumulative boundaries of a chunk tuple.

    >>> bounds((2, 3, 1))
    (0, 2, 5, 6)
    """
    return _bounds(tuple(chunks))


@functools.lru_cache(maxsize=256)
def _bounds(chunks: tuple[int, ...]) -> tuple[int, ...]:
    # plans ask for the same few chunk tuples once per step: computed once each
    return tuple(np.cumsum((0, *chunks)).tolist())
