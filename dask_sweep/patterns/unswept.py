"""Why the layers no sweep takes are left to dask: one sentence per kind of layer.

:func:`~dask_sweep.patterns.recognise.find_regions` gives reasons for what it tried
and refused (a map_overlap it cannot reproduce, a region over the budget...).  The
rest of a graph, layers that are no part of any region, would otherwise be left to
dask in silence; :func:`unswept` names them by kind, so ``explain`` says why for
everything that is not swept, e.g. for xarray's paths other than ``rolling``::

    coarsen          reshape-… + mean_chunk / mean_agg   a reshape, then a reduction
    apply_ufunc      sin-… (elementwise) / lambda-… with core dimensions
    xr.map_blocks    lambda-…, <this-array>-…            materialized tasks
    isel/shift/diff  getitem-…, concatenate-…            slicing and joining blocks

Read-only roots (sources, constants) are not reported: they are read by whoever
needs them.
"""

from __future__ import annotations

from dask._task_spec import Alias
from dask.blockwise import Blockwise
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.layers import ArrayOverlapLayer

from dask_sweep.patterns.layers import is_simple_blockwise, trim_params
from dask_sweep.patterns.spec import Fallback

_SLICING = ("getitem-", "concatenate-", "broadcast_to-", "stack-", "pad-", "array-",
            "full-", "full_like-", "repeat-", "block-")

REASONS = {  # kind -> (what it is, why it is left to dask)
    "elementwise": (
        "elementwise or block-by-block work",
        "no windowed stage (map_overlap, a dask-image filter, a rolling window) and no "
        "store to stream into: stock dask already computes each block once; write it "
        "with to_zarr/store to stream it"),
    "reduction": (
        "a reduction over an axis (e.g. sum, mean, coarsen's reduction)",
        "its result has another shape than the planes it reads, so dask's tree "
        "reduction runs as built"),
    "reshape": (
        "a reshape (e.g. coarsen, reshape)",
        "blocks are regrouped into new axes, not computed plane by plane"),
    "core": (
        "a blockwise function over whole axes (e.g. apply_ufunc with core dimensions, "
        "a gufunc)",
        "each block spans its core axes, so it is not a stage on planes"),
    "map_blocks": (
        "xr.map_blocks",
        "one materialized task per block, calling the function on an xarray object: "
        "opaque to the sweep (a function applied to the dask array, e.g. "
        "DataArray.copy(data=arr.data.map_overlap(...)), can be swept)"),
    "materialized": (
        "materialized tasks",
        "opaque per-block tasks, not recognised as stages"),
    "alias": (
        "blocks renamed by a materialized layer (e.g. the outputs of xr.apply_ufunc / "
        "apply_gufunc)",
        "not recognised as stages, so what reads them is not swept"),
    "slicing": (
        "slicing and joining blocks (e.g. isel, shift, diff, pad, concatenate)",
        "not recognised as stages on planes"),
    "rechunk": ("a rechunk", "outside any swept pipeline: left as dask built it"),
    "overlap": ("an overlap", "its function is not recognised"),
    "other": ("layers", "not recognised as stages"),
}


def _kind(name: str, layer) -> str:
    if isinstance(layer, ArrayOverlapLayer):
        return "overlap"
    if name.startswith("rechunk-"):
        return "rechunk"
    if name.startswith("reshape-"):
        return "reshape"
    if name.endswith(("-aggregate",)) or "-aggregate-" in name or "-partial-" in name:
        return "reduction"
    if name.startswith(_SLICING):
        return "slicing"
    if isinstance(layer, Blockwise):
        if is_simple_blockwise(layer) or trim_params(layer) is not None:
            return "elementwise"
        kwargs = getattr(layer.task, "kwargs", None) or {}
        if "axis" in kwargs:
            return "reduction"
        return "core"
    if isinstance(layer, MaterializedLayer):
        if name.startswith("<this-array>-"):
            return "map_blocks"
        key = next(iter(layer.keys()), None)
        value = layer[key] if key is not None else None
        if isinstance(value, Alias) or (isinstance(value, tuple) and value
                                        and isinstance(value[0], str)):
            return "alias"
        return "materialized"
    return "other"


def _also(names: list[str]) -> str:
    """`` (also 'b', 'c' and 3 more)`` for the layers after the first."""
    rest = names[1:]
    if not rest:
        return ""
    shown = ", ".join(repr(n) for n in rest[:2])
    return f" (also {shown}{f' and {len(rest) - 2} more' if len(rest) > 2 else ''})"


def _connected(hlg: HighLevelGraph, start: set[str], stop: set[str]) -> set[str]:
    """The layers joined to ``start`` by dependencies, not crossing ``stop``.

    A refusal explains its whole pipeline: the padding and overlap before a refused
    stage, and what is computed from it after.
    """
    users: dict[str, set[str]] = {}
    for n, ds in hlg.dependencies.items():
        for d in ds:
            users.setdefault(d, set()).add(n)
    seen, todo = set(start), list(start)
    while todo:
        n = todo.pop()
        for m in (*hlg.dependencies.get(n, ()), *users.get(n, ())):
            if m not in seen and m not in stop:
                seen.add(m)
                todo.append(m)
    return seen


def unswept(hlg: HighLevelGraph, regions, fallbacks) -> list[Fallback]:
    """A :class:`Fallback` per kind of layer that no region took and no reason names."""
    covered: set[str] = set()
    for region in regions:
        covered |= set(region.stages) | set(region.stores) | set(region.sources)
        for spec in region.stages.values():
            covered |= spec.internal
    deps = hlg.dependencies
    covered |= _connected(hlg, {fb.where for fb in fallbacks if fb.where in deps}, covered)
    kinds: dict[str, list[str]] = {}
    for name, layer in hlg.layers.items():
        if name in covered or not deps.get(name):
            continue  # a region's, a refusal's, or a root (a source, a constant)
        if name.startswith(("finalize-", "store-map-", "storedone-")):
            continue  # (storedone-: the expression-mode store's task that waits for the writes)
        kinds.setdefault(_kind(name, layer), []).append(name)
    quiet = bool(regions or fallbacks)  # elementwise work around them is theirs to explain
    out = []
    for kind, names in kinds.items():
        if kind == "slicing" and all(n.startswith(("array-", "broadcast_to-")) for n in names):
            continue  # constants only
        if quiet and kind in ("elementwise", "rechunk"):
            continue
        if kind == "materialized" and "map_blocks" in kinds:
            continue  # xr.map_blocks' own layers
        what, why = REASONS[kind]
        out.append(Fallback(names[0], f"{what}{_also(names)}: {why}"))
    return out
