"""Bit-identity of the sweep against stock dask over a broad grid, and with hypothesis."""

import re

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dask_sweep
from dask_sweep.testing import assert_sweep_equal, swept
from dask_sweep.testing import strategies as sst

SMALL = dict(target_slab_bytes="2KiB", memory_limit="16MiB")


def opaque(a):
    # Not block-invariant on purpose: depends on the whole block it is given.
    return (a * 2 - a.mean(axis=0)).astype(a.dtype)


@pytest.mark.parametrize("chunks", [(5, 19, 17), (4, 7, 6), (1, 19, 17), (23, 19, 17), (3, 5, 17)])
@pytest.mark.parametrize("boundary", ["none", "reflect", "nearest", 0, 7.5])
@pytest.mark.parametrize("depth", [1, 2, (3, 1, 2), {0: 2, 1: 0, 2: 1}])
def test_map_overlap_grid(rng, chunks, boundary, depth):
    vol = (rng.random((23, 19, 17)) * 255).astype("u1")
    for dt in ["u1", "f4", "i2"]:
        x = da.from_array(vol.astype(dt), chunks=chunks)
        y = x.map_overlap(opaque, depth=depth, boundary=boundary)
        y = (y > 3).astype(dt) + x
        # one block, opaque function: nothing to stream, left to stock dask
        assert_sweep_equal(y, expect_swept=chunks != vol.shape, **SMALL)


def test_single_block_left_to_dask_unless_a_kernel_can_slab_it(rng):
    vol = (rng.random((23, 19, 17)) * 255).astype("u1")
    x = da.from_array(vol, chunks=-1)
    y = x.map_overlap(opaque, depth=1, boundary="reflect")
    assert_sweep_equal(y, expect_swept=False, **SMALL)
    assert "every array is a single block" in str(dask_sweep.explain(y, **SMALL))
    # a known kernel is cut into slabs of the one block: memory bounded by the window
    z = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="reflect")
    assert_sweep_equal(z, expect_swept=True, **SMALL)

    # dask's tolerance of a function returning another shape than declared (dask's own
    # test_map_overlap_deprecated_signature) is kept
    def total(b):
        return np.array(b.sum())

    w = da.ones(3).map_overlap(total, depth=1, boundary="reflect")
    with dask_sweep.enable(**SMALL):
        assert w.compute() == 5


@pytest.mark.parametrize("chunks", [(4, 19, 17), (6, 10, 9)])
def test_asymmetric_depth_none(rng, chunks):
    x = da.from_array(rng.random((23, 19, 17)), chunks=chunks)
    y = x.map_overlap(opaque, depth={0: (2, 1), 1: (0, 3), 2: 1}, boundary="none")
    assert_sweep_equal(y, **SMALL)


@pytest.mark.parametrize("chunks", [(5, 6, 16), (1, 18, 16), (3, 5, 4)])
@pytest.mark.parametrize("depth", [1, 2, {0: 3, 1: 1, 2: 0}])
def test_periodic_along_the_sweep_axis(rng, chunks, depth):
    x = da.from_array(rng.random((20, 18, 16)), chunks=chunks) + 1
    y = x.map_overlap(opaque, depth=depth, boundary="periodic")
    assert_sweep_equal(y, **SMALL)
    y = x.map_overlap(ndi.gaussian_filter, depth=depth, sigma=0.5,
                      boundary={0: "periodic", 1: "reflect", 2: "none"})
    assert_sweep_equal(y.map_overlap(opaque, depth=1, boundary="nearest"), **SMALL)


def test_chained_periodic_sweeps_another_axis(rng):
    x = da.from_array(rng.random((20, 18, 16)), chunks=(5, 6, 16))
    y = x.map_overlap(opaque, depth=2, boundary={0: "periodic", 1: "reflect", 2: "none"})
    y = y.map_overlap(opaque, depth=1, boundary={0: "periodic", 1: "none", 2: "none"})
    assert_sweep_equal(y, **SMALL)
    assert "axis 1" in str(dask_sweep.explain(y, **SMALL))


def test_chained_periodic_everywhere_falls_back_with_reason(rng):
    x = da.from_array(rng.random((20, 18, 16)), chunks=(5, 6, 16))
    y = x.map_overlap(opaque, depth=1, boundary="periodic")
    y = y.map_overlap(opaque, depth=1, boundary="periodic")
    assert_sweep_equal(y, expect_swept=False, **SMALL)
    assert "periodic" in str(dask_sweep.explain(y))


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_chained_stages_and_elementwise(rng, n_stages, scheduler):
    x = da.from_array((rng.random((30, 20, 18)) * 100).astype("f4"), chunks=(6, 10, 9))
    y = x
    for i in range(n_stages):
        y = y.map_overlap(opaque, depth=i + 1, boundary=["reflect", "none", 0][i])
        y = da.where(y > 10, y, -y) * 2
    assert_sweep_equal(y, scheduler=scheduler, **SMALL)


