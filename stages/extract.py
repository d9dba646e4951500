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
    CacheFullError,
    ClaimLostError,
    TargetCache,
    create_or_open,
    new_owner_id,
    no_space_guard,
    open_cache,
)
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

    def pid(self) -> int:
        """The actor's process id (fault-injection tests kill it)."""
        return os.getpid()

    def run_unit(self, unit_id: int, owner: str | None = None) -> dict[str, Any]:
        """Extract and write one unit; returns its stats (the marker plus timings).

        Args:
            unit_id: the unit.
            owner: the claim owner the unit is written for; the write is refused (:class:`ClaimLostError`) if the
                claim has meanwhile passed to another job.
        """
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
        check_finite(unit_id, self.cache.unit_size, full["features"], full["attn_logits"])
        timings = {"load_s": t1 - t0, "wait_s": t_fwd - t1, "forward_s": t2 - t_fwd, "device": self.device.type}
        marker = self.cache.write_unit(unit_id, full["features"], full["attn_logits"], full["topk_index"],
                                       boxes, valid, failures, extra={"timings": timings}, owner=owner)
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


def prepare(job: ExtractJob) -> tuple[CacheSpec, TargetCache]:
    """Resolve the job's identity and create (or check) the cache. Refuses a mismatching existing cache."""
    table, manifest_sha = read_manifest(job.manifest_url)
    checkpoint_sha = sha256_hex(storage.read_bytes(job.checkpoint_url))
    spec = build_spec(job, manifest_sha, table.num_rows, checkpoint_sha)
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


def _task_cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised (``RayTaskError.cause``), or ``err`` itself."""
    return getattr(err, "cause", None) or err


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
    """Extract every incomplete unit of the job's cache with a pool of Ray actors.

    Safe to run concurrently with other jobs on the same cache (they share the work unit by unit) and to re-run
    after any crash (it redoes only units that were not complete).

    Args:
        job: the extraction job.
        num_actors: actors in the pool (one GPU each when the cluster has GPUs, else ``threads_per_actor`` CPUs).
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
        RuntimeError: a unit killed its actor ``max_unit_attempts`` times.
    """
    import ray  # the driver needs Ray; the in-process UnitExtractor does not

    from infra.ray_cluster import ensure_ray, gpus_available

    started = time.perf_counter()
    lease = lease or LeaseConfig()
    job = dataclasses.replace(job, cache_url=storage.absolute(job.cache_url),
                              manifest_url=storage.absolute(job.manifest_url),
                              checkpoint_url=storage.absolute(job.checkpoint_url))
    spec, cache = prepare(job)
    done = set(cache.complete_units())
    order = list(unit_order) if unit_order is not None else list(range(cache.n_units))
    todo = [u for u in order if u not in done]
    owner = new_owner_id()
    result = ExtractResult(job.cache_url, spec.key, cache.n_units, units_skipped=sorted(done), owner=owner)
    log.info("extract %s: %d units (%d complete, %d to do), key %s, owner %s", job.cache_url, cache.n_units,
             len(done), len(todo), spec.key[:12], owner)
    if todo:
        ensure_ray(address)
        gpu = gpus_available() > 0
        actor_cls = ray.remote(UnitExtractor).options(
            num_gpus=1 if gpu else 0, num_cpus=0 if gpu else threads_per_actor,
            max_concurrency=in_flight_per_actor, max_restarts=0, max_task_retries=0,
        )

        def new_actor() -> Any:
            return actor_cls.remote(job, spec, "auto", None if gpu else threads_per_actor)

        actors = [new_actor() for _ in range(max(1, min(num_actors, len(todo))))]
        ray.get([actor.ready.remote() for actor in actors])
        log.info("extract: %d actor(s) ready on %s", len(actors), "GPU" if gpu else "CPU")
        keeper = _ClaimKeeper(cache, owner, lease)
        keeper.start()
        work_started = time.perf_counter()
        in_flight: dict[Any, tuple[int, Any, int]] = {}
        attempts: dict[int, int] = {}
        try:
            while todo or in_flight:
                _claim_and_submit(cache, owner, lease, todo, actors, in_flight, in_flight_per_actor, keeper,
                                  result)
                if not in_flight:
                    if todo:  # everything left is held by other live jobs: wait for them (or for their leases)
                        time.sleep(lease.poll_s)
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=lease.poll_s if todo else None)
                if not ready:
                    continue
                slot, actor, unit = in_flight.pop(ready[0])
                try:
                    stats = ray.get(ready[0])
                except ray.exceptions.RayActorError as err:
                    attempts[unit] = attempts.get(unit, 0) + 1
                    if attempts[unit] >= max_unit_attempts:
                        raise RuntimeError(f"extract {job.cache_url}: unit {unit} lost its actor "
                                           f"{attempts[unit]} times") from err
                    log.warning("extract: actor of unit %d died (%s); resubmitting", unit, type(err).__name__)
                    result.units_retried.append(unit)
                    if actors[slot] is actor:
                        ray.kill(actor)
                        actors[slot] = new_actor()
                        result.actors_replaced += 1
                    todo.insert(0, unit)
                    continue
                except ray.exceptions.RayTaskError as err:
                    cause = _task_cause(err)
                    if isinstance(cause, CacheFullError):
                        raise CacheFullError(cause.errno, cause.strerror) from None
                    if isinstance(cause, ClaimLostError):
                        log.warning("extract: %s", cause)
                        keeper.forget(unit)
                        todo.append(unit)  # now another job's; we wait for it (or for its lease to go stale)
                        continue
                    raise
                keeper.release(unit)
                result.units_written.append(unit)
                result.images_written += stats["n_valid"]
                result.views_written += stats["n_valid"] * job.views_per_image
                kind = stats["timings"]["device"]
                result.device_seconds[kind] = result.device_seconds.get(kind, 0.0) + stats["timings"]["forward_s"]
                log.info("extract: %s", _progress(len(result.units_written), len(result.units_written) + len(todo)
                                                  + len(in_flight), result.images_written, work_started))
            result.work_seconds = time.perf_counter() - work_started
        finally:
            keeper.close()
            for actor in actors:
                ray.kill(actor)
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


def _claim_and_submit(
    cache: TargetCache, owner: str, lease: LeaseConfig, todo: list[int], actors: list[Any],
    in_flight: dict[Any, tuple[int, Any, int]], per_actor: int, keeper: _ClaimKeeper, result: ExtractResult,
) -> None:
    """Claim as many units of ``todo`` as there are free actor slots and submit them (mutates the arguments).

    Units found complete are moved to ``result.units_by_others``; units held by other live jobs stay in ``todo``.
    """
    load = [0] * len(actors)
    for slot, _, _ in in_flight.values():
        load[slot] += 1
    free = len(actors) * per_actor - len(in_flight)
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
        slot = min(range(len(actors)), key=load.__getitem__)
        load[slot] += 1
        actor = actors[slot]
        in_flight[actor.run_unit.remote(unit, owner)] = (slot, actor, unit)
