"""One error hierarchy for dask_sweep.

Every error is a :class:`SweepError`; each member also subclasses the builtin a
caller would naturally catch (``ValueError``, ``MemoryError``, ``OSError``), so
``except ValueError`` keeps working for code that does not know dask_sweep.
Messages say what was expected, what was got, where, and how to fix it.
"""

from __future__ import annotations


class SweepError(Exception):
    """Base class of every error raised by dask_sweep."""


class SweepConfigError(SweepError, ValueError):
    """A setting or parameter has a value dask_sweep cannot use."""


class BudgetError(SweepError, MemoryError):
    """A plan's projected peak memory exceeds the memory budget.

    Raised before any byte is read. ``stage``, ``projected`` and ``budget``
    carry the numbers for programmatic use.
    """

    def __init__(self, message: str, *, stage: str = "", projected: int = 0, budget: int = 0):
        super().__init__(message)
        self.stage = stage
        self.projected = projected
        self.budget = budget

    def __reduce__(self):
        # keyword-only fields: without this, unpickling fails and distributed hands
        # the client a bare Exception("BudgetError(...)") instead
        return _rebuild_budget_error, (type(self), str(self), self.stage, self.projected,
                                       self.budget)


def _rebuild_budget_error(cls, message, stage, projected, budget):
    return cls(message, stage=stage, projected=projected, budget=budget)


class NotSweepable(SweepError):
    """A recognised region the sweep still leaves to dask (the reason is the message)."""


class PlanError(SweepError, ValueError):
    """A pipeline cannot be planned (e.g. branches that cannot be aligned)."""


class SourceError(SweepError, OSError):
    """An input (file, folder, store, dataset) is missing, inconsistent or corrupt."""


class SinkError(SweepError, OSError):
    """An output cannot be written (exists, wrong shape, unsupported dtype...)."""
