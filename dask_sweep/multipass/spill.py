"""Tables, planes and masks that outlive a pass: in memory within a reserve, else on disk.

A multi-pass sweep produces small per-slab results (boundary planes, label
tables) that a later pass consumes in another order, so all of them can be
alive at once.  Each is either kept in memory, while the running total stays
within a reserve the plan set aside next to its slab footprints, or written to
a ``.npy`` file under dask's ``temporary-directory`` and read back (and
deleted) by its single consumer.  The decision is made where the result is
produced, with the running total carried along the producing chain, so the
whole run never holds more than the reserve.

Spill directories are created lazily at run time with a unique name (the graph
keys stay deterministic, and a recomputation gets its own directory).  A file
is deleted when it is read; a directory is removed by :func:`remove_dir` once
its last file is read, and whatever a partial computation left behind is
removed when the process exits.

:class:`KeptArrays` keeps what a first pass made for the second in an unlinked local
file, so that the second pass reads it there instead of the input: every input byte
is read once.  :class:`KeptLabels` keeps label's local labels, compressed (the second
pass only maps them), where the page cache can hold them (:func:`labels_fit`);
:class:`KeptMasks` keeps its input masks (one bit per voxel), labelled again.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable

import numpy as np
from numcodecs import Blosc

from dask_sweep.config import temporary_directory
from dask_sweep.io.accounting import REGISTRY
from dask_sweep.utils import pread_all, pwrite_all, unlinked_file

_CREATED: set[str] = set()
# LZ4 over bits shuffled: fast enough that keeping less costs less than the kernel's copies
_CODEC = Blosc(cname="lz4", clevel=1, shuffle=Blosc.BITSHUFFLE)
_LOCK = threading.Lock()


def new_dir(kind: str, suffix: str = "") -> str:
    """A fresh, unique directory path for one run's spilled results (not created yet).

    It is removed when the process exits, if something is still there.
    """
    name = f"dask-sweep-{kind}-{uuid.uuid4().hex[:16]}{suffix}"
    path = os.path.join(temporary_directory(), name)
    with _LOCK:
        _CREATED.add(path)
    return path


def spill(path: str, arr: np.ndarray) -> str:
    """Write ``arr`` to ``path`` (a ``.npy`` file) and return the path."""
    d = os.path.dirname(path)
    with _LOCK:
        _CREATED.add(d)
    for attempt in range(5):
        # A reader may remove the (momentarily empty) directory at any point here.
        try:
            os.makedirs(d, exist_ok=True)
            np.save(path, arr)
            break
        except (FileNotFoundError, FileExistsError):
            if attempt == 4:
                raise
    REGISTRY.write(d, arr.nbytes, 1)
    return path


def keep_or_spill(
    arr: np.ndarray, kept: int, reserve: int, directory: str | None, kind: str, name: str,
    write: Callable[[str, np.ndarray], str] | None = None,
) -> tuple[np.ndarray | str, int, str | None]:
    """Keep ``arr`` in memory while ``kept + arr.nbytes`` fits ``reserve``, else spill it.

    Returns ``(the array or its path, bytes kept now, the spill directory)``; the
    directory is made up (:func:`new_dir`) at the first spill and carried along
    the producing chain with the running total.  ``kind`` names the directory,
    ``name`` the file; ``write(path, arr)`` writes it (default :func:`spill`).
    """
    if kept + arr.nbytes <= reserve:
        return arr, kept + arr.nbytes, directory
    directory = directory or new_dir(kind)
    return (write or spill)(os.path.join(directory, name), arr), kept, directory


def take(obj: np.ndarray | str) -> np.ndarray:
    """The array itself, or the spilled array read back (its file is deleted)."""
    if not isinstance(obj, str):
        return obj
    try:
        arr = np.load(obj)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"dask_sweep: the spilled intermediate {obj} is missing. Spill files live under "
            "dask's 'temporary-directory'; under distributed on several machines that "
            "directory must be shared by the workers, and the run must not be restarted "
            "halfway."
        ) from e
    os.remove(obj)
    REGISTRY.read(os.path.dirname(obj), arr.nbytes, 1)
    return arr


def put_mask(directory: str, s: int, mask: np.ndarray) -> None:
    """Slab ``s``'s boolean ``mask`` written packed (one bit per voxel, along the last
    axis) to ``directory``, for a later pass that does not compute its input again."""
    spill(os.path.join(directory, f"M-{s:08d}.npy"), np.packbits(mask, axis=-1))


def take_mask(directory: str, s: int, width: int) -> np.ndarray:
    """Slab ``s``'s mask :func:`put_mask` wrote (its last axis ``width`` long), read back
    and deleted; the directory is removed with its last file."""
    bits = take(os.path.join(directory, f"M-{s:08d}.npy"))
    remove_dir(directory)
    return np.unpackbits(bits, axis=-1, count=width).view(bool)


def load(obj: np.ndarray | str) -> np.ndarray:
    """The array itself, or the spilled array read back (its file is kept for later reads)."""
    if not isinstance(obj, str):
        return obj
    arr = np.load(obj)
    REGISTRY.read(os.path.dirname(obj), arr.nbytes, 1)
    return arr


def remove_tree(path: str | None) -> None:
    """Remove a spill directory and whatever is left in it (the end of a run)."""
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    with _LOCK:
        _CREATED.discard(path)


def remove_dir(path: str | None) -> None:
    """Remove a spill directory if it is empty (its last file was read)."""
    if path is None:
        return
    try:
        os.rmdir(path)
    except OSError:
        return
    with _LOCK:
        _CREATED.discard(path)


@atexit.register
def _cleanup() -> None:  # pragma: no cover - runs at interpreter exit
    for path in list(_CREATED):
        shutil.rmtree(path, ignore_errors=True)


class KeptArrays:
    """Arrays written once and read back once each, in one unlinked local file.

    Entry ``i`` may hold up to ``sizes[i]`` bytes, at its own offset (a sparse file:
    only what is written takes disk space).  The file lives in ``directory``
    (nothing is left on disk, even by a crash); it is opened at the first
    :meth:`put` and closed, its space freed, when every entry put has been taken.
    The state lives in this object: a copy made by pickling (another process: a
    ``distributed`` worker, the processes scheduler) keeps nothing and finds
    nothing, and its consumer computes what it needs again.
    """

    def __init__(self, sizes: list[int], directory: str) -> None:
        self.offsets = [0, *np.cumsum([int(n) for n in sizes], dtype=np.int64).tolist()]
        self.directory = directory
        self._reset(False)

    @property
    def nbytes(self) -> int:
        """Disk bytes when every entry is kept at its largest."""
        return int(self.offsets[-1])

    def _reset(self, copy: bool) -> None:
        self._copy = copy
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._kept: dict[int, tuple] = {}  # entry -> (dtype, shape) as put
        self._parts: dict[int, int] = {}  # entry -> parts still to read (take_rows)
        self._readers = 0

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_lock", "_fd", "_kept", "_parts", "_readers")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset(True)

    def holds(self, i: int) -> bool:
        """Whether entry ``i`` is kept here (put and not yet taken)."""
        with self._lock:
            return i in self._kept

    def put(self, i: int, arr: np.ndarray) -> None:
        """Keep entry ``i``; a failed write (a full disk) keeps nothing."""
        if self._copy or arr.nbytes > self.offsets[i + 1] - self.offsets[i]:
            return
        fd = self._open()
        try:
            pwrite_all(fd, np.ascontiguousarray(arr), self.offsets[i])
        except OSError:
            return  # the consumer computes it again
        with self._lock:
            self._kept[i] = (arr.dtype, arr.shape)

    def take(self, i: int) -> np.ndarray | None:
        """Entry ``i`` read back (once), or None when it was not kept here."""
        return self.take_rows(i, 0, None, 1)

    def take_rows(self, i: int, a: int, b: int | None, parts: int) -> np.ndarray | None:
        """Rows ``a:b`` (along the first axis) of entry ``i``, or None when it was not
        kept here; the entry is taken once ``parts`` such reads have been made."""
        got = self._claim(i, parts)
        if got is None:
            return None
        fd, (dtype, shape, *_) = got
        try:
            b = shape[0] if b is None else b
            out = np.empty((b - a, *shape[1:]), dtype)
            row = math.prod(shape[1:]) * np.dtype(dtype).itemsize
            pread_all(fd, out, self.offsets[i] + a * row, f"a kept array in {self.directory}")
        finally:
            self._release(fd)
        return out

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = unlinked_file(self.directory, "dask-sweep-kept-")
            return self._fd

    def _claim(self, i: int, parts: int) -> tuple[int, tuple] | None:
        """The file and what :meth:`put` recorded of entry ``i`` (None: not kept), for
        one read; the entry is taken with its ``parts``-th read."""
        with self._lock:
            if i not in self._kept:
                return None
            meta = self._kept[i]
            left = self._parts.get(i, parts) - 1
            if left > 0:
                self._parts[i] = left
            else:
                self._kept.pop(i)
                self._parts.pop(i, None)
            self._readers += 1
            return self._fd, meta

    def _release(self, fd: int) -> None:
        with self._lock:
            self._readers -= 1
            if not self._kept and not self._readers and self._fd == fd:
                os.close(fd)  # every entry taken: the file's space is freed
                self._fd = None

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            self._kept.clear()
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class KeptMasks(KeptArrays):
    """Masks of the given ``shapes``, kept packed along the last axis (one bit per voxel,
    :func:`numpy.packbits`; the last axis is ``width`` long)."""

    def __init__(self, shapes: list[tuple[int, ...]], width: int, directory: str) -> None:
        self.shapes = [tuple(int(n) for n in s[:-1]) + (math.ceil(s[-1] / 8),)
                       for s in shapes]
        self.width = int(width)
        super().__init__([math.prod(s) for s in self.shapes], directory)

    def put(self, i: int, bits: np.ndarray) -> None:
        """Keep entry ``i``, a packed mask of ``shapes[i]``."""
        if tuple(bits.shape) == self.shapes[i]:
            super().put(i, bits.astype(np.uint8, copy=False))

    def take_mask(self, i: int, a: int = 0, b: int | None = None,
                  parts: int = 1) -> np.ndarray | None:
        """Planes ``a:b`` of entry ``i`` read back and unpacked (bool), or None when it
        was not kept; the entry is taken once ``parts`` such reads have been made."""
        bits = self.take_rows(i, a, b, parts)
        if bits is None:
            return None
        return np.unpackbits(bits, axis=-1, count=self.width).view(bool)


class KeptLabels(KeptArrays):
    """Local labels of slabs of the given ``shapes`` (``1..n``), kept in the narrowest
    unsigned dtype that holds ``n`` (up to 4 B per voxel reserved), compressed.

    Local labels are runs of equal ids: blosc's LZ4 after a bit shuffle keeps them in
    about a seventh of their bytes (the benchmarks' blobs) at over 2 GB/s a thread,
    without the GIL, so pass 1 writes and pass 2 reads that much less through the
    kernel (whose copies into the page cache were the larger cost).  They are
    compressed a piece of at most a quarter of the slab (and :data:`PIECE`) at a time,
    so the temporaries stay within the slab's own labelling phase; a piece that does
    not shrink is kept as it is.
    """

    #: Bytes of narrow labels compressed at a time (at most a quarter of the slab's).
    PIECE = 1 << 20

    def __init__(self, shapes: list[tuple[int, ...]], directory: str) -> None:
        super().__init__([4 * math.prod(s) for s in shapes], directory)

    def put_labels(self, i: int, lab: np.ndarray, n: int) -> None:
        """Keep entry ``i``: slab labels ``lab`` of ids ``0..n``; a failed write (a full
        disk) keeps nothing."""
        dt = np.dtype(next(d for d in (np.uint8, np.uint16, np.uint32)
                           if n <= np.iinfo(d).max))
        src = np.ascontiguousarray(lab).reshape(-1)
        nbytes = src.size * dt.itemsize
        if self._copy or nbytes > self.offsets[i + 1] - self.offsets[i]:
            return
        step = max(1, min(self.PIECE, nbytes // 4) // dt.itemsize)
        # narrowed a piece at a time into one small buffer (a narrow copy of the whole
        # slab was a fresh mapping each time: its page faults cost as much as the codec)
        buf = None if src.dtype == dt else np.empty(min(step, src.size), dt)
        fd, pos, sizes = self._open(), self.offsets[i], []
        try:
            for a in range(0, src.size, step):
                part = src[a:a + step]
                if buf is None:
                    piece = part
                else:
                    piece = buf[: len(part)]
                    np.copyto(piece, part, casting="unsafe")  # ids <= n fit
                packed = np.frombuffer(_CODEC.encode(piece), np.uint8)
                raw = packed.nbytes >= piece.nbytes
                pwrite_all(fd, piece if raw else packed, pos)
                sizes.append(-piece.nbytes if raw else packed.nbytes)  # < 0: as it is
                pos += abs(sizes[-1])
        except OSError:
            return  # the consumer computes it again
        with self._lock:
            self._kept[i] = (dt, lab.shape, step, sizes)

    def take_rows(self, i: int, a: int, b: int | None, parts: int) -> np.ndarray | None:
        raise TypeError("kept labels are compressed whole: read them with take_labels")

    def take_labels(self, i: int) -> np.ndarray | None:
        """Entry ``i`` read back as ``uint32``, or None when it was not kept."""
        got = self._claim(i, 1)
        if got is None:
            return None
        fd, (dtype, shape, step, sizes) = got
        try:
            out = np.empty(math.prod(shape), np.uint32)
            # narrow pieces widened into the output as they come (no narrow whole slab)
            buf = None if dtype == out.dtype else np.empty(min(step, out.size), dtype)
            pos = self.offsets[i]
            for a, size in zip(range(0, out.size, step), sizes):
                dst = out[a:a + step]
                piece = dst if buf is None else buf[: len(dst)]
                if size < 0:
                    pread_all(fd, piece, pos, f"kept labels in {self.directory}")
                else:
                    packed = np.empty(size, np.uint8)
                    pread_all(fd, packed, pos, f"kept labels in {self.directory}")
                    _CODEC.decode(packed, out=piece)
                if buf is not None:
                    np.copyto(dst, piece)
                pos += abs(size)
        finally:
            self._release(fd)
        return out.reshape(shape)


def masks_fit(nbytes: int, directory: str | None = None) -> bool:
    """Whether ``nbytes`` of kept arrays fit in a quarter of the free space of
    ``directory`` (default dask's temporary directory)."""
    try:
        free = shutil.disk_usage(directory or temporary_directory()).free
    except OSError:
        return False
    return nbytes <= free // 4


def labels_fit(voxels: int, directory: str | None = None) -> bool:
    """Whether the local labels of ``voxels`` are worth keeping: their largest size
    (4 B per voxel) fits in a quarter of the free space of ``directory`` and their
    usual one (2 B per voxel: under 65 536 labels per slab) in half of the memory
    available, so they are read back from the page cache, not from the disk: more
    bytes through a disk than the masks' could cost more than labelling again."""
    import psutil

    return masks_fit(4 * voxels, directory) and 2 * voxels <= psutil.virtual_memory().available // 2
