"""dask_sweep.ndimage.label against scipy.ndimage.label: values, numbering, graph, memory plan."""

import importlib
import os

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sweep.errors import BudgetError, SweepConfigError, SweepError
from dask_sweep.multipass.label import face_pairs as _face_pairs
from dask_sweep.multipass.label import final_ids as _final_ids
from dask_sweep.multipass.label import smallest_linked as _smallest_linked
from dask_sweep.ndimage import explain_label, label, plan_label

label_mod = importlib.import_module("dask_sweep.ndimage.label")


def _budget_for(shape, rows, itemsize=1, pairs=24):
    """A memory limit that makes slabs of about ``rows`` rows (2 slabs in flight);
    ``pairs``: the face step's bytes per voxel of a face (``pair_bytes``)."""
    plane = int(np.prod(shape[1:]))
    pass1 = rows * plane * (2 * itemsize + 7) * 2 + plane * (32 + pairs)
    pass2 = rows * plane * (2 * itemsize + 6 + 4 + 2 + 4) * 2 + 16 * 48
    return max(pass1, pass2)


def _check(mask, chunks0, structure=None, rows=1, scheduler="sync"):
    x = da.from_array(mask, chunks=(chunks0,) + mask.shape[1:])
    from dask_sweep.multipass.label_kernels import pair_bytes

    st_ = ndi.generate_binary_structure(mask.ndim, 1) if structure is None else structure
    limit = _budget_for(mask.shape, max(rows, chunks0), mask.itemsize, pair_bytes(st_))
    lab, num = label(x, structure, memory_limit=limit)
    got, n = dask.compute(lab, num, scheduler=scheduler)
    ref, rn = ndi.label(mask, structure)
    assert got.dtype == ref.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    assert int(n) == rn
    return lab


@st.composite
def volumes(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    density = draw(st.sampled_from([0.0, 0.2, 0.45, 0.6, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31))
    mask = np.random.default_rng(seed).random(shape) < density
    chunks0 = draw(st.integers(1, shape[0]))
    rows = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["default", "full", "random"]))
    if kind == "default":
        structure = None
    elif kind == "full":
        structure = np.ones((3,) * ndim, dtype=bool)
    else:
        s = np.random.default_rng(seed + 1).random((3,) * ndim) < 0.5
        structure = s | s[(slice(None, None, -1),) * ndim]  # symmetric
    return mask, chunks0, structure, rows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes(), st.sampled_from(["sync", "threads"]), st.booleans())
def test_matches_scipy(case, scheduler, keep_labels):
    """Against scipy; pass 2 maps the local labels pass 1 kept, or (where they would not
    fit the page cache) labels the masks pass 1 kept again."""
    from unittest import mock

    mask, chunks0, structure, rows = case
    with mock.patch.object(label_mod, "labels_fit", lambda *a: keep_labels):
        _check(mask, chunks0, structure, rows, scheduler)


@pytest.mark.parametrize("structure", [None, np.ones((3, 3, 3), bool)])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_larger_volume_many_slabs(rng, structure, density):
    mask = rng.random((24, 16, 20)) < density
    lab = _check(mask, 1, structure, rows=1, scheduler="threads")
    assert lab.numblocks[0] == 24


def test_numbering_follows_first_voxel_not_first_piece():
    # A "U": component A's pieces in slab 0 are local labels 1 and 3 (joined in slab 1),
    # component B is local label 2 in slab 0. scipy: A=1 (first voxel at (0,0)), B=2.
    m = np.zeros((3, 7), dtype=bool)
    m[0] = [1, 0, 1, 0, 1, 0, 0]
    m[1] = [1, 0, 0, 0, 1, 0, 1]
    m[2] = [1, 1, 1, 1, 1, 0, 1]
    lab = _check(m, 1, rows=1)
    assert lab.numblocks[0] == 3
    ref, _ = ndi.label(m)
    assert ref[0, 2] == 2 and ref[0, 4] == 1


def test_component_entering_late_gets_later_id():
    # Components first seen in a later slab are numbered after all of slab 0's roots.
    m = np.zeros((4, 5), dtype=bool)
    m[0, 4] = m[1, 4] = True
    m[2, 0] = True
    m[3, 0:3] = True
    _check(m, 1, rows=1)


def test_face_pairs_full_connectivity_diagonals():
    up = np.array([[1, 0], [0, 0]], dtype=np.int32)
    low = np.array([[0, 0], [0, 1]], dtype=np.int32)
    full = np.ones((3, 3, 3), bool)
    assert _face_pairs(up, low, full[2]).tolist() == [[1, 1]]
    faces = ndi.generate_binary_structure(3, 1)
    assert _face_pairs(up, low, faces[2]).shape == (0, 2)


