"""Cut a sweep into segments that run at the same time on different workers or threads.

A sweep is a chain of slab tasks, each waiting for the previous one.  To use
several workers (or cores), the planes are cut into ``S`` contiguous
*segments*, each a chain of its own::

    planes  0 ─────────── P1 ─────────── P2 ─────────── N
    seg 0   [steps ......)
    seg 1            ░░░░[steps ......)          ░ warm-up: the pipeline's halo
    seg 2                           ░░░░[steps .......)   before P recomputed

A segment starting at plane ``P`` recomputes, in its first step, the planes
every stage needs before ``P`` (the windows downstream of it: the *warm-up*),
so its results are exactly those of one sweep from plane 0.  The price is
visible in ``explain``: the warm-up planes computed twice, and the source rows
they need read twice.  Segments start on a step boundary where every output
has a block (or chunk) boundary, so no block is shared by two chains.

Memory: segments running at once on one worker share its budget, so each is
sized for ``budget / concurrent``; the count is the largest (up to the
scheduler's slots, or ``sweep.segments``) whose segments fit that share and are
long enough for the warm-up to stay a small part of them.  Sweeps that carry
state along the axis (a periodic boundary along the sweep axis, a float uniform
filter's running sums) or read
sources that dask computes in its own order stay one chain.  (A source that
carries upstream values from row to row starts each segment with none: the
segment's first row recomputes them.)
"""

from __future__ import annotations

import bisect
from dataclasses import replace

from dask_sweep.plan.ir import Plan, Running, Source
from dask_sweep.runtime.executor import periodic_inputs

WARMUP_SHARE = 4
"""A segment is at least this many times its warm-up (so the recomputed planes stay
below a quarter of its work)."""


def why_one_chain(plan: Plan) -> str:
    """Why ``plan`` cannot be cut into segments ('' when it can)."""
    if any(periodic_inputs(st) for st in plan.stages):
        return "a periodic boundary along the sweep axis needs the far end first"
    for st in plan.stages:
        if isinstance(st, Running):
            return f"{st.label!r} carries its running sums from step to step"
    for st in plan.stages:
        if isinstance(st, Source) and st.external:
            return f"source {st.label!r} is computed by dask, in its own order"
    for o in plan.outputs:
        if getattr(o.sink, "one_chain", ""):
            return o.sink.one_chain
    return ""


def warmup(plan: Plan) -> int:
    """Planes a segment recomputes before its start (the deepest reach behind an output)."""
    return max((r[0] for r in plan.reach()), default=0)


def cut(plan: Plan, count: int) -> Plan:
    """``plan`` with its steps cut into (at most) ``count`` segments of about equal planes."""
    if count <= 1 or len(plan.steps) < 2 or why_one_chain(plan):
        return replace(plan, segments=())
    n = plan.extent
    common = set.intersection(*(set(o.grid(plan.axis)) for o in plan.outputs)) \
        if plan.outputs else set()
    # step t may start a segment if the previous step ends where every output has a cut
    starts = [t for t in range(1, len(plan.steps)) if plan.steps[t - 1] in common]
    if not starts:
        return replace(plan, segments=())
    planes = [plan.steps[t - 1] for t in starts]
    chosen: list[int] = []
    for k in range(1, count):
        i = bisect.bisect_left(planes, k * n / count)
        best = min((j for j in (i - 1, i) if 0 <= j < len(planes)),
                   key=lambda j: abs(planes[j] - k * n / count))
        if starts[best] not in chosen and (not chosen or starts[best] > chosen[-1]):
            chosen.append(starts[best])
    return replace(plan, segments=tuple(chosen))


def long_enough(plan: Plan, count: int) -> bool:
    """Whether ``count`` segments each span at least ``WARMUP_SHARE`` × the warm-up."""
    if count <= 1:
        return True
    return plan.extent / count >= max(1, WARMUP_SHARE * warmup(plan))


def extra_work(plan: Plan) -> tuple[int, int]:
    """``(planes recomputed, bytes read twice)`` by the segments' warm-ups (dry run)."""
    if not plan.segments:
        return 0, 0
    from dask_sweep.runtime.executor import dry_run

    one = dry_run(replace(plan, segments=()))
    many = dry_run(plan)
    return warmup(plan) * len(plan.segments), many.bytes_read - one.bytes_read
