"""The oracle: compute with the sweep on and off and compare bit for bit."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np

from dask_sweep.integration.optimize import SweepPass


def swept(x: Any, **settings: Any) -> bool:
    """Whether the sweep rewrites ``x``'s graph (at least one region planned)."""
    from dask_sweep.integration.expr import analyse_collection  # either dask array mode

    s = SweepPass(**settings).settings().with_(fallback="silent")
    return bool(analyse_collection(x, s).plans)


def assert_sweep_equal(x: Any, *, scheduler: str = "sync", expect_swept: bool | None = True,
                       **settings: Any) -> np.ndarray:
    """Assert that ``x`` computes to the same bits, dtype and shape with and without the sweep.

    Parameters
    ----------
    x
        A dask array (or anything ``dask.compute`` accepts that yields arrays).
    scheduler
        Scheduler for both runs.
    expect_swept
        ``True``: the sweep must rewrite the graph; ``False``: it must not;
        ``None``: either.
    **settings
        Sweep settings (``memory_limit``, ``target_slab_bytes`` ...).

    Returns
    -------
    numpy.ndarray
        The swept result.
    """
    from dask_sweep.integration.optimize import enable

    if expect_swept is not None:
        got = swept(x, **settings)
        assert got == expect_swept, f"expected swept={expect_swept}, got {got}"
    expected = x.compute(scheduler=scheduler)
    with enable(**settings):
        actual = x.compute(scheduler=scheduler)
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(actual, expected, strict=True)
    if dask.is_dask_collection(x) and hasattr(x, "chunks"):
        with enable(**settings):
            (p,) = dask.persist(x, scheduler=scheduler)
        assert p.chunks == x.chunks
    return actual
