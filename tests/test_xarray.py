"""xarray on the sweep: its default rolling path, and a reason for everything else.

The oracle is xarray on stock dask: the same object computed without and with the
sweep must be ``identical`` and equal bit for bit, on data with NaNs, zeros and
negative zeros.  ``explain`` must say what it swept and why the rest is not.
"""

import gc
import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from numpy.lib.stride_tricks import sliding_window_view

import dask_sweep
from dask_sweep.patterns.rolling import order_signature

xr = pytest.importorskip("xarray")

# numpy's own warnings on windows of NaNs only (stock dask raises them too)
pytestmark = [
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Degrees of freedom <= 0:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning"),
]

SMALL = dict(memory_limit="64MiB", target_slab_bytes="2KiB")
OPS = ["mean", "sum", "min", "max", "std", "var", "count", "median"]


def values(rng, shape, dtype="f8"):
    """Random values over many magnitudes, with NaNs, zeros and negative zeros."""
    v = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)
    u = rng.random(shape)
    v[u < 0.08] = np.nan
    v[(u >= 0.08) & (u < 0.12)] = 0.0
    v[(u >= 0.12) & (u < 0.15)] = -0.0
    return v.astype(dtype)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype.kind in "fc" else a


def assert_swept_equal(obj, kept_blocks=False):
    """``obj`` is swept (explain) and computes to xarray-on-dask's result, bit for bit."""
    text = str(dask_sweep.explain(obj, **SMALL))
    assert "sweep 0" in text and "left to stock dask" not in text, text
    assert ("kept dask's blocks" in text) == kept_blocks, text
    expected = obj.compute(scheduler="sync")
    with dask_sweep.enable(**SMALL, fallback="raise"):
        got = obj.compute(scheduler="sync")
    xr.testing.assert_identical(got, expected)
    for name in getattr(got, "data_vars", [None]):
        g, e = (got, expected) if name is None else (got[name], expected[name])
        np.testing.assert_array_equal(bits(g.values), bits(e.values), strict=True)
    return text


CASES = {
    # rolling arguments, chunks, dtype
    "z5-center": (dict(z=5, center=True), (4, 10, 9), "f8"),
    "z5-trailing-chunks-below-window": (dict(z=5), (3, 10, 9), "f8"),
    "z9-y3-window-beyond-chunks": (dict(z=9, y=3, center=True, min_periods=2), (2, 5, 9), "f8"),
    "zyx-3d": (dict(z=3, y=3, x=3, center=True), (4, 5, 4), "f4"),
    "y4-even-min-periods": (dict(y=4, min_periods=1), (6, 4, 9), "f8"),
    "x8-last-axis": (dict(x=8, center=True), (5, 10, 3), "f4"),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(CASES))
def test_rolling_equals_xarray_on_dask(rng, op, case):
    roll, chunks, dtype = CASES[case]
    arr = xr.DataArray(da.from_array(values(rng, (24, 10, 9), dtype), chunks=chunks),
                       dims=("z", "y", "x"), name="v", attrs={"units": "a.u."})
    out = getattr(arr.rolling(**roll), op)()
    text = assert_swept_equal(out)
    assert {"mean": "rolling sum", "count": "rolling count"}.get(op, f"rolling {op}") in text
    assert "a kernel on any slab" in text


@pytest.mark.parametrize("op", ["mean", "sum", "max", "median"])
def test_integer_data(rng, op):
    vol = (rng.random((20, 8, 7)) * 255).astype("u1")
    arr = xr.DataArray(da.from_array(vol, chunks=(3, 8, 7)), dims=("z", "y", "x"))
    assert_swept_equal(getattr(arr.rolling(z=4, y=3, center=True), op)())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hst.data())
def test_block_invariant_windows_reduce_only_the_kept_planes(data):
    """Order statistics and integer sums reduce only the windows of the planes a step
    keeps (``WindowReduce.planes``), at the faces and inside, on any steps: the same
    bits as xarray on dask."""
    rng = np.random.default_rng(data.draw(hst.integers(0, 2**16)))
    n = data.draw(hst.integers(1, 14), "planes")
    window = data.draw(hst.integers(1, 7), "window")
    roll = dict(z=window, center=data.draw(hst.booleans(), "center"),
                min_periods=data.draw(hst.integers(1, window), "min_periods"))
    if data.draw(hst.booleans(), "also y"):
        roll["y"] = data.draw(hst.integers(1, 4), "y window")
    op = data.draw(hst.sampled_from(["min", "max", "count", "median", "sum", "mean"]), "op")
    vol = (rng.random((n, 6, 5)) * 200).astype("i4" if op in ("sum", "mean") else "u1")
    chunks = (data.draw(hst.integers(1, n), "z chunk"), data.draw(hst.integers(2, 6)), 5)
    arr = xr.DataArray(da.from_array(vol, chunks=chunks), dims=("z", "y", "x"))
    out = getattr(arr.rolling(**roll), op)()
    slab = data.draw(hst.sampled_from(["1B", "200B", "1KiB", "64MiB"]), "target slab")
    expected = out.compute(scheduler="sync")
    with dask_sweep.enable(memory_limit="64MiB", target_slab_bytes=slab, fallback="raise"):
        got = out.compute(scheduler="sync")
    np.testing.assert_array_equal(bits(got.values), bits(expected.values), strict=True)


