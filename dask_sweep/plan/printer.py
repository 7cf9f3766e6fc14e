"""The one printer of sized plans: text and HTML for the plugin, the DSL and the drop-ins.

Every front end prints its sweeps with the same lines, so a stage, a ring or a
projected peak reads the same whichever front end planned it::

    <header of the front end: "sweep 0: ..." or "pass 1 of 3: sweep ...">
      [ j] stage label            what the stage does, its window       ring
      out [j] label: where the output goes
      projected peak P of B budget (x%; incl. R runtime overhead), at stage ...
      bytes read / input bytes = 1.000 (R of I)

and a table pass (``ndimage.label`` / ``distance_transform_edt`` and the DSL's
label and EDT) with :func:`table_plan_lines`.  A front end's explanation is a
:class:`Printout`: it lists its lines and its HTML blocks; ``str``, ``repr``
and the notebook view come from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from dask_sweep.plan.ir import Blocked, Identity, Kernel, Pointwise, Reduce, Running, Source
from dask_sweep.utils import format_bytes


def planes(n: int) -> str:
    """``'1 plane'``, ``'8 planes'``."""
    return f"{n} plane{'s' * (n != 1)}"


def step_widths(plan) -> str:
    """The thickness of a plan's steps: ``'8 planes'`` or ``'3-8 planes'``."""
    steps = plan.steps
    widths = [b - a for a, b in zip((0, *steps[:-1]), steps)]
    lo, hi = min(widths), max(widths)
    return planes(lo) if lo == hi else f"{lo}-{hi} planes"


def sweep_summary(plan) -> str:
    """``'along axis 0 over 64 planes in 4 steps of 16 planes; 2 threads per step'``."""
    n = len(plan.steps)
    return (f"along axis {plan.axis} over {plan.extent} planes in {n} step{'s' * (n != 1)} "
            f"of {step_widths(plan)}; {plan.threads} thread{'s' * (plan.threads != 1)} per step")


def kind(st) -> str:
    """A stage's kind in one word (the HTML table's column)."""
    if isinstance(st, Pointwise) and len(st.inputs) > 1:
        return "zip"
    return {Source: "read", Kernel: "kernel", Pointwise: "elementwise", Identity: "rechunk",
            Blocked: "dask's blocks", Reduce: "reduce"}.get(type(st), type(st).__name__.lower())


def ring(plan, trace, j: int) -> str:
    """Stage ``j``'s ring: its capacity in planes and its projected bytes, or transient."""
    cap = plan.rings[j] if plan.rings else 0
    held = trace.ring_peak.get(j, 0)
    if cap:
        return f"{planes(cap)}, {format_bytes(held)}"
    return format_bytes(held) if held else "transient"


