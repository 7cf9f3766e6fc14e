"""Compile a DSL pipeline into sweep plans: passes, fusion, windows, slabs, budget.

1. **Pass schedule.**  A reduction ends a pass: its scalar is known only once the
   whole volume has been swept.  A stream's *level* is the number of passes
   that must finish before it can be computed (the latest scalar it uses); a
   reduction over a level-``p`` stream runs in pass ``p``.  Everything of one
   level, outputs and reductions alike, is fused into **one** sweep (one
   :class:`~dask_sweep.plan.ir.Plan`)::

       pass 0:  source ─► gaussian ─┬─► histogram partials ──► otsu ─┐ (scalar)
       pass 1:  source ─► gaussian ─┴─► > t ─► astype ─► sink  ◄─────┘

   Each pass reads the input once: bytes read = passes × input bytes.

2. **Lowering.**  Streams become stages: sources → ``Source`` (whole chunk
   rows), windowed filters → ``Kernel`` (a block-invariant kernel on any slab
   padded by its footprint radius), pointwise and zip → :class:`Pointwise`,
   reductions → :class:`Reduce`.  A stream used twice is one stage with two
   consumers (a tee); its ring holds what the slower consumer still needs.

3. **Windows.**  Composed along every path (the planes of the source each
   stage reaches ahead and behind); a zip of branches with different reaches
   is aligned by the pull executor, buffering in the shared rings.

4. **Slabs and budget.**  :func:`dask_sweep.passes.slabs.choose_steps` replays
   each pass dry and picks step boundaries whose projected peak (rings + the
   slab being computed + kernel temporaries) fits ``memory_limit``; a pass that
   does not fit even at one grid row per step is refused *before any I/O*.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dask_sweep.config import SweepSettings
from dask_sweep.dsl.core import Reduction, Scalar, Stream, Target
from dask_sweep.dsl.stages import Pointwise, Reduce, partial_shape
from dask_sweep.errors import BudgetError, PlanError
from dask_sweep.passes.slabs import choose_steps
from dask_sweep.plan.ir import Kernel, Output, Plan, Source, Stage
from dask_sweep.runtime.executor import Trace, run_step
from dask_sweep.utils import format_bytes

DSL_SETTINGS = ("replan_margin", "replan_slack")


@dataclass
class PassPlan:
    """One sweep of a compiled pipeline."""

    index: int
    plan: Plan
    trace: Trace
    step_peaks: list[int]
    outputs: list[tuple[str, Any]]  # per plan output: ("target", Target) | ("reduce", Reduction)
    reach: list[tuple[int, int]]  # per stage: planes of the output reached behind/ahead
    lead: list[tuple[int, int]]  # per stage: planes of the sources it spans behind/ahead
    input_bytes: int = 0
    output_bytes: int = 0

    def bound(self, env: dict) -> Plan:
        """The plan with the scalars of earlier passes bound into its stages."""
        return bind_plan(self.plan, env)


def bind_plan(plan: Plan, env: dict) -> Plan:
    """``plan`` with scalar values (``{Scalar.uid: value}``) bound into its stages."""
    stages = tuple(st.bind(env) if hasattr(st, "bind") else st for st in plan.stages)
    return replace(plan, stages=stages)


@dataclass
class Compiled:
    """A compiled pipeline: its passes, settings and the scalars each pass makes."""

    items: list[Any]
    settings: SweepSettings
    axis: int
    passes: list[PassPlan]
    scalars: list[Scalar] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def explain(self):
        from dask_sweep.dsl.explanation import Explanation

        return Explanation(self)


def resolve_settings(settings: dict) -> tuple[SweepSettings, dict]:
    """Split DSL-only options from the ``sweep.*`` settings and resolve those."""
    extra = {k: settings.pop(k) for k in list(settings) if k in DSL_SETTINGS}
    return SweepSettings.resolve(**settings), extra


def _walk_streams(roots: list[Stream]) -> list[Stream]:
    """All streams the roots depend on (through inputs and scalars), topologically."""
    order: list[Stream] = []
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, done = stack.pop()
        if done:
            if isinstance(node, Stream):
                order.append(node)
            continue
        key = id(node)
        if key in seen:
            continue
        seen.add(key)
        stack.append((node, True))
        for d in _deps(node):
            if id(d) not in seen:
                stack.append((d, False))
    return order


def _deps(node: Any) -> list[Any]:
    if isinstance(node, Stream):
        return [*node.inputs, *node.scalars]
    if isinstance(node, Reduction):
        return [node.stream, *node.params]
    if isinstance(node, Scalar):
        return list(node.deps)
    return []


def _all_scalars(roots: list[Any]) -> list[Scalar]:
    out: list[Scalar] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, Scalar):
            out.append(n)
        stack.extend(_deps(n))
    return out


def compile_pipeline(items: list[Any], *, sinks: dict | None = None, **settings: Any) -> Compiled:
    """Plan every pass of a pipeline and check it against the budget (no I/O).

    Parameters
    ----------
    items
        :class:`Target` and :class:`Scalar` objects to produce.
    sinks
        ``{id(target): writer}`` for opened sinks (else their layout is guessed).
    **settings
        ``memory_limit=``, ``threads=``, ``axis=``, ``target_slab_bytes=``...

    Raises
    ------
    PlanError, BudgetError
    """
    s, extra = resolve_settings(dict(settings))
    axis = 0 if s.axis is None else s.axis
    targets = [t for t in items if isinstance(t, Target)]
    roots = [t.stream for t in targets] + [x for x in items if isinstance(x, Scalar)]
    scalars = _all_scalars(roots)
    reductions = [x for x in scalars if isinstance(x, Reduction)]
    streams = _walk_streams(roots)
    if not streams:
        raise PlanError("dask_sweep.dsl: nothing to compute (no stream behind the outputs).")
    shape = streams[0].shape
    for st in streams:
        if st.shape[axis] != shape[axis] if axis < len(st.shape) else True:
            raise PlanError(
                f"dask_sweep.dsl: cannot sweep stage {st.label!r} of shape {st.shape} together "
                f"with streams of shape {shape} along axis {axis}: every stream of a pipeline "
                "must have the same extent along the sweep axis."
            )
    for t in targets:
        if t.kind == "path" and axis != 0:
            raise PlanError(
                f"dask_sweep.dsl: file outputs are written along axis 0; this sweep runs along "
                f"axis {axis}. Use axis=0 or write to a numpy/zarr array."
            )
    npasses = 1 + max(
        [t.stream.level for t in targets]
        + [r.pass_index for r in reductions]
        + [x.ready_pass - 1 for x in items if isinstance(x, Scalar)]
        + [0]
    )
    passes = []
    for p in range(npasses):
        outs: list[tuple[str, Any]] = [("target", t) for t in targets if t.stream.level == p]
        outs += [("reduce", r) for r in reductions if r.pass_index == p]
        if not outs:
            continue
        passes.append(_lower_pass(p, outs, axis, s, sinks or {}))
    return Compiled(
        items=list(items), settings=s, axis=axis, passes=passes, scalars=scalars, options=extra
    )


def _grain(in_plane: int, n: int, s: SweepSettings, row_step: int) -> int:
    """Planes per output chunk: the finest step boundary the planner may use."""
    # An eighth of a target slab: steps group several grid rows, which leaves the
    # planner (and run-time re-planning) room to make them thinner.
    cap = min(s.target_slab_bytes // 8, s.memory_limit // 32)
    g = max(1, min(n, cap // max(1, in_plane)))
    if row_step > 1:
        g = max(row_step, g // row_step * row_step)
    return g


def _chunks_along(n: int, g: int) -> tuple[int, ...]:
    c = [g] * (n // g)
    if n % g:
        c.append(n % g)
    return tuple(c) or (0,)


def _expected_row_step(t: Target, grain_guess: int) -> int:
    ch = t.options.get("chunks")
    sh = t.options.get("shards")
    if sh is not None:
        return int(sh[0])
    if ch is not None:
        return int(ch[0] if np.ndim(ch) else ch)
    if str(t.target).rstrip("/").lower().endswith(".zarr"):
        return grain_guess
    return 1


def _lower_pass(
    p: int, outs: list[tuple[str, Any]], axis: int, s: SweepSettings, sinks: dict
) -> PassPlan:
    roots: list[Stream] = [o.stream for _, o in outs]
    order = _walk_streams(roots)
    order = [x for x in order if x.level <= p]
    index: dict[int, int] = {}
    stages: list[Stage] = []
    for x in order:
        ins = tuple(index[id(i)] for i in x.inputs)
        if x.kind == "source":
            spec = x.source
            rb = spec.row_bounds(axis)
            plane = int(np.prod([n for d, n in enumerate(x.shape) if d != axis], dtype=np.int64))
            plane *= x.dtype.itemsize
            st: Stage = Source(
                label=f"{x.label} ({spec.desc})",
                shape=x.shape,
                dtype=x.dtype,
                row_bounds=rb,
                reader=spec.reader(axis),
                external=False,
                bytes_per_row=tuple((b - a) * plane for a, b in zip(rb[:-1], rb[1:])),
            )
        elif x.kind == "kernel":
            st = Kernel(
                label=x.label,
                shape=x.shape,
                dtype=x.dtype,
                inputs=ins,
                fn=x.fn,
                depth=x.depth,
                boundary=("none",) * x.ndim,
                temps=x.temps,
                sweep_axis=axis,
                passes=_passes(x.fn, x.ndim),
            )
        else:
            st = Pointwise(
                label=x.label, shape=x.shape, dtype=x.dtype, inputs=ins, fn=x.fn, scalars=x.scalars
            )
        index[id(x)] = len(stages)
        stages.append(st)
    n = roots[0].shape[axis]
    in_plane = sum(st.plane_bytes(axis) for st in stages if isinstance(st, Source))
    row_steps = []
    for kind, o in outs:
        if kind == "target" and o.kind == "path":
            w = sinks.get(id(o))
            row_steps.append(
                w.row_step if w is not None else _expected_row_step(o, _grain(in_plane, n, s, 1))
            )
    rs = max(row_steps, default=1)
    g = _grain(in_plane, n, s, rs)
    outputs: list[Output] = []
    token = f"p{p}"
    for k, (kind, o) in enumerate(outs):
        name = f"dsl-{token}-out{k}"
        if kind == "reduce":
            ndim = len(o.stream.shape)
            pshape = partial_shape(ndim, axis, n, o.k)
            st = Reduce(
                label=o.label,
                shape=pshape,
                dtype=o.pdtype,
                inputs=(index[id(o.stream)],),
                partial=o.partial,
                k=o.k,
                identity=o.identity,
                combine=o.combine,
                scalars=o.params,
                sweep_axis=axis,
            )
            stages.append(st)
            chunks = tuple(
                _chunks_along(n, g) if d == axis else (c,) for d, c in enumerate(pshape)
            )
            outputs.append(Output(stage=len(stages) - 1, name=name, chunks=chunks))
            continue
        j = index[id(o.stream)]
        chunks = tuple(
            _chunks_along(n, g) if d == axis else (c,) for d, c in enumerate(o.stream.shape)
        )
        sink, align = None, None
        if o.kind == "path":
            step = sinks[id(o)].row_step if id(o) in sinks else rs
            align = tuple(sorted({*range(0, n, step), n}))
            sink = sinks.get(id(o), _PendingSink(o.target))
        elif o.kind in ("array", "store"):
            sink = ArrayWriter(o.target, axis)
            tch = getattr(o.target, "shards", None) or getattr(o.target, "chunks", None)
            if o.kind == "store" and tch:
                align = tuple(sorted({*range(0, n, int(tch[axis])), n}))
        outputs.append(Output(stage=j, name=name, chunks=chunks, sink=sink, align=align))
    plan = Plan(
        stages=tuple(stages),
        outputs=tuple(outputs),
        axis=axis,
        budget=s.memory_limit,
        threads=s.threads,
        notes=(f"pass {p}",),
        info={"tune_malloc": s.tune_malloc},
    )
    try:
        plan, trace = choose_steps(plan, s.target_slab_bytes)
    except BudgetError as e:
        reach = _reach(plan)
        lead = _lead(plan)
        j = next((i for i, st in enumerate(plan.stages) if st.label == e.stage), 0)
        widest = max(range(len(plan.stages)), key=lambda i: sum(lead[i]))
        raise BudgetError(
            f"dask_sweep.dsl: pass {p} needs at least {format_bytes(e.projected)} (peak at "
            f"stage {e.stage!r}, which spans {sum(reach[j]) + 1} planes of its output per "
            f"step at the thinnest slab of {g} planes), more than memory_limit="
            f"{format_bytes(e.budget)}. Raise memory_limit, or narrow the widest window "
            f"(stage {plan.stages[widest].label!r} reaches -{lead[widest][0]}/"
            f"+{lead[widest][1]} planes of the source: a smaller sigma/size), or sweep a "
            "different axis (axis=...).",
            stage=e.stage,
            projected=e.projected,
            budget=e.budget,
        ) from None
    peaks = step_peaks(plan)
    out_bytes = sum(
        int(np.prod(plan.stages[o.stage].shape, dtype=np.int64))
        * np.dtype(plan.stages[o.stage].dtype).itemsize
        for o in plan.outputs
    )
    in_bytes = sum(sum(st.bytes_per_row) for st in plan.stages if isinstance(st, Source))
    return PassPlan(
        index=p,
        plan=plan,
        trace=trace,
        step_peaks=peaks,
        outputs=outs,
        reach=_reach(plan),
        lead=_lead(plan),
        input_bytes=in_bytes,
        output_bytes=out_bytes,
    )


def step_peaks(plan: Plan, start: int = 0, state: Any = None) -> list[int]:
    """Projected peak bytes of every step from ``start`` (a dry replay)."""
    peaks = []
    if state is None and start:
        for t in range(start):
            state, _ = run_step(plan, state, t, dry=True)
    for t in range(start, len(plan.steps)):
        tr = Trace()
        state, _ = run_step(plan, state, t, dry=True, trace=tr)
        peaks.append(tr.peak)
    return peaks


def _reach(plan: Plan) -> list[tuple[int, int]]:
    """Per stage, planes beyond an output step it must produce (behind, ahead)."""
    reach = [(-1, -1)] * len(plan.stages)
    for o in plan.outputs:
        reach[o.stage] = (max(reach[o.stage][0], 0), max(reach[o.stage][1], 0))
    for j in reversed(range(len(plan.stages))):
        st = plan.stages[j]
        if reach[j][0] < 0:
            continue
        for pos, i in enumerate(st.inputs):
            lo, hi = st.window(pos)
            reach[i] = (max(reach[i][0], reach[j][0] + lo), max(reach[i][1], reach[j][1] + hi))
    return [(max(0, a), max(0, b)) for a, b in reach]


def _lead(plan: Plan) -> list[tuple[int, int]]:
    """Per stage, the source planes one of its planes depends on (behind, ahead)."""
    lead: list[tuple[int, int]] = []
    for st in plan.stages:
        lo = hi = 0
        for pos, i in enumerate(st.inputs):
            w = st.window(pos)
            lo = max(lo, lead[i][0] + w[0])
            hi = max(hi, lead[i][1] + w[1])
        lead.append((lo, hi))
    return lead


class ArrayWriter:
    """Write planes straight into an array the user gave (numpy or zarr)."""

    def __init__(self, target: Any, axis: int) -> None:
        self.target = target
        self.axis = axis

    def write_planes(self, a: int, planes: np.ndarray) -> None:
        idx = (slice(None),) * self.axis + (slice(a, a + planes.shape[self.axis]),)
        self.target[idx] = planes


class _PendingSink:
    """Stands for a file sink not created yet (``explain`` creates nothing)."""

    def __init__(self, path: Any) -> None:
        self.path = path

    def write_planes(self, a: int, planes: np.ndarray) -> None:  # pragma: no cover
        raise RuntimeError("dask_sweep.dsl: the output sink was not opened")


class SinkWriter:
    """A :class:`dask_sweep.io.Sink` fed by the sweep: slabs on its chunk grid."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.row_step = sink.row_step

    def write_planes(self, a: int, planes: np.ndarray) -> None:
        self.sink.write_slab(a, planes)


def open_sink(t: Target, g: int) -> SinkWriter:
    """Create the file sink of a path target (checks the path; writes ``.partial``)."""
    from dask_sweep.io import open_sink as io_open_sink

    opts = dict(t.options)
    path = str(t.target)
    if path.rstrip("/").lower().endswith(".zarr") and "chunks" not in opts:
        # full planes, a few MiB per chunk: slabs can be cut at any chunk
        opts["chunks"] = (g, *t.stream.shape[1:])
    sink = io_open_sink(path, t.stream.shape, t.stream.dtype, **opts)
    return SinkWriter(sink)


__all__ = ["Compiled", "PassPlan", "compile_pipeline", "step_peaks"]


def _passes(fn, ndim: int):
    """scipy's separable 1-D passes for a plain ``partial(scipy_filter, **kw)``, else None."""
    import functools

    from dask_sweep.patterns.kernels import separable_passes

    if not isinstance(fn, functools.partial) or fn.args or "output" in fn.keywords:
        return None
    return separable_passes(fn.func, dict(fn.keywords), ndim)
