"""The exact Euclidean distance transform like scipy's, lazily, in bounded memory.

The front end of :mod:`dask_sweep.multipass.edt` (the algorithm: a forward and a
backward chain of one int32 plane between slabs along axis 0, in-plane lower
envelopes; read its docstring) for dask and numpy arrays.  Here: the arguments
are checked, the budget is found (explicit argument, else ``enable(...)`` or a
configured pass, else ``sweep.*``), the slabs are sized
(:mod:`dask_sweep.passes.tables`), and the steps become dask tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_sweep.emit.tables import edt_graph
from dask_sweep.errors import SweepConfigError
from dask_sweep.integration.optimize import active_settings
from dask_sweep.multipass.edt import normalize_sampling, warm
from dask_sweep.ndimage._common import as_dask_array
from dask_sweep.passes.tables import (
    EDT_TASKS_PER_SLAB,
    edt_footprints,
    edt_plan,
    row_slabs,
)
from dask_sweep.patterns.readers import decode_excess, make_readers
from dask_sweep.plan.tables import SweepPlan

__all__ = ["distance_transform_edt", "explain_edt", "plan_edt"]

_FUNC = "dask_sweep.ndimage.distance_transform_edt"


# --------------------------------------------------------------------------- plan


def _plan(image, sampling, memory_limit):
    settings = active_settings(memory_limit=memory_limit)  # explicit > enable(...) > config
    image = as_dask_array(image, "input", _FUNC, settings.memory_limit)
    samp = normalize_sampling(sampling, image.ndim)
    item = image.dtype.itemsize
    plane = int(np.prod(image.shape[1:], dtype=np.int64))
    # beside the forward pass's 2I + 1.125 per voxel, and the distances' 2I + 17
    passes = edt_footprints(tuple(image.shape), item, settings,
                            decode_excess(image, 1.125, 17.0))
    target = max(1, settings.target_slab_bytes // item)
    chunks0 = tuple(image.chunks[0])
    per_slab = settings.task_overhead * EDT_TASKS_PER_SLAB
    bounds, slabs = row_slabs(_FUNC, chunks0, plane, passes, settings.memory_limit, target,
                              per_slab)
    readers, inline = make_readers(image, bounds)
    plan, spill = edt_plan(
        _FUNC, tuple(image.shape), image.dtype, chunks0, slabs, passes, samp, settings, inline
    )
    return plan, (image, samp, settings, spill), readers


def plan_edt(image: Any, sampling: Any = None, *, memory_limit: Any = None) -> SweepPlan:
    """The schedule and memory model of :func:`distance_transform_edt`, without running it.

    Raises
    ------
    BudgetError
        When even one chunk row along axis 0 does not fit ``memory_limit``.
    """
    return _plan(image, sampling, memory_limit)[0]


def explain_edt(image: Any, sampling: Any = None, *, memory_limit: Any = None) -> str:
    """:func:`plan_edt` as text: passes, slab thickness, projected peak, bytes read/written."""
    return plan_edt(image, sampling, memory_limit=memory_limit).explain()


# --------------------------------------------------------------------------- public


def distance_transform_edt(
    image: Any,
    sampling: Any = None,
    return_distances: bool = True,
    return_indices: bool = False,
    distances: Any = None,
    indices: Any = None,
    *,
    memory_limit: Any = None,
):
    """Exact Euclidean distance transform like :func:`scipy.ndimage.distance_transform_edt`.

    Lazy and in bounded memory: two sweeps along axis 0 (see the module docstring).

    Parameters
    ----------
    image : array_like or dask.array.Array
        Input; zeros are background, the distance of every voxel to the nearest
        background voxel is computed.  Any number of axes >= 1.
    sampling : float or sequence of float, optional
        Voxel spacing per axis (a scalar applies to all axes).
    return_distances : bool
        Must be True (only distances are supported).
    return_indices : bool
        Must be False (the feature transform is not supported).
    distances, indices : None
        Output arrays are not supported (the result is lazy).
    memory_limit : int or str, optional
        Memory budget; default ``sweep.memory-limit``.

    Returns
    -------
    dask.array.Array
        float64, same shape as ``image``; chunks are the slabs along axis 0,
        whole in the other axes.  Equal to scipy's result up to rounding
        (relative 1e-12), including scipy's answer when there is no background.

    Raises
    ------
    BudgetError
        At call time, when even one chunk row does not fit ``memory_limit``.
    SweepConfigError
        For a non-array input, a bad ``sampling``, or unsupported options.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep.ndimage import distance_transform_edt
    >>> distance_transform_edt(np.array([[0, 1, 1, 1]])).compute().tolist()
    [[0.0, 1.0, 2.0, 3.0]]
    """
    import dask.array as da

    if not return_distances or return_indices or distances is not None or indices is not None:
        raise SweepConfigError(
            f"{_FUNC}: only return_distances=True, return_indices=False and no output arrays "
            "are supported (the feature transform is not streamed)."
        )
    plan, (image, samp, settings, spill), readers = _plan(image, sampling, memory_limit)
    if image.shape[0] == 0:  # no slabs: an empty result (as scipy)
        return da.zeros(image.shape, dtype=np.float64, chunks=image.chunks)
    warm(image.ndim)  # numba compiles now, outside the run's budget
    return edt_graph(plan, image, readers, samp, settings, spill)
