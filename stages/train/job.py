"""What a training run is: :class:`TrainJob`, its run directory, and the check that a target cache fits it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from infra import storage
from stages.cache import open_cache
from stages.cache.spec import CacheSpec, expected_differences
from stages.views import Preprocess
from tec_model import TECModel, num_patches

TargetSource = Literal["cache", "online", "pixel"]
TARGET_SOURCES: tuple[str, ...] = get_args(TargetSource)
# What a configuration may ask for: "pixel" is internal (the base.pretrain runs use it).
USER_TARGET_SOURCES: tuple[str, ...] = tuple(s for s in TARGET_SOURCES if s != "pixel")
LOCAL_CACHE_FIELDS = ("dir", "max_bytes", "verify_local")


class CacheIncompatibleError(ValueError):
    """The target cache does not fit the training configuration; the message names every differing field."""


@dataclass(frozen=True)
class TrainJob:
    """A training run. Plain values only, so it travels to Ray workers as a dict and into the run directory.

    Attributes:
        run_name: the run's name; starting a run with the same name and storage resumes it.
        storage_path: local path or ``s3://…`` where checkpoints, metrics and the export go.
        target_source: ``cache`` (read the target cache), ``online`` (run the base model every step) or ``pixel``
            (pixel-MAE pre-training: the targets are the view's own patches; no base model, no attention target;
            ``base_timm_kwargs`` then describe the encoder itself).
        cache_url: the target cache (cache mode; also the view plan and manifest source when given in online mode).
        manifest_url / checkpoint_url / base_timm_kwargs / preprocess / views_per_image / view_seed / last_layers /
        k_max / codec: the base model, view plan and target codec; in cache mode they are checked against the
        cache.
        timm_kwargs: the new encoder's ViT kwargs.
        adapters / feature_norm / attention_target / topk / att_tau / mask_ratio / decoder_*: TEC switches.
        epochs / global_batch / accum_steps / blr / weight_decay / warmup_epochs / min_lr: MAE's recipe;
            ``global_batch`` counts samples per optimiser step over all ranks and accumulation micro-steps.
        seed: model init, sample order and masks.
        num_workers / use_gpu / threads_per_worker / loader_workers: resources; ``num_workers: 0`` trains in the
            calling process on one device (CUDA when ``use_gpu``), without Ray.
        checkpoint_every / keep_checkpoints / max_failures / log_every: checkpointing and reporting (in steps).
        max_steps: stop after this many optimiser steps (the schedule still spans ``epochs``).
        amp_dtype: autocast dtype on GPU.
        base_precision: the online base model's precision (``extract.precision``: ``auto`` = bfloat16 on CUDA,
            float32 on the CPU), so online targets match a cache extracted on the same device.
        base_checkpoint_key: the checkpoint entry the base is loaded from (``base.checkpoint_key``: ``teacher``,
            ``student``, …; None: auto-detection); checked against the cache in cache mode.
        log_indices: each rank writes the sample indices it trained on to ``<run>/indices/`` at every report.
        uri_policy: the data section's input policy (:class:`stages.uri_policy.UriPolicy` fields; empty: defaults),
            so training reads exactly the images extraction was allowed to read.
        local_cache: ``train.local_cache`` (``dir``, ``max_bytes``, ``verify_local``): a node-local copy of a remote
            cache's objects (:mod:`stages.cache.local_tier`); empty or ``dir`` None: off. A resource: it may change
            across a resume.
    """

    run_name: str
    storage_path: str
    timm_kwargs: dict[str, Any]
    base_timm_kwargs: dict[str, Any]
    preprocess: dict[str, Any]
    target_source: TargetSource = "cache"
    cache_url: str | None = None
    manifest_url: str | None = None
    checkpoint_url: str | None = None
    views_per_image: int = 2
    view_seed: int = 0
    last_layers: int = 2
    k_max: int = 15
    codec: str = "float16"
    adapters: str = "both"
    feature_norm: str = "patch"
    attention_target: bool = True
    topk: int = 15
    att_tau: float = 1.8
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    epochs: int = 1
    global_batch: int = 256
    accum_steps: int = 1
    blr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    seed: int = 0
    shuffle_window: int = 8
    num_workers: int = 2
    use_gpu: bool = False
    threads_per_worker: int = 1
    loader_workers: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 0
    log_every: int = 10
    max_steps: int | None = None
    amp_dtype: str = "bfloat16"
    base_precision: str = "auto"
    base_checkpoint_key: str | None = None
    log_indices: bool = False
    uri_policy: dict[str, Any] = field(default_factory=dict)
    local_cache: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.target_source not in TARGET_SOURCES:
            problems.append(f"target_source must be one of {TARGET_SOURCES}, got {self.target_source!r}")
        if self.target_source == "cache" and not self.cache_url:
            problems.append("cache_url is required when target_source is 'cache'")
        if self.target_source == "online" and not (self.checkpoint_url and (self.manifest_url or self.cache_url)):
            problems.append("online mode needs checkpoint_url and a manifest_url (or a cache_url to take it from)")
        if self.target_source == "pixel":
            if not self.manifest_url:
                problems.append("pixel mode needs manifest_url (the images to pre-train on)")
            if self.attention_target:
                problems.append("pixel mode has no attention target: set attention_target false")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0 (0: one worker in this process), got {self.num_workers}")
        elif self.global_batch % (self.world_size * self.accum_steps):
            problems.append(f"global_batch {self.global_batch} must be divisible by num_workers × accum_steps "
                            f"({self.world_size} × {self.accum_steps})")
        if self.topk > self.k_max:
            problems.append(f"topk {self.topk} exceeds k_max {self.k_max}")
        if unknown := set(self.local_cache) - set(LOCAL_CACHE_FIELDS):
            problems.append(f"local_cache: unknown field(s) {sorted(unknown)}; expected {LOCAL_CACHE_FIELDS}")
        if problems:
            raise ValueError("invalid training job: " + "; ".join(problems))

    @property
    def world_size(self) -> int:
        """Ranks that train: ``num_workers`` Ray workers, or 1 in-process (``num_workers == 0``)."""
        return max(1, self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        return cls(**data)

    def replace(self, **changes: Any) -> TrainJob:
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of what must not change across a resume (everything but resources and stopping point)."""
        mutable = {"num_workers", "use_gpu", "threads_per_worker", "loader_workers", "max_failures", "log_every",
                   "max_steps", "keep_checkpoints", "log_indices", "uri_policy", "storage_path", "cache_url",
                   "manifest_url", "checkpoint_url", "local_cache"}
        fixed = fingerprinted(self.to_dict(), mutable, omitted_when_none=("base_checkpoint_key",))
        return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()

    def preprocess_obj(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)

    def build_model(self) -> TECModel:
        """The new model, sized against the base model described by the job (pixel mode: p·p·C_in outputs)."""
        base = self.base_timm_kwargs
        if self.target_source == "pixel":
            kw = self.timm_kwargs
            out_dim, heads = kw["patch_size"] ** 2 * kw.get("in_chans", 3), 1
        else:
            out_dim, heads = base["embed_dim"], base["num_heads"]
        return TECModel(
            self.timm_kwargs, out_dim, heads, num_patches(base), adapters=self.adapters,
            feature_norm=self.feature_norm, attention_target=self.attention_target, topk=self.topk,
            att_tau=self.att_tau, mask_ratio=self.mask_ratio, decoder_dim=self.decoder_dim,
            decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads,
        )


