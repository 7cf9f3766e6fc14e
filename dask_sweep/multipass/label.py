"""Connected-component labelling in two streaming passes, identical to scipy's.

Algorithm
---------
The input is cut into slabs along axis 0 (whole input chunk rows, sized by
:mod:`dask_sweep.passes.tables`; or, when one chunk row does not fit the
budget and the input is read inside the slab tasks, slabs within the rows:
each row is then read once per pass into a mask of one bit per voxel and
its slabs are unpacked from it, :func:`read_row`).  Label ``l`` of slab ``s`` means scipy's
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
connectivity the diagonals count; :mod:`.label_kernels`), unites the slab's
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
(:mod:`dask_sweep.multipass.spill`), so memory does not grow with the number
of slabs.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from dask_sweep.errors import SweepConfigError, SweepError
from dask_sweep.multipass import BlockInput, SlabInput, spill
from dask_sweep.multipass import label_kernels as K
from dask_sweep.runtime.memory import trims, tune_allocator

__all__ = [
    "NAME",
    "Resolved",
    "count",
    "face_pairs",
    "face_step",
    "final_ids",
    "link_step",
    "local_label",
    "local_step",
    "map_labels",
    "normalize_output",
    "normalize_structure",
    "number_step",
    "numbering_block",
    "pass2",
    "pass2_split",
    "read_row",
    "relabel",
    "resolve",
    "smallest_linked",
    "structure_rank",
]

# The name errors give (the DSL's front end passes its own to the validation).
NAME = "dask_sweep.ndimage.label"

# Labels handled at once by the numbering step (bounds its temporaries, ~48 B per
# label): budget / 64 / 48, within these limits.
_BLOCK_MIN, _BLOCK_MAX = 16, 1 << 16
BLOCK_BYTES = 48


def numbering_block(budget: int) -> int:
    """Labels the numbering step handles at once under a budget of ``budget`` bytes."""
    return int(min(_BLOCK_MAX, max(_BLOCK_MIN, budget // 64 // BLOCK_BYTES)))


# --------------------------------------------------------------------------- validation


def normalize_structure(structure: Any, ndim: int, func: str = NAME) -> np.ndarray:
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
        raise SweepConfigError(f"{func}: structure must be array-like. Got {structure!r}.") from e
    if s.dtype == object or s.dtype.kind not in "biuf":
        raise SweepConfigError(
            f"{func}: expected structure to be a numeric or bool array. "
            f"Got dtype {s.dtype} instead."
        )
    if s.ndim != ndim:
        raise SweepConfigError(
            f"{func}: structure and input must have equal rank. Expected a structure with "
            f"{ndim} axes (shape {(3,) * ndim}). Got shape {s.shape} instead."
        )
    if s.shape != (3,) * ndim:
        raise SweepConfigError(
            f"{func}: structure dimensions must be equal to 3. Expected shape {(3,) * ndim}. "
            f"Got shape {s.shape} instead."
        )
    s = s != 0
    if not np.array_equal(s, s[(slice(None, None, -1),) * ndim]):
        raise SweepConfigError(
            f"{func}: structure is not symmetric (connectivity must go both ways). "
            "Expected structure == structure[::-1, ::-1, ...]."
        )
    return s


def normalize_output(output: Any, func: str = NAME) -> np.dtype:
    """The labels' dtype: ``None`` is scipy's int32; only integer dtypes, no arrays."""
    if output is None:
        return np.dtype(np.int32)
    if isinstance(output, np.ndarray):
        raise SweepConfigError(
            f"{func}: output arrays are not supported (the result is a lazy dask array). "
            "Pass a dtype such as np.int64, or None for int32."
        )
    try:
        dt = np.dtype(output)
    except TypeError as e:
        raise SweepConfigError(
            f"{func}: expected output to be None or a dtype. Got {output!r}."
        ) from e
    if dt.kind not in "iu":
        raise SweepConfigError(
            f"{func}: expected output to be an integer dtype. Got {dt} instead."
        )
    return dt


# --------------------------------------------------------------------------- tasks


def _read_mask(reader: SlabInput, blocks: tuple) -> np.ndarray:
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
# so a second labelling would not run meanwhile, only hold its memory.  (The slabs'
# footprints count every slab in flight labelling at once, as the run kernel does.)
_LABELLING = threading.Lock()


def local_label(
    mask: np.ndarray, structure: np.ndarray, check: bool = True
) -> tuple[np.ndarray, int]:
    """A slab's own labels in scipy's numbering, and their count.

    ``mask`` is bool.  For the structures of :func:`structure_rank`, axes of
    length 1 are dropped (no neighbour lies along them: the structure becomes
    the one of the same rank in fewer axes); then 2-D and 3-D slabs are labelled
    in ``uint32``: with face connectivity (scipy's default) by the run kernel
    :func:`~.label_kernels.label_slab` (scipy's numbering by construction, without
    the GIL, so slabs in flight are labelled at once), else by ``cc3d``
    (connected-components-3d, 3-5x faster than scipy here; it holds the GIL); 1-D
    ones as runs (cc3d refuses some inputs with an axis of length 1).  cc3d numbers
    labels in raster order of their first voxel, as scipy; that is checked on every
    slab (one scan,
    :func:`~.label_kernels.raster_order`), and the labels would be renumbered
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
    if rank == 1:  # faces (scipy's default): runs, without the GIL, in scipy's numbering
        lab, n = K.label_slab(m, ndi.generate_binary_structure(len(core), 1))
        return lab.reshape(mask.shape), n, False
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


def face_pairs(
    upper: np.ndarray, lower: np.ndarray, cross: np.ndarray, inplane: np.ndarray | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Unique ``(upper id, lower id)`` pairs linked across a face, sorted (int32 pairs
    of int32 faces, else int64).

    ``cross`` is ``structure[2]``: which in-plane offsets connect a voxel to the
    plane below it.  ``inplane`` is ``structure[1]`` when both planes come from
    labelling with that structure (then most offsets are redundant; see
    :mod:`~dask_sweep.multipass.label_kernels`), else None.  Faces of up to two
    axes (inputs of up to three) go through the compiled kernel; higher ranks
    through numpy.  ``width``: more than the largest id in ``lower``, when known.
    """
    if cross.ndim <= 2:
        lead = (1,) * (2 - cross.ndim)
        u = np.ascontiguousarray(upper.reshape(lead + upper.shape))
        d = np.ascontiguousarray(lower.reshape(u.shape))
        w = np.zeros((3, 3), dtype=bool) if inplane is None else _as_3x3(inplane)
        return K.face_pairs_2d(u, d, _as_3x3(cross), w, width=width)
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
            v = a[both].astype(np.int64) * width + b[both]
            keys.append(v[: K.unique_inplace(v)])
    if not keys:
        return np.empty((0, 2), dtype=np.int64)
    k = np.concatenate(keys)
    k = k[: K.unique_inplace(k)]
    out = np.empty((len(k), 2), dtype=np.int64)
    K.split_keys(k, width, out, len(k))
    return out


def read_row(reader: BlockInput, shape: tuple, chunks: tuple) -> _Row:
    """A chunk row's mask, one bit per voxel, packed along the last axis (C order).

    ``shape`` is the row's, ``chunks`` the input's in-plane chunks.  Blocks whose
    last-axis offsets are whole bytes are packed one by one; otherwise a strip of
    blocks along the last axis is joined first.
    """
    nbytes = math.ceil(shape[-1] / 8)
    bits = np.zeros((*shape[:-1], nbytes), dtype=np.uint8)
    starts = [np.cumsum((0, *c))[:-1] for c in chunks]
    aligned = all(int(o) % 8 == 0 for o in starts[-1])
    strip: dict = {}
    for ix, m in reader.blocks():
        m = m if m.dtype == bool else m != 0
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
    """Planes ``a:b`` of a chunk row, for :func:`resolve`: the row is read by its
    first slab to be labelled and dropped after its last one (``uses`` slabs)."""

    def __init__(self, row: _SharedRow, a: int, b: int) -> None:
        self.row, self.a, self.b = row, a, b

    def read(self, blocks: Any = ()) -> np.ndarray:
        return self.row.take(self.a, self.b)


class _SharedRow:
    def __init__(self, reader: BlockInput, shape: tuple, chunks: tuple, uses: int,
                 kept: spill.KeptMasks | None = None, r: int = 0) -> None:
        self.reader, self.shape, self.chunks, self.uses = reader, shape, chunks, uses
        self.kept, self.r = kept, r
        self.row: _Row | None = None
        self.lock = threading.Lock()

    def take(self, a: int, b: int) -> np.ndarray:
        with self.lock:
            if self.row is None:
                self.row = read_row(self.reader, self.shape, self.chunks)
                if self.kept is not None:  # for pass 2, instead of the input
                    self.kept.put(self.r, self.row.bits)
            out = self.row.planes(a, b)
            self.uses -= 1
            if self.uses == 0:
                self.row = None
        return out


class _Local:
    """A slab's local labelling: label count, both faces and the labels on its top face
    (``1..top_count``: labels are numbered in raster order of their first voxel).

    The faces are handed over: the face task above takes ``top``, the one below
    ``bottom``, each dropping its plane (the object may live until the link step).
    """

    __slots__ = ("n", "top", "bottom", "top_count", "renumbered")

    def __init__(self, n, top, bottom, top_count, renumbered=False) -> None:
        self.n, self.top, self.bottom, self.top_count = n, top, bottom, top_count
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


@trims
def local_step(
    reader: SlabInput,
    structure: np.ndarray,
    _after: Any,
    tune: bool,
    *blocks: Any,
    planes: _Planes | None = None,
    kept: spill.KeptArrays | None = None,
    s: int = 0,
    mask_dir: str | None = None,
) -> _Local:
    """Local label of one slab (faces are copies: a view would pin the label slab).

    ``_after`` is ignored: the dependency on a later link step only limits how
    many finished slabs wait for the link chain.  ``tune``: fix glibc's malloc
    thresholds first (``sweep.tune-malloc``).  ``planes``: where the faces are
    copied to (default new arrays).  ``kept``: where slab ``s``'s mask (packed) or
    its local labels are kept for pass 2; ``mask_dir``: where its packed mask is
    written for pass 2 (an input dask computes, which pass 2 does not ask for again).
    """
    if tune:
        tune_allocator()
    mask = _read_mask(reader, blocks)
    if mask_dir is not None:
        spill.put_mask(mask_dir, s, mask)
    if isinstance(kept, spill.KeptMasks):
        kept.put(s, np.packbits(mask, axis=-1))
    lab, n, renumbered = _labelled(mask, structure, True)
    del mask
    if isinstance(kept, spill.KeptLabels):
        kept.put_labels(s, lab, n)  # narrowed and compressed a piece at a time
    if lab.shape[0] == 0:
        raise SweepError(f"{NAME}: internal error, an empty slab.")
    idt = _ids(n)  # the face kernel is compiled for int32 faces (int64 beyond)
    if planes is None:
        top, bottom = lab[0].astype(idt), lab[-1].astype(idt)
    else:
        top, bottom = planes.copy(lab[0], idt), planes.copy(lab[-1], idt)
    del lab
    # Labels are numbered in raster order of their first voxel, so those on the top
    # face are exactly 1..max (no sort of the plane needed).
    return _Local(int(n), top, bottom, int(top.max(initial=0)), renumbered)


def face_step(
    upper: _Local, lower: _Local, structure: np.ndarray, planes: _Planes | None = None
) -> np.ndarray:
    """Pairs ``(label of slab s, label of slab s+1)`` joined across their face.

    Runs apart from the link chain, so the plane scans of several faces share the
    threads; the link step only maps and unites pairs.  The two faces go back to
    ``planes`` when given.
    """
    a, b = upper.bottom, lower.top
    upper.bottom = lower.top = None
    # lower's top face holds ids 1..top_count (see local_step)
    pairs = face_pairs(a, b, structure[2], structure[1], width=lower.top_count + 1)
    if planes is not None:
        planes.give(a, b)
    return pairs


def smallest_linked(n: int, pairs: np.ndarray) -> np.ndarray:
    """``B``: for each label ``0..n``, the smallest label joined to it through ``pairs``.

    ``pairs`` are ``(label, b)``: labels sharing a ``b`` are joined.
    """
    p = np.asarray(pairs).reshape(-1, 2)
    return K.smallest_linked(n, p[:, 0], p[:, 1], _ids(n))  # views: no copies


class _Linked:
    """A link step's result: slab ``s``'s table (for numbering) and ``B`` on its top face.

    Two consumers take one part each and drop it (a hand-over): a scheduler may
    keep the object alive until its later consumer runs.
    """

    __slots__ = ("n", "table", "kept", "sdir", "top_map")

    def __init__(self, n, table, kept, sdir, top_map) -> None:
        self.n, self.table, self.kept, self.sdir, self.top_map = n, table, kept, sdir, top_map


def link_step(
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
        pairs = np.empty((0, 2), _ids(n))
    if prev is None:
        kept, sdir = 0, None
    else:
        bs = prev.top_map
        kept, sdir = prev.kept, prev.sdir
        prev.top_map = None
        if len(pairs):
            # the lower ids are on slab s+1's top face: 1..m, their B at 0..m-1
            pairs[:, 1] = bs[pairs[:, 1] - 1]
            del bs
            # unique rows as one int64 key each, sorted in place, written back as rows
            w = int(pairs[:, 1].max()) + 1
            keys = np.multiply(pairs[:, 0], np.int64(w), dtype=np.int64)
            keys += pairs[:, 1]
            k = K.unique_inplace(keys)
            pairs = pairs[:k]
            K.split_keys(keys, w, pairs, k)
            del keys
    B = smallest_linked(n, pairs)
    top_map = B[1 : local.top_count + 1].copy()  # B of the labels on this slab's top face
    table = np.empty(len(B) + pairs.size, dtype=B.dtype)
    table[: len(B)] = B
    table[len(B) :] = pairs.reshape(-1)
    del B, pairs
    stored, kept, sdir = spill.keep_or_spill(
        table, kept, reserve, sdir, "label", f"B-{s:08d}.npy"
    )
    return _Linked(n, stored, kept, sdir, top_map)


def final_ids(B: np.ndarray, keys: np.ndarray, vals: np.ndarray, cum: int, block: int) -> tuple:
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


def number_step(
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
        table = spill.take(stored)
        spill.remove_dir(bdir)  # pass 1 has finished: empty once its last table is read
    else:
        table = stored
        kept -= table.nbytes  # released once this step is done with it
    del stored
    B = table[: n + 1]
    pairs = table[n + 1 :].reshape(-1, 2)
    lut, cum = final_ids(B, keys, vals, cum, block)
    if len(pairs):
        # one label per B value below: labels sharing a B below are joined (one root,
        # one final id), so any of them stands for it (not np.unique: a sort of copies)
        rep = np.full(int(pairs[:, 1].max()) + 1, -1, dtype=pairs.dtype)
        rep[pairs[:, 1]] = pairs[:, 0]
        nkeys = np.flatnonzero(rep >= 0)
        nvals = lut[rep[nkeys]]
        del rep
    else:
        nkeys = nvals = np.empty(0, dtype=np.int64)
    del table, B, pairs, keys, vals
    if cum <= np.iinfo(dtype).max:
        lut = lut.astype(dtype, copy=False)  # else int64: pass 2 reports the overflow
    out, kept, ldir = spill.keep_or_spill(lut, kept, reserve, ldir, "label", f"L-{s:08d}.npy")
    return _Numbered(out, nkeys, nvals, cum, kept, ldir)


class Resolved:
    """Both first stages in one task: every slab's lookup table, and the label count.

    Pass-2 task ``s`` takes ``luts[s]`` and drops it (a hand-over).  ``raster``:
    pass 1 labelled every slab in scipy's numbering, so pass 2 need not check.
    ``kept``: where pass 1 kept what pass 2 needs, when it did.
    """

    __slots__ = ("luts", "num", "raster", "kept")

    def __init__(self, luts: list, num: int, raster: bool = False,
                 kept: spill.KeptArrays | None = None) -> None:
        self.luts, self.num, self.raster, self.kept = luts, num, raster, kept


@trims
def resolve(
    readers: list[SlabInput],
    structure: np.ndarray,
    dtype: np.dtype,
    reserve: int,
    block: int,
    threads: int,
    tune: bool,
    on_slab: Any = None,
    split: Any = None,
    kept: spill.KeptArrays | None = None,
) -> Resolved:
    """Pass 1 and the numbering of inline-read slabs, in one task.

    The same steps as the per-slab graph, driven by a loop: local labelling on
    ``threads`` threads (the next ones while the link chain, here on the
    calling thread, works on the current slab), so the dask graph has one task
    here instead of four per slab, and the scheduler's bookkeeping does not grow
    with the number of slabs.  ``split``: ``(rows, row shapes, in-plane chunks)``
    when the slabs lie within chunk rows (``readers`` are then the rows').  ``kept``:
    where the masks read are kept for pass 2 (per row, or per slab).
    """
    from concurrent.futures import ThreadPoolExecutor

    if tune:
        tune_allocator()
    if split is not None:
        layout, shapes, chunks = split
        uses = [0] * len(readers)
        for r, _, _ in layout:
            uses[r] += 1
        rows = [_SharedRow(rd, sh, chunks, u, kept if isinstance(kept, spill.KeptMasks)
                           else None, r)
                for r, (rd, sh, u) in enumerate(zip(readers, shapes, uses))]
        readers = [_RowSlab(rows[r], a, b) for r, a, b in layout]
        if isinstance(kept, spill.KeptMasks):
            kept = None  # kept by the rows
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
                    local_step, readers[nxt], structure, None, False, planes=planes,
                    kept=kept, s=nxt,
                )
                nxt -= 1
            here = pending.pop(s).result()
            renumbered |= here.renumbered
            pairs = None if below is None else face_step(here, below, structure, planes)
            prev = linked[s] = link_step(here, pairs, prev, reserve, s)
            pairs = None  # not held beside the next face's
            if on_slab is not None:
                on_slab(s)  # the caller's per-slab measurement (the DSL's run report)
            below = here
    # the faces are done with: not held through the numbering
    here = below = None
    planes.free.clear()
    luts: list = []
    numbered = None
    for s in range(n):
        numbered = number_step(linked[s], numbered, dtype, reserve, block, s)
        linked[s] = None
        luts.append(numbered.lut)
        numbered.lut = None
    return Resolved(luts, int(numbered.cum), not renumbered, kept)


def count(src: _Numbered | Resolved) -> np.ndarray:
    """The number of components, from the last numbering step (or the resolve step)."""
    return np.array(src.cum if isinstance(src, _Numbered) else src.num, dtype=np.intp)


@trims
def pass2(
    reader: SlabInput,
    structure: np.ndarray,
    src: _Numbered | Resolved,
    s: int,
    dtype: np.dtype,
    tune: bool,
    *blocks: Any,
    kept: spill.KeptArrays | None = None,
    masks: tuple[str, int] | None = None,
) -> np.ndarray:
    """Pass 2 of slab ``s``: its local labels as pass 1 kept them, else its mask (as
    pass 1 kept it or wrote it to ``masks``: a directory and the last axis's length,
    else read) labelled again, mapped through its lookup table (taken from ``src``,
    the numbering step's or the resolve step's result, and dropped there)."""
    if tune:
        tune_allocator()
    lut = _take_lut(src, s)
    check = not (isinstance(src, Resolved) and src.raster)
    if masks is not None:
        return relabel(spill.take_mask(masks[0], s, masks[1]), structure, lut, s, dtype,
                       check)
    if isinstance(kept, spill.KeptLabels):
        lab = kept.take_labels(s)
        if lab is not None:
            return map_labels(lab, lut, s, dtype)
        kept = None
    mask = kept.take_mask(s) if kept is not None else None
    if mask is None:
        mask = _read_mask(reader, blocks)
    return relabel(mask, structure, lut, s, dtype, check)


@trims
def pass2_split(
    kept: spill.KeptArrays | None, r: int, reader: BlockInput, shape: tuple, chunks: tuple,
    parts: int, a: int, b: int, structure: np.ndarray, src: Resolved, s: int,
    dtype: np.dtype, tune: bool,
) -> np.ndarray:
    """Pass 2 of slab ``s``, planes ``a:b`` of chunk row ``r`` (``parts`` slabs).

    From the local labels pass 1 kept (:class:`~.spill.KeptLabels`), else from the
    slab's planes of the row's packed mask it kept (:class:`~.spill.KeptMasks`, read
    by byte range), else from the row read again (:func:`read_row`: another process,
    a full disk).  Each slab is a task of its own, so that a consumer of the labels
    takes each block as it comes under any order (a chain of row reads through the
    blocks was run by ``dask.order`` to its end first, holding every block).
    """
    if tune:
        tune_allocator()
    lut = _take_lut(src, s)
    if isinstance(kept, spill.KeptLabels):
        lab = kept.take_labels(s)
        if lab is not None:
            return map_labels(lab, lut, s, dtype)
        kept = None
    mask = kept.take_mask(r, a, b, parts) if kept is not None else None
    if mask is None:
        with _ROW_READS:  # one row's blocks read at a time, as the plan counts
            mask = read_row(reader, shape, chunks).planes(a, b)
    return relabel(mask, structure, lut, s, dtype, not src.raster)


# A row read again in pass 2 (its mask not kept) holds a block's read beside the
# packed row; the plan counts one such read at a time in a process.
_ROW_READS = threading.Lock()


def _take_lut(src: _Numbered | Resolved, s: int) -> np.ndarray:
    """Slab ``s``'s lookup table, taken from ``src`` (a hand-over) or its spill file."""
    if isinstance(src, Resolved):
        lut, src.luts[s] = src.luts[s], None
    else:
        lut, src.lut = src.lut, None
    if isinstance(lut, str):
        path = lut
        lut = spill.take(path)
        spill.remove_dir(os.path.dirname(path))
    return lut


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
            f"{NAME}: slab {s} has {n} local labels in the second pass but had "
            f"{len(lut) - 1} in the first: the input changed between the passes "
            "(is it deterministic?)."
        )
    return map_labels(lab, lut, s, dtype)


def map_labels(lab: np.ndarray, lut: np.ndarray, s: int, dtype: Any) -> np.ndarray:
    """Slab ``s``'s local labels (consumed) through its table, as ``dtype``."""
    if lut.dtype != dtype:
        top = int(lut.max(initial=0))
        if top > np.iinfo(dtype).max:
            raise SweepError(
                f"{NAME}: label {top} does not fit the output dtype {dtype}. "
                "Pass output=np.int64."
            )
        lut = lut.astype(dtype)
    return K.apply_lut(lab, lut)
