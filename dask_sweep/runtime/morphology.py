"""Binary erosion and dilation as boolean runs and shifts: scipy's bits, much faster.

scipy's ``binary_erosion`` visits the structure's offsets for every voxel; for
a boolean volume the same result is an AND (dilation: an OR) of shifted copies
of the volume, which numpy does a plane at a time at memory speed:

* a **box** structure is the product of its sides, so the AND over the box is
  an AND over each axis in turn (:class:`BoolRun`, one separable pass per
  axis, the sweep-axis pass computed for the kept planes only);
* any other structure is an AND over its offsets (:class:`BoolShifts`).

Outside the array every neighbour is scipy's ``border_value``.  Dilation uses
the reflected structure, as scipy does.  ``tests/test_morphology.py`` checks
both against scipy over structures, borders, shapes and slabs.
"""

from __future__ import annotations

import numpy as np


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
    """Binary erosion (AND) or dilation (OR) over a structure's offsets, on a whole block.

    ``fn(x)`` equals ``scipy.ndimage.binary_erosion(x, structure,
    border_value=border)`` (or ``binary_dilation``) for structures with odd
    sides and origin 0.
    """

    def __init__(self, op: str, structure, border: bool) -> None:
        st = np.asarray(structure, dtype=bool)
        if any(s % 2 == 0 for s in st.shape):
            raise ValueError("structures with even sides are not handled")
        self.op = op
        self.border = bool(border)
        self.shape = st.shape
        centre = np.array(st.shape) // 2
        offsets = np.argwhere(st) - centre
        if op == "or":
            offsets = -offsets  # scipy dilates with the reflected structure
        self.offsets = [tuple(int(v) for v in o) for o in offsets]

    def __repr__(self) -> str:
        return f"BoolShifts({self.op!r}, {len(self.offsets)} offsets, border={self.border})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=bool)
        if len(self.shape) != x.ndim:
            raise ValueError("structure and input must have the same rank")
        ident = self.op == "and"
        out = np.full(x.shape, ident, dtype=bool)
        combine = np.logical_and if ident else np.logical_or
        for off in self.offsets:
            dst, src, seen = [], [], True
            for o, n in zip(off, x.shape):
                # out[p] sees x[p + o]: p in [max(0, -o), min(n, n - o))
                lo, hi = max(0, -o), min(n, n - o)
                if hi <= lo:
                    seen = False
                    break
                dst.append(slice(lo, hi))
                src.append(slice(lo + o, hi + o))
            if not seen:  # every voxel sees the border at this offset
                if self.border != ident:
                    out[...] = self.border
                continue
            combine(out[tuple(dst)], x[tuple(src)], out=out[tuple(dst)])
            if self.border != ident:
                # voxels whose neighbour at this offset is outside see the border
                for ax, (o, n) in enumerate(zip(off, x.shape)):
                    edge = [slice(None)] * x.ndim
                    if o > 0:
                        edge[ax] = slice(n - o, n)
                    elif o < 0:
                        edge[ax] = slice(0, -o)
                    else:
                        continue
                    out[tuple(edge)] = self.border
        return out
