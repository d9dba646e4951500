"""One optimiser step of TEC training, and where its targets come from.

Every target source shares every line of :func:`optimizer_step` but :meth:`TargetProvider.targets`. The masks of a
micro-batch are a pure function of (seed, step, rank, micro-batch), drawn on the CPU (:func:`mask_generator`), so a
resumed run redraws them exactly.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from infra import storage
from stages import device as D
from stages.train.job import TrainJob
from tec_model import BaseModel, patchify

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training stopped: the loss became NaN or infinite."""


def mask_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The masks of one micro-batch: a pure function of (seed, step, rank, micro), so a resume redraws them."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0]))


class TargetProvider:
    """Where a step's targets come from (``job.target_source``): the cache's batch (fp16), the frozen base model on
    the same pixels (online), or the pixels themselves (pixel-MAE pre-training)."""

    def __init__(self, job: TrainJob, device: torch.device) -> None:
        self.base = None
        self.patch_size = job.timm_kwargs["patch_size"] if job.target_source == "pixel" else None
        if job.target_source == "online":
            self.base = BaseModel.from_checkpoint(storage.read_bytes(job.checkpoint_url), job.base_timm_kwargs,
                                                  job.last_layers, job.k_max,
                                                  checkpoint_key=job.base_checkpoint_key).to(device)
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


def optimizer_step(job: TrainJob, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any,
                   source: TargetProvider, batch: dict[str, Any], device: torch.device, precision: str, step: int,
                   rank: int, world: int) -> dict[str, float]:
    """One optimiser step over ``accum_steps`` micro-batches.

    Args:
        batch: ``pixels`` (B, C, S, S) and, in cache mode, the stored targets (see :class:`TargetProvider`).
        precision: ``float32`` (no autocast), ``bfloat16`` or ``float16`` autocast (see :mod:`stages.device`).
        step / rank: seed the masks with the micro-batch index (:func:`mask_generator`, drawn on the CPU).

    Returns:
        The rank-averaged ``loss``, ``loss_fea``, ``loss_att``, and ``skipped`` (1.0 when the float16 GradScaler
        skipped the update for inf/NaN gradients and lowered its scale, else 0.0).

    Raises:
        NonFiniteLossError: the rank-averaged loss is NaN or infinite (nothing is updated).
    """
    sums = _accumulate(job, model, scaler, source, batch, device, precision, step, rank, world)
    if not math.isfinite(sums[0].item()):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"run {job.run_name}: non-finite loss {sums[0].item()} at step {step}; stopping "
                                 "(lower blr, check the targets, or resume from the last checkpoint)")
    skipped = _apply(opt, scaler, step)
    opt.zero_grad(set_to_none=True)
    return {"loss": sums[0].item(), "loss_fea": sums[1].item(), "loss_att": sums[2].item(), "skipped": float(skipped)}


def _accumulate(job: TrainJob, model: nn.Module, scaler: Any, source: TargetProvider, batch: dict[str, Any],
                device: torch.device, precision: str, step: int, rank: int, world: int) -> torch.Tensor:
    """Forward and backward every micro-batch; returns the rank-averaged (loss, loss_fea, loss_att), float64 (3,)."""
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
        sums = D.sum_over_ranks(sums, device)
    return sums / (job.accum_steps * world)


def _apply(opt: torch.optim.Optimizer, scaler: Any, step: int) -> bool:
    """Step the optimiser (through the GradScaler when it is enabled); True when float16 gradients overflowed and
    the update was skipped."""
    if not scaler.is_enabled():
        opt.step()
        return False
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    skipped = scaler.get_scale() < before  # update() lowers the scale exactly when step() found inf grads
    if skipped:
        log.warning("step %d: float16 gradients overflowed; update skipped, loss scale %.0f -> %.0f", step,
                    before, scaler.get_scale())
    return skipped
