"""``.sweep`` on xarray objects: explain, compute and write with a budget in one call.

Importing this module registers the accessor on ``DataArray`` and ``Dataset``
(as ``rioxarray`` registers ``.rio``)::

    import dask_sweep.xarray  # noqa: F401

    smooth = ds["raw"].rolling(z=5, center=True).mean()
    print(smooth.sweep(memory_limit="512MiB").explain())
    smooth.to_dataset(name="smooth").sweep(memory_limit="512MiB").to_zarr("smooth.zarr")

``obj.sweep`` uses the settings in force (an active :func:`dask_sweep.enable`, else
the ``sweep.*`` config); ``obj.sweep(**settings)`` overrides them with any
argument of :class:`dask_sweep.sweep`.  Each call switches the sweep on for
itself only, so xarray's own keyword arguments stay apart from the sweep's.
"""

from __future__ import annotations

from typing import Any

import xarray as xr

from dask_sweep.config import SweepSettings
from dask_sweep.explain import Explanation, explain
from dask_sweep.integration.optimize import active_pass, enable

__all__ = ["SweepAccessor"]


class SweepAccessor:
    """The ``.sweep`` accessor of a ``DataArray`` or ``Dataset`` backed by dask arrays.

    Parameters
    ----------
    obj
        The xarray object.
    settings
        Overrides of the ``sweep.*`` settings, as given to ``obj.sweep(...)``.

    Examples
    --------
    >>> import dask.array as da, xarray as xr
    >>> import dask_sweep.xarray  # noqa: F401
    >>> arr = xr.DataArray(da.ones((8, 4, 4), chunks=(2, 4, 4)), dims=("z", "y", "x"))
    >>> mean = arr.rolling(z=3, center=True).mean()
    >>> print(mean.sweep(memory_limit="16MiB").explain())  # doctest: +ELLIPSIS
    sweep 0: along axis 0 ...
    >>> float(mean.sweep(memory_limit="16MiB").compute()[4, 0, 0])
    1.0
    """

    def __init__(self, obj: xr.DataArray | xr.Dataset, settings: dict[str, Any] | None = None):
        self._obj = obj
        self._settings = dict(settings or {})

    def __call__(self, **settings: Any) -> SweepAccessor:
        """The accessor with these settings (``memory_limit``, ``fallback``, ...) in force.

        Raises
        ------
        SweepConfigError
            A setting that does not exist or has a bad value, named.
        """
        merged = {**self._settings, **settings}
        SweepSettings.resolve(**merged)  # a bad name or value fails here, not at compute
        return SweepAccessor(self._obj, merged)

    def _in_force(self) -> dict[str, Any]:
        # an enclosing enable(...) stays in force under obj.sweep; obj.sweep(...) overrides it
        p = active_pass()
        return {**(p.overrides if p is not None else {}), **self._settings}

    def explain(self) -> Explanation:
        """How the sweep would run this object: its plans, floors and what is left to dask."""
        return explain(self._obj, **self._in_force())

    def compute(self, **kwargs: Any) -> xr.DataArray | xr.Dataset:
        """``obj.compute(**kwargs)`` with the sweep on (kwargs go to xarray / dask)."""
        with enable(**self._in_force(), _warm=False):
            return self._obj.compute(**kwargs)

    def persist(self, **kwargs: Any) -> xr.DataArray | xr.Dataset:
        """``obj.persist(**kwargs)`` with the sweep on: the swept result held in memory."""
        with enable(**self._in_force(), _warm=False):
            return self._obj.persist(**kwargs)

    def to_zarr(self, store: Any = None, **kwargs: Any) -> Any:
        """``obj.to_zarr(store, **kwargs)`` with the sweep on: each chunk row written once.

        With ``compute=False`` xarray returns a ``Delayed``; it is swept only if it is
        computed with the sweep on (``with dask_sweep.enable(...)``).
        """
        with enable(**self._in_force(), _warm=False):
            return self._obj.to_zarr(store, **kwargs)


def _accessor(obj: xr.DataArray | xr.Dataset) -> SweepAccessor:
    return SweepAccessor(obj)


xr.register_dataarray_accessor("sweep")(_accessor)
xr.register_dataset_accessor("sweep")(_accessor)
