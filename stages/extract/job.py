"""What an extraction does (:class:`ExtractJob`, :class:`LeaseConfig`), its identity (:func:`build_spec`,
:func:`resolve_spec`) and what a run reports (:class:`ExtractResult`)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from infra import storage
from stages.cache import CacheSpec
from stages.device import extraction_precision
from stages.manifest import read_manifest
from stages.uri_policy import DEFAULT_POLICY, UriPolicy
from stages.views import Preprocess
from tec_model import num_patches
from tec_model.flops import vit_forward_macs


@dataclass(frozen=True)
class ExtractJob:
    """What to extract. Every URL may be a local path or any fsspec URL (``s3://…``).

    Attributes:
        cache_url: where the target cache lives (created if absent).
        manifest_url: the Parquet manifest (see :mod:`stages.manifest`).
        checkpoint_url: the base-model checkpoint (MAE / DINO / iBOT / timm / TEC formats).
        timm_kwargs: the base model's ``VisionTransformer`` kwargs.
        preprocess: view size, crop ranges, interpolation, mean/std.
        views_per_image: V.
        view_seed: seed of the view plan.
        last_layers: blocks averaged into the feature target.
        k_max: attention rows kept besides cls.
        unit_size: images per work unit (= per shard).
        batch_size: views per base-model forward.
        checkpoint_key: force a checkpoint entry (``teacher``/``student``/…) instead of auto-detection.
        compressor: the cache's Blosc shuffle mode (``shuffle``, ``bitshuffle`` or ``none``).
        codec: how the targets are stored (:data:`stages.cache.codecs.CODECS`: lossless ``float16``, or ``int8`` /
            ``fp8`` features with int8 attention rows); part of the cache key unless ``float16``.
        precision: the base model's forward precision (``auto``: bfloat16 autocast on CUDA, float32 on the CPU;
            see :mod:`stages.device`). It changes the bytes, so it is recorded in the cache and fixed per cache.
        max_failed_fraction: a unit in which more of its images fail stops the job, nothing of it written (at least
            one failure is allowed when above 0; see :func:`stages.cache.failures.allowed_failures`).
        uri_policy: which manifest URIs may be read and how much of them (:class:`stages.uri_policy.UriPolicy`).
        diagnostic_images: images of the plan (the first ones) the base is diagnosed on once per cache before the
            extraction (:mod:`stages.extract.diagnostics`, stored in the cache's ``base_diagnostics`` attribute);
            0 skips it. Not in the cache key.
        diagnostic_taus: the attention-target temperatures τ the diagnostics score (a cache serves any τ; these are
            the paper's ``att_tau`` values for iBOT, MAE ViT-L and MAE ViT-B).
    """

    cache_url: str
    manifest_url: str
    checkpoint_url: str
    timm_kwargs: dict[str, Any]
    preprocess: Preprocess
    views_per_image: int = 2
    view_seed: int = 0
    last_layers: int = 2
    k_max: int = 15
    unit_size: int = 64
    batch_size: int = 64
    checkpoint_key: str | None = None
    compressor: str = "shuffle"
    codec: str = "float16"
    precision: str = "auto"
    max_failed_fraction: float = 0.05
    uri_policy: UriPolicy = DEFAULT_POLICY
    diagnostic_images: int = 16
    diagnostic_taus: tuple[float, ...] = (1.0, 1.4, 1.8)  # docs/method.md#3-target-transforms-at-training-time


@dataclass(frozen=True)
class LeaseConfig:
    """How a job claims units (see :mod:`stages.cache.leases`).

    Attributes:
        ttl_s: a claim not renewed for this long is stale and may be taken over by another job.
        renew_every_s: heartbeat period: every held claim is rewritten with a fresh expiry (keep << ``ttl_s``).
        confirm_delay_s: base wait between writing claims and re-reading them (the race window it closes is a
            contender's read-to-write gap; the wait is drawn from [1, 2] × this).
        poll_s: wait between looks at units held by other jobs once nothing else is left to do.
    """

    ttl_s: float = 60.0
    renew_every_s: float = 15.0
    confirm_delay_s: float = 0.1
    poll_s: float = 1.0


@dataclass
class ExtractResult:
    """What a run did: units written now vs found complete, and totals over the whole cache.

    ``wall_seconds`` covers the whole call (Ray start-up and model loading included); ``work_seconds`` runs from
    the moment every actor is ready to the last unit's return (the extraction rate is ``views_written`` over it).
    ``units_written`` are the units this run wrote; ``units_skipped`` were complete when it started;
    ``units_by_others`` were completed meanwhile by another job on the same cache; ``units_taken_over`` (a subset of
    the written ones) had a stale claim of a dead or expired job, i.e. were in flight when that job died;
    ``units_retried`` lists one entry per resubmission after an actor died; ``owner`` is this run's claim-owner id.
    """

    cache_url: str
    cache_key: str
    units_total: int
    units_written: list[int] = field(default_factory=list)
    units_skipped: list[int] = field(default_factory=list)
    units_by_others: list[int] = field(default_factory=list)
    units_taken_over: list[int] = field(default_factory=list)
    units_retried: list[int] = field(default_factory=list)
    actors_replaced: int = 0
    owner: str = ""
    images_written: int = 0
    views_written: int = 0
    failures: int = 0
    wall_seconds: float = 0.0
    work_seconds: float = 0.0
    device_seconds: dict[str, float] = field(default_factory=dict)
    stored_bytes: int = 0
    raw_bytes: int = 0
    compression_ratio: float = 0.0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_spec(job: ExtractJob, manifest_sha: str, n_images: int, checkpoint_sha: str,
               precision: str = "float32") -> CacheSpec:
    """The cache identity of a job (the base model's shapes are derived from its kwargs); ``precision`` is the
    resolved forward precision of the workers that will write it (recorded, not part of the key)."""
    kw = job.timm_kwargs
    if kw["img_size"] != job.preprocess.output_size:
        raise ValueError(f"preprocess.output_size {job.preprocess.output_size} differs from the base model's "
                         f"img_size {kw['img_size']}")
    if kw.get("in_chans", 3) != job.preprocess.channels:
        raise ValueError(f"preprocess mean/std have {job.preprocess.channels} channels, the base model takes "
                         f"in_chans={kw.get('in_chans', 3)}")
    p = job.preprocess
    return CacheSpec(
        checkpoint=job.checkpoint_url, checkpoint_sha256=checkpoint_sha, timm_kwargs=kw, k_max=job.k_max,
        last_layers=job.last_layers, output_size=p.output_size, crop_scale=p.crop_scale, crop_ratio=p.crop_ratio,
        interpolation=p.interpolation, mean=p.mean, std=p.std, view_seed=job.view_seed,
        views_per_image=job.views_per_image, manifest_uri=job.manifest_url, manifest_sha256=manifest_sha,
        n_images=n_images, num_patches=num_patches(kw), embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
        base_forward_macs_per_view=vit_forward_macs(kw), unit_size=job.unit_size, precision=precision,
        codec=job.codec, checkpoint_key=job.checkpoint_key, max_image_bytes=job.uri_policy.max_image_bytes,
        max_image_pixels=job.uri_policy.max_image_pixels,
    )



def resolve_spec(job: ExtractJob, device: torch.device | None = None) -> CacheSpec:
    """The job's cache spec (reads the manifest and hashes the checkpoint), for workers on ``device`` (None: not
    known yet, the precision a placeholder: :func:`stages.device.extraction_precision`)."""
    table, manifest_sha = read_manifest(job.manifest_url)
    checkpoint_sha = sha256_hex(storage.read_bytes(job.checkpoint_url))
    precision = extraction_precision(job.precision, device)
    return build_spec(job, manifest_sha, table.num_rows, checkpoint_sha, precision)



def result_dict(result: ExtractResult) -> dict[str, Any]:
    return asdict(result)
