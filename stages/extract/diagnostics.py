"""Know the base before paying for it: what the base model's targets look like on a sample of the planned views.

:func:`diagnose_base` runs the base (in this process, CPU or CUDA, no Ray) on the first (or a seeded random sample
of) the manifest's images, every planned view of each (the cache's view plan,
docs/method.md#7-augmentation-and-the-view-plan), and :func:`compute_diagnostics` turns the targets, cast to float16
as the cache stores them, into a :class:`BaseDiagnostics`:

* **attention target entropy**: the target is ``softmax(A_s / τ)`` over the L patch keys
  (docs/method.md#3-target-transforms-at-training-time); its entropy per row and head, averaged over images, views,
  rows ``0..topk`` and heads, in nats and as a fraction of the uniform entropy ``log L``. A target near uniform
  carries almost no information: :meth:`BaseDiagnostics.warnings` says so with the numbers;
* **top-k stability across views**: see :func:`topk_iou`;
* **feature statistics**: raw per-channel standard deviation over the tokens (percentiles over images, views and
  channels); after patch normalisation (``tec_model.losses.patch_norm``) every live channel has unit variance by
  construction, so what is left to look at is the fraction of dead channels (normalised std < 0.5: raw variance
  below ``eps / 3``, a target of nearly constant zeros) and the mean ``|cos|`` between distinct tokens of a view
  (near 1: all patches ask for the same thing), raw and after patch norm;
* the base's k-NN top-1, which needs labels and :mod:`pipeline.evaluate`: the CLI fills
  :attr:`BaseDiagnostics.knn_top1` (stages do not import the pipeline).

Targets holding NaN/inf (a base overflowing float16) have no such summary: :func:`compute_diagnostics` refuses them
with the extraction's ``NonFiniteTargetsError`` naming the base and the images, before anything is summarised (so
the extraction stores no ``base_diagnostics`` and stops before its first unit, which would be refused the same way).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from infra import storage
from stages.device import autocast, extraction_precision, resolve_device
from stages.extract.job import ExtractJob
from stages.images import BadImageError, ImageSource
from stages.manifest import read_manifest
from tec_model import BaseModel
from tec_model.losses import patch_norm

log = logging.getLogger(__name__)

DEFAULT_TAUS: tuple[float, ...] = ExtractJob.diagnostic_taus  # docs/method.md#3-target-transforms-at-training-time
DIAGNOSTIC_IMAGES: int = ExtractJob.diagnostic_images  # images extract diagnoses per cache (the first of the plan)
UNIFORM_MARGIN = 0.03  # warn when the attention target's entropy is at least (1 - margin) × log L
DEAD_STD = 0.5  # a channel whose patch-normalised std over the tokens is below this is dead
_DIGITS = 6  # significant digits kept in to_dict (the stored summary does not depend on float noise)


# ------------------------------------------------------------------------------------------ attention entropy
def attention_entropy(attn_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Entropy (nats) of the attention target ``softmax(logits / τ)`` over the last axis.

    Args:
        attn_logits: (..., L) pre-softmax logits. tau: the target's temperature.

    Returns:
        (...) float32 entropies in [0, log L].
    """
    logp = torch.log_softmax(attn_logits.float() / tau, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_summary(attn_logits: torch.Tensor, tau: float) -> dict[str, float]:
    """Mean entropy of the attention target over views, rows and heads, of the class row alone, and the mean
    largest probability of a row.

    Args:
        attn_logits: (M, K+1, H, L) rows [cls, top-K patches].
    """
    ent = attention_entropy(attn_logits, tau)  # (M, K+1, H)
    top = torch.softmax(attn_logits.float() / tau, dim=-1).amax(-1)
    return {"entropy": float(ent.mean()), "entropy_cls": float(ent[:, 0].mean()), "top_prob": float(top.mean())}


# ------------------------------------------------------------------------------------------ top-k stability
def topk_source_mask(box: np.ndarray, topk: np.ndarray, grid: int, height: int, width: int) -> np.ndarray:
    """The source pixels covered by a view's top-k patches.

    Source pixel (y, x) of the view's box lies in view patch ``(⌊(y + ½ - top)·G / h⌋, ⌊(x + ½ - left)·G / w⌋)``
    (the column mirrored to ``G - 1 - c`` when the view is flipped), the patch grid of the resized S×S view mapped
    back through the crop.

    Args:
        box: (5,) the view's (top, left, height, width, flip). topk: (k,) patch indices (row-major, G×G grid).
        grid: G. height, width: the source image's size.

    Returns:
        (height, width) bool; False outside the box.
    """
    top, left, h, w, flip = (int(v) for v in box)
    rows = np.minimum(((np.arange(h) + 0.5) * grid / h).astype(np.int64), grid - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * grid / w).astype(np.int64), grid - 1)
    if flip:
        cols = grid - 1 - cols
    chosen = np.zeros(grid * grid, bool)
    chosen[np.asarray(topk, np.int64)] = True
    mask = np.zeros((height, width), bool)
    mask[top : top + h, left : left + w] = chosen[rows[:, None] * grid + cols[None, :]]
    return mask


