"""Test helpers: one oracle for the plugin (stock dask vs dask_sweep, bit for bit)."""

from dask_sweep.testing.oracle import assert_sweep_equal, swept

__all__ = ["assert_sweep_equal", "swept"]