def test_smallest_linked_joins_labels_through_the_slab_below():
    # labels 2 and 5 reach b=1, 5 and 3 reach b=4: {2, 3, 5} is one component below.
    pairs = np.array([[2, 1], [5, 1], [5, 4], [3, 4], [6, 7]])
    assert _smallest_linked(6, pairs).tolist() == [0, 1, 2, 2, 4, 2, 6]
    assert _smallest_linked(3, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2, 3]


def test_final_ids_roots_carried_and_followers():
    # B: 1 root, 2 -> 1, 3 linked upwards (key 3 -> id 7), 4 root, 5 -> 3 (carried).
    B = np.array([0, 1, 1, 3, 4, 3], np.int32)
    for block in (1, 2, 256):
        lut, cum = _final_ids(B, np.array([3]), np.array([7]), 10, block)
        assert lut.tolist() == [0, 11, 11, 7, 12, 7] and cum == 12


def test_num_features_is_lazy_and_alone_skips_pass_two(rng):
    mask = rng.random((12, 6, 6)) < 0.5
    lab, num = label(mask, memory_limit=_budget_for(mask.shape, 2))
    assert isinstance(num, da.Array) and num.ndim == 0
    assert int(num.compute()) == ndi.label(mask)[1]
    from dask.core import flatten

    culled = dict(num.__dask_graph__().cull(set(flatten(num.__dask_keys__()))))
    names = {k[0] if isinstance(k, tuple) else k for k in culled}
    assert lab.name not in names  # the relabel pass is not run for num_features alone
    assert any(n.startswith("label-resolve-") for n in names)


def test_graph_inline_input_one_resolve_task_then_independent_slabs(rng):
    mask = rng.random((10, 5, 5)) < 0.5
    x = da.from_array(mask, chunks=(1, 5, 5))
    lab, _ = label(x, memory_limit=_budget_for(mask.shape, 1))
    dsk = dict(lab.__dask_graph__())
    assert not any(isinstance(k, tuple) and k[0] == x.name for k in dsk)  # reads inlined
    (res,) = [k for k in dsk if isinstance(k, str) and k.startswith("label-resolve-")]
    assert not dsk[res].dependencies
    out = [k for k in dsk if isinstance(k, tuple) and k[0] == lab.name]
    assert len(out) == 10 and len(dsk) == 12  # + num: no longer 4 more tasks a slab
    for k in out:
        assert dsk[k].dependencies == {res}


def test_graph_external_input_backward_link_chain_forward_numbering(rng):
    zarr = pytest.importorskip("zarr")
    mask = rng.random((10, 5, 5)) < 0.5
    z = zarr.create_array(
        zarr.storage.MemoryStore(), shape=mask.shape, chunks=(1, 5, 5), dtype="u1"
    )
    z[:] = mask
    x = da.from_zarr(z).map_overlap(lambda b: b, depth=1, boundary="none")
    assert not plan_label(x, memory_limit=_budget_for(mask.shape, 1)).inline
    with dask.config.set({"sweep.threads": 2}):
        lab, n = label(x, memory_limit=_budget_for(mask.shape, 1))
    np.testing.assert_array_equal(lab.compute(), ndi.label(mask)[0])
    dsk = dict(lab.__dask_graph__())

    def of(prefix):
        return {k[1]: k for k in dsk if isinstance(k, tuple) and k[0].startswith(prefix)}

    local, face, link = of("label-local-"), of("label-face-"), of("label-link-")
    number = of("label-number-")
    assert len(local) == len(link) == len(number) == 10 and len(face) == 9
    for s in range(10):
        deps = dsk[link[s]].dependencies
        # the link chain runs backwards: slab s waits for slab s+1 and their face
        assert deps == {local[s], face[s], link[s + 1]} if s < 9 else deps == {local[s]}
        if s < 9:  # a face task joins two local slabs, apart from the chain
            assert dsk[face[s]].dependencies == {local[s], local[s + 1]}
        # at most 2 (threads) finished local slabs wait for the chain
        throttle = dsk[local[s]].dependencies - {
            k for k in dsk[local[s]].dependencies if k[0] != link[s][0]
        }
        assert throttle == ({link[s + 2]} if s < 8 else set())
        # numbering runs forwards over the tables
        deps = dsk[number[s]].dependencies
        assert deps == {link[s], number[s - 1]} if s else deps == {link[s]}
    out = [k for k in dsk if isinstance(k, tuple) and k[0] == lab.name]
    assert len(out) == 10
    # pass 2: independent slabs, each waiting for its lookup table and the end of the
    # numbering (hanging off the chain step by step, dask.order would compute every
    # block before its consumer); the input is not asked for again (pass 1 wrote the
    # masks), so its blocks are not held between the passes
    for k in out:
        assert dsk[k].dependencies == {number[k[1]], number[9]}


