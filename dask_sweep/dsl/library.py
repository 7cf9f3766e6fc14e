"""Ready-made pipelines built from the DSL's pieces.

``otsu_threshold`` is the reduction-then-apply pattern in two passes::

    pass 0: source ─► gaussian(σ) ─► histogram ─► otsu ─► t
    pass 1: source ─► gaussian(σ) ─► (> t)                  (the smoothing is recomputed,
                                                              not stored: 2 × input read)

``bilateral`` is a numba kernel that scipy has no (streaming) form for, declared
with its footprint like any ``window`` stage.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dask_sweep.dsl.core import Stream, zip
from dask_sweep.dsl.reductions import otsu
from dask_sweep.dsl.sources import source
from dask_sweep.errors import PlanError


def otsu_threshold(image: Any, *, sigma: float = 1.0, bins: int | None = None) -> Stream:
    """Foreground mask ``gaussian(image, sigma) > otsu(gaussian(image, sigma))``.

    Parameters
    ----------
    image
        Anything :func:`dask_sweep.dsl.source` accepts, or a stream.
    sigma
        Gaussian smoothing before the histogram (0: none).
    bins
        Histogram bins (default: one per value for 8-bit data).

    Returns
    -------
    Stream
        A boolean stream; computing it takes two passes over the input.
    """
    s = source(image)
    if sigma:
        s = s.gaussian(sigma)
    return s > otsu(s, bins=bins)


def difference_of_gaussians(
    image: Any, low: float, high: float, *, output: Any = "float32"
) -> Stream:
    """``gaussian(low) - gaussian(high)`` of one source: a tee into two filters and a zip."""
    s = source(image)
    a, b = s.tee()
    return zip(
        a.gaussian(low, output=output),
        b.gaussian(high, output=output),
        lambda x, y: x - y,
        name="dog",
    )


def bilateral(
    image: Any, *, sigma_spatial: float = 1.0, sigma_range: float = 10.0, radius: int | None = None
) -> Stream:
    """Edge-preserving bilateral filter (3-D, numba), a windowed stage scipy does not have.

    Each output voxel is the weighted mean of the voxels within ``radius``
    (default ``ceil(2 * sigma_spatial)``) on every axis, weighted by
    ``exp(-d²/2σs²) · exp(-Δv²/2σr²)``; voxels outside the volume are skipped.

    Returns
    -------
    Stream
        float32, with the input's value range (weights are convex).
    """
    s = source(image)
    if s.ndim != 3:
        raise PlanError(f"dask_sweep.dsl: bilateral() expects a 3-D stream. Got {s.ndim}-D.")
    r = int(radius) if radius is not None else int(math.ceil(2 * sigma_spatial))
    from dask_sweep.dsl.numba_kernels import BilateralKernel

    fn = BilateralKernel(r, float(sigma_spatial), float(sigma_range))
    return s.window(
        fn,
        footprint=(r, r, r),
        dtype=np.float32,
        range=s.vrange,
        name=f"bilateral(r={r})",
        temps=1.0,
    )
