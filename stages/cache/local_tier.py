"""A target cache's node-local tier: which whole objects a node keeps on local disk, their verification against the
unit markers, and prefetching from the known schedule (the directory cache itself is :mod:`infra.object_cache`).

**Granularity.** Whole stored objects: a unit's object of one array (``features/c/<u>/0/0/0`` is the unit's shard
with all V views). Only the data objects of complete units are kept; metadata, markers and the failures tables are
always read from the cache's store.

**Verification.** The first fetch of an object on a node is checked against its unit's marker: its size against
``stored_bytes[key]``, then it is decoded with the array's own zarr metadata (an in-memory array) and the SHA-256 of
the unit's rows compared with ``sha256[array]``. A mismatch is fetched once more, then refused
(:class:`~infra.object_cache.ObjectVerifyError` naming the object); nothing unverified is served.

**Which objects (the fixed set).** Every epoch touches every unit (one view per image), so recency says nothing
and an LRU smaller than the cache evicts each object before its next use. Instead each process computes the same
set alone, from one listing of the cache (the sizes of the complete units' objects) and the bound: objects ranked by
the fraction of them an epoch reads when they are not kept (``views``/``topk_index``/``valid`` chunks hold every
view: 1; a ``features`` inner chunk is one view of one block: 1/V; an ``attn_logits`` inner chunk spans m blocks:
1 - (1 - 1/V)^m), then by unit, taken while they fit (:func:`infra.object_cache.fixed_set`). An object whose run
(``epochs`` passes) would read less of it than all of it by byte ranges (epochs × fraction < 1) is not kept: a
whole fetch would cost more than the chunks. The rest is read by byte range straight from the store, every time.

**Prefetch.** The reader knows its next steps (:meth:`stages.train.plan.SamplePlan.rank_batch`); :meth:`LocalTier.
prefetch` fetches the kept objects of their units on a background thread, and :meth:`LocalTier.settle` waits for a
step's fetches before its batch is reported, so every fetched byte is counted in some batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from infra import storage
from infra.caching_store import CachingStore
from infra.object_cache import ObjectCache, ObjectVerifyError, fixed_set

if TYPE_CHECKING:
    from zarr.abc.store import Store

    from stages.cache.spec import CacheSpec
    from stages.cache.store import TargetCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalCacheSettings:
    """Where and how much of a remote cache a node keeps locally.

    Attributes:
        dir: the node-local directory (shared by every cache: one sub-directory per cache key); None: off (bytes
            are still counted).
        max_bytes: bound on the directory; None: unbounded.
        verify_local: hash each local file fully on its first use in each process (default: a size check).
        epochs: passes the run makes over the cache (decides whether a whole object is worth fetching).
    """

    dir: str | None = None
    max_bytes: int | None = None
    verify_local: bool = False
    epochs: int = 1

    @classmethod
    def of(cls, value: LocalCacheSettings | Mapping[str, Any] | None, epochs: int = 1) -> LocalCacheSettings:
        """Settings from a config/job dict (``dir``, ``max_bytes``, ``verify_local``) and the run's epochs."""
        if isinstance(value, LocalCacheSettings):
            return value
        return cls(**{"epochs": epochs, **dict(value or {})})


