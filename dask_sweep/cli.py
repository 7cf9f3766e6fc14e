"""``dask-sweep``: run streaming pipelines on image volumes from the shell.

Commands::

    dask-sweep run INPUT OUTPUT [OPERATION ...] [--memory-limit 512MiB] [--explain] ...
    dask-sweep info PATH [--memory-limit 512MiB]
    dask-sweep demo [--shape Z Y X] ...
    dask-sweep --version

``python -m dask_sweep`` is the same program.  An *operation* is
``name[:value[,value...]][,key=value...]``: a stage of :mod:`dask_sweep.dsl`
with its parameters, e.g. ``gaussian:sigma=2``, ``threshold:otsu``,
``median:3``, ``label:connectivity=3``, ``astype:uint8,clip=true``.  Values that
differ per axis are written ``2x1x1``.  ``dask-sweep run --help`` lists every
operation; ``docs/cli.md`` documents them.

Exit codes (:data:`EXIT_CODES`)::

    0  success                       4  output problem (SinkError)
    1  unexpected internal error     5  memory budget too small (BudgetError)
    2  usage error (bad options,     6  other dask_sweep error (PlanError, a
       unknown operation/parameter)     parameter the pipeline cannot use...)
    3  input problem (SourceError)  130 interrupted (Ctrl-C)

Errors print one line on stderr; ``--debug`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dask_sweep.utils import format_bytes as _fmt

# ----------------------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_BUDGET = 5
EXIT_SWEEP = 6
EXIT_INTERRUPTED = 130

#: Exit code → meaning, as documented in ``dask-sweep --help`` and ``docs/cli.md``.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "unexpected internal error (a bug: please report it with --debug output)",
    EXIT_USAGE: "usage error: bad option, unknown operation or parameter, bad value",
    EXIT_INPUT: "input problem: missing, unreadable or corrupt input (SourceError)",
    EXIT_OUTPUT: "output problem: output exists without --overwrite, interrupted write "
    "without --resume, dtype the format cannot hold... (SinkError)",
    EXIT_BUDGET: "the memory budget is too small for the pipeline (BudgetError)",
    EXIT_SWEEP: "another dask_sweep error: a pipeline that cannot be planned as given, e.g. a "
    "cast that would overflow (PlanError, SweepConfigError)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); written slabs are kept for --resume",
}


class UsageError(Exception):
    """A command line that cannot be understood (exit code 2)."""


# ----------------------------------------------------------------------------- values


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {text!r}")
    return v


def _split_axes(text: str) -> list[str]:
    t = text.strip()
    if t[:1] in "([" and t[-1:] in ")]":
        return [p.strip() for p in t[1:-1].split(",")]
    if "x" in t.lower():
        return [p.strip() for p in t.lower().split("x")]
    return [t]


def _floats(text: str) -> float | tuple[float, ...]:
    """``2`` → 2.0; ``2x1x1`` (or ``[2,1,1]``) → (2.0, 1.0, 1.0)."""
    parts = _split_axes(text)
    try:
        vals = [_number(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"expected a number or one number per axis such as 2x1x1, got {text!r}"
        ) from None
    return vals[0] if len(vals) == 1 else tuple(vals)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _sizes(text: str) -> int | tuple[int, ...]:
    """``3`` → 3; ``3x5x5`` → (3, 5, 5); every entry a positive integer."""
    parts = _split_axes(text)
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise ValueError(
            f"expected a positive integer or one per axis such as 3x5x5, got {text!r}"
        )
    return vals[0] if len(vals) == 1 else tuple(vals)


def _positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return v


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on", "y"):
        return True
    if t in ("0", "false", "no", "off", "n"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _dtype(text: str) -> Any:
    import numpy as np

    try:
        dt = np.dtype(text)
    except TypeError:
        raise ValueError(f"expected a numeric dtype such as uint8 or float32, got {text!r}") from None
    if dt.kind not in "biuf":
        raise ValueError(f"expected a bool, integer or float dtype, got {text!r}")
    return dt


def _int_dtype(text: str) -> Any:
    dt = _dtype(text)
    if dt.kind not in "iu":
        raise ValueError(f"expected an integer dtype such as int32 or uint16, got {text!r}")
    return dt


_MODES = ("reflect", "nearest", "mirror", "constant")


def _mode(text: str) -> str:
    if text not in _MODES:
        raise ValueError(f"expected one of {', '.join(_MODES)}, got {text!r}")
    return text


def _threshold_value(text: str) -> Any:
    t = text.strip().lower()
    if t in ("otsu", "mean"):
        return t
    try:
        return _number(t)
    except ValueError:
        raise ValueError(f"expected otsu, mean or a number, got {text!r}") from None


def _quantile(text: str) -> float:
    v = _number(text)
    if not 0 <= v <= 1:
        raise ValueError(f"expected a quantile between 0 and 1, got {text!r}")
    return v


# ----------------------------------------------------------------------------- operations

_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of an operation: its name, how to read it, its default."""

    name: str
    parse: Callable[[str], Any]
    help: str
    default: Any = None  # _REQUIRED: must be given; None: the DSL's default

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass
class Context:
    """What operations see besides the stream: scalars to report, the volume's rank."""

    scalars: list = field(default_factory=list)


