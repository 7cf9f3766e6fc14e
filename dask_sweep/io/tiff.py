"""TIFF sources and sinks: folders of 2D slices, multi-page TIFF and BigTIFF.

A folder (or glob) of numbered slices is read one file per slice along axis 0,
naturally sorted (``img_2.tif`` before ``img_10.tif``); the numbering must be
consecutive, so a missing slice is an error naming it rather than a silently
shorter volume.  A multi-page file is memory-mapped when its pixel data is one
uncompressed contiguous block (what :class:`BigTiffSink` writes), and read page
by page otherwise.
"""

from __future__ import annotations

import glob
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dask_sweep.errors import SinkError, SourceError
from dask_sweep.io.base import HANDLES, Region, Sink, Source, _fspath, natural_key, write_at
from dask_sweep.utils import pwrite_all

__all__ = [
    "BigTiffSink",
    "TiffSource",
    "TiffStackSink",
    "TiffStackSource",
    "read_tiff",
    "read_tiff_stack",
]

_TIFF_SUFFIXES = (".tif", ".tiff")


def _tifffile():
    import tifffile

    return tifffile


def _open_checked(path: str, what: str):
    """Open a TIFF and check that its pages' pixel data lies inside the file."""
    tifffile = _tifffile()
    try:
        tif = tifffile.TiffFile(path)
    except FileNotFoundError as e:
        raise SourceError(f"{what} {path} does not exist.") from e
    except Exception as e:
        raise SourceError(f"{what} {path} is not a readable TIFF file: {e}") from e
    try:
        size = os.fstat(tif.filehandle.fileno()).st_size if _has_fileno(tif) else None
        if not tif.series:
            raise SourceError(f"{what} {path} holds no image data.")
        if size is not None:
            for i, page in enumerate(tif.series[0].pages):
                if page is None:
                    raise SourceError(
                        f"{what} {path} is truncated or corrupt: page {i} cannot be parsed."
                    )
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                if ends and max(ends) > size:
                    raise SourceError(
                        f"{what} {path} is truncated: page {i} needs {max(ends)} bytes, "
                        f"the file has {size}."
                    )
    except SourceError:
        tif.close()
        raise
    except Exception as e:
        tif.close()
        raise SourceError(f"{what} {path} is truncated or corrupt: {e}") from e
    return tif


def _has_fileno(tif) -> bool:
    try:
        tif.filehandle.fileno()
        return True
    except Exception:  # noqa: BLE001 - in-memory handles have no descriptor
        return False


# --------------------------------------------------------------------------- folder of slices


def _resolve_files(path: Any) -> tuple[str, tuple[str, ...]]:
    """(id, files in slice order) of a folder, a glob or an explicit list."""
    if isinstance(path, (list, tuple)):
        files = tuple(_fspath(p) for p in path)
        if not files:
            raise SourceError("Expected at least one TIFF file. Got an empty list.")
        return files[0] + f" (+{len(files) - 1} files)", files
    p = os.fspath(path)
    if os.path.isdir(p):
        names = [n for n in os.listdir(p) if n.lower().endswith(_TIFF_SUFFIXES)]
        names = [n for n in names if not n.startswith(".")]  # our temp files, macOS debris
        files = [os.path.join(p, n) for n in names]
        where = f"folder {_fspath(p)}"
    else:
        files = glob.glob(p)
        where = f"pattern {p}"
    if not files:
        raise SourceError(
            f"No TIFF files found for {where}. Expected a folder of .tif/.tiff slices or a "
            "glob such as 'stack/img_*.tif'."
        )
    files = sorted((_fspath(f) for f in files), key=natural_key)
    _check_numbering(files)
    return _fspath(p), tuple(files)


