"""Where a sweep will run: how many chains can run at once, and each worker's budget.

The array optimiser runs where the graph will be scheduled: under
``distributed`` on the scheduler (in its offload thread), so the scheduler's
view of its workers is at hand; otherwise in the caller's process, for dask's
local schedulers (threads: ``sweep.threads`` slots; sync: one).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import dask

WORKER_FRACTION = 0.5
"""Share of a ``distributed`` worker's ``memory_limit`` a sweep may use: below the
worker's spill threshold (``distributed.worker.memory.target``, 0.6 by default), so
the sweep never pushes a worker into spilling."""


@dataclass(frozen=True)
class Slots:
    """Chains that can run at once, and where.

    Attributes
    ----------
    kind
        ``"distributed"`` or ``"local"``.
    workers
        Worker processes (1 for the local schedulers).
    threads
        Threads per worker (chains one worker runs at once).
    memory
        The smallest worker ``memory_limit`` (bytes; 0: unknown or unlimited).
    """

    kind: str
    workers: int
    threads: int
    memory: int = 0

    @property
    def total(self) -> int:
        return self.workers * self.threads

    def describe(self) -> str:
        if self.kind == "distributed":
            mem = f", {self.memory / 2**30:.1f} GiB each" if self.memory else ""
            return (f"distributed: {self.workers} worker{'s' * (self.workers != 1)} x "
                    f"{self.threads} thread{'s' * (self.threads != 1)}{mem}")
        return f"local scheduler: {self.threads} thread{'s' * (self.threads != 1)}"


def _scheduler_here():
    """The ``distributed`` scheduler this optimiser call runs inside, else ``None``."""
    if not threading.current_thread().name.startswith("Dask-Offload"):
        return None
    from distributed import Scheduler

    # closed schedulers linger in the weak set until collected (a notebook that made a
    # cluster before this one): only a running one can be running this optimiser
    live = [s for s in list(Scheduler._instances)
            if getattr(s, "workers", None) is not None
            and getattr(getattr(s, "status", None), "name", "running") == "running"]
    return live[0] if len(live) == 1 else None


def slots(threads: int) -> Slots:
    """The slots of the scheduler about to run the graph (``threads``: local threads)."""
    sched = _scheduler_here()
    if sched is not None:
        workers = list(sched.workers.values())
        if not workers:
            from dask_sweep.errors import SweepError

            raise SweepError(
                "dask_sweep: the distributed cluster has no workers, so a sweep cannot be "
                "planned or run. Start workers (e.g. LocalCluster(n_workers=...)) first."
            )
        nthreads = min(max(1, w.nthreads) for w in workers)
        mems = [w.memory_limit for w in workers if w.memory_limit]
        return Slots("distributed", len(workers), nthreads, min(mems) if mems else 0)
    sched_name = dask.config.get("scheduler", None)
    if sched_name in ("sync", "synchronous", "single-threaded"):
        return Slots("local", 1, 1)
    return Slots("local", 1, max(1, threads))


def report_sweep(plan, trace, token: str) -> dict | None:
    """On a ``distributed`` scheduler: file the sweep for the dashboard's ``/sweeps``
    page; its steps report to what goes in ``plan.info["report"]``.  Elsewhere None."""
    sched = _scheduler_here()
    if sched is None:
        return None
    try:
        from dask_sweep.integration.dashboard import register

        return {"report": register(sched, token, plan, trace)}
    except Exception:  # noqa: BLE001 - watching a sweep must never stop it
        import logging

        logging.getLogger("dask_sweep").warning("the sweep is not on the dashboard",
                                                exc_info=True)


def _register_reporter() -> None:
    from dask_sweep.emit.graph import REPORTERS

    if report_sweep not in REPORTERS:
        REPORTERS.append(report_sweep)


_register_reporter()
