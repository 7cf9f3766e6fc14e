"""Measuring a run: peak resident memory (sampled) and CPU time."""

from __future__ import annotations

import os
import threading
import time

import psutil


class PeakRSS:
    """Sample this process's resident set size in a thread; report the peak above start.

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

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)
