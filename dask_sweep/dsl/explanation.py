"""``explain()`` for a DSL pipeline: the loop nest of every pass, before any I/O.

One block per pass, printed by :mod:`dask_sweep.plan.printer` as the plugin's
and the drop-ins' plans are: a sweep pass's stages, outputs, projected peak and
reads; a table pass's header, its input and its
:class:`~dask_sweep.plan.tables.SweepPlan`; then the schedule of the passes and
the settings.
"""

from __future__ import annotations

from dask_sweep.dsl.algorithms import explain_lines
from dask_sweep.dsl.compile import AlgoPass
from dask_sweep.plan import printer
from dask_sweep.utils import format_bytes


class Explanation(printer.Printout):
    """Text (``str``) and HTML (notebook) view of a compiled DSL pipeline."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    @property
    def plans(self):
        """The sweep plan of every pass (a table pass's: a
        :class:`~dask_sweep.plan.tables.SweepPlan`)."""
        return [pp.plan for pp in self.compiled.passes]

    def lines(self) -> list[str]:
        c = self.compiled
        s = c.settings
        out: list[str] = []
        npasses = len(c.passes)
        total_read = 0
        total_in = 0
        for pp in c.passes:
            if isinstance(pp, AlgoPass):
                p = pp.plan
                rows = [b - a for a, b in p.slabs]
                algo = pp.algo
                order = "last slab to first" if algo.name == "label" else "slabs in any order"
                out.append(
                    f"pass {pp.index} of {npasses}: {algo.name} table pass over "
                    f"{tables_input(pp)} in {len(rows)} slabs of {min(rows)}-{max(rows)} "
                    f"planes ({order}); its output is read, slab by slab, by the next passes"
                )
                out += explain_lines(pp.tables, pp.algo)
                if pp.algo.resident:  # beyond the plan's own peak (printed above)
                    out.append(printer.peak_line(
                        pp.projected_peak, p.budget,
                        f"with {format_bytes(pp.algo.resident)} of earlier tables"))
                out.append(printer.io_line(pp.read_bytes, pp.input_bytes,
                                           "tables spilled only beyond the budget"))
                total_read += pp.read_bytes
                total_in = max(total_in, pp.input_bytes)
                continue
            plan, trace = pp.plan, pp.trace
            out.append(f"pass {pp.index} of {npasses}: sweep {printer.sweep_summary(plan)}")
            out += printer.sweep_lines(plan, trace, _outputs(pp))
            out.append(printer.io_line(trace.bytes_read, pp.input_bytes,
                                       f"writes {format_bytes(pp.output_bytes)}"))
            total_read += trace.bytes_read
            total_in = max(total_in, pp.input_bytes)
        made = [x.label for x in c.scalars if x.ready_pass > 0 and not x.deps == ()]
        out.append(
            f"schedule: {npasses} pass(es), separated by reductions and table passes; bytes read "
            f"{format_bytes(total_read)} = {total_read / max(1, total_in):.2f} x input"
            + (f"; scalars: {', '.join(made)}" if made else "")
        )
        out.append(
            f"settings: memory_limit={format_bytes(s.memory_limit)}, threads={s.threads}, "
            f"target_slab_bytes={format_bytes(s.target_slab_bytes)}"
        )
        return out

    def html_blocks(self) -> list[str]:
        """A table and a budget bar per sweep pass (a table pass is in the text)."""
        npasses = len(self.compiled.passes)
        return [printer.sweep_html(f"pass {pp.index} of {npasses}: sweep along axis "
                                   f"{pp.plan.axis}, {pp.plan.extent} planes, "
                                   f"{len(pp.plan.steps)} steps",
                                   pp.plan, pp.trace, _outputs(pp))
                for pp in self.compiled.passes if not isinstance(pp, AlgoPass)]


def _outputs(pp):
    """Where each of a sweep pass's outputs goes, in the DSL's terms."""
    said = {}
    for (kind, o), op in zip(pp.outputs, pp.plan.outputs):
        if kind == "reduce":
            what = f"scalar partials of {o.label}"
        elif o.kind == "numpy":
            what = (f"numpy array {format_bytes(o.stream.nbytes)} (the result, held outside "
                    "the sweep budget)")
        elif o.kind == "path":
            what = f"written to {o.target} in the step, on its chunk grid"
        else:
            what = f"written into {type(o.target).__name__} in the step"
        said[id(op)] = what
    return lambda op: said[id(op)]


def tables_input(pp: AlgoPass) -> str:
    """How a table pass names its input stream."""
    return f"{pp.tables.stream.label!r} {pp.plan.shape} {pp.plan.dtype}"
