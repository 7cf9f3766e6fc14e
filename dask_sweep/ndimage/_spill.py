"""Kept importable: spilling moved to :mod:`dask_sweep.multipass.spill`."""

from dask_sweep.multipass.spill import (  # noqa: F401
    REGISTRY,
    keep_or_spill,
    load,
    new_dir,
    remove_dir,
    remove_tree,
    spill,
    take,
)
