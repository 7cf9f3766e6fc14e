"""Exact Euclidean distance transform in two passes over slabs, equal to scipy's.

Algorithm
---------
The squared distance is separable: first the distance along axis 0 to the
nearest background voxel of the same column, then exact lower envelopes of
parabolas along axis 1, 2, ... inside each slab (Felzenszwalb & Huttenlocher;
:mod:`dask_sweep.multipass.edt_kernels`).  Only axis 0 crosses slabs, and there
the 1-D distance is ``min(up, down)`` with

* ``up``: rows to the nearest background at or above (a forward scan), and
* ``down``: rows to the nearest background at or below (a backward scan).

Each scan carries one int32 plane between slabs::

    pass 1: forward chain          tables: one task          pass 2: any order
    slab 0 -> F0                   B(n-1) = D(n-1)           slab i, F(i-1), B(i+1) -> out i
    slab 1 -> F1, D1       ...     B(i) = D(i) chained
    slab 2 -> D2, any background?    onto B(i+1)

Pass 1 (:func:`forward_step`, a chain) reads each slab and produces ``F[i]``
(up-distance at the slab's last row, carried from ``F[i-1]``) and ``D[i]`` (the
slab's own down edge).  :func:`tables_step` chains the ``D`` planes backwards into
``B[i]`` (down-distance at the slab's first row), over planes only.  Pass 2
(:func:`distance_step`) turns each slab into its output block on its own: it reads
the slab again (or, for an input dask computes, the packed mask pass 1 wrote),
recomputes ``up`` and ``down`` inside the slab from ``F[i-1]`` and ``B[i+1]``
(recomputing is cheaper than writing a float volume), squares with the sampling,
applies the in-plane envelopes and the square root.  The output blocks are
independent tasks, so a consumer (a store) takes each as it comes under any
scheduler's order: a chain emitting them would run ahead of its consumers (dask's
order, for one, runs such a chain to its end before the first store).  Pass 1
stays a chain: an input dask computes is then computed in slab order, one slab's
worth at a time.

The planes ``F``, ``D`` and ``B`` (``3 x 4 x plane voxels x (slabs - 1)`` bytes)
stay in memory when they fit the budget next to a slab; otherwise each is written
to a ``.npy`` file under dask's ``temporary-directory`` and read back (and
deleted) by the step that needs it last.  An inline input is read twice (bytes
read / input bytes = 2); one dask computes is computed once.

No background at all: scipy then reports the distance to a virtual background
voxel at index ``(-1, 0, ..., 0)``, i.e. ``sqrt(((i+1) s0)^2 + (j s1)^2 + ...)``;
this is matched (pass 1 tells whether any slab has background).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_sweep.errors import SweepConfigError
from dask_sweep.multipass import SlabInput, spill
from dask_sweep.multipass import edt_kernels as K
from dask_sweep.runtime.memory import trims, tune_allocator

__all__ = [
    "INF",
    "backward_chain",
    "chain_edges",
    "distance_step",
    "distances",
    "forward_step",
    "get_plane",
    "normalize_sampling",
    "put_plane",
    "slab_edges",
    "spill_plane",
    "tables_step",
    "warm",
]

INF = K.INF

# The name errors give (the DSL's front end passes its own to the validation).
NAME = "dask_sweep.ndimage.distance_transform_edt"


def normalize_sampling(sampling: Any, ndim: int, func: str = NAME) -> tuple[float, ...]:
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
            f"{func}: sampling must be a scalar or a sequence with one value per axis "
            f"(length {ndim}, the input rank). Got {sampling!r} instead."
        )
    try:
        out = tuple(float(v) for v in s)
    except (TypeError, ValueError) as e:
        raise SweepConfigError(f"{func}: sampling must be numbers. Got {sampling!r}.") from e
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise SweepConfigError(
            f"{func}: sampling must be finite and positive. Got {sampling!r} instead."
        )
    return out


# --------------------------------------------------------------------------- tasks


def _foreground(reader: SlabInput, blocks: tuple) -> np.ndarray:
    x = reader.read(blocks)
    fg = x if x.dtype == bool else x != 0
    return np.ascontiguousarray(fg).reshape(fg.shape[0], -1)


def spill_plane(path: str, plane: np.ndarray) -> str:
    """Write an int32 carry plane to ``path`` in the narrowest unsigned type that holds
    it exactly (``INF``: the type's largest value; read back by :func:`get_plane`).

    Distances are mostly short, so most planes take 1 byte a voxel, not 4: writing
    to the page cache costs 2.5 ms a MiB here (0.4 GiB/s), most of a spilled run's
    first pass.
    """
    top = K.finite_max(plane)
    for t in (np.uint8, np.uint16):
        big = np.iinfo(t).max
        if top < big:
            narrow = np.empty(plane.shape, t)
            K.narrow_into(plane, narrow, big)
            plane = narrow
            break
    return spill.spill(path, plane)


def put_plane(plane: np.ndarray, directory: str | None, name: str) -> np.ndarray | str:
    """``plane`` itself, or (``directory`` given) the path :func:`spill_plane` wrote."""
    return plane if directory is None else spill_plane(os.path.join(directory, name), plane)


def get_plane(obj: np.ndarray | str, keep: bool = False) -> np.ndarray:
    """A plane :func:`put_plane` returned, as int32 (a file is deleted unless ``keep``)."""
    if not isinstance(obj, str):
        return obj
    narrow = spill.load(obj) if keep else spill.take(obj)
    if narrow.dtype == np.int32:
        return narrow
    plane = np.empty(narrow.shape, np.int32)
    K.widen_into(narrow, plane, np.iinfo(narrow.dtype).max)
    return plane


def backward_chain(
    downs: list, rows: tuple[int, ...], plane: int, put: Any, take: Any = get_plane
) -> list:
    """``B[s]``, the down-distance at slab ``s``'s first row, chained backwards from
    each slab's own down edge ``downs[s]`` (``B[0]`` and ``downs[0]`` are not needed).

    ``take(downs[s])`` gives an edge as int32 (each is released once taken);
    ``put(carry, name)`` keeps or spills each ``B[s]``.  The drop-in's table task and
    the DSL's tables both run this chain.
    """
    n = len(downs)
    B: list = [None] * n
    carry = None
    for s in range(n - 1, 0, -1):
        edge, downs[s] = take(downs[s]), None
        carry = chain_edges(carry, edge, rows[s], plane)
        B[s] = put(carry, f"B-{s:08d}.npy")
    return B


@trims
def forward_step(
    reader: SlabInput,
    prev: tuple | None,
    s: int,
    last: bool,
    spill_dir: str | None,
    mask_dir: str | None,
    tune: bool,
    *blocks: Any,
) -> tuple:
    """Pass 1 of slab ``s`` (a chain): ``(F, D, has_background)``.

    ``F``: the up-distance carried past the slab's last row (from ``prev``, the step
    before's result); ``D``: the slab's own down edge (the backward chain of
    :func:`tables_step` needs it).  With ``spill_dir``, ``F`` and ``D`` are files
    there, named by path (the next step reads ``F`` and leaves it to the slab after's
    distance step).  Only the last step says whether there is any background (its
    ``F`` is not needed).  With ``mask_dir`` (an input dask computes, which pass 2 does
    not compute again), the packed foreground is written there.
    """
    if tune:
        tune_allocator()  # sweep.tune-malloc: freed slabs leave the process at once
    fg = _foreground(reader, blocks)
    if mask_dir is not None:
        spill.put_mask(mask_dir, s, fg)
    plane = fg.shape[1]
    carry = np.full(plane, K.INF, np.int32) if prev is None else get_plane(prev[0], keep=True)
    f = np.empty(plane, np.int32)
    K.forward_carry(fg, carry, f)
    d = None
    if s > 0:  # D of slab 0 is not needed
        d = np.empty(plane, np.int32)
        K.down_edge(fg, d)
        d = put_plane(d, spill_dir, f"D-{s:08d}.npy")
    del fg, carry
    if last:
        return None, d, bool((f < K.INF).any()) if plane else False
    return put_plane(f, spill_dir, f"F-{s:08d}.npy"), d, None


def tables_step(
    rows: tuple[int, ...], plane: int, spill_dir: str | None, *steps: tuple
) -> tuple[list, bool]:
    """The backward chain over the slabs' down edges (:func:`backward_chain`):
    ``(B, has_background)``, each ``B[s]`` a plane or, with ``spill_dir``, the path of
    its file; ``steps``: every forward step's result, in order.
    """
    B = backward_chain([st[1] for st in steps], rows, plane,
                       lambda carry, name: put_plane(carry, spill_dir, name))
    return B, bool(steps[-1][2])


# One distance step at a time in a process: a step already runs its in-plane
# envelopes on every thread, and the plan counts one slab of it; the steps are
# independent tasks (so that a consumer, e.g. a store, takes each block as it comes
# under any scheduler's order), which a scheduler would otherwise run at once.
_ONE_AT_A_TIME = threading.Lock()


@trims
def distance_step(
    reader: SlabInput,
    prev: tuple | None,
    tables: tuple[list, bool],
    s: int,
    slab: tuple[int, int],
    sampling: tuple[float, ...],
    shape: tuple[int, ...],
    threads: int,
    dirs: tuple[str | None, ...],
    tune: bool,
    *blocks: Any,
) -> np.ndarray:
    """Pass 2 of slab ``s``: its output block, from its foreground (read again, or the
    packed mask pass 1 wrote), ``F`` of the slab before (``prev``, its forward step)
    and ``B`` of the slab after (``tables``)."""
    B, has_bg = tables
    plane = int(np.prod(shape[1:], dtype=np.int64))
    with _ONE_AT_A_TIME:
        if tune:
            tune_allocator()
        f_in = get_plane(prev[0]) if prev is not None else np.full(plane, K.INF, np.int32)
        b_in = get_plane(B[s + 1]) if s + 1 < len(B) else np.full(plane, K.INF, np.int32)
        if dirs[1] is not None:  # the mask pass 1 wrote
            fg = spill.take_mask(dirs[1], s, plane)
        else:
            fg = _foreground(reader, blocks)
        # the mask is handed over (no name here), so distances() frees it before the envelopes
        d2 = distances(fg, f_in, b_in, np.empty(plane, np.int32), has_bg, slab[0], sampling,
                       shape, threads)
    for d in dirs:
        spill.remove_dir(d)  # removed once its last file was read
    return d2


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
    K.down_edge(fg, down)
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
    for t in (np.uint8, np.uint16):  # a spilled plane's narrowing, both ways
        narrow = np.empty(up.shape, t)
        K.narrow_into(up, narrow, np.iinfo(t).max)
        K.widen_into(narrow, up, np.iinfo(t).max)
    K.finite_max(up)
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
