"""From the pipeline's streams to the plan IR's stages (shared by the compiler and the
multi-pass algorithms, which lower the streams of their inputs themselves).

Maps and zips lower to the IR's :class:`~dask_sweep.plan.ir.Pointwise`, windows to its
:class:`~dask_sweep.plan.ir.Kernel`, reductions to its :class:`~dask_sweep.plan.ir.Reduce`.
A pointwise stage reads the same planes ``[a, b)`` of each of its inputs, so a zip of
branches with different total windows needs no special machinery: each branch is asked
for ``[a, b)``, the wider window pulls further ahead from the shared source, and the
source's ring holds the planes the other branch has not consumed yet::

    source ring  [a-12 ........................ b+12)
                  │ gaussian(3) pulls [a-12, b+12)   ─► [a, b) ─┐
                  └ gaussian(1) pulls [a-4,  b+4)    ─► [a, b) ─┴► zip ─► [a, b)
"""

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


def pipeline_token(items: list[Any], settings: SweepSettings) -> str:
    """A deterministic token of what ``items`` (targets and scalars) compute, and how.

    Equal for the same pipeline objects, and for pipelines built again from the same
    functions and data, in this process or another (graph keys then match, as dask's
    own do); different when a function, a constant, a source's data, an output target
    or a setting differs.  An array given as a target is identified by the object.
    Node ids (``uid``) are replaced by positions, so building order does not matter.
    """
    from dask.base import tokenize

    from dask_sweep.dsl.core import Constant, Target

    index: dict[int, int] = {}
    nodes: list[tuple] = []

    def visit(root: Any) -> int:
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            if id(node) in index:
                continue
            # (an algorithm's output stream has its tables among its scalars)
            kids = [node.stream] if isinstance(node, Target) else deps(node, cross=True)
            if not done:
                stack.append((node, True))
                stack.extend((k, False) for k in kids if id(k) not in index)
                continue
            index[id(node)] = len(nodes)
            nodes.append(_node_key(node, [index[id(k)] for k in kids], Constant, Target))
        return index[id(root)]

    roots = [visit(x) for x in items]
    return tokenize(roots, nodes, settings)


def _node_key(node: Any, kids: list[int], constant: type, target: type) -> tuple:
    """What identifies one node of the pipeline graph (its inputs by position)."""
    from dask.base import tokenize

    if isinstance(node, target):
        t = node.target
        # a numpy result has no target; a file is its path; an array the user gave is
        # identified by the object (its contents are what the graph writes)
        where = {"numpy": ("numpy",), "path": ("path", str(t))}.get(node.kind, (node.kind, id(t)))
        return ("target", where, tokenize(node.options), kids)
    if isinstance(node, Stream):
        src = node.source
        if src is None:
            what: Any = None
        elif hasattr(src, "algo"):
            what = "algorithm"  # identified by its tables (among the kids)
        else:
            obj = src.obj
            what = (src.kind, obj.name if src.kind == "dask" else tokenize(obj))
        # temps changes the plan, not the values: in the token, so a plan is one graph
        return ("stream", node.kind, node.label, node.shape, node.dtype.str, node.vrange,
                tokenize(node.fn), node.depth, node.temps, what, kids)
    if isinstance(node, Tables):
        return ("tables", node.algo.name, tokenize(node.algo.params()), kids)
    if isinstance(node, Reduction):
        return ("reduction", node.label, tokenize(node.partial, node.fn), node.k,
                node.pdtype.str, node.identity, node.combine, kids)
    if isinstance(node, constant):
        return ("constant", repr(node.value), node.kind)
    return ("scalar", node.label, tokenize(node.fn), node.kind, kids)
