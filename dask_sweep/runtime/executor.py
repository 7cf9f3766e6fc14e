"""The slab executor: one step of a sweep, pulled from the outputs.

At step ``t`` every output asks its stage for the planes up to the step's upper
bound.  A stage that does not hold them yet computes the missing planes
(rounded up to its grid), asking its inputs for the planes its window needs,
recursively down to the sources, which read whole chunk rows::

    step t:   output ◄── stage 2 ◄── stage 1 ◄── source ◄── storage
                       [a2,b2)    [a2-d2,b2+d2)  ...         chunk rows

After the step, every ring drops the planes that no consumer's next window
reaches.  The same code runs *dry* (placeholders instead of arrays) at planning
time, which is how the plan knows, before any I/O, the bytes held at each
moment, the bytes read and the rows each step reads.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from dask_sweep.plan.ir import Blocked, Identity, Kernel, Plan, Source
from dask_sweep.runtime import compute as C
from dask_sweep.runtime.axis_pass import scratch_bytes
from dask_sweep.runtime.ring import Ring, concat, take


@dataclass
class State:
    """What one slab task hands to the next: the rings and the progress of outputs."""

    rings: list[Ring]
    done: list[int]  # per output: planes emitted so far
    memos: dict = field(default_factory=dict)  # per source: upstream values for later rows
    wrap: dict = field(default_factory=dict)  # (stage, input) -> (tail, head) planes

    def copy(self) -> State:
        return State([r.copy() for r in self.rings], list(self.done), dict(self.memos),
                     dict(self.wrap))


@dataclass
class Trace:
    """Book-keeping of a (dry or real) run: bytes read, rows read per step, peaks."""

    bytes_read: int = 0
    rows_read: list = field(default_factory=list)  # per step: [(stage, row)]
    peak: int = 0
    peak_step: int = 0
    peak_stage: str = ""
    held_after: list = field(default_factory=list)  # per step: bytes held between steps
    computes: int = 0
    ring_peak: dict = field(default_factory=dict)  # stage index -> max bytes held


def initial_state(plan: Plan) -> State:
    return State([Ring(plan.axis) for _ in plan.stages], [0] * len(plan.outputs))


def _round_down(grid, a: int) -> int:
    if grid is None:
        return a
    return max(g for g in grid if g <= a)


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


def _round_up(grid, b: int) -> int:
    if grid is None:
        return b
    for g in grid:
        if g >= b:
            return g
    return grid[-1]


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

    def held(self) -> int:
        extra = sum(int(t.nbytes) + int(h.nbytes) for t, h in self.state.wrap.values())
        return sum(r.nbytes for r in self.state.rings) + extra

    def pull(self, j: int, a: int, b: int):
        ring = self.state.rings[j]
        if ring.stop is None:  # a side evaluation starts where it is asked
            ring.start = ring.stop = _round_down(self.grids[j], a)
        if b > ring.stop:
            self._compute(j, ring.stop, _round_up(self.grids[j], b))
        return ring.get(a, b)

    def _compute(self, j: int, a: int, b: int) -> None:
        plan, axis = self.plan, self.plan.axis
        st = plan.stages[j]
        if isinstance(st, Source):
            out = C.compute_source(st, a, b, axis, self.externals, self.dry,
                                   self.state.memos, j)
            if self.trace is not None:
                r0, r1 = st.row_bounds.index(a), st.row_bounds.index(b)
                for r in range(r0, r1):
                    self.trace.rows_read[-1].append((j, r))
                    self.trace.bytes_read += st.bytes_per_row[r] if st.bytes_per_row else 0
            transient = in_bytes = 0
        else:
            ins = []
            periodic = periodic_inputs(st)
            transient = 0  # inputs joined from several pieces: new arrays, not views
            for pos, i in enumerate(st.inputs):
                lo, hi = st.window(pos)
                wa, wb = max(0, a - lo), min(self.n, b + hi)
                x = self.pull(i, wa, wb)
                if pos in periodic:
                    x = self._wrap(j, pos, i, a, b, lo, hi, x)
                    transient += int(x.nbytes)
                elif self.state.rings[i].copies(wa, wb):
                    transient += int(x.nbytes)
                ins.append(x)
            in_bytes = sum(int(x.nbytes) for x in ins)
            if isinstance(st, Blocked):
                out = C.compute_blocked(st, a, b, axis, ins, plan.threads, self.dry,
                                        prepadded=periodic)
            elif isinstance(st, Identity):
                out = ins[0]
            elif isinstance(st, Kernel):
                out = C.compute_kernel(st, a, b, axis, ins, plan.threads, self.dry,
                                       prepadded=bool(periodic))
            elif hasattr(st, "compute_planes"):  # stage kinds defined by a front end
                out = st.compute_planes(a, b, axis, ins, plan.threads, self.dry)
            else:  # pragma: no cover - a new stage kind must be added here
                raise TypeError(f"unknown stage kind {type(st).__name__}")
        if self.trace is not None:
            self.trace.computes += 1
            ob = int(out.nbytes)
            # a view of a ring piece is already in held(); a joined input is not
            peak = (self.held() + ob + transient + st.temp_bytes(ob, in_bytes)
                    + scratch_bytes(st, plan.threads))
            if peak > self.trace.peak:
                self.trace.peak = int(peak)
                self.trace.peak_stage = st.label
                self.trace.peak_step = len(self.trace.rows_read) - 1
        self.state.rings[j].append(a, out)
        # Free the inputs' planes this stage was the last to need, now rather than
        # at the end of the step: a step then holds about one stage's slab at a time.
        for i in set(st.inputs):
            self._release_one(i)
        if self.trace is not None:
            nb = self.state.rings[j].nbytes
            if nb > self.trace.ring_peak.get(j, 0):
                self.trace.ring_peak[j] = nb

    def _wrap(self, j, pos, i, a, b, lo, hi, x):
        """Pad planes of input ``i`` periodically along the sweep axis.

        The far end is needed at the start: its last ``lo`` planes are computed
        once by a side evaluation (fresh rings anchored near the end) and kept,
        with a copy of the first ``hi`` planes, until the sweep reaches the end.
        """
        key = (j, pos)
        if key not in self.state.wrap:
            side = _Step(self.plan, State([Ring(self.plan.axis, None) for _ in self.plan.stages],
                                          []), self.externals, self.dry, self.trace)
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

    def _release_one(self, i: int) -> None:
        plan = self.plan
        keep = self.n
        for j, pos in self.consumers[i]:
            lo, _ = plan.stages[j].window(pos)
            stop = self.state.rings[j].stop
            keep = min(keep, max(0, (stop or 0) - lo))
        for k, o in enumerate(plan.outputs):
            if o.stage == i:
                keep = min(keep, self.state.done[k])
        self.state.rings[i].drop_below(keep)

    def release(self) -> None:
        """Drop planes no consumer will ask for again."""
        plan = self.plan
        keep = [self.n] * len(plan.stages)
        for j, st in enumerate(plan.stages):
            for pos, i in enumerate(st.inputs):
                lo, _ = st.window(pos)
                keep[i] = min(keep[i], max(0, self.state.rings[j].stop - lo))
        for k, o in enumerate(plan.outputs):
            keep[o.stage] = min(keep[o.stage], self.state.done[k])
        for j, ring in enumerate(self.state.rings):
            ring.drop_below(keep[j])


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

    Returns the new state and, per output, ``(start, planes)`` newly complete.
    The input state is not modified.
    """
    state = initial_state(plan) if state is None else state.copy()
    if trace is not None:
        trace.rows_read.append([])
    ex = _Step(plan, state, externals or {}, dry, trace)
    emitted = []
    for k, o in enumerate(plan.outputs):
        a = state.done[k]
        b = output_upper(plan, k, step)
        if b > a:
            emitted.append((a, ex.pull(o.stage, a, b)))
            state.done[k] = b
        else:
            emitted.append((a, None))
    ex.release()
    if trace is not None:
        trace.held_after.append(ex.held())
    return state, emitted


def dry_run(plan: Plan) -> Trace:
    """Replay the whole sweep on placeholders: reads, peaks, rows per step."""
    trace = Trace()
    state = None
    for t in range(len(plan.steps)):
        state, _ = run_step(plan, state, t, dry=True, trace=trace)
    return trace
