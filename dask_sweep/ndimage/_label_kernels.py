"""Kept importable: the kernels moved to :mod:`dask_sweep.multipass.label_kernels`."""

from dask_sweep.multipass.label_kernels import (  # noqa: F401
    apply_lut,
    face_pairs_2d,
    raster_order,
    smallest_linked,
    warm,
)
