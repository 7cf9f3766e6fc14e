"""The dashboard's ``/sweeps`` page: every sweep a ``distributed`` scheduler ran or runs.

Three parts, all small:

* at emit time (the array optimiser runs on the scheduler) :func:`register`
  files each sweep's plan summary, segments and projections in a
  :class:`SweepBoard`, a scheduler plugin, and returns a :class:`StepReporter`
  that the plan carries to the workers;
* each ``sweep-step`` task, on a worker, sends one event when it ends
  (``Worker.log_event``: the step, its times, the worker's resident memory);
  the board receives it through the plugin's ``log_event`` hook.  On the local
  schedulers the plan carries no reporter and a step does nothing more;
* ``routes`` serves ``<dashboard>/sweeps`` (HTML, refreshed every 2 s) and
  ``<dashboard>/sweeps.json``.  distributed mounts the modules listed under the
  ``distributed.scheduler.http.routes`` config; importing dask_sweep adds this
  one (:func:`dask_sweep.diagnostics.add_dashboard_route`), or add it yourself::

      distributed:
        scheduler:
          http:
            routes: [..., dask_sweep.integration.dashboard]

Bytes read and written are counted from the plan for the steps done (a step
reads the chunk rows its dry run listed, warm-ups included, and writes the
planes it completes); memory is measured in the worker processes.
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import RequestHandler

from dask_sweep.diagnostics import rss as _rss
from dask_sweep.utils import format_bytes

TOPIC = "dask-sweep"
"""Event topic of the step reports (``client.get_events("dask-sweep")``)."""
PLUGIN = "dask-sweep-board"
MAX_SWEEPS = 64
"""Sweeps kept on the board (the oldest finished ones are dropped first)."""


# ----------------------------------------------------------------------------- worker side


class StepReporter:
    """Sends one event per finished step to the scheduler (carried in ``plan.info``)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def begin(self) -> tuple[float, int]:
        return time.time(), _rss()

    def end(self, t: int, begun: tuple[float, int]) -> None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            return  # not on a worker (e.g. the graph was computed elsewhere)
        from dask_sweep.diagnostics import read_hwm

        worker.log_event(TOPIC, {
            "sweep": self.token, "step": int(t), "worker": worker.address,
            "t0": begun[0], "t1": time.time(), "rss0": begun[1], "rss1": _rss(),
            "hwm": read_hwm() or 0, "threads": worker.state.nthreads,
        })

    def __repr__(self) -> str:
        return f"StepReporter({self.token!r})"


# ----------------------------------------------------------------------------- scheduler side


@dataclass
class Segment:
    index: int
    steps: range
    start: int  # first plane
    stop: int
    skipped: bool = False  # a resumed write's recorded planes: no task scheduled


@dataclass
class SweepRecord:
    """One emitted sweep: its plan summary and what the workers reported."""

    token: str
    step_name: str
    created: float
    summary: list[str]
    extent: int
    steps: tuple[int, ...]
    segments: list[Segment]
    step_read: list[int]
    step_written: list[int]
    chain_peak: int  # projected peak of one chain (dry run)
    together: int  # chains one worker runs at once
    worker_budget: int
    slots: str
    done: dict = field(default_factory=dict)  # step -> event
    redone: int = 0
    lost: list = field(default_factory=list)  # (time, worker, segments, steps lost)
    workers: dict = field(default_factory=dict)  # address -> {baseline, rss, hwm, steps, ...}

    def step_planes(self, t: int) -> int:
        return self.steps[t] - (self.steps[t - 1] if t else 0)

    def segment_of(self, t: int) -> int:
        for s in self.segments:
            if t in s.steps:
                return s.index
        return -1

    @property
    def finished(self) -> bool:
        return all(t in self.done for s in self.segments if not s.skipped for t in s.steps)

    def projected_worker_peak(self) -> int:
        return self.together * self.chain_peak


