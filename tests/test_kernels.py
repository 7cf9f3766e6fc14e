"""Block-invariance of the kernels the sweep re-blocks, proven against dask on random cuts."""

from unittest import mock

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
    (ndi.median_filter, dict(size=(5, 3, 1), mode="constant", cval=7), 2, "ui"),
    (ndi.median_filter, dict(footprint=np.ones((3, 5, 3), bool), mode="mirror"), 2, "ui"),
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


def _kept_planes(axis_pass, shared: bool):
    """``kept_planes``, with ``shared``: voxel blocks shared by threads from any size (in
    uneven blocks of 7 voxels), as on large planes."""
    if not shared:
        return axis_pass.kept_planes

    def kept(*args):
        with mock.patch.multiple(axis_pass, _SHARE_FROM=1, _BLOCK_SHARED=7):
            return axis_pass.kept_planes(*args)

    return kept


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(["u1", "i1", "u2", "i2", "i4", "u4", "f4", "f8"]),
    sigma=st.floats(0.3, 4.0),
    truncate=st.sampled_from([2.0, 3.0, 4.0]),
    radius=st.one_of(st.none(), st.integers(0, 9)),
    planes=st.integers(1, 12),
    extra=st.integers(0, 4),
    inplane=st.sampled_from([(1, 1), (3, 17), (16, 5)]),
    threads=st.sampled_from([1, 2]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kept_planes_pass_is_scipy_bit_for_bit(dtype, sigma, truncate, radius, planes, extra,
                                               inplane, threads, shared, seed):
    """The sweep-axis gaussian pass over the kept planes only equals scipy's full pass."""
    import functools

    from dask_sweep.runtime import axis_pass

    kept_planes = _kept_planes(axis_pass, shared)

    rng = np.random.default_rng(seed)
    r = radius if radius is not None else int(truncate * sigma + 0.5)
    shape = (planes + 2 * r + 2 * extra, *inplane)
    if dtype[0] == "f":
        x = (rng.standard_normal(shape) * 100).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    fn = functools.partial(ndi.gaussian_filter1d, sigma=sigma, axis=0, order=0, mode="reflect",
                           cval=0.0, truncate=truncate, radius=radius)
    c0 = r + extra
    got = kept_planes(fn, x, 0, c0, planes, threads)
    assert got is not None
    np.testing.assert_array_equal(got, fn(x)[c0:c0 + planes], strict=True)
    _faces_are_scipy(kept_planes, fn, x, planes, threads)


def _faces_are_scipy(kept_planes, fn, x, planes, threads):
    """Kept planes whose windows reach past the slab (a face of the volume) are scipy's,
    for every boundary mode and cval, or left to scipy's pass (``None``)."""
    import functools

    n = x.shape[0]
    for mode, cval in [("reflect", 0.0), ("mirror", 0.0), ("nearest", 0.0),
                       ("constant", 0.0), ("constant", 3.0), ("constant", 0.5),
                       ("constant", -2.0), ("wrap", 0.0)]:
        f = functools.partial(fn.func, *fn.args, **{**fn.keywords, "mode": mode, "cval": cval})
        full = f(x)
        for c0 in sorted({0, max(0, n // 2 - planes), max(0, n - planes)}):
            t = min(planes, n - c0)
            got = kept_planes(f, x, 0, c0, t, threads)
            if got is None:  # wrap, or a cval the dtype cannot hold (scipy extends in double)
                with np.errstate(all="ignore"):
                    held = np.asarray(cval).astype(x.dtype).astype(float) == cval
                assert mode == "wrap" or mode == "constant" and not held or n < 4
                continue
            np.testing.assert_array_equal(got, full[c0:c0 + t], strict=True)


@settings(max_examples=80, deadline=None)
@given(
    op=st.sampled_from(["uniform", "minimum", "maximum"]),
    dtype=st.sampled_from(["u1", "i1", "u2", "i2", "i4", "u4", "bool"]),
    size=st.integers(1, 7),
    planes=st.integers(1, 9),
    extra=st.integers(0, 3),
    inplane=st.sampled_from([(1, 1), (3, 17), (16, 5)]),
    threads=st.sampled_from([1, 2]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_window_kept_planes_are_scipy_bit_for_bit(op, dtype, size, planes, extra, inplane,
                                                  threads, shared, seed):
    """Uniform (integer sums), minimum and maximum passes over the kept planes only."""
    import functools

    from dask_sweep.runtime import axis_pass

    kept_planes = _kept_planes(axis_pass, shared)

    rng = np.random.default_rng(seed)
    lo, hi = size // 2, size - size // 2 - 1
    x = rng.integers(-300, 300, (planes + lo + hi + 2 * extra, *inplane))
    x = (x > 0) if dtype == "bool" else x.astype(dtype)
    fn = functools.partial(getattr(ndi, f"{op}_filter1d"), size=size, axis=0)
    c0 = lo + extra
    got = kept_planes(fn, x, 0, c0, planes, threads)
    if got is None:  # a bool sum or a size without a window: scipy's own pass runs
        assert op == "uniform" and (dtype == "bool" or size < 2)
        return
    np.testing.assert_array_equal(got, fn(x)[c0 : c0 + planes])
    assert got.dtype == fn(x).dtype
    _faces_are_scipy(kept_planes, fn, x, planes, threads)


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from(["u1", "i1", "u2", "i2", "i4", "u4", "f4", "f8"]),
    sides=st.sampled_from([(3, 3, 3), (5, 5, 5), (1, 3, 5), (7, 1, 1), (3, 7, 3), (5, 5)]),
    mode=st.sampled_from(["reflect", "mirror", "nearest", "constant", "wrap", "grid-mirror"]),
    cval=st.sampled_from([0, 5, -3, 0.5]),
    shape=st.tuples(st.integers(1, 14), st.integers(1, 9), st.integers(1, 21)),
    cut=st.tuples(st.integers(0, 13), st.integers(0, 14)),
    smooth=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_median_of_the_kept_planes_is_scipy_bit_for_bit(dtype, sides, mode, cval, shape, cut,
                                                         smooth, seed):
    """``MedianPlanes.planes`` equals scipy's median over the whole window, cropped: any
    box, mode, cval, dtype, window and kept range (axes thinner than the box included)."""
    from dask_sweep.runtime.rank import MedianPlanes

    shape = shape[: len(sides)]
    rng = np.random.default_rng(seed)
    if dtype[0] == "f":
        x = (rng.standard_normal(shape) * 100).astype(dtype)
        if smooth:  # ties, zeros of both signs, a NaN now and then
            x = np.round(x / 50).astype(dtype)
            x[rng.random(shape) < 0.1] = -0.0
            if seed % 5 == 0:
                x.flat[seed % x.size] = np.nan
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        if smooth:  # runs of close values: the median moves little, ties abound
            x = (x // 16).astype(dtype)
    kw = {"size": sides, "mode": mode, "cval": cval}
    fn = MedianPlanes.of(kw, len(sides), dtype)
    representable = dtype[0] == "f" or float(np.asarray(cval).astype(dtype)) == cval
    if mode == "wrap" or (mode == "constant" and not representable):
        assert fn is None  # left to scipy
        return
    c0 = min(cut[0], shape[0])
    t = min(cut[1], shape[0] - c0)
    want = ndi.median_filter(x, **kw)[c0:c0 + t]
    got = fn.planes(x, 0, c0, t)
    np.testing.assert_array_equal(_bits(got), _bits(want), strict=True)
    np.testing.assert_array_equal(_bits(fn(x)), _bits(ndi.median_filter(x, **kw)), strict=True)
    for ax in range(1, x.ndim):  # a piece's kept rows
        r0 = min(cut[0], shape[ax] - 1)
        n = min(cut[1], shape[ax] - r0)
        keep = (slice(None),) * ax + (slice(r0, r0 + n),)
        got = fn.planes(x, 0, c0, t, rows=(ax, r0, n))
        np.testing.assert_array_equal(_bits(got), _bits(want[keep]), strict=True)


def _bits(a: np.ndarray) -> np.ndarray:
    """The array's bits (a NaN or -0.0 is not equal to another by its value)."""
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def test_median_kept_planes_compute_no_halo_planes(monkeypatch):
    """dask-image's median on 8/16-bit integers runs the histogram kernel on the kept
    planes (never scipy's call on the window), swept bit for bit as stock dask."""
    from dask_image import ndfilters

    from dask_sweep.runtime import rank

    rng = np.random.default_rng(5)
    calls = []
    monkeypatch.setattr(rank.MedianPlanes, "__call__", lambda self, x: calls.append(x.shape))
    rows = rank._median_rows
    monkeypatch.setattr(rank, "_median_rows", lambda p, out, *a: calls.append("rows")
                        or rows(p, out, *a))
    for dtype in ("u1", "i2"):
        vol = (rng.random((30, 24, 19)) * 120).astype(dtype)
        x = da.from_array(vol, chunks=(7, 12, 19))
        for mode in ("reflect", "nearest", "constant"):
            calls.clear()
            y = ndfilters.median_filter(x, size=5, mode=mode)
            assert "kernel " in str(dask_sweep.explain(y))
            assert_sweep_equal(y, target_slab_bytes="4KiB", threads=2)
            assert calls and set(calls) == {"rows"}, calls


def test_a_plan_loads_numba_only_where_the_budget_has_room_for_it():
    """In a process that has not loaded numba's kernels (no ``enable()``), a median's plan
    at 24 MiB runs scipy's call and says why; at 512 MiB it uses the kernel and counts
    LLVM's load (64 MiB) in its floor; both equal scipy."""
    import subprocess
    import sys

    code = """
import dask, dask.array as da, numpy as np, scipy.ndimage as ndi
from dask_image import ndfilters
import dask_sweep
from dask_sweep.runtime import jit
v = np.random.default_rng(0).integers(0, 255, (24, 32, 32), dtype=np.uint8)
y = ndfilters.median_filter(da.from_array(v, chunks=(8, 32, 32)), size=3)
for budget in ("24MiB", "512MiB"):
    with dask.config.set({"sweep.memory-limit": budget, "optimizations": [dask_sweep.sweep]}):
        print(budget, jit.loaded(), "|", dask_sweep.explain(y))
        np.testing.assert_array_equal(y.compute(), ndi.median_filter(v, size=3))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    small, large = p.stdout.split("512MiB", 1)
    assert small.startswith("24MiB False") and "numba's kernel is not loaded" in small
    assert "numba's kernels load in this run: 64.00 MiB counted" in large
    assert large.startswith(" False") and "floor (smallest budget" in large
    assert "67." in large.split("floor (smallest budget", 1)[1].split("\n")[0]


def test_a_float_medians_nan_check_holds_no_piece_sized_masks():
    """The check for NaN and mixed signed zeros of a median's piece (``rank._ambiguous``)
    allocates a plane's mask at most, not masks of the piece (a quarter of a float32
    piece each, beyond the plan's model of its temporaries)."""
    import tracemalloc

    from dask_sweep.runtime.rank import _ambiguous

    p = np.random.default_rng(0).standard_normal((20, 256, 256)).astype("f4")
    p[3, 4, 5] = 0.0
    p[17, 1, 2] = -0.0
    for want, piece in ((True, p), (False, np.abs(p)), (True, np.where(p > 3, np.nan, p))):
        tracemalloc.start()
        got = _ambiguous(piece)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got == want
        assert peak <= piece[0].nbytes, peak  # one plane's mask, not the piece's
