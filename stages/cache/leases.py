"""Claims (leases) on a cache's units: who may compute a unit, renewal, release, takeover of stale claims.

Writers of one cache may run in several jobs at once. Before computing unit u a job writes ``claims/<u>.json``
(owner id, a random token, expiry time, and the owner's host / pid-namespace / pid / process start time); a live
claim of another owner makes every other job skip the unit; a stale claim (expired, or its owner's process is gone
on this same host and pid namespace) is taken over. Claiming is "write, wait a random ``confirm_delay`` (1-2x),
re-read": a claim is held only if the re-read shows our token.

Guarantee (local fs and S3 alike, which both give read-after-write consistency on single objects): two jobs both
hold a claim on one unit only if one of them spends longer than the other's confirmation wait between reading "no
live claim" and writing its own (a pause of >= ``confirm_delay`` in the middle of one claim attempt), or if a holder
stops renewing for longer than the TTL and comes back. As a second line, a writer re-checks its claim immediately
before writing a unit's data and again before its marker (:class:`~stages.cache.errors.ClaimLostError` otherwise),
so a job that lost its lease stops. Even in the residual race both writers produce the same bytes (the view plan and
the model are deterministic) and each object is replaced atomically, so the cache stays consistent; only work is
wasted. Claims, like temporary files, are run state, not part of the cache.

:class:`UnitClaims` holds the claim operations; :class:`~stages.cache.store.TargetCache` inherits them, so a driver
asks its open cache (``cache.claim_units(...)``). :class:`ClaimKeeper` renews one driver's claims from a thread.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from infra import storage
from stages.cache.errors import ClaimLostError, no_space_guard

logger = logging.getLogger(__name__)

CLAIMS_DIR = "claims"


def _proc_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Claim:
    """A job's lease on one unit, stored as ``claims/<u>.json``.

    Attributes:
        unit: the unit id.
        owner: the claiming job's id (one per :func:`stages.extract.run_extract` call).
        token: random per claim attempt; a claim is ours only if the stored token is the one we wrote.
        expires: UNIX time after which the claim is stale unless renewed.
        host: ``socket.gethostname()`` of the owner.
        pid_ns: the owner's pid namespace (``/proc/self/ns/pid`` link), so pids are compared only where meaningful.
        pid: the owner's process id.
        pid_start: the owner's start time (clock ticks since boot), guarding against pid reuse.
    """

    unit: int
    owner: str
    token: str
    expires: float
    host: str
    pid_ns: str
    pid: int
    pid_start: int | None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Claim:
        return cls(**json.loads(data))

    def owner_alive(self) -> bool | None:
        """False when the owner process is provably gone (same host and pid namespace), True when it runs there,
        None when it cannot be checked from here (another host)."""
        if self.host != socket.gethostname() or self.pid_ns != _pid_namespace():
            return None
        start = _proc_start_time(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)

    def is_stale(self, now: float | None = None) -> bool:
        """Expired, or its owner is dead."""
        return (time.time() if now is None else now) > self.expires or self.owner_alive() is False


def new_owner_id() -> str:
    """A fresh claim-owner id for one job: ``<host>:<pid>:<random>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def new_claim(unit: int, owner: str, ttl_s: float, token: str | None = None) -> Claim:
    """A claim of this process on ``unit`` for ``owner``, expiring ``ttl_s`` from now (a fresh token unless given)."""
    pid = os.getpid()
    return Claim(unit=unit, owner=owner, token=token or uuid.uuid4().hex, expires=time.time() + ttl_s,
                 host=socket.gethostname(), pid_ns=_pid_namespace(), pid=pid, pid_start=_proc_start_time(pid))


@dataclass(frozen=True)
class ClaimOutcome:
    """What one :meth:`UnitClaims.claim_units` call got.

    Attributes:
        claimed: units now held by the caller, in the order asked.
        taken_over: the subset of ``claimed`` that had a stale claim of another owner (work lost in flight there).
        busy: units held by another live owner (skipped).
        complete: units found complete (skipped).
    """

    claimed: list[int]
    taken_over: list[int]
    busy: list[int]
    complete: list[int]


