"""In-plane tiling when a row of 3D chunks does not fit the budget."""

import dataclasses

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore

import dask_sweep
from dask_sweep.errors import BudgetError
from dask_sweep.io.stores import CountingStore
from dask_sweep.testing import assert_sweep_equal


@pytest.fixture
def cube(tmp_path, rng):
    vol = (rng.random((48, 96, 80)) * 255).astype("u1")
    z = zarr.create_array(tmp_path / "in.zarr", shape=vol.shape, chunks=(16, 32, 32),
                          dtype="u1", compressors=None)
    z[:] = vol
    return tmp_path / "in.zarr"


def _pipe(x):
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="reflect")
    return y.map_overlap(ndi.uniform_filter, depth=2, size=5, boundary=0)


@pytest.mark.parametrize("budget", ["500KiB", "360KiB"])
def test_tiled_sweep_is_exact_and_reads_as_predicted(tmp_path, cube, budget):
    store = CountingStore(LocalStore(cube, read_only=True))
    x = da.from_zarr(zarr.open_array(store, mode="r"))
    y = _pipe(x)
    expected = y.compute()
    # raw chunks (written by planes): an encoding target's temporaries alone exceed these
    # budgets (io.zarr_io.encode_temporaries), and the tiles are what is tested here
    out = zarr.create_array(tmp_path / f"o{budget}.zarr", shape=y.shape, chunks=(16, 32, 32),
                            dtype=y.dtype, compressors=None)
    settings = dict(memory_limit=budget, runtime_overhead=0, fallback="raise")
    e = dask_sweep.explain(da.store(y, out, compute=False, lock=False), **settings)
    (plan, _), = e.result.plans
    tiling = plan.info["tiling"]
    assert tiling["tiles"] > 1 and tiling["peak"] <= plan.budget
    assert "tiled in-plane" in str(e)
    before = store.keys_read
    with dask_sweep.enable(**settings):
        da.store(y, out, lock=False)
    np.testing.assert_array_equal(out[:], expected)
    # measured chunk reads equal the prediction explain() printed
    assert store.keys_read - before == tiling["chunk_reads"]
    assert tiling["reads_max"] >= 2


@pytest.mark.parametrize("budget", ["600KiB", "400KiB"])
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_tiled_compute_is_exact_and_reads_as_predicted(cube, budget, scheduler):
    _check_tiled_compute(cube, _pipe, budget, scheduler)


def _check_tiled_compute(cube, pipe, budget, scheduler):
    store = CountingStore(LocalStore(cube, read_only=True))
    x = da.from_zarr(zarr.open_array(store, mode="r"))
    y = pipe(x)
    expected = y.compute(scheduler="sync")
    # budgets of a few hundred KiB: the arrays only, not the overheads a real run adds
    settings = dict(memory_limit=budget, runtime_overhead=0, key_overhead=0, fallback="raise")
    e = dask_sweep.explain(y, **settings)
    (plan, _), = e.result.plans
    tiling = plan.info["tiling"]
    assert tiling["tiles"] > 1 and "tiled in-plane" in str(e)
    before = store.keys_read
    with dask_sweep.enable(**settings):
        got = y.compute(scheduler=scheduler)
    np.testing.assert_array_equal(got, expected)
    assert store.keys_read - before == tiling["chunk_reads"]


def test_tiled_compute_and_store_together(tmp_path, cube):
    x = da.from_zarr(zarr.open_array(cube, mode="r"))
    y = _pipe(x)
    expected = y.compute(scheduler="sync")
    out = zarr.create_array(tmp_path / "y.zarr", shape=y.shape, chunks=(16, 32, 32), dtype="u1",
                            compressors=None)  # raw, as above
    settings = dict(memory_limit="500KiB", runtime_overhead=0, fallback="raise")
    assert "tiled in-plane" in str(dask_sweep.explain(y, **settings))
    with dask_sweep.enable(**settings):
        got, _ = dask.compute(y, da.store(y, out, lock=False, compute=False))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(out[:], expected)


