"""Reading one slab of a dask array from inside a drop-in's slab task.

The drop-ins (``ndimage.label``, ``distance_transform_edt``) read whole slabs
of several chunk rows, in their passes' orders (label's first pass runs
backwards, on several threads); the plugin's sweeps read chunk rows in sweep
order with :mod:`dask_sweep.patterns.readers`.

The input's own tasks for the blocks of a slab are gathered into a small
sub-graph that the slab task evaluates itself (*inline*), so no reader can run
ahead of the sweep: the chain of slab tasks is the only schedule of the reads::

    input graph (e.g. from_zarr -> x > 0)      slab task i
    key (zarr-array)  ---------+               +---------------------------+
    (read, 2, 0) (read, 3, 0)  |  inline  ==>  | eval (read,2,0) (read,3,0) |
    (gt, 2, 0)   (gt, 3, 0)  --+               |      (gt,2,0)  (gt,3,0)    |
                                               | concatenate -> slab        |
                                               +---------------------------+

Inlining is allowed when the slabs' sub-graphs share nothing but *data*
(``DataNode`` keys, such as the opened zarr array or the numpy blocks of
``da.from_array``): a shared *task* would run once per slab that needs it.  Otherwise (an overlap, a reduction, a rechunk across slab
boundaries upstream) the input is *external*: its blocks become dependencies of
the slab task that needs them, and dask computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from dask._task_spec import DataNode, GraphNode, convert_legacy_graph
from dask.array.core import concatenate3


class SlabReader:
    """Evaluate the input's tasks for the chunk rows of one slab (picklable).

    Parameters
    ----------
    name
        The input array's name.
    rows
        Axis-0 block indices of the slab.
    inplane
        Number of blocks along each other axis.
    tasks
        Key -> task of the sub-graph, in an order where dependencies come first;
        empty for an external reader.
    """

    def __init__(
        self,
        name: str,
        rows: Sequence[int],
        inplane: tuple[int, ...],
        tasks: dict | None,
    ) -> None:
        self.name = name
        self.rows = tuple(rows)
        self.inplane = inplane
        self.tasks = tasks

    @property
    def inline(self) -> bool:
        return self.tasks is not None

    def block_keys(self) -> list[tuple]:
        return [(self.name, r, *ix) for r in self.rows for ix in np.ndindex(*self.inplane)]

    def read(self, externals: Sequence[Any] = ()) -> np.ndarray:
        """The slab as one numpy array.

        Parameters
        ----------
        externals
            For an external reader, the blocks in :meth:`block_keys` order.
        """
        keys = self.block_keys()
        if self.tasks is None:
            values = dict(zip(keys, externals))
        else:
            values = _evaluate(self.tasks, set(keys))
        nested = np.empty((len(self.rows), *self.inplane), dtype=object)
        for k in keys:
            nested[(k[1] - self.rows[0], *k[2:])] = np.asarray(values.pop(k))
        if nested.size == 1:
            return nested.flat[0]
        return concatenate3(nested.tolist())

    def blocks(self):
        """``(in-plane block index, block)`` of the slab, one block at a time.

        Each block's own sub-graph is evaluated apart, so the slab is never whole in
        memory (a task several blocks share would run once per block).
        """
        tasks = self.tasks
        for key in self.block_keys():
            need: dict = {}
            stack = [key]
            while stack:
                k = stack.pop()
                if k in need:
                    continue
                need[k] = True
                stack.extend(_deps(tasks[k]))
            sub = {k: t for k, t in tasks.items() if k in need}  # tasks is dependency-ordered
            yield key[2:], np.asarray(_evaluate(sub, {key})[key])


def _evaluate(tasks: dict, wanted: set) -> dict:
    """Run ``tasks`` (dependencies first), dropping each value when no longer needed."""
    remaining: dict = {}
    for t in tasks.values():
        for d in _deps(t):
            remaining[d] = remaining.get(d, 0) + 1
    values: dict = {}
    for k, t in tasks.items():
        deps = _deps(t)
        values[k] = t({d: values[d] for d in deps}) if isinstance(t, GraphNode) else t
        # Free intermediates as soon as their last consumer has run: the slab's
        # pre-processing chain then holds at most two versions of a block.
        for d in deps:
            remaining[d] -= 1
            if remaining[d] == 0 and d not in wanted:
                del values[d]
    return {k: values[k] for k in wanted}


def _deps(t: Any) -> frozenset:
    return t.dependencies if isinstance(t, GraphNode) else frozenset()


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
        Inline readers carry their sub-graph; external readers expect the
        blocks of :meth:`SlabReader.block_keys` as arguments.
    """
    name = image.name
    inplane = tuple(len(c) for c in image.chunks[1:])
    dsk = convert_legacy_graph(dict(image.__dask_graph__()))
    owner: dict = {}  # non-constant key -> the slab that needs it
    closures: list[dict] = []
    inline = True
    for s, rows in enumerate(slabs_blocks):
        wanted = [(name, r, *ix) for r in rows for ix in np.ndindex(*inplane)]
        seen: set = set()
        stack = list(wanted)
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            node = dsk[k]
            # Pure data (a numpy block, the zarr array handle) may be shared; anything
            # computed (a read, a filter) must belong to one slab, or it would run twice.
            if not isinstance(node, DataNode) and owner.setdefault(k, s) != s:
                inline = False
            stack.extend(_deps(node))
        closures.append(_toposort({k: dsk[k] for k in seen}))
        if not inline:
            break
    if not inline:
        return [SlabReader(name, rows, inplane, None) for rows in slabs_blocks], False
    # Constants shared by several slabs are allowed: they are references, not copies,
    # under the threaded scheduler (e.g. the zarr array handle).
    return [SlabReader(name, rows, inplane, c) for rows, c in zip(slabs_blocks, closures)], True


def _toposort(tasks: dict) -> dict:
    out: dict = {}

    def visit(k: Any) -> None:
        stack = [(k, False)]
        while stack:
            key, done = stack.pop()
            if key in out:
                continue
            if done:
                out[key] = tasks[key]
                continue
            stack.append((key, True))
            for d in _deps(tasks[key]):
                if d not in out:
                    stack.append((d, False))

    for k in tasks:
        visit(k)
    return out


__all__ = ["SlabReader", "make_readers"]
