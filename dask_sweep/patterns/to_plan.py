"""Recognised region → sweep plan (stages in topological order, outputs, sinks)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from dask._task_spec import TaskRef
from dask.highlevelgraph import HighLevelGraph

from dask_sweep.config import temporary_directory
from dask_sweep.errors import NotSweepable
from dask_sweep.io.planes import zarr_planes
from dask_sweep.io.staging import StagedWriter
from dask_sweep.io.zarr_io import write_temporaries, write_whole_chunks
from dask_sweep.patterns.kernels import (
    kernel_stage,
    mapped_shifts,
    running_stage,
    separable_block_fn,
)
from dask_sweep.patterns.layers import BlockwiseEval, array_meta, is_pure_elementwise
from dask_sweep.patterns.readers import make_reader
from dask_sweep.patterns.recognise import Region
from dask_sweep.plan.ir import DROPIN_PLAN, Blocked, Output, Plan, Pointwise, Source, Stage
from dask_sweep.runtime import jit as numba_jit
from dask_sweep.runtime.morphology import BoolShifts
from dask_sweep.runtime.rank import MedianPlanes
from dask_sweep.utils import format_bytes


class OverlapBlockFn:
    """One block of ``map_overlap``: dask's function, then dask's trim."""

    def __init__(self, func_eval: BlockwiseEval, trim_eval: BlockwiseEval, positions) -> None:
        self.func_eval = func_eval
        self.trim_eval = trim_eval
        self.positions = list(positions)
        self.trim_pos = trim_eval.array_args()[0][0]

    def __call__(self, idx, *regions):
        out = self.func_eval(idx, dict(zip(self.positions, regions)))
        return self.trim_eval(idx, {self.trim_pos: out})


class ElementwiseBlockFn:
    """One block of an elementwise / map_blocks layer, from dask's template."""

    def __init__(self, ev: BlockwiseEval, positions) -> None:
        self.ev = ev
        self.positions = list(positions)

    def __call__(self, idx, *blocks):
        return self.ev(idx, dict(zip(self.positions, blocks)))


class SlabFn:
    """A pure elementwise layer on any slab: dask's template with the slab as its block."""

    def __init__(self, ev: BlockwiseEval, positions, ndim: int) -> None:
        self.ev = ev
        self.positions = list(positions)
        self.idx = (0,) * ndim  # pure layers have no I/O dependency to index

    def __call__(self, *slabs):
        return self.ev(self.idx, dict(zip(self.positions, slabs)))


class StoreWriter:
    """Run dask's own ``store-map`` task for each block, inside the slab task."""

    def __init__(self, ev: BlockwiseEval, refs: dict | None = None) -> None:
        self.ev = ev
        self.refs = refs
        self.pos = ev.array_args()[0][0]

    def write_block(self, idx, block) -> None:
        self.ev(idx, {self.pos: block}, self.refs)


def _literal_refs(hlg, ev: BlockwiseEval) -> dict | None:
    """Values of the graph keys a store layer takes whole (a large target array is
    put in the graph under its own key); ``None`` if one of them is computed."""
    from dask._task_spec import DataNode, GraphNode

    out = {}
    for key in ev.referenced_keys():
        for layer in hlg.layers.values():
            if key in layer:
                node = layer[key]
                break
        else:
            return None
        if isinstance(node, DataNode):
            out[key] = node.value
        elif isinstance(node, GraphNode) or callable(node) or isinstance(node, tuple):
            return None
        else:
            out[key] = node
    return out


#: What a store other than zarr holds while it writes, beyond the planes, as a multiple
#: of them (a zarr array's temporaries: :func:`dask_sweep.io.zarr_io.write_temporaries`).
STORE_TEMPS = 2.0


