"""Sizing the slabs of table-pass algorithms (label, EDT) for a budget.

Every table-pass algorithm cuts its input into *slabs*: runs of whole axis-0
chunks of the input, whole in the other axes::

    axis 0 (rows)
      |   chunk rows of the input       slabs (whole chunk rows)
      v   +------------------+          +------------------+
          | row 0            |          |                  |
          +------------------+          |   slab 0         |
          | row 1            |          |                  |
          +------------------+          +------------------+
          | row 2            |          |   slab 1         |
          +------------------+          +------------------+
          | ...              |          | ...              |

A slab is the unit of one task: read, compute, emit.  Its thickness is the
largest number of chunk rows whose *footprint* (bytes per voxel of the pass
times voxels, times the slabs a pass may hold at once) fits the budget next to
the fixed costs (carried planes, tables).  When not even one chunk row fits,
:class:`~dask_sweep.errors.BudgetError` is raised before any I/O.

The footprints of each algorithm's passes are here too, for both front ends:
the ndimage drop-ins (input read by dask tasks or inline) and the DSL (input
computed per slab, with halos).  Nothing here knows dask.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from dask_sweep.config import SweepSettings
from dask_sweep.errors import BudgetError
from dask_sweep.multipass.label import BLOCK_BYTES, numbering_block
from dask_sweep.multipass.label_kernels import LOCAL_TABLES, PAIR_BYTES
from dask_sweep.plan.tables import Footprint, SweepPlan
from dask_sweep.utils import format_bytes

T = TypeVar("T")


def choose_slabs(
    func: str,
    chunks0: Sequence[int],
    plane_voxels: int,
    passes: Sequence[Footprint],
    budget: int,
    target_voxels: int | None = None,
    per_slab: int = 0,
) -> tuple[tuple[int, int], ...]:
    """Group consecutive chunk rows into slabs whose every pass fits the budget.

    Greedy: a slab grows by whole chunk rows while the largest pass footprint
    stays within ``budget`` (and the slab within ``target_voxels``, which keeps
    slabs small enough to pipeline when the budget is generous).  ``per_slab``
    bytes are held for every slab for the whole run (task bookkeeping), so the
    budget left to the slabs shrinks as their number grows: the grouping is
    repeated with the budget less the bookkeeping of the last count until the
    count stops growing.

    Raises
    ------
    BudgetError
        When even the largest single chunk row does not fit; the message names
        the function, the projected bytes and the budget.

    Examples
    --------
    >>> fp = [Footprint("p", 1.0, 1, 0, "")]
    >>> choose_slabs("f", [2, 2, 2], 10, fp, budget=45)
    ((0, 4), (4, 6))
    >>> choose_slabs("f", [2, 2, 2], 10, fp, budget=45, per_slab=3)
    ((0, 2), (2, 4), (4, 6))
    """
    count = 1
    while True:
        slabs = _group(func, chunks0, plane_voxels, passes, budget, target_voxels, per_slab, count)
        if len(slabs) <= count:
            return slabs
        count = len(slabs)


def _group(func, chunks0, plane_voxels, passes, budget, target_voxels, per_slab, count):
    room = budget - per_slab * count

    def need(rows: int) -> int:
        return max((p.bytes_for(rows * plane_voxels) for p in passes), default=0)

    worst = max(chunks0, default=0)
    if need(worst) > room:
        p = max(passes, key=lambda p: p.bytes_for(worst * plane_voxels))
        book = (
            f" + dask's bookkeeping of {count} slabs x {format_bytes(per_slab)}"
            if per_slab and count > 1
            else ""
        )
        raise BudgetError(
            f"{func}: even the thinnest slab (one chunk row of {worst} rows along axis 0) "
            f"needs a projected {format_bytes(need(worst))} in {p.name} "
            f"({p.per_voxel:g} B/voxel x {p.in_flight} slab(s) + {format_bytes(p.fixed)} "
            f"fixed){book}, over the memory budget of {format_bytes(budget)}. Raise "
            "memory_limit or rechunk the input to thinner rows along axis 0.",
            stage=func,
            projected=need(worst) + per_slab * count,
            budget=budget,
        )
    slabs: list[tuple[int, int]] = []
    start = stop = 0
    for c in chunks0:
        rows = stop - start + c
        fits = need(rows) <= room and (
            target_voxels is None or rows * plane_voxels <= target_voxels
        )
        if stop > start and not fits:
            slabs.append((start, stop))
            start = stop
        stop += c
    if stop > start or not slabs:
        slabs.append((start, stop))
    return tuple(slabs)


# --------------------------------------------------------------------------- label

# A sweep reading a slab of the drop-in's output holds it three times over at its peak
# (``explain`` of a labels write: its ring, the step's slab, the write's temporaries).
CONSUMER = 3.0


def label_footprints(
    shape: tuple[int, ...],
    item: int,
    settings: SweepSettings,
    out_dtype: np.dtype,
    inline: bool,
    read: float | None = None,
    read_fixed: int = 0,
    consumer: bool = True,
    local_threads: int | None = None,
    pair_bytes: float = PAIR_BYTES,
    table_bytes: float = LOCAL_TABLES,
) -> tuple[Footprint, Footprint]:
    """The two passes' footprints.

    With ``consumer``, the second pass leaves room for a sweep that reads the labels
    as they are emitted (a write with ``to_zarr`` / ``da.store`` under ``enable``):
    :data:`CONSUMER` bytes per voxel of one slab.  The DSL's own reading of the labels
    is planned by its pass (``consumer=False``).

    ``read`` replaces the bytes per voxel of reading a slab (default: the blocks and
    their concatenation, ``2 x item``) and ``read_fixed`` is added to the fixed
    bytes: the DSL computes its input stream per slab, with halos; a split plan
    unpacks its slabs from bit-packed rows (``read=0``; it adds the rows to ``fixed``).

    One slab at a time is labelled (``multipass.label._LABELLING``); the model still counts
    every slab in flight at its largest phase.  ``local_threads``: the threads of pass 1
    (default ``settings.threads``; ``ndimage.label`` and ``dsl.label`` plan with one
    where the budget is too small for more).  Pass 2's slabs are tasks: as many run at
    once as the scheduler has threads.  ``pair_bytes``: the face step's peak per voxel of
    a face (:func:`~dask_sweep.multipass.label_kernels.pair_bytes` of the structure;
    default its worst case); ``table_bytes``: the local labeller's tables per voxel of a
    slab (:func:`~dask_sweep.multipass.label_kernels.table_bytes`; default cc3d's).
    """
    plane = int(np.prod(shape[1:], dtype=np.int64))
    out = out_dtype.itemsize
    threads = max(1, settings.threads)
    local_threads = max(1, local_threads or threads)
    # Local labelling holds the largest of its phases: reading (the blocks and their
    # concatenation, 2 x item, then the mask next to the slab: + 1), and labelling
    # (mask 1, labels 4, the labeller's own tables: table_bytes).
    read = 2 * item if read is None else read
    # (+ the mask packed, 1/8, where pass 1 keeps it for pass 2)
    local = max(read + 1 + 0.125, 1 + 4 + table_bytes)
    # The link step (one at a time, next to the slabs in flight): B, 4 B per label, with
    # at most one label per 2 voxels (face connectivity's worst case) -> 2 B per voxel.
    p1 = local + 2.0 / local_threads
    # Face planes (4 B per voxel): top and bottom of the slab being linked and of each
    # slab in flight, and the top of the one below it: 2 x threads + 3; the face kernel
    # and the link step (pair_bytes per voxel of a plane: the bound, one distinct pair per
    # voxel, or one per two with face connectivity; alternate columns, a pair at every
    # other voxel, the worst case measured).
    # The numbering, after pass 1, holds less: a slab's pairs, the B values linked up
    # and down (<= 24 B per voxel of a plane), its B, int64 lookup table and the B values
    # below (<= 8 B per voxel of a slab: one label per two voxels at most).
    face = plane * (4 * (2 * local_threads + 3) + pair_bytes)
    # Relabel: the lookup table (out per label, <= 1/2 per voxel) next to the local
    # labelling, then the labels mapped through it: in place for int32 (the labels'
    # buffer becomes the output block), else into a new block (out).  For an external
    # input the numbering chain runs next to it: B (4) and int64 ids (8) per label;
    # inline, it has finished before pass 2 starts.
    mapped = 4 + (0 if out_dtype == np.int32 else out)
    p2 = max(local, mapped) + out / 2 + (0 if inline else (12 + out) / 2 / threads)
    numbering = numbering_block(settings.memory_limit) * BLOCK_BYTES  # its block temporaries
    return (
        # + the runtime overhead (sweep.runtime-overhead): resident memory beyond the arrays
        Footprint(
            "label-local",
            p1,
            local_threads,
            face + settings.runtime_overhead + threads * read_fixed,
            "read, local label (run kernel, cc3d or scipy; slabs in flight), backward link chain",
        ),
        Footprint(
            "relabel",
            p2,
            threads,
            numbering + settings.runtime_overhead + threads * read_fixed,
            "the labels pass 1 kept, else read and label again; lookup table, emit",
            CONSUMER * out if consumer else 0.0,
        ),
    )


def on_fewest_threads(settings: SweepSettings, attempt: Callable[[int], T]) -> T:
    """``attempt(threads)`` for label's pass 1 on all of ``settings.threads``, else (a
    budget too small for their slabs in flight and faces: :class:`BudgetError`) on one;
    the last refusal is raised.  Both front ends plan label through this."""
    choices = sorted({max(1, settings.threads), 1}, reverse=True)
    for k, threads in enumerate(choices):
        try:
            return attempt(threads)
        except BudgetError:
            if k == len(choices) - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def label_split(func, shape, chunks, item, settings, out_dtype, target, consumer=True,
                local_threads=None, pair_bytes=PAIR_BYTES, decode=None,
                table_bytes=LOCAL_TABLES):
    """Slabs cut within chunk rows too thick for one: ``(passes, per_slab, slabs, split)``.

    Each chunk row is read once per pass, block by block, into a mask packed to
    one bit per voxel (:func:`~dask_sweep.multipass.label.read_row`), and its slabs
    are unpacked from it.
    ``split[s]`` is ``(row, a, b)``: slab ``s`` is planes ``a:b`` of chunk row
    ``row``.  Pass 1 holds a packed row per thread labelling (slabs are taken in
    order: a row is dropped by its last slab, the next read by its first), pass 2 one
    (a row read again, one at a time in a process); each, one block's read.
    ``decode``: bytes per voxel a block of the input's source holds while it is read
    (:func:`~dask_sweep.patterns.readers.decode_bytes`; default three copies of ``item``).

    Raises
    ------
    BudgetError
        When not even one plane per slab fits.
    """
    chunks0 = tuple(int(c) for c in chunks[0])
    plane = int(np.prod(shape[1:], dtype=np.int64))
    row_bits = max(chunks0) * int(np.prod(shape[1:-1], dtype=np.int64))
    packed = row_bits * math.ceil(shape[-1] / 8)
    # One block at a time (a strip of blocks along the last axis when the blocks do not
    # start on whole bytes): its inputs, the block and its mask.
    last = chunks[-1]
    aligned = all(c % 8 == 0 for c in last[:-1])
    block = max(chunks0) * int(np.prod([max(c) for c in chunks[1:-1]], dtype=np.int64))
    block *= max(last) if aligned else shape[-1]
    # A block's read, per voxel: its source's read and decode, the mask and its bits
    # (traced peaks of read_row beside its row, Zarr blocks of noise, 32^3-128^3: 4.1-4.5
    # B uint8, 6.3-6.7 uint16, 12.7-13.1 float32 sources), or a strip and its join.
    decode = 3.0 * item if decode is None else decode
    block_read = int(block * max(2 * item + 2, decode + 1.5))
    # Pass 1's slabs are taken in order from the rows (multipass.label._SharedRow): a row
    # is dropped as its last slab takes its planes, so each thread labelling holds at
    # most one row.  In pass 2 each slab in flight reads its planes, or (its row's mask
    # not kept: another process, a full disk) its whole row again, block by block, one
    # row at a time in a process (multipass.label._ROW_READS).
    rows_fixed = (max(1, local_threads or settings.threads) * packed + block_read,
                  packed + block_read)

    def footprints(s: SweepSettings) -> tuple[Footprint, ...]:
        return tuple(
            dataclasses.replace(p, fixed=p.fixed + extra)
            for p, extra in zip(
                label_footprints(shape, item, s, out_dtype, True, read=0,
                                 consumer=consumer, local_threads=local_threads,
                                 pair_bytes=pair_bytes, table_bytes=table_bytes),
                rows_fixed)
        )

    passes = footprints(settings)
    # A pass-2 task per slab, plus a consumer's two.
    per_slab = settings.task_overhead * 3
    count = len(chunks0)
    while True:
        room = settings.memory_limit - per_slab * count
        try:
            cut = choose_slabs(func, (1,) * max(chunks0), plane, passes, room, target)
        except BudgetError:
            # quote the floor: the smallest slabs' passes and dask's bookkeeping of as
            # many slabs as they make (thinner slabs need less, but are more)
            def total(k: int, passes: tuple) -> tuple[int, int, int]:
                n = sum(math.ceil(h / k) for h in chunks0)
                need = max(p.bytes_for(k * plane) for p in passes)
                return need + per_slab * n, need, n

            def smallest(s: SweepSettings) -> tuple[int, int, int]:
                at = footprints(s)
                return min((total(k, at) for k in range(1, max(chunks0) + 1)),
                           key=lambda t: t[0])

            # The numbering's block grows with the budget (1/64 of it): the floor is
            # where the smallest total fits a budget of that total.
            floor, need, n = smallest(settings)
            for _ in range(16):
                again = smallest(settings.with_(memory_limit=floor))
                if again[0] <= floor:
                    break
                floor, need, n = again
            raise BudgetError(
                f"{func}: its floor is a projected {format_bytes(floor)} "
                f"({format_bytes(need)} for the slab's passes + {format_bytes(floor - need)} "
                f"of dask's bookkeeping of {n} slabs), over the memory budget of "
                f"{format_bytes(settings.memory_limit)}. Raise memory_limit (or give the "
                "input fewer, thicker chunk rows along axis 0, so there are fewer slabs).",
                stage=func, projected=floor, budget=settings.memory_limit,
            ) from None
        k = max(b - a for a, b in cut)
        new = sum(math.ceil(h / k) for h in chunks0)
        if new <= count:
            break
        count = new
    split, slabs, start = [], [], 0
    for r, h in enumerate(chunks0):
        parts = math.ceil(h / k)
        sizes = [h // parts + (i < h % parts) for i in range(parts)]
        a = 0
        for m in sizes:
            split.append((r, a, a + m))
            slabs.append((start + a, start + a + m))
            a += m
        start += h
    return passes, per_slab, tuple(slabs), split


def plan_label_stream(
    shape: tuple[int, ...],
    dtype: Any,
    chunks0: tuple[int, ...],
    out_dtype: np.dtype,
    settings: SweepSettings,
    read: float,
    read_fixed: int,
    func: str,
    slab_budget: int | None = None,
    pair_bytes: float = PAIR_BYTES,
    table_bytes: float = LOCAL_TABLES,
) -> SweepPlan:
    """The plan of labelling an input computed slab by slab in the process (the DSL's).

    Parameters
    ----------
    shape, dtype, chunks0
        The input's shape, dtype and the row grid its slabs may be cut on.
    out_dtype
        The labels' dtype.
    settings
        The run's settings (budget, threads, target slab size).
    read, read_fixed
        Bytes per voxel, and fixed bytes (halos), of computing one slab of the input.
    func
        The name errors and ``explain`` give.
    slab_budget
        The budget the slabs are sized for (default the whole ``memory_limit``):
        less when the pass that reads the output needs room of its own.
    pair_bytes
        The face step's peak per voxel of a face (by the structure; default its worst
        case).
    table_bytes
        The local labeller's tables per voxel of a slab (by the structure; default
        cc3d's).

    Raises
    ------
    BudgetError
        When even one row of ``chunks0`` does not fit the budget.
    """
    item = np.dtype(dtype).itemsize
    def attempt(threads: int) -> SweepPlan:
        passes = label_footprints(shape, item, settings, out_dtype, True, read, read_fixed,
                                  consumer=False, local_threads=threads,
                                  pair_bytes=pair_bytes, table_bytes=table_bytes)
        return _stream_plan(func, shape, dtype, chunks0, passes, settings, slab_budget)

    plan = on_fewest_threads(settings, attempt)
    return label_notes(plan, out_dtype)


def _stream_plan(func, shape, dtype, chunks0, passes, settings, slab_budget) -> SweepPlan:
    """The DSL's table pass on ``passes``: slabs sized for ``slab_budget`` (default the
    whole budget), its input computed in the process (inline)."""
    plane = int(np.prod(shape[1:], dtype=np.int64))
    target = max(1, settings.target_slab_bytes // np.dtype(dtype).itemsize)
    budget = slab_budget or settings.memory_limit
    return SweepPlan(
        func=func,
        shape=tuple(shape),
        dtype=np.dtype(dtype),
        in_chunks0=tuple(chunks0),
        slabs=choose_slabs(func, chunks0, plane, passes, budget, target),
        passes=tuple(passes),
        budget=settings.memory_limit,
        inline=True,
    )


def label_notes(
    plan: SweepPlan, out_dtype: np.dtype, split: list | None = None, reserve: int | None = None
) -> SweepPlan:
    """``plan`` with the labelling's notes for ``explain`` (tables kept up to ``reserve``,
    default :func:`table_reserve`; split rows; dtype)."""
    reserve = table_reserve(plan) if reserve is None else reserve
    within = ()
    if split:
        within = (
            f"chunk rows of up to {max(plan.in_chunks0)} planes do not fit one slab: each "
            f"row is read {'once' if plan.input_reads == 1 else 'once per pass'}, block "
            "by block, into a mask of one bit per voxel, "
            f"and labelled in {len(split)} slabs within the rows",
        )
    kept = ()
    if plan.kept == "labels":
        kept = (
            "pass 1 keeps its local labels (1-4 B per voxel, by the slab's label count, "
            "compressed: runs of equal ids take a fraction of that) "
            "in an unlinked file in dask's temporary-directory (up to "
            f"{format_bytes(plan.bytes_written)}; its page cache holds them), and pass 2 "
            "maps them there: the input is read and labelled once (read and labelled "
            "again where they could not be kept: a full disk, or pass 2 in another "
            "process)",
        )
    elif not plan.inline:
        kept = (
            "an input dask computes is computed once: pass 1 writes the masks it "
            "computes, one bit per voxel, to .npy files in dask's temporary-directory "
            f"({format_bytes(plan.bytes_written)}), and pass 2 reads them (so the input's "
            "blocks are not held between the passes)",
        )
    elif plan.kept:
        kept = (
            "pass 1 keeps the masks it reads, one bit per voxel, in an unlinked file in "
            f"dask's temporary-directory ({format_bytes(plan.bytes_written)}), and pass 2 "
            "reads them there: the input is read once (read again where they could not "
            "be kept: a full disk, or pass 2 in another process)",
        )
    notes = within + kept + (
        "pass 1 runs from the last slab to the first; numbering: a forward chain over "
        "the tables only (no input read)",
        f"tables (data-dependent: 4 B per local label + 8 B per face pair, then "
        f"{out_dtype.itemsize} B per label): kept in memory up to "
        f"{format_bytes(reserve)} (the budget left by the passes), beyond that "
        "spilled to .npy files in dask's temporary-directory (written once, read once)",
        f"output dtype {out_dtype}",
    )
    return SweepPlan(**{**plan.__dict__, "notes": notes})


def table_reserve(plan: SweepPlan) -> int:
    """Bytes of tables kept in memory: what the slab footprints leave of the budget."""
    return max(0, plan.budget - plan.projected_peak)


def row_slabs(func, chunks0, plane, passes, budget, target, per_slab):
    """:func:`choose_slabs`, and each slab's axis-0 block indices."""
    slabs = choose_slabs(func, chunks0, plane, passes, budget, target, per_slab)
    # Map row bounds back to block indices (slabs are whole chunk rows).
    edges = np.cumsum((0, *chunks0))
    bounds = []
    for a, b in slabs:
        i0 = int(np.searchsorted(edges, a))
        i1 = int(np.searchsorted(edges, b))
        bounds.append(list(range(i0, i1)))
    return bounds, slabs