@pytest.mark.parametrize("shape,chunks,roll", [
    ((60,), (7,), dict(t=9, center=True)),            # a time series, window beyond chunks
    ((30, 16), (4, 6), dict(t=5, s=3, min_periods=3)),
])
def test_one_and_two_dimensions(rng, shape, chunks, roll):
    dims = ("t", "s")[: len(shape)]
    arr = xr.DataArray(da.from_array(values(rng, shape), chunks=chunks), dims=dims)
    for op in ("mean", "std", "median"):
        assert_swept_equal(getattr(arr.rolling(**roll), op)())


def test_dataset_rolling(rng):
    ds = xr.Dataset({
        "a": (("z", "y", "x"), da.from_array(values(rng, (18, 8, 6)), chunks=(4, 8, 6))),
        "b": (("z", "y", "x"), da.from_array(values(rng, (18, 8, 6), "f4"), chunks=(5, 4, 6))),
    }, coords={"z": np.arange(18)})
    assert_swept_equal(ds.rolling(z=5, center=True).mean())


def test_blocks_kept_where_numpy_sums_in_another_order(rng):
    # x is not rolled and chunked (3, 3, 1): on the 1-wide blocks numpy's innermost
    # loop is the y window (summed pairwise), elsewhere x (one value after the other)
    arr = xr.DataArray(da.from_array(values(rng, (12, 10, 7)), chunks=(4, 5, (3, 3, 1))),
                       dims=("z", "y", "x"))
    text = assert_swept_equal(arr.rolling(z=3, y=3, center=True).sum(), kept_blocks=True)
    assert "in different orders on dask's blocks" in text
    # the same window over chunks of at least 2 along x: a kernel on any slab
    arr2 = arr.chunk({"x": (4, 3)})
    assert "a kernel on any slab" in assert_swept_equal(arr2.rolling(z=3, y=3).sum())


# --- which order numpy sums a window in (what makes a floating sum block-invariant) ----

