"""Sweeps on many workers (a simulation on a tiny volume), and the cluster's bad inputs."""

import time

import dask.array as da
import numpy as np
import pytest
import zarr
from dask_image import ndfilters

import dask_sweep
from dask_sweep.errors import BudgetError, SweepError
from dask_sweep.integration.cluster import Slots
from dask_sweep.integration.optimize import SweepPass, _size, analyse
from dask_sweep.passes.segments import warmup

distributed = pytest.importorskip("distributed")


def _pipeline(x):
    g = ndfilters.gaussian_filter(x, 1)
    return ndfilters.uniform_filter(da.where(g > 128, g, 0), 3)


@pytest.mark.parametrize("workers", [16, 32, 64])
def test_the_planner_spreads_segments_over_many_workers_within_each_budget(rng, workers):
    """The scheduler alone: the plan the optimiser makes for W one-thread workers."""
    x = da.from_array((rng.random((2048, 16, 16)) * 255).astype("u1"), chunks=(4, 16, 16))
    y = _pipeline(x)
    settings = SweepPass(memory_limit="64MiB", target_slab_bytes="2KiB", threads=1).settings()
    (plan, _), = analyse(y.__dask_graph__(), y.__dask_keys__(), settings).plans
    where = Slots("distributed", workers, 1, 4 << 30)
    sized, trace = _size(plan, settings, where)
    assert sized.info["segments"] == workers  # one chain per worker thread
    assert sized.info["together"] == 1 and sized.budget == 64 << 20
    seg_planes = [sized.steps[s[-1]] - (sized.steps[s[0] - 1] if s[0] else 0)
                  for s in sized.segment_steps()]
    assert sum(seg_planes) == 2048 and max(seg_planes) - min(seg_planes) <= 16
    assert min(seg_planes) >= 4 * warmup(sized)  # warm-ups stay a small part
    assert trace.peak <= sized.info["worker_budget"]  # every chain (the dry run covers all)


def _chains_at_once(stream) -> dict:
    """Per worker: the most chains held at once (a chain is held from its first step's
    start to its last step's end on that worker)."""
    spans: dict = {}
    for t in stream:
        key = t["key"]
        if not (isinstance(key, tuple) and str(key[0]).startswith("sweep-step-")):
            continue
        start = min(s["start"] for s in t["startstops"] if s["action"] == "compute")
        stop = max(s["stop"] for s in t["startstops"] if s["action"] == "compute")
        spans.setdefault(t["worker"], []).append((key[1], start, stop))
    return spans


@pytest.mark.timeout(300)
def test_segments_spread_over_32_in_process_workers_with_bounded_memory(tmp_path, rng):
    vol = (rng.random((1024, 16, 16)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(4, 16, 16),
                          dtype="u1", compressors=None)
    z[:] = vol
    y = _pipeline(da.from_zarr(str(tmp_path / "in.zarr")))
    want = y.compute(scheduler="sync")
    out = zarr.create_array(tmp_path / "out.zarr", shape=vol.shape, chunks=(4, 16, 16),
                            dtype="u1", compressors=None)
    with distributed.LocalCluster(n_workers=32, threads_per_worker=1, processes=False,
                                  memory_limit="4GiB", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="2KiB", threads=1,
                               fallback="raise"), \
                distributed.get_task_stream(client) as ts:
            client.compute(da.store(y, out, compute=False)).result()
        time.sleep(0.3)
        from dask_sweep.integration.dashboard import board_of

        (state,) = board_of(cluster.scheduler).state(cluster.scheduler)
    np.testing.assert_array_equal(out[:], want)

    segs = state["segments"]
    assert len(segs) == 32 and state["status"] == "finished"
    chain_of = {}
    for g in segs:
        for t in range(*g["steps"]):
            chain_of[t] = g["segment"]
    spans = _chains_at_once(ts.data)
    assert len(spans) >= 16  # the chains spread over the workers
    for steps in spans.values():
        chains = {}
        for t, a, b in steps:
            c = chains.setdefault(chain_of[t], [a, b])
            c[0], c[1] = min(c[0], a), max(c[1], b)
        edges = sorted([(a, 1) for a, _ in chains.values()] + [(b, -1) for _, b in chains.values()])
        held = most = 0
        for _, d in edges:
            held += d
            most = max(most, held)
        assert most <= 1  # one thread: never two chains' rings at once
    for w in state["workers"]:
        assert w["projected"] <= w["budget"] == 64 << 20


@pytest.mark.timeout(120)
def test_a_cluster_without_workers_gets_a_clear_error_not_a_hang(rng):
    x = da.from_array((rng.random((64, 16, 16)) * 255).astype("u1"), chunks=(4, 16, 16))
    y = _pipeline(x)
    with distributed.LocalCluster(n_workers=0, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        t0 = time.time()
        with dask_sweep.enable(memory_limit="64MiB"), \
                pytest.raises(SweepError, match="has no workers"):
            y.compute()
        assert time.time() - t0 < 30


@pytest.mark.timeout(120)
def test_a_worker_too_small_for_one_segment_names_its_memory_limit_and_the_floor():
    x = da.zeros((64, 512, 512), dtype="f4", chunks=(8, 512, 512))
    y = x.map_overlap(lambda b: b + 1, depth=2, boundary="reflect")  # opaque: not tiled
    with distributed.LocalCluster(n_workers=1, processes=False, memory_limit="16MiB",
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with dask_sweep.enable(memory_limit="1GiB", fallback="raise"), \
                pytest.raises(BudgetError) as info:
            client.compute(y).result(timeout=60)
    msg = str(info.value)
    assert "memory_limit (16.00 MiB" in msg and "floor of" in msg
    assert info.value.budget == 8 << 20 and info.value.projected > info.value.budget


@pytest.mark.timeout(300)
def test_the_distributed_benchmark_runs_small(tmp_path):
    import os
    import subprocess
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                         "bench_distributed.py")
    p = subprocess.run([sys.executable, bench, "--shape", "48", "64", "64", "--chunks", "4",
                        "--target-slab-bytes", "16KiB", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for text in ("identical output 2 workers vs 1: True",
                 "identical output sweep vs stock dask: True",
                 "peak above baseline within the budget on every worker: True",
                 "bytes spilled by the sweeps' workers: 0", "wall ratio 2 workers / 1 worker"):
        assert text in out, out
