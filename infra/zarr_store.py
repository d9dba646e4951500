"""Zarr v3 stores and Ray Train storage on any fsspec URL, with the environment's endpoint and region.

A store on an object store retries transient failures like every helper of :mod:`infra.storage`
(:class:`RetryingFsspecStore`); a local path gets zarr's own :class:`~zarr.storage.LocalStore`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import fsspec
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore

from infra.retry import with_retries_async
from infra.storage import is_local, protocol_of, resolve, storage_options


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


def zarr_store(url: str, read_only: bool = False) -> Store:
    """A zarr v3 store rooted at ``url``: LocalStore for local paths, :class:`RetryingFsspecStore` otherwise.

    The store owns a fresh filesystem instance (``skip_instance_cache``), so create it inside the process that uses
    it (each DataLoader worker / Ray actor), never before a fork.
    """
    if is_local(url):
        _, path = resolve(url)
        return LocalStore(path, read_only=read_only)
    opts = {"skip_instance_cache": True, **storage_options(protocol_of(url))}
    return RetryingFsspecStore.from_url(str(url), storage_options=opts, read_only=read_only)


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
