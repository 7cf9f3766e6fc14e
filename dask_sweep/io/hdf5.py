"""HDF5 datasets as sources and sinks.

A chunked dataset is read by whole HDF5 chunks (or multiples); a contiguous,
uncompressed one is read through a memory map of its data block (no HDF5 lock,
so threads read in parallel) in slabs along axis 0.

The sink creates the file and dataset once, with its storage allocated up front
(``H5D_ALLOC_TIME_EARLY``) and no time stamps.  Slabs then only overwrite bytes
at fixed offsets (a memory map for the default contiguous layout), never HDF5
metadata, so a crash cannot corrupt the file's structure and a resumed write is
byte-identical to an uninterrupted one.  Compression is therefore not offered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dask_sweep.errors import SinkError, SourceError
from dask_sweep.io.base import HANDLES, Region, Sink, Source, split_at_suffix, write_at

__all__ = ["HDF5Sink", "HDF5Source", "read_hdf5", "split_hdf5_path"]

_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
#: Bytes per block when slabbing a contiguous dataset along axis 0.
CONTIGUOUS_BLOCK_BYTES = 32 << 20


def split_hdf5_path(path: Any) -> tuple[str, str]:
    """Split ``"f.h5/grp/ds"`` into the file and the dataset path inside it.

    >>> split_hdf5_path("/data/f.h5/grp/ds")
    ('/data/f.h5', 'grp/ds')
    """
    return split_at_suffix(path, _SUFFIXES)


def _datasets(f) -> list[str]:
    import h5py

    out: list[str] = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


class HDF5Source(Source):
    """One HDF5 dataset.

    Parameters
    ----------
    path
        The file, optionally followed by the dataset path (``"f.h5/grp/ds"``).
    dataset
        Dataset path inside the file; may be omitted when the file has only one.
    rows_per_chunk
        For a contiguous dataset: rows per dask block (default: about 32 MiB).
    """

    kind = "hdf5"

    def __init__(
        self, path: Any, *, dataset: str | None = None, rows_per_chunk: int | None = None
    ) -> None:
        import h5py

        self.file, inner = split_hdf5_path(path)
        name = "/".join(p.strip("/") for p in (inner, dataset or "") if p.strip("/"))
        if not os.path.exists(self.file):
            raise SourceError(f"HDF5 file {self.file} does not exist.")
        try:
            f = h5py.File(self.file, "r")
        except OSError as e:
            raise SourceError(f"{self.file} is not a readable HDF5 file: {e}") from e
        with f:
            existing = _datasets(f)
            if not name:
                if len(existing) != 1:
                    raise SourceError(
                        f"HDF5 file {self.file} holds {len(existing)} datasets: {existing}. "
                        "Expected one; name it with dataset=... or 'file.h5/path/to/dataset'."
                    )
                name = existing[0]
            obj = f.get(name)
            if not isinstance(obj, h5py.Dataset):
                what = "is a group" if obj is not None else "does not exist"
                raise SourceError(
                    f"Dataset {name!r} {what} in HDF5 file {self.file}. "
                    f"Datasets in the file: {existing or 'none'}."
                )
            self.dataset = name
            self.shape = tuple(obj.shape)
            self.dtype = np.dtype(obj.dtype)
            if self.dtype.kind in "OV" and self.dtype.fields is None:
                raise SourceError(
                    f"Dataset {name!r} in {self.file} has dtype {self.dtype}; expected a "
                    "numeric dtype."
                )
            self.h5_chunks = tuple(obj.chunks) if obj.chunks else None
            offset = obj.id.get_offset()
            plain = obj.compression is None and not obj.external and obj.chunks is None
            self._offset = int(offset) if plain and offset is not None else None
        self.path = f"{self.file}/{self.dataset}"
        self._mtime = os.stat(self.file).st_mtime_ns
        row = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)
        self.rows_per_chunk = rows_per_chunk or max(1, CONTIGUOUS_BLOCK_BYTES // row)
        if self.h5_chunks:
            self.chunks = self.h5_chunks
        else:
            self.chunks = (1, *self.shape[1:]) if self.shape else ()

    @property
    def default_chunks(self) -> tuple[int, ...]:
        if self.h5_chunks or not self.shape:
            return self.chunks
        return (min(self.rows_per_chunk, max(1, self.shape[0])), *self.shape[1:])

    def _token_parts(self) -> tuple:
        return (self.kind, self.file, self.dataset, self._mtime, self.shape, str(self.dtype))

    def _read(self, region: Region) -> np.ndarray:
        if self._offset is not None:
            mm = HANDLES.get(("h5-mm", self.file, self.dataset, self._mtime), self._memmap)
            return np.array(mm[region])
        f = HANDLES.get(("h5", self.file, self._mtime), self._open)
        try:
            return np.asarray(f[self.dataset][region])
        except Exception as e:
            raise SourceError(
                f"Reading {region} of dataset {self.dataset!r} in {self.file} failed: {e}"
            ) from e

    def _open(self):
        import h5py

        return h5py.File(self.file, "r")

    def _memmap(self) -> np.memmap:
        return np.memmap(
            self.file, dtype=self.dtype, mode="r", offset=self._offset, shape=self.shape
        )


def read_hdf5(
    path: Any, *, dataset: str | None = None, chunks: Any = None, rows_per_chunk: int | None = None
):
    """Open an HDF5 dataset lazily as a dask array blocked by its HDF5 chunks.

    Parameters
    ----------
    path
        ``"f.h5"`` or ``"f.h5/group/dataset"``.
    dataset
        Dataset path inside the file (when not in ``path``).
    chunks
        Dask chunks, rounded up to whole HDF5 chunks.
    rows_per_chunk
        Rows per block of a contiguous dataset.

    Returns
    -------
    dask.array.Array
    """
    return HDF5Source(path, dataset=dataset, rows_per_chunk=rows_per_chunk).to_dask(chunks)


class HDF5Sink(Sink):
    """An HDF5 dataset written slab by slab along axis 0 (uncompressed).

    Parameters
    ----------
    path, shape, dtype
        Output file (optionally ``"f.h5/grp/ds"``) and the dataset's shape/dtype.
    dataset
        Dataset path inside the file (default ``"data"``).
    chunks
        HDF5 chunk shape; default ``None`` is a contiguous dataset.
    **kwargs
        ``overwrite``, ``resume``, ``slab_rows``, ``fsync``, ``sync_bytes`` (see :class:`Sink`).
    """

    kind = "hdf5"
    supported_kinds = "buifc"

    def __init__(
        self,
        path: Any,
        shape: Sequence[int],
        dtype: Any,
        *,
        dataset: str | None = None,
        chunks: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        file, inner = split_hdf5_path(path)
        self.dataset = "/".join(p.strip("/") for p in (inner, dataset or "") if p.strip("/"))
        self.dataset = self.dataset or "data"
        self.chunks = tuple(int(c) for c in chunks) if chunks is not None else None
        super().__init__(file, shape, dtype, **kwargs)

    def _setup(self) -> None:
        if self.chunks is not None and len(self.chunks) != len(self.shape):
            raise SinkError(
                f"Expected chunks with {len(self.shape)} entries for {self.path}. "
                f"Got {self.chunks}."
            )
        self._offset: int | None = None

    @property
    def row_step(self) -> int:
        return self.chunks[0] if self.chunks else 1

    def _layout(self) -> dict:
        return {"dataset": self.dataset, "chunks": list(self.chunks) if self.chunks else None}

    def _create(self) -> None:
        import h5py

        with h5py.File(self.partial_path, "w") as f:
            parent, _, name = self.dataset.rpartition("/")
            group = f.require_group(parent) if parent else f
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            # Allocate all storage now: slab writes then never touch HDF5 metadata.
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_obj_track_times(False)  # no time stamps: identical bytes on every run
            if self.chunks:
                dcpl.set_chunk(self.chunks)
            space = h5py.h5s.create_simple(self.shape)
            tid = h5py.h5t.py_create(self.dtype, logical=True)
            h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
        if not self.chunks:
            self._offset = self._data_offset()

    def _data_offset(self) -> int:
        import h5py

        with h5py.File(self.partial_path, "r") as f:
            return int(f[self.dataset].id.get_offset())

    def _write(self, start: int, data: np.ndarray) -> int:
        stop = start + len(data)
        if self.chunks:
            import h5py

            with h5py.File(self.partial_path, "r+") as f:
                f[self.dataset][start:stop] = data
                f.flush()
            grid = [range(-(-n // c)) for n, c in zip(self.shape[1:], self.chunks[1:])]
            return (-(-stop // self.chunks[0]) - start // self.chunks[0]) * int(
                np.prod([len(r) for r in grid], dtype=np.int64)
            )
        if self._offset is None:  # resumed sink: read the offset back
            self._offset = self._data_offset()
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        write_at(self.partial_path, self._offset + start * row, data.astype(self.dtype, copy=False))
        return stop - start
