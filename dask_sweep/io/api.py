"""``imread`` / ``imwrite``: pick the reader or writer from the path, and the write chain.

``imwrite`` turns an array into a chain of slab tasks, one per output slab in
sweep order.  Each write depends on the previous write's completion marker, and
the *reads* feeding slab *i* (the root tasks of the array's graph first needed
by slab *i*) wait for the write of slab *i - lag*; ordering alone would not do,
idle threads would run the reads ahead and fill memory::

    read 0 ─ write 0 ──────── write 1 ──────── write 2 ─ ... ─ finalize
    read 1 ───────────────────┘    │            │
                 (lag=2)  read 2 ──┴────────────┘   read 2 waits for write 0
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from dask_sweep.config import SweepSettings
from dask_sweep.errors import BudgetError, SinkError, SourceError
from dask_sweep.io.base import Sink, Source
from dask_sweep.io.hdf5 import HDF5Sink, HDF5Source, split_hdf5_path
from dask_sweep.io.host import HOST
from dask_sweep.io.tiff import BigTiffSink, TiffSource, TiffStackSink, TiffStackSource
from dask_sweep.io.zarr_io import ZarrSink, ZarrSource, split_zarr_path
from dask_sweep.runtime.memory import tune_allocator
from dask_sweep.utils import format_bytes

__all__ = ["imread", "imwrite", "open_sink", "open_source", "write_graph"]

_GLOB = set("*?[")
SINKS: dict[str, type[Sink]] = {
    "zarr": ZarrSink,
    "hdf5": HDF5Sink,
    "bigtiff": BigTiffSink,
    "tiff-stack": TiffStackSink,
}


def _has_suffix_part(path: str, suffixes: tuple[str, ...]) -> bool:
    return any(p.lower().endswith(suffixes) for p in path.split(os.sep)[1:])


def open_source(path: Any, **options: Any) -> Source:
    """The :class:`Source` for ``path`` (see :func:`imread` for the rules)."""
    import zarr

    if isinstance(path, (list, tuple)):
        return TiffStackSource(path, **options)
    if isinstance(path, zarr.Array):
        return ZarrSource(path, **options)
    p = os.path.abspath(os.fspath(path))
    if (
        _has_suffix_part(p, (".zarr",))
        and split_zarr_path(p)[0] != p
        or p.lower().endswith(".zarr")
    ):
        return ZarrSource(p, **options)
    if _has_suffix_part(p, (".h5", ".hdf5", ".hdf", ".he5")) and split_hdf5_path(p)[0]:
        return HDF5Source(p, **options)
    if os.path.isdir(p):
        if any(os.path.exists(os.path.join(p, m)) for m in ("zarr.json", ".zarray", ".zgroup")):
            return ZarrSource(p, **options)
        return TiffStackSource(p, **options)
    if _GLOB & set(os.path.basename(p)):
        return TiffStackSource(os.fspath(path), **options)
    if p.lower().endswith((".tif", ".tiff")):
        return TiffSource(p, **options)
    if not os.path.exists(p):
        raise SourceError(f"Input {p} does not exist.")
    raise SourceError(
        f"Cannot tell the format of {p}. Expected a folder or glob of TIFF slices, a .tif/.tiff "
        "file, a .zarr store (optionally followed by the array path) or an .h5/.hdf5 file."
    )


def imread(path: Any, *, chunks: Any = None, **options: Any):
    """Open an image volume lazily as a dask array whose blocks follow the disk layout.

    Parameters
    ----------
    path
        - a folder of 2D TIFF slices, a glob (``"stack/img_*.tif"``) or a list
          of files: :func:`~dask_sweep.io.read_tiff_stack`;
        - ``"vol.tif"`` / ``".tiff"`` (multi-page or BigTIFF):
          :func:`~dask_sweep.io.read_tiff`;
        - ``"vol.zarr"``, ``"vol.zarr/group/array"``, ``"vol.ome.zarr/0"`` or a
          :class:`zarr.Array`: :func:`~dask_sweep.io.read_zarr` (``strict=True``
          by default: a missing chunk is an error);
        - ``"f.h5"`` or ``"f.h5/group/dataset"``: :func:`~dask_sweep.io.read_hdf5`.
    chunks
        Dask chunks, rounded up to whole disk chunks (shards, pages, slices);
        default: the disk layout.
    **options
        Passed to the source: ``component=``, ``strict=`` (Zarr), ``dataset=``
        (HDF5), ``slices_per_chunk=``, ``validate=`` (TIFF)...

    Returns
    -------
    dask.array.Array
        Its graph has one root layer named ``imread-<token>`` whose tasks have
        no dependencies.

    Raises
    ------
    SourceError
        When the input is missing, inconsistent or not understood.

    Examples
    --------
    >>> x = imread("vol.ome.zarr", component="0")  # doctest: +SKIP
    """
    return open_source(path, **options).to_dask(chunks)


def _sink_kind(path: str) -> str:
    low = path.lower().rstrip(os.sep)
    if low.endswith(".zarr"):
        return "zarr"
    if _has_suffix_part(path, (".h5", ".hdf5", ".hdf", ".he5")):
        return "hdf5"
    if low.endswith((".tif", ".tiff")):
        return "bigtiff"
    return "tiff-stack"


def open_sink(
    path: Any, shape: Iterable[int], dtype: Any, *, format: str | None = None, **options: Any
) -> Sink:
    """Create the :class:`Sink` for ``path``, chosen by ``format`` or the path's suffix.

    ``.zarr`` → :class:`ZarrSink`, ``.h5``/``.hdf5`` (optionally followed by the
    dataset path) → :class:`HDF5Sink`, ``.tif``/``.tiff`` → :class:`BigTiffSink`,
    anything else → :class:`TiffStackSink` (a folder of slices).
    """
    p = os.path.abspath(os.fspath(path))
    kind = format or _sink_kind(p)
    if kind not in SINKS:
        raise SinkError(f"Unknown output format {kind!r}. Expected one of {sorted(SINKS)}.")
    if kind in ("bigtiff", "tiff-stack") and options.get("chunks") is not None:
        raise SinkError(
            f"chunks= applies to Zarr and HDF5 outputs; {p} is written as TIFF, one page per "
            "slice. Drop chunks= or write to a .zarr/.h5 path."
        )
    if kind in ("bigtiff", "tiff-stack"):
        options.pop("chunks", None)  # None here: nothing to pass on
    return SINKS[kind](p, tuple(shape), dtype, **options)


def imwrite(
    array: Any,
    path: Any,
    *,
    overwrite: bool = False,
    resume: bool = False,
    chunks: Any = None,
    compute: bool = True,
    format: str | None = None,
    slab_rows: int | None = None,
    lag: int = 2,
    scheduler: str | None = None,
    memory_limit: int | str | None = None,
    **options: Any,
):
    """Write a dask or numpy array slab by slab along axis 0, resumably, within a budget.

    Parameters
    ----------
    array
        A dask array, or anything :func:`numpy.asarray` accepts.
    path
        Output: ``"out.zarr"``, ``"out.h5[/dataset]"``, ``"out.tif"`` (BigTIFF)
        or a folder (one TIFF per slice).
    overwrite
        Replace an existing output (kept until the new one is complete).
    resume
        Continue an interrupted write; finished slabs are neither recomputed
        nor rewritten, and the result is byte-identical to an uninterrupted run.
    chunks
        Output chunk shape (Zarr, HDF5); default for Zarr: about 8 MiB chunks,
        thinner along axis 0 when the budget needs it (a slab holds whole chunk
        rows), for HDF5: contiguous.
    compute
        Write now and return the path; ``False`` returns a
        :class:`dask.delayed.Delayed` that does the write when computed.
    format
        ``"zarr"``, ``"hdf5"``, ``"bigtiff"`` or ``"tiff-stack"`` (default:
        from the path).
    slab_rows
        Rows per slab (rounded up to whole output chunks/shards).
    lag
        Reads for slab *i* wait for the write of slab *i - lag* (bounds memory
        to about ``lag`` slabs).
    scheduler
        Passed to :func:`dask.compute` (default: the current scheduler).
    memory_limit
        Budget of the write (bytes or ``"512MiB"``); default: the active sweep's
        (``enable(...)``), else ``sweep.memory-limit``.  Given here, a pipeline
        the sweep recognises is swept as under ``enable``.
    **options
        Passed to the sink (``shards=``, ``zarr_format=``, ``compression=``,
        ``prefix=``, ``dataset=``, ``fsync=``, ``sync_bytes=``...).

    Returns
    -------
    str or dask.delayed.Delayed
        The output path, or the delayed write.

    Raises
    ------
    SinkError
        Before anything is written: the output exists (without ``overwrite``),
        an interrupted write is in the way (without ``resume``/``overwrite``),
        the dtype cannot be stored in the format, the layout is invalid.
    BudgetError
        Before anything is written: explicit ``chunks``/``shards`` whose rows
        do not fit the budget (the message names the rows that would), or, with
        ``sweep.fallback: raise``, a write that fits it with no chunking.
    """
    import dask
    import dask.array as da

    if not isinstance(array, da.Array):
        array = np.asarray(array)
    if chunks is not None:
        options["chunks"] = chunks
    settings = HOST.settings(memory_limit=memory_limit)
    sweeping = HOST.analyse is not None and (
        memory_limit is not None or HOST.active_pass() is not None)
    kind = format or _sink_kind(os.path.abspath(os.fspath(path)))
    planned = None  # the sweep's plan of this write, made while fitting the layout
    if isinstance(array, da.Array) and compute:
        planned = _fit_layout(array, path, kind, options, settings, sweeping, resume)
    sink = open_sink(
        path,
        array.shape,
        array.dtype,
        format=format,
        overwrite=overwrite,
        resume=resume,
        slab_rows=slab_rows,
        memory_limit=settings.memory_limit,
        **options,
    )
    if not isinstance(array, da.Array):
        array = da.from_array(array, chunks=(sink.slab_rows, *array.shape[1:]))
    elif slab_rows is None:
        sink.slab_rows = _block_aligned_rows(array, sink)
    if not compute:
        return write_graph(array, sink, lag=lag)
    result = None  # the analysis the sweep made of the write, when it is reused
    if planned is not None and planned.target.bind(sink):
        swept, result = planned.store, planned.result
    else:
        swept = _swept_store(array, sink, settings) if sweeping else None
    try:
        if swept is not None:
            # the pass that planned the write (explicit budget, else the active one's)
            with (HOST.enable(**dataclasses.asdict(settings), _warm=False),
                  HOST.reuse(result) if result is not None else contextlib.nullcontext()):
                dask.compute(swept, scheduler=scheduler)
            return sink.finalize()
        if settings.tune_malloc:
            tune_allocator()  # freed slabs leave the process at once (as in the sweep)
        (result,) = dask.compute(write_graph(array, sink, lag=lag), scheduler=scheduler)
    except BaseException:
        # keep what was written: resume=True then redoes only the slabs not finished
        with contextlib.suppress(Exception):
            sink.sync()
        raise
    return result


class SinkTarget:
    """A sink seen as an array ``da.store`` writes to, for the sweep's in-task writes.

    The sweep writes whole planes on the sink's row grid (``chunks`` tells it the
    grid), each write synced and recorded by the sink; anything else (a partial
    plane, rows off the grid) is refused, so only a sweep may use it.
    """

    whole_planes_only = True

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.shape = sink.shape
        self.dtype = sink.dtype
        self.ndim = len(sink.shape)
        self.chunks = (sink.row_step, *sink.shape[1:])
        # rows an interrupted run recorded: the sweep does not recompute them (resume)
        self.recorded_planes = tuple(sink.done_slabs())
        # fixed when made: a draft's keys stay those of its plan once it is bound (an
        # expression is named again when it is lowered)
        self._token = ("dask-sweep-sink-target", sink.path, sink.manifest(),
                       self.recorded_planes)

    def bind(self, sink: Sink) -> bool:
        """Point a target planned on a draft of ``sink`` (:class:`_Draft`) at ``sink``
        itself, if it has the draft's shape, dtype and row grid and nothing recorded;
        whether it did (the plan made on the draft then writes ``sink``)."""
        fits = (tuple(sink.shape), np.dtype(sink.dtype), sink.row_step) == (
            tuple(self.shape), np.dtype(self.dtype), self.chunks[0])
        if not isinstance(self.sink, _Draft) or not fits or self.recorded_planes \
                or tuple(sink.done_slabs()):
            return False
        self.sink = sink
        return True

    def __setitem__(self, index: tuple, value) -> None:
        rows = index[0]
        whole = all(
            s.start in (0, None) and s.stop in (n, None)
            for s, n in zip(index[1:], self.shape[1:])
        )
        if not whole or rows.step not in (None, 1):
            raise SinkError(
                f"dask_sweep: {self.sink.path} takes whole planes from a sweep; got {index}."
            )
        # synced in groups by the sink; imwrite finalizes (or, on failure, syncs) it
        self.sink.write_slab(rows.start or 0, np.asarray(value), commit=False)

    def __dask_tokenize__(self) -> tuple:
        return self._token


def _swept_store(array, sink: Sink, settings: SweepSettings | None = None):
    """A ``da.store`` into ``sink`` that a sweep with ``settings`` (default: the active
    pass's) writes entirely in its slab tasks, or ``None`` (no sweep on, a graph it
    leaves to dask, or over the budget).  A resumed write sweeps only the rows not
    recorded (``dask_sweep.passes.resume``), or is left to the slab chain if the
    sweep cannot skip them."""
    if settings is None:
        p = HOST.active_pass()
        if p is None:
            return None
        settings = p.settings()

    target = SinkTarget(sink)
    store = HOST.store(array, target, lock=False, compute=False)
    res = _plan_store(store, sink, settings)
    if res is None or isinstance(res, BudgetError):
        return None
    if target.recorded_planes and "skip" not in res.plans[0][0].info:
        return None
    return store


def _plan_store(store, sink, settings: SweepSettings):
    """The sweep's analysis of ``store`` (a ``da.store`` into ``SinkTarget(sink)``) when
    it writes the store in its slab tasks, with one plan; else the :class:`BudgetError`
    that refused it, or ``None`` (left to dask: not recognised, tiled, or not written
    by the sweep itself)."""
    if HOST.analyse is None:
        return None
    try:
        res = HOST.analyse(store, settings.with_(fallback="raise"))
    except BudgetError as e:
        return e
    except Exception:  # noqa: BLE001 - whatever the analysis trips on, the chain path works
        return None
    if res.fallbacks or len(res.plans) != 1:
        return None
    plan = res.plans[0][0]
    if "tile_plans" in plan.info:
        return None
    # the sweep must write the planes itself, straight into this sink
    if not any(getattr(getattr(o.sink, "target", None), "sink", None) is sink
               for o in plan.outputs):
        return None
    return res


class _Draft:
    """What planning needs of a sink not yet created: its shape, dtype and row grid."""

    def __init__(self, path: str, shape: tuple, dtype: Any, row_step: int) -> None:
        self.path, self.shape, self.dtype, self.row_step = path, shape, np.dtype(dtype), row_step

    def done_slabs(self) -> list:
        return []

    def manifest(self) -> dict:
        return {"draft": self.row_step, "shape": self.shape, "dtype": self.dtype.str}


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A write the sweep planned on a draft of its sink: the store, its target, the
    analysis (reused once the target is bound to the sink created for it)."""

    store: Any
    target: SinkTarget
    result: Any


