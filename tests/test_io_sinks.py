"""Every sink through the conformance suite, plus format-specific checks."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import zarr

from dask_sweep.errors import SinkError
from dask_sweep.io import (
    BigTiffSink,
    HDF5Sink,
    TiffSource,
    TiffStackSink,
    TiffStackSource,
    ZarrSink,
    read_hdf5,
    read_zarr,
)
from dask_sweep.io.base import CHAIN_SLABS
from dask_sweep.io.conformance import SinkConformance


class TestZarrSink(SinkConformance):
    output_name = "out.zarr"
    bad_dtypes = ()

    def make_sink(self, path, shape, dtype, **kwargs):
        return ZarrSink(path, shape, dtype, chunks=(2, 32, 48), **kwargs)

    def read_back(self, path):
        return read_zarr(path).compute()


class TestZarrSinkSharded(TestZarrSink):
    def make_sink(self, path, shape, dtype, **kwargs):
        return ZarrSink(path, shape, dtype, chunks=(2, 16, 48), shards=(4, 32, 48), **kwargs)


class TestZarrSinkV2(TestZarrSink):
    def make_sink(self, path, shape, dtype, **kwargs):
        return ZarrSink(path, shape, dtype, chunks=(4, 64, 24), zarr_format=2, **kwargs)


class TestTiffStackSink(SinkConformance):
    output_name = "stack"

    def make_sink(self, path, shape, dtype, **kwargs):
        return TiffStackSink(path, shape, dtype, compression="zlib", **kwargs)

    def read_back(self, path):
        return TiffStackSource(path).read()


class TestTiffStackSinkUncompressed(TestTiffStackSink):
    """Uncompressed slices are written as a template header and their pixels."""

    def make_sink(self, path, shape, dtype, **kwargs):
        return TiffStackSink(path, shape, dtype, **kwargs)


@pytest.mark.parametrize("dtype", ["u1", "<u2", ">u2", "i4", "f4", "f8"])
@pytest.mark.parametrize("plane", [(5, 7), (64, 48), (1, 1)])
def test_tiff_stack_files_are_tifffiles_bytes(tmp_path, dtype, plane):
    """Every slice file is byte for byte what ``tifffile.imwrite`` writes for it, whether
    its header comes from a template (uncompressed, native numbers) or not."""
    import tifffile

    rng = np.random.default_rng(3)
    data = (rng.random((4, *plane)) * 200).astype(dtype)
    sink = TiffStackSink(tmp_path / "s", data.shape, data.dtype, slab_rows=2)
    sink.write_slab(0, data[:2])
    sink.write_slab(2, data[2:])
    out = sink.finalize()
    for k in range(4):
        ref = tmp_path / f"ref{k}.tif"
        tifffile.imwrite(ref, data[k], photometric="minisblack" if len(plane) == 2 else None)
        with open(os.path.join(out, sink.filename(k)), "rb") as f, open(ref, "rb") as g:
            assert f.read() == g.read(), (dtype, plane, k)
    np.testing.assert_array_equal(TiffStackSource(out).read(), data)


class TestBigTiffSink(SinkConformance):
    output_name = "out.tif"
    dtype = "float32"

    def make_sink(self, path, shape, dtype, **kwargs):
        return BigTiffSink(path, shape, dtype, **kwargs)

    def read_back(self, path):
        src = TiffSource(path)
        assert src.memmapped
        return src.read()


class TestHDF5Sink(SinkConformance):
    output_name = "out.h5"
    bad_dtypes = ()

    def make_sink(self, path, shape, dtype, **kwargs):
        return HDF5Sink(path, shape, dtype, dataset="grp/vol", **kwargs)

    def read_back(self, path):
        return read_hdf5(path, dataset="grp/vol").compute()


class TestHDF5SinkChunked(TestHDF5Sink):
    def make_sink(self, path, shape, dtype, **kwargs):
        return HDF5Sink(path, shape, dtype, dataset="grp/vol", chunks=(4, 32, 24), **kwargs)


def test_zarr_sink_layout_and_slabs(tmp_path):
    sink = ZarrSink(
        tmp_path / "o.zarr", (20, 8, 8), "u1", chunks=(2, 8, 8), shards=(4, 8, 8), slab_rows=6
    )
    assert sink.row_step == 4
    assert sink.slabs() == [(0, 8), (8, 16), (16, 20)]
    with pytest.raises(SinkError, match="whole multiples"):
        ZarrSink(tmp_path / "p.zarr", (20, 8, 8), "u1", chunks=(3, 8, 8), shards=(4, 8, 8))
    with pytest.raises(SinkError, match="zarr_format=3"):
        ZarrSink(tmp_path / "q.zarr", (20, 8, 8), "u1", shards=(4, 8, 8), zarr_format=2)
    for a, b in sink.slabs():
        sink.write_slab(a, np.full((b - a, 8, 8), a, "u1"))
    sink.finalize()
    z = zarr.open_array(str(tmp_path / "o.zarr"), mode="r")
    assert z.metadata.zarr_format == 3 and z.shards == (4, 8, 8)


def test_slab_rows_default_from_config(tmp_path):
    import dask

    with dask.config.set({"sweep.target-slab-bytes": 8 * 64 * 64}):
        sink = ZarrSink(tmp_path / "o.zarr", (100, 64, 64), "u1", chunks=(3, 64, 64))
    assert sink.slab_rows == 9  # 8 rows rounded up to whole chunks


def test_slab_rows_default_within_the_active_budget(tmp_path):
    import dask_sweep

    # the chained writer holds CHAIN_SLABS slabs beyond the runtime overhead: 16 rows
    with dask_sweep.enable(memory_limit=CHAIN_SLABS * 16 * 64 * 64, runtime_overhead=0):
        sink = ZarrSink(tmp_path / "o.zarr", (100, 64, 64), "u1", chunks=(4, 64, 64))
    assert sink.slab_rows == 16
    assert sink.chunks == (4, 64, 64)
    auto = ZarrSink(tmp_path / "a.zarr", (256, 1024, 1024), "u1")
    assert auto.chunks == (8, 1024, 1024)  # a row of chunks is slab-sized, not 128 planes


def test_tiff_stack_needs_3d_and_hdf5_is_byte_stable(tmp_path):
    with pytest.raises(SinkError, match="at least 3 axes"):
        TiffStackSink(tmp_path / "s", (4, 4), "u1")
    sink = HDF5Sink(tmp_path / "f.h5" / "a" / "b", (4, 3, 2), "f8")
    sink.write_slab(0, np.ones((4, 3, 2)))
    assert sink.finalize() == str(tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["a/b"][:], 1)


class TestZarrSinkUncompressed(TestZarrSink):
    """Whole chunks take the direct write path; (2, 32, 48) leaves edge chunks to zarr."""

    def make_sink(self, path, shape, dtype, **kwargs):
        return ZarrSink(path, shape, dtype, chunks=(2, 20, 48), compressors=None, **kwargs)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype", ["u1", ">u2", "<i4", "f8", "bool"])
def test_zarr_direct_chunk_writes_match_zarr_bytes(tmp_path, zarr_format, dtype, compressed):
    """The direct paths (raw chunks written in place; compressed ones encoded on
    dask_sweep's codec threads) store exactly the files zarr itself would store."""
    import os

    codec = {} if compressed else {"compressors": None}

    shape, chunks = (11, 13, 7), (2, 5, 7)
    rng = np.random.default_rng(1)
    data = (rng.integers(0, 200, shape) if dtype != "bool" else rng.random(shape) > 0.5).astype(
        dtype
    )
    sink = ZarrSink(
        tmp_path / "d.zarr",
        shape,
        dtype,
        chunks=chunks,
        zarr_format=zarr_format,
        slab_rows=4,
        **codec,
    )
    for a, b in sink.slabs():
        sink.write_slab(a, data[a:b])
    sink.finalize()
    ref = zarr.create_array(
        str(tmp_path / "r.zarr"),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        zarr_format=zarr_format,
        config={"write_empty_chunks": True},
        **codec,
    )
    ref[...] = data
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "d.zarr"), mode="r")[...], data)

    def files(root):
        out = {}
        for d, _, names in os.walk(root):
            for n in names:
                if not n.startswith((".z", "zarr.json")):
                    p = os.path.join(d, n)
                    out[os.path.relpath(p, root)] = open(p, "rb").read()
        return out

    got, want = files(tmp_path / "d.zarr"), files(tmp_path / "r.zarr")
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)
    assert not [k for k in got if k.endswith(".partial")]