def test_external_input_still_correct(rng):
    # An overlap upstream makes blocks depend on neighbour rows: not slab-local.
    mask = rng.random((12, 8, 8)) < 0.5
    zarr = pytest.importorskip("zarr")
    z = zarr.create_array(
        zarr.storage.MemoryStore(), shape=mask.shape, chunks=(2, 4, 8), dtype="u1"
    )
    z[:] = mask
    x = da.from_zarr(z)
    y = x.map_overlap(lambda b: b, depth=1, boundary="none")
    limit = _budget_for(mask.shape, 2)
    plan = plan_label(y, memory_limit=limit)
    assert len(plan.slabs) == 6 and not plan.inline
    lab, n = label(y, memory_limit=limit)
    got, gn = dask.compute(lab, n, scheduler="threads")
    np.testing.assert_array_equal(got, ndi.label(mask)[0])
    assert gn == ndi.label(mask)[1]


def test_non_bool_inputs_and_output_dtype(rng):
    vol = (rng.random((8, 7, 6)) * 3).astype("f4") - 1
    lab, n = label(vol, output=np.int64, memory_limit="1MiB")
    assert lab.dtype == np.int64
    ref, rn = ndi.label(vol)
    np.testing.assert_array_equal(lab.compute(), ref)
    assert int(n.compute()) == rn


@pytest.mark.parametrize("keep", ["labels", "masks", ""])
def test_zarr_source_read_once_kept_for_pass_2(tmp_path, rng, monkeypatch, keep):
    """Pass 1 keeps its local labels (where the page cache holds them), else the masks it
    reads (one bit per voxel), on local disk, and pass 2 takes them there: each chunk is
    read once, and labelled once with the labels kept.  Without room on disk, each chunk
    is read and labelled once per pass, in chain order."""
    zarr = pytest.importorskip("zarr")
    import dask_sweep.multipass.label as mp
    from dask_sweep.io import read_zarr, track

    if keep != "labels":
        monkeypatch.setattr(label_mod, "labels_fit", lambda *a: False)
    if not keep:
        monkeypatch.setattr(label_mod, "masks_fit", lambda *a: False)
    calls = []
    real = mp._labelled
    monkeypatch.setattr(mp, "_labelled", lambda *a: calls.append(1) or real(*a))
    mask = (rng.random((16, 12, 10)) < 0.5).astype("u1")
    z = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=mask.shape, chunks=(2, 12, 10), dtype="u1"
    )
    z[:] = mask
    x = read_zarr(tmp_path / "v.zarr")
    plan = plan_label(x, memory_limit=_budget_for(mask.shape, 2))
    reads = 1 if keep else 2
    assert plan.inline and plan.bytes_read_ratio == reads and plan.kept == keep
    # labels: up to 4 B a voxel; masks: 10 bits, 2 bytes a line
    assert plan.bytes_written == {"labels": 4 * mask.size, "masks": 16 * 12 * 2, "": 0}[keep]
    assert plan.projected_peak <= plan.budget
    with track() as stats:
        lab, n = label(x, memory_limit=_budget_for(mask.shape, 2))
        got, gn = dask.compute(lab, n)
    np.testing.assert_array_equal(got, ndi.label(mask)[0])
    c = next(iter(stats.sources.values()))
    assert c.bytes_read == reads * mask.nbytes
    assert c.reads_per_chunk.histogram == {reads: 8}
    assert len(calls) == len(plan.slabs) * (1 if keep == "labels" else 2)


@pytest.mark.parametrize("keep", ["labels", "masks"])
def test_split_rows_keep_for_pass_2(tmp_path, rng, monkeypatch, keep):
    """Slabs within chunk rows: each row is read once (pass 2 maps the kept labels, or
    unpacks the kept masks), and the labels equal scipy's."""
    zarr = pytest.importorskip("zarr")
    from dask_sweep.io import read_zarr, track

    if keep != "labels":
        monkeypatch.setattr(label_mod, "labels_fit", lambda *a: False)
    mask = (rng.random((24, 128, 128)) < 0.4).astype("u1")
    z = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=mask.shape, chunks=(12, 128, 128), dtype="u1"
    )
    z[:] = mask
    x = read_zarr(tmp_path / "v.zarr")
    budget = "2MiB"
    plan = plan_label(x, memory_limit=budget)
    assert len(plan.slabs) > 2 and plan.kept == keep, plan.explain()
    with track() as stats:
        got, gn = dask.compute(*label(x, memory_limit=budget))
    ref, rn = ndi.label(mask)
    np.testing.assert_array_equal(got, ref)
    assert int(gn) == rn
    c = next(iter(stats.sources.values()))
    assert c.reads_per_chunk.histogram == {1: 2}


