"""The errors of the target cache, and the guard that turns "no space left" into :class:`CacheFullError`."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class UnitIncompleteError(RuntimeError):
    """A read touched a unit that has no completion marker."""


class CacheFullError(OSError):
    """The cache's file system (or quota) is out of space; completed units are intact and a re-run resumes."""


class ClaimLostError(RuntimeError):
    """A writer's claim on a unit is no longer its own (taken over after it expired); the unit was not written."""


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception in its cause/context chain is ENOSPC/EDQUOT (``No space left on device``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, CacheFullError) or (isinstance(cur, OSError) and cur.errno in _NO_SPACE_ERRNOS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextlib.contextmanager
def no_space_guard(url: str, what: str) -> Iterator[None]:
    """Re-raise an out-of-space failure inside the block as :class:`CacheFullError` naming ``url`` and ``what``."""
    try:
        yield
    except CacheFullError:
        raise
    except Exception as exc:
        if not is_no_space(exc):
            raise
        raise CacheFullError(errno.ENOSPC, f"no space left on device for the target cache {url} while {what}; "
                                           "completed units are intact: free space and run again to resume") from exc
