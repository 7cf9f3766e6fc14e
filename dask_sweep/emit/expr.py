"""Sweep plans → an array-expression tree (dask's ``array.query-planning`` mode).

The expression-mode counterpart of :mod:`dask_sweep.emit.graph`'s splice into a
``HighLevelGraph``: each planned region's outputs are replaced by
:class:`~dask_sweep.emit.expr_nodes.SweepOutput` nodes whose tasks are
:func:`~dask_sweep.emit.graph.emit`'s (output keys keep their names; the slab
chain is one :class:`~dask_sweep.emit.expr_nodes.SweepTasks` node; sources read
inside the slab task drop out of the tree).  Also the expression of a block-wise
store (:func:`store_map`), which the recogniser reads as a store.  The hook
that calls these is :mod:`dask_sweep.integration.expr`.
"""

from __future__ import annotations

from dask.base import tokenize


def store_map(x, target, region, lock):
    """The ``store-map`` expression of one source (as dask's graph-mode ``store``)."""
    from dask.array._array_expr._collection import blockwise
    from dask.array.core import load_store_chunk
    from dask.layers import ArraySliceDep

    ind = tuple(range(x.ndim))[::-1]
    return blockwise(load_store_chunk, ind, x, ind, target, None, ArraySliceDep(x.chunks), ind,
                     region=region, lock=lock, return_stored=False, load_stored=False,
                     token="store-map", meta=x._meta, align_arrays=False)


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


def classes():
    """``(SweepTasks, SweepOutput, SweepAlias)``: expression nodes (module-level, picklable)."""
    from dask_sweep.emit import expr_nodes as n

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
