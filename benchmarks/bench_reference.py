"""Benchmark: the pipeline users run, at any size and layout, swept vs stock dask vs scipy.

Pipeline (unchanged dask-image user code): ``gaussian_filter(x, 2) → > 128 →
binary_opening(3×3×3) → where(mask, smoothed, 0) → uniform_filter(5)``, read
from the input and written with ``da.store`` to a Zarr array.  Layouts:

* ``slab``: Zarr, one plane per chunk (a slice stack);
* ``cube``: Zarr, 128³ chunks;
* ``tiff``: a folder of 2-D TIFFs, one per plane (read with ``dask_sweep.io.imread``).

Each run is a fresh process.  Printed per layout, measured side by side:

* scipy in memory: the CPU of running each stage once (the floor no chunked
  scheme beats; ÷ the cores it is the *compute lower bound* of the wall time);
* stock dask (threads) and dask_sweep at ``--memory-limit``: wall ÷ lower bound,
  CPU ÷ scipy once, peak resident growth ÷ budget (the kernel's high-water
  mark, reset at the start), bytes read ÷ input bytes, and the plan's floor.

::

    python benchmarks/bench_reference.py                                  # small
    python benchmarks/bench_reference.py --shape 256 2048 2048 --memory-limit 1GiB
    python benchmarks/bench_reference.py --shape 256 2048 2048 --memory-limit 192MiB \
        --layouts slab tiff --modes sweep
    python benchmarks/bench_reference.py --shape 256 2048 2048 --memory-limit 192MiB \
        --layouts slab --modes sweep --out-chunks 128 128 128 --out-codec zstd

``--out-chunks`` / ``--out-codec`` set the output's chunks and codec (default: the
layout's chunks, uncompressed): deep zstd chunks on a slab input are staged on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

STAGES = ("gaussian", "threshold", "opening", "where", "uniform")


def make_volume(layout: str, path: str, shape, seed: int = 0) -> None:
    """Write a smooth random uint8 volume (blobs and noise) in ``layout``, slab by slab."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    z = None
    if layout in ("slab", "cube"):
        import zarr

        chunks = (1, *shape[1:]) if layout == "slab" else tuple(min(128, s) for s in shape)
        z = zarr.create_array(path, shape=shape, chunks=chunks, dtype="u1",
                              compressors=None, fill_value=0)
    else:
        os.makedirs(path)
    step = 16
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        v = (ndi.uniform_filter(rng.random((b - a, *shape[1:]), dtype=np.float32), 3) * 255)
        v = v.astype("u1")
        if z is not None:
            z[a:b] = v
        else:
            import tifffile

            for k in range(b - a):
                tifffile.imwrite(os.path.join(path, f"z{a + k:05d}.tif"), v[k])


def pipeline(x):
    """The reference pipeline, as users write it with dask-image."""
    import dask.array as da
    from dask_image import ndfilters, ndmorph

    g = ndfilters.gaussian_filter(x, 2)
    m = g > 128
    o = ndmorph.binary_opening(m, structure=np.ones((3, 3, 3), bool))
    return ndfilters.uniform_filter(da.where(o, g, 0), 5)


def _open(layout: str, path: str, counted: bool):
    import dask.array as da

    if layout == "tiff":
        from dask_sweep.io import imread

        return imread(os.path.join(path, "*.tif"))
    if not counted:
        return da.from_zarr(path)  # as users write it (the sweep reports its own reads)
    import zarr
    from zarr.storage import LocalStore

    from dask_sweep.io.stores import CountingStore

    # counted, so that stock dask's bytes read compare with the input's bytes
    return da.from_zarr(zarr.open_array(CountingStore(LocalStore(path, read_only=True)),
                                        mode="r"))


def _input_bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path)
               for f in names if f != "zarr.json")


