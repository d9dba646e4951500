"""The worker loop of the train stage: build, resume, train, report, checkpoint, export.

The loop (:func:`train_worker`) talks to what runs it through one seam (:mod:`stages.train.session`): Ray Train
workers (the default, and the only multi-worker path) or, with ``num_workers: 0``, a single worker in the calling
process, without Ray. Rank 0 saves checkpoints (model, optimiser, scaler, step, ``(epoch, step_in_epoch)``, RNG
state, metrics so far) every ``checkpoint_every`` steps and at each epoch end; starting the same run again (same
name and storage) resumes from the latest readable one exactly: the sample order is a pure function of (seed,
epoch), the learning rate of the step, and the masks of (seed, step, rank, micro-batch), drawn on the CPU (see
:mod:`stages.device`). Workers trust the cache: :func:`stages.train.run.run_train` checked its fit and completeness
once before they started.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from infra import storage
from stages import device as D
from stages.cache import TargetCache, open_cache
from stages.cache.local_tier import LocalCacheSettings
from stages.cache.spec import CacheSpec
from stages.train.data import TrainBatches, make_loader
from stages.train.job import TrainJob, run_dir
from stages.train.plan import SamplePlan
from stages.train.rundir import record_start
from stages.train.session import STATE_FILE, RaySession, TrainSession, latest_state, mark_order
from stages.train.step import TargetProvider, optimizer_step
from stages.uri_policy import UriPolicy
from tec_model import export_encoder, export_mae, export_with_adapters, num_patches
from tec_model.flops import vit_forward_macs
from tec_model.masking import num_visible
from tec_model.optim import lr_schedule, param_groups, scaled_lr

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    samples: int = 0
    bytes_read: int = 0
    skipped_steps: int = 0  # float16 GradScaler steps skipped for inf/NaN gradients (the schedule moves on)
    object_store_bytes: int = 0  # bytes this rank's readers read from the cache's store (local cache misses)
    local_cache_bytes: int = 0  # bytes they served from the node-local cache


def make_plan(job: TrainJob, world: int, cache: TargetCache | None = None) -> tuple[SamplePlan, int]:
    """The sample plan: valid samples and read blocks from the cache (cache mode, or online with a cache for A/B;
    ``cache``: the job's cache, already open), else every manifest row in blocks of 64. Returns (plan, number of
    images)."""
    if job.cache_url:
        cache = cache or open_cache(job.cache_url)
        valid, block = cache.valid(), cache.block_size
    else:
        from stages.manifest import read_manifest

        table, _ = read_manifest(job.manifest_url)
        valid, block = np.ones(table.num_rows, bool), 64
    plan = SamplePlan(valid=valid, block_size=block, views_per_image=job.views_per_image, seed=job.seed,
                      global_batch=job.global_batch, world_size=world, shuffle_window=job.shuffle_window)
    return plan, len(valid)


def _save_checkpoint(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, progress: Progress,
                     history: list[dict], directory: str) -> None:
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
        "progress": progress.__dict__, "fingerprint": job.fingerprint(), "global_batch": job.global_batch,
        "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
    }
    torch.save(state, os.path.join(directory, STATE_FILE))
    mark_order(directory, progress.step)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)


def latest_checkpoint_state(run_url: str) -> dict[str, Any]:
    """The newest readable checkpoint's saved state of a run directory (``weights_only`` load).

    Raises:
        FileNotFoundError: the run has no readable checkpoint.
    """
    found = latest_state(run_url)
    if found is None:
        raise FileNotFoundError(f"{run_url} has no checkpoint yet")
    return found[1]


def _restore(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any,
             state: dict[str, Any]) -> tuple[Progress, list[dict]]:
    """Load a checkpoint's state (saved on any device) into CPU-or-GPU model, optimiser and scaler."""
    if state["fingerprint"] != job.fingerprint():
        raise RuntimeError(f"run {job.run_name!r}: the configuration changed since its last checkpoint (a resumed "
                           f"run must keep model, data order and schedule; global batch was {state['global_batch']})")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"]), json.loads(state["history"])


@dataclass
class _Trainer:
    """What one worker trains: the model (``core``; ``model`` is it as the session wraps it), optimiser, scaler,
    compute precision, and where training stands."""

    core: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    precision: str
    progress: Progress
    history: list[dict]


def _build_trainer(job: TrainJob, session: TrainSession) -> _Trainer:
    """Build this worker's model and optimiser on the session's device and resume from the latest checkpoint."""
    torch.manual_seed(job.seed)
    core = job.build_model().to(session.device)
    model = session.prepare_model(core)
    opt = torch.optim.AdamW(param_groups(core, job.weight_decay), lr=0.0, betas=(0.9, 0.95))
    precision = D.train_precision(session.device, job.amp_dtype)
    scaler = D.make_grad_scaler(session.device, precision)
    progress, history = Progress(), []
    if (state := session.latest_state()) is not None:
        progress, history = _restore(job, core, opt, scaler, state)
        log.info("rank %d resumed %s at step %d", session.rank, job.run_name, progress.step)
    return _Trainer(core, model, opt, scaler, precision, progress, history)