def test_budget_error_at_call_time_before_io(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    from dask_sweep.io import read_zarr, track

    z = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=(8, 64, 64), chunks=(4, 64, 64), dtype="u1"
    )
    z[:] = 1
    with track() as stats, pytest.raises(BudgetError) as e:
        label(read_zarr(tmp_path / "v.zarr"), memory_limit="16KiB")
    assert stats.bytes_read == 0
    msg = str(e.value)
    assert "dask_sweep.ndimage.label" in msg and "16.00 KiB" in msg
    assert e.value.projected > e.value.budget == 16 * 1024
    assert isinstance(e.value, MemoryError)


@pytest.mark.parametrize("keep", ["labels", "masks"])
def test_explain_text(rng, monkeypatch, keep):
    if keep == "masks":
        monkeypatch.setattr(label_mod, "labels_fit", lambda *a: False)
    mask = rng.random((20, 8, 8)) < 0.5
    text = explain_label(da.from_array(mask, chunks=(2, 8, 8)), memory_limit="6KiB")
    for part in (
        "pass 1 label-local",
        "pass 2 relabel",
        "projected peak",
        "bytes read / input bytes = 1.00",  # pass 2 takes what pass 1 kept
        # up to 4 B a voxel; or 20 x 8 lines of one byte (8 bits)
        f"bytes written = {'5.00 KiB' if keep == 'labels' else '160 B'}",
        f"pass 1 keeps {'its local labels' if keep == 'labels' else 'the masks it reads'}",
        "slabs of 2-2 rows",
        "numbering",
        "spilled",
    ):
        assert part in text


@pytest.mark.parametrize(
    ("image", "structure", "match"),
    [
        ("abc", None, "input to be a numpy or dask array"),
        (None, None, "input to be a numpy or dask array"),
        (np.array(3), None, "0-d"),
        (np.ones((3, 3), complex), None, "bool, integer or float"),
        (np.ones((4, 4)), np.ones((3, 3, 3)), "structure and input must have equal rank"),
        (np.ones((4, 4)), np.ones((5, 5)), "structure dimensions must be equal to 3"),
        (np.ones((4, 4)), [[0, 1, 0], [0, 1, 1], [0, 1, 0]], "structure is not symmetric"),
    ],
)
def test_bad_input(image, structure, match):
    with pytest.raises(SweepConfigError, match=match):
        label(image, structure)


def test_bad_output_and_memory_limit():
    with pytest.raises(SweepConfigError, match="output"):
        label(np.ones((3, 3)), output=np.float32)
    with pytest.raises(SweepConfigError, match="memory_limit"):
        label(np.ones((3, 3)), memory_limit="lots")


@pytest.mark.timeout(60)
def test_distributed_local_cluster(rng):
    distributed = pytest.importorskip("distributed")
    mask = rng.random((16, 10, 12)) < 0.5
    x = da.from_array(mask, chunks=(2, 10, 12))
    with (
        distributed.LocalCluster(
            processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        lab, n = label(x, np.ones((3, 3, 3)), memory_limit=_budget_for(mask.shape, 2))
        got, gn = dask.compute(lab, n)
    ref, rn = ndi.label(mask, np.ones((3, 3, 3)))
    np.testing.assert_array_equal(got, ref)
    assert gn == rn


# --------------------------------------------------------------------------- spilled tables


@pytest.fixture
def spill_everything(monkeypatch, tmp_path):
    """No memory reserve for the tables: every table goes through a .npy file."""
    monkeypatch.setattr(label_mod, "_reserve", lambda plan: 0)
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        yield tmp_path


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(volumes(), st.sampled_from(["sync", "threads"]))
def test_matches_scipy_with_spilled_tables(spill_everything, case, scheduler):
    mask, chunks0, structure, rows = case
    _check(mask, chunks0, structure, rows, scheduler)
    assert list(spill_everything.iterdir()) == []  # every spill file read and removed


def test_spilled_tables_are_accounted_and_cleaned(spill_everything, rng):
    from dask_sweep.io import track

    mask = rng.random((24, 9, 9)) < 0.4
    x = da.from_array(mask, chunks=(2, 9, 9))
    with track() as stats:
        lab, n = label(x, memory_limit=_budget_for(mask.shape, 2))
        got, gn = dask.compute(lab, n, scheduler="threads")
    np.testing.assert_array_equal(got, ndi.label(mask)[0])
    spills = {k: c for k, c in stats.sources.items() if "dask-sweep-label-" in str(k)}
    assert spills and all(c.bytes_read > 0 for c in spills.values())
    written = sum(c.bytes_written for c in stats.sinks.values())
    assert written == sum(c.bytes_read for c in spills.values())
    assert list(spill_everything.iterdir()) == []


def test_some_tables_kept_some_spilled(monkeypatch, tmp_path, rng):
    # A reserve of about two tables: the rest spill; results stay identical.
    mask = rng.random((30, 7, 7)) < 0.5
    monkeypatch.setattr(label_mod, "_reserve", lambda plan: 100)
    seen = []
    real = label_mod._spill.spill
    monkeypatch.setattr(label_mod._spill, "spill", lambda p, a: seen.append(p) or real(p, a))
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        lab, n = label(mask, np.ones((3, 3, 3)), memory_limit=_budget_for(mask.shape, 2))
        got, gn = dask.compute(lab, n, scheduler="sync")
    ref, rn = ndi.label(mask, np.ones((3, 3, 3)))
    np.testing.assert_array_equal(got, ref)
    assert gn == rn
    assert 0 < len(seen) < 2 * lab.numblocks[0]  # neither none nor all
    assert list(tmp_path.iterdir()) == []


def test_partial_compute_leaves_no_spill_files_after_exit(spill_everything, rng):
    # labels[:2] needs only slab 0's table: the other spill files stay until the
    # process-exit cleanup, which knows the directory.
    mask = rng.random((12, 5, 5)) < 0.5
    lab, _ = label(mask, memory_limit=_budget_for(mask.shape, 2))
    np.testing.assert_array_equal(lab[:2].compute(), ndi.label(mask)[0][:2])
    left = list(spill_everything.iterdir())
    assert all(str(p) in label_mod._spill._CREATED for p in left)
    label_mod._spill._cleanup()
    assert list(spill_everything.iterdir()) == []


def test_output_dtype_overflow_is_reported(rng):
    mask = np.zeros((8, 30, 30), bool)
    mask[::2, ::2, ::2] = True  # 4 x 225 isolated voxels (900 > int8 max)
    lab, n = label(mask, output=np.int8, memory_limit="1MiB")
    assert int(n.compute()) == 900
    with pytest.raises(SweepError, match="does not fit the output dtype int8"):
        lab.compute()


def _pairs_brute_force(up, low, cross):
    out = set()
    for p in np.ndindex(*up.shape):
        for off in np.argwhere(cross) if cross.ndim else ([()] if cross else []):
            q = tuple(int(i) + int(d) - 1 for i, d in zip(p, off))
            if all(0 <= i < n for i, n in zip(q, up.shape)) and up[p] and low[q]:
                out.add((int(up[p]), int(low[q])))
    return sorted(out)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3), st.integers(0, 2**31))