def stage_what(st, axis: int, reach: tuple[int, int] | None = None,
               reaches: Sequence[tuple[int, int]] = ()) -> str:
    """What stage ``st`` does, in the words every front end uses.

    Parameters
    ----------
    st
        A stage of :mod:`dask_sweep.plan.ir`.
    axis
        The sweep axis.
    reach
        Planes of the source the stage reaches before and after a step (the DSL's
        lead), if known.
    reaches
        For a stage of several inputs, each input's reach (the shorter branch waits).
    """
    far = f", reaches -{reach[0]}/+{reach[1]}" if reach else ""
    if isinstance(st, Source):
        rb = st.row_bounds
        rows = [b - a for a, b in zip(rb[:-1], rb[1:])]
        how = ("inline, in the slab task" if not st.external else
               "inline, with values dask computes" if getattr(st.reader, "tasks", None)
               else "from upstream tasks")
        if getattr(st.reader, "free", False):
            made = getattr(st.reader, "what", "by their byte ranges in the chunk files")
            return f"read    any planes, {made} ({how})"
        return (f"read    {len(rows)} chunk row{'s' * (len(rows) != 1)} of "
                f"{planes(max(rows, default=0))} ({how})")
    if isinstance(st, Kernel):
        d = st.depth[axis]
        bnd = set(st.boundary)
        return (f"kernel  window -{d}/+{d}, halo {st.depth}, boundary "
                f"{bnd.pop() if len(bnd) == 1 else st.boundary}, any slab{far}")
    if isinstance(st, Running):
        lo, hi = st.reach
        nb = math.prod(len(c) for c in st.chunks[1:])
        return (f"running window -{lo}/+{hi}, any slab: scipy's sums carried between steps, "
                f"restarted at dask's {len(st.chunks[0])} block starts; in-plane passes on "
                f"its {nb} in-plane blocks{far}")
    if isinstance(st, Reduce):
        return f"reduce  {st.k}-vector partial per step, combined by {st.combine}{far}"
    if isinstance(st, Pointwise):
        what = (f"zip     elementwise of {len(st.inputs)} inputs, any slab{far}"
                if len(st.inputs) > 1 else f"map     elementwise, any slab{far}")
        his = [hi for _, hi in reaches]
        if his and max(his) != min(his):
            what += (f"; branches reach +{'/+'.join(map(str, his))}: the shorter waits "
                     f"{max(his) - min(his)} planes, buffered in the shared rings")
        scalars = [getattr(x, "label", str(x)) for x in st.scalars]
        return what + (f"; uses {', '.join(scalars)}" if scalars else "")
    if isinstance(st, Identity):
        return "rechunk identity on planes"
    if isinstance(st, Blocked):
        w = [st.window(i) for i in range(len(st.inputs))]
        nb = 1
        for c in st.chunks:
            nb *= len(c)
        return (f"blocks  {st.kind}, window -{max(x[0] for x in w)}/+{max(x[1] for x in w)}, "
                f"on dask's {nb} blocks exactly (an opaque function: a whole block is part "
                "of the floor)")
    return type(st).__name__  # pragma: no cover


def sweep_lines(plan, trace, output: Callable[[Any], str]) -> list[str]:
    """The body of a sweep: its stages, outputs and projected peak.

    Parameters
    ----------
    plan, trace
        A sized :class:`~dask_sweep.plan.ir.Plan` and its dry run.
    output
        Where an :class:`~dask_sweep.plan.ir.Output` goes, in the user's terms.
    """
    ax = plan.axis
    lead = plan.lead()  # per stage, the source planes a step's planes reach
    out = [f"  {'':5} {'stage':<22} {'':8}{'what':<60} ring"]
    for j, st in enumerate(plan.stages):
        reach = lead[j] if any(lead[j]) and not isinstance(st, Source) else None
        reaches = [lead[i] for i in st.inputs] if len(st.inputs) > 1 else ()
        what = stage_what(st, ax, reach, reaches)
        ins = ",".join(str(i) for i in st.inputs)
        what += f" <- [{ins}]" if ins else ""
        label = st.label.removeprefix("read ")
        label = label if len(label) <= 22 else label[:21] + "…"  # in full on its out line
        out.append(f"  [{j:>2}] {label:<22} {what:<68} {ring(plan, trace, j)}")
    for o in plan.outputs:
        out.append(f"  out [{o.stage}] {plan.stages[o.stage].label}: {output(o)}")
    out.append(peak_line(trace.peak, plan.budget,
                         f"incl. {format_bytes(plan.info.get('runtime_overhead', 0))} runtime "
                         f"overhead", trace.peak_stage, max(trace.held_after or [0])))
    return out


def peak_line(peak: int, budget: int, what: str = "", stage: str | None = None,
              held: int | None = None) -> str:
    """``projected peak P of B budget (x%; what), at stage S; held between steps <= H``."""
    line = (f"  projected peak {format_bytes(peak)} of {format_bytes(budget)} budget "
            f"({100 * peak / max(1, budget):.0f}%{'; ' + what if what else ''})")
    if stage is not None:
        line += f", at stage {stage!r}"
    if held is not None:
        line += f"; held between steps <= {format_bytes(held)}"
    return line


def io_line(read: int, inp: int, tail: str = "") -> str:
    """``bytes read / input bytes = r (R of I)`` and what else the pass does."""
    ratio = read / inp if inp else float("nan")
    return (f"  bytes read / input bytes = {ratio:.3f} ({format_bytes(read)} of "
            f"{format_bytes(inp)})" + (f"; {tail}" if tail else ""))


