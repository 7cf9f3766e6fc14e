"""dask_sweep.ndimage.distance_transform_edt against scipy: values, no background, spill, plan."""

import os

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sweep.errors import BudgetError, SweepConfigError
from dask_sweep.ndimage import distance_transform_edt, explain_edt, plan_edt


def _budget_for(shape, rows, itemsize=1, threads=2, boundary=True):
    """A memory limit that makes slabs of ``rows`` rows (boundary planes in memory or not)."""
    plane = int(np.prod(shape[1:]))
    longest = max(shape[1:], default=1)
    fixed = 3 * 4 * plane + threads * 32 * longest + 3 * 4 * plane * shape[0] * boundary
    return int(rows * plane * (2 * itemsize + 17) + fixed)


def _check(mask, chunks0, sampling=None, rows=1, scheduler="sync", limit=None):
    x = da.from_array(mask, chunks=(chunks0,) + mask.shape[1:])
    limit = limit or _budget_for(mask.shape, max(rows, chunks0), mask.itemsize)
    y = distance_transform_edt(x, sampling, memory_limit=limit)
    got = y.compute(scheduler=scheduler)
    ref = ndi.distance_transform_edt(mask, sampling)
    assert got.dtype == np.float64 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    return y


@st.composite
def volumes(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    density = draw(st.sampled_from([0.0, 0.3, 0.8, 0.95, 0.99, 1.0]))
    seed = draw(st.integers(0, 2**31))
    mask = np.random.default_rng(seed).random(shape) < density
    chunks0 = draw(st.integers(1, shape[0]))
    rows = draw(st.integers(1, 3))
    boundary = draw(st.booleans())
    sampling = draw(
        st.one_of(
            st.none(),
            st.floats(0.25, 4.0),
            st.lists(st.floats(0.1, 5.0), min_size=ndim, max_size=ndim),
        )
    )
    return mask, chunks0, sampling, rows, boundary


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes(), st.sampled_from(["sync", "threads"]))
def test_matches_scipy(case, scheduler):
    mask, chunks0, sampling, rows, boundary = case
    limit = _budget_for(mask.shape, max(rows, chunks0), mask.itemsize, boundary=boundary)
    _check(mask, chunks0, sampling, rows, scheduler, limit=limit)


@pytest.mark.parametrize("sampling", [None, (2.0, 0.5, 1.25)])
@pytest.mark.parametrize("density", [0.6, 0.97, 0.9995])
def test_larger_volume_many_slabs(rng, tmp_path, sampling, density):
    mask = rng.random((24, 30, 26)) < density
    limit = _budget_for(mask.shape, 1, boundary=False)
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        y = _check(mask, 1, sampling, scheduler="threads", limit=limit)
    assert y.numblocks[0] == 24


@pytest.mark.parametrize("shape", [(7,), (5, 6), (4, 3, 5)])
def test_no_background_matches_scipy_convention(shape):
    # scipy measures from a virtual background voxel at (-1, 0, ..., 0).
    _check(np.ones(shape, dtype="u1"), 1, sampling=1.5, rows=1)


def test_all_background_and_integer_input(rng):
    _check(np.zeros((6, 5, 4), dtype="i2"), 2)
    vol = (rng.random((10, 9, 8)) * 4).astype("i4")
    _check(vol, 3, sampling=(1, 2, 3))


def test_single_column_of_background_far_away():
    mask = np.ones((30, 4, 4), dtype=bool)
    mask[0, 0, 0] = False
    _check(mask, 1, rows=1)
    mask = np.ones((30, 4, 4), dtype=bool)
    mask[-1, 3, 3] = False
    _check(mask, 1, rows=2, sampling=(0.3, 1, 2))


def test_boundary_planes_spill_to_disk_and_are_cleaned(tmp_path, rng):
    from dask_sweep.io import track

    mask = rng.random((40, 8, 8)) < 0.95
    x = da.from_array(mask, chunks=(1, 8, 8))
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        plan = plan_edt(x, memory_limit=3000)
        assert plan.bytes_written == 3 * 4 * 64 * (len(plan.slabs) - 1) > 0  # F, D, B
        assert "spilled" in plan.explain()
        y = distance_transform_edt(x, memory_limit=3000)
        with track() as stats:
            got = y.compute(scheduler="threads")
    np.testing.assert_allclose(got, ndi.distance_transform_edt(mask), rtol=1e-12)
    # planes of short distances are written in 1 byte a voxel: a quarter of the bound
    assert stats.bytes_written == plan.bytes_written // 4
    assert os.listdir(tmp_path) == []  # planes read back, deleted, directory removed


def test_boundary_planes_in_memory_when_they_fit(rng):
    mask = rng.random((12, 8, 8)) < 0.9
    plan = plan_edt(mask, memory_limit="1MiB")
    assert plan.bytes_written == 0 and "kept in memory" in plan.explain()