def fingerprinted(fields: dict[str, Any], mutable: Collection[str],
                  omitted_when_none: Collection[str] = ()) -> dict[str, Any]:
    """The fields a job's fingerprint hashes: all but ``mutable`` ones, and without those of ``omitted_when_none``
    that are None (fields added after runs existed: unset, they leave those runs' fingerprints what they were)."""
    return {k: v for k, v in fields.items() if k not in mutable and not (k in omitted_when_none and v is None)}


def run_dir(job: TrainJob) -> str:
    """The run directory: ``<storage_path>/<run_name>``."""
    return storage.join(job.storage_path, job.run_name)


def _manifest_problems(job: TrainJob, spec: CacheSpec) -> list[str]:
    """A manifest given besides the cache's own must be that manifest's bytes (its row i is the cache's image i):
    another list, or the same rows re-sorted, would pair images with other images' targets."""
    if job.manifest_url is None or storage.redact_url(job.manifest_url) == spec.manifest_uri:
        return []
    from stages.manifest import read_manifest

    _, sha = read_manifest(job.manifest_url, storage.storage_options(storage.protocol_of(job.manifest_url)))
    if sha == spec.manifest_sha256:
        return []
    return [f"manifest_url: {storage.redact_url(job.manifest_url)} has SHA-256 {sha[:12]}…, the cache was extracted "
            f"from {spec.manifest_uri} ({spec.manifest_sha256[:12]}…): its rows would meet other images' targets"]


def check_cache(job: TrainJob) -> CacheSpec:
    """Refuse a cache that does not fit the job, naming every field that differs.

    Checks the base architecture (hence L, C_base, H_base), target settings, preprocessing and view plan against
    the cache's ``tec_cache`` attribute, ``topk <= k_max``, that the new model takes the cache's views, and that a
    ``manifest_url`` other than the cache's own has the cache's manifest bytes.

    Returns:
        The cache's spec.
    """
    spec = open_cache(job.cache_url).spec
    problems = expected_differences(
        spec, timm_kwargs=job.base_timm_kwargs, last_layers=job.last_layers, view_seed=job.view_seed,
        views_per_image=job.views_per_image, codec=job.codec, checkpoint_key=job.base_checkpoint_key,
        **job.preprocess_obj().to_dict())
    if job.topk > spec.k_max:
        problems.append(f"targets.k_max: cache has {spec.k_max}, config's topk {job.topk} needs at least that many")
    new = job.timm_kwargs
    if new["img_size"] != spec.output_size:
        problems.append(f"model.img_size: the new model takes {new['img_size']} px, cache views are "
                        f"{spec.output_size} px")
    if new.get("in_chans", 3) != spec.timm_kwargs.get("in_chans", 3):
        problems.append(f"model.in_chans: the new model takes {new.get('in_chans', 3)} channels, cache views have "
                        f"{spec.timm_kwargs.get('in_chans', 3)}")
    if num_patches(new) != spec.num_patches:
        problems.append(f"model.num_patches: the new model has L={num_patches(new)}, cache targets have "
                        f"L={spec.num_patches}")
    problems += _manifest_problems(job, spec)
    if problems:
        raise CacheIncompatibleError(f"target cache {job.cache_url} does not fit this run:\n  " +
                                     "\n  ".join(problems))
    return spec
