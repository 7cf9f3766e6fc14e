"""scipy's uniform filter on floats over dask's blocks, bit for bit, on any slab.

``uniform_filter1d`` keeps a *running* sum along each line, in double precision:
the first window summed, then, voxel after voxel, the plane entering minus the
plane leaving added to it, and each output that sum divided by the size::

    t = e[0] + ... + e[size - 1];          out[0] = t / size
    t = t + (e[i + size - 1] - e[i - 1]);  out[i] = t / size      (i = 1, 2, ...)

where ``e`` is the line extended by the filter's mode.  On floats the sum rounds,
so a voxel's value depends on where its line starts: under dask, at the start of
its block's halo.  A float uniform filter is therefore not block-invariant, and
the sweep used to keep dask's blocks whole along the sweep axis (a whole block
row in memory, or in-plane tiles that re-read their halos).

This module carries the sum instead: plane by plane, from step to step, the
double-precision sum of every column is the stage's *carry*
(``State.carry``), restarted where each dask block's line starts (its halo's
first plane, extended by scipy's mode at that end) and ended where it ends.  The
planes of a step are those of dask's blocks, whatever the step's bounds.  The
in-plane passes then run on dask's in-plane blocks of the step's planes, each
axis's halo cropped after its pass (:class:`~dask_sweep.patterns.kernels.SeparableBlockFn`),
so the result is stock dask's to the bit (``tests/test_running.py``).

The carry ties one step to the next, so such a sweep is one chain (no segments,
no resumption mid-way), and it is not tiled in-plane: when whole planes do not
fit, the planner falls back to the stage on dask's blocks (``Running.blocked``).
"""

from __future__ import annotations

import numpy as np

from dask_sweep.plan.ir import Running
from dask_sweep.runtime.boundary import SCIPY_PAD
from dask_sweep.runtime.parallel import pmap
from dask_sweep.runtime.ring import Shape


def block_lines(st: Running) -> list[tuple[int, int, int, int]]:
    """Per dask block along the sweep axis: ``(z0, z1, r0, r1)``, its planes and the
    planes of its line (with the halo dask gives it; none at the volume's faces)."""
    d = st.depth[st.sweep_axis]
    bounds = np.cumsum((0, *st.chunks[st.sweep_axis])).tolist()
    n = bounds[-1]
    return [(z0, z1, max(0, z0 - d) if k else 0, min(n, z1 + d))
            for k, (z0, z1) in enumerate(zip(bounds, bounds[1:]))]


def extension(length: int, size: int, mode: str) -> np.ndarray:
    """Index into its line of each extended position (``-1``: the constant)."""
    s1 = size // 2
    s2 = size - s1 - 1
    idx = np.arange(length)
    pad = SCIPY_PAD[mode]
    if pad == "constant":
        return np.pad(idx, (s1, s2), mode="constant", constant_values=-1)
    return np.pad(idx, (s1, s2), mode=pad)


def reach(st: Running) -> tuple[int, int]:
    """Planes of its input a step needs before and after the planes it computes.

    A step that starts a block sums its line from the line's start (the halo's first
    plane, and the mode's extension there); a step that goes on reads, per plane, the
    one entering the window and the one leaving it.  Near a line's ends those are the
    mode's reflections, which may lie on either side.
    """
    lo = hi = 0
    for z0, z1, r0, r1 in block_lines(st):
        ext = extension(r1 - r0, st.size, st.mode)
        first = z0 - r0  # the line position of the block's first plane
        # the step starting the block: every position up to its first plane's window
        refs = ext[:first + st.size]
        refs = refs[refs >= 0] + r0
        if refs.size:
            lo, hi = max(lo, z0 - int(refs.min())), max(hi, int(refs.max()) - z0)
        # the steps going on: the planes leaving and entering each later plane's window
        z = np.arange(z0 + 1, z1)
        for pos in (z - r0 - 1, z - r0 + st.size - 1):
            ref = ext[pos]
            used = ref >= 0
            if used.any():
                d = ref[used] + r0 - z[used]
                lo, hi = max(lo, int(-d.min())), max(hi, int(d.max()))
    return lo, hi


def _plane_voxels(st: Running) -> int:
    return int(np.prod(st.shape[1:], dtype=np.int64))


def temp_bytes(st: Running, out_bytes: int, threads: int) -> int:
    """Temporaries of one step: the sweep-axis pass's planes (the in-plane passes read
    them), the new sums and a difference (double planes), and per thread an in-plane
    block's region and its two pass results."""
    item = np.dtype(st.dtype).itemsize
    t = out_bytes // max(1, _plane_voxels(st) * item)
    widest, blocks = 1, 1
    for ax in range(1, len(st.shape)):
        widest *= max(st.chunks[ax]) + 2 * st.depth[ax]
        blocks *= len(st.chunks[ax])
    inplane = 3 * min(threads, blocks) * t * widest * item if st.inplane.passes else 0
    return out_bytes + 16 * _plane_voxels(st) + inplane