def _fit_layout(array, path, kind: str, options: dict, settings: SweepSettings,
                sweeping: bool, resume: bool) -> _Planned | None:
    """Choose (Zarr, default) or check (explicit ``chunks``/``shards``) the output's rows
    along axis 0 so that the write keeps the budget, before anything is created; the
    sweep's plan of the write on the rows chosen, if it plans it.

    A slab holds whole chunk rows: the sweep's output ring (a recognised pipeline,
    sweep on) or the chained writer's slabs (:data:`~.base.CHAIN_SLABS`) must fit.
    Default chunks are halved along axis 0 until they do; explicit ones that do not
    fit raise :class:`BudgetError` naming the rows that would.  When no rows fit
    (the pipeline itself is over the budget), ``settings.fallback`` decides: raise,
    warn and write with the chained writer, or write silently.
    """
    from dask_sweep.io.zarr_io import _auto_chunks

    shape, dtype = tuple(array.shape), array.dtype
    if len(shape) < 1 or shape[0] == 0:
        return None
    given = options.get("shards") or options.get("chunks")
    if kind == "zarr" and given is None:
        if resume and (old := _recorded_chunks(path)) is not None:
            options["chunks"] = old  # a resumed write keeps its layout
            return None
        auto = _auto_chunks(shape, dtype, settings)
        rows, choose = auto[0], True
    elif kind in ("zarr", "hdf5") and given is not None:
        rows, choose = int(given[0]), False
    else:
        rows, choose = 1, False  # one page per slice; contiguous HDF5
    p = os.path.abspath(os.fspath(path))
    swept: dict[int, _Planned] = {}  # rows the sweep plans

    def refusal(r: int) -> BudgetError | None:
        if sweeping:
            target = SinkTarget(_Draft(p, shape, dtype, r))
            store = HOST.store(array, target, lock=False, compute=False)
            got = _plan_store(store, target.sink, settings)
            if isinstance(got, BudgetError):
                return got
            if got is not None:
                swept[r] = _Planned(store, target, got)
                return None
        return _chain_refusal(array, r, settings)

    why = refusal(rows)
    if why is None:
        if choose:
            options["chunks"] = (rows, *auto[1:])
        return swept.get(rows)
    smaller = next((r for r in _thinner(rows, array.chunks[0]) if refusal(r) is None), None)
    if smaller is not None and choose:
        options["chunks"] = (smaller, *auto[1:])
        return swept.get(smaller)
    if smaller is not None:
        name = "shards" if options.get("shards") else "chunks"
        fix = (smaller, *given[1:])
        raise BudgetError(
            f"imwrite to {p}: {name} of {rows} rows along axis 0 do not fit the memory budget "
            f"of {format_bytes(settings.memory_limit)} (a slab holds whole chunk rows): {why} "
            f"Pass {name}={fix} (at most {smaller} rows fit) or raise memory_limit.",
            stage=why.stage, projected=why.projected, budget=settings.memory_limit,
        ) from None
    if settings.fallback == "raise":
        raise why
    if settings.fallback == "warn":
        warnings.warn(f"{why} Writing {p} anyway.", RuntimeWarning, stacklevel=3)
    if choose:
        options["chunks"] = (1, *auto[1:])
    return None


