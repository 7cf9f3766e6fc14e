"""Kernels known to be block-invariant, so the sweep may choose its own slabs.

A ``map_overlap`` of an opaque function is evaluated on dask's own blocks (the
function might look beyond its declared depth, or accumulate floating-point
sums that depend on where a line starts).  For the scipy.ndimage functions
listed here, computing on *any* slab padded by the halo gives the same bits as
one call on the whole (boundary-padded) volume, provided the footprint's radius
fits in the depth dask was given.  Then dask's own result equals that global
result too, and the sweep can pick slab thickness from the memory budget and
skip recomputing halos.

Invariance is a property of (function, dtype): order statistics (min, max,
median, rank, morphology) select values and are exact for every dtype;
correlations (gaussian, correlate) sum a fixed set of taps in a fixed order per
output voxel; ``uniform_filter`` keeps a *running* sum along each line, which is
exact only for integer and boolean inputs.  ``tests/test_kernels.py`` checks each
entry against scipy on blocks cut at random places.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import scipy.ndimage as ndi

from dask_sweep.plan.ir import Kernel, Pointwise, Running
from dask_sweep.runtime.boundary import SCIPY_PAD
from dask_sweep.runtime.morphology import BoolRun, BoolShifts
from dask_sweep.runtime.rank import MedianPlanes
from dask_sweep.runtime.running import reach as running_reach

ALL = frozenset("biuf")
EXACT_SUM = frozenset("biu")


def _per_axis(v, ndim):
    if np.ndim(v) == 0:
        return [v] * ndim
    v = list(v)
    if len(v) != ndim:
        raise ValueError
    return v


def _axes(kw, ndim):
    axes = kw.get("axes")
    if axes is None:
        return list(range(ndim))
    return [a % ndim for a in (axes if np.ndim(axes) else [axes])]


def _gauss_radius(kw, ndim):
    axes = _axes(kw, ndim)
    sig = _per_axis(kw.get("sigma"), len(axes))
    trunc = float(kw.get("truncate", 4.0))
    rad = kw.get("radius")
    rads = _per_axis(rad, len(axes)) if rad is not None else [None] * len(axes)
    out = [0] * ndim
    for a, s, r in zip(axes, sig, rads):
        out[a] = int(r) if r is not None else int(trunc * float(s) + 0.5)
    return out


def _size_radius(kw, ndim, key="size"):
    if kw.get("origin", 0) not in (0, None) and np.any(np.asarray(kw.get("origin")) != 0):
        return None
    fp = kw.get("footprint")
    st = kw.get("structure")
    shp = None
    if fp is not None:
        shp = np.shape(fp)
    elif st is not None:
        shp = np.shape(st)
    if shp is not None:
        if len(shp) != ndim:
            return None
        return [s // 2 for s in shp]
    size = kw.get(key)
    if size is None:
        return None
    axes = _axes(kw, ndim)
    sizes = _per_axis(size, len(axes))
    out = [0] * ndim
    for a, s in zip(axes, sizes):
        out[a] = int(s) // 2
    return out


def _weights_radius(kw, ndim):
    w = kw.get("weights")
    if w is None or np.ndim(w) != ndim or np.any(np.asarray(kw.get("origin", 0)) != 0):
        return None
    return [s // 2 for s in np.shape(w)]


def _binary_radius(kw, ndim, factor=1):
    it = kw.get("iterations", 1)
    if not isinstance(it, (int, np.integer)) or it < 1 or kw.get("mask") is not None:
        return None
    if np.any(np.asarray(kw.get("origin", 0)) != 0):
        return None
    st = kw.get("structure")
    r = [1] * ndim if st is None else ([s // 2 for s in np.shape(st)] if np.ndim(st) == ndim else None)
    if r is None:
        return None
    return [x * it * factor for x in r]


# name -> (radius(kwargs, ndim) -> per-axis radius | None, dtype kinds, allowed kwargs)
_COMMON = {"mode", "cval", "origin", "axes"}
REGISTRY: dict[Callable, tuple] = {
    ndi.gaussian_filter: (_gauss_radius, ALL, {"sigma", "order", "truncate", "radius"} | _COMMON),
    ndi.uniform_filter: (_size_radius, EXACT_SUM, {"size"} | _COMMON),
    ndi.median_filter: (_size_radius, ALL, {"size", "footprint"} | _COMMON),
    ndi.minimum_filter: (_size_radius, ALL, {"size", "footprint"} | _COMMON),
    ndi.maximum_filter: (_size_radius, ALL, {"size", "footprint"} | _COMMON),
    ndi.grey_erosion: (_size_radius, ALL, {"size", "footprint", "structure"} | _COMMON),
    ndi.grey_dilation: (_size_radius, ALL, {"size", "footprint", "structure"} | _COMMON),
    ndi.correlate: (_weights_radius, ALL, {"weights"} | _COMMON),
    ndi.convolve: (_weights_radius, ALL, {"weights"} | _COMMON),
    ndi.binary_erosion: (_binary_radius, ALL, {"structure", "iterations", "border_value",
                                               "origin", "brute_force"}),
    ndi.binary_dilation: (_binary_radius, ALL, {"structure", "iterations", "border_value",
                                                "origin", "brute_force"}),
    ndi.binary_opening: (functools.partial(_binary_radius, factor=2), ALL,
                         {"structure", "iterations", "origin", "brute_force", "border_value"}),
    ndi.binary_closing: (functools.partial(_binary_radius, factor=2), ALL,
                         {"structure", "iterations", "origin", "brute_force", "border_value"}),
}


def kernel_radius(func, kwargs: dict, ndim: int) -> list[int] | None:
    """Footprint radius per axis of a known kernel call, or ``None`` if unknown."""
    entry = REGISTRY.get(func)
    if entry is None:
        return None
    radius_fn, _, allowed = entry
    if set(kwargs) - allowed:
        return None
    try:
        return radius_fn(kwargs, ndim)
    except (ValueError, TypeError):
        return None


def _scalar(v) -> bool:
    return np.ndim(v) == 0


def separable_passes(func, kw: dict, ndim: int):
    """scipy's own sequence of 1-D passes for a separable call, or ``None``.

    Mirrors scipy.ndimage: axes in increasing order, skipping those scipy skips,
    each pass writing the input's dtype.  Running the sweep-axis pass first on
    the padded slab and the in-plane passes only on the planes kept gives the
    same bits as the N-D call, without filtering halo planes in-plane.
    """
    if not _scalar(kw.get("mode", "reflect")) or np.any(np.asarray(kw.get("origin", 0)) != 0):
        return None
    axes = _axes(kw, ndim)
    mode, cval = kw.get("mode", "reflect"), kw.get("cval", 0.0)
    out = []
    if func is ndi.gaussian_filter:
        sig = _per_axis(kw["sigma"], len(axes))
        orders = _per_axis(kw.get("order", 0), len(axes))
        rad = kw.get("radius")
        rads = _per_axis(rad, len(axes)) if rad is not None else [None] * len(axes)
        for ax, s_, o, r in zip(axes, sig, orders, rads):
            if s_ > 1e-15:
                out.append((ax, functools.partial(
                    ndi.gaussian_filter1d, sigma=s_, axis=ax, order=o, mode=mode, cval=cval,
                    truncate=kw.get("truncate", 4.0), radius=r)))
        return tuple(out)
    if func in (ndi.uniform_filter, ndi.minimum_filter, ndi.maximum_filter, ndi.grey_erosion):
        if kw.get("footprint") is not None or kw.get("structure") is not None:
            return None
        f1 = {ndi.uniform_filter: ndi.uniform_filter1d, ndi.maximum_filter: ndi.maximum_filter1d}
        fn1 = f1.get(func, ndi.minimum_filter1d)
        for ax, size in zip(axes, _per_axis(kw["size"], len(axes))):
            if size > 1:
                out.append((ax, functools.partial(fn1, size=int(size), axis=ax, mode=mode,
                                                  cval=cval)))
        return tuple(out)
    return None


class SeparableBlockFn:
    """One dask block of a separable filter that is *not* block-invariant (a running
    sum on floats), bit for bit: scipy's 1-D passes on dask's padded block, each
    pass's axis cropped to what dask's trim keeps as soon as that pass is done.

    A later pass runs along another axis, line by line, so it never reads what the
    crop removed; only the lines of the kept block are filtered in-plane (a 1-plane
    chunk padded by 1 filtered 9 plane-passes for 1 plane, now 5).

    Parameters
    ----------
    passes
        :func:`separable_passes` of the call: ``(axis, fn)`` in scipy's order.
    chunks, depth, boundary
        The output's chunks, and the input's halo ``(lo, hi)`` and boundary per axis,
        as ``map_overlap`` was given them (its trim removes the halo where there is
        one: every side but the array's faces under ``"none"``).
    """

    def __init__(self, passes, chunks, depth, boundary) -> None:
        self.passes = tuple(passes)
        self.nblocks = tuple(len(c) for c in chunks)
        self.depth = tuple(depth)
        self.boundary = tuple(boundary)

    def _crop(self, x: np.ndarray, idx: tuple[int, ...], ax: int) -> np.ndarray:
        lo, hi = self.depth[ax]
        if self.boundary[ax] == "none":
            lo = lo if idx[ax] > 0 else 0
            hi = hi if idx[ax] < self.nblocks[ax] - 1 else 0
        sl = [slice(None)] * x.ndim
        sl[ax] = slice(lo, x.shape[ax] - hi)
        return x[tuple(sl)]

    def __call__(self, idx, region):
        t = region
        cropped = set()
        for ax, fn in self.passes:
            t = self._crop(fn(t), idx, ax)
            cropped.add(ax)
        for ax in range(t.ndim):
            if ax not in cropped:
                t = self._crop(t, idx, ax)
        return np.ascontiguousarray(t)


def _binary_parts(func, kw: dict, ndim: int):
    """``(op, structure, border)`` of a binary erosion / dilation the sweep computes
    itself (one iteration, no mask, origin 0, odd sides), else ``None``."""
    if func not in (ndi.binary_erosion, ndi.binary_dilation):
        return None
    if kw.get("iterations", 1) != 1 or kw.get("mask") is not None:
        return None
    if np.any(np.asarray(kw.get("origin", 0)) != 0):
        return None
    structure = kw.get("structure")
    if structure is None:
        structure = ndi.generate_binary_structure(ndim, 1)
    structure = np.asarray(structure, dtype=bool)
    if structure.ndim != ndim or any(n % 2 == 0 for n in structure.shape):
        return None
    op = "and" if func is ndi.binary_erosion else "or"
    return op, structure, bool(kw.get("border_value", 0))


def fast_binary(func, kw: dict, ndim: int, axis: int, jit: bool = True):
    """``(passes, fn)`` of a binary erosion / dilation as boolean runs or shifts, or ``None``.

    One iteration, no mask, origin 0, a structure with odd sides: a box becomes
    one :class:`~dask_sweep.runtime.morphology.BoolRun` per axis (the sweep
    axis first: the order of ANDs does not matter), any other structure a
    :class:`~dask_sweep.runtime.morphology.BoolShifts` (numba: not without ``jit``).
    Both equal scipy bit for bit (``tests/test_morphology.py``).
    """
    parts = _binary_parts(func, kw, ndim)
    if parts is None:
        return None
    op, structure, border = parts
    if structure.all():
        order = [axis] + [ax for ax in range(ndim) if ax != axis]
        passes = tuple((ax, BoolRun(op, structure.shape[ax] // 2, ax, border))
                       for ax in order if structure.shape[ax] > 1)
        return passes, None
    return (None, BoolShifts(op, structure, border)) if jit else None


#: Why a stage runs scipy's call although dask_sweep has a faster kernel for it.
NO_JIT = ("scipy's call per step: numba's kernel is not loaded where the sweep runs (this "
          "process, or a cluster's workers), and loading it (about 50 MiB) is over a quarter "
          "of the budget; dask_sweep.enable() or sweep(...) load it first in this process")


def kernel_stage(spec, ins: tuple[int, ...], axis: int, in_dtype,
                 jit: bool = True) -> tuple[Kernel | None, str]:
    """A re-blockable :class:`Kernel` for a map_overlap spec, or why not.

    With ``jit=False`` the stage does not use numba's kernels (a median over a box, binary
    morphology with a structure that is not a box): scipy's call, computed on the window,
    and the second item says so."""
    func, kwargs = spec.kernel
    entry = REGISTRY.get(func)
    name = getattr(func, "__name__", repr(func))
    if entry is None:
        return None, f"{name} is not a kernel known to be block-invariant"
    if np.dtype(in_dtype).kind not in entry[1]:
        return None, f"{name} on {np.dtype(in_dtype)} is not block-invariant"
    ndim = len(spec.meta.shape)
    rad = kernel_radius(func, kwargs, ndim)
    if rad is None:
        return None, f"{name} called with options whose footprint is not known"
    depth = []
    for ax in range(ndim):
        lo, hi = spec.depth[0][ax]
        if lo != hi:
            return None, "asymmetric depth"
        if rad[ax] > lo:
            return None, (f"footprint radius {rad[ax]} > depth {lo} on axis {ax}: dask's blocks "
                          "differ from one global filter, so they are kept")
        depth.append(lo)
    bnd = tuple(spec.boundary[0][ax] for ax in range(ndim))
    if any(b != "none" and depth[ax] * 2 > spec.meta.shape[ax] for ax, b in enumerate(bnd)):
        return None, "boundary padding deeper than the array"
    fn, passes = functools.partial(func, **kwargs), separable_passes(func, kwargs, ndim)
    note = ""
    if func is ndi.median_filter:  # over a box: the kept voxels only
        if jit:
            fn = MedianPlanes.of(kwargs, ndim, in_dtype) or fn
        elif MedianPlanes.handles(kwargs, ndim, in_dtype):
            note = f"{spec.label}: {NO_JIT}"
    fast = fast_binary(func, kwargs, ndim, axis, jit)
    if fast is not None:
        passes, fn = fast[0], fast[1] or fn
    elif not jit and (parts := _binary_parts(func, kwargs, ndim)) and not parts[1].all():
        note = f"{spec.label}: {NO_JIT}"
    st = Kernel(
        label=spec.label, shape=spec.meta.shape, dtype=spec.meta.dtype, inputs=ins,
        fn=fn, depth=tuple(depth), boundary=bnd,
        temps=3.0 if func in (ndi.median_filter,) else 2.0, sweep_axis=axis,
        passes=passes, in_dtype=np.dtype(in_dtype),
    )
    return st, note


def separable_block_fn(spec) -> SeparableBlockFn | None:
    """:class:`SeparableBlockFn` for a one-input ``map_overlap`` of a known separable
    scipy call (dask's blocks kept: not block-invariant for its dtype), or ``None``."""
    if spec.kernel is None or len(spec.inputs) != 1:
        return None
    func, kwargs = spec.kernel
    entry = REGISTRY.get(func)
    ndim = len(spec.meta.shape)
    if entry is None or set(kwargs) - entry[2]:
        return None
    try:
        passes = separable_passes(func, kwargs, ndim)
    except (KeyError, ValueError, TypeError):
        return None
    if passes is None or fast_binary(func, kwargs, ndim, 0) is not None:
        return None
    depth = tuple(spec.depth[0][ax] for ax in range(ndim))
    boundary = tuple(spec.boundary[0][ax] for ax in range(ndim))
    return SeparableBlockFn(passes, spec.meta.chunks, depth, boundary)


def running_stage(spec, blocked, axis: int):
    """A :class:`~dask_sweep.plan.ir.Running` stage standing in for ``blocked`` (a float
    ``uniform_filter`` on dask's blocks), or ``None`` where its conditions do not hold:
    one input, the sweep axis first and filtered first, no ``output=``, every boundary
    ``'none'`` with a symmetric halo, a mode other than ``'wrap'``."""
    sep = blocked.block_fn
    if (axis != 0 or not isinstance(sep, SeparableBlockFn) or len(blocked.inputs) != 1
            or spec.kernel is None or spec.kernel[0] is not ndi.uniform_filter):
        return None
    kw = spec.kernel[1]
    if kw.get("output") is not None or np.dtype(blocked.dtype).kind != "f":
        return None
    if not sep.passes or sep.passes[0][0] != 0:
        return None
    first = sep.passes[0][1].keywords
    if first["mode"] not in SCIPY_PAD or any(b != "none" for b in blocked.boundary[0]):
        return None
    if any(lo != hi for lo, hi in blocked.depth[0]):
        return None
    depth = tuple(lo for lo, _ in blocked.depth[0])
    ndim = len(blocked.shape)
    inplane = SeparableBlockFn(sep.passes[1:], blocked.chunks,
                               ((0, 0), *((d, d) for d in depth[1:])), ("none",) * ndim)
    st = Running(label=blocked.label, shape=blocked.shape, dtype=blocked.dtype,
                 inputs=blocked.inputs, size=int(first["size"]), mode=first["mode"],
                 cval=float(first["cval"]), inplane=inplane, chunks=blocked.chunks,
                 depth=depth, blocked=blocked, sweep_axis=axis)
    return replace(st, reach=running_reach(st))


def mapped_shifts(st: Kernel, in_dtype) -> tuple[Pointwise, Kernel] | None:
    """A ball's morphology as two stages: its runs' map, a plane at a time, then the
    kernel reading the map's window (:meth:`BoolShifts.of_map`), so each plane is mapped
    once, not once per step whose window holds it.  ``None`` where the kernel goes by
    offsets, reads a padded boundary (the map of a padding is not the padding's map) or
    is not 3-D; the kernel's ``inputs`` are the caller's to point at the map."""
    if not isinstance(st.fn, BoolShifts) or len(st.shape) != 3 or st.sweep_axis != 0:
        return None
    if np.dtype(in_dtype).itemsize != 1 or any(b != "none" for b in st.boundary):
        return None
    pair = st.fn.of_map()
    if pair is None:
        return None
    hit, kernel = pair
    mp = Pointwise(label=f"{st.label}: runs' map", shape=st.shape, dtype=np.dtype("u1"),
                   inputs=st.inputs, fn=hit, cast=False, temps=1.0)
    return mp, replace(st, fn=kernel, in_dtype=np.dtype("u1"))