def _check_numbering(files: list[str]) -> None:
    """Refuse gaps and duplicates in the slice numbering (the last number of each name)."""
    if len(files) < 2:
        return
    parsed = []
    for f in files:
        m = re.fullmatch(r"(.*?)(\d+)(\D*)", os.path.basename(f))
        if m is None:
            raise SourceError(
                f"Cannot order slice file {f}: its name has no number. Expected numbered "
                "names such as img_0001.tif; pass an explicit list of files to choose the order."
            )
        parsed.append((os.path.dirname(f), m.group(1), int(m.group(2)), m.group(3), m.group(2)))
    stems = {(d, a, c) for d, a, _, c, _ in parsed}
    if len(stems) > 1:
        examples = sorted({os.path.basename(f) for f in files})[:3]
        raise SourceError(
            f"Slice files do not share one naming pattern (e.g. {examples}). Expected names "
            "differing only in their number; use a glob such as 'img_*.tif' to pick one series."
        )
    numbers = [n for _, _, n, _, _ in parsed]
    for (f0, p0), (f1, p1) in zip(zip(files, parsed), zip(files[1:], parsed[1:])):
        if p1[2] == p0[2]:
            raise SourceError(f"Slice files {f0} and {f1} have the same number {p0[2]}.")
        if p1[2] != p0[2] + 1:
            width = len(p0[4]) if len(p0[4]) == len(p1[4]) else 0
            gap = [
                os.path.join(p0[0], f"{p0[1]}{n:0{width}d}{p0[3]}")
                for n in range(p0[2] + 1, p1[2])
            ]
            shown = ", ".join(os.path.basename(g) for g in gap[:3]) + (
                " ..." if len(gap) > 3 else ""
            )
            raise SourceError(
                f"Slice {shown} is missing in {os.path.dirname(f0)}: numbering jumps from "
                f"{os.path.basename(f0)} to {os.path.basename(f1)} (slice index "
                f"{numbers.index(p0[2]) + 1}). Expected consecutive numbers; pass an explicit "
                "list of files to read an incomplete series."
            )


