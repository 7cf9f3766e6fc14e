"""A streaming DSL over the sweep engine: pipelines of plane streams, planned to a budget.

>>> import numpy as np
>>> from dask_sweep import dsl
>>> vol = np.random.default_rng(0).integers(0, 255, (32, 24, 24), dtype=np.uint8)
>>> s = dsl.source(vol).gaussian(sigma=1)
>>> mask = s > dsl.otsu(s)                    # histogram pass, then the apply pass
>>> res = mask.to().run(memory_limit="64MiB")
>>> res.value.shape, res.report.passes
((32, 24, 24), 2)

Every pass lowers into one :class:`dask_sweep.plan.ir.Plan` and runs on the same
executor as the dask plugin, locally (:meth:`Target.run`) or as a dask graph
(:meth:`Target.to_dask`).  See ``docs/dsl.md``.
"""

from dask_sweep.dsl import core as _core
from dask_sweep.dsl.algorithms import distance_transform_edt, label
from dask_sweep.dsl.compile import compile_pipeline as _compile
from dask_sweep.dsl.core import Constant, Reduction, Scalar, Stream, Target, zip
from dask_sweep.dsl.execute import RunReport, RunResult, _items, run, to_dask
from dask_sweep.dsl.explanation import Explanation as _Explanation
from dask_sweep.dsl.library import bilateral, difference_of_gaussians, otsu_threshold
from dask_sweep.dsl.reductions import (
    histogram,
    max,
    mean,
    min,
    otsu,
    otsu_from_histogram,
    quantile,
    sum,
)
from dask_sweep.dsl.sources import source


def explain(*items, **settings):
    """Explain several targets/scalars planned together (see :meth:`Target.explain`)."""
    return _Explanation(_compile(_items(items), **settings))


# the pipeline's objects run, explain and build graphs through these (dsl.core imports
# nothing of the compiler)
_core.ENGINE.update(run=run, explain=explain, to_dask=to_dask, explain_compiled=_Explanation)


__all__ = [
    "Constant",
    "Reduction",
    "RunReport",
    "RunResult",
    "Scalar",
    "Stream",
    "Target",
    "bilateral",
    "difference_of_gaussians",
    "distance_transform_edt",
    "explain",
    "histogram",
    "label",
    "max",
    "mean",
    "min",
    "otsu",
    "otsu_from_histogram",
    "otsu_threshold",
    "quantile",
    "run",
    "source",
    "sum",
    "to_dask",
    "zip",
]