def test_face_pairs_equal_brute_force(nd, seed):
    # faces of 0-2 axes go through the numba kernel, 3 through numpy
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 6, nd))
    up = rng.integers(0, 4, shape).astype(np.int32)
    low = rng.integers(0, 4, shape).astype(np.int32)
    cross = np.asarray(rng.random((3,) * nd) < 0.5)
    assert _face_pairs(up, low, cross).tolist() == [
        list(p) for p in _pairs_brute_force(up, low, cross)
    ]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**31), st.sampled_from([0.2, 0.5, 0.8]))
def test_face_pairs_skipping_redundant_offsets_equal_brute_force(ndim, seed, density):
    # Planes labelled with the structure itself: in-plane neighbours share a label,
    # which is what lets the kernel skip most crossing offsets.
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 9, ndim))
    s = rng.random((3,) * ndim) < 0.6
    structure = s | s[(slice(None, None, -1),) * ndim]
    upper = ndi.label(rng.random((2, *shape[1:])) < density, structure)[0][-1]
    lower = ndi.label(rng.random((2, *shape[1:])) < density, structure)[0][0]
    got = _face_pairs(upper, lower, structure[2], structure[1])
    assert got.tolist() == [list(p) for p in _pairs_brute_force(upper, lower, structure[2])]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([np.int32, np.int64]), st.integers(1, 64),
       st.sampled_from([0.3, 0.6, 0.9]))
def test_face_pairs_through_a_small_buffer_equal_brute_force(seed, dtype, cap, density):
    """A buffer far smaller than the pairs: compacted (sorted, deduplicated in place) and
    grown many times, then the pairs written over it (int32 faces: int32 pairs)."""
    from dask_sweep.multipass.label_kernels import face_pairs_2d

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 40, 2))
    # ids 1..many, so most keys are distinct (every voxel its own label on one side)
    up = np.where(rng.random(shape) < density, rng.integers(1, 500, shape), 0).astype(dtype)
    low = np.where(rng.random(shape) < density, rng.integers(1, 500, shape), 0).astype(dtype)
    cross = np.asarray(rng.random((3, 3)) < 0.5)
    got = face_pairs_2d(up, low, cross, np.zeros((3, 3), bool), cap=cap)
    assert got.dtype == dtype and got.flags.c_contiguous
    assert got.tolist() == [list(p) for p in _pairs_brute_force(up, low, cross)]


