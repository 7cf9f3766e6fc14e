"""``store`` and ``to_zarr`` for both dask array modes.

dask 2026.8's array-expression mode (``array.query-planning``) has no way to
write an array: ``da.store``, ``da.to_zarr`` and ``Array.store`` raise
``NotImplementedError`` (and ``dask.array.core.store`` rejects expression
arrays).  :func:`store` and :func:`to_zarr` write in either mode: in the graph
mode they are dask's own functions; in expression mode they build what dask's
graph-mode ``store`` builds, one ``load_store_chunk`` task per block (a
``store-map-…`` Blockwise with the target and the block's slices), and a task
that waits for all of them.  That is what the sweep recognises as a store, so
with the sweep on a recognised pipeline is written inside its slab tasks, cut
on the target's chunk (shard) grid, as in the graph mode; without it, dask runs
the block writes.

>>> import dask_sweep
>>> dask_sweep.store  # doctest: +ELLIPSIS
<function store at ...>
"""

from __future__ import annotations

from typing import Any

from dask import threaded

from dask_sweep.patterns.expr import array_expr_of, expression_mode


class Stored:
    """A not yet computed expression-mode store: ``.compute()`` (or ``dask.compute``) writes.

    (The result of ``store(..., compute=False)``, like the ``Delayed`` of the graph mode.)
    """

    def __init__(self, expr) -> None:
        self._expr = expr

    @property
    def expr(self):
        return self._expr

    def __dask_graph__(self):
        return self._expr.optimize().__dask_graph__()

    def __dask_keys__(self):
        return self._expr.__dask_keys__()

    def __dask_postcompute__(self):
        return _first, ()

    def __dask_tokenize__(self):
        return ("dask_sweep.Stored", self._expr._name)

    def __dask_optimize__(self, dsk, keys, **kwargs):
        return dsk

    __dask_scheduler__ = staticmethod(threaded.get)

    def compute(self, **kwargs):
        import dask

        return dask.compute(self, **kwargs)[0]


def _first(results):
    return None


def store(sources, targets, lock: Any = True, regions=None, compute: bool = True, **kwargs):
    """Write dask arrays into array-likes (``target[region][block slices] = block``).

    Parameters are those of :func:`dask.array.store` (``return_stored`` only in the
    graph mode).  In graph mode this *is* ``dask.array.store``.

    Returns
    -------
    None, or (``compute=False``) something ``dask.compute`` runs: dask's in graph
    mode, a :class:`Stored` in expression mode.
    """
    import dask.array as da

    single = array_expr_of(sources) is not None or hasattr(sources, "chunks")
    if not expression_mode():
        return da.store(sources, targets, lock=lock, regions=regions, compute=compute, **kwargs)
    if kwargs.get("return_stored"):
        raise NotImplementedError("return_stored is not supported in dask's array-expression "
                                  "mode; read the target back instead.")
    kwargs.pop("return_stored", None)
    kwargs.pop("load_stored", None)
    if single:
        sources, targets = [sources], [targets]
    sources, targets = list(sources), list(targets)
    if len(sources) != len(targets):
        raise ValueError(f"Different number of sources [{len(sources)}] and targets "
                         f"[{len(targets)}]")
    regions_list = ([regions] * len(sources) if regions is None or isinstance(regions, tuple)
                    else list(regions))
    if lock is True:
        from dask.utils import get_scheduler_lock

        lock = get_scheduler_lock(scheduler=kwargs.get("scheduler"))
    from dask_sweep.emit.expr import store_map
    from dask_sweep.emit.expr_nodes import StoreDone

    maps = [store_map(s, t, r, lock).expr for s, t, r in zip(sources, targets, regions_list)]
    stored = Stored(StoreDone(*maps))
    if not compute:
        return stored
    import dask

    dask.compute(stored, **kwargs)
    return None


def to_zarr(arr, url, component: str | None = None, region=None, compute: bool = True,
            overwrite: bool = False, **kwargs):
    """Write a dask array to a Zarr array (a path, a store, or a ``zarr.Array``).

    In graph mode this *is* :func:`dask.array.to_zarr`.  In expression mode the
    array is created with the dask array's (regular) chunks, or an existing
    ``zarr.Array`` is written; blocks that do not cover whole Zarr chunks are
    written under a lock.
    """
    import dask.array as da

    if not expression_mode():
        if overwrite:
            kwargs["mode"] = "w"
        return da.to_zarr(arr, url, component=component, region=region, compute=compute,
                          **kwargs)
    import numpy as np
    import zarr

    if isinstance(url, zarr.Array):
        z = url
    else:
        if region is not None:
            raise ValueError("Cannot use `region` keyword when url is not a `zarr.Array`.")
        if any(len(set(c[:-1])) > 1 or (len(c) > 1 and c[-1] > c[0]) for c in arr.chunks):
            raise ValueError("Attempt to save array to zarr with irregular chunking, please "
                             "call arr.rechunk(...) first.")
        chunks = tuple(c[0] for c in arr.chunks)
        mode = "w" if overwrite else "w-"
        if component is None:
            z = zarr.create_array(store=url, shape=arr.shape, chunks=chunks,
                                  dtype=arr.dtype, overwrite=overwrite, **kwargs)
        else:
            group = zarr.open_group(store=url, mode="a" if not overwrite else mode)
            z = group.create_array(component, shape=arr.shape, chunks=chunks,
                                   dtype=arr.dtype, overwrite=overwrite, **kwargs)
    tchunks = getattr(z, "shards", None) or z.chunks
    starts = [np.cumsum((0, *c[:-1])) for c in arr.chunks]
    offsets = [0] * arr.ndim
    if region is not None:
        offsets = [r.start or 0 for r in region]
    aligned = all(((s + o) % t == 0).all() for s, o, t in zip(starts, offsets, tchunks))
    return store(arr, z, lock=not aligned, regions=region, compute=compute)
