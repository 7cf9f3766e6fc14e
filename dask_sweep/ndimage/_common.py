"""The drop-ins' input: numpy or dask arrays, checked, as a dask array.

Sizing lives in :mod:`dask_sweep.passes.tables`, the plan record in
:mod:`dask_sweep.plan.tables`.
"""

from __future__ import annotations

import math

import numpy as np

from dask_sweep.errors import SweepConfigError

# Rows of a numpy input that become one chunk of the wrapping dask array: small,
# so that slab sizing (whole chunk rows) has a fine granularity.
_NUMPY_CHUNK_BYTES = 4 << 20


def as_dask_array(image, name: str, func: str, budget: int | None = None):
    """``image`` as a dask array (numpy inputs are wrapped, never copied).

    Parameters
    ----------
    image
        A dask array, or anything :func:`numpy.asarray` accepts.
    name
        Parameter name for messages (``"input"``, like scipy).
    func
        Public function name for messages.
    budget
        Memory budget: a numpy input is cut into chunk rows of at most
        ``budget / 64`` bytes so that slabs can be sized finely.

    Raises
    ------
    SweepConfigError
        When ``image`` is not array-like, is 0-d, or has an unsupported dtype.
    """
    import dask.array as da

    if not isinstance(image, da.Array):
        if image is None or isinstance(image, (str, bytes, dict, set)):
            raise SweepConfigError(
                f"{func}: expected {name} to be a numpy or dask array. "
                f"Got {type(image).__name__} instead."
            )
        arr = np.asarray(image)
        if arr.dtype == object:
            raise SweepConfigError(
                f"{func}: expected {name} to be a numeric array. Got an object array "
                f"(from {type(image).__name__}) instead."
            )
        if arr.ndim:
            row_bytes = max(1, arr[0:1].nbytes if arr.shape[0] else 1)
            cap = _NUMPY_CHUNK_BYTES if budget is None else min(_NUMPY_CHUNK_BYTES, budget // 64)
            image = da.from_array(arr, chunks=(max(1, cap // row_bytes),) + arr.shape[1:])
        else:
            image = arr
    if image.ndim == 0:
        raise SweepConfigError(
            f"{func}: expected {name} with at least one axis. Got a 0-d array instead."
        )
    if image.dtype.kind not in "biuf":
        raise SweepConfigError(
            f"{func}: expected {name} with a bool, integer or float dtype. "
            f"Got dtype {image.dtype} instead."
        )
    if any(math.isnan(c) for c in image.shape) or any(
        math.isnan(c) for cs in image.chunks for c in cs
    ):
        raise SweepConfigError(
            f"{func}: {name} has unknown chunk sizes. Call {name}.compute_chunk_sizes() first."
        )
    return image
