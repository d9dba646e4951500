"""fsspec plumbing shared by every stage: URLs in, bytes out (zarr stores: :mod:`infra.zarr_store`).

Any fsspec URL works (``s3://``, ``gs://``, ``file://``, a plain local path, ``memory://``). Storage options come from
the environment only, never from arguments that could end up stored in a cache or a log:

* ``TEC_S3_ENDPOINT_URL`` (then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``): S3 endpoint, e.g. a MinIO or moto
  server. Credentials are resolved by botocore itself (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, ``~/.aws/credentials``, instance roles); this module never reads, stores or logs them.
* ``TEC_S3_REGION`` (then ``AWS_DEFAULT_REGION``): region name, optional.
* ``TEC_S3_CONNECT_TIMEOUT_S`` / ``TEC_S3_READ_TIMEOUT_S``: botocore's connect and read timeouts in seconds
  (botocore's default is 60 s each); a stalled request fails after this long and is retried.

Every helper here retries transient failures (HTTP 5xx, throttling, connection resets, timeouts) with bounded
exponential back-off and then raises :class:`StorageError` naming the operation and the (redacted) URL; a permanent
error ends at once. The rules and the policy are :mod:`infra.retry`'s, re-exported here with the URL redaction of
:mod:`infra.redaction` and the zarr stores of :mod:`infra.zarr_store`, so that ``storage.X`` reaches all of them.

Filesystem objects are not fork-safe (s3fs owns an event loop and an HTTP session). They are created with
``skip_instance_cache=True`` and memoised here per process id, so a forked child never reuses its parent's instance;
:func:`clear_filesystem_cache` drops them (tests call it between cases).

Writes are whole objects: locally through a temporary file and ``os.replace`` (atomic, fsync'd); on object stores a
PUT is atomic per object.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# One owner for URL redaction (infra.redaction) and one for retries (infra.retry); re-exported here because every
# stored or shown URL and every storage operation passes through this module. The helpers below call with_retries
# through this module's globals (a hook set with monkeypatch on this module reaches them). The default policy is
# infra.retry.DEFAULT_RETRY, looked up there at call time, and deliberately not re-exported: a test that sets it
# must set it on infra.retry.
from infra.redaction import REDACTED, RedactingFilter, has_secret, redact_text, redact_url  # noqa: F401
from infra.retry import (  # noqa: F401
    RetryPolicy,
    StorageError,
    error_code,
    is_missing_container,
    is_transient,
    with_retries,
    with_retries_async,
)

logger = logging.getLogger(__name__)

_ENDPOINT_VARS = ("TEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_VARS = ("TEC_S3_REGION", "AWS_DEFAULT_REGION")
_TIMEOUT_VARS = {"connect_timeout": "TEC_S3_CONNECT_TIMEOUT_S", "read_timeout": "TEC_S3_READ_TIMEOUT_S"}
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})
# infra.zarr_store imports this module; its names are re-exported on first use (importing zarr only then)
_ZARR_NAMES = frozenset({"RetryingFsspecStore", "zarr_store", "ray_storage"})

_FS_CACHE: dict[tuple[int, str, tuple[tuple[str, str], ...]], fsspec.AbstractFileSystem] = {}


def __getattr__(name: str) -> Any:
    """``storage.zarr_store``, ``storage.RetryingFsspecStore``, ``storage.ray_storage`` from :mod:`infra.zarr_store`."""
    if name in _ZARR_NAMES:
        from infra import zarr_store

        return getattr(zarr_store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _fresh_listing(url: str, op: Callable[[Any, str], Any], policy: RetryPolicy | None) -> tuple[str, Any]:
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
