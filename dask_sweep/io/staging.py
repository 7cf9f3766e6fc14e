"""Chunk rows staged on local disk: planes of any range into chunks deeper than a step.

A compressed (or sharded) chunk is encoded whole, so a sweep that writes one
directly needs all the chunk's planes at once: a step, or a ring, of a whole
chunk row (``64 x 512 x 512`` int32 labels: 64 MiB).  When that does not fit the
budget and the sweep cannot be tiled in-plane (labels: the values of a tile
depend on the whole plane), the planes are *staged*: each step's planes are
written raw into an unlinked file of the chunk row they belong to, laid out box
by box, and the row is encoded when its last plane arrives, one box (a call of
a few whole chunks) at a time::

    step planes (any range)        staging file of chunk row r (raw, box-major)
    +----------------------+       | box 0: planes 0..h of its chunks | box 1: ...
    | p | p+1 | ...        |  -->  one pwrite per box and step (its planes are
    +----------------------+       contiguous within the box)
                                   row complete: pread box k, write it (whole chunks)

A complete row is written in the background, by a thread of the writer's own,
while the sweep goes on (encoding overlaps the next steps' compute); one row at
a time: a row completed while the previous one is still being written waits for
it.  The sweep's last step waits for the last row (:meth:`StagedWriter.end_of_sweep`),
and an error of a background write is raised there or at the next row.

Memory: the boxes being encoded and their encoder's temporaries, held beside
every step (:attr:`StagedWriter.background`); the staged bytes are in the page
cache (not the process's), and each file is freed once its row is written.  Disk: the rows not yet complete (one, or two where a step spans a
row boundary).  The files are unlinked when created, so nothing is left behind,
even by a crash.

The state (open files, planes staged) lives in the writer object: every step of
the sweep must run in this process (the local schedulers).  A copy made by
pickling refuses to write rather than lose planes.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_sweep.errors import SinkError
from dask_sweep.utils import pread_all, pwrite_all, unlinked_file

__all__ = ["StagedWriter"]


class StagedWriter:
    """Write planes of any range into whole chunks, staging each chunk row on disk.

    Parameters
    ----------
    put
        ``put(a, box, origin)`` writes ``box`` (whole chunks) at plane ``a`` of the
        sweep axis and in-plane ``origin`` (a full-rank index; the sweep axis's entry
        is ignored).
    rows
        Bounds of the chunk rows along the sweep axis (``0, ..., n``).
    cuts
        Bounds of the boxes along each axis other than the sweep axis, in order.
    shape, dtype
        The written array's shape and dtype (the planes' dtype: staged as they are).
    axis
        The sweep axis.
    directory
        Where the staging files are created (they are unlinked at once).
    call_temps
        What one ``put`` holds beyond its box (its encoder's temporaries).
    workers
        Boxes written at once, each by a thread of its own (encoding is most of a
        write's time and zarr encodes one call's chunks at once, one call at a time).
    overlap
        Write complete rows in the background (the default), else within the step
        that completes them.
    """

    #: the segments of a sweep would write one row from two chains (two processes,
    #: under distributed): a staged write is one chain
    one_chain = "an output is staged on local disk chunk row by chunk row"

    def __init__(self, put: Callable[[int, np.ndarray, Sequence[int]], None],
                 rows: Sequence[int], cuts: Sequence[Sequence[int]], shape: Sequence[int],
                 dtype: Any, axis: int, directory: str, call_temps: int = 0,
                 workers: int = 1, overlap: bool = True) -> None:
        self.put = put
        self.rows = tuple(int(r) for r in rows)
        self.cuts = tuple(tuple(int(c) for c in cs) for cs in cuts)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.axis = axis
        self.directory = directory
        self.call_temps = int(call_temps)
        self.workers = max(1, int(workers))
        self.overlap = overlap
        self.inplane = [d for d in range(len(self.shape)) if d != axis]
        # each box: its in-plane slices and the bytes of one of its planes
        self.boxes = [tuple(slice(c[i], c[i + 1]) for c, i in zip(self.cuts, ix))
                      for ix in itertools.product(*(range(len(c) - 1) for c in self.cuts))]
        self.box_plane = [math.prod(s.stop - s.start for s in b) * self.dtype.itemsize
                          for b in self.boxes]
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        # row -> [fd, the planes staged (a set: a sweep run again after a failure stages
        # them again)]
        self._open: dict[int, list] = {}
        self._copy = False
        self._pool: ThreadPoolExecutor | None = None  # the background writer
        self._pending: Future | None = None  # the row it is writing

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_lock", "_open", "_pool", "_pending")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()
        self._copy = True

    # ------------------------------------------------------------------ sizes

    @property
    def largest_box(self) -> int:
        """Bytes of the largest box of a whole chunk row (what one ``put`` writes)."""
        depth = max(b - a for a, b in zip(self.rows, self.rows[1:]))
        return depth * max(self.box_plane, default=0)

    @property
    def writing(self) -> int:
        """Bytes held while a row is written: a box read back and its encoder's
        temporaries, for each worker."""
        return self.workers * (self.largest_box + self.call_temps)

    @property
    def background(self) -> int:
        """Bytes held beside every step of the sweep (a row written in the background)."""
        return self.writing if self.overlap else 0

    def temps_of(self, nbytes: int) -> int:
        """Bytes held beyond ``nbytes`` of planes while they are written: a box's share
        of them made contiguous, or, when they complete a row written in the step, the
        row's writing."""
        plane = math.prod(self.shape[d] for d in self.inplane) * self.dtype.itemsize
        share = math.ceil(nbytes * max(self.box_plane, default=0) / max(1, plane))
        return share if self.overlap else max(share, self.writing)

    def staged_bytes(self) -> int:
        """Disk bytes of the largest chunk row (a staging file at its fullest)."""
        plane = math.prod(self.shape[d] for d in self.inplane) * self.dtype.itemsize
        return max(b - a for a, b in zip(self.rows, self.rows[1:])) * plane

    # ------------------------------------------------------------------ writing

    def write_planes(self, a: int, planes: np.ndarray, origin=None) -> None:
        """Stage planes ``[a, a + len)``; write every chunk row they complete."""
        if self._copy:
            raise SinkError(
                "dask_sweep: a staged write ran in another process than the one that "
                "planned it (its chunk rows are staged in local files): run it with the "
                "threaded or synchronous scheduler, or raise memory_limit so that whole "
                "chunk rows fit and nothing is staged."
            )
        if origin is not None and any(origin[d] for d in self.inplane):
            raise SinkError("dask_sweep: a staged write takes whole planes, not tiles.")
        b = a + planes.shape[self.axis]
        r = max(0, np.searchsorted(self.rows, a, side="right") - 1)
        while r < len(self.rows) - 1 and self.rows[r] < b:
            lo, hi = max(a, self.rows[r]), min(b, self.rows[r + 1])
            if self._stage(r, lo, hi, a, planes):
                self._write_row(r)
            r += 1

    def _write_row(self, r: int) -> None:
        if not self.overlap:
            self._flush(r)
            return
        self._wait()  # one row at a time: its memory is counted once
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, "dask-sweep-staged-row")
        self._pending = self._pool.submit(self._flush, r)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # a background write's error is raised here

    def end_of_sweep(self) -> None:
        """Wait for the row being written in the background (the sweep's last step);
        every row must have been written by then."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        with self._lock:
            left = sorted(self._open)
        if left:
            raise SinkError(
                f"dask_sweep: the sweep ended with chunk rows {left} of its staged output "
                "incomplete (planes never written to them): their chunks were not written."
            )

    def _stage(self, r: int, lo: int, hi: int, a: int, planes: np.ndarray) -> bool:
        """Planes ``[lo, hi)`` into row ``r``'s file; whether the row is complete."""
        r0, r1 = self.rows[r], self.rows[r + 1]
        with self._lock:
            if r not in self._open:
                self._open[r] = [unlinked_file(self.directory, "dask-sweep-stage-"), set()]
            fd = self._open[r][0]
        cut = [slice(None)] * len(self.shape)
        cut[self.axis] = slice(lo - a, hi - a)
        start = 0
        for box, per in zip(self.boxes, self.box_plane):
            for d, s in zip(self.inplane, box):
                cut[d] = s
            piece = np.ascontiguousarray(np.moveaxis(planes[tuple(cut)], self.axis, 0),
                                         dtype=self.dtype)
            try:
                pwrite_all(fd, piece, start + (lo - r0) * per)
            except OSError as e:
                raise SinkError(
                    f"dask_sweep: staging chunk row {r} (planes {r0}-{r1}, "
                    f"{self.staged_bytes()} bytes) in {self.directory} failed: {e}. Point "
                    "dask's temporary-directory at a disk with room for two chunk rows, "
                    "or raise memory_limit so that whole chunk rows fit."
                ) from e
            start += (r1 - r0) * per
        with self._lock:
            self._open[r][1].update(range(lo, hi))
            return len(self._open[r][1]) == r1 - r0

    def _flush(self, r: int) -> None:
        """Write chunk row ``r`` box by box from its file, then free the file."""
        with self._lock:
            fd = self._open.pop(r)[0]
        r0, r1 = self.rows[r], self.rows[r + 1]
        starts = np.cumsum([0, *((r1 - r0) * per for per in self.box_plane)]).tolist()

        def one(k: int) -> None:
            box = self.boxes[k]
            buf = np.empty((r1 - r0, *(s.stop - s.start for s in box)), self.dtype)
            pread_all(fd, buf, starts[k], f"staged chunk row {r}")
            origin = [0] * len(self.shape)
            for d, s in zip(self.inplane, box):
                origin[d] = s.start
            self.put(r0, np.moveaxis(buf, 0, self.axis), origin)

        try:
            if self.workers == 1 or len(self.boxes) == 1:
                for k in range(len(self.boxes)):
                    one(k)
            else:
                with ThreadPoolExecutor(self.workers, "dask-sweep-stage") as pool:
                    for f in [pool.submit(one, k) for k in range(len(self.boxes))]:
                        f.result()
        finally:
            os.close(fd)

    def close(self, wait: bool = True) -> None:
        """Free the files of rows never completed (a sweep that failed), after the
        row being written in the background (``wait``)."""
        pool, self._pool = self._pool, None
        if pool is not None and wait:
            pool.shutdown(wait=True)
        with self._lock:
            opened, self._open = self._open, {}
        for fd, _ in opened.values():
            os.close(fd)
        if pool is not None and not wait:
            pool.shutdown(wait=False)

    def __del__(self) -> None:  # files of a failed sweep: their space is freed with them
        try:
            # unreachable, so no row is being written (its task would hold this writer);
            # this may run on the writer's own thread, which cannot wait for itself
            self.close(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
