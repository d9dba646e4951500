"""fsspec plumbing shared by every stage: URLs in, bytes and zarr stores out.

Any fsspec URL works (``s3://``, ``gs://``, ``file://``, a plain local path, ``memory://``). Storage options come from
the environment only, never from arguments that could end up stored in a cache or a log:

* ``TEC_S3_ENDPOINT_URL`` (then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``): S3 endpoint, e.g. a MinIO or moto
  server. Credentials are resolved by botocore itself (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, ``~/.aws/credentials``, instance roles); this module never reads, stores or logs them.
* ``TEC_S3_REGION`` (then ``AWS_DEFAULT_REGION``): region name, optional.
* ``TEC_S3_CONNECT_TIMEOUT_S`` / ``TEC_S3_READ_TIMEOUT_S``: botocore's connect and read timeouts in seconds
  (botocore's default is 60 s each); a stalled request fails after this long and is retried.

Retries happen at two levels, both bounded. botocore retries each request itself (HTTP 500/502/503/504,
throttling, connection errors, timeouts), configured as usual by ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` or
``~/.aws/config`` (default "legacy": 5 attempts, random exponential back-off of at most 1+2+4+8 s). On top of that,
every helper here (and every zarr write the cache routes through :func:`with_retries`) retries a failure that is
still transient with :class:`RetryPolicy` (default 5 attempts, 0.2-3.2 s apart). With the defaults a persistent
outage of an object store therefore ends, after at most 25 requests and about 80 s, in :class:`StorageError`
naming the operation and the URL; a permanent error (missing object, access denied, bad request) ends at once.

Filesystem objects are not fork-safe (s3fs owns an event loop and an HTTP session). They are created with
``skip_instance_cache=True`` and memoised here per process id, so a forked child never reuses its parent's instance;
:func:`clear_filesystem_cache` drops them (tests call it between cases).

Writes are whole objects: locally through a temporary file and ``os.replace`` (atomic, fsync'd); on object stores a
PUT is atomic per object. Every helper retries transient failures (HTTP 5xx, throttling, connection resets, timeouts)
with bounded exponential back-off and then raises :class:`StorageError` naming the operation and the URL.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore

# ------------------------------------------------------------------------------------- secrets in URLs
# One owner for URL redaction (infra.redaction); re-exported here because every stored or shown URL passes through
# this module. Messages of the errors raised here name the redacted URL, and a failure on a URL that carries a
# secret is raised without its cause chain (whose third-party messages may repeat the URL as given).
from infra.redaction import REDACTED, RedactingFilter, has_secret, redact_text, redact_url  # noqa: F401

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ENDPOINT_VARS = ("TEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_VARS = ("TEC_S3_REGION", "AWS_DEFAULT_REGION")
_TIMEOUT_VARS = {"connect_timeout": "TEC_S3_CONNECT_TIMEOUT_S", "read_timeout": "TEC_S3_READ_TIMEOUT_S"}
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})
_TRANSIENT_ERRNOS = frozenset(
    {errno.EREMOTEIO, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
     errno.EAGAIN, errno.EPIPE}
)
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_NAMES = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
     "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError"}
)

_FS_CACHE: dict[tuple[int, str, tuple[tuple[str, str], ...]], fsspec.AbstractFileSystem] = {}


class StorageError(OSError):
    """An operation on a URL failed for good (after retries, or at once for a permanent error).

    Attributes:
        transient: True when the last failure was transient (the store was unreachable or answered 5xx on every
            attempt), False for a permanent error such as a refused permission or a malformed request.
    """

    transient: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential back-off: waits ``base_delay_s * 2**attempt`` capped at ``max_delay_s``.

    Attributes:
        attempts: total tries, including the first.
        base_delay_s: delay after the first failure.
        max_delay_s: cap on one delay.
    """

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.max_delay_s, self.base_delay_s * (2**attempt))


