import dask
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _sync_default():
    # Tests choose schedulers explicitly; keep the sweep's inner threads small.
    with dask.config.set({"sweep.threads": 2}):
        yield


@pytest.fixture(autouse=True)
def _ndimage_budgets_without_overhead(request):
    # The label/EDT tests use budgets of a few KiB, below the default runtime overhead
    # (3 MiB, added to every projection) and the per-task bookkeeping (5 KiB a task,
    # counted per slab); they measure the arrays, so count neither.
    if not request.node.fspath.basename.startswith("test_ndimage_"):
        yield
        return
    with dask.config.set({"sweep.runtime-overhead": 0, "sweep.task-overhead": 0}):
        yield
