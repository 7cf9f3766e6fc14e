"""In-plane tiling when a row of 3D chunks does not fit the budget."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from zarr.storage import LocalStore

import dask_sweep
from dask_sweep.errors import BudgetError
from dask_sweep.io.stores import CountingStore


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


@pytest.mark.parametrize("budget", ["500KiB", "300KiB"])
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


def test_no_tiling_for_opaque_functions(cube):
    x = da.from_zarr(zarr.open_array(cube, mode="r"))
    y = x.map_overlap(lambda b: b + 1, depth=2, boundary="none")
    with pytest.raises(BudgetError, match="tiling is not possible"):
        with dask_sweep.enable(memory_limit="64KiB", runtime_overhead=0, fallback="raise"):
            y.compute()


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


def test_no_tiling_when_output_blocks_straddle_every_cut(cube):
    x = da.from_zarr(zarr.open_array(cube, mode="r"))
    y = _pipe(x).rechunk((16, 96, 80))  # one block per plane: no tile can own it
    with pytest.raises(BudgetError):
        with dask_sweep.enable(memory_limit="300KiB", runtime_overhead=0, fallback="raise"):
            y.compute()


def _pipe_with_elementwise(x):
    y = (x.astype("f4") * 0.5).map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="reflect")
    return (y > 60).astype("u1") + np.uint8(1)


@pytest.mark.parametrize("budget", ["700KiB", "300KiB"])
def test_elementwise_stages_are_tiled(cube, budget):
    _check_tiled_compute(cube, _pipe_with_elementwise, budget, "threads")


def test_map_blocks_is_not_tiled(cube):
    x = da.from_zarr(zarr.open_array(cube, mode="r"))
    y = x.map_overlap(ndi.gaussian_filter, depth=4, sigma=1, boundary="none")
    y = y.map_blocks(lambda b: b - b.min())  # depends on the block: never assumed pure
    with pytest.raises(BudgetError, match="keeps dask's blocks"):
        with dask_sweep.enable(memory_limit="400KiB", runtime_overhead=0, fallback="raise"):
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
        with dask_sweep.enable(memory_limit="400KiB", runtime_overhead=0, fallback="raise"):
            stored = y if compute else da.store(y, out, lock=False, compute=False)
            got = client.compute(stored).result()
    np.testing.assert_array_equal(got if compute else out[:], expected)
    tiles = {k[0] for k in seen}
    assert len(tiles) > 1 and all("-tile" in name for name in tiles)
    assert len({w for _, w in seen.values()}) == 2  # both workers swept tiles
    # a later tile's steps rank lower: a worker finishes its tile before taking another
    assert len({p for p, _ in seen.values()}) == len(tiles)