def epoch_read_fraction(chunks: tuple[int, ...], shape: tuple[int, ...], views: int, block: int) -> float:
    """Expected fraction of a unit object one epoch reads when it is not kept: one view per block, a chunk of m
    blocks of one view is read when any of its blocks uses that view (1 - (1 - 1/V)^m); a chunk holding every
    view is read whole."""
    if len(shape) < 2 or chunks[1] >= shape[1]:
        return 1.0
    m = max(1, chunks[0] // max(1, block))
    return 1.0 - (1.0 - 1.0 / views) ** m


class LocalTier:
    """The node-local tier of one open :class:`~stages.cache.store.TargetCache` (one per process).

    Build it around the cache's remote store (:attr:`store` is what the cache opens), then :meth:`attach` it once
    the arrays are open.
    """

    def __init__(self, url: str, spec: CacheSpec, remote: Store, settings: LocalCacheSettings) -> None:
        self.url, self.spec, self.settings = url, spec, settings
        cache = None
        if settings.dir and storage.is_local(url):
            logger.info("%s is on a local path: train.local_cache.dir is not used (the cache is already local)", url)
        elif settings.dir:
            cache = ObjectCache(settings.dir, spec.key, settings.max_bytes, settings.verify_local)
        self.store = CachingStore(remote, fetch=self._fetch, cache=cache, local=self._is_object, verify=self._verify)
        self.objects: dict[str, tuple[int, str]] = {}  # data object key -> (unit, array)
        self.unit_keys: dict[int, list[str]] = {}
        self._markers: dict[int, dict[str, Any]] = {}
        self._arrays: dict[str, zarr.Array] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._mutex = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether objects are kept on local disk (a directory is set and the cache is remote)."""
        return self.store.cache is not None

    def attach(self, cache: TargetCache, arrays: Mapping[str, zarr.Array]) -> None:
        """Learn the complete units' objects (one listing) and reserve the node's fixed set of them."""
        self._arrays = dict(arrays)
        if not self.enabled:
            return
        sizes = storage.list_objects(self.url)
        done = sorted(int(k[len("units/"):-len(".done")]) for k in sizes
                      if k.startswith("units/") and k.endswith(".done") and k.count("/") == 1)
        block = int(arrays["features"].chunks[0])
        rank = {name: epoch_read_fraction(a.chunks, a.shape, self.spec.views_per_image, block)
                for name, a in arrays.items()}
        candidates = []
        for u in done:
            keys = cache.unit_objects(u)[: len(arrays)]
            self.unit_keys[u] = keys
            for name, key in zip(arrays, keys, strict=True):
                self.objects[key] = (u, name)
        for name in sorted(arrays, key=lambda n: -rank[n]):
            if self.settings.epochs * rank[name] < 1.0 - 1e-9:
                continue  # byte ranges over the whole run read less than the whole object
            i = list(arrays).index(name)
            candidates += [(self.unit_keys[u][i], sizes[self.unit_keys[u][i]]) for u in done
                           if self.unit_keys[u][i] in sizes]
        keep = fixed_set(candidates, self.settings.max_bytes)
        self.store.cache.reserve(keep)
        logger.info("local cache %s: keeps %d of %d objects (%d bytes; bound %s)", self.store.cache.dir, len(keep),
                    len(self.objects), sum(keep.values()), self.settings.max_bytes)

    def _is_object(self, key: str) -> bool:
        return key in self.objects

    def _fetch(self, key: str) -> bytes:
        return storage.read_bytes(storage.join(self.url, key))

    def _marker(self, unit: int) -> dict[str, Any]:
        with self._mutex:
            found = self._markers.get(unit)
        if found is None:
            found = json.loads(storage.read_bytes(storage.join(self.url, "units", f"{unit}.done")))
            with self._mutex:
                self._markers[unit] = found
        return found

    def _verify(self, key: str, data: bytes) -> None:
        """Raise :class:`ObjectVerifyError` unless ``data`` is the object ``key`` its unit's marker describes."""
        unit, name = self.objects[key]
        marker = self._marker(unit)
        expected = marker.get("stored_bytes", {}).get(key)
        if expected != len(data):
            raise ObjectVerifyError(f"{storage.redact_url(self.url)}/{key}: {len(data)} bytes, the marker of unit "
                                    f"{unit} says {expected}")
        proto = default_buffer_prototype()
        meta = self._arrays[name].metadata.to_buffer_dict(proto)
        inner = key[len(name) + 1:]
        mem = MemoryStore({**meta, inner: proto.buffer.from_bytes(data)}, read_only=True)
        try:
            rows = zarr.open_array(mem, mode="r", zarr_format=3)[marker["start"]:marker["stop"]]
        except Exception as err:  # a damaged object may not even decode (codec or shard-index checksum errors)
            raise ObjectVerifyError(f"{storage.redact_url(self.url)}/{key}: does not decode with the array's "
                                    f"metadata ({type(err).__name__}: {err})") from err
        digest = hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()
        if digest != marker["sha256"][name]:
            raise ObjectVerifyError(f"{storage.redact_url(self.url)}/{key}: decoded SHA-256 {digest[:16]}… differs "
                                    f"from the marker of unit {unit} ({marker['sha256'][name][:16]}…)")

    # ----------------------------------------------------------------------------------------------- prefetch
    def prefetch(self, step: int, rows: np.ndarray) -> None:
        """Fetch the kept objects of the units holding ``rows`` (step ``step``'s images) on a background thread."""
        if not self.enabled:
            return
        units = np.unique(np.asarray(rows, dtype=np.int64) // self.spec.unit_size).tolist()
        keys = [k for u in units for k in self.unit_keys.get(u, ()) if self.store.is_local(k)]
        if not keys or step in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="local-cache-prefetch")
        self._pending[step] = self._pool.submit(lambda: [self.store.fetch_local(k) for k in keys])

    def settle(self, step: int) -> None:
        """Wait for the prefetch of ``step`` (its errors are logged: the batch's own read repeats the fetch)."""
        future = self._pending.pop(step, None)
        if future is None:
            return
        try:
            future.result()
        except Exception as err:  # the synchronous read of the same objects raises it properly
            logger.warning("local cache: prefetch of step %d failed (%s: %s)", step, type(err).__name__, err)

    def counters(self) -> tuple[int, int]:
        """(bytes read from the cache's store, bytes served from the local directory) by this process so far."""
        local = self.store.cache.counters.local_bytes if self.enabled else 0
        return self.store.remote_bytes, local

    def close(self) -> None:
        """Finish outstanding prefetches and stop the thread."""
        for step in list(self._pending):
            self.settle(step)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
