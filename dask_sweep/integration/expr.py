"""The hook for dask's array-expression mode (``array.query-planning``).

With ``dask.config.set({"array.query-planning": True})`` before ``import
dask.array`` (dask 2026.8; its code says the default will flip), collections are
expression trees and dask never calls ``array_optimize``: the collection's
``__dask_optimize__`` is a no-op and ``compute`` / ``persist`` /
``dask.compute`` / ``Client.compute`` hand the *expression* to the scheduler.

Where to hook.  dask 2026.8 has no extension point for array expressions: no
optimiser registry, no lowering hook, no config slot (``optimization.tune.active``
only switches dask's own ``_tune_down`` methods off).  Every execution path goes
through one function, :func:`dask._expr.optimize_until`, which
``Expr.optimize`` calls by its module-global name: ``compute`` and
``dask.compute`` optimise ``FinalizeCompute(...)``, ``persist`` and the
distributed client's ``compute`` / ``persist`` an ``_ExprSequence`` (``x.optimize()``,
``ArrayExpr.optimize``, is dask's explicit pre-pass and is left alone).  So
:func:`install` wraps that one function: dask's own stages run first
(simplify, tune, lower, simplify), then, when a sweep pass is active, the lowered
tree is read by :mod:`dask_sweep.patterns.expr` (the same recogniser, planner,
budget and ``explain`` as the graph mode) and each planned region's outputs are
replaced by :mod:`dask_sweep.emit.expr` with nodes whose tasks are
:mod:`dask_sweep.emit.graph`'s (output keys keep their names; sources read
inside the slab task simply drop out of the tree).  Nothing else changes, and with no sweep active the wrapper returns dask's result untouched.

The wrapper is installed when dask has the internals it relies on
(:data:`TESTED` lists the dask versions it was checked with; another version is
still wrapped, and a tree the analysis trips on is left to dask with a warning,
as in the graph mode).  Wrapping ``optimize_until`` is the one use of dask's
expression internals outside :mod:`dask_sweep.patterns` and :mod:`dask_sweep.emit`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from typing import Any

import dask

from dask_sweep.patterns.expr import internals_ok
from dask_sweep.patterns.recognise import Fallback

TESTED = ("2026.8",)  # dask versions whose expression internals this was checked against

_STAGES = ("simplified-physical", "fused")  # what Expr.optimize asks for


def version_note() -> str:
    """A note for ``explain`` when the installed dask is not one the hook was checked with."""
    if any(dask.__version__.startswith(v) for v in TESTED):
        return ""
    return (f"dask {dask.__version__}'s array expressions were not checked with dask_sweep "
            f"(checked: {', '.join(TESTED)})")


def install() -> bool:
    """Wrap ``dask._expr.optimize_until`` (idempotent); ``False`` if dask lacks the internals."""
    if not internals_ok():
        return False
    import dask._expr as E

    current = E.optimize_until
    if getattr(current, "_dask_sweep", False):
        return True

    @functools.wraps(current)
    def optimize_until(expr, stage):
        out = current(expr, stage)
        if stage not in _STAGES:
            return out
        from dask_sweep.integration.optimize import active_pass
        from dask_sweep.patterns.expr import expression_mode

        p = active_pass()
        if p is None or not expression_mode():  # graph mode: array_optimize sweeps
            return out
        out = sweep_expression(out, p.settings())
        # the keys are final: compute and persist materialise the graph of what this
        # returns (at "simplified-physical"), "fused" has fused already
        from dask_sweep.emit.expr import gate_consumers

        gate_consumers(out)
        return out

    optimize_until._dask_sweep = True
    E.optimize_until = optimize_until
    from dask_sweep.io.host import HOST

    HOST.analyse = analyse_collection  # imwrite plans its store in either mode
    return True


def optimized(expr):
    """``expr`` through dask's own optimiser stages, without the sweep (for ``explain``)."""
    import dask._expr as E

    f = E.optimize_until
    f = getattr(f, "__wrapped__", f)
    return f(expr, "simplified-physical")


def analyse_expression(root, settings):
    """``(SweepResult, ExprGraph)`` of a lowered expression tree; nothing is emitted."""
    from dask_sweep.integration.optimize import SweepResult, analyse
    from dask_sweep.patterns.expr import expression_graph

    try:
        view = expression_graph(root)
    except Exception as e:  # a tree the translation trips on: left to dask
        if settings.fallback == "raise":
            raise
        note = f"the expression analysis failed ({type(e).__name__}: {e}); left to stock dask"
        if settings.fallback == "warn":
            warnings.warn(f"dask_sweep: {note}. Please report this expression.", RuntimeWarning,
                          stacklevel=4)
        res = SweepResult(settings=settings)
        res.fallbacks.append(Fallback("expression", note))
        return res, None
    result = analyse(view.hlg, view.keys, settings)
    result.fallbacks[:0] = view.fallbacks
    note = version_note()
    if note:
        # (once: an analysis handed back by ``reuse`` has it already)
        result.plans = [(plan if note in plan.notes else replace(plan, notes=(*plan.notes, note)),
                         trace) for plan, trace in result.plans]
    return result, view


def analyse_collection(x: Any, settings):
    """The sweep analysis of a collection in either mode (``explain``, the test oracle)."""
    from dask_sweep.integration.optimize import analyse
    from dask_sweep.patterns.expr import array_expr_of

    expr = array_expr_of(x)
    if expr is None:
        return analyse(x.__dask_graph__(), x.__dask_keys__(), settings)
    return analyse_expression(optimized(expr), settings)[0]


def sweep_expression(root, settings):
    """``root`` with every region the analysis plans replaced by its sweep's tasks."""
    from dask_sweep.integration.optimize import tune_before_running

    result, view = analyse_expression(root, settings)
    if not result.plans:
        return root
    tune_before_running(result)
    from dask_sweep.emit.expr import rewrite_expression

    return rewrite_expression(root, result, view)
