"""Benchmark: time to plan and rewrite a 3-stage chain, against the number of chunks.

    python benchmarks/bench_planning.py --rows 16 32 64 128

Prints chunks, seconds for the sweep pass, and tasks before/after, so linear growth
and the graph-size reduction are visible side by side.
"""

import argparse
import time

import dask.array as da
import scipy.ndimage as ndi

from dask_sweep.integration.optimize import SweepPass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
