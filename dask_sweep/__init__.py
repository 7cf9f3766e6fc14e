"""dask_sweep: streaming slab sweeps for dask image pipelines on volumes larger than RAM."""

from dask_sweep import config as _config  # noqa: F401  (registers sweep.* defaults)
from dask_sweep.errors import BudgetError, PlanError, SinkError, SourceError, SweepError

__all__ = ["BudgetError", "PlanError", "SinkError", "SourceError", "SweepError"]
__version__ = "0.1.0"
