"""The streaming DSL: lazy streams of planes, scalars found by reductions, targets.

A :class:`Stream` is a lazy volume that will be produced plane by plane along the
sweep axis.  Methods append stages (pointwise, windowed) and return new streams;
using a stream twice is a *tee*; :func:`zip` joins streams pointwise; a
reduction (:func:`histogram`, :func:`otsu`, :func:`minimum`...) turns a stream
into a :class:`Scalar` that later stages may use.  Nothing runs until a
:class:`Target` (``stream.to(...)``) is run, explained or turned into a dask
graph::

    source ─► gaussian(2) ─┬─► gaussian(1) ─┐
                           │                 zip(x - y) ─► threshold(t) ─► astype ─► to(...)
                           ├─► gaussian(3) ─┘                 ▲
                           └─► histogram ─► otsu ─────────────┘   (t: a scalar of pass 0)

Every stream carries its shape, dtype and, when the analysis can tell, the
*range of its values* (from the input dtype, a declared ``range=``, or interval
arithmetic through pointwise stages).  That is how a cast or an arithmetic stage
that would overflow its integer dtype is refused when the pipeline is built,
naming the stage and how to fix it.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from functools import partial, partialmethod
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from dask_sweep.errors import PlanError, SweepConfigError
from dask_sweep.patterns.kernels import kernel_radius
from dask_sweep.runtime.rank import MedianPlanes

Range = tuple[float, float] | None
_ids = itertools.count()


# --------------------------------------------------------------------------- value ranges


def dtype_range(dtype: Any) -> Range:
    """Values an integer or bool dtype can hold (``None`` for floats).

    >>> dtype_range("uint8")
    (0, 255)
    """
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return (0, 1)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return (int(info.min), int(info.max))
    return None


def _fits(r: Range, dtype: Any) -> bool:
    lim = dtype_range(dtype)
    if lim is None:  # floats hold any finite range we track
        return True
    return r is not None and r[0] >= lim[0] and r[1] <= lim[1]


def _interval(op: str, x: Range, y: Range) -> Range:
    """Interval arithmetic: the range of ``x op y`` (``None`` if unknown)."""
    if x is None or y is None:
        return None
    if op == "add":
        return (x[0] + y[0], x[1] + y[1])
    if op == "sub":
        return (x[0] - y[1], x[1] - y[0])
    if op == "mul":
        c = [x[0] * y[0], x[0] * y[1], x[1] * y[0], x[1] * y[1]]
        return (min(c), max(c))
    if op == "truediv":
        if y[0] <= 0 <= y[1]:
            return None
        c = [x[0] / y[0], x[0] / y[1], x[1] / y[0], x[1] / y[1]]
        return (min(c), max(c))
    return None


def _fmt_range(r: Range) -> str:
    return "unknown" if r is None else f"[{r[0]:g}, {r[1]:g}]"


# --------------------------------------------------------------------------- scalars


class _Arithmetic:
    """``+ - * /`` and their reflections, all through ``self._arith(other, op, reflected)``."""

    def _operator(self, other: Any, op: str, reflected: bool = False) -> Any:
        return self._arith(other, op, reflected)  # type: ignore[attr-defined]

    __add__ = partialmethod(_operator, op="add")
    __radd__ = partialmethod(_operator, op="add", reflected=True)
    __sub__ = partialmethod(_operator, op="sub")
    __rsub__ = partialmethod(_operator, op="sub", reflected=True)
    __mul__ = partialmethod(_operator, op="mul")
    __rmul__ = partialmethod(_operator, op="mul", reflected=True)
    __truediv__ = partialmethod(_operator, op="truediv")
    __rtruediv__ = partialmethod(_operator, op="truediv", reflected=True)


class Scalar(_Arithmetic):
    """A value known after a reduction pass (or a constant), usable by later stages.

    Arithmetic on scalars gives scalars; arithmetic between a scalar and a
    stream gives a stream.  ``compute()`` runs just the passes it needs.
    """

    def __init__(
        self,
        label: str,
        deps: tuple[Scalar, ...],
        fn: Callable[..., Any],
        vrange: Range = None,
        kind: str = "f",
    ) -> None:
        self.label = label
        self.deps = deps
        self.fn = fn
        self.vrange = vrange
        self.kind = kind  # 'i' or 'f': the Python type the value is handed to stages as
        self.uid = next(_ids)

    @property
    def ready_pass(self) -> int:
        """Index of the first pass in which this value is known."""
        return max((d.ready_pass for d in self.deps), default=0)

    def _arith(self, other: Any, op: str, reflected: bool = False) -> Any:
        if isinstance(other, Stream):
            return NotImplemented
        o = as_scalar(other)
        x, y = (o, self) if reflected else (self, o)
        f = getattr(operator, op)
        kind = "f" if op == "truediv" or "f" in (x.kind, y.kind) else "i"
        return Scalar(
            f"({x.label} {_SYM[op]} {y.label})", (x, y), f, _interval(op, x.vrange, y.vrange), kind
        )

    def compute(self, **settings: Any) -> Any:
        """Run the passes this scalar needs and return its value.

        Parameters
        ----------
        **settings
            ``memory_limit=``, ``threads=``... as for :meth:`Target.run`.
        """
        return _engine("run")(self, **settings).value

    def __repr__(self) -> str:
        return f"Scalar({self.label}, range={_fmt_range(self.vrange)})"


class Constant(Scalar):
    """A scalar known when the pipeline is built."""

    def __init__(self, value: Any) -> None:
        v = value.item() if isinstance(value, np.generic) else value
        kind = "i" if isinstance(v, (bool, int)) else "f"
        super().__init__(repr(v), (), lambda: v, (float(v), float(v)), kind)
        self.value = v


class Reduction(Scalar):
    """A scalar computed by a pass over a stream: partial vectors combined at the end.

    Parameters
    ----------
    stream
        The stream reduced.
    partial
        ``partial(planes, *param_values) -> vector of length k`` for one slab.
    k, pdtype, identity, combine
        Length, dtype and identity of the partial vector, ``"sum"`` or ``"min"``.
    finish
        ``finish(total_vector, *param_values) -> value``.
    params
        Scalars the partial needs (e.g. a histogram's range from a min/max pass).
    """

    def __init__(
        self,
        label: str,
        stream: Stream,
        partial: Callable,
        k: int,
        pdtype: Any,
        identity: float,
        combine: str,
        finish: Callable,
        params: tuple[Scalar, ...] = (),
        vrange: Range = None,
        kind: str = "f",
    ) -> None:
        super().__init__(label, (), finish, vrange, kind)
        self.stream = stream
        self.partial = partial
        self.k = int(k)
        self.pdtype = np.dtype(pdtype)
        self.identity = identity
        self.combine = combine
        self.params = params

    @property
    def pass_index(self) -> int:
        """The pass that computes the partials."""
        return max([self.stream.level, *(p.ready_pass for p in self.params)])

    @property
    def ready_pass(self) -> int:
        return self.pass_index + 1


_SYM = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "truediv": "/",
    "gt": ">",
    "lt": "<",
    "ge": ">=",
    "le": "<=",
    "and_": "&",
    "or_": "|",
    "xor": "^",
}


def as_scalar(x: Any) -> Scalar:
    """``x`` as a :class:`Scalar` (numbers become constants)."""
    if isinstance(x, Scalar):
        return x
    if isinstance(x, (bool, int, float, np.number, np.bool_)):
        return Constant(x)
    raise SweepConfigError(
        f"Expected a number, a dsl.Scalar or a dsl.Stream. Got {type(x).__name__} instead."
    )


# --------------------------------------------------------------------------- streams


class Stream(_Arithmetic):
    """A lazy volume produced plane by plane along the sweep axis.

    Build streams with :func:`source` and the methods below; run them through
    a :class:`Target` (:meth:`to`).  Streams are immutable; every method returns
    a new stream, and using a stream in two places is a tee (its planes are
    computed once and buffered for the slower branch).
    """

    def __init__(
        self,
        kind: str,
        label: str,
        inputs: tuple[Stream, ...],
        shape: tuple[int, ...],
        dtype: Any,
        vrange: Range,
        *,
        fn: Callable | None = None,
        scalars: tuple[Scalar, ...] = (),
        depth: tuple[int, ...] = (),
        temps: float = 2.0,
        source: Any = None,
    ) -> None:
        self.kind = kind  # "source" | "pointwise" | "kernel"
        self.label = label
        self.inputs = inputs
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.vrange = vrange
        self.fn = fn
        self.scalars = scalars
        self.depth = depth
        self.temps = temps
        self.source = source
        self.uid = next(_ids)
        self.level = max([*(i.level for i in inputs), *(s.ready_pass for s in scalars), 0])

    # ---- basics

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"Stream({self.label}, shape={self.shape}, dtype={self.dtype}, "
            f"range={_fmt_range(self.vrange)})"
        )

    def __bool__(self) -> bool:
        raise TypeError(
            "A dsl.Stream has no truth value (it is lazy). Use & | ~ for logic on masks."
        )

    __hash__ = object.__hash__

    def tee(self, n: int = 2) -> tuple[Stream, ...]:
        """``n`` handles on this stream (reusing a stream is the same thing).

        The planes are computed once; the ring buffer of this stage holds what
        the slower consumer has not read yet.
        """
        return (self,) * n

    # ---- pointwise

    def _pointwise(
        self,
        label: str,
        others: Sequence[Any],
        fn: Callable,
        *,
        dtype: Any = None,
        vrange: Range = None,
    ) -> Stream:
        streams: list[Stream] = [self]
        scalars: list[Scalar] = []
        slots: list[tuple[str, int]] = []  # ("s", i) stream i or ("c", j) scalar j
        consts: list[Any] = []
        for o in others:
            if isinstance(o, Stream):
                _check_same_grid(label, self, o)
                slots.append(("s", len(streams)))
                streams.append(o)
            elif isinstance(o, Constant):
                slots.append(("k", len(consts)))
                consts.append(o.value)
            elif isinstance(o, Scalar):
                slots.append(("c", len(scalars)))
                scalars.append(o)
            else:
                slots.append(("k", len(consts)))
                consts.append(o)
        ns = len(streams)
        call = _Slotted(fn, slots, tuple(consts), ns)
        if dtype is None:
            dtype = _probe_dtype(label, call, streams, scalars)
        return Stream(
            "pointwise",
            label,
            tuple(streams),
            self.shape,
            dtype,
            vrange,
            fn=call,
            scalars=tuple(scalars),
        )

    def _arith(self, other: Any, op: str, reflected: bool = False) -> Stream:
        o = other if isinstance(other, Stream) else as_scalar(other)
        orange = o.vrange
        sym = _SYM[op]
        olabel = o.label
        label = f"{olabel} {sym} {self.label}" if reflected else f"{self.label} {sym} {olabel}"
        f = getattr(operator, op)
        fn = (lambda x, y: f(y, x)) if reflected else f
        out = self._pointwise(label, [o], fn)
        r = _interval(op, orange, self.vrange) if reflected else _interval(op, self.vrange, orange)
        if out.dtype.kind in "iub":
            lim = dtype_range(out.dtype)
            if r is None or not _fits(r, out.dtype):
                raise PlanError(
                    f"dask_sweep.dsl: stage {label!r} computes {out.dtype} values in "
                    f"{_fmt_range(r)}, which can leave the {out.dtype} range [{lim[0]}, "
                    f"{lim[1]}] and wrap around. Cast first to a wider dtype (e.g. "
                    f"x.astype('int32') {sym} ...) or to float."
                )
        out.vrange = r
        return out

    def __neg__(self) -> Stream:
        return self._arith(-1, "mul")

    def _compare(self, other: Any, op: str) -> Stream:
        o = other if isinstance(other, Stream) else as_scalar(other)
        out = self._pointwise(
            f"{self.label} {_SYM[op]} {o.label}",
            [o],
            getattr(operator, op),
            dtype=bool,
            vrange=(0, 1),
        )
        return out

    __gt__ = partialmethod(_compare, op="gt")
    __lt__ = partialmethod(_compare, op="lt")
    __ge__ = partialmethod(_compare, op="ge")
    __le__ = partialmethod(_compare, op="le")

    def _logic(self, other: Any, op: str) -> Stream:
        for s in (self, other):
            if isinstance(s, Stream) and s.dtype.kind != "b":
                raise PlanError(
                    f"dask_sweep.dsl: {_SYM[op]!r} expects boolean masks. Got {s.label!r} of "
                    f"dtype {s.dtype}; compare first (e.g. x > t)."
                )
        o = other if isinstance(other, Stream) else as_scalar(bool(other))
        return self._pointwise(
            f"{self.label} {_SYM[op]} {o.label}",
            [o],
            getattr(operator, op),
            dtype=bool,
            vrange=(0, 1),
        )

    __and__ = partialmethod(_logic, op="and_")
    __or__ = partialmethod(_logic, op="or_")
    __xor__ = partialmethod(_logic, op="xor")

    def __invert__(self) -> Stream:
        if self.dtype.kind != "b":
            raise PlanError(f"dask_sweep.dsl: '~' expects a boolean mask. Got {self.dtype}.")
        return self._pointwise(f"~{self.label}", [], np.logical_not, dtype=bool, vrange=(0, 1))

    def threshold(self, t: Any) -> Stream:
        """Boolean mask ``self > t``; ``t`` a number or a :class:`Scalar`."""
        return self > t

    def clip(self, lo: float | None = None, hi: float | None = None) -> Stream:
        """Values limited to ``[lo, hi]`` (numbers); the dtype is kept."""
        if lo is None and hi is None:
            raise SweepConfigError("clip() expects lo= or hi=. Got neither.")
        r = self.vrange
        lo_ = -math.inf if lo is None else lo
        hi_ = math.inf if hi is None else hi
        nr = (
            (max(lo_, r[0]), min(hi_, r[1]))
            if r is not None
            else ((lo_, hi_) if lo is not None and hi is not None else None)
        )
        dt = self.dtype
        return self._pointwise(
            f"clip({self.label}, {lo}, {hi})",
            [],
            lambda x: np.clip(x, lo, hi).astype(dt, copy=False),
            dtype=dt,
            vrange=nr,
        )

    def astype(self, dtype: Any, *, clip: bool = False, unsafe: bool = False) -> Stream:
        """Cast to ``dtype``; refused when the values may not fit, unless told how.

        Parameters
        ----------
        dtype
            Target dtype.
        clip
            Clip to the target's range before casting (float → int truncates
            toward zero after clipping).
        unsafe
            Cast as numpy does (wrapping around); you know better than the analysis.

        Raises
        ------
        PlanError
            When the stream's known value range does not fit ``dtype`` (or is
            unknown and ``dtype`` is an integer type) and neither flag is set.
        """
        dt = np.dtype(dtype)
        label = f"astype({self.label}, {dt})"
        r = self.vrange
        if dt.kind == "b":
            return self._pointwise(label, [], lambda x: x.astype(bool), dtype=bool, vrange=(0, 1))
        lim = dtype_range(dt)
        if lim is not None and not _fits(r, dt):
            if clip:
                nr = (lim[0], lim[1]) if r is None else (max(r[0], lim[0]), min(r[1], lim[1]))
                return self._pointwise(
                    label + " (clipped)",
                    [],
                    lambda x: np.clip(x, lim[0], lim[1]).astype(dt),
                    dtype=dt,
                    vrange=nr,
                )
            if not unsafe:
                raise PlanError(
                    f"dask_sweep.dsl: stage {label!r} would overflow: the values of "
                    f"{self.label!r} lie in {_fmt_range(r)} but {dt} holds [{lim[0]}, "
                    f"{lim[1]}]. Pass clip=True to clip them, unsafe=True to wrap as numpy "
                    "does, or rescale first (e.g. (x - lo) * (255 / (hi - lo)))."
                )
            return self._pointwise(
                label + " (unsafe)", [], lambda x: x.astype(dt), dtype=dt, vrange=lim
            )
        return self._pointwise(label, [], lambda x: x.astype(dt), dtype=dt, vrange=r)

    def map(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        dtype: Any = None,
        range: Range = None,
        name: str | None = None,
    ) -> Stream:
        """An elementwise user function, applied to slabs of planes.

        ``fn`` must treat every voxel independently (no neighbourhood): use
        :meth:`window` otherwise.  ``dtype`` defaults to what ``fn`` returns on a
        one-voxel probe; ``range`` declares the output's values (else unknown,
        or the dtype's range for integer outputs).
        """
        label = f"{name or getattr(fn, '__name__', 'map')}({self.label})"
        out = self._pointwise(label, [], fn, dtype=dtype)
        out.vrange = range if range is not None else dtype_range(out.dtype)
        return out

    # ---- windowed

    def _kernel(
        self,
        label: str,
        fn: Callable,
        depth: Sequence[int],
        *,
        dtype: Any = None,
        vrange: Range = None,
        temps: float = 2.0,
    ) -> Stream:
        depth = tuple(int(d) for d in depth)
        if len(depth) != self.ndim or any(d < 0 for d in depth):
            raise PlanError(
                f"dask_sweep.dsl: stage {label!r} declares footprint radius {depth}; expected "
                f"{self.ndim} non-negative ints (one per axis)."
            )
        dt = self.dtype if dtype is None else np.dtype(dtype)
        return Stream(
            "kernel", label, (self,), self.shape, dt, vrange, fn=fn, depth=depth, temps=temps
        )

    def _scipy(
        self,
        func: Callable,
        name: str,
        *,
        output: Any = None,
        temps: float = 2.0,
        keeps_range: bool = True,
        **kw: Any,
    ) -> Stream:
        kw = {k: v for k, v in kw.items() if v is not None}
        shown = {k: v for k, v in kw.items() if k not in _DEFAULTS or _DEFAULTS[k] != v}
        label = f"{name}({', '.join(f'{k}={_short(v)}' for k, v in shown.items())})"
        rad = kernel_radius(func, kw, self.ndim)
        if rad is None:
            raise PlanError(
                f"dask_sweep.dsl: stage {label!r} has no known footprint for these options; "
                "use a size/footprint/sigma the planner understands, or wrap the call in "
                "stream.window(fn, footprint=...) with the radius per axis."
            )
        call = partial(func, **kw) if output is None else partial(func, output=output, **kw)
        if func is ndi.median_filter and output is None:
            # the kept voxels only, as the plugin runs it; its numba kernel loaded now,
            # when the stream is made, not inside a run's budget
            call = MedianPlanes.of(kw, self.ndim, self.dtype) or call
        dt = self.dtype if output is None else np.dtype(output)
        r = self.vrange if keeps_range else None
        if r is None and dt.kind in "iub":
            r = dtype_range(dt)
        return self._kernel(label, call, rad, dtype=dt, vrange=r, temps=temps)

    def gaussian(
        self,
        sigma: float | Sequence[float],
        *,
        truncate: float = 4.0,
        mode: str = "reflect",
        output: Any = None,
    ) -> Stream:
        """``scipy.ndimage.gaussian_filter``; footprint radius ``int(truncate*sigma+0.5)``.

        The weights are positive and sum to one, so the value range is kept.
        """
        return self._scipy(
            ndi.gaussian_filter,
            "gaussian",
            sigma=sigma,
            truncate=truncate,
            mode=mode,
            output=output,
        )

    def uniform(
        self, size: int | Sequence[int], *, mode: str = "reflect", output: Any = None
    ) -> Stream:
        """``scipy.ndimage.uniform_filter`` (a box mean; exact for integer input)."""
        return self._scipy(ndi.uniform_filter, "uniform", size=size, mode=mode, output=output)

    def median(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """``scipy.ndimage.median_filter``."""
        return self._scipy(
            ndi.median_filter, "median", size=size, footprint=footprint, mode=mode, temps=3.0
        )

    def minimum(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """``scipy.ndimage.minimum_filter``."""
        return self._scipy(
            ndi.minimum_filter, "minimum", size=size, footprint=footprint, mode=mode
        )

    def maximum(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """``scipy.ndimage.maximum_filter``."""
        return self._scipy(
            ndi.maximum_filter, "maximum", size=size, footprint=footprint, mode=mode
        )

    def rank(
        self,
        rank: int,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """``scipy.ndimage.rank_filter`` (an order statistic: exact on any slab)."""
        if footprint is not None:
            rad = [s // 2 for s in np.shape(footprint)]
        elif size is not None:
            rad = [int(s) // 2 for s in (size if np.ndim(size) else [size] * self.ndim)]
        else:
            raise PlanError("dask_sweep.dsl: rank() needs size= or footprint=.")
        fn = partial(ndi.rank_filter, rank=rank, size=size, footprint=footprint, mode=mode)
        return self._kernel(
            f"rank({rank}, size={_short(size)})", fn, rad, vrange=self.vrange, temps=3.0
        )

    def erosion(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """Grey erosion with a flat structuring element (``size`` or ``footprint``)."""
        return self._scipy(ndi.grey_erosion, "erosion", size=size, footprint=footprint, mode=mode)

    def dilation(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """Grey dilation with a flat structuring element (``size`` or ``footprint``)."""
        return self._scipy(
            ndi.grey_dilation, "dilation", size=size, footprint=footprint, mode=mode
        )

    def opening(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """Grey opening = erosion then dilation (two stages, windows composed)."""
        return self.erosion(size, footprint=footprint, mode=mode).dilation(
            size, footprint=footprint, mode=mode
        )

    def closing(
        self,
        size: int | Sequence[int] | None = None,
        *,
        footprint: Any = None,
        mode: str = "reflect",
    ) -> Stream:
        """Grey closing = dilation then erosion (two stages, windows composed)."""
        return self.dilation(size, footprint=footprint, mode=mode).erosion(
            size, footprint=footprint, mode=mode
        )

    def _binary(
        self, func: Callable, name: str, structure: Any, iterations: int, border_value: int | None
    ) -> Stream:
        kw: dict[str, Any] = {"structure": structure, "iterations": iterations}
        if border_value is not None:
            kw["border_value"] = border_value
        out = self._scipy(func, name, keeps_range=False, **kw)
        out.dtype = np.dtype(bool)
        out.vrange = (0, 1)
        return out

    def binary_erosion(
        self, structure: Any = None, *, iterations: int = 1, border_value: int = 0
    ) -> Stream:
        """``scipy.ndimage.binary_erosion`` (non-zero voxels are foreground)."""
        return self._binary(
            ndi.binary_erosion, "binary_erosion", structure, iterations, border_value
        )

    def binary_dilation(
        self, structure: Any = None, *, iterations: int = 1, border_value: int = 0
    ) -> Stream:
        """``scipy.ndimage.binary_dilation``."""
        return self._binary(
            ndi.binary_dilation, "binary_dilation", structure, iterations, border_value
        )

    def binary_opening(self, structure: Any = None, *, iterations: int = 1) -> Stream:
        """``scipy.ndimage.binary_opening``."""
        return self._binary(ndi.binary_opening, "binary_opening", structure, iterations, None)

    def binary_closing(self, structure: Any = None, *, iterations: int = 1) -> Stream:
        """``scipy.ndimage.binary_closing``."""
        return self._binary(ndi.binary_closing, "binary_closing", structure, iterations, None)

    def window(
        self,
        fn: Callable[..., np.ndarray],
        *,
        footprint: Sequence[int] | int | None = None,
        dtype: Any = None,
        range: Range = None,
        name: str | None = None,
        temps: float = 2.0,
        **kwargs: Any,
    ) -> Stream:
        """A user kernel over a neighbourhood, with a declared footprint.

        Parameters
        ----------
        fn
            ``fn(block, **kwargs) -> block`` of the same shape.  It is called on
            slabs padded by the footprint radius (real neighbours inside the
            volume; at the volume's faces the block simply ends, and ``fn``'s
            own edge handling applies), and the result is cropped.  So ``fn``
            must give, at every voxel, a value that depends only on the voxels
            within ``footprint`` of it (and the faces of the volume).
        footprint
            Radius per axis (or one int for all axes).  Required unless ``fn``
            is a scipy.ndimage filter whose footprint the planner knows.
        dtype, range
            Output dtype (default: the input's) and declared value range.
        temps
            Temporaries of ``fn`` as a multiple of the slab (for the budget).

        Raises
        ------
        PlanError
            When no footprint is declared and none is known.
        """
        label = f"{name or getattr(fn, '__name__', 'window')}({self.label})"
        if footprint is None:
            rad = kernel_radius(fn, kwargs, self.ndim)
            if rad is None:
                raise PlanError(
                    f"dask_sweep.dsl: stage {label!r} has no declared footprint, so the planner "
                    "cannot tell how many neighbouring planes it reads. Pass footprint= (the "
                    "radius per axis, e.g. footprint=(2, 2, 2)) to stream.window()."
                )
        else:
            rad = [int(footprint)] * self.ndim if np.ndim(footprint) == 0 else list(footprint)
        call = partial(fn, **kwargs) if kwargs else fn
        dt = self.dtype if dtype is None else np.dtype(dtype)
        vr = range if range is not None else dtype_range(dt)
        return self._kernel(label, call, rad, dtype=dt, vrange=vr, temps=temps)

    # ---- targets

    def to(self, target: Any = None, **options: Any) -> Target:
        """Where the planes go: ``None`` (a new numpy array), a numpy array to fill,
        a path (written by :func:`dask_sweep.io.imwrite`'s sinks: ``.zarr``, ``.h5``,
        ``.tif``, a folder of slices) or a :class:`zarr.Array`.

        ``options`` go to the sink (``overwrite=``, ``chunks=``...).
        """
        return Target(self, target, options)

    def run(self, **settings: Any):
        """Shorthand for ``self.to().run(**settings)``."""
        return self.to().run(**settings)

    def explain(self, **settings: Any):
        """Shorthand for ``self.to().explain(**settings)``."""
        return self.to().explain(**settings)

    def to_dask(self, **settings: Any):
        """Shorthand for ``self.to().to_dask(**settings)``."""
        return self.to().to_dask(**settings)


class _Slotted:
    """``fn`` called with stream planes, bound scalars and constants in their places."""

    def __init__(self, fn: Callable, slots: list, consts: tuple, nstreams: int) -> None:
        self.fn = fn
        self.slots = slots
        self.consts = consts
        self.nstreams = nstreams

    def __call__(self, *args: Any) -> Any:
        streams, values = args[: self.nstreams], args[self.nstreams :]
        rest = []
        for kind, i in self.slots:
            rest.append(
                streams[i] if kind == "s" else values[i] if kind == "c" else self.consts[i]
            )
        return self.fn(streams[0], *rest)


def _probe_dtype(label: str, call: _Slotted, streams: list[Stream], scalars: list[Scalar]):
    probes = [np.zeros((1,) * s.ndim, dtype=s.dtype) for s in streams]
    vals = [0.0 if s.kind == "f" else 0 for s in scalars]
    try:
        with np.errstate(all="ignore"):
            out = np.asarray(call(*probes, *vals))
    except OverflowError as e:
        raise PlanError(
            f"dask_sweep.dsl: stage {label!r}: {e}. Cast the stream to a wider dtype first."
        ) from e
    except Exception as e:
        raise PlanError(
            f"dask_sweep.dsl: stage {label!r} failed on a one-voxel probe ({e!r}); pass "
            "dtype= to declare its output dtype, or fix the function."
        ) from e
    return out.dtype


def _check_same_grid(label: str, a: Stream, b: Stream) -> None:
    if a.shape != b.shape:
        raise PlanError(
            f"dask_sweep.dsl: stage {label!r} cannot align {a.label!r} of shape {a.shape} with "
            f"{b.label!r} of shape {b.shape}: zipped streams must have the same shape. "
            "Crop or pad one of the inputs first."
        )


_DEFAULTS = {"mode": "reflect", "truncate": 4.0, "iterations": 1, "border_value": 0}


def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"array{v.shape}"
    return repr(v)


def zip(
    *args: Any,
    fn: Callable | None = None,
    dtype: Any = None,
    range: Range = None,
    name: str | None = None,
) -> Stream:
    """Join streams pointwise: ``fn(plane_of_a, plane_of_b, ...)``.

    Branches may have different total windows (e.g. ``gaussian(1)`` and
    ``gaussian(3)`` of one source): each is computed once per plane, and the
    source's ring buffer holds the planes the faster branch has already used
    while the slower one catches up.

    Parameters
    ----------
    *args
        Streams, then the function (or pass ``fn=``).
    dtype, range
        Output dtype (default: probed) and declared value range.

    Raises
    ------
    PlanError
        When the streams do not have the same shape.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep import dsl
    >>> s = dsl.source(np.zeros((4, 5, 6), "float32"))
    >>> dsl.zip(s.gaussian(1), s.gaussian(2), lambda x, y: x - y).dtype
    dtype('float32')
    """
    args_l = list(args)
    if fn is None and args_l and callable(args_l[-1]) and not isinstance(args_l[-1], Stream):
        fn = args_l.pop()
    if fn is None or not args_l or not all(isinstance(s, Stream) for s in args_l):
        raise SweepConfigError(
            "zip() expects streams followed by a function, e.g. zip(a, b, lambda x, y: x - y)."
        )
    label = f"{name or getattr(fn, '__name__', 'zip')}({', '.join(s.label for s in args_l)})"
    first, *rest = args_l
    out = first._pointwise(label, rest, fn, dtype=dtype)
    out.vrange = range if range is not None else dtype_range(out.dtype)
    return out


# --------------------------------------------------------------------------- targets


class Target:
    """A stream bound to where its planes go; run it, explain it, or make a dask graph."""

    def __init__(self, stream: Stream, target: Any, options: dict) -> None:
        if not isinstance(stream, Stream):
            raise SweepConfigError(f"Expected a dsl.Stream. Got {type(stream).__name__}.")
        self.stream = stream
        self.target = target
        self.options = dict(options)
        if isinstance(target, np.ndarray) and target.shape != stream.shape:
            raise PlanError(
                f"dask_sweep.dsl: output array has shape {target.shape}; the stream "
                f"{stream.label!r} has shape {stream.shape}."
            )

    @property
    def kind(self) -> str:
        t = self.target
        if t is None:
            return "numpy"
        if isinstance(t, np.ndarray):
            return "array"
        if isinstance(t, (str, bytes)) or hasattr(t, "__fspath__"):
            return "path"
        if hasattr(t, "__setitem__") and hasattr(t, "shape"):
            return "store"
        raise SweepConfigError(
            f"Expected an output of None, a numpy array, a path or a zarr array. "
            f"Got {type(t).__name__}."
        )

    def run(self, **settings: Any):
        """Run the pipeline locally (threads inside each step, no scheduler).

        Parameters
        ----------
        **settings
            ``memory_limit=`` (bytes or ``"256MiB"``), ``threads=``, ``axis=``,
            ``target_slab_bytes=``, and ``replan_margin=`` (measured memory
            above the projection by this fraction shrinks the remaining steps).

        Returns
        -------
        RunResult
            ``.value`` (the array, the path...), ``.scalars``, ``.report``.
        """
        return _engine("run")(self, **settings)

    def explain(self, **settings: Any):
        """The pass schedule, stages, windows, rings, slabs, memory and I/O, before any I/O."""
        return _engine("explain")(self, **settings)

    def to_dask(self, **settings: Any):
        """The pipeline as a dask collection, built with :func:`dask_sweep.emit.graph.emit`.

        A numpy target gives a :class:`dask.array.Array`; a path or store target a
        :class:`dask.delayed.Delayed` that writes and returns the path.
        """
        return _engine("to_dask")(self, **settings)


ENGINE: dict[str, Any] = {}
"""``run``, ``explain`` and ``to_dask`` of the compiler and runners, registered by
:mod:`dask_sweep.dsl` when it is imported: the pipeline's objects (this module)
import nothing of the compiler."""


def _engine(name: str) -> Any:
    try:
        return ENGINE[name]
    except KeyError:  # pragma: no cover - dask_sweep.dsl registers them on import
        import dask_sweep.dsl  # noqa: F401

        return ENGINE[name]


class Tables(Scalar):
    """The tables an algorithm's first pass makes: a "scalar" that later passes read.

    (A node of the pipeline graph like the others; the algorithms, in
    :mod:`dask_sweep.dsl.algorithms`, make and fill them.)

    Its value (set by the table pass, never by :func:`evaluate_scalars`) is
    what the algorithm's output needs to turn a slab of the input into a slab
    of the result.
    """

    def __init__(self, label: str, stream: Stream, algo: Any) -> None:
        super().__init__(label, (), lambda: None, None, "o")
        self.stream = stream
        self.algo = algo

    @property
    def pass_index(self) -> int:
        """The pass (level) of the input stream: the table pass runs after its sweep."""
        return self.stream.level

    @property
    def ready_pass(self) -> int:
        return self.pass_index + 1
