"""``explain(x)``: what the sweep will do with a collection, before any I/O.

Prints, per swept region, a loop nest in the spirit of Halide's schedules::

    sweep along axis 0: 24 steps of ~16 planes (2 slab tasks per step ...)
      for each step:
        read   from-zarr   (chunk rows of 16 planes, 4.0 MiB each)   ring 8.0 MiB
        stage  gaussian    window -8/+8 planes, free slabs          ring 12.0 MiB
        ...
    projected peak 52 MiB of 512 MiB budget; bytes read / input bytes = 1.00

and every part of the graph left to stock dask, with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import dask

from dask_sweep.config import SweepSettings
from dask_sweep.passes.slabs import describe_peak, floor
from dask_sweep.plan.ir import Blocked, Identity, Kernel, Pointwise, Source
from dask_sweep.utils import format_bytes


def _planes(n: int) -> str:
    """``'1 plane'``, ``'8 planes'``."""
    return f"{n} plane{'s' * (n != 1)}"


class Explanation:
    """Text (``str``) and HTML (notebook) view of a sweep analysis."""

    def __init__(self, result, ntasks_before: int, with_floor: bool = True) -> None:
        self.result = result
        self.ntasks_before = ntasks_before
        self.with_floor = with_floor
        self._floors: dict = {}
        self.shown = None  # the settings in force (the analysis ran with fallback silent)

    @property
    def plans(self):
        return [p for p, _ in self.result.plans]

    @property
    def fallbacks(self):
        return self.result.fallbacks

    def _floor(self, n: int):
        if n not in self._floors:
            self._floors[n] = floor(self.result.plans[n][0])[1]
        return self._floors[n]

    @staticmethod
    def _segment_lines(plan) -> list[str]:
        where = plan.info.get("slots")
        if where is None:
            return []
        count = plan.info.get("segments", 1)
        if count <= 1:
            why = plan.info.get("one_chain") or (
                "one chain fits best" if where.total > 1 else "one slot")
            return [f"  one chain ({where.describe()}: {why})"]
        from dask_sweep.passes.segments import extra_work

        starts = [plan.steps[t - 1] for t in plan.segments]
        planes, reread = extra_work(plan)
        return [
            f"  {count} segments (chains run at once: {where.describe()}), starting at planes "
            f"{', '.join(map(str, starts))}; each worker runs {plan.info['together']} at a "
            f"time within its budget of {format_bytes(plan.info['worker_budget'])} "
            f"({format_bytes(plan.budget)} per chain)",
            f"  segment warm-ups: {planes} planes of the pipeline recomputed, "
            f"{format_bytes(reread)} of source rows read twice",
        ]

    def floors(self) -> list[int]:
        """Per sweep, its floor: the smallest budget it accepts (one plane per step).

        A tiled sweep's floor is that of its largest tile at its tiling.
        """
        out = []
        for n, (plan, _) in enumerate(self.result.plans):
            tiles = plan.info.get("tile_plans")
            out.append(max(floor(p)[1].peak for p, _ in tiles) if tiles
                       else self._floor(n).peak)
        return out

    def lines(self) -> list[str]:
        out: list[str] = []
        s = self.result.settings
        if not self.result.plans:
            out.append("dask_sweep: nothing swept; the graph runs as stock dask.")
        for n, (plan, trace) in enumerate(self.result.plans):
            ax = plan.axis
            steps = plan.steps
            widths = [b - a for a, b in zip((0, *steps[:-1]), steps)]
            in_bytes = sum(
                sum(st.bytes_per_row) for st in plan.stages if isinstance(st, Source)
            )
            ratio = trace.bytes_read / in_bytes if in_bytes else float("nan")
            size = (_planes(min(widths)) if min(widths) == max(widths)
                    else f"{min(widths)}-{max(widths)} planes")
            out.append(
                f"sweep {n}: along axis {ax} over {plan.extent} planes in {len(steps)} "
                f"step{'s' * (len(steps) != 1)} of {size}; {plan.threads} "
                f"thread{'s' * (plan.threads != 1)} per step"
            )
            out.extend(self._segment_lines(plan))
            out.append(f"  {'':5} {'stage':<22} {'':8}{'what':<60} ring")
            for j, st in enumerate(plan.stages):
                cap = plan.rings[j] if plan.rings else 0
                ring = (f"{cap} planes, {format_bytes(trace.ring_peak.get(j, 0))}" if cap
                        else "transient")
                label = st.label.removeprefix("read ")
                if isinstance(st, Source):
                    rb = st.row_bounds
                    rows = [b - a for a, b in zip(rb[:-1], rb[1:])]
                    how = "from upstream tasks" if st.external else "inline, in the slab task"
                    if getattr(st.reader, "free", False):
                        what = ("read    any planes, by their byte ranges in the chunk files "
                                f"({how})")
                    else:
                        what = (f"read    {len(rows)} chunk row{'s' * (len(rows) != 1)} of "
                                f"{_planes(max(rows))} ({how})")
                elif isinstance(st, Kernel):
                    d = st.depth[ax]
                    bnd = set(st.boundary)
                    what = (f"kernel  window -{d}/+{d}, halo {st.depth}, boundary "
                            f"{bnd.pop() if len(bnd) == 1 else st.boundary}, any slab")
                elif isinstance(st, Pointwise):
                    what = "map     elementwise, any slab"
                elif isinstance(st, Identity):
                    what = "rechunk identity on planes"
                elif isinstance(st, Blocked):
                    w = [st.window(i) for i in range(len(st.inputs))]
                    lo = max(x[0] for x in w)
                    hi = max(x[1] for x in w)
                    nb = 1
                    for c in st.chunks:
                        nb *= len(c)
                    what = (f"blocks  {st.kind}, window -{lo}/+{hi}, on dask's {nb} blocks "
                            "exactly (an opaque function: its block row is part of the floor)")
                else:  # pragma: no cover
                    what = type(st).__name__
                ins = ",".join(str(i) for i in st.inputs)
                what += f" <- [{ins}]" if ins else ""
                out.append(f"  [{j:>2}] {label:<22.22} {what:<68} {ring}")
            for o in plan.outputs:
                out.append(f"  out [{o.stage}] {plan.stages[o.stage].label}: {_output(o)}")
            budget = plan.budget
            out.append(
                f"  projected peak {format_bytes(trace.peak)} of {format_bytes(budget)} budget "
                f"({100 * trace.peak / budget:.0f}%; incl. "
                f"{format_bytes(plan.info.get('runtime_overhead', 0))} runtime overhead), "
                f"at stage {trace.peak_stage!r}; "
                f"held between steps <= {format_bytes(max(trace.held_after or [0]))}"
            )
            nkeys = sum(math.prod(len(c) for c in o.chunks) for o in plan.outputs)
            before = ("" if self.ntasks_before is None
                      else f", where dask's graph had {self.ntasks_before} tasks")
            out.append(
                f"  slabs in flight: 1 step per chain (+ carried rings); tasks: "
                f"{len(steps)} sweep steps and {nkeys} output keys{before}"
            )
            out.append(f"  expected bytes read / input bytes = {ratio:.3f} "
                       f"({format_bytes(trace.bytes_read)} of {format_bytes(in_bytes)})")
            counts: dict = {}
            for step_rows in trace.rows_read:
                for jr in step_rows:
                    counts[jr] = counts.get(jr, 0) + 1
            if counts:
                vals = list(counts.values())
                free = any(getattr(st.reader, "free", False) for st in plan.stages
                           if isinstance(st, Source))
                out.append(f"  predicted reads per {'plane' if free else 'chunk row'}: max "
                           f"{max(vals)}, mean {sum(vals) / len(vals):.2f} (in disk order)")
            tiling = plan.info.get("tiling")
            if tiling:
                counts = "x".join(str(c) for i, c in enumerate(tiling["counts"]) if i != ax)
                at_once = plan.info.get("tiles_at_once", 1)
                how = (f"at once over the workers ({at_once} threads), each within its "
                       f"worker's share of the budget, {format_bytes(plan.budget)}"
                       if at_once > 1 else "one after the other")
                out.append(
                    f"  tiled in-plane: one row of chunks does not fit, so {tiling['tiles']} "
                    f"tiles ({counts}) with halo {tiling['halo']} are swept {how} "
                    f"(the stages above describe tile 0); peak of the largest tile "
                    f"{format_bytes(tiling['peak'])}")
                out.append(
                    f"  predicted reads per chunk over all tiles: max {tiling['reads_max']}, "
                    f"mean {tiling['reads_mean']:.2f}; bytes read / input bytes = "
                    f"{tiling['bytes_read'] / tiling['input_bytes']:.3f}")
            if self.with_floor and "tiling" not in plan.info:
                ft = self._floor(n)
                out.append(f"  floor (smallest budget, one plane per step): "
                           f"{format_bytes(ft.peak)}; set by {describe_peak(ft)}")
            for note in plan.notes:
                out.append(f"  note: {note}")
        for fb in self.result.fallbacks:
            out.append(f"left to stock dask: {fb.where}: {fb.reason}")
        if s is not None:
            shown = self.shown or s
            seg = "auto" if shown.segments is None else shown.segments
            out.append(f"settings: memory_limit={format_bytes(shown.memory_limit)}, "
                       f"fallback={shown.fallback}, threads={shown.threads}, "
                       f"segments={seg}, reblock={shown.reblock}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        """A table per sweep (stages, windows, rings), its budget bar, and the fallbacks."""
        from html import escape as e

        parts = ['<div class="dask-sweep-explain" style="font-family:sans-serif">']
        for n, (plan, trace) in enumerate(self.result.plans):
            floor_bytes = None if "tiling" in plan.info else self._floor(n).peak
            parts.append(f"<h4>sweep {n}: axis {plan.axis}, {plan.extent} planes, "
                         f"{len(plan.steps)} steps</h4>")
            parts.append(_budget_bar(trace.peak, plan.budget, floor_bytes))
            parts.append("<table><tr><th>#</th><th>stage</th><th>kind</th>"
                         "<th>window</th><th>ring</th><th>inputs</th></tr>")
            for j, st in enumerate(plan.stages):
                win = ", ".join(f"-{lo}/+{hi}" for lo, hi in
                                (st.window(i) for i in range(len(st.inputs)))) or "-"
                cap = plan.rings[j] if plan.rings else 0
                ring = (f"{cap} planes, {format_bytes(trace.ring_peak.get(j, 0))}" if cap
                        else "transient")
                parts.append(
                    f"<tr><td>{j}</td><td>{e(st.label)}</td><td>{e(_kind(st))}</td>"
                    f"<td>{win}</td><td>{ring}</td>"
                    f"<td>{', '.join(map(str, st.inputs))}</td></tr>")
            parts.append("</table><ul>")
            for o in plan.outputs:
                parts.append(f"<li>{e(plan.stages[o.stage].label)}: {e(_output(o))}</li>")
            parts.append("</ul>")
        if not self.result.plans:
            parts.append("<p>nothing swept; the graph runs as stock dask.</p>")
        if self.result.fallbacks:
            parts.append("<p>left to stock dask:</p><ul>")
            for fb in self.result.fallbacks:
                parts.append(f"<li><code>{e(fb.where)}</code>: {e(fb.reason)}</li>")
            parts.append("</ul>")
        parts.append(f"<details><summary>as text</summary><pre>{e(str(self))}</pre>"
                     "</details></div>")
        return "".join(parts)


def _kind(st) -> str:
    return {Source: "read", Kernel: "kernel", Pointwise: "elementwise", Identity: "rechunk",
            Blocked: "dask's blocks"}.get(type(st), type(st).__name__.lower())


def _output(o) -> str:
    """Where an output goes, in the user's terms (the dask key in parentheses)."""
    sink = o.sink
    if sink is None:
        return f"dask blocks, returned by compute/persist ({o.name})"
    file_sink = getattr(getattr(sink, "target", None), "sink", None)
    if getattr(file_sink, "fsync", False):  # a dask_sweep.io sink: when writes are durable
        return (f"written in the slab task to {file_sink.path}, synced in groups of "
                f"{format_bytes(file_sink.sync_bytes)} on a helper thread")
    planes = getattr(sink, "planes", None)
    if planes is not None:
        return f"written in the slab task to {planes.path}, by planes ({o.name})"
    target = getattr(sink, "target", None)
    where = (getattr(target, "store_path", None) or type(target).__name__) if target is not None \
        else "the store"
    return f"written in the slab task to {where} ({o.name})"


