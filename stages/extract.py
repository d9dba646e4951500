"""Stage 1 — extract: run the frozen base model once over the view plan and write the target cache.

The driver (:func:`run_extract`) resolves the job into a :class:`~stages.cache_spec.CacheSpec`, creates or opens
the cache (refusing one made with different settings), and hands the incomplete work units to a pool of Ray
actors. Each actor (:class:`UnitExtractor`) loads the base model once and, per unit, reads the images, builds the
views with :func:`stages.views.build_view`, runs the model in batches and writes the unit's objects; the cache
marks the unit complete only after its data is durable, so a re-run skips exactly the finished units.

Faults. The driver claims every unit before submitting it (``claims/<u>.json``, see :mod:`stages.cache`) and
renews its claims from a heartbeat thread; units claimed by another live job are left to it (the driver waits for
them at the end and takes over any whose claim goes stale), so concurrent jobs on one cache cooperate on disjoint
units. A killed driver therefore costs at most its in-flight units (``num_actors × in_flight_per_actor``): the next
run finds their claims stale (owner process gone, or expired) and recomputes exactly those
(:attr:`ExtractResult.units_taken_over`). A dead actor is replaced by the driver (Ray-level restarts are off, so the
driver sees and counts every loss) and its in-flight units are resubmitted (:attr:`ExtractResult.units_retried`).
Running out of space raises :class:`~stages.cache.CacheFullError` naming the cache; completed units stay intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from infra import storage
from stages.cache import (
    ClaimLostError,
    TargetCache,
    create_or_open,
    new_owner_id,
    no_space_guard,
    open_cache,
)
from stages.cache.spec import CacheMismatchError, CacheSpec
from stages.device import autocast, configure_matmul, extraction_precision, resolve_device
from stages.extract_pool import InProcessPool, RayActorPool, WorkerLostError
from stages.images import BadImageError, FailureRecord, ImageSource, check_failure_rate
from stages.manifest import read_manifest
from stages.uri_policy import DEFAULT_POLICY, UriPolicy
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
        precision: the base model's forward precision (``auto``: bfloat16 autocast on CUDA, float32 on the CPU;
            see :mod:`stages.device`). It changes the bytes, so it is recorded in the cache and fixed per cache.
        max_failed_fraction: a unit in which more of its images fail stops the job, nothing of it written (at least
            one failure is allowed when above 0; see :func:`stages.failures.allowed_failures`).
        uri_policy: which manifest URIs may be read and how much of them (:class:`stages.uri_policy.UriPolicy`).
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
    precision: str = "auto"
    max_failed_fraction: float = 0.05
    uri_policy: UriPolicy = DEFAULT_POLICY


@dataclass(frozen=True)
class LeaseConfig:
    """How a job claims units (see :mod:`stages.cache`, "Claims").

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
        if sha256_hex(checkpoint) != spec.checkpoint_sha256:
            raise RuntimeError(f"{job.checkpoint_url} changed while the extraction was running (SHA-256 differs)")
        self.model = BaseModel.from_checkpoint(checkpoint, job.timm_kwargs, job.last_layers, job.k_max,
                                               checkpoint_key=job.checkpoint_key,
                                               name=job.checkpoint_url).to(self.device)
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
            stages.failures.TooManyBadImagesError: more images failed than ``job.max_failed_fraction`` allows.
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


def resolve_spec(job: ExtractJob, device: torch.device | None = None) -> CacheSpec:
    """The job's cache spec (reads the manifest and hashes the checkpoint), for workers on ``device``
    (default: the CPU)."""
    table, manifest_sha = read_manifest(job.manifest_url)
    checkpoint_sha = sha256_hex(storage.read_bytes(job.checkpoint_url))
    precision = extraction_precision(job.precision, device or torch.device("cpu"))
    return build_spec(job, manifest_sha, table.num_rows, checkpoint_sha, precision)


def prepare(job: ExtractJob, device: torch.device | None = None,
            spec: CacheSpec | None = None) -> tuple[CacheSpec, TargetCache]:
    """Resolve the job's identity (unless ``spec`` is given) and create (or check) the cache.

    Refuses an existing cache of another key or of another precision (:class:`CacheMismatchError`).
    """
    spec = spec or resolve_spec(job, device)
    with no_space_guard(job.cache_url, "creating it"):
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