def _pairwise(vals, dtype):
    """numpy's pairwise summation of ``vals`` (arrays), as in its ``pairwise_sum``."""
    n = len(vals)
    if n < 8:
        res = np.full(vals[0].shape, -0.0, dtype)
        for v in vals:
            res = res + v
        return res
    if n <= 128:
        r = [vals[j].copy() for j in range(8)]
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] = r[j] + vals[i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for v in vals[i:]:
            res = res + v
        return res
    n2 = n // 2 - (n // 2) % 8
    return _pairwise(vals[:n2], dtype) + _pairwise(vals[n2:], dtype)


def _sum_as_signature_says(block, window, axes):
    """The window sums of ``block`` in the order :func:`order_signature` names."""
    ndim, k = block.ndim, len(axes)
    view = sliding_window_view(block, window, axis=axes)
    c_order = sorted(range(k), key=lambda j: axes[j])  # window axes in C order of the data
    view = np.moveaxis(view, [ndim + j for j in c_order], list(range(ndim, ndim + k)))
    vals = list(np.moveaxis(view.reshape(view.shape[:ndim] + (-1,)), -1, 0))
    ext = tuple(n - (window[axes.index(a)] - 1 if a in axes else 0)
                for a, n in enumerate(block.shape))
    sig = order_signature(ext, dict(zip(axes, window)))
    acc = np.zeros(vals[0].shape, block.dtype)  # numpy starts from add's identity
    run = 1 if sig[0] == "in order" else sig[1]
    for r in range(len(vals) // run):
        part = vals[r * run:(r + 1) * run]
        acc = acc + (part[0] if run == 1 else _pairwise(part, block.dtype))
    return acc


def test_numpy_sums_a_window_in_the_order_of_its_signature():
    """The proof behind :func:`order_signature`: on C-ordered blocks of any shape
    (axes of length 1 included), ``np.sum`` over a sliding window view adds the window's
    values one after the other in C order, or pairwise over runs along the innermost
    window axis, exactly as the signature says."""
    rng = np.random.default_rng(5)
    for _ in range(1500):
        ndim = int(rng.integers(1, 4))
        axes = tuple(int(a) for a in rng.permutation(ndim)[: int(rng.integers(1, ndim + 1))])
        window = tuple(int(rng.choice([2, 3, 5, 8, 9, 12])) for _ in axes)
        shape = tuple(int(rng.integers(1, 4)) + (window[axes.index(a)] - 1 if a in axes else 0)
                      for a in range(ndim))
        dtype = rng.choice([np.float64, np.float32])
        block = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(dtype)
        block[rng.random(shape) < 0.1] = -0.0
        view = sliding_window_view(block, window, axis=axes)
        got = np.sum(view, axis=tuple(range(ndim, ndim + len(axes))))
        want = _sum_as_signature_says(block, window, axes)
        assert np.array_equal(bits(got), bits(want)), (shape, window, axes, dtype)


def _moments(v, axis):
    from dask.array import chunk
    from dask.array.reductions import moment_agg, moment_chunk, nannumel

    c = moment_chunk(v, sum=chunk.nansum, numel=nannumel, axis=axis, keepdims=True,
                     dtype=v.dtype)
    return moment_agg([c], sum=np.sum, ddof=0, dtype=v.dtype, axis=axis, keepdims=True)


@pytest.mark.parametrize("reduce", [np.nansum, _moments])
def test_blocks_with_one_signature_give_the_same_bits(reduce):
    """nansum and var (xarray's NaN-aware sums) depend on the block only through its
    order signature too: two blocks cut anywhere with the same signature agree."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        ndim = int(rng.integers(2, 4))
        axes = tuple(int(a) for a in rng.permutation(ndim)[: int(rng.integers(1, ndim + 1))])
        w = int(rng.choice([2, 3, 9]))
        full = values(rng, (14,) * ndim, rng.choice(["f4", "f8"]))
        results = []
        for _ in range(12):
            cut = []
            for a in range(ndim):
                need = (w - 1 if a in axes else 0) + 1
                s = int(rng.integers(0, 14 - need + 1))
                cut.append(slice(s, int(rng.integers(s + need, min(14, s + need + 2) + 1))))
            block = np.ascontiguousarray(full[tuple(cut)])
            view = sliding_window_view(block, (w,) * len(axes), axis=axes)
            with np.errstate(all="ignore"):
                out = reduce(view, axis=tuple(range(ndim, ndim + len(axes))))
            out = np.asarray(out).reshape(view.shape[:ndim])
            ext = [c.stop - c.start - (w - 1 if a in axes else 0) for a, c in enumerate(cut)]
            origin = [c.start for c in cut]
            results.append((order_signature(ext, dict.fromkeys(axes, w)), origin, out))
        for i, (si, oi, ri) in enumerate(results):
            for sj, oj, rj in results[:i]:
                if si != sj:
                    continue
                lo = [max(a, b) for a, b in zip(oi, oj)]
                hi = [min(a + n, b + m) for a, b, n, m in zip(oi, oj, ri.shape, rj.shape)]
                if any(h <= lo_ for lo_, h in zip(lo, hi)):
                    continue
                a = ri[tuple(slice(x - o, y - o) for x, y, o in zip(lo, hi, oi))]
                b = rj[tuple(slice(x - o, y - o) for x, y, o in zip(lo, hi, oj))]
                assert np.array_equal(bits(a), bits(b)), (si, axes, w)


# --- what explain says about xarray's other paths ------------------------------------------

def test_explain_names_what_was_swept_and_why_the_rest_was_not(rng):
    arr = xr.DataArray(da.from_array(values(rng, (20, 8, 6)), chunks=(4, 8, 6)),
                       dims=("z", "y", "x"))
    text = str(dask_sweep.explain(arr.rolling(z=5, center=True).mean(), **SMALL))
    assert "rolling count" in text and "rolling sum" in text
    assert "kernel  window -2/+2" in text and "numpy adds" not in text
    cases = {
        "reshape (e.g. coarsen": arr.coarsen(z=2).mean(),
        "a blockwise function over whole axes": xr.apply_ufunc(
            lambda v: v.mean(-1), arr, input_core_dims=[["x"]], dask="parallelized"),
        "outputs of xr.apply_ufunc": xr.apply_ufunc(np.sin, arr, dask="parallelized"),
        "xr.map_blocks": xr.map_blocks(lambda b: b + 1, arr),
        "the sliding window view itself is the result": arr.rolling(z=3).construct("w"),
        "slicing and joining blocks": arr.shift(z=1),
        "a reduction over an axis": arr.sum("z"),
        "elementwise or block-by-block work": arr.where(arr > 0),
    }
    for why, obj in cases.items():
        text = str(dask_sweep.explain(obj, **SMALL))
        assert "nothing swept" in text and why in text, text
    # a rolling reduction no rule proves block-invariant keeps dask's blocks
    def ptp(v, axis):  # an opaque function on each block (np.ptp on the dask array would
        # be dask's max - min: recognised)
        return da.map_blocks(np.ptp, v, axis=axis, drop_axis=axis, dtype=v.dtype)

    text = assert_swept_equal(arr.rolling(z=3, center=True).reduce(ptp), kept_blocks=True)
    assert "ptp is not a reduction known to be block-invariant" in text
    # and a reduction of a swept result says why it is not swept itself
    text = str(dask_sweep.explain(arr.rolling(z=5).mean().sum("z"), **SMALL))
    assert "sweep 0" in text and "a reduction over an axis" in text


# --- the budget ------------------------------------------------------------------------

def test_rolling_mean_larger_than_the_budget_stays_within_it(tmp_path, rng):
    """A 13.5 MiB volume, a rolling mean over (z, y) written to a store with a budget of
    8 MiB: the sweep plans within it and the traced peak of the run stays below it."""
    import zarr

    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=(96, 192, 192),
                          chunks=(8, 192, 192), dtype="f4", compressors=None)
    z[:] = values(rng, z.shape, "f4")
    arr = xr.DataArray(da.from_zarr(str(tmp_path / "v.zarr")), dims=("z", "y", "x"))
    out = arr.rolling(z=5, y=3, center=True).mean()
    target = np.zeros(out.shape, out.dtype)
    budget = 8 * 2**20
    settings = dict(memory_limit=budget, fallback="raise", threads=1)
    assert z.nbytes > budget
    (plan, trace), = dask_sweep.explain(da.store(out.data, target, lock=False, compute=False),
                                        **settings).result.plans
    assert trace.peak <= budget
    with dask_sweep.enable(**settings):
        da.store(out.data, target, lock=False, scheduler="sync")  # warm-up: imports, caches
        gc.collect()
        tracemalloc.start()
        try:
            da.store(out.data, target, lock=False, scheduler="sync")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    print("traced peak", peak, "projected", trace.peak, "budget", budget)
    assert peak <= budget, (peak, trace.peak, budget)
    expected = out.compute(scheduler="sync")
    np.testing.assert_array_equal(bits(target), bits(expected.values))


# --- the .sweep accessor ---------------------------------------------------------------

def _sweep_keys_run(fn):
    """Run ``fn()`` on the local sync scheduler; return it and the sweep-step keys it ran."""
    from dask.callbacks import Callback

    from dask_sweep.emit.graph import is_step

    ran = []

    class Seen(Callback):
        def _pretask(self, key, dsk, state):
            if is_step(key):
                ran.append(key)

    with Seen():
        out = fn()
    return out, ran


def test_accessor_explains_computes_and_writes_with_its_settings(tmp_path, rng):
    import dask_sweep.xarray  # noqa: F401  (registers .sweep)

    arr = xr.DataArray(da.from_array(values(rng, (24, 8, 6)), chunks=(4, 8, 6)),
                       dims=("z", "y", "x"), name="v")
    mean = arr.rolling(z=5, center=True).mean()
    expected = mean.compute(scheduler="sync")

    text = str(mean.sweep(**SMALL).explain())
    assert "sweep 0" in text and "64.00 MiB" in text, text
    # the settings in force: an enclosing enable(...) unless overridden
    with dask_sweep.enable(memory_limit="48MiB"):
        assert "48.00 MiB" in str(mean.sweep.explain())
        assert "40.00 MiB" in str(mean.sweep(memory_limit="40MiB").explain())

    got, steps = _sweep_keys_run(lambda: mean.sweep(**SMALL).compute(scheduler="sync"))
    assert steps, "compute through the accessor was not swept"
    xr.testing.assert_identical(got, expected)
    np.testing.assert_array_equal(bits(got.values), bits(expected.values))
    _, steps = _sweep_keys_run(lambda: mean.compute(scheduler="sync"))
    assert not steps  # the accessor switched the sweep on for its own call only

    ds = mean.to_dataset(name="mean").chunk(z=8, y=8, x=6)  # zarr needs regular chunks
    with dask.config.set(scheduler="sync"):
        _, steps = _sweep_keys_run(lambda: ds.sweep(**SMALL).to_zarr(tmp_path / "m.zarr", consolidated=False))
    assert steps
    back = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)["mean"].load()
    np.testing.assert_array_equal(bits(back.values), bits(expected.values))

    held = ds.sweep(**SMALL).persist()
    xr.testing.assert_identical(held.compute(), expected.to_dataset(name="mean"))


def test_accessor_names_a_bad_setting():
    import dask_sweep.xarray  # noqa: F401

    arr = xr.DataArray(da.zeros((4, 4), chunks=2), dims=("y", "x"))
    with pytest.raises(dask_sweep.errors.SweepConfigError, match="memory_limt"):
        arr.sweep(memory_limt="1GiB")
    with pytest.raises(dask_sweep.errors.SweepConfigError, match="memory_limit"):
        arr.sweep(memory_limit="lots")
