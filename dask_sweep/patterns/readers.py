"""Reading a region's source rows from inside a slab task.

A source whose blocks need no upstream computation (``from_zarr``,
``from_array``, ``imread``, random, ...) is *inlined*: the slab task runs dask's
own read tasks for the chunk row it needs, so no reader can run ahead of the
sweep.  Any other source is *external*: its blocks are dependencies of the slab
task that first needs them.
"""

from __future__ import annotations

import numpy as np
from dask._task_spec import GraphNode
from dask.array.core import concatenate3

from dask_sweep.patterns.layers import task_of


class InlineReader:
    """Evaluate dask's own tasks for a chunk row (picklable; no open handles)."""

    def __init__(self, name: str, numblocks: tuple[int, ...], axis: int, tasks: dict,
                 shared: dict) -> None:
        self.name = name
        self.numblocks = numblocks
        self.axis = axis
        self.tasks = tasks  # block key -> GraphNode
        self.shared = shared  # small root keys the tasks read (e.g. the zarr array)
        self._cache: dict | None = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = None
        return d

    def _shared_values(self) -> dict:
        if self._cache is None:
            vals: dict = {}
            for k, t in self.shared.items():
                vals[k] = t(vals) if isinstance(t, GraphNode) else t
            self._cache = vals
        return self._cache

    def block(self, idx: tuple[int, ...]):
        key = (self.name, *idx)
        t = self.tasks[key]
        if not isinstance(t, GraphNode):
            return t
        vals = self._shared_values()
        return t({k: vals[k] for k in t.dependencies})

    def row_keys(self, r: int) -> list[tuple]:
        return [(self.name, *idx) for idx in _row_indices(self.numblocks, self.axis, r)]

    def read_row(self, r: int, externals: dict) -> np.ndarray:
        return _assemble(self.numblocks, self.axis, r, self.block)


class ExternalReader:
    """Blocks handed in by the scheduler as dependencies of the slab task."""

    def __init__(self, name: str, numblocks: tuple[int, ...], axis: int) -> None:
        self.name = name
        self.numblocks = numblocks
        self.axis = axis

    def row_keys(self, r: int) -> list[tuple]:
        return [(self.name, *idx) for idx in _row_indices(self.numblocks, self.axis, r)]

    def read_row(self, r: int, externals: dict) -> np.ndarray:
        return _assemble(self.numblocks, self.axis, r, lambda idx: externals[(self.name, *idx)])


def _row_indices(numblocks, axis, r):
    ranges = [range(n) for n in numblocks]
    ranges[axis] = range(r, r + 1)
    return [tuple(ranges[a][i] for a, i in enumerate(ix))
            for ix in np.ndindex(*[len(x) for x in ranges])]


def _assemble(numblocks, axis, r, get):
    shape = list(numblocks)
    shape[axis] = 1
    nested = np.empty(shape, dtype=object)
    for ix in np.ndindex(*shape):
        idx = list(ix)
        idx[axis] = r
        nested[ix] = np.asarray(get(tuple(idx)))
    if nested.size == 1:
        return nested.flat[0]
    return concatenate3(nested.tolist())


def make_reader(hlg, name: str, numblocks: tuple[int, ...], axis: int):
    """An inline reader when ``name`` needs no upstream computation, else external."""
    from dask_sweep.patterns.layers import layer_root_closure

    closure = layer_root_closure(hlg, name)
    if closure is None:
        return ExternalReader(name, numblocks, axis)
    layer = hlg.layers[name]
    tasks = {k: (task_of(v, k) if isinstance(v, tuple) and not isinstance(k, tuple) else v)
             for k, v in layer.items()}
    shared = {}
    block_keys = set()
    for idx in np.ndindex(*numblocks):
        block_keys.add((name, *idx))
    for k in list(tasks):
        if k not in block_keys:
            shared[k] = tasks.pop(k)
    for dep in closure:
        for k, v in hlg.layers[dep].items():
            shared[k] = v
    # order shared keys so that dependencies come first
    ordered: dict = {}
    pending = dict(shared)
    for _ in range(len(pending) + 1):
        for k, v in list(pending.items()):
            dd = v.dependencies if isinstance(v, GraphNode) else set()
            if all(d in ordered for d in dd):
                ordered[k] = v
                del pending[k]
    if pending:
        return ExternalReader(name, numblocks, axis)
    for t in tasks.values():
        if isinstance(t, GraphNode) and not set(t.dependencies) <= set(ordered):
            return ExternalReader(name, numblocks, axis)
    return InlineReader(name, numblocks, axis, tasks, ordered)
