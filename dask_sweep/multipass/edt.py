"""Exact Euclidean distance transform in two streaming passes, equal to scipy's.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_sweep.errors import SweepConfigError
from dask_sweep.multipass import SlabInput, spill
from dask_sweep.multipass import edt_kernels as K
from dask_sweep.runtime.memory import tune_allocator

__all__ = [
    "INF",
    "backward_step",
    "chain_edges",
    "distances",
    "forward_step",
    "normalize_sampling",
    "slab_edges",
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


def forward_step(
    reader: SlabInput, carry: np.ndarray | None, tune: bool, *blocks: Any
) -> np.ndarray:
    """Pass 1 of a slab: the up-distance carried past its last row (``carry``: the one
    before it; ``tune``: ``sweep.tune-malloc``)."""
    if tune:
        tune_allocator()  # sweep.tune-malloc: freed slabs leave the process at once
    fg = _foreground(reader, blocks)
    if carry is None:
        carry = np.full(fg.shape[1], K.INF, dtype=np.int32)
    out = np.empty_like(carry)
    K.forward_carry(fg, carry, out)
    return out


def backward_step(
    reader: SlabInput,
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
        f_in = spill.take(f_in)
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
        spill.remove_dir(spill_dir)  # every plane has been read back and deleted
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
