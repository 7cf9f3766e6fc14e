"""The hooks: dask's ``array_optimize`` slot and the old ``optimizations`` key.

dask 2026.8 calls ``dask.config.get("array_optimize")(dsk, keys)`` once per
compute / persist / store.  There is one slot, so everything here chains:

* importing dask_sweep installs :func:`array_optimize_shim`, which applies the
  callables listed under the ``optimizations`` key (removed from dask in 2025.4,
  still used by our users' code) and then whatever optimiser was installed
  before (dask's default);
* :func:`optimize` is a drop-in ``array_optimize``: sweep, then dask's default;
* :class:`sweep` is a configured pass (settings travel with the object, because
  under ``distributed`` the optimiser runs on the scheduler);
* :func:`enable` switches it on for a ``with`` block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import dask
from dask.array.optimization import optimize as dask_default_optimize

from dask_sweep.config import SweepSettings
from dask_sweep.emit.splice import splice, then_keeping_priorities
from dask_sweep.errors import BudgetError, NotSweepable, SweepConfigError, SweepError
from dask_sweep.integration.cluster import WORKER_FRACTION, Slots, slots
from dask_sweep.io.staging import StagedWriter
from dask_sweep.io.zarr_io import encode_temporaries
from dask_sweep.passes.resume import skip_recorded
from dask_sweep.passes.segments import long_enough, why_one_chain
from dask_sweep.passes.slabs import choose_steps
from dask_sweep.passes.tiling import on_blocks, tile, tileable
from dask_sweep.patterns.expr import flatten_keys
from dask_sweep.patterns.layers import array_meta, is_layered
from dask_sweep.patterns.recognise import Fallback, find_regions
from dask_sweep.patterns.to_plan import region_to_plan, staged
from dask_sweep.plan.ir import FEEDING, FEEDING_BUDGET, Kernel, Plan, Running, Source
from dask_sweep.runtime.executor import Trace
from dask_sweep.runtime.kernel import warm_kernels
from dask_sweep.runtime.memory import tune_allocator
from dask_sweep.utils import format_bytes


@dataclass
class SweepResult:
    """What one pass decided: the plans it emits and what it left to dask."""

    plans: list[tuple[Plan, Trace]] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    settings: SweepSettings | None = None
    #: the graph analysed: its output keys as given (flattened only where :func:`reuse`
    #: is asked: 28 ms for 100 000 keys) and its layer names (what :func:`reuse` matches)
    graph: tuple[Any, frozenset] | None = field(default=None, repr=False)
    #: the scheduler's slots the plans were made for (``None``: nothing was planned)
    slots: Slots | None = field(default=None, repr=False)


def _periodic_on(spec, ax: int) -> bool:
    return any(isinstance(b.get(ax), str) and b.get(ax) == "periodic" for b in spec.boundary)


def _sweepable(region, ax: int) -> bool:
    """Periodic along the sweep axis is fine unless one such stage feeds another.

    (The far end of a periodic stage's input is computed by a side evaluation,
    which must not itself need the far end of something else.)
    """
    stages = region.stages

    def has_periodic_ancestor(name, seen):
        for i in stages[name].inputs:
            if i in stages and i not in seen:
                seen.add(i)
                if _periodic_on(stages[i], ax) or has_periodic_ancestor(i, seen):
                    return True
        return False

    return not any(_periodic_on(s, ax) and has_periodic_ancestor(n, set())
                   for n, s in stages.items())


def _choose_axis(region, settings: SweepSettings) -> tuple[int | None, str]:
    ndim = region.ndim
    if settings.axis is not None:
        if settings.axis >= ndim:
            raise SweepConfigError(f"Expected sweep.axis < {ndim} (the arrays have {ndim} "
                                   f"dimensions). Got {settings.axis}.")
        if not _sweepable(region, settings.axis):
            return None, (f"chained periodic boundaries along the configured sweep axis "
                          f"{settings.axis}")
        return settings.axis, ""
    for ax in range(ndim):
        if _sweepable(region, ax):
            note = "" if ax == 0 else f"swept along axis {ax}: chained periodic boundaries on axis 0"
            return ax, note
    return None, "chained periodic boundaries on every axis (each would need the far end first)"


def _one_block_each(region, plan: Plan) -> bool:
    """Nothing to stream: every array one block, every stage evaluated on dask's blocks.

    A sweep of it would run the same single task, minus dask's tolerance of a
    function that returns another shape than it declares.
    """
    if any(isinstance(st, (Kernel, Running)) for st in plan.stages):
        return False  # a known kernel runs on slabs of the block: bounded memory
    # a source's dask blocks, not its rows (a reader of single planes has one per plane)
    return all(all(n == 1 for n in st.meta.numblocks) for st in region.stages.values()) and all(
        all(len(c) <= 1 for c in st.chunks) if st.chunks else len(st.row_bounds) <= 2
        for st in plan.stages if isinstance(st, Source))


def analyse(dsk: Any, keys: Any, settings: SweepSettings) -> SweepResult:
    """Recognise and plan without emitting (used by the pass and by ``explain``).

    A graph the analysis trips on (a bug here, not a budget or a refusal) is
    left to stock dask with a warning, unless ``fallback="raise"``: a user's
    computation must not fail because an optimisation could not be applied.
    Within :func:`reuse`, the graph it names gets the analysis already made.
    """
    done = _reused(dsk, keys, settings)
    if done is not None:
        return done
    try:
        res = _analyse(dsk, keys, settings)
        if is_layered(dsk):
            res.graph = (keys, frozenset(dsk.layers))
        return res
    except SweepError:
        raise
    except Exception as e:
        if settings.fallback == "raise":
            raise
        note = f"the analysis failed ({type(e).__name__}: {e}); left to stock dask"
        if settings.fallback == "warn":
            warnings.warn(f"dask_sweep: {note}. Please report this graph.", RuntimeWarning,
                          stacklevel=4)
        res = SweepResult(settings=settings)
        res.fallbacks.append(Fallback("graph", note))
        return res


# the analysis :func:`reuse` hands to the pass
_REUSE: ContextVar[SweepResult | None] = ContextVar("dask_sweep_reuse", default=None)


@contextlib.contextmanager
def reuse(result: SweepResult) -> Iterator[None]:
    """Within this block the pass takes ``result`` as its analysis of the graph it was made of.

    For ``imwrite``, which plans a write while choosing its output's chunks and then
    computes the very same graph: its second plan would repeat the first (tens of
    milliseconds of dry runs).  Only a graph with the analysed graph's output keys and
    layer names (in either dask array mode: an expression's lowered graph) gets it,
    under settings equal but for ``fallback`` (a plan that was found under ``"raise"``
    is the one any fallback finds), for the same scheduler (a plan made on the client for
    the local threads does not serve a ``distributed`` scheduler planning its workers'
    chains); anything else is analysed.
    """
    mark = _REUSE.set(result if result.graph is not None else None)
    try:
        yield
    finally:
        _REUSE.reset(mark)


def _reused(dsk: Any, keys: Any, settings: SweepSettings) -> SweepResult | None:
    result = _REUSE.get()
    if result is None or not is_layered(dsk):
        return None
    given, layers = result.graph
    same = (result.settings is not None
            and result.settings.with_(fallback=settings.fallback) == settings)
    # dask.compute adds a layer that gathers the outputs (``finalize-...``) and asks for it
    extra = set(dsk.layers) - layers
    gathered = all(n.startswith("finalize-") and set(dsk.dependencies.get(n, ())) <= layers
                   for n in extra)
    if not same or not layers <= set(dsk.layers) or not gathered:
        return None
    names = {k[0] if isinstance(k, tuple) else k for k in flatten_keys(keys)}
    if not (extra and names <= extra) and set(flatten_keys(keys)) != set(flatten_keys(given)):
        return None
    if result.plans and slots(settings.threads) != result.slots:
        return None
    return SweepResult(list(result.plans), list(result.fallbacks), settings, result.graph,
                       result.slots)


def _analyse(dsk: Any, keys: Any, settings: SweepSettings) -> SweepResult:
    res = SweepResult(settings=settings)
    if not is_layered(dsk):
        res.fallbacks.append(Fallback("graph", "not a HighLevelGraph (a plain dict graph)"))
        return res
    regions, res.fallbacks = find_regions(dsk, keys)
    res.fallbacks = [_feeding_copy(dsk, fb, settings) for fb in res.fallbacks]
    where_slots = res.slots = slots(settings.threads) if regions else None
    for region in regions:
        axis, note = _choose_axis(region, settings)
        where = (region.outputs or list(region.stores) or ["region"])[0]
        if axis is None:
            res.fallbacks.append(Fallback(where, note))
            continue
        notes = [note] if note else []
        feeding, budgeted, held, whole = _after_feeders(dsk, region, settings, notes)
        given = list(notes)  # planning appends its own notes: a second attempt starts afresh
        try:
            try:
                plan, trace = _plan_region(dsk, region, axis, budgeted, notes, where_slots)
            except BudgetError as shared:
                if not feeding or settings.fallback == "raise":
                    raise
                # stock dask would hold far more (a store of rechunked 128 MiB blocks):
                # sweep with the whole budget beside the drop-in, and say so
                notes[:] = [n for n in given if n != feeding]
                try:
                    plan, trace = _plan_region(dsk, region, axis, whole, notes, where_slots)
                except BudgetError:
                    if whole.memory_limit >= settings.memory_limit:
                        raise
                    # not even within the drop-in's own budget: within the sweep's
                    notes[:] = [n for n in given if n != feeding]
                    plan, trace = _plan_region(dsk, region, axis, settings, notes,
                                               where_slots)
                both = held + trace.peak
                over = (f"{shared} The drop-in feeding this sweep and the sweep together "
                        f"are projected at up to {format_bytes(both)}, over the budget of "
                        f"{format_bytes(whole.memory_limit)}: the sweep plans for "
                        f"{format_bytes(plan.budget)} beside it (stock dask would hold "
                        f"more). Raise memory_limit, or write the drop-in's output with "
                        f"dask_sweep.io.imwrite, which chooses output chunks that fit.")
                plan = replace(plan, notes=(*plan.notes, over))
                if settings.fallback == "warn":
                    warnings.warn(over, RuntimeWarning, stacklevel=4)
        except NotSweepable as e:
            res.fallbacks.append(Fallback(where, str(e)))
            continue
        except BudgetError as e:
            if feeding:
                e = BudgetError(f"{e} ({feeding})", stage=e.stage, projected=e.projected,
                                budget=e.budget)
            if settings.fallback == "raise":
                raise e from None
            if settings.fallback == "warn":
                warnings.warn(f"{e} Falling back to stock dask.", RuntimeWarning, stacklevel=4)
            res.fallbacks.append(Fallback(where, str(e)))
            continue
        plan = plan.with_info(absorbed=_absorbed(region), sources=set(region.sources))
        res.plans.append((plan, trace))
    return res


def tune_before_running(result: SweepResult) -> None:
    """Tune glibc (``sweep.tune-malloc``) when a graph is rewritten for the local scheduler,
    before its threads allocate: each thread that allocates before the arena cap keeps an
    arena of its own, whose freed pieces stay (a chain of three filters at 24 MiB grew
    24.1-26.2 MiB tuned in its first task, 23.3-23.5 tuned before the run).  Not in the
    analysis itself: ``explain`` changes nothing of the process."""
    if (result.plans and result.slots is not None and result.slots.kind == "local"
            and result.settings is not None and result.settings.tune_malloc):
        tune_allocator()


def _plan_region(dsk, region, axis: int, settings: SweepSettings, notes: list[str],
                 where_slots: Slots) -> tuple[Plan, Trace]:
    """The region's plan, sized for ``settings`` (in-plane tiles when rows do not fit).

    Raises
    ------
    NotSweepable, BudgetError
    """
    # a distributed worker may not have loaded numba's kernels (``enable`` loads them in
    # this process only): its first run counts the load
    plan = region_to_plan(dsk, region, axis, settings, notes,
                          jit_loaded=False if where_slots.kind == "distributed" else None)
    if where_slots.kind != "distributed":
        # the local scheduler holds every key of the graph for the whole run
        plan = plan.with_info(graph_keys=_kept_keys(dsk, region, plan),
                              key_overhead=settings.key_overhead)
    if _one_block_each(region, plan):
        raise NotSweepable(
            "every array is a single block and no stage can be cut into slabs: "
            "stock dask already computes each stage once, in one task"
        )
    tiles_of = on_blocks(plan)  # a running sum crosses whole planes: dask's blocks in tiles
    why = tileable(tiles_of)
    # the only attempt: no tiles and nothing to stage after it
    last = bool(why) and not (_can_stage(where_slots)
                              and staged(plan, settings.memory_limit) is not None)
    try:
        # where tiles (or staging) may follow, a refusal need not replay its whole floor
        plan_, trace = _size(plan, settings, where_slots, exact=last)
        return skip_recorded(plan_, trace)  # a resumed write: only what is left
    except BudgetError as e:
        whole = e
    tiled = None
    if not why:
        try:
            tiles = tile(_tile_share(tiles_of, settings, where_slots),
                         settings.target_slab_bytes)
            return tiles[0][0].with_info(tile_plans=tiles), tiles[0][1]
        except BudgetError as e:
            tiled = e
    stage = _staged(plan, settings, where_slots)
    if isinstance(stage, tuple):
        return stage
    if not last:
        try:
            _size(plan, settings, where_slots)  # refused again, quoting its whole floor
        except BudgetError as exact:
            whole = exact
    more = f"In-plane tiling is not possible: {why}." if why else f"And {tiled}."
    if stage is not None:
        more += (f" Staging its chunk rows on local disk needs at least "
                 f"{format_bytes(stage.projected)} too.")
    raise BudgetError(f"{whole} {more}", stage=whole.stage, projected=whole.projected,
                      budget=whole.budget) from None


def _can_stage(where: Slots) -> bool:
    """Staging keeps state in this process: local schedulers (threads or synchronous)."""
    return where.kind == "local" and dask.config.get("scheduler", None) not in (
        "processes", "multiprocessing")


def _staged(plan: Plan, settings: SweepSettings,
            where: Slots) -> tuple[Plan, Trace] | BudgetError | None:
    """The sized plan with its deep compressed chunk rows staged on local disk
    (:func:`~dask_sweep.patterns.to_plan.staged`), or the refusal of its smallest form,
    or None when nothing can be staged here."""
    if not _can_stage(where) or staged(plan, settings.memory_limit) is None:
        return None
    # calls at once in the background; one; then one chunk per call, in the step
    forms = [(where.threads, False), (1, False), (1, True)]
    for threads, least in forms[0 if where.threads > 1 else 1:]:
        try:
            sized, trace = _size(staged(plan, settings.memory_limit, threads, least),
                                 settings, where)
            break
        except BudgetError as e:
            refused = e
    else:
        return refused
    notes = []
    for o in sized.outputs:
        w = o.sink
        if isinstance(w, StagedWriter):
            depth = max(b - a for a, b in zip(w.rows, w.rows[1:]))
            notes.append(
                f"output {o.name.rsplit('-', 1)[0]}: its chunks, {depth} planes deep and "
                "encoded whole, do not fit the budget a chunk row at a time, and in-plane "
                "tiles do not help: each chunk row is staged raw on local disk (up to "
                f"{format_bytes(w.staged_bytes())} per row, in {w.directory}; unlinked "
                "files, freed as each row is written) and written from there"
                + (" in the background" if w.overlap else "")
                + f", {format_bytes(w.largest_box)} of whole chunks per call, "
                f"{w.workers} call(s) at once")
    return replace(sized, notes=sized.notes + tuple(notes)), trace


def _after_feeders(dsk: Any, region, settings: SweepSettings,
                   notes: list[str]) -> tuple[str, SweepSettings, int, SweepSettings]:
    """What the drop-ins feeding this region hold while it runs (a note, also appended
    to ``notes``; empty if none), the settings with the budget that leaves (one budget
    for both, not one each), the bytes held beside the sweep, and the settings with the
    whole budget (the smaller of the sweep's and the drop-ins' own).

    A drop-in's output layer (``ndimage.label``, ``distance_transform_edt``) records
    what its last pass holds (:data:`~dask_sweep.plan.ir.FEEDING`); that pass emits
    the slabs this sweep reads, so both run at once.
    """
    held = {}
    budget = settings.memory_limit
    for src in region.sources:
        ann = getattr(dsk.layers.get(src), "collection_annotations", None) or {}
        if ann.get(FEEDING):
            held[src] = int(ann[FEEDING])
            # the drop-in's last pass runs in the steps: within its own budget too
            budget = min(budget, int(ann.get(FEEDING_BUDGET) or budget))
    total = sum(held.values())
    if not total:
        return "", settings, 0, settings
    # Both run in one process under one scheduler: the resident memory beyond the
    # arrays (sweep.runtime-overhead), in the drop-in's figure, is not held twice.
    shared = sum(min(settings.runtime_overhead, b) for b in held.values())
    left = max(1, budget - total + shared)
    who = ", ".join(f"{n.rsplit('-', 1)[0]} {format_bytes(b)}" for n, b in held.items())
    given = ("" if budget == settings.memory_limit else
             f" (the drop-in's own memory_limit, {format_bytes(budget)}, bounds the steps "
             "that run its last pass)")
    note = (f"of the {format_bytes(budget)} budget{given}, {who} held by the "
            f"drop-in feeding this sweep (its last pass, at the same time): the sweep "
            f"plans for the {format_bytes(left)} left (the "
            f"{format_bytes(shared)} runtime overhead in both counted once)")
    notes.append(note)
    return (note, settings.with_(memory_limit=left), total - shared,
            settings.with_(memory_limit=budget))


def _feeding_copy(dsk: Any, fb: Fallback, settings: SweepSettings) -> Fallback:
    """``fb``, and the budget it breaks when it leaves a drop-in's output to stock dask.

    A store of a drop-in's blocks into chunks of their own is a copy with nothing to
    stream, so dask writes each block as it is, beside the drop-in's last pass.  When
    that is over the budget the user is told (``fallback="warn"``), or it is refused
    (``"raise"``): the budget is a promise, also where the sweep does not apply.
    """
    layer = dsk.layers.get(fb.where)
    ann = getattr(layer, "collection_annotations", None) or {}
    meta = array_meta(layer) if ann.get(FEEDING) else None
    if meta is None or fb.kind != "copy":
        return fb
    block = math.prod(max(c, default=0) for c in meta.chunks) * meta.dtype.itemsize
    # each block is one call, into chunks of its own: zarr's temporaries of one chunk
    projected = int(ann[FEEDING]) + block + encode_temporaries(block, block, meta.dtype)
    # dask runs the drop-in's tasks here, not a sweep's steps: the copy's budget is the
    # active one (the drop-in's own bounds what the drop-in holds, in FEEDING)
    budget = settings.memory_limit
    if projected <= budget:
        return fb
    name = fb.where.rsplit("-", 1)[0]
    msg = (f"dask_sweep: {name}'s output is written by stock dask as it is, a block at a "
           f"time: blocks of up to {format_bytes(block)} and the writer's temporaries "
           f"beside the {format_bytes(int(ann[FEEDING]))} the drop-in holds are projected "
           f"at {format_bytes(projected)}, over the memory budget of "
           f"{format_bytes(budget)}. Write it with dask_sweep.io.imwrite, "
           "which chooses output chunks that fit, or raise memory_limit.")
    if settings.fallback == "raise":
        raise BudgetError(msg, stage=fb.where, projected=projected, budget=budget)
    if settings.fallback == "warn":
        warnings.warn(msg, RuntimeWarning, stacklevel=5)
    return Fallback(fb.where, f"{fb.reason}; {msg.removeprefix('dask_sweep: ')}", fb.kind)


def _absorbed(region) -> set[str]:
    """Names of the layers a region's sweep replaces."""
    return set().union(*(s.internal for s in region.stages.values())) | set(
        region.stages) | set(region.stores)


def _kept_keys(dsk: Any, region, plan: Plan) -> int:
    """Keys of the graph once the region is swept, less the step tasks: the layers
    it leaves (``len`` of a Blockwise layer counts without materialising it) and the
    output blocks, which keep their names.  ``len`` over-counts layers only an
    absorbed source needed; the projection errs on the safe side."""
    gone = _absorbed(region)
    # sources read inside the slab tasks leave the graph (their stages come first, in order)
    gone |= {name for name, st in zip(region.sources, plan.stages)
             if isinstance(st, Source) and not st.external}
    kept = sum(len(layer) for name, layer in dsk.layers.items() if name not in gone)
    return kept + sum(math.prod(len(c) for c in o.chunks) for o in plan.outputs)


def _tile_share(plan: Plan, settings: SweepSettings, where: Slots) -> Plan:
    """The plan each in-plane tile is sized from, marked for running tiles at once or not.

    Under ``distributed`` with more than one thread in all, tiles are independent chains
    spread over the workers (each worker's budget at most ``WORKER_FRACTION`` of its
    ``memory_limit``, shared by the chains it runs at once: one per thread); on the local
    schedulers they run one after the other, each with the whole budget and every thread.
    """
    if where.kind != "distributed" or where.total <= 1:
        return replace(plan, info={**plan.info, "tiles_at_once": 1})
    budget = settings.memory_limit
    if where.memory:
        budget = min(budget, int(where.memory * WORKER_FRACTION))
    together = max(1, where.threads)
    return replace(plan, budget=budget // together, threads=1,
                   info={**plan.info, "tiles_at_once": where.total})


def _size(plan: Plan, settings: SweepSettings, where: Slots,
          exact: bool = True) -> tuple[Plan, Trace]:
    """Steps, rings and segments of ``plan`` for the budget of each worker.

    Under ``distributed`` a worker's budget is at most ``WORKER_FRACTION`` of its
    ``memory_limit``.  Segments (chains run at once, see
    :mod:`dask_sweep.passes.segments`) are tried from ``sweep.segments`` (default:
    the threads of all workers under ``distributed``, one on the local
    schedulers) down to one: chains running at once on one worker share its
    budget and its threads.  The first count whose chains fit and are
    long enough for their warm-up wins; one chain gets the whole budget.
    ``exact``: a refusal quotes the whole floor (else a lower bound, see ``choose_steps``).
    """
    budget = settings.memory_limit
    if where.kind == "distributed" and where.memory:
        budget = min(budget, int(where.memory * WORKER_FRACTION))
    # auto: as many chains as distributed has threads; on the local schedulers one chain,
    # whose steps use every core (every chunk read once, in disk order, and less CPU than
    # chains that recompute their warm-ups)
    auto = where.total if where.kind == "distributed" else 1
    most = settings.segments if settings.segments is not None else auto
    why = why_one_chain(plan)
    # every count up to 16, then halvings: long_enough() weeds out most without a dry run
    counts = [1] if why else sorted({*range(1, min(most, 16) + 1),
                                     *(max(1, most >> k) for k in range(8))}, reverse=True)
    # threads of the process that runs a chain: a distributed worker's, else sweep.threads
    threads = where.threads if where.kind == "distributed" else settings.threads
    error = None
    for count in counts:
        together = min(count, where.threads)  # chains one worker runs at once
        cand = replace(plan, budget=budget // together,
                       threads=max(1, threads // together))
        if count > 1 and not long_enough(cand, count):
            continue
        try:
            sized, trace = choose_steps(cand, settings.target_slab_bytes, segments=count,
                                        exact=exact)
        except BudgetError as e:
            error = e
            continue
        sized = sized.with_info(segments=len(sized.segments) + 1, together=together,
                                slots=where, worker_budget=budget, one_chain=why)
        return sized, trace
    if where.kind == "distributed" and where.memory and budget < settings.memory_limit:
        floor = error.projected  # the one-chain attempt's floor
        raise BudgetError(
            f"dask_sweep: the workers' memory_limit ({format_bytes(where.memory)}, the "
            f"smallest) is too small for this sweep: a sweep may use {WORKER_FRACTION:.0%} of "
            f"it ({format_bytes(budget)}), below the sweep's floor of {format_bytes(floor)}. "
            f"Start the workers with memory_limit >= {format_bytes(int(floor / WORKER_FRACTION))}"
            f". ({error})", stage=error.stage, projected=floor, budget=budget) from None
    raise error  # the one-chain attempt's refusal (its floor and what sets it)


def rewrite(dsk: Any, result: SweepResult, keys: Any) -> Any:
    """Replace each planned region by its sweep tasks; leave the rest as dask built it."""
    if not result.plans:
        return dsk
    tune_before_running(result)
    return splice(dsk, [plan for plan, _ in result.plans], [trace for _, trace in result.plans],
                  keys)


class SweepPass:
    """A configured sweep pass, usable in ``optimizations=[...]`` or as ``array_optimize``.

    Parameters
    ----------
    memory_limit
        Budget for buffers and slabs in flight, bytes or a string (``"512MiB"``).
    fallback
        ``"raise"``, ``"warn"`` or ``"silent"`` when a plan cannot fit the budget.
    axis
        Sweep axis (default: 0, or the first axis without a periodic boundary).
    threads
        Threads used inside one slab task.
    target_slab_bytes
        Input bytes one slab task aims at.
    reblock
        Let kernels proven block-invariant choose their own slab boundaries.

    Notes
    -----
    Settings not given here are read from ``dask.config`` (``sweep.*``) when the
    pass runs.  Called as ``f(dsk, keys)`` it returns the rewritten graph only;
    chain it before dask's own optimiser (the ``optimizations`` shim and
    :func:`optimize` do).
    """

    def __init__(self, memory_limit: int | str | None = None, **settings: Any) -> None:
        self.overrides = dict(memory_limit=memory_limit, **settings)
        SweepSettings.resolve(**self.overrides)  # validate now, not at compute time

    def settings(self) -> SweepSettings:
        return SweepSettings.resolve(**self.overrides)

    def analyse(self, dsk, keys) -> SweepResult:
        return analyse(dsk, keys, self.settings())

    def __call__(self, dsk, keys, **kwargs):
        return rewrite(dsk, self.analyse(dsk, keys), keys)

    def __repr__(self) -> str:
        given = {k: v for k, v in self.overrides.items() if v is not None}
        return f"dask_sweep.sweep({', '.join(f'{k}={v!r}' for k, v in given.items())})"


def sweep(dsk: Any = None, keys: Any = None, /, **settings: Any):
    """The sweep pass: ``sweep(dsk, keys)`` rewrites a graph; ``sweep(**settings)`` configures.

    Both spellings users write work::

        dask.config.set(optimizations=[dask_sweep.sweep])
        dask.config.set(optimizations=[dask_sweep.sweep(memory_limit="512MiB")])

    Parameters
    ----------
    dsk, keys
        A dask graph and its output keys (when used as an optimisation).
    **settings
        ``memory_limit``, ``fallback``, ``axis``, ``threads``, ``target_slab_bytes``,
        ``reblock`` (see :class:`SweepPass`).

    Returns
    -------
    HighLevelGraph or SweepPass
    """
    if dsk is None:
        warm_kernels()  # switched on by the user: numba's LLVM starts now, not in a run
        return SweepPass(**settings)
    if not hasattr(dsk, "keys") or keys is None:
        raise SweepConfigError(
            "dask_sweep.sweep takes settings as keywords, e.g. sweep(memory_limit='512MiB'); "
            f"got a positional {type(dsk).__name__}."
        )
    return SweepPass(**settings)(dsk, keys)


def optimize(dsk, keys, **kwargs):
    """Drop-in ``array_optimize``: the sweep pass, then dask's default optimiser.

    Use as ``dask.config.set(array_optimize=dask_sweep.optimize)``.
    """
    return then_keeping_priorities(dask_default_optimize, SweepPass()(dsk, keys), keys, **kwargs)


class _Chained:
    """``array_optimize`` that runs a pass, then the optimiser installed before it."""

    def __init__(self, first, then) -> None:
        self.first = first
        self.then = then

    def __call__(self, dsk, keys, **kwargs):
        return then_keeping_priorities(self.then, self.first(dsk, keys), keys, **kwargs)


def array_optimize_shim(dsk, keys, **kwargs):
    """Apply the ``optimizations`` list (dask < 2025.4 semantics), then dask's default."""
    for f in dask.config.get("optimizations", None) or ():
        dsk = f(dsk, keys)
    return then_keeping_priorities(dask_default_optimize, dsk, keys, **kwargs)


def install_shim() -> None:
    """Make ``dask.config.set(optimizations=[...])`` effective again (idempotent)."""
    current = dask.config.get("array_optimize", None)
    if current is None or current is dask_default_optimize:
        dask.config.set(array_optimize=array_optimize_shim)


def active_pass() -> SweepPass | None:
    """The sweep pass switched on now (``enable``, ``array_optimize``, ``optimizations``)."""
    f = dask.config.get("array_optimize", None)
    while isinstance(f, _Chained):
        if isinstance(f.first, SweepPass):
            return f.first
        f = f.then
    if f is optimize:
        return SweepPass()
    for g in dask.config.get("optimizations", None) or ():
        if isinstance(g, SweepPass):
            return g
        if g is sweep:
            return SweepPass()
    return None


def active_settings(**overrides: Any) -> SweepSettings:
    """The settings an entry point runs with: one budget source everywhere.

    An explicit argument (``overrides``; ``None`` means not given) wins, else the
    settings of the sweep pass switched on now (``enable``, ``array_optimize=``,
    ``optimizations=[...]``), else ``dask.config`` (``sweep.*``).  The ndimage
    drop-ins, the DSL and ``imwrite`` size their own buffers from it, so they keep
    the same budget as the sweep.

    >>> with enable(memory_limit="32MiB"):
    ...     active_settings().memory_limit >> 20, active_settings(memory_limit="8MiB").memory_limit >> 20
    (32, 8)
    """
    p = active_pass()
    base = p.overrides if p is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    return SweepSettings.resolve(**{**base, **given})


class enable:  # noqa: N801 - used as ``with dask_sweep.enable(...):``
    """Switch the sweep on for a ``with`` block (or until ``disable()``).

    Parameters are those of :class:`sweep`.  The current ``sweep.*`` config is
    captured now, so the settings travel to a remote scheduler.  Switching on (here or
    with ``sweep(...)``) loads dask_sweep's compiled kernels (numba: about 50 MiB and
    0.15 s once per process, from numba's disk cache), so that no run's budget pays for
    them; a sweep switched on only through the config or ``array_optimize=optimize``
    loads them in the first run that needs one (a median, a ball's morphology).

    Examples
    --------
    >>> import dask_sweep
    >>> with dask_sweep.enable(memory_limit="512MiB"):  # doctest: +SKIP
    ...     y.compute()
    """

    def __init__(self, memory_limit: int | str | None = None, *, _warm: bool = True,
                 **kwargs: Any) -> None:
        if _warm:  # numba's LLVM starts now (~50 MiB, 0.15 s), not inside a run's budget;
            warm_kernels()  # not for dask_sweep's own enables around a compute
        s = SweepSettings.resolve(memory_limit=memory_limit, **kwargs)
        self.pass_ = SweepPass(**dataclasses.asdict(s))  # every setting, captured now
        prev = dask.config.get("array_optimize", None) or dask_default_optimize
        self._cfg = dask.config.set(array_optimize=_Chained(self.pass_, prev))

    def __enter__(self) -> SweepPass:
        return self.pass_

    def __exit__(self, *exc) -> None:
        self._cfg.__exit__(*exc)

    def disable(self) -> None:
        self._cfg.__exit__(None, None, None)


def _serve_io() -> None:
    """Hand io (a leaf: it imports nothing of the plugin) the sweep's settings and plans."""
    from dask_sweep.emit import io_graphs
    from dask_sweep.integration.expr_store import store
    from dask_sweep.io.host import HOST

    HOST.settings = active_settings
    HOST.active_pass = active_pass
    # graph mode's; integration.expr.install hands in one for both modes
    HOST.analyse = lambda x, settings: analyse(x.__dask_graph__(), x.__dask_keys__(), settings)
    HOST.enable = enable
    HOST.reuse = reuse
    HOST.source_array = io_graphs.source_array
    HOST.write_graph = io_graphs.write_graph
    HOST.store = store


_serve_io()
