"""Connected-component labelling in two streaming passes, identical to scipy's.

Algorithm
---------
The input is cut into slabs along axis 0 (whole input chunk rows; see
:mod:`dask_sweep.ndimage._common`; or, when one chunk row does not fit the
budget and the input is read inside the slab tasks, slabs within the rows:
each row is then read once per pass into a mask of one bit per voxel and
its slabs are unpacked from it, :func:`_split_plan`).  Label ``l`` of slab ``s`` means scipy's
local label ``l`` of that slab alone; global order is ``(s, l)``
lexicographic, which is raster order of the pieces' first voxels.

**Pass 1, backward** (slabs from last to first).  Each slab is labelled
locally (:func:`local_label`: cc3d for face/edge/full connectivity, else
:func:`scipy.ndimage.label`; scipy's numbering either way) on
``sweep.threads`` threads, a few slabs ahead, and a cheap *link* chain walks
the slabs backwards carrying the ``B`` of the labels on the top face of slab
``s+1``.  ``B(l)`` is the smallest
label of slab ``s`` in the same component of the sub-volume *from slab s to
the end*.  The link step of slab ``s`` takes the pairs ``(l, b)`` joined
across its bottom face (every offset of ``structure[2]``: with full
connectivity the diagonals count; :mod:`._label_kernels`), unites the slab's
labels that reach the same ``b``, and gets ``B`` for its own labels::

    slab s      ... | 3 3 . 4 |  ...   local labels (bottom face)
    ----------------+---------+------  face s / s+1
    slab s+1 (B)    | . 1 1 1 |  ...   pairs (3, 1), (4, 1): B(3) = B(4) = 3

The slab keeps ``B`` (``n + 1`` ids) and its pairs: a *table*.

**Numbering, forward** (a chain over the tables only, no input read).  scipy
numbers components in raster order of their first voxel, i.e. by their
smallest ``(s, l)``.  Walking forward, step ``s`` carries from step ``s-1``
the final id of each ``b`` of slab ``s`` linked to slab ``s-1`` (from
``s-1``'s pairs).  For label ``l`` of slab ``s``:

* if ``B(l)`` is linked upwards, its component started earlier: its final id
  is the carried one;
* otherwise the component lies in slabs ``s..end``, so its smallest label is
  ``B(l)`` in slab ``s``: ``l`` is a *root* when ``B(l) == l``, and roots get
  ``1 +`` (roots of earlier slabs) ``+`` (roots below ``l`` in slab ``s``) --
  exactly the rank of the component's first voxel; every other label takes
  its root's id.

Proof of the first case: a path from ``l`` to a voxel above slab ``s`` crosses
face ``s-1 / s`` first from a voxel of ``l``'s component in slabs
``s..end``, so that component (all of whose labels share ``B(l)``) is linked
upwards.  The step emits a lookup table of ``n + 1`` final ids.

For an input read inside the slab tasks (inline), pass 1 and the numbering are
one task that drives these steps itself, so the graph holds one task per slab
(pass 2) and dask's bookkeeping stays small; for an input that dask computes
they are per-slab tasks with the input blocks as dependencies.

**Pass 2** (slabs independent, each waiting only for its lookup table).  Each
slab is read and labelled again (deterministic, so no label volume is ever
written: the input is read twice) and relabelled through its table (in place
for int32 output: the labels' buffer becomes the output block).  No chain
here on purpose: each output block's consumer (a store, a reduction) can run
right after it.

Memory: pass 1 holds the slabs in flight and the faces waiting for the link step; the tables
(``4 B`` per label + ``8 B`` per face pair, then one id per label) are kept in
memory while their total stays within the budget left over by the slab
footprints and are spilled to ``.npy`` files otherwise
(:mod:`dask_sweep.ndimage._spill`), so memory does not grow with the number
of slabs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from typing import Any

import numpy as np
from dask._task_spec import Task, TaskRef
from dask.base import tokenize
from scipy import ndimage as ndi

from dask_sweep.config import SweepSettings
from dask_sweep.errors import BudgetError, SweepConfigError, SweepError
from dask_sweep.integration.optimize import active_settings
from dask_sweep.ndimage import _label_kernels as K
from dask_sweep.ndimage import _spill
from dask_sweep.ndimage._common import (
    Footprint,
    SweepPlan,
    as_dask_array,
    choose_slabs,
)
from dask_sweep.ndimage._reader import SlabReader, _evaluate, make_readers
from dask_sweep.plan.ir import FEEDING
from dask_sweep.runtime.memory import tune_allocator
from dask_sweep.utils import format_bytes

__all__ = ["explain_label", "label", "plan_label"]

_FUNC = "dask_sweep.ndimage.label"

# Labels handled at once by the numbering step (bounds its temporaries, ~48 B per
# label): budget / 64 / 48, within these limits.
_BLOCK_MIN, _BLOCK_MAX = 16, 1 << 16
_BLOCK_BYTES = 48

# Bytes per voxel of the local labeller's own tables.  cc3d (C++ allocations, not seen
# by tracemalloc; measured as resident growth on 8 x 512 x 512 slabs): at most 2.3 B
# per voxel beyond its uint32 output (6-connectivity, a checkerboard: one provisional
# label per two voxels), 0.8 with 26-connectivity; scipy's <= 1.
_TABLES = 2.5


def _block(budget: int) -> int:
    return int(min(_BLOCK_MAX, max(_BLOCK_MIN, budget // 64 // _BLOCK_BYTES)))


# --------------------------------------------------------------------------- validation


def normalize_structure(structure: Any, ndim: int) -> np.ndarray:
    """The structuring element as a bool array of shape ``(3,) * ndim``.

    Mirrors scipy's checks (rank, size 3 per axis, symmetry) with errors that
    name the parameter.

    >>> normalize_structure(None, 2).astype(int).tolist()
    [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    """
    if structure is None:
        return ndi.generate_binary_structure(ndim, 1)
    try:
        s = np.asarray(structure)
    except Exception as e:  # noqa: BLE001 - anything numpy refuses
        raise SweepConfigError(f"{_FUNC}: structure must be array-like. Got {structure!r}.") from e
    if s.dtype == object or s.dtype.kind not in "biuf":
        raise SweepConfigError(
            f"{_FUNC}: expected structure to be a numeric or bool array. "
            f"Got dtype {s.dtype} instead."
        )
    if s.ndim != ndim:
        raise SweepConfigError(
            f"{_FUNC}: structure and input must have equal rank. Expected a structure with "
            f"{ndim} axes (shape {(3,) * ndim}). Got shape {s.shape} instead."
        )
    if s.shape != (3,) * ndim:
        raise SweepConfigError(
            f"{_FUNC}: structure dimensions must be equal to 3. Expected shape {(3,) * ndim}. "
            f"Got shape {s.shape} instead."
        )
    s = s != 0
    if not np.array_equal(s, s[(slice(None, None, -1),) * ndim]):
        raise SweepConfigError(
            f"{_FUNC}: structure is not symmetric (connectivity must go both ways). "
            "Expected structure == structure[::-1, ::-1, ...]."
        )
    return s


def _normalize_output(output: Any) -> np.dtype:
    if output is None:
        return np.dtype(np.int32)
    if isinstance(output, np.ndarray):
        raise SweepConfigError(
            f"{_FUNC}: output arrays are not supported (the result is a lazy dask array). "
            "Pass a dtype such as np.int64, or None for int32."
        )
    try:
        dt = np.dtype(output)
    except TypeError as e:
        raise SweepConfigError(
            f"{_FUNC}: expected output to be None or a dtype. Got {output!r}."
        ) from e
    if dt.kind not in "iu":
        raise SweepConfigError(
            f"{_FUNC}: expected output to be an integer dtype. Got {dt} instead."
        )
    return dt


# --------------------------------------------------------------------------- plan


def _footprints(
    shape: tuple[int, ...],
    item: int,
    settings: SweepSettings,
    out_dtype: np.dtype,
    inline: bool,
    read: float | None = None,
    read_fixed: int = 0,
) -> tuple[Footprint, Footprint]:
    """The two passes' footprints.

    ``read`` replaces the bytes per voxel of reading a slab (default: the blocks and
    their concatenation, ``2 x item``) and ``read_fixed`` is added to the fixed
    bytes: the DSL computes its input stream per slab, with halos; a split plan
    unpacks its slabs from bit-packed rows (``read=0``; it adds the rows to ``fixed``).

    One slab at a time is labelled (:data:`_LABELLING`); the model still counts
    every slab in flight at its largest phase.
    """
    plane = int(np.prod(shape[1:], dtype=np.int64))
    out = out_dtype.itemsize
    threads = max(1, settings.threads)
    # Local labelling holds the largest of its phases: reading (the blocks and their
    # concatenation, 2 x item, then the mask next to the slab: + 1), and labelling
    # (mask 1, labels 4, the labeller's own tables _TABLES).
    read = 2 * item if read is None else read
    local = max(read + 1, 1 + 4 + _TABLES)
    # The link step (one at a time, next to the slabs in flight): B, 4 B per label, with
    # at most one label per 2 voxels (face connectivity's worst case) -> 2 B per voxel.
    p1 = local + 2.0 / threads
    # Faces of finished slabs waiting for their face step (top + bottom, 4 + 4, one
    # more than the threads), the face kernel's keys (<= 1/4 plane x 8 B, doubled when
    # full) and the pairs (<= 16 B per voxel of one plane).
    face = plane * (8 * (threads + 1) + 4 + 16)
    # Relabel: the lookup table (out per label, <= 1/2 per voxel) next to the local
    # labelling, then the labels mapped through it: in place for int32 (the labels'
    # buffer becomes the output block), else into a new block (out).  For an external
    # input the numbering chain runs next to it: B (4) and int64 ids (8) per label;
    # inline, it has finished before pass 2 starts.
    mapped = 4 + (0 if out_dtype == np.int32 else out)
    p2 = max(local, mapped) + out / 2 + (0 if inline else (12 + out) / 2 / threads)
    numbering = _block(settings.memory_limit) * _BLOCK_BYTES  # its block temporaries
    return (
        # + the runtime overhead (sweep.runtime-overhead): resident memory beyond the arrays
        Footprint(
            "label-local",
            p1,
            threads,
            face + settings.runtime_overhead + threads * read_fixed,
            "read, local label (cc3d or scipy; slabs in flight), backward link chain",
        ),
        Footprint(
            "relabel",
            p2,
            threads,
            numbering + settings.runtime_overhead + threads * read_fixed,
            "read, local label again, lookup table, emit",
        ),
    )


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
    out_dtype = _normalize_output(output)
    plane = int(np.prod(image.shape[1:], dtype=np.int64))
    target = max(1, settings.target_slab_bytes // image.dtype.itemsize)
    item = image.dtype.itemsize
    split = None
    for guess in (True, False):
        # Inline reads: one resolve task, then a pass-2 task per slab; external: four
        # tasks more per slab.  Plus two of a consumer's per output block.
        per_slab = settings.task_overhead * (3 if guess else 7)
        passes = _footprints(image.shape, item, settings, out_dtype, guess)
        try:
            bounds, slabs = _slabs_of(
                image.chunks[0], plane, passes, settings.memory_limit, target, per_slab
            )
        except BudgetError:
            if not guess or image.ndim < 2:
                raise
            # A chunk row is thicker than a slab can be: try slabs within the rows,
            # each row read once per pass (inline reads only).
            rows = [[i] for i in range(len(image.chunks[0]))]
            readers, inline = make_readers(image, rows)
            if not inline:
                raise
            passes, per_slab, slabs, split = _split_plan(
                image, item, settings, out_dtype, target
            )
            break
        readers, inline = make_readers(image, bounds)
        if inline or not guess:
            break
    plan = _with_notes(
        SweepPlan(
            func=_FUNC,
            shape=tuple(image.shape),
            dtype=image.dtype,
            in_chunks0=tuple(image.chunks[0]),
            slabs=slabs,
            passes=passes,
            budget=settings.memory_limit,
            inline=inline,
            bytes_written=0,
            per_slab=per_slab,
        ),
        out_dtype,
        split,
    )
    return plan, (image, st, out_dtype, settings, _reserve(plan), split), readers


def _split_plan(image, item, settings, out_dtype, target):
    """Slabs cut within chunk rows too thick for one: ``(passes, per_slab, slabs, split)``.

    Each chunk row is read once per pass, block by block, into a mask packed to
    one bit per voxel (:func:`_read_row`), and its slabs are unpacked from it.
    ``split[s]`` is ``(row, a, b)``: slab ``s`` is planes ``a:b`` of chunk row
    ``row``.  The passes hold up to two packed rows (one consumed, the next being
    read) and one block's read.

    Raises
    ------
    BudgetError
        When not even one plane per slab fits.
    """
    chunks0 = tuple(int(c) for c in image.chunks[0])
    plane = int(np.prod(image.shape[1:], dtype=np.int64))
    row_bits = max(chunks0) * int(np.prod(image.shape[1:-1], dtype=np.int64))
    packed = row_bits * math.ceil(image.shape[-1] / 8)
    # One block at a time (a strip of blocks along the last axis when the blocks do not
    # start on whole bytes): its inputs, the block and its mask.
    last = image.chunks[-1]
    aligned = all(c % 8 == 0 for c in last[:-1])
    block = max(chunks0) * int(np.prod([max(c) for c in image.chunks[1:-1]], dtype=np.int64))
    block *= max(last) if aligned else image.shape[-1]
    # (+ dask's bookkeeping of the rows' read tasks)
    rows_fixed = 2 * packed + block * (2 * item + 2) + settings.task_overhead * len(chunks0)
    passes = tuple(
        dataclasses.replace(p, fixed=p.fixed + rows_fixed)
        for p in _footprints(image.shape, item, settings, out_dtype, True, read=0)
    )
    # A pass-2 task per slab, plus a consumer's two (the rows' read tasks are fixed).
    per_slab = settings.task_overhead * 3
    count = len(chunks0)
    while True:
        room = settings.memory_limit - per_slab * count
        try:
            cut = choose_slabs(_FUNC, (1,) * max(chunks0), plane, passes, room, target)
        except BudgetError as e:
            # quote the whole budget, and what dask's bookkeeping of the slabs takes of it
            book = per_slab * count
            raise BudgetError(
                f"{_FUNC}: even one plane per slab needs a projected "
                f"{format_bytes(e.projected + book)} ({format_bytes(e.projected)} for the "
                f"slab's passes + {format_bytes(book)} of dask's bookkeeping of {count} "
                f"slabs), over the memory budget of {format_bytes(settings.memory_limit)}. "
                "Raise memory_limit (or give the input fewer, thicker chunk rows along axis "
                "0, so there are fewer slabs).",
                stage=_FUNC, projected=e.projected + book, budget=settings.memory_limit,
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


def plan_stream(
    shape: tuple[int, ...],
    dtype: Any,
    chunks0: tuple[int, ...],
    structure: Any,
    output: Any,
    settings: SweepSettings,
    read: float,
    read_fixed: int,
    func: str = _FUNC,
    slab_budget: int | None = None,
) -> tuple[SweepPlan, np.ndarray, np.dtype]:
    """The plan of labelling an input computed slab by slab in the process (the DSL's).

    Parameters
    ----------
    shape, dtype, chunks0
        The input's shape, dtype and the row grid its slabs may be cut on.
    structure, output
        As for :func:`label`.
    settings
        The run's settings (budget, threads, target slab size).
    read, read_fixed
        Bytes per voxel, and fixed bytes (halos), of computing one slab of the input.
    func
        The name errors and ``explain`` give.
    slab_budget
        The budget the slabs are sized for (default the whole ``memory_limit``):
        less when the pass that reads the output needs room of its own.

    Raises
    ------
    BudgetError
        When even one row of ``chunks0`` does not fit the budget.
    """
    st = normalize_structure(structure, len(shape))
    out_dtype = _normalize_output(output)
    plane = int(np.prod(shape[1:], dtype=np.int64))
    item = np.dtype(dtype).itemsize
    passes = _footprints(shape, item, settings, out_dtype, True, read, read_fixed)
    target = max(1, settings.target_slab_bytes // item)
    budget = slab_budget or settings.memory_limit
    slabs = choose_slabs(func, chunks0, plane, passes, budget, target)
    plan = SweepPlan(
        func=func,
        shape=tuple(shape),
        dtype=np.dtype(dtype),
        in_chunks0=tuple(chunks0),
        slabs=slabs,
        passes=passes,
        budget=settings.memory_limit,
        inline=True,
    )
    return _with_notes(plan, out_dtype), st, out_dtype


def _with_notes(plan: SweepPlan, out_dtype: np.dtype, split: list | None = None) -> SweepPlan:
    reserve = _reserve(plan)
    within = ()
    if split:
        within = (
            f"chunk rows of up to {max(plan.in_chunks0)} planes do not fit one slab: each "
            "row is read once per pass, block by block, into a mask of one bit per voxel, "
            f"and labelled in {len(split)} slabs within the rows",
        )
    notes = within + (
        "pass 1 runs from the last slab to the first; numbering: a forward chain over "
        "the tables only (no input read)",
        f"tables (data-dependent: 4 B per local label + 8 B per face pair, then "
        f"{out_dtype.itemsize} B per label): kept in memory up to "
        f"{format_bytes(reserve)} (the budget left by the passes), beyond that "
        "spilled to .npy files in dask's temporary-directory (written once, read once)",
        f"output dtype {out_dtype}",
    )
    return SweepPlan(**{**plan.__dict__, "notes": notes})


def _reserve(plan: SweepPlan) -> int:
    """Bytes of tables kept in memory: what the slab footprints leave of the budget."""
    return max(0, plan.budget - plan.projected_peak)


def _slabs_of(chunks0, plane, passes, budget, target, per_slab):
    slabs = choose_slabs(_FUNC, chunks0, plane, passes, budget, target, per_slab)
    # Map row bounds back to block indices (slabs are whole chunk rows).
    edges = np.cumsum((0, *chunks0))
    bounds = []
    for a, b in slabs:
        i0 = int(np.searchsorted(edges, a))
        i1 = int(np.searchsorted(edges, b))
        bounds.append(list(range(i0, i1)))
    return bounds, slabs


# --------------------------------------------------------------------------- tasks


def _read_mask(reader: SlabReader, blocks: tuple) -> np.ndarray:
    x = reader.read(blocks)
    return x if x.dtype == bool else x != 0


def structure_rank(structure: np.ndarray) -> int | None:
    """``r`` when ``structure`` is ``generate_binary_structure(ndim, r)``, else None.

    Those are the structures the fast paths of :func:`local_label` know (cc3d's
    4/8-connectivity in 2-D, 6/18/26 in 3-D).

    >>> structure_rank(ndi.generate_binary_structure(3, 2))
    2
    >>> structure_rank(np.ones((3, 3), bool)), structure_rank(np.eye(3, dtype=bool))
    (2, None)
    """
    nd = structure.ndim
    for r in range(1, nd + 1):
        if np.array_equal(structure, ndi.generate_binary_structure(nd, r)):
            return r
    return None


# cc3d's connectivity by the slab's rank and the structure's.  2-D 8-connectivity is
# labelled as one plane of 26-connectivity: cc3d 4.1's own 2-D 8-connected labelling
# joins the wrong pixels on some images (e.g. pixels (3, 1) and (3, 4) of a 4 x 5 image).
_CONNECTIVITY = {2: (4, 26), 3: (6, 18, 26)}

# One slab at a time is labelled by cc3d in a process: it holds the GIL throughout,
# so a second labelling would not run meanwhile, only hold its memory.  The slabs'
# footprints count one labelling at a time.
_LABELLING = threading.Lock()


def local_label(
    mask: np.ndarray, structure: np.ndarray, check: bool = True
) -> tuple[np.ndarray, int]:
    """A slab's own labels in scipy's numbering, and their count.

    ``mask`` is bool.  For the structures of :func:`structure_rank`, axes of
    length 1 are dropped (no neighbour lies along them: the structure becomes
    the one of the same rank in fewer axes); then 2-D and 3-D slabs are labelled
    by ``cc3d`` (connected-components-3d, 3-5x faster than scipy here) in
    ``uint32``, and 1-D ones as runs (cc3d refuses some inputs with an axis of
    length 1).  cc3d numbers labels in raster order of their first voxel, as
    scipy; that is checked on every slab (one scan,
    :func:`~._label_kernels.raster_order`), and the labels would be renumbered
    in place if it differed.  Anything else, and a slab cc3d refuses, is
    labelled by :func:`scipy.ndimage.label` (``int32``).  ``check=False`` skips
    the scan (pass 2, when pass 1 found every slab in scipy's numbering).
    """
    lab, n, _ = _labelled(mask, structure, check)
    return lab, n


def _labelled(mask: np.ndarray, structure: np.ndarray, check: bool) -> tuple:
    """:func:`local_label`, and whether cc3d's numbering had to be renumbered."""
    rank = structure_rank(structure)
    if rank is None or mask.size == 0 or mask.size >= np.iinfo(np.uint32).max:
        return (*ndi.label(mask, structure), False)
    core = tuple(d for d in mask.shape if d != 1)
    m = np.ascontiguousarray(mask).reshape(core)
    if len(core) == 0:
        return m.astype(np.uint32).reshape(mask.shape), int(m), False
    if len(core) == 1:  # runs: a label starts where a run does
        starts = m.copy()
        starts[1:] &= ~m[:-1]
        lab = np.cumsum(starts, dtype=np.uint32)
        lab[~m] = 0
        return lab.reshape(mask.shape), int(lab[-1] if m[-1] else lab.max(initial=0)), False
    if len(core) > 3:
        return (*ndi.label(mask, structure), False)
    import cc3d

    conn = _CONNECTIVITY[len(core)][min(rank, len(core)) - 1]
    if conn == 26 and m.ndim == 2:
        m = m[None]
    try:
        with _LABELLING:
            lab, n = cc3d.connected_components(
                m, connectivity=conn, out_dtype=np.uint32, return_N=True
            )
    except RuntimeError:  # pragma: no cover - cc3d's own checks; scipy is the reference
        return (*ndi.label(mask, structure), False)
    n = int(n)
    order = K.raster_order(lab, n) if check else None
    if order is not None:
        lab = K.apply_lut(lab, order)
    return lab.reshape(mask.shape), n, order is not None


def _ids(n: int) -> np.dtype:
    """The smallest signed dtype for label ids ``0..n``."""
    return np.dtype(np.int32) if n < np.iinfo(np.int32).max else np.dtype(np.int64)


def _face_pairs(
    upper: np.ndarray, lower: np.ndarray, cross: np.ndarray, inplane: np.ndarray | None = None
) -> np.ndarray:
    """Unique ``(upper id, lower id)`` pairs linked across a face, sorted, int64.

    ``cross`` is ``structure[2]``: which in-plane offsets connect a voxel to the
    plane below it.  ``inplane`` is ``structure[1]`` when both planes come from
    labelling with that structure (then most offsets are redundant; see
    :mod:`~dask_sweep.ndimage._label_kernels`), else None.  Faces of up to two
    axes (inputs of up to three) go through the compiled kernel; higher ranks
    through numpy.
    """
    if cross.ndim <= 2:
        lead = (1,) * (2 - cross.ndim)
        u = np.ascontiguousarray(upper.reshape(lead + upper.shape))
        d = np.ascontiguousarray(lower.reshape(u.shape))
        w = np.zeros((3, 3), dtype=bool) if inplane is None else _as_3x3(inplane)
        return K.face_pairs_2d(u, d, _as_3x3(cross), w)
    keys = []
    width = int(lower.max(initial=0)) + 1
    for off in np.argwhere(cross):
        su, sl = [], []
        for d in off:
            d = int(d) - 1
            su.append(slice(max(0, -d), None if d <= 0 else -d))
            sl.append(slice(max(0, d), None if d >= 0 else d))
        a = upper[tuple(su)]
        b = lower[tuple(sl)]
        both = (a > 0) & (b > 0)
        if both.any():
            keys.append(np.unique(a[both].astype(np.int64) * width + b[both]))
    if not keys:
        return np.empty((0, 2), dtype=np.int64)
    k = np.unique(np.concatenate(keys))
    return np.stack([k // width, k % width], axis=1)


def _row_blocks(reader: SlabReader):
    """``(in-plane block index, mask block)`` of a chunk row, one block at a time.

    Each block's own sub-graph is evaluated apart, so the row is never whole in
    memory (a task several blocks share would run once per block).
    """
    tasks = reader.tasks
    for key in reader.block_keys():
        need: dict = {}
        stack = [key]
        while stack:
            k = stack.pop()
            if k in need:
                continue
            need[k] = True
            t = tasks[k]
            stack.extend(getattr(t, "dependencies", ()))
        sub = {k: t for k, t in tasks.items() if k in need}  # tasks is dependency-ordered
        x = np.asarray(_evaluate(sub, {key})[key])
        yield key[2:], (x if x.dtype == bool else x != 0)


def _read_row(reader: SlabReader, shape: tuple, chunks: tuple, tune: bool, *_after: Any):
    """A chunk row's mask, one bit per voxel, packed along the last axis (C order).

    ``shape`` is the row's, ``chunks`` the input's in-plane chunks.  Blocks whose
    last-axis offsets are whole bytes are packed one by one; otherwise a strip of
    blocks along the last axis is joined first.  ``_after`` only orders the task.
    """
    if tune:
        tune_allocator()
    nbytes = math.ceil(shape[-1] / 8)
    bits = np.zeros((*shape[:-1], nbytes), dtype=np.uint8)
    starts = [np.cumsum((0, *c))[:-1] for c in chunks]
    aligned = all(int(o) % 8 == 0 for o in starts[-1])
    strip: dict = {}
    for ix, m in _row_blocks(reader):
        lead = (slice(None),) + tuple(
            slice(int(starts[d][i]), int(starts[d][i]) + m.shape[d + 1])
            for d, i in enumerate(ix[:-1])
        )
        if aligned:
            o = int(starts[-1][ix[-1]]) // 8
            part = np.packbits(m, axis=-1)
            bits[(*lead, slice(o, o + part.shape[-1]))] = part
            continue
        strip[ix[-1]] = m
        if len(strip) == len(chunks[-1]):
            whole = np.concatenate([strip.pop(i) for i in range(len(chunks[-1]))], axis=-1)
            bits[lead] = np.packbits(whole, axis=-1)
            del whole
    return _Row(bits, shape[-1])


class _Row:
    """A chunk row's packed mask; :meth:`planes` unpacks planes ``a:b`` as bool."""

    __slots__ = ("bits", "width")

    def __init__(self, bits: np.ndarray, width: int) -> None:
        self.bits, self.width = bits, width

    def planes(self, a: int, b: int) -> np.ndarray:
        return np.unpackbits(self.bits[a:b], axis=-1, count=self.width).view(bool)


class _RowSlab:
    """Planes ``a:b`` of a chunk row, for :func:`_resolve`: the row is read by its
    first slab to be labelled and dropped after its last one (``uses`` slabs)."""

    def __init__(self, row: _SharedRow, a: int, b: int) -> None:
        self.row, self.a, self.b = row, a, b

    def read(self, blocks: Any = ()) -> np.ndarray:
        return self.row.take(self.a, self.b)


class _SharedRow:
    def __init__(self, reader: SlabReader, shape: tuple, chunks: tuple, uses: int) -> None:
        self.reader, self.shape, self.chunks, self.uses = reader, shape, chunks, uses
        self.row: _Row | None = None
        self.lock = threading.Lock()

    def take(self, a: int, b: int) -> np.ndarray:
        with self.lock:
            if self.row is None:
                self.row = _read_row(self.reader, self.shape, self.chunks, False)
            out = self.row.planes(a, b)
            self.uses -= 1
            if self.uses == 0:
                self.row = None
        return out


class _Local:
    """A slab's local labelling: label count, both faces and the labels on its top face.

    The faces are handed over: the face task above takes ``top``, the one below
    ``bottom``, each dropping its plane (the object may live until the link step).
    """

    __slots__ = ("n", "top", "bottom", "top_ids", "renumbered")

    def __init__(self, n, top, bottom, top_ids, renumbered=False) -> None:
        self.n, self.top, self.bottom, self.top_ids = n, top, bottom, top_ids
        self.renumbered = renumbered


def _as_3x3(a: np.ndarray) -> np.ndarray:
    """A bool offset array of 0-2 axes (3 per axis) centred in a 3 x 3 one."""
    out = np.zeros((3, 3), dtype=bool)
    out[(1,) * (2 - a.ndim)] = a
    return out


class _Planes:
    """Face planes handed back after their face step, reused by the next slabs.

    With ``sweep.tune-malloc`` every plane-sized array is a fresh mapping whose
    pages fault in on first touch: copying two 512 x 512 faces out of each slab
    cost 1.6 ms that way against 0.1 ms into planes already touched.  Holds at
    most ``cap`` planes (the faces the plan counts are at least that many).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.free: list = []
        self.lock = threading.Lock()

    def copy(self, plane: np.ndarray, dtype: np.dtype) -> np.ndarray:
        if not plane.ndim:  # a 1-D slab's face is one voxel
            return plane.astype(dtype)
        with self.lock:
            for i, p in enumerate(self.free):
                if p.shape == plane.shape and p.dtype == dtype:
                    out = self.free.pop(i)
                    break
            else:
                out = None
        if out is None:
            return plane.astype(dtype)
        np.copyto(out, plane, casting="unsafe")
        return out

    def give(self, *planes: np.ndarray) -> None:
        with self.lock:
            for p in planes:
                if isinstance(p, np.ndarray) and p.ndim and len(self.free) < self.cap:
                    self.free.append(p)


def _local(
    reader: SlabReader,
    structure: np.ndarray,
    _after: Any,
    tune: bool,
    *blocks: Any,
    planes: _Planes | None = None,
) -> _Local:
    """Local label of one slab (faces are copies: a view would pin the label slab).

    ``_after`` is ignored: the dependency on a later link step only limits how
    many finished slabs wait for the link chain.  ``tune``: fix glibc's malloc
    thresholds first (``sweep.tune-malloc``).  ``planes``: where the faces are
    copied to (default new arrays).
    """
    if tune:
        tune_allocator()
    mask = _read_mask(reader, blocks)
    lab, n, renumbered = _labelled(mask, structure, True)
    del mask
    if lab.shape[0] == 0:
        raise SweepError(f"{_FUNC}: internal error, an empty slab.")
    idt = _ids(n)  # the face kernel is compiled for int32 faces (int64 beyond)
    if planes is None:
        top, bottom = lab[0].astype(idt), lab[-1].astype(idt)
    else:
        top, bottom = planes.copy(lab[0], idt), planes.copy(lab[-1], idt)
    del lab
    # Labels are numbered in raster order of their first voxel, so those on the top
    # face are exactly 1..max (no sort of the plane needed).
    ids = np.arange(1, int(top.max(initial=0)) + 1, dtype=idt)
    return _Local(int(n), top, bottom, ids, renumbered)


def _face(
    upper: _Local, lower: _Local, structure: np.ndarray, planes: _Planes | None = None
) -> np.ndarray:
    """Pairs ``(label of slab s, label of slab s+1)`` joined across their face.

    Runs apart from the link chain, so the plane scans of several faces share the
    threads; the link step only maps and unites pairs.  The two faces go back to
    ``planes`` when given.
    """
    a, b = upper.bottom, lower.top
    upper.bottom = lower.top = None
    pairs = _face_pairs(a, b, structure[2], structure[1])
    if planes is not None:
        planes.give(a, b)
    return pairs


def _smallest_linked(n: int, pairs: np.ndarray) -> np.ndarray:
    """``B``: for each label ``0..n``, the smallest label joined to it through ``pairs``.

    ``pairs`` are ``(label, b)``: labels sharing a ``b`` are joined.
    """
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return K.smallest_linked(n, p[:, 0].copy(), p[:, 1].copy(), _ids(n))


class _Linked:
    """A link step's result: slab ``s``'s table (for numbering) and ``B`` on its top face.

    Two consumers take one part each and drop it (a hand-over): a scheduler may
    keep the object alive until its later consumer runs.
    """

    __slots__ = ("n", "table", "kept", "sdir", "top_map")

    def __init__(self, n, table, kept, sdir, top_map) -> None:
        self.n, self.table, self.kept, self.sdir, self.top_map = n, table, kept, sdir, top_map


def _link(
    local: _Local, pairs: np.ndarray | None, prev: _Linked | None, reserve: int, s: int
) -> _Linked:
    """Backward link step of slab ``s``.

    ``pairs`` join this slab's labels to slab ``s+1``'s (local ids); ``prev`` is
    slab ``s+1``'s result: ``B`` of the labels on its top face (taken and
    dropped), the bytes of tables kept so far and the spill directory.  The new
    table is ``B`` followed by the pairs ``(label, B below)``, kept in memory
    while the running total stays within ``reserve``, otherwise spilled (then
    it is a path).
    """
    n = local.n
    if prev is None or pairs is None or not len(pairs):
        pairs = np.empty((0, 2), np.int64)
    if prev is None:
        kept, sdir = 0, None
    else:
        ids, bs = prev.top_map
        kept, sdir = prev.kept, prev.sdir
        prev.top_map = None
        if len(pairs):
            # the lower ids are on slab s+1's top face, hence in ``ids``
            pairs[:, 1] = bs[np.searchsorted(ids, pairs[:, 1])]
            w = int(pairs[:, 1].max()) + 1  # unique rows as one int64 key each
            keys = np.unique(pairs[:, 0] * w + pairs[:, 1])
            pairs = np.stack([keys // w, keys % w], axis=1)
    B = _smallest_linked(n, pairs)
    top_map = (local.top_ids, B[local.top_ids])
    table = np.concatenate([B, pairs.ravel().astype(B.dtype)])
    del B, pairs
    stored, kept, sdir = _spill.keep_or_spill(
        table, kept, reserve, sdir, "label", f"B-{s:08d}.npy"
    )
    return _Linked(n, stored, kept, sdir, top_map)


def _final_ids(B: np.ndarray, keys: np.ndarray, vals: np.ndarray, cum: int, block: int) -> tuple:
    """Final ids of labels ``0..n`` (int64) and the roots counted so far.

    ``keys`` (sorted) are the ``B`` values linked to the slab above, ``vals``
    their final ids; ``cum`` counts the roots of the slabs above.  Block-wise,
    so the temporaries stay small: ``B(l) <= l``, hence a label's root comes
    first.
    """
    n = len(B) - 1
    lut = np.empty(n + 1, dtype=np.int64)
    lut[0] = 0
    for a in range(1, n + 1, block):
        b = min(n + 1, a + block)
        Bb = B[a:b]
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, Bb), len(keys) - 1)
            hit = keys[pos] == Bb
        else:
            pos = hit = np.zeros(len(Bb), dtype=bool)
        root = (Bb == np.arange(a, b)) & ~hit
        out = lut[a:b]
        rank = np.cumsum(root, dtype=np.int64)
        out[root] = cum + rank[root]
        cum += int(rank[-1])
        del rank
        if len(keys):
            out[hit] = vals[pos[hit]]
        rest = ~(root | hit)
        out[rest] = lut[Bb[rest]]
    return lut, cum


class _Numbered:
    """A numbering step's result: the slab's lookup table and the carry to the next step.

    Handed over like :class:`_Linked`: pass 2 takes the table, the next step the carry.
    """

    __slots__ = ("lut", "keys", "vals", "cum", "kept", "ldir")

    def __init__(self, lut, keys, vals, cum, kept, ldir) -> None:
        self.lut, self.keys, self.vals = lut, keys, vals
        self.cum, self.kept, self.ldir = cum, kept, ldir


def _number(
    linked: _Linked,
    prev: _Numbered | None,
    dtype: np.dtype,
    reserve: int,
    block: int,
    s: int,
) -> _Numbered:
    """Forward numbering step of slab ``s``.

    ``prev`` (slab ``s-1``) carries the final ids of this slab's ``B`` values
    linked upwards (``keys``, ``vals``), the roots counted so far, the bytes of
    tables kept and the spill directory of the lookup tables.
    """
    n, stored, bdir = linked.n, linked.table, linked.sdir
    linked.table = None
    if prev is None:
        keys = vals = np.empty(0, dtype=np.int64)
        cum, kept, ldir = 0, linked.kept, None  # slab 0 was linked last: the total kept
    else:
        keys, vals, cum, kept, ldir = prev.keys, prev.vals, prev.cum, prev.kept, prev.ldir
        prev.keys = prev.vals = None
    if isinstance(stored, str):
        table = _spill.take(stored)
        _spill.remove_dir(bdir)  # pass 1 has finished: empty once its last table is read
    else:
        table = stored
        kept -= table.nbytes  # released once this step is done with it
    del stored
    B = table[: n + 1]
    pairs = table[n + 1 :].reshape(-1, 2)
    lut, cum = _final_ids(B, keys, vals, cum, block)
    if len(pairs):
        nkeys, first = np.unique(pairs[:, 1], return_index=True)
        nvals = lut[pairs[first, 0]]
    else:
        nkeys = nvals = np.empty(0, dtype=np.int64)
    del table, B, pairs, keys, vals
    if cum <= np.iinfo(dtype).max:
        lut = lut.astype(dtype, copy=False)  # else int64: pass 2 reports the overflow
    out, kept, ldir = _spill.keep_or_spill(lut, kept, reserve, ldir, "label", f"L-{s:08d}.npy")
    return _Numbered(out, nkeys, nvals, cum, kept, ldir)


class _Resolved:
    """Both first stages in one task: every slab's lookup table, and the label count.

    Pass-2 task ``s`` takes ``luts[s]`` and drops it (a hand-over).  ``raster``:
    pass 1 labelled every slab in scipy's numbering, so pass 2 need not check.
    """

    __slots__ = ("luts", "num", "raster")

    def __init__(self, luts: list, num: int, raster: bool = False) -> None:
        self.luts, self.num, self.raster = luts, num, raster


def _resolve(
    readers: list[SlabReader],
    structure: np.ndarray,
    dtype: np.dtype,
    reserve: int,
    block: int,
    threads: int,
    tune: bool,
    on_slab: Any = None,
    split: Any = None,
) -> _Resolved:
    """Pass 1 and the numbering of inline-read slabs, in one task.

    The same steps as the per-slab graph, driven by a loop: local labelling on
    ``threads`` threads (the next ones while the link chain, here on the
    calling thread, works on the current slab), so the dask graph has one task
    here instead of four per slab, and the scheduler's bookkeeping does not grow
    with the number of slabs.  ``split``: ``(rows, row shapes, in-plane chunks)``
    when the slabs lie within chunk rows (``readers`` are then the rows').
    """
    from concurrent.futures import ThreadPoolExecutor

    if tune:
        tune_allocator()
    if split is not None:
        layout, shapes, chunks = split
        uses = [0] * len(readers)
        for r, _, _ in layout:
            uses[r] += 1
        rows = [_SharedRow(rd, sh, chunks, u) for rd, sh, u in zip(readers, shapes, uses)]
        readers = [_RowSlab(rows[r], a, b) for r, a, b in layout]
    n = len(readers)
    linked: list = [None] * n
    planes = _Planes(2 * max(1, threads) + 2)  # the faces the plan counts
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: dict = {}
        nxt = n - 1
        prev = below = None
        renumbered = False
        for s in range(n - 1, -1, -1):
            # at most `threads` slabs being labelled or waiting besides this one
            while nxt >= 0 and nxt >= s - threads:
                pending[nxt] = pool.submit(
                    _local, readers[nxt], structure, None, False, planes=planes
                )
                nxt -= 1
            here = pending.pop(s).result()
            renumbered |= here.renumbered
            pairs = None if below is None else _face(here, below, structure, planes)
            prev = linked[s] = _link(here, pairs, prev, reserve, s)
            if on_slab is not None:
                on_slab(s)  # the caller's per-slab measurement (the DSL's run report)
            below = here
    luts: list = []
    numbered = None
    for s in range(n):
        numbered = _number(linked[s], numbered, dtype, reserve, block, s)
        linked[s] = None
        luts.append(numbered.lut)
        numbered.lut = None
    return _Resolved(luts, int(numbered.cum), not renumbered)


def _num(src: _Numbered | _Resolved) -> np.ndarray:
    return np.array(src.cum if isinstance(src, _Numbered) else src.num, dtype=np.intp)


def _pass2(
    reader: SlabReader,
    structure: np.ndarray,
    src: _Numbered | _Resolved,
    s: int,
    dtype: np.dtype,
    tune: bool,
    *blocks: Any,
) -> np.ndarray:
    if tune:
        tune_allocator()
    if isinstance(src, _Resolved):
        lut, src.luts[s] = src.luts[s], None
    else:
        lut, src.lut = src.lut, None
    if isinstance(lut, str):
        path = lut
        lut = _spill.take(path)
        _spill.remove_dir(os.path.dirname(path))
    check = not (isinstance(src, _Resolved) and src.raster)
    return relabel(_read_mask(reader, blocks), structure, lut, s, dtype, check)


def _pass2_split(
    row: _Row, a: int, b: int, structure: np.ndarray, src: _Resolved, s: int, dtype: np.dtype,
    tune: bool,
) -> np.ndarray:
    """Pass 2 of slab ``s``, planes ``a:b`` of a packed chunk row."""
    if tune:
        tune_allocator()
    lut, src.luts[s] = src.luts[s], None
    if isinstance(lut, str):
        path = lut
        lut = _spill.take(path)
        _spill.remove_dir(os.path.dirname(path))
    return relabel(row.planes(a, b), structure, lut, s, dtype, not src.raster)


def relabel(
    mask: np.ndarray,
    structure: np.ndarray,
    lut: np.ndarray,
    s: int,
    dtype: Any,
    check: bool = True,
):
    """Pass 2 of slab ``s``: its local labels (``mask`` is consumed) through its table.

    ``check=False``: pass 1 found cc3d's numbering to be scipy's on every slab
    (labelling is deterministic), so it is not scanned again.

    Raises
    ------
    SweepError
        When the slab's local labelling differs from pass 1's (the input changed), or a
        label does not fit ``dtype``.
    """
    lab, n = local_label(mask, structure, check)
    del mask
    if n != len(lut) - 1:
        raise SweepError(
            f"{_FUNC}: slab {s} has {n} local labels in the second pass but had "
            f"{len(lut) - 1} in the first: the input changed between the passes "
            "(is it deterministic?)."
        )
    if lut.dtype != dtype:
        top = int(lut.max(initial=0))
        if top > np.iinfo(dtype).max:
            raise SweepError(
                f"{_FUNC}: label {top} does not fit the output dtype {dtype}. "
                "Pass output=np.int64."
            )
        lut = lut.astype(dtype)
    return K.apply_lut(lab, lut)


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
    token = tokenize(image.name, st, out_dtype, plan.slabs, settings.threads, reserve)
    num, out = f"label-num-{token}", f"label-{token}"
    nz = (0,) * (image.ndim - 1)
    block = _block(settings.memory_limit)
    tune = settings.tune_malloc  # freed slabs leave the process at once
    if split is not None:
        return _split_graph(plan, image, readers, split, st, out_dtype, settings, reserve, token)
    if plan.inline:
        res = f"label-resolve-{token}"
        dsk: dict = {
            res: Task(
                res, _resolve, readers, st, out_dtype, reserve, block, settings.threads, tune
            )
        }
        first = [res] * len(readers)
    else:
        dsk, first = _stage_graph(readers, st, out_dtype, reserve, block, settings, token)
    dsk[(num,)] = Task((num,), _num, TaskRef(first[-1]))
    for s, r in enumerate(readers):  # pass 2: independent slabs
        ext = [] if r.inline else [TaskRef(k) for k in r.block_keys()]
        key = (out, s, *nz)
        dsk[key] = Task(key, _pass2, r, st, TaskRef(first[s]), s, out_dtype, tune, *ext)
    return _arrays(dsk, plan, image, out, num, out_dtype)


def _arrays(dsk: dict, plan: SweepPlan, image: Any, out: str, num: str, out_dtype: np.dtype):
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    deps = () if plan.inline else (image,)
    # two layers, each with its own array's shape and chunks (graph optimisers, the sweep's
    # among them, read a layer's collection annotations): the labels' blocks, and the rest
    # (passes 1, the resolve step, the count) that they depend on
    blocks = {k: v for k, v in dsk.items() if isinstance(k, tuple) and k[0] == out}
    rest = {k: v for k, v in dsk.items() if k not in blocks}
    g_num = HighLevelGraph.from_collections(num, MaterializedLayer(rest), dependencies=deps)
    count = da.Array(g_num, num, (), meta=np.empty((), dtype=np.intp))
    # what pass 2 holds while a sweep consumes the labels: that sweep plans for the rest
    layer = MaterializedLayer(blocks, collection_annotations={FEEDING: plan.feeding_bytes})
    g_out = HighLevelGraph.from_collections(out, layer, dependencies=(*deps, count))
    rows = tuple(b - a for a, b in plan.slabs)
    chunks = (rows,) + tuple((m,) for m in image.shape[1:])
    labels = da.Array(g_out, out, chunks, meta=np.empty((0,) * image.ndim, dtype=out_dtype))
    return labels, count


def _split_graph(plan, image, readers, split, st, out_dtype, settings, reserve, token):
    """The graph of slabs within chunk rows: pass 1 as one task, then per row a read
    task (the packed mask) and per slab a pass-2 task.

    Row ``r`` is read once the last slab of row ``r - 1`` is done (the row it
    replaces), so at most two packed rows are held at a time, as the plan counts.
    """
    num, out = f"label-num-{token}", f"label-{token}"
    res, rowk = f"label-resolve-{token}", f"label-row-{token}"
    nz = (0,) * (image.ndim - 1)
    tune = settings.tune_malloc
    chunks0 = image.chunks[0]
    shapes = [(int(h), *image.shape[1:]) for h in chunks0]
    chunks = tuple(image.chunks[1:])
    block = _block(settings.memory_limit)
    dsk: dict = {
        res: Task(
            res, _resolve, readers, st, out_dtype, reserve, block, settings.threads, tune,
            None, (split, shapes, chunks),
        )
    }
    dsk[(num,)] = Task((num,), _num, TaskRef(res))
    last: dict = {}
    for s, (r, _, _) in enumerate(split):
        last[r] = s
    for r, reader in enumerate(readers):
        gate = [TaskRef((out, last[r - 1], *nz))] if r >= 1 else []
        dsk[(rowk, r)] = Task(
            (rowk, r), _read_row, reader, shapes[r], chunks, tune, TaskRef(res), *gate
        )
    for s, (r, a, b) in enumerate(split):
        key = (out, s, *nz)
        dsk[key] = Task(
            key, _pass2_split, TaskRef((rowk, r)), a, b, st, TaskRef(res), s, out_dtype, tune
        )
    return _arrays(dsk, plan, image, out, num, out_dtype)


def _stage_graph(readers, st, out_dtype, reserve, block, settings, token) -> tuple[dict, list]:
    """Pass 1 and the numbering as per-slab tasks, for an input dask computes (external).

    The input blocks are then dependencies of the local tasks, one slab's worth at a
    time; returns the graph and the key each pass-2 slab waits for.
    """
    loc, fac, lnk = f"label-local-{token}", f"label-face-{token}", f"label-link-{token}"
    numb = f"label-number-{token}"
    n = len(readers)
    ahead = max(1, settings.threads)  # finished local slabs waiting for the link chain
    dsk: dict = {}
    for s in range(n - 1, -1, -1):  # pass 1: backward
        r = readers[s]
        ext = [TaskRef(k) for k in r.block_keys()]
        after = TaskRef((lnk, s + ahead)) if s + ahead < n else None
        dsk[(loc, s)] = Task((loc, s), _local, r, st, after, settings.tune_malloc, *ext)
        pairs = prev = None
        if s + 1 < n:
            dsk[(fac, s)] = Task((fac, s), _face, TaskRef((loc, s)), TaskRef((loc, s + 1)), st)
            pairs, prev = TaskRef((fac, s)), TaskRef((lnk, s + 1))
        dsk[(lnk, s)] = Task((lnk, s), _link, TaskRef((loc, s)), pairs, prev, reserve, s)
    for s in range(n):  # numbering: forward over the tables
        prev = TaskRef((numb, s - 1)) if s else None
        dsk[(numb, s)] = Task(
            (numb, s), _number, TaskRef((lnk, s)), prev, out_dtype, reserve, block, s
        )
    return dsk, [(numb, s) for s in range(n)]