@dataclass
class _Schedule:
    """The run's length and learning rates, and what an epoch reads."""

    plan: SamplePlan
    per_epoch: int
    total: int  # steps of the whole schedule (``epochs`` epochs)
    stop: int  # where this start stops (``max_steps`` or ``total``)
    lrs: np.ndarray  # (total,) learning rate of each step
    spec: CacheSpec | None  # the cache's spec, checked by run_train (None without a cache)


def _schedule(job: TrainJob, world: int) -> _Schedule:
    cache = open_cache(job.cache_url) if job.cache_url else None
    plan, _ = make_plan(job, world, cache)
    per_epoch = plan.steps_per_epoch()
    total = job.epochs * per_epoch
    lrs = lr_schedule(scaled_lr(job.blr, job.global_batch), total, round(job.warmup_epochs * per_epoch), job.min_lr)
    return _Schedule(plan, per_epoch, total, min(total, job.max_steps or total), lrs,
                     None if cache is None else cache.spec)


def _run_batches(job: TrainJob, s: _Schedule, rank: int, first: int) -> TrainBatches:
    """This rank's batches from global step ``first`` to the schedule's stop, across epochs (the cache's targets
    only in cache mode)."""
    epoch, start = divmod(first, s.per_epoch)
    return TrainBatches(s.plan, epoch, rank, start, until=s.stop, manifest_url=job.manifest_url or s.spec.manifest_uri,
                        preprocess=job.preprocess_obj(), in_chans=job.base_timm_kwargs.get("in_chans", 3),
                        cache_url=job.cache_url if job.target_source == "cache" else None, view_seed=job.view_seed,
                        uri_policy=UriPolicy(**job.uri_policy) if job.uri_policy else None, checked_spec=s.spec,
                        local_cache=LocalCacheSettings.of(job.local_cache, job.epochs))


@dataclass
class _Window:
    """What the steps since the last report did: their sample indices, samples and start time."""

    started: float = field(default_factory=time.perf_counter)
    samples: int = 0
    seen: list[np.ndarray] = field(default_factory=list)


