"""Multi-pass algorithms in the DSL: connected components and the distance transform.

Both have the shape of a reduction followed by an apply, except that their
"scalar" is a set of per-slab *tables* and the apply needs the slab it was
computed for::

    level p:    x ─► (stages) ─► input ──► table pass (its own sweep over the
                                            algorithm's slabs; label: backward)
                                                  │ tables (luts / carry planes)
    level p+1:  algorithm output = a source ◄─────┘  slab s: input slab s again,
                      │                              local label / distances (or the
                      │                              local labels pass 1 kept),
                      └─► later stages, sinks        through table s

The input reaches both passes in one of two ways, decided at compile time:

* **computed per slab** (:class:`StreamSlabs`) when it is sources and pointwise
  stages: no halo, so each pass reads the sources once, and nothing is stored;
* **stored once** (:class:`SpillStore`) when it has windowed stages, which per
  slab would recompute (and re-read) their halos in both passes: the sweep of
  its level writes it to a Zarr array under dask's temporary directory, both
  passes read it back, and it is removed when the run ends.

The slab work itself is :mod:`dask_sweep.multipass`'s (``label``: local scipy
labels, face pairs, link chain, numbering; EDT: the up/down scans and the
in-plane envelopes), so results equal scipy's.

Planning happens at compile time, from the budget, before any I/O: the
algorithm's slabs (whole rows of the input's grid), its footprints, its
tables' share of the budget (kept in memory up to what the passes leave,
spilled to ``.npy`` files beyond), and what reading its output holds during
the next pass (counted in that pass's plan).
"""

from __future__ import annotations

import bisect
import contextvars
import copy
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_sweep.config import temporary_directory
from dask_sweep.dsl.core import Scalar, Stream, Tables
from dask_sweep.dsl.lower import lower_streams, walk_streams
from dask_sweep.dsl.sources import Rows
from dask_sweep.errors import BudgetError, PlanError
from dask_sweep.multipass import edt as E
from dask_sweep.multipass import label as L
from dask_sweep.multipass import label_kernels as LK
from dask_sweep.multipass import spill as _spill
from dask_sweep.passes.tables import label_notes, plan_edt_stream, plan_label_stream
from dask_sweep.plan.ir import Source, Stage
from dask_sweep.runtime.executor import compute_stage
from dask_sweep.runtime.ring import take
from dask_sweep.utils import format_bytes

__all__ = ["StreamSlabs", "Tables", "distance_transform_edt", "label"]

#: ``{Tables.uid: prepared algorithm}`` of the compile in progress.  Each compile
#: prepares its own copies (plan, stored input), so a graph made earlier, or a
#: compile in another thread, never sees another compile's plan.
PREPARED: contextvars.ContextVar[dict] = contextvars.ContextVar("dsl_prepared")


def prepared(uid: int) -> _Algorithm:
    """The algorithm of tables ``uid`` as prepared by the compile in progress."""
    try:
        return PREPARED.get()[uid]
    except (LookupError, KeyError):  # pragma: no cover - compile order guarantees it
        raise RuntimeError(
            "dask_sweep.dsl: an algorithm's output was lowered before its table pass was "
            "planned"
        ) from None


# --------------------------------------------------------------------------- input slabs


