"""The slab executor: one step of a sweep, pulled from the outputs.

At step ``t`` every output asks its stage for the planes up to the step's upper
bound.  A stage that does not hold them yet computes the missing planes
(rounded up to its grid), asking its inputs for the planes its window needs,
recursively down to the sources, which read whole chunk rows::

    step t:   output ◄── stage 2 ◄── stage 1 ◄── source ◄── storage
                       [a2,b2)    [a2-d2,b2+d2)  ...         chunk rows

A stage frees its inputs' planes as soon as it has consumed them, so a step
holds about one stage's slab at a time beside the rings.  The same code runs
*dry* (placeholders instead of arrays) at planning time, which is how the plan
knows, before any I/O, the bytes held at each moment, the bytes read, the rows
each step reads and how many planes each ring must hold (its fold).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from dask_sweep.plan.ir import (
    Blocked,
    Identity,
    Kernel,
    Plan,
    Pointwise,
    Reduce,
    Running,
    Source,
)
from dask_sweep.runtime import compute as C
from dask_sweep.runtime import running as R
from dask_sweep.runtime.axis_pass import scratch_bytes
from dask_sweep.runtime.memory import trim
from dask_sweep.runtime.ring import Ring, concat, take


@dataclass
class State:
    """What one slab task hands to the next: the rings and the progress of outputs."""

    rings: list[Ring]
    done: list[int]  # per output: planes emitted so far
    memos: dict = field(default_factory=dict)  # per source: upstream values for later rows
    wrap: dict = field(default_factory=dict)  # (stage, input) -> (tail, head) planes
    carry: dict = field(default_factory=dict)  # stage -> (next plane, running sums)

    def copy(self) -> State:
        return State([r.copy() for r in self.rings], list(self.done), dict(self.memos),
                     dict(self.wrap), dict(self.carry))

    def carried_bytes(self) -> int:
        """Bytes held beside the rings: periodic boundary planes and running sums."""
        return (sum(int(t.nbytes) + int(h.nbytes) for t, h in self.wrap.values())
                + sum(int(c[1].nbytes) for c in self.carry.values()))


@dataclass
class Trace:
    """Book-keeping of a (dry or real) run: bytes read, rows read per step, peaks.

    ``peak`` is the most bytes held at one moment (rings, the slab being
    computed, its inputs joined from pieces, kernel temporaries, emitted planes
    and the sink's temporaries while writing); ``peak_parts`` says what made it.
    """

    bytes_read: int = 0
    rows_read: list = field(default_factory=list)  # per step: [(stage, row)]
    peak: int = 0
    peak_stage: str = ""
    peak_parts: list = field(default_factory=list)  # [(what, bytes)] at the peak
    held_after: list = field(default_factory=list)  # per step: bytes held between steps
    step_peaks: list = field(default_factory=list)  # per step: its own peak
    ring_peak: dict = field(default_factory=dict)  # stage index -> max bytes held
    span: dict = field(default_factory=dict)  # stage index -> most planes held at once
    carried: set = field(default_factory=set)  # stages holding planes between steps
    cut: bool = False  # the replay stopped once its peak passed a limit (a lower bound)


def initial_state(plan: Plan, step: int = 0) -> State:
    """The state a chain starts from: at plane 0, or at the start of a segment.

    A segment starting at plane ``P`` has its rings unanchored: each is anchored
    where it is first asked for planes (``P`` less the windows downstream of
    it), so the first step recomputes the pipeline's halo before ``P``
    (the *warm-up*) and the results are those of one sweep from plane 0.
    """
    caps = plan.rings or (0,) * len(plan.stages)
    start = plan.steps[step - 1] if step else 0
    return State([Ring(plan.axis, None if start else 0, c) for c in caps],
                 [start] * len(plan.outputs))


def _round_down(grid, a: int) -> int:
    if grid is None:
        return a
    return grid[bisect.bisect_right(grid, a) - 1]


def _round_up(grid, b: int) -> int:
    if grid is None:
        return b
    i = bisect.bisect_left(grid, b)
    return grid[i] if i < len(grid) else grid[-1]


def periodic_inputs(st) -> list[int]:
    """Input positions of ``st`` with a periodic boundary along its sweep axis."""
    if isinstance(st, Blocked):
        return [i for i, b in enumerate(st.boundary)
                if _is_periodic(b[st.sweep_axis]) and any(st.window(i))]
    if isinstance(st, Kernel):
        return [0] if _is_periodic(st.boundary[st.sweep_axis]) and st.window(0)[0] else []
    return []


def _is_periodic(b) -> bool:
    return isinstance(b, str) and b == "periodic"


def compute_stage(st, a: int, b: int, axis: int, ins: list, threads: int, dry: bool,
                  prepadded=()):
    """Planes ``[a, b)`` of a (non-source) stage from its inputs' windows."""
    if isinstance(st, Pointwise):
        return C.compute_pointwise(st, a, b, axis, ins, dry)
    if isinstance(st, Kernel):
        return C.compute_kernel(st, a, b, axis, ins, threads, dry, prepadded=bool(prepadded))
    if isinstance(st, Blocked):
        return C.compute_blocked(st, a, b, axis, ins, threads, dry, prepadded=prepadded)
    if isinstance(st, Reduce):
        return C.compute_reduce(st, a, b, axis, ins, dry)
    if isinstance(st, Identity):
        return ins[0]
    # the stage kinds are a closed set: a new one is added to the IR and here
    raise TypeError(f"unknown stage kind {type(st).__name__}")  # pragma: no cover


class _Step:
    def __init__(self, plan: Plan, state: State, externals: dict, dry: bool, trace: Trace | None):
        self.plan = plan
        self.state = state
        self.externals = externals
        self.dry = dry
        self.trace = trace
        self.n = plan.extent
        self.grids = [st.grid(plan.axis) for st in plan.stages]
        self.consumers = plan.consumers()
        self.width = 0  # planes of the step (0: unknown, a side evaluation)

    def held(self) -> int:
        return sum(r.nbytes for r in self.state.rings) + self.state.carried_bytes()

    def ensure(self, j: int, a: int, b: int) -> None:
        """Make stage ``j``'s ring hold planes ``[a, b)``, computing what is missing."""
        ring = self.state.rings[j]
        if ring.stop is None:  # a side evaluation starts where it is asked
            ring.start = ring.stop = ring.base = _round_down(self.grids[j], a)
        if b > ring.stop:
            stop = _round_up(self.grids[j], b)
            w = self.width
            if (w and stop - ring.stop > w and self.grids[j] is None
                    and not isinstance(self.plan.stages[j], Source)):
                # a warm-up (a sweep's or a segment's first step computes the windows'
                # lead too): a step's planes at a time, so that the stages feeding this
                # ring hold one step's planes, not the lead's as well (same values:
                # the stage runs on any slab)
                lo = ring.stop
                while lo < stop:
                    hi = min(stop, lo + w)
                    self._compute(j, lo, hi)
                    lo = hi
            else:
                self._compute(j, ring.stop, stop)

    def pull(self, j: int, a: int, b: int):
        self.ensure(j, a, b)
        return self.state.rings[j].get(a, b)

    def _compute(self, j: int, a: int, b: int) -> None:
        plan, axis = self.plan, self.plan.axis
        st = plan.stages[j]
        transient = in_bytes = 0
        if isinstance(st, Source):
            out = C.compute_source(st, a, b, axis, self.externals, self.dry,
                                   self.state.memos, j)
            if self.trace is not None:
                r0, r1 = st.row_bounds.index(a), st.row_bounds.index(b)
                for r in range(r0, r1):
                    self.trace.rows_read[-1].append((j, r))
                    read = st.bytes_per_row[r] if st.bytes_per_row else 0
                    self.trace.bytes_read += read
                    in_bytes += read  # more than the rows kept when a tile cuts them
        else:
            ins = []
            periodic = periodic_inputs(st)
            wins = [(max(0, a - lo), min(self.n, b + hi))
                    for lo, hi in (st.window(pos) for pos in range(len(st.inputs)))]
            # every input first, then the windows: computing one input may append to
            # (and move the planes of) a folded ring another input is a view of
            for i, (wa, wb) in zip(st.inputs, wins):
                self.ensure(i, wa, wb)
            for pos, (i, (wa, wb)) in enumerate(zip(st.inputs, wins)):
                lo, hi = st.window(pos)
                x = self.state.rings[i].get(wa, wb)
                if pos in periodic:
                    x = self._wrap(j, pos, i, a, b, lo, hi, x)
                    transient += int(x.nbytes)
                elif self.state.rings[i].copies(wa, wb):
                    transient += int(x.nbytes)  # joined from pieces: a new array
                ins.append(x)
            in_bytes = sum(int(x.nbytes) for x in ins)
            if isinstance(st, Running):  # its sums carry from step to step
                out, carry = R.compute_running(st, a, b, ins[0], wins[0][0],
                                               self.state.carry.pop(j, None),
                                               plan.threads, self.dry)
                if carry is not None:
                    self.state.carry[j] = carry
            else:
                out = compute_stage(st, a, b, axis, ins, plan.threads, self.dry, periodic)
            if not self.dry:
                out = self._own(out, st)
        if self.trace is not None:
            ob = int(out.nbytes)
            temps = C.temp_bytes(st, ob, in_bytes, plan.threads) + scratch_bytes(st, plan.threads, b - a)
            ring = self.state.rings[j]
            # a view of a ring piece is already in held(); a joined input is not
            self._event(st.label, ob + transient + temps,
                        [(f"{st.label}: the slab computed", ob),
                         (f"{st.label}: inputs joined from pieces", transient),
                         (f"{st.label}: temporaries", int(temps))])
            if ring.capacity and ring.buf is None:
                # a folded ring's buffer is made at its first append, beside the slab
                new = ring.capacity * st.plane_bytes(axis)
                self._event(st.label, ob + transient + new,
                            [(f"{st.label}: the slab computed", ob),
                             (f"{st.label}: inputs joined from pieces", transient),
                             (f"ring of {st.label} (allocated)", new)])
        self.state.rings[j].append(a, out)
        # Free the inputs' planes this stage was the last to need, now rather than
        # at the end of the step: a step then holds about one stage's slab at a time.
        for i in set(st.inputs):
            self._release_one(i)
        if not self.dry:
            # and hand the heap's free pages back (sweep.tune-malloc): pieces under the
            # mmap threshold (rings, per-plane temporaries) freed stage after stage left
            # holes in glibc's arenas that a step's later stages did not fill (a chain of
            # 19 stages at 16 MiB grew 16.7-17.4 MiB trimmed once a step, 15.4-15.7 so)
            trim()
        if self.trace is not None:
            ring = self.state.rings[j]
            nb = ring.nbytes
            if nb > self.trace.ring_peak.get(j, 0):
                self.trace.ring_peak[j] = nb
            self.trace.span[j] = max(self.trace.span.get(j, 0), ring.span)

    def _own(self, out, st):
        """A result that is a view of a folded ring would change under it: copy it."""
        if not isinstance(out, np.ndarray):
            return np.asarray(out)
        for i in st.inputs:
            buf = self.state.rings[i].buf
            if isinstance(buf, np.ndarray) and np.may_share_memory(out, buf):
                return out.copy()
        return out

    def _event(self, what: str, extra: int, parts: list) -> None:
        """A moment when ``extra`` bytes are alive beside what the rings hold."""
        tr = self.trace
        held = self.held()
        peak = held + extra
        if tr.step_peaks and peak > tr.step_peaks[-1]:
            tr.step_peaks[-1] = int(peak)
        if peak > tr.peak:
            tr.peak = int(peak)
            tr.peak_stage = what
            rings = [(f"ring of {self.plan.stages[k].label}", r.nbytes)
                     for k, r in enumerate(self.state.rings) if r.nbytes]
            wrap = sum(int(t.nbytes) + int(h.nbytes) for t, h in self.state.wrap.values())
            if wrap:
                rings.append(("periodic boundary planes", wrap))
            sums = self.state.carried_bytes() - wrap
            if sums:
                rings.append(("running sums carried", sums))
            tr.peak_parts = rings + [(w, int(v)) for w, v in parts if v]

    def _wrap(self, j, pos, i, a, b, lo, hi, x):
        """Pad planes of input ``i`` periodically along the sweep axis.

        The far end is needed at the start: its last ``lo`` planes are computed
        once by a side evaluation (fresh rings anchored near the end) and kept,
        with a copy of the first ``hi`` planes, until the sweep reaches the end.
        """
        key = (j, pos)
        if key not in self.state.wrap:
            side = _Step(self.plan, State([Ring(self.plan.axis, None) for _ in self.plan.stages],
                                          []), self.externals, self.dry, None)
            tail = side.pull(i, self.n - lo, self.n)
            head = take(self.state.rings[i].get(0, hi), 0, hi, self.plan.axis)
            if not self.dry:
                tail, head = tail.copy(), head.copy()
            self.state.wrap[key] = (tail, head)
        tail, head = self.state.wrap[key]
        parts = []
        if a - lo < 0:
            parts.append(take(tail, a, lo, self.plan.axis))  # the last lo - a planes
        parts.append(x)
        if b + hi > self.n:
            parts.append(take(head, 0, b + hi - self.n, self.plan.axis))
        return concat(parts, self.plan.axis) if len(parts) > 1 else x

    def _keep(self, i: int) -> int:
        """The lowest plane of stage ``i`` that a consumer or an output still needs."""
        plan = self.plan
        keep = self.n
        for j, pos in self.consumers[i]:
            lo, _ = plan.stages[j].window(pos)
            stop = self.state.rings[j].stop
            if stop == self.n:
                continue  # that consumer is finished: it asks for nothing more
            keep = min(keep, max(0, (stop or 0) - lo))
        for k, o in enumerate(plan.outputs):
            if o.stage == i:
                keep = min(keep, self.state.done[k])
        return keep

    def _release_one(self, i: int) -> None:
        ring = self.state.rings[i]
        keep = self._keep(i)
        if keep >= self.n and ring.stop == self.n:
            ring.release()  # every consumer is past the end: free the buffer
        else:
            ring.drop_below(keep)

    def release(self) -> None:
        """Drop planes no consumer will ask for again."""
        for i in range(len(self.plan.stages)):
            self._release_one(i)


def output_upper(plan: Plan, k: int, step: int) -> int:
    """Planes of output ``k`` complete after step ``step`` (on the output's chunk grid)."""
    b = plan.steps[step]
    if b >= plan.extent:
        return plan.extent
    grid = plan.outputs[k].grid(plan.axis)  # sorted boundaries
    return grid[bisect.bisect_right(grid, b) - 1]


def run_step(
    plan: Plan, state: State | None, step: int, externals: dict | None = None,
    *, dry: bool = False, trace: Trace | None = None,
) -> tuple[State, list]:
    """Advance the sweep by one step.

    Returns the new state and, per output, ``(start, planes)`` newly complete
    (``planes`` is ``None`` when nothing completed).  Planes of an output
    without a sink are the caller's to keep (a copy when they sat in a folded
    ring); a sink's planes are only valid until the next step.  A folded ring
    is shared with ``state``, which must not be advanced again.
    """
    state = initial_state(plan, step) if state is None else state.copy()
    if trace is not None:
        trace.rows_read.append([])
        trace.step_peaks.append(0)
    ex = _Step(plan, state, externals or {}, dry, trace)
    ex.width = plan.steps[step] - (plan.steps[step - 1] if step else 0)
    emitted = []
    bounds = [(state.done[k], output_upper(plan, k, step)) for k in range(len(plan.outputs))]
    upto = plan.steps[step]
    for o in plan.outputs:
        # every output's stage up to the step, whether or not a whole output block is
        # complete (its ring holds the partial block), then the views (see _compute)
        ex.ensure(o.stage, state.done[plan.outputs.index(o)], upto)
    consumed = {i for st in plan.stages for i in st.inputs}
    for k, (o, (a, b)) in enumerate(zip(plan.outputs, bounds)):
        if b > a:
            ring = state.rings[o.stage]
            sole = (o.sink is None and ring.start == a and o.stage not in consumed
                    and sum(p.stage == o.stage for p in plan.outputs) == 1)
            if sole:  # the caller keeps these planes: hand the buffer over, no copy
                planes = ring.hand_over(b)
            else:
                planes = ring.get(a, b)
                if o.sink is None and ring.capacity and not dry:
                    planes = planes.copy()  # kept by the caller beyond this step
            emitted.append((a, planes))
            state.done[k] = b
        else:
            emitted.append((a, None))
    ex.release()
    held = ex.held()
    if trace is not None:
        trace.held_after.append(held)
        trace.step_peaks[-1] = max(trace.step_peaks[-1], held)
        for j, r in enumerate(state.rings):
            if r.held_planes:
                trace.carried.add(j)
        _write_event(plan, ex, state, emitted)
    return state, emitted


def _write_event(plan: Plan, ex: _Step, state: State, emitted: list) -> None:
    """The moment the step's outputs are written: rings, emitted planes, sink temporaries."""
    extra, temps, parts = 0, 0.0, []
    for k, ((_a, planes), o) in enumerate(zip(emitted, plan.outputs)):
        if planes is None:
            continue
        folded = state.rings[o.stage].capacity
        if o.sink is not None and not folded:  # a view of a folded ring costs nothing
            extra += int(planes.nbytes)
            parts.append((f"output {k}: planes emitted", int(planes.nbytes)))
        # planes of an in-memory output are the caller's result from here on (dask
        # holds them until it returns them), outside the sweep's working memory
        t = _writer_temps(o.sink, planes, plan.axis)
        if t > temps:
            temps = t
            parts.append((f"output {k}: the writer's temporaries", int(temps)))
    if extra or temps:
        ex._event("writing the step's outputs", extra + int(temps), parts)


def _writer_temps(sink, planes, axis: int) -> int:
    """What ``sink`` holds beyond ``planes`` while it writes them: one call writes one
    ``piece`` of planes; ``temps_of`` (bytes of a call) or ``write_temps`` (a multiple)."""
    n = planes.shape[axis]
    share = planes.nbytes * min(n, getattr(sink, "piece", None) or n) // max(1, n)
    temps_of = getattr(sink, "temps_of", None)
    return int(temps_of(share) if temps_of else getattr(sink, "write_temps", 0.0) * share)


def dry_run(plan: Plan, skip: bool = True, limit: int | None = None) -> Trace:
    """Replay the whole sweep on placeholders: reads, peaks, rows per step, ring spans.

    With ``limit``, the replay stops after the first step whose peak passes it
    (``trace.cut``): a peak only grows, so the plan is known not to fit, and a
    search over step sizes or tilings pays a few steps for each refusal.

    Away from the volume's faces a sweep with regular grids and steps repeats
    itself: once the state seen from a step's end is the state of an earlier
    step moved by whole periods of every grid, the steps in between recur, and
    the replay jumps ahead (``skip``), copying their records.  The trace is the
    same as a step-by-step replay (``tests/test_runtime.py`` compares them), at a
    cost that no longer grows with the number of steps.
    """
    trace = Trace()
    period = _grid_period(plan) if skip else None
    for seg in plan.segment_steps():
        state = None  # each segment starts afresh (its warm-up included)
        seen: dict = {}
        t = seg.start
        while t < seg.stop:
            state, _ = run_step(plan, state, t, dry=True, trace=trace)
            if limit is not None and trace.peak > limit:
                trace.cut = True
                return trace
            if period is not None:
                jump = _steady(plan, state, trace, t, seg, period, seen)
                if jump:
                    t += jump
            t += 1
    return trace


def _grid_period(plan: Plan) -> int | None:
    """Planes after which every grid repeats (None: a grid is irregular, or periodic ends)."""
    import math

    if any(periodic_inputs(st) for st in plan.stages):
        return None
    grids = [st.grid(plan.axis) for st in plan.stages] + [o.grid(plan.axis) for o in plan.outputs]
    grids += [st.restarts() for st in plan.stages if isinstance(st, Running)]
    period = 1
    for g in grids:
        if g is None:
            continue
        inner = list(g[:-1])  # the last bound is the volume's end (a short last row)
        if len(inner) < 2:
            return None
        w = inner[1] - inner[0]
        if inner[0] != 0 or w <= 0 or any(b - a != w for a, b in zip(inner, inner[1:])):
            return None
        if g[-1] - inner[-1] > w:  # a last row longer than the others: not a repeat
            return None
        period = period * w // math.gcd(period, w)
    return period


def _signature(state: State, a: int) -> tuple:
    """The state seen from plane ``a`` (so equal signatures are translates of each other)."""
    rings = []
    for r in state.rings:
        if r.stop is None:
            rings.append(None)
            continue
        buf = None if r.buf is None else (r.buf.shape, r.base - a)
        rings.append((r.start - a, r.stop - a, r.span, buf,
                      tuple((s - a, e - a, v.shape) for s, e, v in r.pieces)))
    carry = tuple(sorted((j, z - a) for j, (z, _) in state.carry.items()))
    return tuple(rings), tuple(d - a for d in state.done), carry


def _steady(plan: Plan, state: State, trace: Trace, t: int, seg: range, period: int,
            seen: dict) -> int:
    """Steps to jump after step ``t`` because the sweep repeats itself (0: none)."""
    import math

    steps = plan.steps
    a = steps[t]
    width = a - (steps[t - 1] if t else 0)
    key = (a % math.lcm(period, max(1, width)), width, _signature(state, a))
    t0 = seen.get(key)
    seen[key] = t
    if t0 is None:
        return 0
    dist = a - steps[t0]  # planes of one repetition
    per = t - t0  # steps of one repetition
    if any(steps[k] - steps[k - 1] != width for k in range(t0 + 1, t + 1)):
        return 0
    # stay clear of the end face: the windows reach ahead of the last step by `ahead`
    ahead = max((lead[1] for lead in plan.lead()), default=0)
    room = min(plan.extent - ahead - 2 * dist - width, steps[seg.stop - 1] - 2 * dist)
    reps = max(0, (room - a) // dist)
    last = seg.stop - 1
    reps = min(reps, (last - t - per) // per)
    if reps <= 0 or any(steps[k] - steps[k - 1] != width
                        for k in range(t + 1, t + reps * per + 1)):
        return 0
    for rep in range(1, reps + 1):
        shift = rep * dist
        for k in range(t0 + 1, t + 1):
            moved = []
            for j, r in trace.rows_read[k]:  # rows of sources, whose grids repeat too
                st = plan.stages[j]
                r2 = r + shift // (st.row_bounds[1] - st.row_bounds[0])
                moved.append((j, r2))
                if st.bytes_per_row:
                    trace.bytes_read += st.bytes_per_row[r2]
            trace.rows_read.append(moved)
            trace.held_after.append(trace.held_after[k])
            trace.step_peaks.append(trace.step_peaks[k])
    shift = reps * dist
    for r in state.rings:
        if r.stop is None:
            continue
        r.start += shift
        r.stop += shift
        r.base += shift
        r.pieces = [(s + shift, e + shift, v) for s, e, v in r.pieces]
    state.done = [d + shift for d in state.done]
    state.carry = {j: (z + shift, v) for j, (z, v) in state.carry.items()}
    seen.clear()  # the recorded steps now lie behind the jump
    return reps * per