# --------------------------------------------------------------------------- EDT


def edt_footprints(
    shape: tuple[int, ...], item: int, settings: SweepSettings,
    read_excess: tuple[int, int] = (0, 0),
) -> tuple[Footprint, Footprint]:
    """The drop-in's two passes (a forward chain, then a distance step per slab).

    ``read_excess``: per pass, the bytes one block's read holds beyond what the pass
    counts per voxel of its slab (its source decoded beside the slab's blocks:
    :func:`~dask_sweep.patterns.readers.decode_excess`), added to its fixed bytes.
    """
    plane = int(np.prod(shape[1:], dtype=np.int64))
    longest = max(shape[1:], default=1)

    # Reading a slab of several blocks holds the blocks and their concatenation (2 x).
    # fixed parts include the runtime overhead (sweep.runtime-overhead): resident
    # memory beyond the arrays
    fwd = Footprint(
        "forward",
        2 * item + 1 + 0.125,  # + the packed mask of an input dask computes
        1,
        # the carry read, F, the down edge D, a plane of INF, a spilled plane's narrowing
        5 * 4 * plane + settings.runtime_overhead + read_excess[0],
        "read, foreground mask, up-distance chained into F, the slab's own down edge D",
    )
    # + squared distances = the output block (8) and the block before it still
    # held by its consumer (8); F, B and a scratch plane; line buffers per thread.
    # One slab at a time in a process (multipass.edt.distance_step).
    bwd = Footprint(
        "distances",
        2 * item + 1 + 16,
        1,
        3 * 4 * plane + settings.threads * 32 * longest + settings.runtime_overhead
        + read_excess[1],
        "read again, up/down distances from F and B, in-plane envelopes, sqrt (any order)",
    )
    return fwd, bwd