class StreamSlabs:
    """Planes ``[a, b)`` of a stream computed on their own, halos recomputed.

    Each stage runs once per request over the hull of what its consumers need
    (the request widened by the windows along every path), with the same
    ``compute_planes`` the sweep uses, so the planes are the sweep's bits.
    Intermediates are dropped after their last consumer.

    Parameters
    ----------
    stages
        The stream's lowered stages, topologically ordered (sources first).
    root
        Index of the stream's stage.
    axis
        The sweep axis.
    threads
        Threads for the stages' in-plane work.
    """

    def __init__(self, stages: list[Stage], root: int, axis: int, threads: int) -> None:
        self.stages = list(stages)
        self.root = root
        self.axis = axis
        self.threads = threads
        self.n = stages[root].shape[axis]

    def bind(self, env: dict) -> StreamSlabs:
        """The evaluator with the scalars of earlier passes bound into its stages."""
        st = [s.bind(env) if hasattr(s, "bind") else s for s in self.stages]
        st = [_bind_source(s, env) if isinstance(s, Source) else s for s in st]
        return StreamSlabs(st, self.root, self.axis, self.threads)

    def needs(self, a: int, b: int) -> list[tuple[int, int] | None]:
        """Per stage, the planes computed for a request ``[a, b)`` (None: not needed)."""
        need: list[tuple[int, int] | None] = [None] * len(self.stages)
        need[self.root] = (a, b)
        for j in range(self.root, -1, -1):
            if need[j] is None:
                continue
            ja, jb = need[j]
            for pos, i in enumerate(self.stages[j].inputs):
                lo, hi = self.stages[j].window(pos)
                r = (max(0, ja - lo), min(self.n, jb + hi))
                old = need[i]
                need[i] = r if old is None else (min(old[0], r[0]), max(old[1], r[1]))
        return need

    def lead(self) -> tuple[int, int]:
        """Planes of the sources beyond a request that the stream reaches (behind, ahead)."""
        mid = self.n // 2
        need = self.needs(mid, mid + 1)
        lo = max((mid - r[0] for r in need if r is not None), default=0)
        hi = max((r[1] - mid - 1 for r in need if r is not None), default=0)
        return lo, hi

    def read_bytes(self, a: int, b: int) -> int:
        """Bytes the sources read for a request ``[a, b)`` (whole rows)."""
        total = 0
        for j, r in enumerate(self.needs(a, b)):
            st = self.stages[j]
            if r is None or not isinstance(st, Source):
                continue
            r0, r1 = _rows(st.row_bounds, *r)
            total += sum(st.bytes_per_row[r0:r1])
        return total

    def cost(self) -> tuple[float, int]:
        """``(bytes per voxel of a request, fixed bytes)`` held while it is computed.

        Stage ``j`` computes the request's planes plus its hull beyond them (the
        windows downstream of it), holding its output and its temporaries (a
        kernel's ``temps``, one for a pointwise expression; a source's rows and
        their concatenation): the per-voxel part is summed over the stages, the
        hull planes give the fixed part.  An upper bound: intermediates are
        dropped after their last consumer.
        """
        mid = self.n // 2
        need = self.needs(mid, mid + 1)
        plane = 1
        for d, m in enumerate(self.stages[self.root].shape):
            if d != self.axis:
                plane *= m
        per_voxel = 0.0
        fixed = 0.0
        for st, r in zip(self.stages[: self.root + 1], need):
            if r is None:
                continue
            item = np.dtype(st.dtype).itemsize
            c = (
                2.0 * item
                if isinstance(st, Source)
                else item * (1 + float(getattr(st, "temps", 1.0)))
            )
            per_voxel += c
            fixed += c * (r[1] - r[0] - 1) * plane
            if isinstance(st, Source) and isinstance(st.reader, AlgoRows):
                # another algorithm's output, computed slab by slab inside the request
                fixed += st.reader.algo.held_bytes()
        return per_voxel, int(math.ceil(fixed))

    def planes(self, a: int, b: int, counter: list | None = None) -> np.ndarray:
        """The stream's planes ``[a, b)`` along the sweep axis.

        ``counter``: a list the bytes read by the sources are appended to (the
        readers count them too, but not per request when requests overlap).
        """
        need = self.needs(a, b)
        users = [0] * len(self.stages)
        for j, r in enumerate(need):
            if r is not None:
                for i in self.stages[j].inputs:
                    users[i] += 1
        vals: dict[int, np.ndarray] = {}
        for j in range(self.root + 1):
            if need[j] is None:
                continue
            st = self.stages[j]
            ja, jb = need[j]
            if isinstance(st, Source):
                vals[j], nbytes = _read(st, ja, jb, self.axis)
                if counter is not None:
                    counter.append(nbytes)
                continue
            ins = []
            for pos, i in enumerate(st.inputs):
                lo, hi = st.window(pos)
                ia, ib = max(0, ja - lo), min(self.n, jb + hi)
                ins.append(take(vals[i], ia - need[i][0], ib - need[i][0], self.axis))
            vals[j] = compute_stage(st, ja, jb, self.axis, ins, self.threads, False)
            del ins
            for i in st.inputs:
                users[i] -= 1
                if users[i] == 0:
                    vals.pop(i, None)
        return vals[self.root]


def _bind_source(st: Source, env: dict) -> Source:
    if isinstance(st.reader, AlgoRows):
        # read per slab, in any order and from several threads: nothing computed ahead
        return dataclasses.replace(st, reader=st.reader.bind(env, ahead=0))
    if hasattr(st.reader, "bind"):
        return dataclasses.replace(st, reader=st.reader.bind(env))
    return st


def _rows(rb: tuple[int, ...], a: int, b: int) -> tuple[int, int]:
    """The rows of ``rb`` (boundaries) that cover ``[a, b)``."""
    r0 = bisect.bisect_right(rb, a) - 1
    r1 = bisect.bisect_left(rb, b)
    return max(0, r0), max(r0 + 1, r1)


def _read(st: Source, a: int, b: int, axis: int) -> tuple[np.ndarray, int]:
    """Planes ``[a, b)`` of a source (whole rows read) and the bytes read."""
    r0, r1 = _rows(st.row_bounds, a, b)
    parts = [np.asarray(st.reader.read_row(r, {})) for r in range(r0, r1)]
    nbytes = sum(p.nbytes for p in parts)
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
    del parts
    return take(x, a - st.row_bounds[r0], b - st.row_bounds[r0], axis), nbytes


