"""Block-invariance of the kernels the sweep re-blocks, proven against dask on random cuts."""

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_sweep
from dask_sweep.testing import assert_sweep_equal

CASES = [
    (ndi.gaussian_filter, dict(sigma=1.5), 6, "biuf"),
    (ndi.gaussian_filter, dict(sigma=(1.0, 0.0, 2.0), mode="nearest"), 8, "uf"),
    (ndi.gaussian_filter, dict(sigma=1, order=1), 4, "f"),
    (ndi.uniform_filter, dict(size=5), 2, "iu"),
    (ndi.uniform_filter, dict(size=(3, 1, 4), mode="constant", cval=3), 2, "u"),
    (ndi.minimum_filter, dict(size=3), 1, "uif"),
    (ndi.maximum_filter, dict(size=(2, 3, 3)), 1, "uf"),
    (ndi.grey_erosion, dict(size=3), 1, "uf"),
    (ndi.grey_dilation, dict(size=3), 1, "uf"),
    (ndi.median_filter, dict(size=3), 1, "uf"),
    (ndi.correlate, dict(weights=np.arange(27.0).reshape(3, 3, 3) / 50), 1, "f"),
    (ndi.binary_erosion, dict(iterations=2), 2, "b"),
    (ndi.binary_opening, dict(), 2, "b"),
]
DTYPES = {"b": "bool", "i": "i2", "u": "u1", "f": "f4"}


@pytest.mark.parametrize("func,kw,depth,kinds", CASES, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("boundary", ["none", "reflect", 0])
def test_kernel_is_reblocked_and_exact(rng, func, kw, depth, kinds, boundary):
    for kind in kinds:
        vol = rng.random((26, 21, 17)) * 200
        vol = (vol > 100) if kind == "b" else vol.astype(DTYPES[kind])
        x = da.from_array(vol, chunks=(4, 11, 17))
        y = x.map_overlap(func, depth=depth, boundary=boundary, **kw)
        assert "kernel " in str(dask_sweep.explain(y)), (func, kind)
        for threads in (1, 2):
            assert_sweep_equal(y, target_slab_bytes="3KiB", threads=threads)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(11, 30), c0=st.integers(1, 9), slab=st.integers(1, 40),
    sigma=st.floats(0.3, 2.5), dtype=st.sampled_from(["u1", "f4", "f8", "i4"]),
)
def test_gaussian_any_slab_boundaries(n, c0, slab, sigma, dtype):
    rng = np.random.default_rng(n * 31 + c0)
    vol = (rng.random((n, 12, 40)) * 255).astype(dtype)
    depth = int(4 * sigma + 0.5)
    x = da.from_array(vol, chunks=(c0, 6, 40))
    y = x.map_overlap(ndi.gaussian_filter, depth=depth, sigma=sigma, boundary="none")
    assert_sweep_equal(y, target_slab_bytes=slab * 12 * 40, threads=2)