def test_tilings_size_a_tile_shape_once_and_refuse_it_at_its_floor(tmp_path, rng,
                                                                    monkeypatch):
    """Tilings are tried from the fewest tiles up, and most are refused: a tile shape is
    sized once (a refusal too: tilings share shapes), and a refusal costs one attempt at
    one chunk row per step and one at one plane per step (a step within a row may need
    more than a whole row, or less), each stopped at its first step over the budget (a
    512^3 rolling mean planned in 14.4 s, then 6.4 s, now 2.2 s); the plans are the same."""
    from dask_sweep.passes import slabs, tiling

    z = zarr.create_array(tmp_path / "c.zarr", shape=(24, 96, 96), chunks=(8, 16, 16),
                          dtype="u1", compressors=None)
    z[:] = (rng.random(z.shape) * 255).astype("u1")
    y = _pipe(da.from_zarr(z))
    settings = dict(memory_limit="150KiB", runtime_overhead=0, fallback="raise")
    shapes = []
    real = tiling.choose_steps

    def counted(tp, target, **kw):
        shapes.append(tiling._alike(tp))
        return real(tp, target, **kw)

    monkeypatch.setattr(tiling, "choose_steps", counted)
    (plan, _), = dask_sweep.explain(y, **settings).result.plans
    assert plan.info["tiling"]["tiles"] > 1
    assert len(shapes) == len(set(shapes)) > 1  # several shapes tried, each once

    # one plane per step first: the same plans, and the same refusal
    attempts = []
    real_attempt = slabs.size_rings
    monkeypatch.setattr(slabs, "size_rings",
                        lambda p, limit=None: attempts.append(limit) or real_attempt(p, limit))
    got, _ = slabs.choose_steps(plan, 1 << 20, floor_first=True)
    want, _ = slabs.choose_steps(plan, 1 << 20)
    assert got.steps == want.steps and got.rings == want.rings
    tight = dataclasses.replace(plan, budget=1)
    with pytest.raises(BudgetError) as slow:
        slabs.choose_steps(tight, 1 << 20)
    attempts.clear()
    with pytest.raises(BudgetError) as fast:
        slabs.choose_steps(tight, 1 << 20, floor_first=True)
    # the attempts (a row, a plane) stopped at their first step over the budget; the
    # floor quoted is whole (one plane per step, then two, whose peak does not fall here:
    # the search for a floor lower than one plane's stops there)
    assert slabs.grain(plan) > 1
    assert str(fast.value) == str(slow.value) and attempts == [1, 1, None, None]
    attempts.clear()
    with pytest.raises(BudgetError) as lower:
        slabs.choose_steps(tight, 1 << 20, floor_first=True, exact=False)
    assert attempts == [1, 1] and 1 < lower.value.projected < slow.value.projected


def test_tiles_alike_but_for_faces_no_kernel_pads_are_sized_once(tmp_path, rng):
    """A tile's place matters to its sizing only where a kernel pads a face in-plane
    (a boundary other than ``"none"``): four corner tiles of a clipped gaussian are one
    shape to size, of a reflected one four."""
    from dask_sweep.passes import tiling

    z = zarr.create_array(tmp_path / "c.zarr", shape=(16, 64, 64), chunks=(4, 16, 16),
                          dtype="u1", compressors=None)
    z[:] = (rng.random(z.shape) * 255).astype("u1")
    x = da.from_zarr(z)
    keys = {}
    for boundary in ("none", "reflect"):
        y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary=boundary)
        (plan, _), = dask_sweep.explain(y, memory_limit="64MiB").result.plans
        regions = [((0, 16), (a, a + 32), (b, b + 32)) for a in (0, 32) for b in (0, 32)]
        keys[boundary] = {tiling._alike(tiling._tile_plan(plan, r, (0, 4, 4)))
                          for r in regions}
    assert len(keys["none"]) == 1 and len(keys["reflect"]) == 4


def test_a_replay_stops_where_it_passes_its_limit(tmp_path, rng):
    """A dry run given a limit stops after the first step over it (a plan known not to
    fit); under it, the trace is the whole replay's."""
    from dask_sweep.runtime.executor import dry_run

    z = zarr.create_array(tmp_path / "c.zarr", shape=(40, 48, 48), chunks=(4, 16, 16),
                          dtype="u1", compressors=None)
    z[:] = (rng.random(z.shape) * 255).astype("u1")
    (plan, _), = dask_sweep.explain(_pipe(da.from_zarr(z)), memory_limit="4MiB",
                                    runtime_overhead=0).result.plans
    full = dry_run(plan)
    same = dry_run(plan, limit=full.peak)
    assert not same.cut and (same.peak, same.step_peaks, same.rows_read) == (
        full.peak, full.step_peaks, full.rows_read)
    short = dry_run(plan, limit=full.step_peaks[0] - 1)
    assert short.cut and len(short.step_peaks) == 1 and short.peak == full.step_peaks[0]


def test_no_tiling_when_output_blocks_straddle_every_cut(cube):
    x = da.from_zarr(zarr.open_array(cube, mode="r"))
    y = _pipe(x).rechunk((16, 96, 80))  # one block per plane: no tile can own it
    with pytest.raises(BudgetError):
        with dask_sweep.enable(memory_limit="300KiB", runtime_overhead=0, fallback="raise"):
            y.compute()


