"""Binary erosion and dilation as boolean runs and shifts: scipy's bits, much faster.

scipy's ``binary_erosion`` visits the structure's offsets for every voxel; for
a boolean volume the same result is an AND (dilation: an OR) of shifted copies
of the volume, which numpy does a plane at a time at memory speed:

* a **box** structure is the product of its sides, so the AND over the box is
  an AND over each axis in turn (:class:`BoolRun`, one separable pass per
  axis, the sweep-axis pass computed for the kept planes only);
* any other structure is an AND over its offsets (:class:`BoolShifts`): the kept
  planes (and rows) of a step only, in a numba loop that stops at a voxel's first
  deciding neighbour (nearest first), as scipy's own loop does; a structure whose rows
  are few runs along the last axis (a ball) looks each run up at once in a map of every
  row's next deciding voxel.

Outside the array every neighbour is scipy's ``border_value``.  Dilation uses
the reflected structure, as scipy does.  ``tests/test_morphology.py`` checks
both against scipy over structures, borders, shapes and slabs.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from dask_sweep.runtime.jit import kernel


@kernel
def _shift_planes(x, flat, out, c0, y0, offs, lin, is_or, border):  # pragma: no cover
    """``out[q, j, i]``: AND (``is_or``: OR) of ``x[c0 + q + o0, y0 + j + o1, i + o2]``
    over the offsets ``offs`` (nearest first), ``border`` outside ``x``; a voxel stops at
    its first deciding neighbour.  Voxels whose every neighbour lies inside read ``flat``
    (``x`` raveled, when it is C-contiguous; else empty) at the linear offsets ``lin``,
    with no bounds to check."""
    t, ny, nx = out.shape
    nz, my, mx = x.shape
    linear = flat.size == x.size
    k = offs.shape[0]
    lo = np.zeros(3, np.int64)
    hi = np.zeros(3, np.int64)
    for i in range(k):
        for a in range(3):
            lo[a] = min(lo[a], offs[i, a])
            hi[a] = max(hi[a], offs[i, a])
    for q in range(t):
        z = c0 + q
        zin = z + lo[0] >= 0 and z + hi[0] < nz
        for j in range(ny):
            y = y0 + j
            yin = zin and y + lo[1] >= 0 and y + hi[1] < my
            for i0 in range(nx):
                res = not is_or
                if linear and yin and i0 + lo[2] >= 0 and i0 + hi[2] < mx:
                    base = (z * my + y) * mx + i0
                    for i in range(k):
                        if (flat[base + lin[i]] != 0) == is_or:  # a hit decides an OR
                            res = is_or
                            break
                else:
                    for i in range(k):
                        zz = z + offs[i, 0]
                        yy = y + offs[i, 1]
                        xx = i0 + offs[i, 2]
                        if zz < 0 or zz >= nz or yy < 0 or yy >= my or xx < 0 or xx >= mx:
                            v = border
                        else:
                            v = x[zz, yy, xx] != 0
                        if v == is_or:  # a miss decides an AND
                            res = is_or
                            break
                out[q, j, i0] = res


@kernel
def _hit_dist(x, z0, z1, y0, y1, is_or, dist):  # pragma: no cover - compiled
    """``dist[z - z0, y - y0, i]``: how far along the last axis from ``i`` the next
    deciding voxel of row ``(z, y)`` of ``x`` lies (nonzero for an OR, zero for an
    AND), capped at 255."""
    mx = x.shape[2]
    for z in range(z0, z1):
        for y in range(y0, y1):
            d = 255
            for i in range(mx - 1, -1, -1):
                if (x[z, y, i] != 0) == is_or:
                    d = 0
                elif d < 255:
                    d += 1
                dist[z - z0, y - y0, i] = d


@kernel
def _run_planes(dist, nz, my, out, c0, y0, zd, yd, runs, is_or, border):  # pragma: no cover
    """``out[q, j, i]``: whether any run ``(dz, dy, a, b)`` of the structure, placed at
    ``(c0 + q, y0 + j, i)``, meets a deciding voxel (``dist`` of rows ``zd..``, ``yd..``
    of the ``nz x my`` input), ``border`` outside it: one look-up a run, nearest first."""
    t, ny, nx = out.shape
    k = runs.shape[0]
    border_hits = border == is_or
    for q in range(t):
        z = c0 + q
        for j in range(ny):
            y = y0 + j
            for i in range(nx):
                hit = False
                for r in range(k):
                    zz = z + runs[r, 0]
                    yy = y + runs[r, 1]
                    if zz < 0 or zz >= nz or yy < 0 or yy >= my:
                        if border_hits:
                            hit = True
                            break
                        continue
                    lo = i + runs[r, 2]
                    hi = i + runs[r, 3]
                    if lo < 0 or hi >= nx:
                        if border_hits:
                            hit = True
                            break
                        lo = max(lo, 0)
                        hi = min(hi, nx - 1)
                        if lo > hi:
                            continue
                    if dist[zz - zd, yy - yd, lo] <= hi - lo:
                        hit = True
                        break
                out[q, j, i] = is_or if hit else not is_or


def _structure_runs(offsets) -> np.ndarray:
    """Offsets ``(dz, dy, dx)`` as runs ``(dz, dy, a, b)`` of consecutive ``dx``, the
    nearest rows first."""
    rows = {}
    for dz, dy, dx in offsets:
        rows.setdefault((dz, dy), []).append(dx)
    runs = []
    for (dz, dy), xs in rows.items():
        xs = sorted(xs)
        a = prev = xs[0]
        for v in xs[1:]:
            if v != prev + 1:
                runs.append((dz, dy, a, prev))
                a = v
            prev = v
        runs.append((dz, dy, a, prev))
    runs.sort(key=lambda r: (r[0] ** 2 + r[1] ** 2, abs(r[2] + r[3])))
    return np.array(runs, dtype=np.int64).reshape(-1, 4)


_WARM: set = set()


def warm(ndim: int) -> None:
    """Compile (or load from numba's cache) the kernels for ``ndim`` now, once per
    process, for whole and sliced windows: a structure is made while planning, so
    numba's compiler comes before the run, not inside its budget."""
    if ndim in _WARM or ndim not in (2, 3):
        return
    _WARM.add(ndim)
    x = np.zeros((4, 3, 6)[3 - ndim:], bool)
    for st in (np.ones((3,) * ndim, bool), ndi.generate_binary_structure(ndim, 1)):
        f = BoolShifts("or", st, False)  # by runs (on 2 planes: a step thick enough)
        for t in (1, 2):  # and by offsets
            f.planes(x, 0, 1, t)
            f.planes(x[..., ::2], 0, 1, t)  # a window that is not contiguous
    if ndim == 3:  # the runs' map as a stage: its planes, and a window of them (read-only
        # when it is a view of a ring: another signature for numba)
        k = BoolShifts("or", np.ones((3, 3, 3), bool), False, mapped=True)
        for v in (x, x.copy()):
            m = HitMap("or")(v)
            for t in (1, 2):
                k.planes(m, 0, 1, t)
            v.setflags(write=False)
            m.setflags(write=False)
            HitMap("or")(v)
            k.planes(m, 0, 1, 1)


class HitMap:
    """The runs' map of a :class:`BoolShifts` as planes of their own: per voxel, how far
    along the last axis the next deciding voxel of its row lies (capped at 255; 0: the
    voxel decides, nonzero for a dilation, zero for an erosion).

    A row's map depends on that row only, so a plane's map is computed once, where the
    kernel would map every plane of its window at each step (seven planes for one kept
    plane of a radius-3 ball at one plane a step).
    """

    def __init__(self, op: str) -> None:
        self.op = op

    def __repr__(self) -> str:
        return f"HitMap({self.op!r})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x3 = np.ascontiguousarray(x).view(np.uint8)
        dist = np.empty(x3.shape, np.uint8)
        _hit_dist(x3, 0, x3.shape[0], 0, x3.shape[1], self.op == "or", dist)
        return dist


class BoolRun:
    """A 1-D run of AND (erosion) or OR (dilation) over ``2 r + 1`` booleans along ``axis``.

    Binary erosion and dilation with a box structure are these runs along each
    axis in turn (the box is the product of its sides, and AND / OR are exact),
    with scipy's ``border_value`` outside the array.  Called like scipy's 1-D
    filters (``fn(x, output=out)``); :meth:`kept` computes the kept planes of
    the sweep-axis run only.
    """

    def __init__(self, op: str, radius: int, axis: int, border: bool) -> None:
        self.op = op
        self.radius = int(radius)
        self.axis = int(axis)
        self.border = bool(border)

    def __repr__(self) -> str:
        return f"BoolRun({self.op!r}, {self.radius}, axis={self.axis}, border={self.border})"

    def _combine(self, out, other) -> None:
        if self.op == "and":
            np.logical_and(out, other, out=out)
        else:
            np.logical_or(out, other, out=out)

    def __call__(self, x: np.ndarray, output=None) -> np.ndarray:
        x = np.asarray(x, dtype=bool)
        ax = self.axis % x.ndim
        out = np.empty(x.shape, bool) if output is None else output
        np.copyto(out, x)
        n = x.shape[ax]
        for j in range(1, self.radius + 1):
            if j >= n:
                if self.border != (self.op == "and"):
                    out[...] = self.border  # every voxel sees the border on both sides
                break
            lead = (slice(None),) * ax
            # neighbour at +j: voxels [0, n-j) see x[j:]; the last j see the border
            self._combine(out[lead + (slice(0, n - j),)], x[lead + (slice(j, n),)])
            self._combine(out[lead + (slice(j, n),)], x[lead + (slice(0, n - j),)])
            if self.border != (self.op == "and"):  # the border decides where it is seen
                out[lead + (slice(n - j, n),)] = self.border
                out[lead + (slice(0, j),)] = self.border
        return out

    def kept(self, x: np.ndarray, axis: int, c0: int, t: int) -> np.ndarray | None:
        """Planes ``[c0, c0 + t)`` of the run along the sweep axis ``axis``.

        Planes of the window outside ``x`` are beyond the volume's face (a slab
        is clipped only there): they hold the border value.
        """
        if axis != self.axis % x.ndim or t <= 0:
            return None
        n = x.shape[axis]
        lead = (slice(None),) * axis
        out = np.array(x[lead + (slice(c0, c0 + t),)], dtype=bool)
        for j in range(-self.radius, self.radius + 1):
            if j == 0:
                continue
            s = c0 + j
            # kept plane k sees plane c0 + k + j: inside x for k in [ks, ke)
            ks, ke = max(0, -s), min(t, n - s)
            if ke <= ks:
                if self.border != (self.op == "and"):
                    out[...] = self.border
                continue
            self._combine(out[lead + (slice(ks, ke),)], x[lead + (slice(s + ks, s + ke),)])
            if self.border != (self.op == "and"):
                out[lead + (slice(0, ks),)] = self.border
                out[lead + (slice(ke, t),)] = self.border
        return out


class BoolShifts:
    """Binary erosion (AND) or dilation (OR) over a structure's offsets.

    ``fn(x)`` equals ``scipy.ndimage.binary_erosion(x, structure,
    border_value=border)`` (or ``binary_dilation``) for structures with odd
    sides and origin 0; :meth:`planes` computes a step's kept planes (and a
    piece's kept rows) only.
    """

    #: the kernel may ask for its kept planes only (:meth:`planes`), and rows
    cropped = True
    cropped_rows = True

    def __init__(self, op: str, structure, border: bool, mapped: bool = False) -> None:
        st = np.asarray(structure, dtype=bool)
        if any(s % 2 == 0 for s in st.shape):
            raise ValueError("structures with even sides are not handled")
        self.op = op
        self.border = bool(border)
        self.shape = st.shape
        self._st = st
        centre = np.array(st.shape) // 2
        offsets = np.argwhere(st) - centre
        if op == "or":
            offsets = -offsets  # scipy dilates with the reflected structure
        self.offsets = [tuple(int(v) for v in o) for o in offsets]
        offs = np.array(self.offsets, dtype=np.int64).reshape(len(self.offsets), st.ndim)
        offs = offs[np.argsort((offs ** 2).sum(axis=1), kind="stable")]  # nearest first
        self._offs = offs if st.ndim == 3 else np.insert(offs, 1, 0, axis=1)
        # a ball's rows are runs along the last axis: one look-up a run (25 for 123
        # offsets at radius 3) in a map of each row's next deciding voxel, which a piece
        # holds for its rows (1 byte a voxel); a few offsets are read one by one
        self._runs = _structure_runs(self._offs)
        self._reach = (self._offs[:, :2].min(axis=0), self._offs[:, :2].max(axis=0))
        self.by_runs = 2 * len(self._runs) <= len(self._offs) and max(st.shape) < 255
        #: its input is the runs' map (:class:`HitMap`'s planes), not the mask
        self.mapped = bool(mapped) and self.by_runs and st.ndim == 3
        #: copies of its input rows a piece holds (the runs' map)
        self.row_copies = 1 if self.by_runs and not self.mapped else 0
        warm(st.ndim)

    def __repr__(self) -> str:
        m = ", of the runs' map" if self.mapped else ""
        return f"BoolShifts({self.op!r}, {len(self.offsets)} offsets, border={self.border}{m})"

    def of_map(self) -> tuple[HitMap, BoolShifts] | None:
        """``(map, kernel)``: the runs' map as planes of their own, and this kernel
        reading them; ``None`` where it goes by offsets."""
        k = BoolShifts(self.op, self._st, self.border, mapped=True)
        return (HitMap(self.op), k) if k.mapped else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._combine(x, (0,) * np.ndim(x), np.shape(x))

    def planes(self, x: np.ndarray, axis: int, c0: int, t: int,
               rows: tuple[int, int, int] | None = None) -> np.ndarray:
        """Planes ``[c0, c0 + t)`` along ``axis`` of ``self(x)``, combining only theirs
        (a 1-plane step of a radius-3 ball combined 7 planes and kept one); with
        ``rows=(ax, r0, n)``, only rows ``[r0, r0 + n)`` along in-plane axis ``ax``."""
        starts = [0] * np.ndim(x)
        starts[axis] = c0
        lens = list(np.shape(x))
        lens[axis] = t
        if rows is not None:
            starts[rows[0]], lens[rows[0]] = rows[1], rows[2]
        return self._combine(x, tuple(starts), tuple(lens))

    def _combine(self, x: np.ndarray, starts: tuple, lens: tuple) -> np.ndarray:
        """The output's box at ``starts`` of sides ``lens`` (in ``x``'s coordinates)."""
        x = np.asarray(x)
        if len(self.shape) != x.ndim:
            raise ValueError("structure and input must have the same rank")
        if self.mapped and (starts[-1] or lens[-1] != x.shape[-1]):
            # a window cut along the last axis (an in-plane tile's piece): the map's
            # zeros are the deciding voxels, all the offsets path needs
            x = (x == 0) if self.op == "or" else (x != 0)
            return BoolShifts(self.op, self._st, self.border)._combine(x, starts, lens)
        if x.dtype.itemsize == 1 and x.ndim in (2, 3) and not starts[-1] \
                and lens[-1] == x.shape[-1]:
            return self._compiled(x, starts, lens)
        x = x.astype(bool, copy=False)
        ident = self.op == "and"
        out = np.full(lens, ident, dtype=bool)
        combine = np.logical_and if ident else np.logical_or
        for off in self.offsets:
            dst, src, seen = [], [], True
            for o, n, s0, m in zip(off, x.shape, starts, lens):
                # out[q] sees x[s0 + q + o]: q in [max(0, -(s0 + o)), min(m, n - s0 - o))
                lo, hi = max(0, -(s0 + o)), min(m, n - s0 - o)
                if hi <= lo:
                    seen = False
                    break
                dst.append(slice(lo, hi))
                src.append(slice(lo + s0 + o, hi + s0 + o))
            if not seen:  # every voxel sees the border at this offset
                if self.border != ident:
                    out[...] = self.border
                continue
            combine(out[tuple(dst)], x[tuple(src)], out=out[tuple(dst)])
            if self.border != ident:
                # voxels whose neighbour at this offset is outside see the border
                for ax, d in enumerate(dst):
                    edge = [slice(None)] * x.ndim
                    if d.start > 0:
                        edge[ax] = slice(0, d.start)
                        out[tuple(edge)] = self.border
                    if d.stop < lens[ax]:
                        edge[ax] = slice(d.stop, lens[ax])
                        out[tuple(edge)] = self.border
        return out

    def _compiled(self, x: np.ndarray, starts: tuple, lens: tuple) -> np.ndarray:
        """:meth:`_combine` by :func:`_run_planes` or :func:`_shift_planes` (1-byte
        input, whole last axis)."""
        offs = self._offs
        x3 = x.view(np.uint8)
        if x.ndim == 2:  # as planes of one row
            x3 = x3[:, None, :]
            starts, lens = (starts[0], 0, 0), (lens[0], 1, lens[1])
        out = np.empty(lens, dtype=bool)
        is_or = self.op == "or"
        # the runs' map costs a pass over the window's planes: on a step thinner than
        # twice the reach along the sweep axis (a 1-plane step of a radius-3 ball maps 7
        # planes) the offsets are cheaper
        if self.mapped:  # the map's planes came from their own stage, once each
            x3 = np.ascontiguousarray(x3)
            _run_planes(x3, x3.shape[0], x3.shape[1], out, starts[0], starts[1], 0, 0,
                        self._runs, is_or, self.border)
        elif self.by_runs and lens[0] >= 2 * max(-int(self._reach[0][0]), int(self._reach[1][0])):
            nz, my, mx = x3.shape
            (c0, y0), (t, ny) = starts[:2], lens[:2]
            (lz, ly), (hz, hy) = self._reach
            z0, z1 = max(0, c0 + int(lz)), min(nz, c0 + t + int(hz))
            ya, yb = max(0, y0 + int(ly)), min(my, y0 + ny + int(hy))
            dist = np.empty((max(0, z1 - z0), max(0, yb - ya), mx), np.uint8)
            _hit_dist(x3, z0, z1, ya, yb, is_or, dist)
            _run_planes(dist, nz, my, out, c0, y0, z0, ya, self._runs, is_or, self.border)
        else:
            flat = x3.reshape(-1) if x3.flags.c_contiguous else np.zeros(0, np.uint8)
            lin = (offs[:, 0] * x3.shape[1] + offs[:, 1]) * x3.shape[2] + offs[:, 2]
            _shift_planes(x3, flat, out, starts[0], starts[1], offs, lin, is_or, self.border)
        return out.reshape(lens if x.ndim == 3 else (lens[0], lens[2]))
