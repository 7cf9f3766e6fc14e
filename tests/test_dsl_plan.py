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


def vol(shape=(40, 32, 24), dtype="float32"):
    rng = np.random.default_rng(3)
    return (rng.random(shape) * 200).astype(dtype)


def test_one_pass_is_one_fused_plan_and_reads_input_once():
    x = vol()
    s = dsl.source(x)
    dog = dsl.zip(s.gaussian(1), s.gaussian(3), lambda a, b: a - b)
    c = compile_pipeline([dog.to()], memory_limit="512KiB")
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
    c = compile_pipeline([t.to()], memory_limit="1MiB")
    assert [pp.index for pp in c.passes] == [0, 1]
    assert [k for k, _ in c.passes[0].outputs] == ["reduce"]
    assert [k for k, _ in c.passes[1].outputs] == ["target"]
    r = t.to().run(memory_limit="1MiB")
    assert r.report.bytes_read == 2 * x.nbytes == len(c.passes) * x.nbytes
    # float stream of unknown range: min/max pass, then histogram pass, then apply pass
    f = dsl.source(vol()).gaussian(1)
    c3 = compile_pipeline([(f > dsl.otsu(f)).to()], memory_limit="1MiB")
    assert len(c3.passes) == 3


@pytest.mark.parametrize("limit", ["320KiB", "512KiB", "4MiB"])
def test_projected_peak_within_budget_and_measured_matches(limit):
    x = vol()
    s = dsl.source(x)
    out = dsl.zip(s.gaussian(2), s.median(size=3), lambda a, b: a - b).to()
    c = compile_pipeline([out], memory_limit=limit)
    budget = c.settings.memory_limit
    for pp in c.passes:
        assert pp.trace.peak <= budget
        assert max(pp.step_peaks) == pp.trace.peak
    r = out.run(memory_limit=limit)
    assert r.report.peak_projected <= budget
    # live arrays measured on the real run equal the dry-run projection
    assert r.report.peak_live == r.report.peak_projected
    assert not r.report.replans


def test_budget_too_small_is_refused_before_any_io(tmp_path):
    x = vol()
    s = dsl.source(x).gaussian(4)
    path = tmp_path / "out.zarr"
    with pytest.raises(BudgetError, match=r"gaussian\(sigma=4\).*memory_limit") as e:
        s.to(str(path)).run(memory_limit="64KiB")
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
    base = out.run(memory_limit="4MiB", target_slab_bytes="64KiB")
    n_steps = len(base.report.steps)
    assert n_steps >= 4 and not base.report.replans

    calls = {"n": 0}

    def fake_rss():  # resident memory that grows 64 MiB every call: a leaky kernel
        calls["n"] += 1
        return calls["n"] * (64 << 20)

    monkeypatch.setattr(dsl_execute, "_rss", fake_rss)
    r = out.run(memory_limit="4MiB", target_slab_bytes="64KiB")
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
    text = str(t.to().explain(memory_limit="256KiB"))
    for word in (
        "pass 0 of 2",
        "pass 1 of 2",
        "histogram",
        "projected peak",
        "budget",
        "read 1.00 x input",
        "2.00 x input",
        "kernel gaussian(sigma=1)",
        "numpy array",
    ):
        assert word in text, word
