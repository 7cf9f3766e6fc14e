"""The boolean-run and shift forms of binary erosion / dilation against scipy, bit for bit."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_sweep.runtime.morphology import BoolRun, BoolShifts

SCIPY = {"and": ndi.binary_erosion, "or": ndi.binary_dilation}


def _structures(ndim, rng):
    yield np.ones((3,) * ndim, bool)
    yield ndi.generate_binary_structure(ndim, 1)
    yield ndi.generate_binary_structure(ndim, ndim - 1)
    yield np.ones((5, 3, 1)[:ndim], bool)
    for _ in range(3):
        s = rng.random((3,) * ndim) > 0.5
        s[(1,) * ndim] = rng.random() > 0.3
        yield s


@pytest.mark.parametrize("op", ["and", "or"])
@pytest.mark.parametrize("border", [0, 1])
@pytest.mark.parametrize("shape", [(9, 7, 6), (2, 5, 4), (1, 3, 8), (12, 11)])
def test_shifts_equal_scipy(rng, op, border, shape):
    for density in (0.2, 0.7, 0.95):
        x = rng.random(shape) < density
        for s in _structures(len(shape), rng):
            want = SCIPY[op](x, structure=s, border_value=border)
            f = BoolShifts(op, s, border)
            np.testing.assert_array_equal(f(x), want, err_msg=f"{op} {border} {s.astype(int)}")
            flipped = x[..., ::-1]  # a window that is not contiguous
            np.testing.assert_array_equal(
                f(flipped), SCIPY[op](flipped, structure=s, border_value=border))
            for axis in range(len(shape)):  # the kept planes alone, at every cut
                for c0 in range(shape[axis]):
                    for t in range(shape[axis] - c0 + 1):
                        keep = (slice(None),) * axis + (slice(c0, c0 + t),)
                        np.testing.assert_array_equal(f.planes(x, axis, c0, t), want[keep])
            ax = len(shape) - 2  # a piece's rows too (the in-plane axis pieces are cut on)
            for r0 in range(shape[ax]):
                for n in (1, shape[ax] - r0):
                    keep = [slice(1, shape[0]), slice(None), slice(None)][: len(shape)]
                    keep[ax] = slice(r0, r0 + n)
                    got = f.planes(x, 0, 1, shape[0] - 1, rows=(ax, r0, n))
                    np.testing.assert_array_equal(got, want[tuple(keep)])


@pytest.mark.parametrize("op", ["and", "or"])
@pytest.mark.parametrize("border", [0, 1])
@pytest.mark.parametrize("shape", [(9, 7, 6), (2, 5, 4), (1, 3, 8), (11, 9, 300)])
def test_shifts_of_the_runs_map_equal_scipy(rng, op, border, shape):
    """The kernel reading its runs' map (:class:`HitMap`'s planes, a stage of their own)
    equals scipy at every cut of planes and rows, in a window cut along the last axis (an
    in-plane tile's), and with runs longer than the map's cap of 255."""
    ball = (np.sum(np.mgrid[-2:3, -2:3, -2:3] ** 2, 0) <= 4)
    for density in (0.002, 0.3, 0.97):
        x = rng.random(shape) < density
        for s in (ball, np.ones((3, 3, 3), bool), np.ones((1, 3, 5), bool)):
            want = SCIPY[op](x, structure=s, border_value=border)
            pair = BoolShifts(op, s, border).of_map()
            assert pair is not None
            hit, f = pair
            m = hit(x)
            assert m.dtype == np.uint8 and ((m == 0) == (x if op == "or" else ~x)).all()
            for c0 in range(shape[0]):
                for t in range(1, shape[0] - c0 + 1):
                    np.testing.assert_array_equal(f.planes(m, 0, c0, t), want[c0:c0 + t])
            for r0 in range(0, shape[1], 2):
                got = f.planes(m, 0, 0, shape[0], rows=(1, r0, 1))
                np.testing.assert_array_equal(got, want[:, r0:r0 + 1])
            for r0, n in ((1, shape[2] - 2), (0, 1)):  # pieces along the last axis
                got = f.planes(m, 0, 0, shape[0], rows=(2, r0, n))
                np.testing.assert_array_equal(got, want[:, :, r0:r0 + n])
            cut = x[:, :, 1:]  # a tile's map: its own rows only
            np.testing.assert_array_equal(f.planes(hit(cut), 0, 0, shape[0]),
                                          SCIPY[op](cut, structure=s, border_value=border))


@pytest.mark.parametrize("op", ["and", "or"])
@pytest.mark.parametrize("border", [0, 1])
def test_box_runs_equal_scipy(rng, op, border):
    for shape in [(9, 7, 6), (3, 2, 8), (1, 1, 5)]:
        for sides in [(3, 3, 3), (5, 1, 3), (7, 3, 1)]:
            x = rng.random(shape) < 0.8
            want = SCIPY[op](x, structure=np.ones(sides, bool), border_value=border)
            got = x
            for ax, n in enumerate(sides):
                got = BoolRun(op, n // 2, ax, border)(got)
            np.testing.assert_array_equal(got, want)


def test_nonzero_input_is_true():
    x = np.array([[0, 2, 3, 255, 1, 0, 7]], dtype=np.uint8)
    s = np.ones((1, 3), bool)
    np.testing.assert_array_equal(BoolShifts("and", s, 0)(x), ndi.binary_erosion(x, s))
    np.testing.assert_array_equal(BoolRun("or", 1, 1, 0)(x), ndi.binary_dilation(x, s))


@settings(max_examples=60, deadline=None)
@given(
    op=st.sampled_from(["and", "or"]), border=st.booleans(), radius=st.integers(1, 3),
    n=st.integers(1, 14), c0=st.integers(0, 6), t=st.integers(1, 6), seed=st.integers(0, 999),
)
def test_kept_planes_of_a_run(op, border, radius, n, c0, t, seed):
    """The kept planes of a sweep-axis run equal the run over the whole window."""
    x = np.random.default_rng(seed).random((n, 4, 3)) < 0.7
    c0, t = min(c0, n - 1), min(t, n - min(c0, n - 1))
    run = BoolRun(op, radius, 0, border)
    np.testing.assert_array_equal(run.kept(x, 0, c0, t), run(x)[c0 : c0 + t])
