"""A median filter that computes only the planes (and rows) a step keeps.

scipy's ``median_filter`` gathers the footprint's values of every voxel and
selects one (0.076 s a 256² plane for a 5³ box here); called on a step's window
it also filters the halo's planes, which the step then throws away: twice the
work at 4 planes a step with a 5³ box.  :class:`MedianPlanes` computes the kept
voxels only: on 8- and 16-bit integers with a running histogram along the last
axis (Huang's algorithm: a box moved by one voxel loses one column of values and
gains another, and the median moves from where it was, 6-12x faster than
scipy's selection), on floats and 32-bit integers by the same selection as
scipy's.  The values selected are scipy's, so the result is scipy's bit for bit
(``tests/test_kernels.py``); NaN or -0.0 beside 0.0 in a window (where which
equal value a selection returns is its own), 64-bit integers, a footprint that
is not a box, an origin, wrap and padding deeper than the array call scipy.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage as ndi

from dask_sweep.runtime.boundary import SCIPY_PAD
from dask_sweep.runtime.jit import kernel


@kernel
def _median_rows(p, out, hz, hy, hx, rank, offset, fine, coarse):  # pragma: no cover - compiled
    """``out[z, y, x]``: the ``rank``-th smallest of ``p``'s box at ``(z, y, x)``.

    ``p`` is the padded window (``2 h`` longer than ``out`` along each axis);
    values are histogram bins ``v + offset`` (``fine``: one per value, ``coarse``:
    one per 256), and ``m`` tracks the answer with ``below``, the count of values
    in the box under ``m``.
    """
    nz, ny, nx = out.shape
    for z in range(nz):
        for y in range(ny):
            for dz in range(2 * hz + 1):
                for dy in range(2 * hy + 1):
                    for dx in range(2 * hx + 1):
                        v = np.int64(p[z + dz, y + dy, dx]) + offset
                        fine[v] += 1
                        coarse[v >> 8] += 1
            m = 0
            below = 0
            for x in range(nx):
                if x:
                    for dz in range(2 * hz + 1):
                        for dy in range(2 * hy + 1):
                            v = np.int64(p[z + dz, y + dy, x - 1]) + offset
                            fine[v] -= 1
                            coarse[v >> 8] -= 1
                            if v < m:
                                below -= 1
                            w = np.int64(p[z + dz, y + dy, x + 2 * hx]) + offset
                            fine[w] += 1
                            coarse[w >> 8] += 1
                            if w < m:
                                below += 1
                # down while too many values lie under m (whole blocks of 256 at a time)
                while below > rank:
                    if (m & 255) == 0 and below - coarse[(m >> 8) - 1] > rank:
                        below -= coarse[(m >> 8) - 1]
                        m -= 256
                    else:
                        m -= 1
                        below -= fine[m]
                # up while m and everything under it are still no more than rank values
                while below + fine[m] <= rank:
                    if (m & 255) == 0 and below + coarse[m >> 8] <= rank:
                        below += coarse[m >> 8]
                        m += 256
                    else:
                        below += fine[m]
                        m += 1
                out[z, y, x] = m - offset
            # the last box taken out again: the histograms are empty for the next row
            for dz in range(2 * hz + 1):
                for dy in range(2 * hy + 1):
                    for dx in range(nx - 1, nx + 2 * hx):
                        v = np.int64(p[z + dz, y + dy, dx]) + offset
                        fine[v] -= 1
                        coarse[v >> 8] -= 1


@kernel
def _select_rows(p, out, hz, hy, hx, rank, buf):  # pragma: no cover - compiled
    """``out[z, y, x]``: the ``rank``-th smallest of ``p``'s box at ``(z, y, x)``, by
    Wirth's selection on the box's values (``buf``), as scipy selects (values with no
    NaN: a total order, so any exact selection gives scipy's value)."""
    nz, ny, nx = out.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = 0
                for dz in range(2 * hz + 1):
                    for dy in range(2 * hy + 1):
                        for dx in range(2 * hx + 1):
                            buf[k] = p[z + dz, y + dy, x + dx]
                            k += 1
                lo = 0
                hi = k - 1
                while lo < hi:
                    pivot = buf[rank]
                    i = lo
                    j = hi
                    while True:
                        while buf[i] < pivot:
                            i += 1
                        while pivot < buf[j]:
                            j -= 1
                        if i <= j:
                            t = buf[i]
                            buf[i] = buf[j]
                            buf[j] = t
                            i += 1
                            j -= 1
                        if i > j:
                            break
                    if j < rank:
                        lo = i
                    if rank < i:
                        hi = j
                out[z, y, x] = buf[rank]


def _box(kw: dict, ndim: int) -> tuple[int, ...] | None:
    """The box's sides of a median call, or ``None`` (not a box, or an origin)."""
    if np.any(np.asarray(kw.get("origin", 0)) != 0) or kw.get("axes") is not None:
        return None
    fp = kw.get("footprint")
    if fp is not None:
        fp = np.asarray(fp)
        if fp.ndim != ndim or not fp.all():
            return None
        sides = fp.shape
    elif kw.get("size") is not None:
        size = kw["size"]
        sides = tuple(size) if np.ndim(size) else (int(size),) * ndim
        if len(sides) != ndim:
            return None
    else:
        return None
    if any(int(s) % 2 == 0 or int(s) < 1 for s in sides) or int(np.prod(sides)) < 3:
        return None  # an even side shifts scipy's window; size 1 is scipy's min/max
    return tuple(int(s) for s in sides)


_WARM: set = set()


def _ambiguous(p: np.ndarray) -> bool:
    """Whether ``p`` holds a NaN, or -0.0 beside 0.0, with no temporaries the size of
    ``p`` (boolean masks of a float32 piece were a quarter of it, over the budget's model:
    129.3 MiB measured at a 128 MiB budget, 512³ float32 median r1)."""
    if np.isnan(p.min()):  # the minimum of floats is NaN when any is
        return True
    neg = pos = False
    for plane in p.reshape(p.shape[0], -1):  # a plane's mask at a time
        zero = plane == 0
        if zero.any():
            sign = np.signbit(plane[zero])
            neg, pos = neg or bool(sign.any()), pos or not bool(sign.all())
            if neg and pos:
                return True
    return False


class MedianPlanes:
    """``scipy.ndimage.median_filter(x, **kwargs)``, and its kept planes alone.

    A :class:`~dask_sweep.plan.ir.Kernel`'s ``fn``: ``__call__`` is scipy's call;
    ``planes(x, axis, c0, t)`` equals ``self(x)``'s planes ``[c0, c0 + t)`` along
    ``axis`` (the kernel's ``cropped`` protocol) and computes no others.
    """

    cropped = True
    cropped_rows = True

    #: a piece copies (and pads) its input rows once
    row_copies = 1

    def __init__(self, kwargs: dict, sides: tuple[int, ...], dtype: Any = np.uint8) -> None:
        self.kwargs = dict(kwargs)
        self.sides = sides
        # a box's count fits 16 bits but for boxes of 65 535 voxels or more
        self._count = np.uint16 if int(np.prod(sides)) < 65535 else np.int32
        dt = np.dtype(dtype)
        self.by_histogram = dt.kind in "iu" and dt.itemsize <= 2
        if self.by_histogram:
            info = np.iinfo(dt)
            bins = int(info.max) - int(info.min) + 1
            #: the histograms a piece holds (128 KiB for 16-bit values)
            self.fixed = (bins + 256) * np.dtype(self._count).itemsize + (bins // 256 + 2) * 4
        else:  # a box's values
            self.fixed = int(np.prod(sides)) * dt.itemsize
        self.mode = kwargs.get("mode", "reflect")
        self.cval = kwargs.get("cval", 0.0)

    @staticmethod
    def handles(kwargs: dict, ndim: int, dtype: Any) -> bool:
        """Whether this class computes a median call (without loading its kernel)."""
        dt = np.dtype(dtype)
        # 8/16-bit integers by histograms; floats and 32-bit integers by selection (scipy
        # compares in double: exact for these, not for 64-bit integers)
        if dt.kind not in "iuf" or dt.itemsize > (8 if dt.kind == "f" else 4) \
                or ndim not in (2, 3):
            return False
        if kwargs.get("output") is not None or set(kwargs) - {
                "size", "footprint", "mode", "cval", "origin", "axes"}:
            return False
        mode = kwargs.get("mode", "reflect")
        if not isinstance(mode, str) or mode not in SCIPY_PAD:
            return False
        cval = kwargs.get("cval", 0.0)
        if SCIPY_PAD[mode] == "constant" and dt.kind != "f" \
                and float(np.asarray(cval).astype(dt)) != float(cval):
            return False  # scipy selects cval as a float, then casts it (rounding a float
            # cval first keeps the order, and the value selected is rounded anyway)
        return _box(kwargs, ndim) is not None

    @classmethod
    def of(cls, kwargs: dict, ndim: int, dtype: Any) -> MedianPlanes | None:
        """For a median call this class computes (its kernel loaded), else ``None``."""
        if not cls.handles(kwargs, ndim, dtype):
            return None
        dt = np.dtype(dtype)
        out = cls(kwargs, _box(kwargs, ndim), dt)
        out.warm(dt)
        return out

    def warm(self, dtype: Any) -> None:
        """Compile (or load from numba's cache) the kernel for ``dtype`` now, once per
        process: it is found while planning, so numba's compiler and LLVM (tens of MiB of
        resident memory) come before the run, not inside its budget."""
        key = (np.dtype(dtype).str, len(self.sides), int(np.prod(self.sides)) < 65535)
        if key not in _WARM:
            self.planes(np.zeros(self.sides, dtype), 0, 0, 1)
            _WARM.add(key)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ndi.median_filter(x, **self.kwargs)

    def planes(self, x: np.ndarray, axis: int, c0: int, t: int,
               rows: tuple[int, int, int] | None = None) -> np.ndarray:
        """Planes ``[c0, c0 + t)`` along ``axis`` of ``self(x)``; with ``rows=(ax, r0,
        n)`` only rows ``[r0, r0 + n)`` along in-plane axis ``ax`` (a piece's kept rows).
        Only the input the kept voxels' boxes reach is copied (and padded as scipy
        extends it at the faces of ``x``)."""
        h = [s // 2 for s in self.sides]
        lo, n = [0] * x.ndim, list(x.shape)  # the output's box in x: start, length
        lo[axis], n[axis] = c0, t
        if rows is not None:
            lo[rows[0]], n[rows[0]] = rows[1], rows[2]
        keep = tuple(slice(a, a + k) for a, k in zip(lo, n))
        if not all(n):
            return np.empty(n, dtype=x.dtype)
        sl, pads = [], []
        for ax in range(x.ndim):
            a, b = max(0, lo[ax] - h[ax]), min(x.shape[ax], lo[ax] + n[ax] + h[ax])
            sl.append(slice(a, b))
            pads.append((h[ax] - (lo[ax] - a), h[ax] - (b - lo[ax] - n[ax])))
        sub = x[tuple(sl)]
        # numpy pads as scipy extends only up to the length of an axis (once reflected)
        deep = any(max(p) > (m - (self.mode == "mirror")) for p, m in zip(pads, sub.shape))
        if axis != 0 or deep:
            return np.ascontiguousarray(self(x)[keep])
        mode = SCIPY_PAD[self.mode]
        kw = {"constant_values": self.cval} if mode == "constant" else {}
        p = np.pad(sub, pads, mode=mode, **kw)
        out = np.empty(n, dtype=x.dtype)
        if x.ndim == 2:
            p3, o3, (hz, hx), hy = p[:, None, :], out[:, None, :], h, 0
        else:
            p3, o3, (hz, hy, hx) = p, out, h
        rank = int(np.prod(self.sides)) // 2
        if not self.by_histogram:
            if x.dtype.kind == "f" and _ambiguous(p):
                # NaN, or -0.0 beside 0.0: which one scipy's selection returns is its own
                return np.ascontiguousarray(self(x)[keep])
            buf = np.empty(int(np.prod(self.sides)), x.dtype)
            _select_rows(p3, o3, hz, hy, hx, rank, buf)
            return out
        info = np.iinfo(x.dtype)
        offset = -int(info.min)
        bins = int(info.max) + offset + 1
        fine = np.zeros(bins + 256, self._count)  # + a block: m may sit just past the top
        coarse = np.zeros(bins // 256 + 2, np.int32)
        _median_rows(p3, o3, hz, hy, hx, rank, offset, fine, coarse)
        return out
