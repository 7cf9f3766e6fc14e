"""Chunk rows staged on local disk (:mod:`dask_sweep.io.staging`): planes of any range
written into chunks deeper than a step, each row written once, whole chunks per call."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_sweep.errors import SinkError
from dask_sweep.io.staging import StagedWriter


def _bounds(n: int, step: int, start: int = 0) -> list[int]:
    return [0, *(p for p in range(1, n) if (start + p) % step == 0), n]


class _Target:
    """A numpy array that records each ``put`` (``a``, box shape, origin)."""

    def __init__(self, shape, dtype) -> None:
        self.data = np.zeros(shape, dtype)
        self.calls: list[tuple] = []

    def put(self, a, box, origin):
        idx = [slice(o, o + s) for o, s in zip(origin, box.shape)]
        axis = self.axis
        idx[axis] = slice(a, a + box.shape[axis])
        assert not self.data[tuple(idx)].any(), "a region written twice"
        self.data[tuple(idx)] = box
        self.calls.append((a, box.shape, tuple(origin)))


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 9), st.integers(1, 10)),
    depth=st.integers(1, 6),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    axis=st.integers(0, 2),
    start=st.integers(0, 5),
    steps=st.lists(st.integers(1, 7), min_size=1, max_size=20),
    per_call=st.integers(1, 3),
    workers=st.integers(1, 2),
    dtype=st.sampled_from(["u1", "i4", "f8"]),
    overlap=st.booleans(),
)
def test_every_plane_is_written_once_in_whole_chunks(tmp_path_factory, shape, depth, grid,
                                                     axis, start, steps, per_call, workers,
                                                     dtype, overlap):
    """Any steps, any sweep axis, chunk rows offset by a region's start: the target gets
    the data exactly, each box once, on the chunk grid, a row once it is complete (in the
    step that completes it, or in the background by the end of the sweep)."""
    n = shape[axis]
    inplane = [d for d in range(3) if d != axis]
    v = (np.arange(np.prod(shape)).reshape(shape) % 251 + 1).astype(dtype)
    rows = _bounds(n, depth, start)
    cuts = [_bounds(shape[d], g * (per_call if d == inplane[-1] else 1))
            for d, g in zip(inplane, grid)]
    t = _Target(shape, dtype)
    t.axis = axis
    w = StagedWriter(t.put, rows, cuts, shape, dtype, axis,
                     str(tmp_path_factory.mktemp("stage")), workers=workers, overlap=overlap)
    a, k = 0, 0
    while a < n:
        b = min(n, a + steps[k % len(steps)])
        cut = [slice(None)] * 3
        cut[axis] = slice(a, b)
        w.write_planes(a, v[tuple(cut)])
        # every row that ends by b is written (or being written), no other
        done = {c[0] for c in t.calls}
        complete = {r for r, e in zip(rows, rows[1:]) if e <= b}
        assert done <= complete if overlap else done == complete
        a, k = b, k + 1
    w.end_of_sweep()
    np.testing.assert_array_equal(t.data, v)
    assert not w._open  # every file closed
    for a, box, origin in t.calls:
        assert a in rows and a + box[axis] in rows  # a whole chunk row
        for d, c in zip(inplane, cuts):
            assert origin[d] in c and origin[d] + box[d] in c  # whole boxes
    boxes = np.prod([len(c) - 1 for c in cuts])
    assert len(t.calls) == (len(rows) - 1) * boxes


def test_the_files_leave_nothing_behind_and_a_copy_refuses(tmp_path):
    t = _Target((6, 4, 4), "u2")
    t.axis = 0
    w = StagedWriter(t.put, [0, 3, 6], [[0, 2, 4], [0, 4]], (6, 4, 4), "u2", 0, str(tmp_path),
                     call_temps=100, overlap=False)
    w.write_planes(0, np.ones((2, 4, 4), "u2"))
    assert os.listdir(tmp_path) == []  # unlinked at once: a crash leaves nothing
    assert len(w._open) == 1
    assert w.largest_box == 3 * 2 * 4 * 2
    assert w.temps_of(10) == w.largest_box + 100  # a row's box read back, and its encoder's
    assert w.background == 0
    assert w.staged_bytes() == 3 * 4 * 4 * 2
    copy = pickle.loads(pickle.dumps(w))  # another process (distributed, processes)
    with pytest.raises(SinkError, match="another process"):
        copy.write_planes(2, np.ones((1, 4, 4), "u2"))
    w.close()
    assert not w._open


def test_tiles_are_refused(tmp_path):
    t = _Target((4, 4, 4), "u1")
    t.axis = 0
    w = StagedWriter(t.put, [0, 4], [[0, 4], [0, 4]], (4, 4, 4), "u1", 0, str(tmp_path))
    with pytest.raises(SinkError, match="whole planes"):
        w.write_planes(0, np.ones((1, 2, 4), "u1"), origin=(0, 2, 0))


def _filtered_into_deep_chunks(tmp_path):
    """Slab chunks (tiles cannot help) filtered into zstd chunks 32 planes deep; the data."""
    import dask.array as da
    import scipy.ndimage as ndi
    import zarr

    rng = np.random.default_rng(3)
    v = rng.integers(0, 1000, (96, 256, 256), dtype=np.uint16)
    src = zarr.create_array(str(tmp_path / "in"), shape=v.shape, chunks=(1, 256, 256),
                            dtype=v.dtype)
    src[:] = v
    x = da.from_zarr(str(tmp_path / "in"))
    y = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect")
    out = zarr.create_array(str(tmp_path / "out"), shape=v.shape, chunks=(32, 128, 128),
                            dtype=v.dtype)
    return y.to_zarr(out, compute=False), out, v


def test_a_sweep_into_deep_compressed_chunks_is_staged_when_rows_do_not_fit(tmp_path):
    """A chunk row (4 MiB, 16 MiB with its encoding) is over the 8 MiB budget, so its rows
    are staged; stock dask's result, and no file left behind."""
    import scipy.ndimage as ndi

    import dask_sweep

    store, out, v = _filtered_into_deep_chunks(tmp_path)
    text = str(dask_sweep.explain(store, memory_limit="8MiB"))
    assert "staged raw on local disk" in text, text
    assert "one chain" in text
    with dask_sweep.enable(memory_limit="8MiB", fallback="raise"):
        store.compute()
    np.testing.assert_array_equal(out[:], ndi.uniform_filter(v, 3, mode="reflect"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("dask-sweep-stage")]


def test_staging_is_not_planned_for_the_processes_scheduler(tmp_path):
    """Its state lives in the writer object: under the processes scheduler (and
    distributed) the write is refused at this budget, not staged."""
    import dask

    import dask_sweep

    store, _, _ = _filtered_into_deep_chunks(tmp_path)
    assert "staged" in str(dask_sweep.explain(store, memory_limit="8MiB"))
    with dask.config.set(scheduler="processes"):
        text = str(dask_sweep.explain(store, memory_limit="8MiB"))
    assert "staged" not in text and "nothing swept" in text, text


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    import errno

    import dask_sweep.io.staging as staging

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging.os, "pwrite", full)
    t = _Target((4, 4, 4), "u1")
    t.axis = 0
    w = StagedWriter(t.put, [0, 4], [[0, 4], [0, 4]], (4, 4, 4), "u1", 0, str(tmp_path))
    with pytest.raises(SinkError, match=f"chunk row 0.*{tmp_path}.*temporary-directory"):
        w.write_planes(0, np.ones((1, 4, 4), "u1"))
    assert not t.data.any()  # nothing written to the target


