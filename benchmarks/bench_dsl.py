"""Benchmark: DSL pipelines vs scipy in memory, side by side in one run.

Writes a generated uint8 volume (smoothed noise with bright blobs) to a Zarr
store, then runs two pipelines with the DSL (reading the store, writing a Zarr
output) and with scipy on the whole volume in memory:

* ``dog``:  tee → gaussian(1) and gaussian(3) → zip(a - b) → > 0 → uint8
* ``otsu``: gaussian(2) → histogram pass → Otsu → apply pass → uint8

Prints wall time, peak RSS above the start (psutil sampling thread) against the
budget, bytes read ÷ input bytes (dask_sweep.io accounting) and whether the
results are equal::

    python benchmarks/bench_dsl.py                                   # 128 x 256 x 256, 16 MiB
    python benchmarks/bench_dsl.py --shape 512 2048 2048 --memory-limit 1GiB --no-scipy
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import scipy.ndimage as ndi
import zarr

from dask_sweep import dsl
from dask_sweep.config import parse_bytes
from dask_sweep.diagnostics import PeakRSS
from dask_sweep.utils import format_bytes


def make_volume(path: str, shape: tuple[int, ...], chunk_rows: int) -> None:
    """Write a generated uint8 volume slab by slab (never whole in memory)."""
    z = zarr.create_array(path, shape=shape, chunks=(chunk_rows, *shape[1:]), dtype="uint8")
    rng = np.random.default_rng(0)
    for a in range(0, shape[0], chunk_rows):
        b = min(shape[0], a + chunk_rows)
        noise = rng.normal(80, 25, (b - a, *shape[1:]))
        blobs = rng.random((b - a, *shape[1:])) > 0.995
        z[a:b] = np.clip(noise + 120 * ndi.maximum_filter(blobs, 5), 0, 255).astype("uint8")


def dsl_dog(src: str):
    s = dsl.source(src)
    a, b = s.tee()
    dog = dsl.zip(
        a.gaussian(1, output="float32"), b.gaussian(3, output="float32"), lambda p, q: p - q
    )
    return (dog > 0).astype("uint8")


def scipy_dog(x: np.ndarray) -> np.ndarray:
    g1 = ndi.gaussian_filter(x, 1, output=np.float32)
    g3 = ndi.gaussian_filter(x, 3, output=np.float32)
    return ((g1 - g3) > 0).astype("uint8")


def dsl_otsu(src: str):
    return dsl.otsu_threshold(src, sigma=2).astype("uint8")


def scipy_otsu(x: np.ndarray) -> np.ndarray:
    g = ndi.gaussian_filter(x, 2)
    t = dsl.otsu_from_histogram(np.bincount(g.ravel(), minlength=256), np.arange(256.0))
    return (g > t).astype("uint8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256])
    p.add_argument("--memory-limit", default="16MiB")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-rows", type=int, default=4)
    p.add_argument("--no-scipy", action="store_true", help="skip the in-memory reference")
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    budget = parse_bytes(args.memory_limit)
    nbytes = int(np.prod(shape))
    print(
        f"volume {shape} uint8 = {format_bytes(nbytes)}; budget {format_bytes(budget)}; "
        f"threads {args.threads}"
    )
    from dask_sweep.io import track

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.zarr")
        make_volume(src, shape, args.chunk_rows)
        head = (
            f"{'pipeline':<6} {'engine':<7} {'wall s':>7} {'peak RSS':>11} "
            f"{'/budget':>8} {'read/input':>10} {'passes':>6}  equal"
        )
        print(head)
        for name, build, ref in (("dog", dsl_dog, scipy_dog), ("otsu", dsl_otsu, scipy_otsu)):
            out = os.path.join(tmp, f"{name}.zarr")
            target = build(src).to(out)
            with track() as stats, PeakRSS() as mem:
                t0 = time.perf_counter()
                res = target.run(memory_limit=budget, threads=args.threads)
                wall = time.perf_counter() - t0
            read = stats.bytes_read  # measured by dask_sweep.io, not by the planner
            print(
                f"{name:<6} {'dsl':<7} {wall:7.2f} {format_bytes(mem.peak_above_baseline):>11} "
                f"{mem.peak_above_baseline / budget:8.2f} {read / nbytes:10.2f} {res.report.passes:>6}"
            )
            print(
                f"{'':<6} {'':<7} projected peak {format_bytes(res.report.peak_projected)}, "
                f"measured live {format_bytes(res.report.peak_live)}, "
                f"{len(res.report.steps)} steps, re-plans {len(res.report.replans)}"
            )
            if args.no_scipy:
                continue
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                x = zarr.open_array(src)[...]
                want = ref(x)
                wall = time.perf_counter() - t0
            got = zarr.open_array(out)[...]
            print(
                f"{'':<6} {'scipy':<7} {wall:7.2f} {format_bytes(mem.peak_above_baseline):>11} "
                f"{mem.peak_above_baseline / budget:8.2f} {1.0:10.2f} {'-':>6}  {bool((got == want).all())}"
            )
            del x, want, got


if __name__ == "__main__":
    main()
