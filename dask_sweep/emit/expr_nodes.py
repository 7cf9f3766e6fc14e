"""Expression nodes the sweep puts into a lowered array-expression tree.

(Module-level classes, so that a rewritten expression pickles by reference
when a distributed client sends it to the scheduler.  Imported only in
array-expression mode, by :mod:`dask_sweep.emit.expr`.)
"""

from __future__ import annotations

import functools

from dask._expr import Expr
from dask.array._array_expr._expr import ArrayExpr


class SweepTasks(Expr):
    """The slab chain of one sweep (``sweep-plan``, ``sweep-step``), after its external inputs."""

    _parameters = ["token", "graph"]

    @property
    def _name(self) -> str:
        return f"sweep-{self.operand('token')}"

    def __dask_tokenize__(self):
        return self._name

    def dependencies(self):
        return [op for op in self.operands[len(self._parameters):] if isinstance(op, Expr)]

    def _layer(self) -> dict:
        return dict(self.operand("graph"))


class _Renamed(ArrayExpr):
    """An array expression under a name it is given (its ``out_name`` operand)."""

    def __new__(cls, *args, **kwargs):
        # not a singleton: an array of this name already exists (the one replaced)
        return Expr.__new__(cls, *args, **kwargs)

    @property
    def _name(self) -> str:
        return self.operand("out_name")


class SweepOutput(_Renamed):
    """A region's output array, cut from the sweep's steps under its original name."""

    _parameters = ["out_name", "out_chunks", "out_meta", "graph", "sweep"]

    def __dask_tokenize__(self):
        return ("sweep-output", self._name, self.operand("sweep")._name)

    @functools.cached_property
    def chunks(self):
        return self.operand("out_chunks")

    @functools.cached_property
    def _meta(self):
        return self.operand("out_meta")

    def _layer(self) -> dict:
        return dict(self.operand("graph"))


class SweepAlias(_Renamed):
    """An array under its original name, aliasing the blocks of its rebuilt expression."""

    _parameters = ["out_name", "target"]

    def __dask_tokenize__(self):
        return ("sweep-alias", self._name, self.target._name)

    @functools.cached_property
    def chunks(self):
        return self.target.chunks

    @functools.cached_property
    def _meta(self):
        return self.target._meta

    def _layer(self) -> dict:
        import numpy as np
        from dask._task_spec import Alias

        out = {}
        for idx in np.ndindex(*self.numblocks):
            key = (self._name, *idx)
            out[key] = Alias(key, (self.target._name, *idx))
        return out


def _none(*_):
    return None


class StoreDone(Expr):
    """Waits for every block write of its ``store-map`` expressions (expression-mode store)."""

    _parameters: list = []

    def __dask_keys__(self):
        return [self._name]

    def _layer(self) -> dict:
        from dask._task_spec import List, Task, TaskRef
        from dask.core import flatten

        keys = [k for op in self.operands for k in flatten(op.__dask_keys__())]
        return {self._name: Task(self._name, _none, List(*(TaskRef(k) for k in keys)))}