@dataclass(frozen=True)
class Operation:
    """An operation of ``dask-sweep run``: a DSL stage and its parameters."""

    name: str
    kind: str  # "pointwise" | "windowed" | "multi-pass"
    help: str
    params: tuple[Param, ...]
    apply: Callable[[Any, dict, Context], Any]
    aliases: tuple[str, ...] = ()
    npos: int | None = None  # bare values taken (default: the required ones, else 1)

    @property
    def positional(self) -> tuple[Param, ...]:
        """The parameters bare values fill, in order."""
        n = self.npos
        if n is None:
            n = sum(p.required for p in self.params) or 1
        return self.params[:n]

    def usage(self) -> str:
        """``gaussian:sigma=VALUE[,truncate=,mode=,output=]``."""
        req = ",".join(f"{p.name}=VALUE" for p in self.params if p.required)
        opt = ",".join(f"{p.name}=" for p in self.params if not p.required)
        if req:
            return f"{self.name}:{req}" + (f"[,{opt}]" if opt else "")
        return f"{self.name}[:{opt}]" if opt else self.name

    def describe(self) -> str:
        """The operation, its parameters and their meaning (``dask-sweep operations``)."""
        alias = f" (alias {', '.join(self.aliases)})" if self.aliases else ""
        lines = [f"{self.usage()}{alias}", f"    {self.help}"]
        for p in self.params:
            req = " (required)" if p.required else ""
            lines.append(f"    {p.name:<14} {p.help}{req}")
        return "\n".join(lines)


def _per_axis(name: str, v: Any, ndim: int) -> Any:
    if isinstance(v, tuple) and len(v) != ndim:
        raise UsageError(
            f"{name}: expected one value or {ndim} values (one per axis) for this "
            f"{ndim}-D volume, got {len(v)}"
        )
    return v


def _structure(op: str, connectivity: Any, ndim: int) -> Any:
    if connectivity is None:
        return None
    if not 1 <= connectivity <= ndim:
        raise UsageError(
            f"{op}: connectivity={connectivity}: expected 1 (faces) to {ndim} (faces, edges "
            f"and corners) for this {ndim}-D volume"
        )
    import scipy.ndimage as ndi

    return ndi.generate_binary_structure(ndim, connectivity)


def _kw(p: dict, *names: str) -> dict:
    return {n: p[n] for n in names if p.get(n) is not None}


def _gaussian(s, p, ctx):
    return s.gaussian(_per_axis("gaussian: sigma", p["sigma"], s.ndim), **_kw(p, "truncate", "mode", "output"))


def _uniform(s, p, ctx):
    return s.uniform(_per_axis("uniform: size", p["size"], s.ndim), **_kw(p, "mode", "output"))


def _sized(method: str) -> Callable:
    def apply(s, p, ctx):
        size = _per_axis(f"{method}: size", p["size"], s.ndim)
        return getattr(s, method)(size, **_kw(p, "mode"))

    return apply


def _rank(s, p, ctx):
    return s.rank(p["rank"], _per_axis("rank: size", p["size"], s.ndim), **_kw(p, "mode"))


def _binary(method: str, border: bool) -> Callable:
    def apply(s, p, ctx):
        kw = {"iterations": p["iterations"] if p.get("iterations") is not None else 1}
        if border and p.get("border_value") is not None:
            kw["border_value"] = p["border_value"]
        st = _structure(method, p.get("connectivity"), s.ndim)
        return getattr(s, method)(st, **kw)

    return apply


def _threshold(s, p, ctx):
    from dask_sweep import dsl

    value, q = p.get("value"), p.get("quantile")
    if (value is None) == (q is None):
        raise UsageError(
            "threshold: expected a value (threshold:otsu, threshold:mean, threshold:100) or a "
            "quantile (threshold:quantile=0.99), not both"
        )
    bins = p.get("bins")
    if q is not None:
        t = dsl.quantile(s, q, bins=bins)
        ctx.scalars.append(t)
    elif value == "otsu":
        t = dsl.otsu(s, bins=bins)
        ctx.scalars.append(t)
    elif value == "mean":
        t = dsl.mean(s)
        ctx.scalars.append(t)
    else:
        t = value
    return s > t


def _invert(s, p, ctx):
    return ~s


def _clip(s, p, ctx):
    if p.get("lo") is None and p.get("hi") is None:
        raise UsageError("clip: expected lo= and/or hi=, e.g. clip:lo=0,hi=255")
    return s.clip(p.get("lo"), p.get("hi"))


def _astype(s, p, ctx):
    return s.astype(p["dtype"], clip=bool(p.get("clip")), unsafe=bool(p.get("unsafe")))


