"""The one reader of dask arrays (``patterns.readers``): rows for sweeps, slabs for table passes.

Both read a raw local Zarr array by its planes' byte ranges, evaluate cheap upstream tasks
inline, and hand anything else to dask; these tests check that each way is chosen where
it should be and reads the same values as dask.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from dask_sweep.io import track
from dask_sweep.ndimage import distance_transform_edt, label, plan_label
from dask_sweep.patterns.readers import PlaneReader, _read_block, make_reader, make_readers


@pytest.fixture
def mask(tmp_path):
    rng = np.random.default_rng(5)
    m = (ndi.uniform_filter(rng.random((48, 40, 36)), 5) > 0.5).astype("u1")
    z = zarr.create_array(tmp_path / "m.zarr", shape=m.shape, chunks=(12, 16, 16), dtype="u1",
                          compressors=None, fill_value=0)
    z[:] = m
    return m, str(tmp_path / "m.zarr")


def _slabs(x, rows):
    n = len(x.chunks[0])
    return [list(range(a, min(a + rows, n))) for a in range(0, n, rows)]


def test_rows_and_slabs_of_a_raw_zarr_array_read_its_planes(mask):
    m, path = mask
    x = da.from_zarr(path)
    row = make_reader(x.__dask_graph__(), x.name, x.numblocks, 0)
    assert isinstance(row, PlaneReader)
    readers, inline = make_readers(x, _slabs(x, 2))
    assert inline and all(r.planes is not None and r.tasks is None for r in readers)
    np.testing.assert_array_equal(np.concatenate([r.read() for r in readers[::-1]][::-1]), m)
    # block by block (label's rows too thick for a slab), each block its own read
    got = np.zeros_like(m)
    for r in readers:
        a, b = r.bounds
        for ix, block in r.blocks():
            sl = tuple(slice(e[q], e[q + 1]) for e, q in zip(r.edges, ix))
            got[(slice(a, b), *sl)] = block
    np.testing.assert_array_equal(got, m)


def test_computed_inputs_are_evaluated_inline_or_handed_to_dask(mask):
    m, path = mask
    x = da.from_zarr(path)
    gt = x > 0  # each slab's blocks need only their own reads: inline
    readers, inline = make_readers(gt, _slabs(gt, 3))
    assert inline and all(r.planes is None and r.tasks for r in readers)
    # the Zarr blocks under the comparison are read by their planes' byte ranges too
    assert all(getattr(t, "func", None) is _read_block for t in readers[0].tasks.values()
               if t.key[0] == x.name)
    np.testing.assert_array_equal(np.concatenate([r.read() for r in readers]), m > 0)
    # an overlap shares computed blocks between slabs: dask computes them
    smooth = x.map_overlap(lambda b: b, depth=1, boundary="none")
    readers, inline = make_readers(smooth, _slabs(smooth, 2))
    assert not inline and all(not r.inline for r in readers)
    blocks = dict(zip(readers[0].block_keys(), dask.compute(
        *[smooth.blocks[k[1:]] for k in readers[0].block_keys()], scheduler="sync")))
    np.testing.assert_array_equal(readers[0].read(list(blocks.values())), m[:24])


@pytest.mark.parametrize("memory_limit", ["64MiB", "4MiB"])  # whole rows; slabs within rows
@pytest.mark.parametrize("computed", [False, True])  # the stored mask, or x > 0 of it
def test_label_and_edt_of_a_raw_zarr_mask_read_each_byte_once(mask, memory_limit, computed):
    """Label's pass 2 reads the masks pass 1 kept, not the input: each byte once."""
    m, path = mask
    x = da.from_zarr(path)
    if computed:
        x = (x > 0).astype("u1")
    passes = plan_label(x, memory_limit=memory_limit).bytes_read_ratio
    assert passes == 1
    lab, n = label(x, memory_limit=memory_limit)
    with track() as io:
        got, num = dask.compute(lab, n, scheduler="threads")
    read = io.bytes_read
    ref, rn = ndi.label(m)
    np.testing.assert_array_equal(got, ref)
    assert int(num) == rn
    # every chunk's planes are read whole (its in-plane padding too), once
    stored = np.prod([-(-n // c) * c for n, c in zip(m.shape, (12, 16, 16))])
    assert read == passes * stored, (read, stored)
    d = distance_transform_edt(x, memory_limit=memory_limit).compute(scheduler="threads")
    np.testing.assert_array_equal(d, ndi.distance_transform_edt(m))


@pytest.mark.parametrize("memory_limit", ["64MiB", "4MiB"])  # whole rows; slabs within rows
def test_label_and_edt_of_a_compressed_zarr_mask_read_a_slab_per_zarr_call(tmp_path,
                                                                          memory_limit):
    """A zstd mask under ``da.from_zarr`` is read by the table passes as the sweeps read it
    (:class:`ZarrRowsReader`): a slab (or a block of a split row) per zarr call, every
    byte counted once (label: its pass 1 keeps the masks for pass 2) (dask's getter read
    each block in a call of its own, uncounted: label of 512 one-plane chunks ran
    7.8-8.2 s, then 6.3-6.8 s)."""
    from dask_sweep.patterns.readers import ZarrRowsReader

    m = (ndi.uniform_filter(np.random.default_rng(6).random((48, 40, 36)), 5) > 0.5)
    z = zarr.create_array(tmp_path / "m.zarr", shape=m.shape, chunks=(12, 16, 16),
                          dtype=bool)  # zarr's default codec (zstd)
    z[:] = m
    x = da.from_zarr(z)
    readers, inline = make_readers(x, [[0, 1], [2, 3]])
    assert inline and all(isinstance(r.planes, ZarrRowsReader) for r in readers)
    passes = plan_label(x, memory_limit=memory_limit).bytes_read_ratio
    assert passes == 1
    lab, n = label(x, memory_limit=memory_limit)
    with track() as io:
        got, num = dask.compute(lab, n, scheduler="threads")
    ref, rn = ndi.label(m)
    np.testing.assert_array_equal(got, ref)
    assert int(num) == rn
    assert io.bytes_read == passes * m.nbytes, (io.bytes_read, m.nbytes)
    d = distance_transform_edt(x, memory_limit=memory_limit).compute(scheduler="threads")
    np.testing.assert_array_equal(d, ndi.distance_transform_edt(m))


def test_a_sweep_reads_raw_zarr_blocks_under_a_slice_by_their_byte_ranges(tmp_path):
    import scipy.ndimage as ndi

    import dask_sweep
    from dask_sweep.patterns.readers import SubgraphReader

    v = (np.random.default_rng(2).random((48, 40, 36)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "v.zarr", shape=v.shape, chunks=(12, 16, 16), dtype="u1",
                          compressors=None, fill_value=0)
    z[:] = v
    y = da.from_zarr(str(tmp_path / "v.zarr"))[3:45, 5:].map_overlap(
        ndi.uniform_filter, depth=1, size=3, boundary="reflect")
    ref = y.compute(scheduler="sync")
    src = dask_sweep.explain(y, memory_limit="8MiB").plans[0].stages[0]
    assert isinstance(src.reader, SubgraphReader)
    assert any(getattr(t, "func", None) is _read_block for t in src.reader.tasks.values())
    with dask_sweep.enable(memory_limit="8MiB"), track() as io:
        got = y.compute()
    np.testing.assert_array_equal(got, ref)
    assert io.bytes_read == 48 ** 3  # every stored chunk once (the edge chunks whole)


def test_values_another_output_shares_come_from_dask_and_the_rest_runs_in_the_steps():
    """``dask.compute(labels.store(...), count)``: the count's layer uses label's pass 1,
    so dask computes it once and hands it to the steps writing the labels, which run the
    rest (the rows, pass 2) inside.  Before, the sweep refused such labels and the write
    was left to dask (256 x 512², slabs of 2 planes within 4-plane rows, 32 MiB: 57 MiB
    grown)."""
    import warnings
    from collections import Counter

    from dask.callbacks import Callback

    import dask_sweep

    vol = ndi.uniform_filter(np.random.default_rng(0).random((32, 128, 128)), 3) > 0.5
    x = da.from_array(vol, chunks=(16, 128, 128))
    assert "within the rows" in str(plan_label(x, memory_limit="7MiB"))
    ran: list = []

    class Record(Callback):
        def _pretask(self, key, dsk, state):
            ran.append((key[0] if isinstance(key, tuple) else key).rsplit("-", 1)[0])

    # 7 MiB: zarr writes the 1 MiB int32 chunks with 2.15 MiB of temporaries beside them
    with dask_sweep.enable(memory_limit="7MiB"), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing over the budget, nothing left to dask
        lab, n = label(x)
        z = zarr.create_array(zarr.storage.MemoryStore(), shape=lab.shape,
                              chunks=(lab.chunks[0][0], 128, 128), dtype=lab.dtype)
        store = da.store(lab, z, lock=False, compute=False)
        with Record():
            _, num = dask.compute(store, n, scheduler="threads")
    ref, rn = ndi.label(vol)
    assert num == rn
    np.testing.assert_array_equal(z[:], ref)
    tasks = Counter(ran)
    assert tasks["label-resolve"] == 1 and tasks["sweep-step"] > 1, tasks
    assert not tasks["label"] and not tasks["label-row"], tasks  # inside the steps


def test_a_write_beside_a_drop_in_with_its_own_budget_says_which_budget():
    """``label(x, memory_limit="6MiB")`` under ``enable(memory_limit="64MiB")``, stored in
    64-plane chunks: the write cannot fit within the drop-in's own budget (which bounds the
    steps that run its last pass), so it is planned within the sweep's, and the note says
    both (it once said "over the budget of 64 MiB" for 17.6 MiB)."""
    import re

    import dask_sweep

    vol = ndi.uniform_filter(np.random.default_rng(0).random((64, 128, 128)), 3) > 0.5
    with dask_sweep.enable(memory_limit="64MiB", fallback="silent"):
        lab, _ = label(da.from_array(vol, chunks=(8, 128, 128)), memory_limit="6MiB")
        z = zarr.create_array(zarr.storage.MemoryStore(), shape=lab.shape,
                              chunks=(64, 128, 128), dtype=lab.dtype, compressors=None)
        text = str(dask_sweep.explain(da.store(lab, z, lock=False, compute=False)))
    m = re.search(r"projected at up to ([\d.]+) MiB, over the budget of 6\.00 MiB: the sweep "
                  r"plans for 64\.00 MiB beside it", text)
    assert m and 6 < float(m.group(1)) < 64, text


@pytest.mark.parametrize("layout", [
    {"chunks": (4, 40, 36)},  # one stored chunk per row: the zstd slice stack
    {"chunks": (12, 16, 16)},
    {"chunks": (12, 16, 16), "tiled": "56KiB"},  # in-plane tiles: blocks and their halos
    {"chunks": (12, 40, 36), "dask": (3, 20, 36)},  # dask rows thinner than stored chunks
    {"chunks": (4, 20, 18), "shards": (8, 40, 36)},
    {"chunks": (6, 16, 16), "inline": True, "tiled": "32KiB"},
])
def test_a_compressed_zarr_source_is_read_by_rows_with_the_values_of_dask(tmp_path, layout):
    """Any zarr array but a raw local one is read a step's rows per zarr call
    (:class:`ZarrRowsReader`): the same values as dask's getter, every byte counted."""
    import dask_sweep
    from dask_sweep.patterns.readers import ZarrRowsReader

    v = (ndi.uniform_filter(np.random.default_rng(4).random((48, 40, 36)), 3) * 255).astype("u1")
    kw = {"shards": layout["shards"]} if "shards" in layout else {}
    z = zarr.create_array(tmp_path / "v.zarr", shape=v.shape, chunks=layout["chunks"],
                          dtype="u1", **kw)  # zarr's default codec (zstd)
    z[:] = v
    x = da.from_zarr(z, chunks=layout.get("dask", layout.get("shards", layout["chunks"])),
                     inline_array=layout.get("inline", False))
    y = (x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect") > 100)
    ref = y.compute(scheduler="sync", optimize_graph=False)
    settings = ({"memory_limit": layout["tiled"], "runtime_overhead": "0B"} if "tiled" in layout
                else {"memory_limit": "64MiB"})
    reader = dask_sweep.explain(y, **settings).plans[0].stages[0].reader
    assert isinstance(getattr(reader, "inner", reader), ZarrRowsReader)  # a tile's, or itself
    with dask_sweep.enable(fallback="raise", **settings), track() as io:
        got = y.compute()
    np.testing.assert_array_equal(got, ref)
    if layout.get("tiled"):
        assert io.bytes_read > v.nbytes  # the tiles' halos are read again
    else:
        assert io.bytes_read == v.nbytes  # whole planes: every byte once


@pytest.mark.parametrize("make", [
    lambda x: da.zeros_like(x), lambda x: da.ones_like(x, dtype="f4"),
    lambda x: da.full_like(x, 7, dtype="i2"), lambda x: da.full(x.shape, 2.5, chunks=x.chunks),
    lambda x: da.ones(x.shape, chunks=(5, 7, 9), dtype=bool),
])
def test_constant_arrays_are_made_on_demand_with_dasks_values(rng, make):
    """``da.zeros``/``ones``/``full`` (and ``*_like``) beside an input are made by dask's
    own block function for any planes (:class:`ConstantReader`): no chunk rows held, no
    bytes counted as read, and the sweep's result is stock dask's, tiled in-plane too."""
    import dask_sweep
    from dask_sweep.patterns.readers import ConstantReader
    from dask_sweep.testing import assert_sweep_equal

    x = da.from_array((rng.random((24, 20, 18)) * 99).astype("u1"), chunks=(8, 10, 9))
    c = make(x)
    reader = make_reader(c.__dask_graph__(), c.name, c.numblocks, 0)
    assert isinstance(reader, ConstantReader)
    planes = reader.read_planes(3, 7, [(2, 5), (1, 9)])
    np.testing.assert_array_equal(planes, c[3:7, 2:5, 1:9].compute())
    assert planes.dtype == c.dtype
    y = x.map_overlap(ndi.uniform_filter, depth=1, size=3, boundary="reflect")
    y = da.where(y > 50, c.rechunk(x.chunks), y)
    text = str(dask_sweep.explain(y, memory_limit="64MiB"))
    assert "made on demand" in text and "read / input bytes = 1.000 (8." in text, text
    assert_sweep_equal(y, target_slab_bytes="2KiB", scheduler="threads")
    reader2 = make_reader(c.__dask_graph__(), c.name, c.numblocks, 2)  # another sweep axis
    np.testing.assert_array_equal(reader2.read_planes(4, 6, [(1, 9), (0, 3)]),
                                  c[1:9, 0:3, 4:6].compute())
    assert_sweep_equal(y, target_slab_bytes="2KiB", axis=2)
    tiled = [b for b in ("10KiB", "12KiB", "24KiB", "48KiB") if "tiled in-plane" in str(
        dask_sweep.explain(y, memory_limit=b, runtime_overhead=0, key_overhead=0))]
    assert tiled  # a budget at which the sweep is cut in-plane (float64 needs more)
    assert_sweep_equal(y, memory_limit=tiled[0], runtime_overhead=0, key_overhead=0)


def test_empty_is_not_made_on_demand():
    """``da.empty``'s values are whatever memory held: not a constant to make again."""
    e = da.empty((8, 6, 6), chunks=4)
    assert make_reader(e.__dask_graph__(), e.name, e.numblocks, 0).__class__.__name__ != \
        "ConstantReader"


def test_a_step_evaluates_a_drop_ins_rows_at_once():
    """A row evaluated inside a step runs its drop-in's shared first pass once, then the
    rows' blocks at once: two blocks meeting at a barrier finish only if they run
    together; the shared task runs once, and what a later row needs is carried."""
    import threading

    from dask._task_spec import Task, TaskRef

    from dask_sweep.patterns.readers import SubgraphReader

    barrier = threading.Barrier(2, timeout=10)
    calls = []

    def shared():
        calls.append("shared")
        return 10

    def block(base, s):
        barrier.wait()  # raises BrokenBarrierError if the other block does not come
        return np.full((1, 3), base + s)

    tasks = {"first": Task("first", shared)}
    for s in range(4):
        tasks[("out", s, 0)] = Task(("out", s, 0), block, TaskRef("first"), s)
    reader = SubgraphReader("out", (4, 1), 0, tasks, last_use={"first": 3})
    got, memo = reader.read_rows_at_once(0, 2, {}, None, 2)
    np.testing.assert_array_equal(got, [[10] * 3, [11] * 3])
    assert calls == ["shared"] and set(memo) == {"first"}  # carried to rows 2 and 3
    got, memo = reader.read_rows_at_once(2, 4, {}, memo, 2)
    np.testing.assert_array_equal(got, [[12] * 3, [13] * 3])
    assert calls == ["shared"] and memo == {}


def test_a_sweep_reading_labels_runs_as_many_of_their_slabs_as_pass_2_counts(tmp_path):
    """Label's pass 2 is budgeted with two slabs in flight: a step that reads several of
    its slabs maps two at once, within the budget, and the labels are scipy's."""
    import tracemalloc

    import distributed  # noqa: F401 - dask imports it at a process's first compute (11 MiB)

    import dask_sweep

    vol = ndi.uniform_filter(np.random.default_rng(4).random((64, 192, 192)), 3) > 0.5
    x = da.from_array(vol, chunks=(4, 192, 192))
    with dask_sweep.enable(memory_limit="10MiB", threads=2):
        lab, n = label(x)
        assert plan_label(x).passes[-1].in_flight == 2
        # chunks of 16 planes: the steps read several of label's 4-plane slabs
        z = zarr.create_array(str(tmp_path / "l.zarr"), shape=vol.shape, dtype="i4",
                              chunks=(16, 96, 96), compressors=None, fill_value=0)
        out = da.store(lab, z, lock=False, compute=False)
        plan = dask_sweep.explain(out).plans[0]
        src = plan.stages[0]
        assert src.reader.rows_at_once == 2
        rows = set(src.row_bounds)
        assert any(len(rows & set(range(a + 1, b))) for a, b in
                   zip((0, *plan.steps), plan.steps))  # a step spans several slabs
        tracemalloc.start()
        try:
            dask.compute(out, scheduler="threads")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak <= 10 << 20, peak
    np.testing.assert_array_equal(z[:], ndi.label(vol)[0])


@pytest.mark.parametrize("per_chunk", [1, 3])
def test_a_tiff_stacks_rows_are_read_into_one_slab(tmp_path, rng, per_chunk, monkeypatch):
    """A step of several rows of ``imread`` slices reads them in place into its slab
    (``InlineReader.read_rows_stacked``), with stock dask's values and bytes read once."""
    import tifffile
    from dask_image import ndfilters

    import dask_sweep
    from dask_sweep.io import imread, open_source
    from dask_sweep.patterns import readers

    vol = (rng.random((23, 30, 17)) * 1000).astype("f4")
    (tmp_path / "s").mkdir()
    for k, plane in enumerate(vol):
        tifffile.imwrite(tmp_path / "s" / f"z{k:03d}.tif", plane)
    x = imread(str(tmp_path / "s" / "*.tif"), slices_per_chunk=per_chunk)
    reader = make_reader(x.__dask_graph__(), x.name, x.numblocks, 0)
    assert reader.stacks_rows
    np.testing.assert_array_equal(reader.read_rows_stacked(2, 5),
                                  vol[2 * per_chunk:min(23, 5 * per_chunk)])
    stacked = []
    real = readers.InlineReader.read_rows_stacked
    monkeypatch.setattr(readers.InlineReader, "read_rows_stacked",
                        lambda self, a, b: stacked.append(b - a) or real(self, a, b))
    y = ndfilters.uniform_filter(x, 3) + 1
    expected = y.compute(scheduler="sync", optimize_graph=False)
    with track() as io, dask_sweep.enable(memory_limit="64MiB", target_slab_bytes="8KiB",
                                          fallback="raise"):
        got = y.compute(scheduler="threads")
    np.testing.assert_array_equal(got.view("u4"), expected.view("u4"))
    assert stacked and max(stacked) > 1, stacked
    assert io.bytes_read == vol.nbytes
    # in-plane blocks of their own: each row is joined from its blocks, as before
    x2 = open_source(str(tmp_path / "s" / "*.tif")).to_dask((per_chunk, 15, 17), align=False)
    assert not make_reader(x2.__dask_graph__(), x2.name, x2.numblocks, 0).stacks_rows