def pair_iou(box_a: np.ndarray, mask_a: np.ndarray, box_b: np.ndarray, mask_b: np.ndarray) -> float | None:
    """IoU of two views' top-k source masks inside the region both views see; None when neither view's top-k
    reaches into it (or the crops do not overlap)."""
    top, left = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    bottom, right = min(box_a[0] + box_a[2], box_b[0] + box_b[2]), min(box_a[1] + box_a[3], box_b[1] + box_b[3])
    if bottom <= top or right <= left:
        return None
    a, b = mask_a[top:bottom, left:right], mask_b[top:bottom, left:right]
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else None


def topk_iou(topk_index: np.ndarray, boxes: np.ndarray, sizes: np.ndarray, grid: int) -> float | None:
    """Top-k stability across the views of an image, in source-image coordinates.

    For every pair of views (a, b) of an image, each view's top-k patches are mapped to the source pixels they cover
    (:func:`topk_source_mask`); the pair's score is the intersection over union of the two pixel sets, counted only
    inside the intersection of the two crop boxes (the part of the image both views see), so a patch that lies
    outside the other view neither helps nor hurts. Pairs where neither top-k set reaches into the common region
    are left out. Identical views score 1; the score compares where the base looks, not which rank it gives.

    Args:
        topk_index: (n, V, k) patch indices. boxes: (n, V, 5) the views. sizes: (n, 2) source (height, width).
        grid: G, patches per side (L = G²).

    Returns:
        The mean over the scored pairs of all images, or None when there is none (V = 1, or no overlap anywhere).
    """
    scores = []
    for topk, views, (height, width) in zip(topk_index, boxes, sizes, strict=True):
        masks = [topk_source_mask(box, idx, grid, int(height), int(width)) for box, idx in zip(views, topk,
                                                                                              strict=True)]
        for a in range(len(views)):
            for b in range(a + 1, len(views)):
                score = pair_iou(views[a], masks[a], views[b], masks[b])
                if score is not None:
                    scores.append(score)
    return float(np.mean(scores)) if scores else None


