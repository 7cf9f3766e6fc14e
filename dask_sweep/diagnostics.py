"""Measuring a run: peak resident memory (sampled) and CPU time."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

_STEP_OBSERVERS: list[Callable[[Any], None]] = []


@contextlib.contextmanager
def observe_steps(callback: Callable[[Any], None]) -> Iterator[bool]:
    """Call ``callback(step_record)`` as a local ``dsl.run`` finishes each step (and each
    table-pass slab), e.g. to draw a progress bar; an observer's error never stops a run."""
    _STEP_OBSERVERS.append(callback)
    try:
        yield True
    finally:
        _STEP_OBSERVERS.remove(callback)


def notify_step(record: Any) -> None:
    """Hand a finished step's record to the observers (called by the DSL's runner)."""
    for callback in list(_STEP_OBSERVERS):
        with contextlib.suppress(Exception):
            callback(record)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    """This process's resident bytes (Linux: one small read of /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return int(psutil.Process().memory_info().rss)


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


# PeakRSS blocks open in this process: an inner one must not reset the outer's mark
_MEASURING = 0
_MEASURING_LOCK = threading.Lock()


class PeakRSS:
    """This process's peak resident set size above the start of the block.

    On Linux the kernel's own high-water mark is reset on entry and read on exit:
    exact, every page counted, and nothing runs beside the measured code (a thread
    sampling every 5 ms took the GIL from the code it measured: in one comparison a
    multi-threaded 0.3 s write ran about 50 ms slower under it).  Elsewhere, or inside another block
    (whose mark it must not reset), the resident size is sampled in a thread, a
    floor of the peak.

    >>> with PeakRSS() as m:  # doctest: +SKIP
    ...     work()
    >>> m.peak_above_baseline  # doctest: +SKIP
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss()
            if now > self.peak:
                self.peak = now
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        global _MEASURING
        with _MEASURING_LOCK:
            nested = _MEASURING > 0
            _MEASURING += 1
        self.hwm = not nested and reset_hwm()
        self.baseline = rss()
        self.peak = self.baseline
        self.wall0 = time.perf_counter()
        # the process CPU clock (all threads, ns resolution): psutil's ticks are 10 ms,
        # and a short run measured 0
        self.cpu0 = time.process_time()
        if not self.hwm:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _MEASURING
        with _MEASURING_LOCK:
            _MEASURING -= 1
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        hwm = read_hwm() if self.hwm else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)


# ----------------------------------------------------------------------------- the dashboard

DASHBOARD_ROUTES = "dask_sweep.integration.dashboard"
"""The module that serves ``<dashboard>/sweeps`` (a ``distributed.scheduler.http.routes``
entry)."""


def add_dashboard_route() -> bool:
    """Add the ``/sweeps`` page to the routes a ``distributed`` scheduler will serve.

    distributed mounts the modules listed under ``distributed.scheduler.http.routes``
    when a scheduler starts, so this must run before (importing dask_sweep calls it).
    distributed itself is not imported: when its defaults are not loaded yet, they are
    read from its ``distributed.yaml``.  Returns whether the list now holds the page.
    """
    import importlib.util

    import dask

    key = "distributed.scheduler.http.routes"
    routes = dask.config.get(key, None)
    if routes is None:
        try:
            import yaml

            spec = importlib.util.find_spec("distributed")
            if spec is None or spec.origin is None:
                return False
            with open(os.path.join(os.path.dirname(spec.origin), "distributed.yaml")) as f:
                routes = yaml.safe_load(f)["distributed"]["scheduler"]["http"]["routes"]
        except (OSError, KeyError, TypeError, ImportError):
            return False
    if DASHBOARD_ROUTES not in routes:
        # a value of its own (not a default): distributed's defaults, loaded later, keep it
        dask.config.set({key: [*routes, DASHBOARD_ROUTES]})
    return True


# ----------------------------------------------------------------------------- progress


