"""Every benchmark runs at a tiny size and reports results equal to its reference.

Performance claims live in ``benchmarks/``; this only keeps the scripts working
(their own correctness columns must say so), not their timings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")

CASES = {
    "bench_sweep": (["--shape", "24", "64", "64", "--layouts", "slab"],
                    ["identical output: True"]),
    "bench_ndimage": (["--shape", "24", "64", "64", "--memory-limit", "32MiB"],
                      ["same result: True"]),
    # random user pipelines, each in a fresh process: no swept case over its budget
    "bench_budget": (["--cases", "3", "--size", "24", "64", "64", "--budgets", "4MiB"],
                     ["largest growth÷budget of a swept case", "over the budget: 0"]),
    "bench_dsl": (["--shape", "24", "64", "64", "--pipelines", "otsu"],
                  ["dsl results equal: True"]),
    "bench_io": (["--shape", "16", "64", "64", "--formats", "zarr-slab", "hdf5",
                  "--io-shape", "16", "128", "128", "--io-runs", "1", "--io-formats", "bigtiff",
                  "--compare-sync-bytes", "0"],
                 ["raw copy", "copy       through the sweep", "copy zarr -> bigtiff",
                  "copy, sync-bytes 0"]),
    # at 32x a 64^3 volume's bytes (8 MiB, above the runtime overhead) both sweep, with
    # every byte read once (each run a fresh process: two operations keep it short)
    "bench_ops": (["--sizes", "64", "--layouts", "zarr", "tiff", "--ops", "uniform3", "label",
                   "--budget-fraction", "32"],
                  ["uniform3 uint8 64^3 zarr", "uniform3 uint8 64^3 tiff",
                   "label uint8 64^3 zarr", "label uint8 64^3 tiff"]),
    "bench_planning": (["--rows", "2", "--tiled"],
                       ["dilation r1: planned in", "rolling mean 5: planned in", "chunks: sweep pass"]),
    "bench_zarr_writes": (["--size", "64", "--runs", "1"],
                          ["int32 labels, 64^3 chunks, a row per call"]),
    "bench_reference": (["--shape", "24", "64", "64", "--layouts", "slab", "tiff",
                         "--memory-limit", "16MiB", "--no-plan"],
                        ["== slab", "== tiff", "sweep"]),
    # deep zstd output chunks on a slab input, a row over the budget: staged on disk
    "bench_reference --out-chunks": (["--shape", "32", "512", "512", "--layouts", "slab",
                                      "--modes", "sweep", "--memory-limit", "16MiB",
                                      "--out-chunks", "32", "128", "128", "--out-codec", "zstd"],
                                     ["staged raw on local disk", "== slab"]),
}
# what a small run must not print (the case exists to show the swept path)
ABSENT = {"bench_ops": ["fell back", "refused"]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_small(name, tmp_path):
    args, expected = CASES[name]
    p = subprocess.run(
        [sys.executable, os.path.join(BENCH, f"{name.split()[0]}.py"), *args],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for text in expected:
        assert text in p.stdout, p.stdout[-3000:]
    for text in ABSENT.get(name, ()):
        assert text not in p.stdout, p.stdout[-3000:]
    # correctness columns and flags ("same", "identical output: ...", "equal: ...")
    wrong = [ln for ln in p.stdout.splitlines() if re.search(r"\bFalse\b", ln)]
    assert not wrong, wrong


def test_peak_rss_reads_the_kernels_mark_with_no_thread_beside_and_nests():
    """On Linux the block reads VmHWM (nothing samples beside the measured code); a block
    inside another samples instead, so the outer block's mark is not reset."""
    import threading
    import time

    import numpy as np

    from dask_sweep.diagnostics import PeakRSS, reset_hwm

    if not reset_hwm():
        pytest.skip("no /proc/self/clear_refs here")
    before = threading.active_count()
    with PeakRSS() as outer:
        assert threading.active_count() == before  # no sampler
        a = np.ones(48 << 20, np.uint8)  # touched: resident
        del a
        with PeakRSS() as inner:
            assert threading.active_count() == before + 1  # the inner one samples
            b = np.ones(16 << 20, np.uint8)
            time.sleep(0.05)
            del b
    assert outer.peak_above_baseline >= 40 << 20  # the inner block did not reset it
    assert 12 << 20 <= inner.peak_above_baseline < 40 << 20


def test_peak_rss_measures_the_cpu_of_a_short_run():
    # the demo divides by the CPU of scipy's run: a few milliseconds on a small volume,
    # which a 10 ms clock tick measured as 0 (a ZeroDivisionError in CI)
    import time

    from dask_sweep.diagnostics import PeakRSS

    with PeakRSS() as m:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:
            pass
    assert 0.001 < m.cpu < 1.0
    assert m.wall >= 0.002
