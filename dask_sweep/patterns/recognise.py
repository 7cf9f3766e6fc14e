"""dask graph → regions of recognised stages, or a reason not to rewrite.

Recognised, per layer of a ``HighLevelGraph``:

* **map_overlap groups**: ``[rechunk] → [boundary padding] → ArrayOverlapLayer →
  [getitem] → Blockwise(func) → Blockwise(_trim)``.  The ``_trim`` layer carries
  the coerced depth and boundary; the padding layers between the input and the
  overlap layer are found as the set that every path from the overlap's input
  back to the roots crosses before reaching one array (its *dominator*).
* **elementwise / map_blocks** Blockwise layers whose inputs are indexed and
  chunked exactly like their output (``x > t``, ``astype``, ``where(m, a, b)``,
  ``map_blocks(f, x)``).
* **rechunks** (identity on values; a sweep sees planes, not chunks).

Connected recognised layers that contain at least one windowed stage form a
*region*; the arrays a region reads from outside are its *sources*.  A region
whose outputs are only partly needed, whose arrays differ in shape, or that
uses something we cannot reproduce exactly is refused with a reason.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from dask.highlevelgraph import HighLevelGraph
from dask.layers import ArrayOverlapLayer

from dask_sweep.patterns.expr import flatten_keys
from dask_sweep.patterns.layers import (
    BlockwiseEval,
    array_meta,
    is_simple_blockwise,
    kernel_call,
    returns_stored,
    trim_params,
)
from dask_sweep.patterns.readers import ExternalReader, make_reader
from dask_sweep.patterns.rolling import find_windows
from dask_sweep.patterns.spec import (  # noqa: F401 - re-exported
    Fallback,
    Region,
    StageSpec,
    _prefix,
    ancestors,
    follow_rechunk,
)
from dask_sweep.patterns.unswept import unswept

# rolling and unswept are imported with the package, not lazily in the first compute:
# a lazy import there adds ~2 MiB of resident code inside that run's budget

PAD_PREFIXES = ("concatenate-", "getitem-", "full_like-", "repeat-", "rechunk-", "reflect-",
                "periodic-", "nearest-",
                "stack-", "full-")  # array-expression mode's Concatenate and Full


def _find_padding_input(deps: dict, metas: dict, x2: str, shape) -> tuple[str, set[str]] | None:
    """The array the boundary padding of ``x2`` was built from, and the padding layers.

    It is the nearest ancestor of ``x2`` with the unpadded shape that every path
    from ``x2`` crosses, with only padding-kind layers in between.
    """
    anc = ancestors(deps, x2)
    best = None
    for cand in anc:
        if metas.get(cand) is None or metas[cand].shape != shape:
            continue
        inner = ancestors(deps, cand) | {cand}
        pad = (anc | {x2}) - inner
        # every padding layer only reads padding layers or the candidate
        if not all(set(deps.get(p, ())) <= pad | {cand} for p in pad):
            continue
        if not all(p.startswith(PAD_PREFIXES) for p in pad):
            continue
        if best is None or len(inner) > len(best[1]):
            best = (cand, inner, pad)
    if best is None:
        return None
    return best[0], best[2]


KNOWN_BOUNDARIES = ("none", "reflect", "periodic", "nearest")


def check_boundary(boundary: dict, where: str) -> None:
    """Refuse a boundary dask would misread as a fill value (e.g. ``'wrap'``)."""
    import numbers

    for ax, b in boundary.items():
        if isinstance(b, str) and b not in KNOWN_BOUNDARIES:
            from dask_sweep.errors import SweepConfigError

            raise SweepConfigError(
                f"Unknown boundary {b!r} on axis {ax} of {where}. Expected one of "
                f"{', '.join(KNOWN_BOUNDARIES)} or a number (a constant fill value). "
                "Fix the `boundary=` argument of map_overlap."
            )
        if not isinstance(b, (str, numbers.Number, np.generic)):
            from dask_sweep.errors import SweepConfigError

            raise SweepConfigError(
                f"Unknown boundary {b!r} on axis {ax} of {where}. Expected one of "
                f"{', '.join(KNOWN_BOUNDARIES)} or a number."
            )


def _overlap_group(hlg: HighLevelGraph, metas, tname: str) -> StageSpec | Fallback:
    layers, deps = hlg.layers, hlg.dependencies
    tlayer = layers[tname]
    depth, boundary = trim_params(tlayer)
    check_boundary(boundary, f"map_overlap {tname!r}")
    teval = BlockwiseEval(tlayer)
    targs = teval.array_args()
    if len(targs) != 1:
        return Fallback(tname, "map_overlap trim reads more than one array")
    fname = targs[0][1]
    flayer = layers.get(fname)
    if flayer is None or not is_simple_blockwise(flayer):
        return Fallback(tname, "the mapped function is not a plain block-by-block layer")
    feval = BlockwiseEval(flayer)
    fargs = feval.array_args()
    if not fargs:
        return Fallback(tname, "a trim without an overlapped function before it")
    inputs, internal, depths, bounds, positions = [], {tname, fname}, [], [], []
    for pos, x4 in fargs:
        lay = layers.get(x4)
        if isinstance(lay, ArrayOverlapLayer):
            olayer, oname = lay, x4
        else:
            ds = deps.get(x4, set())
            if len(ds) != 1 or not x4.startswith("getitem-"):
                return Fallback(fname, "an argument of the mapped function is not an overlap")
            (oname,) = ds
            olayer = layers.get(oname)
            if not isinstance(olayer, ArrayOverlapLayer):
                return Fallback(fname, "an argument of the mapped function is not an overlap")
            internal.add(x4)
        internal.add(oname)
        x2 = olayer.name
        odepth = dict(olayer.axes)
        nonnone = [ax for ax, b in boundary.items() if b != "none" and odepth.get(ax, 0)]
        if len(fargs) > 1 and nonnone:
            return Fallback(fname, "map_overlap on several arrays with a padded boundary")
        if nonnone:
            found = _find_padding_input(deps, metas, x2, metas[tname].shape)
            if found is None:
                return Fallback(oname, "boundary padding layers not recognised")
            x1, pad = found
            internal |= pad
        else:
            x1 = x2
        x, rech = follow_rechunk(deps, layers, metas, x1)
        internal |= rech
        if metas.get(x) is None:
            return Fallback(x, "input array's shape/chunks are unknown")
        inputs.append(x)
        positions.append(pos)
        dd, bb = {}, {}
        for ax in range(metas[tname].ndim):
            d = odepth.get(ax, 0)
            dd[ax] = tuple(d) if isinstance(d, tuple) else (int(d), int(d))
            bb[ax] = boundary.get(ax, "none") if len(fargs) == 1 else "none"
        if len(fargs) == 1:
            td = {ax: (tuple(v) if isinstance(v, tuple) else (v, v)) for ax, v in depth.items()}
            if any(td.get(ax, (0, 0)) != dd[ax] for ax in dd):
                return Fallback(tname, "trim depth differs from overlap depth")
        depths.append(dd)
        bounds.append(bb)
    meta = metas[tname]
    label = _prefix(fname)
    return StageSpec(
        name=tname, kind="overlap", inputs=inputs, meta=meta, internal=internal, depth=depths,
        boundary=bounds, func_eval=feval, trim_eval=teval, func_positions=positions,
        kernel=kernel_call(flayer) if len(fargs) == 1 else None, label=label,
    )


def not_plain(metas: dict, names) -> str | None:
    """Why arrays whose blocks are not plain numpy arrays cannot be swept, or ``None``.

    The sweep assembles rows, pads and buffers planes as numpy arrays: a masked
    array would lose its mask, a sparse or GPU array its type.  Such arrays are
    left to dask, which keeps their type.
    """
    for n in names:
        m = metas.get(n)
        if m is not None and not m.plain:
            kind = {"numpy.ma.MaskedArray": "masked arrays (numpy.ma.MaskedArray)"}.get(
                m.chunk_type, m.chunk_type)
            return (f"blocks of {n!r} are {kind}, not plain numpy arrays: the sweep's "
                    "buffers would drop their type, so dask keeps them")
    return None


def _elementwise(hlg, metas, name) -> StageSpec | None:
    layer = hlg.layers[name]
    if not is_simple_blockwise(layer) or trim_params(layer) is not None:
        return None
    if name.startswith("store-map-"):
        return None
    meta = metas.get(name)
    if meta is None:
        return None
    ev = BlockwiseEval(layer)
    args = ev.array_args()
    if not args:
        return None  # a root (zeros, random…): a source, not a stage
    for _, a in args:
        m = metas.get(a)
        if m is None or m.chunks != meta.chunks:
            return None
    return StageSpec(
        name=name, kind="elementwise", inputs=[a for _, a in args], meta=meta, func_eval=ev,
        func_positions=[p for p, _ in args], label=_prefix(name),
    )


def find_regions(hlg: HighLevelGraph, keys: Iterable) -> tuple[list[Region], list[Fallback]]:
    """Recognised regions of ``hlg`` and the reasons for what was refused."""
    layers, deps = hlg.layers, hlg.dependencies
    metas = {name: array_meta(layer) for name, layer in layers.items()}
    fallbacks: list[Fallback] = []
    stages: dict[str, StageSpec] = {}
    for name, layer in layers.items():
        if trim_params(layer) is not None:
            res = _overlap_group(hlg, metas, name)
            why = None if isinstance(res, Fallback) else not_plain(metas, [name, *res.inputs])
            if why:
                res = Fallback(name, why)
            if isinstance(res, Fallback):
                fallbacks.append(res)
            else:
                stages[name] = res
    # padded sliding windows reduced over their window axes (xarray's rolling): rolling.py
    windows, why_not = find_windows(hlg, metas, set().union(*(s.internal for s in stages.values())))
    for name, spec in windows.items():
        why = not_plain(metas, [name, *spec.inputs])
        if why:
            fallbacks.append(Fallback(name, why))
        else:
            stages[name] = spec
    fallbacks.extend(why_not)
    stores = [n for n, lay in layers.items()
              if n.startswith("store-map-") and is_simple_blockwise(lay)
              and not returns_stored(lay)]
    if not stages:
        overlaps = [n for n, lay in layers.items() if isinstance(lay, ArrayOverlapLayer)]
        if overlaps and not fallbacks:
            fallbacks.append(Fallback(overlaps[0], "overlap without trim (trim=False) is not swept"))
        if not stores:
            return [], fallbacks + unswept(hlg, [], fallbacks)
    internal = set().union(*(s.internal for s in stages.values()))
    for name in layers:
        if name in stages or name in internal:
            continue
        spec = _elementwise(hlg, metas, name)
        why = None if spec is None else not_plain(metas, [name, *spec.inputs])
        if why:
            fallbacks.append(Fallback(name, why))
        elif spec is not None:
            stages[name] = spec
        elif name.startswith("rechunk-") and metas.get(name) is not None:
            src, rech = follow_rechunk(deps, layers, metas, name)
            if src != name and metas.get(src) and metas[src].shape == metas[name].shape \
                    and not not_plain(metas, [name, src]):
                stages[name] = StageSpec(
                    name=name, kind="rechunk", inputs=[src], meta=metas[name],
                    internal=rech - {name}, label="rechunk",
                )

    # connected components over recognised stages
    parent = {n: n for n in stages}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n, s in stages.items():
        for i in s.inputs:
            if i in stages:
                parent[find(n)] = find(i)
    comps: dict[str, list[str]] = {}
    for n in stages:
        comps.setdefault(find(n), []).append(n)

    # who uses each layer
    users: dict[str, set[str]] = {}
    for n, ds in deps.items():
        for d in ds:
            users.setdefault(d, set()).add(n)
    key_layers: dict[str, int] = {}
    for k in flatten_keys(keys):
        nm = k[0] if isinstance(k, tuple) else k
        key_layers[nm] = key_layers.get(nm, 0) + 1

    # Regions: connected stages with a window; without one, only what is written to a
    # store (a copy or a threshold written to a file streams read -> write, in disk order)
    written = {}
    for u in stores:
        arrays = BlockwiseEval(layers[u]).array_args()
        if len(arrays) == 1:
            written[u] = arrays[0][1]
    candidates = [members for members in comps.values()
                  if any(stages[m].kind in ("overlap", "window") for m in members)
                  or any(m in written.values() for m in members)]
    copied = {m for m in written.values()
              if m not in stages and metas.get(m) is not None and not m.startswith("store-map-")}

    regions = []
    for m in sorted(copied):  # a source written as it is: a copy, read -> write
        if all(n == 1 for n in metas[m].numblocks):
            continue  # one block: nothing to stream
        if not_plain(metas, [m]):
            fallbacks.append(Fallback(m, not_plain(metas, [m])))
            continue
        if isinstance(make_reader(hlg, m, metas[m].numblocks, 0), ExternalReader):
            fallbacks.append(Fallback(m, "a store of blocks that dask computes (not a read a "
                                         "sweep step can do itself): nothing to stream",
                                      kind="copy"))
            continue
        regions.append(Region(stages={}, sources=[m], outputs=[],
                              stores={u: w for u, w in written.items() if w == m},
                              extra_users={m: True}, ndim=metas[m].ndim))
    for members in candidates:
        mset = set(members)
        absorbed = set().union(*(stages[m].internal for m in members)) | mset
        region = Region(stages={m: stages[m] for m in members}, sources=[], outputs=[],
                        ndim=stages[members[0]].meta.ndim)
        bad = None
        for m in members:
            for i in stages[m].inputs:
                if i not in mset and i not in region.sources:
                    region.sources.append(i)
        shapes = {stages[m].meta.shape for m in members} | {
            metas[s].shape for s in region.sources if metas.get(s)
        }
        if len(shapes) != 1 or any(metas.get(s) is None for s in region.sources):
            bad = "arrays of different shapes (broadcasting) inside one pipeline"
        bad = not_plain(metas, region.sources) or bad
        for layer_name in absorbed - mset:
            outside = users.get(layer_name, set()) - absorbed
            if outside or layer_name in key_layers:
                bad = f"intermediate {layer_name!r} is also used elsewhere"
        for m in members:
            outside = users.get(m, set()) - absorbed
            nblocks = 1
            for c in stages[m].meta.chunks:
                nblocks *= len(c)
            if m in key_layers and key_layers[m] != nblocks:
                bad = f"only part of {m!r} is requested"
            if outside or m in key_layers:
                region.outputs.append(m)
                others = False
                for u in outside:
                    if u in stores:
                        region.stores[u] = m
                    else:
                        others = True
                region.extra_users[m] = others or m in key_layers
        if bad:
            fallbacks.append(Fallback(members[0], bad))
            continue
        regions.append(region)
    return regions, fallbacks + unswept(hlg, regions, fallbacks)
