"""Contracts of slab sources and sinks, and the machinery they share.

A **source** is a small picklable description of an array on disk (paths and
metadata, never an open handle).  ``read(region)`` reopens the file through a
per-process handle cache; ``to_dask()`` builds a graph whose only layer is a
*root* layer (no task has a dependency), one task per block, blocks aligned to
the disk layout, so the sweep engine can inline the reads into its slab tasks::

    disk chunks   |c0|c1|c2|c3|c4|c5|    (zarr chunks/shards, TIFF pages, HDF5 chunks)
    dask blocks   |  b0 |  b1 |  b2 |    (whole multiples: no task splits a chunk)

A **sink** writes slabs along axis 0, in sweep order, into a temporary output
``<path>.partial`` and records each finished slab in ``<path>.progress/``
(a line ``W start stop`` appended to the writing process's log once the slab's
bytes are written, ``D start stop`` once they are synced).  Slabs written with ``commit=False`` are
synced in groups of about ``sync_bytes`` on a helper thread while later slabs
are produced, so the disk always has a deep queue of write-back and few cache
flushes.  ``finalize()`` syncs what is left, renames the temporary output to
``<path>`` and removes the record, so a crash leaves either the previous output
or a visibly incomplete one, and ``resume=True`` continues from the records::

    rows   0        4        8        12  ...
           [ slab 0 ][ slab 1 ][ slab 2 ]     written in order, each a whole
           done      done      crashed        number of output chunks/shards
                               ^ resume=True restarts here
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import shutil
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from dask_sweep.errors import SinkError, SourceError
from dask_sweep.io.accounting import REGISTRY
from dask_sweep.utils import merge_ranges, pwrite_all, range_gaps

__all__ = [
    "Sink",
    "Source",
    "clear_handles",
    "natural_key",
]

Region = tuple[slice, ...]


# --------------------------------------------------------------------------- helpers


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value.

    >>> sorted(["img_10.tif", "img_2.tif"], key=natural_key)
    ['img_2.tif', 'img_10.tif']
    """
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _fspath(path: Any) -> str:
    return os.path.abspath(os.fspath(path))