def compute_running(st: Running, a: int, b: int, x, x0: int, carry, threads: int, dry: bool):
    """Planes ``[a, b)`` of the filter and the carry after them.

    ``x`` holds the input's planes from ``x0`` (the step's window); ``carry`` is
    ``(next_plane, sums)`` left by the previous step, or ``None`` at the chain's start.
    The sweep axis is the first (the recogniser's condition).
    """
    if dry:
        return (Shape((b - a, *st.shape[1:]), st.dtype),
                (b, Shape(tuple(st.shape[1:]), np.dtype("f8"))))
    zpass = np.empty((b - a, *x.shape[1:]), dtype=st.dtype)
    for z0, z1, r0, r1 in block_lines(st):
        p, q = max(a, z0), min(b, z1)
        if p >= q:
            continue
        sums = None
        if p != z0:
            if carry is None or carry[0] != p:
                raise RuntimeError(  # pragma: no cover - the planner keeps one chain
                    f"{st.label!r}: the running sum for plane {p} was not carried")
            sums = carry[1]
        carry = (q, _line(st, x, x0, r0, r1, p, q, sums, zpass[p - a:q - a], threads))
    if carry is not None and carry[0] >= st.shape[0]:
        carry = None  # the sweep's end: nothing to carry
    if not st.inplane.passes:
        return zpass, carry
    out = np.empty_like(zpass)
    _inplane(st, zpass, out, threads)
    return out, carry


def _line(st: Running, x, x0, r0, r1, p, q, sums, out, threads):
    """Planes ``[p, q)`` of the sweep-axis pass along the line ``[r0, r1)`` of their
    block, into ``out``; returns the sums after plane ``q - 1``.  ``sums`` holds them
    after plane ``p - 1``, or is ``None`` when ``p`` starts the block."""
    size = st.size
    ext = extension(r1 - r0, size, st.mode)
    cval = float(st.cval)

    def plane(pos, sl):  # the extended line at ``pos``: a plane of x, or the constant
        k = int(ext[pos])
        if k < 0:
            return cval
        j = r0 + k - x0
        if not 0 <= j < x.shape[0]:
            raise RuntimeError(  # pragma: no cover - the window is the stage's reach
                f"{st.label!r}: plane {r0 + k} is outside the step's window")
        return x[j][sl]

    # columns are independent: on large planes, threads take bands of rows
    rows = x.shape[1] if x.ndim > 1 else 1
    bands = min(threads, rows) if threads > 1 and x[0].size * (q - p) >= 1 << 20 else 1
    edges = np.linspace(0, rows, bands + 1).astype(int)
    new = np.zeros(x.shape[1:], dtype=np.float64) if sums is None else sums.copy()

    def band(k):
        with np.errstate(all="ignore"):  # inf - inf is NaN in scipy's C too, silently
            _band(k)

    def _band(k):
        sl = (slice(edges[k], edges[k + 1]),) if x.ndim > 1 else ()
        t = new[sl]
        if sums is None:  # the line's first window, summed in scipy's order
            for pos in range(size):
                t += plane(pos, sl)
            first = 0
            if r0 == p:  # the line has no halo here: its first voxel is kept
                np.divide(t, size, out=out[0][sl], casting="unsafe")
        else:
            first = p - r0 - 1
        diff = np.empty(t.shape, dtype=np.float64)
        for i in range(first + 1, q - r0):
            np.subtract(plane(i + size - 1, sl), plane(i - 1, sl), out=diff, dtype=np.float64)
            t += diff
            if r0 + i >= p:
                np.divide(t, size, out=out[r0 + i - p][sl], casting="unsafe")

    pmap(band, list(range(bands)), threads)
    return new


def _inplane(st: Running, zpass: np.ndarray, out: np.ndarray, threads: int) -> None:
    """scipy's in-plane passes on dask's in-plane blocks of ``zpass``."""
    bounds = [np.cumsum((0, *c)).tolist() for c in st.chunks[1:]]
    nblocks = [len(b) - 1 for b in bounds]

    def one(idx):
        src, dst = [slice(None)], [slice(None)]
        for k, q in enumerate(idx):
            s, e = bounds[k][q], bounds[k][q + 1]
            d = st.depth[k + 1]
            src.append(slice(s - d if q > 0 else s, e + d if q < nblocks[k] - 1 else e))
            dst.append(slice(s, e))
        out[tuple(dst)] = st.inplane((0, *idx), zpass[tuple(src)])

    pmap(one, list(np.ndindex(*nblocks)), threads)