class UnitClaims(abc.ABC):
    """The claim operations of an open cache (mixed into :class:`~stages.cache.store.TargetCache`).

    They need the cache's ``url`` and ``read_only`` attributes and its completion markers.
    """

    url: str
    read_only: bool

    @abc.abstractmethod
    def is_complete(self, unit_id: int) -> bool:
        """Whether unit ``unit_id`` has its completion marker."""

    @abc.abstractmethod
    def complete_units(self) -> list[int]:
        """Sorted ids of the units whose marker exists."""

    def _claim_url(self, unit_id: int) -> str:
        return storage.join(self.url, CLAIMS_DIR, f"{unit_id}.json")

    def _claimed_units(self) -> list[int]:
        names = storage.list_objects(storage.join(self.url, CLAIMS_DIR))
        return sorted(int(n[: -len(".json")]) for n in names if n.endswith(".json") and "/" not in n)

    def read_claim(self, unit_id: int) -> Claim | None:
        """The stored claim on ``unit_id`` (None if there is none; an unreadable one counts as none)."""
        try:
            return Claim.from_bytes(storage.read_bytes(self._claim_url(unit_id)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            logger.warning("%s: unreadable claim on unit %d (%s): treated as absent", self.url, unit_id, exc)
            return None

    def claims(self) -> dict[int, Claim]:
        """Every stored claim, by unit (one listing plus one read per claim)."""
        found = {u: self.read_claim(u) for u in self._claimed_units()}
        return {u: c for u, c in found.items() if c is not None}

    def claim_units(self, units: Sequence[int], owner: str, want: int, ttl_s: float = 60.0,
                    confirm_delay_s: float = 0.1) -> ClaimOutcome:
        """Try to claim up to ``want`` of ``units`` (in order) for ``owner``: write, wait, re-read to confirm.

        A unit is skipped when complete or held by another owner whose claim is not stale; a stale claim is taken
        over. All claims of one call share one confirmation wait of ``confirm_delay_s`` times U(1, 2).

        Raises:
            CacheFullError: the claim objects could not be written for lack of space.
        """
        if self.read_only:
            raise PermissionError(f"{self.url} is open read-only")
        busy: list[int] = []
        complete: list[int] = []
        with no_space_guard(self.url, "writing claims"):
            written, stale = self._write_claims(units, owner, want, ttl_s, busy, complete)
        if not written:
            return ClaimOutcome([], [], busy, complete)
        time.sleep(confirm_delay_s * (1.0 + random.random()))
        claimed = []
        for unit, claim in written.items():
            current = self.read_claim(unit)
            if current is None or current.token != claim.token:
                busy.append(unit)
            elif self.is_complete(unit):  # finished by its previous holder between our check and our write
                self.release_claim(unit, owner)
                complete.append(unit)
            else:
                claimed.append(unit)
        return ClaimOutcome(claimed, [u for u in claimed if u in stale], busy, complete)

    def _write_claims(self, units: Sequence[int], owner: str, want: int, ttl_s: float, busy: list[int],
                      complete: list[int]) -> tuple[dict[int, Claim], set[int]]:
        """Write claims on up to ``want`` free or stale ``units`` (appending skipped ones to ``busy`` /
        ``complete``); returns the claims written and the units whose stale claim they replace."""
        written: dict[int, Claim] = {}
        stale: set[int] = set()
        for unit in units:
            if len(written) >= want:
                break
            if self.is_complete(unit):
                complete.append(unit)
                continue
            current = self.read_claim(unit)
            if current is not None and current.owner != owner:
                if not current.is_stale():
                    busy.append(unit)
                    continue
                stale.add(unit)
            claim = new_claim(unit, owner, ttl_s)
            storage.write_bytes(self._claim_url(unit), claim.to_bytes())
            written[unit] = claim
        return written, stale

    def renew_claims(self, units: Iterable[int], owner: str, ttl_s: float = 60.0) -> list[int]:
        """Extend ``owner``'s claims on ``units`` by ``ttl_s`` from now; returns the units no longer held."""
        lost = []
        for unit in units:
            current = self.read_claim(unit)
            if current is None or current.owner != owner:
                lost.append(unit)
                continue
            storage.write_bytes(self._claim_url(unit), new_claim(unit, owner, ttl_s, current.token).to_bytes())
        return lost

    def release_claim(self, unit_id: int, owner: str) -> None:
        """Delete ``owner``'s claim on ``unit_id`` (a claim of another owner is left alone)."""
        current = self.read_claim(unit_id)
        if current is not None and current.owner == owner:
            with contextlib.suppress(FileNotFoundError):
                storage.delete(self._claim_url(unit_id))

    def sweep_claims(self) -> list[int]:
        """Delete the claims left on complete units (by a job that died after its unit's marker was written, or
        whose in-flight work an orphaned actor finished). Such a claim is inert: nobody claims a complete unit.
        Returns the units swept."""
        swept = sorted(set(self._claimed_units()) & set(self.complete_units()))
        for unit in swept:
            with contextlib.suppress(FileNotFoundError):
                storage.delete(self._claim_url(unit))
        return swept

    def check_claim(self, unit_id: int, owner: str) -> None:
        """Raise :class:`ClaimLostError` unless ``owner`` holds the claim on ``unit_id``."""
        current = self.read_claim(unit_id)
        if current is None or current.owner != owner:
            holder = "nobody" if current is None else current.owner
            raise ClaimLostError(f"{self.url}: unit {unit_id} is claimed by {holder}, not {owner}: not written")


class _Renewable(Protocol):
    def release_claim(self, unit_id: int, owner: str) -> None: ...

    def renew_claims(self, units: Iterable[int], owner: str, ttl_s: float = 60.0) -> list[int]: ...


class ClaimKeeper:
    """The claims one driver holds, renewed by a daemon thread every ``renew_every_s``.

    Renewal and release share a lock, so a released claim is never rewritten by a late renewal.

    Args:
        cache: the open cache (anything with ``renew_claims`` and ``release_claim``).
        owner: the driver's claim-owner id.
        ttl_s: each renewal extends the claims this far from now.
        renew_every_s: heartbeat period (keep well below ``ttl_s``).
    """

    def __init__(self, cache: _Renewable, owner: str, ttl_s: float, renew_every_s: float) -> None:
        self.cache, self.owner, self.ttl_s, self.renew_every_s = cache, owner, ttl_s, renew_every_s
        self.held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extract-claims", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, units: list[int]) -> None:
        with self._lock:
            self.held.update(units)

    def release(self, unit: int) -> None:
        with self._lock:
            self.held.discard(unit)
            self.cache.release_claim(unit, self.owner)

    def forget(self, unit: int) -> None:
        with self._lock:
            self.held.discard(unit)

    def close(self) -> None:
        """Stop renewing and release every claim still held (best effort: the claims expire anyway)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.renew_every_s + 5)
        with self._lock:
            for unit in sorted(self.held):
                try:
                    self.cache.release_claim(unit, self.owner)
                except Exception as exc:  # release is best effort, the claim expires
                    logger.warning("extract: could not release the claim on unit %d: %s", unit, exc)
            self.held.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            with self._lock:
                try:
                    lost = self.cache.renew_claims(sorted(self.held), self.owner, self.ttl_s)
                except Exception as exc:  # a failed renewal is retried at the next beat
                    logger.warning("extract: renewing claims failed: %s", exc)
                    continue
            if lost:
                logger.warning("extract: claims on units %s were taken over by another job; their writes will be "
                               "refused", lost)
