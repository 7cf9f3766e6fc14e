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

``--vs-scipy`` runs the label matrix instead: n³ uint8 volumes (smooth noise,
thresholded at the middle: ~50 % foreground, many components) stored as Zarr
in 64³ chunks and as TIFF stacks (one file per plane), labelled read -> label
-> write (int32, uncompressed Zarr or one TIFF per plane) by scipy in memory
and by the sweep (``ndimage.label`` on ``imread(...) > t``, and
``dsl.label(dsl.source(path) > t)``) at ``--budget-fraction`` of the input
bytes, each measurement in a fresh process; printed: wall times and their
ratio, peak resident growth ÷ budget, bytes read ÷ input, same labels
(``--runtime-overhead`` sets ``sweep.runtime-overhead`` for the swept runs;
``--repeat N`` alternates N runs of each and prints the fastest, with the
largest peak: on a shared machine single runs vary by 2x)::

    python benchmarks/bench_ndimage.py --vs-scipy --sizes 256 512
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


# --------------------------------------------------------------------------- --vs-scipy

_STRUCTURES = {"default": None, "full": "ones"}


def make_stack_volume(layout: str, path: str, n: int, seed: int = 0) -> None:
    """A smooth random ``n``³ uint8 volume, as Zarr (64³ chunks) or one TIFF per plane."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    z = None
    if layout == "zarr":
        import zarr

        z = zarr.create_array(path, shape=(n,) * 3, chunks=(64,) * 3, dtype="u1",
                              compressors=None, fill_value=0)
    else:
        os.makedirs(path)
    for a in range(0, n, 64):
        b = min(n, a + 64)
        v = ndi.gaussian_filter(rng.random((b - a, n, n), dtype=np.float32), 1.5)
        v = (np.clip((v - 0.5) * 6 + 0.5, 0, 1) * 255).astype("u1")
        if z is not None:
            z[a:b] = v
        else:
            import tifffile

            for k in range(b - a):
                tifffile.imwrite(os.path.join(path, f"z{k + a:05d}.tif"), v[k])


class PlaneFiles:
    """A ``da.store`` target writing each plane to its own TIFF file (both sides use it)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype) -> None:
        os.makedirs(path, exist_ok=True)
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.ndim = len(shape)

    def __setitem__(self, idx, value) -> None:
        import tifffile

        rows = idx[0] if isinstance(idx, tuple) else idx
        a = rows.start or 0
        for k in range(value.shape[0]):
            tifffile.imwrite(os.path.join(self.path, f"z{a + k:05d}.tif"), value[k])


def _target(layout: str, dst: str, shape, rows: int):
    if layout == "tiff":
        return PlaneFiles(dst, shape, np.int32)
    import zarr

    return zarr.create_array(dst, shape=shape, chunks=(rows, *shape[1:]), dtype=np.int32,
                             compressors=None, fill_value=0, overwrite=True)


def _digest(layout: str, dst: str) -> str:
    import glob
    import hashlib

    h = hashlib.sha1()
    if layout == "zarr":
        import zarr

        z = zarr.open_array(dst, mode="r")
        for a in range(0, z.shape[0], 16):
            h.update(np.ascontiguousarray(z[a : a + 16], dtype=np.int32).tobytes())
    else:
        import tifffile

        for f in sorted(glob.glob(os.path.join(dst, "*.tif"))):
            h.update(np.ascontiguousarray(tifffile.imread(f), dtype=np.int32).tobytes())
    return h.hexdigest()[:12]


def run_label_one(layout: str, src: str, dst: str, mode: str, structure: str,
                  budget: int) -> dict:
    """One measurement of read -> label -> write, in this (fresh) process."""
    import shutil

    import dask
    import scipy.ndimage as ndi

    from dask_sweep.diagnostics import PeakRSS

    shutil.rmtree(dst, ignore_errors=True)
    st = None if structure == "default" else np.ones((3, 3, 3), bool)
    t = 127
    read = nbytes = 0
    n = None
    if mode == "scipy":
        import glob

        import tifffile
        import zarr

        ndi.label(np.ones((2, 2, 2), bool), st)
        with PeakRSS() as m:
            if layout == "zarr":
                v = zarr.open_array(src, mode="r")[:]
            else:
                files = sorted(glob.glob(os.path.join(src, "*.tif")))
                v = np.stack([tifffile.imread(f) for f in files])
            lab, n = ndi.label(v > t, st)
            del v
            _target(layout, dst, lab.shape, 64)[:] = lab
    else:
        from dask_sweep import dsl
        from dask_sweep.io import imread, track
        from dask_sweep.ndimage import label, plan_label

        x = imread(src if layout == "zarr" else os.path.join(src, "*.tif"))
        nbytes = int(x.nbytes)
        tiny = np.ones((4, 4, 4), bool)
        tiny[1] = 0
        label(tiny, st)[0].compute()  # numba, cc3d: compiled / imported outside the run
        with dask.config.set({"sweep.memory-limit": budget}):
            if mode == "sweep":
                lab, num = label(x > t, st)
                rows = lab.chunks[0][0]
                plan = plan_label(x > t, st)
            else:
                dsl.run(dsl.label(dsl.source(tiny), st)[0], target_slab_bytes=16)
                lab_s, num_s = dsl.label(dsl.source(src) > t, st)  # read by dask_sweep.io
                rows = 1
            with track() as io, PeakRSS() as m:
                tgt = _target(layout, dst, x.shape, rows)
                if mode == "sweep":
                    import dask.array as da

                    # regular slabs (the last may be shorter) line up with the chunks
                    lock = len(set(lab.chunks[0][:-1])) > 1
                    _, n = dask.compute(da.store(lab, tgt, lock=lock, compute=False), num)
                else:
                    n = dsl.run(lab_s.to(tgt), num_s).values[1]
            read = io.bytes_read
        if mode == "sweep":
            extra = {"slabs": len(plan.slabs), "projected": plan.projected_peak}
    out = {"wall": m.wall, "cpu": m.cpu, "peak": m.peak_above_baseline, "bytes_read": read,
           "input_bytes": nbytes, "n": int(n), "digest": _digest(layout, dst)}
    if mode == "sweep":
        out.update(extra)
    return out


