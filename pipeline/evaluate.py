"""Evaluate a frozen encoder: k-NN and linear-probe top-1 on a labelled test split (docs/pipeline.md#evaluate).

The splits are manifests of any data source the pipeline reads (IDX files, ImageFolder trees, URI lists), built by
:mod:`pipeline.labelled`; their images are read through :class:`stages.images.ImageSource` (the config's channels
and input policy).

Any checkpoint the base-model loader reads (MAE ``{"model": ...}``, DINO/iBOT, a timm state dict, a TEC export or
TEC training state) is loaded into a **timm** ``VisionTransformer`` — exported encoders are evaluated through timm,
not through our own class — via :mod:`tec_model.checkpoint` (``weights_only=True``; pickled code is refused).

Pixels: one centre view per image, the whole image resized to ``output_size`` by :func:`stages.views.build_view`
with the full-image box ``(0, 0, H, W, 0)``, so evaluation uses exactly the train views' pixel function.

Sizes: the demo defaults (:data:`DEMO_N_TRAIN` / :data:`DEMO_N_TEST`) use 10000 / 2000 images of each split (the
first ones of IDX files, a seeded draw of the other sources); the replication passes ``n_train=None, n_test=None``
(all 60000 / 10000 Fashion-MNIST images).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from infra import storage
from pipeline.labelled import LabelledData, labels_of, splits
from pipeline.probes import knn_top1, linear_probe_top1
from stages.device import resolve_device
from stages.images import ImageSource
from stages.views import Preprocess
from tec_model.checkpoint import CheckpointError, load_encoder_weights, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

DEMO_N_TRAIN = 10_000
DEMO_N_TEST = 2_000
FEATURES = ("cls", "mean")
FROZEN_PROTOCOLS = ("knn", "linear")
FINETUNE_PROTOCOLS = ("finetune", "peft_prompt", "peft_both")  # run by pipeline.finetune.finetune_cli
PROTOCOLS = FROZEN_PROTOCOLS + FINETUNE_PROTOCOLS
READ_THREADS = 8  # concurrent image reads of a manifest batch (object stores answer each GET in ~10-100 ms)


@dataclass
class EvalResult:
    """Top-1 accuracies (fractions in [0, 1]; None: protocol not run) of one encoder, with what produced them."""

    knn_top1: float | None
    linear_top1: float | None
    n_train: int
    n_test: int
    feature: str
    seconds: float
    embed_dim: int = 0
    extract_seconds: float = 0.0
    knn: dict[str, Any] = field(default_factory=dict)
    linear: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0
    data: str = ""

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
        CheckpointError: unsafe, unreadable or architecture-mismatched checkpoint; the message names the checkpoint,
            the mismatching weights and the architecture it was loaded as.
    """
    if timm_kwargs is None:
        meta_url = posixpath.join(posixpath.dirname(str(checkpoint_url)), "encoder.json")
        timm_kwargs = json.loads(storage.read_bytes(meta_url))["timm_kwargs"]
    model = VisionTransformer(**timm_kwargs)
    try:
        state_dict, fmt = unwrap_state_dict(read_checkpoint(storage.read_bytes(checkpoint_url), name=checkpoint_url),
                                            key=checkpoint_key)
        load_encoder_weights(model, state_dict)
    except CheckpointError as err:
        arch = ", ".join(f"{k}={timm_kwargs[k]}" for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth")
                         if k in timm_kwargs)
        named = str(err) if str(checkpoint_url) in str(err) else f"{checkpoint_url}: {err}"
        raise CheckpointError(f"{named} (loaded as a ViT with {arch})") from None
    log.info("evaluating %s (%s format, %d tensors)", checkpoint_url, fmt, len(state_dict))
    return model.eval().requires_grad_(False)