def split_at_suffix(path: Any, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """Split ``path`` after its first element (not the root) ending in one of
    ``suffixes``: the container and the ``/``-joined path inside it (without one,
    the path itself and ``""``)."""
    p = _fspath(path)
    parts = p.split(os.sep)
    for i, part in enumerate(parts):
        if part.lower().endswith(suffixes) and i > 0:
            return os.sep.join(parts[: i + 1]), "/".join(x for x in parts[i + 1 :] if x)
    return p, ""


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


class _HandleCache:
    """Open file handles, one per (process, key), least recently used dropped.

    Keys carry the pid so that a forked worker never reuses its parent's handle
    (h5py and tifffile handles are not fork-safe).  Evicted handles are *not*
    closed here: another thread may still be reading through one; dropping the
    reference lets it close when the last reader is done.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, opener: Callable[[], Any]) -> Any:
        key = (os.getpid(), key)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        # Open outside the lock: opening can be slow (network file systems).
        value = opener()
        with self._lock:
            if key in self._items:  # another thread won the race; use its handle
                return self._items[key]
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for h in items:
            close = getattr(h, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass


HANDLES = _HandleCache()


def clear_handles() -> None:
    """Close every file handle cached by this process (e.g. before deleting files)."""
    HANDLES.clear()


def _normalize_region(region: Any, shape: tuple[int, ...]) -> Region:
    """A full tuple of in-bounds unit-step slices, or an error saying why not."""
    if not isinstance(region, tuple):
        region = (region,)
    if len(region) > len(shape):
        raise IndexError(
            f"Expected at most {len(shape)} slices for shape {shape}. Got {region!r}."
        )
    out = []
    for s, n in zip(region + (slice(None),) * (len(shape) - len(region)), shape):
        if not isinstance(s, slice):
            raise TypeError(f"Expected a tuple of slices. Got {region!r}.")
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"Expected unit-step slices. Got {s!r}.")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _aligned_axis(block: int, n: int, requested: Sequence[int] | None, align: bool) -> tuple:
    """Block sizes along one axis: ``requested`` rounded up to whole disk blocks."""
    if requested is None:
        requested = (block,) * (n // block) + ((n % block,) if n % block else ())
    if not align or n == 0:
        return tuple(requested)
    bounds = [0]
    for size in requested:
        end = bounds[-1] + size
        end = min(n, math.ceil(end / block) * block)  # round each boundary up
        if end > bounds[-1]:
            bounds.append(end)
    if bounds[-1] != n:
        bounds.append(n)
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


# --------------------------------------------------------------------------- sources


class Source(ABC):
    """A lazily opened array on disk.

    Subclasses set ``path``, ``shape``, ``dtype`` and ``chunks`` in ``__init__``
    (cheap metadata only) and implement :meth:`_read`.

    Attributes
    ----------
    path : str
        Id of the source (absolute path, folder or glob); accounting key.
    shape : tuple of int
    dtype : numpy.dtype
    chunks : tuple of int
        Shape of one disk block, the smallest piece a task should read whole
        (a zarr shard or chunk, an HDF5 chunk, one TIFF page or file).
    default_chunks : tuple of int
        Block shape :meth:`to_dask` uses when not told otherwise (a whole
        multiple of ``chunks``).
    """

    kind: ClassVar[str] = "source"
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def default_chunks(self) -> tuple[int, ...]:
        return self.chunks

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def decode_copies(self) -> float:
        """Bytes a read holds per voxel of a block while it reads and decodes it, in
        copies of the item size (the memory models count it beside the block): three
        unless a format knows better (a chunk's compressed bytes, its decode, the copy
        into the result)."""
        return 3.0

    def _token_parts(self) -> tuple:
        """What identifies the data: path, modification time, options."""
        return (self.kind, self.path, _mtime(self.path), self.shape, str(self.dtype))

    @property
    def token(self) -> str:
        """Deterministic name of this source's contents (changes when the file does)."""
        from dask.base import tokenize

        return tokenize(*self._token_parts())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    # ---- reading

    @abstractmethod
    def _read(self, region: Region) -> np.ndarray:
        """Read a normalised, in-bounds region (subclasses)."""

    def _read_into(self, region: Region, out: np.ndarray) -> None:
        """Read a normalised, in-bounds region into ``out`` (its shape and dtype
        checked); formats that can read in place override it."""
        out[...] = self._read(region)

    def _chunk_ids(self, region: Region) -> Iterator[tuple[int, ...]]:
        """Indices of the disk blocks a region touches (for the accounting)."""
        ranges = [
            range(s.start // c, -(-s.stop // c)) if s.stop > s.start else range(0)
            for s, c in zip(region, self.chunks)
        ]
        return itertools.product(*ranges)

    def read(self, region: tuple[slice, ...] = (), out: np.ndarray | None = None) -> np.ndarray:
        """Read ``region`` (a tuple of unit-step slices) into a new numpy array, or into
        ``out``.

        Parameters
        ----------
        region
            One slice per axis (missing trailing axes mean the whole axis).
        out
            An array of the region's shape and ``self.dtype`` to read into (a sweep's
            slab: the planes of its rows read in place, not read and then copied).

        Returns
        -------
        numpy.ndarray
            The data, of shape given by the region and dtype ``self.dtype`` (``out``
            when given).

        Raises
        ------
        SourceError
            When the file is missing, truncated, corrupt or inconsistent.
        ValueError
            When ``out``'s shape or dtype is not the region's.
        """
        region = _normalize_region(region, self.shape)
        expected = tuple(s.stop - s.start for s in region)
        if out is not None:
            if out.shape != expected or out.dtype != self.dtype:
                raise ValueError(
                    f"read of {self.path} at {_fmt_region(region)}: out= must have shape "
                    f"{expected} and dtype {self.dtype}, not {out.shape} and {out.dtype}."
                )
            self._read_into(region, out)
        else:
            out = self._read(region)
        if out.shape != expected or out.dtype != self.dtype:
            raise SourceError(
                f"Expected a block of shape {expected} and dtype {self.dtype} from {self.path} "
                f"at {_fmt_region(region)}. Got shape {out.shape}, dtype {out.dtype}: the file "
                "changed or is inconsistent with its metadata."
            )
        if REGISTRY.tracking:
            REGISTRY.read(self.path, out.nbytes, self._chunk_ids(region))
        else:  # hot path: just the number of disk chunks touched
            n = 1
            for s, c in zip(region, self.chunks):
                n *= -(-s.stop // c) - s.start // c if s.stop > s.start else 0
            REGISTRY.read(self.path, out.nbytes, n)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        # Lets numpy-style code (and dask.array.from_array) use a source directly.
        return self.read(key)

    def _block_reader(self, region: Region) -> tuple[Source, Region]:
        """The (small) object a block task carries and the region it reads.

        Overridden by sources whose metadata grows with the data (a TIFF stack's
        file list), so that each task pickles only what it needs.
        """
        return self, region

    def block_chunks(
        self, chunks: Any = None, *, align: bool = True
    ) -> tuple[tuple[int, ...], ...]:
        """Dask chunks for :meth:`to_dask`: ``chunks`` rounded up to whole disk blocks.

        Parameters
        ----------
        chunks
            Anything :func:`dask.array.core.normalize_chunks` accepts, or ``None``
            for :attr:`default_chunks`.
        align
            Round block boundaries up to disk block boundaries (default), so no
            task reads part of a chunk or shard that another task reads too.
        """
        from dask.array.core import normalize_chunks

        if chunks is None:
            requested = [
                _aligned_axis(b, n, None, False) for b, n in zip(self.default_chunks, self.shape)
            ]
        else:
            requested = list(
                normalize_chunks(chunks, self.shape, dtype=self.dtype, previous_chunks=self.chunks)
            )
        return tuple(
            _aligned_axis(b, n, r, align) for b, n, r in zip(self.chunks, self.shape, requested)
        )

    def to_dask(self, chunks: Any = None, *, align: bool = True, name: str | None = None):
        """This source as a lazy dask array whose only layer is a root layer.

        Parameters
        ----------
        chunks
            Block shape (see :meth:`block_chunks`); default follows the disk layout.
        align
            Round blocks up to whole disk blocks.
        name
            Layer name; default ``"imread-" + token`` (deterministic).

        Returns
        -------
        dask.array.Array
            One task per block; each task reads its region and has no dependency.
        """
        from dask.base import tokenize

        from dask_sweep.io.host import HOST

        bchunks = self.block_chunks(chunks, align=align)
        name = name or f"imread-{tokenize(self.token, bchunks)}"
        # the read tasks are written by dask_sweep.emit.io_graphs (handed in: io is a leaf)
        return HOST.source_array(self, bchunks, name)

    def __dask_tokenize__(self) -> str:
        return self.token


def _fmt_region(region: Region) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


# --------------------------------------------------------------------------- sinks


_PROGRESS_VERSION = 2

# A record line of a progress log: W (written, not yet synced), D (synced: done) or F (its
# sync failed: never to be recorded) and the slab's rows.  A line counts only with its
# newline: a crash can leave a log's last line torn, never a complete but wrong one.
_LOG_LINE = re.compile(rb"^([WDF]) (\d+) (\d+)\n", re.M)
_LOG_LOCK = threading.Lock()


@functools.cache
def _host() -> str:
    """This machine's name, as a log's name holds it (a process writes only its own)."""
    return socket.gethostname().replace(os.sep, "_")


class Sink(ABC):
    """An output written slab by slab along axis 0, resumable, published atomically.

    Creating a sink checks the target (raising :class:`SinkError` *before*
    anything is written) and creates the temporary output ``<path>.partial``
    and the progress record ``<path>.progress/``.  A sink pickles (paths and
    metadata only), so slab tasks on any worker can call :meth:`write_slab`.

    Parameters
    ----------
    path
        Final output path.
    shape, dtype
        Of the whole output.
    overwrite
        Replace an existing complete output (it stays in place until
        :meth:`finalize` publishes the new one).
    resume
        Continue an interrupted write of the same shape/dtype/layout; the
        slabs recorded as done are not written again.
    slab_rows
        Rows per slab in :meth:`slabs` (rounded up to whole chunks/shards
        along axis 0; default: ``sweep.target-slab-bytes``, at most a quarter
        of ``sweep.memory-limit``).
    fsync
        Flush each slab to stable storage before recording it as done.
    sync_bytes
        Slabs written with ``commit=False`` are synced and recorded in groups
        of at least this many bytes (default ``sweep.sync-bytes``, 64 MiB), one
        group at a time on a helper thread.  The kernel's page cache holds up to
        about two groups of written, unsynced output (not this process's
        memory); a hard crash makes ``resume=True`` redo at most those slabs.
        ``0`` syncs every slab on its own.
    memory_limit
        Budget the default slab rows (and a Zarr sink's default chunks) are sized
        for; default: the active sweep's, else ``sweep.memory-limit``.
    """

    kind: ClassVar[str] = "sink"
    #: dtypes the format can hold (``None``: anything numpy can store).
    supported_kinds: ClassVar[str | None] = None

    def __init__(
        self,
        path: Any,
        shape: Sequence[int],
        dtype: Any,
        *,
        overwrite: bool = False,
        resume: bool = False,
        slab_rows: int | None = None,
        fsync: bool = True,
        sync_bytes: int | str | None = None,
        memory_limit: int | str | None = None,
    ) -> None:
        self.path = _fspath(path)
        self.memory_limit = memory_limit
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.fsync = fsync
        self.sync_bytes = _sync_bytes(sync_bytes)
        if len(self.shape) < 1:
            raise SinkError(
                f"Expected an array with at least one axis for {self.path}. Got a scalar."
            )
        self._check_dtype()
        self._setup()  # subclass: layout (chunks, shards...) from options
        self.slab_rows = self._slab_rows(slab_rows)
        self._open(overwrite=overwrite, resume=resume)

    # ---- layout

    @property
    def partial_path(self) -> str:
        return self.path + ".partial"

    @property
    def progress_path(self) -> str:
        return self.path + ".progress"

    @property
    def row_step(self) -> int:
        """Rows of one output chunk (or shard) along axis 0: slab boundaries fall on these."""
        return 1

    @abstractmethod
    def _setup(self) -> None:
        """Derive the output layout (chunks, file names...) from the options."""

    def _check_dtype(self) -> None:
        if self.dtype.kind in "OVUSMm" or (
            self.supported_kinds is not None and self.dtype.kind not in self.supported_kinds
        ):
            raise SinkError(
                f"Cannot write dtype {self.dtype} to {self.path}: {type(self).__name__} "
                f"supports {self._supported_text()}. Convert the array first "
                "(e.g. x.astype('float32'))."
            )

    def _supported_text(self) -> str:
        names = {"b": "bool", "u": "unsigned int", "i": "int", "f": "float", "c": "complex"}
        kinds = self.supported_kinds or "buifc"
        return ", ".join(names[k] for k in kinds if k in names) + " dtypes"

    def _slab_rows(self, slab_rows: int | None) -> int:
        step = self.row_step
        if slab_rows is None:
            target = min(self.settings().target_slab_bytes, chain_slab_bytes(self.settings()))
            row_bytes = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)
            slab_rows = max(1, target // row_bytes)
        slab_rows = max(step, math.ceil(int(slab_rows) / step) * step)
        return min(slab_rows, max(step, self.shape[0]))

    def settings(self):
        """The sweep settings this sink sizes its slabs for (``memory_limit`` given, else
        the active sweep's, else ``sweep.*``)."""
        from dask_sweep.io.host import HOST

        return HOST.settings(memory_limit=self.memory_limit)

    def slabs(self) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges of the slabs, in sweep order."""
        n, k = self.shape[0], self.slab_rows
        return [(a, min(a + k, n)) for a in range(0, n, k)] if n else [(0, 0)]

    def manifest(self) -> dict:
        """What must match for a resumed write to continue this one."""
        return {
            "version": _PROGRESS_VERSION,
            "format": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "layout": self._layout(),
        }

    def _layout(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    # ---- the lifecycle

    def _group_key(self) -> tuple:
        """This write's group-sync state in this process (a new sink: a new write)."""
        return (os.getpid(), self.progress_path, self._write_id)

    def _open(self, *, overwrite: bool, resume: bool) -> None:
        self._write_id = uuid.uuid4().hex
        interrupted = os.path.lexists(self.partial_path) or os.path.lexists(self.progress_path)
        if interrupted:
            if resume and self._resumable():
                # the interrupted run's unsynced slabs are redone: only its done slabs stay
                self._restart_logs()
                return
            if not (resume or overwrite):
                raise SinkError(
                    f"Found an incomplete output of an interrupted write at {self.partial_path}. "
                    "Pass resume=True to continue it or overwrite=True to start over."
                )
            _remove(self.partial_path)
            _remove(self.progress_path)
        if os.path.lexists(self.path) and not overwrite:
            raise SinkError(
                f"Output {self.path} already exists. Pass overwrite=True to replace it."
            )
        os.makedirs(self.progress_path)
        _write_json(os.path.join(self.progress_path, "manifest.json"), self.manifest(), True)
        self._create()

    def _resumable(self) -> bool:
        """Whether the record left by an interrupted run can be continued."""
        try:
            with open(os.path.join(self.progress_path, "manifest.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            return False  # crashed while starting: nothing worth keeping
        if not os.path.lexists(self.partial_path):
            return False
        if old.get("version") != _PROGRESS_VERSION:
            raise SinkError(
                f"Cannot resume the write to {self.path}: its record of progress "
                f"(version {old.get('version')}) was left by another version of dask_sweep "
                f"(this one writes version {_PROGRESS_VERSION}). Pass overwrite=True to start "
                "over."
            )
        if old != self.manifest():
            raise SinkError(
                f"Cannot resume the write to {self.path}: it was started with "
                f"{_describe(old)}, this write has {_describe(self.manifest())}. "
                "Pass overwrite=True to start over."
            )
        return True

    @abstractmethod
    def _create(self) -> None:
        """Create the empty temporary output at ``partial_path``."""

    @abstractmethod
    def _write(self, start: int, data: np.ndarray) -> int:
        """Write rows ``start:start+len(data)`` (not yet synced); return chunks written."""

    def _files(self, start: int, stop: int) -> list[str]:
        """The files holding rows ``start:stop`` of the temporary output (synced on commit)."""
        return [self.partial_path] if os.path.isfile(self.partial_path) else []

    def _publish(self) -> None:
        """Move ``partial_path`` to ``path`` (replacing an older output)."""
        old = None
        if os.path.lexists(self.path):
            # Keep the previous output until the new one is in place.
            old = f"{self.path}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
        os.rename(self.partial_path, self.path)
        if old is not None:
            _remove(old)

    def write_slab(self, start: int, data: np.ndarray, *, commit: bool = True) -> dict:
        """Write rows ``start : start + len(data)`` (all of axes 1...) and record them.

        Parameters
        ----------
        start
            First row; a multiple of :attr:`row_step`.
        data
            The slab, shape ``(rows, *shape[1:])``; ``start + rows`` is a multiple
            of :attr:`row_step` or the end of the output.
        commit
            Sync the slab and record it as done before returning.  ``False``
            starts the write-back to disk, marks the slab *written* and leaves
            syncing and recording to the group sync (``sync_bytes``), to
            :meth:`sync` or to :meth:`finalize`, so a sweep computes the next
            slabs while the disk writes this one.

        Returns
        -------
        dict
            A small completion marker ``{"start", "stop", "nbytes"}`` for chaining.

        Raises
        ------
        SinkError
            On a misaligned or misshapen slab, or a failed write (or a failed
            group sync of earlier slabs).
        """
        data = np.asarray(data)
        stop = start + data.shape[0] if data.ndim else start
        if data.shape[1:] != self.shape[1:] or data.ndim != len(self.shape):
            raise SinkError(
                f"Expected a slab of shape (rows, {', '.join(map(str, self.shape[1:]))}) for "
                f"{self.path}. Got shape {data.shape}."
            )
        step = self.row_step
        if (
            start < 0
            or stop > self.shape[0]
            or start % step
            or (stop % step and stop != self.shape[0])
        ):
            raise SinkError(
                f"Expected slab rows on multiples of {step} (the chunk size of {self.path} "
                f"along axis 0) within 0:{self.shape[0]}. Got rows {start}:{stop}."
            )
        if data.dtype != self.dtype:
            data = data.astype(self.dtype)
        try:
            nchunks = self._write(start, data)
            if self.fsync and not commit:
                for f in self._files(start, stop):
                    fadvise(f, "DONTNEED")  # write-back started now
        except SinkError:
            raise
        except Exception as e:
            raise SinkError(f"Failed to write rows {start}:{stop} of {self.path}: {e}") from e
        REGISTRY.write(self.path, data.nbytes, nchunks)
        marker = {"start": int(start), "stop": int(stop), "nbytes": int(data.nbytes)}
        if commit:
            self.commit_slab(start, stop)
        else:
            # the mark follows the bytes: any process may sync and record it later
            self._log("W", [(start, stop)])
            _group_sync(self).add(self, start, stop, data.nbytes)
        return marker

    # ---- the record of progress: one append-only log per process and write
    #
    # A file per slab (a mark, renamed to a record once synced) cost an inode and a
    # directory entry each: 0.5-0.9 ms per create on ext4 right after an earlier output
    # was deleted, as much as writing the slab itself for one-plane slabs of a TIFF
    # stack, and a million files for a million slabs.  A line appended costs ~10 us.

    def _log_path(self) -> str:
        """This process's log for this write (a process writes only its own log, so no
        two writers share a file, on any file system)."""
        return os.path.join(self.progress_path, f"log-{_host()}-{os.getpid()}-{self._write_id}")

    def _log(self, kind: str, slabs: Sequence[tuple[int, int]]) -> None:
        """Append ``kind`` records of ``slabs`` to this process's log (not synced: a
        record lost in a crash only makes resume redo its slab)."""
        if not slabs:
            return
        data = b"".join(b"%s %d %d\n" % (kind.encode(), a, b) for a, b in slabs)
        with _LOG_LOCK:
            fd = os.open(self._log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                view = memoryview(data)
                while view:  # one write on a local disk; the loop for short writes
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

    def _progress(self) -> tuple[set, set] | None:
        """``(done, pending)`` slabs from every log (:func:`_read_progress`)."""
        return _read_progress(self.progress_path)

    def _restart_logs(self) -> None:
        """Keep only the done records of an interrupted run (in one new log, then the
        old logs removed): its *written* slabs are never trusted."""
        state = self._progress()
        done = sorted(state[0]) if state else []
        tmp = os.path.join(self.progress_path, f"tmp-{os.getpid()}-{self._write_id}")
        with open(tmp, "wb") as f:
            f.write(b"".join(b"D %d %d\n" % s for s in done))
        keep = os.path.join(self.progress_path, f"log-done-{self._write_id}")
        os.replace(tmp, keep)
        for n in os.listdir(self.progress_path):
            if n.startswith(("log-", "tmp-")) and n != os.path.basename(keep):
                _remove(os.path.join(self.progress_path, n))

    def commit_slab(self, start: int, stop: int) -> None:
        """Make rows ``start:stop`` durable, then record them as done.

        The record is written only after the rows' bytes (and the directory
        entries naming their files) are synced: a crash in between redoes the
        slab on ``resume=True``, never skips it.
        """
        self._commit([(start, stop)])

    def _commit(self, slabs: list[tuple[int, int]]) -> None:
        """Sync the files of ``slabs`` (then their directories, once), then record them."""
        if self.fsync and slabs:
            try:
                # a file may hold several slabs (HDF5, BigTIFF): synced once
                files = list(dict.fromkeys(f for a, b in slabs for f in self._files(a, b)))
                for f in files:
                    _fsync_file(f)
                for d in sorted({os.path.dirname(f) for f in files}):
                    _fsync_dir(d)
            except Exception as e:
                # A failed fsync may have dropped the dirty pages: a later fsync would
                # "succeed" on lost data, so these slabs must never be recorded.
                with contextlib.suppress(OSError):
                    self._log("F", slabs)
                rows = ", ".join(f"{a}:{b}" for a, b in slabs[:4])
                raise SinkError(f"Failed to sync rows {rows} of {self.path}: {e}") from e
            for f in files:
                fadvise(f, "DONTNEED")  # synced now: this drops its clean pages from the cache
        # The records themselves are not synced: they only ever follow the synced
        # data, and a record lost in a crash just makes resume redo the slab.  (A slab
        # recorded by two processes' syncs is recorded twice: harmless.)
        self._log("D", slabs)

    def sync(self) -> None:
        """Sync and record every slab written so far (by any process), then return.

        Waits for this process's group sync in flight, then commits the slabs
        marked *written* in the progress record: those of this process's open
        group and those other worker processes left unsynced.  Called by
        :meth:`finalize`, and by ``imwrite`` and the DSL when a run fails, so
        that the slabs it did write are kept for ``resume=True``.

        Raises
        ------
        SinkError
            If a sync failed (the slabs concerned stay unrecorded).
        """
        _group_sync(self).drain()
        state = self._progress()
        if state is not None:
            self._commit(sorted(state[1]))

    def done_slabs(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of the slabs recorded as written, sorted."""
        state = self._progress()
        if state is None:
            return [(0, self.shape[0])] if os.path.lexists(self.path) else []
        return sorted(state[0])

    def todo_slabs(self) -> list[tuple[int, int]]:
        """The slabs of :meth:`slabs` whose rows are not all recorded as done."""
        done = merge_ranges(self.done_slabs())
        return [(a, b) for a, b in self.slabs() if not _within(done, a, b)]

    def finalize(self) -> str:
        """Publish the output once every row is written; return its path.

        Raises
        ------
        SinkError
            If some rows were never written (naming them).
        """
        if not os.path.lexists(self.partial_path) and os.path.lexists(self.path):
            _remove(self.progress_path)  # published already (crash before cleanup)
            return self.path
        self.sync()
        _GROUPS.pop(self._group_key(), None)
        done = merge_ranges(self.done_slabs())
        missing = range_gaps(done, self.shape[0])
        if missing:
            text = ", ".join(f"{a}:{b}" for a, b in missing[:5])
            raise SinkError(
                f"Cannot finalize {self.path}: rows {text} were never written. "
                "Write them (or rerun with resume=True) before finalizing."
            )
        self._publish()
        _remove(self.progress_path)
        return self.path


# --------------------------------------------------------------------------- group sync


class _GroupSync:
    """One write's slabs written (``commit=False``) but not yet synced, in this process.

    Slabs are grouped until they hold ``sync_bytes``; the group is then synced
    and recorded on a helper thread while the writer goes on.  One group at a
    time: the next group waits for the previous one (which bounds the unsynced
    output in the page cache to about two groups), and that wait also raises
    the previous group's error in the writer.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.slabs: list[tuple[int, int]] = []
        self.nbytes = 0
        self.future: Any = None

    def add(self, sink: Sink, start: int, stop: int, nbytes: int) -> None:
        with self.lock:
            self.slabs.append((start, stop))
            self.nbytes += nbytes
            if self.nbytes < sink.sync_bytes:
                return
            group, self.slabs, self.nbytes = self.slabs, [], 0
            prev, self.future = self.future, None
            if prev is not None:
                prev.result()
            self.future = _sync_pool().submit(sink._commit, group)

    def drain(self) -> None:
        """Wait for the group in flight (raising its error); the open group is
        left to the caller, which finds its slabs by their marks."""
        with self.lock:
            prev, self.future = self.future, None
            self.slabs, self.nbytes = [], 0
            if prev is not None:
                prev.result()


_GROUPS: dict[tuple, _GroupSync] = {}
_GROUPS_LOCK = threading.Lock()
_SYNC_POOL: Any = None


def _group_sync(sink: Sink) -> _GroupSync:
    key = sink._group_key()
    with _GROUPS_LOCK:
        g = _GROUPS.get(key)
        if g is None:
            g = _GROUPS[key] = _GroupSync()
        return g


def _sync_pool():
    """The per-process helper threads that sync groups (fsync waits on the disk,
    not the GIL)."""
    global _SYNC_POOL
    with _GROUPS_LOCK:
        if _SYNC_POOL is None or getattr(_SYNC_POOL, "_pid", None) != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _SYNC_POOL = ThreadPoolExecutor(2, thread_name_prefix="dask-sweep-sync")
            _SYNC_POOL._pid = os.getpid()  # a forked child makes its own threads
        return _SYNC_POOL


#: Slabs the chained slab writer (``imwrite`` without the sweep) holds at once: the
#: slab being written and its blocks (or their concatenation), zarr's copy of the
#: chunks and the compressor's output, and the reads of the next ``lag = 2`` slabs.
#: Measured (threads, 64 MiB copied): up to 8.5 slabs of resident memory above the
#: runtime overhead (Zarr, zstd, 8 MiB slabs), 3-4 for TIFF slices.
CHAIN_SLABS = 9


def chain_slab_bytes(settings) -> int:
    """Bytes of one slab of the chained writer that keep it within ``settings``' budget."""
    return max(1, (settings.memory_limit - settings.runtime_overhead) // CHAIN_SLABS)


def _sync_bytes(value: int | str | None) -> int:
    """``sync_bytes`` from the argument, else ``sweep.sync-bytes`` (default 64 MiB)."""
    import dask

    from dask_sweep.config import parse_bytes

    if value is None:
        value = dask.config.get("sweep.sync-bytes", "64MiB")
    return parse_bytes(value, "sync_bytes", allow_zero=True)


def _describe(manifest: dict) -> str:
    return (
        f"format {manifest.get('format')}, shape {tuple(manifest.get('shape', ()))}, "
        f"dtype {manifest.get('dtype')}, layout {manifest.get('layout')}"
    )


def recorded_slabs(path: str | os.PathLike) -> list[tuple[int, int]]:
    """``(start, stop)`` of the slabs an unfinished write to ``path`` recorded as done
    (synced): what ``resume=True`` skips.  Empty when there is no record.

    >>> recorded_slabs("/nonexistent/out.zarr")
    []
    """
    state = _read_progress(os.fspath(path) + ".progress")
    return sorted(state[0]) if state else []


def _read_progress(folder: str) -> tuple[set, set] | None:
    """``(done, pending)`` slabs from every log in ``folder``: *pending* were written
    and not yet synced (nor failed); ``None`` when there is no record of progress."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("log-"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    done: set = set()
    pending: dict = {}  # slab -> the logs whose last word on it is "written"
    failed: dict = {}  # slab -> the logs that saw its sync fail
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                text = f.read()
        except FileNotFoundError:  # removed by a resume's restart meanwhile
            continue
        for m in _LOG_LINE.finditer(text):
            kind, slab = m.group(1), (int(m.group(2)), int(m.group(3)))
            if kind == b"D":
                done.add(slab)
            elif kind == b"W":
                pending.setdefault(slab, set()).add(name)
            else:
                failed.setdefault(slab, set()).add(name)
                pending.get(slab, set()).discard(name)
    # A failed sync voids every mark of its slab made before it, whichever process
    # wrote it (the kernel may have dropped those pages): a log's "written" after its
    # own "failed" counts again (the slab written anew); another log's failure wins.
    left = {
        s for s, logs in pending.items()
        if logs and s not in done and not failed.get(s, set()) - logs
    }
    return done, left


def _within(intervals: list[tuple[int, int]], a: int, b: int) -> bool:
    return a == b or any(x <= a and b <= y for x, y in intervals)


def _write_json(path: str, obj: dict, fsync: bool) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_at(path: str, offset: int, data: np.ndarray) -> None:
    """Write ``data``'s bytes (C order) into the existing file ``path`` at ``offset``.

    For outputs laid out in full when created (contiguous HDF5, BigTIFF): one
    ``pwrite`` loop, which hands the bytes to the kernel without the page
    faults of writing through a memory map.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        pwrite_all(fd, np.ascontiguousarray(data), offset)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Sync a directory's entries (new and renamed files); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. Windows, some network file systems
    finally:
        os.close(fd)


def fadvise(file: str | int, advice: str) -> None:
    """``posix_fadvise`` of a whole file (a path or an open descriptor), where it exists;
    ``advice`` names the ``POSIX_FADV_*`` constant.  A file that cannot be opened is left
    alone (a missing chunk is reported when it is read).

    ``"DONTNEED"`` starts write-back of a file's dirty pages now, without waiting (and
    drops its clean ones), so the disk works while the next slab is produced and the
    later ``fsync`` in :meth:`Sink.commit_slab` has little left to wait for;
    ``"WILLNEED"`` starts reading it into the page cache.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = file if isinstance(file, int) else os.open(file, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, getattr(os, f"POSIX_FADV_{advice}"))
    except OSError:
        pass
    finally:
        if not isinstance(file, int):
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