def _bilateral(s, p, ctx):
    from dask_sweep import dsl

    return dsl.bilateral(s, **_kw(p, "sigma_spatial", "sigma_range", "radius"))


def _dog(s, p, ctx):
    from dask_sweep import dsl

    return dsl.difference_of_gaussians(s, p["low"], p["high"], **_kw(p, "output"))


def _label(s, p, ctx):
    from dask_sweep import dsl

    st = _structure("label", p.get("connectivity"), s.ndim)
    labels, n = dsl.label(s, st, **_kw(p, "output"))
    ctx.scalars.append(n)
    return labels


def _edt(s, p, ctx):
    from dask_sweep import dsl

    sampling = p.get("sampling")
    if sampling is not None:
        sampling = _per_axis("distance_transform_edt: sampling", sampling, s.ndim)
    return dsl.distance_transform_edt(s, sampling)


_MODE = Param("mode", _mode, "edge mode at the volume's faces (" + ", ".join(_MODES) + ")")
_SIZE = Param("size", _sizes, "window size, one int or one per axis (3x5x5)", _REQUIRED)
_CONN = Param(
    "connectivity", _positive_int, "1 (faces, the default) to ndim (faces, edges and corners)"
)
_ITER = Param("iterations", _positive_int, "times the operation is repeated (default 1)")
_OUT = Param("output", _dtype, "dtype the filter computes in (default: the input's)")

OPERATIONS: dict[str, Operation] = {}


def _register(*ops: Operation) -> None:
    for op in ops:
        OPERATIONS[op.name] = op


_register(
    Operation(
        "gaussian", "windowed", "Gaussian smoothing (scipy.ndimage.gaussian_filter)",
        (
            Param("sigma", _floats, "standard deviation, one or one per axis (2x1x1)", _REQUIRED),
            Param("truncate", _number, "window radius in sigmas (default 4)"),
            _MODE,
            _OUT,
        ),
        _gaussian,
    ),
    Operation(
        "uniform", "windowed", "box mean (scipy.ndimage.uniform_filter)",
        (_SIZE, _MODE, _OUT), _uniform,
    ),
    Operation("median", "windowed", "median filter", (_SIZE, _MODE), _sized("median")),
    Operation("minimum", "windowed", "minimum filter", (_SIZE, _MODE), _sized("minimum")),
    Operation("maximum", "windowed", "maximum filter", (_SIZE, _MODE), _sized("maximum")),
    Operation(
        "rank", "windowed", "rank filter (the rank-th smallest value in the window)",
        (Param("rank", _int, "rank in the window (negative: from the top)", _REQUIRED),
         _SIZE, _MODE),
        _rank,
    ),
    Operation("erosion", "windowed", "grey erosion, flat window", (_SIZE, _MODE),
              _sized("erosion")),
    Operation("dilation", "windowed", "grey dilation, flat window", (_SIZE, _MODE),
              _sized("dilation")),
    Operation("opening", "windowed", "grey opening (erosion then dilation)", (_SIZE, _MODE),
              _sized("opening")),
    Operation("closing", "windowed", "grey closing (dilation then erosion)", (_SIZE, _MODE),
              _sized("closing")),
    Operation(
        "binary_erosion", "windowed", "binary erosion (nonzero voxels are foreground)",
        (_ITER, _CONN, Param("border_value", _int, "value outside the volume (0 or 1)")),
        _binary("binary_erosion", True),
    ),
    Operation(
        "binary_dilation", "windowed", "binary dilation",
        (_ITER, _CONN, Param("border_value", _int, "value outside the volume (0 or 1)")),
        _binary("binary_dilation", True),
    ),
    Operation("binary_opening", "windowed", "binary opening", (_ITER, _CONN),
              _binary("binary_opening", False)),
    Operation("binary_closing", "windowed", "binary closing", (_ITER, _CONN),
              _binary("binary_closing", False)),
    Operation(
        "bilateral", "windowed", "edge-preserving bilateral filter (3-D, float32 result)",
        (
            Param("sigma_spatial", _number, "spatial standard deviation (default 1)"),
            Param("sigma_range", _number, "value standard deviation (default 10)"),
            Param("radius", _positive_int, "window radius (default ceil(2 * sigma_spatial))"),
        ),
        _bilateral,
    ),
    Operation(
        "difference_of_gaussians", "windowed", "gaussian(low) - gaussian(high), float32",
        (
            Param("low", _number, "sigma of the narrow gaussian", _REQUIRED),
            Param("high", _number, "sigma of the wide gaussian", _REQUIRED),
            Param("output", _dtype, "dtype of the result (default float32)"),
        ),
        _dog,
        aliases=("dog",),
    ),
    Operation(
        "threshold", "pointwise",
        "foreground mask value > t; t a number, otsu or mean (a histogram/mean pass first), "
        "or a quantile",
        (
            Param("value", _threshold_value, "a number, otsu or mean"),
            Param("quantile", _quantile, "threshold at this quantile of the values (0-1)"),
            Param("bins", _positive_int, "histogram bins for otsu/quantile (default: one per "
                  "value for 8-bit data, else 256)"),
        ),
        _threshold,
    ),
    Operation("invert", "pointwise", "logical not of a mask", (), _invert),
    Operation(
        "clip", "pointwise", "limit values to [lo, hi]; the dtype is kept",
        (Param("lo", _number, "lower bound"), Param("hi", _number, "upper bound")),
        _clip,
        npos=2,
    ),
    Operation(
        "astype", "pointwise",
        "cast; refused when values may not fit unless clip=true (or unsafe=true)",
        (
            Param("dtype", _dtype, "target dtype (uint8, uint16, int32, float32, bool...)",
                  _REQUIRED),
            Param("clip", _bool, "clip to the dtype's range first (true/false)"),
            Param("unsafe", _bool, "wrap around as numpy does (true/false)"),
        ),
        _astype,
    ),
    Operation(
        "label", "multi-pass",
        "connected components of the nonzero voxels (= scipy.ndimage.label; int32)",
        (_CONN, Param("output", _int_dtype, "integer dtype of the labels (default int32)")),
        _label,
    ),
    Operation(
        "distance_transform_edt", "multi-pass",
        "Euclidean distance of each nonzero voxel to the nearest zero (float64)",
        (Param("sampling", _floats, "voxel spacing, one or one per axis (2x1x1)"),),
        _edt,
        aliases=("edt",),
    ),
)