class _SlabIn:
    """One slab of the input, in :class:`~dask_sweep.multipass.SlabInput` form (``read()``).

    ``counter`` collects the bytes its reads took (for the per-slab report).
    """

    inline = True

    def __init__(self, slabs: StreamSlabs, a: int, b: int, counter: list | None = None) -> None:
        self.slabs, self.a, self.b = slabs, a, b
        self.counter = counter

    def read(self, externals: Any = ()) -> np.ndarray:
        return self.slabs.planes(self.a, self.b, self.counter)


# --------------------------------------------------------------------------- tables


class _Prepared:
    """An algorithm planned for one compile: its slabs, plan and input evaluator."""

    def __init__(self, plan: Any, slabs_in: StreamSlabs, extra: dict) -> None:
        self.plan = plan
        self.slabs_in = slabs_in
        self.extra = extra


class _Algorithm:
    """What an algorithm tells the compiler and the runners (label and EDT below)."""

    name = "algorithm"
    prepared: _Prepared | None = None
    store: SpillStore | None = None  # the input, stored once when recomputing costs halos
    store_why = ""
    resident = 0  # bytes of earlier algorithms' tables held while this one runs
    keep_tables = True  # False: every table spilled (the reading pass needs the room)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    # -- planning
    def prepare(
        self,
        axis: int,
        settings: Any,
        share: float = 1.0,
        stores: dict | None = None,
        resident: int = 0,
        keep_tables: bool = True,
    ) -> _Algorithm:
        """A copy of the algorithm with its slabs planned for these settings (no I/O).

        ``share``: the fraction of the budget the slabs are sized for (the
        compiler lowers it when the pass reading the output does not fit).
        ``stores``: ``{id(stream): SpillStore}`` shared by the algorithms of one
        compile, so an input two algorithms read is stored once.
        ``resident``: bytes of earlier algorithms' tables, in memory meanwhile.
        ``keep_tables=False``: spill every table (the compiler's last resort when
        tables kept in memory leave a later pass too little room).
        """
        self = copy.copy(self)  # this compile's copy: the user's objects are never changed
        self.resident = resident
        self.keep_tables = keep_tables
        if axis != 0:
            raise PlanError(
                f"dask_sweep.dsl: {self.name}() sweeps along axis 0 (its slabs are whole "
                f"axis-0 rows); this pipeline runs along axis {axis}. Use axis=0."
            )
        order = walk_streams([self.stream])
        stages, index = lower_streams(order, axis, settings)
        slabs_in = StreamSlabs(stages, index[id(self.stream)], axis, settings.threads)
        self.store = None
        # Windows upstream: computing the input per slab would recompute (and re-read)
        # their halos in both passes.  Store it once instead, written by the sweep of
        # its level (rings, no halo work), and let both passes read it back.
        if slabs_in.lead() != (0, 0):
            slabs_in = self._stored(axis, settings, stores)
            self.store_why = "has windowed stages (their halos would be recomputed per slab)"
        slab_budget = max(1, int(settings.memory_limit * share) - resident)

        def plan_of(slabs_in):
            rows = _common_rows(slabs_in.stages, self.stream.shape[axis])
            return self._plan(rows, *slabs_in.cost(), settings, slab_budget)

        try:
            plan, extra = plan_of(slabs_in)
        except BudgetError:
            if self.store is not None:
                raise
            # The source's rows are too thick for a slab: store the input once in
            # thinner rows (reading a thick row per thin slab would re-read it, and
            # hold it, once per slab).
            rows = max(_common_rows(slabs_in.stages, self.stream.shape[axis]))
            slabs_in = self._stored(axis, settings, stores)
            self.store_why = f"comes in rows of {rows} planes, thicker than a slab can be"
            plan, extra = plan_of(slabs_in)
        self.prepared = _Prepared(plan, slabs_in, extra)
        return self

    def _stored(self, axis: int, settings: Any, stores: dict | None) -> StreamSlabs:
        """Store the input once (shared with the compile's other algorithms); its reader."""
        stores = {} if stores is None else stores
        if id(self.stream) not in stores:
            rows = _store_rows(self.stream, settings)
            stores[id(self.stream)] = SpillStore(self.stream.shape, self.stream.dtype, rows)
        self.store = stores[id(self.stream)]
        stored = Stream(
            "source",
            f"{self.stream.label} (stored)",
            (),
            self.stream.shape,
            self.stream.dtype,
            self.stream.vrange,
            source=SpillSpec(self.store),
        )
        stages, index = lower_streams([stored], axis, settings)
        return StreamSlabs(stages, index[id(stored)], axis, settings.threads)

    def _plan(self, chunks0, per_voxel, halo, settings, slab_budget):  # pragma: no cover
        raise NotImplementedError

    # -- the output stream's rows
    def row_bounds(self) -> tuple[int, ...]:
        if self.stream.shape[0] == 0:
            return (0,)  # no planes, no rows
        slabs = self.prepared.plan.slabs
        return tuple([0] + [b for _, b in slabs])

    def bytes_per_row(self) -> tuple[int, ...]:
        if self.stream.shape[0] == 0:
            return ()
        p = self.prepared
        return tuple(p.slabs_in.read_bytes(a, b) for a, b in p.plan.slabs)

    def params(self) -> tuple:  # pragma: no cover - abstract
        """What, besides its input, the output depends on (for graph keys)."""
        raise NotImplementedError

    def empty_tables(self) -> Any:  # pragma: no cover - abstract
        """The tables of an input with no planes (no slab is read)."""
        raise NotImplementedError

    def held_bytes(self) -> int:
        """Bytes reading the output holds beyond its planes: the slabs' work in flight.

        Its tables are counted apart (:meth:`kept_bytes`): they stay for the rest of
        the run, read or not.
        """
        return int(self.prepared.extra["held"])

    def kept_bytes(self) -> int:
        """Bytes of tables this algorithm keeps in memory (at most)."""
        return int(self.prepared.extra["reserve"])

    # -- running
    def tables(
        self, slabs_in: StreamSlabs, settings: Any, on_slab: Any = None
    ) -> Any:  # pragma: no cover - abstract
        """The tables and the spill directories; ``on_slab(s, bytes_read)`` after each slab."""
        raise NotImplementedError

    def apply(
        self, value: Any, s: int, a: int, b: int, counter: list
    ) -> np.ndarray:  # pragma: no cover - abstract
        """Output slab ``s`` = rows ``[a, b)``; bytes read are appended to ``counter``."""
        raise NotImplementedError


