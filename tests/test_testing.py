"""The shipped hypothesis strategies draw what they say and drive the oracle."""

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sweep.testing import assert_sweep_equal
from dask_sweep.testing import strategies as sst


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=sst.shapes(ndim=3, max_side=12))
def test_chunkings_cover_the_shape(data, shape):
    chunks = data.draw(sst.chunkings(shape))
    assert tuple(sum(c) for c in chunks) == shape
    assert all(c > 0 for axis in chunks for c in axis)
    da.ones(shape, chunks=chunks)  # dask accepts them


@settings(max_examples=40, deadline=None)
@given(x=sst.volumes(), sparse=sst.volumes(sparse=True, dtype="u1"))
def test_volumes_have_their_dtype_and_kind(x, sparse):
    assert x.dtype in sst.DTYPES and x.ndim == 3
    # sparse volumes: objects on zeros (a few voxels may all be objects)
    assert sparse.size < 64 or (sparse == 0).any()


def test_fit_depth_keeps_what_dask_accepts():
    assert sst.fit_depth((3, 0, 9), (2, 4, 5)) == (2, 0, 5)


def test_shapes_refuse_a_bad_request():
    with pytest.raises(ValueError, match="min_side"):
        sst.shapes(min_side=5, max_side=2)


def _shifted(a):  # a "filter" that is wrong at block edges unless the halo is right
    return np.roll(a, 1, axis=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=sst.dask_volumes(dtype="f4"), depth=sst.depths(max_depth=2),
       boundary=sst.boundaries())
def test_overlap_on_drawn_chunkings_equals_stock_dask(x, depth, boundary):
    depth = sst.fit_depth(depth, x.shape)
    y = x.map_overlap(ndi.uniform_filter, depth=depth, boundary=boundary, size=3)
    y = y.map_overlap(_shifted, depth=depth, boundary=boundary)
    assert_sweep_equal(y, expect_swept=None, target_slab_bytes="2KiB", memory_limit="16MiB")
