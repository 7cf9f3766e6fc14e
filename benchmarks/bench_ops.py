"""Benchmark: the report's operations, swept vs scipy in memory, side by side in one run.

The operations of the StackProcessing report's own benchmark, written as users
write them (dask-image / dask_sweep.ndimage on a dask array), read from a Zarr
volume in 64³ chunks or from a TIFF stack (one file per plane) and written back
in the same layout (``--layouts``: ``zarr`` raw 64³ chunks, ``zarr-zstd`` the same
with zarr's default codec, ``slab-zstd`` one-plane chunks with it, ``tiff``):

=============  ====================================================================
copy           ``x``
threshold      ``(x > t).astype(x.dtype)``  (``t``: the middle of the value range)
uniform k      ``ndfilters.uniform_filter(x, k)``, k = 3, 5, 7
median r       ``ndfilters.median_filter(x, 2 r + 1)``, r = 1, 2, 3
dilation r     ``ndmorph.binary_dilation(x > t, ball(r)).astype("u1")``, r = 1, 2, 3
label          ``dask_sweep.ndimage.label(x > t)``
rolling5       ``xr.DataArray(x).rolling(z=5, center=True, min_periods=1).mean()``
               (xarray's default path; its reference is xarray on the numpy array)
=============  ====================================================================

The sweep runs at ``--budget-fraction`` of the volume's bytes (default 1/4).
"scipy in memory" reads the whole volume, runs the scipy function once, and
writes the result (one core, as scipy does).  Each run is a fresh process;
printed per case: both wall times and their ratio, the sweep's peak resident
growth ÷ budget (kernel high-water mark) and bytes read ÷ input bytes, and
whether the outputs are identical.  With ``--repeat N`` each side runs N times,
alternating (scipy first in the first pair, the sweep first in the next, and so on), and
the runs of median wall time are compared (the ratio's range and the largest peak are
printed too): a shared machine's wall times vary by tens of percent.

::

    python benchmarks/bench_ops.py                                     # CI-sized
    python benchmarks/bench_ops.py --sizes 256 512 --dtypes uint8 uint16 float32 \
        --layouts zarr tiff --ops copy threshold uniform3 median1 dilation1 label --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

OPS = ["copy", "threshold", "uniform3", "uniform5", "uniform7", "median1", "median2",
       "median3", "dilation1", "dilation2", "dilation3", "label", "rolling5"]


def ball(r: int) -> np.ndarray:
    """A 3-D ball of radius ``r`` (ITK's default structuring element)."""
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (g**2).sum(0) <= r * r


def threshold_of(dtype) -> float:
    dt = np.dtype(dtype)
    return float(np.iinfo(dt).max // 2) if dt.kind in "iu" else 0.5


#: Zarr layouts: chunks of a volume of side ``n`` and the codec (``None``: raw bytes;
#: ``"default"``: zarr's own, zstd, as ``to_zarr`` and ``create_array`` write by default).
ZARR_LAYOUTS = {
    "zarr": (lambda n: (64,) * 3, None),
    "zarr-zstd": (lambda n: (64,) * 3, "default"),
    "slab-zstd": (lambda n: (1, n, n), "default"),  # a slice stack converted to Zarr
}


def _zarr_array(layout: str, path: str, shape: tuple, dtype, overwrite: bool = False):
    import zarr

    chunks, codec = ZARR_LAYOUTS[layout]
    kw = {} if codec == "default" else {"compressors": None}
    return zarr.create_array(path, shape=shape, chunks=chunks(shape[1]), dtype=dtype,
                             fill_value=0, overwrite=overwrite, **kw)


def make_volume(layout: str, path: str, n: int, dtype: str, seed: int = 0) -> None:
    """A smooth random volume of ``n``³ in ``dtype``'s range (about half above the middle)."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    scale = float(np.iinfo(dt).max) if dt.kind in "iu" else 1.0
    z = None
    if layout in ZARR_LAYOUTS:
        z = _zarr_array(layout, path, (n,) * 3, dt)
    else:
        os.makedirs(path)
    for a in range(0, n, 64):
        b = min(n, a + 64)
        v = ndi.gaussian_filter(rng.random((b - a, n, n), dtype=np.float32), 1.5)
        v = np.clip((v - 0.5) * 6 + 0.5, 0, 1) * scale
        v = v.astype(dt)
        if z is not None:
            z[a:b] = v
        else:
            import tifffile

            for k in range(b - a):
                tifffile.imwrite(os.path.join(path, f"z{a + k:05d}.tif"), v[k])


def build(op: str, x):
    """The operation on dask array ``x``, as users write it."""
    from dask_image import ndfilters, ndmorph

    t = threshold_of(x.dtype)
    if op == "copy":
        return x
    if op == "threshold":
        return (x > t).astype(x.dtype)
    if op.startswith("uniform"):
        return ndfilters.uniform_filter(x, int(op[7:]))
    if op.startswith("median"):
        return ndfilters.median_filter(x, size=2 * int(op[6:]) + 1)
    if op.startswith("dilation"):  # stored as uint8 (TIFF has no booleans)
        return ndmorph.binary_dilation(x > t, structure=ball(int(op[8:]))).astype("u1")
    if op == "label":
        from dask_sweep.ndimage import label

        return label(x > t)[0]
    if op == "rolling5":
        return _rolling(x).data
    raise ValueError(op)


def _rolling(v):
    import xarray as xr

    return xr.DataArray(v, dims=("z", "y", "x")).rolling(z=5, center=True, min_periods=1).mean()


def scipy_op(op: str, v: np.ndarray) -> np.ndarray:
    import scipy.ndimage as ndi

    t = threshold_of(v.dtype)
    if op == "copy":
        return v
    if op == "threshold":
        return (v > t).astype(v.dtype)
    if op.startswith("uniform"):
        return ndi.uniform_filter(v, int(op[7:]))
    if op.startswith("median"):
        return ndi.median_filter(v, size=2 * int(op[6:]) + 1)
    if op.startswith("dilation"):
        return ndi.binary_dilation(v > t, structure=ball(int(op[8:]))).astype("u1")
    if op == "label":
        return ndi.label(v > t)[0]
    if op == "rolling5":
        return _rolling(v).values
    raise ValueError(op)


def _read_all(layout: str, src: str) -> np.ndarray:
    if layout in ZARR_LAYOUTS:
        import zarr

        return zarr.open_array(src, mode="r")[:]
    import glob

    import tifffile

    files = sorted(glob.glob(os.path.join(src, "*.tif")))
    return np.stack([tifffile.imread(f) for f in files])


def _write_all(layout: str, dst: str, v: np.ndarray) -> None:
    if layout in ZARR_LAYOUTS:
        _zarr_array(layout, dst, v.shape, v.dtype, overwrite=True)[:] = v
    else:
        import tifffile

        os.makedirs(dst, exist_ok=True)
        for k in range(v.shape[0]):
            tifffile.imwrite(os.path.join(dst, f"z{k:05d}.tif"), v[k])


def run_one(layout: str, src: str, dst: str, op: str, mode: str, budget: str) -> dict:
    """One measurement in this (fresh) process."""
    # dask imports distributed at its first compute (to look for a client): a one-time
    # cost of the process, paid here, before any clock starts, by every mode alike
    import dask.array as da
    import distributed  # noqa: F401

    from dask_sweep.diagnostics import PeakRSS
    from dask_sweep.io import imread, imwrite, track

    shutil.rmtree(dst, ignore_errors=True)
    # what an interrupted run's write left (its TIFF stack and its record of progress)
    shutil.rmtree(dst + ".partial", ignore_errors=True)
    shutil.rmtree(dst + ".progress", ignore_errors=True)
    # the deletion's own file-system work (freeing blocks, discards) done before any clock
    os.sync()
    fell: list[str] = []
    # the imports' garbage is collected before any clock starts, in every mode alike: a
    # full collection (40-60 ms here) otherwise falls into whichever run allocates first
    gc.collect()
    if mode == "scipy":
        with PeakRSS() as m:
            v = _read_all(layout, src)
            r = scipy_op(op, v)
            del v
            _write_all(layout, dst, r)
        nbytes = read = 0
    else:
        import dask_sweep

        if layout in ZARR_LAYOUTS:
            x = da.from_zarr(src)  # as users write it; the sweep reports its reads
        else:
            x = imread(os.path.join(src, "*.tif"))
        nbytes = int(x.nbytes)
        import warnings

        with warnings.catch_warnings(record=True) as caught, \
                dask_sweep.enable(memory_limit=budget, fallback="warn"):
            warnings.simplefilter("always", RuntimeWarning)
            y = build(op, x)
            with track() as io, PeakRSS() as m:
                if layout in ZARR_LAYOUTS:
                    # the same layout and codec as the input and as scipy's write
                    y.to_zarr(_zarr_array(layout, dst, y.shape, y.dtype))
                else:
                    imwrite(y, dst, format="tiff-stack")
        read = io.bytes_read
        # the plugin's fallback, or imwrite's ("... Writing <path> anyway."): its write
        # not swept (the graph feeding it may still be)
        fell = [str(w.message) for w in caught
                if "Falling back" in str(w.message) or str(w.message).endswith("anyway.")]
    out = _read_all(layout, dst)
    return {"wall": m.wall, "cpu": m.cpu, "peak": m.peak_above_baseline, "bytes_read": read,
            "input_bytes": nbytes, "checksum": int(out.astype(np.float64).sum()),
            "dtype": str(out.dtype), "fallback": fell[0] if fell else ""}


def _spawn(args: list[str]) -> dict:
    # the previous run's output flushed first: its write-back would fall into this run
    os.sync()
    p = subprocess.run([sys.executable, __file__, "--_worker", *args], capture_output=True,
                       text=True)
    if p.returncode and "BudgetError" in p.stderr:
        # a budget below the operation's floor is refused before any I/O: a result, not a crash
        return {"refused": p.stderr.strip().splitlines()[-1]}
    if p.returncode:
        raise RuntimeError(f"run {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _floor(refusal: str) -> str:
    """The floor a refusal quotes (its error names it), else the refusal's start."""
    m = re.search(r"(?:floor is a projected|needs at least) ([\d.]+ [KMGT]?i?B)", refusal)
    return f"its floor is {m.group(1)}" if m else refusal[:160]


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (peaks and reads from that run), with the walls of all
    the runs (``walls``) for the range."""
    ordered = sorted(runs, key=lambda r: r["wall"])
    return {**ordered[(len(ordered) - 1) // 2], "walls": [r["wall"] for r in ordered]}


def compare(sizes, dtypes, layouts, ops, fraction: float, workdir: str | None,
            repeat: int = 1) -> list[dict]:
    from dask_sweep.utils import format_bytes

    tmp = workdir or tempfile.mkdtemp(prefix="dask-sweep-ops-")
    rows = []
    try:
        print(f"{'case':<34} {'scipy':>7} {'sweep':>7} {'ratio':>6} {'peak÷budget':>11} "
              f"{'read÷in':>7} same")
        for n in sizes:
            for dtype in dtypes:
                for layout in layouts:
                    src = os.path.join(tmp, f"in-{layout}-{n}-{dtype}")
                    if not os.path.exists(src):
                        make_volume(layout, src, n, dtype)
                    vol = n**3 * np.dtype(dtype).itemsize
                    budget = f"{max(1, int(vol * fraction))}B"
                    for op in ops:
                        dst = os.path.join(tmp, "out")
                        # scipy and the sweep alternate, each run a fresh process: the
                        # median of each (a shared machine's walls vary by tens of percent)
                        bases, sweeps = [], []
                        for k in range(max(1, repeat)):
                            # the order swapped every other pair (scipy, sweep, sweep,
                            # scipy, ...): on a VM, the run after one that freed a large
                            # heap pays for the memory handed back (measured: a label
                            # sweep 3.3-3.9 s after scipy's run, 2.7-3.0 s after its own)
                            for mode in ("scipy", "sweep")[::1 if k % 2 == 0 else -1]:
                                run = _spawn([layout, src, dst, op, mode, budget])
                                (bases if mode == "scipy" else sweeps).append(run)
                            if "refused" in sweeps[-1]:
                                break
                        base = _median_run(bases)
                        sw = sweeps[-1] if "refused" in sweeps[-1] else _median_run(sweeps)
                        case = f"{op} {dtype} {n}^3 {layout}"
                        if "refused" in sw:
                            print(f"{case:<34} {base['wall']:6.2f}s refused at "
                                  f"{format_bytes(vol * fraction)}: {_floor(sw['refused'])}",
                                  flush=True)
                            rows.append({"case": case, "scipy": base, "sweep": sw, "same": None})
                            continue
                        same = sw["checksum"] == base["checksum"]
                        same = same and all(r["checksum"] == base["checksum"] for r in sweeps)
                        note = ""
                        if sw["fallback"]:
                            note = (" (the write fell back: not swept)"
                                    if sw["fallback"].endswith("anyway.")
                                    else " (fell back to stock dask)")
                        if repeat > 1:  # the ratio's range: slowest sweep / fastest scipy...
                            lo = sw["walls"][0] / base["walls"][-1]
                            hi = sw["walls"][-1] / base["walls"][0]
                            note += f"  ratio range {lo:.2f}-{hi:.2f}"
                        peak = max(r["peak"] for r in sweeps)  # the worst run's
                        print(f"{case:<34} {base['wall']:6.2f}s {sw['wall']:6.2f}s "
                              f"{sw['wall'] / base['wall']:6.2f} "
                              f"{peak / (vol * fraction):11.2f} "
                              f"{sw['bytes_read'] / max(1, sw['input_bytes']):7.2f} {same}{note}",
                              flush=True)
                        rows.append({"case": case, "budget": format_bytes(vol * fraction),
                                     "scipy": base, "sweep": sw, "same": same})
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--dtypes", nargs="+", default=["uint8"],
                    choices=["uint8", "uint16", "float32"])
    ap.add_argument("--layouts", nargs="+", default=["zarr", "tiff"],
                    choices=[*ZARR_LAYOUTS, "tiff"])
    ap.add_argument("--ops", nargs="+", default=["copy", "threshold", "uniform3", "median1",
                                                 "dilation1", "label"], choices=OPS)
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each side, alternating; the medians are compared")
    ap.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(run_one(*a._worker)))
        return 0
    compare(a.sizes, a.dtypes, a.layouts, a.ops, a.budget_fraction, a.workdir, a.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