def table_plan_lines(sp) -> list[str]:
    """A table pass's plan (:class:`~dask_sweep.plan.tables.SweepPlan`): its passes,
    slabs, projected peak and I/O."""
    rows = [b - a for a, b in sp.slabs]
    lines = [
        f"{sp.func}: input shape {sp.shape} {sp.dtype} ({format_bytes(sp.input_bytes)}), "
        f"axis-0 chunks {_chunk_runs(sp.in_chunks0)}",
        f"  {len(sp.slabs)} slabs of {min(rows, default=0)}-{max(rows, default=0)} rows "
        "(whole chunk rows, in-plane whole); reads "
        + ("inline in the slab tasks" if sp.inline else "from upstream dask tasks"),
    ]
    v = sp.max_rows * sp.plane_voxels
    for i, p in enumerate(sp.passes, 1):
        room = (f" + {p.consumer:g} B/voxel of one slab left to a sweep reading the output "
                "at the same time" if p.consumer else "")
        lines.append(
            f"  pass {i} {p.name}: {p.what}; {p.per_voxel:g} B/voxel x {p.in_flight} slab(s) "
            f"in flight + {format_bytes(p.fixed)} fixed{room} = {format_bytes(p.bytes_for(v))}")
    if sp.per_slab:
        lines.append(f"  dask's bookkeeping: {len(sp.slabs)} slabs x "
                     f"{format_bytes(sp.per_slab)} = "
                     f"{format_bytes(sp.per_slab * len(sp.slabs))} for the whole run")
    lines += [f"  {n}" for n in sp.notes]
    lines.append(peak_line(sp.projected_peak, sp.budget)
                 + f"; bytes read / input bytes = {sp.bytes_read_ratio:.2f}; "
                 f"bytes written = {format_bytes(sp.bytes_written)}")
    return lines


def _chunk_runs(c: Sequence[int]) -> str:
    if len(set(c)) <= 1:
        return f"{len(c)} chunks of {c[0] if c else 0} rows"
    return f"{len(c)} chunks of {min(c)}-{max(c)} rows"


def budget_bar(peak: int, budget: int, floor_bytes: int | None = None) -> str:
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


def sweep_html(title: str, plan, trace, output: Callable[[Any], str],
               floor_bytes: int | None = None) -> str:
    """A sweep as HTML: its budget bar, a table of its stages, its outputs."""
    parts = [f"<h4>{escape(title)}</h4>", budget_bar(trace.peak, plan.budget, floor_bytes),
             "<table><tr><th>#</th><th>stage</th><th>kind</th><th>window</th><th>ring</th>"
             "<th>inputs</th></tr>"]
    for j, st in enumerate(plan.stages):
        win = ", ".join(f"-{lo}/+{hi}" for lo, hi in
                        (st.window(i) for i in range(len(st.inputs)))) or "-"
        parts.append(f"<tr><td>{j}</td><td>{escape(st.label)}</td><td>{escape(kind(st))}</td>"
                     f"<td>{win}</td><td>{ring(plan, trace, j)}</td>"
                     f"<td>{', '.join(map(str, st.inputs))}</td></tr>")
    parts.append("</table><ul>")
    parts += [f"<li>{escape(plan.stages[o.stage].label)}: {escape(output(o))}</li>"
              for o in plan.outputs]
    parts.append("</ul>")
    return "".join(parts)


class Printout:
    """A plan's explanation: text from :meth:`lines`, a notebook view from :meth:`html_blocks`.

    Front ends implement ``lines()`` and, for more than the text folded in a ``<pre>``,
    ``html_blocks()``.
    """

    def lines(self) -> list[str]:  # pragma: no cover - every front end implements it
        raise NotImplementedError

    def html_blocks(self) -> list[str]:
        """HTML shown above the text (tables, budget bars); none by default."""
        return []

    def __str__(self) -> str:
        return "\n".join(self.lines())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return ('<div class="dask-sweep-explain" style="font-family:sans-serif">'
                + "".join(self.html_blocks())
                + f"<details><summary>as text</summary><pre>{escape(str(self))}</pre>"
                "</details></div>")


__all__ = [
    "Printout",
    "budget_bar",
    "io_line",
    "kind",
    "peak_line",
    "planes",
    "ring",
    "stage_what",
    "step_widths",
    "sweep_html",
    "sweep_lines",
    "sweep_summary",
    "table_plan_lines",
]
