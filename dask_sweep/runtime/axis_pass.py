"""The sweep-axis pass of a separable gaussian, computed for the kept planes only.

A step keeps planes ``[a, b)`` but scipy's 1-D pass along the sweep axis filters
every plane of the halo-padded slab, ``(b - a + 2d) / (b - a)`` times the work
(3× for 8-plane steps and an 8-deep halo), and gathers each strided line into a
buffer first.  This pass computes only the kept planes, plane-wise on blocks of
voxels that stay in cache, with scipy's own arithmetic so the bits are the same:

* the weights are scipy's (``_gaussian_kernel1d``, reversed as ``correlate1d``
  does), and a symmetric kernel uses its left half for both sides, as
  ``NI_Correlate1D`` does after its symmetry test;
* every voxel is accumulated in double precision in scipy's order: centre
  first, then the pairs from the outermost in, ``acc += (x[-j] + x[+j]) * w[-j]``
  (numpy converts both inputs to double before adding, as the line buffer does);
* the result is cast to the input's dtype the way C casts (truncation for
  integers, rounding to nearest for float32).

Order-0 gaussians take this path.  Where a kept plane's window reaches past a
face of the volume, the planes beyond are read as scipy extends its lines
(reflect, mirror, nearest, or a constant the dtype holds exactly); other modes
run scipy's pass there.  ``tests/test_kernels.py`` compares it with scipy bit for
bit over dtypes, sigmas, radii, shapes, modes and both faces.  numpy's loops
release the GIL, so on large steps the voxel blocks are shared among threads.
(A numba version was 4× faster still, but importing numba costs ~100 MiB of
resident memory mid-run, more than a small budget.)
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.ndimage as ndi

from dask_sweep.runtime.morphology import BoolRun
from dask_sweep.runtime.parallel import pmap

_DTYPES = tuple(np.dtype(c) for c in "bBhHiIlLqQfd")
# Voxels per block, for one thread: its double accumulators stay in L2 (256 KiB).
_BLOCK = 1 << 14
# Shared by threads, blocks are longer: a pass makes a few numpy calls per block and
# plane, each holding the GIL, and with 16 K-voxel blocks two threads were slower than
# one even on 2048^2 planes (gaussian sigma 2: 247 against 179 ms for 4 planes; with
# 64 K-voxel blocks 104 ms).  A second thread pays from about 1 M kept voxels (measured
# on 2 cores: 512^2 x 8 planes 16.4 against 18.9 ms; 512^2 x 2 planes no gain).
_BLOCK_SHARED = 1 << 16
_SHARE_FROM = 1 << 20


def _blocks(m: int, t: int, threads: int) -> tuple[int, int]:
    """``(voxels per block, threads used)`` for ``t`` kept planes of ``m`` voxels."""
    if threads > 1 and t * m >= _SHARE_FROM:
        block = min(_BLOCK_SHARED, -(-m // threads))
        return block, min(threads, -(-m // block))
    return min(_BLOCK, m), 1


def gaussian_weights(fn) -> np.ndarray | None:
    """Left half and centre of the symmetric weights ``fn`` (a gaussian_filter1d
    partial) correlates with, or ``None`` when this pass cannot stand in for it."""
    if not isinstance(fn, functools.partial) or fn.func is not ndi.gaussian_filter1d:
        return None
    kw = fn.keywords
    if kw.get("order", 0) != 0 or fn.args:
        return None
    sd = float(kw["sigma"])
    lw = int(kw.get("truncate", 4.0) * sd + 0.5)
    if kw.get("radius") is not None:
        lw = int(kw["radius"])
    return _half_weights(sd, lw)


@functools.lru_cache(maxsize=64)
def _half_weights(sd: float, lw: int) -> np.ndarray | None:
    # planning asks once per dry-run step: computed once per (sigma, radius)
    try:  # scipy's own weights, so the bits are the same
        from scipy.ndimage._filters import _gaussian_kernel1d
    except ImportError:  # pragma: no cover - a scipy that moved it: scipy's pass runs
        return None

    w = np.asarray(_gaussian_kernel1d(sd, 0, lw)[::-1], dtype=np.float64)
    size1 = len(w) // 2
    # scipy's symmetry test (NI_Correlate1D): within DBL_EPSILON, else another loop
    if len(w) % 2 == 0 or any(
        abs(w[size1 + i] - w[size1 - i]) > np.finfo(np.float64).eps for i in range(1, size1 + 1)
    ):
        return None
    half = np.ascontiguousarray(w[: size1 + 1])
    half.flags.writeable = False  # shared by every caller (cached)
    return half


def scratch_bytes(st, threads: int, t: int) -> int:
    """The double accumulators a kernel stage's kept-planes pass allocates for ``t`` planes."""
    passes = getattr(st, "passes", None)
    if not passes:
        return 0
    if passes[0][0] != st.sweep_axis:
        return 0
    first = passes[0][1]
    if getattr(first, "func", None) is ndi.uniform_filter1d:
        plane = int(np.prod([n for ax, n in enumerate(st.shape) if ax != st.sweep_axis]))
        block, used = _blocks(plane, t, threads)
        return 8 * block * used  # the sum's double accumulators
    if gaussian_weights(first) is None:
        return 0
    plane = int(np.prod([n + 2 * d for ax, (n, d) in enumerate(zip(st.shape, st.depth))
                         if ax != st.sweep_axis], dtype=np.int64))
    block, used = _blocks(plane, t, threads)
    # two double accumulators, an integer pair's sum, and numpy's casting buffers
    return (24 * block + 16 * min(np.getbufsize(), block)) * used