def _spawn(args: list[str], env: dict | None = None) -> dict:
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, __file__, "--_worker", *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs; its peak is the largest of them, ``same`` must hold
    for all (a failed run is reported as such)."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    out = dict(min(runs, key=lambda r: r["wall"]))
    out["peak"] = max(r["peak"] for r in runs)
    out["walls"] = [r["wall"] for r in runs]
    if len({(r["digest"], r["n"]) for r in runs}) > 1:
        out["digest"] = "differs between runs"
    return out


def vs_scipy(sizes, layouts, structures, modes, fraction: float, workdir: str | None,
             overhead: str | None = None, repeat: int = 1) -> list:
    import shutil

    tmp = workdir or tempfile.mkdtemp(prefix="bench-label-")
    rows = []
    try:
        print(f"{'case':<30} {'engine':<6} {'scipy s':>8} {'sweep s':>8} {'ratio':>6} "
              f"{'peak÷budget':>11} {'read÷in':>7}  same  (budget = {fraction:g} x input)")
        for n in sizes:
            budget = max(1, int(n**3 * fraction))
            for layout in layouts:
                src = os.path.join(tmp, f"in-{layout}-{n}")
                if not os.path.exists(src):
                    make_stack_volume(layout, src, n)
                dst = os.path.join(tmp, "out")
                for structure in structures:
                    env = {} if overhead is None else {"DASK_SWEEP__RUNTIME_OVERHEAD": overhead}
                    runs: dict = {m: [] for m in ("scipy", *modes)}
                    for _ in range(repeat):  # alternating, so both see the same machine
                        for mode in runs:
                            runs[mode].append(_spawn(
                                [layout, src, dst, mode, structure, str(budget)],
                                None if mode == "scipy" else env))
                    base = _best(runs["scipy"])
                    for mode in modes:
                        sw = _best(runs[mode])
                        case = f"label {structure} {n}^3 {layout} {fmt(budget)}"
                        if "error" in sw or "error" in base:
                            print(f"{case:<30} {mode:<6} {sw.get('error', base.get('error'))}")
                            continue
                        same = sw["digest"] == base["digest"] and sw["n"] == base["n"]
                        print(f"{case:<30} {mode:<6} {base['wall']:8.2f} {sw['wall']:8.2f} "
                              f"{sw['wall'] / base['wall']:6.2f} {sw['peak'] / budget:11.2f} "
                              f"{sw['bytes_read'] / max(1, sw['input_bytes']):7.2f}  {same}"
                              f"  (scipy peak {fmt(base['peak'])}, {base['n']} labels"
                              + (f", {sw['slabs']} slabs" if "slabs" in sw else "") + ")",
                              flush=True)
                        rows.append({"case": case, "mode": mode, "scipy": base, "sweep": sw,
                                     "same": same})
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


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
    parser.add_argument("--vs-scipy", action="store_true",
                        help="the label matrix vs scipy in memory (see the module docstring)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--layouts", nargs="+", default=["zarr", "tiff"],
                        choices=["zarr", "tiff"])
    parser.add_argument("--structures", nargs="+", default=["default", "full"],
                        choices=list(_STRUCTURES))
    parser.add_argument("--modes", nargs="+", default=["sweep", "dsl"],
                        choices=["sweep", "dsl"])
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each engine, alternating; the fastest is printed, "
                             "with the largest peak")
    parser.add_argument("--runtime-overhead", default=None,
                        help="sweep.runtime-overhead for the swept runs (default: the setting)")
    parser.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        import json

        a = args._worker
        print(json.dumps(run_label_one(a[0], a[1], a[2], a[3], a[4], int(a[5]))))
        return
    if args.vs_scipy:
        vs_scipy(args.sizes, args.layouts, args.structures, args.modes, args.budget_fraction,
                 args.workdir, args.runtime_overhead, args.repeat)
        return

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