# forward, distances, plus two of a consumer's per output block (an external
# input's own tasks are not counted)
EDT_TASKS_PER_SLAB = 4


def edt_plan(
    func: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunks0: tuple[int, ...],
    slabs: tuple[tuple[int, int], ...],
    passes: tuple[Footprint, Footprint],
    sampling: tuple[float, ...],
    settings: SweepSettings,
    inline: bool,
) -> tuple[SweepPlan, bool]:
    """The drop-in's plan on ``slabs``, and whether its boundary planes are spilled.

    The boundary planes ``F``, ``D`` and ``B`` (an int32 plane of each per slab but
    one) are kept in memory, counted as fixed bytes of both passes, when they fit
    next to a slab; otherwise each goes to a ``.npy`` file.  An input dask computes
    (not ``inline``) is computed once: pass 1 writes its packed masks for pass 2.
    """
    plane = int(np.prod(shape[1:], dtype=np.int64))
    per_slab = settings.task_overhead * EDT_TASKS_PER_SLAB
    fwd, bwd = passes
    n = len(slabs)
    boundary = 3 * 4 * plane * (n - 1)  # F, D and B
    common = dict(
        func=func,
        shape=tuple(shape),
        dtype=np.dtype(dtype),
        in_chunks0=tuple(chunks0),
        slabs=slabs,
        budget=settings.memory_limit,
        inline=inline,
        per_slab=per_slab,
        input_reads=2 if inline else 1,
    )
    kept = tuple(dataclasses.replace(p, fixed=p.fixed + boundary) for p in (fwd, bwd))
    spill = SweepPlan(passes=kept, **common).projected_peak > settings.memory_limit
    planes = f"boundary planes F, D, B: 3 x {n - 1} x {format_bytes(4 * plane)}"
    if spill:
        note = (f"{planes} spilled to .npy files in a temporary directory (written once, "
                "read back by the steps that need them; 1, 2 or 4 B per voxel by the "
                "plane's longest distance: the bytes written are at most those below)")
        written = boundary
    else:
        note = f"{planes} kept in memory (counted as fixed bytes)"
        fwd, bwd = kept
        written = 0
    reads = "read again by pass 2"
    if not inline:  # pass 2 reads the packed masks pass 1 wrote, not the input
        written += sum((b - a) * -(-plane // 8) for a, b in slabs)  # packed by row
        reads = ("computed once: pass 1 writes its packed foreground (1 bit per voxel) "
                 "to a temporary file that pass 2 reads")
    notes = (
        note,
        f"the input is {reads}; backward chain: over the D planes only, one task",
        f"sampling {sampling}; output float64, blocks independent (any order, one at a "
        "time in a process)",
    )
    plan = SweepPlan(passes=(fwd, bwd), bytes_written=written, notes=notes, **common)
    return plan, spill


def plan_edt_stream(
    shape: tuple[int, ...],
    dtype: Any,
    chunks0: tuple[int, ...],
    sampling: tuple[float, ...],
    settings: SweepSettings,
    read: float,
    read_fixed: int,
    func: str,
    slab_budget: int | None = None,
) -> SweepPlan:
    """The plan of the distance transform of an input computed slab by slab (the DSL's).

    Pass 1 ("edges") computes every slab's own up/down distances (any order,
    ``threads`` slabs in flight), the carries are chained over those planes
    only, and pass 2 ("distances") turns any slab into its output block.  The
    parameters are :func:`plan_label_stream`'s, with ``sampling`` (normalised) for
    ``out_dtype``.
    """
    plane = int(np.prod(shape[1:], dtype=np.int64))
    longest = max(shape[1:], default=1)
    threads = max(1, settings.threads)
    edges = Footprint(
        "edges",
        read + 1,
        threads,
        threads * (2 * 4 * plane + read_fixed) + settings.runtime_overhead,
        "compute the input slab, foreground, its own up/down distances (any order)",
    )
    # + squared distances = the output block (8) and the block before it, still held
    # by the next stage (8); carries and line buffers per thread.
    dist = Footprint(
        "distances",
        read + 1 + 16,
        1,
        3 * 4 * plane + threads * 32 * longest + read_fixed + settings.runtime_overhead,
        "compute the input slab again, axis-0 distances from the carries, in-plane "
        "envelopes, sqrt",
    )
    plan = _stream_plan(func, shape, dtype, chunks0, (edges, dist), settings, slab_budget)
    notes = (
        f"tables: up-carries F, the slabs' own down edges and down-carries B, 3 x "
        f"{len(plan.slabs)} x {format_bytes(4 * plane)}, chained over the edge planes only "
        "(no input read)",
        f"sampling {sampling}; output float64, slabs in any order",
    )
    return dataclasses.replace(plan, notes=notes)
