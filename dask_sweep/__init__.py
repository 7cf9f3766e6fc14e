"""dask_sweep: streaming slab sweeps for dask image pipelines on volumes larger than RAM.

Importing dask_sweep makes ``dask.config.set(optimizations=[dask_sweep.sweep()])``
effective again (dask stopped reading that key in 2025.4).
"""

from dask_sweep import config as _config  # noqa: F401  (registers sweep.* defaults)
from dask_sweep.diagnostics import add_dashboard_route as _add_dashboard_route
from dask_sweep.errors import BudgetError, PlanError, SinkError, SourceError, SweepError
from dask_sweep.explain import explain
from dask_sweep.integration.expr import install as _install_expr_hook
from dask_sweep.integration.expr_store import store, to_zarr
from dask_sweep.integration.optimize import enable, install_shim, optimize, sweep

install_shim()
_add_dashboard_route()  # <dashboard>/sweeps on distributed schedulers started from here on
_install_expr_hook()  # array-expression mode (array.query-planning): see integration/expr.py

__all__ = [
    "BudgetError",
    "PlanError",
    "SinkError",
    "SourceError",
    "SweepError",
    "enable",
    "explain",
    "optimize",
    "store",
    "sweep",
    "to_zarr",
]
__version__ = "0.1.0"
