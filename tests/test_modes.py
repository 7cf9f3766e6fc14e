"""The same pipelines in both dask array modes: graphs (default) and expressions.

dask reads ``array.query-planning`` once, when ``dask.array`` is imported, so
the expression-mode run is this module again in a second pytest process with
``DASK_ARRAY__QUERY_PLANNING=True`` (``test_expression_mode_in_a_subprocess``).
Every case is computed with and without the sweep in the mode of its process and
compared bit for bit (``assert_sweep_equal``: compute, persist), and ``explain``
must say what it swept or why not.

APIs that dask 2026.8's expression mode lacks (``da.where``, ``from_zarr``,
``store``, ``to_zarr``, ``da.ma``, hence dask-image's binary morphology) are
written with what both modes have (``elemwise(np.where, ...)``,
``from_array(zarr_array)``, ``map_overlap(ndi.binary_opening, ...)``); the
graph-mode-only spellings are tested in graph mode only.
"""

import os
import re
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

import dask_sweep
from dask_sweep.errors import BudgetError
from dask_sweep.testing import assert_sweep_equal

EXPR = bool(da.array_expr_enabled())
MODE = "expressions" if EXPR else "graphs"
SMALL = dict(target_slab_bytes="2KiB", memory_limit="16MiB")
graph_mode_only = pytest.mark.skipif(EXPR, reason="not in dask 2026.8's expression mode")


def where(m, a, b):
    if EXPR:
        return da.elemwise(np.where, m, a, b)
    return da.where(m, a, b)


def opaque(a):
    # depends on the whole block it is given: kept on dask's blocks
    return (a * 2 - a.mean(axis=0)).astype(a.dtype)


@pytest.fixture
def vol(rng):
    return rng.random((24, 13, 11))


def explain(y) -> str:
    return str(dask_sweep.explain(y, **SMALL))


def test_mode_is_what_the_process_asked_for():
    want = os.environ.get("DASK_ARRAY__QUERY_PLANNING", "").lower() == "true"
    assert EXPR == want
    x = da.ones((4, 4), chunks=2)
    assert (type(x).__module__ == "dask.array._array_expr._collection") == EXPR


@pytest.mark.parametrize("boundary", ["none", "reflect", "nearest", "periodic", 0.5])
@pytest.mark.parametrize("depth", [1, 3, (2, 1, 0)])
def test_map_overlap_scipy_filters(vol, boundary, depth):
    x = da.from_array(vol, chunks=(5, 13, 6))
    g = x.map_overlap(ndi.gaussian_filter, depth=depth, boundary=boundary, sigma=0.6,
                      mode="nearest")
    y = x.map_overlap(opaque, depth=depth, boundary=boundary)
    assert_sweep_equal(g, **SMALL)
    assert_sweep_equal(y, **SMALL)
    assert "sweep 0" in explain(y)


# chunks at least the depth: in expression mode dask 2026.8 cannot combine the
# differently rechunked outputs of two overlaps (NotImplementedError, stock dask too)
@pytest.mark.parametrize("chunks", [(4, 13, 11), (5, 7, 6), (24, 7, 11)])
def test_kernels_and_elementwise_stages(vol, chunks):
    x = da.from_array((vol * 200).astype("u1"), chunks=chunks)
    g = x.map_overlap(ndi.uniform_filter, depth=2, size=3, boundary="reflect")
    m = x.map_overlap(ndi.median_filter, depth=1, size=3, boundary="nearest")
    y = (np.sqrt(g.astype("f4")) - m).clip(0, 9) > 2
    assert_sweep_equal(y, **SMALL)
    text = explain(y)
    assert "uniform_filter" in text and "median_filter" in text and "elementwise" in text


def test_dask_image_filters(vol):
    from dask_image import ndfilters

    x = da.from_array(vol, chunks=(6, 13, 11))
    for y in (ndfilters.gaussian_filter(x, 1.0), ndfilters.uniform_filter(x, 3),
              ndfilters.minimum_filter(x, 3), ndfilters.median_filter(x, 3)):
        assert_sweep_equal(y, **SMALL)