LEASE_TOKEN_KEY = "lease_token"  # beside the job's fields in the Ray workers' config: the driver's lease token


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point: the worker loop behind a :class:`~stages.train.session.RaySession`.

    Args:
        config: :meth:`TrainJob.to_dict` plus ``lease_token`` (the driver's lease, checked before checkpoints).
    """
    config = dict(config)
    token = config.pop(LEASE_TOKEN_KEY, None)
    job = TrainJob.from_dict(config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per report otherwise
    train_worker(job, RaySession(run_dir(job), token))


def train_worker(job: TrainJob, session: TrainSession) -> None:
    """One worker: builds its own model and data, trains, checkpoints (rank 0), exports at the end (rank 0)."""
    torch.set_num_threads(job.threads_per_worker)
    if session.device.type == "cuda":
        D.configure_matmul(allow_tf32=True)  # fp32 matmuls outside autocast may use TF32 (stated, not inherited)
    t = _build_trainer(job, session)
    if session.rank == 0:
        record_start(run_dir(job), t.progress.step, session.world_size, type(session).__name__)
    s = _schedule(job, session.world_size)
    source = TargetProvider(job, session.device)
    window, pin = _Window(), D.pin_memory_for(session.device)
    # One loader, and one set of reader processes, for all the epochs this attempt trains.
    loader = (make_loader(_run_batches(job, s, session.rank, t.progress.step), num_workers=job.loader_workers,
                          pin_memory=pin) if t.progress.step < s.stop else ())
    for batch in loader:
        if (batch["epoch"], batch["step"]) != divmod(t.progress.step, s.per_epoch):
            raise RuntimeError("loader served step {1} of epoch {0}, the trainer is at step {3} of epoch {2}".format(
                batch["epoch"], batch["step"], *divmod(t.progress.step, s.per_epoch)))
        parts = _train_step(job, t, s, source, batch, session)
        window.seen.append(batch["indices"].numpy())
        window.samples += job.global_batch
        step = t.progress.step
        do_ckpt = step % job.checkpoint_every == 0 or step % s.per_epoch == 0 or step == s.stop
        if step % job.log_every == 0 or do_ckpt:
            row = _metrics_row(job, t, s, parts, window, session)
            if job.log_indices:
                _write_indices(job, session.rank, step - len(window.seen), window.seen)
            _report(job, t, row, session, do_ckpt)
            window = _Window()
    if session.rank == 0 and t.progress.step >= s.total:
        write_export(job, t.core)


def _train_step(job: TrainJob, t: _Trainer, s: _Schedule, source: TargetProvider, batch: dict[str, Any],
                session: TrainSession) -> dict[str, float]:
    """One optimiser step at the schedule's learning rate; advances ``t.progress``. Returns the step's losses."""
    for group in t.opt.param_groups:
        group["lr"] = float(s.lrs[t.progress.step])
    parts = optimizer_step(job, t.model, t.opt, t.scaler, source, batch, session.device, t.precision,
                           t.progress.step, session.rank, session.world_size)
    t.progress.skipped_steps += int(parts.pop("skipped"))
    t.progress.step += 1
    t.progress.samples += job.global_batch
    t.progress.bytes_read += int(batch.get("bytes_fetched", 0))  # decoded bytes of the blocks read
    t.progress.object_store_bytes += int(batch.get("object_store_bytes", 0))
    t.progress.local_cache_bytes += int(batch.get("local_cache_bytes", 0))
    return parts


def _metrics_row(job: TrainJob, t: _Trainer, s: _Schedule, parts: dict[str, float], window: _Window,
                 session: TrainSession) -> dict[str, Any]:
    """The metrics of a report (appended to ``t.history``); every rank builds it at the same steps."""
    # forward + backward ≈ 3 forwards; the encoder on the visible tokens only (the decoder is counted by the ledger)
    encoder_macs = 3 * vit_forward_macs(job.timm_kwargs,
                                        tokens=1 + num_visible(num_patches(job.timm_kwargs), job.mask_ratio))
    step, elapsed = t.progress.step, time.perf_counter() - window.started
    p = t.progress
    read, store, local = _sum_over_ranks([p.bytes_read, p.object_store_bytes, p.local_cache_bytes], session)
    row = {"step": step, "epoch": step / s.per_epoch, "lr": float(s.lrs[step - 1]), **parts,
           "samples_per_s": window.samples / elapsed if elapsed else 0.0,
           "views_served": t.progress.samples, "bytes_read": read, "object_store_bytes": store,
           "local_cache_bytes": local, "encoder_train_macs": t.progress.samples * encoder_macs,
           "skipped_steps": t.progress.skipped_steps}
    t.history.append(row)
    return row


def _sum_over_ranks(values: list[int], session: TrainSession) -> list[int]:
    """Sum integers over all ranks in one all-reduce (every rank calls this at the same steps)."""
    if session.world_size == 1:
        return list(values)
    return [int(v) for v in D.sum_over_ranks(torch.tensor(values, dtype=torch.int64), session.device).tolist()]


def _report(job: TrainJob, t: _Trainer, row: dict, session: TrainSession, checkpoint: bool) -> None:
    """Every rank reports at the same steps; rank 0 alone attaches the checkpoint."""
    if not checkpoint:
        session.report(row)
        return
    with tempfile.TemporaryDirectory() as d:
        if session.rank == 0:
            _save_checkpoint(job, t.core, t.opt, t.scaler, t.progress, t.history, d)
        session.report(row, d if session.rank == 0 else None)
    if session.rank == 0:
        lines = "".join(json.dumps(r) + "\n" for r in t.history).encode()
        storage.write_bytes(storage.join(run_dir(job), "metrics.jsonl"), lines)
        log.info("step %d: loss %.4f (fea %.4f, att %.4f), %.1f samples/s, checkpoint saved", row["step"],
                 row["loss"], row["loss_fea"], row["loss_att"], row["samples_per_s"])


def _write_indices(job: TrainJob, rank: int, first_step: int, seen: list[np.ndarray]) -> None:
    """The indices this rank trained on in steps [first_step, first_step + len(seen)), as JSON."""
    name = f"rank{rank}_steps{first_step:08d}-{first_step + len(seen) - 1:08d}.json"
    rows = {str(first_step + i): idx.tolist() for i, idx in enumerate(seen)}
    storage.write_bytes(storage.join(run_dir(job), "indices", name), json.dumps(rows).encode())


def write_export(job: TrainJob, model: nn.Module, out_dir: str | None = None) -> str:
    """Write the folded encoder (``encoder.pth``, a timm state dict) and its kwargs (``encoder.json``); a model with
    adapters also writes ``encoder_adapters.pth``, the encoder with its adapters kept unfolded (for PEFT,
    :func:`tec_model.export.export_with_adapters`); a pixel-MAE run also writes ``mae.pth``, MAE's checkpoint layout
    (``{"model": encoder + decoder weights}``).

    Returns:
        The URL of ``encoder.pth`` (default ``<run>/export/``).
    """
    buf = io.BytesIO()
    torch.save(export_encoder(model), buf)
    root = out_dir or storage.join(run_dir(job), "export")
    storage.write_bytes(storage.join(root, "encoder.pth"), buf.getvalue())
    if model.input_adapter is not None or model.encoder_adapter is not None:
        buf = io.BytesIO()
        torch.save(export_with_adapters(model), buf)
        storage.write_bytes(storage.join(root, "encoder_adapters.pth"), buf.getvalue())
    if job.target_source == "pixel":
        buf = io.BytesIO()
        torch.save({"model": export_mae(model), "arch": job.timm_kwargs, "epochs": job.epochs}, buf)
        storage.write_bytes(storage.join(root, "mae.pth"), buf.getvalue())
    meta = {"timm_kwargs": job.timm_kwargs, "load": "timm VisionTransformer(**timm_kwargs).load_state_dict(sd)"}
    storage.write_bytes(storage.join(root, "encoder.json"), json.dumps(meta, indent=2).encode())
    return storage.join(root, "encoder.pth")
