"""The extraction driver: :func:`run_extract` claims the cache's incomplete units and keeps a pool of workers busy.

The driver resolves the job into a :class:`~stages.cache.CacheSpec` (or takes the one its caller resolved), creates
or opens the cache (refusing one made with different settings), and hands the incomplete work units to a pool
(:mod:`stages.extract.pool`: Ray actors, or one worker in this process).

Faults. The driver claims every unit before submitting it (``claims/<u>.json``, see :mod:`stages.cache.leases`) and
renews its claims from a heartbeat thread (:class:`~stages.cache.leases.ClaimKeeper`); units claimed by another
live job are left to it (the driver waits for them at the end and takes over any whose claim goes stale), so
concurrent jobs on one cache cooperate on disjoint units. A killed driver therefore costs at most its in-flight
units (``num_actors × in_flight_per_actor``): the next run finds their claims stale (owner process gone, or expired)
and recomputes exactly those (:attr:`ExtractResult.units_taken_over`). A dead actor is replaced by the driver
(Ray-level restarts are off, so the driver sees and counts every loss) and its in-flight units are resubmitted
(:attr:`ExtractResult.units_retried`). Running out of space raises :class:`~stages.cache.CacheFullError` naming the
cache; completed units stay intact.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from infra import storage
from stages.cache import (
    CacheSpec,
    ClaimKeeper,
    ClaimLostError,
    TargetCache,
    create_or_open,
    diff_specs,
    new_owner_id,
    no_space_guard,
    open_cache,
    read_diagnostics_attr,
    write_diagnostics_attr,
)
from stages.device import extraction_precision, resolve_device
from stages.extract.diagnostics import BaseDiagnostics, NoReadableImagesError
from stages.extract.job import ExtractJob, ExtractResult, LeaseConfig, build_spec, resolve_spec
from stages.extract.pool import InProcessPool, RayActorPool, WorkerLostError

log = logging.getLogger(__name__)

Pool = InProcessPool | RayActorPool


def run_extract(
    job: ExtractJob,
    num_actors: int = 1,
    address: str | None = None,
    unit_order: list[int] | None = None,
    in_flight_per_actor: int = 2,
    threads_per_actor: int = 1,
    lease: LeaseConfig | None = None,
    max_unit_attempts: int = 4,
    spec: CacheSpec | None = None,
) -> ExtractResult:
    """Extract every incomplete unit of the job's cache with a pool of Ray actors, or in this process.

    Safe to run concurrently with other jobs on the same cache (they share the work unit by unit) and to re-run
    after any crash (it redoes only units that were not complete). A cache that is already complete is reported
    without starting Ray or loading the base model.

    Args:
        job: the extraction job.
        num_actors: actors in the pool (one GPU each when the cluster has GPUs, else ``threads_per_actor`` CPUs);
            0 extracts in this process (CUDA when available), with the same unit worker and claims, without Ray.
        address: Ray cluster address (default ``$RAY_ADDRESS`` or a local cluster).
        unit_order: process units in this order (default ascending); complete units are skipped either way.
        in_flight_per_actor: units queued per actor, so reading the next unit overlaps the current forward.
        threads_per_actor: torch threads (and Ray CPUs) per CPU actor.
        lease: claim timings (default :class:`LeaseConfig`).
        max_unit_attempts: a unit whose actor dies this many times fails the run.
        spec: the job's cache spec, already resolved (:func:`resolve_spec`): then neither the manifest is read
            nor the checkpoint hashed here, and the workers trust it too. Default: resolve it from the job.

    Returns:
        :class:`ExtractResult`; the totals describe the whole cache after this run.

    Raises:
        CacheFullError: the cache's storage ran out of space (completed units are intact; re-run to resume).
        CacheMismatchError: the cache exists with another key or precision.
        ValueError: ``spec`` was not resolved from this job (the message names the differing fields).
        RuntimeError: a unit killed its actor ``max_unit_attempts`` times.
    """
    started = time.perf_counter()
    job = dataclasses.replace(job, cache_url=storage.absolute(job.cache_url),
                              manifest_url=storage.absolute(job.manifest_url),
                              checkpoint_url=storage.absolute(job.checkpoint_url))
    spec = resolve_spec(job) if spec is None else _spec_of_job(job, spec)
    cache = _existing_cache(job.cache_url, spec)
    if cache is not None and len(done := cache.complete_units()) == cache.n_units:
        result = ExtractResult(job.cache_url, spec.key, cache.n_units, units_skipped=sorted(done))
    else:
        device, on_ray = _worker_device(num_actors, address)
        spec, cache = prepare(job, spec=spec.replace(precision=extraction_precision(job.precision, device)))

        def make_pool() -> Pool:
            if not on_ray:
                return InProcessPool(job, spec, per_slot=in_flight_per_actor)
            return RayActorPool(job, spec, num_actors, device.type == "cuda", threads_per_actor, in_flight_per_actor)

        result = _extract_units(job, spec, cache, unit_order, lease or LeaseConfig(), max_unit_attempts, make_pool)
    return _finish(result, cache, started)


def _spec_of_job(job: ExtractJob, spec: CacheSpec) -> CacheSpec:
    """``spec`` with the job's (absolute) URLs, after checking that it is the job's: rebuilt from the job's fields
    and ``spec``'s hashes, it must have the same key (nothing is read or hashed)."""
    rebuilt = build_spec(job, spec.manifest_sha256, spec.n_images, spec.checkpoint_sha256, spec.precision)
    if rebuilt.key != spec.key:
        raise ValueError(f"extract {job.cache_url}: the spec passed to run_extract was not resolved from this job: "
                         + "; ".join(diff_specs(spec, rebuilt)))
    return rebuilt


