"""In-plane tiling, when one row of chunks does not fit the budget.

A sweep holds whole planes.  With 3D chunks (say 64³) a step is at least one
chunk row deep, so large planes can exceed the budget.  Then the volume is cut
in-plane into tiles on chunk boundaries; each tile is swept on its own, with a
halo ``H`` (the sum of the stages' in-plane depths) of real neighbouring data::

      ┌────────┬────────┐      each tile reads the chunks that meet
      │ tile 0 ▒▒      │      tile + halo (▒): chunks in a halo are
      │        ▒▒      │      read by two tiles (four at corners);
      ├────────┼────────┤      the tiling with the fewest reads that
      │      ▒▒│ tile 3 │      fits the budget is chosen, and explain()
      └────────┴────────┘      prints the predicted reads per chunk.

Exact for block-invariant kernels (their output within ``H`` of a tile's inner
edge is wrong, and it is cut away) and for pure elementwise stages (numpy
ufuncs, ``astype``..., evaluated on any slab).  An opaque stage
(:class:`Blocked`: dask's own blocks) is tiled on its block boundaries: a tile
evaluates the whole blocks of its interior, each with its own halo from the
tile's, and fills its halo with their edges, so no later stage may read across it (a window
after it would need whole neighbouring blocks); then its floor is one block, not
one row of blocks.  So tiling is offered for regions made of :class:`Kernel`,
:class:`Identity`, :class:`Pointwise`, :class:`Blocked` and inline
:class:`Source` stages.  Outputs
written by the sweep (``to_zarr`` / ``store``) are cut to each tile's interior;
outputs handed back to dask (``compute``, ``persist``) need tile cuts on their
own block boundaries, so each block is taken from the one tile holding it.
Tiles run one after the other, so memory is one tile's sweep.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from dask_sweep.errors import BudgetError
from dask_sweep.passes.slabs import choose_steps
from dask_sweep.plan.ir import Blocked, Identity, Kernel, Plan, Pointwise, Running, Source


def _met(chunks, s: int, e: int) -> range:
    """The chunks (of one axis' ``chunks``) that meet ``[s, e)``."""
    b = np.cumsum((0, *chunks)).tolist()
    return range(max(i for i in range(len(chunks)) if b[i] <= s),
                 min(i for i in range(1, len(chunks) + 1) if b[i] >= e))


class TileReader:
    """Read only the chunks of a row that meet an in-plane region, and cut the region."""

    def __init__(self, inner, chunks, axis: int, region) -> None:
        self.inner = inner
        self.axis = axis
        self.region = [r for ax, r in enumerate(region) if ax != axis]
        if getattr(inner, "free", False):  # reads the tile's own region, any planes
            self.free = True
            self.what = getattr(inner, "what", None) or "by their byte ranges in the chunk files"
        self.made = getattr(inner, "made", False)
        if getattr(inner, "read_temps", None) is not None:  # chunk parts cut while reading
            self.read_temps = inner.read_temps
        # a zarr array read a step's rows per call reads exactly the tile's region
        self.reads_rows = getattr(inner, "reads_rows", False)
        self.carries = getattr(inner, "carries", False)
        self.tasks = getattr(inner, "tasks", None)
        self.blocks, self.cut = [], []
        for ax, c in enumerate(chunks):
            b = np.cumsum((0, *c)).tolist()
            if ax == axis:
                self.blocks.append((0, len(c)))
                self.cut.append(slice(None))
                continue
            s, e = region[ax]
            q = _met(c, s, e)
            q0, q1 = q.start, q.stop
            self.blocks.append((q0, q1))
            self.cut.append(slice(s - b[q0], e - b[q0]))

    def read_planes(self, a: int, b: int) -> np.ndarray:
        return self.inner.read_planes(a, b, self.region)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of the tile's region, in one call (``reads_rows`` readers):
        zarr decodes the chunks met one by one and keeps only the region."""
        return self.inner.read_rows(r0, r1, region=self.region)

    def layer_of(self, key) -> str:
        return self.inner.layer_of(key)

    def row_keys(self, r: int) -> list[tuple]:
        keep = []
        for k in self.inner.row_keys(r):
            idx = k[1:]
            if all(lo <= q < hi for ax, (q, (lo, hi)) in enumerate(zip(idx, self.blocks))
                   if ax != self.axis):
                keep.append(k)
        return keep

    def read_row(self, r: int, externals: dict, memo: dict | None = None):
        if self.carries:
            row, memo = self.inner.read_row(r, externals, memo, blocks=self.blocks)
        else:
            row = self.inner.read_row(r, externals, blocks=self.blocks)
        row = np.ascontiguousarray(row[tuple(self.cut)])
        return (row, memo) if self.carries else row



class TileWriter:
    """Write the interior of a tile (its halo cut away) at the tile's place."""

    def __init__(self, inner, cut, origin) -> None:
        self.inner = inner
        self.cut = cut
        self.origin = origin
        self.piece = getattr(inner, "piece", None)

    def temps_of(self, nbytes: int) -> int:
        """What a write holds beyond the planes (the plan counts it): the interior copied
        contiguous (unless the inner writer takes views), then the inner writer's own
        temporaries."""
        inner = getattr(self.inner, "temps_of", None)
        own = inner(nbytes) if inner else getattr(self.inner, "write_temps", 0.0) * nbytes
        return int(own) + (0 if getattr(self.inner, "takes_views", False) else nbytes)

    def write_planes(self, a: int, planes) -> None:
        interior = planes[self.cut]
        if not getattr(self.inner, "takes_views", False):  # one copy, not one per chunk
            interior = np.ascontiguousarray(interior)
        self.inner.write_planes(a, interior, origin=self.origin)


def _inplane_depth(st, axis: int) -> list[int]:
    """Per axis, how far across its inputs' planes stage ``st`` reads (0 on ``axis``)."""
    ndim = len(st.shape)
    if isinstance(st, Kernel):
        return [st.depth[ax] if ax != axis else 0 for ax in range(ndim)]
    if isinstance(st, Blocked):
        return [max((max(d[ax]) for d in st.depth), default=0) if ax != axis else 0
                for ax in range(ndim)]
    return [0] * ndim


def _periodic_inplane(st, axis: int) -> list[bool]:
    """Per in-plane axis that ``st`` reads across, whether its boundary there is periodic."""
    if isinstance(st, Kernel):
        bounds = [st.boundary]
    elif isinstance(st, Blocked):
        bounds = list(st.boundary)
    else:
        return []
    depth = _inplane_depth(st, axis)
    return [isinstance(b[ax], str) and b[ax] == "periodic"
            for b in bounds for ax in range(len(depth)) if ax != axis and depth[ax]]


def on_blocks(plan: Plan) -> Plan:
    """``plan`` with each running-sum stage on dask's blocks again (tiles cut its planes,
    and its sums run along whole planes; :class:`~dask_sweep.plan.ir.Running`)."""
    if not any(isinstance(st, Running) for st in plan.stages):
        return plan
    swap = {st.note: st.blocked_note for st in plan.stages if isinstance(st, Running)}
    stages = tuple(st.blocked if isinstance(st, Running) else st for st in plan.stages)
    return replace(plan, stages=stages, notes=tuple(swap.get(n, n) for n in plan.notes))


def tileable(plan: Plan) -> str:
    """Why ``plan`` cannot be tiled in-plane ('' when it can)."""
    blocked = set()  # stages downstream of (or equal to) an opaque stage
    for j, st in enumerate(plan.stages):
        if isinstance(st, Source):
            if st.external or not st.chunks:
                return "a source is not read inside the slab tasks"
        elif not isinstance(st, (Kernel, Identity, Pointwise, Blocked)):
            return f"stage {st.label!r} cannot be cut in-plane"
        if any(_periodic_inplane(st, plan.axis)):
            # a tile at a face would wrap around its own far side, not the volume's
            return f"stage {st.label!r} wraps around in-plane (a periodic boundary)"
        after = [i for i in st.inputs if i in blocked]
        if after and any(_inplane_depth(st, plan.axis)):
            # a tile evaluates an opaque stage's whole blocks only: its halo holds no
            # values a window could read (a whole neighbouring block would be needed)
            return (f"stage {st.label!r} reads across the in-plane blocks of "
                    f"{plan.stages[after[0]].label!r}, which keeps dask's blocks")
        if isinstance(st, Blocked) or after:
            blocked.add(j)
    if not plan.outputs:
        return "the region has no output"
    for o in plan.outputs:
        if o.sink is not None and not hasattr(o.sink, "write_planes"):
            return f"output {o.name!r} is written block by block (tiling needs a plane writer)"
        if getattr(getattr(o.sink, "target", None), "whole_planes_only", False):
            return f"output {o.name!r} takes whole planes only"
    return ""


def _read_source(plan: Plan) -> Source:
    """The source whose chunks the tiles are cut on and counted: the first read from
    storage (a constant made on demand reads nothing)."""
    sources = [st for st in plan.stages if isinstance(st, Source)]
    return next((st for st in sources if not getattr(st.reader, "made", False)), sources[0])


def _blocks_fit(plan: Plan, tiles) -> bool:
    """Whether every in-memory output block, and every block of an opaque stage, lies
    inside one tile's interior."""
    axis = plan.axis
    cuts = [{s for region in tiles for s in region[ax]} for ax in range(len(tiles[0]))]
    grids = [o.chunks for o in plan.outputs if o.sink is None]
    grids += [st.chunks for st in plan.stages if isinstance(st, Blocked)]
    for chunks in grids:
        for ax, c in enumerate(chunks):
            if ax != axis and not cuts[ax] <= set(np.cumsum((0, *c)).tolist()):
                return False
    return True


def _cuts(bounds: list[int], n: int) -> list[int]:
    nb = len(bounds) - 1
    return sorted({bounds[round(k * nb / n)] for k in range(n + 1)})


def _tiles(plan: Plan, counts) -> list[tuple]:
    """Interior regions ``[(s, e) per axis]`` for ``counts`` tiles per in-plane axis."""
    axis = plan.axis
    src = _read_source(plan)
    per_axis = []
    for ax, c in enumerate(src.chunks):
        if ax == axis:
            per_axis.append([(0, plan.extent)])
            continue
        b = np.cumsum((0, *c)).tolist()
        cuts = _cuts(b, counts[ax])
        per_axis.append(list(zip(cuts[:-1], cuts[1:])))
    return list(itertools.product(*per_axis))


def _plane_bytes(st: Source, hreg, axis: int) -> int:
    """Bytes source ``st`` reads per plane for a tile spanning ``hreg`` (halo included):
    a plane reader says (a halo's rows only), else the whole chunks it meets."""
    if getattr(st.reader, "made", False):
        return 0
    exact = getattr(st.reader, "region_bytes", None)
    if exact is not None:
        return exact([r for ax, r in enumerate(hreg) if ax != axis])
    covered = 1
    for ax, (s, e) in enumerate(hreg):
        if ax != axis:
            covered *= sum(st.chunks[ax][q] for q in _met(st.chunks[ax], s, e))
    return covered * np.dtype(st.dtype).itemsize


def _predicted_reads(plan: Plan, tiles, halo) -> tuple[int, int, float]:
    """(cost, max reads of one chunk, mean) for a tiling; the cost is the chunk reads, or
    for a plane reader the bytes read per plane (it reads a halo's rows only)."""
    axis = plan.axis
    src = _read_source(plan)
    counts: dict = {}
    shape = plan.stages[0].shape
    by_bytes = getattr(src.reader, "region_bytes", None) is not None
    cost = 0
    for region in tiles:
        hreg = [(max(0, s - halo[ax]), min(shape[ax], e + halo[ax])) if ax != axis else (s, e)
                for ax, (s, e) in enumerate(region)]
        if by_bytes:
            cost += _plane_bytes(src, hreg, axis)
        ranges = [range(len(c)) if ax == axis else _met(c, *hreg[ax])
                  for ax, c in enumerate(src.chunks)]
        for idx in itertools.product(*ranges):
            counts[idx] = counts.get(idx, 0) + 1
    vals = list(counts.values())
    return cost if by_bytes else sum(vals), max(vals), sum(vals) / len(vals)


def _tile_plan(plan: Plan, region, halo) -> Plan:
    axis = plan.axis
    shape0 = plan.stages[0].shape
    hreg, edges, cut, origin = [], [], [slice(None)] * len(shape0), [0] * len(shape0)
    for ax, (s, e) in enumerate(region):
        if ax == axis:
            hreg.append((0, plan.extent))
            edges.append((True, True))
            continue
        hs, he = max(0, s - halo[ax]), min(shape0[ax], e + halo[ax])
        hreg.append((hs, he))
        edges.append((hs == 0, he == shape0[ax]))
        cut[ax] = slice(s - hs, e - hs)
        origin[ax] = s
    shape = tuple(e - s for s, e in hreg)
    stages = []
    for st in plan.stages:
        if isinstance(st, Source):
            reader = TileReader(st.reader, st.chunks, axis, hreg)
            per_plane = _plane_bytes(st, hreg, axis)
            stages.append(replace(st, shape=shape, reader=reader, bytes_per_row=tuple(
                c * per_plane for c in np.diff(st.row_bounds).tolist())))
        elif isinstance(st, Kernel):
            stages.append(replace(st, shape=shape, edges=tuple(edges)))
        elif isinstance(st, Blocked):
            stages.append(replace(st, shape=shape, origin=tuple(s for s, _ in hreg),
                                  interior=tuple(region)))
        else:
            stages.append(replace(st, shape=shape))
    outputs = tuple(
        replace(o, sink=TileWriter(o.sink, tuple(cut), tuple(origin))) if o.sink is not None
        else o
        for o in plan.outputs
    )
    info = dict(plan.info)
    # where this tile's planes start in the whole array, and its interior
    info["tile_offset"] = tuple(s if ax != axis else 0 for ax, (s, _) in enumerate(hreg))
    info["tile_region"] = tuple(region)
    return replace(plan, stages=tuple(stages), outputs=outputs, info=info)


def _alike(tp: Plan) -> tuple:
    """What sizing a tile's plan depends on: tiles with the same key get the same steps,
    rings and trace (the dry run sees shapes, faces and source rows, not where a tile is)."""
    def faces(st) -> tuple | None:  # a face matters where a kernel pads it in-plane
        if getattr(st, "edges", None) is None:
            return None
        return tuple(e if ax != st.sweep_axis and d and st.boundary[ax] != "none" else None
                     for ax, (e, d) in enumerate(zip(st.edges, st.depth)))

    def stage(st) -> tuple:
        return (type(st).__name__, st.shape, str(st.dtype), st.inputs, faces(st),
                getattr(st, "row_bounds", None), getattr(st, "bytes_per_row", None),
                getattr(st, "chunks", None))

    return (tuple(stage(st) for st in tp.stages),
            tuple((o.stage, o.chunks, o.sink is None) for o in tp.outputs))


def tile(plan: Plan, target_slab_bytes: int):
    """Sub-plans (with traces) of the cheapest in-plane tiling that fits, or raise.

    Raises
    ------
    BudgetError
        When no tiling fits (the message names the best attempt).
    """
    axis = plan.axis
    ndim = len(plan.stages[0].shape)
    halo = [0] * ndim
    for st in plan.stages:
        for ax, d in enumerate(_inplane_depth(st, axis)):
            halo[ax] += d
    src = _read_source(plan)
    choices = [range(1, len(src.chunks[ax]) + 1) if ax != axis else [1] for ax in range(ndim)]
    candidates = []
    for counts in itertools.product(*choices):
        if all(c == 1 for c in counts):
            continue
        tiles = _tiles(plan, counts)
        if not _blocks_fit(plan, tiles):
            continue
        total, mx, mean = _predicted_reads(plan, tiles, halo)
        candidates.append((total, len(tiles), counts, tiles, mx, mean))
    candidates.sort(key=lambda c: (c[0], c[1]))
    last_error = None
    def area(region):
        return np.prod([e - s for s, e in region])

    # Tiles alike (see _alike) are sized once, refusals too: tilings share tile shapes,
    # and most candidates tried before one fits are refused (one-plane steps first,
    # whose replay stops where it passes the budget; only the last refusal is quoted,
    # with its whole floor).
    sized: dict = {}
    refused: list[Plan] = []

    def size(tp: Plan):
        key = _alike(tp)
        if key not in sized:
            try:
                sized[key] = choose_steps(tp, target_slab_bytes, floor_first=True, exact=False)
            except BudgetError as e:
                sized[key] = e
        if isinstance(sized[key], BudgetError):
            refused.append(tp)
            raise sized[key]
        done, trace = sized[key]
        if done.stages is tp.stages:
            return done, trace
        return replace(tp, steps=done.steps, rings=done.rings, segments=done.segments), trace

    for total, _, counts, tiles, mx, mean in candidates:
        try:
            # the largest tile first: if it does not fit, the tiling does not
            order = sorted(range(len(tiles)), key=lambda i: -area(tiles[i]))
            planned = {i: size(_tile_plan(plan, tiles[i], halo)) for i in order}
            out = [planned[i] for i in range(len(tiles))]
        except BudgetError as e:
            last_error = e
            continue
        input_bytes = sum(sum(st.bytes_per_row) for st in plan.stages if isinstance(st, Source))
        info = {"tiles": len(tiles), "counts": counts, "halo": tuple(halo),
                "reads_max": mx, "reads_mean": mean, "chunk_reads": total,
                "input_bytes": input_bytes,
                "bytes_read": sum(t.bytes_read for _, t in out),
                "peak": max(t.peak for _, t in out)}
        return [(p.with_info(tiling=info), t) for p, t in out]
    if last_error is None:
        raise BudgetError(
            "in-plane tiling cannot help: the source's chunks span whole planes (or no tiling "
            "keeps the output blocks whole), so a tile is never smaller than a row of chunks"
        )
    if refused:
        try:
            choose_steps(refused[-1], target_slab_bytes, floor_first=True)
        except BudgetError as e:
            last_error = e
    raise BudgetError(f"no in-plane tiling fits either; the best one tried: {last_error}",
                      stage=last_error.stage, projected=last_error.projected,
                      budget=last_error.budget)
