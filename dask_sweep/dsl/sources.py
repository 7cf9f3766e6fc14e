"""Where a DSL pipeline's planes come from: numpy arrays, dask arrays, files.

A source is read in *rows* (whole disk chunks along the sweep axis), inside the
slab task, in sweep order, so every input byte is read once per pass::

    disk chunks along the sweep axis:  | row 0 | row 1 | row 2 | ...
    step 0 reads rows 0-1 ──► ring ──► stages;  step 1 reads row 2 ...

Readers are small picklable objects (a path, not an open handle) so a plan can
travel to a ``distributed`` worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_sweep.dsl.core import Range, Stream, dtype_range
from dask_sweep.errors import SweepConfigError
from dask_sweep.plan.ir import bounds


class Rows:
    """Rows ``row_bounds[r]:row_bounds[r + 1]`` of ``data`` along ``axis``.

    Every reader counts the bytes it returned (``bytes_read``), which the local
    runner compares, step by step, with the rows the plan projected.
    """

    def __init__(self, data: Any, row_bounds: tuple[int, ...], axis: int = 0) -> None:
        self.data = data
        self.row_bounds = row_bounds
        self.axis = axis
        self.bytes_read = 0

    def read_row(self, r: int, externals: dict) -> np.ndarray:
        out = self._read(r, self.row_bounds[r], self.row_bounds[r + 1])
        self.bytes_read += out.nbytes
        return out

    def _index(self, a: int, b: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (slice(a, b),)

    def _read(self, r: int, a: int, b: int) -> np.ndarray:
        raise NotImplementedError


class NumpyRows(Rows):
    """Rows of an in-memory array (views: the array is in memory anyway)."""

    def _read(self, r: int, a: int, b: int) -> np.ndarray:
        return self.data[self._index(a, b)]


class FileRows(Rows):
    """Rows of a :class:`dask_sweep.io.Source` (Zarr, HDF5, TIFF), whole chunks each."""

    def _read(self, r: int, a: int, b: int) -> np.ndarray:
        region = [slice(0, n) for n in self.data.shape]
        region[self.axis] = slice(a, b)
        return self.data.read(tuple(region))


class DaskRows(Rows):
    """Rows of a dask array, read inside the slab task by the plugin's own readers.

    :func:`dask_sweep.patterns.readers.make_reader` evaluates the array's read
    tasks for a chunk row in place (or reads planes of a raw local Zarr array
    at their offsets), so no read runs ahead of the sweep and nothing is
    scheduled twice.  An array computed by real upstream work (not only
    reads) has no inline reader: each of its rows is computed with dask's
    synchronous scheduler.
    """

    def __init__(self, array: Any, row_bounds: tuple[int, ...], axis: int,
                 inner: Any = None) -> None:
        super().__init__(array, row_bounds, axis)
        self.inner = inner

    def _read(self, r: int, a: int, b: int) -> np.ndarray:
        if getattr(self.inner, "free", False):
            return self.inner.read_planes(a, b)
        if getattr(self.inner, "carries", False):
            # upstream values shared with the next row are recomputed there (no memo)
            return np.asarray(self.inner.read_row(r, {}, None)[0])
        if self.inner is not None:
            return np.asarray(self.inner.read_row(r, {}))
        return np.asarray(self.data[self._index(a, b)].compute(scheduler="sync"))


def _dask_reader(array: Any, axis: int) -> Any:
    """The plugin's inline reader of a dask array's rows, or ``None`` (see DaskRows)."""
    from dask_sweep.patterns.expr import array_expr_of, expression_graph
    from dask_sweep.patterns.readers import make_reader

    expr = array_expr_of(array)
    if expr is None:
        graph, name = array.__dask_graph__(), array.name
    else:  # dask's array-expression mode: the recogniser's layers of the lowered tree
        root = expr.lower_completely()
        graph, name = expression_graph(root).hlg, root._name
    reader = make_reader(graph, name, array.numblocks, axis)
    if getattr(reader, "external", False):  # some values come from dask: not inline
        return None
    if getattr(reader, "free", False) or getattr(reader, "tasks", None):
        return reader
    return None


class SourceSpec:
    """What a source stream reads; the reader is made when the sweep axis is known."""

    def __init__(self, obj: Any, kind: str, desc: str) -> None:
        self.obj = obj
        self.kind = kind  # "numpy" | "file" | "dask"
        self.desc = desc

    def row_bounds(self, axis: int) -> tuple[int, ...]:
        n = self.obj.shape[axis]
        if self.kind == "numpy":
            return tuple(range(n + 1))  # any plane boundary: slabs chosen by the budget
        if self.kind == "file":
            c = self.obj.chunks[axis]
            return tuple(sorted({*range(0, n, c), n}))
        if getattr(self._dask_reader(axis), "free", False):
            return tuple(range(n + 1))  # planes of a raw local Zarr array: any boundary
        return bounds(self.obj.chunks[axis])

    def _dask_reader(self, axis: int) -> Any:
        cache = self.__dict__.setdefault("_readers", {})
        if axis not in cache:
            cache[axis] = _dask_reader(self.obj, axis)
        return cache[axis]

    def reader(self, axis: int) -> Any:
        rb = self.row_bounds(axis)
        if self.kind == "dask":
            return DaskRows(self.obj, rb, axis, self._dask_reader(axis))
        cls = {"numpy": NumpyRows, "file": FileRows}[self.kind]
        return cls(self.obj, rb, axis)


def source(data: Any, *, range: Range = None, name: str | None = None, **options: Any) -> Stream:
    """Start a pipeline from a volume.

    Parameters
    ----------
    data
        A numpy array, a dask array, a :class:`dask_sweep.io.Source`, a
        :class:`zarr.Array`, or a path that :func:`dask_sweep.io.imread`
        understands (``"vol.zarr"``, ``"vol.h5/data"``, ``"vol.tif"``, a
        folder of TIFF slices).
    range
        Declared ``(min, max)`` of the values (default: the dtype's range for
        integer data, unknown for floats).  Casts and integer arithmetic are
        checked against it.
    name
        Label shown by ``explain``.
    **options
        Passed to :func:`dask_sweep.io.open_source` for paths.

    Returns
    -------
    Stream

    Examples
    --------
    >>> import numpy as np
    >>> source(np.zeros((4, 8, 8), "uint8")).vrange
    (0, 255)
    """
    import dask.array as da

    if isinstance(data, Stream):
        return data
    if isinstance(data, da.Array):
        spec = SourceSpec(data, "dask", f"dask array {data.name[:24]}")
    elif isinstance(data, np.ndarray):
        spec = SourceSpec(data, "numpy", "numpy array")
    else:
        from dask_sweep.io import Source as IOSource
        from dask_sweep.io import open_source

        if isinstance(data, IOSource):
            src = data
        elif (
            isinstance(data, (str, bytes))
            or hasattr(data, "__fspath__")
            or hasattr(data, "chunks")
        ):
            src = open_source(data, **options)
        else:
            raise SweepConfigError(
                "dsl.source() expects a numpy array, a dask array, a zarr array, a "
                f"dask_sweep.io.Source or a path. Got {type(data).__name__} instead."
            )
        spec = SourceSpec(src, "file", f"{type(src).__name__} {src.path}")
    # (``np.ndim`` of an array expression raises: dask's expression mode)
    ndim = data.ndim if hasattr(data, "ndim") else np.ndim(data)
    if ndim == 0 and spec.kind != "file":
        raise SweepConfigError("dsl.source() expects a volume with at least one axis.")
    obj = spec.obj
    vr = range if range is not None else dtype_range(obj.dtype)
    label = name or {"numpy": "array", "dask": "dask", "file": "file"}[spec.kind]
    return Stream("source", label, (), tuple(obj.shape), obj.dtype, vr, source=spec)