def kept_planes(fn, x: np.ndarray, axis: int, c0: int, t: int, threads: int):
    """Planes ``[c0, c0 + t)`` of ``fn(x)`` along ``axis``, or ``None`` if not handled.

    Handled, each bit for bit: an order-0 gaussian (scipy's weights and order of
    operations, see the module docstring), ``uniform_filter1d`` on integers (an
    exact sum of the window divided by the size, as scipy's running sum gives),
    ``minimum_filter1d`` / ``maximum_filter1d`` on integers and booleans (order
    statistics select values) and :class:`BoolRun`.  ``fn``'s ``output=`` (a
    dtype) is honoured.
    """
    if isinstance(fn, BoolRun):
        return fn.kept(x, axis, c0, t)  # exact at the volume's faces too
    reach = _reach(fn)
    if reach is None or t <= 0:
        return None
    faces = _face_rows(fn, x.shape[axis], c0 - reach[0], c0 + t + reach[1], x.dtype)
    if faces is False:
        return None
    if isinstance(fn, functools.partial) and fn.func in WINDOW_OPS:
        return _window_kept(fn, x, axis, c0, t, threads, faces)
    if axis != 0 or x.ndim < 2 or x.dtype not in _DTYPES or not x.flags.c_contiguous:
        return None
    fw = gaussian_weights(fn)
    if fw is None:
        return None
    odt = fn.keywords.get("output")
    if isinstance(odt, np.ndarray):
        return None
    odt = x.dtype if odt is None else np.dtype(odt)
    if odt not in _DTYPES:
        return None
    xf = x.reshape(x.shape[0], -1)
    line = _liner(xf, faces, c0 - len(fw) + 1, fn.keywords.get("cval", 0.0))
    out = np.empty((t, *x.shape[1:]), dtype=odt)
    of = out.reshape(t, -1)
    m = xf.shape[1]
    block, used = _blocks(m, t, threads)
    blocks = [(m0, min(m, m0 + block)) for m0 in range(0, m, block)]
    if used <= 1:
        _planes(fw, line, of, c0, blocks, _PAIR.get(x.dtype))
        return out
    share = [blocks[k::used] for k in range(used)]
    pmap(lambda k: _planes(fw, line, of, c0, share[k], _PAIR.get(x.dtype)),
         list(range(used)), used)
    return out


# scipy's extensions of a line past its ends (ni_support's NI_ExtendLine)
_FACE_MODES = ("reflect", "mirror", "nearest", "constant", "grid-constant")


