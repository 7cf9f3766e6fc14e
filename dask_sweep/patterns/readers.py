"""Reading a region's source rows from inside a slab task.

A source whose blocks need no upstream computation (``from_zarr``,
``from_array``, ``imread``, random, ...) is *inlined*: the slab task runs dask's
own read tasks for the chunk row it needs, so no reader can run ahead of the
sweep.  Any other source is *external*: its blocks are dependencies of the slab
task that first needs them.
"""

from __future__ import annotations

import numpy as np
from dask._task_spec import GraphNode, convert_legacy_graph
from dask.array.core import concatenate3

from dask_sweep.io.planes import zarr_planes


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

    def read_row(self, r: int, externals: dict, blocks=None) -> np.ndarray:
        return _assemble(self.numblocks, self.axis, r, self.block, blocks)


class BlockwiseReader(InlineReader):
    """A root ``Blockwise`` source (``from_zarr``, ``zeros``...) evaluated from its template.

    Nothing is materialised at planning time, so planning stays linear and cheap
    in the number of chunks.
    """

    def __init__(self, name, numblocks, axis, ev, shared: dict) -> None:
        super().__init__(name, numblocks, axis, {}, shared)
        self.ev = ev

    def block(self, idx: tuple[int, ...]):
        return self.ev(idx, {}, self._shared_values())


class ExternalReader:
    """Blocks handed in by the scheduler as dependencies of the slab task."""

    def __init__(self, name: str, numblocks: tuple[int, ...], axis: int) -> None:
        self.name = name
        self.numblocks = numblocks
        self.axis = axis

    def row_keys(self, r: int) -> list[tuple]:
        return [(self.name, *idx) for idx in _row_indices(self.numblocks, self.axis, r)]

    def read_row(self, r: int, externals: dict, blocks=None) -> np.ndarray:
        return _assemble(self.numblocks, self.axis, r,
                         lambda idx: externals[(self.name, *idx)], blocks)


class SubgraphReader:
    """Evaluate a chunk row *and the cheap upstream tasks it needs* inside the slab task.

    For sources such as ``from_zarr(...)[:n]`` or ``from_zarr(...).astype(f)``
    whose blocks depend on a few upstream tasks each.  Upstream values needed by
    a later row (slices that straddle chunk boundaries) are carried to the next
    step in ``memo`` and dropped after the last row that needs them, so each
    upstream task still runs once.
    """

    def __init__(self, name, numblocks, axis, tasks: dict, last_use: dict) -> None:
        self.name = name
        self.numblocks = numblocks
        self.axis = axis
        self.tasks = tasks
        self.last_use = last_use  # upstream key -> last row that needs it

    def row_keys(self, r: int) -> list[tuple]:
        return [(self.name, *idx) for idx in _row_indices(self.numblocks, self.axis, r)]

    carries = True  # values for later rows travel in the sweep state

    def read_row(self, r: int, externals: dict, memo: dict | None = None, blocks=None):
        memo = dict(memo or {})
        tasks = self.tasks
        # A module-level evaluator, not a recursive closure: a closure that calls
        # itself is a reference cycle holding ``memo`` (every block this row read)
        # until the cyclic GC happens to run, so memory grew by a row per step.
        out = _assemble(self.numblocks, self.axis, r,
                        lambda idx: _evaluate((self.name, *idx), tasks, memo), blocks)
        keep = {k: v for k, v in memo.items() if self.last_use.get(k, -1) > r}
        memo.clear()
        return out, keep


def _evaluate(key, tasks: dict, memo: dict):
    """Value of ``key`` in ``tasks``, each task run once (results kept in ``memo``)."""
    if key in memo:
        return memo[key]
    t = tasks[key]
    if isinstance(t, GraphNode):
        val = t({d: _evaluate(d, tasks, memo) for d in t.dependencies})
    else:
        val = t
    memo[key] = val
    return val


