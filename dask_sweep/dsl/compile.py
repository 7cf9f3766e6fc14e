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
   rows), windowed filters → :class:`Kernel` (a block-invariant kernel on any
   slab padded by its footprint radius, computed in in-plane pieces), pointwise
   and zip → :class:`Pointwise`, reductions → :class:`Reduce`.  A stream used
   twice is one stage with two consumers (a tee); its ring holds what the
   slower consumer still needs.

3. **Windows.**  Composed along every path (the planes of the source each
   stage reaches ahead and behind); a zip of branches with different reaches
   is aligned by the pull executor, buffering in the shared rings.

4. **Slabs and budget.**  The plugin's sizer
   (:func:`~dask_sweep.passes.slabs.choose_steps`) replays each pass dry and
   picks the thickest steps whose projected peak (rings + the slab being
   computed + kernel temporaries, or the step's writes + the sink's encoding
   temporaries; plus ``sweep.runtime-overhead``) fits ``memory_limit``; a pass
   that does not fit even at one grid row per step is refused *before any I/O*.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dask_sweep.config import SweepSettings
from dask_sweep.dsl.algorithms import PREPARED
from dask_sweep.dsl.core import Reduction, Scalar, Stream, Tables, Target, _engine
from dask_sweep.dsl.lower import deps, lower_streams, walk_streams
from dask_sweep.errors import BudgetError, PlanError
from dask_sweep.integration.optimize import active_settings
from dask_sweep.io.zarr_io import write_temporaries, write_whole_chunks
from dask_sweep.passes.slabs import choose_steps
from dask_sweep.plan.ir import Output, Plan, Reduce, Source, partial_shape
from dask_sweep.runtime.executor import Trace
from dask_sweep.utils import format_bytes

DSL_SETTINGS = ("replan_margin", "replan_slack")


@dataclass
class PassPlan:
    """One sweep of a compiled pipeline."""

    index: int
    plan: Plan
    trace: Trace
    step_peaks: list[int]
    step_reads: list[int]
    outputs: list[tuple[str, Any]]  # per plan output: ("target", Target) | ("reduce", Reduction)
    reach: list[tuple[int, int]]  # per stage: planes of the output reached behind/ahead
    lead: list[tuple[int, int]]  # per stage: planes of the sources it spans behind/ahead
    input_bytes: int = 0
    output_bytes: int = 0


def bind_plan(plan: Plan, env: dict) -> Plan:
    """``plan`` with scalar values (``{Scalar.uid: value}``) bound into its stages.

    Sources whose reader needs values of earlier passes (an algorithm's output,
    read through its tables) get a bound reader.
    """
    stages = []
    for st in plan.stages:
        if hasattr(st, "bind"):
            st = st.bind(env)
        elif isinstance(st, Source) and hasattr(st.reader, "bind"):
            st = replace(st, reader=st.reader.bind(env))
        stages.append(st)
    return replace(plan, stages=tuple(stages))


