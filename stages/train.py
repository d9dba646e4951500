"""Stage 2 — train: Ray Train workers learn TEC from the target cache (or, for A/B checks, from the online base model).

Both target sources share every line but :meth:`TargetSource.targets`. Rank 0 saves checkpoints (model, optimiser,
scaler, step, ``(epoch, step_in_epoch)``, RNG state, metrics so far) through ``ray.train.report`` every
``checkpoint_every`` steps and at each epoch end; starting the same run again (same name and storage) resumes from
the latest one exactly: the sample order is a pure function of (seed, epoch), the learning rate of the step, and the
masks of (seed, step, rank).
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
from stages.cache import open_cache
from stages.train_data import SamplePlan, TrainBatches, cache_block_size, cache_valid, make_loader
from stages.train_job import TrainJob, check_cache
from tec_model import BaseModel, export_encoder, export_mae, num_patches, patchify
from tec_model.flops import vit_forward_macs
from tec_model.masking import num_visible
from tec_model.optim import lr_schedule, param_groups, scaled_lr

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


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

    def targets(self, batch: dict[str, torch.Tensor], pixels: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(features (B, L, C_base), attn_logits (B, K+1, H, L), topk_index (B, K)) on ``pixels``' device; pixel
        mode: (patches (B, L, p·p·C_in), None, None)."""
        if self.patch_size is not None:
            return patchify(pixels, self.patch_size), None, None
        if self.base is None:
            return tuple(batch[k].to(pixels.device) for k in ("features", "attn_logits", "topk_index"))
        with torch.no_grad():
            t = self.base(pixels)
        return t.features, t.attn_logits, t.topk_index


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    samples: int = 0
    bytes_read: int = 0


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
    """The newest checkpoint's saved state of a run directory (``weights_only`` load)."""
    names = sorted({k.split("/")[0] for k in storage.list_objects(run_url)
                    if k.startswith("checkpoint_") and k.endswith("/" + STATE_FILE)})
    if not names:
        raise FileNotFoundError(f"{run_url} has no checkpoint yet")
    data = storage.read_bytes(storage.join(run_url, names[-1], STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _load_checkpoint(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any,
                     checkpoint: Any) -> tuple[Progress, list[dict]]:
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    if state["fingerprint"] != job.fingerprint():
        raise RuntimeError(f"run {job.run_name!r}: the configuration changed since its last checkpoint (a resumed "
                           f"run must keep model, data order and schedule; global batch was {state['global_batch']})")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"]), json.loads(state["history"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: builds its own model and data, trains, checkpoints (rank 0), exports at the end."""
    import ray.train
    import ray.train.torch

    job = TrainJob.from_dict(config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per report otherwise
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads_per_worker)
    device = ray.train.torch.get_device()
    torch.manual_seed(job.seed)
    core = job.build_model().to(device)
    model = ray.train.torch.prepare_model(core) if world > 1 else core
    opt = torch.optim.AdamW(param_groups(core, job.weight_decay), lr=0.0, betas=(0.9, 0.95))
    amp = device.type == "cuda"
    amp_dtype = getattr(torch, job.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    progress, history = Progress(), []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        progress, history = _load_checkpoint(job, core, opt, scaler, checkpoint)
        log.info("rank %d resumed %s at step %d", rank, job.run_name, progress.step)

    plan, _ = make_plan(job, world)
    per_epoch = plan.steps_per_epoch()
    total = job.epochs * per_epoch
    stop = min(total, job.max_steps or total)
    lrs = lr_schedule(scaled_lr(job.blr, job.global_batch), total, round(job.warmup_epochs * per_epoch), job.min_lr)
    source = TargetSource(job, device)
    # forward + backward ≈ 3 forwards; the encoder on the visible tokens only (the decoder is counted by the ledger)
    encoder_macs_per_sample = 3 * vit_forward_macs(
        job.timm_kwargs, tokens=1 + num_visible(num_patches(job.timm_kwargs), job.mask_ratio))
    pre = job.preprocess_obj()
    in_chans = job.base_timm_kwargs.get("in_chans", 3)
    window_start, window_samples, seen = time.perf_counter(), 0, []

    while progress.step < stop:
        epoch, start = divmod(progress.step, per_epoch)
        data = TrainBatches(plan, epoch, rank, start, manifest_url=_manifest_url(job), preprocess=pre,
                            in_chans=in_chans, cache_url=job.cache_url if job.target_source == "cache" else None,
                            view_seed=job.view_seed)
        for batch in make_loader(data, num_workers=job.loader_workers):
            if batch["step"] != progress.step % per_epoch:
                raise RuntimeError(f"loader served step {batch['step']} of epoch {epoch}, the trainer is at step "
                                   f"{progress.step % per_epoch}")
            for group in opt.param_groups:
                group["lr"] = float(lrs[progress.step])
            parts = _optimizer_step(job, model, opt, scaler, source, batch, device, amp, amp_dtype, progress.step,
                                    rank, world)
            progress.step += 1
            seen.append(batch["indices"].numpy())
            progress.samples += job.global_batch
            progress.bytes_read += int(batch.get("bytes_fetched", 0))  # decoded bytes of the blocks read
            window_samples += job.global_batch
            end_of_epoch = progress.step % per_epoch == 0
            do_ckpt = progress.step % job.checkpoint_every == 0 or end_of_epoch or progress.step == stop
            if progress.step % job.log_every == 0 or do_ckpt:
                elapsed = time.perf_counter() - window_start
                row = {"step": progress.step, "epoch": progress.step / per_epoch, "lr": float(lrs[progress.step - 1]),
                       **parts, "samples_per_s": window_samples / elapsed if elapsed else 0.0,
                       "views_served": progress.samples, "bytes_read": _sum_over_ranks(progress.bytes_read, world),
                       "encoder_train_macs": progress.samples * encoder_macs_per_sample}
                history.append(row)
                if job.log_indices:
                    _write_indices(job, rank, progress.step - len(seen), seen)
                seen = []
                _report(job, core, opt, scaler, progress, history, row, rank, do_ckpt)
                window_start, window_samples = time.perf_counter(), 0
            if progress.step >= stop:
                break
    if rank == 0 and progress.step >= total:
        write_export(job, core)


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


def _optimizer_step(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, source: TargetSource,
                    batch: dict[str, Any], device: torch.device, amp: bool, amp_dtype: torch.dtype, step: int,
                    rank: int, world: int) -> dict[str, float]:
    """One optimiser step over ``accum_steps`` micro-batches; returns the rank-averaged losses."""
    import torch.distributed as dist

    pixels_all = batch["pixels"].to(device, non_blocking=True)
    targets = source.targets(batch, pixels_all)
    micro = len(pixels_all) // job.accum_steps
    sums = torch.zeros(3, dtype=torch.float64)
    for m in range(job.accum_steps):
        sl = slice(m * micro, (m + 1) * micro)
        pixels = pixels_all[sl]
        features, attn, topk = (None if t is None else t[sl] for t in targets)
        sync = nullcontext() if (m == job.accum_steps - 1 or world == 1) else model.no_sync()
        with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss, parts, _ = model(pixels, features.float(), None if attn is None else attn.float(),
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
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": sums[0].item(), "loss_fea": sums[1].item(), "loss_att": sums[2].item()}


def _report(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, progress: Progress,
            history: list[dict], row: dict, rank: int, checkpoint: bool) -> None:
    """Every rank reports at the same steps; rank 0 alone attaches the checkpoint."""
    import ray.train

    if not checkpoint:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            _save_checkpoint(job, model, opt, scaler, progress, history, d)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
    if rank == 0:
        lines = "".join(json.dumps(r) + "\n" for r in history).encode()
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


def run_train(job: TrainJob, address: str | None = None) -> TrainResult:
    """Train (or resume) a run on Ray Train and return its final metrics.

    Refuses an incompatible cache before any worker starts; writes the resolved job to ``<run>/config.json``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.ray_cluster import ensure_ray

    job = job.replace(**{k: storage.absolute(getattr(job, k)) for k in
                         ("storage_path", "cache_url", "manifest_url", "checkpoint_url")})
    if job.target_source == "cache":
        check_cache(job)
    ensure_ray(address)
    root = run_dir(job)
    storage.write_bytes(storage.join(root, "config.json"), json.dumps(job.to_dict(), indent=2, default=str).encode())
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
    export = storage.join(root, "export", "encoder.pth")
    return TrainResult(run_dir=root, metrics=dict(result.metrics or {}),
                       checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                       export_path=export if storage.exists(export) else None)
