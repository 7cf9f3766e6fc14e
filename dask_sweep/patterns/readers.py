"""The one reader of dask arrays: rows for the sweeps, slabs for the table passes.

A sweep (plugin or DSL) reads its sources chunk row by chunk row, in sweep order
(:func:`make_reader`); a table pass (``ndimage.label`` / ``distance_transform_edt``)
reads whole slabs of chunk rows in any order (:func:`make_readers`).  Both read the
same ways, in order of preference:

* a raw local Zarr array (``da.from_zarr``) by its planes' byte ranges
  (:class:`PlaneReader`, :class:`~dask_sweep.io.planes.ZarrPlanes`); any other
  zarr array by the rows of a step in one zarr call (:class:`ZarrRowsReader`);
* *inline*: the slab task runs dask's own tasks for the blocks it needs (and the
  cheap upstream tasks they need), so no read can run ahead of the sweep;
* *external*: the blocks are dependencies of the slab task, computed by dask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from dask._task_spec import DataNode, GraphNode, Task, convert_legacy_graph
from dask.array.core import concatenate3

from dask_sweep.io.accounting import REGISTRY
from dask_sweep.io.planes import ZarrPlanes, zarr_planes
from dask_sweep.io.zarr_io import read_region

__all__ = [
    "ConstantReader", "ExternalReader", "InlineReader", "PlaneReader", "SlabReader",
    "SubgraphReader", "ZarrRowsReader", "constant_reader", "make_reader", "make_readers",
    "decode_bytes", "decode_excess", "source_itemsize",
]


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
        # rows of whole-plane blocks, each read from a dask_sweep.io source (a TIFF
        # stack's slices): a step's rows are read into one slab, not read and joined
        self.stacks_rows = axis == 0 and all(n == 1 for n in numblocks[1:]) and bool(tasks) \
            and all(_source_read(t) is not None for t in tasks.values())

    def read_rows_stacked(self, r0: int, r1: int) -> np.ndarray:
        """Chunk rows ``[r0, r1)`` read into one new array (``stacks_rows`` readers)."""
        zeros = (0,) * (len(self.numblocks) - 1)
        reads = [_source_read(self.tasks[(self.name, r, *zeros)]) for r in range(r0, r1)]
        shapes = [tuple(s.stop - s.start for s in region) for _, region in reads]
        out = np.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=reads[0][0].dtype)
        p = 0
        for (source, region), shape in zip(reads, shapes):
            source.read(region, out=out[p:p + shape[0]])
            p += shape[0]
        return out

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


def _source_read(t) -> tuple[Any, tuple] | None:
    """``(source, region)`` of a task reading a block of a ``dask_sweep.io`` source."""
    if not isinstance(t, Task) or not getattr(t.func, "reads_source", False):
        return None
    if len(t.args) != 2 or t.kwargs or not isinstance(t.args[1], tuple):
        return None
    source, region = t.args
    if not all(isinstance(s, slice) for s in region) or not hasattr(source, "dtype"):
        return None
    return source, region


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

    def layer_of(self, key) -> str:
        """The layer holding ``key`` (a block of this array)."""
        return key[0]

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

    def __init__(self, name, numblocks, axis, tasks: dict, last_use: dict,
                 needs: dict | None = None, homes: dict | None = None) -> None:
        self.name = name
        self.numblocks = numblocks
        self.axis = axis
        self.tasks = tasks
        self.last_use = last_use  # upstream key -> last row that needs it
        self.needs = needs or {}  # row -> values dask computes that it first needs
        self.homes = homes or {}  # each of those keys -> its layer

    def layer_of(self, key) -> str:
        """The layer holding ``key`` (a dependency of the steps that read it)."""
        return self.homes[key]

    @property
    def external(self) -> bool:
        """Whether some upstream values come from dask (dependencies of the steps)."""
        return bool(self.needs)

    def row_keys(self, r: int) -> list:
        """The keys dask computes whose values row ``r`` is the first to need."""
        return list(self.needs.get(r, ()))

    carries = True  # values for later rows travel in the sweep state
    rows_at_once = 1  # rows of one step whose blocks may be evaluated at once

    def read_rows_at_once(self, r0: int, r1: int, externals: dict, memo: dict | None,
                          threads: int = 1, blocks=None) -> tuple[np.ndarray, dict]:
        """Rows ``[r0, r1)`` (or ``blocks`` of them) as one array, and the upstream values
        later rows still need.

        With ``threads`` > 1, what the rows' blocks share upstream (a drop-in's first
        pass) is evaluated first, on this thread, once; then the blocks, which depend on
        nothing else, on ``threads`` threads at once.
        """
        memo = dict(memo or {})
        for r in range(r0, r1):
            memo.update((k, externals[k]) for k in self.needs.get(r, ()))
        tasks = self.tasks
        if threads > 1 and blocks is None:
            from dask_sweep.runtime.parallel import pmap

            keys = [(self.name, *idx) for r in range(r0, r1)
                    for idx in _row_indices(self.numblocks, self.axis, r)]
            for k in keys:
                t = tasks[k]
                for d in (t.dependencies if isinstance(t, GraphNode) else ()):
                    _evaluate(d, tasks, memo)

            def block(k):
                t = tasks[k]
                return t({d: memo[d] for d in t.dependencies}) if isinstance(t, GraphNode) else t

            memo.update(zip(keys, pmap(block, keys, threads)))
        # A module-level evaluator, not a recursive closure: a closure that calls
        # itself is a reference cycle holding ``memo`` (every block this row read)
        # until the cyclic GC happens to run, so memory grew by a row per step.
        rows = [_assemble(self.numblocks, self.axis, r,
                          lambda idx: _evaluate((self.name, *idx), tasks, memo), blocks)
                for r in range(r0, r1)]
        keep = {k: v for k, v in memo.items() if self.last_use.get(k, -1) >= r1}
        memo.clear()
        return (rows[0] if len(rows) == 1 else np.concatenate(rows, axis=self.axis)), keep

    def read_row(self, r: int, externals: dict, memo: dict | None = None, blocks=None):
        return self.read_rows_at_once(r, r + 1, externals, memo, 1, blocks)


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

    def region_bytes(self, region) -> int:
        """Bytes read per plane of an in-plane ``region`` (a tile's halo: its rows only)."""
        return self.planes.region_bytes(region)

    def read_temps(self, nbytes: int) -> int:
        """What reading ``nbytes`` of planes holds beside them (chunk parts being cut)."""
        return self.planes.temps(nbytes)

    def read_row(self, r: int, externals: dict, blocks=None) -> np.ndarray:
        return self.planes.read(r, r + 1)


class ConstantReader:
    """A constant array (``da.zeros``/``ones``/``full`` and their ``*_like``): any planes,
    made on demand by dask's own block function.

    dask makes each block with ``np.broadcast_to`` of one value, its shape the only
    argument, so the planes of any range (or of an in-plane region) are the same call
    with their own shape: the source's rows are single planes, and a constant beside a
    chunked input (xarray's rolling counts) no longer holds its chunk rows in a ring.
    """

    free = True
    made = True  # nothing read from storage
    what = "made on demand, as dask makes its blocks"

    def __init__(self, fn, name: str, numblocks: tuple[int, ...], axis: int,
                 shape: tuple[int, ...]) -> None:
        self.fn = fn
        self.name = name
        self.numblocks = numblocks
        self.axis = axis
        self.shape = shape
        self.tasks = None  # made inside the slab task (no dask keys)

    def read_planes(self, a: int, b: int, region=None) -> np.ndarray:
        """Planes ``[a, b)`` along the sweep axis (of the in-plane ``region``): a
        read-only broadcast, as dask's blocks are."""
        rest = region or [(0, n) for d, n in enumerate(self.shape) if d != self.axis]
        sizes = [e - s for s, e in rest]
        sizes.insert(self.axis, b - a)
        return self.fn(tuple(sizes))

    def read_row(self, r: int, externals: dict, blocks=None) -> np.ndarray:
        return self.read_planes(r, r + 1)


def constant_reader(hlg, name: str, numblocks, axis: int) -> ConstantReader | None:
    """A :class:`ConstantReader` for a layer of ``da.zeros``/``ones``/``full`` (or their
    ``*_like``), else None (``da.empty``'s values are whatever memory held: left to dask).
    """
    import functools

    from dask.array import wrap
    from dask.blockwise import Blockwise

    layer = hlg.layers.get(name)
    if not isinstance(layer, Blockwise) or len(layer.indices) != 1:
        return None
    fn = getattr(layer.task, "func", None)
    inner = getattr(fn, "func", None)  # partial(curry(_broadcast_trick_inner, np.*_like))
    if (not isinstance(fn, functools.partial) or fn.args
            or getattr(inner, "func", None) is not wrap._broadcast_trick_inner.func
            or getattr(inner, "args", (None,))[0] is np.empty_like):
        return None
    from dask.layers import ArrayChunkShapeDep

    # the one argument is each block's shape
    deps = list(layer.io_deps.values())
    if len(deps) != 1 or not isinstance(deps[0], ArrayChunkShapeDep):
        return None
    shape = tuple(int(sum(c)) for c in _chunks_of(hlg, name))
    return ConstantReader(fn, name, numblocks, axis, shape)


class ZarrRowsReader:
    """Chunk rows of any other zarr array under ``da.from_zarr`` (compressed, sharded,
    remote), the rows of a step in one zarr call (a local array of plain codecs: its
    chunks read and decoded here, :func:`~dask_sweep.io.zarr_io.read_region`).

    dask's ``getter`` reads each block with ``np.asarray(arr[block])``; one call for
    several rows returns the same values, and zarr decodes the chunks it meets at once
    (``async.concurrency``) and pays its per-call cost once: one-plane zstd chunks of
    256 KiB, 512 planes: 0.69 s one by one, 0.41 s eight at a time.
    """

    reads_rows = True  # a step's rows in one call (compute_source)

    def __init__(self, arr, name: str, numblocks: tuple[int, ...], axis: int,
                 chunks: tuple) -> None:
        self.arr = arr
        self.name = name
        self.numblocks = numblocks
        self.axis = axis
        self.bounds = [np.cumsum((0, *c)).tolist() for c in chunks]
        self.tasks = None  # read inside the slab task (no dask keys)

    def read_rows(self, r0: int, r1: int, blocks=None, region=None) -> np.ndarray:
        """Chunk rows ``[r0, r1)`` (of the in-plane block ranges ``blocks``, or of exactly
        the in-plane element ranges ``region``: an in-plane tile's)."""
        idx = []
        rest = iter(region or ())
        for d, bd in enumerate(self.bounds):
            if d == self.axis:
                idx.append(slice(bd[r0], bd[r1]))
            elif region:
                idx.append(slice(*next(rest)))
            else:
                lo, hi = blocks[d] if blocks else (0, len(bd) - 1)
                idx.append(slice(bd[lo], bd[hi]))
        return self._read(tuple(idx))

    def read(self, a: int, b: int, region=None) -> np.ndarray:
        """Planes ``[a, b)`` along axis 0 (of the in-plane element ranges ``region``), as
        :class:`~dask_sweep.io.planes.ZarrPlanes` reads them: a table pass's slab."""
        rest = region or [(0, bd[-1]) for bd in self.bounds[1:]]
        return self._read((slice(a, b), *(slice(lo, hi) for lo, hi in rest)))

    def _read(self, idx: tuple) -> np.ndarray:
        # local chunks decoded by the array's codecs on two threads, else zarr's call
        out = read_region(self.arr, idx)
        if out is None:
            out = np.asarray(self.arr[idx])
        REGISTRY.read(str(getattr(self.arr, "store_path", self.name)), int(out.nbytes),
                      _chunks_met(idx, self.arr.chunks))
        return out

    def read_row(self, r: int, externals: dict, blocks=None) -> np.ndarray:
        return self.read_rows(r, r + 1, blocks)


def _chunks_met(idx: Sequence[slice], chunks: Sequence[int]) -> int:
    """How many stored chunks the selection ``idx`` meets."""
    n = 1
    for s, c in zip(idx, chunks):
        n *= -(-s.stop // c) - s.start // c
    return n


def zarr_plane_reader(hlg, name: str, numblocks, axis: int):
    """A :class:`PlaneReader` for a ``from_zarr`` layer over a raw local array, a
    :class:`ZarrRowsReader` over any other zarr array, else None."""
    from dask.array.core import getter
    from dask.blockwise import Blockwise

    from dask_sweep.patterns.layers import BlockwiseEval

    layer = hlg.layers.get(name)
    if not isinstance(layer, Blockwise) or getattr(layer.task, "func", None) is not getter:
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
    chunks = _chunks_of(hlg, name)
    if tuple(getattr(arr, "shape", ())) != tuple(sum(c) for c in chunks):
        return None
    planes = zarr_planes(arr) if axis == 0 else None
    if planes is not None:
        return PlaneReader(planes, name, numblocks)
    if type(arr).__module__.startswith("zarr") and hasattr(arr, "chunks"):
        return ZarrRowsReader(arr, name, numblocks, axis, chunks)
    return None


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

    def at(ix):
        idx = [q + o for q, o in zip(ix, lo)]
        idx[axis] = r
        return get(tuple(idx))

    return _concatenate(shape, at)


def _concatenate(shape, get) -> np.ndarray:
    """The blocks ``get(ix)`` for ``ix`` over the grid ``shape``, as one array."""
    nested = np.empty(shape, dtype=object)
    for ix in np.ndindex(*shape):
        nested[ix] = np.asarray(get(ix))
    if nested.size == 1:
        return nested.flat[0]
    return concatenate3(nested.tolist())


def make_reader(hlg, name: str, numblocks: tuple[int, ...], axis: int):
    """An inline reader when ``name`` needs no upstream computation, else external."""
    from dask.blockwise import Blockwise

    from dask_sweep.patterns.layers import BlockwiseEval, layer_root_closure

    planes = zarr_plane_reader(hlg, name, numblocks, axis)
    if planes is None:
        planes = constant_reader(hlg, name, numblocks, axis)
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
    inside = closure | {name}
    outside = [lay for lay, deps in hlg.dependencies.items()
               if lay not in inside and deps & closure]
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
    home: dict = {}  # key -> its layer (the dependency of a step that is handed it)
    for lay in closure | {name}:
        for k, v in hlg.layers[lay].items():
            merged[k] = v
            home[k] = lay
    tasks = convert_legacy_graph(merged)
    # Upstream work another layer also uses (ndimage.label's count, computed with its
    # labels) is computed once, by dask: those keys and what they need are cut out of
    # the reader's tasks, and the steps that need them get their values (``row_keys``).
    cut: set = set()
    for lay in outside:
        if len(hlg.layers[lay]) > factor * nblocks + 64:
            return None
        used = convert_legacy_graph(dict(hlg.layers[lay]), all_keys=set(tasks) | set(
            hlg.layers[lay].keys()))
        stack = [d for t in used.values() for d in _deps(t) if d in tasks]
        while stack:
            k = stack.pop()
            if k not in cut:
                cut.add(k)
                stack.extend(_deps(tasks[k]))
    if any(isinstance(k, tuple) and k[0] == name for k in cut):
        return None  # the blocks themselves are used elsewhere: dask computes them
    direct = _zarr_layers(hlg, closure)
    for k in tasks:  # zarr blocks upstream (a slice, a cast): read directly, counted
        if isinstance(k, tuple) and k[0] in direct:
            tasks[k] = _block_task(k, *direct[k[0]])
    for t in tasks.values():
        if isinstance(t, GraphNode):
            dd = t.dependencies
            if len(dd) > max_deps or not set(dd) <= tasks.keys():
                return None
    given = {k: tasks.pop(k) for k in cut}
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
            t = tasks.get(k)  # None: a value dask computes (cut)
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
        t = tasks.get(k)
        if isinstance(t, GraphNode):
            for d in t.dependencies:
                last_use[d] = max(last_use.get(d, -1), r)
    for r in range(numblocks[axis]):
        for idx in _row_indices(numblocks, axis, r):
            last_use[(name, *idx)] = max(last_use.get((name, *idx), -1), r)
    # small upstream values used by every row (e.g. the zarr array) stay cached
    tasks = {k: v for k, v in tasks.items() if k in last_use}
    needs: dict = {}  # row -> the cut values it is the first to need
    for k in given:
        if k in first_use:
            needs.setdefault(first_use[k], []).append(k)
    homes = {k: home[k] for ks in needs.values() for k in ks}
    return SubgraphReader(name, numblocks, axis, tasks, last_use, needs, homes)


# --- slabs, read in any order (the drop-ins' table passes) -------------------------------
#
# ndimage.label and distance_transform_edt read whole slabs of several chunk rows, in
# their passes' orders (label's first pass runs backwards, on several threads), so a
# slab's reader carries nothing from one slab to the next.  The same three ways as the
# sweeps' rows, in order of preference:
#
#   planes   the array is a zarr array (``da.from_zarr``): a raw local one's planes are
#            read at their byte offsets (:class:`PlaneReader`'s ``ZarrPlanes``), any
#            other's slab in one zarr call (:class:`ZarrRowsReader`)
#   inline   the slab's blocks and the upstream tasks they need are evaluated in the slab
#            task, when the slabs' sub-graphs share nothing but *data* (``DataNode``
#            keys: the zarr array handle, ``from_array``'s numpy blocks); a shared *task*
#            would run once per slab that needs it
#   external the blocks are dependencies of the slab task, computed by dask
#
#     input graph (from_zarr -> x > 0)       slab task i
#     (read, 2, 0) (read, 3, 0)  ─┐  inline   eval (read,2,0) (read,3,0) (gt,2,0) (gt,3,0)
#     (gt, 2, 0)   (gt, 3, 0)   ─┘  ======>  concatenate -> slab


class SlabReader:
    """One slab of a dask array: its axis-0 chunk rows ``rows`` (picklable).

    Parameters
    ----------
    name
        The array's name.
    rows
        Axis-0 block indices of the slab.
    chunks
        The array's chunks.
    tasks
        Key -> task of the slab's sub-graph, dependencies first (inline); ``None``
        when the slab is read from ``planes`` or handed its blocks (external).
    planes
        A zarr array read directly: a raw local one's
        :class:`~dask_sweep.io.planes.ZarrPlanes`, any other's :class:`ZarrRowsReader`.
    """

    def __init__(self, name: str, rows: Sequence[int], chunks: tuple, tasks: dict | None,
                 planes=None) -> None:
        self.name = name
        self.rows = tuple(rows)
        self.inplane = tuple(len(c) for c in chunks[1:])
        self.tasks = tasks
        self.planes = planes
        starts = np.cumsum((0, *chunks[0]))
        self.bounds = ((int(starts[self.rows[0]]), int(starts[self.rows[-1] + 1]))
                       if self.rows else (0, 0))
        self.edges = [np.cumsum((0, *c)).tolist() for c in chunks[1:]]

    @property
    def inline(self) -> bool:
        """Whether the slab task reads the slab itself (no blocks handed in)."""
        return self.tasks is not None or self.planes is not None

    def block_keys(self) -> list[tuple]:
        return [(self.name, r, *ix) for r in self.rows for ix in np.ndindex(*self.inplane)]

    def read(self, externals: Sequence[Any] = ()) -> np.ndarray:
        """The slab as one numpy array.

        Parameters
        ----------
        externals
            For an external reader, the blocks in :meth:`block_keys` order.
        """
        if self.planes is not None:
            return self.planes.read(*self.bounds)
        keys = self.block_keys()
        values = dict(zip(keys, externals)) if self.tasks is None else _run(self.tasks, keys)
        r0 = self.rows[0]
        return _concatenate((len(self.rows), *self.inplane),
                            lambda ix: values.pop((self.name, r0 + ix[0], *ix[1:])))

    def blocks(self):
        """``(in-plane block index, block)`` of the slab, one block at a time.

        Each block's own sub-graph is evaluated apart, so the slab is never whole in
        memory (a task several blocks share would run once per block).
        """
        for key in self.block_keys():
            if self.planes is not None:
                region = [(e[q], e[q + 1]) for e, q in zip(self.edges, key[2:])]
                yield key[2:], self.planes.read(*self.bounds, region)
                continue
            need: set = set()
            stack = [key]
            while stack:
                k = stack.pop()
                if k not in need:
                    need.add(k)
                    stack.extend(_deps(self.tasks[k]))
            sub = {k: t for k, t in self.tasks.items() if k in need}  # dependency-ordered
            yield key[2:], np.asarray(_run(sub, [key])[key])


def source_itemsize(image) -> int:
    """The largest item size among ``image`` and the arrays it is computed from (of more
    than one element): what a read of its blocks decodes before it computes them (a
    uint16 volume read for ``volume > t`` decodes 2 B per voxel of a bool block)."""
    from dask_sweep.patterns.layers import array_meta

    items = [image.dtype.itemsize]
    expr = getattr(image, "expr", None)
    if expr is not None and hasattr(expr, "walk"):  # dask's array-expression mode
        for node in expr.walk():
            dt, shape = getattr(node, "dtype", None), getattr(node, "shape", ())
            if isinstance(dt, np.dtype) and _elements(shape) > 1:
                items.append(dt.itemsize)
        return max(items)
    for layer in getattr(image.__dask_graph__(), "layers", {}).values():
        meta = array_meta(layer)
        if meta is not None and _elements(meta.shape) > 1:
            items.append(meta.dtype.itemsize)
    return max(items)


def decode_bytes(image) -> float:
    """Bytes per voxel a block of ``image``'s source holds while it is read and decoded:
    copies of :func:`source_itemsize`, the most of the sources it reads.  Zarr read
    through zarr's codec pipeline: three (the compressed bytes, the chunk decoded, the
    copy into the block: traced on noise in zstd chunks, 4.1 B uint8, 6.3 uint16, 12.7
    float32 with the mask and its bits); raw Zarr read by byte ranges: one and a half
    (3.1, 4.1, 6.1: the block read once, the mask and its bits); dask_sweep's sources:
    their ``decode_copies`` (a compressed TIFF slice seven, an uncompressed one two);
    none of these (an array in memory): two."""
    hlg = image.__dask_graph__()
    layers = getattr(hlg, "layers", None)
    if layers is None:  # array-expression mode: not looked into
        return float(3 * source_itemsize(image))
    copies = [1.5 if isinstance(reader, ZarrPlanes) else 3.0
              for reader, _ in _zarr_layers(hlg).values()]
    for layer in layers.values():
        if type(layer).__name__ != "MaterializedLayer":
            continue  # computed (blockwise), not read; not materialised here
        task = next(iter(layer.values()), None)  # a read layer's tasks are all alike
        src = getattr(task, "args", (None,))[0] if isinstance(task, Task) else None
        if hasattr(src, "decode_copies") and hasattr(src, "dtype"):
            copies.append(float(src.decode_copies))
    return (max(copies) if copies else 2.0) * source_itemsize(image)


def decode_excess(image, *counted: float, decode: float | None = None) -> tuple[int, ...]:
    """For each of ``counted`` (bytes per voxel a pass counts for the slab it reads),
    the bytes one block's read holds beyond that: the largest block of ``image`` times
    what :func:`decode_bytes` exceeds it by (0 where it does not).  A slab's read holds
    its blocks and, one at a time, a block's source read and decoded; beside a phase
    counted at ``c`` per voxel of a slab at least a block thick, that is at most
    ``block x (decode - c)`` more.  ``decode``: :func:`decode_bytes` of ``image``,
    when the caller has it."""
    block = int(np.prod([max(c) for c in image.chunks], dtype=np.int64))
    decode = decode_bytes(image) if decode is None else decode
    return tuple(int(block * max(0.0, decode - c)) for c in counted)


def _elements(shape) -> float:
    try:
        return float(np.prod([float(n) for n in shape]))
    except (TypeError, ValueError):  # unknown sizes
        return 2.0


def make_readers(image, slabs_blocks: Sequence[Sequence[int]]) -> tuple[list[SlabReader], bool]:
    """One reader per slab (given as its axis-0 block indices) and whether they are inline.

    Parameters
    ----------
    image
        The input dask array.
    slabs_blocks
        For each slab, the axis-0 block indices it covers, in order.

    Returns
    -------
    readers, inline
        Inline readers read their slab themselves; external readers expect the
        blocks of :meth:`SlabReader.block_keys` as arguments.
    """
    name, chunks = image.name, image.chunks
    hlg = image.__dask_graph__()
    planes = (zarr_plane_reader(hlg, name, image.numblocks, 0)
              if hasattr(hlg, "layers") else None)
    if planes is not None:  # a zarr array read directly: by byte ranges, or in one call
        source = planes.planes if isinstance(planes, PlaneReader) else planes
        return [SlabReader(name, rows, chunks, None, source) for rows in slabs_blocks], True
    inplane = tuple(len(c) for c in chunks[1:])
    dsk = convert_legacy_graph(dict(hlg))
    direct = _zarr_layers(hlg)
    owner: dict = {}  # computed key -> the slab that needs it
    closures: list[dict] = []
    for s, rows in enumerate(slabs_blocks):
        seen: set = set()
        stack = [(name, r, *ix) for r in rows for ix in np.ndindex(*inplane)]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            if isinstance(k, tuple) and k[0] in direct:  # a zarr block, read directly
                dsk[k] = node = _block_task(k, *direct[k[0]])
            else:
                node = dsk[k]
            # pure data may be shared; a computed task must belong to one slab
            if not isinstance(node, DataNode) and owner.setdefault(k, s) != s:
                return [SlabReader(name, rows, chunks, None) for rows in slabs_blocks], False
            stack.extend(_deps(node))
        closures.append(_toposort({k: dsk[k] for k in seen}))
    return [SlabReader(name, rows, chunks, c) for rows, c in zip(slabs_blocks, closures)], True


def _zarr_layers(hlg, among=None) -> dict:
    """``{layer: (reader, per-axis block edges)}`` for the graph's zarr reads (of the
    layers ``among``, or all).

    Such a block is read by :func:`_block_task`: a raw local array's by its planes' byte
    ranges (``ZarrPlanes``), skipping zarr's per-chunk machinery; any other's in one
    zarr call (:class:`ZarrRowsReader`), as dask's getter would, but counted.  The
    values are the same.
    """
    from dask_sweep.patterns.layers import array_meta

    out: dict = {}
    for lay in (getattr(hlg, "layers", {}) if among is None else among):
        meta = array_meta(hlg.layers[lay])
        if meta is None:
            continue
        pr = zarr_plane_reader(hlg, lay, tuple(len(c) for c in meta.chunks), 0)
        if pr is not None:
            out[lay] = (pr.planes if isinstance(pr, PlaneReader) else pr,
                        [np.cumsum((0, *c)).tolist() for c in meta.chunks])
    return out


def _block_task(key, planes, edges) -> Task:
    """The task reading block ``key`` of a zarr layer (see :func:`_zarr_layers`)."""
    return Task(key, _read_block, planes, [(e[q], e[q + 1]) for e, q in zip(edges, key[1:])])


def _read_block(planes, bounds) -> np.ndarray:
    (a, b), *region = bounds
    return planes.read(a, b, region)


def _run(tasks: dict, wanted: Sequence) -> dict:
    """Run ``tasks`` (dependencies first), dropping each value after its last consumer."""
    keep = set(wanted)
    remaining: dict = {}
    for t in tasks.values():
        for d in _deps(t):
            remaining[d] = remaining.get(d, 0) + 1
    values: dict = {}
    for k, t in tasks.items():
        deps = _deps(t)
        values[k] = t({d: values[d] for d in deps}) if isinstance(t, GraphNode) else t
        # the slab's pre-processing chain then holds at most two versions of a block
        for d in deps:
            remaining[d] -= 1
            if remaining[d] == 0 and d not in keep:
                del values[d]
    return {k: values[k] for k in keep}


def _deps(t: Any) -> frozenset:
    return t.dependencies if isinstance(t, GraphNode) else frozenset()


def _toposort(tasks: dict) -> dict:
    """``tasks`` reordered so that every task's dependencies come before it."""
    out: dict = {}
    for k in tasks:
        stack = [(k, False)]
        while stack:
            key, done = stack.pop()
            if key in out:
                continue
            if done:
                out[key] = tasks[key]
                continue
            stack.append((key, True))
            stack.extend((d, False) for d in _deps(tasks[key]) if d not in out)
    return out