@dataclass
class AlgoPass:
    """The table pass of a multi-pass algorithm (:mod:`dask_sweep.dsl.algorithms`).

    It sweeps the algorithm's own slabs of its input stream (computed per slab)
    and produces the tables the algorithm's output is read through.
    """

    index: int
    tables: Any  # dask_sweep.dsl.algorithms.Tables
    algo: Any  # its algorithm, prepared by this compile
    plan: Any  # dask_sweep.plan.tables.SweepPlan
    input_bytes: int
    read_bytes: int

    @property
    def projected_peak(self) -> int:
        """The table pass's peak, with the tables of earlier algorithms in memory."""
        return self.plan.projected_peak + self.algo.resident


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
        """The pass schedule, stages, windows, rings, slabs, memory and I/O, as text."""
        return _engine("explain_compiled")(self)


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
        stack.extend(deps(n))
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
    # DSL-only options apart; the rest: given > enable(...) > sweep.* config
    extra = {k: settings.pop(k) for k in list(settings) if k in DSL_SETTINGS}
    s = active_settings(**settings)
    axis = 0 if s.axis is None else s.axis
    targets = [t for t in items if isinstance(t, Target)]
    roots = [t.stream for t in targets] + [x for x in items if isinstance(x, Scalar)]
    scalars = _all_scalars(roots)
    reductions = [x for x in scalars if isinstance(x, Reduction)]
    tables = [x for x in scalars if isinstance(x, Tables)]
    streams = walk_streams(roots, cross=True)
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
        + [t.pass_index for t in tables]
        + [0]
    )
    # Algorithms first, in level order: their slabs are the rows of their output
    # streams, which later passes read.  Slabs sized for the whole budget may leave the
    # reading pass too little room (it holds a slab of output next to its own stages):
    # then the slabs are sized for 3/4, 9/16... of the budget, until all fit; if none
    # does, the same again with every table spilled (the tables kept in memory stay
    # next to the reading pass, whose slabs may already be as thin as they go).
    first: BudgetError | None = None
    attempts = [(keep, 0.75**k) for keep in (True, False) for k in range(16)] if tables \
        else [(True, 1.0)]
    for keep, share in attempts:
        algos: dict[int, Any] = {}  # this compile's prepared copies, by Tables.uid
        token = PREPARED.set(algos)
        try:
            stores: dict = {}
            for t in sorted(tables, key=lambda t: t.pass_index):
                # the tables of algorithms before this one stay in memory meanwhile
                resident = sum(a.kept_bytes() for a in algos.values())
                algos[t.uid] = t.algo.prepare(axis, s, share, stores, resident, keep)
            # inputs stored once are written by the sweep of their level
            stored = [Target(x, store, {}) for x, store in _stored_inputs(tables, algos)]
            passes = _lower_all(
                npasses, targets + stored, reductions, tables, algos, axis, s, sinks or {}
            )
            break
        except BudgetError as e:
            first = first or e
        finally:
            PREPARED.reset(token)
    else:
        assert first is not None
        raise first from None
    # the pipeline's input: its own sources (an algorithm's output re-reads those)
    total_in = sum(
        x.nbytes for x in streams if x.kind == "source" and not hasattr(x.source, "algo")
    )
    for k, pp in enumerate(passes):
        pp.index = k  # passes in run order (a level may have a sweep and table passes)
        pp.input_bytes = total_in
    return Compiled(
        items=list(items), settings=s, axis=axis, passes=passes, scalars=scalars, options=extra
    )


def _stored_inputs(tables: list, algos: dict) -> list[tuple[Stream, Any]]:
    """``(stream, store)`` of every input stored once (a store shared by two algorithms once)."""
    seen: dict[int, tuple[Stream, Any]] = {}
    for t in tables:
        store = algos[t.uid].store
        if store is not None:
            seen.setdefault(id(store), (t.stream, store))
    return list(seen.values())


def _lower_all(npasses, targets, reductions, tables, algos, axis, s, sinks) -> list[Any]:
    passes: list[Any] = []
    for p in range(npasses):
        outs: list[tuple[str, Any]] = [("target", t) for t in targets if t.stream.level == p]
        outs += [("reduce", r) for r in reductions if r.pass_index == p]
        if outs:
            # tables of the algorithms before this level stay in memory through it
            kept = sum(algos[t.uid].kept_bytes() for t in tables if t.pass_index < p)
            passes.append(_lower_pass(p, outs, axis, s, sinks, kept))
        for t in tables:
            if t.pass_index == p:
                algo = algos[t.uid]
                prep = algo.prepared
                ev = prep.slabs_in
                passes.append(
                    AlgoPass(
                        index=p,
                        tables=t,
                        algo=algo,
                        plan=prep.plan,
                        input_bytes=sum(
                            sum(st.bytes_per_row) for st in ev.stages if isinstance(st, Source)
                        ),
                        read_bytes=sum(ev.read_bytes(a, b) for a, b in prep.plan.slabs),
                    )
                )
    return passes


