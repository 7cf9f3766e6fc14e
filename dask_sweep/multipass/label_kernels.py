"""Numba kernel of connected-component labelling: the label pairs joined across a face.

Voxel ``p`` of the upper plane touches voxel ``p + d`` of the lower plane for
every offset ``d`` of the structure's crossing part; both nonzero gives a pair.
One scan of the plane visits each upper foreground voxel once.

Most offsets need not be looked at: when the straight offset crosses and ``d``
also connects voxels *within* a plane, then

* ``low[p] > 0`` means ``low[p]`` and ``low[p + d]`` are one label (the lower
  slab's own labelling joined them), and ``(up[p], low[p])`` is the straight
  pair at ``p``;
* ``up[p + d] > 0`` means ``up[p + d] == up[p]``, and the straight pair at
  ``p + d`` is the same pair,

so offset ``d`` can only add a pair where both are background.  A key
equal to the last one of its offset (a component crossing the face over many
voxels) is not emitted again; the buffer is sorted and deduplicated when it fills.  The kernel releases
the GIL.

Also here: :func:`apply_lut`, pass 2's mapping of local labels to final ids,
in place when both have the same width (so a slab's labels become its output
block without a second array), without the GIL.
"""

from __future__ import annotations

import numpy as np

from dask_sweep.runtime.jit import kernel


@kernel
def _scan(up, low, offs, nr, straight, width, buf, k, prev, start):  # pragma: no cover
    """Emit keys from flat voxel ``start`` on; stop when ``buf`` is full.

    ``offs[:nr]`` are the offsets always looked at, ``offs[nr:]`` the reducible
    ones, looked at only where the straight pair is absent.  Returns ``(keys in
    buf, voxel to resume at)``; the voxel where it stopped is scanned again from
    its first offset (a repeated key is harmless).
    """
    n0, n1 = up.shape
    m = offs.shape[0]
    i0 = start // n1
    for i in range(i0, n0):
        for j in range(start - i0 * n1 if i == i0 else 0, n1):
            a = up[i, j]
            if a <= 0:
                continue
            b = low[i, j]
            top = m
            if straight and b > 0:
                top = nr  # the straight pair stands for every reducible offset
                key = a * width + b
                if key != prev[m]:
                    if k == buf.shape[0]:
                        return k, i * n1 + j
                    prev[m] = key
                    buf[k] = key
                    k += 1
            for o in range(top):
                ii = i + offs[o, 0]
                jj = j + offs[o, 1]
                if ii < 0 or ii >= n0 or jj < 0 or jj >= n1:
                    continue
                bb = low[ii, jj]
                if bb <= 0 or (o >= nr and up[ii, jj] > 0):
                    continue
                key = a * width + bb
                if key == prev[o]:
                    continue
                if k == buf.shape[0]:
                    return k, i * n1 + j
                prev[o] = key
                buf[k] = key
                k += 1
    return k, n0 * n1