def test_morphology_pipeline(vol):
    # gaussian -> threshold -> binary opening -> where -> uniform, in either mode
    x = da.from_array(vol, chunks=(6, 13, 11))
    g = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1.0, boundary="none")
    b = g > 0.5
    o = b.map_overlap(ndi.binary_opening, depth=2, boundary="none", iterations=1)
    w = where(o, g, 0.0)
    y = w.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect")
    assert_sweep_equal(y, **SMALL)
    text = explain(y)
    assert "binary_opening" in text and "gaussian_filter" in text


@graph_mode_only
def test_dask_image_morphology_and_where(vol):
    from dask_image import ndfilters, ndmorph

    x = da.from_array(vol, chunks=(6, 13, 11))
    g = ndfilters.gaussian_filter(x, 1.0)
    o = ndmorph.binary_opening(g > 0.5)
    y = ndfilters.uniform_filter(da.where(o, g, 0.0), 3)
    assert_sweep_equal(y, **SMALL)


def test_fan_out_and_several_outputs(vol):
    x = da.from_array(vol, chunks=(5, 13, 11))
    g = x.map_overlap(ndi.gaussian_filter, depth=2, sigma=0.5, boundary="reflect")
    a, b = g - x, (g * 2).astype("f4")
    expected = dask.compute(a, b, scheduler="sync")
    total = a.sum().compute(scheduler="sync")
    with dask_sweep.enable(**SMALL):
        actual = dask.compute(a, b, scheduler="sync")
        reduced = dask.compute(a.sum(), scheduler="sync")[0]
    for p, q in zip(actual, expected):
        np.testing.assert_array_equal(p, q, strict=True)
    assert reduced == total


def test_zarr_source(tmp_path, vol):
    import zarr

    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(4, 13, 11),
                          dtype="f4")
    z[:] = vol.astype("f4")
    x = da.from_array(z, chunks=z.chunks)
    y = x.map_overlap(ndi.gaussian_filter, depth=3, sigma=1.0, boundary="nearest") + 1
    assert_sweep_equal(y, **SMALL)
    assert "inline" in explain(y)