# ------------------------------------------------------------------------------------------ features
def feature_summary(features: torch.Tensor) -> dict[str, Any]:
    """Feature-target statistics (see the module docstring).

    Args:
        features: (M, L, C) raw feature targets of M views.

    Returns:
        ``channel_std`` [p10, p50, p90] of the raw per-(view, channel) std over tokens, ``dead_channel_fraction``,
        ``token_abs_cos`` (raw) and ``token_abs_cos_norm`` (after patch norm).
    """
    raw = features.float()
    std = raw.std(dim=1, unbiased=True).flatten()
    normed = patch_norm(raw)
    dead = normed.std(dim=1, unbiased=True) < DEAD_STD

    def abs_cos(x: torch.Tensor) -> float:
        unit = torch.nn.functional.normalize(x, dim=-1)
        gram = (unit @ unit.transpose(1, 2)).abs()  # (M, L, L)
        length = x.shape[1]
        return float((gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)).mean() / max(1, length * (length - 1)))

    return {"channel_std": [float(q) for q in torch.quantile(std, torch.tensor([0.1, 0.5, 0.9]))],
            "dead_channel_fraction": float(dead.float().mean()), "token_abs_cos": abs_cos(raw),
            "token_abs_cos_norm": abs_cos(normed)}


# ------------------------------------------------------------------------------------------ the summary
def _round(value: Any) -> Any:
    """``value`` with every float to :data:`_DIGITS` significant digits, non-finite floats as None (JSON)."""
    if isinstance(value, float):
        return float(f"{value:.{_DIGITS}g}") if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` for None (a non-finite value of a stored summary)."""
    return "n/a" if value is None else format(value, spec)


def _ratio(value: float | None, total: float | None) -> float | None:
    """``value / total``, None when either is None (or ``total`` is 0)."""
    return None if value is None or not total else value / total


@dataclass
class BaseDiagnostics:
    """What the base model's targets look like on a sample of planned views (see the module docstring).

    Attributes:
        n_images: images the sample used (readable ones). views_per_image: V. num_patches: L. num_heads: H.
        topk: attention rows besides cls that were scored (the first ``topk + 1`` of the K_max + 1 rows).
        taus: temperatures τ of the attention target. uniform_entropy: ``log L`` (nats).
        attn_entropy / attn_entropy_cls / attn_top_prob: per τ, the mean entropy (all scored rows; class row
            alone) and the mean largest probability of a row (``1 / L`` when uniform).
        topk_iou: :func:`topk_iou` of the top-``topk`` patches (None for V = 1); topk_iou_chance: the same for k
            patches drawn at random per view, the score of a base that looks nowhere in particular.
        channel_std / dead_channel_fraction / token_abs_cos / token_abs_cos_norm: :func:`feature_summary`.
        margin: the warning's margin (:meth:`warnings`). images_failed: sampled images that could not be read.
        device / precision: where and how the base ran. knn_top1 / knn: the base's k-NN top-1 and its settings,
            when the caller had labels (None / empty otherwise).

    :func:`compute_diagnostics` refuses non-finite targets, so its floats are finite; a summary read back from a
    cache written before that check may hold None where a value was NaN/inf: the methods below show it as ``n/a``.
    """

    n_images: int
    views_per_image: int
    num_patches: int
    num_heads: int
    topk: int
    taus: list[float]
    uniform_entropy: float
    attn_entropy: list[float]
    attn_entropy_cls: list[float]
    attn_top_prob: list[float]
    topk_iou: float | None
    topk_iou_chance: float | None
    channel_std: list[float]
    dead_channel_fraction: float
    token_abs_cos: float
    token_abs_cos_norm: float
    margin: float = UNIFORM_MARGIN
    images_failed: int = 0
    device: str = "cpu"
    precision: str = "float32"
    knn_top1: float | None = None
    knn: dict[str, Any] = field(default_factory=dict)

    @property
    def entropy_fraction(self) -> list[float | None]:
        """Per τ, the attention target's mean entropy over ``log L`` (1.0: uniform; None where it is unknown)."""
        return [_ratio(h, self.uniform_entropy) for h in self.attn_entropy]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats to 6 significant digits), with ``entropy_fraction`` added (of the rounded
        entropies, so ``from_dict(d).to_dict() == d``)."""
        out = _round(asdict(self))
        return {**out, "entropy_fraction": _round([_ratio(h, out["uniform_entropy"]) for h in out["attn_entropy"]])}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseDiagnostics:
        """Inverse of :meth:`to_dict` (derived and unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary_lines(self) -> list[str]:
        """The summary, one finding per line, for a log or a terminal."""
        stability = ("n/a (one view per image)" if self.topk_iou is None else
                     f"{self.topk_iou:.3f} (random patches: {_fmt(self.topk_iou_chance, '.3f')})")
        p10, p50, p90 = (_fmt(q, ".3g") for q in self.channel_std)
        lines = [
            f"base diagnostics on {self.n_images} images x {self.views_per_image} views ({self.device}, "
            f"{self.precision}; L={self.num_patches}, H={self.num_heads}, rows cls + top {self.topk})"
            + (f", {self.images_failed} unreadable" if self.images_failed else ""),
            *(f"attention target at τ={t:g}: entropy {_fmt(h, '.4f')} of log L = {_fmt(self.uniform_entropy, '.4f')} "
              f"nats ({_fmt(f, '.3%')} of uniform), class row {_fmt(c, '.4f')}; mean top probability "
              f"{_fmt(p, '.4f')} (uniform {1 / self.num_patches:.4f})"
              for t, h, f, c, p in zip(self.taus, self.attn_entropy, self.entropy_fraction, self.attn_entropy_cls,
                                       self.attn_top_prob, strict=True)),
            f"top-{self.topk} stability across views (IoU in source pixels): {stability}",
            f"features: raw channel std p10/p50/p90 {p10}/{p50}/{p90}; after patch norm "
            f"{_fmt(self.dead_channel_fraction, '.1%')} dead channels, mean |cos| between tokens "
            f"{_fmt(self.token_abs_cos_norm, '.3f')} (raw {_fmt(self.token_abs_cos, '.3f')})",
        ]
        if self.knn_top1 is not None:
            lines.append(f"base k-NN top-1 {self.knn_top1:.4f} ({', '.join(f'{k}={v}' for k, v in self.knn.items())})")
        return lines

    def warnings(self, margin: float | None = None) -> list[str]:
        """One message when the attention target is within ``margin`` (default :attr:`margin`) of uniform at some
        τ, with the numbers; empty otherwise."""
        margin = self.margin if margin is None else margin
        near = [(t, h, f) for t, h, f in zip(self.taus, self.attn_entropy, self.entropy_fraction, strict=True)
                if f is not None and f >= 1.0 - margin]
        if not near:
            return []
        numbers = "; ".join(f"τ={t:g}: entropy {h:.4f} of {self.uniform_entropy:.4f} nats, {f:.3%} of uniform"
                            for t, h, f in near)
        return [f"the base's attention target is within {margin:.0%} of uniform over the L={self.num_patches} "
                f"patches ({numbers}): it will teach little. A trained base (or a lower model.att_tau) gives a "
                "peaked target; a random or collapsed base does not"]


def check_finite_targets(features: torch.Tensor, attn_logits: torch.Tensor, views_per_image: int,
                         base: str | None = None, images: Sequence[int] | None = None) -> None:
    """Refuse diagnostic targets holding NaN/inf, which no summary of them could describe.

    Args:
        features: (n·V, L, C). attn_logits: (n·V, K+1, H, L), rows image-major. views_per_image: V.
        base: how to name the base model (its checkpoint) in the error.
        images: the n images' manifest indices (default 0..n-1).

    Raises:
        NonFiniteTargetsError: naming the base, which targets are affected and the first affected images.
    """
    bad_features = ~torch.isfinite(features).flatten(1).all(1)
    bad_attn = ~torch.isfinite(attn_logits).flatten(1).all(1)
    bad = (bad_features | bad_attn).reshape(-1, views_per_image).any(1)
    if not bool(bad.any()):
        return
    from stages.extract.worker import NonFiniteTargetsError  # local import: the worker module imports this one

    images = list(range(len(bad))) if images is None else list(images)
    first = [images[i] for i in bad.nonzero().flatten().tolist()[:5]]
    which = " and ".join(name for name, rows in (("features", bad_features), ("attention logits", bad_attn))
                         if bool(rows.any()))
    named = f"the base model {base}" if base else "the base model"
    raise NonFiniteTargetsError(
        f"base diagnostics: {named} gave NaN/inf targets (float16; {which}) for {int(bad.sum())} of {len(bad)} "
        f"sampled image(s), first {first}; no diagnostics computed or stored. Check the base checkpoint and "
        "preprocessing (float16 overflows above 65504): the extraction would refuse these targets too")


def compute_diagnostics(features: torch.Tensor, attn_logits: torch.Tensor, topk_index: torch.Tensor,
                        boxes: np.ndarray, sizes: np.ndarray, taus: tuple[float, ...] = DEFAULT_TAUS,
                        topk: int | None = None, margin: float = UNIFORM_MARGIN, seed: int = 0,
                        base: str | None = None, images: Sequence[int] | None = None,
                        **extra: Any) -> BaseDiagnostics:
    """The diagnostics of the base's targets on n images × V views.

    Args:
        features: (n·V, L, C). attn_logits: (n·V, K_max+1, H, L). topk_index: (n·V, K_max), rows image-major.
        boxes: (n, V, 5) the views. sizes: (n, 2) source (height, width).
        taus: temperatures of the attention target. topk: rows scored besides cls (default K_max).
        margin: see :meth:`BaseDiagnostics.warnings`. seed: the chance baseline's random patches.
        base / images: how errors name the base model and the n images (see :func:`check_finite_targets`).
        extra: further :class:`BaseDiagnostics` fields (images_failed, device, precision).

    Raises:
        NonFiniteTargetsError: the features or attention logits hold NaN/inf (checked before anything is summarised).
        ValueError: ``topk`` out of range, or L not a square.
    """
    n, v = boxes.shape[:2]
    check_finite_targets(features, attn_logits, v, base, images)
    length, k_max = attn_logits.shape[-1], topk_index.shape[-1]
    topk = k_max if topk is None else topk
    if not 1 <= topk <= k_max:
        raise ValueError(f"topk must be in [1, {k_max}] (the base's K_max), got {topk}")
    grid = math.isqrt(length)
    if grid * grid != length:
        raise ValueError(f"{length} patches are not a square grid")
    rows = attn_logits[:, : topk + 1]
    ent = [entropy_summary(rows, tau) for tau in taus]
    chosen = topk_index[:, :topk].cpu().numpy().reshape(n, v, topk)
    rng = np.random.default_rng(seed)
    chance = np.stack([rng.permutation(length)[:topk] for _ in range(n * v)]).reshape(n, v, topk)
    return BaseDiagnostics(
        n_images=n, views_per_image=v, num_patches=length, num_heads=attn_logits.shape[2], topk=topk,
        taus=[float(t) for t in taus], uniform_entropy=math.log(length),
        attn_entropy=[e["entropy"] for e in ent], attn_entropy_cls=[e["entropy_cls"] for e in ent],
        attn_top_prob=[e["top_prob"] for e in ent], topk_iou=topk_iou(chosen, boxes, sizes, grid),
        topk_iou_chance=topk_iou(chance, boxes, sizes, grid), margin=margin, **feature_summary(features), **extra)


# ------------------------------------------------------------------------------------------ running the base
class NoReadableImagesError(ValueError):
    """None of the images sampled for the diagnostics could be read."""


def sample_indices(n_total: int, n_images: int, seed: int | None = None) -> list[int]:
    """``n_images`` sample indices of ``n_total``: the first ones (``seed`` None) or a seeded random sample."""
    n = min(n_images, n_total)
    if seed is None:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n_total, n, replace=False))


def diagnose_base(job: ExtractJob, n_images: int = DIAGNOSTIC_IMAGES, seed: int | None = None,
                  taus: tuple[float, ...] = DEFAULT_TAUS, topk: int | None = None, margin: float = UNIFORM_MARGIN,
                  device: str = "auto") -> BaseDiagnostics:
    """Load the job's base model and manifest and diagnose it (:func:`run_diagnostics`); the cache is not touched.

    Args:
        job: the extraction job (manifest, checkpoint, view plan, K_max).
        n_images / seed / taus / topk / margin: see :func:`run_diagnostics`.
        device: ``auto`` (CUDA when this process sees one), ``cpu`` or ``cuda``; the forward runs in the job's
            precision there (float32 when that precision needs a device this process lacks).
    """
    on = resolve_device("auto") if device == "auto" else torch.device(device)
    try:
        precision = extraction_precision(job.precision, on)
    except ValueError:
        precision = "float32"
    model = BaseModel.from_checkpoint(storage.read_bytes(job.checkpoint_url), job.timm_kwargs, job.last_layers,
                                      job.k_max, checkpoint_key=job.checkpoint_key, name=job.checkpoint_url).to(on)
    uris = read_manifest(job.manifest_url)[0].column("uri").to_pylist()
    source = ImageSource(in_chans=job.timm_kwargs.get("in_chans", 3), policy=job.uri_policy)
    return run_diagnostics(model, job, uris, source, precision, n_images, seed, taus, topk, margin)


def run_diagnostics(model: BaseModel, job: ExtractJob, uris: list[str], source: ImageSource, precision: str,
                    n_images: int = DIAGNOSTIC_IMAGES, seed: int | None = None,
                    taus: tuple[float, ...] = DEFAULT_TAUS, topk: int | None = None,
                    margin: float = UNIFORM_MARGIN) -> BaseDiagnostics:
    """Run a loaded base model on every planned view of a sample of the manifest's images and summarise the targets
    (the extraction's workers call it with the model they hold).

    Args:
        model: the job's base model, on its device. job: the view plan, preprocessing and batch size.
        uris: the manifest's URIs. source: reads them (under the job's input policy). precision: of the forward.
        n_images: images sampled. seed: None takes the first ``n_images`` of the manifest, else a seeded sample.
        taus / topk / margin: see :func:`compute_diagnostics`.

    Raises:
        NoReadableImagesError: none of the sampled images could be read.
        NonFiniteTargetsError: the base gave NaN/inf targets on the sample (see :func:`check_finite_targets`).
    """
    source = source.with_policy(job.uri_policy)
    pixels, boxes, sizes, read, failed = [], [], [], [], 0
    for index in sample_indices(len(uris), n_images, seed):
        try:
            image = source.read(uris[index])
        except BadImageError as err:
            failed += 1
            log.debug("base diagnostics: image %d skipped: %s", index, err)
            continue
        views = [job.preprocess.plan(job.view_seed, index, v, *image.shape[:2]) for v in range(job.views_per_image)]
        pixels.extend(job.preprocess.build(image, box) for box in views)
        boxes.append(views)
        sizes.append(image.shape[:2])
        read.append(index)
    if not boxes:
        raise NoReadableImagesError(f"base diagnostics: none of the {failed} sampled images of "
                                    f"{storage.redact_url(job.manifest_url)} is readable")
    on = next(model.parameters()).device
    batch, outs = torch.stack(pixels), []
    for start in range(0, len(batch), job.batch_size):
        with torch.no_grad(), autocast(on, precision):
            t = model(batch[start : start + job.batch_size].to(on))
        outs.append([t.features.half().float().cpu(), t.attn_logits.half().float().cpu(), t.topk_index.cpu()])
    features, attn, topk_index = (torch.cat(parts) for parts in zip(*outs, strict=True))
    return compute_diagnostics(features, attn, topk_index, np.asarray(boxes, np.int64), np.asarray(sizes),
                               taus=taus, topk=topk, margin=margin, base=storage.redact_url(job.checkpoint_url),
                               images=read, images_failed=failed, device=on.type, precision=precision)