def _common_rows(stages: list[Stage], n: int) -> tuple[int, ...]:
    """Row heights on which every source of the input has a row boundary."""
    cuts = None
    for st in stages:
        if isinstance(st, Source):
            c = set(st.row_bounds)
            cuts = c if cuts is None else cuts & c
    bounds = sorted((cuts or {0, n}) | {0, n})
    return tuple(int(b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a) or (n,)


def _store_rows(stream: Stream, settings: Any) -> int:
    """Planes per chunk of a stored input: fine enough for any slab the budget allows."""
    plane = int(np.prod(stream.shape[1:], dtype=np.int64)) * stream.dtype.itemsize
    cap = min(settings.target_slab_bytes // 8, settings.memory_limit // 128)
    return int(max(1, min(stream.shape[0], cap // max(1, plane))))


class SpillStore:
    """An algorithm's input stored once: a Zarr array under dask's temporary directory.

    The path is chosen now (nothing is created: ``explain`` writes nothing); the
    array is created by the first write, by whichever process makes it, and
    removed when the run ends.  Only the path travels (picklable).
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, rows: int) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.chunks = (rows, *self.shape[1:])
        self.path = _spill.new_dir("dsl-input", ".zarr")
        self._z = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_z": None}

    def _array(self, mode: str):
        import zarr

        if self._z is None:
            if mode == "r":
                self._z = zarr.open_array(self.path, mode="r")
            else:
                self._z = zarr.open_array(
                    self.path, mode="a", shape=self.shape, chunks=self.chunks, dtype=self.dtype
                )
        return self._z

    def __setitem__(self, idx: Any, value: np.ndarray) -> None:
        self._array("a")[idx] = value

    def read(self, a: int, b: int) -> np.ndarray:
        return self._array("r")[a:b]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SpillSpec:
    """Source spec of a :class:`SpillStore` (rows: its chunk rows)."""

    kind = "stored"

    def __init__(self, store: SpillStore) -> None:
        self.store = store
        self.desc = f"stored once in {os.path.basename(store.path)}"

    def row_bounds(self, axis: int) -> tuple[int, ...]:
        n, r = self.store.shape[0], self.store.chunks[0]
        return tuple(sorted({*range(0, n, r), n}))

    def reader(self, axis: int) -> SpillRows:
        return SpillRows(self.store, self.row_bounds(axis))


class SpillRows(Rows):
    """Rows of a stored input (:class:`SpillStore`), counted like any source's."""

    def _read(self, r: int, a: int, b: int) -> np.ndarray:
        return self.data.read(a, b)


class _TableValue:
    """An algorithm's tables with the input evaluator bound to the run's scalars."""

    def __init__(self, tables: Any, slabs_in: StreamSlabs, dirs: list[str]) -> None:
        self.tables = tables
        self.slabs_in = slabs_in
        self.dirs = dirs  # spill directories, removed when the run ends

    def cleanup(self) -> None:
        for d in self.dirs:
            _spill.remove_tree(d)


class AlgoSource:
    """The source spec of an algorithm's output stream (see :mod:`dask_sweep.dsl.sources`)."""

    kind = "algorithm"

    def __init__(self, algo: _Algorithm, tables: Tables) -> None:
        self.algo = algo
        self.tables = tables
        self.desc = f"{algo.name} of {algo.stream.label}, slab by slab through its tables"

    def row_bounds(self, axis: int) -> tuple[int, ...]:
        return prepared(self.tables.uid).row_bounds()

    def bytes_per_row(self, axis: int) -> tuple[int, ...]:
        return prepared(self.tables.uid).bytes_per_row()

    def held_bytes(self) -> int:
        return prepared(self.tables.uid).held_bytes()

    def reader(self, axis: int) -> AlgoRows:
        algo = prepared(self.tables.uid)
        ahead = algo.prepared.extra.get("ahead", 0)
        return AlgoRows(algo, self.tables.uid, self.row_bounds(axis), None, ahead)


class AlgoRows:
    """Rows (= the algorithm's slabs) of its output, once its tables are bound.

    Slabs are independent given the tables, so while the sweep consumes row ``r``
    the next ``ahead`` rows are computed on worker threads (the algorithm's plan
    counts that many slabs in flight).
    """

    def __init__(
        self, algo: _Algorithm, uid: int, row_bounds: tuple, value: Any, ahead: int = 1
    ) -> None:
        self.algo = algo
        self.uid = uid
        self.row_bounds = row_bounds
        self.value = value
        self.ahead = ahead
        self.bytes_read = 0  # for the rows returned so far (rows computed ahead: when returned)
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict = {}
        self._next = 0  # the row a sequential reader asks for next

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_futures": {}}

    def bind(self, env: dict, ahead: int | None = None) -> AlgoRows:
        ahead = self.ahead if ahead is None else ahead
        return AlgoRows(self.algo, self.uid, self.row_bounds, env[self.uid], ahead)

    def close(self) -> None:
        """Stop computing ahead (the pass ended early, e.g. on an error)."""
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _slab(self, r: int) -> tuple[np.ndarray, int]:
        a, b = self.row_bounds[r], self.row_bounds[r + 1]
        counter: list = []
        out = self.algo.apply(self.value, r, a, b, counter)
        return out, sum(counter)

    def read_row(self, r: int, externals: dict) -> np.ndarray:
        if self.value is None:  # pragma: no cover - guarded by the runner
            raise RuntimeError(f"{self.algo.name}: output read before its table pass ran")
        last = len(self.row_bounds) - 2
        if self.ahead < 1:
            out, nbytes = self._slab(r)
            self.bytes_read += nbytes
            return out
        sequential, self._next = r == self._next, r + 1
        if not sequential:  # rows out of order: what was computed ahead is not needed
            for f in self._futures.values():
                f.cancel()
            self._futures.clear()
        if self._pool is None:
            # row r and the `ahead` after it run side by side
            self._pool = ThreadPoolExecutor(self.ahead + 1, thread_name_prefix="dsl-algo")
        if sequential:
            for q in range(r, min(last, r + self.ahead) + 1):
                if q not in self._futures:
                    self._futures[q] = self._pool.submit(self._slab, q)
        fut = self._futures.pop(r, None)
        out, nbytes = fut.result() if fut is not None else self._slab(r)
        self.bytes_read += nbytes
        if r == last:
            self.close()
        return out


def run_tables(algo: _Algorithm, env: dict, settings: Any, on_slab: Any = None) -> _TableValue:
    """The table pass of a prepared algorithm, its input bound to ``env``.

    ``on_slab(s, bytes_read)`` is called as each slab is done (in the pass's order).
    """
    slabs_in = algo.prepared.slabs_in.bind(env)
    if algo.stream.shape[0] == 0:  # as scipy: nothing to label, no distance to compute
        return _TableValue(algo.empty_tables(), slabs_in, [])
    value, dirs = algo.tables(slabs_in, settings, on_slab)
    if algo.store is not None:
        dirs = [*dirs, algo.store.path]
    return _TableValue(value, slabs_in, dirs)


# --------------------------------------------------------------------------- label


def _keep(tables: int, plan: Any, resident: int) -> int:
    """Bytes of an algorithm's tables kept in memory (the rest is spilled to ``.npy`` files).

    At most what the table pass leaves of the budget (next to the tables of earlier
    algorithms, ``resident``), and at most an eighth of the budget: the tables stay
    for the rest of the run, and must not grow as slabs get thinner (thinner slabs
    leave more of the budget, and make more tables).
    """
    room = plan.budget - resident - plan.projected_peak
    return int(max(0, min(tables, room, plan.budget // 8)))


def _ordered(pool: ThreadPoolExecutor, fn: Any, items: list, ahead: int):
    """``fn(item)`` for every item on ``pool``, yielded in order, ``ahead`` at most pending."""
    pending: dict = {}
    nxt = 0
    for k in range(len(items)):
        while nxt < len(items) and nxt < k + ahead:
            pending[nxt] = pool.submit(fn, items[nxt])
            nxt += 1
        yield pending.pop(k).result()


class _Label(_Algorithm):
    name = "label"

    def __init__(self, stream: Stream, structure: np.ndarray, out_dtype: np.dtype) -> None:
        super().__init__(stream)
        self.structure = structure
        self.out_dtype = out_dtype

    def params(self) -> tuple:
        """What, besides its input, the labels depend on."""
        return (self.structure.tobytes(), self.structure.shape, self.out_dtype.str)

    def _plan(self, chunks0, per_voxel, halo, settings, slab_budget):
        plan = plan_label_stream(
            self.stream.shape,
            self.stream.dtype,
            chunks0,
            self.out_dtype,
            settings,
            per_voxel,
            halo,
            func=f"dsl label({self.stream.label})",
            slab_budget=slab_budget,
            pair_bytes=LK.pair_bytes(self.structure),
            table_bytes=LK.table_bytes(self.structure),
        )
        voxels = int(np.prod(self.stream.shape, dtype=np.int64))
        if self.stream.ndim >= 2 and _spill.labels_fit(voxels):
            # pass 1 keeps its local labels, so reading the output computes no input
            plan = label_notes(dataclasses.replace(
                plan, kept="labels", input_reads=1, bytes_written=4 * voxels), self.out_dtype)
        # Tables kept in memory: at most half of what the passes leave (they stay during
        # the next pass, which needs room for its own stages), at most the worst case of
        # the lookup tables (one label per two voxels).
        worst = self.out_dtype.itemsize * (voxels // 2 + len(plan.slabs))
        keep = _keep(worst, plan, self.resident) if self.keep_tables else 0
        plane = int(np.prod(self.stream.shape[1:], dtype=np.int64))
        rows = plan.max_rows
        # reading one slab of the output: the relabel pass's per-voxel bytes for one slab,
        # less the output planes the next pass counts itself, plus the halo
        relabel = plan.passes[1]
        # (and the slabs computed ahead on the other threads: their whole work)
        ahead = max(0, settings.threads - 1)
        work = relabel.per_voxel * rows * plane + halo
        held = work * (1 + ahead) - self.out_dtype.itemsize * rows * plane
        return plan, {"reserve": keep, "held": int(max(0, held)), "ahead": ahead}

    def bytes_per_row(self) -> tuple[int, ...]:
        if self.stream.shape[0] and self.prepared.plan.kept == "labels":
            return (0,) * len(self.prepared.plan.slabs)  # the labels pass 1 kept
        return super().bytes_per_row()

    def tables(self, slabs_in: StreamSlabs, settings: Any, on_slab: Any = None):
        plan = self.prepared.plan
        counters: list[list] = [[] for _ in plan.slabs]
        readers = [_SlabIn(slabs_in, a, b, c) for (a, b), c in zip(plan.slabs, counters)]
        kept = None
        if plan.kept == "labels":
            kept = _spill.KeptLabels([(b - a, *self.stream.shape[1:]) for a, b in plan.slabs],
                                     temporary_directory())
        res = L.resolve(
            readers,
            self.structure,
            self.out_dtype,
            self.prepared.extra["reserve"],
            L.numbering_block(settings.memory_limit),
            plan.passes[0].in_flight,  # pass 1's threads, as planned
            settings.tune_malloc,
            on_slab=None if on_slab is None else lambda s: on_slab(s, sum(counters[s])),
            kept=kept,
        )
        dirs = sorted({os.path.dirname(x) for x in res.luts if isinstance(x, str)})
        return res, dirs

    def empty_tables(self) -> Any:
        return L.Resolved([], 0)

    def apply(self, value: _TableValue, s: int, a: int, b: int, counter: list) -> np.ndarray:
        kept = getattr(value.tables, "kept", None)
        lab = kept.take_labels(s) if kept is not None else None
        if lab is not None:  # what pass 1 kept: the input is not computed again
            return L.map_labels(lab, _spill.load(value.tables.luts[s]), s, self.out_dtype)
        x = value.slabs_in.planes(a, b, counter)
        mask = x if x.dtype == bool else x != 0
        del x
        lut = _spill.load(value.tables.luts[s])
        check = not getattr(value.tables, "raster", False)  # pass 1 checked every slab
        return L.relabel(mask, self.structure, lut, s, self.out_dtype, check)


def label(stream: Any, structure: Any = None, *, output: Any = None) -> tuple[Stream, Scalar]:
    """Connected components of a stream, like :func:`scipy.ndimage.label`, in two passes.

    Parameters
    ----------
    stream
        A :class:`Stream` (or anything :func:`dask_sweep.dsl.source` accepts);
        nonzero values are features.
    structure
        Connectivity, shape ``(3,) * ndim``, symmetric; default faces only.
    output
        Integer dtype of the labels (default ``int32``, as scipy).

    Returns
    -------
    labels : Stream
        Identical to scipy's labels of the stream (same raster-order numbering);
        a stream of the next level, usable by later stages and targets.
    num_features : Scalar
        The number of components, known after the table pass.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep import dsl
    >>> lab, n = dsl.label(dsl.source(np.array([[1, 0, 1], [1, 0, 0]])))
    >>> r = dsl.run(lab, n)
    >>> r.values[0].tolist(), r.values[1]
    ([[1, 0, 2], [1, 0, 0]], 2)
    """
    from dask_sweep.dsl.sources import source

    s = source(stream)
    st = L.normalize_structure(structure, s.ndim, "dask_sweep.dsl.label")
    out = L.normalize_output(output, "dask_sweep.dsl.label")
    if s.ndim <= 3:
        LK.warm()  # compile the face kernel now, not inside a pass's budget
    algo = _Label(s, st, out)
    tables = Tables(f"label-tables({s.label})", s, algo)
    spec = AlgoSource(algo, tables)
    labels = Stream(
        "source",
        f"label({s.label})",
        (),
        s.shape,
        out,
        (0, int(np.iinfo(out).max)),
        scalars=(tables,),
        source=spec,
    )
    num = Scalar(f"num_features({s.label})", (tables,), lambda v: int(v.tables.num), None, "i")
    return labels, num


# --------------------------------------------------------------------------- EDT


class _EDT(_Algorithm):
    name = "distance_transform_edt"

    def __init__(self, stream: Stream, sampling: tuple[float, ...]) -> None:
        super().__init__(stream)
        self.sampling = sampling

    def params(self) -> tuple:
        """What, besides its input, the distances depend on."""
        return self.sampling

    def _plan(self, chunks0, per_voxel, halo, settings, slab_budget):
        plan = plan_edt_stream(
            self.stream.shape,
            self.stream.dtype,
            chunks0,
            self.sampling,
            settings,
            per_voxel,
            halo,
            func=f"dsl distance_transform_edt({self.stream.label})",
            slab_budget=slab_budget,
        )
        plane = int(np.prod(self.stream.shape[1:], dtype=np.int64))
        tables = 3 * 4 * plane * len(plan.slabs)  # F, the down edges, B
        keep = _keep(tables, plan, self.resident) if self.keep_tables else 0
        plan = dataclasses.replace(plan, bytes_written=max(0, tables - keep))
        dist = plan.passes[1]
        rows = plan.max_rows
        # one slab's work beyond its output planes (counted by the next pass), the
        # carries and line buffers (the fixed part less the runtime overhead), the tables
        work = dist.per_voxel * rows * plane + dist.fixed - settings.runtime_overhead
        held = work - 8 * rows * plane
        # nothing computed ahead: a slab's envelopes already run on every thread
        return plan, {"reserve": keep, "held": int(max(0, held)), "ahead": 0}

    def tables(self, slabs_in: StreamSlabs, settings: Any, on_slab: Any = None):
        plan = self.prepared.plan
        slabs = plan.slabs
        plane = int(np.prod(self.stream.shape[1:], dtype=np.int64))

        def edges(ab: tuple[int, int]):
            counter: list = []
            x = slabs_in.planes(*ab, counter)
            fg = np.ascontiguousarray(x if x.dtype == bool else x != 0)
            fg = fg.reshape(ab[1] - ab[0], -1)
            del x
            return (*E.slab_edges(fg), sum(counter))

        n = len(slabs)
        F: list = [None] * n  # up-distance at each slab's last row (forward chain)
        downs: list = [None] * n  # each slab's own down edge, until the backward chain
        has_bg = False
        threads = max(1, settings.threads)
        reserve = self.prepared.extra["reserve"]
        kept, sdir = 0, None

        def keep(arr: np.ndarray, name: str):
            nonlocal kept, sdir
            out, kept, sdir = _spill.keep_or_spill(arr, kept, reserve, sdir, "edt", name,
                                                   write=E.spill_plane)
            return out

        def take(d):
            nonlocal kept
            if not isinstance(d, str):
                kept -= d.nbytes
            return E.get_plane(d)

        carry = None
        with ThreadPoolExecutor(threads) as pool:
            # `threads` slabs in flight; the forward chain follows them in order
            for s, (up, down, nbytes) in enumerate(_ordered(pool, edges, list(slabs), threads)):
                a, b = slabs[s]
                has_bg = has_bg or bool((up < E.INF).any())
                carry = E.chain_edges(carry, up, b - a, plane)
                if s + 1 < n:  # F of the last slab is not used
                    F[s] = keep(carry, f"F-{s:08d}.npy")
                if s > 0:  # nor the down edge of the first
                    downs[s] = keep(down, f"D-{s:08d}.npy")
                del up, down
                if on_slab is not None:
                    on_slab(s, nbytes)
        carry = None
        B = E.backward_chain(downs, tuple(b - a for a, b in slabs), plane, keep, take)
        return (F, B, has_bg), [sdir] if sdir else []

    def empty_tables(self) -> Any:
        return ([], [], False)

    def apply(self, value: _TableValue, s: int, a: int, b: int, counter: list) -> np.ndarray:
        F, B, has_bg = value.tables
        shape = self.stream.shape
        plane = int(np.prod(shape[1:], dtype=np.int64))
        none = np.full(plane, E.INF, dtype=np.int32)
        f_in = E.get_plane(F[s - 1], keep=True) if s > 0 else none
        b_in = E.get_plane(B[s + 1], keep=True) if s + 1 < len(B) else none
        x = value.slabs_in.planes(a, b, counter)
        fg = np.ascontiguousarray(x if x.dtype == bool else x != 0).reshape(b - a, plane)
        del x
        scratch = np.empty(plane, dtype=np.int32)
        threads = value.slabs_in.threads
        return E.distances(fg, f_in, b_in, scratch, has_bg, a, self.sampling, shape, threads)


def distance_transform_edt(stream: Any, sampling: Any = None) -> Stream:
    """Exact Euclidean distance transform of a stream, like scipy's, in two passes.

    Parameters
    ----------
    stream
        A :class:`Stream` (or anything :func:`dask_sweep.dsl.source` accepts);
        zeros are background.
    sampling
        Voxel spacing per axis (a scalar applies to all axes).

    Returns
    -------
    Stream
        float64 distances, equal to :func:`scipy.ndimage.distance_transform_edt`
        up to rounding; a stream of the next level.

    Examples
    --------
    >>> import numpy as np
    >>> from dask_sweep import dsl
    >>> dsl.distance_transform_edt(dsl.source(np.array([[0, 1, 1, 1]]))).run().value.tolist()
    [[0.0, 1.0, 2.0, 3.0]]
    """
    from dask_sweep.dsl.sources import source

    s = source(stream)
    samp = E.normalize_sampling(sampling, s.ndim, "dask_sweep.dsl.distance_transform_edt")
    E.warm(len(samp))  # compile the EDT kernels now, not inside a pass's budget
    algo = _EDT(s, samp)
    tables = Tables(f"edt-tables({s.label})", s, algo)
    diag = math.sqrt(sum(((n + 1) * d) ** 2 for n, d in zip(s.shape, samp)))
    return Stream(
        "source",
        f"distance_transform_edt({s.label})",
        (),
        s.shape,
        np.float64,
        (0.0, diag),
        scalars=(tables,),
        source=AlgoSource(algo, tables),
    )


def explain_lines(tables: Tables, algo: _Algorithm) -> list[str]:
    """``explain`` lines of a table pass (indented under its pass header)."""
    p = algo.prepared
    lo, hi = p.slabs_in.lead()
    names = [st.label for st in p.slabs_in.stages[: p.slabs_in.root + 1]]
    store = algo.store
    if store is not None:
        out = [
            f"  input {tables.stream.label!r} {algo.store_why}: stored once "
            f"({format_bytes(store.nbytes)}, Zarr chunks of {store.chunks[0]} planes) by the "
            "sweep before, read back by this pass"
            + (" (the output maps the labels it keeps)" if p.plan.kept == "labels"
               else " and by the output")
        ]
    else:
        out = [
            f"  input {tables.stream.label!r} computed per slab from stages "
            f"{' -> '.join(names)}"
            + (f" (halo -{lo}/+{hi} planes recomputed)" if lo or hi else "")
        ]
    out += ["  " + line for line in str(p.plan).splitlines()]
    out.append(
        f"  tables kept in memory up to {format_bytes(p.extra['reserve'])} (spilled beyond; "
        "counted in every later pass); reading the output holds "
        f"{format_bytes(p.extra['held'])} beyond its planes (counted in the passes that read it)"
        + (
            f"; {format_bytes(algo.resident)} of earlier algorithms' tables held meanwhile"
            if algo.resident
            else ""
        )
    )
    return out
