"""The ways of switching the sweep on are equivalent; settings validate and travel."""

import pickle

import dask
import dask.array as da
import numpy as np
import pytest

import dask_sweep
from dask_sweep.errors import BudgetError, SweepConfigError, SweepError


@pytest.fixture
def pipeline(rng):
    x = da.from_array(rng.random((30, 16, 16)), chunks=(5, 8, 8))
    return x.map_overlap(lambda b: b * 2 - b.mean(), depth=2, boundary="reflect") + 1


def _sweep_keys(y):
    (o,) = dask.optimize(y)
    return any(str(k[0] if isinstance(k, tuple) else k).startswith("sweep-") for k in o.dask)


def test_all_switches_are_equivalent(pipeline):
    expected = pipeline.compute()
    assert not _sweep_keys(pipeline)
    forms = [
        dict(optimizations=[dask_sweep.sweep]),
        dict(optimizations=[dask_sweep.sweep(memory_limit="64MiB")]),
        dict(array_optimize=dask_sweep.optimize),
    ]
    for cfg in forms:
        with dask.config.set(**cfg):
            assert _sweep_keys(pipeline), cfg
            np.testing.assert_array_equal(pipeline.compute(), expected, strict=True)
    with dask_sweep.enable(memory_limit="64MiB"):
        assert _sweep_keys(pipeline)
        np.testing.assert_array_equal(pipeline.compute(), expected, strict=True)
    assert not _sweep_keys(pipeline)


def test_output_keys_keep_their_names(pipeline):
    with dask_sweep.enable():
        (o,) = dask.optimize(pipeline)
    names = {k[0] for k in o.dask if isinstance(k, tuple)}
    assert pipeline.name in names
    assert all(n == pipeline.name or n.startswith("sweep-") for n in names)


def test_settings_from_config_are_read_when_the_pass_runs(pipeline):
    p = dask_sweep.sweep()
    with dask.config.set({"sweep.memory-limit": "3MiB"}):
        assert p.settings().memory_limit == 3 * 2**20
    assert dask_sweep.sweep(memory_limit="5MiB").settings().memory_limit == 5 * 2**20