DEFAULT_RETRY = RetryPolicy()
# True while a with_retries() loop runs its operation: retries nested inside it (a zarr read that a retried zarr
# write makes) then make a single attempt, so that attempts never multiply across levels. contextvars reach zarr's
# event-loop thread because zarr's sync() schedules the coroutine from the calling thread's context.
_IN_RETRY_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("tec_storage_in_retry_loop", default=False)


def _policy(policy: RetryPolicy | None) -> RetryPolicy:
    """``policy``, or the module's :data:`DEFAULT_RETRY` looked up at call time."""
    return policy if policy is not None else DEFAULT_RETRY


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (``"file"`` for plain paths)."""
    scheme, sep, _ = str(url).partition("://")
    return scheme.lower() if sep else "file"


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return protocol_of(url) in ("file", "local")


def storage_options(protocol: str) -> dict[str, Any]:
    """Storage options for ``protocol`` read from the environment (endpoint, region, timeouts; never secrets).

    Args:
        protocol: an fsspec protocol, e.g. ``"s3"``.

    Returns:
        Keyword arguments for the fsspec filesystem constructor.
    """
    if protocol not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {}
    endpoint = _first_env(_ENDPOINT_VARS)
    region = _first_env(_REGION_VARS)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        opts["client_kwargs"] = {"region_name": region}
    timeouts = {}
    for option, name in _TIMEOUT_VARS.items():
        value = os.environ.get(name)
        if value:
            try:
                timeouts[option] = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if timeouts:
        opts["config_kwargs"] = timeouts
    return opts


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _cache_key(protocol: str, opts: dict[str, Any]) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    return os.getpid(), protocol, tuple(sorted((k, repr(v)) for k, v in opts.items()))


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """A synchronous fsspec filesystem for ``url``, memoised per process (never shared across fork)."""
    protocol = protocol_of(url)
    opts = storage_options(protocol)
    key = _cache_key(protocol, opts)
    fs = _FS_CACHE.get(key)
    if fs is None:
        # Listings must never be served from a cache: other processes write to the same prefixes.
        no_listing_cache = {"use_listings_cache": False} if protocol in _OBJECT_STORES else {}
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **no_listing_cache, **opts)
        _FS_CACHE[key] = fs
    return fs


def clear_filesystem_cache() -> None:
    """Forget every memoised filesystem, here and in fsspec's own instance cache."""
    _FS_CACHE.clear()
    for cls in {*fsspec.registry.values(), LocalFileSystem}:
        cls.clear_instance_cache()


