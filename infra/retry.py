"""Storage failures told apart and retried: transient (retry with back-off) or permanent (fail at once).

Retries happen at two levels, both bounded. botocore retries each request itself (HTTP 500/502/503/504,
throttling, connection errors, timeouts), configured as usual by ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` or
``~/.aws/config`` (default "legacy": 5 attempts, random exponential back-off of at most 1+2+4+8 s). On top of that,
every helper of :mod:`infra.storage` (and every zarr write the cache routes through :func:`with_retries`) retries a
failure that is still transient with :class:`RetryPolicy` (default 5 attempts, 0.2-3.2 s apart). With the defaults a
persistent outage of an object store therefore ends, after at most 25 requests and about 80 s, in
:class:`StorageError` naming the operation and the URL; a permanent error (missing object, access denied, bad
request) ends at once.

Messages of the errors raised here name the redacted URL, and a failure on a URL that carries a secret is raised
without its cause chain (whose third-party messages may repeat the URL as given).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from infra.redaction import has_secret, redact_text, redact_url

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = frozenset(
    {errno.EREMOTEIO, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
     errno.EAGAIN, errno.EPIPE}
)
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_NAMES = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
     "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError"}
)
_MISSING_CONTAINER_CODES = frozenset({"NoSuchBucket"})
# object-store error codes of throttling and time-outs (S3 and S3-compatible stores)
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
                              "RequestLimitExceeded", "ServiceUnavailable", "InternalError"})


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
    """``policy``, or this module's :data:`DEFAULT_RETRY` looked up at call time."""
    return policy if policy is not None else DEFAULT_RETRY


# ------------------------------------------------------------------------------------ classifying store errors
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
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return _transient_status(status) or code in _TRANSIENT_CODES
    # aiohttp's ClientResponseError (fsspec's HTTP filesystem: https checkpoints, manifests and images) carries the
    # status itself
    return _transient_status(getattr(exc, "status", None))


def _transient_status(status: object) -> bool:
    """HTTP 5xx, 408 (request timeout) and 429 (too many requests): worth another attempt."""
    return isinstance(status, int) and not isinstance(status, bool) and (status >= 500 or status in (408, 429))


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


# ------------------------------------------------------------------------------------------------- retrying
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


def _not_found(url: str, exc: FileNotFoundError) -> FileNotFoundError:
    """``exc`` itself, or, when ``url`` carries a secret, a FileNotFoundError naming the redacted URL."""
    if not has_secret(url) and not has_secret(str(exc)):
        return exc
    return FileNotFoundError(errno.ENOENT, "no such object", redact_url(url))


def _raise_or_delay(op: str, url: str, exc: Exception, attempt: int, policy: RetryPolicy) -> float:
    """Raise what ends the loop after failed attempt ``attempt``, or return the seconds to wait before the next.

    A missing object is re-raised as :class:`FileNotFoundError` (redacted when ``url`` carries a secret); a failure
    that is permanent or outlived every attempt is raised as :class:`StorageError`, without its cause chain when
    ``url`` or a message in that chain carries a secret.
    """
    if isinstance(exc, FileNotFoundError):
        missing = _not_found(url, exc)
        if missing is exc:
            raise exc
        raise missing from None
    err = _give_up(op, url, exc, attempt, policy)
    if err is not None:
        raise err from (None if has_secret(url) or _chain_has_secret(exc) else exc)
    return policy.delay(attempt)


def _chain_has_secret(exc: BaseException) -> bool:
    """Whether the text of ``exc`` or of an exception in its cause chain holds a URL secret (an HTTP client's
    message naming the presigned URL a redirect led to, say): such a chain is not kept on the error raised."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if has_secret(str(cur)) or any(has_secret(str(a)) for a in getattr(cur, "args", ())):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def with_retries(
    op: str, url: str, func: Callable[[], T], policy: RetryPolicy | None = None
) -> T:
    """Call ``func()``; retry transient failures with back-off, then raise :class:`StorageError`.

    Args:
        op: short verb for messages, e.g. ``"read"``.
        url: the URL the operation concerns (named in the final error).
        func: the operation; must be idempotent.
        policy: attempts and delays (default :data:`DEFAULT_RETRY`, looked up at call time).

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
        except Exception as exc:
            delay = _raise_or_delay(op, url, exc, attempt, policy)
        finally:
            _IN_RETRY_LOOP.reset(token)
        time.sleep(delay)
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
        except Exception as exc:
            delay = _raise_or_delay(op, url, exc, attempt, policy)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")
