"""What recognition finds: stages, regions, refusals, and the graph walks they share.

Kept apart from :mod:`~dask_sweep.patterns.recognise` so that the recognisers it
calls (``rolling``, ``unswept``) and the readers import these without importing
recognition itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dask_sweep.patterns.layers import ArrayMeta, BlockwiseEval


@dataclass
class Fallback:
    """Part of the graph left to stock dask, and why (``kind``: which case, for the
    passes that look further at it; ``"copy"``: a store of blocks dask computes)."""

    where: str
    reason: str
    kind: str = ""


@dataclass
class StageSpec:
    """A recognised stage: the layer that produces it and how to evaluate it."""

    name: str  # output layer name (e.g. ``_trim-…``)
    kind: str  # "overlap" | "elementwise" | "rechunk"
    inputs: list[str]  # array names read
    meta: ArrayMeta
    internal: set[str] = field(default_factory=set)  # layers absorbed by this stage
    depth: list[dict] = field(default_factory=list)  # per input: axis -> int | (lo, hi)
    boundary: list[dict] = field(default_factory=list)
    func_eval: BlockwiseEval | None = None
    trim_eval: BlockwiseEval | None = None
    func_positions: list[int] = field(default_factory=list)
    kernel: tuple | None = None  # (function, kwargs) when the func is a plain f(x, **kw)
    label: str = ""


@dataclass
class Region:
    stages: dict[str, StageSpec]
    sources: list[str]
    outputs: list[str]
    stores: dict[str, str] = field(default_factory=dict)  # store-map layer -> its input
    extra_users: dict[str, bool] = field(default_factory=dict)  # output used beyond stores
    ndim: int = 0


def _prefix(name: str) -> str:
    return name.rsplit("-", 1)[0] if "-" in name else name


def ancestors(deps: dict, name: str) -> set[str]:
    seen, stack = set(), [name]
    while stack:
        for d in deps.get(stack.pop(), ()):
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return seen


def follow_rechunk(deps: dict, layers: dict, metas: dict, name: str) -> tuple[str, set[str]]:
    """Skip rechunk layers (identity on values) down to the array they rechunk."""
    internal = set()
    shape = metas[name].shape if metas.get(name) else None
    while name.startswith("rechunk-") and len(deps.get(name, ())) == 1:
        (dep,) = deps[name]
        if metas.get(dep) is None and not dep.startswith("rechunk-"):
            break
        internal.add(name)
        name = dep
        if metas.get(name) is not None and metas[name].shape == shape:
            if not name.startswith("rechunk-"):
                break
    return name, internal