@pytest.mark.parametrize("shape", [(255, 257), (256, 256), (1, 4099)])
def test_face_pairs_of_face_connectivity_stay_within_half_the_general_bound(shape):
    """With face connectivity a face has at most one distinct pair per two voxels (a
    checkerboard of isolated labels reaches it), so the face step's peak is
    ``pair_bytes`` = 12 B per voxel, half the general bound.  Before, the keys buffer
    could still double past the plane on planes whose size is not a multiple of four
    (255 x 257: 1.57 MB against 0.79)."""
    import tracemalloc

    from dask_sweep.multipass.label_kernels import face_pairs_2d, pair_bytes

    structure = ndi.generate_binary_structure(3, 1)
    assert pair_bytes(structure) == 12 and pair_bytes(np.ones((3, 3, 3), bool)) == 24
    assert pair_bytes(ndi.generate_binary_structure(2, 1)) == 12
    # a structure that does not join a plane's neighbours: one pair per voxel can occur
    lone = np.zeros((3, 3, 3), bool)
    lone[:, 1, 1] = True
    assert pair_bytes(lone) == 24
    ii, jj = np.indices(shape)
    black = (ii + jj) % 2 == 0
    n = int(black.sum())
    up = np.zeros(shape, np.int32)
    low = np.zeros(shape, np.int32)
    up[black] = np.arange(1, n + 1)
    low[black] = np.random.default_rng(0).permutation(n) + 1  # every pair distinct
    args = (up, low, structure[2], structure[1])
    face_pairs_2d(up[:3, :3], low[:3, :3], *args[2:])  # compiled before it is measured
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        got = face_pairs_2d(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got) == n == -(-up.size // 2)
    assert peak <= 12 * up.size + 16 * 1024, (peak, 12 * up.size)
    # (the straight offset alone: the pair of each black voxel)
    assert got.tolist() == sorted(map(list, zip(up[black].tolist(), low[black].tolist())))


@pytest.mark.parametrize("shape", [(4, 64, 63), (1, 128, 128), (3, 1, 501), (701,)])
def test_local_labelling_of_face_connectivity_holds_table_bytes(shape):
    """The plan counts the local labelling of face connectivity (the run kernel, or runs
    on one axis) at its mask, its uint32 labels and ``table_bytes`` = 2 B per voxel:
    traced on checkerboards (a run at every other voxel, the union-find table's worst
    case) and random masks.  Other structures keep cc3d's measured figure."""
    import tracemalloc

    from dask_sweep.multipass.label import local_label
    from dask_sweep.multipass.label_kernels import LOCAL_TABLES, table_bytes

    structure = ndi.generate_binary_structure(len(shape), 1)
    assert table_bytes(structure) == 2.0
    if len(shape) > 1:  # (in one axis, all ones are the faces)
        assert table_bytes(np.ones((3,) * len(shape), bool)) == LOCAL_TABLES
    assert table_bytes(ndi.generate_binary_structure(4, 1)) == LOCAL_TABLES
    idx = np.indices(shape).sum(axis=0)
    rng = np.random.default_rng(1)
    for mask in ((idx % 2 == 0), rng.random(shape) < 0.5):
        local_label(mask, structure)  # compiled (and imported) first
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            lab, n = local_label(mask, structure)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        want, n_want = ndi.label(mask, structure)
        assert n == n_want and np.array_equal(lab, want)
        assert peak <= (4 + table_bytes(structure)) * mask.size + 4096, (peak, mask.size)


def test_source_itemsize_is_the_widest_array_the_input_is_read_from():
    from dask_sweep.patterns.readers import decode_bytes, source_itemsize

    v = da.zeros((8, 16, 16), dtype=np.uint16, chunks=4)
    assert source_itemsize(v > 3) == 2  # the 0-d threshold does not count
    assert source_itemsize(v.astype(np.float64) > 3) == 8
    assert source_itemsize(da.zeros((4, 4), dtype=bool, chunks=2)) == 1
    assert source_itemsize(v.astype(np.uint8)) == 2
    assert decode_bytes(v > 3) == 4  # not read from Zarr: two copies


@pytest.mark.parametrize("codec", ["zstd", "raw"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_a_chunk_row_read_holds_what_the_split_plan_counts(tmp_path, dtype, codec):
    """label's slabs within chunk rows read each row block by block into one packed
    bit per voxel (``read_row``); its plan counts the packed row and a block's read at
    ``max(2 item + 2, decode_bytes + 1.5)`` B per voxel (the source's compressed bytes,
    its chunk decoded and copied, the mask and its bits; a raw array's planes are read
    by byte ranges, one copy fewer).  Traced on a Zarr row of 64^3 blocks of noise (the
    worst compression), thresholded."""
    import tracemalloc

    import zarr

    from dask_sweep.multipass.label import read_row
    from dask_sweep.patterns.readers import decode_bytes, make_readers

    rng = np.random.default_rng(2)
    shape = (64, 128, 128)
    kw = {"compressors": None} if codec == "raw" else {}
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=shape, chunks=(64, 64, 64),
                          dtype=dtype, **kw)
    z[:] = (rng.random(shape) * 200).astype(dtype)
    m = da.from_zarr(str(tmp_path / "v.zarr")) > 100
    assert decode_bytes(m) == (1.5 if codec == "raw" else 3) * np.dtype(dtype).itemsize
    (reader,), inline = make_readers(m, [[0]])
    assert inline
    read_row(reader, shape, m.chunks[1:])  # first read: imports, caches
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        row = read_row(reader, shape, m.chunks[1:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    counted = row.bits.nbytes + 64 ** 3 * max(2 * 1 + 2, decode_bytes(m) + 1.5)
    assert peak <= counted, (peak, counted)
    assert np.array_equal(row.planes(0, 64), np.asarray(m))


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_a_tiff_slice_read_holds_what_decode_bytes_counts(tmp_path, dtype, compression):
    """A slab of one TIFF slice thresholded, read as label reads it: the slice's read
    and decode (``decode_bytes``: an uncompressed slice read straight into the result,
    two copies counted; a compressed one seven) and the mask.  Traced on noise, 256^2
    slices (on smaller ones zlib's buffers, a few hundred KiB, are more than the
    slice: what the runtime overhead counts)."""
    import tracemalloc

    import tifffile

    from dask_sweep.io import imread
    from dask_sweep.multipass.label import _read_mask
    from dask_sweep.patterns.readers import decode_bytes, make_readers

    rng = np.random.default_rng(3)
    v = (rng.random((3, 256, 256)) * 200).astype(dtype)
    for i in range(3):
        tifffile.imwrite(tmp_path / f"z{i}.tif", v[i], compression=compression)
    m = imread(str(tmp_path / "*.tif")) > 100
    item = np.dtype(dtype).itemsize
    assert decode_bytes(m) == (2 if compression is None else 7) * item
    (reader,), inline = make_readers(m, [[1]])
    assert inline
    _read_mask(reader, ())  # first read: imports, caches
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        got = _read_mask(reader, ())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= (decode_bytes(m) + 1) * got.size + 4096, (peak, got.size)
    assert np.array_equal(got[0], v[1] > 100)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-5, 2**40), max_size=60))
def test_unique_inplace_is_sorted_unique_at_the_front(values):
    from dask_sweep.multipass.label_kernels import unique_inplace

    a = np.array(values, dtype=np.int64)
    k = unique_inplace(a)
    assert a[:k].tolist() == sorted(set(values))


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 3), st.integers(0, 2**31), st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
       st.sampled_from(["rank", "random"]))