def test_pass_pickles_with_its_settings():
    p = pickle.loads(pickle.dumps(dask_sweep.sweep(memory_limit="7MiB", fallback="raise")))
    s = p.settings()
    assert s.memory_limit == 7 * 2**20 and s.fallback == "raise"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(memory_limit="lots"), "memory_limit"),
        (dict(memory_limit=-1), "positive"),
        (dict(fallback="maybe"), "sweep.fallback"),
        (dict(threads=0), "threads"),
        (dict(colour="red"), "Unknown sweep setting"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(SweepConfigError, match=match):
        dask_sweep.sweep(**kwargs)


def test_positional_non_graph_is_refused():
    with pytest.raises(SweepConfigError, match="keywords"):
        dask_sweep.sweep("512MiB")


def test_impossible_budget_raises_before_io(pipeline):
    with dask_sweep.enable(memory_limit="1KiB", fallback="raise"):
        with pytest.raises(BudgetError, match="budget") as info:
            pipeline.compute()
    assert info.value.projected > info.value.budget == 1024
    assert isinstance(info.value, (SweepError, MemoryError))


def test_impossible_budget_can_fall_back(pipeline):
    expected = pipeline.compute()
    with dask_sweep.enable(memory_limit="1KiB", fallback="warn"):
        with pytest.warns(RuntimeWarning, match="Falling back"):
            got = pipeline.compute()
    np.testing.assert_array_equal(got, expected)
    with dask_sweep.enable(memory_limit="1KiB", fallback="silent"):
        np.testing.assert_array_equal(pipeline.compute(), expected)


def test_explain_text_and_html(pipeline):
    e = dask_sweep.explain(pipeline, memory_limit="16MiB")
    text = str(e)
    for word in ("sweep 0", "window", "ring", "projected peak", "bytes read / input bytes"):
        assert word in text
    html = e._repr_html_()  # a table of the stages and a budget bar, the text folded away
    assert "<table>" in html and "projected peak" in html and "floor" in html
    assert all(st.label in html for st in e.plans[0].stages)
    with pytest.raises(SweepConfigError, match="dask collection"):
        dask_sweep.explain(np.zeros(3))


def test_bad_axis_is_named(pipeline):
    with dask_sweep.enable(axis=5):
        with pytest.raises(SweepConfigError, match="sweep.axis"):
            pipeline.compute()


def test_xarray_goes_through_the_same_hook(rng):
    xr = pytest.importorskip("xarray")
    from dask_image import ndfilters

    arr = xr.DataArray(da.from_array(rng.random((20, 12, 12)), chunks=(4, 12, 12)),
                       dims=("z", "y", "x"))
    out = arr.copy(data=ndfilters.gaussian_filter(arr.data, 1)) * 2
    expected = out.compute()
    with dask_sweep.enable():
        got = out.compute()
    xr.testing.assert_identical(got, expected)


def test_unknown_boundary_is_named():
    x = da.ones((10, 10), chunks=5)
    y = x.map_overlap(lambda b: b, depth=1, boundary="wrap")
    with dask_sweep.enable():
        with pytest.raises(SweepConfigError, match="Unknown boundary 'wrap' on axis 0"):
            y.compute()


@pytest.mark.parametrize("roll", [dict(y=3), dict(z=4), dict(z=5, center=True)])
def test_xarray_rolling_with_bottleneck_is_swept(rng, roll):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("bottleneck")
    arr = xr.DataArray(da.from_array(rng.random((40, 20, 18)), chunks=(5, 10, 18)),
                       dims=("z", "y", "x"))
    with xr.set_options(use_bottleneck=True):
        out = arr.rolling(**roll).mean()
    assert "sweep 0" in str(dask_sweep.explain(out.data))
    expected = out.compute()
    with dask_sweep.enable(target_slab_bytes="8KiB"):
        got = out.compute()
    xr.testing.assert_identical(got, expected)


def test_unknown_chunk_sizes_are_left_to_dask(rng):
    vol = rng.random((20, 16, 16))
    x = da.from_array(vol, chunks=(5, 16, 16))
    y = x[x > 0.5] + 1  # boolean indexing: NaN chunk sizes
    z = x.map_overlap(lambda b: b * 2, depth=1, boundary="reflect").sum() + y.sum()
    with dask_sweep.enable(memory_limit="64MiB", fallback="raise"):
        got = z.compute()
    np.testing.assert_allclose(got, 2 * vol.sum() + (vol[vol > 0.5] + 1).sum())


def test_an_analysis_failure_leaves_the_graph_to_dask(pipeline, monkeypatch):
    from dask_sweep.integration import optimize

    def broken(*a, **k):
        raise KeyError("a graph shape the analysis did not expect")

    expected = pipeline.compute(scheduler="sync")
    monkeypatch.setattr(optimize, "find_regions", broken)
    with dask_sweep.enable(memory_limit="64MiB"):
        with pytest.warns(RuntimeWarning, match="analysis failed.*KeyError.*stock dask"):
            got = pipeline.compute(scheduler="sync")
        assert "analysis failed" in str(dask_sweep.explain(pipeline))
    np.testing.assert_array_equal(got, expected)
    with dask_sweep.enable(memory_limit="64MiB", fallback="raise"):
        with pytest.raises(KeyError):
            pipeline.compute(scheduler="sync")


def test_steps_wait_for_consumers_after_an_optimiser_that_keeps_layers(rng):
    """An ``array_optimize`` installed before ours that returns the graph's layers (with
    their annotations) still gets the edges that make each step wait for the consumers
    of the step before's blocks (once skipped: the blocks of a reduction could all wait
    in memory on one thread), and keeps the sweep's priorities."""
    from dask.array.optimization import optimize as dask_optimize

    from dask_sweep.emit.graph import is_step
    from dask_sweep.emit.splice import priorities as _priorities
    from dask_sweep.integration.optimize import SweepPass, _Chained

    x = da.from_array(rng.random((40, 16, 16)), chunks=(4, 16, 16))
    s = (x.map_overlap(lambda b: b * 2, depth=1, boundary="reflect") + 1).sum(axis=(1, 2))
    sweep = SweepPass(memory_limit="64MiB", target_slab_bytes="4KiB")

    def gates(graph):
        return {k for k, node in dict(graph).items() if is_step(k)
                for d in node.dependencies if not is_step(d)
                and str(d[0] if isinstance(d, tuple) else d).startswith("sum")}

    keep = _Chained(sweep, lambda dsk, keys, **kw: dsk)(s.__dask_graph__(), s.__dask_keys__())
    dflt = _Chained(sweep, dask_optimize)(s.__dask_graph__(), s.__dask_keys__())
    assert gates(keep) and gates(keep) == gates(dflt)
    assert _priorities(keep) and _priorities(keep) == _priorities(
        sweep(s.__dask_graph__(), s.__dask_keys__()))
    with dask.config.set(array_optimize=_Chained(sweep, lambda dsk, keys, **kw: dsk)):
        np.testing.assert_allclose(s.compute(scheduler="sync"),
                                   (x.compute() * 2 + 1).sum(axis=(1, 2)))


def test_glibc_is_tuned_by_a_swept_compute_not_by_explain():
    """``sweep.tune-malloc`` applies when a graph is rewritten to run (before the local
    scheduler's threads allocate), not when a sweep is only explained."""
    import subprocess
    import sys

    code = (
        "import dask.array as da, numpy as np, dask_sweep\n"
        "from dask_sweep.runtime import memory\n"
        "x = da.from_array(np.ones((16, 8, 8)), chunks=(4, 8, 8))\n"
        "y = x.map_overlap(lambda b: b + 1, depth=1, boundary='reflect')\n"
        "with dask_sweep.enable(memory_limit='64MiB'):\n"
        "    assert 'sweep 0' in str(dask_sweep.explain(y))\n"
        "    before = memory._done\n"
        "    y.compute(scheduler='threads')\n"
        "print(before, memory._done)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "True"], p.stdout
