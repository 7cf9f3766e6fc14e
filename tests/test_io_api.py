"""imwrite / imread end to end: resume, bounded memory, accounting, workers."""

from __future__ import annotations

import os
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.delayed import Delayed
from zarr.storage import LocalStore

from dask_sweep.errors import SinkError
from dask_sweep.io import CountingStore, ZarrSink, ZarrSource, imread, imwrite, track, write_graph
from dask_sweep.io.base import recorded_slabs
from dask_sweep.io.conformance import make_volume, snapshot_output


@pytest.fixture
def vol():
    return make_volume((20, 64, 48), "uint16")


@pytest.mark.parametrize("name", ["o.zarr", "o.h5", "o.tif", "stack"])
def test_imwrite_round_trip_numpy_and_dask(tmp_path, vol, name):
    assert imwrite(vol, tmp_path / name, slab_rows=4) == str(tmp_path / name)
    np.testing.assert_array_equal(imread(tmp_path / name).compute(), vol)
    x = da.from_array(vol, chunks=(3, 32, 16)) + 1  # chunks not aligned with slabs
    imwrite(x, tmp_path / ("b" + name), slab_rows=4)
    np.testing.assert_array_equal(imread(tmp_path / ("b" + name)).compute(), vol + 1)


def test_imwrite_options_and_errors(tmp_path, vol):
    imwrite(vol, tmp_path / "o.zarr", chunks=(2, 32, 48), shards=(4, 64, 48))
    z = zarr.open_array(str(tmp_path / "o.zarr"), mode="r")
    assert z.chunks == (2, 32, 48) and z.shards == (4, 64, 48)
    with pytest.raises(SinkError, match=r"o\.zarr already exists.*overwrite=True"):
        imwrite(vol, tmp_path / "o.zarr")
    imwrite(vol[::-1], tmp_path / "o.zarr", overwrite=True)
    np.testing.assert_array_equal(imread(tmp_path / "o.zarr").compute(), vol[::-1])
    with pytest.raises(SinkError, match="complex64"):
        imwrite(vol.astype("complex64"), tmp_path / "c.tif")
    with pytest.raises(SinkError, match="chunks= applies to Zarr"):
        imwrite(vol, tmp_path / "t.tif", chunks=(2, 2, 2))
    with pytest.raises(SinkError, match="Unknown output format"):
        imwrite(vol, tmp_path / "x", format="png")
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]


def test_compute_false_returns_delayed(tmp_path, vol):
    out = imwrite(vol, tmp_path / "o.zarr", compute=False, slab_rows=4)
    assert isinstance(out, Delayed)
    assert not (tmp_path / "o.zarr").exists()
    assert out.compute() == str(tmp_path / "o.zarr")
    np.testing.assert_array_equal(imread(tmp_path / "o.zarr").compute(), vol)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", ["o.zarr", "o.h5", "o.tif", "stack"])
def test_resume_after_crash_skips_done_slabs(tmp_path, vol, name):
    ref = tmp_path / "ref"
    ref.mkdir()
    layout = {"chunks": (2, 32, 48)} if name.endswith(".zarr") else {}
    imwrite(vol, ref / name, slab_rows=4, **layout)

    calls: list[int] = []
    fail = {"at": 16}  # the last slab: the slabs written before it are synced on the way out

    def produce(block, block_info=None):
        start = block_info[0]["array-location"][0][0]
        calls.append(start)
        if start == fail["at"]:
            raise Boom("crash in slab 4")
        return block

    x = da.from_array(vol, chunks=(4, -1, -1)).map_blocks(produce, dtype=vol.dtype)
    with pytest.raises(Boom):
        imwrite(x, tmp_path / name, slab_rows=4, scheduler="sync", **layout)
    assert not (tmp_path / name).exists()
    with pytest.raises(SinkError, match="resume=True"):
        imwrite(x, tmp_path / name, slab_rows=4)
    done = [a for a, b in recorded_slabs(tmp_path / name)]
    assert done and 16 not in done
    calls.clear()
    fail["at"] = None
    imwrite(x, tmp_path / name, slab_rows=4, resume=True, **layout)
    # finished slabs were neither recomputed nor rewritten
    assert sorted(calls) == [a for a in range(0, 20, 4) if a not in done]
    assert snapshot_output(tmp_path / name) == snapshot_output(ref / name)


def test_writes_bounded_by_gating(tmp_path):
    data = make_volume((40, 32, 32), "uint8")
    imwrite(data, tmp_path / "in.zarr", chunks=(1, 32, 32))
    src = ZarrSource(tmp_path / "in.zarr")
    live = {"now": 0, "max": 0}
    lock = threading.Lock()
    read = src._read

    def counting_read(region):
        with lock:
            live["now"] += region[0].stop - region[0].start
            live["max"] = max(live["max"], live["now"])
        return read(region)

    class SlowSink(ZarrSink):
        def _write(self, start, block):
            time.sleep(0.005)  # give idle threads the chance to read ahead
            with lock:
                live["now"] -= len(block)
            return super()._write(start, block)

    src._read = counting_read
    x = src.to_dask()
    for lag, bound in [(2, 4), (0, None)]:
        live.update(now=0, max=0)
        sink = SlowSink(
            tmp_path / f"o{lag}.zarr", x.shape, x.dtype, chunks=(2, 32, 32), slab_rows=2
        )
        with dask.config.set(scheduler="threads", num_workers=4):
            write_graph(x, sink, lag=lag).compute()
        if bound is not None:
            assert live["max"] <= bound  # two slabs of two rows
    assert live["max"] > 4  # without gating the reads run ahead
    np.testing.assert_array_equal(imread(tmp_path / "o2.zarr").compute(), data)


