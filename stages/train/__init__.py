"""Stage 2 — train: learn TEC from the target cache (or, for A/B checks, from the online base model).

* :mod:`~stages.train.job`: what a run is (:class:`TrainJob`) and whether a cache fits it (:func:`check_cache`);
* :mod:`~stages.train.plan`: which sample each rank sees when (:class:`SamplePlan`);
* :mod:`~stages.train.data`: the batches (:class:`TrainBatches`), read across epochs by one loader;
* :mod:`~stages.train.step`: one optimiser step (:func:`optimizer_step`) and its targets (:class:`TargetProvider`);
* :mod:`~stages.train.loop`: the worker loop (:func:`train_worker`), checkpoints, reports, the export;
* :mod:`~stages.train.session`: the seam to what runs the loop (Ray Train or this process) and the run's lease;
* :mod:`~stages.train.rundir`: what guards a run directory across starts (configuration, attempts);
* :mod:`~stages.train.run`: the driver, :func:`run_train`.
"""

from stages.train.data import TrainBatches, fetch_amplification, make_loader
from stages.train.job import (
    TARGET_SOURCES,
    USER_TARGET_SOURCES,
    CacheIncompatibleError,
    TargetSource,
    TrainJob,
    check_cache,
    run_dir,
)
from stages.train.loop import latest_checkpoint_state, make_plan, train_worker, write_export
from stages.train.plan import SamplePlan
from stages.train.run import TrainResult, run_train
from stages.train.rundir import RunConfigChangedError, read_attempts, record_start
from stages.train.session import LocalSession, RaySession, RunBusyError, RunLease, TrainSession, checkpoint_names
from stages.train.step import NonFiniteLossError, TargetProvider, mask_generator, optimizer_step

__all__ = [
    "TARGET_SOURCES", "USER_TARGET_SOURCES", "CacheIncompatibleError", "LocalSession", "NonFiniteLossError",
    "RaySession", "RunBusyError", "RunConfigChangedError", "RunLease", "SamplePlan", "TargetProvider",
    "TargetSource", "TrainBatches", "TrainJob", "TrainResult", "TrainSession", "check_cache", "checkpoint_names",
    "fetch_amplification", "latest_checkpoint_state", "make_loader", "make_plan", "mask_generator",
    "optimizer_step", "read_attempts", "record_start", "run_dir", "run_train", "train_worker", "write_export",
]