class SweepProgress:
    """A progress bar of the planes swept, for the local schedulers and ``dsl.run``.

    A dask callback (like :class:`dask.diagnostics.ProgressBar`, which counts tasks;
    a sweep has few, long ones): it counts the planes of the ``sweep-step`` tasks
    done, over every sweep of the computation, and shows the time left at the rate
    so far.  Inside the block, :func:`dask_sweep.dsl.run`'s steps are counted too.
    Under ``distributed`` use the dashboard's ``/sweeps`` page instead.

    >>> with dask_sweep.enable(memory_limit="512MiB"), SweepProgress():  # doctest: +SKIP
    ...     y.to_zarr("out.zarr")
    [####################--------------------]  50% 512 of 1024 planes | 12.0 s, 12.0 s left

    Parameters
    ----------
    minimum
        Seconds before the bar is first shown (short runs print nothing).
    dt
        Seconds between redraws.
    out
        A text stream (default: ``sys.stdout``).
    width
        Characters of the bar.
    """

    def __init__(self, minimum: float = 0.5, dt: float = 0.1, out=None, width: int = 40) -> None:
        from dask.callbacks import Callback

        self.minimum = minimum
        self.dt = dt
        self.out = out
        self.width = width
        self.total = 0
        self.done = 0
        self.steps_total = 0
        self.steps_done = 0
        self._lock = threading.Lock()
        self._running = False
        self._shown = False
        self._t0 = time.perf_counter()
        self._timer: threading.Thread | None = None
        self._dsl = None
        me = self

        class _CB(Callback):
            def _start(self, dsk):
                me._start(dsk)

            def _posttask(self, key, result, dsk, state, worker_id):
                if isinstance(key, tuple) and str(key[0]).startswith("sweep-step-"):
                    me._step_done(key, result)

            def _finish(self, dsk, state, errored):
                me._finish(errored)

        self._callback = _CB()

    # dask callback side
    def _start(self, dsk) -> None:
        from dask_sweep.emit.graph import is_step, plan_in

        with self._lock:
            if not self._running:  # a new computation: count afresh
                self.total = self.done = self.steps_total = self.steps_done = 0
            plans = {}
            for key, task in dsk.items():
                if not is_step(key):
                    continue
                self.steps_total += 1
                plan = plan_in(dsk, task)
                if plan is not None:
                    plans[id(plan)] = plan
            # every plane of every sweep (a step fused with an output block by dask's
            # optimiser is counted when the computation ends)
            self.total += sum(p.extent for p in plans.values())
            if not self._running:
                self._begin()

    def _step_done(self, key, result) -> None:
        with self._lock:
            self.steps_done += 1
            plan = result[2] if isinstance(result, tuple) and len(result) == 3 else None
            if plan is not None and hasattr(plan, "steps"):
                t = key[1]
                self.done += plan.steps[t] - (plan.steps[t - 1] if t else 0)

    def _finish(self, errored: bool) -> None:
        if not errored:
            with self._lock:
                self.done, self.steps_done = self.total, self.steps_total
        self._end(errored)

    # dsl.run side
    def _dsl_step(self, record) -> None:
        a, b = record.planes
        with self._lock:
            self.done += max(0, int(b) - int(a))
            self.total = max(self.total, self.done)
            self.steps_done += 1
            if not self._running:
                self._begin()

    # drawing
    def _begin(self) -> None:
        self._running = True
        self._t0 = time.perf_counter()
        self._timer = threading.Thread(target=self._tick, daemon=True, name="sweep-progress")
        self._timer.start()

    def _tick(self) -> None:
        while self._running:
            if time.perf_counter() - self._t0 >= self.minimum:
                self._draw()
            time.sleep(self.dt)

    def line(self) -> str:
        """The progress line as it is now."""
        elapsed = time.perf_counter() - self._t0
        if self.total:
            frac = min(1.0, self.done / self.total)
            what = f"{self.done} of {self.total} planes"
        else:
            frac = self.steps_done / self.steps_total if self.steps_total else 0.0
            what = f"{self.steps_done} of {self.steps_total} steps"
        bar = "#" * int(round(frac * self.width))
        left = f", {elapsed * (1 - frac) / frac:.1f} s left" if 0 < frac < 1 else ""
        return f"[{bar:-<{self.width}}] {100 * frac:3.0f}% {what} | {elapsed:.1f} s{left}"

    def _draw(self, final: bool = False) -> None:
        import sys

        out = self.out if self.out is not None else sys.stdout
        with self._lock:
            text = self.line()
        out.write("\r" + text + ("\n" if final else ""))
        out.flush()
        self._shown = True

    def _end(self, errored: bool = False) -> None:
        if not self._running:
            return
        self._running = False
        if self._timer is not None:
            self._timer.join()
        if self._shown or time.perf_counter() - self._t0 >= self.minimum:
            self._draw(final=True)

    def __enter__(self) -> SweepProgress:
        self._callback.__enter__()
        self._dsl = contextlib.ExitStack()
        self._dsl.enter_context(observe_steps(self._dsl_step))
        return self

    def __exit__(self, *exc) -> None:
        self._end(exc[0] is not None)
        self._callback.__exit__(*exc)
        if self._dsl is not None:
            self._dsl.close()

    def register(self) -> None:
        """Show the bar for every computation from now on (``unregister()`` stops)."""
        self._callback.register()

    def unregister(self) -> None:
        self._callback.unregister()
