"""Blocks that are not plain numpy arrays: the sweep keeps their type or leaves them to dask.

The sweep's rings, row assembly and padding hold numpy arrays, so a masked array
would lose its mask (it did: a masked input came back without it).  Regions
whose arrays are not plain numpy arrays are left to dask, with that reason in
``explain``; the numpy part of a pipeline before them is still swept.
"""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

import dask_sweep

SMALL = dict(target_slab_bytes="2KiB", memory_limit="16MiB")


def opaque(a):
    return a * 2 - 1


def _same(actual, expected):
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(np.ma.getdata(actual), np.ma.getdata(expected), strict=True)
    np.testing.assert_array_equal(np.ma.getmaskarray(actual), np.ma.getmaskarray(expected),
                                  strict=True)
    if isinstance(expected, np.ma.MaskedArray):
        assert actual.fill_value == expected.fill_value


def _compare(y):
    expected = y.compute(scheduler="sync")
    with dask_sweep.enable(**SMALL):
        actual = y.compute(scheduler="sync")
        (p,) = dask.persist(y, scheduler="sync")
    _same(actual, expected)
    _same(p.compute(scheduler="sync"), expected)
    return str(dask_sweep.explain(y, **SMALL))


@pytest.fixture
def masked(rng):
    v = rng.random((16, 9, 8))
    return da.from_array(np.ma.masked_less(v, 0.3), chunks=(4, 9, 4))


@pytest.mark.parametrize("boundary", ["none", "reflect", "nearest", "periodic", 0.5])
def test_masked_map_overlap_keeps_its_mask(masked, boundary):
    y = masked.map_overlap(opaque, depth=1, boundary=boundary) + 1
    text = _compare(y)
    assert "masked arrays (numpy.ma.MaskedArray)" in text
    assert "nothing swept" in text


def test_masked_elementwise_and_kernels_left_to_dask(masked):
    _compare((masked * 2 + 1).astype("f4"))
    text = _compare(masked.map_overlap(ndi.gaussian_filter, depth=2, sigma=0.5,
                                       boundary="reflect"))
    assert "masked arrays" in text


def test_numpy_part_swept_masking_stage_left_to_dask(rng):
    x = da.from_array(rng.random((16, 9, 8)), chunks=(4, 9, 4))
    g = x.map_overlap(ndi.gaussian_filter, depth=2, sigma=0.5, boundary="reflect")
    y = da.ma.masked_greater(g, 0.5) + 1
    text = _compare(y)
    assert "sweep 0" in text and "masked arrays" in text


def test_sparse_or_other_chunk_types_refused():
    from dask_sweep.patterns.layers import ArrayMeta
    from dask_sweep.patterns.recognise import not_plain

    m = ArrayMeta((4,), ((2, 2),), np.dtype("f8"), "sparse._coo.core.COO")
    assert "sparse._coo.core.COO" in not_plain({"x": m}, ["x"])
    assert not_plain({"x": ArrayMeta((4,), ((2, 2),), np.dtype("f8"))}, ["x"]) is None


def test_scipy_sparse_blocks_keep_their_type():
    import scipy.sparse as sp

    x = da.from_array(sp.random(16, 12, density=0.3, format="csr", random_state=0),
                      chunks=(4, 12))
    y = x.map_overlap(lambda b: b * 2, depth={0: 1, 1: 0}, boundary="none")
    expected = y.compute(scheduler="sync")
    with dask_sweep.enable(**SMALL):
        actual = y.compute(scheduler="sync")
    assert type(actual) is type(expected)
    assert (actual != expected).nnz == 0
    assert "scipy.sparse._csr.csr_matrix, not plain numpy" in str(dask_sweep.explain(y, **SMALL))