class _ClaimKeeper:
    """The claims one driver holds, renewed by a daemon thread every ``lease.renew_every_s``.

    Renewal and release share a lock, so a released claim is never rewritten by a late renewal.
    """

    def __init__(self, cache: TargetCache, owner: str, lease: LeaseConfig) -> None:
        self.cache, self.owner, self.lease = cache, owner, lease
        self.held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extract-claims", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, units: list[int]) -> None:
        with self._lock:
            self.held.update(units)

    def release(self, unit: int) -> None:
        with self._lock:
            self.held.discard(unit)
            self.cache.release_claim(unit, self.owner)

    def forget(self, unit: int) -> None:
        with self._lock:
            self.held.discard(unit)

    def close(self) -> None:
        """Stop renewing and release every claim still held (best effort: the claims expire anyway)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.lease.renew_every_s + 5)
        with self._lock:
            for unit in sorted(self.held):
                try:
                    self.cache.release_claim(unit, self.owner)
                except Exception as exc:  # release is best effort, the claim expires
                    log.warning("extract: could not release the claim on unit %d: %s", unit, exc)
            self.held.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.lease.renew_every_s):
            with self._lock:
                try:
                    lost = self.cache.renew_claims(sorted(self.held), self.owner, self.lease.ttl_s)
                except Exception as exc:  # a failed renewal is retried at the next beat
                    log.warning("extract: renewing claims failed: %s", exc)
                    continue
            if lost:
                log.warning("extract: claims on units %s were taken over by another job; their writes will be "
                            "refused", lost)


def _worker_device(num_actors: int, address: str | None) -> tuple[torch.device, bool]:
    """Where the units will be computed: (device, on Ray?). Starts (or joins) Ray for an actor pool."""
    if num_actors == 0:
        return resolve_device("auto"), False
    from infra.ray_cluster import ensure_ray, gpus_available

    ensure_ray(address)
    return torch.device("cuda" if gpus_available() > 0 else "cpu"), True


def run_extract(
    job: ExtractJob,
    num_actors: int = 1,
    address: str | None = None,
    unit_order: list[int] | None = None,
    in_flight_per_actor: int = 2,
    threads_per_actor: int = 1,
    lease: LeaseConfig | None = None,
    max_unit_attempts: int = 4,
) -> ExtractResult:
    """Extract every incomplete unit of the job's cache with a pool of Ray actors, or in this process.

    Safe to run concurrently with other jobs on the same cache (they share the work unit by unit) and to re-run
    after any crash (it redoes only units that were not complete). A cache that is already complete is reported
    without starting Ray or loading the base model.

    Args:
        job: the extraction job.
        num_actors: actors in the pool (one GPU each when the cluster has GPUs, else ``threads_per_actor`` CPUs);
            0 extracts in this process (CUDA when available), with the same unit worker and claims, without Ray.
        address: Ray cluster address (default ``$RAY_ADDRESS`` or a local cluster).
        unit_order: process units in this order (default ascending); complete units are skipped either way.
        in_flight_per_actor: units queued per actor, so reading the next unit overlaps the current forward.
        threads_per_actor: torch threads (and Ray CPUs) per CPU actor.
        lease: claim timings (default :class:`LeaseConfig`).
        max_unit_attempts: a unit whose actor dies this many times fails the run.

    Returns:
        :class:`ExtractResult`; the totals describe the whole cache after this run.

    Raises:
        CacheFullError: the cache's storage ran out of space (completed units are intact; re-run to resume).
        CacheMismatchError: the cache exists with another key or precision.
        RuntimeError: a unit killed its actor ``max_unit_attempts`` times.
    """
    started = time.perf_counter()
    job = dataclasses.replace(job, cache_url=storage.absolute(job.cache_url),
                              manifest_url=storage.absolute(job.manifest_url),
                              checkpoint_url=storage.absolute(job.checkpoint_url))
    spec = resolve_spec(job)
    cache = _existing_cache(job.cache_url, spec)
    if cache is not None and len(done := cache.complete_units()) == cache.n_units:
        result = ExtractResult(job.cache_url, spec.key, cache.n_units, units_skipped=sorted(done))
    else:
        device, on_ray = _worker_device(num_actors, address)
        spec, cache = prepare(job, spec=spec.replace(precision=extraction_precision(job.precision, device)))

        def make_pool() -> InProcessPool | RayActorPool:
            if not on_ray:
                return InProcessPool(job, spec, per_slot=in_flight_per_actor)
            return RayActorPool(job, spec, num_actors, device.type == "cuda", threads_per_actor, in_flight_per_actor)

        result = _extract_units(job, spec, cache, unit_order, lease or LeaseConfig(), max_unit_attempts, make_pool)
    swept = cache.sweep_claims()
    if swept:
        log.info("extract: removed leftover claims on complete units %s", swept)
    result.wall_seconds = time.perf_counter() - started
    summarize(result, cache)
    log.info(
        "extract done: %d units written (%d taken over from dead jobs, %d retries after actor deaths), %d skipped, "
        "%d done by other jobs; %d views; stored %.1f MB (raw %.1f MB, raw/stored %.3f); %d failures; %.1fs",
        len(result.units_written), len(result.units_taken_over), len(result.units_retried),
        len(result.units_skipped), len(result.units_by_others), result.views_written, result.stored_bytes / 1e6,
        result.raw_bytes / 1e6, result.compression_ratio, result.failures, result.wall_seconds,
    )
    return result


def _existing_cache(url: str, spec: CacheSpec) -> TargetCache | None:
    """The existing cache at ``url`` if it has ``spec``'s key (None when absent or of another key, which
    :func:`prepare` then refuses, naming the fields)."""
    try:
        cache = open_cache(url)
    except FileNotFoundError:
        return None
    return cache if cache.spec.key == spec.key else None


def _extract_units(job: ExtractJob, spec: CacheSpec, cache: TargetCache, unit_order: list[int] | None,
                   lease: LeaseConfig, max_unit_attempts: int, make_pool: Any) -> ExtractResult:
    """Claim and extract the cache's incomplete units with the pool ``make_pool()`` builds (if any are left)."""
    done = set(cache.complete_units())
    order = list(unit_order) if unit_order is not None else list(range(cache.n_units))
    todo = [u for u in order if u not in done]
    owner = new_owner_id()
    result = ExtractResult(job.cache_url, spec.key, cache.n_units, units_skipped=sorted(done), owner=owner)
    log.info("extract %s: %d units (%d complete, %d to do), key %s, precision %s, owner %s", job.cache_url,
             cache.n_units, len(done), len(todo), spec.key[:12], spec.precision, owner)
    if not todo:
        return result
    pool = make_pool()
    log.info("extract: %d worker(s) ready on %s (%s)", len(pool.workers), pool.device,
             "in this process" if isinstance(pool, InProcessPool) else "Ray actors")
    keeper = _ClaimKeeper(cache, owner, lease)
    keeper.start()
    work_started = time.perf_counter()
    try:
        _drive(job, cache, owner, lease, todo, pool, keeper, result, max_unit_attempts, work_started)
        result.work_seconds = time.perf_counter() - work_started
    finally:
        keeper.close()
        pool.close()
    return result


