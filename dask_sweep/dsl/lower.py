"""From the pipeline's streams to the plan IR's stages (shared by the compiler and the
multi-pass algorithms, which lower the streams of their inputs themselves)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from dask_sweep.config import SweepSettings
from dask_sweep.dsl.core import Reduction, Scalar, Stream, Tables
from dask_sweep.patterns.kernels import separable_passes
from dask_sweep.plan.ir import Kernel, Pointwise, Source, Stage


def walk_streams(roots: list[Stream], cross: bool = False) -> list[Stream]:
    """All streams the roots depend on (through inputs and scalars), topologically.

    ``cross``: also the inputs of algorithms whose tables a stream reads (those are
    computed in the table pass, not in the pass of the stream).
    """
    order: list[Stream] = []
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, done = stack.pop()
        if done:
            if isinstance(node, Stream):
                order.append(node)
            continue
        key = id(node)
        if key in seen:
            continue
        seen.add(key)
        stack.append((node, True))
        for d in deps(node, cross):
            if id(d) not in seen:
                stack.append((d, False))
    return order


def deps(node: Any, cross: bool = True) -> list[Any]:
    if isinstance(node, Stream):
        return [*node.inputs, *node.scalars]
    if isinstance(node, Tables):
        return [node.stream] if cross else []
    if isinstance(node, Reduction):
        return [node.stream, *node.params]
    if isinstance(node, Scalar):
        return list(node.deps)
    return []


def lower_streams(order: list[Stream], axis: int, s: SweepSettings) -> tuple[list[Stage], dict]:
    """Stages of ``order`` (streams, topologically sorted) and ``{id(stream): stage index}``."""
    index: dict[int, int] = {}
    stages: list[Stage] = []
    for x in order:
        ins = tuple(index[id(i)] for i in x.inputs)
        if x.kind == "source":
            spec = x.source
            rb = spec.row_bounds(axis)
            plane = int(np.prod([n for d, n in enumerate(x.shape) if d != axis], dtype=np.int64))
            plane *= x.dtype.itemsize
            per_row = getattr(spec, "bytes_per_row", None)
            st: Stage = Source(
                label=f"{x.label} ({spec.desc})",
                shape=x.shape,
                dtype=x.dtype,
                row_bounds=rb,
                reader=spec.reader(axis),
                external=False,
                bytes_per_row=(
                    per_row(axis)
                    if per_row is not None
                    else tuple((b - a) * plane for a, b in zip(rb[:-1], rb[1:]))
                ),
            )
        elif x.kind == "kernel":
            st = Kernel(
                label=x.label,
                shape=x.shape,
                dtype=x.dtype,
                inputs=ins,
                fn=x.fn,
                depth=x.depth,
                boundary=("none",) * x.ndim,  # the kernel's own mode acts at the faces
                temps=x.temps,
                passes=_passes(x.fn, x.ndim),
                in_dtype=x.inputs[0].dtype,
                sweep_axis=axis,
            )
        else:
            st = Pointwise(
                label=x.label, shape=x.shape, dtype=x.dtype, inputs=ins, fn=x.fn, scalars=x.scalars
            )
        index[id(x)] = len(stages)
        stages.append(st)
    return stages, index


def _passes(fn: Any, ndim: int) -> tuple | None:
    """scipy's separable 1-D passes for a plain ``partial(scipy_filter, **kw)``, else None.

    With ``output=dtype`` the first pass writes that dtype and the later ones
    work in it, as scipy's N-D filters do (``input = output`` after the first axis).
    """
    if not isinstance(fn, functools.partial) or fn.args:
        return None
    kw = dict(fn.keywords)
    output = kw.pop("output", None)
    if output is not None and not isinstance(output, (str, type, np.dtype)):
        return None  # an output array: not something a stream can do per slab
    passes = separable_passes(fn.func, kw, ndim)
    if passes is None or output is None:
        return passes
    if not passes:
        return None  # no pass at all: the N-D call casts
    (ax, first), rest = passes[0], passes[1:]
    return ((ax, functools.partial(first, output=np.dtype(output))), *rest)
