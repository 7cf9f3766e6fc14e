"""Windowed kernels on slabs: the planes ``[a, b)`` of one global filter.

A :class:`~dask_sweep.plan.ir.Kernel` gets the window of its input along the
sweep axis (``[a - d, b + d)``, clipped at the volume's faces) and returns the
kept planes ``[a, b)``, bit for bit what one call on the whole volume gives::

    window [a-d, b+d) ──► (faces: boundary padding) ──┬─ separable: 1-D passes
                                                        │   sweep axis: kept planes only
                                                        │   in-plane: on the kept planes,
                                                        │   split across threads
                                                        └─ otherwise: in-plane pieces,
                                                            each with its halo ─► crop

* A **separable** kernel (scipy's own sequence of 1-D passes, the first along
  the sweep axis) computes that first pass for the kept planes only when it
  can (:func:`~dask_sweep.runtime.axis_pass.kept_planes`: gaussians, integer
  uniform / min / max, boolean runs), else runs scipy's pass on in-plane
  pieces of the window and keeps the planes; the in-plane passes then run on
  the kept planes alone.  Lines are independent, so nothing is recomputed.
* Any other kernel runs on in-plane **pieces** of the window (each with its
  in-plane halo, one piece per thread at a time), so its temporaries are those
  of a few pieces, not of the padded slab.

:func:`kernel_temp_bytes` computes the temporaries from the same layout the
run uses, so the projected peak is that of the real arrays.
"""

from __future__ import annotations

import functools

import numpy as np

from dask_sweep.plan.ir import Kernel
from dask_sweep.runtime.axis_pass import (
    WINDOW_OPS,
    extends_faces,
    gaussian_weights,
    kept_planes,
)
from dask_sweep.runtime.boundary import pad_axis
from dask_sweep.runtime.morphology import BoolRun
from dask_sweep.runtime.morphology import warm as warm_shifts
from dask_sweep.runtime.parallel import pmap
from dask_sweep.runtime.rank import MedianPlanes
from dask_sweep.runtime.ring import Shape

# A 1-D in-plane pass is shared by threads from 256 K voxels: below, the pieces' calls
# cost more than they save (measured on 2 cores: 2 x 256^2 uint8 0.70 ms in one thread,
# 0.78 ms in two; 8 x 256^2 2.95 against 2.25 ms).
_INPLANE_SHARE_FROM = 1 << 18


def warm_kernels() -> None:
    """Load (or compile) the numba kernels a plugin sweep may run, once per process.

    Called when a sweep is switched on (``enable``, a pass object): the first numba
    kernel a process loads starts LLVM (about 50 MiB of resident memory, 0.15 s from
    numba's cache), which would otherwise land inside the first run's budget.
    """
    warm_shifts(3)
    for dtype in ("u1", "i1", "u2", "i2", "u4", "i4", "f4", "f8"):  # one kernel each
        MedianPlanes.of({"size": 3}, 3, dtype)


def _out_dtype(fn, default) -> np.dtype:
    """The dtype a 1-D pass writes: its ``output=`` keyword if it has one."""
    out = getattr(fn, "keywords", {}).get("output")
    return np.dtype(out) if out is not None else np.dtype(default)


def separable(st: Kernel) -> bool:
    """Whether ``st`` runs as 1-D passes with at most the first along the sweep axis."""
    p = st.passes
    return p is not None and len(p) > 0 and not any(a == st.sweep_axis for a, _ in p[1:])


def _sweep_first(st: Kernel):
    return st.passes[0][1] if separable(st) and st.passes[0][0] == st.sweep_axis else None


def tile_axis(st: Kernel) -> int | None:
    """The in-plane axis pieces are cut along (the longest one)."""
    ax = [a for a in range(len(st.shape)) if a != st.sweep_axis]
    return max(ax, key=lambda a: st.shape[a]) if ax else None