_ALIASES = {a: op.name for op in OPERATIONS.values() for a in op.aliases}


def _split_args(text: str) -> list[str]:
    """Split ``a=1,b=[1,2]`` at the commas outside brackets."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _lookup(name: str) -> Operation:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in OPERATIONS:
        return OPERATIONS[key]
    names = sorted([*OPERATIONS, *_ALIASES])
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(
        f"unknown operation {name!r}.{hint} Available: {', '.join(sorted(OPERATIONS))} "
        "(dask-sweep run --help describes them)"
    )


def parse_operation(spec: str) -> tuple[Operation, dict]:
    """``"gaussian:sigma=2"`` → (the operation, ``{"sigma": 2.0}``).

    Bare values fill the parameters in order (``median:3`` is ``median:size=3``,
    ``threshold:otsu`` is ``threshold:value=otsu``); ``key=value`` pairs follow.

    Raises
    ------
    UsageError
        An unknown operation or parameter, a missing or badly formed value.
    """
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise UsageError(f"operation {spec!r}: expected a name such as gaussian:sigma=2")
    op = _lookup(name)
    byname = {p.name: p for p in op.params}
    values: dict[str, Any] = {}
    if rest.strip():
        positional = list(op.positional)
        keywords = False
        for arg in _split_args(rest):
            arg = arg.strip()
            if not arg:
                raise UsageError(f"{op.name}: empty parameter in {spec!r}")
            key, eq, val = arg.partition("=")
            if eq:
                keywords = True
                key = key.strip().lower().replace("-", "_")
                if key not in byname:
                    known = ", ".join(byname) or "none"
                    raise UsageError(
                        f"{op.name}: unknown parameter {key!r}. Parameters of {op.name}: {known}"
                    )
                param = byname[key]
            else:
                if keywords:
                    raise UsageError(
                        f"{op.name}: value {arg!r} after key=value parameters; write it as "
                        "key=value too"
                    )
                positional = [p for p in positional if p.name not in values]
                if not positional:
                    takes = ", ".join(p.name for p in op.positional) or "none"
                    raise UsageError(
                        f"{op.name}: too many bare values in {spec!r} (it takes them for: "
                        f"{takes}); write the others as key=value. Usage: {op.usage()}"
                    )
                param, val = positional[0], arg
            if param.name in values:
                raise UsageError(f"{op.name}: {param.name} given twice in {spec!r}")
            try:
                values[param.name] = param.parse(val.strip())
            except ValueError as e:
                raise UsageError(f"{op.name}: {param.name}={val.strip()}: {e}") from None
    missing = [p.name for p in op.params if p.required and p.name not in values]
    if missing:
        raise UsageError(
            f"{op.name}: missing {', '.join(missing)}. Usage: {op.usage()}, e.g. "
            f"{_EXAMPLES.get(op.name, op.usage())}"
        )
    return op, values


_EXAMPLES = {
    "gaussian": "gaussian:sigma=2 or gaussian:2x1x1",
    "uniform": "uniform:size=5",
    "median": "median:size=3",
    "minimum": "minimum:3",
    "maximum": "maximum:3",
    "rank": "rank:rank=10,size=5",
    "erosion": "erosion:3",
    "dilation": "dilation:3",
    "opening": "opening:3",
    "closing": "closing:3",
    "difference_of_gaussians": "difference_of_gaussians:low=1,high=3",
    "astype": "astype:uint8,clip=true",
}


def build_pipeline(src: Any, specs: list[str]) -> tuple[Any, Context]:
    """The stream of ``specs`` applied in order to ``src`` (a :class:`~dask_sweep.dsl.Stream`)."""
    parsed = [parse_operation(s) for s in specs]  # every usage error before any work
    ctx = Context()
    s = src
    for op, values in parsed:
        s = op.apply(s, values, ctx)
    return s, ctx


_KINDS = (
    ("windowed", "windowed (a neighbourhood; streamed with a ring of planes)"),
    ("pointwise", "pointwise (otsu, mean and quantile thresholds add a pass before)"),
    ("multi-pass", "multi-pass (a table pass, then the result: one more pass)"),
)

OPERATION_SYNTAX = (
    "An operation is name[:value,...][,key=value,...]: bare values fill the required\n"
    "parameters in order, or the first one (median:3 = median:size=3, threshold:otsu =\n"
    "threshold:value=otsu, clip:0,100 = clip:lo=0,hi=100); key=value pairs follow. Per-axis values are written 2x1x1 (or [2,1,1], quoted). Booleans:\n"
    "true/false. Names may use - for _."
)


def operations_help(details: bool = False) -> str:
    """The operation list of ``dask-sweep run --help`` (``details``: with every parameter)."""
    lines = ["operations, applied in order:"]
    for kind, title in _KINDS:
        lines.append(f"  {title}:")
        for op in OPERATIONS.values():
            if op.kind != kind:
                continue
            if details:
                lines += ["    " + ln for ln in op.describe().splitlines()]
                continue
            use = op.usage() + (f" (alias {', '.join(op.aliases)})" if op.aliases else "")
            text = textwrap.wrap(op.help, 50)
            if len(use) > 40:
                lines.append(f"    {use}")
                lines += [" " * 46 + t for t in text]
            else:
                lines.append(f"    {use:<41} {text[0]}")
                lines += [" " * 46 + t for t in text[1:]]
    return "\n".join(lines)


def cmd_operations(a: argparse.Namespace) -> int:
    """``dask-sweep operations [NAME ...]``: the operations and their parameters."""
    if a.names:
        print("\n\n".join(_lookup(n).describe() for n in a.names))
    else:
        print(OPERATION_SYNTAX + "\n\n" + operations_help(details=True))
    return EXIT_OK


# ----------------------------------------------------------------------------- progress


class Progress:
    """A progress line on stderr: planes swept over all passes of a run.

    On a terminal the line is redrawn in place (every step, and every half
    second for the elapsed time); elsewhere a line is printed at each tenth.
    """

    def __init__(self, totals: list[int], stream: Any = None, tty: bool | None = None) -> None:
        self.totals = [max(1, int(t)) for t in totals]
        self.total = sum(self.totals)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = 0
        self.pass_index = 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._printed_tenth = -1
        self._ticker: threading.Thread | None = None

    def start(self) -> Progress:
        self._draw()
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="cli-progress")
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def step(self, record: Any) -> None:
        """One step (or table-pass slab) finished: a ``dsl`` ``StepRecord``."""
        a, b = record.planes
        with self._lock:
            self.done = min(self.total, self.done + max(0, int(b) - int(a)))
            self.pass_index = int(record.pass_index)
        self._draw()

    def _line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        fill = int(round(frac * width))
        bar = "#" * fill + "-" * (width - fill)
        p = min(self.pass_index + 1, len(self.totals))
        return (
            f"pass {p}/{len(self.totals)} [{bar}] {100 * frac:5.1f}%  "
            f"{time.perf_counter() - self.t0:7.1f} s"
        )

    def _draw(self, final: bool = False) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r" + self._line() + ("\n" if final else ""))
                self.stream.flush()
                return
            tenth = int(10 * self.done / self.total) if self.total else 10
            if tenth > self._printed_tenth or final:
                self._printed_tenth = tenth
                self.stream.write(self._line() + "\n")
                self.stream.flush()

    def close(self, ok: bool = True) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if ok:
            self.done = self.total
            self.pass_index = len(self.totals) - 1
            if self.tty or self._printed_tenth < 10:
                self._draw(final=True)
        elif self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _pass_extents(explanation: Any) -> list[int]:
    """Planes each pass of a compiled pipeline sweeps (table passes: their slabs)."""
    out = []
    for pp in explanation.compiled.passes:
        plan = pp.plan
        extent = getattr(plan, "extent", None)
        if extent is None:
            slabs = getattr(plan, "slabs", None) or [(0, 1)]
            extent = slabs[-1][1] - slabs[0][0]
        out.append(int(extent))
    return out


# ----------------------------------------------------------------------------- commands


def _settings(a: argparse.Namespace) -> dict:
    s: dict[str, Any] = {}
    if a.memory_limit is not None:
        s["memory_limit"] = a.memory_limit
    if getattr(a, "threads", None) is not None:
        s["threads"] = a.threads
    if getattr(a, "axis", None) is not None:
        s["axis"] = a.axis
    return s


def _same_path(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        from dask_sweep.io.zarr_io import split_zarr_path

        p = os.path.realpath(os.path.abspath(p))
        if ".zarr" in p.lower():
            p = split_zarr_path(p)[0]
        return p.rstrip(os.sep)

    try:
        return norm(a) == norm(b)
    except Exception:  # noqa: BLE001 - only a safety check
        return False


def cmd_run(a: argparse.Namespace) -> int:
    """``dask-sweep run``: build the pipeline, explain it or run it into OUTPUT."""
    import numpy as np

    from dask_sweep import dsl
    from dask_sweep.errors import SinkError

    for spec in a.operations:  # usage errors first, before the input is opened
        parse_operation(spec)
    if a.resume and a.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if _same_path(a.input, a.output):
        raise SinkError(
            f"Output {a.output} is the input: write to another path (the input is read "
            "while the output is written)."
        )
    src = dsl.source(a.input)
    stream, ctx = build_pipeline(src, a.operations)
    opts: dict[str, Any] = {}
    if a.overwrite:
        opts["overwrite"] = True
    if a.resume:
        opts["resume"] = True
    target = stream.to(a.output, **opts)
    items = [target, *ctx.scalars]
    settings = _settings(a)
    if a.explain:
        print(dsl.explain(*items, **settings))
        return EXIT_OK
    show = a.progress if a.progress is not None else sys.stderr.isatty()
    progress = None
    if show:
        progress = Progress(_pass_extents(dsl.explain(*items, **settings))).start()
    ok = False
    try:
        from dask_sweep.diagnostics import observe_steps

        with observe_steps(progress.step) if progress else contextlib.nullcontext():
            res = dsl.run(*items, **settings)
        ok = True
    finally:
        if progress is not None:
            progress.close(ok)
    rep = res.report
    print(
        f"wrote {res.values[0]}: shape {stream.shape}, {np.dtype(stream.dtype)}; "
        f"{rep.passes} pass(es) in {rep.seconds:.1f} s; read {_fmt(rep.bytes_read)} = "
        f"{rep.read_ratio:.2f} x input; peak resident +{_fmt(rep.peak_rss)} "
        f"(budget {_fmt(rep.budget)})"
    )
    for sc, v in zip(ctx.scalars, res.values[1:]):
        print(f"{sc.label} = {v}")
    if a.report:
        print(rep)
    return EXIT_OK


def _disk_bytes(src: Any) -> int:
    """Bytes the source's files take on disk (an HDF5 dataset: its storage)."""
    kind = getattr(src, "kind", "")
    if kind == "hdf5":
        import h5py

        with h5py.File(src.file, "r") as f:
            return int(f[src.dataset].id.get_storage_size())
    if kind == "tiff-stack":
        return sum(os.path.getsize(f) for f in src.files)
    if os.path.isdir(src.path):
        return sum(
            os.path.getsize(os.path.join(d, n))
            for d, _, names in os.walk(src.path)
            for n in names
        )
    return os.path.getsize(src.path) if os.path.exists(src.path) else 0


