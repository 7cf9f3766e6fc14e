"""The pipelines users write, as data: stages of dask-image, dask and xarray by name.

A pipeline is a list of ``(stage, p)``: a stage name from :data:`STAGES` and an integer
that picks its parameters (sizes, radii, boundary modes...), so a random pipeline is
drawn, printed and replayed as plain data (the property tests, ``benchmarks/bench_budget.py``)::

    from dask_sweep.testing.pipelines import build
    y = build(x, [("gaussian", 3), ("opening", 0), ("where", 0), ("uniform", 1)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["STAGES", "build", "stage"]

#: Stage names: dask-image filters and binary morphology, ``where`` against the input,
#: casts, an opaque ``map_overlap`` (depth and boundary from ``p``), xarray's rolling mean.
STAGES: tuple[str, ...] = ("gaussian", "uniform", "median", "maximum", "sobel", "dilation",
                           "erosion", "opening", "where", "astype", "map_overlap", "rolling")


def _ball(r: int) -> np.ndarray:
    z, y, x = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return z * z + y * y + x * x <= r * r


def _opaque(b: np.ndarray) -> np.ndarray:
    return b + np.roll(b, 1, axis=0) - np.roll(b, -1, axis=2)


def stage(name: str, p: int, x: Any, first: Any) -> Any:
    """Stage ``name`` with parameters picked by ``p`` on the 3-D dask array ``x``
    (``first``: the pipeline's input, for ``where``).

    Raises
    ------
    ValueError
        For an unknown name, or what dask refuses (a ``map_overlap`` deeper than the array).
    """
    from dask_image import ndfilters, ndmorph
    from scipy import ndimage as ndi

    cut = np.asarray(100 if x.dtype.kind in "iu" else 0.3, dtype=x.dtype)
    if name == "gaussian":
        return ndfilters.gaussian_filter(x, p % 3 * 0.7 + 0.5)
    if name == "uniform":
        return ndfilters.uniform_filter(x, p % 4 + 2)
    if name == "median":
        return ndfilters.median_filter(x, size=p % 2 * 2 + 3)
    if name == "maximum":
        return ndfilters.maximum_filter(x, size=(p % 3 + 1, 2, 3))
    if name == "sobel":
        return ndfilters.sobel(x, axis=p % 3)
    if name == "dilation":
        return ndmorph.binary_dilation(x > cut, structure=_ball(p % 2 + 1),
                                       iterations=p % 2 + 1).astype(x.dtype)
    if name == "erosion":
        return ndmorph.binary_erosion(x > cut, ndi.generate_binary_structure(3, p % 3 + 1),
                                      border_value=p % 2).astype(x.dtype)
    if name == "opening":
        return ndmorph.binary_opening(x > cut).astype(x.dtype)
    if name == "where":
        import dask.array as da

        return da.where(x > cut, x, first.astype(x.dtype))
    if name == "astype":
        return x.astype(("f4", "u1", "i2", "f8")[p % 4])
    if name == "map_overlap":
        return x.map_overlap(_opaque, depth={0: p % 3, 1: 1, 2: p // 3 % 2}, dtype=x.dtype,
                             boundary=("reflect", "nearest", 0, "none", "periodic")[p % 5])
    if name == "rolling":
        import xarray as xr

        r = xr.DataArray(x, dims=("z", "y", "x")).rolling(z=p % 3 + 2, center=bool(p % 2),
                                                          min_periods=1)
        return r.mean().data
    raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")


def build(x: Any, stages: Sequence[tuple[str, int]]) -> Any:
    """The pipeline ``stages`` applied to ``x`` in order."""
    y = x
    for name, p in stages:
        y = stage(name, int(p), y, x)
    return y