def run_one(layout: str, src: str, dst: str, mode: str, budget: str, out_chunks: str = "",
            codec: str = "raw") -> dict:
    """One measurement in this (fresh) process; ``out_chunks`` ("d,y,x") and ``codec``
    ("raw" or zarr's default, "zstd") of the output, else the layout's chunks, raw."""
    # dask imports distributed at its first compute (to look for a client): a one-time
    # cost of the process, paid here, before any clock starts, by every mode alike
    import dask.array as da
    import distributed  # noqa: F401
    import scipy.ndimage as ndi
    import zarr

    from dask_sweep.diagnostics import PeakRSS
    from dask_sweep.io import track

    x = _open(layout, src, counted=mode == "stock")
    chunks = (1, *x.shape[1:]) if layout != "cube" else tuple(min(128, s) for s in x.shape)
    if out_chunks:
        chunks = tuple(min(int(c), s) for c, s in zip(out_chunks.split(","), x.shape))
    kw = {"compressors": None} if codec == "raw" else {}
    out = zarr.create_array(dst, shape=x.shape, chunks=chunks, dtype="u1", overwrite=True,
                            fill_value=0, **kw)
    res = {"mode": mode, "layout": layout, "input_bytes": int(np.prod(x.shape))}
    if mode == "scipy":
        import time

        with PeakRSS() as m:
            v = np.asarray(x.compute(scheduler="sync"))
            cpu = {}
            t = time.process_time()
            g = ndi.gaussian_filter(v, 2)
            cpu["gaussian"] = time.process_time() - t
            t = time.process_time()
            mk = g > 128
            cpu["threshold"] = time.process_time() - t
            t = time.process_time()
            o = ndi.binary_opening(mk, structure=np.ones((3, 3, 3), bool))
            cpu["opening"] = time.process_time() - t
            t = time.process_time()
            w = np.where(o, g, 0)
            cpu["where"] = time.process_time() - t
            t = time.process_time()
            u = ndi.uniform_filter(w, 5)
            cpu["uniform"] = time.process_time() - t
            out[:] = u
        res["stage_cpu"] = cpu
        res["bytes_read"] = res["input_bytes"]
    else:
        y = pipeline(x)
        if mode == "sweep":
            import dask_sweep

            with dask_sweep.enable(memory_limit=budget, fallback="raise") as p:
                e = dask_sweep.explain(da.store(y, out, compute=False))
                res["explain"] = str(e)
                res["floor"] = e.floors()[0] if e.floors() else None
                res["memory_limit"] = p.settings().memory_limit
                with track() as io, PeakRSS() as m:
                    da.store(y, out)
        else:
            with track() as io, PeakRSS() as m:
                da.store(y, out)
        res["bytes_read"] = io.bytes_read
    res.update(wall=m.wall, cpu=m.cpu, peak=m.peak_above_baseline)
    res["checksum"] = int(np.asarray(out[:], dtype=np.uint64).sum())
    return res


def _spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_worker", *args], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"run {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(n) -> str:
    from dask_sweep.utils import format_bytes

    return format_bytes(n) if n is not None else "-"


def compare(shape, layouts, modes, budget: str, workdir: str | None, show_plan: bool,
            out: tuple[str, str] = ("", "raw")) -> list:
    """Run every mode on every layout, print the ratios, return the rows (``out``: the
    output's chunks and codec, see :func:`run_one`)."""
    from dask_sweep.config import parse_bytes

    tmp = workdir or tempfile.mkdtemp(prefix="dask-sweep-ref-")
    cores = os.cpu_count() or 1
    rows = []
    try:
        for layout in layouts:
            src = os.path.join(tmp, f"in-{layout}")
            if not os.path.exists(src):
                make_volume(layout, src, shape)
            base = _spawn([layout, src, os.path.join(tmp, "o-scipy.zarr"), "scipy", budget,
                           *out])
            once = sum(base["stage_cpu"].values())
            bound = once / cores
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in base["stage_cpu"].items())
            print(f"\n== {layout}: volume {tuple(shape)} uint8 ({_fmt(base['input_bytes'])}), "
                  f"budget {budget}; scipy once: CPU {once:.1f}s ({stages}); "
                  f"lower bound {bound:.1f}s on {cores} cores; scipy in memory wall "
                  f"{base['wall']:.1f}s, peak {_fmt(base['peak'])}")
            print(f"   {'':6} {'wall':>8} {'÷bound':>7} {'CPU':>8} {'÷once':>6} "
                  f"{'peak':>11} {'÷budget':>8} {'read÷in':>8} {'floor':>11} same")
            for mode in modes:
                r = _spawn([layout, src, os.path.join(tmp, f"o-{mode}.zarr"), mode, budget,
                            *out])
                r["layout"] = layout
                if show_plan and mode == "sweep":
                    print(r["explain"])
                same = r["checksum"] == base["checksum"]
                print(f"   {mode:<6} {r['wall']:7.1f}s {r['wall'] / bound:7.2f} "
                      f"{r['cpu']:7.1f}s {r['cpu'] / once:6.2f} {_fmt(r['peak']):>11} "
                      f"{r['peak'] / parse_bytes(budget):8.2f} "
                      f"{r['bytes_read'] / r['input_bytes']:8.2f} {_fmt(r.get('floor')):>11} "
                      f"{same}")
                r.update(bound=bound, scipy_once=once)
                rows.append(r)
            rows.append(base)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 256, 256])
    ap.add_argument("--layouts", nargs="+", default=["slab", "cube", "tiff"],
                    choices=["slab", "cube", "tiff"])
    ap.add_argument("--modes", nargs="+", default=["stock", "sweep"], choices=["stock", "sweep"])
    ap.add_argument("--memory-limit", default="64MiB")
    ap.add_argument("--workdir", default=None, help="keep volumes here (default: a temp dir)")
    ap.add_argument("--no-plan", action="store_true", help="do not print the sweep's plan")
    ap.add_argument("--out-chunks", type=int, nargs=3, default=None,
                    help="the output's chunks (default: the layout's), e.g. 128 128 128")
    ap.add_argument("--out-codec", default="raw", choices=["raw", "zstd"],
                    help="the output's codec: none, or zarr's default (zstd)")
    ap.add_argument("--_worker", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(run_one(*a._worker)))
        return 0
    out = (",".join(map(str, a.out_chunks)) if a.out_chunks else "", a.out_codec)
    compare(a.shape, a.layouts, a.modes, a.memory_limit, a.workdir, not a.no_plan, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