class PlaneReader:
    """Planes of a local, uncompressed Zarr array (``da.from_zarr``), read at their offsets.

    Any plane range is one exact read per chunk it meets
    (:class:`dask_sweep.io.planes.ZarrPlanes`), so the source's rows are single
    planes and the sweep chooses its steps freely whatever the chunking.
    """

    free = True

    def __init__(self, planes, name: str, numblocks: tuple[int, ...]) -> None:
        self.planes = planes
        self.name = name
        self.numblocks = numblocks
        self.tasks = None  # read inside the slab task (no dask keys)

    def read_planes(self, a: int, b: int, region=None) -> np.ndarray:
        return self.planes.read(a, b, region)

    def read_row(self, r: int, externals: dict, blocks=None) -> np.ndarray:
        return self.planes.read(r, r + 1)


def zarr_plane_reader(hlg, name: str, numblocks, axis: int) -> PlaneReader | None:
    """A :class:`PlaneReader` for a ``from_zarr`` layer over a raw local array, else None."""
    from dask.array.core import getter
    from dask.blockwise import Blockwise

    from dask_sweep.patterns.layers import BlockwiseEval

    layer = hlg.layers.get(name)
    if axis != 0 or not isinstance(layer, Blockwise) or getattr(layer.task, "func", None) \
            is not getter:
        return None
    kw = dict(getattr(layer.task, "kwargs", {}) or {})
    if kw.get("asarray", True) is not True or kw.get("lock") not in (None, False):
        return None
    ev = BlockwiseEval(layer)
    arrays = [arg for arg, ind in ev.indices if ind is None]
    if len(arrays) != 1:
        return None
    arr = arrays[0]
    key = getattr(arr, "key", None)
    if key is not None:  # the array sits under its own key (dask's default)
        arr = None
        for dep in hlg.dependencies.get(name, ()):
            lay = hlg.layers[dep]
            if key in lay:
                arr = lay[key]
                arr = getattr(arr, "value", arr)
    planes = zarr_planes(arr)
    if planes is None or tuple(planes.shape) != tuple(sum(c) for c in _chunks_of(hlg, name)):
        return None
    return PlaneReader(planes, name, numblocks)


def _chunks_of(hlg, name):
    from dask_sweep.patterns.layers import array_meta

    meta = array_meta(hlg.layers[name])
    return meta.chunks if meta is not None else ()


def _row_indices(numblocks, axis, r):
    ranges = [range(n) for n in numblocks]
    ranges[axis] = range(r, r + 1)
    return [tuple(ranges[a][i] for a, i in enumerate(ix))
            for ix in np.ndindex(*[len(x) for x in ranges])]


def _assemble(numblocks, axis, r, get, blocks=None):
    """Chunk row ``r`` (or, with ``blocks`` = per-axis block ranges, a part of it)."""
    lo = [0] * len(numblocks) if blocks is None else [b[0] for b in blocks]
    shape = list(numblocks) if blocks is None else [b[1] - b[0] for b in blocks]
    shape[axis] = 1
    nested = np.empty(shape, dtype=object)
    for ix in np.ndindex(*shape):
        idx = [q + o for q, o in zip(ix, lo)]
        idx[axis] = r
        nested[ix] = np.asarray(get(tuple(idx)))
    if nested.size == 1:
        return nested.flat[0]
    return concatenate3(nested.tolist())


