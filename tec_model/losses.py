"""TEC target transforms and losses, as pure functions.

See docs/method.md#3-target-transforms-at-training-time and docs/method.md#5-losses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

FeatureNorm = Literal["patch", "channel", "none"]
NORM_EPS = 1e-6


def standardize(y: torch.Tensor, dim: int, eps: float = NORM_EPS) -> torch.Tensor:
    """``(y - mean) / sqrt(var + eps)`` along ``dim`` with the unbiased variance, in float32."""
    y = y.float()
    mean = y.mean(dim=dim, keepdim=True)
    var = y.var(dim=dim, keepdim=True, unbiased=True)
    return (y - mean) / torch.sqrt(var + eps)


def patch_norm(y: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Patch-dimension normalisation: per image and channel, over the token axis.

    ``Ŷ = (Y - mean_L) / sqrt(var_L + eps)`` with the unbiased variance.

    Args:
        y: (N, L, C) base-model features.

    Returns:
        (N, L, C) float32.
    """
    return standardize(y, dim=-2, eps=eps)


def channel_norm(y: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Channel-dimension normalisation (MAE's norm_pix style): per token, over the channel axis.

    Args:
        y: (N, L, C).

    Returns:
        (N, L, C) float32.
    """
    return standardize(y, dim=-1, eps=eps)


def normalize_features(y: torch.Tensor, mode: FeatureNorm) -> torch.Tensor:
    """Apply the configured feature-target normalisation (``patch`` | ``channel`` | ``none``)."""
    if mode == "patch":
        return patch_norm(y)
    if mode == "channel":
        return channel_norm(y)
    if mode == "none":
        return y.float()
    raise ValueError(f"feature_norm must be 'patch', 'channel' or 'none', got {mode!r}")


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixel-MAE targets: each patch's pixels as one row, row-major patches, (row, col, channel) inside a patch.

    Args:
        imgs: (N, C, S, S) with S divisible by ``patch_size``.
        patch_size: p.

    Returns:
        (N, L, p*p*C) with L = (S/p)², in the patch order of timm's ``PatchEmbed``.
    """
    n, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(n, c, gh, patch_size, gw, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, gh * gw, patch_size * patch_size * c)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked-only feature MSE: mean over channels, then over masked patches.

    Args:
        pred: (N, L, C) predictions for every patch.
        target: (N, L, C) (already normalised) targets.
        mask: (N, L), 1 = masked (counted), 0 = visible (ignored).

    Returns:
        scalar loss.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def attention_loss(pred_logits: torch.Tensor, target_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft cross-entropy between attention rows; the temperature applies to the target only.

    ``-Σ_keys softmax(A_s / τ) · log_softmax(Z_a)`` averaged over batch, rows and heads.

    Args:
        pred_logits: (N, R, H, L) predicted logits (R = 1 + topk rows).
        target_logits: (N, R, H, L) base-model pre-softmax logits.
        tau: target temperature (> 0).

    Returns:
        scalar loss.
    """
    if tau <= 0:
        raise ValueError(f"att_tau must be > 0, got {tau}")
    target = F.softmax(target_logits.float() / tau, dim=-1)
    log_pred = F.log_softmax(pred_logits.float(), dim=-1)
    return -(target * log_pred).sum(dim=-1).mean()