def _inplane_pads(st: Kernel) -> list[tuple[int, int]]:
    """Per axis, boundary padding at the in-plane faces of the (tile's) volume."""
    pads = []
    for ax, d in enumerate(st.depth):
        if ax == st.sweep_axis or st.boundary[ax] == "none" or not d:
            pads.append((0, 0))
            continue
        lo, hi = st.edges[ax] if st.edges is not None else (True, True)
        pads.append((d * lo, d * hi))
    return pads


def _kept_first(st: Kernel, clipped: bool) -> bool:
    """Whether the sweep-axis pass is computed for the kept planes only (no padded slab).

    ``clipped``: the window stops at a face of the volume with no boundary padding,
    so the kernel's own mode applies there (scipy's pass runs, but for boolean runs).
    """
    first = _sweep_first(st)
    if first is None:
        return False
    if isinstance(first, BoolRun):
        return True
    if clipped and not (extends_faces(first, np.dtype(st.in_dtype or st.dtype))
                        and st.shape[st.sweep_axis] > st.depth[st.sweep_axis]):
        return False  # (a volume thinner than the window reflects more than once)
    func = getattr(first, "func", None)
    if func in WINDOW_OPS:
        kind = np.dtype(st.in_dtype or st.dtype).kind
        return kind in "biu" and not (WINDOW_OPS[func] == "sum" and kind == "b")
    return gaussian_weights(first) is not None


def _line_bytes(st: Kernel, dtype) -> int:
    """Bytes of one line along the tile axis of one plane, in ``dtype``."""
    t = tile_axis(st)
    n = 1
    for a, s in enumerate(st.shape):
        if a not in (st.sweep_axis, t):
            n *= s
    return n * np.dtype(dtype).itemsize