def _read_batch(images: np.ndarray | pa.Table, source: ImageSource | None, channels: int, lo: int, hi: int,
                pool: ThreadPoolExecutor | None) -> list[np.ndarray]:
    """Images ``lo..hi-1`` as uint8 (H, W, channels); manifest URIs are read concurrently on ``pool``."""
    if isinstance(images, pa.Table):
        return list(pool.map(source.read, images.column("uri").slice(lo, hi - lo).to_pylist()))
    out = []
    for img in images[lo:hi]:
        img = img[:, :, None] if img.ndim == 2 else img
        out.append(np.repeat(img, channels, axis=2) if img.shape[2] == 1 and channels > 1 else img)
    return out


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
        source: reads manifest URIs (the input policy applies); default ``ImageSource(preprocess.channels)``.

    Returns:
        float32 (N, D) on the CPU (the probes run there, with CPU generators), whatever device the model is on.
    """
    device = next(model.parameters()).device
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    table = isinstance(images, pa.Table)
    source = (source or ImageSource(preprocess.channels)) if table else None
    n, out, start, last_log = len(images), [], time.perf_counter(), 0.0
    prefix = getattr(model, "num_prefix_tokens", 1)
    pool = ThreadPoolExecutor(READ_THREADS) if table else None
    try:
        for lo in range(0, n, batch_size):
            batch = _read_batch(images, source, preprocess.channels, lo, min(lo + batch_size, n), pool)
            boxes = np.array([(0, 0, img.shape[0], img.shape[1], 0) for img in batch], dtype=np.int32)
            pixels = preprocess.build_batch(batch, boxes).to(device, non_blocking=True)
            tokens = model.forward_features(pixels)  # (B, prefix + L, D)
            pooled = tokens[:, 0] if feature == "cls" else model.fc_norm(tokens[:, prefix:].mean(dim=1))
            out.append(pooled.float().cpu())
            now = time.perf_counter() - start
            if now - last_log > 10 or lo + batch_size >= n:
                log.info("features: %d/%d images in %.1f s", min(lo + batch_size, n), n, now)
                last_log = now
    finally:
        if pool is not None:
            pool.shutdown()
    return torch.cat(out) if out else torch.empty(0, getattr(model, "embed_dim", 0))


def _splits(data: LabelledData | None, train_images_idx: str | None, test_images_idx: str | None,
            n_train: int | None, n_test: int | None) -> LabelledData:
    """``data``, else the labelled splits of two IDX images files (labels from their MNIST-named siblings)."""
    if (data is None) == (train_images_idx is None or test_images_idx is None):
        raise ValueError("evaluate takes either data (LabelledData) or both train_images_idx and test_images_idx")
    return data if data is not None else splits("idx", train_images_idx, test_images_idx, n_train=n_train,
                                                n_test=n_test)


def evaluate(
    checkpoint_url: str,
    timm_kwargs: dict | None,
    data: LabelledData | None = None,
    *,
    preprocess: Preprocess,
    train_images_idx: str | None = None,
    test_images_idx: str | None = None,
    source: ImageSource | None = None,
    n_train: int | None = DEMO_N_TRAIN,
    n_test: int | None = DEMO_N_TEST,
    protocols: Sequence[str] = FROZEN_PROTOCOLS,
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
        data: the labelled splits (:func:`pipeline.labelled.labelled_splits`), already cut to their sizes.
        preprocess: eval pixels (output size = the model's ``img_size``, data-set mean/std).
        train_images_idx / test_images_idx: instead of ``data``, IDX images files of the two splits (labels from
            their MNIST-named siblings), cut to the first ``n_train`` / ``n_test`` records (None: all).
        source: reads the manifests' URIs (the config's channels and input policy); default
            ``ImageSource(preprocess.channels)``.
        protocols: which of ``knn`` and ``linear`` to run (the other's top-1 is None).
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
    unknown = sorted(set(protocols) - set(FROZEN_PROTOCOLS))
    if unknown:
        raise ValueError(f"evaluate runs the frozen protocols {', '.join(FROZEN_PROTOCOLS)}, not {unknown}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"evaluate device must be auto, cpu or cuda, got {device!r}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        data = _splits(data, train_images_idx, test_images_idx, n_train, n_test)
        on = resolve_device("auto" if device == "auto" else device == "cuda", what="evaluate's device cuda")
        model = load_encoder(checkpoint_url, timm_kwargs, checkpoint_key).to(on)
        source = source or ImageSource(preprocess.channels)
        train_feats = extract_features(model, data.train, preprocess, batch_size, feature, source)
        test_feats = extract_features(model, data.test, preprocess, batch_size, feature, source)
        extract_s = time.perf_counter() - start
        y_train, y_test = (torch.from_numpy(labels_of(t)) for t in (data.train, data.test))
        knn = lin = None
        if "knn" in protocols:
            knn = knn_top1(train_feats, y_train, test_feats, y_test, k, temperature, data.num_classes)
        lin_details: dict[str, Any] = {}
        if "linear" in protocols:
            lin = linear_probe_top1(train_feats, y_train, test_feats, y_test, num_classes=data.num_classes,
                                    details=lin_details)
        result = EvalResult(knn, lin, len(y_train), len(y_test), feature, time.perf_counter() - start,
                            embed_dim=train_feats.shape[1], extract_seconds=extract_s,
                            knn={"k": k, "temperature": temperature} if knn is not None else {},
                            linear=lin_details, num_classes=data.num_classes, data=data.source_desc)
        log.info("%s: k-NN top-1 %s, linear top-1 %s (%d train / %d test, %d classes, %s, %.1f s)", checkpoint_url,
                 knn, lin, result.n_train, result.n_test, data.num_classes, feature, result.seconds)
        return result
    finally:
        torch.set_num_threads(old_threads)


def parse_protocols(protocols: str | Sequence[str]) -> tuple[str, ...]:
    """The ``--protocols`` list (comma-separated or a sequence), each once, in the order given.

    Raises:
        ValueError: an unknown protocol, naming the known ones.
    """
    names = [p.strip() for p in (protocols.split(",") if isinstance(protocols, str) else protocols) if p.strip()]
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"--protocols {','.join(names) or '(empty)'}: expected a comma list of {', '.join(PROTOCOLS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return tuple(dict.fromkeys(names))


def finetune_entry(protocols: Sequence[str]) -> Callable[..., dict] | None:
    """``pipeline.finetune.finetune_cli`` when ``protocols`` asks for fine-tuning (None when it does not).

    Raises:
        ValueError: fine-tuning protocols asked for but this build has no ``pipeline.finetune`` module.
    """
    wanted = [p for p in protocols if p in FINETUNE_PROTOCOLS]
    if not wanted:
        return None
    try:
        from pipeline.finetune import finetune_cli
    except ModuleNotFoundError as err:
        if err.name != "pipeline.finetune":
            raise
        raise ValueError(f"--protocols {','.join(wanted)}: fine-tuning protocols are not available in this build "
                         f"(no pipeline.finetune module); available: {', '.join(FROZEN_PROTOCOLS)}") from None
    return finetune_cli


def _top1(entry: Any) -> float | None:
    """A protocol's test top-1: a float, or the ``test_top1`` of a fine-tuning run's results."""
    entry = entry.get("test_top1") if isinstance(entry, dict) else entry
    return None if entry is None else float(entry)


def format_results(results: dict[str, Any]) -> str:
    """The ``evaluate`` command's table: one row per protocol run (top-1 as a fraction), then the data."""
    rows = [(name, _top1(results.get(f"{name}_top1") if name in FROZEN_PROTOCOLS else results.get(name)))
            for name in results.get("protocols", FROZEN_PROTOCOLS)]
    width = max(len("protocol"), *(len(name) for name, _ in rows))
    lines = [f"{'protocol':<{width}}  top-1", f"{'-' * width}  ------",
             *(f"{name:<{width}}  {'-' if top1 is None else f'{top1:.4f}'}" for name, top1 in rows)]
    return "\n".join([*lines, f"{results.get('n_train')} train / {results.get('n_test')} test images, "
                                f"{results.get('num_classes')} classes: {results.get('data', '')}"])