def prepare(job: ExtractJob, device: torch.device | None = None,
            spec: CacheSpec | None = None) -> tuple[CacheSpec, TargetCache]:
    """Resolve the job's identity (unless ``spec`` is given) and create (or check) the cache.

    Refuses an existing cache of another key or of another precision (:class:`CacheMismatchError`). ``device``:
    the workers' (default: the CPU).
    """
    spec = spec or resolve_spec(job, device or torch.device("cpu"))
    with no_space_guard(job.cache_url, "creating it"):
        cache = create_or_open(job.cache_url, spec, compressor=job.compressor)
    return spec, cache


def diagnose_once(job: ExtractJob, pool: Pool) -> BaseDiagnostics | None:
    """Diagnose the base on the first ``job.diagnostic_images`` images of the plan once per cache, on the pool's
    first worker (its loaded model: nothing is read again here), store the summary in the cache's
    ``base_diagnostics`` attribute and log it with its warnings; a cache that has the attribute (a resumed
    extraction) has its stored summary logged instead. None when skipped (or the worker died meanwhile: the units
    then find it dead).

    The summary is deterministic for a given base, plan and device, so concurrent extractors that both compute it
    write the same content (each replaces the group metadata whole)."""
    if job.diagnostic_images <= 0:
        return None
    stored = read_diagnostics_attr(job.cache_url)
    if stored is None:
        try:
            stored = pool.diagnose(job.diagnostic_images, job.diagnostic_taus)
        except (NoReadableImagesError, WorkerLostError) as err:
            log.warning("extract: no base diagnostics: %s", err)
            return None
        with no_space_guard(job.cache_url, "writing its base diagnostics"):
            write_diagnostics_attr(job.cache_url, stored)
    diagnostics = BaseDiagnostics.from_dict(stored)
    for line in diagnostics.summary_lines():
        log.info("extract: %s", line)
    for warning in diagnostics.warnings():
        log.warning("extract: %s", warning)
    return diagnostics


def summarize(result: ExtractResult, cache: TargetCache) -> ExtractResult:
    """Fill the whole-cache totals of ``result`` from the cache."""
    s = cache.summary()
    result.stored_bytes, result.raw_bytes, result.compression_ratio = s.stored_bytes, s.raw_bytes, s.compression_ratio
    result.failures = cache.failures().num_rows
    return result


