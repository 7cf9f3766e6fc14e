"""Graphs of sweeps and the tasks between them, for a front end that writes no tasks itself.

The DSL's ``to_dask`` chains several passes: a task holding the scalars found so
far (the *env*), each sweep pass (:func:`~dask_sweep.emit.graph.emit`, its plan
bound to the env), the task that folds a pass's reduction partials into the next
env, an algorithm's table pass, and the results (arrays, scalars, finalized
sinks).  It says *which* tasks; :class:`GraphBuilder` writes them: every task is
a layer of its own named by its key, and a layer's dependencies are the layers
of the keys it references, so a collection made at any point holds exactly what
its keys need so far::

    b = GraphBuilder()
    env = b.task("env-0", start, b.const({}))
    b.sweep(plan, trace, "p0", bind=(bind_plan, env))
    env = b.task("env-1", fold, b.ref(env), *[b.ref(k) for k in partial_keys])
    value = b.delayed(b.task("value", get, b.ref(env), uid))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from dask._task_spec import DataNode, List, Task, TaskRef
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from dask_sweep.emit.graph import emit
from dask_sweep.plan.ir import Plan
from dask_sweep.runtime.executor import Trace

__all__ = ["GraphBuilder"]


def _layer_of(key: Any) -> str:
    return key[0] if isinstance(key, tuple) else key


class GraphBuilder:
    """Layers of tasks and sweeps, and dask collections over what is built so far."""

    def __init__(self) -> None:
        self.layers: dict[str, MaterializedLayer] = {}
        self.deps: dict[str, set[str]] = {}

    @staticmethod
    def ref(key: Any) -> TaskRef:
        """An argument that is the value of task ``key``."""
        return TaskRef(key)

    @staticmethod
    def refs(keys: Iterable[Any]) -> List:
        """An argument that is the list of the values of tasks ``keys``."""
        return List(*(TaskRef(k) for k in keys))

    @staticmethod
    def const(value: Any) -> DataNode:
        """An argument passed as it is (dicts, lists and tuples are not searched for keys)."""
        return DataNode(None, value)

    def task(self, key: str, fn: Callable, *args: Any) -> str:
        """The task ``key = fn(*args)``, a layer of its own; returns ``key``."""
        t = Task(key, fn, *args)
        self.layers[key] = MaterializedLayer({key: t})
        self.deps[key] = {_layer_of(d) for d in t.dependencies}
        return key

    def sweep(self, plan: Plan, trace: Trace, token: str,
              bind: tuple[Callable, str] | None = None) -> None:
        """A sweep pass's chain and output layers (see :func:`~dask_sweep.emit.graph.emit`)."""
        layers, deps = emit(plan, trace, token, bind=bind)
        for name, layer in layers.items():
            self.layers[name] = layer
            self.deps[name] = set(deps.get(name, ()))

    def _graph(self) -> HighLevelGraph:
        # copies: layers added later do not leak into a collection made now
        return HighLevelGraph(dict(self.layers), {n: set(d) for n, d in self.deps.items()})

    def array(self, name: str, chunks: tuple, dtype: Any):
        """A dask array over the blocks ``(name, i, j, ...)`` built so far (either of
        dask's array modes)."""
        from dask_sweep.emit.io_graphs import array_of

        return array_of(self._graph(), name, chunks, np.empty((0,) * len(chunks), dtype))

    def delayed(self, key: str):
        """A ``Delayed`` of task ``key``."""
        from dask.delayed import Delayed

        return Delayed(key, self._graph())
