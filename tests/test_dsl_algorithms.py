"""Connected components and the distance transform written in the DSL, against scipy."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as hst

from dask_sweep import dsl
from dask_sweep.errors import BudgetError, PlanError, SweepConfigError

BUDGET = "48MiB"


def blobs(shape, seed=0, sigma=1.5, frac=0.5, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.random(shape), sigma)
    x = (x - x.min()) / max(1e-12, np.ptp(x))
    out = (x * 255).astype(np.uint8)
    out[x < np.quantile(x, 1 - frac)] = 0
    return out.astype(dtype)


def thin(shape, itemsize=1, planes=3):
    """``target_slab_bytes`` that cuts the input into slabs of a few planes."""
    return int(np.prod(shape[1:])) * itemsize * planes


# --------------------------------------------------------------------------- label


@pytest.mark.parametrize(
    "shape,structure",
    [
        ((40, 17, 23), None),
        ((40, 17, 23), np.ones((3, 3, 3), bool)),
        ((31, 29), None),
        ((31, 29), np.ones((3, 3), bool)),
        ((57,), None),
        ((9, 6, 7, 5), None),
    ],
)
@pytest.mark.parametrize("planes", [1, 3, 1000])
def test_label_equals_scipy(shape, structure, planes):
    vol = blobs(shape, seed=len(shape) + planes)
    lab, n = dsl.label(dsl.source(vol), structure)
    r = dsl.run(lab, n, memory_limit=BUDGET, target_slab_bytes=thin(shape, 1, planes))
    ref, rn = ndi.label(vol, structure)
    assert r.values[1] == rn
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[0].dtype == ref.dtype


@pytest.mark.parametrize("dtype", [bool, np.uint16, np.float32, np.int8])
def test_label_dtypes_and_output(dtype):
    vol = blobs((30, 20, 20), seed=3).astype(dtype)
    lab, n = dsl.label(dsl.source(vol), output=np.int64)
    r = dsl.run(lab, n, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 4))
    ref, rn = ndi.label(vol)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[0].dtype == np.int64 and r.values[1] == rn


def test_denoise_threshold_label_pipeline():
    """gaussian -> otsu threshold -> label: histogram, mask (stored), tables, relabel."""
    vol = blobs((48, 24, 24), seed=5, frac=0.9)
    g = dsl.source(vol).gaussian(1.0)
    t = dsl.otsu(g)
    lab, n = dsl.label(g > t, np.ones((3, 3, 3)))
    biggest = dsl.max(lab)
    r = dsl.run(lab, n, biggest, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 12))
    sm = ndi.gaussian_filter(vol, 1.0)
    ref, rn = ndi.label(sm > r.scalars[t.label], np.ones((3, 3, 3)))
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn == r.values[2]
    assert r.report.passes == 4


def test_labels_feed_later_stages_and_sinks(tmp_path):
    vol = blobs((36, 20, 22), seed=7)
    lab, n = dsl.label(dsl.source(vol))
    size = (lab > 0).astype(np.uint8).uniform(3)
    out = str(tmp_path / "labels.zarr")
    r = dsl.run(lab.to(out), size, n, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape))
    ref, rn = ndi.label(vol)
    import zarr

    np.testing.assert_array_equal(zarr.open_array(out)[:], ref)
    np.testing.assert_array_equal(r.values[1], ndi.uniform_filter((ref > 0).astype(np.uint8), 3))
    assert r.values[2] == rn


@pytest.mark.parametrize("keep", [True, False])
def test_label_reads_input_once_per_pass(monkeypatch, keep):
    """Pass 1 keeps its local labels where the page cache holds them, and the pass reading
    the labels computes no input; else each pass reads the input once."""
    from dask_sweep.multipass import spill

    if not keep:
        monkeypatch.setattr(spill, "labels_fit", lambda *a: False)
    vol = blobs((64, 32, 32), seed=11)
    lab, n = dsl.label(dsl.source(vol) > 0)
    r = dsl.run(lab, n, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 8))
    assert r.report.passes == 2
    assert r.report.bytes_read == (1 if keep else 2) * vol.nbytes
    assert not r.report.notes  # measured reads equal the projection
    # the table pass reports every slab: backwards, with its reads next to the projection
    c = dsl.explain(lab, n, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 8))
    slabs = c.compiled.passes[0].plan.slabs
    table = [st for st in r.report.steps if st.pass_index == 0]
    assert [st.planes for st in table] == list(reversed(slabs))
    assert all(st.bytes_read == st.read_projected > 0 for st in table)


def test_windowed_input_is_stored_once(tmp_path):
    """A mask made by windows is written once by its sweep, then read by both passes."""
    vol = blobs((64, 32, 32), seed=12)
    lab, n = dsl.label(dsl.source(vol).gaussian(1) > 60)
    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 8))
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        assert "stored once" in str(dsl.explain(lab, **kw))
        assert os.listdir(tmp_path) == []  # explain writes nothing
        r = dsl.run(lab, n, **kw)
    assert not r.report.notes
    # the source once (the mask's sweep), the stored bool mask once (pass 1 keeps its
    # labels for the pass reading them)
    assert r.report.bytes_read == 2 * vol.nbytes
    assert os.listdir(tmp_path) == []  # removed at the end of the run
    ref, rn = ndi.label(ndi.gaussian_filter(vol, 1) > 60)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn


def test_pointwise_input_is_recomputed_with_no_halo():
    vol = blobs((64, 32, 32), seed=12)
    lab, _ = dsl.label((dsl.source(vol) > 60) & (dsl.source(vol) < 200))
    e = str(dsl.explain(lab, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 8)))
    assert "computed per slab" in e and "halo" not in e


def test_label_to_dask_equals_run():
    vol = blobs((33, 18, 19), seed=13)
    lab, n = dsl.label(dsl.source(vol).median(size=3) > 0)
    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 5))
    a, b = dask.compute(*dsl.to_dask(lab, n, **kw))
    r = dsl.run(lab, n, **kw)
    np.testing.assert_array_equal(a, r.values[0])
    assert b == r.values[1]
    ref, rn = ndi.label(ndi.median_filter(vol, size=3) > 0)
    np.testing.assert_array_equal(a, ref)


def test_label_spills_tables_beyond_budget(tmp_path):
    """With no room for tables they go to .npy files, are read back, and removed."""
    vol = (np.random.default_rng(1).random((40, 30, 30)) > 0.85).astype(np.uint8)  # many labels
    lab, n = dsl.label(dsl.source(vol))
    kw = dict(target_slab_bytes=thin(vol.shape, 1, 2))
    limit = 48 << 20
    for _ in range(6):  # the passes' footprint depends a little on the budget
        peak = dsl.explain(lab, memory_limit=limit, **kw).compiled.passes[0].projected_peak
        limit = peak + 16_000  # the passes fit; 16 kB for tables, fewer than there are
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        c = dsl.explain(lab, memory_limit=limit, **kw)
        assert c.compiled.passes[0].algo.prepared.extra["reserve"] <= 16_000
        r = dsl.run(lab, n, memory_limit=limit, **kw)
    from dask_sweep.multipass.spill import REGISTRY

    spilled = [c for d, c in REGISTRY._counters.items() if d.startswith(str(tmp_path))]
    assert spilled and all(c.bytes_written == c.bytes_read > 0 for c in spilled)
    ref, rn = ndi.label(vol)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn
    assert os.listdir(tmp_path) == []  # spill directories removed at the end of the run


def test_label_at_its_floor_labels_one_slab_at_a_time():
    """Below the floor of two slabs in flight, pass 1 labels one at a time, as the
    drop-in does, and the traced arrays stay within the projection."""
    import tracemalloc

    vol = blobs((48, 128, 128))
    st = np.ones((3, 3, 3), bool)
    lab, n = dsl.label(dsl.source(vol), st)
    no_overhead = {"sweep.runtime-overhead": 0, "sweep.task-overhead": 0, "sweep.threads": 2}
    with dask.config.set(no_overhead):
        wide = str(dsl.explain(lab, n, memory_limit="2MiB"))
        assert "x 2 slab(s)" in wide.split("label-local")[1].splitlines()[0]
        with pytest.raises(BudgetError):
            dsl.explain(lab, n, memory_limit="600KiB")
        text = str(dsl.explain(lab, n, memory_limit="940KiB"))
        assert "x 1 slab(s)" in text.split("label-local")[1].splitlines()[0]
        tracemalloc.start()
        try:
            r = dsl.run(lab, n, memory_limit="940KiB")
        finally:
            tracemalloc.stop()
    ref, rn = ndi.label(vol, st)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn
    # + python objects of a step (futures, records): what the runtime overhead, zero
    # here, covers (as in test_dsl_plan)
    slack = 128 << 10
    over = [(s.projected, s.traced) for s in r.report.steps if s.traced > s.projected + slack]
    assert not over and r.report.peak_projected <= 940 << 10, over


@settings(max_examples=25, deadline=None)
@given(
    shape=hst.tuples(hst.integers(1, 24), hst.integers(1, 9), hst.integers(1, 9)),
    planes=hst.integers(1, 6),
    full=hst.booleans(),
    seed=hst.integers(0, 10_000),
    frac=hst.floats(0.05, 0.95),
)
def test_label_property(shape, planes, full, seed, frac):
    vol = np.random.default_rng(seed).random(shape) < frac
    st = np.ones((3, 3, 3), bool) if full else None
    lab, n = dsl.label(dsl.source(vol), st)
    r = dsl.run(lab, n, memory_limit=BUDGET, target_slab_bytes=thin(shape, 1, planes))
    ref, rn = ndi.label(vol, st)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn


# --------------------------------------------------------------------------- EDT


@pytest.mark.parametrize(
    "shape,sampling",
    [
        ((40, 17, 23), None),
        ((40, 17, 23), (2.0, 1.0, 0.5)),
        ((31, 29), (0.7, 1.3)),
        ((57,), 2.0),
    ],
)
@pytest.mark.parametrize("planes", [1, 4, 1000])
def test_edt_equals_scipy(shape, sampling, planes):
    vol = blobs(shape, seed=planes, frac=0.8)
    e = dsl.distance_transform_edt(dsl.source(vol), sampling)
    r = dsl.run(e, memory_limit=BUDGET, target_slab_bytes=thin(shape, 1, planes))
    ref = ndi.distance_transform_edt(vol, sampling=sampling)
    np.testing.assert_allclose(r.value, ref, rtol=1e-12, atol=0)
    assert r.value.dtype == np.float64


def test_edt_spills_tables_beyond_budget(tmp_path):
    """Planes beyond the room left go to narrowed .npy files, are read back, removed."""
    vol = np.random.default_rng(2).random((48, 30, 30)) > 0.05
    vol[:, :, :2] = True  # a stripe far from background: carries up to 17 rows, uint8
    d = dsl.distance_transform_edt(dsl.source(vol), (1.5, 1.0, 0.5))
    kw = dict(target_slab_bytes=thin(vol.shape, 1, 2))
    limit = 48 << 20
    for _ in range(6):  # the passes' footprint depends a little on the budget
        passes = dsl.explain(d, memory_limit=limit, **kw).compiled.passes
        # the algorithm's pass, and the pass that reads its output (next to the tables
        # kept): room for both with 8 kB of tables, fewer than there are
        kept = passes[0].algo.prepared.extra["reserve"]
        limit = max(passes[0].projected_peak, max(passes[1].step_peaks) - kept) + 8_000
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        prepared = dsl.explain(d, memory_limit=limit, **kw).compiled.passes[0].algo.prepared
        tables = 3 * 4 * 900 * len(prepared.plan.slabs)  # F, D, B: int32 planes
        reserve = prepared.extra["reserve"]
        assert reserve < tables / 2
        r = dsl.run(d, memory_limit=limit, **kw)
    from dask_sweep.multipass.spill import REGISTRY

    spilled = [c for k, c in REGISTRY._counters.items() if k.startswith(str(tmp_path))]
    assert spilled and all(c.bytes_written == c.bytes_read > 0 for c in spilled)
    # what was not kept went to disk at 1 byte a voxel (+ the .npy header), not int32's 4
    assert 0 < sum(c.bytes_written for c in spilled) < 0.3 * (tables - reserve)
    np.testing.assert_allclose(r.value, ndi.distance_transform_edt(vol, (1.5, 1.0, 0.5)))
    assert os.listdir(tmp_path) == []  # spill directories removed at the end of the run


@pytest.mark.parametrize("fill", [0, 1])
def test_edt_all_or_no_background(fill):
    vol = np.full((12, 5, 6), fill, np.uint8)
    e = dsl.distance_transform_edt(dsl.source(vol), (1.5, 1, 1))
    r = dsl.run(e, memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 2))
    np.testing.assert_allclose(
        r.value, ndi.distance_transform_edt(vol, sampling=(1.5, 1, 1)), rtol=1e-12
    )


def test_edt_of_a_pipeline_and_downstream(tmp_path):
    vol = blobs((44, 20, 24), seed=21, frac=0.7)
    mask = dsl.source(vol).gaussian(1) > 40
    e = dsl.distance_transform_edt(mask, (2, 1, 1))
    core = e > 2.5
    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 6))
    r = dsl.run(e, core, **kw)
    ref = ndi.distance_transform_edt(ndi.gaussian_filter(vol, 1) > 40, sampling=(2, 1, 1))
    np.testing.assert_allclose(r.values[0], ref, rtol=1e-12)
    np.testing.assert_array_equal(r.values[1], ref > 2.5)
    (d,) = dask.compute(dsl.to_dask(e, **kw))
    np.testing.assert_allclose(d, ref, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    shape=hst.tuples(hst.integers(1, 20), hst.integers(1, 8), hst.integers(1, 8)),
    planes=hst.integers(1, 5),
    sampling=hst.tuples(*[hst.floats(0.25, 4.0)] * 3),
    seed=hst.integers(0, 10_000),
    frac=hst.floats(0.0, 1.0),
)
def test_edt_property(shape, planes, sampling, seed, frac):
    vol = np.random.default_rng(seed).random(shape) < frac
    e = dsl.distance_transform_edt(dsl.source(vol), sampling)
    r = dsl.run(e, memory_limit=BUDGET, target_slab_bytes=thin(shape, 1, planes))
    ref = ndi.distance_transform_edt(vol, sampling=sampling)
    np.testing.assert_allclose(r.value, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (0, 4, 3), (5, 0), (4, 0, 3)])
def test_empty_inputs_as_scipy(shape):
    vol = np.zeros(shape, np.uint8)
    lab, n = dsl.label(dsl.source(vol))
    r = dsl.run(lab, n, memory_limit=BUDGET)
    ref, rn = ndi.label(vol)
    assert r.values[0].shape == ref.shape and r.values[1] == rn
    e = dsl.run(dsl.distance_transform_edt(dsl.source(vol)), memory_limit=BUDGET).value
    assert e.shape == shape and e.dtype == np.float64


def test_failed_run_leaves_no_stored_input(tmp_path):
    vol = blobs((32, 16, 16), seed=51)
    calls = []

    def fails_late(x):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return x

    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 4))
    mask = (dsl.source(vol).gaussian(1) > 50).map(fails_late, dtype=bool)
    lab, _ = dsl.label(mask)
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        with pytest.raises(RuntimeError, match="boom"):
            # fails while the windowed mask is being stored, before its table pass
            dsl.run(lab, **kw)
        assert os.listdir(tmp_path) == []
        calls.clear()
        lab2, _ = dsl.label(dsl.source(vol).gaussian(1) > 50)
        with pytest.raises(RuntimeError, match="boom"):
            # fails in the pass reading the labels: tables and stored mask exist
            dsl.run(lab2, (lab2 > 0).map(fails_late, dtype=bool), **kw)
    assert os.listdir(tmp_path) == []


def test_thick_source_rows_are_stored_in_thin_rows():
    """A source whose rows are thicker than a slab can be is stored once, not re-read."""
    x = (np.random.default_rng(2).random((64, 256, 256)) > 0.6).astype(np.uint8)
    d = da.from_array(x, chunks=(64, 256, 256))  # one row: the whole volume
    lab, n = dsl.label(dsl.source(d))
    e = str(dsl.explain(lab, n, memory_limit="24MiB"))
    assert "comes in rows of 64 planes" in e
    r = dsl.run(lab, n, memory_limit="24MiB")
    ref, rn = ndi.label(x)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn
    assert r.report.read_ratio == 2.0  # the source once, the stored copy once


# --------------------------------------------------------------------------- bad input


def test_budget_too_small_fails_before_io(tmp_path):
    vol = blobs((40, 64, 64), seed=1)
    lab, _ = dsl.label(dsl.source(vol) > 10)
    out = tmp_path / "out.zarr"
    with pytest.raises(BudgetError, match="label.*memory budget"):
        dsl.run(lab.to(str(out)), memory_limit="8200KiB", runtime_overhead="8MiB")
    assert not out.exists()


def test_bad_structure_and_sampling_fail_when_built():
    s = dsl.source(np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(SweepConfigError, match="structure"):
        dsl.label(s, np.ones((3, 3)))
    with pytest.raises(SweepConfigError, match="sampling"):
        dsl.distance_transform_edt(s, (1, 2))
    with pytest.raises(SweepConfigError, match="output"):
        dsl.label(s, output=np.float32)


def test_other_sweep_axis_is_refused():
    lab, _ = dsl.label(dsl.source(np.zeros((4, 5, 6), np.uint8)))
    with pytest.raises(PlanError, match="axis 0"):
        dsl.explain(lab, axis=1)


def test_explain_shows_table_pass():
    vol = blobs((32, 16, 16))
    lab, n = dsl.label(dsl.source(vol) > 0)
    e = str(dsl.explain(lab, n, memory_limit=BUDGET))
    assert "pass 0 of 2: label table pass" in e
    assert "last slab to first" in e
    assert "pass 1 of 2: sweep" in e
    assert "bytes read" in e and "1.00 x input" in e  # pass 1 keeps its labels


# --------------------------------------------------------------------------- composition


def test_label_of_a_distance_transform():
    """An algorithm's output feeding another algorithm (read per slab, out of order)."""
    vol = blobs((40, 24, 24), seed=31, frac=0.8)
    core = dsl.distance_transform_edt(dsl.source(vol)) > 2
    lab, n = dsl.label(core)
    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 5))
    r = dsl.run(lab, n, **kw)
    ref, rn = ndi.label(ndi.distance_transform_edt(vol) > 2)
    np.testing.assert_array_equal(r.values[0], ref)
    assert r.values[1] == rn
    a, b = dask.compute(*dsl.to_dask(lab, n, **kw))
    np.testing.assert_array_equal(a, ref)
    assert b == rn


