"""Planes of raw local Zarr arrays read and written at their byte offsets (io.planes)."""

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_sweep
from dask_sweep.io import track
from dask_sweep.io.planes import zarr_planes


def _array(path, shape, chunks, dtype="u2", fill_value=0, **kw):
    return zarr.create_array(path, shape=shape, chunks=chunks, dtype=dtype, compressors=None,
                             fill_value=fill_value, overwrite=True, **kw)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 13), st.integers(1, 9), st.integers(1, 7)),
    chunks=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 8)),
    a=st.integers(0, 12), n=st.integers(1, 13), seed=st.integers(0, 999),
    dtype=st.sampled_from(["u1", "i2", "f4", "f8", "bool"]),
)
def test_read_any_planes_and_regions(tmp_path_factory, shape, chunks, a, n, seed, dtype):
    rng = np.random.default_rng(seed)
    vol = (rng.random(shape) * 100 + 1).astype(dtype)  # no chunk left unstored as empty
    z = _array(tmp_path_factory.mktemp("z") / "a.zarr", shape, chunks, dtype)
    z[:] = vol
    p = zarr_planes(z)
    assert p is not None
    a = min(a, shape[0] - 1)
    b = min(shape[0], a + n)
    np.testing.assert_array_equal(p.read(a, b), vol[a:b])
    region = [(rng.integers(0, s), None) for s in shape[1:]]
    region = [(s0, rng.integers(s0 + 1, s + 1)) for (s0, _), s in zip(region, shape[1:])]
    want = vol[(slice(a, b), *(slice(s, e) for s, e in region))]
    with track() as io:
        np.testing.assert_array_equal(p.read(a, b, region), want)
    # what the tiles' plans count: of a chunk whose rows (first in-plane axis) in the
    # region are at most half of its rows in the array, those rows only
    rows = 0
    for q in range(region[0][0] // chunks[1], -(-region[0][1] // chunks[1])):
        r = min(region[0][1], (q + 1) * chunks[1]) - max(region[0][0], q * chunks[1])
        rows += r if 2 * r <= min(chunks[1], shape[1] - q * chunks[1]) else chunks[1]
    last = -(-region[1][1] // chunks[2]) - region[1][0] // chunks[2]
    assert io.bytes_read == p.region_bytes(region) * (b - a) == (
        (b - a) * rows * last * chunks[2] * np.dtype(dtype).itemsize)
    # each region's chunks are worked out once and kept: reads of other regions (and of
    # whole planes) in between, and of every plane one by one, find their own again
    other = [(0, e) for _, e in region]
    np.testing.assert_array_equal(p.read(a, b, other), vol[(slice(a, b), *(slice(0, e)
                                                                            for _, e in region))])
    np.testing.assert_array_equal(np.concatenate([p.read(k, k + 1, region)
                                                  for k in range(a, b)]), want)
    np.testing.assert_array_equal(p.read(a, b), vol[a:b])


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 13), st.integers(1, 9), st.integers(1, 7)),
    chunks=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 8)),
    steps=st.lists(st.integers(1, 5), min_size=1, max_size=8), seed=st.integers(0, 999),
)
def test_writes_in_any_steps_read_back_through_zarr(tmp_path_factory, shape, chunks, steps,
                                                     seed):
    vol = (np.random.default_rng(seed).random(shape) * 60000).astype("u2")
    z = _array(tmp_path_factory.mktemp("z") / "w.zarr", shape, chunks)
    p = zarr_planes(z)
    a, k = 0, 0
    while a < shape[0]:
        b = min(shape[0], a + steps[k % len(steps)])
        p.write(a, vol[a:b])
        a, k = b, k + 1
    np.testing.assert_array_equal(zarr.open_array(z.store_path, mode="r")[:], vol)


@pytest.mark.parametrize(("shape", "chunks"), [((9, 23, 17), (4, 5, 6)),
                                               ((6, 16, 16), (6, 8, 8)),
                                               ((7, 11, 3), (2, 11, 3))])
