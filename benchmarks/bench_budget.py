"""Benchmark: is the budget kept?  Random user pipelines, each in a fresh process.

Every case draws a pipeline as users write it (:mod:`dask_sweep.testing.pipelines`:
dask-image filters and binary morphology, ``where``, casts, an opaque
``map_overlap``, xarray's rolling mean; one to four stages), an input layout (Zarr
in one-plane, 8-plane, 16 x 64² or 32 x 128 x 256 chunks; uint8, uint16, float32), a
budget and output chunks, and stores the result with ``da.store`` under
``dask_sweep.enable(memory_limit=..., fallback="warn")`` on the threaded or the
synchronous scheduler.  Printed per case: peak resident growth ÷ budget (the kernel's
high-water mark, reset at the start), whether the sweep ran or fell back to stock
dask (a warned fallback keeps no budget), and the wall time; at the end the largest
ratio among the swept cases.  The exit status is 1 when a swept case grew past its
budget.

::

    python benchmarks/bench_budget.py                          # 40 cases, seed 1
    python benchmarks/bench_budget.py --cases 200 --seed 7 --size 64 256 256
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

MiB = 1 << 20
CHUNKS = ((1, None, None), (8, None, None), (16, 64, 64), (32, 128, None))
OUT_CHUNKS = ((8, None, None), (1, None, None), (16, 128, 128))


def _fit(chunks, shape) -> tuple[int, ...]:
    """``chunks`` with ``None`` (the whole axis) filled in and nothing beyond ``shape``."""
    return tuple(min(n, c or n) for c, n in zip(chunks, shape))


def run_case(spec: dict) -> dict:
    """One case in this (fresh) process."""
    import gc
    import warnings

    import dask
    import dask.array as da
    import distributed  # noqa: F401  (dask imports it at the first compute: not measured)
    import zarr

    import dask_sweep
    from dask_sweep.diagnostics import PeakRSS
    from dask_sweep.testing.pipelines import build

    x = da.from_zarr(spec["src"])
    y = build(x, spec["stages"])
    shutil.rmtree(spec["dst"], ignore_errors=True)
    z = zarr.create_array(spec["dst"], shape=y.shape, chunks=_fit(spec["out_chunks"], y.shape),
                          dtype=y.dtype, compressors=None)
    with dask_sweep.enable(memory_limit=spec["budget"], fallback="warn"):
        store = da.store(y, z, lock=False, compute=False)
        swept = "nothing swept" not in str(dask_sweep.explain(store))
        gc.collect()
        with warnings.catch_warnings(record=True) as caught, PeakRSS() as m:
            warnings.simplefilter("always")
            dask.compute(store, scheduler=spec["scheduler"])
    fell = any("Falling back" in str(w.message) for w in caught)
    return {"growth": m.peak_above_baseline, "swept": swept and not fell, "wall": m.wall}


def _volume(path: str, shape, dtype: str, chunks) -> None:
    import numpy as np
    import zarr

    if os.path.exists(path):
        return
    v = np.random.default_rng(0).random(shape)
    v = (v * 255).astype(dtype) if dtype[0] == "u" else v.astype(dtype)
    zarr.create_array(path, shape=shape, chunks=_fit(chunks, shape), dtype=dtype,
                      compressors=None)[:] = v


def main(argv: list[str] | None = None) -> int:
    from dask.utils import parse_bytes

    from dask_sweep.testing.pipelines import STAGES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, nargs=3, default=(64, 256, 256))
    ap.add_argument("--budgets", nargs="+", default=["4MiB", "6MiB", "8MiB", "12MiB", "16MiB",
                                                      "24MiB", "32MiB"])
    ap.add_argument("--workdir")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(run_case(json.loads(a._worker))))
        return 0
    rnd = random.Random(a.seed)
    tmp = a.workdir or tempfile.mkdtemp(prefix="dask-sweep-budget-")
    worst, over = 0.0, 0
    print(f"{'growth÷budget':>13}  {'ran':<9} {'wall':>6}  case")
    try:
        for _ in range(a.cases):
            dtype = rnd.choice(["u1", "u2", "f4"])
            chunks = rnd.choice(CHUNKS)
            src = os.path.join(tmp, f"in-{dtype}-{'x'.join(map(str, _fit(chunks, a.size)))}.zarr")
            _volume(src, tuple(a.size), dtype, chunks)
            spec = {"src": src, "dst": os.path.join(tmp, "out.zarr"),
                    "stages": [(rnd.choice(STAGES), rnd.randint(0, 100))
                               for _ in range(rnd.randint(1, 4))],
                    "budget": rnd.choice(a.budgets), "out_chunks": rnd.choice(OUT_CHUNKS),
                    "scheduler": rnd.choice(["threads", "sync"])}
            p = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)],
                               capture_output=True, text=True)
            case = (f"{dtype} {_fit(chunks, a.size)} {spec['stages']} at {spec['budget']}, "
                    f"out {_fit(spec['out_chunks'], a.size)}, {spec['scheduler']}")
            if p.returncode:
                print(f"{'error':>13}  {'':<9} {'':>6}  {case}: "
                      f"{p.stderr.strip().splitlines()[-1][:200]}", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            ratio = r["growth"] / parse_bytes(spec["budget"])
            if r["swept"]:
                worst = max(worst, ratio)
                over += ratio > 1
            ran = "sweep" if r["swept"] else "fell back"
            print(f"{ratio:13.2f}  {ran:<9} {r['wall']:5.1f}s  {case}"
                  + ("  OVER THE BUDGET" if r["swept"] and ratio > 1 else ""), flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"largest growth÷budget of a swept case: {worst:.2f}; over the budget: {over}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
