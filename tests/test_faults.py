"""Faults: a worker killed mid-sweep, and a resumed write that skips what was recorded."""

import json
import os
import signal
import time
import urllib.request

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from dask_image import ndfilters

import dask_sweep
from dask_sweep.io import imread, imwrite
from dask_sweep.io.base import recorded_slabs


def _slow(b):
    time.sleep(0.03)
    return b


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_sweep_its_segment_is_redone_elsewhere(tmp_path, rng):
    distributed = pytest.importorskip("distributed")
    vol = (rng.random((240, 32, 32)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(2, 32, 32),
                          dtype="u1", compressors=None)
    z[:] = vol
    x = da.from_zarr(str(tmp_path / "in.zarr"))
    g = ndfilters.gaussian_filter(x.map_blocks(_slow, dtype=x.dtype), 1)
    y = ndfilters.uniform_filter(da.where(g > 120, x, 0), 3)
    want = y.compute(scheduler="sync")  # stock dask
    out = zarr.create_array(tmp_path / "out.zarr", shape=vol.shape, chunks=(2, 32, 32),
                            dtype="u1", compressors=None)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster) as client:
        port = cluster.scheduler.http_server.port

        def board():
            url = f"http://127.0.0.1:{port}/sweeps.json"
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())

        pids = client.run(os.getpid)
        with dask_sweep.enable(target_slab_bytes="4KiB", fallback="raise", threads=1):
            fut = client.compute(da.store(y, out, compute=False))
        t0 = time.time()
        victim = None
        while time.time() - t0 < 120 and not fut.done():
            state = board()
            seg = state[0]["segments"][1] if state else None
            if seg and 4 <= seg["steps_done"] < seg["steps_total"] - 4:
                victim = seg["workers"][0]
                break
            time.sleep(0.05)
        assert victim is not None, "the sweep ended before a worker could be killed"
        os.kill(pids[victim], signal.SIGKILL)  # mid-segment: its rings die with it
        fut.result(timeout=180)
        time.sleep(0.3)
        after = board()[0]
    np.testing.assert_array_equal(out[:], want)  # identical to stock dask
    assert after["status"] == "finished"
    lost = after["lost_workers"]
    assert [lw["worker"] for lw in lost] == [victim] and 1 in lost[0]["segments"]
    redone_on = after["segments"][1]["workers"]
    assert victim not in redone_on and redone_on  # redone elsewhere, from its warm-up
    assert after["planes_done"] == 240


def _counting(calls, fail_from=None):
    def fn(b, block_info=None):
        i = block_info[0]["chunk-location"][0]
        calls.append(i)
        if fail_from is not None and i >= fail_from:
            raise RuntimeError("interrupted")
        return b * 2 + 1
    return fn


def test_a_resumed_write_does_not_recompute_recorded_slabs(tmp_path, rng):
    vol = (rng.random((64, 16, 16)) * 100).astype("f4")
    x = da.from_array(vol, chunks=(8, 16, 16))  # 8 blocks
    path = str(tmp_path / "out.zarr")
    kw = dict(slab_rows=16, chunks=(8, 16, 16), scheduler="sync")  # 4 slabs of 2 blocks
    calls: list = []
    with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="8KiB", fallback="raise"):
        with pytest.raises(RuntimeError, match="interrupted"):
            imwrite(x.map_blocks(_counting(calls, fail_from=4), dtype="f4"), path, **kw)
        assert sorted(calls) == [0, 1, 2, 3, 4]
        calls.clear()
        imwrite(x.map_blocks(_counting(calls), dtype="f4"), path, resume=True, **kw)
    # rows 0-32 (2 slabs, 4 blocks) were recorded: only the other 4 blocks ran
    assert sorted(calls) == [4, 5, 6, 7]
    np.testing.assert_array_equal(imread(path).compute(), vol * 2 + 1)


def test_a_resumed_windowed_write_warms_up_and_equals_one_run(tmp_path, rng):
    vol = (rng.random((96, 12, 12)) * 100).astype("f4")
    x = da.from_array(vol, chunks=(4, 12, 12))  # 24 blocks
    path = str(tmp_path / "out.tif")
    calls: list = []

    def pipeline(fn):
        y = x.map_blocks(fn, dtype="f4")
        return y.map_overlap(ndi.gaussian_filter, depth=3, sigma=1, boundary="reflect")

    want = pipeline(_counting([])).compute(scheduler="sync", optimize_graph=False)
    kw = dict(slab_rows=8, scheduler="sync")
    with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="2KiB", fallback="raise"):
        with pytest.raises(RuntimeError, match="interrupted"):
            imwrite(pipeline(_counting(calls, fail_from=14)), path, **kw)
        recorded = recorded_slabs(path)
        calls.clear()
        imwrite(pipeline(_counting(calls)), path, resume=True, **kw)
    np.testing.assert_array_equal(imread(path).compute(), want)
    # rows 0:g were recorded; the sweep restarts at g, warming up on the halo (the
    # overlap's 3 planes, on dask's blocks of 4): the blocks from just below g's on run
    # once each, the recorded ones before them not at all
    assert recorded and recorded[0][0] == 0
    g = recorded[-1][1]
    assert 0 < g < 96 and [a for a, _ in recorded] == [b for _, b in [(0, 0), *recorded[:-1]]]
    first = min(calls)
    assert sorted(calls) == list(range(first, 24))
    assert g // 4 - 2 <= first <= g // 4 and first > 0