class DirectStoreWriter:
    """Write whole slabs straight into the target (zarr or any sliceable array).

    Used for ``da.store`` / ``to_zarr`` without ``return_stored``: the slab task
    writes planes ``[a, b)`` cut on the target's chunk (or shard) boundaries, so no
    chunk is shared by two writes and no lock is needed, and the ``rechunk-merge``
    that ``to_zarr`` inserts costs nothing.  A zarr target is written in calls of
    whole chunks: ``piece`` planes along the sweep axis and, where a chunk row is
    wider than a call should be, ``strip`` along the first in-plane axis.  Its
    encoding temporaries grow with what one call writes, and the plan counts those
    of one call (:meth:`temps_of`).
    """

    def __init__(self, target, region, axis: int, ndim: int, lock=None,
                 piece: int | None = None, strip: int | None = None,
                 call_bytes: int | None = None) -> None:
        self.target = target
        self.region = region
        self.axis = axis
        self.ndim = ndim
        # the user's lock (da.store(lock=...)): a target may not take two writes at once
        # (h5py), even of different chunks, and segments write at the same time
        self.lock = lock if lock not in (None, False, True) else None
        zarr = write_temporaries(target, 0) is not None  # a model of its temporaries
        self.piece = piece if zarr else None
        self.strip = strip if zarr else None
        self.inplane = next(d for d in range(ndim) if d != axis) if ndim > 1 else None
        self.call_bytes = call_bytes if zarr else None
        # a numpy array takes the planes as they are
        self.write_temps = 0.0 if isinstance(target, np.ndarray) else STORE_TEMPS

    def temps_of(self, nbytes: int) -> int:
        """Bytes held beyond the planes while one call writes ``nbytes`` of them (a call
        writes at most ``call_bytes``)."""
        if self.call_bytes:
            nbytes = min(nbytes, self.call_bytes)
        zarr = write_temporaries(self.target, nbytes)
        return int(self.write_temps * nbytes) if zarr is None else zarr

    def write_planes(self, a: int, planes, origin=None) -> None:
        # calls end on the target's chunk grid (in its coordinates: the region's start added)
        along = _cuts(planes.shape[self.axis], a + self._start(self.axis), self.piece)
        d, o = self.inplane, 0
        if d is not None and self.strip:
            o = (origin[d] if origin is not None else 0) + self._start(d)
        across = _cuts(planes.shape[d], o, self.strip) if d is not None else [0, 0]
        for s, e in zip(along, along[1:]):
            for u, v in zip(across, across[1:]):
                box = [slice(None)] * self.ndim
                box[self.axis] = slice(s, e)
                at = list(origin) if origin is not None else [0] * self.ndim
                if d is not None and self.strip:
                    box[d] = slice(u, v)
                    at[d] += u
                self._write(a + s, planes[tuple(box)], at if self.strip or origin else None)

    def _start(self, d: int) -> int:
        if not self.region or d >= len(self.region):
            return 0
        return self.region[d].start or 0

    def _write(self, a: int, planes, origin) -> None:
        from dask.array.core import fuse_slice

        idx = [slice(None)] * self.ndim
        for d in range(self.ndim):
            o = origin[d] if origin is not None else 0
            idx[d] = slice(o, o + planes.shape[d])
        idx[self.axis] = slice(a, a + planes.shape[self.axis])
        index = tuple(idx)
        if self.region:
            index = fuse_slice(self.region, index)
        if self.lock is None:
            self._put(index, planes)
            return
        self.lock.acquire()  # as dask's load_store_chunk does (any lock-like object)
        try:
            self._put(index, planes)
        finally:
            self.lock.release()

    def _put(self, index: tuple, planes) -> None:
        if not write_whole_chunks(self.target, index, planes):
            self.target[index] = planes


class PlaneStoreWriter:
    """Write slabs into a raw local Zarr array at their byte offsets, any plane range.

    (:class:`dask_sweep.io.planes.ZarrPlanes`): no chunk row is held back for
    alignment, and zarr's encoding pipeline is skipped.
    """

    #: it copies what it writes chunk by chunk: a strided view of the planes will do
    takes_views = True

    def __init__(self, planes, offset: tuple[int, ...]) -> None:
        self.planes = planes
        self.offset = offset  # where the stored array starts in the target (``region``)

    def temps_of(self, nbytes: int) -> int:
        """What a write of ``nbytes`` of planes holds beside them (chunk parts copied)."""
        return self.planes.temps(nbytes)

    def write_planes(self, a: int, planes, origin=None) -> None:
        o = origin if origin is not None else (0,) * planes.ndim
        org = tuple(x + y for x, y in zip(o, self.offset))
        self.planes.write(a + self.offset[0], planes, org)


def _cuts(n: int, start: int, step: int | None) -> list[int]:
    """Bounds of ``n`` items cut where ``start + p`` is a multiple of ``step``.

    >>> _cuts(10, 3, 4)
    [0, 1, 5, 9, 10]
    """
    return [0, *(p for p in range(1, n) if step and (start + p) % step == 0), n]