def test_two_arrays_on_the_same_grid(rng):
    x = da.from_array(rng.random((24, 16, 16)), chunks=(4, 8, 8))
    g = x.map_overlap(opaque, depth=2, boundary="nearest")
    y = g - x + da.sin(g)
    assert_sweep_equal(y, **SMALL)


def test_map_blocks_stage(rng):
    x = da.from_array(rng.random((24, 16, 16)), chunks=(4, 8, 8))
    y = x.map_overlap(opaque, depth=1).map_blocks(lambda b: b - b.min(), dtype=x.dtype)
    assert_sweep_equal(y, **SMALL)


def test_block_info_reaches_function(rng):
    x = da.from_array(rng.random((24, 16, 16)), chunks=(4, 8, 8))

    def f(b, block_info=None):
        loc = block_info[0]["chunk-location"][0] if block_info else 0
        return b + loc

    y = x.map_overlap(f, depth=1, boundary="reflect", dtype=x.dtype)
    assert_sweep_equal(y, **SMALL)


def test_dask_compute_many_outputs(rng):
    x = da.from_array(rng.random((24, 16, 16)), chunks=(4, 8, 8))
    g = x.map_overlap(opaque, depth=1)
    a, b = g + 1, g.map_overlap(opaque, depth=2, boundary="reflect")
    with dask_sweep.enable(**SMALL):
        ra, rb = dask.compute(a, b)
    ea, eb = dask.compute(a, b)
    np.testing.assert_array_equal(ra, ea, strict=True)
    np.testing.assert_array_equal(rb, eb, strict=True)


def test_partial_request_is_left_to_dask(rng):
    x = da.from_array(rng.random((24, 16, 16)), chunks=(4, 8, 8))
    y = x.map_overlap(opaque, depth=1)
    part = y[:4]
    with dask_sweep.enable(**SMALL):
        r = part.compute()
    np.testing.assert_array_equal(r, part.compute())


def test_trim_false_is_left_to_dask(rng):
    x = da.from_array(rng.random((24, 16)), chunks=(6, 8))
    y = x.map_overlap(lambda b: b * 2, depth=1, trim=False)
    assert_sweep_equal(y, expect_swept=False, **SMALL)


def test_external_source_is_correct(rng):
    # The input of the windowed stage is a computation dask does (not a root read).
    x = da.from_array(rng.random((24, 16, 16)), chunks=(4, 8, 8))
    up = x.rechunk((6, 16, 16)).sum(axis=2, keepdims=True) * da.ones((1, 1, 16), chunks=(1, 1, 16))
    y = up.map_overlap(opaque, depth=1, boundary="reflect")
    assert_sweep_equal(y, expect_swept=None, **SMALL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(3, 14), st.integers(2, 9), st.integers(1, 8)),
    c0=st.integers(1, 6), c1=st.integers(1, 9),
    depth=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)),
    boundary=st.sampled_from(["none", "reflect", "nearest", "periodic", 0, -1.5]),
    dtype=st.sampled_from(["u1", "i4", "f4", "f8", "bool"]),
    stages=st.integers(1, 3),
)
def test_hypothesis_overlap_chains(shape, c0, c1, depth, boundary, dtype, stages):
    rng = np.random.default_rng(sum(shape) + c0 * 7 + c1)
    vol = (rng.random(shape) * 50).astype(dtype)
    x = da.from_array(vol, chunks=(c0, c1, shape[2]))
    if any(d > s for d, s in zip(depth, shape)):
        return  # dask itself refuses a depth larger than the array
    y = x
    for _ in range(stages):
        y = y.map_overlap(opaque, depth=depth, boundary=boundary)
    assert_sweep_equal(y, expect_swept=None, **SMALL)


def test_known_kernels_are_reblocked_and_exact(rng):
    vol = (rng.random((40, 33, 30)) * 255).astype("u1")
    x = da.from_array(vol, chunks=(3, 11, 30))
    y = x.map_overlap(ndi.gaussian_filter, depth=8, sigma=2, boundary="none")
    y = y.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="reflect")
    y = y.map_overlap(ndi.uniform_filter, depth=2, size=5, boundary="none")
    text = str(dask_sweep.explain(y))
    assert text.count("kernel ") == 3, text
    assert_sweep_equal(y, target_slab_bytes="64KiB", scheduler="threads")


