"""Zarr store wrappers: byte counting, and refusing missing chunks.

:class:`CountingStore` measures what any zarr reader actually fetched from
storage (including graphs built by stock ``da.from_zarr``), so benchmarks can
compare stock dask and the sweep on the same footing.  ``StrictStore`` turns a
missing chunk key into an error at the moment zarr asks for it, instead of the
silent ``fill_value`` zarr would substitute; it costs no extra request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from dask_sweep.io.accounting import REGISTRY

__all__ = ["CountingStore", "MissingChunkError", "StrictStore", "is_metadata_key"]

_METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def is_metadata_key(key: str) -> bool:
    """Whether ``key`` names zarr metadata rather than a chunk or shard.

    >>> is_metadata_key("group/arr/zarr.json"), is_metadata_key("arr/c/0/0")
    (True, False)
    """
    return key.rsplit("/", 1)[-1] in _METADATA_NAMES


class MissingChunkError(FileNotFoundError):
    """A chunk key zarr asked for does not exist in the store."""


class _CheckingStore(WrapperStore[Store]):
    """Reads pass through :meth:`_seen` (``key``, the value or ``None``)."""

    def _seen(self, key: str, value: Buffer | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        self._seen(key, value)
        return value

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            self._seen(key, value)
        return values

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        # WrapperStore forwards this to the wrapped store, which would bypass get().
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


class CountingStore(_CheckingStore):
    """A zarr store that counts the keys and bytes fetched from the store it wraps.

    Parameters
    ----------
    store
        Any zarr v3 store (``LocalStore``, ``FsspecStore``, ``MemoryStore``...).
    name
        Id the counts are filed under in :mod:`dask_sweep.io.accounting`
        (default: ``str(store)``).  Copies of the store (pickled to a worker,
        re-opened read-only) report to the same id in their process.

    Examples
    --------
    >>> import zarr, dask.array as da
    >>> from zarr.storage import MemoryStore
    >>> store = CountingStore(MemoryStore(), name="doc-example")
    >>> z = zarr.create_array(store, shape=(4, 4), chunks=(2, 4), dtype="u1")
    >>> z[:] = 1
    >>> before = store.keys_read
    >>> int(da.from_zarr(z).sum().compute())
    16
    >>> store.keys_read - before
    2
    """

    def __init__(self, store: Store, name: str | None = None) -> None:
        super().__init__(store)
        self.name = name if name is not None else str(store)

    def _with_store(self, store: Store) -> CountingStore:
        return type(self)(store, name=self.name)

    def __repr__(self) -> str:
        return f"CountingStore({self._store!r}, name={self.name!r})"

    def __str__(self) -> str:
        return f"counting-{self._store}"

    def _seen(self, key: str, value: Buffer | None) -> None:
        if value is not None and not is_metadata_key(key):
            REGISTRY.read(self.name, len(value), (key,))

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        if not is_metadata_key(key):
            REGISTRY.write(self.name, len(value), 1)

    @property
    def bytes_read(self) -> int:
        """Chunk bytes fetched so far in this process (metadata excluded)."""
        return REGISTRY.get(self.name).bytes_read

    @property
    def keys_read(self) -> int:
        """Chunk (or shard, or shard-range) fetches so far in this process."""
        return REGISTRY.get(self.name).chunks_read

    @property
    def bytes_written(self) -> int:
        """Chunk bytes stored so far in this process."""
        return REGISTRY.get(self.name).bytes_written


class StrictStore(_CheckingStore):
    """Raise :class:`MissingChunkError` when zarr asks for a chunk key that is absent."""

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store)

    def _seen(self, key: str, value: Buffer | None) -> None:
        if value is None and not is_metadata_key(key):
            raise MissingChunkError(key)
