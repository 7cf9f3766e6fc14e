"""Sweep plans → a ``HighLevelGraph`` (dask's graph mode), and the sweep's priorities kept.

:func:`splice` puts each plan's tasks (:func:`~dask_sweep.emit.graph.emit`) in
place of the layers its region absorbed and drops the layers nothing needs any
more (sources now read inside the slab tasks); everything else stays as dask
built it.  :func:`then_keeping_priorities` runs the optimiser that comes after
the sweep (dask's default returns a plain dict, which drops layer annotations)
and puts the sweep tasks' ``priority`` annotations and
:func:`~dask_sweep.emit.graph.consumers_first`'s edges back.  The
expression-mode counterpart is :mod:`dask_sweep.emit.expr`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from dask_sweep.emit.graph import StepPriority, consumers_first, emit, emit_tiled
from dask_sweep.patterns.expr import flatten_keys
from dask_sweep.plan.ir import Plan
from dask_sweep.runtime.executor import Trace


def splice(dsk: HighLevelGraph, plans: Sequence[Plan], traces: Sequence[Trace],
           keys: Any) -> HighLevelGraph:
    """``dsk`` with each plan's region replaced by its sweep tasks.

    Each plan's ``info`` names the layers it ``absorbed`` and its ``sources``
    (read inside the slab tasks, so dropped once nothing else reads them).
    """
    layers = dict(dsk.layers)
    deps = {k: set(v) for k, v in dsk.dependencies.items()}
    sources = set()
    for plan in plans:
        sources |= plan.info.get("sources", set())
    for plan, trace in zip(plans, traces):
        if "tile_plans" in plan.info:
            new_layers, new_deps = emit_tiled(
                plan.info["tile_plans"], tokenize([o.name for o in plan.outputs]),
                at_once=plan.info.get("tiles_at_once", 1) > 1)
        else:
            new_layers, new_deps = emit(plan, trace)
        absorbed = plan.info["absorbed"]
        keep_names = set(new_layers)
        for name in absorbed:
            if name not in keep_names:
                layers.pop(name, None)
                deps.pop(name, None)
        layers.update(new_layers)
        deps.update(new_deps)
    # drop layers nothing needs any more (e.g. source layers now read inline)
    needed = set()
    users: dict[str, set[str]] = {}
    for n, ds in deps.items():
        for d in ds:
            users.setdefault(d, set()).add(n)
    wanted = {k[0] if isinstance(k, tuple) else k for k in flatten_keys(keys)}
    roots = [n for n in layers if n in wanted or (not users.get(n) and n not in sources)]
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(deps.get(n, ()))
    layers = {n: v for n, v in layers.items() if n in needed}
    deps = {n: {d for d in deps.get(n, set()) if d in needed} for n in layers}
    return HighLevelGraph(layers, deps)


def priorities(dsk) -> dict:
    """``{key: priority}`` of the sweep layers' annotations in a HighLevelGraph."""
    out: dict = {}
    for layer in getattr(dsk, "layers", {}).values():
        prio = (getattr(layer, "annotations", None) or {}).get("priority")
        if isinstance(prio, StepPriority):
            out.update((k, prio(k)) for k in layer)
    return out


def then_keeping_priorities(optimizer: Callable, dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """``optimizer(dsk)``, keeping the sweep tasks' priorities for ``distributed``.

    dask's default optimiser returns a plain dict, which drops layer annotations;
    the result is wrapped back into a one-layer HighLevelGraph annotated with the
    sweep tasks' priorities (every other task keeps distributed's default, 0).
    """
    prio = priorities(dsk)
    out = optimizer(dsk, keys, **kwargs)
    if not prio:
        return out
    if isinstance(out, HighLevelGraph) and priorities(out):
        # an optimiser that keeps layers (and their annotations): gate the steps in them
        return _gated_layers(out)
    graph = consumers_first(out)
    name = f"sweep-annotated-{tokenize(sorted(map(str, prio)))}"
    layer = MaterializedLayer(graph, annotations={"priority": KeyPriority(prio)})
    return HighLevelGraph({name: layer}, {name: set()})


def _gated_layers(hlg: HighLevelGraph) -> HighLevelGraph:
    """``hlg`` with :func:`consumers_first`'s edges, each layer keeping its annotations
    (the layers' dependencies follow the new edges)."""
    graph = consumers_first(hlg)
    owner = {k: name for name, layer in hlg.layers.items() for k in layer}
    layers = {
        name: MaterializedLayer(
            {k: graph[k] for k in layer},
            annotations=getattr(layer, "annotations", None),
            collection_annotations=getattr(layer, "collection_annotations", None),
        )
        for name, layer in hlg.layers.items()
    }
    deps: dict = {name: set(hlg.dependencies.get(name, ())) for name in layers}
    for k, node in graph.items():
        for d in getattr(node, "dependencies", ()):
            if d in owner and owner[d] != owner[k]:
                deps[owner[k]].add(owner[d])
    return HighLevelGraph(layers, deps)


class KeyPriority:
    """A sweep task's priority by key (0 for the rest): picklable, evaluated per key."""

    def __init__(self, prio: dict) -> None:
        self.prio = prio

    def __call__(self, key) -> int:
        return self.prio.get(key, 0)
