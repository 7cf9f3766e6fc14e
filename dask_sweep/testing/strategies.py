"""Hypothesis strategies for checking sweeps against stock dask.

They draw what a sweep's correctness depends on: shapes, irregular chunkings
(blocks of one plane, blocks thinner than a window, one block per axis),
windows up to the array's size, every boundary mode of ``map_overlap`` and the
dtypes of microscopy data.  Together with :func:`~dask_sweep.testing.assert_sweep_equal`
they check a pipeline of your own on many inputs::

    from hypothesis import given
    from dask_sweep.testing import assert_sweep_equal, strategies as sst

    @given(x=sst.dask_volumes(), depth=sst.depths(max_depth=2), boundary=sst.boundaries())
    def test_my_filter(x, depth, boundary):
        depth = sst.fit_depth(depth, x.shape)
        assert_sweep_equal(x.map_overlap(my_filter, depth=depth, boundary=boundary),
                           expect_swept=None, memory_limit="8MiB")

Requires ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "BOUNDARIES",
    "DTYPES",
    "boundaries",
    "chunkings",
    "dask_volumes",
    "depths",
    "dtypes",
    "fit_depth",
    "pipelines",
    "shapes",
    "volumes",
]

#: ``map_overlap``'s boundary modes: no padding, mirrored, edge, wrap-around, constants.
BOUNDARIES: tuple = ("none", "reflect", "nearest", "periodic", 0, -1.5)

#: Image dtypes: 8/16-bit camera data, label ids, floats, masks.
DTYPES: tuple[str, ...] = ("u1", "u2", "i4", "f4", "f8", "bool")


def shapes(ndim: int = 3, min_side: int = 1, max_side: int = 16) -> st.SearchStrategy:
    """Array shapes of ``ndim`` axes, each ``min_side..max_side`` long."""
    if ndim < 1 or min_side < 1 or max_side < min_side:
        raise ValueError(
            f"shapes: need ndim >= 1 and 1 <= min_side <= max_side. Got ndim={ndim}, "
            f"min_side={min_side}, max_side={max_side}."
        )
    return st.tuples(*[st.integers(min_side, max_side)] * ndim)


@st.composite
def _axis_chunks(draw: Any, n: int) -> tuple[int, ...]:
    kind = draw(st.sampled_from(["regular", "irregular", "whole", "planes"]))
    if kind == "whole" or n <= 1:
        return (n,)
    if kind == "planes":
        return (1,) * n
    if kind == "regular":
        c = draw(st.integers(1, n))
        return (c,) * (n // c) + ((n % c,) if n % c else ())
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=min(n - 1, 6))))
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


def chunkings(shape: Sequence[int]) -> st.SearchStrategy:
    """dask chunks for ``shape``: per axis regular, irregular, one block, or one plane each."""
    return st.tuples(*[_axis_chunks(int(n)) for n in shape])


def depths(ndim: int = 3, max_depth: int = 3) -> st.SearchStrategy:
    """Overlap depths per axis, ``0..max_depth`` (trim them with :func:`fit_depth`)."""
    return st.tuples(*[st.integers(0, max_depth)] * ndim)


def fit_depth(depth: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """``depth`` cut to what dask accepts for ``shape`` (no deeper than the axis is long).

    >>> fit_depth((3, 1, 2), (2, 5, 5))
    (2, 1, 2)
    """
    return tuple(min(int(d), int(n)) for d, n in zip(depth, shape))


def boundaries() -> st.SearchStrategy:
    """One of :data:`BOUNDARIES`."""
    return st.sampled_from(BOUNDARIES)


def dtypes(choices: Sequence[str] = DTYPES) -> st.SearchStrategy:
    """One of ``choices`` (default :data:`DTYPES`) as a :class:`numpy.dtype`."""
    return st.sampled_from([np.dtype(c) for c in choices])


@st.composite
def volumes(
    draw: Any,
    shape: Any = None,
    dtype: Any = None,
    sparse: bool | None = None,
) -> np.ndarray:
    """A numpy volume: drawn shape and dtype unless given, and contents of two kinds.

    Dense noise over the dtype's useful range, or sparse objects on zeros (the
    masks that labelling and morphology see); ``sparse`` fixes the kind.
    """
    shape = tuple(draw(shapes()) if shape is None else shape)
    dt = np.dtype(draw(dtypes()) if dtype is None else dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sparse = draw(st.booleans()) if sparse is None else sparse
    if sparse:
        vals = rng.random(shape) < draw(st.sampled_from([0.05, 0.3, 0.6]))
        vals = vals * (rng.random(shape) * 100 + 1)
    else:
        vals = rng.random(shape) * 200
    if dt.kind == "b":
        return vals > (0 if sparse else 100)
    if dt.kind == "f":
        return (vals - (0 if sparse else 100)).astype(dt)
    return vals.astype(dt)


@st.composite
def dask_volumes(
    draw: Any,
    shape: Any = None,
    dtype: Any = None,
    chunks: Any = None,
) -> Any:
    """A dask array over :func:`volumes`, in chunks drawn by :func:`chunkings` unless given."""
    import dask.array as da

    vol = draw(volumes(shape=shape, dtype=dtype))
    c = draw(chunkings(vol.shape)) if chunks is None else chunks
    return da.from_array(vol, chunks=c)


def pipelines(max_stages: int = 4) -> st.SearchStrategy:
    """Pipelines of :mod:`~dask_sweep.testing.pipelines` (``[(stage, p), ...]``, 1 to
    ``max_stages`` long), for :func:`~dask_sweep.testing.pipelines.build`."""
    from dask_sweep.testing.pipelines import STAGES

    return st.lists(st.tuples(st.sampled_from(STAGES), st.integers(0, 100)), min_size=1,
                    max_size=max_stages)
