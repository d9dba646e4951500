"""The fine-tuning driver: :func:`run_finetune` checks the data and the checkpoint once, holds the run's name,
stores its configuration and data, and trains on Ray Train or in this process.

Checked before any worker starts and before anything of an existing run is written: both splits are labelled with
labels in [0, num_classes), the train split holds at least one global batch, the checkpoint fits the architecture
and the protocol, the run's name is free (:class:`stages.train.session.RunLease`) and an existing run was started
with the same fingerprint (``<run>/config.json``; resources and ``stop_after_epochs`` may change).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from infra import storage
from stages import device as D
from stages.finetune.data import steps_per_epoch
from stages.finetune.job import FinetuneInputError, FinetuneJob, check_labelled
from stages.finetune.loop import RESULTS_FILE, data_url, finetune_loop_per_worker, finetune_worker
from stages.finetune.model import build_model
from stages.manifest import manifest_to_bytes
from stages.train.run import fit_job_on_ray
from stages.train.rundir import CONFIG_FILE, RunConfigChangedError
from stages.train.session import LocalSession, RunLease

log = logging.getLogger(__name__)


def _reindexed(table: pa.Table) -> pa.Table:
    """The table with ``index`` = 0..N-1 (a split may be a slice of a larger manifest)."""
    index = pa.array(np.arange(table.num_rows, dtype=np.int64))
    if "index" in table.column_names:
        return table.set_column(table.column_names.index("index"), "index", index)
    return table.add_column(0, "index", index)


def check_inputs(job: FinetuneJob, train: pa.Table, test: pa.Table) -> None:
    """Refuse unlabeled splits, labels outside [0, num_classes), a train split smaller than one global batch, or
    preprocessing of another channel count than the encoder's.

    Raises:
        FinetuneInputError: naming the field (``train.label``, ``num_classes``, ``batch_size``, ``preprocess``).
    """
    check_labelled(train, job.num_classes, "train")
    check_labelled(test, job.num_classes, "test")
    if steps_per_epoch(train.num_rows, job.batch_size) < 1:
        raise FinetuneInputError(f"batch_size: {job.batch_size} exceeds the {train.num_rows} train images (an epoch "
                                 "is whole batches only)")
    channels, in_chans = len(job.preprocess.get("mean", ())), job.timm_kwargs.get("in_chans", 3)
    if channels != in_chans:
        raise FinetuneInputError(f"preprocess.mean: {channels} channel(s), the encoder takes in_chans {in_chans}")


def _check_unchanged(job: FinetuneJob) -> None:
    url = storage.join(job.run_url, CONFIG_FILE)
    try:
        stored = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return
    if diffs := job.differences(stored):
        raise RunConfigChangedError(f"fine-tuning run {job.run_name!r} was started with another configuration; a "
                                    "resumed run keeps its model, data and recipe. Differences:\n  " +
                                    "\n  ".join(diffs) + "\nUse another run_name, or delete the old run.")


def run_finetune(job: FinetuneJob, train: pa.Table, test: pa.Table, address: str | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) a run and return its results (what ``<run>/results.json`` holds).

    Args:
        job: the run (``num_workers: 0`` trains in this process, without Ray).
        train / test: manifest tables with ``uri`` and ``label`` columns (:mod:`stages.manifest`).
        address: the Ray cluster (None: a local one) when ``num_workers > 0``.

    Raises:
        FinetuneInputError: bad data or a checkpoint that does not fit (naming the field).
        RunConfigChangedError: the run exists with another fingerprint. RunBusyError: another process holds it.
    """
    job = job.replace(storage_path=storage.absolute(job.storage_path),
                      checkpoint_url=storage.absolute(job.checkpoint_url))
    check_inputs(job, train, test)
    data = {name: manifest_to_bytes(_reindexed(t)) for name, t in (("train", train), ("test", test))}
    job = job.replace(checkpoint_sha256=hashlib.sha256(storage.read_bytes(job.checkpoint_url)).hexdigest(),
                      data_sha256=hashlib.sha256(data["train"] + data["test"]).hexdigest())
    build_model(job)  # the checkpoint's fit, refused here rather than in every worker
    with RunLease(job.run_url) as lease:
        _check_unchanged(job)
        storage.write_bytes(storage.join(job.run_url, CONFIG_FILE), json.dumps(job.to_dict(), indent=2).encode())
        for name, blob in data.items():
            storage.write_bytes(data_url(job, name), blob)
        if job.num_workers == 0:
            session = LocalSession(job.run_url, job.use_gpu, job.keep_checkpoints, lease)
            log.info("fine-tuning %s (%s) in-process on %s", job.run_name, job.protocol, D.describe(session.device))
            finetune_worker(job, session)
        else:
            fit_job_on_ray(finetune_loop_per_worker, job, address, lease)
        lease.check()
    return json.loads(storage.read_bytes(storage.join(job.run_url, RESULTS_FILE)))
