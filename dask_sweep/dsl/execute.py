"""Run a compiled pipeline: locally step by step, or as a dask graph through ``emit``.

Locally, each pass is a loop over :func:`~dask_sweep.runtime.executor.run_step`
(threads inside a step, no scheduler).  Every step is *measured* (time, bytes
read, bytes of live arrays, resident memory sampled by a thread) and compared
with the dry-run projection of that step::

    step:        0     1     2     3 ...
    projected:  40M   40M   40M   40M
    measured:   38M   71M ──► above projection × (1 + margin) + slack
                            └─► re-plan the remaining steps at half the thickness

After a pass, its reduction partials are combined and the scalars bound into
the next pass's stages.  As a dask graph, each pass is the chain of
``sweep-step`` tasks that :func:`~dask_sweep.emit.graph.emit` makes; a small
task between passes combines the partial blocks into the scalars, and the next
pass's plan node becomes a task that binds them, so the graph runs unchanged
on ``distributed``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import tracemalloc
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dask_sweep.diagnostics import notify_step, rss
from dask_sweep.dsl.algorithms import Tables, _TableValue, run_tables
from dask_sweep.dsl.compile import (
    AlgoPass,
    Compiled,
    PassPlan,
    SinkWriter,
    bind_plan,
    compile_pipeline,
    open_sink,
    step_reads,
)
from dask_sweep.dsl.core import Constant, Reduction, Scalar, Stream, Target
from dask_sweep.dsl.lower import pipeline_token
from dask_sweep.passes.slabs import size_rings
from dask_sweep.plan.ir import Plan, Source, combine_partials
from dask_sweep.runtime.executor import Trace, run_step
from dask_sweep.runtime.memory import trim, tune_allocator
from dask_sweep.utils import format_bytes

__all__ = ["RunReport", "RunResult", "StepRecord", "run", "to_dask"]


def _bytes_read(plan: Plan) -> int:
    """Bytes the plan's source readers have returned so far (counted by the readers)."""
    return sum(
        getattr(st.reader, "bytes_read", 0) for st in plan.stages if isinstance(st, Source)
    )


class _Sampler:
    """Samples resident memory every few ms; :meth:`mark` returns the max since the last mark."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = rss()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._loop, daemon=True, name="dsl-rss")
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            r = rss()
            with self._lock:
                if r > self.peak:
                    self.peak = r

    def mark(self) -> int:
        r = rss()
        with self._lock:
            peak, self.peak = max(self.peak, r), r
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


# --------------------------------------------------------------------------- reports


@dataclass
class StepRecord:
    """What one step did, next to what the plan projected for it."""

    pass_index: int
    step: int
    planes: tuple[int, int]
    seconds: float
    bytes_read: int  # measured: bytes the source readers returned during the step
    projected: int  # projected peak (compute or write, + runtime overhead)
    live: int  # the executor's count on the real arrays (rings, slab, inputs, temporaries)
    rss: int  # measured: peak resident memory above the run's start (results excluded)
    read_projected: int = 0  # bytes the dry run reads in this step
    traced: int | None = None  # measured, when tracemalloc runs: peak traced bytes above start


@dataclass
class RunReport:
    """Per-step measurements of a run against the projection, and any re-planning."""

    budget: int
    steps: list[StepRecord] = field(default_factory=list)
    replans: list[str] = field(default_factory=list)
    passes: int = 0
    input_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # I/O that differed from the plan
    rss_start: int = 0  # resident memory when the run started
    traced_start: int = 0  # bytes traced by tracemalloc when the run started (if tracing)
    result_bytes: int = 0  # bytes of numpy results filled in (the caller's memory)

    def record(self, step: StepRecord) -> None:
        """Keep a finished step's record and hand it to the step observers."""
        self.steps.append(step)
        notify_step(step)

    @property
    def peak_projected(self) -> int:
        return max((s.projected for s in self.steps), default=0)

    @property
    def peak_live(self) -> int:
        return max((s.live for s in self.steps), default=0)

    @property
    def peak_rss(self) -> int:
        return max((s.rss for s in self.steps), default=0)

    def lines(self) -> list[str]:
        out = [
            f"dsl run: {self.passes} pass(es), {len(self.steps)} steps, {self.seconds:.2f} s; "
            f"read {format_bytes(self.bytes_read)} = {self.read_ratio:.2f} x input "
            f"({format_bytes(self.input_bytes)}; one read per pass), wrote "
            f"{format_bytes(self.bytes_written)}",
            f"  peak projected {format_bytes(self.peak_projected)}, measured resident "
            f"+{format_bytes(self.peak_rss)} ({self.peak_rss / self.budget:.2f} x budget), "
            f"arrays counted {format_bytes(self.peak_live)}; budget {format_bytes(self.budget)}",
            "  pass step  planes          time    read (proj.)            projected   "
            "rss+        arrays",
        ]
        for s in self.steps:
            out.append(
                f"  {s.pass_index:>4} {s.step:>4}  [{s.planes[0]:>5},{s.planes[1]:>5})  "
                f"{s.seconds:6.3f}  {format_bytes(s.bytes_read):>10} "
                f"({format_bytes(s.read_projected):>10})  "
                f"{format_bytes(s.projected):>10}  {format_bytes(s.rss):>10}  "
                f"{format_bytes(s.live):>10}"
            )
        for r in self.replans:
            out.append(f"  re-planned: {r}")
        for r in self.notes:
            out.append(f"  I/O differs from the plan: {r}")
        return out

    @property
    def read_ratio(self) -> float:
        return self.bytes_read / self.input_bytes if self.input_bytes else float("nan")

    def __str__(self) -> str:
        return "\n".join(self.lines())


