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

import contextlib
import itertools
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from dask_sweep.errors import SinkError, SourceError
from dask_sweep.io.base import (
    HANDLES,
    Region,
    Sink,
    Source,
    _fmt_region,
    _fspath,
    fadvise,
    split_at_suffix,
)
from dask_sweep.io.stores import MissingChunkError, StrictStore

__all__ = ["ZarrSink", "ZarrSource", "read_zarr", "split_zarr_path", "encode_temporaries",
           "write_temporaries", "write_whole_chunks", "CALL_BYTES", "KEY_BYTES"]

_META = ("zarr.json", ".zarray", ".zgroup")


def split_zarr_path(path: Any) -> tuple[str, str]:
    """Split ``"a/vol.zarr/group/arr"`` into the store root and the array path in it.

    The root is the first path element ending in ``.zarr`` (``"vol.ome.zarr"``
    included); without one, the path itself is the root.

    >>> split_zarr_path("/data/vol.ome.zarr/0")
    ('/data/vol.ome.zarr', '0')
    """
    return split_at_suffix(path, (".zarr",))


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
        raw = _raw_chunk_dtype(arr) if self._store is None else None
        if raw is not None:
            return self._read_raw(arr, region, raw)
        try:
            if self._store is None:  # a local directory: chunks decoded on our threads
                out = read_region(arr, tuple(region), root=self.root, strict=self.strict)
                if out is not None:
                    return out
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

    def _read_raw(self, arr, region: Region, raw: np.dtype) -> np.ndarray:
        """Uncompressed, unsharded chunks: file bytes straight into the result.

        A chunk the region covers whole and whose part of the result is
        contiguous (slab-shaped chunks, full planes) is read with ``readinto``,
        no intermediate copy; others go through one chunk-sized buffer.
        """
        out = np.empty(tuple(r.stop - r.start for r in region), self.dtype)
        grid = self.chunks
        nbytes = int(np.prod(grid, dtype=np.int64)) * raw.itemsize
        self._read_ahead(arr, region)
        for block in self._chunk_ids(region):
            lo = [b * c for b, c in zip(block, grid)]
            sub = tuple(
                slice(max(r.start, a), min(r.stop, a + c)) for r, a, c in zip(region, lo, grid)
            )
            dst = out[
                tuple(slice(q.start - r.start, q.stop - r.start) for q, r in zip(sub, region))
            ]
            key = arr.metadata.encode_chunk_key(block)
            path = os.path.join(self.path, *key.split("/"))
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                if self.strict:
                    raise SourceError(
                        f"Chunk {_join(self.component, key)!r} of zarr array {self.path} is "
                        f"missing (reading {_fmt_region(region)}). zarr would silently return "
                        f"fill_value {self.fill_value!r} there; pass strict=False to accept that."
                    ) from None
                dst[...] = self.fill_value if self.fill_value is not None else 0
                continue
            with f:
                size = os.fstat(f.fileno()).st_size
                whole = all(q.stop - q.start == c for q, c in zip(sub, grid))
                if size == nbytes and whole and dst.flags.c_contiguous and raw == self.dtype:
                    got = f.readinto(memoryview(dst).cast("B"))
                else:
                    buf = np.empty(grid, raw)
                    got = f.readinto(memoryview(buf).cast("B")) if size == nbytes else size
                    if got == nbytes:
                        dst[...] = buf[
                            tuple(slice(q.start - a, q.stop - a) for q, a in zip(sub, lo))
                        ]
            if got != nbytes or size != nbytes:
                raise SourceError(
                    f"Chunk {_join(self.component, key)!r} of zarr array {self.path} is corrupt "
                    f"or unreadable: expected {nbytes} bytes of uncompressed {raw} data "
                    f"(chunk shape {grid}), found {size}."
                )
        return out

    def _read_ahead(self, arr, region: Region) -> None:
        """Ask the kernel to start reading the chunk files of the next region along axis 0.

        Sweeps read in disk order, so the region after this one (before it, when the
        reads go backwards) is the likely next read: its disk reads then overlap this
        region's compute and writes (``posix_fadvise(WILLNEED)`` starts them and
        returns).  Best effort.
        """
        if not hasattr(os, "posix_fadvise") or not region:
            return
        a, b = region[0].start, region[0].stop
        h = b - a
        # a sweep may run backwards (label's first pass): follow the last step's direction
        back = a < getattr(self, "_last_start", -1)
        self._last_start = a
        if h <= 0:
            return
        if back:
            if a <= 0:
                return
            nxt = (slice(max(0, a - h), a), *region[1:])
        else:
            if b >= self.shape[0]:
                return
            nxt = (slice(b, min(self.shape[0], b + h)), *region[1:])
        for block in self._chunk_ids(nxt):
            key = arr.metadata.encode_chunk_key(block)
            fadvise(os.path.join(self.path, *key.split("/")), "WILLNEED")

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


