"""Zarr v3 stores and Ray Train storage on any fsspec URL, with the environment's endpoint and region.

A store on an object store retries transient failures like every helper of :mod:`infra.storage`
(:class:`RetryingFsspecStore`); a local path gets zarr's own :class:`~zarr.storage.LocalStore`.

An object-store store's filesystem is asynchronous and runs on zarr's event loop; s3fs closes the HTTP session of
such a filesystem only when told to (its own finaliser covers synchronous instances). Each store's session is closed
when the store is garbage-collected, and :func:`close_sessions` closes those still open at exit, before zarr stops
its loop, so a process that read a cache (a loader worker, an actor) exits without aiohttp's "Unclosed client
session".
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import weakref
from collections.abc import Iterable
from typing import Any

import fsspec
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import SyncError, sync
from zarr.storage import FsspecStore, LocalStore

from infra.retry import with_retries_async
from infra.storage import is_local, protocol_of, resolve, storage_options

logger = logging.getLogger(__name__)
_PENDING: set[asyncio.Future] = set()  # closes scheduled on zarr's loop, referenced until done
_STORES: weakref.WeakValueDictionary[int, RetryingFsspecStore] = weakref.WeakValueDictionary()  # open ones, by id


class RetryingFsspecStore(FsspecStore):
    """An :class:`~zarr.storage.FsspecStore` that retries transient failures (:func:`with_retries_async`).

    ``get``, ``get_partial_values``, ``exists``, ``getsize``, ``set`` and ``delete`` are retried with
    :data:`~infra.retry.DEFAULT_RETRY` and end in :class:`~infra.retry.StorageError` naming the key. Called inside a
    :func:`~infra.retry.with_retries` loop (a writer retrying a whole, idempotent assignment) each makes one attempt,
    so attempts never multiply.
    """

    def _url(self, key: str) -> str:
        return f"{self.fs.unstrip_protocol(self.path)}/{key}"

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        """Retried :meth:`FsspecStore.get`."""
        return await with_retries_async("read", self._url(key), lambda: super(RetryingFsspecStore, self).get(
            key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        """Retried :meth:`FsspecStore.get_partial_values` (the whole batch is re-requested)."""
        key_ranges = list(key_ranges)
        url = self._url(key_ranges[0][0]) if key_ranges else self._url("")
        return await with_retries_async("read", url, lambda: super(RetryingFsspecStore, self).get_partial_values(
            prototype, key_ranges))

    async def exists(self, key: str) -> bool:
        """Retried :meth:`FsspecStore.exists`."""
        return await with_retries_async("stat", self._url(key), lambda: super(RetryingFsspecStore, self).exists(key))

    async def getsize(self, key: str) -> int:
        """Retried :meth:`FsspecStore.getsize`."""
        return await with_retries_async("stat", self._url(key),
                                        lambda: super(RetryingFsspecStore, self).getsize(key))

    async def set(self, key: str, value: Buffer, byte_range: tuple[int, int] | None = None) -> None:
        """Retried :meth:`FsspecStore.set` (a whole-object PUT: idempotent)."""
        await with_retries_async("write", self._url(key), lambda: super(RetryingFsspecStore, self).set(
            key, value, byte_range))

    async def delete(self, key: str) -> None:
        """Retried :meth:`FsspecStore.delete`."""
        await with_retries_async("delete", self._url(key), lambda: super(RetryingFsspecStore, self).delete(key))


def _close_session(fs: Any) -> None:
    """Close ``fs``'s HTTP session (s3fs: its aiobotocore client), if it opened one; a later request opens another."""
    creator = getattr(fs, "_s3creator", None)
    if creator is None:
        return
    fs._s3creator = fs._s3 = None
    closing = creator.__aexit__(None, None, None)
    try:
        sync(closing, timeout=10)  # on zarr's loop, which the session belongs to
    except SyncError:  # dropped on zarr's own loop thread: it cannot wait there, so schedule the close
        closing.close()
        task = asyncio.ensure_future(creator.__aexit__(None, None, None))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)
    except Exception as exc:  # at exit or in a finaliser: report, never raise
        logger.debug("closing an object-store session: %r", exc)


def close_sessions() -> None:
    """Close the HTTP sessions of every object-store zarr store of this process that is still open (runs at exit)."""
    for store in list(_STORES.values()):
        _close_session(store.fs)


atexit.register(close_sessions)  # after zarr's own handler is registered, so it runs before zarr stops its loop


def zarr_store(url: str, read_only: bool = False) -> Store:
    """A zarr v3 store rooted at ``url``: LocalStore for local paths, :class:`RetryingFsspecStore` otherwise.

    The store owns a fresh filesystem instance (``skip_instance_cache``), so create it inside the process that uses
    it (each DataLoader worker / Ray actor), never before a fork.
    """
    if is_local(url):
        _, path = resolve(url)
        return LocalStore(path, read_only=read_only)
    opts = {"skip_instance_cache": True, **storage_options(protocol_of(url))}
    store = RetryingFsspecStore.from_url(str(url), storage_options=opts, read_only=read_only)
    _STORES[id(store)] = store
    # Closed when collected; at exit close_sessions does it, before zarr stops its loop.
    weakref.finalize(store, _close_session, store.fs).atexit = False
    return store


def ray_storage(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` from a local path or fsspec URL.

    Local paths are made absolute and need no filesystem. Remote URLs get a pyarrow filesystem wrapping an fsspec
    filesystem with :mod:`infra.storage`'s options (so the same endpoint/region environment applies) and a
    bucket-relative path.
    """
    if is_local(url):
        return os.path.abspath(url.removeprefix("file://")), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    protocol = protocol_of(url)
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **storage_options(protocol))
    return url.split("://", 1)[1].rstrip("/"), PyFileSystem(FSSpecHandler(fs))
