"""Choose the slab steps of a plan and check them against the memory budget.

A step is ``T`` planes of the sweep axis; the stages' windows, not dask's
blocks, decide what a step holds.  For a candidate ``T`` the sweep is replayed
twice, dry:

1. with every ring transient, to read off how many planes each ring holds at
   most (its *span*) and which rings carry planes from one step to the next;
2. with those rings *folded* into buffers of exactly their span (see
   :mod:`dask_sweep.runtime.ring`), for the projected peak: buffers, the slab
   being computed, kernel temporaries, emitted planes and the writer's
   temporaries, plus ``runtime_overhead``.

The thickest ``T`` that fits is searched (:func:`thickest`), starting from
``target_slab_bytes`` of input per step (each task must amortise the
scheduler's per-task cost) and preferring multiples of the plan's *grain* (the
chunk rows every source, output and block-exact stage shares), so steps line
up with reads and writes.  The *floor* of a plan is its peak at one plane per
step: the smallest budget it accepts.  A budget below it is refused with the
floor and what sets it, before any I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn, TypeVar

from dask_sweep.errors import BudgetError
from dask_sweep.plan.ir import Blocked, Plan, Source
from dask_sweep.runtime.executor import Trace, dry_run
from dask_sweep.utils import format_bytes


def uniform_steps(n: int, planes: int) -> tuple[int, ...]:
    """Step bounds of ``planes`` planes each over ``n`` planes (the last one shorter).

    >>> uniform_steps(10, 4)
    (4, 8, 10)
    """
    planes = max(1, planes)
    out = list(range(planes, n, planes))
    return (*out, n) if n else (0,)


def input_bytes_per_plane(plan: Plan) -> int:
    return sum(st.plane_bytes(plan.axis) for st in plan.stages if isinstance(st, Source))


def grain(plan: Plan) -> int:
    """Planes per chunk row shared by every grid of the plan (1 when they disagree).

    Sources read whole chunk rows, outputs are written (or handed to dask) in
    theirs and block-exact stages compute dask's blocks: steps that are multiples
    of all of these never hold a partial row.

    >>> import numpy as np
    >>> from dask_sweep.plan.ir import Output, Plan, Source
    >>> src = Source("s", (16, 2), np.dtype("u1"), row_bounds=(0, 4, 8, 12, 16))
    >>> grain(Plan((src,), (Output(0, "o", ((8, 8), (2,))),), 0))
    8
    """
    if plan.extent <= 0:
        return 1
    widths = []
    grids = [st.row_bounds for st in plan.stages if isinstance(st, Source)]
    grids += [st.grid(plan.axis) for st in plan.stages if isinstance(st, Blocked)]
    grids += [o.grid(plan.axis) for o in plan.outputs]
    for g in grids:
        inner = [b for b in g if 0 < b < plan.extent]
        widths.append(math.gcd(*inner) if inner else plan.extent)
    g = 1
    for w in widths:
        g = g * w // math.gcd(g, w)
    return g if 0 < g <= plan.extent else 1


# sweep.runtime-overhead was measured on runs of graphs this large (a 256^3 TIFF stack of
# 256 planes: 512 keys, within it); the scheduler's bookkeeping of more keys is counted
KEYS_IN_RUNTIME_OVERHEAD = 512


def size_rings(plan: Plan, limit: int | None = None) -> tuple[Plan, Trace]:
    """The plan with its rings folded to their spans, and its dry-run trace (peak included).

    ``trace.peak`` includes ``plan.info["runtime_overhead"]`` and the scheduler's
    bookkeeping: ``plan.info["key_overhead"]`` for each key the graph keeps
    (``plan.info["graph_keys"]``) and each step, beyond the
    :data:`KEYS_IN_RUNTIME_OVERHEAD` that the runtime overhead covers.
    With ``limit``, the sized replay stops once its peak passes it (``trace.cut``:
    the peak is then a lower bound, enough to know the plan does not fit).
    """
    probe = dry_run(replace(plan, rings=()))
    rings = tuple(probe.span.get(j, 0) if j in probe.carried else 0
                  for j in range(len(plan.stages)))
    sized = replace(plan, rings=rings)
    # the runtime overhead, and what sinks hold beside every step (rows written in the
    # background: io.staging)
    background = [(k, getattr(o.sink, "background", 0)) for k, o in enumerate(plan.outputs)]
    background = [(k, b) for k, b in background if b]
    overhead = plan.info.get("runtime_overhead", 0) + sum(b for _, b in background)
    keys = plan.info.get("graph_keys", 0) + len(plan.steps)
    bookkeeping = max(0, keys - KEYS_IN_RUNTIME_OVERHEAD) * plan.info.get("key_overhead", 0)
    trace = dry_run(sized, limit=None if limit is None else limit - overhead - bookkeeping)
    trace.peak += overhead + bookkeeping
    trace.step_peaks = [p + overhead + bookkeeping for p in trace.step_peaks]
    if plan.info.get("runtime_overhead", 0):
        trace.peak_parts.append(("runtime overhead (sweep.runtime-overhead)",
                                 plan.info["runtime_overhead"]))
    for k, b in background:
        trace.peak_parts.append((f"output {k}: a row written in the background", b))
    if bookkeeping:
        trace.peak_parts.append((f"the scheduler's {keys} tasks (sweep.key-overhead each "
                                  f"beyond {KEYS_IN_RUNTIME_OVERHEAD})", bookkeeping))
    return sized, trace


T = TypeVar("T")


def thickest(attempt: Callable[[int], T], fits: Callable[[T], bool], hi: int) -> tuple[int, T]:
    """The largest ``rows`` in ``1..hi`` whose ``attempt(rows)`` fits, and that attempt.

    Peaks grow with the rows per step, so: try ``hi``; then halve until an
    attempt fits, and bisect between it and the last one that did not.  A
    budget that fits 3 rows gets 3, not 2, with about ``2 log2(hi)`` dry runs.
    When even one row does not fit, returns ``(1, attempt(1))``.

    >>> thickest(lambda r: r, lambda r: r * 10 <= 35, 8)
    (3, 3)
    """
    best = attempt(hi)
    if fits(best) or hi <= 1:
        return hi, best
    up = hi  # the smallest rows known not to fit
    rows = hi
    while rows > 1:
        rows = max(1, rows // 2)
        cand = attempt(rows)
        if fits(cand):
            break
        up = rows
    else:
        return 1, cand
    lo, best = rows, cand  # fits
    while up - lo > 1:
        mid = (lo + up) // 2
        cand = attempt(mid)
        if fits(cand):
            lo, best = mid, cand
        else:
            up = mid
    return lo, best


def describe_peak(trace: Trace, top: int = 4) -> str:
    """The largest parts of a trace's peak, in words.

    >>> tr = Trace(peak=30, peak_parts=[("ring of a", 10), ("ring of b", 20), ("c", 0)])
    >>> describe_peak(tr)
    'ring of b 20 B, ring of a 10 B'
    """
    parts = sorted((p for p in trace.peak_parts if p[1] > 0), key=lambda p: -p[1])
    shown = [f"{w} {format_bytes(v)}" for w, v in parts[:top]]
    rest = sum(v for _, v in parts[top:])
    if rest:
        shown.append(f"other {format_bytes(rest)}")
    return ", ".join(shown)


def uneven_rows(plan: Plan) -> tuple[int, ...] | None:
    """The row bounds (without 0) the plan's sources share, when those rows are uneven.

    A drop-in's output read as a source (label's slabs of 4 and 5 planes) has rows
    that no uniform step follows: steps of two planes or more straddle two rows,
    and one plane per step costs a task and a write per plane.  Steps of whole rows
    (:func:`row_steps`) follow them.  None when the sources have no rows, several
    grids, or rows of one width (whole multiples of it are uniform steps already).

    >>> import numpy as np
    >>> from dask_sweep.plan.ir import Output, Plan, Source
    >>> src = Source("s", (9, 2), np.dtype("u1"), row_bounds=(0, 5, 9))
    >>> uneven_rows(Plan((src,), (Output(0, "o", ((5, 4), (2,))),), 0))
    (5, 9)
    """
    grids = {st.row_bounds for st in plan.stages if isinstance(st, Source) and st.row_bounds}
    if len(grids) != 1:
        return None
    (g,) = grids
    rows = tuple(b for b in g if b > 0)
    if not rows or g[0] != 0 or rows[-1] != plan.extent:
        return None
    widths = {b - a for a, b in zip((0, *rows), rows)}
    return rows if len(widths) > 1 else None


def row_steps(rows: tuple[int, ...], k: int) -> tuple[int, ...]:
    """Step bounds of ``k`` whole rows each (the last step takes what is left).

    >>> row_steps((4, 9, 13, 18, 22), 2)
    (9, 18, 22)
    """
    k = max(1, k)
    out = rows[k - 1 :: k]
    return out if out and out[-1] == rows[-1] else (*out, rows[-1])


def floor(plan: Plan) -> tuple[Plan, Trace]:
    """The plan at its thinnest steps and its trace: the smallest budget
    (:func:`thinnest` of the returned plan says which steps).

    One plane per step; one row per step where the sources' rows are uneven and that
    holds less (a step within a row holds the whole row beside its planes); or a few
    planes per step where one plane a step costs more than it saves (a long sweep's
    bookkeeping: the scheduler keeps each step's task).
    """
    return lowest_peak(lambda steps: size_rings(replace(plan, steps=steps)), plan.extent,
                       uneven_rows(plan))


def lowest_peak(run: Callable[[tuple[int, ...]], tuple[Plan, Trace]], n: int,
                rows: tuple[int, ...] | None) -> tuple[Plan, Trace]:
    """The attempt ``run(steps)`` of the lowest peak among thin steps over ``n`` planes:
    one plane per step, then twice as many planes while the peak falls, and one row
    per step of ``rows`` (uneven rows) if given."""
    best = prev = run(uniform_steps(n, 1))
    k = 1
    while 2 * k <= n:
        k *= 2
        cand = run(uniform_steps(n, k))
        if cand[1].peak < best[1].peak:
            best = cand
        if cand[1].peak >= prev[1].peak:
            break
        prev = cand
    if rows is not None:
        cand = run(row_steps(rows, 1))
        if cand[1].peak < best[1].peak:
            best = cand
    return best


def thinnest(plan: Plan) -> str:
    """The steps of a :func:`floor` plan, in words."""
    widths = [b - a for a, b in zip((0, *plan.steps), plan.steps)]
    if len(set(widths[:-1] or widths)) > 1:
        return "one row per step"
    return "one plane per step" if widths[0] == 1 else f"{widths[0]} planes per step"


def choose_steps(plan: Plan, target_slab_bytes: int, segments: int = 1,
                 floor_first: bool = False, exact: bool = True) -> tuple[Plan, Trace]:
    """Return the plan with steps and rings set, and its dry-run trace.

    ``segments``: cut the steps into that many chains (see
    :mod:`dask_sweep.passes.segments`); every chain's warm-up is in the trace.
    ``floor_first``: try one plane per step first, so that a plan that cannot fit
    is refused after one attempt, not a search (for callers that try many plans).
    ``exact``: a refusal quotes the whole floor; else (for callers that drop most
    refusals) the peak up to where the replay passed the budget, a lower bound.

    Raises
    ------
    BudgetError
        When not even the floor's steps (:func:`floor`) fit ``plan.budget`` (the
        message quotes the floor, its steps and what sets it).
    """
    from dask_sweep.passes.segments import cut

    n = plan.extent
    per_plane = max(1, input_bytes_per_plane(plan))
    hi = max(1, min(n, int(target_slab_bytes // per_plane)))
    g = grain(plan)

    def attempt(planes: int, limit: int | None = plan.budget) -> tuple[Plan, Trace]:
        # a refused attempt stops at its first step over the budget (a lower bound)
        return size_rings(cut(replace(plan, steps=uniform_steps(n, planes)), segments), limit)

    def fits(c: tuple[Plan, Trace]) -> bool:
        return c[1].peak <= plan.budget

    # uneven rows (a drop-in's slabs): steps of whole rows are tried too, where a row
    # is within the target (a step per plane would cost a task and a write per plane)
    rows = uneven_rows(plan)
    widest = 0 if rows is None else max(b - a for a, b in zip((0, *rows), rows))
    if widest > hi:
        rows = None

    def by_rows(k: int, limit: int | None = plan.budget) -> tuple[Plan, Trace]:
        return size_rings(cut(replace(plan, steps=row_steps(rows, k)), segments), limit)

    def refuse() -> tuple[Plan, Trace]:
        # quoting the whole floor unless told a lower bound will do; the floor's steps
        # are returned where they fit (a long sweep's bookkeeping: a few planes per step
        # can fit where one plane and the thicker steps searched do not), so that a
        # budget of the floor quoted always plans
        if lowest is not None and not (lowest[1].cut and exact):
            _refuse(plan, lowest[1], thinnest(lowest[0]))
        at = lowest_peak(lambda steps: size_rings(cut(replace(plan, steps=steps), segments)),
                         n, rows)
        if fits(at):
            return at
        _refuse(plan, at[1], thinnest(at[0]))

    lowest = None
    if floor_first and hi > 1:
        # one row per step, and one plane: a step within a row can need more than a
        # whole row (a row held for its planes beside a partial output row), or less
        rowwise = attempt(g) if 1 < g <= hi else by_rows(1) if rows is not None else None
        if rowwise is None or not fits(rowwise):
            lowest = attempt(1)
            if not fits(lowest):
                return refuse()
    if 1 < g <= hi:
        _, best = thickest(lambda u: attempt(u * g), fits, hi // g)
        if fits(best):
            return best
        hi = g - 1
    _, lowest = thickest(attempt, fits, hi)
    if rows is not None:
        _, aligned = thickest(by_rows, fits, max(1, hi // widest))
        # the fewer steps of the two that fit (each costs a task, a write per output)
        if fits(aligned) and (not fits(lowest) or len(aligned[0].steps) <= len(lowest[0].steps)):
            return aligned
    if fits(lowest):
        return lowest
    return refuse()


def _refuse(plan: Plan, trace: Trace, steps: str = "one plane per step") -> NoReturn:
    """Raise the error of a plan whose floor (``trace``, at ``steps``) does not fit."""
    raise BudgetError(
        f"dask_sweep: the sweep needs at least {format_bytes(trace.peak)} (its floor, "
        f"{steps}), more than the memory budget of {format_bytes(plan.budget)}. "
        f"At the peak, while {_while(trace)}: {describe_peak(trace)}. Raise "
        f"sweep.memory-limit to at least {format_bytes(trace.peak)} "
        "(dask_sweep.enable(memory_limit=...)), or use thinner chunks along the sweep axis.",
        stage=trace.peak_stage, projected=trace.peak, budget=plan.budget,
    )


def _while(trace: Trace) -> str:
    s = trace.peak_stage
    return s if s.startswith("writing") else f"computing stage {s!r}"

