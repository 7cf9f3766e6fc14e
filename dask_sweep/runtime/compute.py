"""How each kind of stage turns the planes of its inputs into its own planes.

Every function here takes the planes its stage asked for (``[a - lo, b + hi)``
clipped to the volume) and returns the planes ``[a, b)`` of its output.  In a
dry run the inputs are :class:`~dask_sweep.runtime.ring.Shape` placeholders and
only the output's shape is computed.

Boundary padding is :func:`dask_sweep.runtime.boundary.pad_axis` (dask's own
``overlap.boundaries``); threads inside a step are
:func:`dask_sweep.runtime.parallel.pmap`.
"""

from __future__ import annotations

import numpy as np
from dask.array.core import concatenate3

from dask_sweep.plan.ir import Blocked, Kernel, Pointwise, Reduce, Running, Source, partial_shape
from dask_sweep.runtime.boundary import pad_axis
from dask_sweep.runtime.kernel import compute_kernel, kernel_temp_bytes
from dask_sweep.runtime.parallel import pmap
from dask_sweep.runtime.ring import Shape
from dask_sweep.runtime.running import temp_bytes as running_temps


def _bounds(chunks) -> list[int]:
    return np.cumsum((0, *chunks)).tolist()


def compute_source(st: Source, a: int, b: int, axis: int, externals: dict, dry: bool,
                   memos: dict | None = None, j: int = 0):
    rb = st.row_bounds
    r0 = rb.index(a)
    r1 = rb.index(b)
    if dry:
        s = list(st.shape)
        s[axis] = b - a
        return Shape(tuple(s), st.dtype)
    if getattr(st.reader, "free", False):  # any planes in one read (rows of one plane)
        return st.reader.read_planes(a, b)
    if getattr(st.reader, "reads_rows", False):  # the step's rows in one call
        return st.reader.read_rows(r0, r1)
    at_once = getattr(st.reader, "rows_at_once", 1)
    if at_once > 1 and r1 - r0 > 1:  # a drop-in's slabs, as many at once as it counted
        out, memos[j] = st.reader.read_rows_at_once(r0, r1, externals, memos.get(j), at_once)
        return out
    if r1 - r0 > 1 and getattr(st.reader, "stacks_rows", False):
        return st.reader.read_rows_stacked(r0, r1)  # read in place, not read and joined
    rows = []
    for r in range(r0, r1):
        if getattr(st.reader, "carries", False):
            # a reader carrying upstream values to later rows (see patterns.readers)
            row, memos[j] = st.reader.read_row(r, externals, memos.get(j))
        else:
            row = st.reader.read_row(r, externals)
        rows.append(row)
    return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=axis)


def compute_pointwise(st: Pointwise, a: int, b: int, axis: int, inputs: list, dry: bool):
    """``st.fn`` on the same planes ``[a, b)`` of every input (any slab will do)."""
    want = list(st.shape)
    want[axis] = b - a
    if dry:
        return Shape(tuple(want), np.dtype(st.dtype))
    if st.scalars and st.values is None:  # pragma: no cover - guarded by the runner
        raise RuntimeError(f"stage {st.label!r} runs before its scalars are known")
    out = np.asarray(st.fn(*inputs, *(st.values or ())))
    if out.shape != tuple(want):
        out = np.broadcast_to(out, want)  # a scalar result, or a broadcast literal
    if st.cast and out.dtype != st.dtype:
        out = out.astype(st.dtype)
    return np.ascontiguousarray(out)


def compute_reduce(st: Reduce, a: int, b: int, axis: int, inputs: list, dry: bool):
    """The partial vector of planes ``[a, b)``, laid out as ``b - a`` planes."""
    shape = partial_shape(len(st.shape), axis, b - a, st.k)
    if dry:
        return Shape(shape, np.dtype(st.dtype))
    (x,) = inputs
    out = np.full(shape, st.identity, dtype=st.dtype)
    if b > a:
        vec = np.asarray(st.partial(x, *(st.values or ())), dtype=st.dtype)
        idx = [0] * len(shape)
        idx[0 if axis != 0 else 1] = slice(None)
        out[tuple(idx)] = vec
    return out