def _auto_chunks(shape: tuple[int, ...], dtype: np.dtype, settings=None) -> tuple[int, ...]:
    """Default output chunks for a slab writer: about 8 MiB, at most 1024 wide in-plane.

    The axis-0 extent is capped so that a row of chunks (what one slab must
    hold) stays within an eighth of the sweep's slab target: cube-shaped
    8 MiB chunks of a 1024² plane would force 128-plane (128 MiB) slabs; and
    within the budget (``settings``, default the active sweep's): a chunk row is
    at most the slab the chained writer may hold (:func:`~.base.chain_slab_bytes`).
    """
    from dask_sweep.io.base import chain_slab_bytes
    from dask_sweep.io.host import HOST

    s = settings or HOST.settings()
    itemsize = np.dtype(dtype).itemsize
    fit = chain_slab_bytes(s)
    if len(shape) < 2:
        return (max(1, min(shape[0] if shape else 1, min(8 << 20, fit) // itemsize)),)
    inplane = tuple(max(1, min(n, 1024)) for n in shape[1:])
    tile = int(np.prod(inplane, dtype=np.int64)) * itemsize
    plane = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    # the target as the sink's slab size (Sink._slab_rows)
    rows = min((8 << 20) // max(1, tile), s.target_slab_bytes // max(1, 8 * plane),
               fit // max(1, plane))
    return (max(1, min(shape[0], rows)), *inplane)


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
        Chunk shape (default: about 8 MiB, at most 1024 wide in-plane, shallow
        enough along axis 0 for slab-sized writes).
    shards
        Shard shape (v3 only; a multiple of ``chunks``), or ``None``.
    zarr_format
        2 or 3.
    compressors
        Passed to :func:`zarr.create_array` (default ``"auto"``, i.e. zstd).
    fill_value
        Passed to :func:`zarr.create_array`.
    **kwargs
        ``overwrite``, ``resume``, ``slab_rows``, ``fsync``, ``sync_bytes`` (see :class:`Sink`).
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
            self.chunks = _auto_chunks(self.shape, self.dtype, self.settings())
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

    def _open_partial(self):
        import zarr
        from zarr.storage import LocalStore

        def opener():
            # Every chunk is stored, even one equal to the fill value: zarr's
            # emptiness check costs as much as the write, and a stale chunk of
            # an interrupted run must be overwritten, not left in place.
            # (``open_array(config=...)`` ignores the config of an existing array)
            return zarr.open_array(LocalStore(self.partial_path), mode="r+").with_config(
                {"write_empty_chunks": True}
            )

        meta = "zarr.json" if self.zarr_format == 3 else ".zarray"
        try:  # a re-created output (overwrite) gets a fresh handle
            st = os.stat(os.path.join(self.partial_path, meta))
        except FileNotFoundError:
            return opener()
        key = (
            "zarr-sink",
            self.partial_path,
            st.st_ino,
            st.st_mtime_ns,
            st.st_size,
            self.shape,
            self.dtype.str,
            repr(self._layout()),
        )
        return HANDLES.get(key, opener)

    def _ranges(self, start: int, stop: int) -> list[range]:
        """Per axis, the indices of the blocks (shards, else chunks) rows ``[start, stop)``
        meet."""
        grid = self.shards or self.chunks
        rows = range(start // grid[0], -(-stop // grid[0]))
        return [rows, *(range(-(-n // c)) for n, c in zip(self.shape[1:], grid[1:]))]

    def _blocks(self, start: int, stop: int) -> list[tuple[int, ...]]:
        return list(itertools.product(*self._ranges(start, stop)))

    def _write(self, start: int, data: np.ndarray) -> int:
        arr = self._open_partial()
        stop = start + len(data)
        dtype = _raw_chunk_dtype(arr)
        if dtype is None:
            # encoded by the array's codecs on dask_sweep's two threads where it can (as a
            # sweep writes users' zarr targets: two chunks in flight, the same files;
            # zarr's pipeline held more, by the chunks it has in flight)
            encode = _encoder(arr) if data.dtype == np.dtype(arr.dtype) else None
            if encode is None or _local_root(arr.store) is None:
                arr[start:stop] = data
            else:  # (unsharded: the blocks are the chunks)
                origin = [start] + [0] * (len(self.shape) - 1)
                _write_encoded(arr, encode, self._ranges(start, stop), set(), data, origin)
            return len(self._blocks(start, stop))
        # Uncompressed, unsharded: a stored chunk *is* its C-order little-endian
        # bytes, so whole chunks are written straight from the slab (zarr's own
        # write path copies each chunk twice and runs at a third of the disk's
        # speed); the partial chunks at the array's far edges go through zarr.
        grid = self.chunks
        edge = []
        for block in self._blocks(start, stop):
            sel = tuple(
                slice(b * c, min((b + 1) * c, n)) for b, c, n in zip(block, grid, self.shape)
            )
            if any(s.stop - s.start != c for s, c in zip(sel, grid)):
                edge.append(sel)
                continue
            local = (slice(sel[0].start - start, sel[0].stop - start), *sel[1:])
            chunk = np.ascontiguousarray(data[local], dtype=dtype)
            _write_chunk(
                os.path.join(self.partial_path, arr.metadata.encode_chunk_key(block)), chunk
            )
        for sel in edge:
            arr[sel] = data[(slice(sel[0].start - start, sel[0].stop - start), *sel[1:])]
        return len(self._blocks(start, stop))

    def _files(self, start: int, stop: int) -> list[str]:
        key = self._open_partial().metadata.encode_chunk_key
        files = (os.path.join(self.partial_path, key(b)) for b in self._blocks(start, stop))
        return [f for f in files if os.path.exists(f)]


def write_temporaries(target: Any, written: int) -> int | None:
    """Bytes a zarr array holds beyond the data while ``target[...] = data`` writes
    ``written`` bytes as the sweeps write it (:func:`write_whole_chunks` where it
    applies); ``None`` when ``target`` is not a zarr array.

    See :func:`encode_temporaries` (the chunk is the shard when there are shards: a
    shard is assembled and encoded whole).
    """
    grid = getattr(target, "shards", None) or getattr(target, "chunks", None)
    if not type(target).__module__.startswith("zarr") or not grid:
        return None
    dtype = np.dtype(target.dtype)
    return encode_temporaries(written, int(np.prod(grid)) * dtype.itemsize, dtype,
                              checked=not _checks_itself(target))


def _checks_itself(target: Any) -> bool:
    """Whether :func:`write_whole_chunks` may check ``target``'s chunks for emptiness
    itself: an unsharded zarr array of real numbers or booleans that skips empty chunks."""
    try:
        return (type(target).__module__.startswith("zarr")
                and getattr(target, "shards", None) is None
                and np.dtype(target.dtype).kind in "biuf"
                and not target.config.write_empty_chunks
                and hasattr(target, "with_config") and hasattr(target, "store_path"))
    except (AttributeError, TypeError):
        return False


def write_whole_chunks(target: Any, index: tuple, value: np.ndarray) -> bool:
    """``target[index] = value`` for a zarr array, when ``index`` covers whole chunks;
    ``False`` (nothing written) otherwise.

    The stored result is zarr's own: a chunk equal to the fill value everywhere is
    not stored (its key is deleted), any other is encoded by zarr.  The emptiness
    check is done here, a plane at a time, and zarr is told to skip its own: for
    unsigned integers numpy 2.4 checks with masks and masked copies of the chunk
    (:func:`encode_temporaries`), so a 4 MiB ``uint8`` chunk holds 1.2x it instead
    of 5x and is written about 3x faster (``float32``: 1.6x faster).  For a zarr v3
    array of the ``bytes`` codec and compressors (:func:`_encoder`) the chunks are
    encoded here by the array's own codecs, on two threads, each storing its chunks
    itself in a local directory (else a batch at a time through zarr's store): 0.67-0.74x
    the time of zarr's pipeline (``benchmarks/bench_zarr_writes.py``, 512³: one-plane
    uint8 chunks, 64³ uint8 and int32 ones, on tmpfs), the same files.
    """
    if not _checks_itself(target) or not isinstance(index, tuple) or len(index) > target.ndim:
        return False
    index = index + (slice(None),) * (target.ndim - len(index))
    grid, shape = target.chunks, target.shape
    blocks = []
    for s, c, n in zip(index, grid, shape):
        if not isinstance(s, slice) or s.step not in (None, 1):
            return False
        a, b = s.indices(n)[:2]
        if a % c or (b % c and b != n) or b <= a:
            return False
        blocks.append(range(a // c, -(-b // c)))
    fill = target.fill_value
    origin = [s.indices(n)[0] for s, n in zip(index, shape)]
    gone = {block for block in itertools.product(*blocks) if _all_fill(value[tuple(
        slice(k * c - o, min((k + 1) * c, n) - o)
        for k, c, o, n in zip(block, grid, origin, shape))], fill)}
    encode = _encoder(target) if value.dtype == np.dtype(target.dtype) else None
    if encode is not None:
        _write_encoded(target, encode, blocks, gone, value, origin)
        return True
    keep = target.with_config({"write_empty_chunks": True})
    if not gone:
        keep[index] = value
        return True
    from zarr.core.sync import sync

    for block in itertools.product(*blocks):
        sel = tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(block, grid, shape))
        if block in gone:
            sync((target.store_path / target.metadata.encode_chunk_key(block)).delete())
        else:
            keep[sel] = value[tuple(slice(x.start - o, x.stop - o)
                                    for x, o in zip(sel, origin))]
    return True


def _local_root(store) -> str | None:
    """The directory of a plain local store, else ``None``.

    ``LocalStore``, or an ``FsspecStore`` on the local file system (what
    ``da.from_zarr("path")`` opens).  A wrapper store (counting, strict,
    caching) is respected: its reads go through zarr, so that it sees them.
    """
    from zarr.storage import FsspecStore, LocalStore

    if type(store) is LocalStore:
        return str(store.root)
    if type(store) is FsspecStore:
        fs = getattr(store.fs, "sync_fs", store.fs)  # fsspec's async wrapper
        protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocol or "local" in protocol:
            return str(store.path)
    return None


def _codec_chain(arr: Any):
    """``(serializer, compressors, chunk spec, buffer prototype)`` of an unsharded zarr v3
    array whose codecs are the ``bytes`` serializer and bytes-to-bytes codecs
    (compressors: zstd, blosc, gzip...); else ``None`` (zarr's pipeline does the work)."""
    try:
        from zarr.abc.codec import BytesBytesCodec
        from zarr.codecs import BytesCodec
        from zarr.core.buffer import default_buffer_prototype

        meta = arr.metadata
        codecs = list(meta.codecs) if meta.zarr_format == 3 else []
        if not codecs or type(codecs[0]) is not BytesCodec or not all(
                isinstance(c, BytesBytesCodec) and hasattr(c, "_encode_sync")
                and hasattr(c, "_decode_sync") for c in codecs[1:]):
            return None
        proto = default_buffer_prototype()
        spec = meta.get_chunk_spec((0,) * arr.ndim, arr._async_array.config, proto)
    except Exception:  # noqa: BLE001 - another zarr: its own pipeline works
        return None
    return codecs[0], codecs[1:], spec, proto


def _encoder(target: Any):
    """``encode(chunk) -> Buffer``: a whole chunk (its full shape, the array's dtype)
    encoded as zarr encodes it, for the arrays of :func:`_codec_chain`; else ``None``
    (zarr writes the chunks itself).

    The codecs are the array's own, called as zarr's pipeline calls them one chunk at a
    time, so the stored bytes are zarr's; only the pipeline around them is skipped.
    """
    chain = _codec_chain(target)
    if chain is None:
        return None
    serializer, rest, spec, proto = chain
    nd = proto.nd_buffer

    def encode(chunk: np.ndarray):
        buf = serializer._encode_sync(nd.from_ndarray_like(np.ascontiguousarray(chunk)), spec)
        for c in rest:
            buf = c._encode_sync(buf, spec)
        return buf

    return encode


def read_region(arr: Any, idx: tuple, root: str | None = None,
                strict: bool = False) -> np.ndarray | None:
    """``arr[idx]`` (``idx``: one slice of step 1 per axis) of a zarr array in a local
    directory with the codecs of :func:`_codec_chain`, its chunks read and decoded by
    the array's own codecs on two threads, each copied into place as it is done; else
    ``None`` (zarr reads it).  The values are zarr's: a chunk not stored is the fill
    value, or, ``strict``, a :class:`~dask_sweep.io.stores.MissingChunkError` naming
    its key.  ``root``: the store's directory when ``arr`` is opened on a wrapper of it.
    """
    from concurrent.futures import wait

    local = root or _local_root(arr.store)
    chain = _codec_chain(arr) if local is not None else None
    if chain is None:
        return None
    serializer, rest, spec, proto = chain
    grid, shape = arr.chunks, arr.shape
    sel = [s.indices(n)[:2] for s, n in zip(idx, shape)]
    out = np.empty([max(0, b - a) for a, b in sel], dtype=np.dtype(arr.dtype))
    if not out.size:
        return out
    base = os.path.join(local, *filter(None, arr.store_path.path.split("/")))
    key = arr.metadata.encode_chunk_key

    def one(block) -> None:
        cut = tuple(slice(max(a, k * c), min(b, (k + 1) * c)) for k, c, (a, b) in
                    zip(block, grid, sel))
        dst = out[tuple(slice(x.start - a, x.stop - a) for x, (a, _) in zip(cut, sel))]
        try:
            with open(os.path.join(base, *key(block).split("/")), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if strict:
                raise MissingChunkError("/".join(filter(None, (arr.store_path.path,
                                                               key(block))))) from None
            dst[...] = arr.fill_value
            return
        buf = proto.buffer.from_bytes(data)
        for c in reversed(rest):
            buf = c._decode_sync(buf, spec)
        chunk = serializer._decode_sync(buf, spec).as_ndarray_like()
        dst[...] = chunk[tuple(slice(x.start - k * c, x.stop - k * c)
                               for x, k, c in zip(cut, block, grid))]

    blocks = itertools.product(*(range(a // c, -(-b // c)) for (a, b), c in zip(sel, grid)))
    futures = [_pool().submit(one, b) for b in blocks]
    wait(futures)  # every chunk done or failed before an error is raised
    for f in futures:
        f.result()
    return out


#: Chunks encoded at once by :func:`write_whole_chunks` (numcodecs' compressors release
#: the GIL, so the two threads encode side by side; see bench_zarr_writes.py).
_ENCODERS = 2
_POOL = None


def _pool():
    """The threads encoding and decoding whole chunks (made at the first use)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(_ENCODERS, "dask-sweep-codec")
    return _POOL


def _write_encoded(target: Any, encode, blocks, gone: set, value: np.ndarray,
                   origin: list[int]) -> None:
    """Store the chunks of ``value`` not in ``gone`` (encoded here, on threads), delete
    those in ``gone``; in batches of zarr's ``async.concurrency``."""
    import asyncio
    from concurrent.futures import wait

    import zarr
    from zarr.core.sync import sync

    pool = _pool()
    grid, shape = target.chunks, target.shape
    fill = target.fill_value
    dtype = np.dtype(target.dtype)
    meta, root = target.metadata, target.store_path

    def chunk_of(block) -> np.ndarray:
        part = value[tuple(slice(k * c - o, min((k + 1) * c, n) - o)
                           for k, c, o, n in zip(block, grid, origin, shape))]
        if part.shape == tuple(grid):
            return part
        whole = np.full(grid, fill, dtype)  # an edge chunk is stored whole, padded
        whole[tuple(slice(0, m) for m in part.shape)] = part
        return whole

    todo = list(itertools.product(*blocks))
    local = _local_root(target.store)
    if local is not None:
        # a local directory: each encoding thread stores its chunk itself, as zarr's
        # LocalStore does (parents made, written to a temporary name, renamed over), with
        # no round trip to zarr's event loop per batch; two chunks in flight at most
        base = os.path.join(local, *filter(None, root.path.split("/")))

        def one(b) -> None:
            fn = os.path.join(base, *meta.encode_chunk_key(b).split("/"))
            if b in gone:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fn)
                return
            _put_file(fn, encode(chunk_of(b)).as_buffer_like())

        futures = [pool.submit(one, b) for b in todo]
        wait(futures)  # every chunk done or failed before an error is raised
        for f in futures:
            f.result()
        return
    batch = max(1, int(zarr.config.get("async.concurrency", 10) or 10))
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]
        kept = [b for b in part if b not in gone]
        bufs = list(pool.map(lambda b: encode(chunk_of(b)), kept))

        async def store(kept=kept, bufs=bufs, part=part) -> None:
            await asyncio.gather(
                *((root / meta.encode_chunk_key(b)).set(buf) for b, buf in zip(kept, bufs)),
                *((root / meta.encode_chunk_key(b)).delete() for b in part if b in gone))

        sync(store())
        del bufs


def _put_file(fn: str, data: Any) -> None:
    """Write ``data`` to ``fn`` whole or not at all: to a temporary name, renamed over
    (zarr's ``LocalStore`` writes so too)."""
    os.makedirs(os.path.dirname(fn), exist_ok=True)
    tmp = f"{fn}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, fn)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _all_fill(chunk: np.ndarray, fill: Any) -> bool:
    """Whether zarr would find ``chunk`` equal to ``fill`` everywhere (and not store it):
    floats against a zero fill by their bits (``-0.0`` is data), NaN equal to NaN."""
    if fill is None:  # zarr v2 without a fill value: every chunk is stored
        return False
    fill = np.asarray(fill, dtype=chunk.dtype)
    if chunk.dtype.kind == "f" and fill == 0:
        chunk, fill = chunk.view(f"u{chunk.itemsize}"), fill.view(f"u{chunk.itemsize}")
    if not fill:
        return not chunk.any()
    planes = chunk if chunk.ndim > 1 else chunk[None]  # a plane's mask at a time
    if chunk.dtype.kind == "f" and np.isnan(fill):
        return all(np.isnan(p).all() for p in planes)
    return all(not np.any(p != fill) for p in planes)


#: What one zarr write call holds beyond its chunks' copies (its tasks, buffers, the
#: event loop's bookkeeping; 16 chunks' worth, from a quarter of it to all of it),
#: and per chunk it meets; measured, see :func:`encode_temporaries`.
CALL_BYTES, KEY_BYTES = 640 << 10, 24 << 10


def encode_temporaries(written: int, chunk: int, dtype: Any = np.uint8,
                       checked: bool = True) -> int:
    """What one zarr write call of ``written`` bytes, in chunks of ``chunk`` bytes, holds
    beyond the data it is given; ``checked``: zarr checks each chunk for emptiness
    itself (not so through :func:`write_whole_chunks`).

    Measured as resident growth with glibc's thresholds fixed (as a sweep runs), zarr
    3.1 and numpy 2.4, for every codec (the raw ``bytes`` codec too, and whether the
    data compresses or not: the costs are copies, not the codec's output), C = chunk,
    m chunks a call:

    ============================  =============================  =====================
    one call writes (m x C)       held beyond the data           model
    ============================  =============================  =====================
    1 x 4 MiB, zarr's check       uint8 5.0 C, uint16 3.5 C,     5 C (unsigned),
                                  int, float, bool 0.8-1.2 C     1.5 C (else) + call
    1 x 4 MiB / 256 KiB, ours     1.24 C / 0.75-0.93 MiB         1.5 C + call
    2, 4, 8 x 256 KiB, ours       1.8, 2.9, 4.6-7.5 MiB          4 C m + call
    16, 32, 64 x 256 KiB, ours    6.5, 6.7, 8.1 MiB              4 C k + call
    4, 8, 16 x 4 MiB, ours        8.5 C, 16.7 C, 20.6 C          16 C, 32 C, 40 C + ..
    2, 4 x 4 MiB, zarr's check    uint8 7.0 C, 9.0 C             + 4 C (unsigned)
    ============================  =============================  =====================

    "call" is :data:`CALL_BYTES` (at most 16 C) and :data:`KEY_BYTES` per chunk; ``k`` is zarr's
    ``async.concurrency`` (chunks in flight at once).  Unsigned integers cost most
    under zarr's own check: it compares a chunk with its fill value through
    ``np.array_equal(..., equal_nan=True)``, which takes numpy's NaN path for unsigned
    types (masks and masked copies of the chunk).  A chunk written in part is read,
    decoded and merged first (2 C more).  Several chunks vary most from run to run
    (how many are in flight at once): eight of 256 KiB held 4.6-7.5 MiB in ten runs.

    >>> encode_temporaries(4 << 20, 4 << 20) == 5 * (4 << 20) + CALL_BYTES + KEY_BYTES
    True
    """
    import zarr

    m = max(1, -(-written // max(1, chunk)))
    unsigned = np.dtype(dtype).kind == "u" and checked
    if m == 1:
        held = (5.0 if unsigned else 1.5) * chunk + (2 * chunk if written < chunk else 0)
    else:
        k = int(zarr.config.get("async.concurrency", 10) or 10)
        held = 4.0 * chunk * min(m, k) + (4 * chunk if unsigned else 0)
    return int(held) + min(CALL_BYTES, max(CALL_BYTES // 4, 16 * chunk)) + KEY_BYTES * m


def _raw_chunk_dtype(arr) -> np.dtype | None:
    """The dtype of an array's stored chunk bytes when they are plain C-order data.

    That is: no compressor, no filter, no sharding, little-endian (or 1-byte)
    numbers.  ``None`` for anything else (zarr then encodes the chunks).
    """
    meta = arr.metadata
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf":
        return None
    if meta.zarr_format == 3:
        from zarr.codecs import BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid

        codecs = tuple(meta.codecs)
        if not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
            return None
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        if dtype.itemsize > 1 and endian not in (None, "little"):
            return None
    else:
        if meta.compressor is not None or meta.filters or meta.order != "C":
            return None
        if dtype.itemsize > 1 and np.dtype(meta.dtype.to_native_dtype()).byteorder == ">":
            return None
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _write_chunk(path: str, chunk: np.ndarray) -> None:
    """Write a chunk file in place.

    No temporary and rename as zarr's LocalStore does: the whole array lives in
    ``<path>.partial`` until it is complete, and a chunk torn by a crash belongs
    to a slab that was never recorded, so a resume rewrites it whole.  Its
    write-back is started by :meth:`Sink.write_slab`, as for every sink.
    """
    try:
        f = open(path, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "wb")
    with f:
        f.write(memoryview(chunk).cast("B"))
