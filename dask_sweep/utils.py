"""Small pure helpers shared by several layers."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from dask_sweep.errors import SinkError


def format_bytes(n: float) -> str:
    """Human-readable binary size.

    >>> format_bytes(1536)
    '1.50 KiB'
    """
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"  # pragma: no cover


def unlinked_file(directory: str, prefix: str) -> int:
    """A descriptor of a new file in ``directory``, already unlinked: nothing is left on
    disk once it is closed, even by a crash."""
    fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.unlink(path)
    return fd


def pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    """Write the bytes of C-contiguous ``data`` at ``offset`` (all of them)."""
    if not data.size:
        return
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def pread_all(fd: int, out: np.ndarray, offset: int, what: str = "staged data") -> None:
    """Fill C-contiguous ``out`` from ``offset``; a short read is a ``SinkError``."""
    if not out.size:
        return
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise SinkError(f"dask_sweep: {what} was read back short ({done} of "
                            f"{len(view)} bytes): was the disk full?")
        done += got


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Merge ``(start, stop)`` ranges into disjoint sorted ones (empty ones dropped).

    >>> merge_ranges([(4, 6), (0, 2), (1, 3), (5, 5)])
    [(0, 3), (4, 6)]
    """
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif b > a:
            out.append([a, b])
    return [(a, b) for a, b in out]


def range_gaps(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """What sorted ``ranges`` leave uncovered of ``[0, n)``."""
    gaps, pos = [], 0
    for a, b in ranges:
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    if pos < n:
        gaps.append((pos, n))
    return gaps