@functools.lru_cache(maxsize=1024)
def layout(st: Kernel, p_out: int, p_in: int, threads: int) -> tuple[int, int]:
    """``(lines per piece, bytes of temporaries)`` for ``p_out`` planes from ``p_in``.

    The temporaries are what the call holds beyond its input window and its
    output array: boundary-padded copies, the pieces in flight (one per
    thread) and, for a separable kernel, the second array of an in-plane pass.
    """
    t = tile_axis(st)
    rows = st.shape[t] if t is not None else 1
    in_dt = np.dtype(st.in_dtype if st.in_dtype is not None else st.dtype)
    out_bytes = p_out * rows * _line_bytes(st, st.dtype)
    nthreads = max(1, threads)
    pads = _inplane_pads(st)
    grow = 1.0
    for ax, (lo, hi) in enumerate(pads):
        if lo or hi:
            grow *= (st.shape[ax] + lo + hi) / st.shape[ax]
    padded_copy = int(p_in * rows * _line_bytes(st, in_dt) * grow) if grow > 1 else 0
    if st.boundary[st.sweep_axis] != "none":
        padded_copy = max(padded_copy, int(p_in * rows * _line_bytes(st, in_dt) * grow))
    if separable(st):
        first = _sweep_first(st)
        second = int(out_bytes * grow) if len(st.passes) > (1 if first else 0) else 0
        d = st.depth[st.sweep_axis]
        clipped = st.boundary[st.sweep_axis] == "none" and p_in < p_out + 2 * d
        if first is None or _kept_first(st, clipped):
            return rows, padded_copy + int(out_bytes * grow) + second
        # scipy's first pass on pieces of the window: p_in planes x r lines in flight
        per_row = p_in * _line_bytes(st, _out_dtype(first, in_dt)) * grow
        r = max(1, min(rows, int(out_bytes // 4 // max(1.0, nthreads * per_row))))
        inflight = min(nthreads, -(-rows // r)) * r * per_row
        return r, padded_copy + int(max(inflight, second))
    h = st.depth[t] if t is not None else 0
    if getattr(st.fn, "cropped_rows", False) and t is not None:
        # fn reads the whole window and computes a piece's kept rows: a piece holds its
        # output rows, fn's copies of its input rows (with their halo) and fn's fixed
        # temporaries (a histogram): at most one piece per thread, the pieces in flight a
        # quarter of the step's output (thin pieces, not thin steps)
        copies = getattr(st.fn, "row_copies", 0)
        per_row = (p_out * _line_bytes(st, st.dtype)
                   + copies * p_in * _line_bytes(st, in_dt) * grow)
        r = max(1, min(-(-rows // nthreads),
                       int(out_bytes // 4 // max(1.0, nthreads * per_row))))
        # but no more than 4 pieces a thread: a call costs tens of microseconds of Python
        # (4-row pieces of a one-plane step: 16 K calls for a 256^3 volume, 0.8 s)
        r = max(r, -(-rows // (4 * nthreads)))
        n = -(-rows // r)
        piece = r * per_row + copies * 2 * h * p_in * _line_bytes(st, in_dt) * grow
        return r, padded_copy + int(min(nthreads, n) * (piece + getattr(st.fn, "fixed", 0)))
    # one piece: a contiguous copy of its input lines and fn's output (+ its temporaries)
    per_row = p_in * grow * (
        _line_bytes(st, in_dt) + _line_bytes(st, st.dtype) * (1 + st.temps)
    )
    r = max(1, min(rows, int(out_bytes // max(1.0, nthreads * per_row)) - 2 * h))
    r = max(r, min(rows, 2 * h + 1))
    n = -(-rows // r)
    lines = min(rows, r + 2 * h) if n > 1 else rows
    return r, padded_copy + int(min(nthreads, n) * lines * per_row)


def kernel_temp_bytes(st: Kernel, out_bytes: int, in_bytes: int, threads: int) -> int:
    """Temporaries of computing ``out_bytes`` of ``st`` from ``in_bytes`` of input."""
    plane_out = max(1, st.plane_bytes(st.sweep_axis))
    in_dt = np.dtype(st.in_dtype if st.in_dtype is not None else st.dtype)
    plane_in = max(1, plane_out // np.dtype(st.dtype).itemsize * in_dt.itemsize)
    return layout(st, out_bytes // plane_out, in_bytes // plane_in, threads)[1]


def compute_kernel(st: Kernel, a: int, b: int, axis: int, inputs: list, threads: int,
                   dry: bool, prepadded: bool = False):
    """Planes ``[a, b)`` of a block-invariant kernel, from its input's window."""
    (x,) = inputs
    t_out = b - a
    if dry:
        s = list(st.shape)
        s[axis] = t_out
        return Shape(tuple(s), np.dtype(st.dtype))
    n = st.shape[axis]
    d = st.depth[axis]
    pa, pb = max(0, a - d), min(n, b + d)
    bnd = st.boundary[axis]
    if bnd != "none":
        if not prepadded:  # periodic is padded by the executor
            x = pad_axis(x, axis, d - (a - pa), d - (pb - b), bnd)
        c0 = d
    else:
        c0 = a - pa
    pads = _inplane_pads(st)
    for ax, (lo, hi) in enumerate(pads):
        x = pad_axis(x, ax, lo, hi, st.boundary[ax])
    crop = tuple(slice(lo, lo + st.shape[ax]) if ax != axis else slice(None)
                 for ax, (lo, hi) in enumerate(pads))
    if separable(st):
        y = _separable(st, x, axis, c0, t_out, threads)
    else:
        y = _pieces(st, x, axis, c0, t_out, threads)
    y = y[crop]
    if np.may_share_memory(y, x):
        return y.copy()  # never a view of the input's ring
    return np.ascontiguousarray(y)


def _separable(st: Kernel, x, axis: int, c0: int, t: int, threads: int):
    first = _sweep_first(st)
    rest = st.passes[1:] if first is not None else st.passes
    keep = (slice(None),) * axis + (slice(c0, c0 + t),)
    if first is None:
        y = x[keep]
    else:
        y = kept_planes(first, x, axis, c0, t, threads)
        if y is None:  # scipy's pass over the window, on in-plane pieces, planes kept
            y = _first_in_pieces(st, first, x, axis, keep, t, threads)
    for ax, fn in rest:
        y = inplane_pass(fn, y, ax, threads)
    return y


def _first_in_pieces(st, first, x, axis, keep, t, threads):
    tl = tile_axis(st)
    rows = x.shape[tl] if tl is not None else 1
    r, _ = layout(st, t, x.shape[axis], threads)
    shape = list(x.shape)
    shape[axis] = t
    out = np.empty(shape, dtype=_out_dtype(first, x.dtype))

    def piece(rng):
        idx = [slice(None)] * x.ndim
        if tl is not None:
            idx[tl] = slice(*rng)
        y = first(x[tuple(idx)])
        out[tuple(idx)] = y[keep]

    _each(piece, [(s, min(rows, s + r)) for s in range(0, rows, r)], threads)
    return out


def _pieces(st: Kernel, x, axis: int, c0: int, t: int, threads: int):
    """The N-D call on in-plane pieces of the window, each with its halo, planes kept."""
    tl = tile_axis(st)
    rows = x.shape[tl] if tl is not None else 1
    h = st.depth[tl] if tl is not None else 0
    r, _ = layout(st, t, x.shape[axis], threads)
    shape = list(x.shape)
    shape[axis] = t
    out = np.empty(shape, dtype=st.dtype)
    pieces = [(s, min(rows, s + r)) for s in range(0, rows, r)]

    def piece(rng):
        s, e = rng
        hs, he = max(0, s - h), min(rows, e + h)
        idx = [slice(None)] * x.ndim
        crop = [slice(None)] * x.ndim
        crop[axis] = slice(c0, c0 + t)
        dst = [slice(None)] * x.ndim
        if tl is not None:
            idx[tl] = slice(hs, he)
            crop[tl] = slice(s - hs, s - hs + (e - s))
            dst[tl] = slice(s, e)
        if getattr(st.fn, "cropped_rows", False) and tl is not None:
            # the kept planes and the piece's kept rows only, read from the whole window
            # (no copy of the piece, no halo rows computed)
            y = st.fn.planes(x, axis, c0, t, rows=(tl, s, e - s))
            out[tuple(dst)] = y
            return
        xs = x[tuple(idx)]
        if getattr(st.fn, "cropped", False):
            # the function computes the kept planes only (its windows, not the halo's)
            y = st.fn.planes(xs, axis, c0, t)
            crop[axis] = slice(None)
        else:
            y = st.fn(np.ascontiguousarray(xs) if len(pieces) > 1 else xs)
        out[tuple(dst)] = y[tuple(crop)]

    _each(piece, pieces, threads)
    return out


def _each(fn, items: list, threads: int) -> None:
    """``fn`` on every item, by ``threads`` workers each taking every ``threads``-th item."""
    if threads <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    groups = [items[k::threads] for k in range(min(threads, len(items)))]

    def work(group):
        for it in group:
            fn(it)

    pmap(work, groups, threads)


def inplane_pass(fn, x: np.ndarray, ax: int, threads: int) -> np.ndarray:
    """One 1-D pass along ``ax`` into a new array, split across threads along another axis.

    Lines along ``ax`` are independent: the pieces need no halo and write
    straight into one output array (exact, nothing recomputed).
    """
    out = np.empty(x.shape, dtype=_out_dtype(fn, x.dtype if not isinstance(fn, BoolRun)
                                             else bool))
    other = [a for a in range(x.ndim) if a != ax]
    tile = max(other, key=lambda a: x.shape[a]) if other else None
    if threads <= 1 or tile is None or x.shape[tile] < 2 * threads or x.size < _INPLANE_SHARE_FROM:
        fn(x, output=out)
        return out
    cuts = np.linspace(0, x.shape[tile], threads + 1).astype(int).tolist()

    def piece(k: int) -> None:
        idx = [slice(None)] * x.ndim
        idx[tile] = slice(cuts[k], cuts[k + 1])
        fn(x[tuple(idx)], output=out[tuple(idx)])

    pmap(piece, list(range(threads)), threads)
    return out
