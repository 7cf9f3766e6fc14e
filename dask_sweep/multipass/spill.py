"""Tables and planes that outlive a pass: kept in memory within a reserve, else on disk.

A multi-pass sweep produces small per-slab results (boundary planes, label
tables) that a later pass consumes in another order, so all of them can be
alive at once.  Each is either kept in memory, while the running total stays
within a reserve the plan set aside next to its slab footprints, or written to
a ``.npy`` file under dask's ``temporary-directory`` and read back (and
deleted) by its single consumer.  The decision is made where the result is
produced, with the running total carried along the producing chain, so the
whole run never holds more than the reserve.

Spill directories are created lazily at run time with a unique name (the graph
keys stay deterministic, and a recomputation gets its own directory).  A file
is deleted when it is read; a directory is removed by :func:`remove_dir` once
its last file is read, and whatever a partial computation left behind is
removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import uuid

import numpy as np

from dask_sweep.config import temporary_directory
from dask_sweep.io.accounting import REGISTRY

_CREATED: set[str] = set()
_LOCK = threading.Lock()


def new_dir(kind: str, suffix: str = "") -> str:
    """A fresh, unique directory path for one run's spilled results (not created yet).

    It is removed when the process exits, if something is still there.
    """
    name = f"dask-sweep-{kind}-{uuid.uuid4().hex[:16]}{suffix}"
    path = os.path.join(temporary_directory(), name)
    with _LOCK:
        _CREATED.add(path)
    return path


def spill(path: str, arr: np.ndarray) -> str:
    """Write ``arr`` to ``path`` (a ``.npy`` file) and return the path."""
    d = os.path.dirname(path)
    with _LOCK:
        _CREATED.add(d)
    for attempt in range(5):
        # A reader may remove the (momentarily empty) directory at any point here.
        try:
            os.makedirs(d, exist_ok=True)
            np.save(path, arr)
            break
        except (FileNotFoundError, FileExistsError):
            if attempt == 4:
                raise
    REGISTRY.write(d, arr.nbytes, 1)
    return path


def keep_or_spill(
    arr: np.ndarray, kept: int, reserve: int, directory: str | None, kind: str, name: str
) -> tuple[np.ndarray | str, int, str | None]:
    """Keep ``arr`` in memory while ``kept + arr.nbytes`` fits ``reserve``, else spill it.

    Returns ``(the array or its path, bytes kept now, the spill directory)``; the
    directory is made up (:func:`new_dir`) at the first spill and carried along
    the producing chain with the running total.  ``kind`` names the directory,
    ``name`` the file.
    """
    if kept + arr.nbytes <= reserve:
        return arr, kept + arr.nbytes, directory
    directory = directory or new_dir(kind)
    return spill(os.path.join(directory, name), arr), kept, directory


def take(obj: np.ndarray | str) -> np.ndarray:
    """The array itself, or the spilled array read back (its file is deleted)."""
    if not isinstance(obj, str):
        return obj
    try:
        arr = np.load(obj)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"dask_sweep: the spilled intermediate {obj} is missing. Spill files live under "
            "dask's 'temporary-directory'; under distributed on several machines that "
            "directory must be shared by the workers, and the run must not be restarted "
            "halfway."
        ) from e
    os.remove(obj)
    REGISTRY.read(os.path.dirname(obj), arr.nbytes, 1)
    return arr


def load(obj: np.ndarray | str) -> np.ndarray:
    """The array itself, or the spilled array read back (its file is kept for later reads)."""
    if not isinstance(obj, str):
        return obj
    arr = np.load(obj)
    REGISTRY.read(os.path.dirname(obj), arr.nbytes, 1)
    return arr


def remove_tree(path: str | None) -> None:
    """Remove a spill directory and whatever is left in it (the end of a run)."""
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    with _LOCK:
        _CREATED.discard(path)


def remove_dir(path: str | None) -> None:
    """Remove a spill directory if it is empty (its last file was read)."""
    if path is None:
        return
    try:
        os.rmdir(path)
    except OSError:
        return
    with _LOCK:
        _CREATED.discard(path)


@atexit.register
def _cleanup() -> None:  # pragma: no cover - runs at interpreter exit
    for path in list(_CREATED):
        shutil.rmtree(path, ignore_errors=True)
