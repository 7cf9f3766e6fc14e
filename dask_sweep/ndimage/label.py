"""Connected-component labelling like :func:`scipy.ndimage.label`, lazily, in bounded memory.

The front end of :mod:`dask_sweep.multipass.label` (the algorithm: two passes
over slabs along axis 0, a backward link chain and a forward numbering over
small tables; read its docstring) for dask and numpy arrays.  Here: the
arguments are checked, the budget is found (explicit argument, else
``enable(...)`` or a configured pass, else ``sweep.*``), the slabs are sized
(:mod:`dask_sweep.passes.tables`), and the steps become dask tasks
(:mod:`dask_sweep.emit.tables`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dask_sweep.emit.tables import label_graph
from dask_sweep.errors import BudgetError
from dask_sweep.integration.optimize import active_settings
from dask_sweep.multipass import label_kernels as K
from dask_sweep.multipass import spill as _spill  # noqa: F401 - kept importable from here
from dask_sweep.multipass.label import (
    local_label,  # noqa: F401 - kept importable from here
    normalize_output,
    normalize_structure,
    structure_rank,  # noqa: F401
)
from dask_sweep.multipass.spill import labels_fit, masks_fit
from dask_sweep.ndimage._common import as_dask_array
from dask_sweep.passes.tables import (
    label_footprints,
    label_notes,
    label_split,
    on_fewest_threads,
    row_slabs,
)
from dask_sweep.passes.tables import table_reserve as _reserve
from dask_sweep.patterns.readers import decode_bytes, decode_excess, make_readers
from dask_sweep.plan.tables import SweepPlan
from dask_sweep.utils import format_bytes

__all__ = ["explain_label", "label", "plan_label"]

_FUNC = "dask_sweep.ndimage.label"


# --------------------------------------------------------------------------- plan


def plan_label(
    image: Any, structure: Any = None, output: Any = None, *, memory_limit: Any = None
) -> SweepPlan:
    """The schedule and memory model of :func:`label`, without running anything.

    Parameters
    ----------
    image, structure, output, memory_limit
        As for :func:`label`.

    Returns
    -------
    SweepPlan
        Slabs, passes with their footprints, projected peak vs budget.

    Raises
    ------
    BudgetError
        When even one chunk row along axis 0 does not fit ``memory_limit``.
    """
    plan, _, _ = _plan(image, structure, output, memory_limit)
    return plan


def explain_label(
    image: Any, structure: Any = None, output: Any = None, *, memory_limit: Any = None
) -> str:
    """:func:`plan_label` as text: passes, slab thickness, projected peak, bytes read."""
    return plan_label(image, structure, output, memory_limit=memory_limit).explain()


def _plan(image, structure, output, memory_limit):
    settings = active_settings(memory_limit=memory_limit)  # explicit > enable(...) > config
    image = as_dask_array(image, "input", _FUNC, settings.memory_limit)
    st = normalize_structure(structure, image.ndim)
    out_dtype = normalize_output(output)
    target = max(1, settings.target_slab_bytes // image.dtype.itemsize)
    item = image.dtype.itemsize
    shape_bytes = (K.pair_bytes(st), K.table_bytes(st))  # by the structure
    passes, per_slab, slabs, split, readers, inline, room = on_fewest_threads(
        settings, lambda threads: _slabs(image, item, settings, out_dtype, target, threads,
                                         shape_bytes))
    # pass 1 keeps, on local disk, what pass 2 needs, so the input is read once (inline
    # reads): its local labels where the page cache holds them (pass 2 only maps them),
    # else its masks (one bit per voxel; labelled again) where a quarter of the disk does
    voxels = int(np.prod(image.shape, dtype=np.int64))
    bits = int(np.prod(image.shape[:-1], dtype=np.int64)) * -(-image.shape[-1] // 8)
    keep = ""
    if inline and image.ndim >= 2:
        keep = "labels" if labels_fit(voxels) else "masks" if masks_fit(bits) else ""
    kept = 4 * voxels if keep == "labels" else bits if keep else 0
    if not inline:  # computed once: pass 1 writes its packed masks to files for pass 2
        kept = bits
    plan = SweepPlan(
        func=_FUNC,
        shape=tuple(image.shape),
        dtype=image.dtype,
        in_chunks0=tuple(image.chunks[0]),
        slabs=slabs,
        passes=passes,
        budget=settings.memory_limit,
        inline=inline,
        bytes_written=kept,
        per_slab=per_slab,
        input_reads=1 if keep or not inline else None,
        kept=keep,
    )
    reserve = _reserve(plan)  # tables kept in memory: what the slab footprints leave
    plan = label_notes(plan, out_dtype, split, reserve)
    if room:
        plan = dataclasses.replace(plan, notes=(*plan.notes, (
            "no room is left for a sweep that writes the labels as they are made "
            "(to_zarr, da.store or imwrite under enable): it plans for what the labels "
            "leave, and below its own floor falls back to stock dask with a warning (or "
            f"refuses, with fallback='raise'); {_room(room)} leaves it room")))
    return plan, (image, st, out_dtype, settings, reserve, split), readers


def _room(room: int) -> str:
    """``room`` as printed: rounded up to 64 KiB, so that the figure given plans."""
    return format_bytes(-(-room // 65536) * 65536)


def _with_room(e: BudgetError, room: int) -> BudgetError:
    """The labels' refusal ``e``, naming what a sweep writing them beside needs."""
    if room <= e.projected:
        return e
    return BudgetError(
        f"{e} To write the labels as they are made (to_zarr, da.store or imwrite under "
        f"enable), with room for that sweep beside them: at least {_room(room)}.",
        stage=e.stage, projected=e.projected, budget=e.budget)


