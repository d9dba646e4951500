"""Stage 1 — extract: run the frozen base model once over the view plan and write the target cache.

The driver (:func:`run_extract`) resolves the job into a :class:`~stages.cache_spec.CacheSpec`, creates or opens
the cache (refusing one made with different settings), and hands the incomplete work units to a pool of Ray
actors. Each actor (:class:`UnitExtractor`) loads the base model once and, per unit, reads the images, builds the
views with :func:`stages.views.build_view`, runs the model in batches and writes the unit's objects; the cache
marks the unit complete only after its data is durable, so a re-run skips exactly the finished units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from infra import storage
from stages.cache import TargetCache, create_or_open, open_cache
from stages.cache_spec import CacheSpec
from stages.images import BadImageError, FailureRecord, ImageSource
from stages.manifest import read_manifest
from stages.views import Preprocess
from tec_model import BaseModel, num_patches
from tec_model.flops import vit_forward_macs

log = logging.getLogger(__name__)


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
        amp_dtype: autocast dtype on GPU (``bfloat16`` or ``float16``); CPU runs in float32.
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
    amp_dtype: str = "bfloat16"


@dataclass
class ExtractResult:
    """What a run did: units written now vs found complete, and totals over the whole cache.

    ``wall_seconds`` covers the whole call (Ray start-up and model loading included); ``work_seconds`` runs from
    the moment every actor is ready to the last unit's return (the extraction rate is ``views_written`` over it).
    """

    cache_url: str
    cache_key: str
    units_total: int
    units_written: list[int] = field(default_factory=list)
    units_skipped: list[int] = field(default_factory=list)
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


def build_spec(job: ExtractJob, manifest_sha: str, n_images: int, checkpoint_sha: str) -> CacheSpec:
    """The cache identity of a job (the base model's shapes are derived from its kwargs)."""
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
        base_forward_macs_per_view=vit_forward_macs(kw), unit_size=job.unit_size,
    )


class UnitExtractor:
    """Loads the base model once and extracts whole units. Used in-process or as a Ray actor.

    Args:
        job: the extraction job.
        spec: the cache spec the driver resolved (its checkpoint hash is verified here).
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch intra-op threads (default: leave torch's setting).
    """

    def __init__(self, job: ExtractJob, spec: CacheSpec, device: str = "auto", threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.job, self.spec = job, spec
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        checkpoint = storage.read_bytes(job.checkpoint_url)
        if sha256_hex(checkpoint) != spec.checkpoint_sha256:
            raise RuntimeError(f"{job.checkpoint_url} changed while the extraction was running (SHA-256 differs)")
        self.model = BaseModel.from_checkpoint(checkpoint, job.timm_kwargs, job.last_layers, job.k_max,
                                               checkpoint_key=job.checkpoint_key).to(self.device)
        table, _ = read_manifest(job.manifest_url)
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
        for j, index in enumerate(rows):
            try:
                image = self.source.read(self.uris[index])
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
        amp = self.device.type == "cuda"
        dtype = getattr(torch, self.job.amp_dtype)
        for start in range(0, len(pixels), self.job.batch_size):
            batch = pixels[start : start + self.job.batch_size].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=dtype, enabled=amp):
                t = self.model(batch)
            outs.append((t.features.half().cpu().numpy(), t.attn_logits.half().cpu().numpy(),
                         t.topk_index.to(torch.int16).cpu().numpy()))
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True)) if outs else (
            np.zeros((0, self.spec.num_patches, self.spec.embed_dim), np.float16),
            np.zeros((0, self.spec.k_max + 1, self.spec.num_heads, self.spec.num_patches), np.float16),
            np.zeros((0, self.spec.k_max), np.int16),
        )

    def run_unit(self, unit_id: int) -> dict[str, Any]:
        """Extract and write one unit; returns its stats (the marker plus timings)."""
        t0 = time.perf_counter()
        pixels, boxes, valid, failures = self.load_unit(unit_id)
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
        timings = {"load_s": t1 - t0, "wait_s": t_fwd - t1, "forward_s": t2 - t_fwd, "device": self.device.type}
        marker = self.cache.write_unit(unit_id, full["features"], full["attn_logits"], full["topk_index"],
                                       boxes, valid, failures, extra={"timings": timings})
        return {**marker, "write_s": time.perf_counter() - t2, "wall_s": time.perf_counter() - t0}


def prepare(job: ExtractJob) -> tuple[CacheSpec, TargetCache]:
    """Resolve the job's identity and create (or check) the cache. Refuses a mismatching existing cache."""
    table, manifest_sha = read_manifest(job.manifest_url)
    checkpoint_sha = sha256_hex(storage.read_bytes(job.checkpoint_url))
    spec = build_spec(job, manifest_sha, table.num_rows, checkpoint_sha)
    cache = create_or_open(job.cache_url, spec, compressor=job.compressor)
    return spec, cache


