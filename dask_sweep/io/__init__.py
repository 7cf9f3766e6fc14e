"""Slab sources and sinks: lazy readers laid out like the disk, resumable writers.

Readers (``imread`` picks one from the path) return dask arrays whose only
layer is a root layer of independent read tasks, one per block of whole disk
chunks.  Writers (``imwrite``) write slab by slab along axis 0 in sweep order,
into a temporary output published atomically at the end, and record finished
slabs so that ``resume=True`` continues a crashed write.  ``track()`` measures
the bytes and chunks every read and write moved.  See ``docs/io.md``.
"""

from dask_sweep.io.accounting import IOStats, track
from dask_sweep.io.api import imread, imwrite, open_sink, open_source, write_graph
from dask_sweep.io.base import Sink, Source, clear_handles
from dask_sweep.io.hdf5 import HDF5Sink, HDF5Source, read_hdf5
from dask_sweep.io.stores import CountingStore
from dask_sweep.io.tiff import (
    BigTiffSink,
    TiffSource,
    TiffStackSink,
    TiffStackSource,
    read_tiff,
    read_tiff_stack,
)
from dask_sweep.io.zarr_io import ZarrSink, ZarrSource, read_zarr

__all__ = [
    "BigTiffSink",
    "CountingStore",
    "HDF5Sink",
    "HDF5Source",
    "IOStats",
    "Sink",
    "Source",
    "TiffSource",
    "TiffStackSink",
    "TiffStackSource",
    "ZarrSink",
    "ZarrSource",
    "clear_handles",
    "imread",
    "imwrite",
    "open_sink",
    "open_source",
    "read_hdf5",
    "read_tiff",
    "read_tiff_stack",
    "read_zarr",
    "track",
    "write_graph",
]