def test_reads_and_writes_on_two_threads(tmp_path, monkeypatch, shape, chunks):
    """Above ``PARALLEL_BYTES`` the chunk files are read and written on the codec threads
    (forced here on small arrays): the same values, edge chunks and regions included,
    and the same bytes counted."""
    from dask_sweep.io import planes as P

    monkeypatch.setattr(P, "PARALLEL_BYTES", 0)
    vol = (np.random.default_rng(5).random(shape) * 60000).astype("u2")
    z = _array(tmp_path / "t.zarr", shape, chunks)
    p = zarr_planes(z)
    for a in range(0, shape[0], 3):
        p.write(a, vol[a:a + 3])
    np.testing.assert_array_equal(zarr.open_array(z.store_path, mode="r")[:], vol)
    region = [(1, shape[1] - 2), (1, shape[2])]
    with track() as io:
        got = p.read(2, shape[0], region)
    np.testing.assert_array_equal(got, vol[2:, 1:shape[1] - 2, 1:])
    assert io.bytes_read == p.region_bytes(region) * (shape[0] - 2)
    # what a read or write holds beside the planes: a chunk's part per thread at most
    c = int(np.prod(chunks)) * 2
    assert p.temps(10) == 10 and p.temps(1 << 30) == 2 * c


def test_region_writes_keep_the_rest(tmp_path):
    z = _array(tmp_path / "r.zarr", (8, 6, 6), (3, 4, 4))
    base = np.arange(8 * 36, dtype="u2").reshape(8, 6, 6)
    z[:] = base
    p = zarr_planes(z)
    p.write(2, np.full((3, 2, 3), 7, "u2"), origin=(0, 1, 2))
    want = base.copy()
    want[2:5, 1:3, 2:5] = 7
    np.testing.assert_array_equal(z[:], want)


def test_only_raw_local_arrays(tmp_path):
    comp = zarr.create_array(tmp_path / "c.zarr", shape=(4, 4), chunks=(2, 2), dtype="u1")
    assert zarr_planes(comp) is None  # zstd by default
    sharded = zarr.create_array(tmp_path / "s.zarr", shape=(4, 4), chunks=(2, 2), shards=(4, 4),
                                dtype="u1", compressors=None)
    assert zarr_planes(sharded) is None
    big = zarr.create_array(tmp_path / "f.zarr", shape=(4, 4), chunks=(2, 2), dtype="u1",
                            compressors=None, fill_value=3)
    assert zarr_planes(big) is not None and not zarr_planes(big).writable


def test_missing_and_truncated_chunks(tmp_path):
    from dask_sweep.errors import SourceError

    z = _array(tmp_path / "m.zarr", (4, 4, 4), (2, 4, 4), fill_value=0)
    z[:2] = 5
    p = zarr_planes(z)
    np.testing.assert_array_equal(p.read(0, 4)[2:], 0)  # a missing chunk is the fill value
    (tmp_path / "m.zarr" / "c" / "0" / "0" / "0").write_bytes(b"\0" * 7)
    with pytest.raises(SourceError, match="truncated or corrupt"):
        p.read(0, 2)


@pytest.mark.parametrize("chunks", [(8, 24, 20), (16, 16, 16), (5, 7, 20), (1, 24, 20)])
@pytest.mark.parametrize("budget", ["1MiB", "300KiB"])
def test_plugin_streams_any_chunking_and_equals_stock_dask(tmp_path, rng, chunks, budget):
    vol = (rng.random((40, 24, 20)) * 255).astype("u1")
    src = _array(tmp_path / "in.zarr", vol.shape, chunks, "u1")
    src[:] = vol
    x = da.from_zarr(str(tmp_path / "in.zarr"))
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1.2, boundary="none")
    y = y.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect") > 90
    want = y.compute(scheduler="sync")
    out = _array(tmp_path / "out.zarr", vol.shape, chunks, "bool")
    settings = dict(memory_limit=budget, runtime_overhead=0, fallback="raise")
    text = str(dask_sweep.explain(da.store(y, out, compute=False), **settings))
    assert "tiled" not in text, text  # planes, not chunk rows: no row is ever held whole
    with track() as io, dask_sweep.enable(**settings):
        da.store(y, out)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[:], want)
    # every stored byte read once, none twice (zarr stores edge chunks whole)
    stored_plane = np.prod([-(-s // c) * c for s, c in zip(vol.shape[1:], chunks[1:])])
    assert io.bytes_read == vol.shape[0] * stored_plane
