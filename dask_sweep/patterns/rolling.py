"""Padded sliding windows reduced over their window axes: xarray's default ``rolling``.

Without bottleneck, ``DataArray.rolling(z=5, center=True).sum()`` (and ``mean``,
``min``, ``max``, ``std``, ``var``, ``count``, ``median``, ``reduce``) builds::

    A ─► pad with a constant ─► [rechunk] ─► overlap (depth (0, w-1), trim=False)
      ─► sliding_window_view(window_shape, axis) ─► reduction over the window axes
          (a chunk Blockwise with keepdims, then ``…-aggregate``; or one Blockwise
          dropping them, e.g. nanmedian) ─► [_sqrt]

``A`` is the array xarray rolls (``fillna``, ``notnull``...), the pad is
``dask.array.pad(mode="constant")`` (``concatenate`` of ``broadcast_to`` blocks of
one fill value), and the result has ``A``'s shape: along each rolled axis ``k``::

    out[i] = reduce(A[i - lo_k : i + hi_k + 1])      the fill value beyond the faces
             lo, hi = w//2, w-1-w//2 (center) or w-1, 0

This module recognises the chain (every layer read, none assumed) and lowers it to
one stage reading ``A``, so sizing, rings, emission, ``explain`` and the budget are
the engine's own:

* a :class:`~dask_sweep.plan.ir.Kernel` (any slab; halo ``max(lo, hi)`` per rolled
  axis) whose ``fn`` pads its piece with the fill value and runs *dask's own*
  window view and reduction functions on it, when the result cannot depend on
  where the blocks are cut;
* otherwise a :class:`~dask_sweep.plan.ir.Blocked` stage: dask's own blocks (the
  output chunks, padded by ``lo``/``hi`` with the fill value: the very blocks the
  overlap layer makes), bit-identical whatever the function.

When is a window reduction block-invariant (``tests/test_xarray.py`` checks each
claim against numpy on blocks cut at random places)?  Order statistics (min, max,
median, nanmedian) and integer sums (count, sums of integers) give the same bits on
any block.  A floating sum (sum, nansum, mean, var, std) adds the window's values in
an order numpy's iterator picks from the block's shape (:func:`order_signature`):
one after the other in C order of the window, or pairwise over runs along the
innermost window axis, which depends on which of the block's axes have length 1.
When every one of dask's output blocks has the signature the sweep's pieces have
(a piece 1 element thick is padded to 2 and cropped, so they look like big
blocks), the Kernel computes the same bits; when dask's blocks differ among
themselves (a chunk of 1 where it matters), dask's blocks are kept and ``explain``
says why.  Blocks dask hands over in another memory order (a transposed source) are
outside this claim; their layout is not visible in the graph.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from dask._task_spec import Alias, GraphNode, Task, TaskRef
from dask.blockwise import Blockwise
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.layers import ArrayOverlapLayer

from dask_sweep.patterns.layers import BlockwiseEval, kernel_call
from dask_sweep.patterns.spec import Fallback, StageSpec, follow_rechunk

TRIM_FALSE = "overlap without trim (trim=False) is not swept"


# --- the functions dask's reductions use, by what their results depend on --------------

def _reduction_functions():
    from dask.array import chunk
    from dask.array.reductions import (
        _sqrt,
        chunk_max,
        chunk_min,
        mean_agg,
        mean_chunk,
        moment_agg,
        moment_chunk,
    )

    order_stats = {chunk_min: "min", chunk_max: "max", np.min: "min", np.max: "max",
                   np.amin: "min", np.amax: "max", np.nanmin: "min", np.nanmax: "max",
                   chunk.nanmin: "min", chunk.nanmax: "max"}
    sums = {np.sum: "sum", np.nansum: "sum", chunk.sum: "sum", chunk.nansum: "sum"}
    moments = {moment_chunk: "var", moment_agg: "var", mean_chunk: "mean", mean_agg: "mean"}
    medians = {np.median: "median", np.nanmedian: "median"}
    return order_stats, sums, moments, medians, _sqrt


def _unwrap(f):
    """The functions inside a partial / toolz Compose (``_concatenate2`` left out)."""
    from dask.array.core import _concatenate2

    out = []
    stack = [f]
    while stack:
        g = stack.pop()
        if isinstance(g, functools.partial):
            stack.append(g.func)
        elif hasattr(g, "first") and hasattr(g, "funcs"):  # toolz.Compose
            stack.extend([g.first, *g.funcs])
        elif g is not _concatenate2:
            out.append(g)
    return out


def _classify(funcs, out_dtype) -> tuple[str, str]:
    """``(name, kind)``: kind ``exact`` (any block), ``sum`` (order of a floating sum),
    or ``opaque`` (unknown: dask's blocks)."""
    order_stats, sums, moments, medians, _ = _reduction_functions()
    names, kinds = [], set()
    for f in funcs:
        if f in order_stats:
            names.append(order_stats[f])
            kinds.add("exact")
        elif f in medians:
            names.append(medians[f])
            kinds.add("exact")
        elif f in sums:
            names.append(sums[f])
            kinds.add("exact" if np.dtype(out_dtype).kind in "biu" else "sum")
        elif f in moments:
            names.append(moments[f])
            kinds.add("sum")
        else:
            return getattr(f, "__name__", type(f).__name__), "opaque"
    kind = "sum" if "sum" in kinds else "exact"
    return (names[0] if names else "reduction"), kind


# --- reading the graph -------------------------------------------------------------------

def _alias_target(value):
    """The key a task only forwards (``concatenate``'s blocks), or ``None``."""
    if isinstance(value, Alias):
        return value.target
    if isinstance(value, TaskRef):
        return value.key
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value
    return None


def _call(value):
    """``(func, args)`` of a legacy tuple task or a ``Task`` (references as keys)."""
    if isinstance(value, Task):
        def key(a):
            if isinstance(a, TaskRef):
                return a.key
            if isinstance(a, GraphNode):
                return getattr(a, "value", a)
            return a
        return value.func, tuple(key(a) for a in value.args)
    if isinstance(value, tuple) and value and callable(value[0]):
        return value[0], value[1:]
    return None, ()


def _fill_of(hlg: HighLevelGraph, name: str):
    """The constant of a ``broadcast_to(root scalar)`` pad layer, or ``None``."""
    layer = hlg.layers[name]
    if not isinstance(layer, MaterializedLayer):
        return None
    fill = None
    for key in layer:
        func, args = _call(layer[key])
        if func is not np.broadcast_to or not args:
            return None
        ref = args[0]
        if not (isinstance(ref, tuple) and ref and ref[0] in hlg.layers):
            return None
        root = hlg.layers[ref[0]]
        if hlg.dependencies.get(ref[0]) or ref not in root:
            return None
        v = root[ref]
        v = v.value if hasattr(v, "value") and not isinstance(v, np.ndarray) else v
        if callable(v) or isinstance(v, (tuple, GraphNode)):
            return None
        v = np.asarray(v)
        if v.ndim:
            return None
        if fill is not None and not _same(fill, v):
            return None
        fill = v
    return fill


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _unpad(hlg: HighLevelGraph, metas: dict, name: str):
    """``dask.array.pad(mode='constant')`` undone: ``(A, lo, hi, fill, layers)`` or a reason.

    ``name`` is the padded array; each ``concatenate`` pads one axis with blocks of
    ``broadcast_to(fill)`` before and after the array it wraps.
    """
    layers, deps = hlg.layers, hlg.dependencies
    ndim = metas[name].ndim
    lo, hi = [0] * ndim, [0] * ndim
    fill, absorbed, cur = None, set(), name
    while cur.startswith("concatenate-") and isinstance(layers[cur], MaterializedLayer):
        m = metas.get(cur)
        pads = [d for d in deps.get(cur, ()) if d.startswith("broadcast_to-")]
        inner = [d for d in deps.get(cur, ()) if d not in pads]
        if m is None or len(inner) != 1 or not pads or metas.get(inner[0]) is None:
            return "a concatenation that is not a constant pad"
        (d,) = inner
        md = metas[d]
        axes = [ax for ax in range(ndim) if m.shape[ax] != md.shape[ax]]
        if len(axes) != 1:
            return "a concatenation along several axes"
        (ax,) = axes
        before, seen = 0, None
        for i, c in enumerate(m.chunks[ax]):
            key = (cur, *(i if a == ax else 0 for a in range(ndim)))
            tgt = _alias_target(layers[cur].get(key) if key in layers[cur] else None)
            if tgt is None:
                return "a concatenation whose blocks are computed"
            if tgt[0] == d:
                seen = i
                break
            if tgt[0] not in pads:
                return "a concatenation of other arrays"
            before += c
        if seen is None:
            return "a concatenation of other arrays"
        for p in pads:
            f = _fill_of(hlg, p)
            if f is None:
                return "padding that is not one constant value"
            if fill is not None and not _same(fill, f):
                return "padding with several constant values"
            fill = f
        lo[ax] += before
        hi[ax] += m.shape[ax] - md.shape[ax] - before
        absorbed |= {cur, *pads}
        cur, rech = follow_rechunk(deps, layers, metas, d)
        absorbed |= rech
    if fill is None:
        return "the window's input is not padded with a constant"
    return cur, lo, hi, fill, absorbed


def _users(hlg: HighLevelGraph) -> dict[str, set[str]]:
    users: dict[str, set[str]] = {}
    for n, ds in hlg.dependencies.items():
        for d in ds:
            users.setdefault(d, set()).add(n)
    return users


def _swv_call(layer) -> dict | None:
    """``window_shape`` / ``axis`` of a ``sliding_window_view`` Blockwise, or ``None``."""
    if not isinstance(layer, Blockwise):
        return None
    call = kernel_call(layer)
    if call is None or call[0] is not np.lib.stride_tricks.sliding_window_view:
        return None
    kw = call[1]
    if set(kw) - {"window_shape", "axis"}:
        return None
    return kw


def _single_input(layer: Blockwise, src: str):
    """Indices of the one array argument of ``layer`` if it is ``src``, else ``None``."""
    args = BlockwiseEval(layer).array_args()
    if len(args) != 1 or args[0][1] != src:
        return None
    return layer.indices[args[0][0]][1]


# --- the stage ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class WindowReduce:
    """``fill``-padded sliding windows of a block, reduced by dask's own functions.

    ``block(region)`` is one of dask's blocks (the region already padded);
    ``__call__(x)`` is a :class:`~dask_sweep.plan.ir.Kernel`'s ``fn``: it pads ``x``
    itself and returns an array of ``x``'s shape (its edges are cropped by the kernel).
    """

    axes: tuple[int, ...]  # rolled axes, in the order of the window view
    window: tuple[int, ...]
    lo: tuple[int, ...]  # per array axis, planes before / after each output plane
    hi: tuple[int, ...]
    fill: Any
    pad_dtype: Any
    chunk: Any  # BlockwiseEval of the reduction over the window view
    agg: Any = None  # the aggregate's function, called on [[...[chunk result]...]]
    post: tuple = ()  # BlockwiseEvals after it (``_sqrt``)
    extend: tuple[int, ...] = ()  # axes along which a piece 1 element thick is padded to 2
    front: tuple[int, ...] = ()  # axes moved outermost (a contiguous copy) before reducing
    # the same on any block (an order statistic, an integer sum): the kernel may ask for
    # its kept planes only (planes()), without reducing the windows of the halo's planes
    cropped: bool = False

    def block(self, region: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
        axes = self.axes if axes is None else axes
        view = np.lib.stride_tricks.sliding_window_view(region, self.window, axis=axes)
        out = self.chunk((0,) * view.ndim, {self.chunk.array_args()[0][0]: view})
        if self.agg is not None:
            nested = out
            for _ in axes:
                nested = [nested]
            out = self.agg(nested)
        for ev in self.post:
            out = ev((0,) * out.ndim, {ev.array_args()[0][0]: out})
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._reduce(x, self.lo, self.hi, x.shape)

    def planes(self, x: np.ndarray, axis: int, c0: int, t: int) -> np.ndarray:
        """Planes ``[c0, c0 + t)`` along ``axis`` of ``self(x)``, reducing only their windows.

        The kernel keeps ``t`` of the planes it passes (the rest is halo): in the
        volume's interior those planes' windows lie inside ``x`` and nothing is
        padded along ``axis``; at a face the missing planes are ``fill``, as in
        ``self(x)``.  Only for a ``cropped`` (block-invariant) reduction.
        """
        lo, hi = list(self.lo), list(self.hi)
        s, e = c0 - lo[axis], c0 + t + hi[axis]
        a, b = max(0, s), min(x.shape[axis], e)
        lo[axis], hi[axis] = a - s, e - b
        shape = list(x.shape)
        shape[axis] = t
        return self._reduce(x[(slice(None),) * axis + (slice(a, b),)], lo, hi, tuple(shape))

    def _reduce(self, x: np.ndarray, los, his, want: tuple[int, ...]) -> np.ndarray:
        """Reduce the windows of ``x`` padded by ``los`` / ``his``; ``want``: the result's shape."""
        extra = [1 if (ax in self.extend and n == 1) else 0 for ax, n in enumerate(x.shape)]
        shape = tuple(n + lo + hi + e for n, lo, hi, e in zip(x.shape, los, his, extra))
        padded = np.full(shape, self.fill, dtype=self.pad_dtype)  # C order
        padded[tuple(slice(lo, lo + n) for lo, n in zip(los, x.shape))] = x
        if self.front:
            # numpy sums as on blocks 1 element thick along these axes: made outermost
            order = (*self.front, *(a for a in range(x.ndim) if a not in self.front))
            moved = np.ascontiguousarray(padded.transpose(order))
            del padded
            out = self.block(moved, tuple(order.index(a) for a in self.axes))
            out = out.transpose(tuple(int(i) for i in np.argsort(order)))
        else:
            out = self.block(padded)
        if any(extra):
            out = out[tuple(slice(0, n) for n in want)]
        return out


class RollingBlockFn:
    """``block_fn`` of a :class:`~dask_sweep.plan.ir.Blocked` rolling stage (dask's blocks)."""

    def __init__(self, reduce: WindowReduce) -> None:
        self.reduce = reduce

    def __call__(self, idx, region):
        return self.reduce.block(region)


@dataclass
class WindowSpec(StageSpec):
    """A recognised rolling window: a :class:`StageSpec` of kind ``"window"``."""

    reduce: WindowReduce | None = None
    op: str = ""
    invariance: str = ""  # "exact" | "sum" | "opaque"
    out_chunks: tuple = ()
    described: str = ""
    why: str = ""


def find_windows(hlg: HighLevelGraph, metas: dict, taken: set[str]
                 ) -> tuple[dict[str, StageSpec], list[Fallback]]:
    """A window stage per reduction of a padded sliding window view, or reasons.

    Every ``ArrayOverlapLayer`` not in ``taken`` (map_overlap groups) is looked at:
    each reduction of each window view on it becomes a :class:`WindowSpec`
    named by its last layer; anything else gets a :class:`Fallback` that says what.
    """
    stages: dict[str, StageSpec] = {}
    fallbacks: list[Fallback] = []
    users = _users(hlg)
    for oname, olayer in hlg.layers.items():
        if not isinstance(olayer, ArrayOverlapLayer) or oname in taken:
            continue
        for s in sorted(users.get(oname, ())):
            kw = _swv_call(hlg.layers[s])
            if kw is None:
                fn = getattr(getattr(hlg.layers[s], "task", None), "func", None)
                what = getattr(fn, "__name__", s.rsplit("-", 1)[0])
                fallbacks.append(Fallback(oname, (
                    f"{TRIM_FALSE}: {what!r} gets each block with its halo and returns it "
                    "untrimmed (only a sliding_window_view reduced over its window axes, "
                    "as xarray's rolling builds it, is recognised)")))
                continue
            for r in sorted(users.get(s, ())):
                res = _window(hlg, metas, users, oname, s, r, kw)
                if isinstance(res, Fallback):
                    fallbacks.append(res)
                else:
                    stages[res.name] = res
            if not users.get(s):
                fallbacks.append(Fallback(s, (
                    "the sliding window view itself is the result (e.g. rolling(...)"
                    ".construct()): an array with window axes, not planes of its input")))
    return stages, fallbacks


def _window(hlg, metas, users, oname, sname, rname, kw) -> WindowSpec | Fallback:
    layers = hlg.layers
    olayer, slayer = layers[oname], layers[sname]
    smeta = metas.get(sname)
    if smeta is None:
        return Fallback(sname, "the window view's shape/chunks are unknown")
    ndim = olayer.ndim if hasattr(olayer, "ndim") else len(olayer.chunks)
    window = tuple(int(w) for w in np.atleast_1d(kw["window_shape"]))
    axes_kw = kw.get("axis")
    axes = tuple(range(ndim)) if axes_kw is None else tuple(
        int(a) % ndim for a in np.atleast_1d(axes_kw))
    if len(set(axes)) != len(axes) or len(axes) != len(window):
        return Fallback(sname, "a window view that rolls one axis twice")
    k = len(axes)
    sind = _single_input(slayer, oname)
    if sind is None or tuple(slayer.output_indices[:ndim]) != tuple(sind) \
            or len(slayer.output_indices) != ndim + k:
        return Fallback(sname, "a window view whose blocks are not the overlap's")
    # the overlap: depth (0, w - 1) on the rolled axes, nothing elsewhere
    depth = dict(olayer.axes)
    for ax in range(ndim):
        d = depth.get(ax, 0)
        d = tuple(d) if isinstance(d, tuple) else (int(d), int(d))
        want = (0, window[axes.index(ax)] - 1) if ax in axes else (0, 0)
        if d != want:
            return Fallback(oname, f"{TRIM_FALSE}: its depth {d} on axis {ax} is not a "
                                   f"window's {want}")
    # the reduction over the window axes
    rlayer = layers[rname]
    if not isinstance(rlayer, Blockwise) or _single_input(rlayer, sname) is None:
        return Fallback(rname, "the window view is used by something other than a reduction "
                               "over its window axes")
    rind = tuple(_single_input(rlayer, sname))
    out_ind = tuple(rlayer.output_indices)
    internal = {oname, sname, rname}
    kwargs = getattr(rlayer.task, "kwargs", {}) or {}
    kwargs = {a: getattr(v, "value", v) for a, v in dict(kwargs).items()}
    red_axes = kwargs.get("axis")
    red_axes = None if red_axes is None else tuple(int(a) for a in np.atleast_1d(red_axes))
    if red_axes != tuple(range(ndim, ndim + k)) or len(rind) != ndim + k \
            or len(set(rind)) != len(rind):
        return Fallback(rname, "a reduction that is not over exactly the window axes")
    agg = None
    funcs = _unwrap(rlayer.task.func)
    last = rname
    if out_ind == rind and kwargs.get("keepdims") is True and not rlayer.concatenate:
        # chunk step with keepdims, then the aggregate (one chunk along the window axes)
        aggs = users.get(rname, set())
        if len(aggs) != 1:
            return Fallback(rname, "a window reduction whose partial results are used elsewhere")
        (gname,) = aggs
        agg = _aggregate(hlg, gname, rname, ndim, k)
        if isinstance(agg, str):
            return Fallback(gname, agg)
        funcs += _unwrap(agg)
        internal.add(gname)
        last = gname
    elif not (out_ind == rind[:ndim] and kwargs.get("keepdims") in (None, False)):
        return Fallback(rname, "a reduction that is not over exactly the window axes")
    post = []
    _, _, _, _, sqrt = _reduction_functions()
    nxt = users.get(last, set())
    if len(nxt) == 1:
        (pname,) = nxt
        player = layers[pname]
        if isinstance(player, Blockwise) and getattr(player.task, "func", None) is sqrt \
                and _single_input(player, last) is not None:
            post.append(BlockwiseEval(player))
            internal.add(pname)
            last = pname
    meta = metas.get(last)
    if meta is None:
        return Fallback(last, "the window reduction's shape/chunks are unknown")
    # the input: rechunks, then the constant pad
    q = olayer.name
    padded, rech = follow_rechunk(hlg.dependencies, layers, metas, q)
    internal |= rech
    if metas.get(padded) is None:
        return Fallback(oname, "the window's input shape/chunks are unknown")
    found = _unpad(hlg, metas, padded)
    if isinstance(found, str):
        return Fallback(padded, f"{found}: the window changes the array's shape (a sliding "
                                "window without xarray's padding)")
    src, lo, hi, fill, pad_layers = found
    internal |= pad_layers
    if metas.get(src) is None or metas[src].shape != meta.shape:
        return Fallback(last, "the window reduction's shape differs from its input's")
    for ax in range(ndim):
        w = window[axes.index(ax)] if ax in axes else 1
        if lo[ax] + hi[ax] != w - 1:
            return Fallback(padded, f"the padding of axis {ax} ({lo[ax]}, {hi[ax]}) does not "
                                    f"match the window {w}")
    pad_dtype = metas[padded].dtype
    op, kind = _classify(funcs, meta.dtype)
    if op == "sum" and metas[src].dtype == bool:
        op = "count"
    if post:
        op = "std" if op == "var" else op
    reduce = WindowReduce(axes=axes, window=window, lo=tuple(lo), hi=tuple(hi),
                          fill=fill.item() if hasattr(fill, "item") else fill,
                          pad_dtype=np.dtype(pad_dtype), chunk=BlockwiseEval(rlayer),
                          agg=agg, post=tuple(post))
    win = "x".join(map(str, window))
    offs = ", ".join(f"axis {ax}: -{lo[ax]}/+{hi[ax]}" for ax in sorted(axes))
    described = f"rolling {op} over a {win} window ({offs}), fill {reduce.fill!r}"
    return WindowSpec(
        name=last, kind="window", inputs=[src], meta=meta, internal=internal,
        label=f"rolling {op}", reduce=reduce, op=op, invariance=kind,
        out_chunks=meta.chunks, described=described,
    )


def _aggregate(hlg, gname: str, rname: str, ndim: int, k: int):
    """The function of a reduction's ``…-aggregate`` layer, or why it is not one."""
    layer = hlg.layers[gname]
    if not isinstance(layer, MaterializedLayer) or hlg.dependencies.get(gname) != {rname}:
        return "a window reduction whose last step is not dask's aggregate"
    func = None
    for key in layer:
        f, args = _call(layer[key])
        if f is None or len(args) != 1:
            return "a window reduction whose last step is not dask's aggregate"
        inner = args[0]
        for _ in range(k):
            if not isinstance(inner, list) or len(inner) != 1:
                return "a window reduction over more than one chunk of the window axes"
            inner = inner[0]
        if inner != (rname, *key[1:], *(0,) * k):
            return "a window reduction whose aggregate reads other blocks"
        if func is None:
            func = f
        elif f is not func and f != func:
            return "a window reduction whose aggregate differs between blocks"
    if func is None:
        return "an empty aggregate"
    return func


# --- lowering ------------------------------------------------------------------------------

def order_signature(extents, window: dict[int, int]) -> tuple:
    """How numpy sums a window over one C-ordered block whose output has ``extents``.

    numpy's iterator orders the axes of the window view by stride (the window axis
    of a rolled axis shares that axis's stride and goes inside it), drops axes of
    length 1 and merges neighbours that are contiguous.  If the innermost loop is
    then an axis of the block, the window's values are added one after the other, in
    C order of the window (``('in order',)``); if it is a window axis, each run of
    ``L`` values along it (and along window axes merged with it) is summed pairwise
    and added to the result (``('pairwise', L)``).  A pairwise sum of fewer than 8
    values that is the whole window is the sum in order.  Blocks with the same
    signature give the same bits (``tests/test_xarray.py``).

    >>> order_signature((4, 5, 6), {0: 5})
    ('in order',)
    >>> order_signature((4, 5, 6), {0: 5, 2: 3})
    ('pairwise', 3)
    >>> order_signature((4, 5, 1), {0: 5, 1: 3})
    ('pairwise', 3)
    >>> order_signature((4, 1, 1), {0: 9})
    ('pairwise', 9)
    """
    seq = []
    for a in reversed(range(len(extents))):
        if window.get(a, 1) > 1:
            seq.append(("w", window[a]))
        if extents[a] > 1:
            seq.append(("d", extents[a]))
    if not seq or seq[0][0] == "d":
        return ("in order",)
    run = 1
    for kind, n in seq:
        if kind != "w":
            break
        run *= n
    if run == math.prod(w for w in window.values() if w > 1) and run < 8:
        return ("in order",)
    return ("pairwise", run)


def _describe_order(sig: tuple) -> str:
    if sig[0] == "in order":
        return "one value after the other, in C order of the window"
    return f"pairwise over runs of {sig[1]} values along the last rolled axis"


def _block_signatures(chunks, window: dict[int, int]) -> set[tuple]:
    """The signatures of dask's blocks (only lengths 1 and >= 2 matter)."""
    kinds = [sorted({1 if c == 1 else 2 for c in cc}) for cc in chunks]
    return {order_signature(ext, window) for ext in itertools.product(*kinds)}


def _pieces_like(shape, window: dict[int, int], theirs: set[tuple]):
    """How the sweep's pieces get the one signature all of dask's blocks share, or ``None``.

    A piece has >= 2 elements along every axis but its outermost (a piece 1 element
    thick is padded to 2: ``extend``).  Axes that are 1 element thick in dask's blocks
    are made outermost instead (``front``: a contiguous copy with them first); only
    axes that are not rolled, so the window's values keep their order.
    """
    if len(theirs) != 1:
        return None
    (target,) = theirs
    ndim = len(shape)
    movable = [a for a in range(ndim) if a not in window]
    for n in range(len(movable) + 1):
        for front in itertools.combinations(movable, n):
            order = (*front, *(a for a in range(ndim) if a not in front))
            ext = tuple(2 if shape[a] > 1 else 1 for a in order)
            sig = order_signature(ext, {order.index(a): w for a, w in window.items()})
            if sig == target:
                extend = tuple(a for a in range(ndim) if shape[a] > 1 and a != order[0])
                return sig, front, extend
    return None


def window_stage(spec: WindowSpec, ins: tuple[int, ...], axis: int, in_dtype, notes: list):
    """The plan stage of a recognised window: a Kernel when block-invariant, else Blocked."""
    from dask_sweep.plan.ir import Blocked, Kernel

    red = spec.reduce
    shape = spec.meta.shape
    ndim = len(shape)
    window = dict(zip(red.axes, red.window))
    why = None
    extend: tuple[int, ...] = ()
    front: tuple[int, ...] = ()
    if spec.invariance == "exact":
        how = "an order statistic or an integer sum: the same on any block"
    elif spec.invariance == "sum":
        theirs = _block_signatures(spec.out_chunks, window)
        found = _pieces_like(shape, window, theirs)
        if found is not None:
            sig, front, extend = found
            how = (f"floating sums, added {_describe_order(sig)}, as numpy does on every "
                   "one of dask's blocks and on the sweep's pieces")
        else:
            why = ("numpy adds the window's values in different orders on dask's blocks of "
                   "different shapes (" + "; ".join(sorted(_describe_order(s) for s in theirs))
                   + ")")
    else:
        why = f"{spec.op} is not a reduction known to be block-invariant"
    if why is None:
        red = _with(red, extend=extend, front=front, cropped=spec.invariance == "exact")
        depth = tuple(max(a, b) for a, b in zip(red.lo, red.hi))
        wsize = math.prod(red.window)
        copies = spec.op in ("var", "std", "mean", "median") or any(
            f is np.nansum for f in _unwrap(red.chunk.task.func))
        st = Kernel(
            label=spec.label, shape=shape, dtype=spec.meta.dtype, inputs=ins,
            fn=red, depth=depth, boundary=("none",) * ndim,
            temps=2.0 + bool(front) + (4.0 * wsize if copies else 0.0), sweep_axis=axis,
            passes=None,
            in_dtype=np.dtype(in_dtype),
        )
        notes.append(f"{spec.described}: a kernel on any slab ({how})")
        return st
    if np.dtype(in_dtype) != red.pad_dtype:
        from dask_sweep.errors import NotSweepable

        raise NotSweepable(f"{spec.described}: {why}, and its padding casts the input "
                           f"({np.dtype(in_dtype)} -> {red.pad_dtype})")
    notes.append(f"{spec.described}: kept dask's blocks ({why})")
    bnd = tuple(red.fill if (red.lo[ax] or red.hi[ax]) else "none" for ax in range(ndim))
    return Blocked(
        label=spec.label, shape=shape, dtype=spec.meta.dtype, inputs=ins,
        chunks=spec.out_chunks, depth=(tuple(zip(red.lo, red.hi)),), boundary=(bnd,),
        block_fn=RollingBlockFn(red), kind="rolling", sweep_axis=axis,
    )


def _with(red: WindowReduce, **changes) -> WindowReduce:
    return replace(red, **changes)


__all__ = ["TRIM_FALSE", "WindowReduce", "WindowSpec", "find_windows", "window_stage"]
