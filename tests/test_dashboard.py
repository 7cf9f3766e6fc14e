"""Watching sweeps: the dashboard's /sweeps page under distributed, a progress bar locally."""

import io
import json
import time
import urllib.request

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.callbacks import Callback
from dask_image import ndfilters

import dask_sweep
from dask_sweep.diagnostics import DASHBOARD_ROUTES, SweepProgress, add_dashboard_route

distributed = pytest.importorskip("distributed")


def _slow(b):
    time.sleep(0.02)
    return b


def _pipeline(path):
    x = da.from_zarr(str(path))
    g = ndfilters.gaussian_filter(x.map_blocks(_slow, dtype=x.dtype), 1)
    return ndfilters.uniform_filter(da.where(g > 120, g, 0), 3)


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def test_importing_dask_sweep_adds_the_page_to_the_dashboard_routes():
    assert DASHBOARD_ROUTES in dask.config.get("distributed.scheduler.http.routes")
    assert add_dashboard_route()  # idempotent
    routes = dask.config.get("distributed.scheduler.http.routes")
    assert routes.count(DASHBOARD_ROUTES) == 1
    assert "distributed.http.scheduler.info" in routes  # distributed's own pages kept


@pytest.mark.timeout(240)
def test_sweeps_page_names_the_sweep_and_its_segments_during_and_after_a_run(tmp_path, rng):
    vol = (rng.random((240, 32, 32)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(2, 32, 32),
                          dtype="u1", compressors=None)
    z[:] = vol
    y = _pipeline(tmp_path / "in.zarr")
    want = y.compute(scheduler="sync")  # the sweep is off here: stock dask
    out = zarr.create_array(tmp_path / "out.zarr", shape=vol.shape, chunks=(2, 32, 32),
                            dtype="u1", compressors=None)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster) as client:
        port = cluster.scheduler.http_server.port
        assert "No sweep has run" in _get(port, "sweeps")
        with dask_sweep.enable(target_slab_bytes="4KiB", fallback="raise", threads=1):
            fut = client.compute(da.store(y, out, compute=False))
        during = None
        t0 = time.time()
        while time.time() - t0 < 60 and not fut.done():
            state = json.loads(_get(port, "sweeps.json"))
            if state and state[0]["status"] == "running" and 0 < state[0]["planes_done"] < 240:
                during = state[0], _get(port, "sweeps")
                break
            time.sleep(0.05)
        fut.result()
        time.sleep(0.3)  # the last steps' events travel with the workers' batched messages
        after = json.loads(_get(port, "sweeps.json"))[0]
        page = _get(port, "sweeps")
    np.testing.assert_array_equal(out[:], want)

    assert during is not None, "no running sweep seen on the page"
    s, html = during
    assert s["sweep"] in html and "running" in html
    assert "segment 0" in html and "segment 1" in html
    assert s["time_left"] is not None and s["time_left"] > 0

    assert after["sweep"] == s["sweep"] and after["status"] == "finished"
    assert after["sweep"] in page and "finished" in page and "segment 1" in page
    assert after["planes_done"] == after["planes_total"] == 240
    segs = after["segments"]
    assert len(segs) == 2 and all(g["status"] == "done" for g in segs)
    assert sum(g["planes_total"] for g in segs) == 240
    # every plane written once; the warm-up of segment 1 re-reads a few rows
    assert after["bytes_written"] == vol.nbytes
    assert vol.nbytes <= after["bytes_read"] < 1.2 * vol.nbytes
    assert len({w for g in segs for w in g["workers"]}) == 2  # one chain per worker
    for w in after["workers"]:
        assert w["projected"] <= w["budget"]
        assert w["rss_max"] > 0 and w["hwm"] >= w["rss_max"] and w["memory_limit"] > 0
    assert after["summary"][0].startswith(after["sweep"])
    assert any("2 segments" in line for line in after["summary"])


def test_progress_bar_counts_planes_on_the_local_schedulers(rng):
    x = da.from_array((rng.random((96, 24, 24)) * 255).astype("u1"), chunks=(4, 24, 24))
    y = ndfilters.uniform_filter(ndfilters.gaussian_filter(x, 1) > 100, 3)
    reports = []

    class NoReporter(Callback):
        def _posttask(self, key, result, dsk, state, id):
            if isinstance(key, tuple) and str(key[0]).startswith("sweep-step-"):
                if isinstance(result, tuple):
                    reports.append(result[2].info.get("report"))

    buf = io.StringIO()
    with dask_sweep.enable(target_slab_bytes="4KiB", fallback="raise"), \
            SweepProgress(minimum=0, out=buf), NoReporter():
        got = y.compute(scheduler="threads")
    np.testing.assert_array_equal(got, y.compute(scheduler="sync"))
    last = buf.getvalue().strip().split("\r")[-1]
    assert "100%" in last and "96 of 96 planes" in last
    # on the local schedulers a step carries no reporter: nothing on the hot path
    assert reports and all(r is None for r in reports)


def test_progress_bar_counts_a_dsl_run(tmp_path, rng):
    from dask_sweep import dsl

    vol = (rng.random((40, 16, 16)) * 255).astype("u1")
    src = tmp_path / "in.zarr"
    z = zarr.create_array(src, shape=vol.shape, chunks=(4, 16, 16), dtype="u1",
                          compressors=None)
    z[:] = vol
    s = dsl.source(str(src)).gaussian(sigma=1)
    buf = io.StringIO()
    with SweepProgress(minimum=0, out=buf):
        dsl.run(s.to(str(tmp_path / "out.zarr")), memory_limit="64MiB")
    assert "40 of 40 planes" in buf.getvalue()
