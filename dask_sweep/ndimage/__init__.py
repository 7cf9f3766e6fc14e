"""Bounded-memory, lazy replacements for :mod:`scipy.ndimage` functions.

Each function sweeps its input along axis 0 in slabs of whole chunk rows, in
a fixed number of passes, with a memory footprint computed (and checked
against ``memory_limit``) before any byte is read; see ``docs/ndimage.md``.
"""

from dask_sweep.ndimage.edt import distance_transform_edt, explain_edt, plan_edt
from dask_sweep.ndimage.label import explain_label, label, plan_label

__all__ = [
    "distance_transform_edt",
    "explain_edt",
    "explain_label",
    "label",
    "plan_edt",
    "plan_label",
]