def _budget_bar(peak: int, budget: int, floor_bytes: int | None) -> str:
    """An HTML bar: the projected peak (and the floor) against the budget."""
    w = max(1.0, budget)
    frac = min(1.0, peak / w)
    mark = ""
    if floor_bytes is not None:
        mark = (f'<div style="position:absolute;left:{100 * min(1.0, floor_bytes / w):.1f}%;'
                'top:0;bottom:0;border-left:2px dashed #333" title="floor"></div>')
    label = (f"projected peak {format_bytes(peak)} of {format_bytes(budget)}"
             + (f"; floor {format_bytes(floor_bytes)}" if floor_bytes is not None else ""))
    return ('<div style="position:relative;width:28em;height:1.2em;background:#eee;'
            'border:1px solid #999">'
            f'<div style="width:{100 * frac:.1f}%;height:100%;background:#4c9be8"></div>'
            f'{mark}</div><div style="font-size:90%">{label}</div>')


def explain(x: Any, **settings: Any) -> Explanation:
    """Explain how dask_sweep would run ``x`` (a dask array or xarray object).

    Parameters
    ----------
    x
        A dask collection.
    **settings
        Overrides of the ``sweep.*`` settings (``memory_limit=...``).  When a
        sweep pass is active (``enable``), its settings are used.

    Returns
    -------
    Explanation
        ``print()`` it, or display it in a notebook.
    """
    from dask_sweep.integration.optimize import SweepPass, _Chained

    if not dask.is_dask_collection(x):
        from dask_sweep.errors import SweepConfigError

        raise SweepConfigError(f"explain() expects a dask collection. Got {type(x).__name__}.")
    active = dask.config.get("array_optimize", None)
    if isinstance(active, _Chained) and isinstance(active.first, SweepPass) and not settings:
        s = active.first.settings()
    else:
        s = SweepSettings.resolve(**settings)
    shown = s  # what is in force; the analysis itself never raises or warns
    from dask_sweep.integration.expr import analyse_collection  # either dask array mode
    from dask_sweep.patterns.expr import array_expr_of

    # a HighLevelGraph counts its tasks cheaply; an expression would be lowered and
    # materialised only to count them (seconds for thousands of blocks): not counted
    ntasks = len(x.__dask_graph__()) if array_expr_of(x) is None else None
    out = Explanation(analyse_collection(x, s.with_(fallback="silent")), ntasks)
    out.shown = shown
    return out
