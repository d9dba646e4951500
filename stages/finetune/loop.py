"""The fine-tuning worker loop: build, resume, train an epoch, evaluate, checkpoint, write the results.

It runs behind the train stage's session seam (:mod:`stages.train.session`): a :class:`~stages.train.session.
RaySession` on Ray Train workers, or a :class:`~stages.train.session.LocalSession` in the calling process
(``num_workers: 0``); both write ``<run>/checkpoint_<time>/state.pt``, so either resumes a run the other began.
Rank 0 checkpoints at every epoch end (model, optimiser, scaler, epochs done, history); a start resumes after the
latest readable checkpoint and, since the sample order, the views, mixup and drop path are pure functions of
(seed, epoch | step, rank) (:mod:`stages.finetune.data`, :func:`step_seed`), ends with the weights an
uninterrupted run ends with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn

from infra import storage
from stages import device as D
from stages.finetune.data import Split, TrainBatches, eval_batches, steps_per_epoch
from stages.finetune.job import FinetuneJob, check_labelled
from stages.finetune.model import build_model
from stages.manifest import read_manifest
from stages.train.data import make_loader
from stages.train.loop import LEASE_TOKEN_KEY  # the key stages.train.run.fit_job_on_ray passes the lease in
from stages.train.rundir import read_attempts, record_start
from stages.train.session import STATE_FILE, RaySession, TrainSession, mark_order
from stages.train.step import NonFiniteLossError
from tec_model.optim import lr_schedule, scaled_lr

log = logging.getLogger(__name__)

STATE_KIND = "finetune"  # marks a fine-tuning checkpoint (a TEC training run's state.pt is refused)
RESULTS_FILE = "results.json"


def data_url(job: FinetuneJob, split: str) -> str:
    """Where the driver stored a split's manifest: ``<run>/data/<split>.parquet``."""
    return storage.join(job.run_url, "data", f"{split}.parquet")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's mixup draw and drop-path masks: a pure function of (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank, 1]).generate_state(1)[0])


