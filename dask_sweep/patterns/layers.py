"""Reading dask's layers: the one place that knows their internals.

Everything dask-version-specific about ``Blockwise``, ``ArrayOverlapLayer``,
``MaterializedLayer`` and ``_task_spec`` lives here, so a dask upgrade touches
this module (and :mod:`dask_sweep.patterns.recognise`) only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask._task_spec import GraphNode, TaskRef
from dask.blockwise import Blockwise
from dask.highlevelgraph import HighLevelGraph

try:  # the only private import of an overlap helper; checked by tests
    from dask.array.overlap import _trim as _dask_trim
except ImportError:  # pragma: no cover
    _dask_trim = None
try:  # array-expression mode's copy of the same helper (dask.array._array_expr)
    from dask.array._array_expr._overlap import _trim as _expr_trim
except ImportError:  # pragma: no cover
    _expr_trim = None
_TRIMS = tuple(f for f in (_dask_trim, _expr_trim) if f is not None)


@dataclass(frozen=True)
class ArrayMeta:
    """Shape, chunks and dtype dask recorded for a layer's array."""

    shape: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    dtype: np.dtype
    chunk_type: str = "numpy.ndarray"  # type of the blocks (dask's ``chunk_type``)

    @property
    def plain(self) -> bool:
        """Whether the blocks are plain numpy arrays (what the sweep's buffers hold)."""
        return self.chunk_type == "numpy.ndarray"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numblocks(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.chunks)


def array_meta(layer) -> ArrayMeta | None:
    ann = getattr(layer, "collection_annotations", None) or {}
    if "chunks" not in ann or "dtype" not in ann:
        return None
    if any(any(c != c for c in cc) for cc in ann["chunks"]):  # NaN: unknown chunk sizes
        return None
    chunks = tuple(tuple(int(c) for c in cc) for cc in ann["chunks"])
    shape = tuple(sum(c) for c in chunks)
    return ArrayMeta(shape, chunks, np.dtype(ann["dtype"]),
                     str(ann.get("chunk_type") or "numpy.ndarray"))


class BlockwiseEval:
    """Evaluate one block of a ``Blockwise`` layer from its task template.

    Picklable (the template, indices and ``io_deps`` are dask's own objects) so
    that a slab task on a worker evaluates blocks exactly as dask would.
    """

    def __init__(self, layer: Blockwise) -> None:
        self.task = layer.task
        self.indices = tuple(layer.indices)
        self.io_deps = dict(layer.io_deps)
        self.out_ind = tuple(layer.output_indices)
        self.numblocks = dict(layer.numblocks)

    def array_args(self) -> list[tuple[int, str]]:
        """Positions and names of the array (non-literal, non-io) arguments."""
        return [
            (k, name)
            for k, (name, ind) in enumerate(self.indices)
            if ind is not None and name not in self.io_deps
        ]

    def _block_of(self, name: str, ind, idx: tuple[int, ...]) -> tuple[int, ...]:
        nb = self.numblocks.get(name)
        out = []
        for n, c in enumerate(ind):
            q = idx[self.out_ind.index(c)]
            if nb is not None and nb[n] == 1:
                q = 0
            out.append(q)
        return tuple(out)

    def referenced_keys(self) -> list:
        """Graph keys passed whole to every block (e.g. the zarr array of ``from_zarr``)."""
        return [arg.key for arg, ind in self.indices if ind is None and isinstance(arg, TaskRef)]

    def __call__(self, idx: tuple[int, ...], arrays: dict[int, Any], refs: dict | None = None):
        values = {}
        for k, (arg, ind) in enumerate(self.indices):
            tok = f"__dask_blockwise__{k}"
            if ind is None:
                values[tok] = refs[arg.key] if isinstance(arg, TaskRef) else arg
            elif arg in self.io_deps:
                values[tok] = self.io_deps[arg][self._block_of(arg, ind, idx)]
            else:
                values[tok] = arrays[k]
        return self.task(values)


def is_simple_blockwise(layer) -> bool:
    """A Blockwise whose array inputs are indexed exactly like its output.

    Not the first step of a dask reduction (``sum``, ``mean``, ``max``...,
    called with ``keepdims=True`` and an ``axis``): dask records the input's
    chunks for that layer and only afterwards shrinks the array's chunks, so
    its blocks are smaller than its layer says.
    """
    if not isinstance(layer, Blockwise) or layer.concatenate or layer.new_axes:
        return False
    kwargs = getattr(layer.task, "kwargs", None) or {}
    if kwargs.get("keepdims") is True and "axis" in kwargs:
        return False
    out = tuple(layer.output_indices)
    if len(set(out)) != len(out):
        return False
    for _name, ind in layer.indices:
        if ind is None:
            continue
        if tuple(ind) != out:
            return False
    return True


