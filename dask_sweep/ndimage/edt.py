"""Exact Euclidean distance transform in two streaming passes, equal to scipy's.

Algorithm
---------
The squared distance is separable: first the distance along axis 0 to the
nearest background voxel of the same column, then exact lower envelopes of
parabolas along axis 1, 2, ... inside each slab (Felzenszwalb & Huttenlocher;
:mod:`dask_sweep.ndimage._edt_kernels`).  Only axis 0 crosses slabs, and there
the 1-D distance is ``min(up, down)`` with

* ``up``: rows to the nearest background at or above (a forward scan), and
* ``down``: rows to the nearest background at or below (a backward scan).

Each scan carries one int32 plane between slabs::

    forward chain (pass 1)               backward chain (pass 2)
    slab 0  --F0-->                      <--B1--  slab 0   -> out 0
    slab 1  --F1-->        F0, F1, ...   <--B2--  slab 1   -> out 1
    slab 2  --F2--> (has background?)  ---------> slab 2   -> out 2 (first)

Pass 1 reads each slab and produces only ``F[i]`` (up-distance at the slab's
last row).  Pass 2 walks the slabs backwards; slab *i* re-reads its input,
recomputes ``up`` inside the slab from ``F[i-1]`` (recomputing is cheaper than
writing a float volume), scans ``down`` from ``B[i+1]``, squares with the
sampling, applies the in-plane envelopes and the square root, and emits its
output block.  Output blocks therefore appear from the last slab to the first.

The boundary planes ``F[0..n-2]`` are all alive when pass 2 starts.  They stay
in memory when they fit the budget next to a slab; otherwise each is written
to a ``.npy`` file under dask's ``temporary-directory`` and read back (and
deleted) by pass 2: ``4 x plane voxels x (slabs - 1)`` bytes written.  The
input is read twice (bytes read / input bytes = 2).

No background at all: scipy then reports the distance to a virtual background
voxel at index ``(-1, 0, ..., 0)``, i.e. ``sqrt(((i+1) s0)^2 + (j s1)^2 + ...)``;
this is matched (the last forward plane tells pass 2 whether any background
exists).
"""

from __future__ import annotations

import math
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from dask._task_spec import Task, TaskRef
from dask.base import tokenize

from dask_sweep.config import SweepSettings
from dask_sweep.errors import SweepConfigError
from dask_sweep.integration.optimize import active_settings
from dask_sweep.ndimage import _edt_kernels as K
from dask_sweep.ndimage import _spill
from dask_sweep.ndimage._common import (
    Footprint,
    SweepPlan,
    as_dask_array,
    choose_slabs,
)
from dask_sweep.ndimage._reader import SlabReader, make_readers
from dask_sweep.plan.ir import FEEDING
from dask_sweep.runtime.memory import tune_allocator
from dask_sweep.utils import format_bytes

__all__ = ["distance_transform_edt", "explain_edt", "plan_edt"]

INF = K.INF

_FUNC = "dask_sweep.ndimage.distance_transform_edt"


def normalize_sampling(sampling: Any, ndim: int) -> tuple[float, ...]:
    """Sampling per axis as positive floats (a scalar applies to every axis).

    >>> normalize_sampling(2, 3)
    (2.0, 2.0, 2.0)
    """
    if sampling is None:
        return (1.0,) * ndim
    s = np.asarray(sampling, dtype=object)
    if s.ndim == 0:
        s = np.array([sampling] * ndim, dtype=object)
    if s.ndim != 1 or len(s) != ndim:
        raise SweepConfigError(
            f"{_FUNC}: sampling must be a scalar or a sequence with one value per axis "
            f"(length {ndim}, the input rank). Got {sampling!r} instead."
        )
    try:
        out = tuple(float(v) for v in s)
    except (TypeError, ValueError) as e:
        raise SweepConfigError(f"{_FUNC}: sampling must be numbers. Got {sampling!r}.") from e
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise SweepConfigError(
            f"{_FUNC}: sampling must be finite and positive. Got {sampling!r} instead."
        )
    return out


# --------------------------------------------------------------------------- plan


