"""DSL results against scipy/numpy in memory: filters, pointwise, zip, reductions, Otsu."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sweep import dsl

# Small slabs so every pipeline runs in several steps (the interesting case).
SMALL = dict(memory_limit="16MiB", target_slab_bytes="2KiB")


def vol(shape=(23, 19, 17), dtype="uint8", seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, shape).astype(dtype)
    if np.dtype(dtype) == bool:
        return rng.random(shape) > 0.4
    return rng.integers(0, 200, shape).astype(dtype)


def run(stream, **kw):
    r = stream.to().run(**{**SMALL, **kw})
    assert len(r.report.steps) > 1
    return r.value


FILTERS = [
    ("gaussian", dict(sigma=1.5), ndi.gaussian_filter, dict(sigma=1.5)),
    ("gaussian", dict(sigma=(1, 2, 0.5)), ndi.gaussian_filter, dict(sigma=(1, 2, 0.5))),
    ("uniform", dict(size=3), ndi.uniform_filter, dict(size=3)),
    ("median", dict(size=3), ndi.median_filter, dict(size=3)),
    ("median", dict(size=(5, 3, 1), mode="nearest"), ndi.median_filter,
     dict(size=(5, 3, 1), mode="nearest")),
    ("minimum", dict(size=(3, 1, 5)), ndi.minimum_filter, dict(size=(3, 1, 5))),
    ("maximum", dict(size=3), ndi.maximum_filter, dict(size=3)),
    ("erosion", dict(size=3), ndi.grey_erosion, dict(size=3)),
    (
        "dilation",
        dict(footprint=np.ones((3, 1, 3), bool)),
        ndi.grey_dilation,
        dict(footprint=np.ones((3, 1, 3), bool)),
    ),
    ("opening", dict(size=3), ndi.grey_opening, dict(size=3)),
    ("closing", dict(size=(5, 3, 3)), ndi.grey_closing, dict(size=(5, 3, 3))),
]


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
@pytest.mark.parametrize(
    "name,kw,ref,rkw", FILTERS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FILTERS)]
)
def test_windowed_filters_match_scipy(name, kw, ref, rkw, dtype):
    x = vol(dtype=dtype)
    got = run(getattr(dsl.source(x), name)(**kw))
    want = ref(x, **rkw)
    assert got.dtype == want.dtype
    if name == "uniform" and x.dtype.kind == "f":
        # a running sum along lines: exact only for integers (documented)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    else:
        np.testing.assert_array_equal(got, want)


def test_rank_filter():
    x = vol()
    np.testing.assert_array_equal(
        run(dsl.source(x).rank(4, size=3)), ndi.rank_filter(x, 4, size=3)
    )


@pytest.mark.parametrize(
    "op", ["binary_erosion", "binary_dilation", "binary_opening", "binary_closing"]
)
@pytest.mark.parametrize("iterations", [1, 2])
def test_binary_morphology(op, iterations):
    x = vol(dtype=bool)
    structure = ndi.generate_binary_structure(3, 1)
    got = run(getattr(dsl.source(x), op)(structure, iterations=iterations))
    np.testing.assert_array_equal(got, getattr(ndi, op)(x, structure, iterations=iterations))


@pytest.mark.parametrize("axis", [1, 2])
def test_other_sweep_axes(axis):
    x = vol(dtype="float32")
    s = dsl.source(x)
    got = run(dsl.zip(s.gaussian(1), s.maximum(size=3), lambda a, b: a + b), axis=axis)
    np.testing.assert_array_equal(got, ndi.gaussian_filter(x, 1) + ndi.maximum_filter(x, 3))


def test_pointwise_arithmetic_and_logic():
    x = vol()
    s = dsl.source(x)
    w = s.astype("int16")
    got = run(((w - 100) * 2 + 7).clip(-50, 150))
    np.testing.assert_array_equal(got, np.clip((x.astype("int16") - 100) * 2 + 7, -50, 150))
    m = run((s > 50) & ~(s >= 150) | (s < 3))
    np.testing.assert_array_equal(m, (x > 50) & ~(x >= 150) | (x < 3))
    f = run(s.map(np.sqrt) / 2.0)
    np.testing.assert_array_equal(f, np.sqrt(x) / 2.0)
    n = run(-(s.astype("float32")))
    np.testing.assert_array_equal(n, -(x.astype("float32")))


def test_zip_of_branches_with_different_windows_reads_input_once():
    x = vol(dtype="float32")
    s = dsl.source(x)
    a, b = s.tee()
    dog = dsl.zip(a.gaussian(1), b.gaussian(3), lambda p, q: p - q)
    r = dog.to().run(**SMALL)
    np.testing.assert_array_equal(r.value, ndi.gaussian_filter(x, 1) - ndi.gaussian_filter(x, 3))
    assert r.report.bytes_read == x.nbytes
    assert r.report.passes == 1


def test_three_way_zip_and_user_window():
    x = vol(dtype="float32")
    s = dsl.source(x)
    mx = s.window(lambda b: ndi.maximum_filter(b, size=5), footprint=2, name="max5")
    z = dsl.zip(s, mx, s.median(size=3), lambda p, q, r: p * 0.5 + q - r)
    want = x * 0.5 + ndi.maximum_filter(x, 5) - ndi.median_filter(x, 3)
    np.testing.assert_array_equal(run(z), want)


def test_window_of_known_scipy_kernel_needs_no_footprint():
    x = vol()
    got = run(dsl.source(x).window(ndi.gaussian_filter, sigma=1))
    np.testing.assert_array_equal(got, ndi.gaussian_filter(x, sigma=1))


# ---------------------------------------------------------------------- reductions


def test_min_max_sum_mean():
    x = vol(dtype="float32")
    s = dsl.source(x).gaussian(1)
    g = ndi.gaussian_filter(x, 1)
    r = dsl.run(dsl.min(s), dsl.max(s), dsl.sum(s), dsl.mean(s), **SMALL)
    lo, hi, total, mean = r.value
    assert lo == g.min() and hi == g.max()
    np.testing.assert_allclose(total, g.sum(dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(mean, g.mean(dtype=np.float64), rtol=1e-9)
    assert r.report.passes == 1  # min, max, sum, mean: one pass, two reduction stages


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_histogram_matches_numpy(dtype):
    x = vol(dtype=dtype)
    s = dsl.source(x)
    if dtype == "float32":
        counts, edges = dsl.histogram(s, bins=50, range=(0, 200)).compute(**SMALL)
        wc, we = np.histogram(x, bins=50, range=(0, 200))
    elif dtype == "int16":
        counts, edges = dsl.histogram(s, bins=64).compute(**SMALL)
        wc, we = np.histogram(x, bins=64, range=(-32768, 32767))
    else:
        counts, edges = dsl.histogram(s).compute(**SMALL)
        wc, we = np.bincount(x.ravel(), minlength=256), np.arange(257)
    np.testing.assert_array_equal(counts, wc)
    np.testing.assert_allclose(edges, we)


def test_histogram_of_float_without_range_runs_a_minmax_pass_first():
    x = vol(dtype="float32")
    s = dsl.source(x)
    r = dsl.run(dsl.histogram(s, bins=32), **SMALL)
    wc, we = np.histogram(x, bins=32, range=(float(x.min()), float(x.max())))
    np.testing.assert_array_equal(r.value[0], wc)
    assert r.report.passes == 2
    assert r.report.bytes_read == 2 * x.nbytes


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_quantile_is_exact_for_8bit(q):
    x = vol()
    got = dsl.quantile(dsl.source(x), q).compute(**SMALL)
    assert got == np.quantile(x, q, method="inverted_cdf")


def otsu_bruteforce(img: np.ndarray) -> int:
    """Reference: try every threshold on the image itself (no histogram)."""
    best, best_t = -1.0, None
    v = img.astype(np.float64).ravel()
    for t in np.unique(v)[:-1]:
        fg, bg = v[v > t], v[v <= t]
        var = bg.size * fg.size * (bg.mean() - fg.mean()) ** 2
        if var > best + 1e-9 * abs(best):
            best, best_t = var, t
    return int(best_t)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sigma", [0, 1.0])
def test_otsu_threshold_matches_numpy_reference(seed, sigma):
    rng = np.random.default_rng(seed)
    x = (
        np.where(
            rng.random((26, 21, 19)) > 0.6,
            rng.normal(170, 20, (26, 21, 19)),
            rng.normal(60, 25, (26, 21, 19)),
        )
        .clip(0, 255)
        .astype("uint8")
    )
    smooth = ndi.gaussian_filter(x, sigma) if sigma else x
    t = otsu_bruteforce(smooth)
    mask = dsl.otsu_threshold(x, sigma=sigma)
    r = mask.to().run(**SMALL)
    assert list(r.scalars.values())[0] == t or t in r.scalars.values()
    np.testing.assert_array_equal(r.value, smooth > t)
    assert r.report.passes == 2
    assert r.report.bytes_read == 2 * x.nbytes


def test_otsu_from_histogram_on_known_bimodal():
    counts = np.array([0, 10, 20, 10, 0, 0, 0, 5, 10, 5])
    t = dsl.otsu_from_histogram(counts, np.arange(10.0))
    assert 3 <= t < 7


def test_scalar_arithmetic_feeds_later_pass():
    x = vol(dtype="float32")
    s = dsl.source(x)
    lo, hi = dsl.min(s), dsl.max(s)
    norm = (s - lo) * (255.0 / (hi - lo))
    r = norm.to().run(**SMALL)
    want = (x - x.min()) * (255.0 / (float(x.max()) - float(x.min())))
    np.testing.assert_allclose(r.value, want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------- numba kernel


def _bilateral_reference(x, r, ss, sr):
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    wsum = np.zeros_like(x)
    n = x.shape
    for dk in range(-r, r + 1):
        for dj in range(-r, r + 1):
            for di in range(-r, r + 1):
                sh = np.full_like(x, np.nan)
                src = tuple(
                    slice(max(0, -d), n[a] - max(0, d)) for a, d in enumerate((dk, dj, di))
                )
                dst = tuple(
                    slice(max(0, d), n[a] - max(0, -d)) for a, d in enumerate((dk, dj, di))
                )
                sh[src] = x[dst]
                w = np.exp(
                    -(dk * dk + dj * dj + di * di) / (2 * ss**2) - (sh - x) ** 2 / (2 * sr**2)
                )
                w = np.nan_to_num(w)
                out += w * np.nan_to_num(sh)
                wsum += w
    return (out / wsum).astype(np.float32)


def test_numba_bilateral_streams_exactly():
    x = vol((14, 12, 11), "uint8")
    got = run(dsl.bilateral(x, sigma_spatial=1.0, sigma_range=30.0), target_slab_bytes="512B")
    from dask_sweep.dsl.numba_kernels import BilateralKernel

    whole = BilateralKernel(2, 1.0, 30.0)(x)
    np.testing.assert_array_equal(got, whole)
    np.testing.assert_allclose(got, _bilateral_reference(x, 2, 1.0, 30.0), rtol=1e-5)


# ---------------------------------------------------------------------- hypothesis


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 14), st.integers(1, 9), st.integers(1, 9)),
    sigma=st.floats(0.3, 2.5),
    size=st.integers(1, 4),
    slab=st.sampled_from(["1KiB", "3KiB", "64MiB"]),
    seed=st.integers(0, 5),
)
def test_pipeline_property(shape, sigma, size, slab, seed):
    x = vol(shape, "float32", seed)
    s = dsl.source(x)
    out = dsl.zip(s.gaussian(sigma), s.uniform(size), lambda a, b: a - b) > 0
    got = out.to().run(memory_limit="16MiB", target_slab_bytes=slab).value
    want = (ndi.gaussian_filter(x, sigma) - ndi.uniform_filter(x, size)) > 0
    np.testing.assert_array_equal(got, want)


def test_dask_array_sources_are_read_by_the_plugins_readers(tmp_path):
    """No nested compute per row: the array's read tasks (or planes) run in the step."""
    import dask.array as da
    import zarr

    from dask_sweep.dsl.sources import DaskRows

    vol = (np.random.default_rng(5).random((30, 16, 12)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "v.zarr", shape=vol.shape, chunks=(4, 16, 12),
                          dtype="u1", compressors=None)
    z[:] = vol
    for x, free in [(da.from_zarr(str(tmp_path / "v.zarr")), True),
                    (da.from_array(vol, chunks=(4, 8, 12)) + 1, False)]:
        s = dsl.source(x)
        reader = s.source.reader(0)
        assert isinstance(reader, DaskRows) and reader.inner is not None
        assert getattr(reader.inner, "free", False) == free
        want = ndi.gaussian_filter(np.asarray(x), 1)
        np.testing.assert_array_equal(s.gaussian(1).to().run(memory_limit="64KiB",
                                                             runtime_overhead=0).value, want)
