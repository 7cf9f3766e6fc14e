"""The sweep under distributed: the optimiser runs on the scheduler; plans pickle."""

import cloudpickle as pickle
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

import dask_sweep
from dask_sweep.integration.optimize import SweepPass, analyse

distributed = pytest.importorskip("distributed")


def _pipeline(rng):
    x = da.from_array((rng.random((24, 20, 20)) * 255).astype("u1"), chunks=(4, 10, 20))
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_overlap(lambda b: b // 2 + 1, depth=1, boundary="reflect")
    return da.where(y > 60, y, 0)


def test_plan_pickles(rng):
    y = _pipeline(rng)
    res = analyse(y.__dask_graph__(), y.__dask_keys__(), SweepPass().settings())
    plan, _ = res.plans[0]
    again = pickle.loads(pickle.dumps(plan))
    assert len(again.stages) == len(plan.stages)


@pytest.mark.timeout(120)
def test_local_cluster(rng):
    y = _pipeline(rng)
    expected = y.compute(scheduler="sync")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None):
        with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="8KiB"):
            got = y.compute()
    np.testing.assert_array_equal(got, expected, strict=True)


@pytest.mark.timeout(120)
def test_a_cluster_plan_counts_numba_on_its_workers(rng, monkeypatch):
    """``enable`` loads numba's kernels in this process, not in the workers: a plan made
    for a cluster (on its scheduler) counts the load (64 MiB) where it fits a quarter of
    the budget, and runs scipy's median below; both equal scipy on a cluster."""
    from dask_image import ndfilters

    from dask_sweep.integration import optimize
    from dask_sweep.integration.cluster import Slots

    v = (rng.random((24, 20, 20)) * 255).astype("u1")
    y = ndfilters.median_filter(da.from_array(v, chunks=(4, 20, 20)), size=3)
    want = ndi.median_filter(v, size=3)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None):
        for budget in ("64MiB", "512MiB"):
            with dask_sweep.enable(memory_limit=budget):
                np.testing.assert_array_equal(y.compute(), want)
    # what the scheduler plans (explain, on the client, describes the local scheduler)
    monkeypatch.setattr(optimize, "slots", lambda threads: Slots("distributed", 2, 2, 4 << 30))
    from dask_sweep.runtime.kernel import warm_kernels

    warm_kernels()  # as enable() does: loaded here, not in the workers
    for budget, says in (("64MiB", "numba's kernel is not loaded"),
                         ("512MiB", "numba's kernels load in this run")):
        res = analyse(y.__dask_graph__(), y.__dask_keys__(),
                      SweepPass(memory_limit=budget).settings())
        notes = " ".join(res.plans[0][0].notes)
        assert says in notes, (budget, notes)


@pytest.mark.timeout(120)
def test_imwrite_of_a_swept_pipeline_on_a_cluster(rng, tmp_path):
    """The scheduler plans the write for its workers (the plan ``imwrite`` made on the
    client, for the local threads, is not reused there); the same values."""
    from dask_sweep.io import imread, imwrite

    y = _pipeline(rng)
    expected = y.compute(scheduler="sync")
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1,
                            dashboard_address=None):
        with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="8KiB", fallback="raise"):
            for fmt, out in (("zarr", "o.zarr"), ("tiff-stack", "o")):
                imwrite(y, str(tmp_path / out), format=fmt)
    for got in (imread(str(tmp_path / "o.zarr")), imread(str(tmp_path / "o" / "*.tif"))):
        np.testing.assert_array_equal(got.compute(scheduler="sync"), expected, strict=True)