def summarize(result: ExtractResult, cache: TargetCache) -> ExtractResult:
    """Fill the whole-cache totals of ``result`` from the cache."""
    s = cache.summary()
    result.stored_bytes, result.raw_bytes, result.compression_ratio = s.stored_bytes, s.raw_bytes, s.compression_ratio
    result.failures = cache.failures().num_rows
    return result


def result_dict(result: ExtractResult) -> dict[str, Any]:
    return asdict(result)


def _progress(done: int, total: int, images: int, started: float) -> str:
    elapsed = time.perf_counter() - started
    rate = images / elapsed if elapsed > 0 else 0.0
    eta = (total - done) * elapsed / done if done else float("nan")
    return f"units {done}/{total} | {rate:.1f} img/s | elapsed {elapsed:.0f}s | ETA {eta:.0f}s"


def run_extract(
    job: ExtractJob,
    num_actors: int = 1,
    address: str | None = None,
    unit_order: list[int] | None = None,
    in_flight_per_actor: int = 2,
    threads_per_actor: int = 1,
) -> ExtractResult:
    """Extract every incomplete unit of the job's cache with a pool of Ray actors.

    Args:
        job: the extraction job.
        num_actors: actors in the pool (one GPU each when the cluster has GPUs, else ``threads_per_actor`` CPUs).
        address: Ray cluster address (default ``$RAY_ADDRESS`` or a local cluster).
        unit_order: process units in this order (default ascending); complete units are skipped either way.
        in_flight_per_actor: units queued per actor, so reading the next unit overlaps the current forward.
        threads_per_actor: torch threads (and Ray CPUs) per CPU actor.

    Returns:
        :class:`ExtractResult`; the totals describe the whole cache after this run.
    """
    import ray  # the driver needs Ray; the in-process UnitExtractor does not

    from infra.ray_cluster import ensure_ray, gpus_available

    started = time.perf_counter()
    job = dataclasses.replace(job, cache_url=storage.absolute(job.cache_url),
                              manifest_url=storage.absolute(job.manifest_url),
                              checkpoint_url=storage.absolute(job.checkpoint_url))
    spec, cache = prepare(job)
    done = set(cache.complete_units())
    order = list(unit_order) if unit_order is not None else list(range(cache.n_units))
    pending = [u for u in order if u not in done]
    result = ExtractResult(job.cache_url, spec.key, cache.n_units, units_skipped=sorted(done))
    log.info("extract %s: %d units (%d complete, %d to do), key %s", job.cache_url, cache.n_units, len(done),
             len(pending), spec.key[:12])
    if pending:
        ensure_ray(address)
        gpu = gpus_available() > 0
        actor_cls = ray.remote(UnitExtractor).options(
            num_gpus=1 if gpu else 0, num_cpus=0 if gpu else threads_per_actor,
            max_concurrency=in_flight_per_actor, max_restarts=3, max_task_retries=3,
        )
        n_actors = max(1, min(num_actors, len(pending)))
        actors = [actor_cls.remote(job, spec, "auto", None if gpu else threads_per_actor) for _ in range(n_actors)]
        ray.get([actor.ready.remote() for actor in actors])
        log.info("extract: %d actor(s) ready on %s", n_actors, "GPU" if gpu else "CPU")
        work_started = time.perf_counter()
        queue, in_flight = list(reversed(pending)), {}

        def submit(actor: Any) -> None:
            if queue:
                unit = queue.pop()
                in_flight[actor.run_unit.remote(unit)] = (actor, unit)

        for actor in actors:
            for _ in range(in_flight_per_actor):
                submit(actor)
        try:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                actor, unit = in_flight.pop(ready[0])
                stats = ray.get(ready[0])
                result.units_written.append(unit)
                result.images_written += stats["n_valid"]
                result.views_written += stats["n_valid"] * job.views_per_image
                kind = stats["timings"]["device"]
                result.device_seconds[kind] = result.device_seconds.get(kind, 0.0) + stats["timings"]["forward_s"]
                log.info("extract: %s", _progress(len(result.units_written), len(pending), result.images_written,
                                                  work_started))
                submit(actor)
            result.work_seconds = time.perf_counter() - work_started
        finally:
            for actor in actors:
                ray.kill(actor)
    result.wall_seconds = time.perf_counter() - started
    summarize(result, cache)
    log.info(
        "extract done: %d units written, %d skipped; %d views; stored %.1f MB (raw %.1f MB, raw/stored %.3f); "
        "%d failures; %.1fs", len(result.units_written), len(result.units_skipped), result.views_written,
        result.stored_bytes / 1e6, result.raw_bytes / 1e6, result.compression_ratio, result.failures,
        result.wall_seconds,
    )
    return result