def resolve(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split ``url`` into (filesystem, path inside it), with options from the environment."""
    fs = filesystem(url)
    return fs, fs._strip_protocol(str(url))


def join(url: str, *parts: str) -> str:
    """Join path components onto a URL with ``/`` (works for local paths and every fsspec scheme)."""
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception in its cause chain) looks like a transient storage failure.

    Transient: HTTP 5xx / throttling, connection errors, timeouts. Permanent: missing objects, permissions, bad
    arguments, everything else.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _is_transient_one(cur):
            return True
        if isinstance(cur, _PERMANENT_ERRORS):
            return False
        cur = cur.__cause__ or cur.__context__
    return False


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT_ERRORS):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return (isinstance(status, int) and status >= 500) or code in ("SlowDown", "Throttling")
    return False


def _give_up(op: str, url: str, exc: Exception, attempt: int, policy: RetryPolicy) -> StorageError | None:
    """The error to raise after failed attempt ``attempt`` (0-based), or None to retry (after logging it).

    Every URL in the message (``url``'s and any inside ``exc``'s text) is redacted."""
    shown, cause = redact_url(url), redact_text(f"{type(exc).__name__}: {exc}")
    if not is_transient(exc):
        return StorageError(f"{op} {shown} failed: {cause}")
    if attempt + 1 >= policy.attempts:
        err = StorageError(f"{op} {shown} failed after {policy.attempts} attempts (transient errors, the store "
                           f"stayed unavailable): {cause}")
        err.transient = True
        return err
    logger.warning("%s %s: transient %s, retry %d/%d in %.2fs", op, shown, cause, attempt + 1, policy.attempts - 1,
                   policy.delay(attempt))
    return None


def _cause(url: str, exc: BaseException) -> BaseException | None:
    """The cause to chain to an error about ``url``: ``exc``, or None when ``url`` carries a secret."""
    return None if has_secret(url) else exc


def _not_found(url: str, exc: FileNotFoundError) -> FileNotFoundError:
    """``exc`` itself, or, when ``url`` carries a secret, a FileNotFoundError naming the redacted URL."""
    if not has_secret(url) and not has_secret(str(exc)):
        return exc
    return FileNotFoundError(errno.ENOENT, "no such object", redact_url(url))


def with_retries(
    op: str, url: str, func: Callable[[], T], policy: RetryPolicy | None = None
) -> T:
    """Call ``func()``; retry transient failures with back-off, then raise :class:`StorageError`.

    Args:
        op: short verb for messages, e.g. ``"read"``.
        url: the URL the operation concerns (named in the final error).
        func: the operation; must be idempotent.
        policy: attempts and delays.

    Returns:
        ``func()``'s result.

    Raises:
        StorageError: a permanent failure, or a transient one that outlived every attempt. Missing objects are
            re-raised as :class:`FileNotFoundError` so callers can test for absence.
    """
    policy = _policy(policy)
    for attempt in range(policy.attempts):
        token = _IN_RETRY_LOOP.set(True)
        try:
            return func()
        except FileNotFoundError as exc:
            missing = _not_found(url, exc)
            if missing is exc:
                raise
            raise missing from None
        except Exception as exc:
            err = _give_up(op, url, exc, attempt, policy)
            if err is not None:
                raise err from _cause(url, exc)
        finally:
            _IN_RETRY_LOOP.reset(token)
        time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


async def with_retries_async(
    op: str, url: str, func: Callable[[], Awaitable[T]], policy: RetryPolicy | None = None
) -> T:
    """:func:`with_retries` for coroutines: ``await func()`` with the same retry rules, sleeping asynchronously.

    Inside a running :func:`with_retries` loop it makes one attempt and lets the failure reach that loop.
    """
    if _IN_RETRY_LOOP.get():
        return await func()
    policy = _policy(policy)
    for attempt in range(policy.attempts):
        try:
            return await func()
        except FileNotFoundError as exc:
            missing = _not_found(url, exc)
            if missing is exc:
                raise
            raise missing from None
        except Exception as exc:
            err = _give_up(op, url, exc, attempt, policy)
            if err is not None:
                raise err from _cause(url, exc)
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


def read_bytes(url: str, policy: RetryPolicy | None = None) -> bytes:
    """The whole object at ``url``. Raises FileNotFoundError if absent, StorageError on failure."""
    fs, path = resolve(url)
    return with_retries("read", url, lambda: fs.cat_file(path), policy)


def write_bytes(url: str, data: bytes, policy: RetryPolicy | None = None) -> None:
    """Write ``data`` as the whole object at ``url``, atomically (readers see the old or the new object).

    Local paths: temporary file in the same directory, fsync, ``os.replace``, fsync of the directory.
    Object stores: one PUT (atomic per object).
    """
    if is_local(url):
        _, path = resolve(url)
        with_retries("write", url, lambda: _atomic_local_write(Path(path), data), policy)
        return
    fs, path = resolve(url)
    with_retries("write", url, lambda: fs.pipe_file(path, data), policy)


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_local(path.parent)


def fsync_local(path: str | Path) -> None:
    """fsync a local file or directory so that a completed write survives a crash (no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync not supported for %s", path)
    finally:
        os.close(fd)


def exists(url: str, policy: RetryPolicy | None = None) -> bool:
    """Whether an object (or directory/prefix) exists at ``url``."""
    fs, path = resolve(url)
    return with_retries("stat", url, lambda: fs.exists(path), policy)


def size(url: str, policy: RetryPolicy | None = None) -> int:
    """Size in bytes of the object at ``url``."""
    fs, path = resolve(url)
    return int(with_retries("stat", url, lambda: fs.size(path), policy))


def _fresh_listing(url: str, op: Callable[[Any, str], Any], policy: RetryPolicy) -> tuple[str, Any]:
    """``(path, op(fs, path))`` with the listing cache dropped first and retries; the result is None when
    nothing exists at ``url``."""
    fs, path = resolve(url)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)
    try:
        return path, with_retries("list", url, lambda: op(fs, path), policy)
    except FileNotFoundError:
        return path, None


def list_objects(url: str, policy: RetryPolicy | None = None) -> dict[str, int]:
    """Every object under the prefix ``url``, recursively, as ``{path relative to url: size}``.

    Returns an empty dict when nothing exists under ``url``.
    """
    path, found = _fresh_listing(url, lambda fs, p: fs.find(p, detail=True), policy)
    if found is None:
        return {}
    root = path.rstrip("/") + "/"
    return {
        p[len(root):]: int(info.get("size") or 0)
        for p, info in found.items()
        if p.startswith(root) and info.get("type", "file") == "file"
    }


def delete(url: str, recursive: bool = False, policy: RetryPolicy | None = None) -> None:
    """Delete the object (or, with ``recursive``, the prefix) at ``url``; absent is not an error."""
    fs, path = resolve(url)
    try:
        with_retries("delete", url, lambda: fs.rm(path, recursive=recursive), policy)
    except FileNotFoundError:
        return


class RetryingFsspecStore(FsspecStore):
    """An :class:`~zarr.storage.FsspecStore` that retries transient failures (:func:`with_retries_async`).

    ``get``, ``get_partial_values``, ``exists``, ``getsize``, ``set`` and ``delete`` are retried with
    :data:`DEFAULT_RETRY` and end in :class:`StorageError` naming the key. Called inside a :func:`with_retries` loop
    (a writer retrying a whole, idempotent assignment) each makes one attempt, so attempts never multiply.
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

    Local paths are made absolute and need no filesystem. Remote URLs get a pyarrow filesystem wrapping this
    module's fsspec filesystem (so the same endpoint/region environment applies) and a bucket-relative path.
    """
    if is_local(url):
        return os.path.abspath(url.removeprefix("file://")), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    protocol = protocol_of(url)
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **storage_options(protocol))
    return url.split("://", 1)[1].rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def absolute(url: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in other directories); remote URLs unchanged."""
    if url is None or not is_local(url):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def list_dir(url: str, policy: RetryPolicy | None = None) -> list[str]:
    """Names of the immediate children (objects and prefixes) of ``url``; empty when nothing is there."""
    _, entries = _fresh_listing(url, lambda fs, p: fs.ls(p, detail=False), policy)
    if entries is None:
        return []
    return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})


# ------------------------------------------------------------------------------------ classifying store errors
_MISSING_CONTAINER_CODES = frozenset({"NoSuchBucket"})


def error_code(exc: BaseException) -> str | None:
    """The object store's error code carried by ``exc`` or its cause chain (``AccessDenied``, ``NoSuchBucket``,
    ``ExpiredToken``, ``SlowDown``, ...), or None when there is none (local files, connection errors)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        cur = cur.__cause__ or cur.__context__
    return None


def is_missing_container(exc: BaseException) -> bool:
    """Whether ``exc`` says the bucket itself does not exist, as opposed to one object in it.

    s3fs raises :class:`FileNotFoundError` for both; only the error code (``NoSuchBucket``) tells them apart. A
    missing object is a fact about that object; a missing bucket makes the whole data set unreachable (a typo in the
    name, a deleted bucket) and must not be taken for a missing object. Other stores (gcsfs) do not say which.
    """
    return error_code(exc) in _MISSING_CONTAINER_CODES