def _layout(src: Any) -> list[tuple[str, str]]:
    """Format-specific layout rows (metadata only, no pixel data read)."""
    rows: list[tuple[str, str]] = []
    kind = getattr(src, "kind", "")
    if kind == "zarr":
        rows.append(("format", f"Zarr v{src.zarr_format}"))
        inner = getattr(src, "inner_chunks", src.chunks)
        rows.append(("chunks", "x".join(map(str, inner))))
        if tuple(inner) != tuple(src.chunks):
            rows.append(("shards", "x".join(map(str, src.chunks))))
        try:
            arr = src._open_array()
            codecs = [*(arr.filters or ()), *(arr.compressors or ())]
            rows.append(("compression", ", ".join(map(repr, codecs)) or "none"))
        except Exception:  # noqa: BLE001 - layout detail only
            pass
    elif kind == "hdf5":
        import h5py

        with h5py.File(src.file, "r") as f:
            ds = f[src.dataset]
            rows.append(("format", f"HDF5 dataset /{src.dataset.lstrip('/')}"))
            rows.append(("chunks", "x".join(map(str, ds.chunks)) if ds.chunks else "contiguous"))
            comp = ds.compression
            if comp and ds.compression_opts is not None:
                comp = f"{comp} ({ds.compression_opts})"
            rows.append(("compression", comp or "none"))
    elif kind in ("tiff", "tiff-stack"):
        import tifffile

        first = src.path if kind == "tiff" else src.files[0]
        with tifffile.TiffFile(first) as tif:
            page = tif.pages[0]
            comp = getattr(page.compression, "name", str(page.compression)).lower()
            big = "BigTIFF" if tif.is_bigtiff else "TIFF"
        if kind == "tiff":
            rows.append(("format", f"{big} file, {src.shape[0]} pages"))
        else:
            rows.append(("format", f"folder/glob of {len(src.files)} {big} slices"))
        rows.append(("chunks", "x".join(map(str, src.chunks))))
        rows.append(("compression", "none" if comp in ("none", "1") else comp))
    else:  # pragma: no cover - a future format
        rows.append(("format", type(src).__name__))
        rows.append(("chunks", "x".join(map(str, src.chunks))))
    return rows


