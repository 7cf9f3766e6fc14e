"""Conformance test base classes every source and sink test subclasses.

Like zarr's ``StoreTests``: a subclass says how to make its object from a numpy
array in a temporary folder, and inherits the contract's tests::

    class TestZarrSource(SourceConformance):
        def make_source(self, tmp_path, data):
            ...write data as zarr...
            return ZarrSource(path)

Needs pytest (a test dependency); not imported by :mod:`dask_sweep.io`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dask_sweep.errors import SinkError
from dask_sweep.io.accounting import track
from dask_sweep.io.base import Sink, Source

__all__ = ["SinkConformance", "SourceConformance", "make_volume", "snapshot_output"]


def make_volume(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """A reproducible test volume with structure in every axis (not constant)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def snapshot_output(path: str | os.PathLike) -> dict[str, bytes]:
    """Every file of an output (a file or a folder tree) by relative name: its bytes."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


class SourceConformance:
    """Tests every :class:`Source` must pass.

    Subclasses implement :meth:`make_source` and may narrow ``dtypes``/``shape``.
    """

    shape: tuple[int, ...] = (20, 64, 48)
    dtypes: tuple[str, ...] = ("uint8", "uint16", "float32")

    def make_source(self, tmp_path: Path, data: np.ndarray) -> Source:
        """Store ``data`` under ``tmp_path`` and return a source reading it."""
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc) -> None:
        # Each subclass runs every test once per dtype it lists.
        if "dtype" in metafunc.fixturenames:
            metafunc.parametrize("dtype", self.dtypes)

    @pytest.fixture
    def data(self, dtype: str) -> np.ndarray:
        return make_volume(self.shape, dtype)

    @pytest.fixture
    def source(self, tmp_path: Path, data: np.ndarray) -> Source:
        return self.make_source(tmp_path, data)

    def test_shape_dtype(self, source: Source, data: np.ndarray) -> None:
        assert source.shape == data.shape
        assert source.dtype == data.dtype
        assert source.ndim == data.ndim
        assert len(source.chunks) == data.ndim

    def test_full_read(self, source: Source, data: np.ndarray) -> None:
        np.testing.assert_array_equal(source.read(), data)

    def test_slab_reads_in_any_order(self, source: Source, data: np.ndarray) -> None:
        rng = np.random.default_rng(1)
        bounds = [0, 3, 4, 9, 15, data.shape[0]]
        slabs = list(zip(bounds[:-1], bounds[1:]))
        out = np.zeros_like(data)
        for i in rng.permutation(len(slabs)):
            a, b = slabs[i]
            out[a:b] = source.read((slice(a, b),))
        np.testing.assert_array_equal(out, data)
        # an in-plane window straddling disk blocks
        region = (slice(2, 7), slice(5, 40), slice(1, data.shape[2] - 3))
        np.testing.assert_array_equal(source.read(region), data[region])

    def test_read_into_out(self, source: Source, data: np.ndarray) -> None:
        # into a slab's planes (contiguous), into a strided view, and refused when the
        # shape or dtype is not the region's (the error names the source)
        slab = np.full((8, *data.shape[1:]), 7, dtype=data.dtype)
        assert source.read((slice(3, 6),), out=slab[2:5]) is not None
        np.testing.assert_array_equal(slab[2:5], data[3:6])
        assert (slab[:2] == 7).all() and (slab[5:] == 7).all()
        strided = np.zeros((3, data.shape[1], 2 * data.shape[2]), dtype=data.dtype)
        source.read((slice(0, 3),), out=strided[:, :, ::2])
        np.testing.assert_array_equal(strided[:, :, ::2], data[:3])
        with pytest.raises(ValueError, match="out= must have shape"):
            source.read((slice(0, 3),), out=slab[:2])
        other = np.dtype("f8") if data.dtype != np.dtype("f8") else np.dtype("f4")
        with pytest.raises(ValueError, match=re.escape(str(source.path))):
            source.read((slice(0, 2),), out=np.empty((2, *data.shape[1:]), other))

    def test_to_dask_equals_data(self, source: Source, data: np.ndarray) -> None:
        x = source.to_dask()
        np.testing.assert_array_equal(x.compute(scheduler="threads"), data)
        bigger = source.to_dask(chunks=(5, -1, -1))
        np.testing.assert_array_equal(bigger.compute(scheduler="sync"), data)

    def test_to_dask_is_one_root_layer(self, source: Source) -> None:
        x = source.to_dask()
        hlg = x.__dask_graph__()
        assert list(hlg.layers) == [x.name]
        assert x.name.startswith("imread-")
        assert all(not t.dependencies for t in hlg.layers[x.name].values())
        assert source.to_dask().name == x.name  # deterministic

    def test_blocks_are_whole_disk_chunks(self, source: Source) -> None:
        x = source.to_dask(chunks=(3, 17, 5))
        for axis, (sizes, block) in enumerate(zip(x.chunks, source.chunks)):
            edges = np.cumsum(sizes)[:-1]
            assert all(e % block == 0 for e in edges), (axis, sizes, block)

    def test_pickle_round_trip(self, source: Source, data: np.ndarray) -> None:
        clone = pickle.loads(pickle.dumps(source))
        np.testing.assert_array_equal(clone.read((slice(4, 6),)), data[4:6])
        assert clone.token == source.token
        # metadata only: far smaller than the data it describes
        assert len(pickle.dumps(source)) < 10_000

    def test_each_chunk_read_once(self, source: Source, data: np.ndarray) -> None:
        x = source.to_dask()
        with track() as stats:
            x.compute(scheduler="threads")
        s = stats.sources[source.path]
        assert s.bytes_read == data.nbytes
        assert s.reads_per_chunk.max == 1

    def test_region_out_of_bounds_is_clipped_like_numpy(
        self, source: Source, data: np.ndarray
    ) -> None:
        np.testing.assert_array_equal(source.read((slice(18, 99),)), data[18:99])

    def test_bad_region(self, source: Source) -> None:
        with pytest.raises((TypeError, ValueError, IndexError)):
            source.read((slice(0, 4, 2),))
        with pytest.raises((TypeError, ValueError, IndexError)):
            source.read((slice(None),) * (source.ndim + 1))


class SinkConformance:
    """Tests every :class:`Sink` must pass.

    Subclasses implement :meth:`make_sink` (creating the sink at ``path``) and
    :meth:`read_back`, and name the output in ``output_name``.
    """

    shape: tuple[int, ...] = (20, 64, 48)
    dtype: str = "uint16"
    output_name: str = "out"
    bad_dtypes: tuple[str, ...] = ("complex64",)

    def make_sink(self, path: Path, shape: tuple[int, ...], dtype: Any, **kwargs: Any) -> Sink:
        raise NotImplementedError

    def read_back(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    @pytest.fixture
    def data(self) -> np.ndarray:
        return make_volume(self.shape, self.dtype)

    def _write_all(self, path: Path, data: np.ndarray, **kwargs: Any) -> Sink:
        sink = self.make_sink(path, data.shape, data.dtype, **kwargs)
        for a, b in sink.slabs():
            sink.write_slab(a, data[a:b])
        sink.finalize()
        return sink

    def test_write_slabs_in_order_reads_back(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        sink = self._write_all(path, data, slab_rows=4)
        assert len(sink.slabs()) > 1
        np.testing.assert_array_equal(self.read_back(path), data)
        # nothing temporary is left next to the output
        assert sorted(os.listdir(tmp_path)) == [self.output_name]

    def test_resume_after_crash_is_byte_identical(self, tmp_path: Path, data: np.ndarray) -> None:
        ref = tmp_path / "a" / self.output_name
        ref.parent.mkdir()
        self._write_all(ref, data, slab_rows=4)

        path = tmp_path / "b" / self.output_name
        path.parent.mkdir()
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4)
        slabs = sink.slabs()
        for a, b in slabs[:2]:
            sink.write_slab(a, data[a:b])
        # the crash: half of the next slab reached the disk (garbage), its marker did not
        a, b = slabs[2]
        sink._write(a, np.zeros_like(data[a:b]) + 7)
        del sink
        assert not path.exists()  # never looks complete

        with pytest.raises(SinkError, match="resume=True"):
            self.make_sink(path, data.shape, data.dtype, slab_rows=4)
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, resume=True)
        assert sink.done_slabs() == slabs[:2]
        assert sink.todo_slabs() == slabs[2:]
        for a, b in sink.todo_slabs():
            sink.write_slab(a, data[a:b])
        sink.finalize()
        assert snapshot_output(path) == snapshot_output(ref)

    def test_deferred_slabs_recorded_only_after_their_sync(
        self, tmp_path: Path, data: np.ndarray, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from dask_sweep.io import base

        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, sync_bytes="1GiB")
        seen: list = []  # what was recorded when each file was synced
        real = base._fsync_file
        monkeypatch.setattr(
            base, "_fsync_file", lambda f: (seen.append(list(sink.done_slabs())), real(f))
        )
        for a, b in sink.slabs()[:3]:
            sink.write_slab(a, data[a:b], commit=False)
        assert sink.done_slabs() == [] and seen == []  # one open group, nothing synced yet
        sink.sync()
        assert seen and all(s == [] for s in seen)  # every file synced before any record
        assert sink.done_slabs() == sink.slabs()[:3]
        for a, b in sink.slabs()[3:]:
            sink.write_slab(a, data[a:b], commit=False)
        sink.finalize()  # syncs the rest
        np.testing.assert_array_equal(self.read_back(path), data)
        assert sorted(os.listdir(tmp_path)) == [self.output_name]

    @pytest.mark.parametrize("sync_bytes", [0, 1, "2 slabs"])
    def test_group_sync_in_the_background(
        self, tmp_path: Path, data: np.ndarray, sync_bytes: Any
    ) -> None:
        from dask_sweep.io import base

        path = tmp_path / self.output_name
        slab = 4 * int(np.prod(data.shape[1:])) * data.dtype.itemsize
        limit = 2 * slab if sync_bytes == "2 slabs" else sync_bytes
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, sync_bytes=limit)
        slabs = sink.slabs()
        for a, b in slabs[:3]:
            sink.write_slab(a, data[a:b], commit=False)
        group = base._group_sync(sink)
        group.drain()  # waits for the group in flight
        # groups of (at least) sync_bytes were synced and recorded as they filled up
        synced = 3 if limit < slab else 2
        assert sink.done_slabs() == slabs[:synced]
        assert len(group.slabs) == 0  # drained: the rest are found by their marks
        for a, b in slabs[3:]:
            sink.write_slab(a, data[a:b], commit=False)
        sink.finalize()
        np.testing.assert_array_equal(self.read_back(path), data)

    def test_slabs_written_by_another_process_are_synced_at_finalize(
        self, tmp_path: Path, data: np.ndarray
    ) -> None:
        from dask_sweep.io import base

        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, sync_bytes="1GiB")
        for a, b in sink.slabs():
            sink.write_slab(a, data[a:b], commit=False)
        base._GROUPS.clear()  # as if a worker process had written them and gone
        pickle.loads(pickle.dumps(sink)).finalize()
        np.testing.assert_array_equal(self.read_back(path), data)

    def test_failed_sync_never_records_its_slabs(
        self, tmp_path: Path, data: np.ndarray, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from dask_sweep.io import base

        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, sync_bytes=0)

        def broken(f: str) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(base, "_fsync_file", broken)
        sink.write_slab(0, data[:4], commit=False)  # its group sync fails on the helper thread
        with pytest.raises(SinkError, match=r"Failed to sync rows 0:4 of .*Input/output"):
            sink.write_slab(4, data[4:8], commit=False)  # the next group raises it
        monkeypatch.undo()
        # a later sync would succeed on pages the kernel may have dropped: rows 0:4
        # must stay unrecorded, so that resume=True writes them again
        with pytest.raises(SinkError, match="never written"):
            sink.finalize()
        assert (0, 4) not in sink.done_slabs()
        assert not path.exists()

    def test_resume_redoes_written_but_unsynced_slabs(
        self, tmp_path: Path, data: np.ndarray
    ) -> None:
        from dask_sweep.io import base

        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, sync_bytes="1GiB")
        sink.write_slab(0, data[:4])  # synced and recorded
        sink.write_slab(4, data[4:8], commit=False)  # written, unsynced: then the crash
        del sink
        base._GROUPS.clear()
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4, resume=True)
        assert sink.done_slabs() == [(0, 4)]
        assert sink.todo_slabs()[0] == (4, 8)  # redone, not trusted
        for a, b in sink.todo_slabs():
            sink.write_slab(a, data[a:b], commit=False)
        sink.finalize()
        np.testing.assert_array_equal(self.read_back(path), data)

    def test_resume_with_other_layout_refused(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4)
        sink.write_slab(0, data[:4])
        with pytest.raises(SinkError, match="Cannot resume"):
            self.make_sink(path, (21, *data.shape[1:]), data.dtype, resume=True)

    def test_existing_output_without_overwrite(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        self._write_all(path, data)
        before = snapshot_output(path)
        with pytest.raises(SinkError, match="overwrite=True") as info:
            self.make_sink(path, data.shape, data.dtype)
        assert str(path) in str(info.value)
        assert snapshot_output(path) == before
        assert sorted(os.listdir(tmp_path)) == [self.output_name]

    def test_overwrite_replaces(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        self._write_all(path, data)
        other = data[::-1].copy()
        sink = self.make_sink(path, data.shape, data.dtype, overwrite=True)
        np.testing.assert_array_equal(self.read_back(path), data)  # old kept until the end
        for a, b in sink.slabs():
            sink.write_slab(a, other[a:b])
        sink.finalize()
        np.testing.assert_array_equal(self.read_back(path), other)

    def test_finalize_incomplete_refused(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=4)
        sink.write_slab(0, data[:4])
        with pytest.raises(SinkError, match="4:20"):
            sink.finalize()
        assert not path.exists()

    def test_misaligned_or_misshapen_slab(self, tmp_path: Path, data: np.ndarray) -> None:
        sink = self.make_sink(tmp_path / self.output_name, data.shape, data.dtype)
        with pytest.raises(SinkError, match="shape"):
            sink.write_slab(0, data[:2, :10])
        if sink.row_step > 1:
            with pytest.raises(SinkError, match="multiples"):
                sink.write_slab(1, data[1 : 1 + sink.row_step])

    def test_unsupported_dtype(self, tmp_path: Path) -> None:
        for dt in self.bad_dtypes + ("object",):
            with pytest.raises(SinkError, match="dtype"):
                self.make_sink(tmp_path / self.output_name, self.shape, dt)
        assert not os.listdir(tmp_path)

    def test_pickled_sink_writes(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        sink = self.make_sink(path, data.shape, data.dtype, slab_rows=8)
        for a, b in sink.slabs():
            pickle.loads(pickle.dumps(sink)).write_slab(a, data[a:b])
        pickle.loads(pickle.dumps(sink)).finalize()
        np.testing.assert_array_equal(self.read_back(path), data)

    def test_writes_are_accounted(self, tmp_path: Path, data: np.ndarray) -> None:
        path = tmp_path / self.output_name
        with track() as stats:
            sink = self._write_all(path, data)
        assert stats.sinks[sink.path].bytes_written == data.nbytes
