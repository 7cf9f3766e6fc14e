"""Benchmark: the 3-stage chain (gaussian σ=2 → grey erosion 3 → uniform 5) on a Zarr
volume, slab-chunked and 3D-chunked, stock dask and dask_sweep side by side, each run in
a fresh process.  Reports wall time, CPU against scipy-once, peak RSS against the budget
and bytes read ÷ input bytes.

    python benchmarks/bench_sweep.py                          # small (CI-sized)
    python benchmarks/bench_sweep.py --shape 256 2048 2048 --memory-limit 256MiB \
        --apis map_overlap dask-image --workdir /big/disk    # 1 GiB, by hand
"""

import sys

from dask_sweep.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["--shape", "64", "256", "256"]))