def _reach(fn) -> tuple[int, int] | None:
    """Planes before and after a voxel that ``fn``'s window reads, if this pass handles it."""
    if isinstance(fn, functools.partial) and fn.func in WINDOW_OPS:
        size = fn.keywords.get("size")
        if size is None or fn.keywords.get("origin", 0) != 0:
            return None
        return int(size) // 2, int(size) - int(size) // 2 - 1
    fw = gaussian_weights(fn)
    return None if fw is None else (len(fw) - 1, len(fw) - 1)


def extends_faces(fn, dtype) -> bool:
    """Whether :func:`kept_planes` reads past a face of the volume as scipy does, for ``fn``."""
    if _reach(fn) is None:
        return False
    mode = fn.keywords.get("mode", "reflect")
    if mode not in _FACE_MODES:
        return False
    if "constant" not in mode:
        return True
    cval = fn.keywords.get("cval", 0.0)
    # scipy extends the line in double: the cval is the same only if the dtype holds it
    with np.errstate(all="ignore"):
        return bool(np.asarray(cval).astype(dtype).astype(np.float64) == float(cval))


def _face_rows(fn, n: int, i0: int, i1: int, dtype):
    """Planes ``i0 .. i1 - 1`` of a slab of ``n`` read by the kept windows, some past its
    ends: the plane each one is under scipy's extension (``-1``: the cval).

    ``None`` when all are inside the slab, ``False`` when this pass does not extend
    there (a mode it does not follow, or reflected more than once: a thin volume).
    Past an end of the slab is a face of the volume: the executor pads elsewhere.
    """
    if i0 >= 0 and i1 <= n:
        return None
    if not extends_faces(fn, dtype):
        return False
    mode = fn.keywords.get("mode", "reflect")
    rows = []
    for i in range(i0, i1):
        if 0 <= i < n:
            j = i
        elif "constant" in mode:
            j = -1
        elif mode == "nearest":
            j = min(max(i, 0), n - 1)
        elif mode == "reflect":  # d c b a | a b c d | d c b a
            j = -i - 1 if i < 0 else 2 * n - i - 1
        else:  # mirror: d c b | a b c d | c b a
            j = -i if i < 0 else 2 * n - i - 2
        if j != -1 and not 0 <= j < n:
            return False
        rows.append(j)
    return rows


def _liner(xf: np.ndarray, faces, base: int, cval):
    """``line(i, m0, m1)``: voxels ``m0:m1`` of plane ``i`` of the extended slab."""
    if faces is None:
        return lambda i, m0, m1: xf[i, m0:m1]
    const = np.asarray(cval).astype(xf.dtype)  # 0-d: broadcast where the cval is read

    def line(i, m0, m1):
        j = faces[i - base]
        return const if j < 0 else xf[j, m0:m1]

    return line


# the integer a sum of two voxels is exact in (8-byte integers and floats: double)
_PAIR = {np.dtype(a): np.dtype(b) for a, b in
         [("u1", "u2"), ("i1", "i2"), ("u2", "u4"), ("i2", "i4"), ("u4", "u8"), ("i4", "i8")]}


def _planes(fw: np.ndarray, line, of: np.ndarray, c0: int, blocks, pair_dtype=None) -> None:
    """Kept planes ``of[k] = pass(xf)[c0 + k]`` on voxel ranges ``blocks`` (see module),
    the slab's planes read through ``line`` (:func:`_liner`)."""
    size1 = len(fw) - 1
    w0 = fw[size1]
    n = max((m1 - m0 for m0, m1 in blocks), default=0)
    acc = np.empty(n, np.float64)
    tmp = np.empty(n, np.float64)
    # Integers: a pair's sum is exact in a wider integer and exact again in double, so it
    # equals scipy's sum of the two doubles; the add alone is 1.6x faster than adding them
    # as doubles, a whole gaussian pass 8 % (measured on 3 x 1024^2 uint8 planes).
    pair = np.empty(n, pair_dtype) if pair_dtype is not None else None
    for m0, m1 in blocks:
        a, tm = acc[: m1 - m0], tmp[: m1 - m0]
        for k in range(of.shape[0]):
            p = c0 + k
            np.multiply(line(p, m0, m1), w0, out=a, dtype=np.float64)
            for jj in range(-size1, 0):
                if pair is None:
                    np.add(line(p + jj, m0, m1), line(p - jj, m0, m1), out=tm,
                           dtype=np.float64)
                    np.multiply(tm, fw[size1 + jj], out=tm)
                else:
                    ps = pair[: m1 - m0]
                    np.add(line(p + jj, m0, m1), line(p - jj, m0, m1), out=ps,
                           dtype=pair_dtype)
                    np.multiply(ps, fw[size1 + jj], out=tm, dtype=np.float64)
                np.add(a, tm, out=a)
            of[k, m0:m1] = a  # a C cast: truncation to integers, rounding to float32