def test_run_kernel_equals_scipy(ndim, seed, density, kind):
    """The run kernel labels as scipy does (ids, count) for any symmetric structure that
    joins neighbours along the last axis, and says None for the others."""
    from dask_sweep.multipass.label_kernels import label_slab

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 12, size=ndim))
    mask = rng.random(shape) < density
    if kind == "rank":
        structure = ndi.generate_binary_structure(ndim, int(rng.integers(1, ndim + 1)))
    else:
        s = rng.random((3,) * ndim) < 0.5
        structure = s | s[(slice(None, None, -1),) * ndim]
    ref, n = ndi.label(mask, structure)
    got = label_slab(mask, structure)
    if got is None:
        assert kind == "random"
        return
    assert got[0].dtype == np.uint32 and got[1] == n
    np.testing.assert_array_equal(got[0], ref)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 6))
def test_face_pairs_kernel_resumes_when_its_buffer_fills(seed, cap):
    from dask_sweep.multipass.label_kernels import face_pairs_2d

    rng = np.random.default_rng(seed)
    up = rng.integers(0, 9, (7, 6)).astype(np.int32)
    low = rng.integers(0, 9, (7, 6)).astype(np.int32)
    cross = rng.random((3, 3)) < 0.6
    got = face_pairs_2d(up, low, cross, np.zeros((3, 3), bool), cap=cap)
    assert got.tolist() == [list(p) for p in _pairs_brute_force(up, low, cross)]


def test_empty_axis_zero_like_scipy():
    from dask_sweep.ndimage import distance_transform_edt

    lab, n = label(np.zeros((0, 4, 4), bool))
    assert lab.compute().shape == (0, 4, 4) and lab.dtype == np.int32 and int(n.compute()) == 0
    assert distance_transform_edt(np.zeros((0, 4))).compute().shape == (0, 4)


