"""Planes of a local, uncompressed Zarr array, read and written at their byte offsets.

A sweep asks for planes ``[a, b)`` along axis 0.  When a Zarr array stores its
chunks as plain C-order bytes in files (no compressor, no filter, no sharding:
:func:`~dask_sweep.io.zarr_io._raw_chunk_dtype`), the planes ``[p0, p1)`` of a
chunk are *one contiguous byte range* of its file::

    chunk file (cz, cy, cx):  | plane 0 | plane 1 | ... | plane cz-1 |
                                        ^─── p0 * cy*cx*itemsize ───^ p1

so any plane range of the array is read (``preadv`` into the destination) or
written (``pwrite``) without touching the other planes of its chunks: the sweep
is free to choose thin steps whatever the chunking, each byte is read once,
and zarr's per-chunk machinery (two copies, an emptiness check) is skipped.
Everything else (compressed, sharded, remote, big-endian) goes through zarr,
whole chunk rows at a time.

Writes keep zarr's layout: edge chunks are stored whole, their padding filled
with ``fill_value``; a chunk file is created at its full size the first time a
plane of it is written (only for arrays whose ``fill_value`` is zero bytes, so
that planes written later, or never, read as zarr would).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dask_sweep.io.accounting import REGISTRY
from dask_sweep.io.zarr_io import _local_root, _pool, _raw_chunk_dtype
from dask_sweep.utils import pwrite_all

__all__ = ["ZarrPlanes", "zarr_planes"]


def zarr_planes(arr: Any) -> ZarrPlanes | None:
    """A :class:`ZarrPlanes` for a zarr array stored raw in local files, else ``None``."""
    import zarr

    if not isinstance(arr, zarr.Array) or arr.ndim < 1:
        return None
    if getattr(arr, "shards", None):
        return None
    raw = _raw_chunk_dtype(arr)
    root = _local_root(arr.store)
    if raw is None or root is None:
        return None
    path = os.path.join(root, *[p for p in str(arr.path).split("/") if p])
    return ZarrPlanes(path, arr, raw)


#: Below this many bytes a read or write of planes stays in the calling thread; above it
#: the chunk files are read or written on two threads (page-cache copies, the GIL released).
PARALLEL_BYTES = 4 << 20


def _run(fn, items: list, nbytes: int) -> list:
    """``fn`` over ``items``: on the codec threads when there is enough to share (not
    with ``DASK_SWEEP_NO_THREADS=1``, as the kernels' threads)."""
    if len(items) < 2 or nbytes < PARALLEL_BYTES or os.environ.get("DASK_SWEEP_NO_THREADS"):
        return [fn(x) for x in items]
    return list(_pool().map(fn, items))


class ZarrPlanes:
    """Read and write planes of one raw Zarr array (see the module docstring).

    Pickles as the array's path, shape, chunks and encoding: no open handles.
    """

    def __init__(self, path: str, arr: Any, raw: np.dtype) -> None:
        self.path = path
        self.shape = tuple(arr.shape)
        self.chunks = tuple(arr.chunks)
        self.dtype = np.dtype(arr.dtype)
        self.raw = np.dtype(raw)
        fv = arr.fill_value
        self.fill_value = fv.item() if isinstance(fv, np.generic) else (fv or 0)
        meta = arr.metadata
        self._keys = {}  # block index -> relative file path, filled lazily
        self._layouts = {}  # in-plane region -> its chunks (see _layout), filled lazily
        self._encode = meta.encode_chunk_key
        # new chunk files start as zero bytes: only right when that is the fill value
        self.writable = not np.any(np.asarray(self.fill_value, dtype=self.dtype)
                                   .reshape(1).view(np.uint8))

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_keys"], d["_layouts"] = {}, {}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    def _file(self, block: tuple[int, ...]) -> str:
        p = self._keys.get(block)
        if p is None:
            p = os.path.join(self.path, *self._encode(block).split("/"))
            self._keys[block] = p
        return p

    def _inplane_blocks(self, region):
        """Per in-plane axis: (block index, array start, array stop) meeting ``region``."""
        out = []
        for ax in range(1, len(self.shape)):
            c = self.chunks[ax]
            s, e = region[ax - 1] if region is not None else (0, self.shape[ax])
            out.append([(q, max(s, q * c), min(e, (q + 1) * c))
                        for q in range(s // c, -(-e // c))])
        return out

    def temps(self, nbytes: int) -> int:
        """What a read or write of ``nbytes`` of planes holds beside them: a copy of the
        part of one chunk each thread works on (at most a whole chunk) where the planes
        are cut from, or copied to, a chunk that is not one contiguous part of them."""
        chunk = int(np.prod(self.chunks, dtype=np.int64)) * self.raw.itemsize
        return min(int(nbytes), (2 if nbytes >= PARALLEL_BYTES else 1) * chunk)

    @property
    def plane_bytes_in_chunk(self) -> int:
        return int(np.prod(self.chunks[1:], dtype=np.int64)) * self.raw.itemsize

    def _rows(self, q: int, s: int, e: int) -> tuple[int, int]:
        """Rows of chunk ``q`` along the first in-plane axis that a read of ``[s, e)``
        fetches: just those when they are at most half of its rows in the array (a
        tile's halo, say; one read per plane), else all (one read for all the planes)."""
        c = self.chunks[1]
        lo, hi = s - q * c, e - q * c
        return (lo, hi) if 2 * (hi - lo) <= min(c, self.shape[1] - q * c) else (0, c)

    def region_bytes(self, region) -> int:
        """Bytes :meth:`read` fetches per plane of the in-plane ``region``."""
        inplane = self._inplane_blocks(region)
        if not inplane:
            return self.plane_bytes_in_chunk
        row = self.plane_bytes_in_chunk // self.chunks[1]
        rows = sum(b - a for a, b in (self._rows(q, s, e) for q, s, e in inplane[0]))
        return rows * row * int(np.prod([len(b) for b in inplane[1:]], dtype=np.int64))

    def _layout(self, region) -> list[tuple]:
        """The chunks an in-plane ``region`` meets, worked out once per region: for each,
        ``(block index in the plane, slices of the region, slices of the chunk, whether
        the chunk is whole, the rows of it a read fetches)``.  A thin sweep reads and
        writes every plane through this, so nothing here is redone per plane."""
        key = None if region is None else tuple((int(s), int(e)) for s, e in region)
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        import itertools

        origin = [s for s, _ in key] if key else [0] * (len(self.shape) - 1)
        lay = []
        for combo in itertools.product(*self._inplane_blocks(key)):
            lay.append((
                tuple(q for q, _, _ in combo),
                tuple(slice(s - o, e - o) for (_, s, e), o in zip(combo, origin)),
                tuple(slice(s - q * c, e - q * c) for (q, s, e), c in
                      zip(combo, self.chunks[1:])),
                all(e - s == c and s == q * c for (q, s, e), c in zip(combo, self.chunks[1:])),
                self._rows(*combo[0]) if combo else (0, 1),
            ))
        if len(self._layouts) >= 64:  # a handful of tiles' regions in practice
            self._layouts.clear()
        self._layouts[key] = lay
        return lay

    def _row_items(self, a: int, b: int, region) -> list[tuple]:
        """``(block, planes [p0, p1) of it, the planes' slice in [a, b), layout entry)``
        for every chunk planes ``[a, b)`` of ``region`` meet."""
        c0 = self.chunks[0]
        lay = self._layout(region)
        items = []
        for q0 in range(a // c0, -(-b // c0)):
            p0, p1 = max(a, q0 * c0) - q0 * c0, min(b, (q0 + 1) * c0) - q0 * c0
            at = slice(q0 * c0 + p0 - a, q0 * c0 + p1 - a)
            items.extend(((q0, *e[0]), p0, p1, at, e) for e in lay)
        return items

    def read(self, a: int, b: int, region=None, out: np.ndarray | None = None) -> np.ndarray:
        """Planes ``[a, b)`` (of the in-plane ``region``, ``[(start, stop), ...]``)."""
        shape = [b - a] + [(e - s) for s, e in (region or [(0, n) for n in self.shape[1:]])]
        if out is None:
            out = np.empty(shape, self.dtype)
        per_plane = self.plane_bytes_in_chunk
        rows_in_chunk = self.chunks[1] if len(self.chunks) > 1 else 1
        same = self.raw == self.dtype

        def one(item) -> int:
            block, p0, p1, at, (_, dst_in, cut, whole, (r0, r1)) = item
            dst = out[(at, *dst_in)]
            fn = self._file(block)
            try:
                fd = os.open(fn, os.O_RDONLY)
            except FileNotFoundError:
                dst[...] = self.fill_value
                return 0
            try:
                want = (p1 - p0) * per_plane
                if whole and same and dst.flags.c_contiguous:
                    got = os.preadv(fd, [memoryview(dst).cast("B")], p0 * per_plane)
                elif r1 - r0 < rows_in_chunk:  # a few rows of each plane, apart
                    row = per_plane // rows_in_chunk
                    buf = np.empty((p1 - p0, r1 - r0, *self.chunks[2:]), self.raw)
                    want, got = (p1 - p0) * (r1 - r0) * row, 0
                    for k in range(p1 - p0):
                        got += os.preadv(fd, [memoryview(buf[k]).cast("B")],
                                         (p0 + k) * per_plane + r0 * row)
                    dst[...] = buf[(slice(None), slice(None), *cut[1:])]
                else:
                    buf = np.empty((p1 - p0, *self.chunks[1:]), self.raw)
                    got = os.preadv(fd, [memoryview(buf).cast("B")], p0 * per_plane)
                    dst[...] = buf[(slice(None), *cut)]
            finally:
                os.close(fd)
            if got != want:
                from dask_sweep.errors import SourceError

                raise SourceError(
                    f"Chunk file {fn} of zarr array {self.path} is truncated or corrupt: "
                    f"expected {want} bytes of uncompressed {self.raw} at offset "
                    f"{p0 * per_plane}, read {got}."
                )
            return want

        done = _run(one, self._row_items(a, b, region), out.nbytes)
        nbytes, nchunks = sum(done), sum(1 for d in done if d)
        REGISTRY.read(self.path, nbytes, nchunks)
        return out

    def write(self, a: int, planes: np.ndarray, origin=None) -> None:
        """Write ``planes`` as planes ``[a, a + len)`` (at in-plane ``origin``)."""
        per_plane = self.plane_bytes_in_chunk
        org = list(origin[1:]) if origin is not None else [0] * (len(self.shape) - 1)
        region = [(o, o + n) for o, n in zip(org, planes.shape[1:])]
        same = self.raw == self.dtype
        c0 = self.chunks[0]

        def one(item) -> int:
            block, p0, p1, at, (_, src_in, sub, full, _rows) = item
            src = planes[(at, *src_in)]
            if full and same and src.flags.c_contiguous:
                data = src
            else:
                # an edge or partly covered chunk: the rest of its planes is the
                # fill value (edge padding) or, if the file holds data, that data
                data = np.empty((p1 - p0, *self.chunks[1:]), self.raw)
                if not full:
                    self._fill_from_file(block, p0, p1, data)
                data[(slice(None), *sub)] = src
            fn = self._file(block)
            try:
                fd = os.open(fn, os.O_WRONLY)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(fn), exist_ok=True)
                fd = os.open(fn, os.O_WRONLY | os.O_CREAT, 0o644)
                os.ftruncate(fd, c0 * per_plane)  # zero bytes: the fill value
            try:
                pwrite_all(fd, np.ascontiguousarray(data), p0 * per_plane)
            finally:
                os.close(fd)
            return (p1 - p0) * per_plane

        items = self._row_items(a, a + planes.shape[0], region)
        nbytes = sum(_run(one, items, planes.nbytes))
        REGISTRY.write(self.path, nbytes, len(items))

    def _fill_from_file(self, block, p0: int, p1: int, data: np.ndarray) -> None:
        fn = self._file(block)
        try:
            fd = os.open(fn, os.O_RDONLY)
        except FileNotFoundError:
            data[...] = self.fill_value
            return
        try:
            got = os.preadv(fd, [memoryview(data).cast("B")], p0 * self.plane_bytes_in_chunk)
        finally:
            os.close(fd)
        if got != data.nbytes:
            data[...] = self.fill_value