def test_graph_chains_and_inline_reads(rng, tmp_path):
    mask = rng.random((8, 6, 6)) < 0.9
    x = da.from_array(mask, chunks=(1, 6, 6))
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        y = distance_transform_edt(x, memory_limit=_budget_for(mask.shape, 1, boundary=False))
    dsk = dict(y.__dask_graph__())
    assert not any(isinstance(k, tuple) and k[0] == x.name for k in dsk)

    def keys(prefix):
        return {k[1]: k for k in dsk if isinstance(k, tuple) and k[0].startswith(prefix)}

    fwd, out = keys("edt-fwd-"), keys("distance-transform-edt-")
    (tab,) = [k for k in dsk if isinstance(k, str) and k.startswith("edt-tables-")]
    assert len(fwd) == len(out) == 8
    assert set(dsk[tab].dependencies) == set(fwd.values())  # the backward chain: one task
    for s in range(8):
        if s:
            assert fwd[s - 1] in dsk[fwd[s]].dependencies  # forward chain
        # an output block waits for the tables and F of the slab before, never for
        # another block: a consumer can take each block as it comes
        want = {tab, fwd[s - 1]} if s else {tab}
        assert set(dsk[out[s]].dependencies) == want
    np.testing.assert_allclose(y.compute(), ndi.distance_transform_edt(mask), rtol=1e-12)


def test_zarr_source_read_twice(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    from dask_sweep.io import read_zarr, track

    mask = (rng.random((16, 12, 10)) < 0.9).astype("u1")
    z = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=mask.shape, chunks=(2, 12, 10), dtype="u1"
    )
    z[:] = mask
    x = read_zarr(tmp_path / "v.zarr")
    limit = _budget_for(mask.shape, 4)
    plan = plan_edt(x, memory_limit=limit)
    assert plan.inline and plan.bytes_read_ratio == 2 and plan.projected_peak <= limit
    with track() as stats:
        got = distance_transform_edt(x, memory_limit=limit).compute()
    np.testing.assert_allclose(got, ndi.distance_transform_edt(mask), rtol=1e-12)
    src = stats.sources[os.path.abspath(tmp_path / "v.zarr")]
    assert src.bytes_read == 2 * mask.nbytes
    assert src.reads_per_chunk.histogram == {2: 8}


def test_budget_error_names_function_and_numbers():
    with pytest.raises(BudgetError) as e:
        distance_transform_edt(da.zeros((8, 64, 64), chunks=(4, 64, 64)), memory_limit="8KiB")
    assert "distance_transform_edt" in str(e.value) and "8.00 KiB" in str(e.value)
    assert e.value.projected > e.value.budget


def test_explain_text(rng):
    text = explain_edt(rng.random((20, 8, 8)) < 0.5, sampling=(1, 2, 3), memory_limit="64KiB")
    for part in (
        "pass 1 forward",
        "pass 2 distances",
        "blocks independent",
        "projected peak",
        "bytes read / input bytes = 2.00",
        "sampling (1.0, 2.0, 3.0)",
    ):
        assert part in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image="abc"), "input to be a numpy or dask array"),
        (dict(image=np.ones((3, 3)), sampling=(1, 2, 3)), "one value per axis"),
        (dict(image=np.ones((3, 3)), sampling=(1, -2)), "finite and positive"),
        (dict(image=np.ones((3, 3)), return_indices=True), "return_indices=False"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(SweepConfigError, match=match):
        distance_transform_edt(**kwargs)


@pytest.mark.timeout(60)
def test_distributed_local_cluster(rng):
    distributed = pytest.importorskip("distributed")
    mask = rng.random((16, 10, 12)) < 0.9
    x = da.from_array(mask, chunks=(2, 10, 12))
    with (
        distributed.LocalCluster(
            processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        got = distance_transform_edt(x, (1, 2, 0.5), memory_limit=_budget_for(mask.shape, 2))
        got = got.compute()
    np.testing.assert_allclose(got, ndi.distance_transform_edt(mask, (1, 2, 0.5)), rtol=1e-12)


def test_input_dask_computes_is_computed_once_and_its_masks_cleaned(rng, tmp_path):
    """An input whose blocks are shared between slabs (an overlap upstream) is not
    inline: pass 1 writes its packed masks, pass 2 reads them; every upstream block is
    computed once, the result is scipy's, and no file is left."""
    import threading

    from dask_sweep.io import track

    mask = rng.random((24, 10, 13)) < 0.9  # 13: rows packed with padding bits
    calls: list = []
    lock = threading.Lock()

    def count(b):
        with lock:
            calls.append(b.shape)
        return b

    zarr = pytest.importorskip("zarr")
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=mask.shape, chunks=(2, 10, 13),
                          dtype="u1")
    z[:] = mask
    x = da.from_zarr(z).map_overlap(count, depth=1, boundary="none")
    tmp_path = tmp_path / "tmp"
    tmp_path.mkdir()
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        plan = plan_edt(x, memory_limit=_budget_for(mask.shape, 2))
        assert not plan.inline and plan.bytes_read_ratio == 1
        y = distance_transform_edt(x, memory_limit=_budget_for(mask.shape, 2))
        calls.clear()  # dask's meta inference called it on empty arrays
        with track() as stats:
            got = y.compute(scheduler="threads")
    np.testing.assert_allclose(got, ndi.distance_transform_edt(mask), rtol=1e-12)
    assert len(calls) == 12  # each of the 12 blocks once (no second pass over the input)
    assert 0 < stats.bytes_written <= plan.bytes_written
    assert os.listdir(tmp_path) == []