class RunResult:
    """The outcome of :func:`run`: values, scalars and the measured report.

    Attributes
    ----------
    value
        The single result (numpy array, path, scalar value), or a tuple of
        them in the order given to :func:`run`.
    values : list
        One result per item.
    scalars : dict
        Label → value of every scalar the pipeline computed.
    report : RunReport
    """

    def __init__(self, values: list, scalars: dict, report: RunReport) -> None:
        self.values = values
        self.value = values[0] if len(values) == 1 else tuple(values)
        self.scalars = scalars
        self.report = report

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.asarray(self.value)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"RunResult(value={type(self.value).__name__}, passes={self.report.passes})"


# --------------------------------------------------------------------------- scalars


def evaluate_scalars(env: dict, totals: dict, scalars: list[Scalar]) -> dict:
    """Values of every scalar computable from ``env`` and the new reduction ``totals``.

    ``env`` and ``totals`` are keyed by ``Scalar.uid``; returns a new ``env``.
    """
    env = dict(env)
    # tables are set by their table pass, never computed here
    pending = [s for s in scalars if s.uid not in env and not isinstance(s, Tables)]
    changed = True
    while changed:
        changed = False
        for s in list(pending):
            if isinstance(s, Reduction):
                if s.uid not in totals or any(p.uid not in env for p in s.params):
                    continue
                v = s.fn(totals[s.uid], *(env[p.uid] for p in s.params))
            else:
                if any(d.uid not in env for d in s.deps):
                    continue
                v = s.fn(*(env[d.uid] for d in s.deps))
            env[s.uid] = v
            pending.remove(s)
            changed = True
    return env


def _items(items: tuple) -> list[Any]:
    out = []
    for x in items:
        if isinstance(x, Stream):
            x = Target(x, None, {})
        if not isinstance(x, (Target, Scalar)):
            from dask_sweep.errors import SweepConfigError

            raise SweepConfigError(
                f"Expected dsl targets (stream.to(...)), streams or scalars. "
                f"Got {type(x).__name__}."
            )
        out.append(x)
    return out