def _grain(in_plane: int, n: int, s: SweepSettings, row_step: int) -> int:
    """Planes per output chunk: the finest step boundary the planner may use."""
    # An eighth of a target slab, and a small fraction of the budget: steps group
    # several grid rows, which leaves the planner (and run-time re-planning) room to
    # fit the budget closely and to make steps thinner.
    cap = min(s.target_slab_bytes // 8, s.memory_limit // 128)
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
    p: int, outs: list[tuple[str, Any]], axis: int, s: SweepSettings, sinks: dict, kept: int = 0
) -> PassPlan:
    roots: list[Stream] = [o.stream for _, o in outs]
    order = walk_streams(roots)
    order = [x for x in order if x.level <= p]
    stages, index = lower_streams(order, axis, s)
    # what reading an algorithm's output holds beyond the planes (its tables, its
    # per-slab work): resident next to the pass, counted like the runtime overhead
    extra = kept + sum(
        x.source.held_bytes()
        for x in order
        if x.kind == "source" and hasattr(x.source, "held_bytes")
    )
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
        plane = int(
            np.prod([c for d, c in enumerate(o.stream.shape) if d != axis], dtype=np.int64)
        ) * o.stream.dtype.itemsize
        if o.kind == "path":
            step = sinks[id(o)].row_step if id(o) in sinks else rs
            align = tuple(sorted({*range(0, n, step), n}))
            piece = piece_rows(plane, step, s.memory_limit)
            opened = sinks.get(id(o))
            # a writer of its own per plan: the opened sink's writer is not changed
            sink = _PendingSink(o.target, piece) if opened is None else opened.cut(piece)
        elif o.kind in ("array", "store"):
            tch = getattr(o.target, "shards", None) or getattr(o.target, "chunks", None)
            piece = None
            if o.kind == "store" and tch:
                align = tuple(sorted({*range(0, n, int(tch[axis])), n}))
                piece = piece_rows(plane, int(tch[axis]), s.memory_limit)
            sink = ArrayWriter(o.target, axis, piece)
        outputs.append(Output(stage=j, name=name, chunks=chunks, sink=sink, align=align))
    plan = Plan(
        stages=tuple(stages),
        outputs=tuple(outputs),
        axis=axis,
        budget=s.memory_limit,
        threads=s.threads,
        notes=(f"pass {p}",),
        info={"tune_malloc": s.tune_malloc, "runtime_overhead": s.runtime_overhead + extra},
    )
    try:
        plan, trace = choose_steps(plan, s.target_slab_bytes)  # the thickest steps that fit
    except BudgetError as e:
        reach = plan.reach()
        lead = plan.lead()
        j = next((i for i, st in enumerate(plan.stages) if st.label == e.stage), 0)
        widest = max(range(len(plan.stages)), key=lambda i: sum(lead[i]))
        raise BudgetError(
            f"dask_sweep.dsl: pass {p} needs at least {format_bytes(e.projected)} (peak at "
            f"stage {e.stage!r}, which spans {sum(reach[j]) + 1} planes of its output per "
            f"step at the thinnest slab of {g} planes; runtime overhead "
            f"{format_bytes(s.runtime_overhead)} included"
            + (
                f"; reading multi-pass algorithm outputs holds {format_bytes(extra)} of "
                "their tables and slab work"
                if extra
                else ""
            )
            + f"), more than memory_limit={format_bytes(e.budget)}. Raise memory_limit, or "
            f"narrow the widest window (stage {plan.stages[widest].label!r} reaches "
            f"-{lead[widest][0]}/+{lead[widest][1]} planes of the source: a smaller "
            "sigma/size), or sweep a different axis (axis=...).",
            stage=e.stage,
            projected=e.projected,
            budget=e.budget,
        ) from None
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
        step_peaks=list(trace.step_peaks),
        step_reads=step_reads(plan, trace),
        outputs=outs,
        reach=plan.reach(),
        lead=plan.lead(),
        input_bytes=in_bytes,
        output_bytes=out_bytes,
    )


