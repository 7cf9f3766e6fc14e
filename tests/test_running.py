"""A float uniform filter's running sums, carried from step to step (``runtime/running.py``).

scipy's uniform filter sums each line as it goes; on floats the sum rounds, so dask's
result depends on where each block's line starts.  The sweep carries the sums between
steps and restarts them there: its results are stock dask's, bit for bit, whatever the
steps, chunks, sizes, modes and dtypes.
"""

from __future__ import annotations

from unittest import mock

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from dask_image import ndfilters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dask_sweep
from dask_sweep.plan.ir import Running
from dask_sweep.runtime import running
from dask_sweep.runtime.running import extension
from dask_sweep.testing import strategies as sst

CARRIED = "running sums carried"


def _values(rng, shape, dtype):
    """Over many magnitudes (so sums round), with NaNs, infinities and both zeros."""
    v = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 5, shape)
    u = rng.random(shape)
    v[u < 0.02] = np.nan
    v[(u >= 0.02) & (u < 0.03)] = np.inf
    v[(u >= 0.03) & (u < 0.06)] = -0.0
    return v.astype(dtype)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _assert_dask_bits(y, **config) -> str:
    """``y`` swept under ``config`` equals stock dask to the bit; the plan's text."""
    expected = y.compute(scheduler="sync", optimize_graph=False)
    text = str(dask_sweep.explain(y, **config))
    with dask_sweep.enable(**config, fallback="raise"):
        got = y.compute(scheduler="sync")
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(_bits(got), _bits(expected))
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.data(),
    shape=sst.shapes(ndim=3, min_side=1, max_side=14),
    dtype=st.sampled_from(["f4", "f8"]),
    size=st.one_of(st.integers(1, 6), st.tuples(*[st.integers(1, 6)] * 3)),
    mode=st.sampled_from(["reflect", "mirror", "nearest", "constant", "wrap"]),
    slab=st.sampled_from(["1B", "600B", "3KiB", "1MiB"]),
    seed=st.integers(0, 2**16),
    bands=st.booleans(),
)
def test_carried_sums_equal_dasks_blocks(data, shape, dtype, size, mode, slab, seed, bands):
    """dask-image's uniform filter on any chunking, size (one per axis, even ones too)
    and mode, at steps of every thickness (one plane to the whole volume), equals stock
    dask to the bit; every case but 'wrap' and a size of 1 along the sweep axis carries
    its sums.  ``bands``: the threads share every step's sums in bands of rows (as on
    large planes), through the lines of all the blocks a step meets."""
    chunks = data.draw(sst.chunkings(shape))
    vol = _values(np.random.default_rng(seed), shape, dtype)
    sizes = (size,) * 3 if np.ndim(size) == 0 else size
    if any(s // 2 > n for s, n in zip(sizes, shape)):
        return  # dask-image's halo deeper than the array: dask refuses it
    y = ndfilters.uniform_filter(da.from_array(vol, chunks=chunks), size, mode=mode, cval=1.5)
    with mock.patch.object(running, "BAND_VOXELS", 1 if bands else running.BAND_VOXELS):
        text = _assert_dask_bits(y, memory_limit="64MiB", target_slab_bytes=slab, threads=2)
    if mode != "wrap" and sizes[0] > 1 and "sweep 0" in text:
        assert CARRIED in text, text


@pytest.mark.parametrize("chunks", [(1, 1, 4), (1, 1, 5), (2, 5)])
def test_a_last_block_longer_than_the_others(rng, chunks):
    """dask blocks of one plane, then a long last one (hypothesis's find): the dry run
    took the grid for a repeating one and jumped steps off its rows."""
    vol = _values(rng, (sum(chunks), 1, 3), "f4")
    y = ndfilters.uniform_filter(da.from_array(vol, chunks=(chunks, 1, 3)), (1, 1, 2))
    _assert_dask_bits(y, memory_limit="64MiB", target_slab_bytes="1B", threads=2)


@pytest.mark.parametrize("boundary", ["none", "reflect", 0.5])
def test_map_overlaps_own_halo_and_boundary(rng, boundary):
    """``map_overlap(ndi.uniform_filter)`` with a halo deeper than the window, and with
    a boundary that dask pads (then the blocks are kept: the padding is not carried)."""
    vol = _values(rng, (30, 17, 12), "f4")
    x = da.from_array(vol, chunks=(7, 9, 12))
    y = x.map_overlap(ndi.uniform_filter, depth=3, boundary=boundary, size=(3, 3, 2))
    text = _assert_dask_bits(y, memory_limit="64MiB", target_slab_bytes="2KiB")
    assert (CARRIED in text) == (boundary == "none"), text


def test_large_planes_share_the_sums_among_threads(rng):
    """Planes of 512² at steps of 8: the sums' rows are cut in bands, one per thread."""
    vol = _values(rng, (20, 512, 512), "f4")
    y = ndfilters.uniform_filter(da.from_array(vol, chunks=(6, 256, 512)), 3)
    text = _assert_dask_bits(y, memory_limit="256MiB", target_slab_bytes="8MiB", threads=2)
    assert CARRIED in text and "2 threads per step" in text, text


def test_the_sums_keep_one_chain_and_say_why(rng):
    """Steps depend on the previous one's sums: no segments, even when asked."""
    y = ndfilters.uniform_filter(da.from_array(_values(rng, (64, 16, 16), "f4"),
                                               chunks=(8, 16, 16)), 3)
    text = _assert_dask_bits(y, memory_limit="64MiB", target_slab_bytes="1KiB", segments=4)
    assert "carries its running sums from step to step" in text, text


def test_planes_over_the_budget_fall_back_to_tiles_on_dasks_blocks(tmp_path, rng):
    """When whole planes do not fit, the stage is tiled on dask's blocks, as before."""
    import zarr

    vol = _values(rng, (16, 256, 256), "f4")
    src = str(tmp_path / "in.zarr")
    zarr.create_array(src, shape=vol.shape, chunks=(8, 64, 64), dtype="f4")[:] = vol
    y = ndfilters.uniform_filter(da.from_zarr(src), 3)
    z = zarr.create_array(str(tmp_path / "out.zarr"), shape=vol.shape, chunks=(8, 64, 64),
                          dtype="f4")
    store = da.store(y, z, lock=False, compute=False)
    text = str(dask_sweep.explain(store, memory_limit="8MiB"))
    assert "tiled in-plane" in text and "in-plane tiles cut the planes" in text, text
    assert CARRIED not in text, text
    with dask_sweep.enable(memory_limit="8MiB", fallback="raise"):
        store.compute()
    np.testing.assert_array_equal(_bits(z[:]), _bits(y.compute(optimize_graph=False)))


def test_a_cluster_carries_the_sums_between_its_tasks(rng):
    """Under ``distributed`` the sums travel with the state from task to task."""
    distributed = pytest.importorskip("distributed")
    vol = _values(rng, (40, 24, 20), "f8")
    y = ndfilters.uniform_filter(da.from_array(vol, chunks=(9, 12, 20)), 5)
    expected = y.compute(scheduler="sync", optimize_graph=False)
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1,
                            dashboard_address=None):
        with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="2KiB"):
            assert CARRIED in str(dask_sweep.explain(y))
            got = y.compute()
    np.testing.assert_array_equal(_bits(got), _bits(expected))