def trim_params(layer) -> tuple[dict, dict] | None:
    """``(depth, boundary)`` if ``layer`` is map_overlap's ``_trim`` Blockwise."""
    if not isinstance(layer, Blockwise):
        return None
    for arg, ind in layer.indices:
        if ind is None and isinstance(arg, functools.partial) and arg.func in _TRIMS:
            return dict(arg.keywords["axes"]), dict(arg.keywords["boundary"])
    return None


def layer_root_closure(hlg: HighLevelGraph, name: str, max_keys: int = 8) -> set[str] | None:
    """Layers a source layer needs, if they are all small roots (e.g. the zarr array).

    ``None`` when the source depends on real computation.
    """
    out = set()
    for dep in hlg.dependencies.get(name, ()):
        if hlg.dependencies.get(dep):
            return None
        layer = hlg.layers[dep]
        try:
            if len(layer) > max_keys:
                return None
        except TypeError:  # pragma: no cover
            return None
        out.add(dep)
    return out


def kernel_call(layer) -> tuple[Any, dict] | None:
    """``(function, kwargs)`` of a single-input Blockwise ``f(block, **kwargs)``."""
    if not isinstance(layer, Blockwise):
        return None
    task = layer.task
    func = getattr(task, "func", None)
    if func is None:
        return None
    args = getattr(task, "args", ())
    kwargs = getattr(task, "kwargs", {}) or {}
    if len(args) != 1:
        return None
    if isinstance(func, functools.partial):
        kwargs = {**func.keywords, **kwargs}
        if func.args:
            return None
        func = func.func
    try:
        kw = {k: (v.value if hasattr(v, "value") else v) for k, v in dict(kwargs).items()}
    except Exception:  # pragma: no cover - exotic kwargs containers
        return None
    if any(isinstance(v, GraphNode) for v in kw.values()):
        return None
    return func, kw


@functools.lru_cache(maxsize=1)
def _pure_funcs() -> tuple:
    import operator

    from dask.array import chunk

    ops = tuple(
        getattr(operator, n)
        for n in (
            "add sub mul truediv floordiv mod pow gt ge lt le eq ne and_ or_ xor invert "
            "neg pos abs"
        ).split()
    )
    return (*ops, chunk.astype, np.where, np.clip)


def is_pure_elementwise(ev: BlockwiseEval) -> bool:
    """Whether a Blockwise layer computes each value from the same position alone.

    True for numpy ufuncs, ``operator`` arithmetic/comparisons, ``astype``,
    ``where`` and ``clip`` (possibly nested), with no I/O dependencies: such a
    layer gives the same values on any block, so it may be evaluated on blocks
    other than dask's (in-plane tiles).  A ``map_blocks`` function is never
    assumed pure: it may depend on the block it is given.
    """
    from dask._task_spec import Task
    from dask.array.core import _enforce_dtype

    if ev.io_deps:
        return False
    pure = _pure_funcs()

    def is_pure(f) -> bool:
        return isinstance(f, np.ufunc) or any(f is g for g in pure)

    def ok(node) -> bool:
        if isinstance(node, Task):
            f = node.func
            if f is _enforce_dtype:  # array-expression elemwise: op, then a cast to its dtype
                op = node.kwargs.get("enforce_dtype_function")
                if not is_pure(getattr(op, "value", op)):
                    return False
            elif not is_pure(f):
                return False
            return all(ok(a) for a in node.args) and all(ok(v) for v in node.kwargs.values())
        return True  # a reference to an input block, or a literal

    return ok(ev.task)


def returns_stored(layer) -> bool:
    """Whether a ``store-map`` layer hands the stored blocks on (``return_stored=True``).

    Such a store is a stage whose output later layers read, not an end the
    sweep can write and replace by completion markers.
    """
    kwargs = getattr(getattr(layer, "task", None), "kwargs", None) or {}
    value = kwargs.get("return_stored", False)
    return bool(getattr(value, "value", value))


def is_layered(dsk: Any) -> bool:
    """Whether ``dsk`` is a ``HighLevelGraph`` (the recogniser reads layers, not task dicts)."""
    return isinstance(dsk, HighLevelGraph)
