"""A node-local directory cache of whole, immutable objects (:class:`ObjectCache`); the zarr v3 store that serves
chosen keys of a remote store from it is :class:`infra.caching_store.CachingStore`.

Layout under ``root``: one directory per namespace (e.g. a cache key), so several caches share one directory::

    <root>/<namespace>/<quoted key>          the object's bytes (present only once complete and verified)
    <root>/<namespace>/<quoted key>@meta     its sidecar: {"key", "size", "sha256"} (raw bytes' SHA-256)
    <root>/<namespace>/.locks/<quoted key>   the object's lock file (``fcntl.flock``)
    <root>/<namespace>/.tmp/<quoted key>@*   temporary files of writes in progress (or of killed writers)

Keys are quoted with ``urllib.parse.quote(key, safe="")``, which never produces ``@`` or ``/``.

Many processes (every rank and DataLoader worker of a node) and threads may use one directory at once:

* an object is fetched by one process at a time: the fetcher holds the object's exclusive ``flock`` while it
  fetches, verifies and writes; a second process waits on the lock and then finds the file;
* a write goes to ``.tmp/``, is fsync'd and renamed into place (sidecar first, data last: the data file's
  existence is the commit), so no partial file is ever visible under the object's name. A fetcher killed mid-write
  leaves at most a temporary file (its lock dies with it); the next fetch of that object deletes it;
* nothing unverified is stored: the caller's ``verify`` callback checks the fetched bytes first (the cache knows
  no format);
* on each process's first use of a local file its size is compared with the sidecar (one ``stat``); with
  ``verify_local`` the whole file is hashed and compared too. A corrupt or truncated file is deleted, with a
  warning naming it, and fetched again.

The size bound is a fixed set, not recency: :meth:`ObjectCache.reserve` takes the namespace's keep set (sized to
fit ``max_bytes``, e.g. by :func:`fixed_set`), deletes this namespace's files outside it and evicts other
namespaces' objects, least recently used first (sidecar mtime, touched on each process's first use), until the
directory fits the bound once the keep set is complete. Only keys of the keep set are stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

logger = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_META = "@meta"
_STAMP = ".reserved.json"
_HASH_BLOCK = 1 << 22


class ObjectVerifyError(ValueError):
    """A fetched object does not match what its owner says it must be; it was not stored."""


@dataclass
class CacheCounters:
    """Per-process byte counters of one :class:`ObjectCache` (monotonic; read deltas around a piece of work).

    Attributes:
        fetched_bytes: object bytes fetched from the object store into the directory (whole objects).
        fetches: objects fetched.
        local_bytes: bytes served from local files.
        refetched: local files found corrupt or truncated, deleted and fetched again.
    """

    fetched_bytes: int = 0
    fetches: int = 0
    local_bytes: int = 0
    refetched: int = 0


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _object_lock(folder: Path, key: str, blocking: bool = True) -> Iterator[bool]:
    """Hold the exclusive flock of ``key`` in a namespace ``folder`` (yields False when ``blocking`` is off and
    another holder has it). flock locks belong to the open file, so threads of one process exclude each other too."""
    (folder / ".locks").mkdir(exist_ok=True)
    fd = os.open(folder / ".locks" / quote(key, safe=""), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def fixed_set(candidates: Iterable[tuple[str, int]], max_bytes: int | None) -> dict[str, int]:
    """The objects to keep locally under ``max_bytes``: ``candidates`` (key, size) in priority order, each taken
    when it still fits (a larger one skipped leaves room for smaller ones after it). Deterministic: every process
    computes the same set from the same list and bound, without coordination."""
    keep: dict[str, int] = {}
    used = 0
    for key, size in candidates:
        if max_bytes is None or used + size <= max_bytes:
            keep[key] = int(size)
            used += int(size)
    return keep


class ObjectCache:
    """Whole immutable objects of one namespace in a node-local directory, shared by processes and threads.

    Args:
        root: the node-local directory (created if missing).
        namespace: this cache's sub-directory (``[A-Za-z0-9._-]``, e.g. a cache key).
        max_bytes: bound on the whole directory (every namespace); None: unbounded. Call :meth:`reserve` before
            :meth:`get` when bounded.
        verify_local: hash each local file fully on its first use in this process (default: size check only).
    """

    def __init__(self, root: str | Path, namespace: str, max_bytes: int | None = None,
                 verify_local: bool = False) -> None:
        if not _NAMESPACE.match(namespace):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.root, self.namespace = Path(root), namespace
        self.dir = self.root / namespace
        self.max_bytes, self.verify_local = max_bytes, verify_local
        for sub in (self.dir / ".locks", self.dir / ".tmp"):
            sub.mkdir(parents=True, exist_ok=True)
        self.counters = CacheCounters()
        self.keep: dict[str, int] | None = None
        self._seen: set[str] = set()
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------------------------------ naming, locks
    def path(self, key: str) -> Path:
        """Where the local copy of ``key`` lives (it exists only once complete and verified)."""
        return self.dir / quote(key, safe="")

    def _meta(self, key: str) -> Path:
        return self.dir / (quote(key, safe="") + _META)

    def _count(self, **deltas: int) -> None:
        with self._mutex:
            for name, value in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    # -------------------------------------------------------------------------------------------- get, read
    def holds(self, key: str) -> bool:
        """Whether ``key`` may be stored here (in the keep set, or any key when unbounded without one)."""
        return key in self.keep if self.keep is not None else self.max_bytes is None

    def get(self, key: str, fetch: Callable[[], bytes], verify: Callable[[str, bytes], None]) -> Path:
        """The local file of ``key``, fetched (by one process of the node) and verified if it is not here yet.

        Args:
            key: the object's key.
            fetch: returns the object's bytes from the object store.
            verify: raises (e.g. :class:`ObjectVerifyError`) unless the bytes are the object's.

        Raises:
            KeyError: a bounded cache and ``key`` outside its keep set.
        """
        if not self.holds(key):
            raise KeyError(f"{self.dir}: {key} is not in this cache's keep set")
        path = self.path(key)
        with self._mutex:
            seen = key in self._seen
        if (seen and path.exists()) or self._usable(key, locked=False):
            return path
        with _object_lock(self.dir, key):
            if self._usable(key, locked=True):  # another process fetched it while we waited
                return path
            for stale in (self.dir / ".tmp").glob(quote(key, safe="") + "@*"):
                stale.unlink(missing_ok=True)  # left by a killed fetcher: we hold the lock, nobody writes it now
            data = fetch()
            verify(key, data)
            self._write(key, data)
            self._count(fetched_bytes=len(data), fetches=1)
        with self._mutex:
            self._seen.add(key)
        return path

    def _usable(self, key: str, locked: bool) -> bool:
        """Whether the local file of ``key`` exists and matches its sidecar (size; SHA-256 with ``verify_local``).

        A mismatch found while holding the lock deletes the file (warning naming it); without the lock it only
        reports False (the caller takes the lock and checks again)."""
        path, meta_path = self.path(key), self._meta(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        try:
            meta = json.loads(meta_path.read_bytes())
        except (FileNotFoundError, ValueError):
            meta = None
        problem = None
        if meta is None:
            problem = "no readable sidecar"
        elif size != meta["size"]:
            problem = f"{size} bytes, sidecar says {meta['size']}"
        elif self.verify_local and _sha256_file(path) != meta["sha256"]:
            problem = "SHA-256 differs from its sidecar"
        if problem is not None:
            if locked:
                logger.warning("local cache: %s (%s) is corrupt: %s; deleted, fetching it again", path, key, problem)
                path.unlink(missing_ok=True)
                self._count(refetched=1)
            return False
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # last use, for the LRU eviction of other namespaces
        with self._mutex:
            self._seen.add(key)
        return True

    def _write(self, key: str, data: bytes) -> None:
        """Sidecar, then data: each to ``.tmp/``, fsync'd and renamed into place; then the directory fsync'd."""
        tmp = self.dir / ".tmp" / f"{quote(key, safe='')}@{os.getpid()}-{uuid.uuid4().hex[:8]}"
        meta = json.dumps({"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode()
        for payload, target, name in ((meta, self._meta(key), tmp.with_name(tmp.name + ".meta")),
                                      (data, self.path(key), tmp)):
            with open(name, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, target)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes ``[start:stop]`` of the local file of ``key`` (slice semantics; a negative ``start`` counts from
        the end). Raises FileNotFoundError when it is not here (:meth:`get` first)."""
        with open(self.path(key), "rb") as f:
            if start < 0:
                f.seek(start, os.SEEK_END)
            else:
                f.seek(start)
            data = f.read(-1 if stop is None else max(0, stop - f.tell()))
        self._count(local_bytes=len(data))
        return data

    def forget(self, key: str) -> None:
        """Drop ``key`` from this process's checked set (its next use checks the file again)."""
        with self._mutex:
            self._seen.discard(key)

    # -------------------------------------------------------------------------------------------- the bound
    def reserve(self, keep: Mapping[str, int]) -> None:
        """Make this namespace's keep set the only objects it stores, and room for it under ``max_bytes``.

        Deletes this namespace's files outside ``keep`` and evicts other namespaces' objects, least recently used
        first, until their bytes plus ``sum(keep)`` fit. Done once per directory state: a stamp records the keep
        set and the other namespaces seen, and a later call with the same ones returns at once.

        Raises:
            ValueError: ``sum(keep)`` exceeds ``max_bytes``.
        """
        planned = sum(keep.values())
        if self.max_bytes is not None and planned > self.max_bytes:
            raise ValueError(f"{self.dir}: keep set of {planned} bytes exceeds max_bytes {self.max_bytes}")
        self.keep = dict(keep)
        if self.max_bytes is None:
            return
        digest = hashlib.sha256(json.dumps([sorted(keep.items()), self.max_bytes]).encode()).hexdigest()
        stamp = {"digest": digest, "others": self._other_namespaces()}
        try:
            if json.loads((self.dir / _STAMP).read_bytes()) == stamp:
                return
        except (FileNotFoundError, ValueError):
            pass
        fd = os.open(self.root / ".evict.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._drop_outside(self.keep)
            self._evict_others(self.max_bytes - planned)
            stamp["others"] = self._other_namespaces()
            (self.dir / _STAMP).write_text(json.dumps(stamp))
        finally:
            os.close(fd)

    def _other_namespaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name != self.namespace
                      and not p.name.startswith("."))

    def _objects(self, folder: Path) -> Iterator[tuple[str, os.stat_result, Path]]:
        """(key, stat of its sidecar, data path) of every stored object in a namespace folder."""
        for entry in os.scandir(folder):
            if entry.name.endswith(_META) and entry.is_file():
                data = folder / entry.name[: -len(_META)]
                yield unquote(entry.name[: -len(_META)]), entry.stat(), data

    def _delete(self, folder: Path, key: str, data: Path) -> int:
        """Delete one object of ``folder`` under its lock (skipped, 0, while another process holds it)."""
        with _object_lock(folder, key, blocking=False) as got:
            if not got:
                return 0
            size = data.stat().st_size if data.exists() else 0
            data.unlink(missing_ok=True)
            (folder / (data.name + _META)).unlink(missing_ok=True)
            return size

    def _drop_outside(self, keep: Mapping[str, int]) -> None:
        dropped = sum(self._delete(self.dir, key, data) for key, _, data in list(self._objects(self.dir))
                      if key not in keep)
        if dropped:
            logger.info("local cache %s: deleted %d bytes outside the keep set", self.dir, dropped)

    def _evict_others(self, room: int) -> None:
        found = []
        for name in self._other_namespaces():
            folder = self.root / name
            found += [(st.st_mtime, folder, key, data) for key, st, data in self._objects(folder)]
        used = sum(data.stat().st_size for *_, data in found if data.exists())
        evicted = 0
        for _, folder, key, data in sorted(found, key=lambda f: f[0]):
            if used <= room:
                break
            freed = self._delete(folder, key, data)
            used, evicted = used - freed, evicted + freed
        if evicted:
            logger.info("local cache %s: evicted %d bytes of other namespaces (least recently used first)",
                        self.root, evicted)