@graph_mode_only
def test_from_zarr_to_zarr(tmp_path, vol):
    import zarr

    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(4, 13, 11),
                          dtype="f4")
    z[:] = vol.astype("f4")
    x = da.from_zarr(str(tmp_path / "in.zarr"))
    y = x.map_overlap(ndi.gaussian_filter, depth=3, sigma=1.0, boundary="nearest")
    y.to_zarr(str(tmp_path / "a.zarr"))
    with dask_sweep.enable(**SMALL):
        y.to_zarr(str(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"))[:],
                                  zarr.open_array(str(tmp_path / "b.zarr"))[:], strict=True)


def test_fallbacks_have_reasons(rng, vol):
    x = da.from_array(vol, chunks=(6, 13, 11))
    one = da.from_array(vol, chunks=-1).map_overlap(opaque, depth=1, boundary="reflect")
    assert_sweep_equal(one, expect_swept=False, **SMALL)
    assert "every array is a single block" in explain(one)
    small = da.from_array(rng.random(11), chunks=11)  # broadcast: left to dask
    y = x.map_overlap(opaque, depth=1, boundary="none") + small
    assert_sweep_equal(y, expect_swept=None, **SMALL)
    window = x.map_overlap(opaque, depth=1, boundary="none", trim=False)
    assert "overlap without trim (trim=False) is not swept" in explain(window)
    masked = da.from_array(np.ma.masked_less(vol, 0.3), chunks=(6, 13, 11))
    z = masked.map_overlap(opaque, depth=1, boundary="reflect")
    text = explain(z)
    assert "masked arrays" in text and "nothing swept" in text
    expected = z.compute(scheduler="sync")
    with dask_sweep.enable(**SMALL):
        actual = z.compute(scheduler="sync")
    np.testing.assert_array_equal(np.ma.getmaskarray(actual), np.ma.getmaskarray(expected))
    np.testing.assert_array_equal(np.ma.getdata(actual), np.ma.getdata(expected))


def test_budget_is_kept_or_refused(vol):
    x = da.from_array(vol, chunks=(6, 13, 11))
    y = x.map_overlap(opaque, depth=2, boundary="reflect")
    with pytest.raises(BudgetError):
        with dask_sweep.enable(memory_limit="1KiB", runtime_overhead=0, fallback="raise"):
            y.compute(scheduler="sync")
    text = str(dask_sweep.explain(y, memory_limit="1KiB", runtime_overhead=0))
    assert "left to stock dask" in text and "budget" in text
    assert "of 16.00 MiB budget" in explain(y)


def test_configured_with_the_optimizations_key(vol):
    x = da.from_array(vol, chunks=(6, 13, 11))
    y = x.map_overlap(ndi.gaussian_filter, depth=2, sigma=0.5, boundary="reflect")
    expected = y.compute(scheduler="sync")
    with dask.config.set(optimizations=[dask_sweep.sweep(**SMALL)]):
        np.testing.assert_array_equal(y.compute(scheduler="sync"), expected, strict=True)


def _outside_xdist() -> dict:
    """This process's environment without pytest-xdist's worker variables: a nested
    pytest run is a run of its own (one process), not a worker of this one."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}


@pytest.mark.skipif(EXPR, reason="runs the expression-mode process")
def test_expression_mode_in_a_subprocess():
    env = dict(_outside_xdist(), DASK_ARRAY__QUERY_PLANNING="True")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-x",
         __file__],
        env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert re.search(r"\b\d+ passed", tail) and not re.search(r"\b\d+ failed", tail), tail


def _recording(seen: list):
    from dask.local import get_sync

    def get(dsk, keys, **kwargs):
        graph = dsk.__dask_graph__() if hasattr(dsk, "__dask_graph__") else dsk
        seen.extend(k[0] if isinstance(k, tuple) else k for k in graph)
        return get_sync(dsk, keys, **kwargs)

    return get


def test_compute_persist_and_dask_compute_run_the_sweep_tasks(vol):
    x = da.from_array(vol, chunks=(5, 13, 11))
    y = x.map_overlap(opaque, depth=2, boundary="reflect") * 2
    expected = y.compute(scheduler="sync")
    for run in (lambda get: y.compute(scheduler=get),
                lambda get: dask.compute(y, y.sum(), scheduler=get)[0],
                lambda get: y.persist(scheduler=get).compute(scheduler="sync")):
        seen: list = []
        with dask_sweep.enable(**SMALL):
            got = run(_recording(seen))
        np.testing.assert_array_equal(got, expected, strict=True)
        assert any(str(k).startswith("sweep-step-") for k in seen)
        assert not any(str(k).startswith("overlap-") for k in seen)
    seen = []
    y.compute(scheduler=_recording(seen))  # sweep off: stock dask's tasks
    assert not any(str(k).startswith("sweep-") for k in seen)


def test_tiled_in_plane_when_a_row_does_not_fit(tmp_path, rng):
    import zarr

    vol = (rng.random((48, 96, 80)) * 255).astype("u1")
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(16, 32, 32),
                          dtype="u1", compressors=None)
    z[:] = vol
    x = da.from_array(z, chunks=z.chunks)
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_overlap(ndi.uniform_filter, depth=2, size=5, boundary=0)
    settings = dict(memory_limit="500KiB", runtime_overhead=0, fallback="raise")
    assert "tiled in-plane" in str(dask_sweep.explain(y, **settings))
    assert_sweep_equal(y, **settings)


def test_distributed(vol):
    from distributed import Client, LocalCluster

    x = da.from_array(vol, chunks=(5, 13, 11))
    y = x.map_overlap(ndi.gaussian_filter, depth=2, sigma=0.5, boundary="reflect") + 1
    expected = y.compute(scheduler="sync")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        with dask_sweep.enable(**SMALL):
            got = client.compute(y).result()
            persisted = y.persist().compute()
    np.testing.assert_array_equal(got, expected, strict=True)
    np.testing.assert_array_equal(persisted, expected, strict=True)


def test_store_and_to_zarr_in_both_modes(tmp_path, vol):
    # dask_sweep.store / to_zarr: dask's own in graph mode; in expression mode, where dask
    # 2026.8 has neither, the same store-map tasks, which the sweep writes in its slab tasks
    import zarr

    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(4, 13, 11),
                          dtype="f4")
    z[:] = vol.astype("f4")
    x = da.from_array(z, chunks=z.chunks)
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1.0, boundary="nearest") * 2
    expected = y.compute(scheduler="sync")
    dask_sweep.to_zarr(y, str(tmp_path / "stock.zarr"))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "stock.zarr"))[:], expected)
    # (y is float64 in expression mode: elemwise makes the 2 an int64 0-d array)
    target = zarr.create_array(str(tmp_path / "t.zarr"), shape=y.shape, chunks=(6, 13, 11),
                               dtype=y.dtype)
    pending = dask_sweep.store(y, target, lock=False, compute=False)
    text = str(dask_sweep.explain(pending, **SMALL))
    assert "sweep 0" in text and "written in the slab task" in text
    with dask_sweep.enable(**SMALL):
        dask.compute(pending, scheduler="sync")
        dask_sweep.to_zarr(y, str(tmp_path / "swept.zarr"))
        outs = [np.empty(y.shape, y.dtype), np.empty(y.shape, y.dtype)]
        dask_sweep.store([y, y - 1], outs)
    np.testing.assert_array_equal(outs[0], expected, strict=True)
    np.testing.assert_array_equal(outs[1], (y - 1).compute(scheduler="sync"), strict=True)
    np.testing.assert_array_equal(target[:], expected, strict=True)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "swept.zarr"))[:], expected,
                                  strict=True)


def test_sources_behind_slices_casts_rechunks_and_named_layers(tmp_path, vol):
    import zarr

    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(4, 13, 11),
                          dtype="f4")
    z[:] = vol.astype("f4")
    x = da.from_array(z, chunks=z.chunks)
    for y in (x[2:20].map_overlap(opaque, depth=1, boundary="reflect"),
              x.astype("f8").map_overlap(opaque, depth=1, boundary="none"),
              x.rechunk((6, 13, 11)).map_overlap(opaque, depth=2, boundary="nearest"),
              x.map_overlap(opaque, depth=6, boundary="reflect"),  # depth beyond a chunk
              da.map_overlap(lambda a, b: a + b, x, x * 2, depth=1, boundary="none"),
              # a layer named by the user after a swept one keeps its name
              x.map_overlap(opaque, depth=1, boundary="none").map_blocks(
                  lambda b: b + 1, name="plus-one")):
        assert_sweep_equal(y, **SMALL)


@pytest.mark.skipif(EXPR, reason="runs its own expression-mode process")
def test_dasks_overlap_tests_pass_in_expression_mode_with_the_sweep_on(tmp_path):
    # dask's own map_overlap tests, in expression mode, every graph through the sweep
    # (fallback="raise", 4 KiB slabs); tests/test_dask_suite.py does this in graph mode
    import shutil

    src = os.path.join(os.path.dirname(dask.__file__), "array", "tests", "test_overlap.py")
    if not os.path.exists(src):
        pytest.skip("dask's tests are not installed with this dask")
    shutil.copy(src, tmp_path / "test_overlap.py")
    (tmp_path / "conftest.py").write_text(
        "import pytest\nimport dask_sweep\n\n\n@pytest.fixture(autouse=True)\n"
        "def sweep_on():\n    with dask_sweep.enable(memory_limit='64MiB', fallback='raise',"
        " target_slab_bytes='4KiB'):\n        yield\n")
    env = dict(_outside_xdist(), DASK_ARRAY__QUERY_PLANNING="True")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                        "no:xdist", "-W", "ignore", "test_overlap.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    tail = p.stdout[-3000:]
    assert p.returncode == 0, tail
    assert re.search(r"\b\d+ passed", tail) and not re.search(r"\b\d+ failed", tail), tail


@pytest.mark.parametrize("fmt", ["zarr", "tiff-stack"])
def test_imread_and_imwrite_in_the_mode(tmp_path, rng, fmt):
    """``dask_sweep.io.imread`` gives a collection of the process's mode (it built a
    graph-mode ``Array`` with ``meta=``, which the expression mode's refuses), swept
    and written like any other."""
    from dask_sweep.io import imread, imwrite

    vol = (rng.random((20, 17, 15)) * 255).astype("u1")
    src = str(tmp_path / ("in.zarr" if fmt == "zarr" else "in"))
    imwrite(vol, src, format=fmt)
    x = imread(src if fmt == "zarr" else os.path.join(src, "*.tif"))
    assert x.shape == vol.shape and x.dtype == vol.dtype
    assert type(x).__module__.startswith("dask.array._array_expr") == EXPR
    y = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="none")
    assert explain(y).startswith("sweep 0:"), explain(y)
    assert_sweep_equal(y, **SMALL)
    out = str(tmp_path / "out.zarr")
    from dask_sweep.integration import optimize

    planned, plan_region = [], optimize._plan_region
    with dask_sweep.enable(**SMALL), pytest.MonkeyPatch.context() as mp:
        mp.setattr(optimize, "_plan_region",
                   lambda *a, **k: planned.append(1) or plan_region(*a, **k))
        imwrite(y, out)
    assert len(planned) == 1  # the plan made while choosing the chunks is the one run
    np.testing.assert_array_equal(imread(out).compute(), y.compute(scheduler="sync"))


def test_the_drop_ins_in_the_mode(tmp_path, rng):
    """``ndimage.label`` / ``distance_transform_edt`` build their graphs' collections in
    the process's mode (they made graph-mode ``Array`` objects with ``meta=``, which the
    expression mode refuses): scipy's results, under ``enable`` too, and written by
    ``imwrite``."""
    from dask_sweep.io import imread, imwrite
    from dask_sweep.ndimage import distance_transform_edt, label

    vol = (rng.random((24, 13, 11)) * 255).astype("u1")
    x = da.from_array(vol, chunks=(6, 13, 11))
    want, n = ndi.label(vol > 128)
    labels, count = label(x > 128, memory_limit="16MiB")
    assert type(labels).__module__.startswith("dask.array._array_expr") == EXPR
    got, got_n = dask.compute(labels, count)
    np.testing.assert_array_equal(got, want)
    assert got_n == n
    # explain prints the drop-in's own plan; a sweep reading its output plans for what
    # the drop-in's last pass holds beside it (a layer annotation; kept for expressions)
    text = explain(labels)
    assert "its own sweep" in text and "dask_sweep.ndimage.label: input shape" in text, text
    html = dask_sweep.explain(labels, **SMALL)._repr_html_()
    assert "by the plugin" in html and "dask_sweep.ndimage.label: input shape" in html
    smooth = labels.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="none")
    assert "held by the drop-in feeding this sweep" in explain(smooth), explain(smooth)
    np.testing.assert_array_equal(distance_transform_edt(x > 128, memory_limit="16MiB")
                                  .compute(), ndi.distance_transform_edt(vol > 128))
    with dask_sweep.enable(**SMALL):
        labels, _ = label(x > 128)
        imwrite(labels, str(tmp_path / "labels.zarr"))
    np.testing.assert_array_equal(imread(str(tmp_path / "labels.zarr")).compute(), want)


def test_the_dsl_over_a_collection_of_the_mode(rng):
    """``dsl.source`` of a dask array of either mode (``np.ndim`` of an expression raises;
    its rows are read by the plugin's reader of the lowered tree) and ``to_dask``."""
    from dask_sweep import dsl

    vol = rng.random((24, 13, 11))
    x = da.from_array(vol, chunks=(6, 13, 11)) * 2
    y = dsl.source(x).gaussian(1).to_dask()
    assert type(y).__module__.startswith("dask.array._array_expr") == EXPR
    np.testing.assert_allclose(y.compute(), ndi.gaussian_filter(vol * 2, 1), rtol=0,
                               atol=1e-12)


def test_float_uniform_carries_its_sums_in_the_mode(rng):
    """dask-image's float uniform filter runs on any slab with its running sums carried
    (``Running``) in either mode, dask's bits."""
    from dask_image import ndfilters

    v = (rng.standard_normal((40, 24, 20)) * 1e3).astype("f4")
    y = ndfilters.uniform_filter(da.from_array(v, chunks=(9, 12, 20)), 5)
    with dask_sweep.enable(**SMALL):
        assert "running sums carried" in str(dask_sweep.explain(y))
    assert_sweep_equal(y, **SMALL)
