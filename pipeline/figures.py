"""The demo's figures as PNG bytes: training-loss curves and cls-token attention maps of base vs new model."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from stages.views import Preprocess
from tec_model.base import compute_targets


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def loss_chart_png(histories: dict[str, list[dict]]) -> bytes:
    """One panel per run (e.g. base pre-training, TEC training): every ``loss*`` series against the step.

    Args:
        histories: run title -> metric rows (``step`` plus ``loss``, ``loss_fea``, ``loss_att``).
    """
    plt = _pyplot()
    labels = {"loss": "total", "loss_fea": "feature / pixel (masked MSE)", "loss_att": "attention (soft CE)"}
    fig, axes = plt.subplots(1, len(histories), figsize=(5.5 * len(histories), 3.5), dpi=120, squeeze=False)
    for ax, (title, history) in zip(axes[0], histories.items(), strict=True):
        steps = [r["step"] for r in history]
        for key, label in labels.items():
            values = [r.get(key, 0.0) for r in history]
            if any(values):
                ax.plot(steps, values, label=label)
        ax.set(xlabel="step", ylabel="loss", title=title)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


@torch.inference_mode()
def cls_attention(vit: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The last block's cls→patch attention, softmax over patches, mean over heads.

    Args:
        vit: a timm ViT. pixels: (N, C, S, S) normalised views.

    Returns:
        (N, g, g) with g = S / patch size; each map sums to 1.
    """
    logits = compute_targets(vit, pixels, last_layers=1, k_max=1).attn_logits[:, 0]  # (N, H, L)
    maps = logits.softmax(dim=-1).mean(dim=1)
    side = round(maps.shape[-1] ** 0.5)
    return maps.reshape(-1, side, side)


def attention_maps_png(images: Sequence[np.ndarray], preprocess: Preprocess,
                       models: dict[str, torch.nn.Module]) -> bytes:
    """The paper's Fig. 2 in small: each image, then each model's cls-token attention map over it.

    Args:
        images: uint8 (H, W) or (H, W, C) test images (the centre view is used).
        preprocess: the models' input preprocessing.
        models: row title -> timm ViT (same input size and patch grid).
    """
    plt = _pyplot()
    batch = [img[:, :, None] if img.ndim == 2 else img for img in images]
    boxes = np.array([(0, 0, im.shape[0], im.shape[1], 0) for im in batch], dtype=np.int32)
    pixels = preprocess.build_batch(batch, boxes)
    rows = {name: cls_attention(vit, pixels).numpy() for name, vit in models.items()}
    fig, axes = plt.subplots(1 + len(rows), len(batch), figsize=(1.3 * len(batch), 1.4 * (1 + len(rows))), dpi=120,
                             squeeze=False)
    for j, img in enumerate(batch):
        axes[0, j].imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray")
        for i, (name, maps) in enumerate(rows.items(), start=1):
            axes[i, j].imshow(maps[j], cmap="inferno")
            if j == 0:
                axes[i, 0].set_ylabel(name, fontsize=7)
    axes[0, 0].set_ylabel("image", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("last-block cls attention (mean over heads)", fontsize=8)
    fig.tight_layout()
    return _png(fig)