def test_float64_uniform_keeps_dask_blocks(rng):
    x = da.from_array(rng.random((30, 20, 20)), chunks=(5, 10, 20))
    y = x.map_overlap(ndi.uniform_filter, depth=2, size=5, boundary="none")
    assert "not block-invariant" in str(dask_sweep.explain(y))
    assert_sweep_equal(y, **SMALL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(3, 14), st.integers(2, 11), st.integers(2, 9)),
    chunks=st.tuples(st.integers(1, 6), st.integers(1, 11), st.integers(2, 9)),
    depth=st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.integers(0, 2),
                    st.integers(0, 2)),
    boundary=st.sampled_from(["none", "reflect", "nearest", 0, -1.5]),
    dtype=st.sampled_from(["f4", "f8"]),
    call=st.sampled_from([
        (ndi.uniform_filter, dict(size=3)),
        (ndi.uniform_filter, dict(size=(5, 1, 3), mode="nearest")),
        (ndi.uniform_filter, dict(size=4, mode="constant", cval=2.5)),
        (ndi.uniform_filter, dict(size=3, axes=(0, 2))),
        (ndi.gaussian_filter, dict(sigma=1.5)),  # radius 6 > depth: dask's blocks
        (ndi.maximum_filter, dict(size=(3, 5, 3))),
    ]),
)
def test_separable_filters_on_dask_blocks_are_bit_identical(shape, chunks, depth, boundary,
                                                              dtype, call):
    """A separable filter kept on dask's blocks (a float running sum, a footprint wider
    than the depth) runs as its 1-D passes with each axis's halo cropped after its pass:
    the same bits as dask's block, halo and trim, at any chunking, depth and boundary."""
    rng = np.random.default_rng(sum(shape) * 31 + sum(chunks))
    vol = (rng.random(shape) * 100 - 20).astype(dtype)
    depth = {0: depth[0], 1: depth[1], 2: depth[2]}
    if boundary != "none":
        depth[0] = max(depth[0])  # dask pads symmetric depths only
    if any(max(np.atleast_1d(d)) > s for d, s in zip(depth.values(), shape)):
        return  # dask itself refuses a depth larger than the array
    fn, kw = call
    x = da.from_array(vol, chunks=chunks)
    y = x.map_overlap(fn, depth=depth, boundary=boundary, **kw)
    text = str(dask_sweep.explain(y, **SMALL))
    if "kept dask's blocks" in text:
        assert "scipy's 1-D passes" in text, text
    assert_sweep_equal(y, expect_swept=None, **SMALL)


def test_float_uniform_on_one_plane_blocks_carries_its_sums(rng):
    # float64 sums round by where a line starts: dask's blocks, not one global filter
    # (float32's few-term sums are exact in scipy's double buffers, mostly); the sweep
    # carries the sums between steps, restarted at each block's line
    vol = rng.random((24, 20, 18))
    x = da.from_array(vol, chunks=(1, 20, 18))  # a TIFF stack's one-plane blocks
    y = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="none")
    assert not np.array_equal(y.compute(), ndi.uniform_filter(vol, 3))
    text = str(dask_sweep.explain(y, **SMALL))
    assert "running sums carried" in text, text
    assert_sweep_equal(y, **SMALL)


def test_footprint_larger_than_depth_keeps_dask_blocks(rng):
    x = da.from_array((rng.random((30, 20, 20)) * 9).astype("u1"), chunks=(5, 10, 20))
    y = x.map_overlap(ndi.gaussian_filter, depth=2, sigma=2, boundary="none")
    assert "footprint radius" in str(dask_sweep.explain(y))
    assert_sweep_equal(y, **SMALL)


def test_plain_elementwise_graph_is_untouched(rng):
    x = da.from_array(rng.random((10, 10)), chunks=5)
    y = (x + 1) * 2
    assert not swept(y)
    with dask_sweep.enable():
        (o,) = dask.optimize(y)
    np.testing.assert_array_equal(o.compute(), y.compute())


