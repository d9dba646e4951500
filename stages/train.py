"""Stage 2 — train: learn TEC from the target cache (or, for A/B checks, from the online base model).

All target sources share every line but :meth:`TargetSource.targets`. The worker loop (:func:`train_worker`)
talks to what runs it through one seam (:mod:`stages.train_session`): Ray Train workers (the default, and the only
multi-worker path) or, with ``num_workers: 0``, a single worker in the calling process, without Ray. Rank 0 saves
checkpoints (model, optimiser, scaler, step, ``(epoch, step_in_epoch)``, RNG state, metrics so far) every
``checkpoint_every`` steps and at each epoch end; starting the same run again (same name and storage) resumes from
the latest readable one exactly: the sample order is a pure function of (seed, epoch), the learning rate of the
step, and the masks of (seed, step, rank, micro-batch), drawn on the CPU (see :mod:`stages.device`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from infra import storage
from stages import device as D
from stages.cache import open_cache
from stages.train_data import SamplePlan, TrainBatches, cache_block_size, cache_valid, make_loader
from stages.train_job import TrainJob, check_cache
from stages.train_run import CONFIG_FILE, check_unchanged, job_json, record_start, require_complete_cache
from stages.train_session import (
    STATE_FILE,
    LocalSession,
    RaySession,
    RunLease,
    TrainSession,
    checkpoint_names,
    latest_state,
)
from stages.uri_policy import UriPolicy
from tec_model import BaseModel, export_encoder, export_mae, num_patches, patchify
from tec_model.flops import vit_forward_macs
from tec_model.masking import num_visible
from tec_model.optim import lr_schedule, param_groups, scaled_lr

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training stopped: the loss became NaN or infinite."""


def run_dir(job: TrainJob) -> str:
    return storage.join(job.storage_path, job.run_name)


def mask_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The masks of one micro-batch: a pure function of (seed, step, rank, micro), so a resume redraws them."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0]))


