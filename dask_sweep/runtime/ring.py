"""A ring buffer of planes along the sweep axis.

A stage's output is appended as the sweep moves forward; consumers read
windows ``[a, b)`` out of it, and everything below the lowest window any
consumer will still ask for is dropped::

      dropped        kept (the window)       not yet computed
    ───────────┬──────────────────────────┬──────────────────►  sweep axis
             start                       stop

A ring has one of two forms, chosen by the planner from a dry run of the sweep:

* **folded** (``capacity > 0``): one contiguous buffer of ``capacity`` planes,
  allocated at the first append (Halide's storage folding).  Every window is a
  *view*; appended planes are copied in; when the end of the buffer is reached
  the kept planes are moved back to its start (in place, a plane group at a
  time, so nothing else is allocated).  Used for rings that carry planes from
  one step to the next (the windows): their bytes are the buffer, known before
  the run.
* **transient** (``capacity == 0``): a list of the computed arrays themselves,
  no copy.  Used for rings whose planes are consumed within the step that
  computed them; a window joining two pieces is a new array.

In *dry* mode the arrays are :class:`Shape` placeholders, which lets the planner
replay a sweep without touching data and read off the bytes held at every
moment.  A folded ring is mutated in place: a state that has been advanced
must not be advanced again (slab tasks hand their rings over, see
:mod:`dask_sweep.emit.graph`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    """Stand-in for an array during a dry run: only shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        # planning replays every step: plain integers, not numpy reductions
        return math.prod(self.shape) * self.dtype.itemsize

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, np.dtype):
            object.__setattr__(self, "dtype", np.dtype(self.dtype))


def take(x, a: int, b: int, axis: int):
    """Planes ``[a, b)`` of ``x`` along ``axis`` (a view for arrays).

    >>> take(np.arange(6).reshape(3, 2), 1, 3, 0).tolist()
    [[2, 3], [4, 5]]
    """
    if isinstance(x, Shape):
        s = list(x.shape)
        s[axis] = b - a
        return Shape(tuple(s), x.dtype)
    idx = (slice(None),) * axis + (slice(a, b),)
    return x[idx]


def concat(pieces: list, axis: int):
    """Concatenate pieces along ``axis`` (no copy for a single piece)."""
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], Shape):
        s = list(pieces[0].shape)
        s[axis] = sum(p.shape[axis] for p in pieces)
        return Shape(tuple(s), pieces[0].dtype)
    return np.concatenate(pieces, axis=axis)


def _empty(like, planes: int, axis: int):
    s = list(like.shape)
    s[axis] = planes
    if isinstance(like, Shape):
        return Shape(tuple(s), like.dtype)
    return np.empty(s, dtype=like.dtype)


