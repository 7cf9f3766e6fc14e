"""Every source through the conformance suite, then each format's bad inputs."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import LocalStore

from dask_sweep.errors import SourceError
from dask_sweep.io import (
    HDF5Source,
    TiffSource,
    TiffStackSource,
    ZarrSource,
    imread,
    read_hdf5,
    read_tiff,
    read_tiff_stack,
    read_zarr,
)
from dask_sweep.io.conformance import SourceConformance, make_volume


def tiffwrite(path, data, **kwargs):
    # Say how 3-page data is meant: tifffile would guess RGB for a leading 3 or 4.
    tifffile.imwrite(path, data, photometric="minisblack", **kwargs)


def write_stack(folder, data, name="img_{:03d}.tif", start=0):
    os.makedirs(folder, exist_ok=True)
    for i, plane in enumerate(data):
        tiffwrite(os.path.join(folder, name.format(i + start)), plane)
    return folder


class TestTiffStackSource(SourceConformance):
    def make_source(self, tmp_path, data):
        return TiffStackSource(write_stack(tmp_path / "stack", data, "img_{}.tif", start=1))


class TestTiffStackGlob(SourceConformance):
    dtypes = ("uint16",)

    def make_source(self, tmp_path, data):
        write_stack(tmp_path / "stack", data)
        write_stack(tmp_path / "stack", data[:2], "other_{:03d}.tif")  # not matched
        return TiffStackSource(str(tmp_path / "stack" / "img_*.tif"), slices_per_chunk=3)


class TestTiffMemmapped(SourceConformance):
    def make_source(self, tmp_path, data):
        tiffwrite(tmp_path / "vol.tif", data)
        src = TiffSource(tmp_path / "vol.tif")
        assert src.memmapped
        return src


class TestBigTiffCompressed(SourceConformance):
    dtypes = ("uint8", "float32")

    def make_source(self, tmp_path, data):
        tiffwrite(tmp_path / "vol.tif", data, bigtiff=True, compression="zlib")
        src = TiffSource(tmp_path / "vol.tif")
        assert not src.memmapped
        return src


class TestZarrV3(SourceConformance):
    def make_source(self, tmp_path, data):
        z = zarr.create_array(
            LocalStore(tmp_path / "v.zarr"), shape=data.shape, chunks=(3, 32, 24), dtype=data.dtype
        )
        z[:] = data
        return ZarrSource(tmp_path / "v.zarr")


class TestZarrV3Uncompressed(SourceConformance):
    """Chunk files are read straight into the result (edge chunks included)."""

    def make_source(self, tmp_path, data):
        z = zarr.create_array(
            LocalStore(tmp_path / "v.zarr"),
            shape=data.shape,
            chunks=(3, 20, 48),
            dtype=data.dtype,
            compressors=None,
        )
        z[:] = data
        return ZarrSource(tmp_path / "v.zarr")


class TestZarrV2Uncompressed(SourceConformance):
    def make_source(self, tmp_path, data):
        z = zarr.create_array(
            LocalStore(tmp_path / "v.zarr"),
            shape=data.shape,
            chunks=(4, 64, 24),
            dtype=data.dtype,
            compressors=None,
            zarr_format=2,
        )
        z[:] = data
        return ZarrSource(tmp_path / "v.zarr")


class TestZarrV3Sharded(SourceConformance):
    def make_source(self, tmp_path, data):
        z = zarr.create_array(
            LocalStore(tmp_path / "v.zarr"),
            shape=data.shape,
            chunks=(2, 16, 48),
            shards=(4, 32, 48),
            dtype=data.dtype,
        )
        z[:] = data
        src = ZarrSource(tmp_path / "v.zarr")
        assert src.chunks == (4, 32, 48) and src.inner_chunks == (2, 16, 48)
        return src


class TestZarrV2InGroup(SourceConformance):
    def make_source(self, tmp_path, data):
        g = zarr.open_group(LocalStore(tmp_path / "g.zarr"), mode="w", zarr_format=2)
        z = g.create_array("sub/arr", shape=data.shape, chunks=(5, 64, 16), dtype=data.dtype)
        z[:] = data
        return ZarrSource(tmp_path / "g.zarr" / "sub" / "arr")


class TestHDF5Chunked(SourceConformance):
    def make_source(self, tmp_path, data):
        with h5py.File(tmp_path / "f.h5", "w") as f:
            f.create_dataset("grp/ds", data=data, chunks=(4, 32, 48), compression="gzip")
            f.create_dataset("other", data=np.zeros(3))
        return HDF5Source(tmp_path / "f.h5" / "grp" / "ds")


class TestHDF5Contiguous(SourceConformance):
    def make_source(self, tmp_path, data):
        with h5py.File(tmp_path / "f.h5", "w") as f:
            f.create_dataset("ds", data=data)
        src = HDF5Source(tmp_path / "f.h5", rows_per_chunk=6)
        assert src._offset is not None  # memory-mapped
        return src


# ----------------------------------------------------------------------- readers and imread


def test_natural_sort_and_slices_per_chunk(tmp_path):
    data = make_volume((12, 8, 9), "uint8")
    write_stack(tmp_path, data, "img_{}.tif")  # img_0 .. img_11, unpadded
    x = read_tiff_stack(tmp_path, slices_per_chunk=5)
    assert x.chunks[0] == (5, 5, 2)
    np.testing.assert_array_equal(x.compute(), data)


def test_explicit_file_list_keeps_order(tmp_path):
    data = make_volume((3, 8, 9), "uint8")
    write_stack(tmp_path, data)
    files = [tmp_path / f"img_{i:03d}.tif" for i in (2, 0, 1)]
    np.testing.assert_array_equal(read_tiff_stack(files).compute(), data[[2, 0, 1]])


def test_stack_block_tasks_carry_only_their_files(tmp_path):
    data = make_volume((40, 4, 4), "uint8")
    write_stack(tmp_path, data)
    x = read_tiff_stack(tmp_path)
    task = x.__dask_graph__()[(x.name, 7, 0, 0)]
    assert len(pickle.dumps(task)) < 2_000
    np.testing.assert_array_equal(x[7:9].compute(), data[7:9])


def test_imread_dispatch(tmp_path):
    data = make_volume((6, 8, 9), "uint16")
    write_stack(tmp_path / "st", data)
    tiffwrite(tmp_path / "v.tiff", data)
    g = zarr.open_group(LocalStore(tmp_path / "v.ome.zarr"), mode="w")
    g.attrs["multiscales"] = [{"datasets": [{"path": "0"}, {"path": "1"}]}]
    g.create_array("0", shape=data.shape, chunks=(2, 8, 9), dtype=data.dtype)[:] = data
    g.create_array("1", shape=(3, 4, 4), chunks=(2, 4, 4), dtype=data.dtype)[:] = 0
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        f["a/b"] = data
    for p, kw in [
        (tmp_path / "st", {}),
        (str(tmp_path / "st" / "img_*.tif"), {}),
        (tmp_path / "v.tiff", {}),
        (tmp_path / "v.ome.zarr", {}),
        (tmp_path / "v.ome.zarr" / "0", {}),
        (tmp_path / "v.ome.zarr", {"component": "0"}),
        (tmp_path / "f.hdf5" / "a" / "b", {}),
        (tmp_path / "f.hdf5", {"dataset": "a/b"}),
    ]:
        np.testing.assert_array_equal(imread(p, **kw).compute(), data, err_msg=str(p))
    assert imread(tmp_path / "v.ome.zarr" / "1").shape == (3, 4, 4)
    zarr_arr = zarr.open_array(LocalStore(tmp_path / "v.ome.zarr"), path="0", mode="r")
    np.testing.assert_array_equal(read_zarr(zarr_arr).compute(), data)
    assert read_tiff(tmp_path / "v.tiff", chunks=(4, -1, -1)).chunks[0] == (4, 2)
    assert read_hdf5(tmp_path / "f.hdf5", dataset="a/b").shape == data.shape


def test_zarr_chunks_rounded_to_whole_shards(tmp_path):
    z = zarr.create_array(
        LocalStore(tmp_path / "s.zarr"),
        shape=(20, 8, 8),
        chunks=(2, 8, 8),
        shards=(4, 8, 8),
        dtype="u1",
    )
    z[:] = 1
    assert read_zarr(tmp_path / "s.zarr").chunks[0] == (4,) * 5
    assert read_zarr(tmp_path / "s.zarr", chunks=(6, 8, 8)).chunks[0] == (8, 8, 4)


def test_token_changes_with_file(tmp_path):
    data = make_volume((4, 8, 9), "uint8")
    tiffwrite(tmp_path / "v.tif", data)
    a = imread(tmp_path / "v.tif").name
    assert imread(tmp_path / "v.tif").name == a
    os.utime(tmp_path / "v.tif", ns=(1, 1))
    assert imread(tmp_path / "v.tif").name != a


# ----------------------------------------------------------------------- bad input


def test_gap_in_numbering_names_missing_slice(tmp_path):
    data = make_volume((5, 8, 9), "uint8")
    write_stack(tmp_path, data, "img_{:03d}.tif", start=1)
    os.remove(tmp_path / "img_003.tif")
    with pytest.raises(SourceError, match=r"img_003\.tif is missing.*img_002\.tif.*img_004\.tif"):
        imread(tmp_path)


def test_duplicate_numbers_refused(tmp_path):
    data = make_volume((2, 8, 9), "uint8")
    write_stack(tmp_path, data, "img_{}.tif")
    tiffwrite(tmp_path / "img_01.tif", data[0])
    with pytest.raises(SourceError, match="same number"):
        imread(tmp_path)


def test_slice_of_other_shape_or_dtype(tmp_path):
    data = make_volume((4, 8, 9), "uint8")
    write_stack(tmp_path, data)
    tiffwrite(tmp_path / "img_002.tif", data[0, :, :5])
    with pytest.raises(SourceError, match=r"Slice 2 .*img_002\.tif.*shape \(8, 5\).*\(8, 9\)"):
        imread(tmp_path)
    tiffwrite(tmp_path / "img_002.tif", data[0].astype("uint16"))
    with pytest.raises(SourceError, match=r"img_002\.tif.*uint16.*Expected.*uint8"):
        imread(tmp_path)
    # found at read time too when the headers are not checked up front
    x = read_tiff_stack(tmp_path, validate=False)
    with pytest.raises(SourceError, match=r"img_002\.tif"):
        x.compute()


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        ("uint8", {}),
        ("uint16", {"byteorder": ">"}),  # the other byte order: swapped after the read
        ("float32", {}),
        ("int16", {"compression": "zlib"}),  # not raw: parsed per read
        ("uint8", {"photometric": "rgb"}),  # planes of (y, x, 3)
    ],
)
def test_stack_raw_reads_equal_tifffile(tmp_path, dtype, kwargs):
    shape = (5, 12, 10, 3) if kwargs.get("photometric") == "rgb" else (5, 12, 10)
    data = make_volume(shape, dtype)
    os.makedirs(tmp_path / "st")
    for i, plane in enumerate(data):
        tifffile.imwrite(tmp_path / "st" / f"img_{i}.tif", plane, **{"photometric": "minisblack", **kwargs})
    src = TiffStackSource(tmp_path / "st")
    raw = [r is not None for r in src._raw]
    assert all(raw) == ("compression" not in kwargs) and len(set(raw)) == 1
    np.testing.assert_array_equal(src.read(), data)
    np.testing.assert_array_equal(src.read((slice(1, 4), slice(2, 9))), data[1:4, 2:9])
    np.testing.assert_array_equal(read_tiff_stack(tmp_path / "st").compute(), data)


def test_stack_file_changed_after_opening(tmp_path):
    data = make_volume((4, 8, 9), "uint8")
    write_stack(tmp_path, data)
    src = TiffStackSource(tmp_path)
    # rewritten with other pixels (and so another time stamp): parsed again, new pixels
    tiffwrite(tmp_path / "img_001.tif", data[0] + 1, description="another header length")
    os.utime(tmp_path / "img_001.tif", ns=(0, 10**9))
    np.testing.assert_array_equal(src.read((slice(1, 2),))[0], data[0] + 1)
    # replaced by another shape: refused, naming the slice
    tiffwrite(tmp_path / "img_002.tif", data[0, :, :5])
    with pytest.raises(SourceError, match=r"Slice 2 .*img_002\.tif.*shape \(8, 5\)"):
        src.read((slice(2, 3),))
    # cut short with the same size and time stamp recorded: the short read is named
    path = tmp_path / "img_003.tif"
    st = os.stat(path)
    offset, swap, size, mtime = src._raw[3]
    with open(path, "r+b") as f:
        f.truncate(offset + 10)
    src._raw = (*src._raw[:3], (offset, swap, os.stat(path).st_size, os.stat(path).st_mtime_ns))
    with pytest.raises(SourceError, match=r"Slice 3: .*img_003\.tif is truncated"):
        src.read((slice(3, 4),))
    assert st.st_size > offset + 10


def test_truncated_and_corrupt_tiff(tmp_path):
    data = make_volume((6, 32, 32), "uint16")
    tiffwrite(tmp_path / "v.tif", data)
    raw = (tmp_path / "v.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError, match=r"t\.tif is truncated"):
        imread(tmp_path / "t.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all" * 4)
    with pytest.raises(SourceError, match=r"junk\.tif is not a readable TIFF"):
        imread(tmp_path / "junk.tif")
    write_stack(tmp_path / "st", data)
    raw = (tmp_path / "st" / "img_004.tif").read_bytes()
    (tmp_path / "st" / "img_004.tif").write_bytes(raw[:300])
    with pytest.raises(SourceError, match=r"img_004\.tif"):
        imread(tmp_path / "st")


def test_corrupt_compressed_page(tmp_path):
    data = make_volume((4, 32, 32), "uint16")
    tiffwrite(tmp_path / "v.tif", data, compression="zlib")
    with tifffile.TiffFile(tmp_path / "v.tif") as t:
        off = t.pages[2].dataoffsets[0]
    raw = bytearray((tmp_path / "v.tif").read_bytes())
    raw[off : off + 40] = b"\xff" * 40
    (tmp_path / "v.tif").write_bytes(bytes(raw))
    x = imread(tmp_path / "v.tif")
    with pytest.raises(SourceError, match=r"v\.tif: page 2"):
        x.compute()


def test_missing_zarr_chunk_names_key(tmp_path):
    z = zarr.create_array(
        LocalStore(tmp_path / "m.zarr"), shape=(8, 4, 4), chunks=(2, 4, 4), dtype="u1"
    )
    z[:] = 5
    os.remove(tmp_path / "m.zarr" / "c" / "2" / "0" / "0")
    with pytest.raises(SourceError, match=r"Chunk 'c/2/0/0' .* missing.*strict=False"):
        imread(tmp_path / "m.zarr").compute()
    loose = imread(tmp_path / "m.zarr", strict=False).compute()
    assert (loose[4:6] == 0).all() and (loose[:4] == 5).all()


def test_missing_shard_and_corrupt_chunk(tmp_path):
    z = zarr.create_array(
        LocalStore(tmp_path / "s.zarr"),
        shape=(8, 4, 4),
        chunks=(1, 4, 4),
        shards=(2, 4, 4),
        dtype="u2",
    )
    z[:] = 5
    os.remove(tmp_path / "s.zarr" / "c" / "1" / "0" / "0")
    with pytest.raises(SourceError, match=r"c/1/0/0"):
        read_zarr(tmp_path / "s.zarr").compute()
    (tmp_path / "s.zarr" / "c" / "1" / "0" / "0").write_bytes(b"garbage" * 20)
    with pytest.raises(SourceError, match=r"Chunk 'c/1/0/0' .* corrupt"):
        read_zarr(tmp_path / "s.zarr").compute()


def test_zarr_group_and_missing_paths(tmp_path):
    g = zarr.open_group(LocalStore(tmp_path / "g.zarr"), mode="w")
    g.create_array("a", shape=(2, 2), dtype="u1")
    with pytest.raises(SourceError, match=r"group, not an array.*\['a'\]"):
        imread(tmp_path / "g.zarr")
    with pytest.raises(SourceError, match="No zarr array"):
        imread(tmp_path / "g.zarr" / "nope")
    with pytest.raises(SourceError, match="does not exist"):
        imread(tmp_path / "none.zarr")


def test_hdf5_missing_dataset_lists_existing(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["grp/ds"] = np.zeros((2, 3))
        f["img"] = np.zeros((2, 3))
    with pytest.raises(SourceError, match=r"'grp/nope' does not exist.*\['grp/ds', 'img'\]"):
        imread(tmp_path / "f.h5" / "grp" / "nope")
    with pytest.raises(SourceError, match="holds 2 datasets"):
        imread(tmp_path / "f.h5")
    with pytest.raises(SourceError, match="is a group"):
        imread(tmp_path / "f.h5", dataset="grp")
    (tmp_path / "bad.h5").write_bytes(b"nope")
    with pytest.raises(SourceError, match="not a readable HDF5"):
        imread(tmp_path / "bad.h5")


def test_unknown_or_missing_input(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        imread(tmp_path / "nothing.raw")
    (tmp_path / "x.raw").write_bytes(b"")
    with pytest.raises(SourceError, match="Cannot tell the format"):
        imread(tmp_path / "x.raw")
    with pytest.raises(SourceError, match="No TIFF files"):
        imread(str(tmp_path / "img_*.tif"))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_uncompressed_zarr_missing_and_truncated_chunks(tmp_path, zarr_format):
    z = zarr.create_array(
        LocalStore(tmp_path / "u.zarr"),
        shape=(8, 4, 5),
        chunks=(2, 4, 3),
        dtype="<u2",
        compressors=None,
        zarr_format=zarr_format,
    )
    z[:] = 7
    key = z.metadata.encode_chunk_key((2, 0, 1))
    chunk = tmp_path / "u.zarr" / key
    good = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(SourceError, match=rf"Chunk '{key}' .* missing.*strict=False"):
        imread(tmp_path / "u.zarr").compute()
    loose = imread(tmp_path / "u.zarr", strict=False).compute()
    assert (loose[4:6, :, 3:] == 0).all() and (loose[:4] == 7).all()
    chunk.write_bytes(good[:-2])
    with pytest.raises(SourceError, match=rf"Chunk '{key}' .* corrupt.*expected 48 bytes"):
        read_zarr(tmp_path / "u.zarr").compute()
    chunk.write_bytes(good)
    np.testing.assert_array_equal(read_zarr(tmp_path / "u.zarr").compute(), z[...])