def _summary(plan, trace, token: str) -> list[str]:
    """A few lines in the spirit of ``explain`` (no dry run: this runs at emit time)."""
    from dask_sweep.passes.segments import warmup
    from dask_sweep.plan.ir import Source

    steps = plan.steps
    widths = [b - a for a, b in zip((0, *steps[:-1]), steps)]
    size = (f"{min(widths)} planes" if min(widths) == max(widths)
            else f"{min(widths)}-{max(widths)} planes")
    lines = [f"sweep-step-{token}: along axis {plan.axis} over {plan.extent} planes in "
             f"{len(steps)} steps of {size}; {plan.threads} thread(s) per step"]
    where = plan.info.get("slots")
    nseg = len(plan.segments) + 1
    if nseg > 1:
        lines.append(
            f"  {nseg} segments (chains run at once{': ' + where.describe() if where else ''}); "
            f"each warms up on {warmup(plan)} planes of halo; a worker runs "
            f"{plan.info.get('together', 1)} at a time")
    else:
        why = plan.info.get("one_chain") or ""
        lines.append(f"  one chain{' (' + where.describe() + ')' if where else ''}"
                     f"{': ' + why if why else ''}")
    for j, st in enumerate(plan.stages):
        kind = "read " if isinstance(st, Source) else "stage"
        lines.append(f"  [{j:>2}] {kind} {st.label}")
    for o in plan.outputs:
        lines.append(f"  out {o.name}: {'written in the slab task' if o.sink is not None else 'dask blocks'}")
    budget = plan.budget or 1
    lines.append(f"  projected peak {format_bytes(trace.peak)} per chain of "
                 f"{format_bytes(plan.budget)} budget ({100 * trace.peak / budget:.0f}%), at "
                 f"stage {trace.peak_stage!r}; worker budget "
                 f"{format_bytes(plan.info.get('worker_budget', plan.budget))}")
    return lines


def _step_bytes(plan, trace) -> tuple[list[int], list[int]]:
    """Per step: bytes its dry run read, bytes it writes to sinks."""
    from dask_sweep.plan.ir import Source
    from dask_sweep.runtime.executor import output_upper

    n = len(plan.steps)
    read = [0] * n
    if len(trace.rows_read) == n:
        for t, rows in enumerate(trace.rows_read):
            for j, r in rows:
                st = plan.stages[j]
                if isinstance(st, Source) and st.bytes_per_row:
                    read[t] += int(st.bytes_per_row[r])
    written = [0] * n
    for k, o in enumerate(plan.outputs):
        if o.sink is None:
            continue
        pb = plan.stages[o.stage].plane_bytes(plan.axis)
        prev = 0
        for t in range(n):
            up = output_upper(plan, k, t)
            written[t] += max(0, up - prev) * pb
            prev = up
    return read, written