def compute_blocked(st: Blocked, a: int, b: int, axis: int, inputs: list, threads: int, dry: bool,
                    prepadded=()):
    """Evaluate every dask block of rows ``[a, b)`` with its own halo and padding.

    In an in-plane tile (``st.origin``), the inputs hold the tile's planes and only the
    blocks of the tile's interior are evaluated, padded at the volume's faces only
    (elsewhere the tile's halo holds the real neighbours); the rest repeats their edges.
    """
    n = st.shape[axis]
    if dry:
        s = list(st.shape)
        s[axis] = b - a
        return Shape(tuple(s), st.dtype)
    ndim = len(st.shape)
    bnds = [_bounds(c) for c in st.chunks]
    origin = st.origin or (0,) * ndim
    # Pad each input once (sweep axis at the volume's faces only, in-plane at the faces
    # the stage's planes reach), and remember where real coordinate 0 sits in the slab.
    padded, offsets = [], []
    for i, x in enumerate(inputs):
        off = [0] * ndim
        for ax in range(ndim):
            lo, hi = st.depth[i][ax]
            bnd = st.boundary[i][ax]
            if ax == axis:
                pa = max(0, a - lo)
                if bnd != "none":
                    if i not in prepadded:  # periodic is padded by the executor
                        plo = lo - (a - pa)
                        phi = max(0, b + hi - n)
                        x = pad_axis(x, ax, plo, phi, bnd)
                    off[ax] = -(a - lo)
                else:
                    off[ax] = -pa
            elif bnd != "none" and (lo or hi):
                plo = lo if origin[ax] == 0 else 0
                phi = hi if origin[ax] + x.shape[ax] == bnds[ax][-1] else 0
                x = pad_axis(x, ax, plo, phi, bnd)
                off[ax] = plo - origin[ax]
            else:
                off[ax] = -origin[ax]
        padded.append(x)
        offsets.append(off)

    nblocks = [len(c) for c in st.chunks]
    r0 = bnds[axis].index(a)
    r1 = bnds[axis].index(b)
    grid = [range(nb) for nb in nblocks]
    grid[axis] = range(r0, r1)
    for ax, (s, e) in enumerate(st.interior):
        if ax != axis:
            grid[ax] = range(bnds[ax].index(s), bnds[ax].index(e))
    indices = list(np.ndindex(*[len(g) for g in grid]))
    indices = [tuple(grid[ax][q] for ax, q in enumerate(idx)) for idx in indices]

    def region(i: int, idx: tuple[int, ...]) -> np.ndarray:
        sl = []
        for ax in range(ndim):
            q = idx[ax]
            s, e = bnds[ax][q], bnds[ax][q + 1]
            lo, hi = st.depth[i][ax]
            if st.boundary[i][ax] != "none":
                s, e = s - lo, e + hi
            else:
                if q > 0:
                    s -= lo
                if q < nblocks[ax] - 1:
                    e += hi
            sl.append(slice(s + offsets[i][ax], e + offsets[i][ax]))
        return np.ascontiguousarray(padded[i][tuple(sl)])

    def one(idx):
        return st.block_fn(idx, *[region(i, idx) for i in range(len(padded))])

    results = pmap(one, indices, threads)
    for idx, res in zip(indices, results):
        want = tuple(st.chunks[ax][q] for ax, q in enumerate(idx))
        if getattr(res, "shape", None) != want:
            from dask_sweep.errors import SweepError

            raise SweepError(
                f"dask_sweep: {st.label!r} returned a block of shape "
                f"{getattr(res, 'shape', type(res).__name__)} for block {idx}, but the dask "
                f"array declares {want}. A sweep needs the declared chunks; pass the right "
                "`chunks=`/`drop_axis=` to map_overlap/map_blocks, or compute without the sweep."
            )
    shape = [len(g) for g in grid]
    nested = np.empty(shape, dtype=object)
    for pos, res in zip(np.ndindex(*shape), results):
        nested[pos] = res
    out = concatenate3(nested.tolist())
    if st.interior:  # a tile: its halo repeats the interior's edges (values no stage
        # reads; real-looking ones keep later elementwise stages free of spurious warnings)
        pads = [(0, 0) if ax == axis else (s - origin[ax], origin[ax] + st.shape[ax] - e)
                for ax, (s, e) in enumerate(st.interior)]
        if any(p != (0, 0) for p in pads):
            out = np.pad(out, pads, mode="edge")
    return out


def temp_bytes(st, out_bytes: int, in_bytes: int, threads: int) -> int:
    """Temporaries a stage holds while computing ``out_bytes`` from ``in_bytes``."""
    if isinstance(st, Kernel):
        return kernel_temp_bytes(st, out_bytes, in_bytes, threads)
    if isinstance(st, Running):
        return running_temps(st, out_bytes, threads)
    if isinstance(st, Blocked):
        # padded input copy + per-block region copies + output blocks + assembly
        return 3 * out_bytes
    if isinstance(st, Pointwise):
        return int(out_bytes * st.temps)
    if isinstance(st, Source):
        if getattr(st.reader, "free", False):
            temps = getattr(st.reader, "read_temps", None)
            return temps(out_bytes) if temps is not None else 0
        # a row assembled from dask's blocks: the blocks and the row, for a moment.  In an
        # in-plane tile the whole chunks met (``in_bytes``) are held twice over: zarr's
        # buffers as it decodes them into the tile's region (one call alone held 1.33x:
        # 12 MiB for nine 1 MiB chunks; a swept float32 uniform at 40 MiB planned with
        # 1.5x grew 40.1 MiB), or dask's blocks and their concatenation before the cut
        return out_bytes if in_bytes <= out_bytes else 2 * in_bytes
    if isinstance(st, Reduce):
        # partials work in blocks of 65536 voxels (bincount's intp copy, histogram's
        # float64 bin indices and masks): at most ~24 bytes a voxel of one block
        return 24 * min(in_bytes, 1 << 16)
    return 0  # Identity: the input itself


__all__ = ["compute_blocked", "compute_kernel", "compute_pointwise", "compute_reduce",
           "compute_source", "pad_axis", "pmap", "temp_bytes"]