def _thinner(rows: int, blocks: tuple[int, ...]) -> list[int]:
    """Rows below ``rows`` to try, thickest first: its halvings, and the divisors of
    the input's block rows (slabs on the blocks' boundaries compute no block twice).

    >>> _thinner(10, (8, 8))
    [8, 5, 4, 2, 1]
    """
    out, r = set(), rows
    while r > 1:
        r //= 2
        out.add(r)
    b = blocks[0] if blocks else 1
    out |= {d for d in range(1, min(b, rows - 1) + 1) if b % d == 0}
    return sorted(out, reverse=True)


def _chain_refusal(array, rows: int, settings: SweepSettings) -> BudgetError | None:
    """Why the chained writer cannot keep the budget with output chunk rows of ``rows``.

    It holds :data:`~.base.CHAIN_SLABS` slabs, each of at least one chunk row and of
    the dask blocks it is cut from (a block is computed whole).  What dask's own
    tasks hold while computing a block is not counted: swept pipelines are planned.
    """
    from dask_sweep.io.base import CHAIN_SLABS, chain_slab_bytes

    shape = tuple(array.shape)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * array.dtype.itemsize
    slab = max(1, min(settings.target_slab_bytes, chain_slab_bytes(settings)) // max(1, row_bytes))
    slab = max(rows, slab // rows * rows)
    edges = np.cumsum((0, *array.chunks[0]))
    unit = 0
    for a in range(0, shape[0], slab):
        b = min(a + slab, shape[0])
        i0 = int(np.searchsorted(edges, a, side="right")) - 1
        i1 = int(np.searchsorted(edges, b, side="left"))
        unit = max(unit, b - a, int(edges[i1] - edges[i0]))
    need = CHAIN_SLABS * unit * row_bytes + settings.runtime_overhead
    if need <= settings.memory_limit:
        return None
    return BudgetError(
        f"the slab writer holds {CHAIN_SLABS} slabs of {unit} planes "
        f"({format_bytes(unit * row_bytes)} each: whole chunk rows of the output and whole "
        f"dask blocks of the input) + {format_bytes(settings.runtime_overhead)}: "
        f"{format_bytes(need)}, over the memory budget of "
        f"{format_bytes(settings.memory_limit)}.",
        stage="imwrite", projected=need, budget=settings.memory_limit,
    )


def _recorded_chunks(path) -> tuple | None:
    """The chunks an interrupted write to ``path`` was started with, if any."""
    import json

    try:
        with open(os.path.abspath(os.fspath(path)) + ".progress/manifest.json") as f:
            chunks = json.load(f)["layout"]["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tuple(chunks) if chunks else None


def _block_aligned_rows(array, sink: Sink) -> int:
    """Slab rows on the array's own block boundaries, when they allow it.

    A slab that is exactly one dask block (of at least a quarter of the default
    slab) is written without being concatenated first, saving a copy of every
    byte; smaller blocks are grouped whole.  Falls back to the sink's default
    when the blocks are irregular or off the output's chunk grid.
    """
    rows = sink.slab_rows
    sizes = array.chunks[0]
    if len(sizes) < 2 or len(set(sizes[:-1])) != 1:
        return rows
    b = sizes[0]
    if b % sink.row_step or b > rows:  # a larger slab would leave the budget
        return rows
    if 4 * b >= rows:
        return b
    return b * (rows // b)


def write_graph(array, sink: Sink, *, lag: int = 2):
    """The delayed chain of slab writes of ``array`` into ``sink`` (not yet run).

    Parameters
    ----------
    array : dask.array.Array
        Of the sink's shape.  Its graph is optimised first (so a sweep optimiser
        installed as ``array_optimize`` still applies).
    sink
        An open sink; slabs it records as done are skipped.
    lag
        Reads for slab *i* wait for the write of slab *i - lag*; ``0`` disables.

    Returns
    -------
    dask.delayed.Delayed
        Computing it writes the missing slabs in order, then finalizes the sink,
        and returns the output path.
    """
    if tuple(array.shape) != sink.shape:
        raise SinkError(
            f"Expected an array of shape {sink.shape} for {sink.path}. Got {array.shape}."
        )
    # the tasks are written by dask_sweep.emit.io_graphs (handed in: io is a leaf)
    return HOST.write_graph(array, sink, lag=lag)
