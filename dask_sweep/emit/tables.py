"""The drop-ins' graphs: :mod:`dask_sweep.multipass`'s steps as dask tasks.

``ndimage.label`` and ``ndimage.distance_transform_edt`` plan their slabs
(:mod:`dask_sweep.passes.tables`) and read them with
:func:`dask_sweep.patterns.readers.make_readers`; here each step becomes a task::

    label, inline input    label-resolve-T: pass 1 and the numbering, one task
                           (label-T, s, 0, ..): pass 2, one task per slab; label-num-T
    label, input that      (label-local-T, s), (label-face-T, s), (label-link-T, s):
      dask computes        pass 1 backward (writes the masks); (label-number-T, s)
                           forward; pass 2 as above, reading the masks, after the numbering
    EDT                    (edt-fwd-T, s) forward chain; edt-tables-T: the backward
                           chain over its planes, one task; (distance-transform-edt-T,
                           s, ..): pass 2, one task per slab

The output layer carries the bytes its last pass holds while a sweep consumes
it (:data:`~dask_sweep.plan.ir.FEEDING`), so that sweep plans for the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dask._task_spec import Task, TaskRef
from dask.base import tokenize

from dask_sweep.config import SweepSettings, temporary_directory
from dask_sweep.emit.io_graphs import array_of
from dask_sweep.multipass import spill as _spill
from dask_sweep.multipass.edt import distance_step, forward_step, tables_step
from dask_sweep.multipass.label import (
    count,
    face_step,
    link_step,
    local_step,
    number_step,
    numbering_block,
    pass2,
    pass2_split,
    resolve,
)
from dask_sweep.multipass.spill import KeptArrays, KeptLabels, KeptMasks
from dask_sweep.plan.ir import DROPIN_PLAN, FEEDING, FEEDING_BUDGET
from dask_sweep.plan.tables import SweepPlan

__all__ = ["edt_graph", "label_graph"]


def label_graph(
    plan: SweepPlan,
    image: Any,
    readers: list,
    st: np.ndarray,
    out_dtype: np.dtype,
    settings: SweepSettings,
    reserve: int,
    split: list | None,
) -> tuple[Any, Any]:
    """``ndimage.label``'s labels and count as dask arrays, from its plan and slab readers.

    Inline reads: one task for pass 1 and the numbering
    (:func:`~dask_sweep.multipass.label.resolve`), then a pass-2 task per slab; an
    input dask computes: per-slab tasks of each step (:func:`_stage_graph`); slabs
    within chunk rows: :func:`_split_graph`.
    """
    # pass 1's threads: the plan's (one where the budget leaves no room for more)
    threads = plan.passes[0].in_flight
    token = tokenize(image.name, st, out_dtype, plan.slabs, threads, reserve)
    num, out = f"label-num-{token}", f"label-{token}"
    nz = (0,) * (image.ndim - 1)
    block = numbering_block(settings.memory_limit)
    tune = settings.tune_malloc  # freed slabs leave the process at once
    kept = _kept(plan, image, split)
    if split is not None:
        return _split_graph(plan, image, readers, split, st, out_dtype, settings, reserve,
                            token, kept)
    if plan.inline:
        res = f"label-resolve-{token}"
        dsk: dict = {
            res: Task(
                res, resolve, readers, st, out_dtype, reserve, block, threads, tune,
                kept=kept,
            )
        }
        first = [res] * len(readers)
    else:
        # an input dask computes is computed once: pass 1 writes its masks for pass 2
        masks = (_spill.new_dir("label", "-masks"), int(image.shape[-1]))
        dsk, first = _stage_graph(readers, st, out_dtype, reserve, block, settings, token,
                                  masks[0], threads)
    dsk[(num,)] = Task((num,), count, TaskRef(first[-1]))
    for s, r in enumerate(readers):  # pass 2: independent slabs
        key = (out, s, *nz)
        if plan.inline:
            dsk[key] = Task(key, pass2, r, st, TaskRef(first[s]), s, out_dtype, tune,
                            kept=kept)
            continue
        # each slab waits for the whole numbering chain, not only its own step: blocks
        # hanging off a chain are all computed before their consumers by dask.order
        dsk[key] = Task(key, pass2, r, st, TaskRef(first[s]), s, out_dtype, tune,
                        TaskRef(first[-1]), masks=masks)
    return _label_arrays(dsk, plan, image, out, num, out_dtype)


def _kept(plan: SweepPlan, image: Any, split: list | None) -> KeptArrays | None:
    """Where pass 1 keeps what pass 2 needs, as the plan says (``plan.kept``): the local
    labels per slab; or the masks read, per chunk row when slabs lie within rows, else
    per slab."""
    slabs = [(b - a, *image.shape[1:]) for a, b in plan.slabs]
    if plan.kept == "labels":
        return KeptLabels(slabs, temporary_directory())
    if plan.kept != "masks":
        return None
    rows = [(int(h), *image.shape[1:]) for h in image.chunks[0]]
    return KeptMasks(rows if split is not None else slabs, image.shape[-1],
                     temporary_directory())


def _label_arrays(dsk: dict, plan: SweepPlan, image: Any, out: str, num: str, out_dtype: np.dtype):
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    deps = () if plan.inline else (image,)
    # two layers, each with its own array's shape and chunks (graph optimisers, the sweep's
    # among them, read a layer's collection annotations): the labels' blocks, and the rest
    # (passes 1, the resolve step, the count) that they depend on
    blocks = {k: v for k, v in dsk.items() if isinstance(k, tuple) and k[0] == out}
    rest = {k: v for k, v in dsk.items() if k not in blocks}
    g_num = HighLevelGraph.from_collections(num, MaterializedLayer(rest), dependencies=deps)
    count = array_of(g_num, num, (), np.empty((), dtype=np.intp))
    # what pass 2 holds while a sweep consumes the labels: that sweep plans for the rest
    layer = MaterializedLayer(blocks, collection_annotations={FEEDING: plan.feeding_bytes,
                                                       FEEDING_BUDGET: plan.budget,
                                                       DROPIN_PLAN: plan})
    g_out = HighLevelGraph.from_collections(out, layer, dependencies=(*deps, count))
    rows = tuple(b - a for a, b in plan.slabs)
    chunks = (rows,) + tuple((m,) for m in image.shape[1:])
    labels = array_of(g_out, out, chunks, np.empty((0,) * image.ndim, dtype=out_dtype))
    return labels, count


def _split_graph(plan, image, readers, split, st, out_dtype, settings, reserve, token,
                 kept=None):
    """The graph of slabs within chunk rows: pass 1 as one task, then per slab a
    pass-2 task that reads its own planes (kept labels, its part of the row's kept
    mask, else the row again), independent of the others."""
    num, out = f"label-num-{token}", f"label-{token}"
    res = f"label-resolve-{token}"
    nz = (0,) * (image.ndim - 1)
    tune = settings.tune_malloc
    chunks0 = image.chunks[0]
    shapes = [(int(h), *image.shape[1:]) for h in chunks0]
    chunks = tuple(image.chunks[1:])
    block = numbering_block(settings.memory_limit)
    dsk: dict = {
        res: Task(
            res, resolve, readers, st, out_dtype, reserve, block, plan.passes[0].in_flight,
            tune, None, (split, shapes, chunks), kept,
        )
    }
    dsk[(num,)] = Task((num,), count, TaskRef(res))
    parts: dict = {}
    for r, _, _ in split:
        parts[r] = parts.get(r, 0) + 1
    for s, (r, a, b) in enumerate(split):
        key = (out, s, *nz)
        dsk[key] = Task(
            key, pass2_split, kept, r, readers[r], shapes[r], chunks, parts[r], a, b, st,
            TaskRef(res), s, out_dtype, tune,
        )
    return _label_arrays(dsk, plan, image, out, num, out_dtype)


def _stage_graph(readers, st, out_dtype, reserve, block, settings, token,
                 mask_dir: str, threads: int) -> tuple[dict, list]:
    """Pass 1 and the numbering as per-slab tasks, for an input dask computes (external).

    The input blocks are then dependencies of the local tasks, one slab's worth at a
    time; returns the graph and the key each pass-2 slab waits for.  ``threads``: local
    slabs in flight (pass 1's, as planned).
    """
    loc, fac, lnk = f"label-local-{token}", f"label-face-{token}", f"label-link-{token}"
    numb = f"label-number-{token}"
    n = len(readers)
    ahead = max(1, threads)  # finished local slabs waiting for the link chain
    dsk: dict = {}
    for s in range(n - 1, -1, -1):  # pass 1: backward
        r = readers[s]
        ext = [TaskRef(k) for k in r.block_keys()]
        after = TaskRef((lnk, s + ahead)) if s + ahead < n else None
        dsk[(loc, s)] = Task((loc, s), local_step, r, st, after, settings.tune_malloc, *ext,
                             s=s, mask_dir=mask_dir)
        pairs = prev = None
        if s + 1 < n:
            dsk[(fac, s)] = Task((fac, s), face_step, TaskRef((loc, s)), TaskRef((loc, s + 1)), st)
            pairs, prev = TaskRef((fac, s)), TaskRef((lnk, s + 1))
        dsk[(lnk, s)] = Task((lnk, s), link_step, TaskRef((loc, s)), pairs, prev, reserve, s)
    for s in range(n):  # numbering: forward over the tables
        prev = TaskRef((numb, s - 1)) if s else None
        dsk[(numb, s)] = Task(
            (numb, s), number_step, TaskRef((lnk, s)), prev, out_dtype, reserve, block, s
        )
    return dsk, [(numb, s) for s in range(n)]


def edt_graph(
    plan: SweepPlan,
    image: Any,
    readers: list,
    samp: tuple[float, ...],
    settings: SweepSettings,
    spill: bool,
) -> Any:
    """``ndimage.distance_transform_edt``'s output as a dask array, from its plan and readers.

    A forward chain (its F and D planes spilled to ``.npy`` files when the plan says
    so), one task for the backward chain over the D planes, then a distance task per
    slab.
    """
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    # spill paths must be unique per call; an input dask computes leaves its masks there
    spill_dir = _spill.new_dir("edt") if spill else None
    mask_dir = None if plan.inline else _spill.new_dir("edt", "-masks")
    token = tokenize(image.name, samp, plan.slabs, settings.threads, spill_dir, mask_dir)
    fwd, tab = f"edt-fwd-{token}", f"edt-tables-{token}"
    out = f"distance-transform-edt-{token}"
    n = len(readers)
    nz = (0,) * (image.ndim - 1)
    tune = settings.tune_malloc
    dsk: dict = {}
    for s, r in enumerate(readers):
        ext = [] if r.inline else [TaskRef(k) for k in r.block_keys()]
        prev = TaskRef((fwd, s - 1)) if s else None
        dsk[(fwd, s)] = Task(
            (fwd, s), forward_step, r, prev, s, s + 1 == n, spill_dir, mask_dir, tune, *ext
        )
    rows = tuple(b - a for a, b in plan.slabs)
    plane = int(np.prod(image.shape[1:], dtype=np.int64))
    dsk[tab] = Task(tab, tables_step, rows, plane, spill_dir,
                    *(TaskRef((fwd, s)) for s in range(n)))
    for s, r in enumerate(readers):
        # an input dask computes is not asked for again: pass 2 reads pass 1's masks
        prev = TaskRef((fwd, s - 1)) if s else None
        dsk[(out, s, *nz)] = Task(
            (out, s, *nz), distance_step, r, prev, TaskRef(tab), s, plan.slabs[s], samp,
            tuple(image.shape), settings.threads, (spill_dir, mask_dir), tune,
        )
    deps = () if plan.inline else (image,)
    # what the last pass holds while a sweep consumes the distances: that sweep plans for the rest
    layer = MaterializedLayer(dsk, collection_annotations={FEEDING: plan.feeding_bytes,
                                                       FEEDING_BUDGET: plan.budget,
                                                       DROPIN_PLAN: plan})
    graph = HighLevelGraph.from_collections(out, layer, dependencies=deps)
    chunks = (rows,) + tuple((m,) for m in image.shape[1:])
    return array_of(graph, out, chunks, np.empty((0,) * image.ndim, dtype=np.float64))