REDUCTIONS = {
    "sum": lambda y: y.sum(),
    "mean axis 0": lambda y: y.mean(axis=0),
    "max axes 1,2": lambda y: y.max(axis=(1, 2)),
    "std": lambda y: y.std(),
    "var keepdims": lambda y: y.var(axis=0, keepdims=True),
    "argmax": lambda y: y.argmax(axis=0),
    "nanmean": lambda y: da.nanmean(y, axis=1),
    "cumsum": lambda y: y.cumsum(axis=0),
    "any": lambda y: (y > 100).any(axis=2),
    "histogram": lambda y: da.histogram(y, bins=8, range=(0, 255))[0],
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reductions_of_swept_stages(rng, name):
    # dask records a reduction's first step with its input's chunks and shrinks them
    # afterwards: that step is not an elementwise stage of the sweep
    x = da.from_array((rng.random((23, 19, 17)) * 255).astype("f4"), chunks=(5, 10, 17))
    y = x.map_overlap(opaque, depth=1, boundary="reflect") + 1
    assert_sweep_equal(REDUCTIONS[name](y), expect_swept=True, **SMALL)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.tuples(st.integers(1, 14), st.integers(1, 12), st.integers(1, 40)),
    chunks=st.tuples(st.integers(1, 6), st.integers(2, 12), st.integers(5, 40)),
    radius=st.integers(1, 3),
    op=st.sampled_from(["binary_dilation", "binary_erosion"]),
    border=st.booleans(),
    density=st.sampled_from([0.01, 0.5, 0.99]),
    slab=st.sampled_from(["1B", "2KiB", "1MiB"]),
    seed=st.integers(0, 2**16),
)
# short stage names: the runs' map is named only in the table, its label cut there
@example(shape=(12, 3, 3), chunks=(6, 2, 5), radius=2, op="binary_dilation", border=False,
         density=0.01, slab="1B", seed=0)
def test_ball_morphology_of_dask_image_is_bit_identical(shape, chunks, radius, op, border,
                                                        density, slab, seed):
    """dask-image's erosion / dilation with a ball: its runs' map a stage of its own
    (radius 2 and more), the kernel reading the map's window; stock dask's bits."""
    from dask_image import ndmorph

    if min(shape) <= radius:
        return  # dask-image's halo deeper than the array: dask refuses it
    ball = np.sum(np.mgrid[(slice(-radius, radius + 1),) * 3] ** 2, 0) <= radius * radius
    vol = np.random.default_rng(seed).random(shape) < density
    x = da.from_array(vol, chunks=chunks)
    y = getattr(ndmorph, op)(x, structure=ball, border_value=int(border))
    with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes=slab):  # numba loaded
        text = str(dask_sweep.explain(y))
    assert "sweep 0" in text, text
    # the stage's label may be cut in the table ("binary_dilation: runs…")
    assert bool(re.search(r"binary_\w+: runs", text)) == (radius >= 2), text
    assert_sweep_equal(y, expect_swept=None, memory_limit="64MiB", target_slab_bytes=slab)


# --- pipelines as users write them, composed at random -----------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.tuples(st.integers(4, 20), st.integers(3, 16), st.integers(3, 16)),
    data=st.data(),
    dtype=st.sampled_from(["u1", "u2", "f4", "f8"]),
    stages=sst.pipelines(),
    budget=st.sampled_from(["2KiB", "16KiB", "64KiB", "1MiB", "64MiB"]),
    slab=st.sampled_from([None, "1B", "4KiB"]),
    scheduler=st.sampled_from(["sync", "threads"]),
)
def test_hypothesis_user_pipelines(shape, data, dtype, stages, budget, slab, scheduler):
    """dask-image filters and morphology, ``where``, casts, ``map_overlap`` and xarray's
    rolling mean, chained at random on random chunks, under budgets from a few planes
    (thin steps, in-plane tiles, fallbacks) to all of it: stock dask's bits every time.
    (500 such cases ran clean in stop 38's search, about half of them swept; each run
    draws 12 new ones.)"""
    from hypothesis import assume

    from dask_sweep.testing.pipelines import build

    chunks = data.draw(sst.chunkings(shape))
    rng = np.random.default_rng(sum(shape) * 31 + len(stages))
    vol = rng.random(shape)
    vol = (vol * 255).astype(dtype) if dtype[0] == "u" else vol.astype(dtype)
    x = da.from_array(vol, chunks=chunks)
    try:
        y = build(x, stages)
    except ValueError:  # dask refuses, e.g. a depth deeper than the array
        assume(False)
    settings_ = {"memory_limit": budget, "fallback": "silent"}
    if slab:
        settings_["target_slab_bytes"] = slab
    # no runtime overhead: budgets of a few planes are planned, not refused
    with dask.config.set({"sweep.runtime-overhead": 0, "sweep.task-overhead": 0,
                          "sweep.key-overhead": 0}):
        assert_sweep_equal(y, scheduler=scheduler, expect_swept=None, **settings_)
