"""Sweeps cut into segments: chains that run at once, each warming up on its halo."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from dask_image import ndfilters, ndmorph
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_sweep


def _reference(x):
    g = ndfilters.gaussian_filter(x, 1.5)
    o = ndmorph.binary_opening(g > 128, structure=np.ones((3, 3, 3), bool))
    return ndfilters.uniform_filter(da.where(o, g, 0), 3)


def _plan(y, **kw):
    (plan, trace), = dask_sweep.explain(y, **kw).result.plans
    return plan, trace


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(60, 160), c0=st.integers(1, 9), cy=st.sampled_from([7, 16]),
    segments=st.integers(2, 6), slab=st.sampled_from(["2KiB", "8KiB", "64KiB"]),
    seed=st.integers(0, 999),
)
def test_segments_equal_stock_dask(n, c0, cy, segments, slab, seed):
    vol = (np.random.default_rng(seed).random((n, 16, 12)) * 255).astype("u1")
    y = _reference(da.from_array(vol, chunks=(c0, cy, 12)))
    want = y.compute(scheduler="sync")
    kw = dict(segments=segments, target_slab_bytes=slab, fallback="raise")
    plan, _ = _plan(y, **kw)
    assert plan.info["segments"] == len(plan.segments) + 1
    with dask_sweep.enable(**kw):
        np.testing.assert_array_equal(y.compute(scheduler="threads"), want)


@pytest.mark.parametrize("boundary", ["none", "reflect", "nearest"])
def test_segments_of_map_overlap_pipelines_into_a_store(tmp_path, rng, boundary):
    vol = (rng.random((120, 20, 16)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(5, 20, 16),
                          dtype="u1", compressors=None)
    z[:] = vol
    x = da.from_zarr(str(tmp_path / "in.zarr"))
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary=boundary)
    y = y.map_overlap(lambda b: np.maximum(b, 9), depth=1, boundary=boundary)  # opaque
    y = y.map_overlap(ndi.median_filter, depth=1, size=3, boundary=boundary)
    want = y.compute(scheduler="sync")
    out = zarr.create_array(tmp_path / "out.zarr", shape=vol.shape, chunks=(5, 20, 16),
                            dtype="u1", compressors=None)
    kw = dict(segments=3, target_slab_bytes="4KiB", fallback="raise")
    plan, _ = _plan(da.store(y, out, compute=False), **kw)
    assert len(plan.segments) == 2
    with dask_sweep.enable(**kw):
        da.store(y, out)
    np.testing.assert_array_equal(out[:], want)


def test_explain_states_segments_and_their_cost(rng):
    vol = (rng.random((200, 16, 12)) * 255).astype("u1")
    y = _reference(da.from_array(vol, chunks=(4, 16, 12)))
    text = str(dask_sweep.explain(y, segments=2, target_slab_bytes="4KiB"))
    assert "2 segments" in text and "warm-ups" in text and "planes of the pipeline" in text
    one = str(dask_sweep.explain(y, segments=1))
    assert "one chain" in one


def test_a_periodic_sweep_axis_stays_one_chain(rng):
    vol = rng.random((120, 10, 8)).astype("f4")
    y = da.from_array(vol, chunks=(6, 10, 8)).map_overlap(
        ndi.uniform_filter, depth=2, size=5, boundary="periodic")
    plan, _ = _plan(y, segments=4, axis=0)
    assert plan.segments == () and "periodic" in plan.info["one_chain"]
    with dask_sweep.enable(segments=4, axis=0):
        np.testing.assert_array_equal(y.compute(), y.compute(optimize_graph=False))


def test_chains_running_at_once_share_the_budget(rng):
    vol = (rng.random((256, 32, 32)) * 255).astype("u1")
    y = _reference(da.from_array(vol, chunks=(8, 32, 32)))
    with dask.config.set(scheduler="threads"):
        plan, trace = _plan(y, segments=2, threads=2, memory_limit="4MiB", runtime_overhead=0)
    assert plan.info["together"] == 2 and plan.budget == 2 << 20
    assert trace.peak <= plan.budget  # each chain within its share: both within the budget
    with dask.config.set(scheduler="sync"):  # one slot: one chain at a time gets all of it
        plan, _ = _plan(y, memory_limit="4MiB", runtime_overhead=0)
    assert plan.info["segments"] == 1 and plan.budget == 4 << 20


@pytest.mark.timeout(180)
def test_segments_spread_over_distributed_workers_with_priorities(tmp_path, rng):
    distributed = pytest.importorskip("distributed")
    vol = (rng.random((240, 24, 20)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(1, 24, 20),
                          dtype="u1", compressors=None)
    z[:] = vol
    y = _reference(da.from_zarr(str(tmp_path / "in.zarr")))
    want = y.compute(scheduler="sync")
    out = zarr.create_array(tmp_path / "out.zarr", shape=vol.shape, chunks=(1, 24, 20),
                            dtype="u1", compressors=None)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with dask_sweep.enable(target_slab_bytes="8KiB", fallback="raise"), \
                distributed.get_task_stream(client) as ts_stream:
            fut = client.compute(da.store(y, out, compute=False))
            fut.result()
            steps = [ts for ts in cluster.scheduler.tasks.values()
                     if str(ts.key).startswith("('sweep-step")]
        stream = ts_stream.data
    np.testing.assert_array_equal(out[:], want)
    # the sweep's priorities reached the scheduler: a later chain's steps rank lower
    assert {ts.priority[0] for ts in steps} == {0, 1}
    workers = {t["worker"] for t in stream if "sweep-step" in str(t["key"])}
    assert len(workers) == 2  # both workers swept