def test_integer_uniform_filters_stay_block_invariant_kernels(rng):
    """Integer sums are exact: those are kernels on any slab, not carried sums."""
    y = ndfilters.uniform_filter(da.from_array(rng.integers(0, 255, (20, 8, 8), dtype="u1"),
                                               chunks=(5, 8, 8)), 3)
    text = _assert_dask_bits(y, memory_limit="64MiB", target_slab_bytes="1KiB")
    assert CARRIED not in text and "kernel" in text, text


@pytest.mark.parametrize("mode", ["reflect", "mirror", "nearest", "constant"])
@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_extension_is_scipys_line_extension(mode, length):
    """The extended line's indices give scipy's own result, on lines shorter than the
    window too."""
    rng = np.random.default_rng(length)
    line = rng.standard_normal(length)
    for size in (1, 2, 3, 6, 11):
        ext = extension(length, size, mode)
        vals = np.where(ext < 0, 2.5, line[np.maximum(ext, 0)])
        want = ndi.uniform_filter1d(line, size, mode=mode, cval=2.5)
        got = np.array([vals[i:i + size].sum() / size for i in range(length)])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_the_plans_stage_is_a_running_sum(rng):
    """The recogniser's choice, read from the plan: one Running stage, the sweep axis's
    window its reach, and the blocked form kept for tiles."""
    from dask_sweep.integration.optimize import SweepPass, analyse

    y = ndfilters.uniform_filter(da.from_array(_values(rng, (30, 10, 10), "f4"),
                                               chunks=(10, 5, 10)), 4)
    an = analyse(y.__dask_graph__(), y.__dask_keys__(),
                 SweepPass(memory_limit="64MiB").settings())
    ((plan, _),) = an.plans
    (run,) = [s for s in plan.stages if isinstance(s, Running)]
    assert (run.size, run.mode, run.depth) == (4, "reflect", (2, 2, 2))
    assert run.reach == (3, 1)  # the plane leaving (-size//2 - 1) and the one entering
    assert run.blocked is not None and run.blocked.label == run.label