@dataclass
class _Run:
    """What one worker trains and where it stands."""

    core: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    precision: str
    epoch: int = 0  # epochs done
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _build(job: FinetuneJob, session: TrainSession) -> _Run:
    """Model, optimiser (timm's factory: weight-decay groups, layer decay) and scaler; resumed when a checkpoint
    exists."""
    torch.manual_seed(job.seed)  # the head's init
    core = build_model(job).to(session.device)
    opt = create_optimizer_v2(core, opt=job.opt, lr=0.0, weight_decay=job.weight_decay,
                              layer_decay=job.layer_decay, **job.opt_kwargs)
    precision = D.train_precision(session.device, job.amp_dtype)
    run = _Run(core, session.prepare_model(core), opt, D.make_grad_scaler(session.device, precision), precision)
    if (state := session.latest_state()) is not None:
        if state.get("kind") != STATE_KIND or state.get("fingerprint") != job.fingerprint():
            raise RuntimeError(f"run {job.run_name!r}: its latest checkpoint is not of this fine-tuning job (kind "
                               f"{state.get('kind')!r}); use another run_name")
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.epoch = run.start_epoch = int(state["epoch"])
        run.history = json.loads(state["history"])
        log.info("rank %d resumed %s after epoch %d", session.rank, job.run_name, run.epoch)
    return run


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point: :func:`finetune_worker` behind a RaySession.

    Args:
        config: :meth:`FinetuneJob.to_dict` plus ``lease_token`` (the driver's lease, checked before checkpoints).
    """
    config = dict(config)
    token = config.pop(LEASE_TOKEN_KEY, None)
    job = FinetuneJob.from_dict(config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    finetune_worker(job, RaySession(job.run_url, token))


def _split(job: FinetuneJob, name: str) -> Split:
    table, _ = read_manifest(data_url(job, name))
    return Split.of(table, check_labelled(table, job.num_classes, name))


def finetune_worker(job: FinetuneJob, session: TrainSession) -> None:
    """One worker: trains the remaining epochs (to ``stop_after_epochs`` at most), checkpointing after each and
    scoring the test split every ``eval_every`` epochs and after the last; rank 0 writes ``<run>/results.json``
    when it stops."""
    torch.set_num_threads(job.threads_per_worker)
    train, test = _split(job, "train"), _split(job, "test")
    run = _build(job, session)
    per_epoch = steps_per_epoch(len(train), job.batch_size)
    if session.rank == 0:
        record_start(job.run_url, run.epoch * per_epoch, session.world_size, type(session).__name__)
    lrs = lr_schedule(scaled_lr(job.blr, job.batch_size), job.epochs * per_epoch,
                      round(job.warmup_epochs * per_epoch), job.min_lr)
    mixup = Mixup(mixup_alpha=job.mixup, cutmix_alpha=job.cutmix, label_smoothing=job.smoothing,
                  num_classes=job.num_classes) if job.mixing else None
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(job.smoothing) if job.smoothing > 0 else nn.CrossEntropyLoss())
    stop = min(job.epochs, job.stop_after_epochs or job.epochs)
    loader = _loader(job, session, train, run.epoch, stop)
    while run.epoch < stop:
        started = time.perf_counter()
        loss = _train_epoch(job, run, session, loader, lrs, per_epoch, mixup, criterion)
        scored = (run.epoch + 1) % job.eval_every == 0 or run.epoch + 1 == stop
        top1 = evaluate_top1(job, run.core, test, session) if scored else None
        row = {"epoch": run.epoch + 1, "train_loss": loss, "test_top1": top1,
               "lr": float(lrs[(run.epoch + 1) * per_epoch - 1]), "seconds": time.perf_counter() - started}
        run.history.append(row)
        run.epoch += 1
        _checkpoint(job, run, session, row)
        if session.rank == 0:
            scores = "" if top1 is None else f", test top-1 {top1:.4f}"
            log.info("epoch %d/%d: train loss %.4f%s (%.1f s)", run.epoch, job.epochs, loss, scores, row["seconds"])
    if session.rank == 0:
        write_results(job, run, session, len(train), len(test))


def _loader(job: FinetuneJob, session: TrainSession, train: Split, epoch: int,
            stop: int) -> Iterator[dict[str, Any]]:
    """This rank's batches from the start of ``epoch`` to the end of epoch ``stop - 1``: one loader, and one set of
    reader processes, for all the epochs a start trains."""
    batches = TrainBatches(train, job.preprocess_obj(), in_chans=job.timm_kwargs.get("in_chans", 3),
                           batch_size=job.batch_size, world=session.world_size, rank=session.rank, epoch=epoch,
                           start=0, until=stop, seed=job.seed, crop_scale=job.crop_scale, crop_ratio=job.crop_ratio,
                           policy=job.policy())
    return iter(make_loader(batches, num_workers=job.loader_workers, pin_memory=D.pin_memory_for(session.device)))


def _train_epoch(job: FinetuneJob, run: _Run, session: TrainSession, loader: Iterator[dict[str, Any]],
                 lrs: np.ndarray, per_epoch: int, mixup: Mixup | None, criterion: nn.Module) -> float:
    """Epoch ``run.epoch``'s optimiser steps, the next ``per_epoch`` batches of ``loader``; returns the mean
    training loss over its steps and ranks."""
    run.model.train()
    total, window = torch.zeros(2, dtype=torch.float64), time.perf_counter()
    for expected in range(per_epoch):
        batch = next(loader, None)
        if batch is None or (batch["epoch"], batch["step"]) != (run.epoch, expected):
            served = "nothing" if batch is None else f"step {batch['step']} of epoch {batch['epoch']}"
            raise RuntimeError(f"fine-tune loader served {served}, the trainer is at step {expected} of epoch "
                               f"{run.epoch}")
        step = run.epoch * per_epoch + expected
        loss = _step(job, run, session, batch, float(lrs[step]), step, mixup, criterion)
        total += torch.tensor([loss, 1.0], dtype=torch.float64)
        if session.rank == 0 and (expected + 1) % job.log_every == 0:
            rate = job.log_every * job.batch_size / (time.perf_counter() - window)
            log.info("epoch %d step %d/%d: loss %.4f, lr %.3g, %.1f images/s", run.epoch + 1, expected + 1,
                     per_epoch, loss, lrs[step], rate)
            window = time.perf_counter()
    if session.world_size > 1:
        total = D.sum_over_ranks(total, session.device)
    return float(total[0] / total[1].clamp_min(1))


def _step(job: FinetuneJob, run: _Run, session: TrainSession, batch: dict[str, Any], lr: float, step: int,
          mixup: Mixup | None, criterion: nn.Module) -> float:
    """One optimiser step at ``lr`` (times each group's layer-decay ``lr_scale``); returns this rank's loss."""
    for group in run.opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    seed = step_seed(job.seed, step, session.rank)
    torch.manual_seed(seed)  # drop path
    pixels = batch["pixels"].to(session.device, non_blocking=True)
    labels = batch["labels"].to(session.device, non_blocking=True)
    if mixup is not None:
        outer = np.random.get_state()  # timm's Mixup draws from numpy's global generator
        np.random.seed(seed % 2**32)
        pixels, labels = mixup(pixels, labels)
        np.random.set_state(outer)
    with D.autocast(session.device, run.precision):
        loss = criterion(run.model(pixels), labels)
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"run {job.run_name}: non-finite loss {value} at step {step}; stopping (lower blr)")
    run.opt.zero_grad(set_to_none=True)
    if run.scaler.is_enabled():  # float16 autocast only
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        loss.backward()
        run.opt.step()
    return value


@torch.no_grad()
def evaluate_top1(job: FinetuneJob, core: nn.Module, test: Split, session: TrainSession) -> float:
    """Top-1 on the centre views of the test split; each rank takes its share, the counts are summed."""
    core.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for pixels, labels in eval_batches(test, job.preprocess_obj(), in_chans=job.timm_kwargs.get("in_chans", 3),
                                       crop=job.eval_crop, batch_size=job.eval_batch_size, rank=session.rank,
                                       world=session.world_size, policy=job.policy()):
        with D.autocast(session.device, run_precision(session.device, job)):
            logits = core(pixels.to(session.device))
        counts += torch.tensor([float((logits.argmax(1).cpu() == labels).sum()), len(labels)], dtype=torch.float64)
    if session.world_size > 1:
        counts = D.sum_over_ranks(counts, session.device)
    return float(counts[0] / counts[1].clamp_min(1))


def run_precision(device: torch.device, job: FinetuneJob) -> str:
    """The compute precision: ``amp_dtype`` autocast on CUDA, float32 on the CPU."""
    return D.train_precision(device, job.amp_dtype)


def _checkpoint(job: FinetuneJob, run: _Run, session: TrainSession, row: dict[str, Any]) -> None:
    """Every rank reports the epoch; rank 0 attaches the checkpoint and rewrites ``<run>/metrics.jsonl``."""
    with tempfile.TemporaryDirectory() as d:
        if session.rank == 0:
            state = {"kind": STATE_KIND, "model": run.core.state_dict(), "optimizer": run.opt.state_dict(),
                     "scaler": run.scaler.state_dict(), "epoch": run.epoch, "fingerprint": job.fingerprint(),
                     "history": json.dumps(run.history)}
            torch.save(state, os.path.join(d, STATE_FILE))
            mark_order(d, run.epoch)
        session.report(row, d if session.rank == 0 else None)
    if session.rank == 0:
        lines = "".join(json.dumps(r) + "\n" for r in run.history).encode()
        storage.write_bytes(storage.join(job.run_url, "metrics.jsonl"), lines)


def write_results(job: FinetuneJob, run: _Run, session: TrainSession, n_train: int, n_test: int) -> dict[str, Any]:
    """Write ``<run>/results.json`` (see docs/finetune.md#4-results-json) and return it."""
    last = run.history[-1] if run.history else {}
    scored = [r["test_top1"] for r in run.history if r["test_top1"] is not None]
    params = list(run.core.named_parameters())
    results = {
        "protocol": job.protocol, "run_name": job.run_name, "complete": run.epoch >= job.epochs,
        "epochs_done": run.epoch, "epochs": job.epochs, "start_epoch": run.start_epoch,
        "test_top1": last.get("test_top1"), "best_test_top1": max(scored, default=None),
        "train_loss": last.get("train_loss"), "num_classes": job.num_classes, "n_train": n_train, "n_test": n_test,
        "lr": scaled_lr(job.blr, job.batch_size), "world_size": session.world_size,
        "device": D.describe(session.device), "checkpoint": storage.redact_url(job.checkpoint_url),
        "checkpoint_sha256": job.checkpoint_sha256, "data_sha256": job.data_sha256,
        "trainable_params": sum(p.numel() for _, p in params if p.requires_grad),
        "total_params": sum(p.numel() for _, p in params),
        "trained_modules": sorted({n.split(".")[0] for n, p in params if p.requires_grad}),
        "history": run.history, "starts": read_attempts(job.run_url),
        "job": json.loads(storage.redact_text(json.dumps(job.to_dict()))),
    }
    storage.write_bytes(storage.join(job.run_url, RESULTS_FILE), json.dumps(results, indent=2).encode())
    return results
