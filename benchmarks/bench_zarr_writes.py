"""Benchmark: whole zarr chunks written through zarr's own pipeline against dask_sweep's
encoding (``io.zarr_io.write_whole_chunks``: the array's own codecs on two threads), in one
process, alternating, medians; and whether the stored files are the same.

    python benchmarks/bench_zarr_writes.py                      # 512^3, on /dev/shm if there
    python benchmarks/bench_zarr_writes.py --size 256 --runs 3 --dir /data/tmp

Cases, as the sweeps write them: one-plane uint8 chunks eight planes per call; 64^3 uint8
chunks a chunk row per call; 64^3 int32 labels a chunk row per call (the first 128 planes).
Data: blobs (thresholded smoothed noise) and their labels, zarr's default codec (zstd).
A RAM disk (``/dev/shm``) keeps the disk's write-back out of the timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np


def _volume(n: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    small = rng.random((n // 4, n // 4, n // 4)).astype(np.float32)
    v = (ndi.zoom(small, 4, order=1) * 255).astype(np.uint8)
    return v, ndi.label(v > 128)[0][: min(n, 128)]


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name != "zarr.json":
                with open(os.path.join(root, name), "rb") as f:
                    out[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return out


def _write(path: str, data: np.ndarray, chunks: tuple, per_call: int, ours: bool) -> float:
    import zarr

    import dask_sweep.io.zarr_io as Z

    shutil.rmtree(path, ignore_errors=True)
    z = zarr.create_array(path, shape=data.shape, chunks=chunks, dtype=data.dtype)
    saved = Z._encoder
    if not ours:
        Z._encoder = lambda target: None  # zarr's pipeline encodes (our emptiness check kept)
    try:
        t = time.perf_counter()
        for a in range(0, data.shape[0], per_call):
            assert Z.write_whole_chunks(z, (slice(a, a + per_call),), data[a:a + per_call])
        return time.perf_counter() - t
    finally:
        Z._encoder = saved


def compare(size: int, runs: int, workdir: str) -> list[dict]:
    vol, labels = _volume(size)
    cases = [("uint8, one-plane chunks, 8 per call", vol, (1, size, size), 8),
             ("uint8, 64^3 chunks, a row per call", vol, (64, 64, 64), 64),
             ("int32 labels, 64^3 chunks, a row per call", labels, (64, 64, 64), 64)]
    rows = []
    print(f"{'case':<44} {'zarr':>8} {'ours':>8} {'ours÷zarr':>10} same files")
    for name, data, chunks, per_call in cases:
        chunks = tuple(min(c, s) for c, s in zip(chunks, data.shape))
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(runs):
            for ours in (False, True):
                times[ours].append(_write(os.path.join(workdir, f"w{int(ours)}"), data,
                                          chunks, per_call, ours))
        same = _files(os.path.join(workdir, "w0")) == _files(os.path.join(workdir, "w1"))
        theirs, mine = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<44} {theirs:7.3f}s {mine:7.3f}s {mine / theirs:10.2f} {same}",
              flush=True)
        rows.append({"case": name, "zarr": theirs, "ours": mine, "same": same})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="edge of the cubic volume")
    ap.add_argument("--runs", type=int, default=5, help="alternating rounds (medians)")
    ap.add_argument("--dir", default=None,
                    help="where the arrays are written (default: /dev/shm, else the temp dir)")
    a = ap.parse_args(argv)
    base = a.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    work = tempfile.mkdtemp(prefix="dask-sweep-zarr-writes-", dir=base)
    try:
        compare(a.size, a.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