def _slab_sink(tmp_path, **kw):
    return ZarrSink(tmp_path / "o.zarr", (64, 4, 4), "u1", chunks=(1, 4, 4), compressors=None,
                    sync_bytes="1GiB", **kw)


def test_the_progress_record_is_one_log_per_process_not_a_file_per_slab(tmp_path):
    """64 one-plane slabs leave the manifest and one log (a file per slab cost an inode
    each: 0.5-0.9 ms a create on ext4, as much as a small slab's write)."""
    sink = _slab_sink(tmp_path)
    for a in range(64):
        sink.write_slab(a, np.full((1, 4, 4), a, "u1"), commit=False)
    assert len(os.listdir(sink.progress_path)) == 2
    sink.sync()
    assert sink.done_slabs() == [(a, a + 1) for a in range(64)]
    assert len(os.listdir(sink.progress_path)) == 2
    sink.finalize()
    assert read_zarr(tmp_path / "o.zarr").compute()[:, 0, 0].tolist() == list(range(64))


def test_a_torn_or_garbled_log_line_records_nothing(tmp_path):
    """A crash may leave a log's last line torn (or, on some file systems, zeros): only
    whole lines count, so a torn ``D 4 8`` never reads as ``D 4 8`` or ``D 4 80``."""
    from dask_sweep.io.base import recorded_slabs

    sink = _slab_sink(tmp_path)
    sink.write_slab(0, np.zeros((4, 4, 4), "u1"))
    with open(sink._log_path(), "ab") as f:
        f.write(b"\0\0\0\nD 4 8")  # zeros, then a torn line without its newline
    assert sink.done_slabs() == [(0, 4)] == recorded_slabs(tmp_path / "o.zarr")
    del sink
    resumed = _slab_sink(tmp_path, resume=True, slab_rows=4)
    assert resumed.todo_slabs()[0] == (4, 8)


