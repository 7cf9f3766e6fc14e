"""Benchmark: time to plan and rewrite a 3-stage chain, against the number of chunks.

    python benchmarks/bench_planning.py --rows 16 32 64 128
    python benchmarks/bench_planning.py --rows --tiled   (tilings only)

Prints chunks, seconds for the sweep pass, and tasks before/after, so linear growth
and the graph-size reduction are visible side by side.  ``--tiled`` also times the
planning of users' pipelines whose chunk rows do not fit their budget, so tilings are
searched: a 512³ volume in zstd 64³ chunks (as ``to_zarr`` writes it) at 32 MiB.
"""

import argparse
import os
import tempfile
import time

import dask.array as da
import scipy.ndimage as ndi

from dask_sweep.integration.optimize import SweepPass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--tiled", action="store_true",
                    help="also time the planning of in-plane tilings")
    a = ap.parse_args()
    if a.tiled:
        tiled()
    for n in a.rows:
        x = da.zeros((n * 10, 2500, 2000), chunks=(10, 50, 50), dtype="u1")
        y = x.map_overlap(ndi.gaussian_filter, depth=8, sigma=2, boundary="none")
        y = y.map_overlap(ndi.grey_erosion, depth=1, size=3, boundary="none")
        y = y.map_overlap(ndi.uniform_filter, depth=2, size=5, boundary="none")
        g, k = y.__dask_graph__(), y.__dask_keys__()
        before = len(g)
        t = time.perf_counter()
        out = SweepPass(memory_limit="4GiB")(g, k)
        dt = time.perf_counter() - t
        after = sum(len(lay) for lay in out.layers.values())
        print(f"{x.npartitions:>8} chunks: sweep pass {dt:6.2f} s "
              f"({1e6 * dt / x.npartitions:5.1f} us/chunk); tasks {before} -> {after}")


def tiled() -> None:
    """Seconds to plan dask-image's dilation and xarray's rolling mean when tiled."""
    import numpy as np
    import xarray as xr
    import zarr
    from dask_image import ndmorph

    import dask_sweep

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.zarr")  # metadata only: planning reads nothing
        zarr.create_array(path, shape=(512,) * 3, chunks=(64,) * 3, dtype="u1")
        x = da.from_zarr(path)
        cases = {
            "dilation r1": ndmorph.binary_dilation(x > 128, np.ones((3,) * 3, bool)
                                                   ).astype("u1"),
            "rolling mean 5": xr.DataArray(x, dims=("z", "y", "x")).rolling(
                z=5, center=True, min_periods=1).mean().data,
        }
        for name, y in cases.items():
            out = zarr.create_array(os.path.join(tmp, "o.zarr"), shape=y.shape,
                                    chunks=(64,) * 3, dtype=y.dtype, overwrite=True)
            store = y.to_zarr(out, compute=False)
            t = time.perf_counter()
            (plan, _), = dask_sweep.explain(store, memory_limit="32MiB").result.plans
            dt = time.perf_counter() - t
            print(f"{name:>16}: planned in {dt:5.2f} s, "
                  f"{plan.info['tiling']['tiles']} tiles of 512^3 in 64^3 zstd chunks at 32 MiB")


if __name__ == "__main__":
    main()