class TiffStackSource(Source):
    """A folder (or glob, or list) of 2D TIFF files, one slice each along axis 0.

    Parameters
    ----------
    path
        A folder, a glob pattern (``"stack/img_*.tif"``) or a list of files (taken
        in the given order, numbering not checked).
    slices_per_chunk
        Slices per dask block in :meth:`to_dask` by default.
    validate
        Read every file's header now and refuse slices of another shape or dtype
        (or truncated files) before anything runs; ``False`` reads only the first
        header and checks each slice when it is read.  The headers read now also
        say where uncompressed pixels lie: those slices are then read straight
        into the result, without parsing the file again (a file changed since is
        parsed and checked as usual).
    """

    kind = "tiff-stack"

    def __init__(self, path: Any, *, slices_per_chunk: int = 1, validate: bool = True) -> None:
        self.path, self.files = _resolve_files(path)
        self.slices_per_chunk = int(slices_per_chunk)
        self._offset = 0  # index of files[0] in the whole stack (for block readers)
        # where each slice's pixels lie when stored raw (read straight into the
        # result, no TIFF parsing per read); None: parse each file when read
        self._raw: tuple | None = None
        plane, dtype, raw0 = self._header(0)
        self._raw0 = raw0 is not None
        self.shape = (len(self.files), *plane)
        self.dtype = dtype
        self.chunks = (1, *plane)
        if validate:
            raw = [raw0]
            for i in range(1, len(self.files)):
                shape, dt, r = self._header(i)
                self._check_slice(i, shape, dt)
                raw.append(r)
            self._raw = tuple(raw)
        self._mtime = max(os.stat(f).st_mtime_ns for f in self.files)

    @property
    def default_chunks(self) -> tuple[int, ...]:
        return (self.slices_per_chunk, *self.shape[1:])

    @property
    def decode_copies(self) -> float:
        """Uncompressed slices are read straight into the result (traced: one copy);
        a compressed slice holds its bytes, their decode, tifffile's copies and zlib's
        buffers (traced on zlib noise, 256^2 slices: 4.5 copies of uint8, 5.9 of uint16,
        5.0 of float32; 3-3.7 and a few hundred KiB of buffers on 1024^2): 2 and 7."""
        # not validated: the first slice's layout stands for the stack's
        raw = self._raw0 if self._raw is None else all(r is not None for r in self._raw)
        return 2.0 if raw else 7.0

    def _token_parts(self) -> tuple:
        return (self.kind, self.files, self._mtime, self.shape, str(self.dtype))

    def _header(self, i: int) -> tuple[tuple[int, ...], np.dtype, tuple | None]:
        """Shape, dtype and raw layout of slice ``i``.

        The layout ``(offset, swap, size, mtime_ns)`` is given when the pixels are
        stored uncompressed in one contiguous run of exactly the plane's bytes
        (``swap``: in the other byte order), else ``None``.
        """
        f = self.files[i]
        with _open_checked(f, f"Slice {i + self._offset}:") as tif:
            s = tif.series[0]
            shape, dtype = tuple(s.shape), np.dtype(s.dtype).newbyteorder("=")
            page = s.pages[0] if len(s.pages) == 1 else None
            raw = None
            if (
                page is not None
                and s.dataoffset is not None
                and int(page.compression) == 1
                and sum(page.databytecounts) == int(np.prod(shape)) * dtype.itemsize
                and dtype.kind in "biuf"
            ):
                st = os.fstat(tif.filehandle.fileno()) if _has_fileno(tif) else os.stat(f)
                swap = dtype.itemsize > 1 and tif.byteorder != np.dtype("=u2").str[0]
                raw = (int(s.dataoffset), swap, st.st_size, st.st_mtime_ns)
            return shape, dtype, raw

    def _check_slice(self, i: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if (shape, dtype) != (self.shape[1:], self.dtype):
            raise SourceError(
                f"Slice {i + self._offset} ({self.files[i]}) has shape {shape} and dtype "
                f"{dtype}. Expected shape {self.shape[1:]} and dtype {self.dtype} like the "
                "first slice of the stack."
            )

    def _read(self, region: Region) -> np.ndarray:
        out = np.empty(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        self._read_into(region, out)
        return out

    def _read_into(self, region: Region, out: np.ndarray) -> None:
        inplane = region[1:]
        whole = all(r.start == 0 and r.stop == n for r, n in zip(inplane, self.shape[1:]))
        for j, z in enumerate(range(region[0].start, region[0].stop)):
            f = self.files[z]
            if (whole and self._raw is not None and self._raw[z] is not None
                    and out[j].flags.c_contiguous):
                if self._read_raw(z, out[j]):
                    continue
            with _open_checked(f, f"Slice {z + self._offset}:") as tif:
                s = tif.series[0]
                self._check_slice(z, tuple(s.shape), np.dtype(s.dtype).newbyteorder("="))
                try:
                    plane = s.asarray()
                except Exception as e:
                    raise SourceError(
                        f"Slice {z + self._offset} ({f}) could not be decoded: {e}"
                    ) from e
            out[j] = plane[inplane]

    def _read_raw(self, z: int, dst: np.ndarray) -> bool:
        """Read slice ``z``'s stored pixels straight into ``dst`` (C-contiguous).

        ``False`` when the file changed since its header was read (then it is
        parsed again, and checked, like any other).
        """
        offset, swap, size, mtime = self._raw[z]
        f = self.files[z]
        try:
            fh = open(f, "rb", buffering=0)
        except OSError as e:
            raise SourceError(f"Slice {z + self._offset}: {f} cannot be opened: {e}") from e
        with fh:
            st = os.fstat(fh.fileno())
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                return False
            fh.seek(offset)
            view = memoryview(dst).cast("B")
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise SourceError(
                        f"Slice {z + self._offset}: {f} is truncated: its pixels need "
                        f"{len(view)} bytes from offset {offset}, {got} could be read."
                    )
                got += n
        if swap:
            dst.byteswap(inplace=True)
        return True

    def _chunk_ids(self, region: Region):
        return ((z + self._offset,) for z in range(region[0].start, region[0].stop))

    def _block_reader(self, region: Region) -> tuple[Source, Region]:
        # Each task carries only the names of its own slices, not the whole list.
        a, b = region[0].start, region[0].stop
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub.files = self.files[a:b]
        sub._raw = None if self._raw is None else self._raw[a:b]
        sub._offset = self._offset + a
        sub.shape = (b - a, *self.shape[1:])
        return sub, (slice(0, b - a), *region[1:])


def read_tiff_stack(
    path: Any, *, chunks: Any = None, slices_per_chunk: int = 1, validate: bool = True
):
    """Open a folder or glob of 2D TIFF slices lazily as a dask array.

    Parameters
    ----------
    path
        Folder, glob pattern or list of files (see :class:`TiffStackSource`).
    chunks
        Dask chunks (rounded up to whole slices); default ``slices_per_chunk``
        slices by the full plane.
    slices_per_chunk
        Slices per block when ``chunks`` is not given.
    validate
        Check every file's header up front.

    Returns
    -------
    dask.array.Array

    Examples
    --------
    >>> x = read_tiff_stack("stack/img_*.tif")  # doctest: +SKIP
    """
    src = TiffStackSource(path, slices_per_chunk=slices_per_chunk, validate=validate)
    return src.to_dask(chunks)


# --------------------------------------------------------------------------- one multi-page file


class _TiffHandle:
    """A TiffFile shared by the threads of one process; page decoding is serialised."""

    def __init__(self, path: str) -> None:
        self.tif = _tifffile().TiffFile(path)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.tif.close()


class TiffSource(Source):
    """One multi-page TIFF or BigTIFF file (one series of it).

    Parameters
    ----------
    path
        The file.
    series
        Index of the series to read.
    slices_per_chunk
        Leading-axis entries (pages, for a 3D stack) per dask block by default.
    memmap
        Memory-map the pixel data when it is one uncompressed contiguous block.
    """

    kind = "tiff"

    def __init__(
        self, path: Any, *, series: int = 0, slices_per_chunk: int = 1, memmap: bool = True
    ) -> None:
        self.path = _fspath(path)
        self.series = int(series)
        self.slices_per_chunk = int(slices_per_chunk)
        with _open_checked(self.path, "TIFF file") as tif:
            if not 0 <= self.series < len(tif.series):
                raise SourceError(
                    f"TIFF file {self.path} has {len(tif.series)} series. Expected "
                    f"series in 0..{len(tif.series) - 1}, got {series}."
                )
            s = tif.series[self.series]
            self.shape = tuple(s.shape)
            self._file_dtype = np.dtype(s.dtype).str
            self.dtype = np.dtype(s.dtype).newbyteorder("=")
            size = os.path.getsize(self.path)
            nbytes = self.nbytes
            self._dataoffset: int | None = None
            if s.dataoffset is not None:
                if s.dataoffset + nbytes > size:
                    raise SourceError(
                        f"TIFF file {self.path} is truncated: its pixel data needs "
                        f"{s.dataoffset + nbytes} bytes, the file has {size}."
                    )
                if memmap:
                    self._dataoffset = int(s.dataoffset)
            page_shape = tuple(s.keyframe.shape)
            npage = len(page_shape)
            if self.shape[len(self.shape) - npage :] != page_shape:
                raise SourceError(
                    f"TIFF file {self.path}: series shape {self.shape} does not end with the "
                    f"page shape {page_shape}; this layout is not supported."
                )
            self._lead = self.shape[: len(self.shape) - npage]
            if int(np.prod(self._lead, dtype=np.int64)) != len(s.pages):
                raise SourceError(
                    f"TIFF file {self.path} has {len(s.pages)} pages in series {self.series}. "
                    f"Expected {int(np.prod(self._lead))} for shape {self.shape}."
                )
        self._mtime = os.stat(self.path).st_mtime_ns
        if self._dataoffset is not None:
            self.chunks = (1, *self.shape[1:])
        else:
            self.chunks = (1,) * len(self._lead) + page_shape

    @property
    def memmapped(self) -> bool:
        """Whether reads go through a memory map (uncompressed contiguous data)."""
        return self._dataoffset is not None

    @property
    def decode_copies(self) -> float:
        """A memory-mapped read copies once; compressed pages hold their bytes, their
        decode and tifffile's copies (as :class:`TiffStackSource`'s): 2 and 7."""
        return 2.0 if self.memmapped else 7.0

    @property
    def default_chunks(self) -> tuple[int, ...]:
        if not self._lead and not self.memmapped:
            return self.chunks
        return (self.slices_per_chunk, *self.chunks[1:])

    def _token_parts(self) -> tuple:
        return (self.kind, self.path, self._mtime, self.series, self.shape, str(self.dtype))

    def _read(self, region: Region) -> np.ndarray:
        if self._dataoffset is not None:
            mm = HANDLES.get(("tiff-mm", self.path, self._mtime), self._memmap)
            return np.array(mm[region], dtype=self.dtype)
        handle = HANDLES.get(("tiff", self.path, self._mtime), lambda: _TiffHandle(self.path))
        s = handle.tif.series[self.series]
        nlead = len(self._lead)
        out = np.empty(tuple(r.stop - r.start for r in region), dtype=self.dtype)
        lead_ranges = [range(r.start, r.stop) for r in region[:nlead]]
        for idx in np.ndindex(*[len(r) for r in lead_ranges]):
            lead = tuple(r[i] for r, i in zip(lead_ranges, idx))
            p = int(np.ravel_multi_index(lead, self._lead)) if nlead else 0
            try:
                with handle.lock:
                    page = s.pages[p].asarray()
            except Exception as e:
                raise SourceError(
                    f"TIFF file {self.path}: page {p} could not be decoded (corrupt?): {e}"
                ) from e
            out[idx] = page[region[nlead:]]
        return out

    def _memmap(self) -> np.memmap:
        return np.memmap(
            self.path, dtype=self._file_dtype, mode="r", offset=self._dataoffset, shape=self.shape
        )


def read_tiff(path: Any, *, chunks: Any = None, series: int = 0, slices_per_chunk: int = 1):
    """Open a multi-page TIFF or BigTIFF lazily as a dask array.

    Parameters
    ----------
    path
        The file.
    chunks
        Dask chunks (rounded up to whole pages); default ``slices_per_chunk``
        pages per block.
    series
        Which series of the file.
    slices_per_chunk
        Pages per block when ``chunks`` is not given.

    Returns
    -------
    dask.array.Array
    """
    return TiffSource(path, series=series, slices_per_chunk=slices_per_chunk).to_dask(chunks)


# --------------------------------------------------------------------------- sinks


class TiffStackSink(Sink):
    """A folder with one TIFF file per slice along axis 0 (``img_0000.tif``...).

    Each file is written in the ``<path>.partial`` folder, which is renamed to
    ``path`` by :meth:`finalize`.

    Parameters
    ----------
    path, shape, dtype
        Output folder, and the whole array's shape (at least 3 axes) and dtype.
    prefix
        File name before the zero-padded slice number.
    compression
        Passed to :func:`tifffile.imwrite` (e.g. ``"zlib"``).
    **kwargs
        ``overwrite``, ``resume``, ``slab_rows``, ``fsync``, ``sync_bytes`` (see :class:`Sink`).
    """

    kind = "tiff-stack"
    supported_kinds = "uif"

    def __init__(
        self,
        path: Any,
        shape: Sequence[int],
        dtype: Any,
        *,
        prefix: str = "img_",
        compression: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.prefix = prefix
        self.compression = compression
        super().__init__(path, shape, dtype, **kwargs)

    def _setup(self) -> None:
        if len(self.shape) < 3:
            raise SinkError(
                f"Expected at least 3 axes to write a TIFF stack to {self.path}. Got shape "
                f"{self.shape}; write a single TIFF file (path ending in .tif) instead."
            )
        self.width = max(4, len(str(max(self.shape[0] - 1, 0))))

    def _layout(self) -> dict:
        return {"prefix": self.prefix, "width": self.width, "compression": self.compression}

    def filename(self, index: int) -> str:
        """Name of the file holding slice ``index``."""
        return f"{self.prefix}{index:0{self.width}d}.tif"

    def _create(self) -> None:
        os.makedirs(self.partial_path)

    def _write(self, start: int, data: np.ndarray) -> int:
        tifffile = _tifffile()
        head = self._head(data[0]) if len(data) else None
        for j, plane in enumerate(data):
            # In place, not renamed over (a rename per file took as long as the write on
            # ext4): the folder is the sink's own, and a slab not yet recorded (synced on
            # commit, Sink.commit_slab) is written again on resume.
            path = os.path.join(self.partial_path, self.filename(start + j))
            if head is not None:
                _write_file(path, head, plane)
                continue
            tifffile.imwrite(path, plane, compression=self.compression,
                             photometric="minisblack" if plane.ndim == 2 else None)
        return len(data)

    def _head(self, plane: np.ndarray) -> bytes | None:
        """The bytes tifffile writes before the pixels of an uncompressed slice like
        ``plane``, or ``None`` (written by tifffile).

        tifffile's Python work per file (its tags, ~0.13 ms) was most of a small slice's
        write: a file is written as the header of a template file, the same for every
        slice, then the pixels, so the files are tifffile's byte for byte.  Used where
        two templates (zeros, then distinct bytes) differ only in their pixels, which
        follow the header to the end of the file.
        """
        if self.compression is not None or not plane.flags.c_contiguous \
                or not plane.dtype.isnative or plane.dtype.kind not in "uif":
            return None
        key = (plane.shape, plane.dtype.str)
        cached = getattr(self, "_heads", None)
        if cached is None:
            cached = self._heads = {}
        if key not in cached:
            cached[key] = _template_head(plane.shape, plane.dtype)
        return cached[key]

    def _files(self, start: int, stop: int) -> list[str]:
        return [os.path.join(self.partial_path, self.filename(i)) for i in range(start, stop)]


def _template_head(shape: tuple, dtype: np.dtype) -> bytes | None:
    """The header of tifffile's file for an uncompressed array of ``shape`` and ``dtype``,
    where that file is the header then the pixels (checked on two templates)."""
    import io

    tifffile = _tifffile()
    files = []
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n > 1 << 30:  # tifffile lays large files out otherwise (BigTIFF)
        return None
    for fill in (np.zeros(shape, dtype), np.arange(n, dtype=np.uint8).view(dtype).reshape(shape)):
        buf = io.BytesIO()
        tifffile.imwrite(buf, fill, photometric="minisblack" if len(shape) == 2 else None)
        files.append((buf.getvalue(), fill))
    (a, za), (b, zb) = files
    head = a[: len(a) - n]
    if len(a) != len(b) or len(a) <= n or a != head + za.tobytes() or b != head + zb.tobytes():
        return None
    return head


def _write_file(path: str, head: bytes, plane: np.ndarray) -> None:
    """A new file holding ``head`` then ``plane``'s bytes (C order)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(head)
        while view:
            view = view[os.write(fd, view):]
        pwrite_all(fd, plane, len(head))
    finally:
        os.close(fd)


class BigTiffSink(Sink):
    """One uncompressed BigTIFF file, one page per slice along axis 0.

    The file's layout (headers, then one contiguous block of pixels) is written
    when the sink is created; slabs are written in place through a memory map,
    so any slab can be rewritten and a resumed write is byte-identical to an
    uninterrupted one.  :class:`TiffSource` memory-maps the result.
    """

    kind = "bigtiff"
    supported_kinds = "uif"

    def _setup(self) -> None:
        self._dataoffset: int | None = None

    def _create(self) -> None:
        tifffile = _tifffile()
        mm = tifffile.memmap(
            self.partial_path,
            shape=self.shape,
            dtype=self.dtype,
            bigtiff=True,
            photometric="minisblack",
        )
        self._dataoffset = int(mm.offset)
        del mm

    def _offset(self) -> int:
        if self._dataoffset is None:  # resumed: read it back from the header
            with _tifffile().TiffFile(self.partial_path) as tif:
                self._dataoffset = int(tif.series[0].dataoffset)
        return self._dataoffset

    def _write(self, start: int, data: np.ndarray) -> int:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        write_at(self.partial_path, self._offset() + start * row, data.astype(self.dtype, copy=False))
        return len(data)