def make_reader(hlg, name: str, numblocks: tuple[int, ...], axis: int):
    """An inline reader when ``name`` needs no upstream computation, else external."""
    from dask.blockwise import Blockwise

    from dask_sweep.patterns.layers import BlockwiseEval, layer_root_closure

    planes = zarr_plane_reader(hlg, name, numblocks, axis)
    if planes is not None:
        return planes
    def subgraph_or_external():
        # a SubgraphReader frees each upstream value after the last row whose tasks read
        # it; what it would carry too long (a backward chain) it refuses, and dask computes
        sub = _subgraph_reader(hlg, name, numblocks, axis)
        return sub if sub is not None else ExternalReader(name, numblocks, axis)

    closure = layer_root_closure(hlg, name)
    if closure is None:
        return subgraph_or_external()
    layer = hlg.layers[name]
    if isinstance(layer, Blockwise):
        ev = BlockwiseEval(layer)
        refs = set(ev.referenced_keys())
        if not ev.array_args() and refs <= {k for d in closure for k in hlg.layers[d].keys()}:
            shared_raw: dict = {}
            for dep in closure:
                shared_raw.update(hlg.layers[dep].items())
            return BlockwiseReader(name, numblocks, axis, ev, convert_legacy_graph(shared_raw))
    merged = dict(layer.items())
    for dep in closure:
        merged.update(hlg.layers[dep].items())
    tasks = convert_legacy_graph(merged)
    shared = {}
    block_keys = set()
    for idx in np.ndindex(*numblocks):
        block_keys.add((name, *idx))
    for k in list(tasks):
        if k not in block_keys:
            shared[k] = tasks.pop(k)
    # order shared keys so that dependencies come first
    ordered: dict = {}
    pending = dict(shared)
    for _ in range(len(pending) + 1):
        for k, v in list(pending.items()):
            dd = v.dependencies if isinstance(v, GraphNode) else set()
            if all(d in ordered for d in dd):
                ordered[k] = v
                del pending[k]
    if pending:  # shared tasks that wait for blocks (ndimage.label's gated rows)
        return subgraph_or_external()
    if any(isinstance(v, GraphNode) and v.dependencies for v in ordered.values()):
        # computed values the blocks share would all be computed by the first row and
        # held to the end by an InlineReader
        return subgraph_or_external()
    for t in tasks.values():
        if isinstance(t, GraphNode) and not set(t.dependencies) <= set(ordered):
            return subgraph_or_external()
    return InlineReader(name, numblocks, axis, tasks, ordered)


def _subgraph_reader(hlg, name: str, numblocks, axis: int, factor: int = 8,
                     max_deps: int = 16):
    """A :class:`SubgraphReader` when the upstream of ``name`` is small and narrow."""
    from dask_sweep.patterns.spec import ancestors

    closure = ancestors(hlg.dependencies, name)
    # upstream work another layer also uses is computed once, by dask, not once per reader
    inside = closure | {name}
    for lay, deps in hlg.dependencies.items():
        if lay not in inside and deps & closure:
            return None
    nblocks = int(np.prod(numblocks))
    total = 0
    for lay in closure | {name}:
        try:
            total += len(hlg.layers[lay])
        except TypeError:  # pragma: no cover
            return None
        if total > factor * nblocks + 64:
            return None
    merged: dict = {}
    for lay in closure | {name}:
        merged.update(hlg.layers[lay].items())
    tasks = convert_legacy_graph(merged)
    for t in tasks.values():
        if isinstance(t, GraphNode):
            dd = t.dependencies
            if len(dd) > max_deps or not set(dd) <= tasks.keys():
                return None
    # Rows are evaluated in order and every task once: a task runs in the first row whose
    # closure reaches it (first_use), and its value is needed until the last row in which
    # a task depending on it runs (or, for a block, its own row).  Not the last row whose
    # closure reaches it: through a chain (ndimage.label's rows, each gated on the
    # previous row's last slab) the last row reaches every row before it, and their
    # values would all be held to the end (the whole packed mask, measured).
    first_use: dict = {}
    for r in range(numblocks[axis]):
        stack = [(name, *idx) for idx in _row_indices(numblocks, axis, r)]
        while stack:
            k = stack.pop()
            if k in first_use:
                continue
            first_use[k] = r
            t = tasks[k]
            if isinstance(t, GraphNode):
                stack.extend(t.dependencies)
    # a row that computes far more than its share (a carried chain: the last row of a
    # backward pass needs every row before it) would hold the rows ahead in the cache
    per_row = np.bincount(list(first_use.values()), minlength=numblocks[axis])
    if per_row.max() > 3 * len(first_use) / numblocks[axis] + 16:
        return None
    last_use: dict = {}
    for k, r in first_use.items():
        last_use[k] = max(last_use.get(k, -1), r)
        t = tasks[k]
        if isinstance(t, GraphNode):
            for d in t.dependencies:
                last_use[d] = max(last_use.get(d, -1), r)
    for r in range(numblocks[axis]):
        for idx in _row_indices(numblocks, axis, r):
            last_use[(name, *idx)] = max(last_use.get((name, *idx), -1), r)
    # small upstream values used by every row (e.g. the zarr array) stay cached
    tasks = {k: v for k, v in tasks.items() if k in last_use}
    return SubgraphReader(name, numblocks, axis, tasks, last_use)
