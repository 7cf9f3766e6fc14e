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