def test_a_row_written_in_the_background_raises_at_the_end(tmp_path):
    """Rows are written by the writer's thread while the sweep goes on; its memory is
    held beside every step; a failure is raised by the next row or the sweep's end."""
    t = _Target((6, 4, 4), "u1")
    t.axis = 0
    w = StagedWriter(t.put, [0, 3, 6], [[0, 4], [0, 4]], (6, 4, 4), "u1", 0, str(tmp_path),
                     call_temps=100)
    assert w.background == w.largest_box + 100 and w.temps_of(48) == 48
    w.write_planes(0, np.ones((6, 4, 4), "u1"))
    w.end_of_sweep()
    assert t.data.all()

    def broken(*_):
        raise OSError("the target went away")

    w = StagedWriter(broken, [0, 3, 6], [[0, 4], [0, 4]], (6, 4, 4), "u1", 0, str(tmp_path))
    w.write_planes(0, np.ones((3, 4, 4), "u1"))  # row 0 complete: written in the background
    with pytest.raises(OSError, match="went away"):
        w.write_planes(3, np.ones((3, 4, 4), "u1"))  # row 1 waits for row 0
    w.close()


def test_a_refusal_quotes_what_staging_would_need(tmp_path):
    import dask_sweep
    from dask_sweep.errors import BudgetError

    store, _, _ = _filtered_into_deep_chunks(tmp_path)
    with pytest.raises(BudgetError, match=r"Staging its chunk rows on local disk needs at "
                                          r"least \d+\.\d+ MiB too"):
        with dask_sweep.enable(memory_limit="4MiB", fallback="raise"):
            store.compute()


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(2, 4), ky=st.integers(1, 5), kx=st.integers(1, 5),
    depth=st.integers(2, 16), cy=st.integers(8, 40), cx=st.integers(8, 40),
    dtype=st.sampled_from(["u1", "i2", "f4"]),
    op=st.sampled_from(["uniform", "gaussian", "plus"]),
    kib=st.integers(200, 2000),
)
def test_staged_sweeps_equal_stock_dask(tmp_path_factory, rows, ky, kx, depth, cy, cx, dtype,
                                        op, kib):
    """Whatever the plan (staged, tiled or whole rows, at budgets around a chunk row: of 30
    examples, 11 were staged, 4 tiled, 15 whole rows), the store holds stock dask's
    result; a staged plan leaves no file behind."""
    import dask
    import dask.array as da
    import scipy.ndimage as ndi
    import zarr
    from dask_image import ndfilters

    import dask_sweep

    d = tmp_path_factory.mktemp("staged")
    # dask's to_zarr warns of target chunks that its blocks split
    n, ny, nx = rows * depth, ky * cy, kx * cx
    v = (np.arange(n * ny * nx).reshape(n, ny, nx) * 7919 % 1000).astype(dtype)
    x = da.from_array(v, chunks=(1, ny, nx))
    if op == "uniform":
        y = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect")
    elif op == "gaussian":
        y = ndfilters.gaussian_filter(x, 1.0)
    else:
        y = x + 1
    want = y.compute(optimize_graph=False)
    out = zarr.create_array(str(d / "out"), shape=v.shape, chunks=(depth, cy, cx),
                            dtype=y.dtype)
    store = y.to_zarr(out, compute=False)
    with dask.config.set({"sweep.runtime-overhead": 0, "temporary-directory": str(d)}):
        text = str(dask_sweep.explain(store, memory_limit=f"{kib}KiB"))
        with dask_sweep.enable(memory_limit=f"{kib}KiB", fallback="silent"):
            store.compute()
    np.testing.assert_array_equal(out[:], want)
    if "staged raw" in text:
        assert not [f for f in os.listdir(d) if f.startswith("dask-sweep-stage")]


def test_a_sweep_run_again_after_a_failure_writes_every_row(tmp_path):
    """A row half staged by a failed run is staged again by the next (planes, not a
    count); a sweep ending with a row incomplete is an error, not missing chunks."""
    t = _Target((6, 4, 4), "u1")
    t.axis = 0
    w = StagedWriter(t.put, [0, 3, 6], [[0, 4], [0, 4]], (6, 4, 4), "u1", 0, str(tmp_path))
    v = np.arange(96, dtype="u1").reshape(6, 4, 4) + 1
    w.write_planes(0, v[0:2])  # ... and the run fails here
    for a in range(6):  # run again, one plane per step
        w.write_planes(a, v[a:a + 1])
    w.end_of_sweep()
    np.testing.assert_array_equal(t.data, v)
    w.write_planes(0, v[0:1])
    with pytest.raises(SinkError, match=r"chunk rows \[0\].*incomplete"):
        w.end_of_sweep()
    w.close()
