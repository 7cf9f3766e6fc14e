"""dask array *expressions* → the graph the recogniser reads.

In array-expression mode (``dask.config.set({"array.query-planning": True})``
before ``import dask.array``; dask 2026.8's ``dask.array._array_expr``) a
collection is a tree of ``ArrayExpr`` nodes, lowered at compute time, and there
is no ``HighLevelGraph`` for :mod:`dask_sweep.patterns.recognise` to read.  The
nodes of a lowered tree build their tasks from the very layers the graph mode
puts in a ``HighLevelGraph``::

    expression (lowered)                 layer it builds (not materialised here)
    Blockwise / Elemwise / Transpose     dask.blockwise.Blockwise (same core_blockwise call)
    MapOverlap                           ArrayOverlapLayer (name, axes, chunks)
    FromArray (zarr, h5py, ...)          graph_from_arraylike: original-… + getter Blockwise
    anything else (Concatenate, slices,  its own task dict, materialised only if a reader
      Full, TasksRechunk, reductions…)   needs it (a source's blocks)

so :func:`expression_graph` translates a lowered tree into those layers and
the *same* recogniser, planner and budget run on it: ``map_overlap`` (its
``_trim`` map_blocks carries depth and boundary exactly as in the graph mode;
boundary padding is ``Concatenate`` (``stack-…``), slices, ``repeat`` and
``Full`` nodes), elementwise ``Elemwise`` and ``map_blocks`` stages, rechunks,
and sources read inside the slab task.  Differences the translation absorbs:

* expression ``elemwise`` turns every scalar into a 0-d ``FromArray`` and casts
  the result (``_enforce_dtype``): the 0-d array is put in the template as the
  literal it is (the task received that very array), so the stage is indexed
  like its output, as in the graph mode;
* ``compute()`` ends in a rechunk of the whole array to one block (dask's
  ``FinalizeComputeArray``): it is kept out of the graph, and the array it
  concatenates is the requested output, as the graph mode's ``finalize`` task.

This module only *reads* expressions; replacing recognised subtrees by the
sweep's tasks is :mod:`dask_sweep.emit.expr`'s.  dask 2026.8's
expression mode has no ``from_zarr``, ``store``, ``to_zarr``, ``where`` or
``da.ma`` (they raise ``NotImplementedError``): a Zarr array is read with
``da.from_array(zarr_array, chunks=zarr_array.chunks)`` (a ``FromArray``), which
is recognised like ``from_zarr`` (planes read at their offsets for a raw local
array).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dask.highlevelgraph import HighLevelGraph, Layer

from dask_sweep.plan.ir import EXPR_ANNOTATIONS


def expression_mode() -> bool:
    """Whether ``dask.array`` runs on expressions (``array.query-planning``; fixed at import).

    Read from what dask recorded at import (asking ``array_expr_enabled()`` again
    warns if the config was changed since).
    """
    import dask.array as da

    return getattr(da, "ARRAY_EXPR_ENABLED", None) is True


def internals_ok() -> bool:
    """Whether dask has the expression internals this reader and the hook rely on."""
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


def array_expr_of(x: Any):
    """The expression behind a collection in array-expression mode, else ``None``."""
    try:
        from dask._expr import Expr
    except ImportError:  # pragma: no cover - dask without expressions
        return None
    expr = getattr(x, "expr", None)
    return expr if isinstance(expr, Expr) else None


class ExprLayer(Layer):
    """The tasks of one expression node, built only if something reads them."""

    def __init__(self, expr, collection_annotations: dict | None) -> None:
        super().__init__(collection_annotations=collection_annotations)
        self.expr = expr
        self._dsk: dict | None = None

    @property
    def _graph(self) -> dict:
        if self._dsk is None:
            self._dsk = dict(self.expr._layer())
        return self._dsk

    def __getitem__(self, key):
        return self._graph[key]

    def __iter__(self) -> Iterator:
        return iter(self._graph)

    def __len__(self) -> int:
        return len(self._graph)

    def is_materialized(self) -> bool:
        return self._dsk is not None

    def get_output_keys(self):
        return self._graph.keys()


@dataclass
class ExprGraph:
    """A lowered expression tree seen as a ``HighLevelGraph`` (what the recogniser reads)."""

    hlg: HighLevelGraph
    keys: list  # the keys the computation asks for (finalize's inputs)
    exprs: dict = field(default_factory=dict)  # layer name -> expression node
    fallbacks: list = field(default_factory=list)


def _annotations(expr) -> dict | None:
    from dask.array._array_expr._expr import ArrayExpr
    from dask.utils import typename

    if not isinstance(expr, ArrayExpr):
        return None
    try:
        chunks, meta = expr.chunks, expr._meta
        dtype = expr.dtype
    except Exception:  # an expression whose metadata dask cannot compute
        return None
    return {"chunks": chunks, "dtype": dtype, "chunk_type": typename(type(meta)),
            "type": "dask.array._array_expr._collection.Array"}


def _literal(arg):
    """The value of a 0-d ``FromArray`` of a numpy array (a scalar ``elemwise`` made), else None."""
    from dask.array._array_expr._io import FromArray

    if isinstance(arg, FromArray) and arg.ndim == 0 and type(arg.array) in (
            np.ndarray, np.ma.MaskedArray) and not arg.operand("lock"):
        return arg.array
    return None


def _blockwise_layer(expr):
    """The ``dask.blockwise.Blockwise`` layer ``expr._layer()`` would materialise.

    Mirrors ``dask.array._array_expr._blockwise.Blockwise._layer`` (dask 2026.8)
    up to its final ``dict(...)``; ``None`` when an argument carries collections
    (delayed values), which the graph mode does not sweep either.
    """
    import toolz
    from dask.array.core import normalize_arg
    from dask.blockwise import blockwise as core_blockwise
    from dask.delayed import unpack_collections
    from dask.layers import ArrayBlockwiseDep

    numblocks: dict = {}
    argindsstr: list = []
    literals = set()
    for arg, ind in toolz.partition(2, expr.args):
        if ind is None:
            arg = normalize_arg(arg)
            arg, collections = unpack_collections(arg)
            if collections:
                return None, literals
        elif not isinstance(arg, ArrayBlockwiseDep):
            value = _literal(arg)
            if value is not None and tuple(ind) == ():
                literals.add(arg._name)
                arg, ind = value, None
            else:
                numblocks[arg.name] = arg.numblocks
                arg = arg.name
        argindsstr.extend((arg, ind))
    kwargs = {}
    for k, v in (expr.kwargs or {}).items():
        v = normalize_arg(v)
        v, collections = unpack_collections(v)
        if collections:
            return None, literals
        kwargs[k] = v
    layer = core_blockwise(expr.func, expr._name, expr.out_ind, *argindsstr,
                           numblocks=numblocks, dependencies=[], new_axes=expr.new_axes,
                           concatenate=expr.concatenate, **kwargs)
    return layer, literals


def _overlap_layer(expr):
    from dask.layers import ArrayOverlapLayer

    x = expr.array
    return ArrayOverlapLayer(name=x.name, axes=expr.axes, chunks=x.chunks,
                             numblocks=x.numblocks,
                             token="-".join(expr._name.split("-")[1:]))


def _from_array_layers(expr) -> dict | None:
    """Layers of a ``FromArray`` of an array-like (zarr, h5py): as ``from_zarr`` makes them."""
    from dask.array.core import getter, getter_nofancy, graph_from_arraylike
    from dask.utils import SerializableLock

    arr = expr.array
    if type(arr) in (np.ndarray, np.ma.MaskedArray):
        return None  # eagerly sliced blocks: the node's own task dict
    lock = expr.operand("lock")
    if lock is True:
        lock = SerializableLock()
    getitem = expr.operand("getitem") or (getter if expr.operand("fancy") else getter_nofancy)
    hlg = graph_from_arraylike(arr, chunks=expr.chunks, shape=arr.shape, name=expr._name,
                               lock=lock, getitem=getitem, asarray=expr.asarray_arg,
                               inline_array=expr.operand("inline_array"), dtype=arr.dtype)
    return hlg


def _is_finalize_rechunk(expr) -> bool:
    """The rechunk to one block that ends ``compute()`` (``FinalizeComputeArray``)."""
    from dask.array._array_expr._rechunk import Rechunk

    return isinstance(expr, Rechunk) and all(len(c) == 1 for c in expr.chunks) and any(
        len(c) > 1 for c in expr.array.chunks)


def flatten_keys(keys: Any) -> Iterator[Any]:
    """The keys of a collection's ``__dask_keys__()`` (nested lists), one by one."""
    if isinstance(keys, list):
        for k in keys:
            yield from flatten_keys(k)
    else:
        yield keys


