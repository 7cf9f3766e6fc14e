"""Zarr v2/v3 sources (sharded or not, OME-Zarr multiscale levels) and a Zarr sink.

Reads follow the *storage* grid: for a sharded array one dask block holds whole
shards, otherwise whole chunks, so no two tasks fetch the same object.  With
``strict=True`` the store is wrapped in :class:`~dask_sweep.io.stores.StrictStore`,
which raises when zarr asks for a chunk that is absent (zarr would silently use
``fill_value``); the check rides on the read itself, no extra request.  A
missing inner chunk of an existing shard is recorded as empty in the shard
index and cannot be told apart from a chunk that was never written.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dask_sweep.errors import SinkError, SourceError
from dask_sweep.io.base import HANDLES, Region, Sink, Source, _fmt_region, _fspath, _fsync_file
from dask_sweep.io.stores import MissingChunkError, StrictStore

__all__ = ["ZarrSink", "ZarrSource", "read_zarr", "split_zarr_path"]

_META = ("zarr.json", ".zarray", ".zgroup")


def split_zarr_path(path: Any) -> tuple[str, str]:
    """Split ``"a/vol.zarr/group/arr"`` into the store root and the array path in it.

    The root is the first path element ending in ``.zarr`` (``"vol.ome.zarr"``
    included); without one, the path itself is the root.

    >>> split_zarr_path("/data/vol.ome.zarr/0")
    ('/data/vol.ome.zarr', '0')
    """
    p = _fspath(path)
    parts = p.split(os.sep)
    for i, part in enumerate(parts):
        if part.lower().endswith(".zarr") and i > 0:
            return os.sep.join(parts[: i + 1]), "/".join(x for x in parts[i + 1 :] if x)
    return p, ""


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class ZarrSource(Source):
    """A Zarr v2 or v3 array, read by whole shards (or chunks).

    Parameters
    ----------
    path
        A local path (``"vol.zarr"``, ``"vol.zarr/group/arr"``) or a
        :class:`zarr.Array` (its store must pickle to reach workers).
    component
        Array path inside the store (joined to the one in ``path``).  On an
        OME-Zarr multiscale group the first (full-resolution) level is used.
    strict
        Raise :class:`SourceError` naming the chunk key when a chunk is missing,
        instead of returning ``fill_value``.

    Attributes
    ----------
    chunks
        The shard shape for sharded arrays, the chunk shape otherwise.
    inner_chunks
        The chunk shape.
    """

    kind = "zarr"

    def __init__(self, path: Any, *, component: str | None = None, strict: bool = True) -> None:
        import zarr

        self.strict = bool(strict)
        if isinstance(path, zarr.Array):
            self._store = path.store
            self.root = str(path.store_path)
            self.component = _join(path.path, component)
            self.path = self.root
        else:
            root, inner = split_zarr_path(path)
            self._store = None
            self.root = root
            self.component = _join(inner, component)
            self.path = _fspath(os.path.join(root, *self.component.split("/")))
            if not os.path.exists(root):
                raise SourceError(f"Zarr store {root} does not exist.")
        arr = self._open_array()
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.inner_chunks = tuple(arr.chunks)
        self.chunks = tuple(arr.shards) if arr.shards else self.inner_chunks
        fv = arr.fill_value
        self.fill_value = fv.item() if isinstance(fv, np.generic) else fv
        self.zarr_format = arr.metadata.zarr_format
        self._meta_mtime = max(
            (os.stat(os.path.join(self.path, m)).st_mtime_ns for m in _META if self._exists(m)),
            default=0,
        )

    def _exists(self, name: str) -> bool:
        return self._store is None and os.path.exists(os.path.join(self.path, name))

    def _token_parts(self) -> tuple:
        from dask.base import tokenize

        store = tokenize(self._store) if self._store is not None else self.root
        return (self.kind, store, self.component, self._meta_mtime, self.shape, str(self.dtype))

    def _base_store(self):
        from zarr.storage import LocalStore

        return self._store if self._store is not None else LocalStore(self.root, read_only=True)

    def _open_array(self):
        """Open the array (resolving OME-Zarr groups), with or without strictness."""
        import zarr

        store = self._base_store()
        if self.strict:
            store = StrictStore(store)
        try:
            return zarr.open_array(store, path=self.component, mode="r")
        except FileNotFoundError as e:
            raise SourceError(
                f"No zarr array at {self.path} (store {self.root}, path {self.component!r})."
            ) from e
        except zarr.errors.NodeTypeValidationError:
            pass  # a group: an OME-Zarr multiscale picks its first level, else list arrays
        group = zarr.open_group(store, path=self.component, mode="r")
        attrs = group.attrs.asdict()
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if multiscales and multiscales[0].get("datasets"):
            self.component = _join(self.component, multiscales[0]["datasets"][0]["path"])
            self.path = _fspath(os.path.join(self.root, *self.component.split("/")))
            return zarr.open_array(store, path=self.component, mode="r")
        arrays = sorted(_join(self.component, k) for k in group.array_keys())
        raise SourceError(
            f"{self.path} is a zarr group, not an array. Expected a path to an array; "
            f"arrays in it: {arrays or 'none'} (e.g. component={arrays[0] if arrays else '...'!r})."
        )

    def _array(self):
        key = ("zarr", self.root, self.component, self.strict, self._meta_mtime)
        return HANDLES.get(key, self._open_array)

    def storage_key(self, block: Sequence[int]) -> str:
        """Store key of the shard (or chunk) at storage-grid index ``block``."""
        arr = self._array()
        return _join(self.component, arr.metadata.encode_chunk_key(tuple(block)))

    def _read(self, region: Region) -> np.ndarray:
        arr = self._array()
        try:
            return np.asarray(arr[region])
        except MissingChunkError as e:
            key = e.args[0]
            raise SourceError(
                f"Chunk {key!r} of zarr array {self.path} is missing (reading "
                f"{_fmt_region(region)}). zarr would silently return fill_value "
                f"{self.fill_value!r} there; pass strict=False to accept that."
            ) from None
        except Exception as e:
            raise self._locate_failure(region, e) from e

    def _locate_failure(self, region: Region, error: Exception) -> SourceError:
        """Name the shard/chunk whose decoding failed (slow path, errors only)."""
        arr = self._array()
        for block in self._chunk_ids(region):
            sub = tuple(
                slice(max(r.start, b * c), min(r.stop, (b + 1) * c))
                for r, b, c in zip(region, block, self.chunks)
            )
            try:
                arr[sub]
            except Exception as e:  # noqa: BLE001 - reporting the first culprit
                return SourceError(
                    f"Chunk {self.storage_key(block)!r} of zarr array {self.path} is corrupt "
                    f"or unreadable: {type(e).__name__}: {e}"
                )
        return SourceError(
            f"Reading {_fmt_region(region)} of zarr array {self.path} failed: "
            f"{type(error).__name__}: {error}"
        )


def read_zarr(path: Any, *, component: str | None = None, chunks: Any = None, strict: bool = True):
    """Open a Zarr v2/v3 array lazily as a dask array blocked by shard (or chunk).

    Parameters
    ----------
    path
        ``"vol.zarr"``, ``"vol.zarr/group/arr"``, ``"vol.ome.zarr/0"`` or a
        :class:`zarr.Array`.
    component
        Array path inside the store.
    chunks
        Dask chunks, rounded up to whole shards (or chunks); default one shard
        (or chunk) per block.
    strict
        Raise on missing chunks instead of returning ``fill_value``.

    Returns
    -------
    dask.array.Array
    """
    return ZarrSource(path, component=component, strict=strict).to_dask(chunks)


def _auto_chunks(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    from dask.array.core import normalize_chunks

    return tuple(c[0] for c in normalize_chunks("auto", shape, limit="8MiB", dtype=dtype))


class ZarrSink(Sink):
    """A Zarr array (v3 by default) written slab by slab along axis 0.

    Slabs are whole shards (or chunks) along axis 0 and span the full plane, so
    no two slab writes touch the same object.  The array lives in
    ``<path>.partial`` until :meth:`finalize` renames it to ``path``.

    Parameters
    ----------
    path, shape, dtype
        Output store (a local directory) and array shape/dtype.
    chunks
        Chunk shape (default: about 8 MiB chunks).
    shards
        Shard shape (v3 only; a multiple of ``chunks``), or ``None``.
    zarr_format
        2 or 3.
    compressors
        Passed to :func:`zarr.create_array` (default ``"auto"``, i.e. zstd).
    fill_value
        Passed to :func:`zarr.create_array`.
    **kwargs
        ``overwrite``, ``resume``, ``slab_rows``, ``fsync`` (see :class:`Sink`).
    """

    kind = "zarr"
    supported_kinds = "buifc"

    def __init__(
        self,
        path: Any,
        shape: Sequence[int],
        dtype: Any,
        *,
        chunks: Sequence[int] | None = None,
        shards: Sequence[int] | None = None,
        zarr_format: int = 3,
        compressors: Any = "auto",
        fill_value: Any = None,
        **kwargs: Any,
    ) -> None:
        self.chunks = tuple(int(c) for c in chunks) if chunks is not None else None
        self.shards = tuple(int(c) for c in shards) if shards is not None else None
        self.zarr_format = int(zarr_format)
        self.compressors = compressors
        self.fill_value = fill_value
        super().__init__(path, shape, dtype, **kwargs)

    def _setup(self) -> None:
        n = len(self.shape)
        if self.chunks is None:
            self.chunks = _auto_chunks(self.shape, self.dtype)
        if len(self.chunks) != n or (self.shards is not None and len(self.shards) != n):
            raise SinkError(
                f"Expected chunks/shards with {n} entries for {self.path} of shape {self.shape}. "
                f"Got chunks={self.chunks}, shards={self.shards}."
            )
        if self.zarr_format not in (2, 3):
            raise SinkError(f"Expected zarr_format 2 or 3. Got {self.zarr_format!r}.")
        if self.shards is not None:
            if self.zarr_format == 2:
                raise SinkError("Shards need zarr_format=3.")
            bad = [(s, c) for s, c in zip(self.shards, self.chunks) if s % c]
            if bad:
                raise SinkError(
                    f"Expected shards {self.shards} to be whole multiples of chunks "
                    f"{self.chunks} for {self.path}."
                )

    @property
    def row_step(self) -> int:
        return (self.shards or self.chunks)[0]

    def _layout(self) -> dict:
        return {
            "chunks": list(self.chunks),
            "shards": list(self.shards) if self.shards else None,
            "zarr_format": self.zarr_format,
            "compressors": repr(self.compressors),
            "fill_value": repr(self.fill_value),
        }

    def _create(self) -> None:
        import zarr
        from zarr.storage import LocalStore

        zarr.create_array(
            LocalStore(self.partial_path),
            shape=self.shape,
            chunks=self.chunks,
            shards=self.shards,
            dtype=self.dtype,
            zarr_format=self.zarr_format,
            compressors=self.compressors,
            fill_value=self.fill_value,
        )

    def _write(self, start: int, data: np.ndarray) -> int:
        import zarr
        from zarr.storage import LocalStore

        arr = zarr.open_array(LocalStore(self.partial_path), mode="r+")
        stop = start + len(data)
        arr[start:stop] = data
        grid = self.shards or self.chunks
        rows = range(start // grid[0], -(-stop // grid[0]))
        others = [range(-(-n // c)) for n, c in zip(self.shape[1:], grid[1:])]
        blocks = list(itertools.product(rows, *others))
        if self.fsync:
            for block in blocks:
                f = os.path.join(self.partial_path, arr.metadata.encode_chunk_key(block))
                if os.path.exists(f):  # all-fill_value chunks are not stored
                    _fsync_file(f)
        return len(blocks)
