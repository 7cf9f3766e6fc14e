"""What the storage layer needs from the sweep, handed in from above.

``io/`` is a leaf: it imports nothing of the plugin.  Three things it does depend
on the sweep that is switched on (a sink sizes its slabs for the active budget,
``imwrite`` sweeps a pipeline the plugin recognises), so
:mod:`dask_sweep.integration.optimize` fills :data:`HOST` in when the package is
imported.  Until then (``io`` used on its own) the settings are the configured
``sweep.*`` ones and nothing is swept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dask_sweep.config import SweepSettings


def _no_pass() -> Any:
    return None


@dataclass
class Host:
    """The sweep's services to io (defaults: no sweep switched on)."""

    #: ``settings(**overrides)``: an explicit value wins, else the active sweep's, else config
    settings: Callable[..., SweepSettings] = SweepSettings.resolve
    #: the active sweep pass (``enable``, ``array_optimize``, ``optimizations``) or ``None``
    active_pass: Callable[[], Any] = _no_pass
    #: ``analyse(graph, keys, settings)``: the plugin's plans for a graph
    analyse: Callable[..., Any] | None = None
    #: ``enable(**settings)``: a context in which computes are swept with these settings
    enable: Callable[..., Any] | None = None


HOST = Host()
