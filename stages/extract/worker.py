"""The unit worker: loads the base model once and extracts whole units, in this process or as a Ray actor.

Per unit, :class:`UnitExtractor` reads the images, builds the views with :func:`stages.views.build_view`, runs the
model in batches and writes the unit's objects; the cache marks the unit complete only after its data is durable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import torch

from infra import storage
from stages.cache import CacheMismatchError, CacheSpec, FailureRecord, TargetCache, check_failure_rate, open_cache
from stages.device import autocast, configure_matmul, extraction_precision, resolve_device
from stages.extract.diagnostics import run_diagnostics
from stages.extract.job import ExtractJob, sha256_hex
from stages.images import BadImageError, ImageSource
from stages.manifest import read_manifest
from tec_model import BaseModel

log = logging.getLogger(__name__)


def _check_inputs(job: ExtractJob, spec: CacheSpec, checkpoint_sha: str, manifest_sha: str) -> None:
    """Refuse a checkpoint or manifest whose bytes are not the ones the cache is keyed by.

    Raises:
        CacheMismatchError: naming the field, the URL and both hashes.
    """
    problems = [f"{field}: {storage.redact_url(url)} now hashes to {now[:12]}…, the cache is keyed by {then[:12]}… "
                f"(changed since the extraction was planned?); restore it, or extract into another cache"
                for field, url, now, then in (
                    ("base_model.checkpoint_sha256", job.checkpoint_url, checkpoint_sha, spec.checkpoint_sha256),
                    ("manifest.sha256", job.manifest_url, manifest_sha, spec.manifest_sha256)) if now != then]
    if problems:
        raise CacheMismatchError(job.cache_url, problems)


class UnitExtractor:
    """Loads the base model once and extracts whole units. Used in-process or as a Ray actor.

    Args:
        job: the extraction job.
        spec: the cache spec the driver resolved; the worker checks the checkpoint and manifest bytes it reads
            against the spec's hashes (an overwritten file would otherwise put another base's targets, or other
            images, under the cache's key).
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch intra-op threads (default: leave torch's setting).
    """

    def __init__(self, job: ExtractJob, spec: CacheSpec, device: str = "auto", threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.job, self.spec = job, spec
        self.device = resolve_device("auto") if device == "auto" else torch.device(device)
        self.precision = extraction_precision(job.precision, self.device)
        if self.precision != spec.precision:
            raise CacheMismatchError(job.cache_url, [
                f"targets.precision: this worker computes {self.precision} on {self.device.type}, the driver "
                f"resolved {spec.precision} for the cache (extract.precision={job.precision!r}); set "
                "extract.precision explicitly when the driver and the workers see different devices"])
        if self.device.type == "cuda" and self.precision == "float32":
            configure_matmul(allow_tf32=False)  # float32 asked for: no TF32, so the bytes match a CPU forward
        checkpoint = storage.read_bytes(job.checkpoint_url)
        table, manifest_sha = read_manifest(job.manifest_url)
        _check_inputs(job, spec, sha256_hex(checkpoint), manifest_sha)
        self.model = BaseModel.from_checkpoint(checkpoint, job.timm_kwargs, job.last_layers, job.k_max,
                                               checkpoint_key=job.checkpoint_key,
                                               name=job.checkpoint_url).to(self.device)
        self.uris: list[str] = table.column("uri").to_pylist()
        self.source = ImageSource(in_chans=job.timm_kwargs.get("in_chans", 3))
        self.cache: TargetCache = open_cache(job.cache_url, expected=spec, read_only=False)
        # Several units may be in flight (reading and writing overlap the forward), but one forward at a time:
        # two concurrent forwards would oversubscribe the actor's threads (or its GPU's memory).
        self._forward_lock = threading.Lock()

    def ready(self) -> str:
        """Returns the device once the model is loaded (the driver waits on it before timing)."""
        return self.device.type

    def load_unit(self, unit_id: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[FailureRecord]]:
        """Read a unit's images and build all their views.

        Returns:
            pixels: (n_valid·V, C, S, S) float32; boxes: (n, V, 5) int32; valid: (n,) bool; failures.
        """
        rows, v = self.cache.unit_range(unit_id), self.job.views_per_image
        boxes = np.zeros((len(rows), v, 5), np.int32)
        valid = np.zeros(len(rows), bool)
        pixels, failures = [], []
        source = self.source.with_policy(self.job.uri_policy)
        for j, index in enumerate(rows):
            try:
                image = source.read(self.uris[index])
            except BadImageError as err:
                failures.append(FailureRecord(index, err.uri, err.reason, err.message))
                log.warning("image %d skipped: %s", index, err)
                continue
            valid[j] = True
            for view in range(v):
                boxes[j, view] = self.job.preprocess.plan(self.job.view_seed, index, view, *image.shape[:2])
                pixels.append(self.job.preprocess.build(image, boxes[j, view]))
        size, chans = self.job.preprocess.output_size, self.job.preprocess.channels
        return (torch.stack(pixels) if pixels else torch.empty(0, chans, size, size)), boxes, valid, failures

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Targets for (M, C, S, S) views in batches: features, attn_logits (float16), topk_index (int16)."""
        outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, len(pixels), self.job.batch_size):
            batch = pixels[start : start + self.job.batch_size].to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                t = self.model(batch)
            outs.append((t.features.half().cpu().numpy(), t.attn_logits.half().cpu().numpy(),
                         t.topk_index.to(torch.int16).cpu().numpy()))
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True)) if outs else (
            np.zeros((0, self.spec.num_patches, self.spec.embed_dim), np.float16),
            np.zeros((0, self.spec.k_max + 1, self.spec.num_heads, self.spec.num_patches), np.float16),
            np.zeros((0, self.spec.k_max), np.int16),
        )

    def diagnose(self, n_images: int, taus: tuple[float, ...]) -> dict[str, Any]:
        """The base diagnostics on the first ``n_images`` images of the plan, with the model this worker holds
        (:func:`stages.extract.diagnostics.run_diagnostics`), as :meth:`BaseDiagnostics.to_dict`."""
        with self._forward_lock:
            return run_diagnostics(self.model, self.job, self.uris, self.source, self.precision, n_images,
                                   taus=taus).to_dict()

    def pid(self) -> int:
        """The actor's process id (fault-injection tests kill it)."""
        return os.getpid()

    def run_unit(self, unit_id: int, owner: str | None = None) -> dict[str, Any]:
        """Extract and write one unit; returns its stats (the marker plus timings).

        Args:
            unit_id: the unit.
            owner: the claim owner the unit is written for; the write is refused (:class:`ClaimLostError`) if the
                claim has meanwhile passed to another job.

        Raises:
            stages.cache.TooManyBadImagesError: more images failed than ``job.max_failed_fraction`` allows.
            infra.storage.StorageError: the image store failed (nothing is recorded as a skip for it).
        """
        t0 = time.perf_counter()
        pixels, boxes, valid, failures = self.load_unit(unit_id)
        check_failure_rate(unit_id, len(valid), failures, self.job.max_failed_fraction)
        t1 = time.perf_counter()
        with self._forward_lock:
            t_fwd = time.perf_counter()
            features, attn, topk = self.forward(pixels)
            t2 = time.perf_counter()
        n, v = len(valid), self.job.views_per_image
        full = {
            "features": np.zeros((n, v, *features.shape[1:]), np.float16),
            "attn_logits": np.zeros((n, v, *attn.shape[1:]), np.float16),
            "topk_index": np.zeros((n, v, topk.shape[1]), np.int16),
        }
        for name, value in zip(full, (features, attn, topk), strict=True):
            full[name][valid] = value.reshape(int(valid.sum()), v, *value.shape[1:])
        check_finite(unit_id, self.cache.unit_size, full["features"], full["attn_logits"])
        timings = {"load_s": t1 - t0, "wait_s": t_fwd - t1, "forward_s": t2 - t_fwd, "device": self.device.type}
        marker = self.cache.write_unit(unit_id, full["features"], full["attn_logits"], full["topk_index"],
                                       boxes, valid, failures, owner=owner,
                                       extra={"timings": timings, "precision": self.precision})
        return {**marker, "write_s": time.perf_counter() - t2, "wall_s": time.perf_counter() - t0}


class NonFiniteTargetsError(FloatingPointError):
    """The base model produced NaN/inf targets (after the float16 cast); the unit is not written."""


def check_finite(unit_id: int, unit_size: int, features: np.ndarray, attn_logits: np.ndarray) -> None:
    """Refuse a unit whose float16 targets are not all finite (an overflowing or broken base model).

    Args:
        unit_id: the unit. unit_size: images per unit (to name the images).
        features: (n, V, L, C) float16. attn_logits: (n, V, K+1, H, L) float16.

    Raises:
        NonFiniteTargetsError: naming the unit and the first affected image indices.
    """
    bad = ~(np.isfinite(features).reshape(len(features), -1).all(1) &
            np.isfinite(attn_logits).reshape(len(attn_logits), -1).all(1))
    if bad.any():
        images = (unit_id * unit_size + np.flatnonzero(bad)).tolist()
        raise NonFiniteTargetsError(
            f"unit {unit_id}: the base model gave NaN/inf targets (float16) for {len(images)} image(s), first "
            f"{images[:5]}; nothing written. Check the base checkpoint and preprocessing (float16 overflows above "
            "65504)")

