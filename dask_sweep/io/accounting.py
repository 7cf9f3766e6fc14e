"""Process-wide I/O accounting: what every source read and sink write cost.

Every :class:`~dask_sweep.io.base.Source` read, every sink slab write and every
:class:`~dask_sweep.io.stores.CountingStore` fetch reports here, keyed by an id
(the path of the file, folder or store).  The hot path is one lock and a few
integer adds; per-chunk read counts (to see whether a disk chunk was read more
than once) are only kept while a :func:`track` block is open.

::

    with dask_sweep.io.track() as stats:
        result.compute()
    print(stats.summary())
    stats.sources["/data/vol.zarr"].reads_per_chunk.max

The registry is per process.  Under ``distributed`` the reads happen in the
worker processes; collect their numbers with
``client.run(dask_sweep.io.accounting.snapshot)``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = [
    "IOCounter",
    "IOStats",
    "ReadHistogram",
    "report_read",
    "report_write",
    "snapshot",
    "track",
]


@dataclass
class IOCounter:
    """Bytes and chunks moved for one source, sink or store.

    Attributes
    ----------
    bytes_read, chunks_read
        Bytes returned by reads and disk chunks (blocks, files, keys) they touched.
    bytes_written, chunks_written
        Bytes and chunks written.
    chunk_reads
        How many times each disk chunk was read (only counted inside :func:`track`).
    """

    bytes_read: int = 0
    chunks_read: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    chunk_reads: Counter = field(default_factory=Counter)

    def copy(self) -> IOCounter:
        return IOCounter(
            self.bytes_read,
            self.chunks_read,
            self.bytes_written,
            self.chunks_written,
            Counter(self.chunk_reads),
        )

    def minus(self, other: IOCounter | None) -> IOCounter:
        """The difference ``self - other`` (what happened since ``other`` was taken)."""
        if other is None:
            return self.copy()
        reads = Counter(self.chunk_reads)
        reads.subtract(other.chunk_reads)
        return IOCounter(
            self.bytes_read - other.bytes_read,
            self.chunks_read - other.chunks_read,
            self.bytes_written - other.bytes_written,
            self.chunks_written - other.chunks_written,
            +reads,  # unary plus drops the zero and negative entries
        )

    @property
    def reads_per_chunk(self) -> ReadHistogram:
        """How often each disk chunk was read, summarised."""
        return ReadHistogram(self.chunk_reads)


class ReadHistogram:
    """Summary of how many times each disk chunk was read.

    ``histogram`` maps *times read* to *number of chunks read that many times*;
    a streaming sweep shows ``{1: n}`` and ``max == 1``.
    """

    def __init__(self, counts: Counter) -> None:
        self.counts = counts

    @property
    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.counts.values()).items()))

    @property
    def max(self) -> int:
        return max(self.counts.values(), default=0)

    @property
    def mean(self) -> float:
        return sum(self.counts.values()) / len(self.counts) if self.counts else 0.0

    def __repr__(self) -> str:
        return f"ReadHistogram(max={self.max}, mean={self.mean:.2f}, histogram={self.histogram})"


class _Registry:
    """Counters of every id, guarded by one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, IOCounter] = {}
        # Number of open track() blocks; read without the lock on the hot path (a
        # stale value only means a per-chunk count is kept or skipped once).
        self.tracking = 0

    def _get(self, key: str) -> IOCounter:
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = IOCounter()
        return c

    def read(self, key: str, nbytes: int, chunks: Iterable[Hashable] | int) -> None:
        if self.tracking and not isinstance(chunks, int):
            ids = list(chunks)
            with self._lock:
                c = self._get(key)
                c.bytes_read += nbytes
                c.chunks_read += len(ids)
                c.chunk_reads.update(ids)
            return
        n = chunks if isinstance(chunks, int) else sum(1 for _ in chunks)
        with self._lock:
            c = self._get(key)
            c.bytes_read += nbytes
            c.chunks_read += n

    def write(self, key: str, nbytes: int, chunks: int) -> None:
        with self._lock:
            c = self._get(key)
            c.bytes_written += nbytes
            c.chunks_written += chunks

    def snapshot(self) -> dict[str, IOCounter]:
        with self._lock:
            return {k: v.copy() for k, v in self._counters.items()}

    def get(self, key: str) -> IOCounter:
        with self._lock:
            c = self._counters.get(key)
            return c.copy() if c is not None else IOCounter()


