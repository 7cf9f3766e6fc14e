"""Multi-pass slab algorithms (connected components, exact EDT), without dask.

Each algorithm is a set of *steps* over slabs along axis 0, written against numpy,
numba, scipy and cc3d only: a first pass turns every slab into a small table
(faces, lookup tables, boundary planes), a chain over the tables resolves what
crosses slab boundaries, and a last pass turns each slab and its table into the
output block.  Tables beyond the plan's reserve go to disk (:mod:`.spill`).

The front ends drive the same steps: :mod:`dask_sweep.ndimage` through dask
tasks (:mod:`dask_sweep.emit.tables`), :mod:`dask_sweep.dsl` inside its passes.
A slab's input is anything with :meth:`SlabInput.read`, so these modules never
see a dask graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np


class SlabInput(Protocol):
    """One slab's input, as the steps read it."""

    def read(self, externals: Sequence[Any] = ()) -> np.ndarray:
        """The slab's planes as one array (``externals``: blocks computed elsewhere)."""
        ...


class BlockInput(Protocol):
    """A chunk row read block by block (label's rows too thick for one slab)."""

    def blocks(self) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """The row's blocks one at a time, each with its in-plane block index."""
        ...


__all__ = ["BlockInput", "SlabInput"]
