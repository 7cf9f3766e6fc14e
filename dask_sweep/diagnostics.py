"""Measuring a run: peak resident memory (sampled) and CPU time."""

from __future__ import annotations

import os
import threading
import time

import psutil


def reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark (``VmHWM``) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_hwm() -> int | None:
    """This process's resident high-water mark in bytes (``VmHWM``), or ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """This process's peak resident set size above the start of the block.

    On Linux the kernel's own high-water mark is reset on entry and read on exit
    (exact, every page counted); elsewhere, and as a floor, the resident size is
    sampled in a thread.

    >>> with PeakRSS() as m:  # doctest: +SKIP
    ...     work()
    >>> m.peak_above_baseline  # doctest: +SKIP
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.proc = psutil.Process(os.getpid())
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.hwm = reset_hwm()
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self.wall0 = time.perf_counter()
        self.cpu0 = self.proc.cpu_times()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.wall = time.perf_counter() - self.wall0
        c1 = self.proc.cpu_times()
        self.cpu = (c1.user - self.cpu0.user) + (c1.system - self.cpu0.system)
        hwm = read_hwm() if self.hwm else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)