class SweepBoard(SchedulerPlugin):
    """The scheduler's registry of sweeps (a plugin, to receive the workers' events)."""

    name = PLUGIN

    def __init__(self) -> None:
        self.sweeps: dict[str, SweepRecord] = {}
        self.lock = threading.Lock()  # register() runs in the optimiser's thread
        self.scheduler = None

    # registration, from the optimiser (offload thread)
    def register(self, token: str, plan, trace) -> SweepRecord:
        skip = set(plan.info.get("skip", ()))
        segs = [Segment(i, r, plan.steps[r[0] - 1] if r[0] else 0, plan.steps[r[-1]],
                        i in skip)
                for i, r in enumerate(plan.segment_steps()) if len(r)]
        read, written = _step_bytes(plan, trace)
        where = plan.info.get("slots")
        rec = SweepRecord(
            token=token, step_name=f"sweep-step-{token}", created=time.time(),
            summary=_summary(plan, trace, token), extent=plan.extent, steps=tuple(plan.steps),
            segments=segs, step_read=read, step_written=written, chain_peak=int(trace.peak),
            together=int(plan.info.get("together", 1)),
            worker_budget=int(plan.info.get("worker_budget", plan.budget)),
            slots=where.describe() if where is not None else "")
        with self.lock:
            self.sweeps.pop(token, None)
            self.sweeps[token] = rec
            while len(self.sweeps) > MAX_SWEEPS:
                old = next((k for k, r in self.sweeps.items() if r.finished),
                           next(iter(self.sweeps)))
                del self.sweeps[old]
        return rec

    # the plugin hooks, on the scheduler's event loop
    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or not isinstance(msg, dict):
            return
        with self.lock:
            rec = self.sweeps.get(msg.get("sweep"))
            if rec is None:
                return
            t = int(msg["step"])
            if t in rec.done:
                rec.redone += 1
            rec.done[t] = msg
            w = rec.workers.setdefault(msg["worker"], {
                "baseline": msg["rss0"], "rss": 0, "hwm": 0, "steps": 0, "segments": set(),
                "threads": msg.get("threads", 1)})
            w["rss"] = max(w["rss"], msg["rss1"], msg["rss0"])
            # VmHWM and statm's resident pages are read from counters the kernel syncs
            # apart (per thread, every 64 faults): a high-water mark is never below a
            # resident size seen (measured: 204 KiB below, in a test under coverage)
            w["hwm"] = max(w["hwm"], msg["hwm"], w["rss"])
            w["baseline"] = min(w["baseline"], msg["rss0"])
            w["steps"] += 1
            w["segments"].add(rec.segment_of(t))

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        """A worker left: the steps of unfinished segments it ran are lost (redone elsewhere)."""
        with self.lock:
            for rec in self.sweeps.values():
                if rec.finished:
                    continue
                hit, steps = set(), 0
                for seg in rec.segments:
                    if seg.skipped or all(t in rec.done for t in seg.steps):
                        continue
                    mine = [t for t in seg.steps if rec.done.get(t, {}).get("worker") == worker]
                    if mine:
                        hit.add(seg.index)
                        for t in seg.steps:  # the chain restarts from its warm-up
                            steps += rec.done.pop(t, None) is not None
                if hit:
                    rec.lost.append((time.time(), worker, sorted(hit), steps))

    # views
    def state(self, scheduler=None) -> list[dict]:
        """Every sweep as plain data (newest first): what the page shows."""
        scheduler = scheduler or self.scheduler
        now = time.time()
        out = []
        with self.lock:
            records = list(self.sweeps.values())
        for rec in reversed(records):
            with self.lock:
                done = dict(rec.done)
                workers = {a: dict(w, segments=sorted(w["segments"]))
                           for a, w in rec.workers.items()}
                lost = list(rec.lost)
            durations = [e["t1"] - e["t0"] for e in done.values()]
            mean_step = sum(durations) / len(durations) if durations else None
            segs = []
            for seg in rec.segments:
                mine = [t for t in seg.steps if t in done]
                planes_done = sum(rec.step_planes(t) for t in mine)
                durs = [done[t]["t1"] - done[t]["t0"] for t in mine]
                per_step = sum(durs) / len(durs) if durs else mean_step
                left_steps = len(seg.steps) - len(mine)
                ws = sorted({done[t]["worker"] for t in mine})
                segs.append({
                    "segment": seg.index, "planes": [seg.start, seg.stop],
                    "steps": [seg.steps[0], seg.steps[-1] + 1],
                    "planes_done": planes_done, "planes_total": seg.stop - seg.start,
                    "steps_done": len(mine), "steps_total": len(seg.steps),
                    "bytes_read": sum(rec.step_read[t] for t in mine),
                    "bytes_written": sum(rec.step_written[t] for t in mine),
                    "workers": ws,
                    "time_left": (left_steps * per_step) if per_step is not None else None,
                    "status": ("recorded earlier: not swept" if seg.skipped else "done"
                               if not left_steps else "running" if mine else "waiting"),
                })
                if seg.skipped:
                    segs[-1].update(planes_done=0, planes_total=0, steps_total=0, time_left=0.0)
            status = "finished" if rec.finished else self._status(rec, scheduler, done)
            open_ = [s for s in segs if s["status"] in ("running", "waiting")]
            parallel = max(1, min(len(open_), self._slots(scheduler)))
            lefts = [s["time_left"] for s in open_ if s["time_left"] is not None]
            time_left = (max(max(lefts), sum(lefts) / parallel) if lefts else
                         (0.0 if not open_ else None))
            t_first = min((e["t0"] for e in done.values()), default=None)
            t_last = max((e["t1"] for e in done.values()), default=None)
            wrows = []
            for addr, w in sorted(workers.items()):
                limit = 0
                if scheduler is not None and addr in scheduler.workers:
                    limit = scheduler.workers[addr].memory_limit or 0
                wrows.append({
                    "worker": addr, "segments": w["segments"], "steps": w["steps"],
                    "projected": min(len(w["segments"]), rec.together) * rec.chain_peak,
                    "budget": rec.worker_budget, "baseline": w["baseline"],
                    "rss_max": w["rss"], "hwm": w["hwm"], "memory_limit": limit,
                })
            out.append({
                "sweep": rec.step_name, "status": status, "summary": rec.summary,
                "slots": rec.slots, "created": rec.created,
                "elapsed": (t_last - t_first) if t_first is not None and t_last else 0.0,
                "planes_done": sum(s["planes_done"] for s in segs),
                "planes_total": sum(s["planes_total"] for s in segs),
                "bytes_read": sum(s["bytes_read"] for s in segs),
                "bytes_written": sum(s["bytes_written"] for s in segs),
                "time_left": 0.0 if rec.finished else time_left if status == "running" else None,
                "segments": segs, "workers": wrows, "redone_steps": rec.redone,
                "lost_workers": [{"time": t, "worker": w, "segments": s, "steps_lost": n}
                                 for t, w, s, n in lost],
                "projected_worker_peak": rec.projected_worker_peak(),
                "worker_budget": rec.worker_budget, "age": now - rec.created,
            })
        return out

    @staticmethod
    def _slots(scheduler) -> int:
        if scheduler is None:
            return 1
        return max(1, sum(w.nthreads for w in scheduler.workers.values()))

    @staticmethod
    def _status(rec: SweepRecord, scheduler, done: dict) -> str:
        if scheduler is not None:
            states = [getattr(scheduler.tasks.get((rec.step_name, s.steps[-1])), "state", None)
                      for s in rec.segments if not s.skipped]
            if any(st == "erred" for st in states):
                return "failed"
            if all(st is None for st in states) and not all(
                    all(t in done for t in s.steps) for s in rec.segments if not s.skipped):
                return "cancelled" if done else "forgotten"
        return "running" if done else "waiting"


