"""A resumed write sweeps only the planes its output has not recorded.

An output whose store target records what an earlier, interrupted run wrote
(``recorded_planes``: ``dask_sweep.io``'s sinks, as ``imwrite(..., resume=True)``
hands them to the sweep) tells the planner which plane ranges are done.  The
steps are cut at the edges of every range still to do, each such range starts a
segment of its own (warming up on its halo, like any segment, so the results are
those of a sweep from plane 0), and the segments that lie wholly inside recorded
ranges are marked ``plan.info["skip"]``: the emitter schedules no task for them,
so neither their reads nor the user's functions run again::

    planes  0 ────── 40 ────── 80 ────── 120 ────── 160
    record  [ done  )          [  done    )
    chains  (skipped)░░[ sweep )(skipped)  ░░[ sweep )     ░ warm-up

Smaller steps hold no more than the sized ones; the re-cut plan is dry-run again
and kept only if it still fits the budget (otherwise the whole sweep runs, and
``imwrite`` falls back to its slab chain).
"""

from __future__ import annotations

from dataclasses import replace

from dask_sweep.passes.segments import why_one_chain
from dask_sweep.passes.slabs import size_rings
from dask_sweep.plan.ir import Plan
from dask_sweep.runtime.executor import Trace
from dask_sweep.utils import merge_ranges, range_gaps


def recorded_planes(plan: Plan) -> list[tuple[int, int]] | None:
    """Plane ranges every output has recorded, or ``None`` if an output records nothing."""
    common = None
    for o in plan.outputs:
        target = getattr(o.sink, "target", None)
        rec = getattr(target, "recorded_planes", None)
        if rec is None or getattr(o.sink, "region", None):
            return None
        rec = merge_ranges(rec)
        if common is None:
            common = rec
        else:  # planes recorded by all outputs
            common = merge_ranges((max(a, c), min(b, d)) for a, b in common for c, d in rec
                            if max(a, c) < min(b, d))
    return common


def skip_recorded(plan: Plan, trace: Trace) -> tuple[Plan, Trace]:
    """``plan`` re-cut so that recorded plane ranges are not swept (see the module doc).

    Returns ``(plan, trace)`` unchanged when no output records anything, or when
    the sweep cannot start mid-way (``why_one_chain``), or the re-cut plan does not
    fit the budget.
    """
    done = recorded_planes(plan)
    if not done or plan.axis != 0 or why_one_chain(plan):
        return plan, trace
    n = plan.extent
    todo = range_gaps(done, n)
    grids = set.intersection(*(set(o.grid(plan.axis)) for o in plan.outputs))
    if any(a not in grids or b not in grids for a, b in todo):
        return plan, trace  # a record off the outputs' grid: sweep everything
    edges = {e for r in todo for e in r}
    steps = tuple(sorted((set(plan.steps) | edges) - {0}))
    # chains start at the sizer's segment starts and at every edge of a range to do
    starts = {plan.steps[t - 1] for t in plan.segments} | (edges - {0, n})
    segments = tuple(sorted(steps.index(p) + 1 for p in starts))
    cand = replace(plan, steps=steps, segments=segments, rings=(), info=dict(plan.info))
    sized, tr = size_rings(cand)
    if tr.peak > plan.budget:
        return plan, trace
    skip = []
    for k, seg in enumerate(sized.segment_steps()):
        a = sized.steps[seg[0] - 1] if seg[0] else 0
        b = sized.steps[seg[-1]]
        if any(x <= a and b <= y for x, y in done):
            skip.append(k)
    swept = n - sum(b - a for a, b in done)
    sized = sized.with_info(skip=tuple(skip), segments=len(segments) + 1, resumed=tuple(done))
    note = (f"resumed write: planes {', '.join(f'{a}-{b}' for a, b in done)} are recorded "
            f"and not recomputed; {swept} of {n} planes swept in {len(todo)} range(s), "
            f"each warming up on its halo")
    return replace(sized, notes=(*sized.notes, note)), tr