def _plan(image, sampling, memory_limit):
    settings = active_settings(memory_limit=memory_limit)  # explicit > enable(...) > config
    image = as_dask_array(image, "input", _FUNC, settings.memory_limit)
    samp = normalize_sampling(sampling, image.ndim)
    item = image.dtype.itemsize
    plane = int(np.prod(image.shape[1:], dtype=np.int64))
    longest = max(image.shape[1:], default=1)
    # Reading a slab of several blocks holds the blocks and their concatenation (2 x).
    # fixed parts include the runtime overhead (sweep.runtime-overhead): resident
    # memory beyond the arrays
    fwd = Footprint(
        "forward",
        2 * item + 1,
        1,
        2 * 4 * plane + settings.runtime_overhead,
        "read, foreground mask, carry up-distance",
    )
    # + squared distances = the output block (8) and the previous output block still
    # held by its consumer (8); line buffers per thread.
    bwd = Footprint(
        "backward",
        2 * item + 1 + 16,
        1,
        3 * 4 * plane + settings.threads * 32 * longest + settings.runtime_overhead,
        "read, up/down distances, in-plane envelopes, sqrt, emit",
    )
    target = max(1, settings.target_slab_bytes // item)
    chunks0 = image.chunks[0]
    # forward, spill, backward and its two parts, plus two of a consumer's per output
    # block (an external input's own tasks are not counted)
    per_slab = settings.task_overhead * 7
    slabs = choose_slabs(
        _FUNC, chunks0, plane, (fwd, bwd), settings.memory_limit, target, per_slab
    )
    edges = np.cumsum((0, *chunks0))
    bounds = [
        list(range(int(np.searchsorted(edges, a)), int(np.searchsorted(edges, b))))
        for a, b in slabs
    ]
    readers, inline = make_readers(image, bounds)
    boundary = 4 * plane * (len(slabs) - 1)
    plan = SweepPlan(
        _FUNC,
        tuple(image.shape),
        image.dtype,
        tuple(chunks0),
        slabs,
        (fwd, bwd),
        settings.memory_limit,
        inline,
        per_slab=per_slab,
    )
    spill = plan.projected_peak + boundary > settings.memory_limit
    if spill:
        note = (
            f"boundary planes F: {len(slabs) - 1} x {format_bytes(4 * plane)} spilled to "
            f".npy files in a temporary directory (written once, read once)"
        )
        written = boundary
    else:
        note = (
            f"boundary planes F: {len(slabs) - 1} x {format_bytes(4 * plane)} kept in "
            "memory (counted as fixed bytes)"
        )
        fwd = Footprint(fwd.name, fwd.per_voxel, 1, fwd.fixed + boundary, fwd.what)
        bwd = Footprint(bwd.name, bwd.per_voxel, 1, bwd.fixed + boundary, bwd.what)
        written = 0
    plan = SweepPlan(
        func=_FUNC,
        shape=tuple(image.shape),
        dtype=image.dtype,
        in_chunks0=tuple(chunks0),
        slabs=slabs,
        passes=(fwd, bwd),
        budget=settings.memory_limit,
        inline=inline,
        bytes_written=written,
        per_slab=per_slab,
        notes=(note, f"sampling {samp}; output float64, blocks emitted last slab first"),
    )
    return plan, (image, samp, settings, spill), readers


def plan_stream(
    shape: tuple[int, ...],
    dtype: Any,
    chunks0: tuple[int, ...],
    sampling: tuple[float, ...],
    settings: SweepSettings,
    read: float,
    read_fixed: int,
    func: str = _FUNC,
    slab_budget: int | None = None,
) -> SweepPlan:
    """The plan of the distance transform of an input computed slab by slab (the DSL's).

    Pass 1 ("edges") computes every slab's own up/down distances (any order,
    ``threads`` slabs in flight), the carries are chained over those planes
    only, and pass 2 ("distances") turns any slab into its output block.

    Parameters
    ----------
    shape, dtype, chunks0
        The input's shape, dtype and the row grid its slabs may be cut on.
    sampling
        Normalised sampling (:func:`normalize_sampling`).
    settings
        The run's settings.
    read, read_fixed
        Bytes per voxel, and fixed bytes (halos), of computing one slab of the input.
    func
        The name errors and ``explain`` give.
    slab_budget
        The budget the slabs are sized for (default the whole ``memory_limit``):
        less when the pass that reads the output needs room of its own.

    Raises
    ------
    BudgetError
        When even one row of ``chunks0`` does not fit the budget.
    """
    plane = int(np.prod(shape[1:], dtype=np.int64))
    longest = max(shape[1:], default=1)
    threads = max(1, settings.threads)
    edges = Footprint(
        "edges",
        read + 1,
        threads,
        threads * (2 * 4 * plane + read_fixed) + settings.runtime_overhead,
        "compute the input slab, foreground, its own up/down distances (any order)",
    )
    # + squared distances = the output block (8) and the block before it, still held
    # by the next stage (8); carries and line buffers per thread.
    dist = Footprint(
        "distances",
        read + 1 + 16,
        1,
        3 * 4 * plane + threads * 32 * longest + read_fixed + settings.runtime_overhead,
        "compute the input slab again, axis-0 distances from the carries, in-plane "
        "envelopes, sqrt",
    )
    item = np.dtype(dtype).itemsize
    target = max(1, settings.target_slab_bytes // item)
    budget = slab_budget or settings.memory_limit
    slabs = choose_slabs(func, chunks0, plane, (edges, dist), budget, target)
    return SweepPlan(
        func=func,
        shape=tuple(shape),
        dtype=np.dtype(dtype),
        in_chunks0=tuple(chunks0),
        slabs=slabs,
        passes=(edges, dist),
        budget=settings.memory_limit,
        inline=True,
        notes=(
            f"tables: up-carries F, the slabs' own down edges and down-carries B, 3 x "
            f"{len(slabs)} x {format_bytes(4 * plane)}, chained over the edge planes only "
            "(no input read)",
            f"sampling {sampling}; output float64, slabs in any order",
        ),
    )


def plan_edt(image: Any, sampling: Any = None, *, memory_limit: Any = None) -> SweepPlan:
    """The schedule and memory model of :func:`distance_transform_edt`, without running it.

    Raises
    ------
    BudgetError
        When even one chunk row along axis 0 does not fit ``memory_limit``.
    """
    return _plan(image, sampling, memory_limit)[0]


def explain_edt(image: Any, sampling: Any = None, *, memory_limit: Any = None) -> str:
    """:func:`plan_edt` as text: passes, slab thickness, projected peak, bytes read/written."""
    return plan_edt(image, sampling, memory_limit=memory_limit).explain()


# --------------------------------------------------------------------------- tasks


def _foreground(reader: SlabReader, blocks: tuple) -> np.ndarray:
    x = reader.read(blocks)
    fg = x if x.dtype == bool else x != 0
    return np.ascontiguousarray(fg).reshape(fg.shape[0], -1)


def _forward(reader: SlabReader, carry: np.ndarray | None, tune: bool, *blocks: Any) -> np.ndarray:
    if tune:
        tune_allocator()  # sweep.tune-malloc: freed slabs leave the process at once
    fg = _foreground(reader, blocks)
    if carry is None:
        carry = np.full(fg.shape[1], K.INF, dtype=np.int32)
    out = np.empty_like(carry)
    K.forward_carry(fg, carry, out)
    return out


def _backward(
    reader: SlabReader,
    f_in: Any,
    b_carry: tuple | None,
    last_f: np.ndarray | None,
    row0: int,
    sampling: tuple[float, ...],
    shape: tuple[int, ...],
    threads: int,
    spill_dir: str | None,
    tune: bool,
    *blocks: Any,
) -> tuple[np.ndarray, tuple]:
    """One slab of pass 2: returns ``(output block, (down-distance plane, has_background))``."""
    if tune:
        tune_allocator()
    if isinstance(f_in, str):
        f_in = _spill.take(f_in)
    plane = int(np.prod(shape[1:], dtype=np.int64))
    if b_carry is None:  # the last slab starts the chain
        has_bg = bool((last_f < K.INF).any()) if plane else False
        b_in = np.full(plane, K.INF, dtype=np.int32)
    else:
        b_in, has_bg = b_carry
    if f_in is None:
        f_in = np.full(plane, K.INF, dtype=np.int32)
    b_out = np.empty(plane, dtype=np.int32)
    # the mask is handed over (no name here), so distances() frees it before the envelopes
    d2 = distances(
        _foreground(reader, blocks), f_in, b_in, b_out, has_bg, row0, sampling, shape, threads
    )
    if row0 == 0:
        _spill.remove_dir(spill_dir)  # every plane has been read back and deleted
    return d2, (b_out, has_bg)


def distances(
    fg: np.ndarray,
    f_in: np.ndarray,
    b_in: np.ndarray,
    b_out: np.ndarray,
    has_bg: bool,
    row0: int,
    sampling: tuple[float, ...],
    shape: tuple[int, ...],
    threads: int,
) -> np.ndarray:
    """The output block of a slab from its ``(rows, plane)`` foreground and its carries.

    ``f_in`` / ``b_in``: rows from the row above / below the slab to the nearest
    background (``INF``: none); ``b_out`` receives the down-distance at the slab's
    first row.  ``fg`` is consumed.
    """
    rows, plane = fg.shape
    out_shape = (rows, *shape[1:])
    if not has_bg:
        del fg
        d2 = _no_background(row0, out_shape, sampling)
    else:
        d2 = np.empty((rows, plane))
        K.axis0_squared(fg, f_in, b_in, sampling[0], d2, b_out)
        del fg
        d2 = d2.reshape(out_shape)
        for ax in range(1, len(shape)):
            _envelope(d2, ax, sampling[ax], threads)
    np.sqrt(d2, out=d2)
    return d2


def slab_edges(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(up, down)`` of a ``(rows, plane)`` foreground slab on its own (``INF``: none).

    ``up``: rows from the slab's last row up to the nearest background inside the
    slab; ``down``: rows from its first row down to the nearest one.  With
    :func:`chain_edges` they give the carries of every slab from slabs computed in
    any order (the DSL's form of the two scans).
    """
    plane = fg.shape[1]
    none = np.full(plane, K.INF, dtype=np.int32)
    up = np.empty(plane, dtype=np.int32)
    down = np.empty(plane, dtype=np.int32)
    K.forward_carry(fg, none, up)
    K.forward_carry(fg[::-1], none, down)
    return up, down


def chain_edges(
    carry: np.ndarray | None, edge: np.ndarray, rows: int, plane: int
) -> np.ndarray:
    """The scan's carry after a slab of ``rows`` rows whose own edge distance is ``edge``.

    A column with background in the slab restarts from the slab's own distance;
    one without adds the slab's rows to the carry before it (saturating at ``INF``).
    """
    if carry is None:
        carry = np.full(plane, K.INF, dtype=np.int32)
    out = np.empty(plane, dtype=np.int32)
    # rows < INF and carry <= INF: the sum fits int64 inside the kernel
    K.chain_carry(carry, edge, int(min(rows, K.INF)), out)
    return out


_warmed: set[int] = set()


def warm(ndim: int) -> None:
    """Compile the kernels now, on a tiny slab with background, not inside a run's budget.

    numba compiles on first call; inside a run that took ~60 MiB of resident memory
    (measured on a 48 MiB plan), far beyond the plan.  Both scans, the carries, the
    axis-0 squares and the envelopes are called with the run's argument types.
    """
    if ndim in _warmed:
        return
    shape = (3,) * ndim
    fg = np.ones((3, 3 ** (ndim - 1)), dtype=bool)
    fg[1, 0] = False
    up, down = slab_edges(fg)
    chain_edges(chain_edges(None, up, 3, up.size), down, 3, up.size)
    distances(fg, up, down, np.empty_like(up), True, 0, (1.0,) * ndim, shape, 1)
    _warmed.add(ndim)


def _no_background(row0: int, shape: tuple[int, ...], sampling: tuple[float, ...]) -> np.ndarray:
    # scipy's feature transform then points every voxel at index (-1, 0, ..., 0).
    d2 = np.zeros(shape)
    for ax, n in enumerate(shape):
        idx = np.arange(n, dtype=np.float64) + (row0 + 1 if ax == 0 else 0)
        x = idx * sampling[ax]
        d2 += (x * x).reshape((-1,) + (1,) * (len(shape) - ax - 1))
    return d2


def _envelope(d2: np.ndarray, axis: int, s: float, threads: int) -> None:
    """Lower envelope along ``axis`` of a C-contiguous array, in place, on threads."""
    shape = d2.shape
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    v = d2.reshape(outer, shape[axis], inner)
    if outer == 0 or shape[axis] == 0 or inner == 0:
        return
    parts = min(threads, outer)
    if parts <= 1:
        K.envelope_axis1(v, s)
        return
    cuts = np.linspace(0, outer, parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(lambda ab: K.envelope_axis1(v[ab[0] : ab[1]], s), zip(cuts, cuts[1:])))


# --------------------------------------------------------------------------- public


def distance_transform_edt(
    image: Any,
    sampling: Any = None,
    return_distances: bool = True,
    return_indices: bool = False,
    distances: Any = None,
    indices: Any = None,
    *,
    memory_limit: Any = None,
):
    """Exact Euclidean distance transform like :func:`scipy.ndimage.distance_transform_edt`.

    Lazy and in bounded memory: two sweeps along axis 0 (see the module docstring).

    Parameters
    ----------
    image : array_like or dask.array.Array
        Input; zeros are background, the distance of every voxel to the nearest
        background voxel is computed.  Any number of axes >= 1.
    sampling : float or sequence of float, optional
        Voxel spacing per axis (a scalar applies to all axes).
    return_distances : bool
        Must be True (only distances are supported).
    return_indices : bool
        Must be False (the feature transform is not supported).
    distances, indices : None
        Output arrays are not supported (the result is lazy).
    memory_limit : int or str, optional
        Memory budget; default ``sweep.memory-limit``.

    Returns
    -------
    dask.array.Array
        float64, same shape as ``image``; chunks are the slabs along axis 0,
        whole in the other axes.  Equal to scipy's result up to rounding
        (relative 1e-12), including scipy's answer when there is no background.

    Raises
    ------
    BudgetError
        At call time, when even one chunk row does not fit ``memory_limit``.
    SweepConfigError
        For a non-array input, a bad ``sampling``, or unsupported options.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep.ndimage import distance_transform_edt
    >>> distance_transform_edt(np.array([[0, 1, 1, 1]])).compute().tolist()
    [[0.0, 1.0, 2.0, 3.0]]
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    if not return_distances or return_indices or distances is not None or indices is not None:
        raise SweepConfigError(
            f"{_FUNC}: only return_distances=True, return_indices=False and no output arrays "
            "are supported (the feature transform is not streamed)."
        )
    plan, (image, samp, settings, spill), readers = _plan(image, sampling, memory_limit)
    if image.shape[0] == 0:  # no slabs: an empty result (as scipy)
        return da.zeros(image.shape, dtype=np.float64, chunks=image.chunks)
    warm(image.ndim)  # numba compiles now, outside the run's budget
    # spill paths must be unique per call
    spill_dir = _spill.new_dir("edt") if spill else None
    token = tokenize(image.name, samp, plan.slabs, settings.threads, spill_dir)
    fwd, spl, bwd = f"edt-fwd-{token}", f"edt-spill-{token}", f"edt-bwd-{token}"
    bcar, out = f"edt-bcarry-{token}", f"distance-transform-edt-{token}"
    n = len(readers)
    nz = (0,) * (image.ndim - 1)
    dsk: dict = {}
    for s, r in enumerate(readers):
        ext = [] if r.inline else [TaskRef(k) for k in r.block_keys()]
        prev = TaskRef((fwd, s - 1)) if s else None
        dsk[(fwd, s)] = Task((fwd, s), _forward, r, prev, settings.tune_malloc, *ext)
        if spill and s + 1 < n:
            path = os.path.join(spill_dir, f"F-{s:08d}.npy")
            dsk[(spl, s)] = Task((spl, s), _spill.spill, path, TaskRef((fwd, s)))
    for s in range(n - 1, -1, -1):
        r = readers[s]
        ext = [] if r.inline else [TaskRef(k) for k in r.block_keys()]
        f_in = None if s == 0 else TaskRef(((spl if spill else fwd), s - 1))
        b_in = TaskRef((bcar, s + 1)) if s + 1 < n else None
        last = TaskRef((fwd, n - 1)) if s + 1 == n else None
        dsk[(bwd, s)] = Task(
            (bwd, s),
            _backward,
            r,
            f_in,
            b_in,
            last,
            plan.slabs[s][0],
            samp,
            tuple(image.shape),
            settings.threads,
            spill_dir,
            settings.tune_malloc,
            *ext,
        )
        dsk[(out, s, *nz)] = Task((out, s, *nz), operator.getitem, TaskRef((bwd, s)), 0)
        if s > 0:
            dsk[(bcar, s)] = Task((bcar, s), operator.getitem, TaskRef((bwd, s)), 1)
    deps = () if plan.inline else (image,)
    # what the last pass holds while a sweep consumes the distances: that sweep plans for the rest
    layer = MaterializedLayer(dsk, collection_annotations={FEEDING: plan.feeding_bytes})
    graph = HighLevelGraph.from_collections(out, layer, dependencies=deps)
    rows = tuple(b - a for a, b in plan.slabs)
    chunks = (rows,) + tuple((m,) for m in image.shape[1:])
    return da.Array(graph, out, chunks, meta=np.empty((0,) * image.ndim, dtype=np.float64))