def step_reads(plan: Plan, trace: Trace) -> list[int]:
    """Bytes each step of ``plan`` reads, from its dry-run ``trace``."""
    return [
        sum(plan.stages[j].bytes_per_row[r] for j, r in rows if plan.stages[j].bytes_per_row)
        for rows in trace.rows_read
    ]


WRITE_TEMPS = 5.0
"""Bytes an encoded write holds beyond its data, as a multiple of the piece written.

Measured with tracemalloc: a zarr v3 write of one zstd chunk holds about five
copies of it (the chunk array, buffers, the compressed bytes).  Writes are cut
into pieces of :func:`piece_rows` planes so this stays a small, known share of
the budget."""


def piece_rows(plane_bytes: int, step: int, budget: int) -> int:
    """Planes per write call: whole multiples of ``step``, about ``budget / 64`` bytes.

    >>> piece_rows(1024, 4, 64 * 1024 * 64)
    64
    """
    k = max(1, budget // 64 // max(1, plane_bytes * step))
    return k * max(1, step)


class ArrayWriter:
    """Write planes straight into an array the user gave (numpy or zarr).

    A numpy array is filled in one assignment; a zarr array in pieces of
    ``piece`` planes (its chunk rows), so the encoding temporaries stay small.
    """

    def __init__(self, target: Any, axis: int, piece: int | None = None) -> None:
        self.target = target
        self.axis = axis
        self.piece = piece  # None: one assignment, no temporaries (numpy)
        self.write_temps = 0.0 if piece is None else WRITE_TEMPS

    def temps_of(self, nbytes: int) -> int:
        """Bytes held beyond the planes while one call writes ``nbytes`` of them: zarr's
        (:func:`~dask_sweep.io.zarr_io.write_temporaries`), else ``write_temps`` of them."""
        zarr = write_temporaries(self.target, nbytes) if self.piece is not None else None
        return int(self.write_temps * nbytes) if zarr is None else zarr

    def write_planes(self, a: int, planes: np.ndarray) -> None:
        n = planes.shape[self.axis]
        step = self.piece or n
        lead = (slice(None),) * self.axis
        for s in range(0, n, max(1, step)):
            e = min(n, s + step)
            index, piece = lead + (slice(a + s, a + e),), planes[lead + (slice(s, e),)]
            if not write_whole_chunks(self.target, index, piece):
                self.target[index] = piece


class _PendingSink:
    """Stands for a file sink not created yet (``explain`` creates nothing)."""

    write_temps = WRITE_TEMPS

    def __init__(self, path: Any, piece: int) -> None:
        self.path = path
        self.piece = piece

    def write_planes(self, a: int, planes: np.ndarray) -> None:  # pragma: no cover
        raise RuntimeError("dask_sweep.dsl: the output sink was not opened")


class SinkWriter:
    """A :class:`dask_sweep.io.Sink` fed by the sweep: slabs on its chunk grid.

    Each slab is written in pieces of ``piece`` planes (whole chunk rows), so
    the sink's encoding temporaries are those of one piece.
    """

    write_temps = WRITE_TEMPS

    def __init__(self, sink: Any, piece: int | None = None) -> None:
        self.sink = sink
        self.row_step = sink.row_step
        self.piece = piece or sink.row_step

    def cut(self, piece: int) -> SinkWriter:
        """A writer of the same sink that writes ``piece`` planes per call."""
        return SinkWriter(self.sink, piece)

    def write_planes(self, a: int, planes: np.ndarray) -> None:
        for s in range(0, len(planes), max(1, self.piece)):
            # handed to the kernel piece by piece (write-back starts at once); the
            # sink syncs and records them in groups while the sweep goes on
            self.sink.write_slab(a + s, planes[s : s + self.piece], commit=False)


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


__all__ = ["AlgoPass", "Compiled", "PassPlan", "compile_pipeline", "step_reads"]
