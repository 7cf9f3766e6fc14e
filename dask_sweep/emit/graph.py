"""Plan → dask tasks: one chain of slab tasks per segment, plus the output keys.

::

    sweep-plan-T ─► (sweep-step-T, 0) ─► (sweep-step-T, 1) ─► ... ─► (sweep-step-T, S-1)
                         │                     │
                         ▼                     ▼
                    (_trim-…, 0, j, k)    (_trim-…, 1, j, k)        output keys keep
                    (store-map-…, 0, …)                            dask's names

Each step depends on the previous one of its chain (the carried ring buffers),
so no step starts before its predecessor ends and no read runs ahead of the
sweep: the graph's structure, not the scheduler's heuristics, bounds memory.
A sweep cut into segments (:mod:`dask_sweep.passes.segments`) has one such
chain per segment, independent of each other; each chain's first step carries
the plan itself (no shared dependency, so ``distributed`` may place the chains
on different workers) and hands it on.  The chains' ``priority`` annotations
(:class:`StepPriority`) make a worker finish a chain before starting another.
The output keys keep their names so ``finalize`` and downstream layers are
untouched; every key whose meaning changed starts with ``sweep-``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from dask._task_spec import DataNode, List, Task, TaskRef, convert_legacy_graph
from dask.base import tokenize
from dask.highlevelgraph import MaterializedLayer

from dask_sweep.plan.ir import Plan, Source
from dask_sweep.runtime.executor import Trace, run_step
from dask_sweep.runtime.memory import trims, tune_allocator


@trims
def _step(plan, prev, t, ext_keys, ext_values, *after):
    if plan is None:  # a later step of a segment: the plan came with the previous step
        plan = prev[2]
    if plan.info.get("tune_malloc", True):
        tune_allocator()
    # set only when emitted on a distributed scheduler (the dashboard's /sweeps page)
    report = plan.info.get("report")
    begun = report.begin() if report is not None else None
    externals = dict(zip(ext_keys, ext_values))
    state = None if prev is None else prev[0]
    new_state, emitted = run_step(plan, state, t, externals)
    if state is not None:
        # Hand-over: the previous step's result stays alive while its output
        # blocks wait to be taken (a scheduler may run those tasks late), but
        # its rings are now this step's; drop them so they are not held twice.
        state.rings = state.memos = state.wrap = None
    for k, o in enumerate(plan.outputs):
        if o.sink is not None and emitted[k][1] is not None:
            _write(plan, o, *emitted[k])
            # written: do not keep the planes alive in this task's result
            emitted[k] = (emitted[k][0], None)
    if t == len(plan.steps) - 1:  # a sink writing in the background is done with the sweep
        for o in plan.outputs:
            end = getattr(o.sink, "end_of_sweep", None)
            if end is not None:
                end()
    if report is not None:
        report.end(t, begun)
    return new_state, emitted, plan


def _write(plan: Plan, o, a: int, planes) -> None:
    axis = plan.axis
    if hasattr(o.sink, "write_planes"):
        o.sink.write_planes(a, planes)
        return
    bnds = [np.cumsum((0, *c)).tolist() for c in o.chunks]
    r0 = bnds[axis].index(a)
    r1 = bnds[axis].index(a + planes.shape[axis])
    ranges = [range(len(c)) for c in o.chunks]
    ranges[axis] = range(r0, r1)
    for ix in np.ndindex(*[len(r) for r in ranges]):
        idx = tuple(ranges[d][i] for d, i in enumerate(ix))
        sl = tuple(
            slice(bnds[d][q] - (a if d == axis else 0), bnds[d][q + 1] - (a if d == axis else 0))
            for d, q in enumerate(idx)
        )
        o.sink.write_block(idx, planes[sl])


def is_step(key) -> bool:
    """Whether ``key`` names a ``sweep-step`` task."""
    return isinstance(key, tuple) and isinstance(key[0], str) and key[0].startswith("sweep-step-")


def consumers_first(graph: Any) -> dict:
    """The optimised graph with each sweep step waiting for the tasks that took the
    output blocks of the step before it.

    A chain of steps whose blocks are consumed outside the sweep (a reduction, a
    store the sweep did not take over) is run by ``dask.order`` to its end before
    the first consumer when one thread runs it (the synchronous scheduler, a
    one-thread pool): every block then waits in memory.  The edge makes step
    ``t + 1`` wait for the consumers of step ``t``'s blocks, so a block lives one
    step, as the plan counts, under any order.  A consumer is gated on only when
    everything it needs is at hand by then (the blocks of steps up to ``t`` and
    work no sweep feeds); one that also needs later blocks (the array returned
    whole, a filter across steps) is left as dask ordered it.
    """
    dsk = dict(graph)
    steps = [k for k in dsk if is_step(k)]
    if not steps:
        return dsk
    if any(getattr(node, "dependencies", None) is None for node in dsk.values()):
        # legacy tuples (an optimiser that kept the graph's layers as they were built)
        dsk = convert_legacy_graph(dsk)
    deps = {k: node.dependencies for k, node in dsk.items()}
    users: dict = {}
    for k, ds in deps.items():
        for d in ds:
            users.setdefault(d, []).append(k)
    fed: set = set()  # everything a sweep step feeds, steps included
    stack = list(steps)
    while stack:
        k = stack.pop()
        if k not in fed:
            fed.add(k)
            stack.extend(users.get(k, ()))

    def at_hand(k, name: str, t: int) -> bool:
        if is_step(k):
            return k[0] == name and k[1] <= t
        return k not in fed

    def ready_by(k, name: str, t: int) -> bool:
        """Whether all ``k`` needs is at hand after step ``t``: steps up to ``t``,
        what they alone feed, work no step feeds."""
        return all(at_hand(d, name, t) or (all(at_hand(e, name, t) for e in deps.get(d, ()))
                                          and d in fed)
                   for d in deps[k])

    gates: dict = {}
    for k in steps:
        name, t = k[0], k[1]
        nxt = (name, t + 1)
        if nxt not in dsk or k not in deps[nxt]:
            continue  # the chain's last step (or the next is a new segment)
        takers = set()
        for x in users.get(k, ()):
            if is_step(x):
                continue
            if deps[x] == {k}:  # the block cut from the step: its consumers take it
                takers.update(y for y in users.get(x, ()) if not is_step(y)
                              and ready_by(y, name, t))
            elif ready_by(x, name, t):  # a consumer fused with the cut
                takers.add(x)
        if takers:
            gates[nxt] = takers
    for k, takers in gates.items():
        task = dsk[k]
        dsk[k] = Task(k, task.func, *task.args, *(TaskRef(c) for c in sorted(takers, key=str)))
    return dsk


def plan_in(dsk, task) -> Plan | None:
    """The plan a ``sweep-step`` task carries (the chain's head) or refers to, else ``None``."""
    args = getattr(task, "args", ())
    first = args[0] if args else None
    if isinstance(first, TaskRef):
        first = dsk.get(first.key)
    if isinstance(first, DataNode):
        return first.value
    return None


def _done(*_):
    return None


# Who files an emitted sweep for watching (the dashboard's ``/sweeps`` page under
# ``distributed``: integration.cluster registers it on import).  emit knows no scheduler.
# A reporter returns what the steps need to report to it (``plan.info`` entries), or None.
REPORTERS: list[Callable[[Plan, Trace, str], dict | None]] = []


def _reporting(plan: Plan, trace: Trace, token: str) -> Plan:
    """The plan the steps carry: the reporters' entries (``report``) in its ``info``."""
    info = {k: v for k, v in plan.info.items() if k != "report"}
    plan = replace(plan, info=info)
    for reporter in REPORTERS:
        info.update(reporter(plan, trace, token) or {})
    return replace(plan, info=info)


def emit(plan: Plan, trace: Trace, token: str | None = None, *, after=None,
         outputs: bool = True, bind: tuple[Callable, Any] | None = None
         ) -> tuple[dict, dict]:
    """Tasks of the sweep: ``({layer name: MaterializedLayer}, {layer name: deps})``.

    The output layers keep the output names; one extra layer ``sweep-T`` holds
    the plan and the step chains.  ``after``: keys every chain's first step waits
    for (the previous tile's last steps); ``outputs=False`` leaves the output keys out.
    ``bind=(fn, key)``: the steps run ``fn(plan, value of key)`` (a DSL pass binds the
    scalars earlier passes found), not the plan itself.
    """
    token = token or tokenize([o.name for o in plan.outputs], plan.steps, plan.budget)
    plan = _reporting(plan, trace, token)
    axis = plan.axis
    plan_key = f"sweep-plan-{token}"
    step_name = f"sweep-step-{token}"
    tasks: dict = {} if plan.segments else {plan_key: DataNode(plan_key, plan)}
    ext_layers: set[str] = set()
    if bind is not None:
        if plan.segments:
            raise ValueError("emit: a plan bound at run time is one chain (no segments)")
        fn, key = bind
        tasks[plan_key] = Task(plan_key, fn, DataNode(None, plan), TaskRef(key))
        ext_layers.add(key[0] if isinstance(key, tuple) else key)
    # a resumed write: segments whose planes the output recorded get no task
    skip = set(plan.info.get("skip", ()))
    chains = [seg for k, seg in enumerate(plan.segment_steps()) if k not in skip]
    scheduled = sorted(t for seg in chains for t in seg) if skip else range(len(plan.steps))
    for t in scheduled:
        externals = {}
        for j, r in trace.rows_read[t]:
            st = plan.stages[j]
            if isinstance(st, Source) and st.external:
                for key in st.reader.row_keys(r):
                    externals[key] = TaskRef(key)
                    ext_layers.add(st.reader.layer_of(key))
        first = t == 0 or t in plan.segments  # a chain starts here, from no state
        prev = None if first else TaskRef((step_name, t - 1))
        key = (step_name, t)
        # keys and values apart: dask resolves references inside lists, not dict values
        extra = tuple(TaskRef(k) for k in (after or ())) if first else ()
        if not plan.segments:
            the_plan = TaskRef(plan_key)
        else:
            # each chain's first step carries the plan (and hands it on): with no
            # dependency in common, distributed places the chains on different workers
            the_plan = DataNode(None, plan) if first else None
        tasks[key] = Task(key, _step, the_plan, prev, t, tuple(externals),
                          List(*externals.values()), *extra)
    out_layers: dict[str, dict] = {}
    for k, o in enumerate(plan.outputs if outputs else ()):
        bnds = [np.cumsum((0, *c)).tolist() for c in o.chunks]
        # the step at which each block row along the axis is complete
        step_of_row = []
        for q in range(len(o.chunks[axis])):
            end = bnds[axis][q + 1]
            step_of_row.append(next(t for t, b in enumerate(plan.steps) if b >= end))
        layer = {}
        step_refs = [TaskRef((step_name, t)) for t in range(len(plan.steps))]
        lasts = [step_refs[seg[-1]] for seg in chains]
        for idx in np.ndindex(*[len(c) for c in o.chunks]):
            key = (o.name, *idx)
            # few, flat arguments: building tens of thousands of these must stay cheap
            if o.sink is not None:
                # a completion marker waits for every chain's last step: tied to step t
                # it would keep step t's result alive until the scheduler got to it
                layer[key] = Task(key, _done, *lasts)
            else:
                layer[key] = Task(key, _extract_block, step_refs[step_of_row[idx[axis]]],
                                  k, idx)
        out_layers[o.name] = layer
    deps = {f"sweep-{token}": ext_layers}
    for name in out_layers:
        deps[name] = {f"sweep-{token}"}
    sweep = MaterializedLayer(tasks, annotations={"priority": StepPriority(plan, step_name)})
    return {f"sweep-{token}": sweep,
            **{n: MaterializedLayer(v) for n, v in out_layers.items()}}, deps


class StepPriority:
    """``priority`` of a sweep's tasks (``distributed`` runs higher first).

    A chain's steps outrank those of chains after it, so a worker whose step
    finishes takes its own chain's next step rather than starting another
    chain (which would hold a second chain's rings); the plan and every step of
    the first chains start first.
    """

    def __init__(self, plan: Plan, step_name: str) -> None:
        self.step_name = step_name
        # tiles swept at once rank after one another as chains do (emit_tiled)
        first = plan.info.get("chain_offset", 0)
        self.segment_of = {t: first + k for k, seg in enumerate(plan.segment_steps())
                           for t in seg}
        self.count = len(self.segment_of)

    def __call__(self, key) -> int:
        if isinstance(key, tuple) and key[0] == self.step_name:
            return -self.segment_of.get(key[1], 0)
        return 1  # the plan itself, needed by every chain

    def __repr__(self) -> str:
        return f"StepPriority({self.step_name!r}, {self.count} steps)"


def emit_tiled(tiles: list[tuple[Plan, Trace]], token: str,
               at_once: bool = False) -> tuple[dict, dict]:
    """Tiles swept one after the other (or, ``at_once``, as independent chains that
    ``distributed`` spreads over its workers); the output keys wait for every tile.

    A sink output's keys are completion markers (each tile writes its own
    region); an in-memory output's block is cut from the step of the one tile
    whose interior holds it.  Tiles at once rank like a sweep's segments: a
    worker finishes the tile it holds before it starts another.
    """
    layers, deps = {}, {}
    after = None
    lasts: list = []
    offset = 0
    for n, (plan, trace) in enumerate(tiles):
        if at_once:
            plan = plan.with_info(chain_offset=offset)
            offset += len(plan.segment_steps())
        lay, dep = emit(plan, trace, token=f"{token}-tile{n}", after=after, outputs=False)
        layers.update(lay)
        deps.update(dep)
        if after is not None:
            deps[f"sweep-{token}-tile{n}"].add(f"sweep-{token}-tile{n - 1}")
        ends = [(f"sweep-step-{token}-tile{n}", seg[-1]) for seg in plan.segment_steps()]
        lasts += ends
        after = None if at_once else ends
    after = lasts if at_once else after
    tile_layers = {f"sweep-{token}-tile{n}" for n in range(len(tiles))}
    last = f"sweep-{token}-tile{len(tiles) - 1}"
    plan = tiles[-1][0]
    axis = plan.axis
    for k, o in enumerate(plan.outputs):
        layer = {}
        owner = None
        if o.sink is None:
            owner = _tile_of_block(tiles, o)
            deps[o.name] = {f"sweep-{token}-tile{n}" for n in range(len(tiles))}
        else:
            deps[o.name] = tile_layers if at_once else {last}
        bnds = np.cumsum((0, *o.chunks[axis])).tolist()
        for idx in np.ndindex(*[len(c) for c in o.chunks]):
            key = (o.name, *idx)
            if owner is None:
                layer[key] = Task(key, _done, *(TaskRef(k) for k in after))
                continue
            n = owner[tuple(q for d, q in enumerate(idx) if d != axis)]
            tp = tiles[n][0]
            t = next(t for t, b in enumerate(tp.steps) if b >= bnds[idx[axis] + 1])
            layer[key] = Task(key, _extract_block, TaskRef((f"sweep-step-{token}-tile{n}", t)),
                              k, idx)
        layers[o.name] = MaterializedLayer(layer)
    return layers, deps


def _tile_of_block(tiles, o) -> dict:
    """In-plane block index -> the tile whose interior holds that block."""
    plan = tiles[0][0]
    axis = plan.axis
    dims = [d for d in range(len(o.chunks)) if d != axis]
    starts = {d: np.cumsum((0, *o.chunks[d])).tolist() for d in dims}
    owner = {}
    for idx in np.ndindex(*[len(o.chunks[d]) for d in dims]):
        for n, (tp, _) in enumerate(tiles):
            region = tp.info["tile_region"]
            if all(region[d][0] <= starts[d][q] < region[d][1] for d, q in zip(dims, idx)):
                owner[idx] = n
                break
    return owner


def _extract_block(step_result, k: int, idx: tuple[int, ...]):
    """Block ``idx`` of output ``k`` out of the planes its step emitted."""
    plan = step_result[2]
    a, planes = step_result[1][k]
    o = plan.outputs[k]
    offset = plan.info.get("tile_offset")  # a tile's planes start inside the array
    sl = []
    for d, q in enumerate(idx):
        c = o.chunks[d]
        s = sum(c[:q])
        if d == plan.axis:
            s -= a
        elif offset is not None:
            s -= offset[d]
        sl.append(slice(s, s + c[q]))
    return planes[tuple(sl)]