def test_labels_and_count_have_layers_of_their_own(tmp_path):
    """Each array's layer carries its own shape and chunks (graph optimisers read them):
    the labels' layer was shared with the count's and said shape ``()``.  With them right,
    labels written with ``to_zarr`` under the sweep are swept (read once, written by
    planes), not concatenated by dask into ``array.chunk-size`` blocks, and equal scipy's."""
    import zarr

    import dask_sweep

    rng = np.random.default_rng(5)
    mask = ndi.uniform_filter(rng.random((48, 32, 32)), 3) > 0.5
    lab, num = label(da.from_array(mask, chunks=(8, 32, 32)),
                     memory_limit=_budget_for(mask.shape, 8))
    assert lab.numblocks[0] > 1
    layers = lab.__dask_graph__().layers
    assert layers[lab.name].collection_annotations["shape"] == mask.shape
    assert layers[lab.name].collection_annotations["chunks"] == lab.chunks
    assert layers[num.name].collection_annotations["shape"] == ()
    z = zarr.create_array(str(tmp_path / "l.zarr"), shape=lab.shape, chunks=(16, 16, 16),
                          dtype=lab.dtype, compressors=None, fill_value=0)
    with dask_sweep.enable(memory_limit="4MiB", fallback="raise"):
        assert "sweep 0" in str(dask_sweep.explain(lab.to_zarr(z, compute=False)))
        lab.to_zarr(z)
    ref, n = ndi.label(mask)
    np.testing.assert_array_equal(z[:], ref)
    assert int(num.compute()) == n


def test_kept_masks_are_read_back_once_and_freed(tmp_path):
    """The masks pass 1 keeps: each entry read back once (then None), the file unlinked
    from the start and closed when the last entry is taken, even by threads at once; a
    pickled copy (another process) keeps and finds nothing."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from dask_sweep.multipass.spill import KeptMasks

    rng = np.random.default_rng(5)
    masks = [rng.random((k, 5, 11)) < 0.5 for k in (3, 1, 4, 2)]
    kept = KeptMasks([m.shape for m in masks], 11, str(tmp_path))
    assert kept.nbytes == (3 + 1 + 4 + 2) * 5 * 2
    for i, m in enumerate(masks):
        kept.put(i, np.packbits(m, axis=-1))
    assert os.listdir(tmp_path) == [] and kept._fd is not None
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(kept.take_mask, range(4)))
    for g, m in zip(got, masks):
        np.testing.assert_array_equal(g, m)
    assert kept.take_mask(0) is None and kept._fd is None  # read once; file closed
    copy = pickle.loads(pickle.dumps(kept))
    copy.put(0, np.packbits(masks[0], axis=-1))
    assert copy.take(0) is None and copy._fd is None


def test_kept_labels_narrowest_dtype(tmp_path):
    """Local labels are kept in the narrowest unsigned dtype holding their count (a
    sparse file: each entry reserves 4 B per voxel) and come back as uint32."""
    from dask_sweep.multipass.spill import KeptLabels

    shapes = [(2, 3, 5)] * 3
    kept = KeptLabels(shapes, str(tmp_path))
    assert kept.nbytes == 3 * 4 * 30
    labs = [np.arange(30, dtype=np.uint32).reshape(2, 3, 5) * k for k in (1, 9, 3000)]
    for i, (lab, n) in enumerate(zip(labs, (29, 261, 87000))):
        kept.put_labels(i, lab, n)
    assert [kept._kept[i][0] for i in range(3)] == [np.uint8, np.uint16, np.uint32]
    assert all(kept.holds(i) for i in range(3))
    for i, lab in enumerate(labs):
        got = kept.take_labels(i)
        assert got.dtype == np.uint32 and not kept.holds(i)
        np.testing.assert_array_equal(got, lab)
    assert kept.take_labels(0) is None and kept._fd is None


def test_kept_labels_are_compressed_and_incompressible_pieces_kept_as_they_are(tmp_path):
    """Runs of equal ids are kept in a fraction of their bytes; a piece that would not
    shrink (ids in random order) is written as it is; both come back exactly."""
    from dask_sweep.multipass.spill import KeptLabels

    rng = np.random.default_rng(3)
    shape = (4, 96, 128)
    runs = np.repeat(np.arange(1, 4 * 96 * 128 // 64 + 1, dtype=np.uint32), 64).reshape(shape)
    noise = rng.integers(0, 60000, shape, dtype=np.uint32)
    kept = KeptLabels([shape, shape], str(tmp_path))
    kept.PIECE = 8192  # several pieces per slab
    kept.put_labels(0, runs, int(runs.max()))
    kept.put_labels(1, noise, 60000)
    _, _, _, sizes0 = kept._kept[0]
    _, _, step, sizes1 = kept._kept[1]
    assert len(sizes0) > 1 and all(0 < n < 8192 // 4 for n in sizes0)
    assert all(n == -step * 2 for n in sizes1[:-1])  # uint16, as they are
    with pytest.raises(TypeError, match="take_labels"):
        kept.take(0)  # not a raw array: never read as one
    for i, lab in enumerate((runs, noise)):
        got = kept.take_labels(i)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, lab)
    assert kept._fd is None
