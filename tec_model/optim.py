"""MAE's optimisation recipe: AdamW param groups without decay on biases/1-D params, per-iteration schedules."""

from __future__ import annotations

import math

import numpy as np
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on ≥2-D weights, none on biases, norms, tokens and other 1-D params.

    Frozen parameters (``requires_grad=False``, e.g. the fixed position embeddings) are left out.
    """
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(blr: float, global_batch: int) -> float:
    """``lr = blr · global_batch / 256`` (the effective batch, after accumulation, over all ranks)."""
    return blr * global_batch / 256


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> np.ndarray:
    """Per-iteration learning rates: linear warm-up from 0, then a half-cycle cosine to ``min_lr``.

    Returns:
        (total_steps,) float64; entry t is the rate used for optimiser step t.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total >= 1")
    t = np.arange(total_steps, dtype=np.float64)
    warm = base_lr * t / max(1, warmup_steps)
    progress = (t - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + np.cos(math.pi * progress))
    return np.where(t < warmup_steps, warm, cosine)