def test_a_failed_sync_in_another_process_voids_this_ones_marks(tmp_path):
    """Slabs marked written here but whose sync failed elsewhere (their pages may be
    gone) are never recorded by a later sync; a slab written anew after its own failed
    sync is."""
    sink = _slab_sink(tmp_path)
    sink.write_slab(0, np.ones((4, 4, 4), "u1"), commit=False)
    sink.write_slab(4, np.ones((4, 4, 4), "u1"), commit=False)
    other = os.path.join(sink.progress_path, "log-otherhost-1-x")
    with open(other, "wb") as f:
        f.write(b"F 0 4\n")
    # this process: rows 4:8 failed, then written again
    sink._log("F", [(4, 8)])
    sink.write_slab(4, np.ones((4, 4, 4), "u1"), commit=False)
    sink.sync()
    assert sink.done_slabs() == [(4, 8)]
    with pytest.raises(SinkError, match="rows 0:4"):
        sink.finalize()


def test_resume_keeps_only_the_done_records(tmp_path):
    sink = _slab_sink(tmp_path)
    sink.write_slab(0, np.ones((4, 4, 4), "u1"))  # synced, recorded
    sink.write_slab(4, np.ones((4, 4, 4), "u1"), commit=False)  # the crash before its sync
    del sink
    from dask_sweep.io import base

    base._GROUPS.clear()
    resumed = _slab_sink(tmp_path, resume=True)
    names = [n for n in os.listdir(resumed.progress_path) if n.startswith("log-")]
    assert len(names) == 1 and resumed._progress() == ({(0, 4)}, set())


def test_a_record_of_an_older_version_is_refused_with_a_way_out(tmp_path):
    import json

    sink = _slab_sink(tmp_path)
    sink.write_slab(0, np.ones((4, 4, 4), "u1"))
    manifest = os.path.join(sink.progress_path, "manifest.json")
    with open(manifest) as f:
        old = json.load(f)
    with open(manifest, "w") as f:
        json.dump({**old, "version": 1}, f)
    with pytest.raises(SinkError, match=r"version 1\).*overwrite=True"):
        _slab_sink(tmp_path, resume=True)
    _slab_sink(tmp_path, overwrite=True)


def test_commit_slab_syncs_a_deferred_slab_then_records_it(tmp_path, monkeypatch):
    from dask_sweep.io import base

    sink = ZarrSink(
        tmp_path / "o.zarr", (8, 4, 4), "u1", chunks=(2, 4, 4), compressors=None,
        sync_bytes="1GiB",
    )
    seen = []
    sync = base._fsync_file
    monkeypatch.setattr(base, "_fsync_file", lambda p: (seen.append(sink.done_slabs()), sync(p)))
    sink.write_slab(0, np.ones((4, 4, 4), "u1"), commit=False)
    assert sink.done_slabs() == [] and seen == []
    sink.commit_slab(0, 4)
    assert seen == [[], []]  # both chunk files synced, before the record
    assert sink.done_slabs() == [(0, 4)]
    assert sink._progress()[1] == set()  # nothing left marked written and unsynced
    with pytest.raises(SinkError, match="never written"):
        sink.finalize()
