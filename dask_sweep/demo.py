"""The main job: a 3-stage windowed pipeline on a generated Zarr volume, stock dask
next to dask_sweep, each in a fresh process, with the figures that matter as ratios.

Pipeline (as users write it): gaussian σ=2 → grey erosion 3 → uniform 5, either as
``map_overlap`` calls on scipy.ndimage functions or as dask-image calls, read with
``da.from_zarr`` and written with ``to_zarr``.  Measured per run: wall time, CPU
time, peak RSS above the interpreter's baseline, bytes read from the input store
÷ input bytes; and, once, the CPU of the same scipy stages run once over the
volume in memory (the floor no blocked scheme can beat).
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

from dask_sweep.utils import format_bytes as _fmt_bytes


def make_volume(path: str, shape, chunks, seed: int = 0) -> None:
    """Write a smooth random uint8 volume (blobs + noise) to a Zarr array, slab by slab."""
    import scipy.ndimage as ndi
    import zarr

    # uncompressed, so that bytes read from the store compare directly with input bytes
    z = zarr.create_array(path, shape=shape, chunks=chunks, dtype="u1", overwrite=True,
                          compressors=None)
    rng = np.random.default_rng(seed)
    step = chunks[0]
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        noise = rng.random((b - a, *shape[1:]), dtype=np.float32)
        z[a:b] = (ndi.uniform_filter(noise, 3) * 255).astype("u1")


def pipeline(x, api: str):
    """The 3-stage chain on dask array ``x`` (``api``: 'map_overlap' or 'dask-image')."""
    import scipy.ndimage as ndi

    if api == "dask-image":
        from dask_image import ndfilters, ndmorph  # noqa: F401

        y = ndfilters.gaussian_filter(x, 2)
        y = ndfilters.minimum_filter(y, size=3)  # grey erosion with a 3-cube
        return ndfilters.uniform_filter(y, 5)
    y = x.map_overlap(ndi.gaussian_filter, depth=8, sigma=2, boundary="none")
    y = y.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="none")
    return y.map_overlap(ndi.uniform_filter, depth=2, size=5, boundary="none")


def run_one(src: str, dst: str, mode: str, api: str, memory_limit: str, scheduler: str) -> dict:
    """Run the pipeline once in this process and return its measurements."""
    import dask
    import dask.array as da
    import zarr
    from zarr.storage import LocalStore

    from dask_sweep.diagnostics import PeakRSS
    from dask_sweep.io.stores import CountingStore

    store = CountingStore(LocalStore(src, read_only=True))
    zin = zarr.open_array(store, mode="r")
    x = da.from_zarr(zin)
    y = pipeline(x, api)
    out = zarr.create_array(dst, shape=y.shape, chunks=zin.chunks, dtype=y.dtype, overwrite=True)
    res = {"mode": mode, "api": api, "chunks": list(zin.chunks)}
    if mode == "scipy":
        import scipy.ndimage as ndi

        with PeakRSS() as m:
            v = zin[:]
            v = ndi.gaussian_filter(v, 2)
            v = ndi.grey_erosion(v, size=3)
            v = ndi.uniform_filter(v, 5)
            out[:] = v
    elif mode == "stock":
        with PeakRSS() as m:
            y.to_zarr(out, scheduler=scheduler)
    else:
        import dask_sweep

        with dask_sweep.enable(memory_limit=memory_limit, fallback="raise") as p:
            res["explain"] = str(dask_sweep.explain(y.to_zarr(out, compute=False)))
            res["memory_limit"] = p.settings().memory_limit
            with PeakRSS() as m:
                y.to_zarr(out, scheduler=scheduler)
    # zarr stores edge chunks whole (padded): what one read of every chunk costs
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(src)
                 for f in names if f != "zarr.json")
    res.update(wall=m.wall, cpu=m.cpu, peak_rss=m.peak_above_baseline,
               bytes_read=store.bytes_read, input_bytes=int(np.prod(zin.shape)) * zin.dtype.itemsize,
               stored_bytes=stored)
    with dask.config.set(scheduler="sync"):
        res["checksum"] = int(np.asarray(out[:], dtype=np.uint64).sum())
    return res


def _spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "dask_sweep.demo", "--_worker", *args],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"run {args[2:]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(shape=(128, 512, 512), layouts=("slab", "cube"), apis=("map_overlap",),
            memory_limit: str = "64MiB", scheduler: str = "threads", workdir: str | None = None,
            show_plan: bool = True) -> list[dict]:
    """Run stock dask and dask_sweep side by side for each layout and print ratios."""
    tmp = workdir or tempfile.mkdtemp(prefix="dask-sweep-demo-")
    rows = []
    try:
        for layout in layouts:
            if layout == "slab":
                chunks = (8, shape[1], shape[2])
            else:
                c = min(128, *shape)
                chunks = (min(64, shape[0]), c, c)
            src = os.path.join(tmp, f"in-{layout}.zarr")
            make_volume(src, shape, chunks)
            base = _spawn([src, os.path.join(tmp, "o-scipy.zarr"), "scipy", "map_overlap",
                           memory_limit, scheduler])
            print(f"\n== {layout} chunks {chunks}, volume {shape} uint8 "
                  f"({_fmt_bytes(base['input_bytes'])}); budget {memory_limit}; "
                  f"scheduler {scheduler}")
            print(f"   scipy in memory (1 core): wall {base['wall']:.2f}s, cpu {base['cpu']:.2f}s,"
                  f" peak {_fmt_bytes(base['peak_rss'])}")
            for api in apis:
                stock = _spawn([src, os.path.join(tmp, "o-stock.zarr"), "stock", api,
                                memory_limit, scheduler])
                sw = _spawn([src, os.path.join(tmp, "o-sweep.zarr"), "sweep", api,
                             memory_limit, scheduler])
                if show_plan:
                    print(sw["explain"])
                same = sw["checksum"] == stock["checksum"] == base["checksum"]
                floor = max(base["cpu"], 1e-9)
                for r in (stock, sw):
                    r["layout"] = layout
                    print(f"   {r['mode']:<5} {api:<11}: wall {r['wall']:6.2f}s  "
                          f"cpu {r['cpu']:6.2f}s ({r['cpu'] / floor:4.2f}x scipy once)  "
                          f"peak RSS {_fmt_bytes(r['peak_rss']):>10}  "
                          f"read {r['bytes_read'] / r['input_bytes']:5.2f}x input "
                          f"({r['bytes_read'] / r['stored_bytes']:4.2f}x the stored chunks)")
                print(f"   sweep / stock: wall {sw['wall'] / stock['wall']:.2f}x, "
                      f"cpu {sw['cpu'] / max(stock['cpu'], 1e-9):.2f}x, peak RSS "
                      f"{sw['peak_rss'] / max(1, stock['peak_rss']):.2f}x; sweep peak / budget "
                      f"{sw['peak_rss'] / sw['memory_limit']:.2f}; identical output: {same}")
                rows += [base, stock, sw]
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


DESCRIPTION = """\
The main job, side by side: a 3-stage windowed pipeline (gaussian sigma=2, grey
erosion 3, uniform 5) on a generated uint8 volume in a temporary Zarr store (no
downloads), run with stock dask and with dask_sweep, each in a fresh process, for
slab-shaped and cube-shaped chunks. Prints the plan (explain), then per run: wall
time, CPU time against the scipy stages run once in memory, peak RSS above the
interpreter's baseline against the budget, bytes read / input bytes, and whether
the outputs are identical."""


def main(argv: list[str] | None = None) -> int:
    """``dask-sweep demo [options]``: run :func:`compare` with the options given."""
    ap = argparse.ArgumentParser(
        prog="dask-sweep demo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The same job at any size: python benchmarks/bench_sweep.py --shape ...",
    )
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 512, 512], metavar=("Z", "Y", "X"),
                    help="shape of the generated volume (default: 96 512 512, 24 MiB)")
    ap.add_argument("--layouts", nargs="+", default=["slab", "cube"], choices=["slab", "cube"],
                    help="chunk layouts to run: slab (8 whole planes per chunk) and/or cube "
                    "(64 x 128 x 128 chunks); default: both")
    ap.add_argument("--apis", nargs="+", default=["map_overlap"],
                    choices=["map_overlap", "dask-image"],
                    help="how the pipeline is written: map_overlap calls on scipy.ndimage "
                    "and/or dask-image's ndfilters (default: map_overlap)")
    ap.add_argument("--memory-limit", default="64MiB", metavar="BYTES",
                    help="dask_sweep's memory budget (default: 64MiB)")
    ap.add_argument("--scheduler", default="threads", choices=["threads", "sync"],
                    help="dask scheduler of both runs (default: threads)")
    ap.add_argument("--workdir", default=None, metavar="DIR",
                    help="keep the generated volume and outputs in DIR (default: a temporary "
                    "folder, removed at the end)")
    ap.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        src, dst, mode, api, mem, sched = a._worker
        print(json.dumps(run_one(src, dst, mode, api, mem, sched)))
        return 0
    compare(tuple(a.shape), a.layouts, a.apis, a.memory_limit, a.scheduler, a.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