def _finish(result: ExtractResult, cache: TargetCache, started: float) -> ExtractResult:
    """Sweep leftover claims, fill the totals and log the run's summary line."""
    swept = cache.sweep_claims()
    if swept:
        log.info("extract: removed leftover claims on complete units %s", swept)
    result.wall_seconds = time.perf_counter() - started
    summarize(result, cache)
    log.info(
        "extract done: %d units written (%d taken over from dead jobs, %d retries after actor deaths), %d skipped, "
        "%d done by other jobs; %d views; stored %.1f MB (raw %.1f MB, raw/stored %.3f); %d failures; %.1fs",
        len(result.units_written), len(result.units_taken_over), len(result.units_retried),
        len(result.units_skipped), len(result.units_by_others), result.views_written, result.stored_bytes / 1e6,
        result.raw_bytes / 1e6, result.compression_ratio, result.failures, result.wall_seconds,
    )
    return result


def _worker_device(num_actors: int, address: str | None) -> tuple[torch.device, bool]:
    """Where the units will be computed: (device, on Ray?). Starts (or joins) Ray for an actor pool."""
    if num_actors == 0:
        return resolve_device("auto"), False
    from infra.ray_cluster import ensure_ray, gpus_available

    ensure_ray(address)
    return torch.device("cuda" if gpus_available() > 0 else "cpu"), True


def _existing_cache(url: str, spec: CacheSpec) -> TargetCache | None:
    """The existing cache at ``url`` if it has ``spec``'s key (None when absent or of another key, which
    :func:`prepare` then refuses, naming the fields)."""
    try:
        cache = open_cache(url)
    except FileNotFoundError:
        return None
    return cache if cache.spec.key == spec.key else None


def _extract_units(job: ExtractJob, spec: CacheSpec, cache: TargetCache, unit_order: list[int] | None,
                   lease: LeaseConfig, max_unit_attempts: int, make_pool: Any) -> ExtractResult:
    """Claim and extract the cache's incomplete units with the pool ``make_pool()`` builds (if any are left)."""
    done = set(cache.complete_units())
    order = list(unit_order) if unit_order is not None else list(range(cache.n_units))
    todo = [u for u in order if u not in done]
    owner = new_owner_id()
    result = ExtractResult(job.cache_url, spec.key, cache.n_units, units_skipped=sorted(done), owner=owner)
    log.info("extract %s: %d units (%d complete, %d to do), key %s, precision %s, owner %s", job.cache_url,
             cache.n_units, len(done), len(todo), spec.key[:12], spec.precision, owner)
    if not todo:
        return result
    pool = make_pool()
    log.info("extract: %d worker(s) ready on %s (%s)", len(pool.workers), pool.device,
             "in this process" if isinstance(pool, InProcessPool) else "Ray actors")
    keeper = ClaimKeeper(cache, owner, lease.ttl_s, lease.renew_every_s)
    keeper.start()
    try:
        diagnose_once(job, pool)
        _Driver(job, cache, lease, pool, keeper, result, max_unit_attempts).run(todo)
    finally:
        keeper.close()
        pool.close()
    return result