# ---------------------------------------------------------------- windows that select or sum

WINDOW_OPS = {ndi.uniform_filter1d: "sum", ndi.minimum_filter1d: "min",
               ndi.maximum_filter1d: "max"}


def _window_kept(fn, x: np.ndarray, axis: int, c0: int, t: int, threads: int, faces=None):
    """Kept planes of a uniform / minimum / maximum 1-D pass along the sweep axis.

    scipy's window for ``size`` starts ``size // 2`` before the voxel (origin 0).
    Integer sums are exact in double (so the order of the additions, which
    differs from scipy's running sum, cannot change them), then divided by the
    size and cast as C does; minima and maxima select.  Floats keep scipy's own
    pass (sums round, and NaNs compare differently).
    """
    kw = fn.keywords
    op = WINDOW_OPS[fn.func]
    if fn.args or kw.get("origin", 0) != 0 or kw.get("axis") not in (axis, axis - x.ndim):
        return None
    kind = x.dtype.kind
    if kind not in "biu" or (op == "sum" and kind == "b"):
        return None
    odt = kw.get("output")
    if isinstance(odt, np.ndarray):
        return None
    odt = x.dtype if odt is None else np.dtype(odt)
    size = int(kw["size"])
    lo = size // 2
    hi = size - lo - 1
    if op == "sum" and (size < 2 or np.iinfo(x.dtype).max * size >= 2**53):
        return None  # the double sum would round (or there is nothing to sum)

    def plane(p):
        return x[(slice(None),) * axis + (slice(p, p + t),)]

    if op == "sum":
        if axis != 0 or not x.flags.c_contiguous:
            return None
        xf = x.reshape(x.shape[0], -1)
        line = _liner(xf, faces, c0 - lo, kw.get("cval", 0.0))
        out = np.empty((t, *x.shape[1:]), dtype=odt)
        of = out.reshape(t, -1)
        m = xf.shape[1]
        block, used = _blocks(m, t, threads)
        blocks = [(m0, min(m, m0 + block)) for m0 in range(0, m, block)]
        share = [blocks[k::used] for k in range(used)]

        def work(k):
            # double accumulators a block of voxels long: bounded, and they stay in cache
            acc = np.empty(block, np.float64)
            for m0, m1 in share[k]:
                a = acc[: m1 - m0]
                for q in range(t):
                    p = c0 + q
                    np.add(line(p - lo, m0, m1), line(p - lo + 1, m0, m1), out=a,
                           dtype=np.float64)
                    for j in range(2 - lo, hi + 1):
                        np.add(a, line(p + j, m0, m1), out=a)
                    np.divide(a, float(size), out=a)
                    of[q, m0:m1] = a  # a C cast: truncation toward zero
        if used > 1:
            pmap(work, list(range(used)), used)
        else:
            work(0)
        return out
    red = np.minimum if op == "min" else np.maximum
    if faces is not None:  # at a face: plane by plane, the extended planes read as scipy does
        const = np.asarray(kw.get("cval", 0.0)).astype(x.dtype)

        def at(i):
            j = faces[i - (c0 - lo)]
            return const if j < 0 else x[(slice(None),) * axis + (j,)]

        shape = list(x.shape)
        shape[axis] = t
        out = np.empty(shape, x.dtype)
        for q in range(t):
            o = out[(slice(None),) * axis + (q,)]
            o[...] = at(c0 + q - lo)
            for j in range(1 - lo, hi + 1):
                red(o, at(c0 + q + j), out=o)
        return out if odt == out.dtype else out.astype(odt)
    out = plane(c0 - lo).copy()
    for j in range(1 - lo, hi + 1):
        red(out, plane(c0 + j), out=out)
    return out if odt == out.dtype else out.astype(odt)
