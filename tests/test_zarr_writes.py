"""Whole zarr chunks written with the emptiness check done by dask_sweep: the store
ends up exactly as zarr's own write leaves it, and the model of what a write holds."""

from __future__ import annotations

import os

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

from dask_sweep.io.zarr_io import (  # noqa: E402
    encode_temporaries,
    write_temporaries,
    write_whole_chunks,
)


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n not in ("zarr.json", ".zarray", ".zattrs"):
                with open(os.path.join(root, n), "rb") as f:
                    out[os.path.relpath(os.path.join(root, n), path)] = f.read()
    return out


def _volume(dtype, fill, rng) -> np.ndarray:
    v = (rng.random((10, 9, 8)) * 50).astype(dtype)
    v[0:4, 0:3, 0:4] = fill  # whole chunks equal to the fill value
    v[4:8, 6:9, 4:8] = fill
    if v.dtype.kind == "f":
        v[8:10, 0:3, 0:4] = -0.0  # data where the fill is +0.0: zarr compares bits
        v[8:10, 3:6, 4:8] = np.nan  # a chunk of NaN (empty when the fill is NaN)
    return v


def _codecs(name):
    """zarr v3 compressors (bytes-to-bytes codecs) by name; "default" is zarr's (zstd)."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    return {"default": "auto", "none": None, "gzip": GzipCodec(level=3),
            "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
            "zstd-checksum": ZstdCodec(level=5, checksum=True)}[name]


@pytest.mark.parametrize("fmt,codec", [(2, "default"), (3, "default"), (3, "none"),
                                       (3, "gzip"), (3, "blosc"), (3, "zstd-checksum")])
@pytest.mark.parametrize("dtype,fill", [("u1", 0), ("u2", 7), ("i2", -3), ("bool", False),
                                        ("f4", 0.0), ("f8", np.nan), ("f4", 1.5)])
def test_the_store_is_zarrs_own(tmp_path, fmt, codec, dtype, fill):
    """Whole chunks written by dask_sweep (emptiness checked here; v3 chunks encoded by
    the array's own codecs on threads, edge chunks padded) are byte for byte zarr's."""
    rng = np.random.default_rng(0)
    v = _volume(dtype, fill, rng)

    def make(name):
        kw = {} if codec == "default" else {"compressors": _codecs(codec)}
        return zarr.create_array(str(tmp_path / name), shape=v.shape, chunks=(4, 3, 4),
                                 dtype=dtype, fill_value=fill, zarr_format=fmt, **kw)

    ours, theirs = make("ours"), make("theirs")
    from dask_sweep.io.zarr_io import _encoder

    assert (_encoder(ours) is not None) == (fmt == 3)  # v3: encoded here, not by zarr
    for z in (ours, theirs):  # a stale non-empty chunk where the new data is empty
        z[:] = np.full(v.shape, fill, dtype) + np.ones(v.shape, dtype)
    for a in (0, 4, 8):
        b = min(a + 4, v.shape[0])
        assert write_whole_chunks(ours, (slice(a, b),), v[a:b])
        theirs[a:b] = v[a:b]
    np.testing.assert_array_equal(ours[:], v)
    mine, zarrs = _files(str(tmp_path / "ours")), _files(str(tmp_path / "theirs"))
    if codec == "gzip":  # gzip stamps its header with the time (bytes 4-8, MTIME)
        mine, zarrs = ({k: b[:4] + bytes(4) + b[8:] for k, b in d.items()}
                       for d in (mine, zarrs))
    assert mine == zarrs


@pytest.mark.parametrize("where", ["group", "dots", "memory"])
def test_stored_where_zarr_stores(tmp_path, where):
    """Chunks encoded here are stored where zarr stores them: an array inside a group,
    "." chunk key separators, a store that is not a local directory (zarr's own
    store calls); nothing is left under a temporary name."""
    rng = np.random.default_rng(1)
    v = _volume("u2", 0, rng)

    def make(name):
        kw = dict(shape=v.shape, chunks=(4, 3, 4), dtype="u2")
        if where == "memory":
            return zarr.create_array(zarr.storage.MemoryStore(), **kw)
        if where == "dots":
            kw["chunk_key_encoding"] = {"name": "default", "separator": "."}
            return zarr.create_array(str(tmp_path / name), **kw)
        return zarr.open_group(str(tmp_path / name), mode="w").create_array("sub/arr", **kw)

    ours, theirs = make("ours"), make("theirs")
    for a in (0, 4, 8):
        assert write_whole_chunks(ours, (slice(a, min(a + 4, 10)),), v[a:a + 4])
    theirs[:] = v
    np.testing.assert_array_equal(ours[:], v)
    if where != "memory":
        mine, zarrs = _files(str(tmp_path / "ours")), _files(str(tmp_path / "theirs"))
        assert mine == zarrs and not any(k.endswith(".partial") for k in mine)


def test_only_whole_chunks_of_a_checked_array_are_taken(tmp_path):
    v = np.ones((8, 6), "u1")
    z = zarr.create_array(str(tmp_path / "a"), shape=(8, 6), chunks=(4, 3), dtype="u1")
    assert not write_whole_chunks(z, (slice(1, 5),), v[1:5])  # off the chunk grid
    assert not write_whole_chunks(z, (slice(0, 4), slice(0, 2)), v[0:4, 0:2])
    c = zarr.create_array(str(tmp_path / "c"), shape=(8, 6), chunks=(4, 3), dtype="c8")
    assert not write_whole_chunks(c, (slice(0, 4),), v[0:4].astype("c8"))  # zarr checks
    e = zarr.create_array(str(tmp_path / "e"), shape=(8, 6), chunks=(4, 3), dtype="u1",
                          config={"write_empty_chunks": True})
    assert not write_whole_chunks(e, (slice(0, 4),), v[0:4])  # nothing to check
    assert not write_whole_chunks(np.zeros((8, 6), "u1"), (slice(0, 4),), v[0:4])
    assert write_whole_chunks(z, (slice(4, 8),), v[4:8])
    np.testing.assert_array_equal(z[4:8], v[4:8])


def test_the_model():
    from dask_sweep.io.zarr_io import CALL_BYTES, KEY_BYTES

    c, call = 4 << 20, CALL_BYTES + KEY_BYTES
    assert encode_temporaries(c, c, np.uint8) == 5 * c + call  # zarr's own emptiness check
    assert encode_temporaries(c, c, np.uint8, checked=False) == int(1.5 * c) + call
    assert encode_temporaries(c, c, np.float32) == int(1.5 * c) + call
    assert encode_temporaries(c // 2, c, np.float32) == int(3.5 * c) + call  # read, merged
    assert encode_temporaries(4 * c, c, checked=False) == 16 * c + CALL_BYTES + 4 * KEY_BYTES
    assert encode_temporaries(4 * c, c) == 20 * c + CALL_BYTES + 4 * KEY_BYTES
    # at most async.concurrency chunks in flight
    assert encode_temporaries(64 * c, c, checked=False) == 40 * c + CALL_BYTES + 64 * KEY_BYTES
    assert write_temporaries(np.zeros(3), 10) is None


@pytest.mark.parametrize("origin", [None, (0, 4, 6)])  # whole planes; a tile's interior
def test_a_sweep_writes_a_zarr_target_in_calls_of_whole_chunks(tmp_path, monkeypatch, origin):
    """:class:`DirectStoreWriter` cuts a slab into calls of ``piece`` planes and ``strip``
    columns on the target's chunk grid (region included); each call is at most
    ``call_bytes``, and what it writes is the slab."""
    import dask_sweep.patterns.to_plan as tp

    calls = []

    def spy(target, index, value):
        calls.append(index)
        return write_whole_chunks(target, index, value)

    monkeypatch.setattr(tp, "write_whole_chunks", spy)
    z = zarr.create_array(str(tmp_path / "t"), shape=(13, 20, 24), chunks=(2, 4, 6), dtype="u1")
    region = (slice(2, 13), slice(0, 20), slice(0, 24))  # the array starts at plane 2
    w = tp.DirectStoreWriter(z, region, 0, 3, piece=4, strip=8, call_bytes=4 * 8 * 24)
    v = np.random.default_rng(1).integers(1, 255, (11, 20, 24), dtype=np.uint8)
    part = v if origin is None else v[:, 4:20, 6:24]
    for a, b in ((0, 4), (4, 10), (10, 11)):  # slabs on the chunk grid, as plans align them
        w.write_planes(a, part[a:b], origin)
    got = z[2:13] if origin is None else z[2:13, 4:20, 6:24]
    np.testing.assert_array_equal(got, part)
    for index in calls:
        for s, c, n, most in zip(index, (2, 4, 6), (13, 20, 24), (4, 8, 24)):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n), index  # whole chunks
            assert s.stop - s.start <= most, index  # a piece, a strip
    assert len(calls) > 3
    assert w.temps_of(10**9) == w.temps_of(4 * 8 * 24)  # a call writes at most call_bytes


@pytest.mark.parametrize("codec", ["default", "none", "gzip", "blosc", "zstd-checksum"])
@pytest.mark.parametrize("where", ["plain", "group", "dots"])
def test_regions_read_as_zarr_reads_them(tmp_path, codec, where):
    """Regions of a local array read and decoded by dask_sweep equal zarr's reads: any
    start and stop, edge chunks, chunks never stored (the fill value)."""
    from dask_sweep.io.zarr_io import read_region

    rng = np.random.default_rng(3)
    v = _volume("i2", -3, rng)
    kw = dict(shape=v.shape, chunks=(4, 3, 4), dtype="i2", fill_value=-3)
    if codec != "default":
        kw["compressors"] = _codecs(codec)
    if where == "dots":
        kw["chunk_key_encoding"] = {"name": "default", "separator": "."}
    if where == "group":
        z = zarr.open_group(str(tmp_path / "g"), mode="w").create_array("sub/arr", **kw)
    else:
        z = zarr.create_array(str(tmp_path / "a"), **kw)
    z[:] = v  # chunks equal to the fill value are not stored
    for _ in range(40):
        idx = tuple(slice(int(a), int(a) + int(rng.integers(0, n - a + 1)))
                    for a, n in ((rng.integers(0, n), n) for n in v.shape))
        got = read_region(z, idx)
        assert got is not None and got.dtype == v.dtype
        np.testing.assert_array_equal(got, z[idx])


def test_regions_of_other_arrays_are_left_to_zarr(tmp_path):
    from dask_sweep.io.zarr_io import read_region

    kw = dict(shape=(8, 6), chunks=(4, 3), dtype="u1")
    idx = (slice(0, 8), slice(0, 6))
    assert read_region(zarr.create_array(zarr.storage.MemoryStore(), **kw), idx) is None
    assert read_region(zarr.create_array(str(tmp_path / "v2"), zarr_format=2, **kw), idx) is None
    sharded = zarr.create_array(str(tmp_path / "s"), shards=(8, 6), **kw)
    assert read_region(sharded, idx) is None
