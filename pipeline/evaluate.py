"""Evaluate a frozen encoder: k-NN and linear-probe top-1 on a labelled test split.

Any checkpoint the base-model loader reads (MAE ``{"model": ...}``, DINO/iBOT, a timm state dict, a TEC export or
TEC training state) is loaded into a **timm** ``VisionTransformer`` — exported encoders are evaluated through timm,
not through our own class — via :mod:`tec_model.checkpoint` (``weights_only=True``; pickled code is refused).

Pixels: one centre view per image, the whole image resized to ``output_size`` by :func:`stages.views.build_view`
with the full-image box ``(0, 0, H, W, 0)``, so evaluation uses exactly the train views' pixel function.

Sizes: the demo defaults (:data:`DEMO_N_TRAIN` / :data:`DEMO_N_TEST`) use the first 10000 / 2000 images of each
split; the replication passes ``n_train=None, n_test=None`` (all 60000 / 10000 Fashion-MNIST images).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from infra import storage
from stages.device import resolve_device
from stages.images import ImageSource
from stages.manifest import manifest_from_idx
from stages.views import Preprocess
from tec_model.checkpoint import load_encoder_weights, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

DEMO_N_TRAIN = 10_000
DEMO_N_TEST = 2_000
FEATURES = ("cls", "mean")


@dataclass
class EvalResult:
    """Top-1 accuracies (fractions in [0, 1]) of one encoder, with what produced them."""

    knn_top1: float
    linear_top1: float
    n_train: int
    n_test: int
    feature: str
    seconds: float
    embed_dim: int = 0
    extract_seconds: float = 0.0
    knn: dict[str, Any] = field(default_factory=dict)
    linear: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def load_encoder(checkpoint_url: str, timm_kwargs: dict | None, checkpoint_key: str | None = None) -> nn.Module:
    """Build a timm ViT and load encoder weights from any supported checkpoint format.

    Args:
        checkpoint_url: fsspec URL or local path of the checkpoint.
        timm_kwargs: ``VisionTransformer`` kwargs; None reads ``timm_kwargs`` from the ``encoder.json`` beside the
            checkpoint (what the train stage's export writes).
        checkpoint_key: force a wrapper key (e.g. ``"student"``) instead of auto-detection.

    Returns:
        The encoder in eval mode with ``requires_grad=False``.

    Raises:
        CheckpointError: unsafe, unreadable or architecture-mismatched checkpoint.
    """
    if timm_kwargs is None:
        meta_url = posixpath.join(posixpath.dirname(str(checkpoint_url)), "encoder.json")
        timm_kwargs = json.loads(storage.read_bytes(meta_url))["timm_kwargs"]
    model = VisionTransformer(**timm_kwargs)
    state_dict, fmt = unwrap_state_dict(read_checkpoint(storage.read_bytes(checkpoint_url), name=checkpoint_url),
                                        key=checkpoint_key)
    load_encoder_weights(model, state_dict)
    log.info("evaluating %s (%s format, %d tensors)", checkpoint_url, fmt, len(state_dict))
    return model.eval().requires_grad_(False)


def _read(images: np.ndarray | pa.Table, source: ImageSource | None, channels: int, i: int) -> np.ndarray:
    """Image ``i`` as uint8 (H, W, channels)."""
    if isinstance(images, pa.Table):
        return source.read(images.column("uri")[i].as_py())
    img = images[i]
    img = img[:, :, None] if img.ndim == 2 else img
    return np.repeat(img, channels, axis=2) if img.shape[2] == 1 and channels > 1 else img


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    images: np.ndarray | pa.Table,
    preprocess: Preprocess,
    batch_size: int = 256,
    feature: str = "cls",
    source: ImageSource | None = None,
) -> torch.Tensor:
    """Frozen features of the centre view of every image.

    Args:
        model: a timm ViT (see :func:`load_encoder`).
        images: uint8 (N, H, W) or (N, H, W, C) array, or a manifest table (its ``uri`` column, read by ``source``).
        preprocess: output size, mean/std and interpolation (channels must equal the model's ``in_chans``).
        batch_size: images per forward pass.
        feature: ``"cls"`` (final-normed cls token) or ``"mean"`` (mean of final-normed patch tokens, then the
            model's ``fc_norm``, an identity unless ``global_pool="avg"``).
        source: reads manifest URIs; default ``ImageSource(preprocess.channels)``.

    Returns:
        float32 (N, D) on the CPU (the probes run there, with CPU generators), whatever device the model is on.
    """
    device = next(model.parameters()).device
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if isinstance(images, pa.Table):
        source = source or ImageSource(preprocess.channels)
    n, out, start, last_log = len(images), [], time.perf_counter(), 0.0
    prefix = getattr(model, "num_prefix_tokens", 1)
    for lo in range(0, n, batch_size):
        batch = [_read(images, source, preprocess.channels, i) for i in range(lo, min(lo + batch_size, n))]
        boxes = np.array([(0, 0, img.shape[0], img.shape[1], 0) for img in batch], dtype=np.int32)
        pixels = preprocess.build_batch(batch, boxes).to(device, non_blocking=True)
        tokens = model.forward_features(pixels)  # (B, prefix + L, D)
        pooled = tokens[:, 0] if feature == "cls" else model.fc_norm(tokens[:, prefix:].mean(dim=1))
        out.append(pooled.float().cpu())
        now = time.perf_counter() - start
        if now - last_log > 10 or lo + batch_size >= n:
            log.info("features: %d/%d images in %.1f s", min(lo + batch_size, n), n, now)
            last_log = now
    return torch.cat(out) if out else torch.empty(0, getattr(model, "embed_dim", 0))


@torch.inference_mode()
def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int = 10,
    chunk_bytes: int = 1 << 28,
) -> float:
    """Weighted k-NN top-1 as in DINO: cosine similarity, top-k neighbours, votes ``exp(sim / T)``.

    Args:
        train_feats: (N, D); train_labels: (N,) ints in [0, num_classes).
        test_feats: (M, D); test_labels: (M,).
        k: neighbours (clipped to N).
        temperature: T of the vote weights.
        num_classes: C.
        chunk_bytes: bound on the (chunk, N) similarity block's memory.

    Returns:
        Fraction of test samples whose weighted vote equals the label.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    k = min(k, train.shape[0])
    chunk = max(1, chunk_bytes // (4 * max(1, train.shape[0])))
    correct = 0
    for lo in range(0, test.shape[0], chunk):
        sim, idx = (test[lo:lo + chunk] @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[lo:lo + chunk]).sum())
    return correct / max(1, test.shape[0])


def linear_probe_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 500,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
    num_classes: int | None = None,
    details: dict[str, Any] | None = None,
) -> float:
    """Multinomial logistic regression on frozen, standardised features; returns test top-1.

    Features are standardised with the train mean/std (MAE's probe uses an affine-free BatchNorm: the same map).
    The convex objective (mean cross-entropy + ``weight_decay/2 · ||W||²``) is minimised full-batch with L-BFGS
    (strong-Wolfe line search), as CLIP's sklearn probe does, so the result depends on the data, not on a
    learning-rate schedule. Deterministic on CPU for a fixed thread count.

    Args:
        train_feats: (N, D); train_labels: (N,).
        test_feats: (M, D); test_labels: (M,).
        epochs: L-BFGS iterations (each at least one full pass over the train features).
        lr: L-BFGS step scale.
        weight_decay: L2 penalty on the weights (not the bias).
        seed: seeds the small random initialisation.
        num_classes: C; default ``max(label) + 1``.
        details: if given, filled with ``train_top1``, ``loss`` and ``iterations``.

    Returns:
        Test top-1 as a fraction.
    """
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean, std = train_feats.float().mean(0), train_feats.float().std(0, unbiased=False).clamp_min(1e-6)
    x, x_test = (train_feats.float() - mean) / std, (test_feats.float() - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, x.shape[1], generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return F.cross_entropy(F.linear(x, weight, bias), train_labels) + 0.5 * weight_decay * weight.square().sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        test_top1 = float((F.linear(x_test, weight, bias).argmax(1) == test_labels).float().mean())
        if details is not None:
            details.update(train_top1=float((F.linear(x, weight, bias).argmax(1) == train_labels).float().mean()),
                           loss=float(objective()), iterations=int(opt.state[weight].get("n_iter", 0)))
    return test_top1


def _labelled(images_idx: str, n: int | None) -> tuple[pa.Table, torch.Tensor]:
    """Manifest of the first ``n`` records of an IDX images file and their labels (N,)."""
    manifest = manifest_from_idx(images_idx, limit=n)
    labels = manifest.column("label")
    if labels.null_count:
        raise ValueError(f"{images_idx}: evaluation needs labels, but no labels file pairs with it")
    return manifest, torch.from_numpy(labels.to_numpy().astype(np.int64))


def evaluate(
    checkpoint_url: str,
    timm_kwargs: dict | None,
    *,
    train_images_idx: str,
    test_images_idx: str,
    preprocess: Preprocess,
    n_train: int | None = DEMO_N_TRAIN,
    n_test: int | None = DEMO_N_TEST,
    checkpoint_key: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    feature: str = "cls",
    batch_size: int = 256,
    threads: int | None = None,
    device: str = "auto",
) -> EvalResult:
    """k-NN (k=20, cosine) and linear-probe top-1 of a checkpoint's frozen features.

    Args:
        checkpoint_url: any supported checkpoint (see :func:`load_encoder`).
        timm_kwargs: the encoder's ``VisionTransformer`` kwargs (None: read the export's ``encoder.json``).
        train_images_idx: IDX images file of the train split (labels from its MNIST-named sibling).
        test_images_idx: IDX images file of the test split.
        preprocess: eval pixels (output size = the model's ``img_size``, data-set mean/std).
        n_train: first n train images (None: all, 60000 for Fashion-MNIST).
        n_test: first n test images (None: all, 10000).
        checkpoint_key: force a checkpoint wrapper key.
        k: k-NN neighbours; temperature: vote temperature.
        feature: ``"cls"`` or ``"mean"``.
        batch_size: images per forward pass.
        threads: ``torch.set_num_threads`` for the call (restored afterwards); None leaves it.
        device: where the encoder runs (``auto``: CUDA when available); features are computed in float32 (TF32
            matmuls on CUDA) and moved to the CPU, where the k-NN and the linear probe run.

    Returns:
        An :class:`EvalResult`.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"evaluate device must be auto, cpu or cuda, got {device!r}")
        on = resolve_device("auto" if device == "auto" else device == "cuda", what="evaluate's device cuda")
        model = load_encoder(checkpoint_url, timm_kwargs, checkpoint_key).to(on)
        train, train_labels = _labelled(train_images_idx, n_train)
        test, test_labels = _labelled(test_images_idx, n_test)
        train_feats = extract_features(model, train, preprocess, batch_size, feature)
        test_feats = extract_features(model, test, preprocess, batch_size, feature)
        extract_s = time.perf_counter() - start
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        knn = knn_top1(train_feats, train_labels, test_feats, test_labels, k, temperature, num_classes)
        lin_details: dict[str, Any] = {}
        lin = linear_probe_top1(train_feats, train_labels, test_feats, test_labels, num_classes=num_classes,
                                details=lin_details)
        result = EvalResult(knn, lin, len(train_labels), len(test_labels), feature, time.perf_counter() - start,
                            embed_dim=train_feats.shape[1], extract_seconds=extract_s,
                            knn={"k": k, "temperature": temperature}, linear=lin_details)
        log.info("%s: k-NN top-1 %.4f, linear top-1 %.4f (%d train / %d test, %s, %.1f s)", checkpoint_url, knn,
                 lin, result.n_train, result.n_test, feature, result.seconds)
        return result
    finally:
        torch.set_num_threads(old_threads)