def expression_graph(root) -> ExprGraph:
    """The recogniser's view of a lowered expression ``root`` (a collection's or compute's)."""
    from dask._expr import _ExprSequence
    from dask.array._array_expr._blockwise import Blockwise
    from dask.array._array_expr._io import FromArray, FromGraph
    from dask.array._array_expr._overlap import MapOverlap

    tops = list(root.operands) if isinstance(root, _ExprSequence) else [root]
    keys: list = []
    starts = []
    for top in tops:
        if _is_finalize_rechunk(top):
            top = top.array  # finalize concatenates these blocks: they are the outputs
        starts.append(top)
        keys.extend(flatten_keys(top.__dask_keys__()))
    layers: dict = {}
    deps: dict = {}
    exprs: dict = {}
    seen: set = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node._name in seen:
            continue
        seen.add(node._name)
        name = node._name
        exprs[name] = node
        node_deps = {d._name for d in node.dependencies()}
        ann = _annotations(node)
        layer = None
        if isinstance(node, Blockwise):
            layer, literals = _blockwise_layer(node)
            node_deps -= literals
        elif isinstance(node, MapOverlap):
            layer = _overlap_layer(node)
        elif isinstance(node, FromArray):
            hlg = _from_array_layers(node)
            if hlg is not None:
                for lname, lay in hlg.layers.items():
                    if lname != name:
                        layers[lname] = lay
                        deps[lname] = set(hlg.dependencies.get(lname, ()))
                layer = hlg.layers[name]
                node_deps = set(hlg.dependencies.get(name, ()))
        if isinstance(node, FromGraph) and node.operand("name_prefix") in EXPR_ANNOTATIONS:
            # a drop-in's output: what it holds while a sweep reads it (emit.io_graphs)
            ann = {**EXPR_ANNOTATIONS[node.operand("name_prefix")], **(ann or {})}
        if layer is None:
            layer = ExprLayer(node, ann)
        else:
            layer.collection_annotations = ann
        layers[name] = layer
        deps[name] = node_deps
        stack.extend(d for d in node.dependencies() if d._name in node_deps)
    return ExprGraph(HighLevelGraph(layers, deps), keys, exprs)