def cmd_info(a: argparse.Namespace) -> int:
    """``dask-sweep info``: layout of a dataset and what a sweep over it would read."""
    import numpy as np

    from dask_sweep import dsl
    from dask_sweep.config import SweepSettings
    from dask_sweep.errors import BudgetError
    from dask_sweep.io import open_source
    from dask_sweep.plan.printer import planes, step_widths

    src = open_source(a.path)
    rows = [("path", src.path), ("shape", " x ".join(map(str, src.shape))),
            ("dtype", str(np.dtype(src.dtype)))]
    rows += _layout(src)
    disk = _disk_bytes(src)
    nbytes = src.nbytes
    ratio = f" ({nbytes / disk:.2f}x compression)" if disk and disk < nbytes else ""
    rows.append(("size", f"{_fmt(nbytes)} in memory, {_fmt(disk)} on disk{ratio}"))
    settings = _settings(a)
    budget = SweepSettings.resolve(**settings).memory_limit
    chunk_row = int(src.chunks[0]) * (nbytes // max(1, src.shape[0])) if src.shape else nbytes
    rows.append(("chunk row", f"{planes(src.chunks[0])}, {_fmt(chunk_row)} (read whole)"))
    try:
        e = dsl.explain(dsl.source(src).to(), **settings)
        pp = e.compiled.passes[0]
        steps = pp.plan.steps
        read = pp.trace.bytes_read
        rows.append((
            f"sweep at {_fmt(budget)}",
            f"axis {pp.plan.axis}, {len(steps)} step{'s' * (len(steps) != 1)} of "
            f"{step_widths(pp.plan)}; "
            f"reads {_fmt(read)} = {read / max(1, nbytes):.2f} x input per pass "
            f"(projected peak {_fmt(pp.trace.peak)})",
        ))
    except BudgetError as err:
        rows.append((f"sweep at {_fmt(budget)}", "does not fit: " + _one_line(str(err))))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{w + 1}} {v}")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser


