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

import functools

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


@functools.lru_cache(maxsize=64)
def extension(length: int, size: int, mode: str) -> np.ndarray:
    """Index into its line of each extended position (``-1``: the constant); read-only
    (kept for the next step's lines of the same length)."""
    s1 = size // 2
    s2 = size - s1 - 1
    idx = np.arange(length)
    pad = SCIPY_PAD[mode]
    if pad == "constant":
        ext = np.pad(idx, (s1, s2), mode="constant", constant_values=-1)
    else:
        ext = np.pad(idx, (s1, s2), mode=pad)
    ext.setflags(write=False)
    return ext


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


#: Voxels of a step (planes x plane) from which its sums are cut in bands of rows, one
#: per thread: below it, handing work to a thread costs more than it saves.
BAND_VOXELS = 1 << 17


def _plane_pieces(st: Running, planes: int, threads: int) -> tuple[int, int]:
    """``(blocks, pieces)``: dask's in-plane blocks, and the pieces of ``planes``
    planes each takes, so that every thread has a block's piece (the in-plane passes
    run line by line within a plane: any planes are the same bits)."""
    blocks = 1
    for ax in range(1, len(st.shape)):
        blocks *= len(st.chunks[ax])
    return blocks, max(1, min(planes, -(-threads // blocks)))


def temp_bytes(st: Running, out_bytes: int, threads: int) -> int:
    """Temporaries of one step: the sweep-axis pass's planes (the in-plane passes read
    them), the new sums and a difference (double planes, cut among the threads in
    bands of rows), and per thread an in-plane block's region of its piece of the
    planes and its two pass results."""
    item = np.dtype(st.dtype).itemsize
    t = out_bytes // max(1, _plane_voxels(st) * item)
    widest = 1
    for ax in range(1, len(st.shape)):
        widest *= max(st.chunks[ax]) + 2 * st.depth[ax]
    blocks, pieces = _plane_pieces(st, t, threads)
    inplane = (3 * min(threads, blocks * pieces) * -(-t // pieces) * widest * item
               if st.inplane.passes else 0)
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
    lines = []  # (r0, r1, p, q, sums after plane p - 1 or None) of each block met
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
        lines.append((r0, r1, p, q, sums))
    if lines:
        carry = (lines[-1][3], _lines(st, x, x0, lines, a, zpass, threads))
    if carry is not None and carry[0] >= st.shape[0]:
        carry = None  # the sweep's end: nothing to carry
    if not st.inplane.passes:
        return zpass, carry
    out = np.empty_like(zpass)
    _inplane(st, zpass, out, threads)
    return out, carry


def _lines(st: Running, x, x0, lines, a, zpass, threads) -> np.ndarray:
    """The sweep-axis pass of the step's planes along each of its blocks' ``lines``,
    into ``zpass`` (from plane ``a``); returns the sums after the last line's last
    plane.  Columns are independent, whichever block: with enough voxels, the
    threads take bands of rows through every line of the step."""
    size = st.size
    cval = float(st.cval)
    rows = x.shape[1] if x.ndim > 1 else 1
    planes = sum(q - p for _, _, p, q, _ in lines)
    bands = min(threads, rows) if threads > 1 and x[0].size * planes >= BAND_VOXELS else 1
    edges = np.linspace(0, rows, bands + 1).astype(int)
    last = np.empty(x.shape[1:], dtype=np.float64)  # the carry: the last line's sums

    def line(r0, r1, p, q, sums, sl, t, diff):
        """Planes ``[p, q)`` of the line ``[r0, r1)`` in the rows ``sl``, summing into
        ``t`` (the sums after plane ``p - 1``, or zeros when ``p`` starts the block)."""
        ext = extension(r1 - r0, size, st.mode)
        out = zpass[p - a:q - a]

        def plane(pos):  # the extended line at ``pos``: a plane of x, or the constant
            k = int(ext[pos])
            if k < 0:
                return cval
            j = r0 + k - x0
            if not 0 <= j < x.shape[0]:
                raise RuntimeError(  # pragma: no cover - the window is the stage's reach
                    f"{st.label!r}: plane {r0 + k} is outside the step's window")
            return x[j][sl]

        if sums is None:  # the line's first window, summed in scipy's order
            for pos in range(size):
                t += plane(pos)
            first = 0
            if r0 == p:  # the line has no halo here: its first voxel is kept
                np.divide(t, size, out=out[0][sl], casting="unsafe")
        else:
            first = p - r0 - 1
        for i in range(first + 1, q - r0):
            np.subtract(plane(i + size - 1), plane(i - 1), out=diff, dtype=np.float64)
            t += diff
            if r0 + i >= p:
                np.divide(t, size, out=out[r0 + i - p][sl], casting="unsafe")

    def band(k):
        sl = (slice(edges[k], edges[k + 1]),) if x.ndim > 1 else ()
        with np.errstate(all="ignore"):  # inf - inf is NaN in scipy's C too, silently
            # one line after another in the band's rows of the carry: the last leaves it
            t = last[sl] if sl else last
            diff = np.empty(t.shape, dtype=np.float64)
            for r0, r1, p, q, sums in lines:
                t[...] = 0 if sums is None else sums[sl]
                line(r0, r1, p, q, sums, sl, t, diff)

    pmap(band, list(range(bands)), threads)
    return last


def _inplane(st: Running, zpass: np.ndarray, out: np.ndarray, threads: int) -> None:
    """scipy's in-plane passes on dask's in-plane blocks of ``zpass``, each block cut
    into pieces of planes where there are fewer blocks than threads."""
    bounds = [np.cumsum((0, *c)).tolist() for c in st.chunks[1:]]
    nblocks = [len(b) - 1 for b in bounds]
    _, pieces = _plane_pieces(st, zpass.shape[0], threads)
    cuts = np.linspace(0, zpass.shape[0], pieces + 1).astype(int).tolist()

    def one(job):
        (z0, z1), idx = job
        src, dst = [slice(z0, z1)], [slice(z0, z1)]
        for k, q in enumerate(idx):
            s, e = bounds[k][q], bounds[k][q + 1]
            d = st.depth[k + 1]
            src.append(slice(s - d if q > 0 else s, e + d if q < nblocks[k] - 1 else e))
            dst.append(slice(s, e))
        out[tuple(dst)] = st.inplane((0, *idx), zpass[tuple(src)])

    jobs = [(c, idx) for idx in np.ndindex(*nblocks) for c in zip(cuts, cuts[1:])]
    pmap(one, jobs, threads)
