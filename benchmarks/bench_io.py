"""Benchmark: one volume stored as a TIFF stack, slab Zarr, 64³ and 128³ Zarr and HDF5; the
3-stage windowed pipeline read through ``dask_sweep.io.imread``, stock dask and dask_sweep side
by side (each run in a fresh process); and copy / threshold throughput through the sweep
against the disk's sequential bandwidth measured in the same run.

    python benchmarks/bench_io.py                                   # 128 x 512 x 512 uint8
    python benchmarks/bench_io.py --shape 512 1024 1024 --memory-limit 256MiB --workdir /big

Columns: wall and CPU seconds, peak RSS above the interpreter's baseline, bytes read from the
input ÷ input bytes, how many times each disk chunk was read (max / mean), the sweep's
predicted bytes-read ratio (``explain``), and whether the output equals stock dask's.

Throughput (``--io-shape``, default 256 x 1024 x 1024 uint8): copy and threshold through
``dask_sweep.io.imwrite`` with the sweep switched on, from a cold uncompressed slab Zarr to a
synced one, against the disk's sequential read then write of the same number of bytes,
measured alternately in the same run (``--io-runs`` rounds, medians). The disk's write is one
new file, synced; its read is the source's own chunk files, in order, in 16 MiB reads, after
their pages are evicted: the bytes the sweep reads, where they lie. Reading back the file
just written is also shown: on a virtual disk the host's cache can serve it at twice the
speed of a cold read, so it is not the figure of the bytes the sweep reads, but the ratio
against it is printed too.
A hand-written ``read``/``write`` loop over the same chunk files (``raw copy``) shows what any
streaming tool could reach. ``--io-formats tiff-stack hdf5 bigtiff`` adds copies from and to
those formats; ``--compare-sync-bytes 0 16MiB`` adds copies synced in other group sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FORMATS = ("tiff-stack", "zarr-slab", "zarr-64", "zarr-128", "hdf5")


def write_formats(vol: np.ndarray, tmp: str, formats) -> dict[str, str]:
    """Store ``vol`` in each requested layout; return format -> path for ``imread``."""
    import h5py
    import tifffile
    import zarr

    paths = {}
    z, y, x = vol.shape
    for fmt in formats:
        if fmt == "tiff-stack":
            d = os.path.join(tmp, "stack")
            os.makedirs(d, exist_ok=True)
            for i in range(z):
                tifffile.imwrite(os.path.join(d, f"slice_{i:05d}.tif"), vol[i])
            paths[fmt] = d
        elif fmt.startswith("zarr"):
            chunks = {
                "zarr-slab": (8, y, x),
                "zarr-64": (64, 64, 64),
                "zarr-128": (128, 128, 128),
            }[fmt]
            chunks = tuple(min(c, s) for c, s in zip(chunks, vol.shape))
            p = os.path.join(tmp, f"{fmt}.zarr")
            arr = zarr.create_array(
                p, shape=vol.shape, chunks=chunks, dtype=vol.dtype, compressors=None
            )
            arr[...] = vol
            paths[fmt] = p
        elif fmt == "hdf5":
            p = os.path.join(tmp, "vol.h5")
            with h5py.File(p, "w") as f:
                f.create_dataset("vol", data=vol, chunks=(8, y, x))
            paths[fmt] = p + "/vol"
    return paths


def run_one(fmt: str, path: str, out: str, mode: str, memory_limit: str) -> dict:
    """One pipeline run in this process: stock dask or the sweep."""
    import zarr

    import dask_sweep
    from dask_sweep.demo import pipeline
    from dask_sweep.diagnostics import PeakRSS
    from dask_sweep.io import imread, track

    x = imread(path)
    y = pipeline(x, "map_overlap")
    target = zarr.create_array(
        out, shape=y.shape, chunks=(8, *y.shape[1:]), dtype=y.dtype, overwrite=True
    )
    res = {"format": fmt, "mode": mode, "chunks": [int(c[0]) for c in x.chunks]}
    with track() as stats:
        if mode == "stock":
            with PeakRSS() as m:
                y.to_zarr(target)
        else:
            with dask_sweep.enable(memory_limit=memory_limit, fallback="silent"):
                text = str(dask_sweep.explain(y.to_zarr(target, compute=False)))
                res["swept"] = "sweep 0:" in text
                # the last such line: over all tiles when the plan is tiled in-plane
                line = [ln for ln in text.splitlines() if "bytes read / input bytes" in ln]
                res["predicted"] = float(line[-1].split("= ")[1].split()[0]) if line else None
                res["tiled"] = "tiled in-plane" in text
                with PeakRSS() as m:
                    y.to_zarr(target)
    srcs = stats.sources
    rpc = [c.reads_per_chunk for c in srcs.values()]
    res.update(
        wall=m.wall,
        cpu=m.cpu,
        peak_rss=m.peak_above_baseline,
        bytes_read=stats.bytes_read,
        input_bytes=int(np.prod(x.shape)) * x.dtype.itemsize,
        reads_max=max((r.max for r in rpc), default=0),
        reads_mean=float(np.mean([r.mean for r in rpc])) if rpc else 0.0,
        checksum=int(np.asarray(target[...], dtype=np.uint64).sum()),
    )
    return res


def drop_cache(path: str) -> None:
    """Evict ``path``'s (clean) pages from the page cache, so the next read hits the disk."""
    files = (
        [path]
        if os.path.isfile(path)
        else [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
    )
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def settle() -> None:
    """Let the disk finish earlier work (write-back, discards of deleted files) first."""
    os.sync()
    time.sleep(1.0)


def disk_bandwidth(tmp: str, nbytes: int) -> tuple[float, float]:
    """Sequential write (to stable storage) and read-back bandwidth of one new file, bytes/s."""
    p = os.path.join(tmp, "bw.bin")
    settle()
    block = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes()
    n = max(1, nbytes // len(block))
    t = time.perf_counter()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for _ in range(n):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    write = n * len(block) / (time.perf_counter() - t)
    drop_cache(p)
    read = read_bandwidth([p])
    os.remove(p)
    return write, read


def read_bandwidth(files: list[str]) -> float:
    """Uncached sequential read of ``files`` in order (16 MiB reads), bytes/s."""
    for f in files:
        drop_cache(f)
    settle()
    n = 0
    t = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 16 << 20):
                n += len(chunk)
        finally:
            os.close(fd)
    return n / (time.perf_counter() - t)


def raw_copy(files: list[str], tmp: str, group: int) -> float:
    """A hand-written streaming copy of ``files``, bytes/s of read + write.

    The floor any streaming tool stands on: each file read whole, written to a
    new file (write-back started at once), synced in groups of ``group`` bytes
    on a helper thread, everything synced at the end; no dask, no numpy.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = os.path.join(tmp, "raw-copy")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for f in files:
        drop_cache(f)
    settle()

    def sync(paths: list[str]) -> None:
        for p in [*paths, out]:
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    n, pending, held, future = 0, [], 0, None
    t = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        for i, f in enumerate(files):
            with open(f, "rb") as fh:
                data = fh.read()
            p = os.path.join(out, str(i))
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, data)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            n += len(data)
            pending.append(p)
            held += len(data)
            if held >= group:
                if future is not None:
                    future.result()
                future, pending, held = pool.submit(sync, pending), [], 0
        if future is not None:
            future.result()
        sync(pending)
    dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return 2 * n / dt


def chunk_files(path: str) -> list[str]:
    """The chunk files of a Zarr array in row-major chunk order (its disk order for a sweep)."""
    import zarr

    arr = zarr.open_array(path, mode="r")
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks)]
    key = arr.metadata.encode_chunk_key
    return [os.path.join(path, *key(b).split("/")) for b in np.ndindex(*grid)]


def throughput(path: str, tmp: str, memory_limit: str) -> dict:
    """copy and threshold through the sweep-enabled ``imwrite``, bytes/s of read + write.

    Like the disk measurement, the source is read from the disk (its pages are
    evicted first) and the output is on stable storage when ``imwrite`` returns
    (every slab is synced before it is recorded, and ``finalize`` syncs the last).
    """
    import dask_sweep
    from dask_sweep.io import imread, imwrite

    # Warm up (thread pools, lazy imports) on a small write, untimed.
    with dask_sweep.enable(memory_limit=memory_limit, fallback="silent"):
        imwrite(imread(path)[:8], os.path.join(tmp, "warm.zarr"), overwrite=True)
    shutil.rmtree(os.path.join(tmp, "warm.zarr"), ignore_errors=True)
    out = {}
    for name, f in (("copy", lambda x: x), ("threshold", lambda x: (x > 128).astype("u1"))):
        x = imread(path)
        dst = os.path.join(tmp, f"{name}.zarr")
        drop_cache(path)
        settle()
        t = time.perf_counter()
        with dask_sweep.enable(memory_limit=memory_limit, fallback="silent"):
            # uncompressed, like the disk measurement: this measures I/O, not zstd
            imwrite(f(x), dst, overwrite=True, compressors=None)
        dt = time.perf_counter() - t
        out[name] = 2 * x.nbytes / dt
        shutil.rmtree(dst, ignore_errors=True)
    return out


def copy_with_sync(path: str, tmp: str, memory_limit: str, sync_bytes: str) -> dict:
    """The copy of :func:`throughput` with another ``sync_bytes`` (``0``: every slab)."""
    import dask_sweep
    from dask_sweep.io import imread, imwrite

    x = imread(path)
    dst = os.path.join(tmp, "copy-sync.zarr")
    drop_cache(path)
    settle()
    t = time.perf_counter()
    with dask_sweep.enable(memory_limit=memory_limit, fallback="silent"):
        imwrite(x, dst, overwrite=True, compressors=None, sync_bytes=sync_bytes)
    dt = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    return {f"copy, sync-bytes {sync_bytes}": 2 * x.nbytes / dt}


#: Output (and input) paths of the other formats' copies, in ``tmp``.
COPY_FORMATS = {"tiff-stack": "stack", "hdf5": "vol.h5/vol", "bigtiff": "vol.tif"}


def format_copies(zarr_src: str, tmp: str, formats, memory_limit: str) -> dict:
    """Copy from and to each of ``formats`` (against the uncompressed Zarr), bytes/s.

    The format's copy of the volume is written once by :func:`prepare_formats`.
    """
    import dask_sweep
    from dask_sweep.io import imread, imwrite

    out = {}
    for fmt in formats:
        other = os.path.join(tmp, "fmt", COPY_FORMATS[fmt])
        for name, src, dst in (
            (f"{fmt} -> zarr", other, os.path.join(tmp, "copy.zarr")),
            (f"zarr -> {fmt}", zarr_src, os.path.join(tmp, "copy-" + COPY_FORMATS[fmt])),
        ):
            x = imread(src)
            drop_cache(_file_of(src))
            settle()
            t = time.perf_counter()
            with dask_sweep.enable(memory_limit=memory_limit, fallback="silent"):
                kw = {"compressors": None} if dst.endswith(".zarr") else {}
                imwrite(x, dst, overwrite=True, **kw)
            out[name] = 2 * x.nbytes / (time.perf_counter() - t)
            _remove(_file_of(dst))
    return out


def prepare_formats(zarr_src: str, tmp: str, formats) -> None:
    """The throughput volume in each of ``formats`` (uncompressed, default layouts)."""
    from dask_sweep.io import imread, imwrite

    os.makedirs(os.path.join(tmp, "fmt"), exist_ok=True)
    for fmt in formats:
        imwrite(imread(zarr_src), os.path.join(tmp, "fmt", COPY_FORMATS[fmt]), overwrite=True)


def _file_of(path: str) -> str:
    """The file or folder holding ``path`` (an HDF5 path names a dataset inside its file)."""
    return path.split(".h5")[0] + ".h5" if ".h5/" in path else path


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def _spawn(args: list[str]) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, "--_worker", *args], capture_output=True, text=True
    )
    if p.returncode:
        raise RuntimeError(f"run {args[:1] + args[3:4]} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 512, 512])
    ap.add_argument("--memory-limit", default="64MiB")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument(
        "--io-shape",
        type=int,
        nargs=3,
        default=[256, 1024, 1024],
        help="volume for copy/threshold throughput (0 0 0: skip)",
    )
    ap.add_argument("--io-runs", type=int, default=5, help="rounds of disk / copy / threshold")
    ap.add_argument(
        "--io-formats",
        nargs="*",
        default=[],
        choices=sorted(COPY_FORMATS),
        help="also copy from and to these formats (uncompressed) in each round",
    )
    ap.add_argument(
        "--compare-sync-bytes",
        nargs="*",
        default=[],
        metavar="BYTES",
        help="also copy with these sweep.sync-bytes in each round (0: sync every slab)",
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(run_one(*a._worker)))
        return 0
    from dask_sweep.demo import make_volume
    from dask_sweep.utils import format_bytes

    tmp = a.workdir or tempfile.mkdtemp(prefix="dask-sweep-io-")
    try:
        src = os.path.join(tmp, "gen.zarr")
        make_volume(src, tuple(a.shape), (8, *a.shape[1:]))
        import zarr

        vol = zarr.open_array(src, mode="r")[...]
        paths = write_formats(vol, tmp, a.formats)
        print(
            f"volume {tuple(a.shape)} uint8 ({format_bytes(vol.nbytes)}); "
            f"budget {a.memory_limit}; each run in a fresh process, threads scheduler"
        )
        head = (
            f"{'format':<11} {'mode':<6} {'wall s':>7} {'cpu s':>7} {'peak RSS':>11} "
            f"{'read/in':>8} {'reads/chunk max/mean':>21} {'predicted':>9} same"
        )
        print(head)
        for fmt in a.formats:
            out = os.path.join(tmp, "out.zarr")
            stock = _spawn([fmt, paths[fmt], out, "stock", a.memory_limit])
            sw = _spawn([fmt, paths[fmt], out, "sweep", a.memory_limit])
            for r in (stock, sw):
                pred = f"{r['predicted']:.2f}" if r.get("predicted") else "-"
                if r["mode"] == "sweep" and not r.get("swept"):
                    pred = "not swept"
                elif r.get("tiled"):
                    pred += " (tiled)"
                print(
                    f"{fmt:<11} {r['mode']:<6} {r['wall']:7.2f} {r['cpu']:7.2f} "
                    f"{format_bytes(r['peak_rss']):>11} "
                    f"{r['bytes_read'] / r['input_bytes']:8.2f} "
                    f"{r['reads_max']:>10} / {r['reads_mean']:<8.2f} {pred:>9} "
                    f"{sw['checksum'] == stock['checksum']}"
                )
            print(
                f"{'':<11} sweep/stock: wall {sw['wall'] / stock['wall']:.2f}x, peak RSS "
                f"{sw['peak_rss'] / max(1, stock['peak_rss']):.2f}x"
            )
        if a.io_shape[0]:
            # A volume of its own, big enough that fixed costs do not hide the disk.
            io_src = os.path.join(tmp, "io-slab.zarr")
            io = zarr.create_array(
                io_src,
                shape=tuple(a.io_shape),
                dtype="u1",
                chunks=(8, *a.io_shape[1:]),
                compressors=None,
            )
            rng = np.random.default_rng(0)
            for i in range(0, a.io_shape[0], 8):
                io[i : i + 8] = rng.integers(0, 255, io[i : i + 8].shape, dtype=np.uint8)
            print(
                f"\ncopy / threshold: {tuple(a.io_shape)} uint8 ({format_bytes(io.nbytes)}), "
                "uncompressed Zarr, slab chunks"
            )
            # Alternate disk and pipeline runs so both see the same disk weather;
            # report medians.
            from dask_sweep.io.base import _sync_bytes

            files = chunk_files(io_src)
            prepare_formats(io_src, tmp, a.io_formats)
            disk, runs = [], []
            for _ in range(a.io_runs):
                wbw, fresh = disk_bandwidth(tmp, io.nbytes)
                rbw = read_bandwidth(files)
                # read + write, back to back: the time to read the bytes, then write them
                disk.append((wbw, rbw, fresh, 2 / (1 / wbw + 1 / rbw), 2 / (1 / wbw + 1 / fresh)))
                runs.append(throughput(io_src, tmp, a.memory_limit))
                for sb in a.compare_sync_bytes:
                    runs[-1].update(
                        copy_with_sync(io_src, tmp, a.memory_limit, sb)
                    )
                # synced in the groups the sinks use (sweep.sync-bytes)
                runs[-1]["raw"] = raw_copy(files, tmp, _sync_bytes(None))
                runs[-1].update(format_copies(io_src, tmp, a.io_formats, a.memory_limit))
            wbw, rbw, fresh, both, both_fresh = (
                float(np.median([d[i] for d in disk])) for i in range(5)
            )
            print(
                f"disk (medians of {a.io_runs}): sequential write {wbw / 1e6:.0f} MB/s (synced); "
                f"uncached read of the source's chunk files {rbw / 1e6:.0f} MB/s (read-back of "
                f"the file just written: {fresh / 1e6:.0f} MB/s); reading then writing the same "
                f"bytes: {both / 1e6:.0f} MB/s ({both_fresh / 1e6:.0f} MB/s with the read-back)"
            )
            raw = float(np.median([r["raw"] for r in runs]))
            print(
                f"raw copy   (a hand-written os.read/os.write loop over the chunk files, synced "
                f"the same way): {raw / 1e6:.0f} MB/s = {100 * raw / both:.0f}% of the disk's "
                "read+write bandwidth"
            )
            for name in ("copy", "threshold"):
                bps = float(np.median([r[name] for r in runs]))
                each = ", ".join(f"{r[name] / 1e6:.0f}" for r in runs)
                # per round, against the disk measured just before it
                pct = [100 * r[name] / d[3] for r, d in zip(runs, disk)]
                pct_fresh = [100 * r[name] / d[4] for r, d in zip(runs, disk)]
                print(
                    f"{name:<10} through the sweep (imwrite, synced, cold source): "
                    f"{bps / 1e6:.0f} MB/s read+write ({each}) = {100 * bps / both:.0f}% of the "
                    f"disk's read+write bandwidth (per round: "
                    f"{', '.join(f'{p:.0f}' for p in pct)}; min {min(pct):.0f}%); against the "
                    f"read-back figure {100 * bps / both_fresh:.0f}% (min {min(pct_fresh):.0f}%); "
                    f"{bps / raw:.2f}x the raw copy"
                )
            for name in runs[0]:
                if "->" not in name and "sync-bytes" not in name:
                    continue
                bps = float(np.median([r[name] for r in runs]))
                pct = [100 * r[name] / d[3] for r, d in zip(runs, disk)]
                print(
                    f"{name if 'sync' in name else 'copy ' + name:<23} {bps / 1e6:5.0f} MB/s read+write = {100 * bps / both:.0f}% "
                    f"of the disk's (rounds: {', '.join(f'{p:.0f}' for p in pct)}); "
                    f"{bps / raw:.2f}x the raw copy"
                )
    finally:
        if a.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
