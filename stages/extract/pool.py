"""Who runs the extraction's units: a pool of Ray actors, or one worker in the calling process.

The driver (:func:`stages.extract.driver.run_extract`) claims units and hands them to a pool through these calls,
the same for both pools, so the in-process mode (``extract.num_actors: 0``) runs the very code the cluster runs:

* ``submit(slot, unit, owner) -> ref``: queue a unit on a slot's worker;
* ``next_done(refs, timeout) -> ref | None``: the first finished unit (None when none finished in time);
* ``outcome(ref) -> stats``: the unit's marker stats, or the exception the unit raised (a Ray task's cause is
  unwrapped for :class:`~stages.cache.errors.CacheFullError`); a worker that died raises :class:`WorkerLostError`;
* ``replace(slot, worker)``: start a fresh worker in place of a dead one (only if ``worker`` still holds the slot);
* ``diagnose(n_images, taus) -> dict``: the base diagnostics on the first worker's model (before the units).

:class:`RayActorPool` imports Ray when it is built; :class:`InProcessPool` never does (it runs units on threads).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from stages.cache import CacheFullError, CacheSpec
from stages.extract.job import ExtractJob
from stages.extract.worker import UnitExtractor

log = logging.getLogger(__name__)


class WorkerLostError(RuntimeError):
    """The process running a unit died (a Ray actor killed or crashed) before the unit returned."""


class InProcessPool:
    """One :class:`~stages.extract.worker.UnitExtractor` in this process, running ``per_slot`` units at once on threads.

    As a Ray actor with ``max_concurrency`` does, two units in flight let reading and writing one unit overlap the
    other's forward (the extractor runs one forward at a time; torch releases the GIL while it computes).

    Args:
        job / spec: the extraction job and the cache spec the driver resolved.
        device: ``cpu``, ``cuda`` or ``auto``.
        per_slot: units in flight.
    """

    def __init__(self, job: ExtractJob, spec: CacheSpec, device: str = "auto", per_slot: int = 2) -> None:
        self.per_slot = per_slot
        self.workers = [UnitExtractor(job, spec, device)]
        self.device = self.workers[0].ready()
        self._threads = ThreadPoolExecutor(max_workers=per_slot, thread_name_prefix="extract-unit")

    def submit(self, slot: int, unit: int, owner: str) -> Future:
        return self._threads.submit(self.workers[0].run_unit, unit, owner)

    def next_done(self, refs: list[Future], timeout: float | None = None) -> Future | None:
        done, _ = wait(refs, timeout=timeout, return_when=FIRST_COMPLETED)
        return next(iter(done)) if done else None

    def outcome(self, ref: Future) -> dict[str, Any]:
        return ref.result()  # re-raises what the unit raised, as a Ray task's error would be

    def replace(self, slot: int, worker: Any) -> bool:
        return False  # an in-process worker cannot die without the driver

    def diagnose(self, n_images: int, taus: tuple[float, ...]) -> dict[str, Any]:
        """The base diagnostics of the worker's model (:meth:`UnitExtractor.diagnose`)."""
        return self.workers[0].diagnose(n_images, taus)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)


class RayActorPool:
    """``size`` Ray actors, one GPU each when the cluster has GPUs (else ``threads`` CPUs each).

    Args:
        job / spec: the extraction job and the cache spec the driver resolved.
        size: number of actors.
        gpu: place the actors on GPUs.
        threads: torch threads (and Ray CPUs) per CPU actor.
        per_slot: units kept in flight per actor (reading the next unit overlaps the current forward).
    """

    def __init__(self, job: ExtractJob, spec: CacheSpec, size: int, gpu: bool, threads: int, per_slot: int) -> None:
        import ray

        self.ray, self.per_slot = ray, per_slot
        self._cls = ray.remote(UnitExtractor).options(
            num_gpus=1 if gpu else 0, num_cpus=0 if gpu else threads, max_concurrency=per_slot, max_restarts=0,
            max_task_retries=0,
        )
        self._args = (job, spec, "auto", None if gpu else threads)
        self.workers = [self._cls.remote(*self._args) for _ in range(size)]
        self.device = ray.get([w.ready.remote() for w in self.workers])[0]

    def submit(self, slot: int, unit: int, owner: str) -> Any:
        return self.workers[slot].run_unit.remote(unit, owner)

    def next_done(self, refs: list[Any], timeout: float | None = None) -> Any | None:
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def outcome(self, ref: Any) -> dict[str, Any]:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:
            raise WorkerLostError(f"{type(err).__name__}: {err}") from err
        except self.ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None) or err
            if isinstance(cause, CacheFullError):
                raise CacheFullError(cause.errno, cause.strerror) from None
            if cause is not err and not isinstance(err, type(cause)):
                raise cause from err
            raise

    def diagnose(self, n_images: int, taus: tuple[float, ...]) -> dict[str, Any]:
        """The base diagnostics of the first actor's model (:meth:`UnitExtractor.diagnose`); a dead actor raises
        :class:`WorkerLostError`."""
        return self.outcome(self.workers[0].diagnose.remote(n_images, taus))

    def replace(self, slot: int, worker: Any) -> bool:
        """Kill ``worker`` and start a fresh actor in its slot, unless the slot was already refilled."""
        if self.workers[slot] is not worker:
            return False
        self.ray.kill(worker)
        self.workers[slot] = self._cls.remote(*self._args)
        return True

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