def _open_sinks(compiled: Compiled) -> dict:
    sinks = {}
    for pp in compiled.passes:
        if isinstance(pp, AlgoPass):
            continue
        for (kind, o), out in zip(pp.outputs, pp.plan.outputs):
            if kind == "target" and o.kind == "path" and id(o) not in sinks:
                sinks[id(o)] = open_sink(o, out.chunks[pp.plan.axis][0])
    return sinks


def _compile_and_open(items: list, settings: dict) -> tuple[Compiled, dict]:
    # Plan and check every pass first: nothing is read or created on disk before.
    compiled = compile_pipeline(items, **settings)
    sinks = _open_sinks(compiled)
    if sinks:
        compiled = compile_pipeline(items, sinks=sinks, **settings)
    return compiled, sinks


# --------------------------------------------------------------------------- local runs


def _shrink(plan: Plan, t: int) -> Plan | None:
    """The plan with the steps after ``t`` cut at half their thickness (None: at minimum)."""
    done = plan.steps[t]
    planes = done - (plan.steps[t - 1] if t else 0)
    if planes <= 1 or t + 1 >= len(plan.steps):
        return None
    half = planes // 2
    rest = [*range(done + half, plan.extent, half), plan.extent]
    return replace(plan, steps=(*plan.steps[: t + 1], *rest))


def run(*items: Any, **settings: Any) -> RunResult:
    """Run targets (and scalars) of a pipeline locally, fused into as few passes as possible.

    Parameters
    ----------
    *items
        :class:`Target` (``stream.to(...)``), :class:`Stream` (to numpy) or
        :class:`Scalar` objects.
    **settings
        ``memory_limit``, ``threads``, ``axis``, ``target_slab_bytes``;
        ``replan_margin`` (default 0.5) and ``replan_slack`` (bytes, default
        32 MiB): two steps in a row whose measured memory exceeds both
        ``projected × (1 + margin) + slack`` and the budget make the remaining
        steps thinner.

    Returns
    -------
    RunResult

    Raises
    ------
    PlanError, BudgetError
        Before any I/O, when the pipeline cannot be planned within the budget.
    """
    its = _items(items)
    t_start = time.perf_counter()
    compiled, sinks = _compile_and_open(its, settings)
    s = compiled.settings
    margin = float(compiled.options.get("replan_margin", 0.5))
    slack = int(compiled.options.get("replan_slack", 32 << 20))
    if s.tune_malloc:
        tune_allocator()
    axis = compiled.axis
    results: dict[int, Any] = {}
    for x in its:
        if isinstance(x, Target) and x.kind == "numpy":
            results[id(x)] = np.empty(x.stream.shape, dtype=x.stream.dtype)
    report = RunReport(budget=s.memory_limit, passes=len(compiled.passes))
    env = evaluate_scalars({}, {}, compiled.scalars)
    sampler = _Sampler()
    report.rss_start = sampler.peak
    if tracemalloc.is_tracing():
        report.traced_start = tracemalloc.get_traced_memory()[0]
    bound: list[Plan] = []  # the passes' bound plans, whose readers are closed at the end
    try:
        for pp in compiled.passes:
            if isinstance(pp, AlgoPass):
                env = _run_algo(pp, env, compiled, report, sampler)
            else:
                env = _run_pass(
                    pp, env, compiled, results, report, sampler, margin, slack, axis, bound
                )
    except BaseException:
        # the slabs written so far are synced and recorded (the output stays .partial)
        for w in sinks.values():
            with contextlib.suppress(Exception):
                w.sink.sync()
        raise
    finally:
        sampler.stop()
        for plan in bound:  # readers computing ahead stop (a pass may have failed)
            for st in plan.stages:
                close = getattr(getattr(st, "reader", None), "close", None)
                if close is not None:
                    close()
        _cleanup_tables(env, compiled)
    values = []
    for x in its:
        if isinstance(x, Scalar):
            values.append(env[x.uid])
        elif x.kind == "numpy":
            values.append(results[id(x)])
        elif x.kind == "path":
            values.append(sinks[id(x)].sink.finalize())
        else:
            values.append(x.target)
    report.seconds = time.perf_counter() - t_start
    named = {
        sc.label: env[sc.uid]
        for sc in compiled.scalars
        if sc.uid in env and not isinstance(sc, Constant)
    }
    return RunResult(values, named, report)


