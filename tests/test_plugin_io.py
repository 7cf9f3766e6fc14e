"""The sweep reads each input chunk once, inside its slab tasks, whatever the source."""

import os

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from zarr.storage import LocalStore

import dask_sweep
from dask_sweep.io import imread, imwrite
from dask_sweep.io.base import recorded_slabs
from dask_sweep.io.stores import CountingStore
from dask_sweep.testing import assert_sweep_equal


@pytest.fixture
def volume(tmp_path, rng):
    path = tmp_path / "in.zarr"
    z = zarr.create_array(path, shape=(60, 24, 20), chunks=(4, 12, 20), dtype="u1",
                          compressors=None)
    z[:] = (rng.random(z.shape) * 255).astype("u1")
    return path


def _counted(path):
    store = CountingStore(LocalStore(path, read_only=True))
    return store, da.from_zarr(zarr.open_array(store, mode="r"))


def _chain(x):
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_overlap(lambda b: np.maximum(b, 7), depth=1, boundary="reflect")
    return y.map_overlap(ndi.uniform_filter, depth=2, size=3, boundary="nearest")


@pytest.mark.parametrize("sl", [slice(None), slice(0, 40), slice(3, 43), slice(1, 59)])
def test_each_chunk_read_once(volume, sl):
    # the counters are per store path and cumulative: compare differences
    store, x = _counted(volume)
    y = _chain(x[sl])
    start = store.bytes_read
    expected = y.compute()
    stock_reads = store.bytes_read - start
    text = str(dask_sweep.explain(y, target_slab_bytes="2KiB"))
    assert "inline, in the slab task" in text
    start = store.bytes_read
    with dask_sweep.enable(target_slab_bytes="2KiB"):
        got = y.compute()
    np.testing.assert_array_equal(got, expected, strict=True)
    # stock dask reads each touched chunk once by holding them; the sweep too, in bounded memory
    assert store.bytes_read - start == stock_reads


def test_imread_source_is_inlined(volume, tmp_path):
    x = imread(str(volume))
    y = _chain(x) + 1
    assert "inline, in the slab task" in str(dask_sweep.explain(y))
    assert_sweep_equal(y, target_slab_bytes="4KiB")


def test_sweep_output_through_imwrite(volume, tmp_path):
    y = _chain(imread(str(volume)))
    ref = y.compute()
    with dask_sweep.enable(target_slab_bytes="4KiB"):
        imwrite(y, str(tmp_path / "out.zarr"))
    np.testing.assert_array_equal(imread(str(tmp_path / "out.zarr")).compute(), ref)


def test_ring_buffers_hold_only_the_window(volume):
    store, x = _counted(volume)
    y = _chain(x)
    e = dask_sweep.explain(y, target_slab_bytes="1KiB")
    (plan, trace), = e.result.plans
    plane = 24 * 20
    # every ring holds at most: a step's planes + the consumer window + one chunk row
    for j, held in trace.ring_peak.items():
        itemsize = np.dtype(plan.stages[j].dtype).itemsize
        assert held <= (4 + 2 * 4 + 4 + 8) * plane * itemsize, (j, held)
    assert max(trace.held_after) < 60 * plane  # never the whole volume


def test_h5py_and_dask_image_sources_are_inlined(tmp_path, rng):
    h5py = pytest.importorskip("h5py")
    tifffile = pytest.importorskip("tifffile")
    dask_image_imread = pytest.importorskip("dask_image.imread")
    v = (rng.random((20, 32, 30)) * 255).astype("u1")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("x", data=v, chunks=(4, 32, 30))
    for i in range(20):
        tifffile.imwrite(tmp_path / f"s_{i:03d}.tif", v[i])
    with h5py.File(tmp_path / "a.h5", "r") as f:
        sources = [da.from_array(f["x"], chunks=(4, 32, 30)),
                   dask_image_imread.imread(str(tmp_path / "s_*.tif"))]
        for x in sources:
            y = x.map_overlap(ndi.gaussian_filter, depth=3, sigma=1, boundary="none")
            text = str(dask_sweep.explain(y))
            assert "inline, in the slab task" in text and "predicted reads per chunk row: max 1" in text
            assert_sweep_equal(y, target_slab_bytes="4KiB")


