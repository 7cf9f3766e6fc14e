"""Boundary padding, exactly as dask's ``overlap.boundaries`` pads a block.

============  ==================  =====================================
dask          numpy ``np.pad``    picture (depth 2, values ``a b c``)
============  ==================  =====================================
reflect       symmetric           ``b a | a b c | c b``
nearest       edge                ``a a | a b c | c c``
periodic      wrap                ``b c | a b c | a b``
constant v    constant (cast)     ``v v | a b c | v v``
none          no padding          the function's own edge handling
============  ==================  =====================================
"""

from __future__ import annotations

import numpy as np

from dask_sweep.runtime.ring import Shape

_NP_MODE = {"reflect": "symmetric", "nearest": "edge", "periodic": "wrap"}

#: scipy.ndimage's modes (how a filter extends its lines) as ``np.pad`` spells them; numpy
#: extends as scipy does up to the length of an axis.  'wrap' is not here: the kernels that
#: use this table read only the planes near an end.
SCIPY_PAD = {"reflect": "symmetric", "grid-mirror": "symmetric", "mirror": "reflect",
             "nearest": "edge", "constant": "constant", "grid-constant": "constant"}


def pad_axis(x: np.ndarray, axis: int, lo: int, hi: int, boundary) -> np.ndarray:
    """Pad ``x`` along ``axis`` as dask's ``overlap.boundaries`` would."""
    if lo == 0 and hi == 0:
        return x
    if isinstance(x, Shape):
        s = list(x.shape)
        s[axis] += lo + hi
        return Shape(tuple(s), x.dtype)
    if boundary in _NP_MODE:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (lo, hi)
        return np.pad(x, widths, mode=_NP_MODE[boundary])
    # constant: dask uses full_like(x, value, dtype=x.dtype)
    parts = []
    if lo:
        s = list(x.shape)
        s[axis] = lo
        parts.append(np.full(s, boundary, dtype=x.dtype))
    parts.append(x)
    if hi:
        s = list(x.shape)
        s[axis] = hi
        parts.append(np.full(s, boundary, dtype=x.dtype))
    return np.concatenate(parts, axis=axis)
