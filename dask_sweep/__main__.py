"""``python -m dask_sweep``: the ``dask-sweep`` command line (see :mod:`dask_sweep.cli`)."""

import sys

from dask_sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