def _memory(text: str) -> int:
    from dask_sweep.config import parse_bytes

    try:
        return parse_bytes(text, "--memory-limit")
    except Exception as e:  # noqa: BLE001 - becomes an argparse usage error
        raise argparse.ArgumentTypeError(_one_line(str(e))) from None


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _exit_codes_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in sorted(EXIT_CODES.items()))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _version() -> str:
    import dask_sweep

    return f"dask-sweep {dask_sweep.__version__}"


class _VersionAction(argparse.Action):
    """``--version``: imports dask_sweep only when asked (``--help`` stays fast)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``dask-sweep`` argument parser (``demo`` delegates to :mod:`dask_sweep.demo`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="on an error, print the full traceback too"
    )
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument(
        "--memory-limit", "-m", type=_memory, metavar="BYTES", default=None,
        help="memory budget of the sweep, e.g. 512MiB or 2GiB (default: the sweep.memory-limit "
        "setting, 1GiB unless DASK_SWEEP__MEMORY_LIMIT says otherwise)",
    )

    ap = argparse.ArgumentParser(
        prog="dask-sweep",
        description="Streaming, bounded-memory image pipelines on volumes larger than RAM.",
        epilog=(
            "examples:\n"
            "  dask-sweep info stack/                       # layout of a folder of TIFF slices\n"
            "  dask-sweep run stack/ mask.zarr gaussian:sigma=2 threshold:otsu "
            "--memory-limit 512MiB\n"
            "  dask-sweep run vol.zarr labels.zarr median:3 threshold:otsu label --explain\n"
            "  dask-sweep demo                              # stock dask vs dask_sweep\n\n"
            + _exit_codes_text()
        ),
        formatter_class=_Formatter,
    )
    ap.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", help="what to do")

    run = sub.add_parser(
        "run", parents=[common, budget], formatter_class=_Formatter,
        help="run a pipeline of operations from INPUT to OUTPUT",
        description=(
            "Run OPERATIONS in order on INPUT, streaming it slab by slab within the memory\n"
            "budget, and write the result to OUTPUT. The plan (passes, slabs, projected\n"
            "memory) is made before anything is read; --explain prints it and stops."
        ),
        epilog=OPERATION_SYNTAX + "\n\n" + operations_help()
        + "\n(dask-sweep operations NAME: its parameters)\n\nexamples:\n"
        "  dask-sweep run slices/ smooth.zarr gaussian:sigma=2 -m 512MiB\n"
        "  dask-sweep run vol.zarr mask.tif median:3 threshold:otsu binary_opening:iterations=1\n"
        "  dask-sweep run vol.h5/raw labels.zarr gaussian:1 threshold:otsu label:connectivity=3\n"
        "  dask-sweep run vol.zarr/0 dist.zarr threshold:100 edt:sampling=2x1x1 "
        "astype:uint8,clip=true\n\n" + _exit_codes_text(),
    )
    run.add_argument(
        "input",
        help="a folder or quoted glob of TIFF slices, a .tif (BigTIFF), a .zarr store or array "
        "path in one (vol.ome.zarr/0), or an HDF5 dataset (file.h5/dataset)",
    )
    run.add_argument(
        "output",
        help="out.zarr (Zarr), out.h5[/dataset] (HDF5), out.tif (one BigTIFF) or any other "
        "path (a folder of TIFF slices); written to OUTPUT.partial and published at the end",
    )
    run.add_argument(
        "operations", nargs="*", metavar="OPERATION",
        help="name[:value,...][,key=value,...], applied in order (listed below); none: a copy",
    )
    run.add_argument("--explain", action="store_true",
                     help="print the plan (passes, stages, slabs, memory, reads) and exit "
                     "without reading or writing anything")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing OUTPUT (kept until the new one is complete)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted write to OUTPUT (same pipeline and budget)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress on stderr (default: on when stderr is a terminal)")
    run.add_argument("--threads", "-j", type=_positive_int_arg, default=None, metavar="N",
                     help="threads inside each step (default: the sweep.threads setting, "
                     "all cores)")
    run.add_argument("--axis", type=_nonneg_int, default=None, metavar="A",
                     help="sweep axis (default 0; label and distance_transform_edt need 0)")
    run.add_argument("--report", action="store_true",
                     help="print the measured run, step by step, against the projection")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser(
        "info", parents=[common, budget], formatter_class=_Formatter,
        help="print a dataset's layout and what a sweep over it would read",
        description=(
            "Print the layout of PATH (shape, dtype, chunks and shards, format, compression,\n"
            "bytes on disk) from its metadata, and how a sweep would read it within the\n"
            "memory budget (steps, planes per step, bytes read / input). No pixel data is read."
        ),
        epilog=_exit_codes_text(),
    )
    info.add_argument("path", help="any input `dask-sweep run` accepts")
    info.set_defaults(func=cmd_info)

    ops = sub.add_parser(
        "operations", parents=[common], formatter_class=_Formatter,
        help="list the operations of `run` and their parameters",
        description="List the operations `dask-sweep run` understands, with their parameters.",
    )
    ops.add_argument("names", nargs="*", metavar="NAME", help="only these operations")
    ops.set_defaults(func=cmd_operations)

    sub.add_parser(
        "demo", add_help=False,
        help="stock dask vs dask_sweep on a generated volume (dask-sweep demo --help)",
    )
    return ap


def _positive_int_arg(text: str) -> int:
    try:
        return _positive_int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------- main


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _classify(exc: BaseException) -> tuple[int, str]:
    from dask_sweep.errors import BudgetError, SinkError, SourceError, SweepError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, "error"
    if isinstance(exc, SourceError):
        return EXIT_INPUT, "input error"
    if isinstance(exc, SinkError):
        return EXIT_OUTPUT, "output error"
    if isinstance(exc, BudgetError):
        return EXIT_BUDGET, "budget too small"
    if isinstance(exc, SweepError):
        return EXIT_SWEEP, "error"
    return EXIT_ERROR, f"internal error ({type(exc).__name__})"


_CLI_WORDS = (
    ("Pass resume=True", "Pass --resume"),
    ("Pass overwrite=True", "Pass --overwrite"),
    ("resume=True", "--resume"),
    ("overwrite=True", "--overwrite"),
    ("Raise memory_limit", "Raise --memory-limit"),
    ("than memory_limit=", "than --memory-limit "),
    ("(axis=...)", "(--axis)"),
    ("Pass clip=True", "Add clip=true"),
    ("unsafe=True", "unsafe=true"),
)


def _cli_message(exc: BaseException) -> str:
    """The error's message on one line, in the command line's words (--resume, not resume=True)."""
    msg = _one_line(str(exc))
    for lib, cli in _CLI_WORDS:
        msg = msg.replace(lib, cli)
    return msg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dask-sweep`` and ``python -m dask_sweep``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from dask_sweep.demo import main as demo

        return demo(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)  # exits 2 on a usage error, 0 on --help / --version
    if a.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print(
            "\ndask-sweep: interrupted; the slabs written so far are kept: rerun with "
            "--resume to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        code, what = _classify(exc)
        if a.debug:
            import traceback

            traceback.print_exc()
        prog = f"dask-sweep {a.command}"
        print(f"{prog}: {what}: {_cli_message(exc)}", file=sys.stderr)
        if code == EXIT_ERROR and not a.debug:
            print(f"{prog}: rerun with --debug for the traceback", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