REGISTRY = _Registry()


def report_read(key: str, nbytes: int, chunks: Iterable[Hashable] | int) -> None:
    """Record a read of ``nbytes`` touching ``chunks`` (ids, or just their number)."""
    REGISTRY.read(key, nbytes, chunks)


def report_write(key: str, nbytes: int, chunks: int) -> None:
    """Record a write of ``nbytes`` in ``chunks`` disk chunks."""
    REGISTRY.write(key, nbytes, chunks)


def snapshot() -> dict[str, IOCounter]:
    """Copy of every counter of this process (picklable, for ``client.run``)."""
    return REGISTRY.snapshot()


class IOStats:
    """I/O done since a :func:`track` block was entered (frozen when it exits)."""

    def __init__(self, before: dict[str, IOCounter]) -> None:
        self._before = before
        self._after: dict[str, IOCounter] | None = None

    def _delta(self) -> dict[str, IOCounter]:
        after = self._after if self._after is not None else REGISTRY.snapshot()
        out = {}
        for k, v in after.items():
            d = v.minus(self._before.get(k))
            if d.bytes_read or d.chunks_read or d.bytes_written or d.chunks_written:
                out[k] = d
        return out

    @property
    def all(self) -> dict[str, IOCounter]:
        """Every id that moved bytes, sources and sinks alike."""
        return self._delta()

    @property
    def sources(self) -> dict[str, IOCounter]:
        """Ids that were read from (``stats.sources[path].bytes_read``)."""
        return {k: v for k, v in self._delta().items() if v.chunks_read or v.bytes_read}

    @property
    def sinks(self) -> dict[str, IOCounter]:
        """Ids that were written to."""
        return {k: v for k, v in self._delta().items() if v.chunks_written or v.bytes_written}

    @property
    def bytes_read(self) -> int:
        return sum(v.bytes_read for v in self._delta().values())

    @property
    def chunks_read(self) -> int:
        return sum(v.chunks_read for v in self._delta().values())

    @property
    def bytes_written(self) -> int:
        return sum(v.bytes_written for v in self._delta().values())

    @property
    def chunks_written(self) -> int:
        return sum(v.chunks_written for v in self._delta().values())

    def summary(self) -> str:
        """A few lines of text: totals, then one line per id."""
        from dask.utils import format_bytes

        delta = self._delta()
        lines = [
            f"read {format_bytes(self.bytes_read)} in {self.chunks_read} chunks, "
            f"wrote {format_bytes(self.bytes_written)} in {self.chunks_written} chunks"
        ]
        for k, v in sorted(delta.items()):
            parts = []
            if v.chunks_read:
                h = v.reads_per_chunk
                parts.append(f"read {format_bytes(v.bytes_read)} / {v.chunks_read} chunks")
                if h.counts:
                    parts.append(f"reads per chunk max {h.max} mean {h.mean:.2f}")
            if v.chunks_written:
                parts.append(f"wrote {format_bytes(v.bytes_written)} / {v.chunks_written} chunks")
            lines.append(f"  {k}: " + ", ".join(parts))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"IOStats(bytes_read={self.bytes_read}, bytes_written={self.bytes_written})"


@contextmanager
def track() -> Iterator[IOStats]:
    """Measure the I/O of this process inside a ``with`` block.

    Yields
    ------
    IOStats
        Live while the block runs, frozen at its end: ``bytes_read``,
        ``bytes_written``, ``chunks_read``, ``sources[id]`` (an
        :class:`IOCounter` with ``reads_per_chunk``) and ``summary()``.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep.io.accounting import report_read, track
    >>> with track() as stats:
    ...     report_read("example", 8, [(0,), (0,)])
    >>> stats.sources["example"].reads_per_chunk.max
    2
    """
    with REGISTRY._lock:
        REGISTRY.tracking += 1
    stats = IOStats(REGISTRY.snapshot())
    try:
        yield stats
    finally:
        stats._after = REGISTRY.snapshot()
        with REGISTRY._lock:
            REGISTRY.tracking -= 1
