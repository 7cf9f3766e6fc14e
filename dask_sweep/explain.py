"""``explain(x)``: what the sweep will do with a collection, before any I/O.

Prints, per swept region, a loop nest in the spirit of Halide's schedules
(the lines are :mod:`dask_sweep.plan.printer`'s, shared with the DSL)::

    sweep 0: along axis 0 over 64 planes in 4 steps of 16 planes; 2 threads per step
      [ 0] array    read    8 chunk rows of 8 planes (inline, in the slab task)    2.00 MiB
      [ 1] gaussian kernel  window -4/+4, halo (4, 4, 4), boundary none, any slab, ...
      ...
      projected peak 13.00 MiB of 16.00 MiB budget (81%; incl. 3.00 MiB runtime overhead), ...
      expected bytes read / input bytes = 1.000 (2.00 MiB of 2.00 MiB)
      floor (smallest budget, one plane per step): 5.27 MiB; set by ...

and every part of the graph left to stock dask, with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import dask

from dask_sweep.config import SweepSettings
from dask_sweep.passes.slabs import describe_peak, floor, thinnest
from dask_sweep.plan import printer
from dask_sweep.plan.ir import DROPIN_PLAN, EXPR_ANNOTATIONS, Source
from dask_sweep.utils import format_bytes


class Explanation(printer.Printout):
    """Text (``str``) and HTML (notebook) view of a sweep analysis."""

    def __init__(self, result, ntasks_before: int, with_floor: bool = True) -> None:
        self.result = result
        self.ntasks_before = ntasks_before
        self.with_floor = with_floor
        self._floors: dict = {}
        self.shown = None  # the settings in force (the analysis ran with fallback silent)
        self.dropins: dict = {}  # layer -> a drop-in's own plan (left to dask as it is)

    @property
    def plans(self):
        return [p for p, _ in self.result.plans]

    @property
    def fallbacks(self):
        return self.result.fallbacks

    def _floor(self, n: int):
        if n not in self._floors:
            self._floors[n] = floor(self.result.plans[n][0])
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
        """Per sweep, its floor: the smallest budget it accepts (one plane, or one row of
        uneven rows, per step).

        A tiled sweep's floor is that of its largest tile at its tiling.
        """
        out = []
        for n, (plan, _) in enumerate(self.result.plans):
            tiles = plan.info.get("tile_plans")
            out.append(max(floor(p)[1].peak for p, _ in tiles) if tiles
                       else self._floor(n)[1].peak)
        return out

    def lines(self) -> list[str]:
        out: list[str] = []
        s = self.result.settings
        if not self.result.plans:
            out.append("dask_sweep: nothing swept by the plugin; the graph runs as dask built "
                       "it." if self.dropins else
                       "dask_sweep: nothing swept; the graph runs as stock dask.")
        for n, (plan, trace) in enumerate(self.result.plans):
            ax = plan.axis
            in_bytes = sum(
                sum(st.bytes_per_row) for st in plan.stages if isinstance(st, Source)
            )
            out.append(f"sweep {n}: {printer.sweep_summary(plan)}")
            out.extend(self._segment_lines(plan))
            out += printer.sweep_lines(plan, trace, _output)
            nkeys = sum(math.prod(len(c) for c in o.chunks) for o in plan.outputs)
            before = ("" if self.ntasks_before is None
                      else f", where dask's graph had {self.ntasks_before} tasks")
            out.append(
                f"  slabs in flight: 1 step per chain (+ carried rings); tasks: "
                f"{len(plan.steps)} sweep steps and {nkeys} output keys{before}"
            )
            out.append("  expected" + printer.io_line(trace.bytes_read, in_bytes)[1:])
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
                fp, ft = self._floor(n)
                out.append(f"  floor (smallest budget, {thinnest(fp)}): "
                           f"{format_bytes(ft.peak)}; set by {describe_peak(ft)}")
            for note in plan.notes:
                out.append(f"  note: {note}")
        for fb in self.result.fallbacks:
            if fb.where not in self.dropins:
                out.append(f"left to stock dask: {fb.where}: {fb.reason}")
        for where, plan in self.dropins.items():
            out.append(f"drop-in {where}: its own sweep, planned when it was called "
                       "(its tasks run as they are):")
            out.extend("  " + line for line in plan.explain().splitlines())
        if s is not None:
            shown = self.shown or s
            seg = "auto" if shown.segments is None else shown.segments
            out.append(f"settings: memory_limit={format_bytes(shown.memory_limit)}, "
                       f"fallback={shown.fallback}, threads={shown.threads}, "
                       f"segments={seg}, reblock={shown.reblock}")
        return out

    def html_blocks(self) -> list[str]:
        """A table per sweep (stages, windows, rings), its budget bar, and the fallbacks."""
        from html import escape as e

        parts = []
        for n, (plan, trace) in enumerate(self.result.plans):
            floor_bytes = None if "tiling" in plan.info else self._floor(n)[1].peak
            parts.append(printer.sweep_html(
                f"sweep {n}: axis {plan.axis}, {plan.extent} planes, {len(plan.steps)} steps",
                plan, trace, _output, floor_bytes))
        if not self.result.plans:
            parts.append("<p>nothing swept by the plugin; the graph runs as dask built it.</p>"
                         if self.dropins else
                         "<p>nothing swept; the graph runs as stock dask.</p>")
        left = [fb for fb in self.result.fallbacks if fb.where not in self.dropins]
        for where, plan in self.dropins.items():
            parts.append(f"<p>drop-in <code>{e(where)}</code>: its own sweep, planned when "
                         f"it was called (its tasks run as they are):</p>"
                         f"<pre>{e(plan.explain())}</pre>")
        if left:
            parts.append("<p>left to stock dask:</p><ul>")
            for fb in left:
                parts.append(f"<li><code>{e(fb.where)}</code>: {e(fb.reason)}</li>")
            parts.append("</ul>")
        return parts


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
    graph = x.__dask_graph__() if array_expr_of(x) is None else None
    ntasks = len(graph) if graph is not None else None
    out = Explanation(analyse_collection(x, s.with_(fallback="silent")), ntasks)
    out.shown = shown
    out.dropins = _dropin_plans(x, graph)
    return out


def _dropin_plans(x, graph) -> dict:
    """``{layer: plan}`` of the drop-ins' outputs (``ndimage.label``, ...) in ``x``'s graph
    (or expression): their own sweeps, left to dask as they are, which ``explain`` prints."""
    if graph is not None:
        anns = {n: getattr(lay, "collection_annotations", None) or {}
                for n, lay in graph.layers.items()}
    else:  # an expression: a drop-in's output is a FromGraph (see emit.io_graphs.array_of)
        from dask_sweep.patterns.expr import array_expr_of

        anns = {node._name: EXPR_ANNOTATIONS.get(node.operand("name_prefix"), {})
                for node in array_expr_of(x).walk()
                if type(node).__name__ == "FromGraph"}
    return {n: a[DROPIN_PLAN] for n, a in anns.items() if a.get(DROPIN_PLAN) is not None}