class Ring:
    """Planes ``[start, stop)`` of one stage: folded into a buffer, or transient pieces."""

    __slots__ = ("axis", "pieces", "start", "stop", "capacity", "buf", "base", "span",
                 "_piece_bytes")

    def __init__(self, axis: int, start: int | None = 0, capacity: int = 0) -> None:
        self.axis = axis
        self.pieces: list[tuple[int, int, object]] = []
        self.start = start
        self.stop = start
        self.capacity = capacity  # planes of the folded buffer; 0: transient pieces
        self.buf = None
        self.base = start  # plane index at buf[0]
        self.span = 0  # the most planes held at once (read by the planner)
        self._piece_bytes = 0  # bytes of the transient pieces (kept, not summed per call)

    def copy(self) -> Ring:
        """A ring holding the same planes (a folded buffer is shared, not copied)."""
        r = Ring(self.axis, self.start, self.capacity)
        r.pieces = list(self.pieces)
        r.stop = self.stop
        r.buf = self.buf
        r.base = self.base
        r.span = self.span
        r._piece_bytes = self._piece_bytes
        return r

    def append(self, a: int, value) -> None:
        if a != self.stop:
            raise AssertionError(f"ring append at {a}, expected {self.stop}")
        n = value.shape[self.axis]
        if not n:
            return
        if self.capacity:
            self._fold_in(value, n)
        else:
            self.pieces.append((a, a + n, value))
            self._piece_bytes += int(value.nbytes)
        self.stop = a + n
        self.span = max(self.span, self.stop - self.start)

    def _fold_in(self, value, n: int) -> None:
        held = self.stop - self.start
        if self.buf is None or self.buf.shape[self.axis] < held + n:
            # first append, or more planes than planned (a plan re-cut at run time)
            cap = max(self.capacity, held + n)
            new = _empty(value, cap, self.axis)
            if self.buf is not None and held and not isinstance(new, Shape):
                new[self._idx(0, held)] = self.buf[self._idx(self.start - self.base,
                                                             self.stop - self.base)]
            self.buf, self.base = new, self.start
        elif self.stop - self.base + n > self.buf.shape[self.axis]:
            self._compact()
        if not isinstance(self.buf, Shape):
            self.buf[self._idx(self.stop - self.base, self.stop - self.base + n)] = value

    def _compact(self) -> None:
        """Move the kept planes to the start of the buffer, in place."""
        shift = self.start - self.base
        held = self.stop - self.start
        if not isinstance(self.buf, Shape) and held:
            # groups of ``shift`` planes: source and destination never overlap, so
            # numpy copies straight, without a temporary
            for s in range(0, held, shift):
                e = min(held, s + shift)
                self.buf[self._idx(s, e)] = self.buf[self._idx(s + shift, e + shift)]
        self.base = self.start

    def _idx(self, a: int, b: int) -> tuple:
        return (slice(None),) * self.axis + (slice(a, b),)

    def get(self, a: int, b: int):
        """Planes ``[a, b)``; they must be held."""
        if a < self.start or b > self.stop:
            raise AssertionError(f"ring holds [{self.start}, {self.stop}), asked [{a}, {b})")
        if self.capacity:
            return take(self.buf, a - self.base, b - self.base, self.axis)
        out = []
        for s, e, v in self.pieces:
            if e <= a or s >= b:
                continue
            out.append(take(v, max(a, s) - s, min(b, e) - s, self.axis))
        if not out:  # an empty window
            return take(self.pieces[0][2], 0, 0, self.axis) if self.pieces else None
        return concat(out, self.axis)

    def hand_over(self, b: int):
        """Planes ``[start, b)`` as an array the caller keeps, and forget them.

        A folded ring gives its buffer away (a view of its first planes, no copy)
        and carries the planes beyond ``b`` into a new buffer; an emitted block
        row of an in-memory output is then the result itself, not a copy of it.
        """
        a = self.start
        if not self.capacity:
            out = self.get(a, b)
            self.drop_below(b)
            return out
        out = take(self.buf, a - self.base, b - self.base, self.axis)
        rest = take(self.buf, b - self.base, self.stop - self.base, self.axis)
        if self.stop > b:
            keep = _empty(self.buf, self.capacity, self.axis)
            if not isinstance(keep, Shape):
                keep[self._idx(0, self.stop - b)] = rest
            self.buf = keep
        else:
            self.buf = None
        self.start = self.base = b
        return out

    def copies(self, a: int, b: int) -> bool:
        """Whether :meth:`get` of ``[a, b)`` joins pieces (a new array) or is a view."""
        if self.capacity:
            return False
        return sum(1 for s, e, _ in self.pieces if e > a and s < b) > 1

    def drop_below(self, a: int) -> None:
        """Forget planes below ``a``.

        (A ring never anchored, ``stop is None``, holds nothing.)

        A transient piece straddling ``a`` is cut with a *copy*, so that the
        planes kept do not pin the whole piece in memory.
        """
        if self.stop is None or a <= self.start:
            return
        if self.capacity:
            self.start = min(a, self.stop)
            if self.start == self.stop:
                self.base = self.start  # empty: the next append starts at the front
            return
        keep = []
        for s, e, v in self.pieces:
            if e <= a:
                continue
            if s < a:
                part = take(v, a - s, e - s, self.axis)
                if isinstance(part, np.ndarray):
                    part = part.copy()
                keep.append((a, e, part))
            else:
                keep.append((s, e, v))
        self.pieces = keep
        self._piece_bytes = sum(int(v.nbytes) for _, _, v in keep)
        self.start = min(a, self.stop)

    def release(self) -> None:
        """Free the buffer (the sweep is past every consumer of this ring)."""
        self.buf = None
        self.pieces = []
        self._piece_bytes = 0
        if self.stop is not None:
            self.start = self.base = self.stop

    @property
    def held_planes(self) -> int:
        return 0 if self.stop is None else self.stop - self.start

    @property
    def nbytes(self) -> int:
        if self.capacity:
            return 0 if self.buf is None else int(self.buf.nbytes)
        return self._piece_bytes
