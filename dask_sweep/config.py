"""Settings under ``sweep.*`` in :mod:`dask.config`, read when a pass runs.

Defaults live in ``sweep.yaml`` next to this file.  :class:`SweepSettings` is the
resolved, validated form that travels with an optimiser object (under
``distributed`` the optimiser runs on the scheduler, which does not see the
client's config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

import dask
import yaml

from dask_sweep.errors import SweepConfigError

_fn = os.path.join(os.path.dirname(__file__), "sweep.yaml")
with open(_fn) as _f:
    _defaults = yaml.safe_load(_f)
dask.config.update_defaults(_defaults)

FALLBACKS = ("raise", "warn", "silent")


def parse_bytes(value: Any, name: str = "memory_limit", *, allow_zero: bool = False) -> int:
    """Return a byte count from an int or a string such as ``"512MiB"``.

    >>> parse_bytes("1KiB")
    1024
    """
    if isinstance(value, bool):
        raise SweepConfigError(
            f"Expected {name} as bytes or a string like '512MiB'. Got {value!r}."
        )
    if isinstance(value, (int, float)):
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(dask.utils.parse_bytes(value))
        except (ValueError, TypeError) as e:
            raise SweepConfigError(
                f"Expected {name} as bytes or a string like '512MiB'. Got {value!r} instead."
            ) from e
    else:
        raise SweepConfigError(
            f"Expected {name} as bytes or a string like '512MiB'. Got {type(value).__name__}."
        )
    if n < 0 or (n == 0 and not allow_zero):
        raise SweepConfigError(f"Expected a positive {name}. Got {value!r} instead.")
    return n


@dataclass(frozen=True)
class SweepSettings:
    """Resolved settings of one sweep pass.

    Parameters
    ----------
    memory_limit
        Budget in bytes for ring buffers, slabs in flight and kernel temporaries.
    fallback
        ``"raise"``, ``"warn"`` or ``"silent"``: what happens when a recognised
        pattern cannot be swept within the budget.
    axis
        Sweep axis, or ``None`` for the axis the data is laid out on.
    threads
        Threads used inside one slab task.
    target_slab_bytes
        Input bytes one slab task aims at.
    reblock
        Let kernels proven block-invariant choose slab boundaries from the budget.
    tune_malloc
        Fix glibc's mmap/trim thresholds so freed slabs leave the process at once.
    runtime_overhead
        Resident bytes a sweep needs beyond its buffers, added to every projection.
    task_overhead
        Resident bytes per dask task for the whole run (graph and scheduler state),
        counted per slab by the ndimage plans.
    key_overhead
        Resident bytes per key of a graph the plugin rewrites (the optimised graph
        and the local scheduler's state), counted by every plugin plan for all the
        keys the rewritten graph keeps.
    segments
        Chains a sweep is cut into, run at the same time (``None``: the threads of
        all ``distributed`` workers, as the budget allows; one chain on the local
        schedulers).
    """

    memory_limit: int = 1 << 30
    fallback: str = "warn"
    axis: int | None = None
    threads: int = 2
    target_slab_bytes: int = 64 << 20
    reblock: bool = True
    tune_malloc: bool = True
    runtime_overhead: int = 3 << 20
    task_overhead: int = 5 << 10
    key_overhead: int = 3 << 10
    segments: int | None = None

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise SweepConfigError(
                f"Expected sweep.fallback to be one of {FALLBACKS}. Got {self.fallback!r} instead."
            )
        if self.axis is not None and (not isinstance(self.axis, int) or self.axis < 0):
            raise SweepConfigError(
                f"Expected sweep.axis to be a non-negative int or None. Got {self.axis!r}."
            )
        if not isinstance(self.threads, int) or self.threads < 1:
            raise SweepConfigError(f"Expected sweep.threads >= 1. Got {self.threads!r} instead.")
        if self.segments is not None and (not isinstance(self.segments, int)
                                          or self.segments < 1):
            raise SweepConfigError(
                f"Expected sweep.segments >= 1 or None (auto). Got {self.segments!r} instead."
            )

    @classmethod
    def resolve(cls, **overrides: Any) -> SweepSettings:
        """Settings from ``dask.config`` (``sweep.*``) with explicit overrides on top."""
        def cfg(key: str, default: Any) -> Any:
            # dask.config.get canonicalises '-' / '_' (DASK_SWEEP__MEMORY_LIMIT becomes
            # sweep.memory_limit); reading the raw dict would miss those spellings
            return dask.config.get(f"sweep.{key}", default)

        threads = cfg("threads", None) or os.cpu_count() or 1
        base = dict(
            memory_limit=parse_bytes(cfg("memory-limit", "1GiB"), "sweep.memory-limit"),
            fallback=cfg("fallback", "warn"),
            axis=cfg("axis", None),
            threads=int(threads),
            target_slab_bytes=parse_bytes(
                cfg("target-slab-bytes", "64MiB"), "sweep.target-slab-bytes"
            ),
            reblock=bool(cfg("reblock", True)),
            tune_malloc=bool(cfg("tune-malloc", True)),
            runtime_overhead=parse_bytes(
                cfg("runtime-overhead", "3MiB"), "sweep.runtime-overhead", allow_zero=True
            ),
            task_overhead=parse_bytes(
                cfg("task-overhead", "5KiB"), "sweep.task-overhead", allow_zero=True
            ),
            key_overhead=parse_bytes(
                cfg("key-overhead", "3KiB"), "sweep.key-overhead", allow_zero=True
            ),
            segments=cfg("segments", None),
        )
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in {f.name for f in fields(cls)}:
                raise SweepConfigError(
                    f"Unknown sweep setting {k!r}. Expected one of "
                    f"{sorted(f.name for f in fields(cls))}."
                )
            overheads = ("runtime_overhead", "task_overhead", "key_overhead")
            if k in ("memory_limit", "target_slab_bytes", *overheads):
                v = parse_bytes(v, k, allow_zero=k in overheads)
            base[k] = v
        return cls(**base)

    def with_(self, **changes: Any) -> SweepSettings:
        return replace(self, **changes)


def temporary_directory() -> str:
    """dask's ``temporary-directory`` setting, or the system's temporary directory."""
    import tempfile

    return dask.config.get("temporary-directory", None) or tempfile.gettempdir()