def test_a_tiling_that_fits_a_chunk_row_per_step_is_not_refused_at_one_plane(tmp_path, rng):
    """Compressed 16-plane chunk rows: a step of one plane still holds the row it is cut
    from beside a partial output row, so it can need more than a step of the whole row.
    The tile search used to refuse a tile shape whose one-plane floor did not fit (64
    tiles here); it tries one chunk row per step first (32 tiles, the same values)."""
    z = zarr.create_array(tmp_path / "c.zarr", shape=(32, 128, 128), chunks=(16, 16, 16),
                          dtype="u1")
    z[:] = (rng.random(z.shape) * 255).astype("u1")
    y = (da.from_zarr(z) > 128).astype("u1")
    out = zarr.create_array(tmp_path / "o.zarr", shape=z.shape, chunks=z.chunks, dtype="u1")
    store = y.to_zarr(out, compute=False)
    settings = dict(memory_limit="256KiB", runtime_overhead=0, fallback="raise")
    (plan, _), = dask_sweep.explain(store, **settings).result.plans
    assert plan.info["tiling"]["tiles"] == 32
    assert all(p.steps == (16, 32) for p, _ in plan.info["tile_plans"])  # a row per step
    with dask_sweep.enable(**settings):
        dask.compute(store)
    np.testing.assert_array_equal(out[...], (z[...] > 128).astype("u1"))


def _pipe_with_elementwise(x):
    y = (x.astype("f4") * 0.5).map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="reflect")
    return (y > 60).astype("u1") + np.uint8(1)


@pytest.mark.parametrize("budget", ["700KiB", "450KiB"])
def test_elementwise_stages_are_tiled(cube, budget):
    _check_tiled_compute(cube, _pipe_with_elementwise, budget, "threads")


def _minus_block_min(b):  # depends on the whole block: never assumed pure
    return b - b.min()


def _where_am_i(b, block_info=None):  # depends on the block's place in the array
    return b + np.uint8(sum(block_info[0]["chunk-location"]))


def _float_uniform(x):  # a running sum: not block-invariant on floats, dask's blocks kept
    from dask_image import ndfilters

    return ndfilters.uniform_filter(x.astype("f4"), 3)


_OPAQUE = {
    "map_overlap none": lambda x: x.map_overlap(_minus_block_min, depth=2, boundary="none"),
    "map_overlap reflect": lambda x: x.map_overlap(
        _minus_block_min, depth={0: 1, 1: 3, 2: 2}, boundary="reflect"),
    "map_overlap constant": lambda x: x.map_overlap(_minus_block_min, depth=2, boundary=7),
    "kernel then map_blocks": lambda x: x.map_overlap(
        ndi.gaussian_filter, depth=4, sigma=1, boundary="none").map_blocks(_minus_block_min),
    "map_blocks block_info": lambda x: (x.map_overlap(ndi.grey_erosion, depth=1, size=3,
                                                      boundary="reflect")
                                        .map_blocks(_where_am_i, dtype="u1") + np.uint8(1)),
    "float uniform (dask-image)": _float_uniform,
}


@pytest.mark.parametrize("pipe", list(_OPAQUE))
@pytest.mark.parametrize("small", [False, True])
def test_opaque_stages_are_tiled_on_their_blocks(cube, pipe, small):
    """A stage that keeps dask's blocks (an opaque map_overlap / map_blocks, or a float
    uniform filter) is tiled on its own block boundaries: its floor is a block, not a row
    of blocks, and the result is stock dask's, boundaries and block_info included."""
    # a row of blocks (16 x 96 x 80) needs 0.8-2.4 MiB in these pipelines; a tile holds
    # the chunks its halo meets while it reads them (two of each)
    budget = {"float uniform (dask-image)": (1000, 700),
              "kernel then map_blocks": (800, 600)}.get(pipe, (700, 600))[small]
    _check_tiled_compute(cube, _OPAQUE[pipe], f"{budget}KiB", "threads")


def _plus_block_max(b):
    return b.astype("f4") + b.max() + 1


def test_an_opaque_stages_tile_halo_raises_no_warnings(cube):
    """A tile fills an opaque stage's halo with its interior's edges: an elementwise stage
    after it (here ``1 / y``) sees real-looking values, not zeros that would warn."""
    import warnings

    def pipe(x):
        y = x.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="reflect")
        return 1 / y.map_blocks(_plus_block_max, dtype="f4")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_tiled_compute(cube, pipe, "700KiB", "sync")


def test_no_tiling_when_a_window_reads_across_opaque_blocks(cube):
    x = da.from_zarr(zarr.open_array(cube, mode="r"))
    y = x.map_blocks(_minus_block_min)
    y = y.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    with pytest.raises(BudgetError, match="reads across the in-plane blocks"):
        with dask_sweep.enable(memory_limit="200KiB", runtime_overhead=0, fallback="raise"):
            y.compute()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compute", [False, True])