def board_of(scheduler, create: bool = False) -> SweepBoard | None:
    """The scheduler's :class:`SweepBoard` (added on first use when ``create``)."""
    board = scheduler.plugins.get(PLUGIN)
    if board is None and create:
        board = SweepBoard()
        board.scheduler = scheduler
        # from the optimiser's thread: a dict insertion, seen by the next event
        scheduler.add_plugin(board, name=PLUGIN, idempotent=True)
        board = scheduler.plugins.get(PLUGIN, board)
    return board


def register(scheduler, token: str, plan, trace) -> StepReporter:
    """File a sweep emitted on ``scheduler``; the reporter its steps carry to the workers."""
    board_of(scheduler, create=True).register(token, plan, trace)
    return StepReporter(token)


# ----------------------------------------------------------------------------- the page


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _bar(done: int, total: int, width: int = 160) -> str:
    frac = done / total if total else 1.0
    return (f'<div style="display:inline-block;width:{width}px;height:10px;background:#ddd">'
            f'<div style="width:{int(frac * width)}px;height:10px;background:#4a8"></div></div>')


def render(states: list[dict]) -> str:
    """The ``/sweeps`` page."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='2'><title>Dask: sweeps</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
        "margin:.4em 0 1em}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%;"
        "text-align:right}th{background:#eee}td.l,th.l{text-align:left}"
        "pre{background:#f6f6f6;padding:.5em;font-size:85%}</style></head><body>",
        "<h1>Sweeps</h1>",
        "<p>dask_sweep's streaming sweeps on this scheduler, newest first. Planes, bytes "
        "read and written are counted from each plan for the steps done (warm-ups "
        "included); memory is measured in the worker processes at each step's start and "
        "end (resident set) and as the process's high-water mark.</p>",
    ]
    if not states:
        parts.append("<p>No sweep has run on this scheduler yet.</p>")
    for s in states:
        parts.append(
            f"<h2>{e(s['sweep'])} <small>({e(s['status'])})</small></h2>"
            f"<p>{_bar(s['planes_done'], s['planes_total'])} {s['planes_done']} of "
            f"{s['planes_total']} planes; read {format_bytes(s['bytes_read'])}, written "
            f"{format_bytes(s['bytes_written'])}; {_fmt_time(s['elapsed'])} elapsed, "
            f"time left {_fmt_time(s['time_left'])}; projected peak per worker "
            f"{format_bytes(s['projected_worker_peak'])} of its budget "
            f"{format_bytes(s['worker_budget'])}"
            + (f"; {s['redone_steps']} steps redone" if s["redone_steps"] else "") + "</p>")
        for lw in s["lost_workers"]:
            parts.append(f"<p><b>worker {e(lw['worker'])} lost</b>: segment(s) "
                         f"{', '.join(map(str, lw['segments']))} ({lw['steps_lost']} steps "
                         "done there) redone elsewhere</p>")
        parts.append(f"<pre>{e(chr(10).join(s['summary']))}</pre>")
        parts.append(
            "<table><tr><th>segment</th><th>planes</th><th class='l'>progress</th>"
            "<th>planes done</th><th>steps done</th><th>read</th><th>written</th>"
            "<th class='l'>worker</th><th>time left</th><th class='l'>status</th></tr>")
        for g in s["segments"]:
            parts.append(
                f"<tr><td>segment {g['segment']}</td><td>{g['planes'][0]}-{g['planes'][1]}</td>"
                f"<td class='l'>{_bar(g['planes_done'], g['planes_total'], 100)}</td>"
                f"<td>{g['planes_done']} / {g['planes_total']}</td>"
                f"<td>{g['steps_done']} / {g['steps_total']}</td>"
                f"<td>{format_bytes(g['bytes_read'])}</td>"
                f"<td>{format_bytes(g['bytes_written'])}</td>"
                f"<td class='l'>{e(', '.join(g['workers']))}</td>"
                f"<td>{_fmt_time(g['time_left'])}</td><td class='l'>{g['status']}</td></tr>")
        parts.append("</table>")
        if s["workers"]:
            parts.append(
                "<table><tr><th class='l'>worker</th><th>segments</th><th>steps</th>"
                "<th>projected sweep peak</th><th>budget</th><th>resident before</th>"
                "<th>resident max (step ends)</th><th>high-water mark</th>"
                "<th>memory_limit</th></tr>")
            for w in s["workers"]:
                parts.append(
                    f"<tr><td class='l'>{e(w['worker'])}</td>"
                    f"<td>{', '.join(map(str, w['segments']))}</td><td>{w['steps']}</td>"
                    f"<td>{format_bytes(w['projected'])}</td><td>{format_bytes(w['budget'])}</td>"
                    f"<td>{format_bytes(w['baseline'])}</td>"
                    f"<td>{format_bytes(w['rss_max'])} (+{format_bytes(max(0, w['rss_max'] - w['baseline']))})</td>"
                    f"<td>{format_bytes(w['hwm'])}</td>"
                    f"<td>{format_bytes(w['memory_limit']) if w['memory_limit'] else '-'}</td></tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


class SweepsPage(RequestHandler):
    def get(self) -> None:
        board = board_of(self.server)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render(board.state(self.server) if board is not None else []))


class SweepsJSON(RequestHandler):
    def get(self) -> None:
        board = board_of(self.server)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(board.state(self.server) if board is not None else []))


routes: list[tuple] = [
    (r"sweeps", SweepsPage, {}),
    (r"sweeps.json", SweepsJSON, {}),
]
