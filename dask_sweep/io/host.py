"""What the storage layer needs from the sweep, handed in from above.

``io/`` is a leaf: it imports nothing of the plugin.  Three things it does depend
on the sweep that is switched on (a sink sizes its slabs for the active budget,
``imwrite`` sweeps a pipeline the plugin recognises), and its dask graphs (a
source's read tasks, the chained slab writes) are written by
:mod:`dask_sweep.emit.io_graphs`, so :mod:`dask_sweep.integration.optimize`
fills :data:`HOST` in when the package is imported.  Until then (while the
package itself is being imported) the settings are the configured ``sweep.*``
ones, nothing is swept, and making a dask array of a source is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dask_sweep.config import SweepSettings


def _no_pass() -> Any:
    return None


@contextlib.contextmanager
def _no_reuse(*_: Any) -> Iterator[None]:
    yield


def _no_graphs(*_: Any, **__: Any) -> Any:
    raise RuntimeError(
        "dask_sweep.io: dask graphs are written by dask_sweep.emit; import dask_sweep "
        "(not only dask_sweep.io's modules) before making dask arrays of sources or sinks."
    )


@dataclass
class Host:
    """The sweep's services to io (defaults: no sweep switched on)."""

    #: ``settings(**overrides)``: an explicit value wins, else the active sweep's, else config
    settings: Callable[..., SweepSettings] = SweepSettings.resolve
    #: the active sweep pass (``enable``, ``array_optimize``, ``optimizations``) or ``None``
    active_pass: Callable[[], Any] = _no_pass
    #: ``analyse(collection, settings)``: the plugin's plans for a dask collection (a
    #: graph-mode array or, once the expression hook is installed, an expression)
    analyse: Callable[..., Any] | None = None
    #: ``enable(**settings)``: a context in which computes are swept with these settings
    enable: Callable[..., Any] | None = None
    #: ``reuse(result)``: a context in which computing the graph ``result`` (what
    #: ``analyse`` returned) was made of takes it instead of planning it again
    reuse: Callable[..., Any] = _no_reuse
    #: ``source_array(source, chunks, name)``: a source's read tasks as a dask array
    source_array: Callable[..., Any] = _no_graphs
    #: ``write_graph(array, sink, lag=)``: the delayed chain of a sink's slab writes
    write_graph: Callable[..., Any] = _no_graphs
    #: ``store(array, target, lock=, compute=)``: ``da.store`` in either dask array mode
    store: Callable[..., Any] = _no_graphs


HOST = Host()
