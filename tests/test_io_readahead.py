"""Reading a chunk row of an uncompressed Zarr asks the kernel to read the next row ahead."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from dask_sweep.io import open_source

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")


def test_next_row_is_read_ahead(tmp_path, monkeypatch):
    path = str(tmp_path / "v.zarr")
    z = zarr.create_array(path, shape=(12, 6, 6), chunks=(4, 3, 6), dtype="u1", compressors=None)
    z[...] = np.arange(12 * 36, dtype="u1").reshape(12, 6, 6)
    src = open_source(path)
    advised: list[tuple[str, int]] = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    out = src.read((slice(0, 4),))
    np.testing.assert_array_equal(out, z[0:4])
    ahead = sorted(os.path.relpath(p, path) for p, a in advised if a == os.POSIX_FADV_WILLNEED)
    # the two chunks of row 1 (rows 4-8), nothing of row 0 or row 2
    assert ahead == [os.path.join("c", "1", "0", "0"), os.path.join("c", "1", "1", "0")]
    advised.clear()
    src.read((slice(8, 12),))  # the last row: nothing after it
    assert not [a for _, a in advised if a == os.POSIX_FADV_WILLNEED]
    advised.clear()
    src.read((slice(4, 8),))  # backwards now: row 0 is the next one
    ahead = sorted(os.path.relpath(p, path) for p, a in advised if a == os.POSIX_FADV_WILLNEED)
    assert ahead == [os.path.join("c", "0", "0", "0"), os.path.join("c", "0", "1", "0")]
