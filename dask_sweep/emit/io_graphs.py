"""The storage layer's dask graphs: a source's read tasks, the chained slab writes.

``io`` imports nothing of the plugin, and writes no dask tasks itself:
:mod:`dask_sweep.integration.optimize` hands these two builders to it
(``dask_sweep.io.host.HOST``) when the package is imported.

* :func:`source_array`: a source as a dask array whose only layer is a root
  layer, one read task per block (``imread``);
* :func:`write_graph`: the delayed chain of slab writes into a sink, each slab
  written after the one before it, the reads of slab *i* gated on the write of
  slab *i - lag* (``imwrite`` when no sweep writes it).
"""

from __future__ import annotations

import threading
from typing import Any

import dask
import numpy as np
from dask._task_spec import List, Task, TaskRef, convert_legacy_graph
from dask.array.core import concatenate3
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from dask_sweep.plan.ir import EXPR_ANNOTATIONS, EXPR_ANNOTATIONS_KEPT
from dask_sweep.runtime.memory import trims

__all__ = ["array_of", "source_array", "write_graph"]

_KEEP_LOCK = threading.Lock()


def source_array(source: Any, chunks: tuple, name: str):
    """``source`` as a lazy dask array in blocks ``chunks``, layer ``name``: one task per
    block, each reading its region (through the source's per-block reader)."""
    starts = [np.cumsum((0,) + c) for c in chunks]
    dsk = {}
    for idx in np.ndindex(*[len(c) for c in chunks]):
        region = tuple(slice(int(st[i]), int(st[i + 1])) for st, i in zip(starts, idx))
        reader, local = source._block_reader(region)
        key = (name, *idx)
        dsk[key] = Task(key, _read_block, reader, local)
    meta = np.empty((0,) * source.ndim, dtype=source.dtype)
    graph = HighLevelGraph.from_collections(name, MaterializedLayer(dsk), dependencies=())
    return array_of(graph, name, chunks, meta)


def array_of(graph: HighLevelGraph, name: str, chunks: tuple, meta: np.ndarray):
    """The dask array of layer ``name`` of ``graph`` (with its dependencies), in either
    of dask's array modes.

    In dask's array-expression mode, an expression over the graph's tasks (its blocks
    are aliased under a name of its own); the layer's collection annotations (a
    drop-in's :data:`~dask_sweep.plan.ir.FEEDING`) are kept in
    :data:`~dask_sweep.plan.ir.EXPR_ANNOTATIONS` for the recogniser.
    """
    import dask.array as da

    if getattr(da, "ARRAY_EXPR_ENABLED", None) is True:
        from dask.array._array_expr._collection import from_graph

        layer = graph.layers[name]
        ann = getattr(layer, "collection_annotations", None)
        if ann:  # what the recogniser reads of a drop-in's output (see EXPR_ANNOTATIONS)
            with _KEEP_LOCK:  # drop-ins may be called from several threads
                EXPR_ANNOTATIONS[name] = dict(ann)
                EXPR_ANNOTATIONS.move_to_end(name)
                while len(EXPR_ANNOTATIONS) > EXPR_ANNOTATIONS_KEPT:
                    EXPR_ANNOTATIONS.popitem(last=False)
        keys = [k for k in layer if isinstance(k, tuple) and k[0] == name]
        return from_graph(dict(graph), meta, chunks, keys, name)
    return da.Array(graph, name, chunks, meta=meta)


def _read_block(source: Any, region: tuple) -> np.ndarray:
    return source.read(region)


# a sweep reading a step's rows of these tasks reads them into one slab
# (patterns.readers.InlineReader.read_rows_stacked)
_read_block.reads_source = True


def write_graph(array, sink: Any, *, lag: int = 2):
    """:func:`dask_sweep.io.write_graph`'s tasks (it checks the shapes, then calls this)."""
    if getattr(array, "expr", None) is not None:  # array-expression mode: lowered first
        array = array.optimize()
    else:
        (array,) = dask.optimize(array)
    todo = [s for s in sink.todo_slabs() if s[1] > s[0]]
    name = f"imwrite-{tokenize(array.name, sink.path, sink.manifest(), todo)}"
    graph = convert_legacy_graph(dict(array.__dask_graph__()))
    bounds = np.cumsum((0, *array.chunks[0]))
    inplane = array.numblocks[1:]

    slab_keys: list[list] = []
    prev = None
    for i, (a, b) in enumerate(todo):
        r0 = int(np.searchsorted(bounds, a, side="right")) - 1
        r1 = int(np.searchsorted(bounds, b, side="left"))
        keys = [(array.name, r, *ix) for r in range(r0, r1) for ix in np.ndindex(*inplane)]
        slab_keys.append(keys)
        nested = _nested([TaskRef(k) for k in keys], (r1 - r0, *inplane))
        key = (name, i)
        graph[key] = Task(key, _write_slab, sink, a, b, int(bounds[r0]), nested, prev)
        prev = TaskRef(key)
    final = f"{name}-finalize"
    graph[final] = Task(final, _finalize, sink, prev)
    if lag > 0:
        _gate_reads(graph, slab_keys, name, lag)
    return Delayed(final, graph)


def _nested(items: list, shape: tuple[int, ...]):
    """``items`` (C order) as nested lists of ``shape`` (what concatenate3 takes).

    Built from task-spec ``List`` nodes: plain lists of ``TaskRef`` are not
    resolved by dask.
    """
    if len(shape) == 1:
        return List(*items)
    step = len(items) // shape[0]
    return List(*(_nested(items[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])))


def _gate_reads(graph: dict, slab_keys: list[list], name: str, lag: int) -> None:
    """Make slab *i*'s first own tasks wait for the write of slab *i - lag*.

    A task is *first needed* by the earliest slab whose output depends on it.
    The gated tasks are the frontier of slab *i*'s exclusive work: those first
    needed by slab *i* whose inputs were all needed earlier (reads with no
    dependency, or ``getter`` tasks of a shared in-memory array).  Everything
    downstream of them follows.
    """
    first: dict = {}
    for i, keys in enumerate(slab_keys):
        stack = list(keys)
        while stack:
            k = stack.pop()
            if k in first:
                continue  # reached by an earlier slab already
            first[k] = i
            node = graph.get(k)
            if node is not None:
                stack.extend(node.dependencies)
    for k, i in first.items():
        node = graph.get(k)
        if i < lag or not isinstance(node, Task):
            continue
        if all(first.get(d, -1) < i for d in node.dependencies):
            # The original task runs inline, as an argument of the gate.
            graph[k] = Task(k, _after, node, TaskRef((name, i - lag)))


def _after(value: Any, _marker: Any) -> Any:
    """Pass a task's value on once the write it was gated on is done."""
    return value


@trims
def _write_slab(
    sink: Any, start: int, stop: int, row0: int, blocks: list, prev: dict | None
) -> dict:
    """Write one slab (after the previous one: ``prev`` chains the writes in order).

    The slab is handed to the kernel, which starts writing it back at once; the
    sink syncs and records slabs in groups on a helper thread (``sync_bytes``),
    so the disk never idles between slabs; the sweep waits only while the previous
    group is still syncing.
    """
    single = blocks
    while isinstance(single, list) and len(single) == 1:
        single = single[0]
    # one block: written as it is, no concatenation copy
    data = concatenate3(blocks) if isinstance(single, list) else single
    data = data[start - row0 : stop - row0]
    return sink.write_slab(start, data, commit=False)


def _finalize(sink: Any, last: dict | None) -> str:
    return sink.finalize()  # syncs and records the slabs not yet synced