def _cleanup_tables(env: dict, compiled: Compiled) -> None:
    """Remove the run's spilled tables and stored inputs (the run is over, or failed)."""
    from dask_sweep.multipass import spill as _spill

    for v in env.values():
        if isinstance(v, _TableValue):
            v.cleanup()
    for pp in compiled.passes:
        if isinstance(pp, AlgoPass) and pp.algo.store is not None:
            _spill.remove_tree(pp.algo.store.path)


def _run_algo(
    ap: AlgoPass,
    env: dict,
    compiled: Compiled,
    report: RunReport,
    sampler: _Sampler,
) -> dict:
    """Run a table pass, one report step per slab (in the order the slabs finish).

    A slab's ``rss`` is the resident peak since the previous slab finished (the
    slabs in flight overlap, so it is the pass's memory at that time); its
    projection is the pass's, which counts every slab in flight.
    """
    plan = ap.plan
    ev = ap.algo.prepared.slabs_in
    projected_reads = [ev.read_bytes(a, b) for a, b in plan.slabs]
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    sampler.mark()
    clock = [time.perf_counter()]
    read = 0

    def on_slab(s: int, nbytes: int) -> None:
        nonlocal read
        now = time.perf_counter()
        rss = max(0, sampler.mark() - report.rss_start - report.result_bytes)
        traced = None
        if tracing:
            traced = tracemalloc.get_traced_memory()[1] - report.traced_start
            tracemalloc.reset_peak()
        report.record(
            StepRecord(
                ap.index, s, plan.slabs[s], now - clock[0], nbytes, ap.projected_peak, 0,
                rss, projected_reads[s], traced,
            )
        )
        clock[0] = now
        read += nbytes
        if nbytes != projected_reads[s]:
            report.notes.append(
                f"{ap.tables.label} slab {s}: read {format_bytes(nbytes)}, projected "
                f"{format_bytes(projected_reads[s])}"
            )

    value = run_tables(ap.algo, env, compiled.settings, on_slab)
    report.input_bytes = max(report.input_bytes, ap.input_bytes)
    report.bytes_read += read
    env = dict(env)
    env[ap.tables.uid] = value
    return evaluate_scalars(env, {}, compiled.scalars)