def test_track_accounts_reads_and_writes(tmp_path, vol):
    imwrite(vol, tmp_path / "in.zarr", chunks=(2, 64, 48))
    x = imread(tmp_path / "in.zarr")
    with track() as stats:
        imwrite(x * 2, tmp_path / "out.h5", slab_rows=4)
        x[:4].compute()
    src = stats.sources[str(tmp_path / "in.zarr")]
    assert src.bytes_read == vol.nbytes + vol[:4].nbytes
    assert src.reads_per_chunk.max == 2 and src.reads_per_chunk.histogram == {1: 8, 2: 2}
    assert stats.sinks[str(tmp_path / "out.h5")].bytes_written == vol.nbytes
    assert stats.bytes_written == vol.nbytes and stats.chunks_read == 12
    text = stats.summary()
    assert "in.zarr" in text and "out.h5" in text and "reads per chunk max 2" in text
    frozen = stats.bytes_read
    x.compute()
    assert stats.bytes_read == frozen  # frozen once the block exits


def test_counting_store_measures_stock_dask(tmp_path, vol):
    imwrite(vol, tmp_path / "in.zarr", chunks=(2, 32, 48), shards=(4, 64, 48))
    store = CountingStore(LocalStore(tmp_path / "in.zarr"), name="bench-in")
    z = zarr.open_array(store, mode="r")
    with track() as stats:
        y = da.from_zarr(z).compute()
    np.testing.assert_array_equal(y, vol)
    s = stats.sources["bench-in"]
    assert s.chunks_read > 0 and s.bytes_read > 0
    assert store.keys_read >= s.chunks_read
    # pickles (for workers) and keeps reporting under the same name
    import pickle

    clone = pickle.loads(pickle.dumps(store))
    before = store.bytes_read
    zarr.open_array(clone, mode="r")[:4]
    assert store.bytes_read > before


@pytest.mark.timeout(30)
def test_sources_and_sinks_on_distributed_workers(tmp_path, vol, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import scipy.ndimage as ndi

    import dask_sweep
    from dask_sweep.io import api

    def no_chain(*a, **k):
        raise AssertionError("the swept write should not build the slab-write chain")

    imwrite(vol, tmp_path / "in.zarr", chunks=(4, 64, 48))
    imwrite(vol, tmp_path / "stack", slab_rows=10)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        x = imread(tmp_path / "in.zarr") + imread(tmp_path / "stack")
        out = imwrite(x, tmp_path / "out.zarr", slab_rows=4, chunks=(2, 64, 48))
        assert out == str(tmp_path / "out.zarr")
        # every slab its own group, synced on the workers' helper threads
        imwrite(x, tmp_path / "each.zarr", slab_rows=4, chunks=(2, 64, 48), sync_bytes=0)
        # the sweep writes in its slab tasks on a worker; the client finalizes
        sm = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect")
        with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="16KiB"):
            monkeypatch.setattr(api, "write_graph", no_chain)
            imwrite(sm, tmp_path / "swept.zarr", chunks=(2, 64, 48), sync_bytes="40KiB")
    np.testing.assert_array_equal(imread(tmp_path / "out.zarr").compute(), vol + vol)
    np.testing.assert_array_equal(imread(tmp_path / "each.zarr").compute(), vol + vol)
    np.testing.assert_array_equal(
        imread(tmp_path / "swept.zarr").compute(), ndi.uniform_filter(vol + vol, 3, mode="reflect")
    )
    assert sorted(os.listdir(tmp_path)) == [
        "each.zarr", "in.zarr", "out.zarr", "stack", "swept.zarr"
    ]


def test_slabs_follow_the_array_blocks(tmp_path):
    from dask_sweep.io.api import _block_aligned_rows
    from dask_sweep.io.zarr_io import ZarrSink

    sink = ZarrSink(tmp_path / "o.zarr", (64, 16, 16), "u1", chunks=(4, 16, 16), slab_rows=16)
    aligned = da.zeros((64, 16, 16), "u1", chunks=(8, 16, 16))
    assert _block_aligned_rows(aligned, sink) == 8  # one block per slab: no concatenation
    small = da.zeros((64, 16, 16), "u1", chunks=(4, 16, 16))
    assert _block_aligned_rows(small, sink) == 4
    tiny = da.zeros((64, 16, 16), "u1", chunks=(2, 16, 16))
    assert _block_aligned_rows(tiny, sink) == 16  # off the chunk grid: the default
    ragged = da.zeros((64, 16, 16), "u1", chunks=((8, 4, 52), 16, 16))
    assert _block_aligned_rows(ragged, sink) == 16
    vol = make_volume((64, 16, 16), "uint8")
    imwrite(da.from_array(vol, chunks=(8, 16, 16)), tmp_path / "w.zarr", chunks=(4, 16, 16))
    np.testing.assert_array_equal(imread(tmp_path / "w.zarr").compute(), vol)