def _drive(job: ExtractJob, cache: TargetCache, owner: str, lease: LeaseConfig, todo: list[int], pool: Any,
           keeper: _ClaimKeeper, result: ExtractResult, max_unit_attempts: int, work_started: float) -> None:
    """The driver loop: keep the pool's slots busy with claimed units until none is left (mutates ``result``)."""
    in_flight: dict[Any, tuple[int, Any, int]] = {}
    attempts: dict[int, int] = {}
    while todo or in_flight:
        _claim_and_submit(cache, owner, lease, todo, pool, in_flight, keeper, result)
        if not in_flight:
            if todo:  # everything left is held by other live jobs: wait for them (or for their leases)
                time.sleep(lease.poll_s)
            continue
        ref = pool.next_done(list(in_flight), timeout=lease.poll_s if todo else None)
        if ref is None:
            continue
        slot, worker, unit = in_flight.pop(ref)
        try:
            stats = pool.outcome(ref)
        except WorkerLostError as err:
            attempts[unit] = attempts.get(unit, 0) + 1
            if attempts[unit] >= max_unit_attempts:
                raise RuntimeError(f"extract {job.cache_url}: unit {unit} lost its actor "
                                   f"{attempts[unit]} times") from err
            log.warning("extract: actor of unit %d died (%s); resubmitting", unit, err)
            result.units_retried.append(unit)
            result.actors_replaced += int(pool.replace(slot, worker))
            todo.insert(0, unit)
            continue
        except ClaimLostError as err:
            log.warning("extract: %s", err)
            keeper.forget(unit)
            todo.append(unit)  # now another job's; we wait for it (or for its lease to go stale)
            continue
        keeper.release(unit)
        result.units_written.append(unit)
        result.images_written += stats["n_valid"]
        result.views_written += stats["n_valid"] * job.views_per_image
        kind = stats["timings"]["device"]
        result.device_seconds[kind] = result.device_seconds.get(kind, 0.0) + stats["timings"]["forward_s"]
        log.info("extract: %s", _progress(len(result.units_written), len(result.units_written) + len(todo)
                                          + len(in_flight), result.images_written, work_started))


def _claim_and_submit(
    cache: TargetCache, owner: str, lease: LeaseConfig, todo: list[int], pool: Any,
    in_flight: dict[Any, tuple[int, Any, int]], keeper: _ClaimKeeper, result: ExtractResult,
) -> None:
    """Claim as many units of ``todo`` as there are free worker slots and submit them (mutates the arguments).

    Units found complete are moved to ``result.units_by_others``; units held by other live jobs stay in ``todo``.
    """
    load = [0] * len(pool.workers)
    for slot, _, _ in in_flight.values():
        load[slot] += 1
    free = len(pool.workers) * pool.per_slot - len(in_flight)
    if free <= 0 or not todo:
        return
    outcome = cache.claim_units(list(todo), owner, free, lease.ttl_s, lease.confirm_delay_s)
    keeper.add(outcome.claimed)
    for unit in outcome.complete:
        todo.remove(unit)
        result.units_by_others.append(unit)
    result.units_taken_over.extend(u for u in outcome.taken_over if u not in result.units_taken_over)
    for unit in outcome.claimed:
        todo.remove(unit)
        slot = min(range(len(pool.workers)), key=load.__getitem__)
        load[slot] += 1
        in_flight[pool.submit(slot, unit, owner)] = (slot, pool.workers[slot], unit)
