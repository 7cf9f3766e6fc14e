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
replaced by :class:`SweepOutput` nodes whose tasks are :mod:`dask_sweep.emit`'s
(output keys keep their names; the slab chain is one :class:`SweepTasks` node;
sources read inside the slab task simply drop out of the tree).  Nothing else
changes, and with no sweep active the wrapper returns dask's result untouched.

The wrapper is installed when dask has the internals it relies on
(:data:`TESTED` lists the dask versions it was checked with; another version is
still wrapped, and a tree the analysis trips on is left to dask with a warning,
as in the graph mode).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from typing import Any

import dask
from dask.base import tokenize

from dask_sweep.patterns.recognise import Fallback

TESTED = ("2026.8",)  # dask versions whose expression internals this was checked against

_STAGES = ("simplified-physical", "fused")  # what Expr.optimize asks for


def _internals_ok() -> bool:
    try:
        import dask._expr as E
        from dask.array._array_expr._blockwise import Blockwise  # noqa: F401
        from dask.array._array_expr._expr import ArrayExpr  # noqa: F401
        from dask.array._array_expr._io import FromArray  # noqa: F401
        from dask.array._array_expr._overlap import MapOverlap, _trim  # noqa: F401
        from dask.array._array_expr._rechunk import Rechunk  # noqa: F401
    except ImportError:
        return False
    return callable(getattr(E, "optimize_until", None)) and hasattr(E, "_ExprSequence")


def version_note() -> str:
    """A note for ``explain`` when the installed dask is not one the hook was checked with."""
    if any(dask.__version__.startswith(v) for v in TESTED):
        return ""
    return (f"dask {dask.__version__}'s array expressions were not checked with dask_sweep "
            f"(checked: {', '.join(TESTED)})")


def install() -> bool:
    """Wrap ``dask._expr.optimize_until`` (idempotent); ``False`` if dask lacks the internals."""
    if not _internals_ok():
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
    return rewrite_expression(root, result, view)


def gate_consumers(root) -> None:
    """Make each sweep step of ``root`` wait for the consumers of the step before's blocks
    (:func:`~dask_sweep.emit.graph.consumers_first`, as in graph mode), in place.

    On one thread ``dask.order`` runs a sweep's chain to its end before the first
    consumer outside it (a reduction's partials): every block alive at once (a summed
    pipeline grew 83 MiB at 24 MiB).  The gates go into the steps' own tasks, in the
    graph each :class:`SweepTasks` node owns, so no expression is renamed (a renamed
    consumer would rename the very keys the gates point at).  Costs one extra
    materialisation of the graph.
    """
    from dask_sweep.emit.graph import consumers_first

    SweepTasks = classes()[0]
    nodes = [e for e in root.walk() if isinstance(e, SweepTasks)]
    if not nodes:
        return
    from dask._task_spec import convert_legacy_graph

    # dask's reductions still write tuple tasks here: as task specs, with dependencies
    graph = convert_legacy_graph(dict(root.__dask_graph__()))
    gated = consumers_first(graph)
    for node in nodes:
        own = node.operand("graph")
        for k in own:
            if gated.get(k, own[k]) is not graph.get(k, own[k]):
                own[k] = gated[k]


# --- emission into the expression tree -------------------------------------------------


def classes():
    """``(SweepTasks, SweepOutput, SweepAlias)``: expression nodes (module-level, picklable)."""
    from dask_sweep.integration import _expr_nodes as n

    return n.SweepTasks, n.SweepOutput, n.SweepAlias


def rewrite_expression(root, result, view):
    """Replace each planned region's outputs in ``root`` by the sweep's nodes."""
    from dask_sweep.emit.graph import emit, emit_tiled

    SweepTasks, SweepOutput, _ = classes()
    replace: dict = {}
    for plan, trace in result.plans:
        token = tokenize([o.name for o in plan.outputs], plan.steps, plan.budget)
        if "tile_plans" in plan.info:
            new_layers, new_deps = emit_tiled(plan.info["tile_plans"], token)
        else:
            new_layers, new_deps = emit(plan, trace, token)
        names = {o.name for o in plan.outputs}
        sweep = {n: lay for n, lay in new_layers.items() if n not in names}
        external = set().union(*(new_deps.get(n, set()) for n in sweep)) - set(sweep)
        graph: dict = {}
        for lay in sweep.values():
            graph.update(lay)
        tasks = SweepTasks(token, graph, *(view.exprs[n] for n in sorted(external)))
        for name in names:
            old = view.exprs[name]
            replace[name] = SweepOutput(name, old.chunks, old._meta, dict(new_layers[name]),
                                        tasks)
    return _rebuild_root(root, replace)


def _rebuild_root(root, replace: dict):
    from dask._expr import _ExprSequence
    from dask.array._array_expr._expr import ArrayExpr

    _, _, SweepAlias = classes()
    memo: dict = {}
    if isinstance(root, _ExprSequence):
        tops = []
        for op in root.operands:
            new = _substitute(op, replace, memo)
            if isinstance(op, ArrayExpr) and new._name != op._name:
                new = SweepAlias(op._name, new)  # keys stay those dask predicted (persist)
            tops.append(new)
        return _ExprSequence(*tops)
    new = _substitute(root, replace, memo)
    if isinstance(root, ArrayExpr) and new._name != root._name:
        new = SweepAlias(root._name, new)
    return new


def _substitute(expr, replace: dict, memo: dict):
    from dask._expr import Expr

    name = expr._name
    if name in memo:
        return memo[name]
    if name in replace:
        memo[name] = replace[name]
        return memo[name]
    ops, changed = [], False
    for op in expr.operands:
        if isinstance(op, Expr):
            new = _substitute(op, replace, memo)
            changed |= new is not op
            ops.append(new)
        else:
            ops.append(op)
    out = _remake(expr, ops) if changed else expr
    memo[name] = out
    return out


def _remake(expr, ops: list):
    """``type(expr)(*ops)``, even when dask's singleton cache would hand back ``expr``.

    (An expression named explicitly, ``map_blocks(name=...)``, keeps its name
    with new operands; the cache entry of the old one is restored afterwards.)
    """
    new = type(expr)(*ops)
    if all(a is b for a, b in zip(new.operands, ops)):
        return new
    registry = getattr(type(expr), "_instances", None)
    if registry is None:  # pragma: no cover - not a singleton: the constructor made it
        return new
    old = registry.pop(expr._name, None)
    try:
        new = type(expr)(*ops)
    finally:
        if old is not None:
            registry[expr._name] = old
    return new