def test_tiles_run_at_once_on_distributed_workers(tmp_path, cube, compute):
    """Under distributed, in-plane tiles are independent chains spread over the workers
    (issue 12: rows too large for one worker become columns), ranked like segments; the
    output equals stock dask's.  (The plan is made in the scheduler, which knows the
    workers: explain() in the client shows the local plan.)"""
    distributed = pytest.importorskip("distributed")
    store = CountingStore(LocalStore(cube, read_only=True))  # chunks, not plane reads
    x = da.from_zarr(zarr.open_array(store, mode="r"))
    y = _pipe(x)
    expected = y.compute(scheduler="sync")
    out = zarr.create_array(tmp_path / "o.zarr", shape=y.shape, chunks=(16, 32, 32),
                            dtype=y.dtype, compressors=None)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        seen = {}  # step key -> (priority on the scheduler, worker)

        class Steps(distributed.diagnostics.plugin.SchedulerPlugin):
            def transition(self, key, start, finish, *args, **kwargs):
                ts = cluster.scheduler.tasks.get(key)
                if finish == "processing" and "sweep-step" in str(key):
                    seen[key] = (ts.priority[0], ts.processing_on.address)

        cluster.scheduler.add_plugin(Steps())
        # (a worker's one thread needs fewer temporaries than the local scheduler's two)
        with dask_sweep.enable(memory_limit="500KiB", runtime_overhead=0, fallback="raise"):
            stored = y if compute else da.store(y, out, lock=False, compute=False)
            got = client.compute(stored).result()
    np.testing.assert_array_equal(got if compute else out[:], expected)
    tiles = {k[0] for k in seen}
    assert len(tiles) > 1 and all("-tile" in name for name in tiles)
    assert len({w for _, w in seen.values()}) == 2  # both workers swept tiles
    # a later tile's steps rank lower: a worker finishes its tile before taking another
    assert len({p for p, _ in seen.values()}) == len(tiles)


@pytest.mark.parametrize("fn", [ndi.gaussian_filter, "opaque"])
def test_no_tiling_across_a_periodic_boundary(rng, fn):
    """A tile at a face would wrap around its own far side: refused (it was wrong for
    known kernels before)."""
    x = da.from_array((rng.random((12, 30, 30)) * 50).astype("f4"), chunks=(3, 10, 10))
    if fn == "opaque":
        y = x.map_overlap(_opaque, depth=1, boundary="periodic")
    else:
        y = x.map_overlap(fn, depth=2, sigma=0.5, boundary="periodic")
    with pytest.raises(BudgetError, match="wraps around in-plane"):
        with dask_sweep.enable(memory_limit="40KB", runtime_overhead=0, key_overhead=0,
                               fallback="raise"):
            y.compute()
    # periodic along the sweep axis only: tiled, and exact
    y = x.map_overlap(_opaque, depth={0: 1, 1: 0, 2: 0}, boundary="periodic")
    settings = dict(memory_limit="20KB", runtime_overhead=0, key_overhead=0)
    assert "tiled in-plane" in str(dask_sweep.explain(y, **settings))
    assert_sweep_equal(y, **settings)


def _opaque(a):  # depends on the whole block it is given
    return (a * 2 - a.mean(axis=(1, 2), keepdims=True)).astype(a.dtype)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(4, 12), st.integers(6, 20), st.integers(6, 20)),
    chunks=st.tuples(st.integers(1, 4), st.integers(2, 7), st.integers(2, 7)),
    depth=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    boundary=st.sampled_from(["none", "reflect", "nearest", "periodic", 0, -1.5]),
    dtype=st.sampled_from(["u1", "i4", "f4"]),
    before=st.booleans(), after=st.sampled_from(["", "map_blocks", "add"]),
)
def test_hypothesis_tiled_opaque_chains(shape, chunks, depth, boundary, dtype, before, after):
    """Opaque stages tiled on their blocks equal stock dask on random shapes, chunkings,
    depths, boundaries and dtypes, with a known kernel before and block-local work after."""
    rng = np.random.default_rng(sum(shape) * 7 + sum(chunks))
    x = da.from_array((rng.random(shape) * 50).astype(dtype), chunks=chunks)
    if before:
        x = x.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="none")
    y = x.map_overlap(_opaque, depth=depth, boundary=boundary)
    if after == "map_blocks":
        y = y.map_blocks(_opaque)
    elif after == "add":
        y = y + y.dtype.type(3)
    base = dict(runtime_overhead=0, key_overhead=0, fallback="silent")
    # the smallest budget (of halvings from a row of blocks) at which the plan is tiled
    budget = int(np.prod(shape)) * 64
    tiled = None
    while budget > 256:
        e = dask_sweep.explain(y, memory_limit=budget, **base)
        if not e.result.plans:
            break
        if "tiling" in e.result.plans[0][0].info:
            tiled = budget
        budget //= 2
    event(f"tiled: {tiled is not None}")
    if tiled is not None:
        assert_sweep_equal(y, expect_swept=True, scheduler="threads", memory_limit=tiled, **base)
