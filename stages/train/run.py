"""The train stage's driver: :func:`run_train` checks what a run needs once, holds the run's name, writes its
configuration and fits it, on Ray Train or in this process.

Checked once, before any worker starts and before anything of an existing run is written: the cache's fit
(:func:`stages.train.job.check_cache`) and completeness (:func:`stages.train.rundir.require_complete_cache`), the
run's name (:class:`stages.train.session.RunLease`) and its configuration
(:func:`stages.train.rundir.check_unchanged`). The workers trust these checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infra import storage
from stages import device as D
from stages.train.job import TrainJob, check_cache, run_dir
from stages.train.loop import LEASE_TOKEN_KEY, train_loop_per_worker, train_worker
from stages.train.rundir import CONFIG_FILE, check_unchanged, job_json, require_complete_cache
from stages.train.session import LocalSession, RunLease, checkpoint_names

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`run_train` returns."""

    run_dir: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    export_path: str | None


def run_train(job: TrainJob, address: str | None = None, run_files: dict[str, bytes] | None = None) -> TrainResult:
    """Train (or resume) a run and return its final metrics: on Ray Train, or in this process when
    ``job.num_workers == 0`` (Ray is then never imported).

    Refused before any worker starts, and before anything of an existing run is written: a cache that does not fit
    or is unfinished, a run name held by another live process (:class:`~stages.train.session.RunBusyError`; the
    lease ``<run>/lease.json`` is held until this returns), an existing run whose ``config.json`` has another
    fingerprint (:class:`~stages.train.rundir.RunConfigChangedError`, naming the fields). Then ``run_files``
    (name → bytes, e.g. the pipeline's ``config.yaml``) and the resolved job (``config.json``) are written.

    A resume may change the resources, ``num_workers`` included. With the global batch fixed (it is part of the
    fingerprint), the global sample order continues exactly: global batch s is ``order[s·GB:(s+1)·GB]`` and rank r
    trains its contiguous slice, so the order does not depend on the world size. The weights are not bit-identical
    to a run that kept its world size: masks are drawn per (seed, step, rank, micro-batch).
    """
    job = job.replace(**{k: storage.absolute(getattr(job, k)) for k in
                         ("storage_path", "cache_url", "manifest_url", "checkpoint_url")})
    if job.target_source == "cache":
        check_cache(job)
    if job.cache_url:
        require_complete_cache(job.cache_url)
    root = run_dir(job)
    with RunLease(root) as lease:
        check_unchanged(job, root)
        for name, data in (run_files or {}).items():
            storage.write_bytes(storage.join(root, name), data)
        # URLs redacted: the job in memory keeps them working
        storage.write_bytes(storage.join(root, CONFIG_FILE), json.dumps(job_json(job), indent=2).encode())
        metrics, checkpoint = _fit_in_process(job, lease) if job.num_workers == 0 else _fit_on_ray(job, address, lease)
        lease.check()
    export = storage.join(root, "export", "encoder.pth")
    return TrainResult(run_dir=root, metrics=metrics, checkpoint_path=checkpoint,
                       export_path=export if storage.exists(export) else None)


# Failures an in-process run restarts from its latest checkpoint (as Ray's FailureConfig restarts workers): storage
# that stayed unavailable past the retry budget (a transient StorageError), dropped connections, time-outs. A
# refusal (bad configuration, non-finite loss, incompatible cache, missing file, a store's permanent error such as a
# denied permission) is never retried.
_RESTARTABLE = (storage.StorageError, ConnectionError, TimeoutError)


def _restartable(err: BaseException) -> bool:
    return isinstance(err, _RESTARTABLE) and not (isinstance(err, storage.StorageError) and not err.transient)


def _fit_in_process(job: TrainJob, lease: RunLease) -> tuple[dict[str, Any], str | None]:
    """The worker loop in this process on one device, restarted from the latest checkpoint up to
    ``max_failures`` times (-1: without limit) after a storage or OS error; stopped when ``lease`` is lost."""
    failures = 0
    while True:
        session = LocalSession(run_dir(job), job.use_gpu, job.keep_checkpoints, lease)
        log.info("training %s in-process on %s", job.run_name, D.describe(session.device))
        try:
            train_worker(job, session)
        except _RESTARTABLE as err:
            failures += 1
            if not _restartable(err) or 0 <= job.max_failures < failures:
                raise
            log.warning("run %s failed (%s: %s); restarting from its latest checkpoint (failure %d of %s)",
                        job.run_name, type(err).__name__, err, failures,
                        "unlimited" if job.max_failures < 0 else job.max_failures)
            continue
        names = checkpoint_names(run_dir(job))
        return session.last_metrics, session.last_checkpoint or (
            storage.join(run_dir(job), names[-1]) if names else None)


def fit_job_on_ray(loop: Callable[[dict], None], job: Any, address: str | None, lease: RunLease) -> Any:
    """``loop`` on ``job.num_workers`` Ray Train workers, given ``job.to_dict()`` plus the lease token (rank 0 checks
    ``lease`` before each checkpoint); returns Ray Train's ``Result``. A failure after the lease was lost says so.

    ``job`` is any stage job with the run's fields (``run_name``, ``storage_path``, ``num_workers``, ``use_gpu``,
    ``threads_per_worker``, ``max_failures``, ``keep_checkpoints``): :class:`TrainJob` or the fine-tuning job.
    """
    from infra.ray_cluster import fit_torch_trainer

    try:
        return fit_torch_trainer(
            loop, {**job.to_dict(), LEASE_TOKEN_KEY: lease.token}, run_name=job.run_name,
            storage_path=job.storage_path, num_workers=job.num_workers, use_gpu=job.use_gpu,
            cpus_per_worker=job.threads_per_worker, max_failures=job.max_failures,
            keep_checkpoints=job.keep_checkpoints, address=address)
    except Exception:
        lease.check()  # a lost lease is the cause: say so
        raise


def _fit_on_ray(job: TrainJob, address: str | None, lease: RunLease) -> tuple[dict[str, Any], str | None]:
    """The worker loop on ``num_workers`` Ray Train workers: final metrics and checkpoint path."""
    result = fit_job_on_ray(train_loop_per_worker, job, address, lease)
    return dict(result.metrics or {}), result.checkpoint.path if result.checkpoint else None