def face_pairs_2d(
    up: np.ndarray,
    low: np.ndarray,
    cross: np.ndarray,
    inplane: np.ndarray,
    cap: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Unique ``(upper id, lower id)`` pairs, sorted, as a ``(k, 2)`` array of the
    faces' dtype (int32 faces: int32 pairs).

    Parameters
    ----------
    up, low
        2-D planes of label ids (0: background), same shape and integer dtype,
        C-contiguous.
    cross
        ``(3, 3)`` bool: offsets from an upper voxel to the lower voxels it touches.
    inplane
        ``(3, 3)`` bool: offsets that connect voxels within one plane (the
        structure's middle part), which make most crossing offsets redundant.
    cap
        Initial buffer size in keys (default: a quarter of the plane, at least 1024).
    width
        More than the largest id in ``low``, when known (default: found by a scan).

    The keys buffer (8 B each) grows to at most two per distinct pair the face can
    have (:func:`distinct_pairs`), and the pairs are written over it: at the peak
    :func:`pair_bytes` per voxel of the plane.
    """
    straight = bool(cross[1, 1])
    offs = np.argwhere(cross).astype(np.int64) - 1
    offs = offs[(offs != 0).any(axis=1)].reshape(-1, 2)
    reducible = np.array(
        [straight and bool(inplane[d0 + 1, d1 + 1]) for d0, d1 in offs], dtype=np.bool_
    )
    offs = np.ascontiguousarray(np.concatenate([offs[~reducible], offs[reducible]]))
    nr = int((~reducible).sum())
    width = int(low.max(initial=0)) + 1 if width is None else int(width)
    # A quarter of `most`: the buffer is compacted (sorted, unique) when full and grown
    # (doubled, up to `most`: twice the distinct pairs the face can have) only when
    # compaction leaves it more than half full, so it never outgrows `most`.
    most = max(1024, 2 * distinct_pairs(up.shape, straight and not len(offs), inplane))
    buf = np.empty(min(most, cap or max(1024, -(-most // 4))), dtype=np.int64)
    prev = np.full(len(offs) + 1, -1, dtype=np.int64)
    k, p = _scan(up, low, offs, nr, straight, width, buf, 0, prev, 0)
    while p < up.size:
        u = unique_inplace(buf[:k])
        if 2 * u > len(buf):  # (never at `most`: the else is a safeguard)
            grown = np.empty(min(most, 2 * len(buf)) if len(buf) < most else 2 * len(buf),
                             dtype=np.int64)
            grown[:u] = buf[:u]
            buf = grown
            del grown
        k, p = _scan(up, low, offs, nr, straight, width, buf, u, prev, p)
    k = unique_inplace(buf[:k])
    dt = np.result_type(up.dtype, low.dtype)
    if dt.itemsize == 4:  # a pair of int32 takes the slot of its int64 key: written over it
        pairs = buf.view(dt)[: 2 * k].reshape(k, 2)
        split_keys(buf, width, pairs, k)
        return pairs.copy()  # the buffer (up to 16 B per voxel) released
    pairs = np.empty((k, 2), dtype=np.int64)
    split_keys(buf, width, pairs, k)
    return pairs


#: Peak bytes of :func:`face_pairs_2d` per voxel of the plane, worst case (one distinct
#: pair per voxel): the keys buffer at its largest, two keys per voxel (16), with its
#: sort's buffer (half the keys: 8) or the pairs copied out of it (8); growing it holds
#: the old beside the new (8 + 16).  Half of it where a face has at most one distinct
#: pair per two voxels (:func:`pair_bytes`).
PAIR_BYTES = 24


def _joined(inplane: np.ndarray, rows: bool, cols: bool) -> bool:
    """Whether ``inplane`` (3 x 3) joins each voxel to its direct neighbours along the
    rows (if ``rows``: the plane has more than one) and the columns (if ``cols``)."""
    need = ([(0, 1), (2, 1)] if rows else []) + ([(1, 0), (1, 2)] if cols else [])
    return all(bool(inplane[i, j]) for i, j in need)


def distinct_pairs(shape: tuple[int, ...], straight_only: bool, inplane: np.ndarray) -> int:
    """The most distinct pairs a face of ``shape`` (2-D) can have.

    One per voxel in general.  Where the only crossing offset is the straight one
    (face connectivity) and the plane's own structure (``inplane``, 3 x 3) joins each
    voxel to its direct neighbours, two such neighbours that both cross join the same
    two labels: each distinct pair takes a component of the crossing voxels under
    4-connectivity, and a grid has at most ``ceil(voxels / 2)`` of those (a
    checkerboard).
    """
    n = int(np.prod(shape, dtype=np.int64))
    if straight_only and _joined(inplane, shape[0] > 1, shape[1] > 1):
        return -(-n // 2)
    return n


#: The local labeller's own tables, bytes per voxel of a slab beyond its uint32 labels,
#: for structures other than face connectivity: cc3d's (C++ allocations, measured as
#: resident growth on 8 x 512 x 512 slabs: at most 2.3 B, a 6-connected checkerboard;
#: 0.8 with 26-connectivity) with a margin; scipy's are at most 1.
LOCAL_TABLES = 2.5


def table_bytes(structure: np.ndarray) -> float:
    """Bytes per voxel of a slab the local labelling holds beyond its mask and its
    uint32 labels, labelling with ``structure`` (``(3,) * ndim`` bool).

    Face connectivity (scipy's default) in 2 or 3 axes is labelled by
    :func:`label_slab`, whose union-find table holds one 4 B entry per run (a run
    starts at most every other voxel): 2 B; in one axis (or a slab with one axis
    longer than 1) as runs, with a copy of the mask and its negation: 2 B.  Anything
    else goes to cc3d or scipy: :data:`LOCAL_TABLES`.
    """
    structure = np.asarray(structure, dtype=bool)
    if 1 <= structure.ndim <= 3:
        ctr = (1,) * structure.ndim
        faces = np.zeros_like(structure)
        faces[ctr] = True
        for ax in range(structure.ndim):
            for d in (0, 2):
                at = list(ctr)
                at[ax] = d
                faces[tuple(at)] = True
        if np.array_equal(structure, faces):
            return 2.0
    return LOCAL_TABLES


def pair_bytes(structure: np.ndarray, itemsize: int = 4) -> int:
    """Peak bytes of the face step per voxel of a face, labelling with ``structure``
    (``(3,) * ndim`` bool), for faces of ``itemsize``-byte ids.

    :func:`face_pairs_2d` (inputs of 2 or 3 axes): its keys buffer (8 B a key, up to
    two keys per distinct pair the face can have) and, beside it, its sort's buffer or
    the pairs (4 B a key for int32 ids, 8 for int64): 24 B for int32 faces in general
    (:data:`PAIR_BYTES`), 12 where a face has at most one distinct pair per two voxels
    (:func:`distinct_pairs`: face connectivity, the default).  Higher ranks go through
    numpy: :data:`PAIR_BYTES`.
    """
    structure = np.asarray(structure, dtype=bool)
    if structure.ndim not in (2, 3):
        return PAIR_BYTES if structure.ndim > 3 else 12
    cross, inplane = structure[2], structure[1]
    straight_only = bool(cross[(1,) * cross.ndim]) and int(cross.sum()) == 1
    if structure.ndim == 2:  # a 2-D input's faces are lines: one row of a 3 x 3
        line = np.zeros((3, 3), dtype=bool)
        line[1] = inplane
        half = straight_only and _joined(line, False, True)
    else:
        half = straight_only and _joined(inplane, True, True)
    return (12 if itemsize <= 4 else 16) * (1 if half else 2)


@kernel
def _unique_sorted(a):  # pragma: no cover - compiled
    k = 0
    for i in range(a.shape[0]):
        if k == 0 or a[i] != a[k - 1]:
            a[k] = a[i]
            k += 1
    return k


def unique_inplace(a: np.ndarray) -> int:
    """Sort ``a`` in place and move its distinct values to its front; their count.

    Not :func:`numpy.unique`: on mostly distinct int64 keys numpy 2.4's (a hash table
    first) takes about twelve times a sort (318 ms against 25 ms for 512 Ki keys), and
    it copies.  A stable sort (timsort: a buffer of at most half the keys) because keys
    come nearly in order (labels are numbered in raster order): 0.2-1 ms for 512 Ki
    such keys, against 25 ms for numpy's default sort (30 ms in random order).
    """
    if len(a) < 2:
        return len(a)
    a.sort(kind="stable")
    return int(_unique_sorted(a))


@kernel
def split_keys(keys, width, out, k):  # pragma: no cover - compiled
    # pair i takes exactly key i's 8 bytes (int32 pairs over int64 keys): read first
    for i in range(k):
        q = keys[i] // width
        r = keys[i] - q * width
        out[i, 0] = q
        out[i, 1] = r


@kernel
def _apply_lut(lab, lut, out):  # pragma: no cover - compiled
    for i in range(lab.shape[0]):
        out[i] = lut[lab[i]]


# (local labels, table / output) dtypes the compiled mapping handles: cc3d's uint32
# labels or scipy's int32 ones, to the default int32 output.  Anything else goes
# through numpy (compiling another signature inside a run would cost its budget).
_LUT_TYPES = {
    (np.dtype(np.uint32), np.dtype(np.int32)),
    (np.dtype(np.int32), np.dtype(np.int32)),
    (np.dtype(np.uint32), np.dtype(np.uint32)),  # raster_order's renumbering
}


@kernel
def _first_seen(lab, n, rank):  # pragma: no cover - compiled
    nxt = 1
    for i in range(lab.shape[0]):
        v = lab[i]
        if v != 0 and rank[v] == 0:
            rank[v] = nxt
            nxt += 1
            if nxt > n:
                break
    return nxt


def raster_order(lab: np.ndarray, n: int) -> np.ndarray | None:
    """Labels ``1..n`` renumbered by the raster order (C order) of their first voxel.

    Returns the ``uint32`` table ``old -> new`` (0 stays 0), or None when the
    numbering already is scipy's.  One scan of ``uint32`` labels, stopping at the
    first voxel of the last label, without the GIL.
    """
    rank = np.zeros(n + 1, dtype=np.uint32)
    if n:
        _first_seen(lab.reshape(-1), n, rank)
    if np.array_equal(rank, np.arange(n + 1, dtype=np.uint32)):
        return None
    return rank


def apply_lut(lab: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut[lab]`` with ``lut``'s dtype, written over ``lab`` when both are as wide.

    ``lab`` is consumed (its buffer may become the result); the compiled loop
    releases the GIL, so the other slabs' work runs meanwhile.
    """
    if (lab.dtype, lut.dtype) not in _LUT_TYPES or not lab.flags.c_contiguous:
        return lut[lab]
    flat = lab.reshape(-1)
    out = flat.view(lut.dtype) if lab.dtype.itemsize == lut.dtype.itemsize else None
    if out is None:  # pragma: no cover - both int32-sized today
        out = np.empty(flat.shape, lut.dtype)
    _apply_lut(flat, lut, out)
    return out.reshape(lab.shape)


@kernel
def _find(parent, x):  # pragma: no cover - compiled
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@kernel
def _union_by_shared(parent, first, labels, bs):  # pragma: no cover - compiled
    for i in range(labels.shape[0]):
        lab, b = labels[i], bs[i]
        f = first[b]
        if f < 0:
            first[b] = lab
            continue
        x, y = _find(parent, lab), _find(parent, f)
        if x != y:  # the smaller label is the root: a set's root is its smallest label
            if x < y:
                parent[y] = x
            else:
                parent[x] = y
    for i in range(parent.shape[0]):
        parent[i] = parent[parent[i]]  # roots come first (root <= label): one sweep


def smallest_linked(n: int, labels: np.ndarray, bs: np.ndarray, dtype) -> np.ndarray:
    """For each label ``0..n``, the smallest label joined to it by sharing a ``b``.

    ``labels[i]`` and ``bs[i]`` (integers, ``bs`` >= 0; views of a pairs array do) are
    the pairs; a union-find
    (``dtype``: int32, or int64 beyond) whose roots are their sets' smallest
    labels, in place in the result, without the GIL.
    """
    parent = np.arange(n + 1, dtype=dtype)  # becomes B in place
    if len(labels):
        first = np.full(int(bs.max()) + 1, -1, dtype=dtype)
        _union_by_shared(parent, first, labels, bs)
    return parent


@kernel
def _label_runs(m, dz, dy, ext, out, par):  # pragma: no cover - compiled
    """Connected components of ``m`` (uint8, 3-D) into ``out`` (uint32), in raster order.

    Works on runs (foreground stretches along the last axis, each joined by the
    structure's own neighbour along it).  A run meets, in each earlier row ``(dz, dy)``
    the structure reaches, the voxels from its start ``- ext`` to its end ``+ ext``
    (``ext`` 1 where the structure reaches diagonally along the last axis); it takes the
    provisional id of the first labelled one and unites the others (a union-find in
    ``par`` whose roots are their sets' smallest ids), or starts a new id.  Ids are made
    in raster order, so a set's root is its first voxel's, and numbering roots in order
    is scipy's numbering.  Returns the count, or -1 when ``par`` is too small.
    """
    Z, Y, X = m.shape
    k = dz.shape[0]
    nxt = 1
    for z in range(Z):
        for y in range(Y):
            x = 0
            while x < X:
                if m[z, y, x] == 0:
                    out[z, y, x] = 0
                    x += 1
                    continue
                s = x
                while x < X and m[z, y, x] != 0:
                    x += 1
                lab = 0
                for r in range(k):
                    zz, yy = z + dz[r], y + dy[r]
                    if zz < 0 or yy < 0 or yy >= Y:
                        continue
                    prev = 0
                    for xx in range(max(0, s - ext[r]), min(X, x + ext[r])):
                        b = out[zz, yy, xx]
                        if b == 0 or b == prev:
                            continue
                        prev = b
                        if lab == 0:
                            lab = b
                        elif b != lab:
                            ra, rb = _find(par, lab), _find(par, b)
                            if ra < rb:
                                par[rb] = ra
                            elif rb < ra:
                                par[ra] = rb
                if lab == 0:
                    if nxt == par.shape[0]:
                        return -1
                    par[nxt] = nxt
                    lab = nxt
                    nxt += 1
                for xx in range(s, x):
                    out[z, y, xx] = lab
    # final ids in place: parents come first (par[i] <= i), so par[par[i]] is final
    n = 0
    par[0] = 0
    for i in range(1, nxt):
        p = par[i]
        if p == i:
            n += 1
            par[i] = n
        else:
            par[i] = par[p]
    flat = out.reshape(-1)
    for i in range(flat.shape[0]):
        flat[i] = par[flat[i]]
    return n


def label_slab(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``scipy.ndimage.label(mask, structure)`` of a 2-D or 3-D mask as ``uint32`` labels,
    without the GIL (slabs are labelled on several threads at once); None when the
    structure does not join neighbours along the last axis (not a run labelling).

    ``structure`` is symmetric, ``(3,) * mask.ndim``.  Runs start at most every other
    voxel, so the union-find's table holds at most one 4 B entry per two voxels.
    """
    s = np.asarray(structure, dtype=bool)
    m = np.ascontiguousarray(mask).view(np.uint8)
    if m.ndim == 2:
        m, s = m[None], np.stack([np.zeros_like(s), s, np.zeros_like(s)])
    if not s[1, 1, 2]:
        return None
    rows = [(a - 1, b - 1) for a in range(3) for b in range(3)
            if (a - 1, b - 1) < (0, 0) and s[a, b].any()]
    dz = np.array([r[0] for r in rows], dtype=np.int64)
    dy = np.array([r[1] for r in rows], dtype=np.int64)
    # a row the structure reaches only straight (dx 0) or also diagonally (dx -1, 0, 1);
    # a row reached only diagonally is no run overlap: refused
    ext = np.array([int(s[r[0] + 1, r[1] + 1, 0]) for r in rows], dtype=np.int64)
    if any(not s[r[0] + 1, r[1] + 1, 1] or s[r[0] + 1, r[1] + 1, 0] != s[r[0] + 1, r[1] + 1, 2]
           for r in rows):
        return None
    out = np.empty(m.shape, dtype=np.uint32)
    z, y, x = m.shape
    par = np.empty(z * y * ((x + 1) // 2) + 1, dtype=np.uint32)
    n = _label_runs(m, dz, dy, ext, out, par)
    if n < 0:  # pragma: no cover - runs start at most every other voxel
        raise RuntimeError("label_slab: the union-find table overflowed")
    return out.reshape(mask.shape), int(n)


_warm = False


def warm() -> None:
    """Compile the kernel now, on a tiny face (once per process).

    Called when a labelling is planned, so that numba's compiler (tens of MiB of
    resident memory, about a second) runs before the sweep, not inside its budget;
    once the kernels are in numba's disk cache (:mod:`dask_sweep.runtime.jit`) this
    loads them (~0.1 s).
    """
    global _warm
    if not _warm:
        for dt in (np.int32, np.int64):  # int32 pairs written over their keys, else int64
            one = np.ones((2, 2), dtype=dt)
            face_pairs_2d(one, one, np.ones((3, 3), bool), np.ones((3, 3), bool))
        lut = np.zeros(2, dtype=np.int32)
        for dt, lt in _LUT_TYPES:
            apply_lut(np.ones(2, dtype=dt), lut.astype(lt))
        raster_order(np.ones(2, dtype=np.uint32), 1)
        label_slab(np.ones((1, 1, 2), bool), np.ones((3, 3, 3), bool))
        one = np.ones(1, dtype=np.int64)
        smallest_linked(1, one, one, np.int32)
        for dt in (np.int32, np.int64):  # link steps pass views of the pairs
            pairs = np.ones((1, 2), dtype=dt)
            smallest_linked(1, pairs[:, 0], pairs[:, 1], np.int32)
        unique_inplace(np.arange(3, dtype=np.int64))
        _warm = True
