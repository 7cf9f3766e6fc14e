"""Choose the slab steps of a plan and check them against the memory budget.

Steps are cut on the outputs' chunk boundaries.  We start from the thickness
that gives each slab task about ``target_slab_bytes`` of input (so each task
amortises the scheduler's per-task cost), replay the sweep dry to get its
projected peak, and search (:func:`thickest`) for the thickest step that fits
the budget.  If even one chunk row per step does not fit, the plan is refused
with the stage that peaks, the projected bytes and the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np

from dask_sweep.errors import BudgetError
from dask_sweep.plan.ir import Plan, Source
from dask_sweep.runtime.executor import Trace, dry_run
from dask_sweep.utils import format_bytes


def _grid(plan: Plan) -> list[int]:
    """Plane indices where every output has a chunk boundary."""
    n = plan.extent
    sets = []
    for o in plan.outputs:
        sets.append(set(o.grid(plan.axis)))
    common = set.intersection(*sets) if sets else {0, n}
    return sorted(common | {n})


def steps_for(plan: Plan, rows_per_step: int) -> tuple[int, ...]:
    grid = _grid(plan)[1:]
    out = [grid[i] for i in range(rows_per_step - 1, len(grid), rows_per_step)]
    if not out or out[-1] != plan.extent:
        out.append(plan.extent)
    return tuple(out)


def input_bytes_per_plane(plan: Plan) -> int:
    return sum(st.plane_bytes(plan.axis) for st in plan.stages if isinstance(st, Source))


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


def choose_steps(plan: Plan, target_slab_bytes: int) -> tuple[Plan, Trace]:
    """Return the plan with steps set, and its dry-run trace.

    Raises
    ------
    BudgetError
        When one chunk row per step still exceeds ``plan.budget``.
    """
    grid = _grid(plan)
    widths = np.diff(grid)
    mean_rows = float(np.mean(widths)) if len(widths) else 1.0
    per_plane = max(1, input_bytes_per_plane(plan))
    rows = max(1, int(target_slab_bytes // max(1.0, per_plane * mean_rows)))
    rows = min(rows, max(1, len(widths)))

    def attempt(r: int) -> tuple[Plan, Trace]:
        cand = replace(plan, steps=steps_for(plan, r))
        trace = dry_run(cand)
        trace.peak += plan.info.get("runtime_overhead", 0)
        return cand, trace

    _, (cand, trace) = thickest(attempt, lambda c: c[1].peak <= plan.budget, rows)
    if trace.peak > plan.budget:
        raise BudgetError(
            f"dask_sweep: the sweep needs at least {format_bytes(trace.peak)} (peak at stage "
            f"{trace.peak_stage!r}, with one chunk row of {int(mean_rows)} planes per step), "
            f"more than the memory budget of {format_bytes(plan.budget)}. Raise "
            "sweep.memory-limit (dask_sweep.enable(memory_limit=...)) or use thinner chunks "
            "along the sweep axis.",
            stage=trace.peak_stage, projected=trace.peak, budget=plan.budget,
        )
    return cand, trace
