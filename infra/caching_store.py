"""A zarr v3 store that serves chosen keys of a remote store from a node-local :class:`infra.object_cache.ObjectCache`
(whole objects fetched once per node and verified; byte ranges read from the local file) and every other key from
the remote, counting the bytes it read from the remote."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from infra.object_cache import ObjectCache, ObjectVerifyError

logger = logging.getLogger(__name__)


def _range(byte_range: ByteRequest | None) -> tuple[int, int | None]:
    """A zarr byte request as slice bounds ``(start, stop)`` (a suffix as a negative start)."""
    if byte_range is None:
        return 0, None
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, None
    if isinstance(byte_range, SuffixByteRequest):
        return -byte_range.suffix, None
    raise TypeError(f"unsupported byte request {byte_range!r}")


_POOL: ThreadPoolExecutor | None = None
_POOL_MUTEX = threading.Lock()


def _local_pool() -> ThreadPoolExecutor:
    """The threads that read (and on first use fetch) local copies for :class:`CachingStore`, one pool per
    process."""
    global _POOL
    with _POOL_MUTEX:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(8, thread_name_prefix="local-cache-read")
        return _POOL


class CachingStore(WrapperStore[Store]):
    """A read store over ``store`` that serves the keys ``local(key)`` selects from an :class:`ObjectCache` (whole
    objects fetched once per node, verified by ``verify``; byte ranges read from the local file) and every other key
    from ``store``. With ``cache`` None it only counts. ``remote_bytes`` counts every byte read from the remote
    (whole-object fetches and direct reads).

    Args:
        store: the remote store (e.g. :func:`infra.zarr_store.zarr_store` of the URL).
        fetch: ``fetch(key) -> bytes``, the whole object from the remote (synchronous, retried by the caller).
        cache: the node-local cache, or None.
        local: which keys to serve locally (e.g. the data objects of complete units in the keep set).
        verify: ``verify(key, data)`` raises unless ``data`` is the object ``key``.
    """

    def __init__(self, store: Store, fetch: Callable[[str], bytes] | None = None, cache: ObjectCache | None = None,
                 local: Callable[[str], bool] | None = None,
                 verify: Callable[[str, bytes], None] | None = None) -> None:
        super().__init__(store)
        if cache is not None and (fetch is None or local is None or verify is None):
            raise ValueError("a CachingStore with a cache needs fetch, local and verify")
        self.cache, self._fetch, self._local, self._verify = cache, fetch, local, verify
        self.remote_bytes = 0
        self._mutex = threading.Lock()

    def _with_store(self, store: Store) -> CachingStore:
        return type(self)(store, self._fetch, self.cache, self._local, self._verify)

    def _remote(self, n: int) -> None:
        with self._mutex:
            self.remote_bytes += n

    def is_local(self, key: str) -> bool:
        """Whether ``key`` is served from the local cache."""
        return self.cache is not None and self._local(key) and self.cache.holds(key)

    def fetch_local(self, key: str) -> None:
        """Make sure the local copy of ``key`` exists (fetch and verify it otherwise); synchronous, any thread. A
        fetch that fails verification is fetched once more (a transfer may have been damaged), then refused."""
        try:
            self.cache.get(key, lambda: self._counted_fetch(key), self._verify)
        except ObjectVerifyError as err:
            logger.warning("local cache: %s; fetching it once more", err)
            self.cache.get(key, lambda: self._counted_fetch(key), self._verify)

    def _counted_fetch(self, key: str) -> bytes:
        data = self._fetch(key)
        self._remote(len(data))
        return data

    def _read_local(self, key: str, start: int, stop: int | None) -> bytes:
        for _ in range(2):
            self.fetch_local(key)
            try:
                return self.cache.read(key, start, stop)
            except FileNotFoundError:  # deleted since this process checked it (a corrupt copy replaced): again
                self.cache.forget(key)
        raise FileNotFoundError(f"{self.cache.path(key)} vanished twice while being read")

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        """The bytes of ``key`` (a range of them), from the local cache when selected, else from the remote."""
        if not self.is_local(key):
            buf = await self._store.get(key, prototype, byte_range)
            if buf is not None:
                self._remote(len(buf))
            return buf
        # Our own threads, not the event loop's default executor: a fetch verifies by decoding through zarr, whose
        # codecs need that executor, so local reads waiting on the fetch's lock must not fill it.
        data = await asyncio.get_running_loop().run_in_executor(_local_pool(), self._read_local, key,
                                                                *_range(byte_range))
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        """Each (key, range) through :meth:`get`."""
        return list(await asyncio.gather(*(self.get(key, prototype, r) for key, r in key_ranges)))

    def __repr__(self) -> str:
        return f"CachingStore({self._store!r}, cache={None if self.cache is None else str(self.cache.dir)!r})"

    def __eq__(self, value: Any) -> bool:
        return isinstance(value, CachingStore) and self._store == value._store and self.cache is value.cache
