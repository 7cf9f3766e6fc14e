"""``explain()`` for a DSL pipeline: the loop nest of every pass, before any I/O.

Same form as :mod:`dask_sweep.explain` for the dask plugin, one block per pass::

    pass 0 of 2: sweep along axis 0 over 64 planes in 4 steps of 16 planes; 2 threads
      [0] read   array (numpy array)     64 chunk rows of 1 planes      ring 96.00 KiB
      [1] kernel gaussian(sigma=2)       window -8/+8, reaches -8/+8    ring 48.00 KiB  <- [0]
      [2] reduce histogram(...)          256-vector partials            ring 16.00 KiB  <- [1]
      out [2] -> scalar histogram(...)
      projected peak 1.20 MiB of 256 MiB budget (0%), at stage 'gaussian(sigma=2)'
      read 1.00 x input (64.00 KiB of 64.00 KiB); write 8.00 KiB
"""

from __future__ import annotations

from dask_sweep.dsl.algorithms import explain_lines
from dask_sweep.dsl.compile import AlgoPass
from dask_sweep.dsl.stages import Reduce
from dask_sweep.plan.ir import Kernel, Pointwise, Source
from dask_sweep.utils import format_bytes


class Explanation:
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
                out.append(
                    f"  projected peak {format_bytes(pp.projected_peak)} of "
                    f"{format_bytes(p.budget)} budget ({100 * pp.projected_peak / p.budget:.0f}%)"
                )
                spill = "tables spilled only beyond the budget"
                out.append(_io_line(pp.read_bytes, pp.input_bytes, spill))
                total_read += pp.read_bytes
                total_in = max(total_in, pp.input_bytes)
                continue
            plan, trace = pp.plan, pp.trace
            steps = plan.steps
            widths = [b - a for a, b in zip((0, *steps[:-1]), steps)]
            out.append(
                f"pass {pp.index} of {npasses}: sweep along axis {plan.axis} over {plan.extent} "
                f"planes in {len(steps)} steps of {min(widths)}-{max(widths)} planes; "
                f"{plan.threads} threads per step"
            )
            for j, st in enumerate(plan.stages):
                ring = format_bytes(trace.ring_peak.get(j, 0))
                lo, hi = pp.lead[j]
                if isinstance(st, Source):
                    rb = st.row_bounds
                    rows = [b - a for a, b in zip(rb[:-1], rb[1:])]
                    desc = (
                        f"read   {st.label:<30} {len(rows)} chunk rows of {max(rows)} "
                        "planes, inline in the step"
                    )
                elif isinstance(st, Kernel):
                    d = st.depth[plan.axis]
                    desc = (
                        f"kernel {st.label:<30} window -{d}/+{d}, footprint {st.depth}, "
                        f"reaches -{lo}/+{hi} source planes"
                    )
                elif isinstance(st, Reduce):
                    desc = (
                        f"reduce {st.label:<30} {st.k}-vector partial per step, "
                        f"combined by {st.combine}"
                    )
                elif isinstance(st, Pointwise):
                    kind = "zip   " if len(st.inputs) > 1 else "map   "
                    desc = f"{kind} {st.label:<30} pointwise, reaches -{lo}/+{hi}"
                    if len(st.inputs) > 1:
                        his = [pp.lead[i][1] for i in st.inputs]
                        if max(his) != min(his):
                            desc += (
                                f"; branches reach +{'/+'.join(map(str, his))}: the "
                                f"shorter waits {max(his) - min(his)} planes, buffered "
                                "in the shared rings"
                            )
                    if st.scalars:
                        desc += "; uses " + ", ".join(x.label for x in st.scalars)
                else:  # pragma: no cover
                    desc = st.label
                ins = ",".join(str(i) for i in st.inputs)
                tail = f"  <- [{ins}]" if ins else ""
                out.append(f"  [{j}] {desc}  ring {ring}{tail}")
            for (kind, o), op in zip(pp.outputs, plan.outputs):
                if kind == "reduce":
                    what = f"scalar partials of {o.label}"
                elif o.kind == "numpy":
                    what = (
                        f"numpy array {format_bytes(o.stream.nbytes)} (the result, held "
                        "outside the sweep budget)"
                    )
                elif o.kind == "path":
                    what = f"written to {o.target} in the step, on its chunk grid"
                else:
                    what = f"written into {type(o.target).__name__} in the step"
                out.append(f"  out [{op.stage}] -> {what}")
            budget = plan.budget
            out.append(
                f"  projected peak {format_bytes(trace.peak)} of {format_bytes(budget)} budget "
                f"({100 * trace.peak / budget:.0f}%, with "
                f"{format_bytes(plan.info.get('runtime_overhead', 0))} runtime overhead), "
                f"at stage {trace.peak_stage!r}; held "
                f"between steps <= {format_bytes(max(trace.held_after or [0]))}"
            )
            wrote = f"write {format_bytes(pp.output_bytes)}"
            out.append(_io_line(trace.bytes_read, pp.input_bytes, wrote))
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

    def __str__(self) -> str:
        return "\n".join(self.lines())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        return "<pre>" + html.escape(str(self)) + "</pre>"


def _io_line(read: int, inp: int, tail: str) -> str:
    ratio = read / inp if inp else float("nan")
    return f"  read {ratio:.2f} x input ({format_bytes(read)} of {format_bytes(inp)}); {tail}"


def tables_input(pp: AlgoPass) -> str:
    """How a table pass names its input stream."""
    return f"{pp.tables.stream.label!r} {pp.plan.shape} {pp.plan.dtype}"
