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