def _run_pass(
    pp: PassPlan,
    env: dict,
    compiled: Compiled,
    results: dict,
    report: RunReport,
    sampler: _Sampler,
    margin: float,
    slack: int,
    axis: int,
    bound: list,
) -> dict:
    plan = bind_plan(pp.plan, env)  # the scalars of earlier passes bound into its stages
    bound.append(plan)  # the caller closes its readers, whatever happens
    peaks = list(pp.step_peaks)
    reads = list(pp.step_reads)
    acc: dict[int, np.ndarray] = {}
    report.input_bytes = max(report.input_bytes, pp.input_bytes)
    report.bytes_written += pp.output_bytes
    state = None
    t = 0
    strikes = 0
    last_replan: int | None = None
    gave_up = False
    while t < len(plan.steps):
        tr = Trace()
        t0 = time.perf_counter()
        sampler.mark()
        tracing = tracemalloc.is_tracing()
        if tracing:
            tracemalloc.reset_peak()
        read0 = _bytes_read(plan)
        state, emitted = run_step(plan, state, t, trace=tr)
        for k, ((kind, o), out) in enumerate(zip(pp.outputs, plan.outputs)):
            a, planes = emitted[k]
            if planes is None:
                continue
            if kind == "reduce":
                v = combine_partials(planes, axis, o.combine)
                acc[o.uid] = (
                    v
                    if o.uid not in acc
                    else (acc[o.uid] + v if o.combine == "sum" else np.minimum(acc[o.uid], v))
                )
            elif o.kind == "numpy":
                idx = (slice(None),) * axis + (slice(a, a + planes.shape[axis]),)
                results[id(o)][idx] = planes
                report.result_bytes += planes.nbytes
            else:
                out.sink.write_planes(a, planes)
        # the emitted planes must not live on into the next step's compute
        planes = emitted = None
        trim()  # the step's temporaries the heap kept (sweep.tune-malloc)
        dt = time.perf_counter() - t0
        read = _bytes_read(plan) - read0
        # Peak resident memory during the step above the run's start, less the pages
        # of numpy results filled so far (the caller's, held outside the budget).
        rss = max(0, sampler.mark() - report.rss_start - report.result_bytes)
        # numpy arrays are traced: with tracemalloc on, the exact peak of the step's
        # allocations (results were allocated before the start, so are not in it)
        traced = tracemalloc.get_traced_memory()[1] - report.traced_start if tracing else None
        prev = plan.steps[t - 1] if t else 0
        report.record(
            StepRecord(
                pp.index, t, (prev, plan.steps[t]), dt, read, peaks[t], tr.peak, rss, reads[t],
                traced,
            )
        )
        report.bytes_read += read
        if read != reads[t]:
            report.notes.append(
                f"pass {pp.index} step {t}: read {format_bytes(read)}, projected "
                f"{format_bytes(reads[t])}"
            )
        # Above the budget *and* above the projection by the margin: thinner steps cost
        # halo recomputation, so only a budget at risk is worth it, and only when the
        # projection was wrong (a right projection over budget cannot happen).
        over = rss > report.budget and rss > peaks[t] * (1 + margin) + slack
        # One step over the line may be a one-off (a JIT compile, a library loading its
        # caches); two in a row is how the pipeline behaves: shrink what is left.
        sustained = over and strikes >= 1
        strikes = strikes + 1 if over else 0
        if sustained and t + 1 < len(plan.steps) and not gave_up:
            new = _shrink(plan, t)
            if last_replan is not None and rss >= 0.9 * last_replan:
                # thinner steps did not lower the overshoot: it does not scale with the
                # step; stop making things slower
                gave_up = True
                report.replans.append(
                    f"pass {pp.index} step {t}: still {format_bytes(rss)} after thinner "
                    "steps; the overshoot does not scale with the step, re-planning stopped"
                )
            elif new is None:
                report.replans.append(
                    f"pass {pp.index} step {t}: measured {format_bytes(rss)} > projected "
                    f"{format_bytes(peaks[t])}; steps are already one grid row thick"
                )
                gave_up = True
            else:
                old_n = len(plan.steps) - t - 1
                plan = new
                # replayed dry: the projected peak of every remaining step
                trace = size_rings(plan)[1]
                new_peaks = list(trace.step_peaks)
                peaks = peaks[: t + 1] + new_peaks[t + 1 :]
                reads = reads[: t + 1] + step_reads(plan, trace)[t + 1 :]
                strikes = 0
                last_replan = rss
                report.replans.append(
                    f"pass {pp.index} step {t}: measured {format_bytes(rss)} > projected "
                    f"{format_bytes(peaks[t])} x {1 + margin:g} + {format_bytes(slack)}; the "
                    f"remaining {old_n} steps re-planned as {len(plan.steps) - t - 1} thinner "
                    "steps"
                )
        t += 1
    return evaluate_scalars(env, acc, compiled.scalars)


# --------------------------------------------------------------------------- dask graphs


def _advance_env(env: dict, reductions: list, scalars: list, axis: int, *blocks: Any) -> dict:
    totals = {}
    for r, bl in zip(reductions, blocks):
        planes = np.concatenate(list(bl), axis=axis)
        totals[r.uid] = combine_partials(planes, axis, r.combine)
    return evaluate_scalars(env, totals, scalars)