class TargetSource:
    """Where a step's targets come from: the cache's batch (fp16), the frozen base model on the same pixels
    (online), or the pixels themselves (pixel-MAE pre-training)."""

    def __init__(self, job: TrainJob, device: torch.device) -> None:
        self.base = None
        self.patch_size = job.timm_kwargs["patch_size"] if job.target_source == "pixel" else None
        if job.target_source == "online":
            self.base = BaseModel.from_checkpoint(storage.read_bytes(job.checkpoint_url), job.base_timm_kwargs,
                                                  job.last_layers, job.k_max).to(device)
            # the extraction's precision, so online targets equal cached ones up to the float16 storage
            self.base_precision = D.extraction_precision(job.base_precision, device)

    def targets(self, batch: dict[str, torch.Tensor], pixels: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(features (B, L, C_base), attn_logits (B, K+1, H, L), topk_index (B, K)) on ``pixels``' device; pixel
        mode: (patches (B, L, p·p·C_in), None, None)."""
        if self.patch_size is not None:
            return patchify(pixels, self.patch_size), None, None
        if self.base is None:
            return tuple(batch[k].to(pixels.device, non_blocking=True)
                         for k in ("features", "attn_logits", "topk_index"))
        with torch.no_grad(), D.autocast(pixels.device, self.base_precision):
            t = self.base(pixels)
        return t.features.float(), t.attn_logits.float(), t.topk_index


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    samples: int = 0
    bytes_read: int = 0
    skipped_steps: int = 0  # float16 GradScaler steps skipped for inf/NaN gradients (the schedule moves on)


def make_plan(job: TrainJob, world: int) -> tuple[SamplePlan, int]:
    """The sample plan: valid samples and read blocks from the cache (cache mode, or online with a cache for A/B),
    else every manifest row in blocks of 64. Returns (plan, number of images)."""
    if job.cache_url:
        cache = open_cache(job.cache_url)
        valid = cache_valid(cache)
        block = cache_block_size(cache)
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point: the worker loop behind a :class:`~stages.train_session.RaySession`."""
    job = TrainJob.from_dict(config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per report otherwise
    train_worker(job, RaySession(run_dir(job)))


def train_worker(job: TrainJob, session: TrainSession) -> None:
    """One worker: builds its own model and data, trains, checkpoints (rank 0), exports at the end (rank 0)."""
    torch.set_num_threads(job.threads_per_worker)
    if session.device.type == "cuda":
        D.configure_matmul(allow_tf32=True)  # fp32 matmuls outside autocast may use TF32 (stated, not inherited)
    rank, world = session.rank, session.world_size
    t = _build_trainer(job, session)
    if rank == 0:
        record_start(run_dir(job), t.progress.step, world, type(session).__name__)
    plan, _ = make_plan(job, world)
    per_epoch = plan.steps_per_epoch()
    total = job.epochs * per_epoch
    stop = min(total, job.max_steps or total)
    lrs = lr_schedule(scaled_lr(job.blr, job.global_batch), total, round(job.warmup_epochs * per_epoch), job.min_lr)
    source = TargetSource(job, session.device)
    # forward + backward ≈ 3 forwards; the encoder on the visible tokens only (the decoder is counted by the ledger)
    encoder_macs = 3 * vit_forward_macs(job.timm_kwargs,
                                        tokens=1 + num_visible(num_patches(job.timm_kwargs), job.mask_ratio))
    pre, in_chans = job.preprocess_obj(), job.base_timm_kwargs.get("in_chans", 3)
    window_start, window_samples, seen = time.perf_counter(), 0, []
    pin = D.pin_memory_for(session.device)
    while t.progress.step < stop:
        epoch, start = divmod(t.progress.step, per_epoch)
        data = TrainBatches(plan, epoch, rank, start, manifest_url=_manifest_url(job), preprocess=pre,
                            in_chans=in_chans, cache_url=job.cache_url if job.target_source == "cache" else None,
                            view_seed=job.view_seed, uri_policy=UriPolicy(**job.uri_policy) if job.uri_policy else None)
        for batch in make_loader(data, num_workers=job.loader_workers, pin_memory=pin):
            if batch["step"] != t.progress.step % per_epoch:
                raise RuntimeError(f"loader served step {batch['step']} of epoch {epoch}, the trainer is at step "
                                   f"{t.progress.step % per_epoch}")
            for group in t.opt.param_groups:
                group["lr"] = float(lrs[t.progress.step])
            parts = optimizer_step(job, t.model, t.opt, t.scaler, source, batch, session.device, t.precision,
                                   t.progress.step, rank, world)
            t.progress.skipped_steps += int(parts.pop("skipped"))
            t.progress.step += 1
            seen.append(batch["indices"].numpy())
            t.progress.samples += job.global_batch
            t.progress.bytes_read += int(batch.get("bytes_fetched", 0))  # decoded bytes of the blocks read
            window_samples += job.global_batch
            step = t.progress.step
            do_ckpt = step % job.checkpoint_every == 0 or step % per_epoch == 0 or step == stop
            if step % job.log_every == 0 or do_ckpt:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "epoch": step / per_epoch, "lr": float(lrs[step - 1]), **parts,
                       "samples_per_s": window_samples / elapsed if elapsed else 0.0,
                       "views_served": t.progress.samples, "bytes_read": _sum_over_ranks(t.progress.bytes_read, world),
                       "encoder_train_macs": t.progress.samples * encoder_macs,
                       "skipped_steps": t.progress.skipped_steps}
                t.history.append(row)
                if job.log_indices:
                    _write_indices(job, rank, step - len(seen), seen)
                seen = []
                _report(job, t, row, session, do_ckpt)
                window_start, window_samples = time.perf_counter(), 0
            if step >= stop:
                break
    if rank == 0 and t.progress.step >= total:
        write_export(job, t.core)


def _sum_over_ranks(value: int, world: int) -> int:
    """Sum an integer over all ranks (every rank calls this at the same steps)."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def _manifest_url(job: TrainJob) -> str:
    if job.manifest_url:
        return job.manifest_url
    return open_cache(job.cache_url).spec.manifest_uri


def optimizer_step(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, source: TargetSource,
                   batch: dict[str, Any], device: torch.device, precision: str, step: int, rank: int,
                   world: int) -> dict[str, float]:
    """One optimiser step over ``accum_steps`` micro-batches.

    Args:
        precision: ``float32`` (no autocast), ``bfloat16`` or ``float16`` autocast (see :mod:`stages.device`).
        step / rank: seed the masks with the micro-batch index (:func:`mask_generator`, drawn on the CPU).

    Returns:
        The rank-averaged ``loss``, ``loss_fea``, ``loss_att``, and ``skipped`` (1.0 when the float16 GradScaler
        skipped the update for inf/NaN gradients and lowered its scale, else 0.0).
    """
    import torch.distributed as dist

    pixels_all = batch["pixels"].to(device, non_blocking=True)
    targets = source.targets(batch, pixels_all)
    micro = len(pixels_all) // job.accum_steps
    sums = torch.zeros(3, dtype=torch.float64)
    for m in range(job.accum_steps):
        sl = slice(m * micro, (m + 1) * micro)
        features, attn, topk = (None if t is None else t[sl] for t in targets)
        sync = nullcontext() if (m == job.accum_steps - 1 or world == 1) else model.no_sync()
        with sync, D.autocast(device, precision):
            loss, parts, _ = model(pixels_all[sl], features.float(), None if attn is None else attn.float(),
                                   None if topk is None else topk.long(),
                                   generator=mask_generator(job.seed, step, rank, m))
        scaled = loss / job.accum_steps
        (scaler.scale(scaled) if scaler.is_enabled() else scaled).backward()
        sums += torch.tensor([loss.item(), parts["loss_fea"].item(), parts.get("loss_att", torch.tensor(0.)).item()],
                             dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    sums /= job.accum_steps * world
    if not math.isfinite(sums[0].item()):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"run {job.run_name}: non-finite loss {sums[0].item()} at step {step}; stopping "
                                 "(lower blr, check the targets, or resume from the last checkpoint)")
    skipped = False
    if scaler.is_enabled():
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < before  # update() lowers the scale exactly when step() found inf grads
        if skipped:
            log.warning("step %d: float16 gradients overflowed; update skipped, loss scale %.0f -> %.0f", step,
                        before, scaler.get_scale())
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": sums[0].item(), "loss_fea": sums[1].item(), "loss_att": sums[2].item(), "skipped": float(skipped)}


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
    """Write the folded encoder (``encoder.pth``, a timm state dict) and its kwargs (``encoder.json``); a pixel-MAE
    run also writes ``mae.pth``, MAE's checkpoint layout (``{"model": encoder + decoder weights}``).

    Returns:
        The URL of ``encoder.pth`` (default ``<run>/export/``).
    """
    buf = io.BytesIO()
    torch.save(export_encoder(model), buf)
    root = out_dir or storage.join(run_dir(job), "export")
    storage.write_bytes(storage.join(root, "encoder.pth"), buf.getvalue())
    if job.target_source == "pixel":
        buf = io.BytesIO()
        torch.save({"model": export_mae(model), "arch": job.timm_kwargs, "epochs": job.epochs}, buf)
        storage.write_bytes(storage.join(root, "mae.pth"), buf.getvalue())
    meta = {"timm_kwargs": job.timm_kwargs, "load": "timm VisionTransformer(**timm_kwargs).load_state_dict(sd)"}
    storage.write_bytes(storage.join(root, "encoder.json"), json.dumps(meta, indent=2).encode())
    return storage.join(root, "encoder.pth")


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
    or is unfinished, a run name held by another live process (:class:`~stages.train_session.RunBusyError`; the
    lease ``<run>/lease.json`` is held until this returns), an existing run whose ``config.json`` has another
    fingerprint (:class:`~stages.train_run.RunConfigChangedError`, naming the fields). Then ``run_files``
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
    with RunLease(root):
        check_unchanged(job, root)
        for name, data in (run_files or {}).items():
            storage.write_bytes(storage.join(root, name), data)
        # URLs redacted: the job in memory keeps them working
        storage.write_bytes(storage.join(root, CONFIG_FILE), json.dumps(job_json(job), indent=2).encode())
        metrics, checkpoint = _fit_in_process(job) if job.num_workers == 0 else _fit_on_ray(job, address)
    export = storage.join(root, "export", "encoder.pth")
    return TrainResult(run_dir=root, metrics=metrics, checkpoint_path=checkpoint,
                       export_path=export if storage.exists(export) else None)


# Failures an in-process run restarts from its latest checkpoint (as Ray's FailureConfig restarts workers): storage
# that stayed unavailable past the retry budget, dropped connections, time-outs. A refusal (bad configuration,
# non-finite loss, incompatible cache, missing file) is never retried.
_RESTARTABLE = (storage.StorageError, ConnectionError, TimeoutError)


def _fit_in_process(job: TrainJob) -> tuple[dict[str, Any], str | None]:
    """The worker loop in this process on one device, restarted from the latest checkpoint up to
    ``max_failures`` times (-1: without limit) after a storage or OS error."""
    failures = 0
    while True:
        session = LocalSession(run_dir(job), job.use_gpu, job.keep_checkpoints)
        log.info("training %s in-process on %s", job.run_name, D.describe(session.device))
        try:
            train_worker(job, session)
        except _RESTARTABLE as err:
            failures += 1
            if 0 <= job.max_failures < failures:
                raise
            log.warning("run %s failed (%s: %s); restarting from its latest checkpoint (failure %d of %s)",
                        job.run_name, type(err).__name__, err, failures,
                        "unlimited" if job.max_failures < 0 else job.max_failures)
            continue
        names = checkpoint_names(run_dir(job))
        return session.last_metrics, session.last_checkpoint or (
            storage.join(run_dir(job), names[-1]) if names else None)


def _fit_on_ray(job: TrainJob, address: str | None) -> tuple[dict[str, Any], str | None]:
    """The worker loop on ``num_workers`` Ray Train workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.ray_cluster import ensure_ray

    ensure_ray(address)
    storage_path, fs = storage.ray_storage(job.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": job.threads_per_worker}),
        run_config=RunConfig(name=job.run_name, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints)),
    )
    result = trainer.fit()
    return dict(result.metrics or {}), result.checkpoint.path if result.checkpoint else None