def _slabs(image, item, settings, out_dtype, target, local_threads, by_structure):
    """Slabs and footprints with pass 1 on ``local_threads``: whole chunk rows, else (rows
    too thick for a slab, inline reads) slabs within the rows; room for a sweep consuming
    the labels where that does not cost whole rows.  Returns ``(passes, per_slab, slabs,
    split, readers, inline, room)``, ``room`` the smallest budget that would leave a
    consumer room where this one does not (else 0).  ``by_structure``: the face step's
    bytes per voxel of a face and the local labeller's tables per voxel of a slab."""
    plane = int(np.prod(image.shape[1:], dtype=np.int64))
    pairs, tables = by_structure
    # A slab's read holds its blocks and their join (2 x item per voxel and the mask,
    # 1.125) and one block's source decoded; the labelling's phase holds 5 + tables per
    # voxel: one block's read beyond that margin, as fixed bytes per thread.
    # (the split plan's rows are read block by block: it counts a block's read itself)
    decode = decode_bytes(image)
    (read_fixed,) = decode_excess(image, 5 + tables - (2 * item + 1.125), decode=decode)
    split = None
    room = 0
    for guess in (True, False):
        # Inline reads: one resolve task, then a pass-2 task per slab; external: four
        # tasks more per slab.  Plus two of a consumer's per output block.
        per_slab = settings.task_overhead * (3 if guess else 7)
        room = 0
        try:
            # room for a sweep consuming the labels (a write), unless that costs whole rows
            for consumer in (True, False):
                passes = label_footprints(image.shape, item, settings, out_dtype, guess,
                                          read_fixed=read_fixed if guess else 0,
                                          consumer=consumer, local_threads=local_threads,
                                          pair_bytes=pairs, table_bytes=tables)
                try:
                    bounds, slabs = row_slabs(_FUNC, image.chunks[0], plane, passes,
                                              settings.memory_limit, target, per_slab)
                    break
                except BudgetError as e:
                    if not consumer:
                        raise
                    room = e.projected
        except BudgetError as err:
            if not guess or image.ndim < 2:
                raise _with_room(err, room) from None
            # A chunk row is thicker than a slab can be: try slabs within the rows,
            # each row read once per pass (inline reads only).
            rows = [[i] for i in range(len(image.chunks[0]))]
            readers, inline = make_readers(image, rows)
            if not inline:
                raise _with_room(err, room) from None
            room = 0
            try:
                passes, per_slab, slabs, split = label_split(
                    _FUNC, image.shape, image.chunks, item, settings, out_dtype, target,
                    local_threads=local_threads, pair_bytes=pairs, decode=decode,
                    table_bytes=tables,
                )
            except BudgetError as e:  # no room for a consumer: the labels alone
                room = e.projected
                try:
                    passes, per_slab, slabs, split = label_split(
                        _FUNC, image.shape, image.chunks, item, settings, out_dtype, target,
                        consumer=False, local_threads=local_threads, pair_bytes=pairs,
                        decode=decode, table_bytes=tables,
                    )
                except BudgetError as alone:
                    raise _with_room(alone, room) from None
            break
        readers, inline = make_readers(image, bounds)
        if inline or not guess:
            break
    return passes, per_slab, slabs, split, readers, inline, room


# --------------------------------------------------------------------------- public


def label(
    image: Any, structure: Any = None, output: Any = None, *, memory_limit: Any = None
) -> tuple[Any, Any]:
    """Label connected components like :func:`scipy.ndimage.label`, lazily, in bounded memory.

    Parameters
    ----------
    image : array_like or dask.array.Array
        Input; nonzero voxels are features.  Any number of axes >= 1; the sweep
        runs along axis 0 in slabs of whole axis-0 chunks.
    structure : array_like, optional
        Structuring element, shape ``(3,) * image.ndim``, symmetric; default
        ``scipy.ndimage.generate_binary_structure(image.ndim, 1)`` (faces).
        ``np.ones((3, 3, 3))`` gives full 26-connectivity.
    output : dtype, optional
        Integer dtype of the labels; default ``int32`` (as scipy).
    memory_limit : int or str, optional
        Memory budget (bytes or e.g. ``"512MiB"``); default ``sweep.memory-limit``.

    Returns
    -------
    labels : dask.array.Array
        Same shape as ``image``; chunks are the slabs along axis 0, whole in the
        other axes.  Identical to scipy's labels (same raster-order numbering).
    num_features : dask.array.Array
        A 0-d integer dask array; ``int(num_features.compute())`` is scipy's
        ``num_features``.  Computing it runs only the first pass and the resolve
        step; ``dask.compute(labels, num_features)`` shares them.

    Raises
    ------
    BudgetError
        At call time, when even one chunk row does not fit ``memory_limit``.
    SweepConfigError
        For a non-array input, or a structure of the wrong shape or not symmetric.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep.ndimage import label
    >>> lab, n = label(np.array([[1, 0, 1], [1, 0, 0]]))
    >>> lab.compute().tolist(), int(n.compute())
    ([[1, 0, 2], [1, 0, 0]], 2)
    """
    import dask.array as da

    plan, (image, st, out_dtype, settings, reserve, split), readers = _plan(
        image, structure, output, memory_limit
    )
    if image.ndim <= 3:
        K.warm()  # compile the face kernel now, outside the run's budget
    if image.shape[0] == 0:  # no slabs: nothing to label (as scipy)
        return (
            da.zeros(image.shape, dtype=out_dtype, chunks=image.chunks),
            da.from_array(np.array(0, dtype=np.intp)),
        )
    return label_graph(plan, image, readers, st, out_dtype, settings, reserve, split)
