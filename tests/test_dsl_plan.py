"""Compile-time analysis of DSL pipelines: passes, fusion, windows, budget, errors, re-planning."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.ndimage as ndi

from dask_sweep import BudgetError, PlanError, dsl
from dask_sweep.dsl import execute as dsl_execute
from dask_sweep.dsl.compile import compile_pipeline
from dask_sweep.plan.ir import Kernel, Source

# Tiny volumes with tiny budgets (to force many steps): no runtime overhead, which is
# tested on its own below.
NO = dict(runtime_overhead=0)


def vol(shape=(40, 32, 24), dtype="float32"):
    rng = np.random.default_rng(3)
    return (rng.random(shape) * 200).astype(dtype)


def test_one_pass_is_one_fused_plan_and_reads_input_once():
    x = vol()
    s = dsl.source(x)
    dog = dsl.zip(s.gaussian(1), s.gaussian(3), lambda a, b: a - b)
    c = compile_pipeline([dog.to()], memory_limit="512KiB", **NO)
    assert len(c.passes) == 1
    plan = c.passes[0].plan
    assert sum(isinstance(st, Source) for st in plan.stages) == 1  # the tee shares the source
    assert sum(isinstance(st, Kernel) for st in plan.stages) == 2
    assert len(plan.steps) > 1
    pp = c.passes[0]
    assert pp.trace.bytes_read == x.nbytes
    # composed windows: the zip reaches 12 planes of the source ahead (sigma=3 * 4)
    zip_j = len(plan.stages) - 1
    assert pp.lead[zip_j] == (12, 12)
    assert pp.reach[0] == (12, 12)
    text = str(c.explain())
    assert "shorter waits 8 planes" in text and "1 pass(es)" in text


def test_pass_schedule_and_bytes_read_per_pass():
    x = vol(dtype="uint8")
    s = dsl.source(x).gaussian(1)
    t = s > dsl.otsu(s)
    c = compile_pipeline([t.to()], memory_limit="1MiB", **NO)
    assert [pp.index for pp in c.passes] == [0, 1]
    assert [k for k, _ in c.passes[0].outputs] == ["reduce"]
    assert [k for k, _ in c.passes[1].outputs] == ["target"]
    r = t.to().run(memory_limit="1MiB", **NO)
    assert r.report.bytes_read == 2 * x.nbytes == len(c.passes) * x.nbytes
    # float stream of unknown range: min/max pass, then histogram pass, then apply pass
    f = dsl.source(vol()).gaussian(1)
    c3 = compile_pipeline([(f > dsl.otsu(f)).to()], memory_limit="1MiB", **NO)
    assert len(c3.passes) == 3


@pytest.mark.parametrize("limit", ["320KiB", "512KiB", "4MiB"])
def test_projected_peak_within_budget_and_counted_arrays_match(limit):
    x = vol()
    s = dsl.source(x)
    out = dsl.zip(s.gaussian(2), s.median(size=3), lambda a, b: a - b).to()
    c = compile_pipeline([out], memory_limit=limit, **NO)
    budget = c.settings.memory_limit
    for pp in c.passes:
        assert pp.trace.peak <= budget
        assert max(pp.step_peaks) == pp.trace.peak
    r = out.run(memory_limit=limit, **NO)
    assert r.report.peak_projected <= budget
    # the executor's count on the real arrays is the dry run's count (no write phase here)
    for st in r.report.steps:
        assert st.live <= st.projected
    assert not r.report.replans


def test_projection_includes_runtime_overhead():
    x = vol()
    t = dsl.source(x).gaussian(1).to()
    a = compile_pipeline([t], memory_limit="64MiB", runtime_overhead=0)
    b = compile_pipeline([t], memory_limit="64MiB", runtime_overhead="3MiB")
    assert a.passes[0].plan.steps == b.passes[0].plan.steps
    assert [q - p for p, q in zip(a.passes[0].step_peaks, b.passes[0].step_peaks)] == [
        3 << 20
    ] * len(a.passes[0].step_peaks)
    # the overhead takes budget from the slabs: the same budget gives thinner steps
    d = compile_pipeline([t], memory_limit="1MiB", runtime_overhead=0)
    assert len(d.passes[0].plan.steps) == 1
    spare = (1 << 20) - d.passes[0].trace.peak
    c = compile_pipeline([t], memory_limit="1MiB", runtime_overhead=spare + 1)
    assert len(c.passes[0].plan.steps) > 1
    assert c.passes[0].trace.peak <= 1 << 20
    with pytest.raises(BudgetError, match="runtime overhead 1.00 MiB included"):
        compile_pipeline([t], memory_limit="1MiB", runtime_overhead="1MiB")


SLACK = 128 << 10  # python objects of a step (futures, slices, records): runtime overhead


def _traced_steps(out, **settings):
    """Run ``out`` under tracemalloc: per step (projected peak, traced peak above start)."""
    import tracemalloc

    tracemalloc.start()
    try:
        r = dsl.run(out, **settings)
    finally:
        tracemalloc.stop()
    return [(st.projected, st.traced) for st in r.report.steps]


@pytest.mark.parametrize(
    "build",
    [
        # float output of a wide kernel on thin slabs: padded float temporaries
        lambda s: s.gaussian(3, output="float32"),
        # the DoG of the benchmark: tee, two float kernels, zip
        lambda s: dsl.zip(
            s.gaussian(1, output="float32"), s.gaussian(3, output="float32"), lambda p, q: p - q
        ),
        # a non-separable kernel (pieces with in-plane halos)
        lambda s: s.median(size=3).gaussian(1),
    ],
    ids=["gaussian-f32", "dog", "median-gaussian"],
)
def test_projection_covers_the_real_arrays(build):
    # numpy allocations are traced by tracemalloc: deterministic, unlike resident memory.
    # Before the windows were computed in pieces, the real peak was 2-3x the projection.
    x = vol((64, 128, 128), dtype="uint8")
    out = build(dsl.source(x)).to(np.empty(x.shape, build(dsl.source(x)).dtype))
    rows = _traced_steps(out, memory_limit="2MiB", **NO)
    assert len(rows) >= 3
    for projected, peak in rows:
        assert peak <= projected + SLACK, rows
    # and the projection is not wildly conservative either
    assert max(p for _, p in rows) >= 0.5 * max(q for q, _ in rows), rows


def test_histogram_and_zarr_writes_are_counted(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 128, 128), dtype="uint8")
    z = zarr.create_array(
        str(tmp_path / "out.zarr"), shape=x.shape, chunks=(4, 128, 128), dtype="uint8"
    )
    s = dsl.source(x).gaussian(1)
    # pass 0: histogram of uint8 (bincount's int64 copy is bounded by blocks);
    # pass 1: a zarr target written in pieces (encoding temporaries counted)
    out = (s > dsl.otsu(s)).astype("uint8").to(z)
    rows = _traced_steps(out, memory_limit="2MiB", **NO)
    assert len(rows) > 4
    for projected, peak in rows:
        assert peak <= projected + SLACK, rows
    # one thick slab: bincount would copy it to int64 (8x) if it were not counted in blocks
    rows = _traced_steps(dsl.otsu(dsl.source(x)), memory_limit="16MiB", **NO)
    assert len(rows) == 1
    for projected, peak in rows:
        assert peak <= projected + SLACK, rows
    g = ndi.gaussian_filter(x, 1)
    t = dsl.otsu_from_histogram(np.bincount(g.ravel(), minlength=256), np.arange(256.0))
    np.testing.assert_array_equal(z[...], (g > t).astype("uint8"))


def test_separable_float_output_is_exact_and_separable():
    x = vol((30, 40, 36), dtype="uint8")
    for threads in (1, 2):
        s = dsl.source(x)
        g = s.gaussian(2, output="float32")
        u = s.uniform(5, output="float32")
        c = compile_pipeline([g.to()], memory_limit="1MiB", threads=threads, **NO)
        win = [st for st in c.passes[0].plan.stages if getattr(st, "passes", None)]
        assert win and win[0].passes[0][0] == 0  # the sweep-axis pass first
        got = g.to().run(memory_limit="1MiB", threads=threads, **NO).value
        np.testing.assert_array_equal(got, ndi.gaussian_filter(x, 2, output=np.float32))
        got = u.to().run(memory_limit="1MiB", threads=threads, **NO).value
        np.testing.assert_array_equal(got, ndi.uniform_filter(x, 5, output=np.float32))


def test_budget_too_small_is_refused_before_any_io(tmp_path):
    x = vol()
    s = dsl.source(x).gaussian(4)
    path = tmp_path / "out.zarr"
    with pytest.raises(BudgetError, match=r"gaussian\(sigma=4\).*memory_limit") as e:
        s.to(str(path)).run(memory_limit="64KiB", **NO)
    assert e.value.projected > e.value.budget
    assert not os.path.exists(str(path)) and not os.path.exists(str(path) + ".partial")


def test_window_without_footprint_is_refused():
    s = dsl.source(vol())
    with pytest.raises(PlanError, match=r"'myfilter\(array\)'.*footprint="):
        s.window(lambda b: b, name="myfilter")


def test_unknown_scipy_options_are_refused():
    s = dsl.source(vol())
    with pytest.raises(PlanError, match="footprint"):
        s.window(ndi.gaussian_filter, sigma=1, order=1, output=np.float64)


def test_overflowing_cast_is_refused_unless_clip_or_unsafe():
    x = vol(dtype="uint8")
    s = dsl.source(x)
    with pytest.raises(PlanError, match=r"astype.*overflow.*clip=True"):
        (s.astype("int16") * 2).astype("uint8")
    with pytest.raises(PlanError, match=r"uint8.*wrap"):
        s + 100
    with pytest.raises(PlanError):
        s + 300  # numpy refuses the constant for uint8
    with pytest.raises(PlanError, match=r"unknown"):
        dsl.source(vol()).astype("uint8")  # float of unknown range
    ok = (s.astype("int16") * 2).astype("uint8", clip=True).to().run().value
    np.testing.assert_array_equal(ok, np.clip(x.astype("int16") * 2, 0, 255).astype("uint8"))
    wrapped = (s.astype("int16") * 2).astype("uint8", unsafe=True).to().run().value
    np.testing.assert_array_equal(wrapped, (x.astype("int16") * 2).astype("uint8"))
    # ranges propagate: a uint8 smoothed, thresholded, cast back is safe
    fine = (s.gaussian(1) > 100).astype("uint8")
    assert fine.vrange == (0, 1)
    # declared ranges let a float cast through
    d = dsl.source(vol(), range=(0, 200)).gaussian(1).astype("uint8")
    assert d.vrange == (0, 200)


def test_unalignable_branches_are_refused():
    a = dsl.source(vol((10, 8, 8)))
    b = dsl.source(vol((10, 8, 9)))
    with pytest.raises(PlanError, match=r"cannot align.*same shape"):
        dsl.zip(a, b, lambda p, q: p + q)
    with pytest.raises(PlanError, match="same shape"):
        a + b


def test_logic_on_non_masks_is_refused():
    s = dsl.source(vol())
    with pytest.raises(PlanError, match="boolean"):
        s & s


def test_run_time_overshoot_replans_remaining_steps(monkeypatch):
    x = vol((64, 32, 32))
    s = dsl.source(x).gaussian(1)
    out = (s - s.uniform(3)).to()
    base = out.run(memory_limit="4MiB", target_slab_bytes="64KiB", **NO)
    n_steps = len(base.report.steps)
    assert n_steps >= 4 and not base.report.replans

    calls = {"n": 0}

    def fake_rss():  # resident memory that grows 64 MiB every call: a leaky kernel
        calls["n"] += 1
        return calls["n"] * (64 << 20)

    monkeypatch.setattr(dsl_execute, "rss", fake_rss)
    r = out.run(memory_limit="4MiB", target_slab_bytes="64KiB", **NO)
    assert r.report.replans, str(r.report)
    assert len(r.report.steps) > n_steps
    np.testing.assert_array_equal(r.value, base.value)
    assert "re-planned" in str(r.report)


def test_scalar_compute_and_explain_of_scalars():
    x = vol(dtype="uint8")
    s = dsl.source(x)
    assert dsl.max(s).compute() == x.max()
    assert "reduce" in str(dsl.explain(dsl.max(s), dsl.min(s)))


def test_explain_mentions_budget_io_and_outputs():
    x = vol(dtype="uint8")
    t = dsl.otsu_threshold(x, sigma=1).astype("uint8")
    text = str(t.to().explain(memory_limit="256KiB", **NO))
    for word in (
        "pass 0 of 2",
        "pass 1 of 2",
        "histogram",
        "projected peak",
        "budget",
        "bytes read / input bytes = 1.000",
        "2.00 x input",
        "gaussian(sigma=1)      kernel  window -4/+4",
        "numpy array",
    ):
        assert word in text, word


def test_report_measures_reads_and_memory_per_step(monkeypatch):
    x = vol((64, 32, 32), dtype="uint8")
    out = dsl.source(x).gaussian(2).to()
    r = out.run(memory_limit="128KiB", **NO)
    steps = r.report.steps
    assert len(steps) > 3
    # bytes the readers returned, step by step, equal what the dry run projected
    assert [s.bytes_read for s in steps] == [s.read_projected for s in steps]
    assert sum(s.bytes_read for s in steps) == x.nbytes == r.report.bytes_read
    assert not r.report.notes
    # tracemalloc is off: nothing traced (resident peaks are checked against budgets in
    # tests/test_budget_entry_points.py, in fresh processes)
    assert all(s.traced is None for s in steps)
    # a reader that reads more than planned (here: every row twice) is reported
    from dask_sweep.dsl.sources import NumpyRows

    orig = NumpyRows.read_row

    def twice(self, r, externals):
        orig(self, r, externals)
        return orig(self, r, externals)

    monkeypatch.setattr(NumpyRows, "read_row", twice)
    r2 = out.run(memory_limit="128KiB", **NO)
    np.testing.assert_array_equal(r2.value, r.value)
    assert r2.report.bytes_read == 2 * x.nbytes
    # every step that reads, read twice
    assert len(r2.report.notes) == sum(1 for s in r2.report.steps if s.read_projected)
    assert "I/O differs from the plan" in str(r2.report)