def test_a_chained_subgraph_keeps_only_what_later_rows_read():
    """Rows whose tasks form a chain (each gated on the previous row's last block, as
    ``ndimage.label``'s pass 2 is) carry only the values a later row's tasks read.

    Regression: a value was kept until the last row whose closure reached it, and through
    the chain the last row reaches every row: the whole packed mask was held to the end
    (label written with ``to_zarr``, 512^3 at 32 MiB: 37 MiB, now 18 MiB)."""
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    from dask_sweep.patterns.readers import SubgraphReader, _subgraph_reader

    def row(r, *_gate):
        return np.full((4, 8), r, dtype="f8")

    def block(data, k):
        return data[2 * k: 2 * k + 2] * 10

    rows, blk = "row-x", "blk-x"
    dsk_rows = {(rows, r): (row, r, *([(blk, 2 * r - 1, 0)] if r else [])) for r in range(6)}
    dsk_blk = {(blk, 2 * r + k, 0): (block, (rows, r), k) for r in range(6) for k in range(2)}
    g = HighLevelGraph({rows: MaterializedLayer(dsk_rows), blk: MaterializedLayer(dsk_blk)},
                       {rows: set(), blk: {rows}})  # as label: the gates are undeclared
    reader = _subgraph_reader(g, blk, (12, 1), 0)
    assert isinstance(reader, SubgraphReader)
    memo = None
    for r in range(12):
        got, memo = reader.read_row(r, {}, memo)
        np.testing.assert_array_equal(got, np.full((2, 8), 10.0 * (r // 2)))
        # the row value while its second block is to come, and the gate the next row reads
        assert len(memo) <= 2, (r, sorted(memo))


@pytest.mark.parametrize("src", ["slice", "cast", "imread-slice"])
def test_sliced_sources_release_each_row(tmp_path, rng, src):
    """A source evaluated with its upstream tasks (slices, casts) keeps no row it read.

    Measured with tracemalloc (numpy's allocations are traced): deterministic, unlike RSS.
    Regression: a recursive closure kept every block read alive until the cyclic GC ran.
    """
    import gc
    import tracemalloc

    path = tmp_path / "big.zarr"
    z = zarr.create_array(path, shape=(64, 128, 128), chunks=(4, 128, 128), dtype="u1",
                          compressors=None)
    z[:] = (rng.random(z.shape) * 255).astype("u1")
    x = {"slice": lambda: da.from_zarr(str(path))[2:62],
         "cast": lambda: da.from_zarr(str(path)).astype("u2"),
         "imread-slice": lambda: imread(str(path))[4:]}[src]()
    y = x.map_overlap(ndi.gaussian_filter, depth=2, sigma=0.5, boundary="none")
    settings = dict(memory_limit="2MiB", runtime_overhead=0, fallback="raise",
                    target_slab_bytes="64KiB", threads=1)
    out = np.zeros(y.shape, y.dtype)
    (plan, trace), = dask_sweep.explain(
        da.store(y, out, lock=False, compute=False), **settings).result.plans
    # a cast is a stage of the sweep now: its source is the store itself, read by planes
    readers = ("SubgraphReader", "BlockwiseReader") + (("PlaneReader",) if src == "cast" else ())
    assert type(plan.stages[0].reader).__name__ in readers
    with dask_sweep.enable(**settings):
        da.store(y, out, lock=False, scheduler="sync")  # warm-up: imports, caches
        gc.collect()
        gc.disable()  # the leak hid behind the cyclic GC: keep it from running
        tracemalloc.start()
        try:
            da.store(y, out, lock=False, scheduler="sync")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            gc.enable()
    # within the projected peak (plus the graph and plan themselves); the leak held
    # every row read, the whole 1 MiB input
    assert peak <= trace.peak + 384 * 1024, (peak, trace.peak)
    np.testing.assert_array_equal(out, y.compute(scheduler="sync"))


def test_imwrite_of_a_swept_pipeline_writes_in_the_slab_tasks(volume, tmp_path, monkeypatch):
    from dask_sweep.io import api

    y = _chain(imread(str(volume)))
    ref = y.compute()
    calls = {"fail_at": 40, "n": 0}

    def flaky(b, block_info=None):
        if block_info[0]["array-location"][0][0] == calls["fail_at"]:
            raise RuntimeError("boom")
        return b

    def no_chain(*a, **k):
        raise AssertionError("the swept write should not build the slab-write chain")

    z = y.map_blocks(flaky, dtype=y.dtype)
    with dask_sweep.enable(target_slab_bytes="4KiB", fallback="raise"):
        monkeypatch.setattr(api, "write_graph", no_chain)
        imwrite(y, str(tmp_path / "a.zarr"), chunks=(4, 24, 20))
        np.testing.assert_array_equal(imread(str(tmp_path / "a.zarr")).compute(), ref)
        with pytest.raises(RuntimeError, match="boom"):
            imwrite(z, str(tmp_path / "b.zarr"), chunks=(4, 24, 20))
        assert recorded_slabs(tmp_path / "b.zarr")  # the first steps are recorded
        monkeypatch.undo()  # a resumed write takes the chain: only the missing slabs
        calls["fail_at"] = None
        imwrite(z, str(tmp_path / "b.zarr"), chunks=(4, 24, 20), resume=True)
    np.testing.assert_array_equal(imread(str(tmp_path / "b.zarr")).compute(), ref)
    assert not os.path.exists(str(tmp_path / "b.zarr.partial"))


def test_imwrite_with_sweep_on_writes_inside_the_slab_tasks(tmp_path):
    from dask_sweep.io import api
    from dask_sweep.io.zarr_io import ZarrSink

    x = da.from_array(np.random.default_rng(0).random((32, 64, 64)).astype("f4"),
                      chunks=(4, 64, 64))
    y = x.map_overlap(lambda b: b * 2, depth=1, boundary="reflect")
    sink = ZarrSink(str(tmp_path / "o.zarr"), y.shape, y.dtype, sync_bytes="1MiB")
    assert api._swept_store(y, sink) is None  # sweep off: the slab-writer chain
    with dask_sweep.enable(memory_limit="64MiB"):
        store = api._swept_store(y, sink)
        assert store is not None
        text = str(dask_sweep.explain(store))
        assert f"written in the slab task to {sink.path}, synced in groups of 1.00 MiB" in text
        store.compute()
    sink.finalize()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"))[:], y.compute())


@pytest.mark.parametrize("fmt", ["zarr", "tiff-stack"])
def test_imwrite_plans_a_swept_write_once(volume, tmp_path, monkeypatch, fmt):
    # the plan made while choosing the output's chunks is the one the write runs
    from dask_sweep.integration import optimize

    y = _chain(imread(str(volume)))
    ref = y.compute()
    planned = []
    plan_region = optimize._plan_region
    monkeypatch.setattr(optimize, "_plan_region",
                        lambda *a, **k: planned.append(1) or plan_region(*a, **k))
    out = str(tmp_path / ("o.zarr" if fmt == "zarr" else "o"))
    with dask_sweep.enable(memory_limit="8MiB", target_slab_bytes="4KiB", fallback="raise"):
        imwrite(y, out, format=fmt)
    assert len(planned) == 1
    np.testing.assert_array_equal(imread(out if fmt == "zarr" else f"{out}/*.tif").compute(),
                                  ref, strict=True)


def test_a_reused_analysis_serves_only_its_own_graph(volume, monkeypatch):
    from dask_sweep.integration import optimize
    from dask_sweep.integration.cluster import Slots

    x = imread(str(volume))
    y, other = _chain(x), _chain(x) + 1
    settings = dask_sweep.sweep(memory_limit="8MiB").settings()
    mine = optimize.analyse(y.__dask_graph__(), y.__dask_keys__(), settings)
    assert mine.plans
    with optimize.reuse(mine):
        again = optimize.analyse(y.__dask_graph__(), y.__dask_keys__(),
                                 settings.with_(fallback="silent"))
        assert again.plans[0][0] is mine.plans[0][0] and again.settings.fallback == "silent"
        # another graph, or other settings, are analysed afresh
        fresh = optimize.analyse(other.__dask_graph__(), other.__dask_keys__(), settings)
        assert fresh.plans and fresh.plans[0][0] is not mine.plans[0][0]
        wider = optimize.analyse(y.__dask_graph__(), y.__dask_keys__(),
                                 settings.with_(memory_limit=16 << 20))
        assert wider.plans[0][0] is not mine.plans[0][0]
        # a distributed scheduler plans its workers' chains itself
        with monkeypatch.context() as m:
            m.setattr(optimize, "slots", lambda threads: Slots("distributed", 2, 1, 1 << 30))
            there = optimize.analyse(y.__dask_graph__(), y.__dask_keys__(), settings)
        assert there.plans[0][0] is not mine.plans[0][0]
    assert optimize.analyse(y.__dask_graph__(), y.__dask_keys__(),
                            settings).plans[0][0] is not mine.plans[0][0]


@pytest.mark.parametrize("budget", ["5MiB", "6MiB"])
def test_labels_written_with_to_zarr_are_swept_a_slab_per_step(tmp_path, budget):
    """``label`` cuts its chunk rows into uneven slabs (2-3 or 4-5 planes here): the sweep
    writing them steps by whole slabs, not one plane at a time (a step's task and a
    write per plane: on 256^3 in 64^3 chunks at 16 MiB, 256 steps against 52 slabs took
    0.18 s against 0.10)."""
    from dask_sweep.ndimage import label

    rng = np.random.default_rng(3)
    vol = (ndi.gaussian_filter(rng.random((64, 128, 128)), 2) > 0.5).astype("u1")
    src = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(32, 32, 32),
                            dtype="u1", compressors=None)
    src[:] = vol
    with dask_sweep.enable(memory_limit=budget, fallback="raise"):
        y = label(da.from_zarr(src) > 0)[0]
        assert len(set(y.chunks[0])) > 1  # uneven slabs
        out = zarr.create_array(tmp_path / "out.zarr", shape=y.shape, chunks=(32, 32, 32),
                                dtype=y.dtype, compressors=None)
        store = y.to_zarr(out, compute=False)
        ((plan, trace),) = dask_sweep.explain(store).result.plans
        assert plan.steps == tuple(np.cumsum(y.chunks[0]).tolist()), plan.steps
        assert trace.peak <= plan.budget
        dask.compute(store)
    np.testing.assert_array_equal(out[:], ndi.label(vol)[0])
