"""Unit tests of the runtime: ring buffers, the slab executor, the graph writer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_sweep.errors import BudgetError
from dask_sweep.plan.ir import Kernel, Output, Plan, Pointwise, Source
from dask_sweep.runtime.executor import Trace, dry_run, run_step
from dask_sweep.runtime.ring import Ring, Shape


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(1, 9), pieces=st.lists(st.integers(1, 4), min_size=1, max_size=12),
    window=st.integers(0, 5), axis=st.sampled_from([0, 1]), seed=st.integers(0, 99),
)
def test_folded_ring_holds_every_window_as_a_view(cap, pieces, window, axis, seed):
    """Appends, compactions and growth keep ``get`` equal to the planes appended."""
    rng = np.random.default_rng(seed)
    total = sum(pieces)
    data = rng.integers(0, 255, (total, 3) if axis == 0 else (3, total)).astype("u1")
    ring, a = Ring(axis, 0, cap), 0
    for n in pieces:
        part = data[a:a + n] if axis == 0 else data[:, a:a + n]
        ring.append(a, part.copy())
        a += n
        lo = max(0, a - window - n)
        got = ring.get(lo, a)
        want = data[lo:a] if axis == 0 else data[:, lo:a]
        np.testing.assert_array_equal(got, want)
        assert np.shares_memory(got, ring.buf)  # a view, never a join
        ring.drop_below(max(0, a - window))
    assert ring.nbytes == ring.buf.nbytes  # the buffer is what a folded ring holds


def test_compaction_moves_planes_in_place_and_growth_keeps_them():
    ring = Ring(0, 0, 4)
    for a in range(0, 12, 2):
        ring.append(a, np.full((2, 2), a, "i2"))
        buf = ring.buf
        ring.drop_below(a)  # keep the last two planes: every append compacts
        assert ring.buf is buf  # in place: no new buffer
    np.testing.assert_array_equal(ring.get(10, 12), np.full((2, 2), 10))
    ring.append(12, np.full((5, 2), 12, "i2"))  # more than the capacity: it grows
    assert ring.buf.shape[0] == 7
    np.testing.assert_array_equal(ring.get(10, 17)[:, 0], [10, 10] + [12] * 5)


def test_hand_over_gives_the_buffer_away_and_keeps_the_rest():
    ring = Ring(0, 0, 6)
    ring.append(0, np.arange(5.0)[:, None] * np.ones((1, 3)))
    out = ring.hand_over(3)
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2])
    assert ring.start == 3 and ring.buf is not out.base
    np.testing.assert_array_equal(ring.get(3, 5)[:, 0], [3, 4])
    ring.append(5, np.full((1, 3), 9.0))
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2])  # the caller's planes stay


def test_transient_ring_joins_pieces_and_cuts_straddlers_with_a_copy():
    ring = Ring(0)
    a, b = np.zeros((3, 2)), np.ones((3, 2))
    ring.append(0, a)
    ring.append(3, b)
    assert ring.copies(2, 4) and not ring.copies(0, 3)
    ring.drop_below(2)
    (s, e, kept), _ = ring.pieces
    assert (s, e) == (2, 3) and not np.shares_memory(kept, a)


def test_dry_ring_counts_its_buffer():
    ring = Ring(0, 0, 8)
    ring.append(0, Shape((2, 4, 4), np.dtype("f4")))
    assert ring.nbytes == 8 * 16 * 4


class _Rows:
    """A source of planes ``value = plane index`` read by rows of ``rows`` planes."""

    def __init__(self, n, rows):
        self.n, self.rows = n, rows

    def read_row(self, r, externals):
        a, b = r * self.rows, min(self.n, (r + 1) * self.rows)
        return np.arange(a, b, dtype="f8")[:, None, None] * np.ones((1, 4, 3))


def _plan(n=20, rows=3, steps=4, depth=2):
    import functools

    import scipy.ndimage as ndi

    bounds = tuple(range(0, n, rows)) + (n,)
    src = Source("src", (n, 4, 3), np.dtype("f8"), row_bounds=bounds, reader=_Rows(n, rows),
                 bytes_per_row=tuple(np.diff(bounds) * 96))
    k = Kernel("box", (n, 4, 3), np.dtype("f8"), inputs=(0,),
               fn=functools.partial(ndi.uniform_filter, size=(2 * depth + 1, 1, 1),
                                    mode="nearest"),
               depth=(depth, 0, 0), boundary=("none",) * 3)
    twice = Pointwise("twice", (n, 4, 3), np.dtype("f8"), inputs=(1, 0), fn=lambda a, b: a + b)
    out = Output(2, "out", ((n // 2, n - n // 2), (4,), (3,)))
    return Plan((src, k, twice), (out,), 0, steps=tuple(range(steps, n, steps)) + (n,))


def _run(plan):
    from dask_sweep.passes.slabs import size_rings

    plan, _ = size_rings(plan)
    state, parts = None, []
    trace = Trace()
    for seg in plan.segment_steps():
        state = None
        for t in seg:
            state, emitted = run_step(plan, state, t, trace=trace)
            parts += [p for _, p in emitted if p is not None]
    return np.concatenate(parts), trace, plan


@pytest.mark.parametrize("steps", [1, 3, 7, 20])
def test_executor_equals_one_call_and_reads_as_projected(steps):
    import scipy.ndimage as ndi

    plan = _plan(steps=steps)
    got, trace, sized = _run(plan)
    vol = np.arange(20.0)[:, None, None] * np.ones((1, 4, 3))
    np.testing.assert_array_equal(got, ndi.uniform_filter(vol, (5, 1, 1), mode="nearest") + vol)
    dry = dry_run(sized)
    assert trace.bytes_read == dry.bytes_read == 20 * 96  # every row read once
    assert trace.peak <= dry.peak + 1  # the real run within the projection


class _Bounds:
    """A source of planes ``value = plane index`` read by rows with the given bounds."""

    def __init__(self, bounds):
        self.bounds = bounds

    def read_row(self, r, externals):
        a, b = self.bounds[r], self.bounds[r + 1]
        return np.arange(a, b, dtype="f8")[:, None, None] * np.ones((1, 64, 64))


@pytest.mark.parametrize("widths", [(5, 5, 4, 5, 5, 4, 5, 5, 4, 5), (3, 2, 1, 3, 3, 2)])
@pytest.mark.parametrize("direct", [True, False])
def test_uneven_rows_are_swept_a_row_per_step(widths, direct):
    """A drop-in's output read as a source has uneven rows (label's slabs of 4 and 5
    planes): uniform steps of two planes or more straddle two rows and one plane per
    step costs a task and a write per plane, so where a row per step fits, steps follow
    the rows, whole; the floor is the lower of one plane and one row per step."""
    from dask_sweep.passes.slabs import (
        choose_steps,
        floor,
        row_steps,
        thinnest,
        uniform_steps,
    )

    bounds = tuple(np.cumsum((0, *widths)).tolist())
    n, plane = bounds[-1], 64 * 64 * 8
    src = Source("src", (n, 64, 64), np.dtype("f8"), row_bounds=bounds,
                 reader=_Bounds(bounds), bytes_per_row=tuple(np.diff(bounds) * plane))
    twice = Pointwise("twice", (n, 64, 64), np.dtype("f8"), inputs=(0,), fn=lambda a: 2 * a)
    stages = (src,) if direct else (src, twice)
    out = Output(len(stages) - 1, "out", (tuple(widths), (64,), (64,)))
    base = Plan(stages, (out,), 0)
    by_plane, _ = size_rings_of(base, uniform_steps(n, 1))
    by_row, _ = size_rings_of(base, row_steps(bounds[1:], 1))
    fp, ft = floor(base)
    assert ft.peak == min(by_plane.peak, by_row.peak)
    assert thinnest(fp) == ("one row per step" if by_row.peak < by_plane.peak
                            else "one plane per step")
    # a budget a row per step fits, and no uniform step of two planes
    budget = by_row.peak
    assert size_rings_of(base, uniform_steps(n, 2))[0].peak > budget
    plan, trace = choose_steps(Plan(stages, (out,), 0, budget=budget), 64 * plane)
    # a row per step, or fewer uniform steps where those fit too (3, 6, ... over 3, 2, 1)
    assert plan.steps in (bounds[1:], uniform_steps(n, max(widths)))
    assert len(plan.steps) <= len(widths) and trace.peak <= budget
    got, run, _ = _run(plan)
    np.testing.assert_array_equal(got[:, 0, 0], (1 if direct else 2) * np.arange(n))
    assert run.bytes_read == n * plane and run.peak <= trace.peak + 1
    # and refused below both, quoting the lower
    with pytest.raises(BudgetError, match=thinnest(fp)):
        choose_steps(Plan(stages, (out,), 0, budget=ft.peak - 1), 64 * plane)


def test_a_long_sweeps_floor_is_its_smallest_budget_not_one_plane_per_step():
    """Where the scheduler's bookkeeping of a step per plane outweighs a thicker step (4000
    planes: 4000 steps), the floor quoted and printed is the lowest over thin steps (a
    few planes per step), and a budget of that floor plans (the search for the thickest
    steps that fit may pass over them: the floor's own steps are tried last)."""
    import dask.array as da
    import scipy.ndimage as ndi

    from dask_sweep.config import SweepSettings
    from dask_sweep.integration.optimize import analyse
    from dask_sweep.passes.slabs import uniform_steps

    x = da.zeros((4000, 32, 32), dtype="f4", chunks=(1, 32, 32))
    y = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect")
    graph, keys = y.__dask_graph__(), y.__dask_keys__()

    def at(budget, fallback="raise"):
        return analyse(graph, keys, SweepSettings.resolve(
            memory_limit=budget, runtime_overhead=0, fallback=fallback))

    with pytest.raises(BudgetError, match=r"its floor, \d+ planes per step") as e:
        at("8MiB")
    floor = e.value.projected
    (plan, trace), = at(floor).plans
    assert trace.peak <= floor
    one_plane, _ = size_rings_of(plan, uniform_steps(plan.extent, 1))
    assert floor < one_plane.peak  # one plane per step: 4000 steps' bookkeeping


def size_rings_of(plan, steps):
    from dataclasses import replace

    from dask_sweep.passes.slabs import size_rings

    sized, trace = size_rings(replace(plan, steps=steps))
    return trace, sized


@pytest.mark.parametrize("segments", [(), (9,)])
def test_a_warm_up_is_computed_a_step_at_a_time(segments):
    """The first step of a chain computes the window's lead too: a step's planes at a
    time, so what feeds the kernel holds no more then than in any later step."""
    import functools

    import scipy.ndimage as ndi

    n, depth = 20, 3
    src = Source("src", (n, 4, 3), np.dtype("f8"), row_bounds=tuple(range(n + 1)),
                 reader=_Rows(n, 1), bytes_per_row=(96,) * n)
    double = Pointwise("double", (n, 4, 3), np.dtype("f8"), inputs=(0,), fn=lambda a: 2 * a)
    # narrow, as a threshold's mask: the lead in float64 planes would outweigh its ring
    less = Pointwise("less", (n, 4, 3), np.dtype("u1"), inputs=(1,),
                     fn=lambda a: (a - 1).astype("u1"))
    k = Kernel("box", (n, 4, 3), np.dtype("u1"), inputs=(2,),
               fn=functools.partial(ndi.uniform_filter, size=(2 * depth + 1, 1, 1),
                                    mode="nearest"),
               depth=(depth, 0, 0), boundary=("none",) * 3)
    plan = Plan((src, double, less, k), (Output(3, "out", ((1,) * n, (4,), (3,))),), 0,
                steps=tuple(range(1, n + 1)), segments=segments)
    got, trace, sized = _run(plan)
    vol = (2 * np.arange(20.0)[:, None, None] * np.ones((1, 4, 3)) - 1).astype("u1")
    np.testing.assert_array_equal(got, ndi.uniform_filter(vol, (7, 1, 1), mode="nearest"))
    dry = dry_run(sized, skip=False)
    starts = [0, *segments]
    later = [p for t, p in enumerate(dry.step_peaks) if t not in starts]
    assert all(dry.step_peaks[t] <= max(later) for t in starts), dry.step_peaks


def test_segments_start_unanchored_and_warm_up():
    from dataclasses import replace

    plan = replace(_plan(steps=2), segments=(5,))
    got, trace, _ = _run(plan)
    one, _, _ = _run(_plan(steps=2))
    np.testing.assert_array_equal(got, one)
    assert trace.bytes_read > 20 * 96  # the second chain re-read the rows of its warm-up


def test_emit_chains_carry_the_plan_and_priorities():
    from dataclasses import replace

    from dask_sweep.emit.graph import emit
    from dask_sweep.passes.slabs import size_rings

    plan, trace = size_rings(replace(_plan(steps=2), segments=(5,)))
    layers, deps = emit(plan, trace, token="t")
    tasks = layers["sweep-t"].mapping
    heads = [k for k in tasks if k[1] in (0, 5)]
    assert all(not tasks[k].dependencies for k in heads)  # no shared dependency
    assert tasks[("sweep-step-t", 6)].dependencies == {("sweep-step-t", 5)}
    prio = layers["sweep-t"].annotations["priority"]
    assert prio(("sweep-step-t", 1)) == 0 and prio(("sweep-step-t", 6)) == -1


def test_a_sized_plan_is_frozen_and_its_copies_independent():
    import pickle
    from dataclasses import replace

    from dask_sweep.emit.graph import REPORTERS, emit
    from dask_sweep.passes.slabs import size_rings

    plan, trace = size_rings(_plan(steps=2))
    with pytest.raises(TypeError, match="with_info"):
        plan.info["x"] = 1
    with pytest.raises(TypeError):
        plan.info.update(x=1)
    other = replace(plan, budget=plan.budget + 1).with_info(x=1)
    assert "x" in other.info and "x" not in plan.info
    assert pickle.loads(pickle.dumps(other.info)) == other.info  # plans travel to workers
    # a reporter's entries reach the plan the steps carry, not the plan emitted
    REPORTERS.append(lambda p, t, tok: {"report": tok})
    try:
        layers, _ = emit(plan, trace, token="r")
    finally:
        REPORTERS.pop()
    carried = layers["sweep-r"].mapping["sweep-plan-r"].value
    assert carried.info["report"] == "r" and "report" not in plan.info


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(30, 400), rows=st.integers(1, 9), steps=st.integers(1, 17),
    depth=st.integers(0, 6), out=st.integers(1, 12), segments=st.integers(1, 3),
    long_last=st.booleans(),
)
def test_dry_runs_that_jump_repeats_equal_step_by_step_ones(n, rows, steps, depth, out,
                                                            segments, long_last):
    """Skipping the steps that repeat themselves changes nothing in the trace; a grid
    whose last row is longer than the others (``long_last``) does not repeat."""
    from dataclasses import replace

    from dask_sweep.passes.segments import cut
    from dask_sweep.passes.slabs import size_rings

    plan = _plan(n=n, rows=rows, steps=steps, depth=depth)
    oc = [out] * (n // out) + ([n % out] if n % out else [])
    k = max(1, (n - n // 3) // out)
    if long_last and n - k * out > out:  # regular rows, then a third of the volume in one
        oc = [out] * k + [n - k * out]
    plan = replace(plan, outputs=(replace(plan.outputs[0], chunks=(tuple(oc), (4,), (3,))),))
    plan, _ = size_rings(cut(plan, segments))
    fast, slow = dry_run(plan), dry_run(plan, skip=False)
    for field in ("peak", "bytes_read", "rows_read", "held_after", "step_peaks", "ring_peak",
                  "span", "carried"):
        assert getattr(fast, field) == getattr(slow, field), field


def test_a_long_regular_sweep_is_replayed_in_a_few_steps(monkeypatch):
    from dataclasses import replace

    import dask_sweep.runtime.executor as ex
    from dask_sweep.passes.slabs import size_rings

    plan = _plan(n=4000, rows=4, steps=8, depth=3)
    plan, _ = size_rings(replace(plan, outputs=(
        replace(plan.outputs[0], chunks=((8,) * 500, (4,), (3,))),)))
    calls = []
    real = ex.run_step
    monkeypatch.setattr(ex, "run_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = ex.dry_run(plan)
    assert len(calls) < 40 < len(plan.steps) == 500  # jumped over the repeats
    assert fast.rows_read == ex.dry_run(plan, skip=False).rows_read


def test_graph_builder_layers_take_their_dependencies_from_their_references():
    import dask

    from dask_sweep.emit.pipeline import GraphBuilder

    b = GraphBuilder()
    a = b.task("a", lambda d: dict(d, x=1), b.const({"k": ("a", 0)}))  # a tuple, not a key
    parts = b.task("parts", lambda *v: list(v), 1, 2)
    c = b.task("c", lambda d, p: d["x"] + sum(p), b.ref(a), b.ref(parts))
    early = b.delayed(a)
    assert b.deps[c] == {"a", "parts"} and b.deps[a] == set()
    late = b.task("late", lambda v: v * 10, b.ref(c))
    # a collection made earlier holds only what existed then
    assert "late" not in early.__dask_graph__().layers
    assert dask.compute(early, b.delayed(late)) == ({"k": ("a", 0), "x": 1}, 40)


def test_slab_tasks_trim_the_heap_after_running_even_on_error(monkeypatch):
    """Temporaries below the mmap threshold are reused from the heap within a task (not
    faulted in again) and returned at its end, also when it raises."""
    from dask_sweep.emit import graph
    from dask_sweep.multipass import edt, label
    from dask_sweep.runtime import memory

    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(memory, "_libc", Libc())
    monkeypatch.setattr(memory, "_done", True)

    @memory.trims
    def task(x):
        if x is None:
            raise ValueError("boom")
        return x + 1

    assert task(1) == 2 and calls == [0]
    with pytest.raises(ValueError):
        task(None)
    assert calls == [0, 0]
    # the sweep's steps and the drop-ins' slab tasks are wrapped (and keep their names,
    # which dask shows in its task keys' functions and the dashboard)
    for fn in (graph._step, label.local_step, label.pass2, label.pass2_split,
               label.resolve, edt.forward_step, edt.distance_step):
        assert fn.__wrapped__ is not None and fn.__name__ == fn.__wrapped__.__name__
    # a row read inside those tasks (not a task of its own) does not trim mid-task: the
    # heap's reuse within a task is what the thresholds are for
    assert not hasattr(label.read_row, "__wrapped__")
    monkeypatch.setattr(memory, "_done", False)  # untuned (sweep.tune-malloc: false)
    task(1)
    assert calls == [0, 0]


def test_kernels_are_cached_on_disk_and_compiled_per_process_where_no_cache_can_be(
        monkeypatch):
    """The kernels ask numba for its disk cache; where numba refuses it (no writable
    location: it raises when the kernel is defined) they are compiled per process."""
    import numba

    from dask_sweep.multipass import label_kernels
    from dask_sweep.runtime import jit

    assert label_kernels._scan._cache.__class__.__name__ != "NullCache"
    real = numba.njit
    asked = []

    def refusing(*args, cache=False, **kwargs):
        asked.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available")
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(jit.numba, "njit", refusing)

    def f(x):
        return x + 1

    k = jit.kernel(f)
    assert asked == [True, False] and k(1) == 2
    assert k._cache.__class__.__name__ == "NullCache"


def test_splice_replaces_the_region_and_keeps_every_other_layer(tmp_path):
    """``emit.splice`` puts the sweep's tasks where the region was, drops the source layers
    only the sweep reads (inline), and keeps a branch the sweep does not touch: both
    outputs compute as stock dask's."""
    import dask
    import dask.array as da
    import zarr
    from dask.array.core import concatenate3
    from dask.highlevelgraph import HighLevelGraph

    from dask_sweep.config import SweepSettings
    from dask_sweep.emit.splice import splice
    from dask_sweep.integration.optimize import analyse

    vol = np.arange(12 * 8 * 8, dtype="f4").reshape(12, 8, 8)
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=vol.shape, chunks=(3, 8, 8),
                          dtype=vol.dtype)
    z[:] = vol
    x = da.from_zarr(z)
    swept = x.map_overlap(lambda b: b * 2, depth=1, boundary="reflect") + 1
    other = da.ones((4, 4), chunks=2).sum()  # a branch of its own
    dsk = HighLevelGraph.merge(swept.__dask_graph__(), other.__dask_graph__())
    keys = [swept.__dask_keys__(), other.__dask_keys__()]
    result = analyse(dsk, keys, SweepSettings.resolve(memory_limit="64MiB"))
    assert len(result.plans) == 1
    out = splice(dsk, [p for p, _ in result.plans], [t for _, t in result.plans], keys)
    assert set(other.dask.layers) <= set(out.layers)
    assert x.name not in out.layers  # read inline by the slab tasks
    assert any(n.startswith("sweep-") for n in out.layers)
    got, stock = dask.get(dict(out), keys), dask.get(dict(dsk), keys)
    np.testing.assert_array_equal(concatenate3(got[0]), concatenate3(stock[0]))
    np.testing.assert_array_equal(concatenate3(got[0]), vol * 2 + 1)
    assert got[1] == stock[1] and float(got[1][0]) == 16