def _advance_tables(
    env: dict, uid: int, algo: Any, scalars: list, settings: Any, *_written: Any
) -> dict:
    """The table pass as one task: the env with the tables (and scalars made of them)."""
    env = dict(env)
    env[uid] = run_tables(algo, env, settings)
    return evaluate_scalars(env, {}, scalars)


def _get(env: dict, uid: int) -> Any:
    return env[uid]


def _finalize_sink(writer: SinkWriter, *_: Any) -> str:
    return writer.sink.finalize()


def to_dask(*items: Any, **settings: Any):
    """The pipeline as dask collections, one per item (see :meth:`Target.to_dask`).

    Every pass is emitted by :func:`dask_sweep.emit.graph.emit` (a chain of
    ``sweep-step`` tasks) with its plan bound to the scalars found so far (the
    *env*); between passes one task folds the reduction partials into the next
    env, and an algorithm's table pass is one task.  The tasks are written by
    :class:`dask_sweep.emit.pipeline.GraphBuilder`; this says which.
    """
    from dask_sweep.emit.pipeline import GraphBuilder

    its = _items(items)
    compiled, sinks = _compile_and_open(its, settings)
    axis = compiled.axis
    # deterministic: the same pipeline (and settings) gives the same keys, as dask's own do
    token = pipeline_token(its, compiled.settings)[:16]
    b = GraphBuilder()
    scalars = b.const(compiled.scalars)
    env = b.task(f"dsl-env-{token}-init", evaluate_scalars, b.const({}), b.const({}), scalars)
    out_of: dict[int, tuple[str, tuple]] = {}
    stored_by: dict[int, list] = {}
    for k, pp in enumerate(compiled.passes):
        if isinstance(pp, AlgoPass):
            # a stored input: the table pass waits for every block of its writing pass
            wrote = stored_by.get(id(pp.algo.store), [])
            env = b.task(
                f"dsl-env-{token}-tables{k}", _advance_tables, b.ref(env),
                b.const(pp.tables.uid), b.const(pp.algo), scalars,
                b.const(compiled.settings), *(b.ref(q) for q in wrote),
            )
            continue
        tok = f"{token}-p{k}"
        # output names unique per graph
        plan = replace(
            pp.plan,
            outputs=tuple(
                replace(o, name=f"dsl-{tok}-out{i}") for i, o in enumerate(pp.plan.outputs)
            ),
        )
        b.sweep(plan, pp.trace, tok, bind=(bind_plan, env))
        reds, parts = [], []
        for (kind, o), out in zip(pp.outputs, plan.outputs):
            keys = [(out.name, *idx) for idx in np.ndindex(*[len(c) for c in out.chunks])]
            if kind == "reduce":
                reds.append(o)
                parts.append(b.refs(keys))
            else:
                out_of[id(o)] = (out.name, out.chunks)
                if o.kind == "store":
                    stored_by[id(o.target)] = keys
        if reds:
            env = b.task(f"dsl-env-{tok}", _advance_env, b.ref(env), b.const(reds), scalars,
                         axis, *parts)
    results = []
    for i, x in enumerate(its):
        if isinstance(x, Scalar):
            results.append(b.delayed(b.task(f"dsl-scalar-{token}-{i}", _get, b.ref(env), x.uid)))
            continue
        name, chunks = out_of[id(x)]
        if x.kind == "numpy":
            results.append(b.array(name, chunks, x.stream.dtype))
            continue
        blocks = [b.ref((name, *idx)) for idx in np.ndindex(*[len(c) for c in chunks])]
        writer = sinks.get(id(x))
        fn, what = (_finalize_sink, writer) if writer is not None else (_target_value, x.target)
        results.append(b.delayed(b.task(f"dsl-finalize-{token}-{i}", fn, b.const(what),
                                        *blocks)))
    return results[0] if len(results) == 1 else tuple(results)


def _target_value(target: Any, *_: Any) -> Any:
    return target
