"""Benchmark: dask_sweep.ndimage label / EDT vs scipy.ndimage, side by side in one run.

Writes a synthetic binary volume (thresholded smoothed noise, blobs of a few
voxels) to a Zarr store in a temporary directory, then for each function runs

* dask_sweep (reads from the store through its slab tasks), and
* scipy in memory (when the volume and scipy's temporaries fit in RAM),

and prints wall time, peak RSS above the starting RSS (psutil, sampled in a
thread) against the budget, bytes read / input bytes (from dask_sweep's I/O
accounting) and the number of passes.  Sizes are arguments, so the same script
runs small in CI and larger than RAM by hand::

    python benchmarks/bench_ndimage.py                       # 64 x 256 x 256
    python benchmarks/bench_ndimage.py --shape 512 2048 2048 --memory-limit 2GiB
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import psutil

# Bytes per voxel scipy needs, measured with tracemalloc on (64, 256, 256) bool:
# label ~5 (+ the input), distance_transform_edt ~49.
_SCIPY_BYTES = {"label": 6, "distance_transform_edt": 50}


def make_volume(path: str, shape: tuple[int, ...], rows: int, seed: int = 0) -> None:
    """Write a binary blob volume to a Zarr array, ``rows`` planes per chunk."""
    import scipy.ndimage as ndi
    import zarr

    z = zarr.create_array(path, shape=shape, chunks=(rows, *shape[1:]), dtype="u1")
    rng = np.random.default_rng(seed)
    for a in range(0, shape[0], rows):
        b = min(shape[0], a + rows)
        noise = rng.random((b - a, *shape[1:]), dtype=np.float32)
        smooth = ndi.gaussian_filter(noise, 1.5)
        z[a:b] = smooth > 0.5


def fmt(n: float) -> str:
    from dask_sweep.utils import format_bytes

    return format_bytes(int(n))


def run(name: str, fn: Callable[[], object]) -> tuple[float, int, object]:
    from dask_sweep.diagnostics import PeakRSS

    with PeakRSS() as rss:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
    return dt, rss.peak_above_baseline, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 256, 256])
    parser.add_argument("--memory-limit", default="64MiB")
    parser.add_argument("--chunk-rows", type=int, default=4, help="Zarr chunk rows (axis 0)")
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--no-scipy", action="store_true", help="skip the in-memory scipy run")
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["dask_sweep", "dsl"],
        help="dask_sweep: the ndimage functions on a dask array; dsl: the DSL's algorithms",
    )
    args = parser.parse_args(argv)

    import dask
    import dask.array as da
    import scipy.ndimage as ndi

    from dask_sweep import dsl
    from dask_sweep.config import parse_bytes
    from dask_sweep.io import read_zarr, track
    from dask_sweep.ndimage import distance_transform_edt, label, plan_edt, plan_label

    shape = tuple(args.shape)
    budget = parse_bytes(args.memory_limit)
    with tempfile.TemporaryDirectory(prefix="bench-ndimage-") as tmp:
        path = os.path.join(tmp, "vol.zarr")
        make_volume(path, shape, args.chunk_rows)
        x = read_zarr(path)
        nbytes = x.nbytes
        print(
            f"volume {shape} uint8 = {fmt(nbytes)}, zarr chunks of {args.chunk_rows} rows; "
            f"budget {fmt(budget)}; scheduler {args.scheduler}"
        )

        def sweep_label():
            lab, n = label(x, np.ones((3,) * len(shape)), memory_limit=budget)
            # Reduce instead of holding the output: memory is then the sweep's own.
            s, c = dask.compute(lab.max(), n, scheduler=args.scheduler)
            return int(c)

        def sweep_edt():
            d = distance_transform_edt(x, memory_limit=budget)
            return float(dask.compute(d.max(), scheduler=args.scheduler)[0])

        full = np.ones((3,) * len(shape))

        def dsl_label():
            lab, n = dsl.label(dsl.source(path), full)
            r = dsl.run(dsl.max(lab), n, memory_limit=budget)  # labels reduced, not held
            return r

        def dsl_edt():
            return dsl.run(
                dsl.max(dsl.distance_transform_edt(dsl.source(path))), memory_limit=budget
            )

        def dsl_pipeline():
            # denoise -> Otsu threshold -> label: histogram pass, table pass, relabel pass
            g = dsl.source(path).astype(np.float32).gaussian(1.0)
            lab, n = dsl.label(g > dsl.otsu(g), full)
            return dsl.run(dsl.max(lab), n, memory_limit=budget)

        dsl_cases = [
            ("label", dsl_label, lambda r: r.values[1]),
            ("distance_transform_edt", dsl_edt, lambda r: r.value),
            ("gaussian>otsu->label", dsl_pipeline, lambda r: r.values[1]),
        ]
        cases = [
            (
                "label",
                sweep_label,
                plan_label(x, np.ones((3,) * len(shape)), memory_limit=budget),
                lambda m: ndi.label(m, np.ones((3,) * len(shape)))[1],
            ),
            (
                "distance_transform_edt",
                sweep_edt,
                plan_edt(x, memory_limit=budget),
                lambda m: float(ndi.distance_transform_edt(m).max()),
            ),
        ]
        # Warm up (numba compilation, imports) so that neither time nor RSS counts it.
        tiny = np.ones((4,) * len(shape), dtype="u1")
        tiny[0] = 0
        tiny_x = da.from_array(tiny, chunks=1)  # several slabs: the face kernel too
        label(tiny_x, np.ones((3,) * len(shape)))[0].compute()
        label(tiny)[0].compute()
        distance_transform_edt(tiny).compute()
        dsl.run(dsl.label(dsl.source(tiny), full)[0], target_slab_bytes=tiny[0].nbytes)
        dsl.run(dsl.distance_transform_edt(dsl.source(tiny)), target_slab_bytes=tiny[0].nbytes)
        ndi.label(tiny)
        ndi.distance_transform_edt(tiny)
        voxels = int(np.prod(shape))
        room = psutil.virtual_memory().available
        print(
            f"{'function':<24}{'engine':<12}{'wall s':>8}{'peak RSS':>12}{'budget':>12}"
            f"{'read/input':>12}{'passes':>8}  result"
        )
        if "dsl" in args.engines:
            for name, fn, value in dsl_cases:
                with track() as stats:
                    dt, peak, r = run(name, fn)
                ratio = stats.sources[os.path.abspath(path)].bytes_read / nbytes
                rep = r.report
                print(
                    f"{name:<24}{'dsl':<12}{dt:8.2f}{fmt(peak):>12}{fmt(budget):>12}"
                    f"{ratio:12.2f}{rep.passes:8d}  {value(r)}"
                    f"   (projected peak {fmt(rep.peak_projected)}, "
                    f"{fmt(stats.bytes_written)} written)"
                )
        for name, fn, plan, ref in cases:
            if "dask_sweep" not in args.engines:
                break
            with track() as stats:
                dt, peak, out = run(name, fn)
            # The input's own counter: spilled boundary planes are reported separately.
            ratio = stats.sources[os.path.abspath(path)].bytes_read / nbytes
            print(
                f"{name:<24}{'dask_sweep':<12}{dt:8.2f}{fmt(peak):>12}{fmt(budget):>12}"
                f"{ratio:12.2f}{len(plan.passes):8d}  {out}"
                f"   (projected peak {fmt(plan.projected_peak)}, {len(plan.slabs)} slabs, "
                f"{fmt(stats.bytes_written)} written)"
            )
            need = voxels * (_SCIPY_BYTES[name] + 1)
            if args.no_scipy or need > 0.8 * room:
                print(f"{name:<24}{'scipy':<12}{'skipped: needs ~' + fmt(need):>40}")
                continue
            m = da.from_zarr(path).compute() != 0
            dt2, peak2, out2 = run(name, lambda m=m, ref=ref: ref(m))
            del m
            print(
                f"{name:<24}{'scipy':<12}{dt2:8.2f}{fmt(peak2):>12}{'-':>12}{'1.00':>12}"
                f"{1:8d}  {out2}   (speed ratio sweep/scipy {dt / dt2:.2f}, "
                f"same result: {out == out2})"
            )


if __name__ == "__main__":
    main()