class _Driver:
    """The driver loop over one pool: keep its slots busy with claimed units until none is left.

    Mutates ``result`` (units written, retried, taken over, done by others; counts; ``work_seconds``).
    """

    def __init__(self, job: ExtractJob, cache: TargetCache, lease: LeaseConfig, pool: Pool, keeper: ClaimKeeper,
                 result: ExtractResult, max_unit_attempts: int) -> None:
        self.job, self.cache, self.lease, self.pool, self.keeper = job, cache, lease, pool, keeper
        self.result, self.max_unit_attempts, self.owner = result, max_unit_attempts, keeper.owner
        self.todo: list[int] = []
        self.in_flight: dict[Any, tuple[int, Any, int]] = {}  # ref -> (slot, worker, unit)
        self.attempts: dict[int, int] = {}
        self.work_started = time.perf_counter()

    def run(self, todo: list[int]) -> None:
        self.todo, self.work_started = list(todo), time.perf_counter()
        while self.todo or self.in_flight:
            self.claim_and_submit()
            if not self.in_flight:
                if self.todo:  # everything left is held by other live jobs: wait for them (or for their leases)
                    time.sleep(self.lease.poll_s)
                continue
            ref = self.pool.next_done(list(self.in_flight), timeout=self.lease.poll_s if self.todo else None)
            if ref is not None:
                self.collect(ref)
        self.result.work_seconds = time.perf_counter() - self.work_started

    def collect(self, ref: Any) -> None:
        """Take one finished unit's outcome: count it, or resubmit it after its worker died, or leave it to the
        job that took its claim over."""
        slot, worker, unit = self.in_flight.pop(ref)
        try:
            stats = self.pool.outcome(ref)
        except WorkerLostError as err:
            self.attempts[unit] = self.attempts.get(unit, 0) + 1
            if self.attempts[unit] >= self.max_unit_attempts:
                raise RuntimeError(f"extract {self.job.cache_url}: unit {unit} lost its actor "
                                   f"{self.attempts[unit]} times") from err
            log.warning("extract: actor of unit %d died (%s); resubmitting", unit, err)
            self.result.units_retried.append(unit)
            self.result.actors_replaced += int(self.pool.replace(slot, worker))
            self.todo.insert(0, unit)
            return
        except ClaimLostError as err:
            log.warning("extract: %s", err)
            self.keeper.forget(unit)
            self.todo.append(unit)  # now another job's; we wait for it (or for its lease to go stale)
            return
        self.keeper.release(unit)
        self.written(unit, stats)

    def written(self, unit: int, stats: dict[str, Any]) -> None:
        result = self.result
        result.units_written.append(unit)
        result.images_written += stats["n_valid"]
        result.views_written += stats["n_valid"] * self.job.views_per_image
        kind = stats["timings"]["device"]
        result.device_seconds[kind] = result.device_seconds.get(kind, 0.0) + stats["timings"]["forward_s"]
        log.info("extract: %s", _progress(len(result.units_written), len(result.units_written) + len(self.todo)
                                          + len(self.in_flight), result.images_written, self.work_started))

    def claim_and_submit(self) -> None:
        """Claim as many units of ``todo`` as there are free worker slots and submit them.

        Units found complete are moved to ``result.units_by_others``; units held by other live jobs stay in ``todo``.
        """
        pool = self.pool
        load = [0] * len(pool.workers)
        for slot, _, _ in self.in_flight.values():
            load[slot] += 1
        free = len(pool.workers) * pool.per_slot - len(self.in_flight)
        if free <= 0 or not self.todo:
            return
        outcome = self.cache.claim_units(list(self.todo), self.owner, free, self.lease.ttl_s,
                                         self.lease.confirm_delay_s)
        self.keeper.add(outcome.claimed)
        for unit in outcome.complete:
            self.todo.remove(unit)
            self.result.units_by_others.append(unit)
        taken = self.result.units_taken_over
        taken.extend(u for u in outcome.taken_over if u not in taken)
        for unit in outcome.claimed:
            self.todo.remove(unit)
            slot = min(range(len(pool.workers)), key=load.__getitem__)
            load[slot] += 1
            self.in_flight[pool.submit(slot, unit, self.owner)] = (slot, pool.workers[slot], unit)


def _progress(done: int, total: int, images: int, started: float) -> str:
    elapsed = time.perf_counter() - started
    rate = images / elapsed if elapsed > 0 else 0.0
    eta = (total - done) * elapsed / done if done else float("nan")
    return f"units {done}/{total} | {rate:.1f} img/s | elapsed {elapsed:.0f}s | ETA {eta:.0f}s"