def _plane_store(target, region, shape, axis: int):
    """A :class:`PlaneStoreWriter` for a raw local zarr target (axis 0 sweeps), else None."""
    if axis != 0:
        return None
    planes = zarr_planes(target)
    if planes is None or not planes.writable:
        return None
    offset = [0] * len(shape)
    if region:
        for d, r in enumerate(region):
            if not isinstance(r, slice) or r.step not in (None, 1):
                return None
            offset[d] = r.start or 0
    return PlaneStoreWriter(planes, tuple(offset))


#: A zarr target is written in calls of about this share of the budget (whole chunks, one
#: row or strip at least; a call holds about four times what it writes): zarr encodes a
#: call's chunks at once and pays its per-call cost once (one-plane chunks of 256 KiB:
#: 1.39 s per 512 planes one by one, 0.80 s four at a time, 0.69 s eight at a time).
WRITE_SHARE = 32


def _direct_store(hlg, store: str, shape, axis: int, budget: int = 0):
    """A :class:`DirectStoreWriter` and its slab grid for a plain store layer, else None."""
    from dask.array.core import load_store_chunk

    layer = hlg.layers[store]
    task = layer.task
    kw = dict(getattr(task, "kwargs", {}) or {})
    if getattr(task, "func", None) is not load_store_chunk or kw.get("return_stored"):
        return None
    refs = _literal_refs(hlg, BlockwiseEval(layer)) or {}
    targets = [refs.get(v.key, v) if isinstance(v, TaskRef) else v
               for v, ind in layer.indices if ind is None]
    if len(targets) != 1 or not hasattr(targets[0], "__setitem__"):
        return None
    target = targets[0]
    region = kw.get("region")
    planes = _plane_store(target, region, shape, axis)
    if planes is not None:
        return planes, tuple(range(shape[axis] + 1))  # any plane boundary will do
    start = 0
    if region:
        r = region[axis] if axis < len(region) else slice(None)
        if r.step not in (None, 1):
            return None
        start = r.start or 0
    tchunks = getattr(target, "shards", None) or getattr(target, "chunks", None)
    n = shape[axis]
    piece = strip = call = None
    if tchunks and len(tchunks) == len(shape) and isinstance(tchunks[axis], int):
        c = tchunks[axis]
        cuts = [p for p in range(1, n) if (p + start) % c == 0]
        align = (0, *cuts, n)
        itemsize = np.dtype(getattr(target, "dtype", "u1")).itemsize
        row = c * math.prod(s for d, s in enumerate(shape) if d != axis) * itemsize
        share = budget // WRITE_SHARE
        piece = c * max(1, share // max(1, row))
        call = piece * row // c
        d = next((d for d in range(len(shape)) if d != axis), None)
        if d is not None and row > share and tchunks[d] < shape[d]:
            column = row // shape[d] * tchunks[d]  # a chunk row one chunk wide along d
            strip = tchunks[d] * max(1, share // max(1, column))
            call = strip * row // shape[d]
    else:
        align = None
    return DirectStoreWriter(target, region, axis, len(shape), kw.get("lock"), piece, strip,
                             call), align


#: A staged row is written in calls of whole chunks, ``threads`` calls at once where they
#: fit in this share of the budget (each: the box read back and its encoder's
#: temporaries), one chunk at least.
STAGED_SHARE = 2


def staged(plan: Plan, budget: int, threads: int = 1, least: bool = False) -> Plan | None:
    """``plan`` with its zarr stores in chunks deeper than a plane staged on local disk
    (:class:`~dask_sweep.io.staging.StagedWriter`): steps of any planes write them; None
    when no output is such a store.

    The last resort when whole chunk rows do not fit the budget and in-plane tiles
    cannot help: an extra raw write and read of the output on local disk.  Up to
    ``threads`` calls write a row at once in the background, as the budget allows;
    ``least``: the smallest footprint, one chunk per call, within the step that
    completes the row.
    """
    outputs, changed = [], False
    axis = plan.axis
    for o in plan.outputs:
        w = o.sink
        target = getattr(w, "target", None)
        tchunks = getattr(target, "shards", None) or getattr(target, "chunks", None)
        shape = plan.stages[o.stage].shape
        if (not isinstance(w, DirectStoreWriter) or w.call_bytes is None or o.align is None
                or not tchunks or len(tchunks) != len(shape)):
            outputs.append(o)
            continue
        inplane = [d for d in range(len(shape)) if d != axis]
        depth = max(b - a for a, b in zip(o.align, o.align[1:]))
        chunk = depth * np.dtype(target.dtype).itemsize * math.prod(
            int(tchunks[d]) for d in inplane)
        # calls at once and chunks per call: the box and about five times it in the
        # encoder (see encode_temporaries) each, within the share; along the last axis only
        room = 0 if least else budget // STAGED_SHARE
        one = chunk + write_temporaries(target, chunk)
        workers = max(1, min(threads, room // max(1, one)))
        per_call = max(1, (room // workers - write_temporaries(target, 0)) // max(1, 6 * chunk))
        if inplane:
            per_call = min(per_call, -(-shape[inplane[-1]] // tchunks[inplane[-1]]))
        cuts = [_cuts(shape[d], w._start(d),
                      tchunks[d] * (per_call if d == inplane[-1] else 1)) for d in inplane]
        sink = StagedWriter(w._write, o.align, cuts, shape, plan.stages[o.stage].dtype, axis,
                            temporary_directory(),
                            write_temporaries(target, per_call * chunk), workers,
                            overlap=not least)
        outputs.append(dataclasses.replace(o, sink=sink, align=tuple(range(shape[axis] + 1))))
        changed = True
    if not changed:
        return None
    return dataclasses.replace(plan, outputs=tuple(outputs))


def region_to_plan(hlg: HighLevelGraph, region: Region, axis: int, settings,
                   notes: list[str], jit_loaded: bool | None = None) -> Plan:
    """The region's plan (not yet sized).

    ``jit_loaded``: whether the processes that run it have loaded numba's kernels (default:
    this process has, :func:`dask_sweep.runtime.jit.loaded`); where not, a numba kernel is
    used only if its load fits the budget, and counted.
    """
    metas = {n: array_meta(hlg.layers[n]) for n in region.sources}
    # numba's kernels (a median, a ball) where they are loaded or their loading fits
    was_loaded = numba_jit.loaded() if jit_loaded is None else jit_loaded
    jit = numba_jit.affordable(settings.memory_limit, already=was_loaded)
    jitted = False
    index: dict[str, int] = {}
    stages: list[Stage] = []
    for src in region.sources:
        m = metas[src]
        reader = make_reader(hlg, src, m.numblocks, axis)
        dropin = (getattr(hlg.layers[src], "collection_annotations", None) or {}).get(DROPIN_PLAN)
        if dropin is not None and hasattr(reader, "rows_at_once"):
            # a drop-in's last pass is budgeted with `in_flight` slabs at once (FEEDING):
            # a step reading several of its rows runs that many at once
            reader.rows_at_once = max(1, min(settings.threads, dropin.passes[-1].in_flight))
        plane = m.dtype.itemsize
        for ax, s in enumerate(m.shape):
            if ax != axis:
                plane *= s
        exact = getattr(reader, "region_bytes", None)  # a plane reader's own count
        if exact is not None:
            plane = exact([(0, s) for ax, s in enumerate(m.shape) if ax != axis])
        index[src] = len(stages)
        # a reader of single planes (raw local zarr) lets the sweep cut steps anywhere
        rows = (1,) * m.shape[axis] if getattr(reader, "free", False) else m.chunks[axis]
        external = not hasattr(reader, "tasks") or getattr(reader, "external", False)
        stages.append(Source(
            label=f"read {src.rsplit('-', 1)[0]}" + (" (external)" if external else ""),
            shape=m.shape, dtype=m.dtype, row_bounds=_bounds(rows), reader=reader,
            external=external,
            # a constant made on demand reads nothing from storage
            bytes_per_row=tuple(0 if getattr(reader, "made", False) else c * plane
                                for c in rows), chunks=m.chunks,
        ))
    # topological order of region stages
    order, seen = [], set()

    def visit(n):
        if n in seen or n not in region.stages:
            return
        seen.add(n)
        for i in region.stages[n].inputs:
            visit(i)
        order.append(n)

    for n in region.stages:
        visit(n)
    for n in order:
        spec = region.stages[n]
        ins = tuple(index[i] for i in spec.inputs)
        if spec.kind == "rechunk":
            # the same planes in other chunks: a sweep sees planes, so the stage is its input
            index[n] = ins[0]
            continue
        if spec.kind == "window":  # a rolling window (patterns/rolling.py)
            from dask_sweep.patterns.rolling import window_stage

            st = window_stage(spec, ins, axis, stages[ins[0]].dtype, notes)
        elif spec.kind == "elementwise" and is_pure_elementwise(spec.func_eval):
            # no window, no block dependence: any slab (or in-plane tile) will do
            st = Pointwise(
                label=spec.label, shape=spec.meta.shape, dtype=spec.meta.dtype, inputs=ins,
                fn=SlabFn(spec.func_eval, spec.func_positions, len(spec.meta.shape)),
                cast=False, temps=0.0,  # one dask layer: one numpy call
            )
        elif spec.kind == "elementwise":
            st = Blocked(
                label=spec.label, shape=spec.meta.shape, dtype=spec.meta.dtype, inputs=ins,
                chunks=spec.meta.chunks,
                depth=tuple(tuple((0, 0) for _ in spec.meta.shape) for _ in ins),
                boundary=tuple(tuple("none" for _ in spec.meta.shape) for _ in ins),
                block_fn=ElementwiseBlockFn(spec.func_eval, spec.func_positions),
                kind="elementwise", sweep_axis=axis,
            )
        else:
            st, sep = None, None
            if settings.reblock and spec.kernel is not None:
                st, why = kernel_stage(spec, ins, axis, stages[ins[0]].dtype, jit=jit)
                if st is not None:
                    if why:
                        notes.append(why)
                    jitted = jitted or isinstance(st.fn, (MedianPlanes, BoolShifts))
                    pair = mapped_shifts(st, stages[ins[0]].dtype)
                    if pair is not None:  # the runs' map: a stage of its own
                        stages.append(pair[0])
                        st = dataclasses.replace(pair[1], inputs=(len(stages) - 1,))
                if st is None:  # dask's blocks, computed as dask does (or as its passes)
                    sep = separable_block_fn(spec)
                    how = ("; scipy's 1-D passes, each axis's halo cropped after its pass"
                           if sep is not None else "")
                    notes.append(f"{spec.label}: kept dask's blocks ({why}){how}")
            if st is None:
                st = Blocked(
                    label=spec.label, shape=spec.meta.shape, dtype=spec.meta.dtype, inputs=ins,
                    chunks=spec.meta.chunks,
                    depth=tuple(tuple(d[ax] for ax in range(len(spec.meta.shape))) for d in spec.depth),
                    boundary=tuple(tuple(b[ax] for ax in range(len(spec.meta.shape))) for b in spec.boundary),
                    block_fn=sep or OverlapBlockFn(spec.func_eval, spec.trim_eval,
                                                   spec.func_positions),
                    kind="map_overlap", sweep_axis=axis,
                )
                run = running_stage(spec, st, axis) if sep is not None else None
                if run is not None:
                    st = dataclasses.replace(
                        run,
                        note=f"{spec.label}: dask's blocks computed on any slab ({why}): "
                             "scipy's running sums carried from step to step, restarted "
                             "where each block's line starts; in-plane passes on dask's "
                             "in-plane blocks",
                        blocked_note=f"{spec.label}: kept dask's blocks (in-plane tiles cut "
                                     f"the planes its running sums cross){how}")
                    notes[-1] = st.note
        index[n] = len(stages)
        stages.append(st)
    outputs = []
    for m in region.outputs:
        spec = region.stages[m]
        only_stored = m in region.stores.values() and not region.extra_users.get(m, True)
        if not only_stored:
            outputs.append(Output(stage=index[m], name=m, chunks=spec.meta.chunks))
    for store, m in region.stores.items():
        meta = region.stages[m].meta if m in region.stages else metas[m]
        direct = _direct_store(hlg, store, meta.shape, axis, settings.memory_limit)
        if direct is not None:
            outputs.append(Output(stage=index[m], name=store, chunks=meta.chunks,
                                  sink=direct[0], align=direct[1]))
        else:
            ev = BlockwiseEval(hlg.layers[store])
            refs = _literal_refs(hlg, ev)
            if refs is None:
                raise NotSweepable(
                    f"the target of {store!r} is computed by the graph, not an array to write to"
                )
            outputs.append(Output(stage=index[m], name=store, chunks=meta.chunks,
                                  sink=StoreWriter(ev, refs)))
    overhead = settings.runtime_overhead
    if jitted and not was_loaded:
        # numba's first kernel starts LLVM inside this run
        overhead += numba_jit.LOAD_BYTES
        notes.append(f"numba's kernels load in this run: {format_bytes(numba_jit.LOAD_BYTES)} "
                     "counted (dask_sweep.enable() or sweep(...) load them before)")
    return Plan(stages=tuple(stages), outputs=tuple(outputs), axis=axis,
                budget=settings.memory_limit, threads=settings.threads, notes=tuple(notes),
                info={"tune_malloc": settings.tune_malloc, "runtime_overhead": overhead})


def _bounds(chunks) -> tuple[int, ...]:
    out = [0]
    for c in chunks:
        out.append(out[-1] + c)
    return tuple(out)