def test_two_algorithms_share_one_stored_input(tmp_path):
    vol = blobs((40, 24, 24), seed=32, frac=0.7)
    mask = dsl.source(vol).gaussian(1) > 50
    lab, n = dsl.label(mask)
    dist = dsl.distance_transform_edt(mask)
    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 6))
    e = str(dsl.explain(lab, dist, n, **kw))
    assert e.count("written into SpillStore") == 1
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        r = dsl.run(lab, dist, n, **kw)
    m = ndi.gaussian_filter(vol, 1) > 50
    ref, rn = ndi.label(m)
    np.testing.assert_array_equal(r.values[0], ref)
    np.testing.assert_allclose(r.values[1], ndi.distance_transform_edt(m), rtol=1e-12)
    assert r.values[2] == rn
    # source once, the stored mask once for label (it keeps its labels), twice for EDT
    assert r.report.bytes_read == 4 * vol.nbytes
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_algorithms_on_distributed_worker_processes(tmp_path):
    """Tables, stored inputs and spilled planes travel between worker processes."""
    distributed = pytest.importorskip("distributed")
    vol = blobs((30, 16, 18), seed=41, frac=0.7)
    mask = dsl.source(vol).gaussian(1) > 50  # windowed: stored once
    lab, n = dsl.label(mask)
    dist = dsl.distance_transform_edt(mask, (2, 1, 1))
    kw = dict(memory_limit=BUDGET, target_slab_bytes=thin(vol.shape, 1, 4))
    with (
        dask.config.set({"temporary-directory": str(tmp_path)}),
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # arrays first: dask 2026.8 returns the arrays of a mixed compute before the Delayed
        got_lab, got_dist, got_n = client.compute(
            list(dsl.to_dask(lab, dist, n, **kw)), sync=True
        )
    m = ndi.gaussian_filter(vol, 1) > 50
    ref, rn = ndi.label(m)
    np.testing.assert_array_equal(got_lab, ref)
    assert got_n == rn
    np.testing.assert_allclose(got_dist, ndi.distance_transform_edt(m, (2, 1, 1)), rtol=1e-12)
