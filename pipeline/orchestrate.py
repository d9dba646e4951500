"""The pipeline's jobs from a :class:`~pipeline.config.PipelineConfig`: extract (or reuse) a cache, train, export.

The cache key is the hand-off between the stages. ``extract`` and ``run`` resolve the configuration into a
:class:`~stages.cache.CacheSpec` once (:func:`resolve_cache`: manifest, base checkpoint and its hash,
preprocessing), reuse a complete cache with that key from the registry instead of extracting again (a half-finished
one is resumed), hand the spec to the extraction, and record ``request fingerprint → cache key``
(:func:`request_fingerprint`, :func:`pipeline.registry.record_request`). ``train`` finds its cache from
``--cache`` or from that record (:func:`locate_cache`), without building the manifest or reading the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from infra import storage
from pipeline import config as C
from pipeline import ledger
from pipeline.flops import tec_step_macs
from pipeline.registry import cache_url_for, record_request, recorded_request, request_url, runs_root
from pipeline.run_logs import write_run_logs
from stages import manifest as M
from stages.cache import open_cache, write_config_attr
from stages.cache.spec import CacheSpec, canonical_json
from stages.device import extraction_precision
from stages.extract import ExtractJob, ExtractResult, build_spec, run_extract
from stages.train import TrainResult, latest_checkpoint_state, run_train, write_export
from stages.train.job import TrainJob
from stages.uri_policy import UriPolicy
from tec_model import build_vit, num_patches

log = logging.getLogger(__name__)


def _start_ray(cfg: C.PipelineConfig, needed: bool) -> None:
    """Start (or join) Ray when a stage will use it; the in-process modes (``extract.num_actors: 0``,
    ``train.num_workers: 0``) never import it."""
    if needed:
        from infra.ray_cluster import ensure_ray

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)


def build_manifest(source: str, path: str, policy: UriPolicy, limit: int | None = None) -> pa.Table:
    """The manifest table of ``path`` read as ``source`` (``data.source``: idx, image_folder or uri_list).

    Args:
        source: ``idx`` (IDX images file, labels from its MNIST-named sibling), ``image_folder`` (root/<class>/<image>)
            or ``uri_list`` (Parquet/CSV list with a ``uri`` and an optional ``label`` column).
        path: local path or fsspec URL.
        policy: the input policy a URI list's URIs are checked against.
        limit: keep the first ``limit`` rows (None: all).
    """
    if source == "idx":
        return M.manifest_from_idx(path, limit=limit)
    if source == "image_folder":
        table = M.manifest_from_image_folder(path)
    else:
        table = M.manifest_from_uri_list(path, policy=policy)
    return table if limit is None else table.slice(0, limit)


def prepare_manifest(cfg: C.PipelineConfig) -> tuple[str, str, int]:
    """Build the data set's manifest and store it content-addressed under ``<root>/manifests/``.

    Returns:
        (url, sha256, number of rows).
    """
    d = cfg.data
    table = build_manifest(d.source, d.path, UriPolicy.of(d), limit=d.limit)
    data = M.manifest_to_bytes(table)
    sha = M.manifest_sha256(data)
    url = storage.join(cfg.output_root, "manifests", f"{sha[:16]}.parquet")
    if not storage.exists(url):
        storage.write_bytes(url, data)
    return url, sha, table.num_rows


def prepare_base(cfg: C.PipelineConfig, manifest_url: str | None = None, manifest_sha: str | None = None) -> str:
    """The base checkpoint URL: ``base.checkpoint``, else a pixel-MAE base pre-trained on the data set
    (``base.pretrain``), else (``pretrain.epochs: 0``) a seeded random ViT.

    The pre-trained base is a Ray Train run under ``<root>/bases/`` named after everything that determines it
    (manifest, architecture, preprocessing, pre-training recipe): an existing one is reused, an interrupted one
    resumed. Its MAE-format checkpoint is ``<run>/export/mae.pth``.
    """
    if cfg.base.checkpoint:
        return storage.absolute(cfg.base.checkpoint)
    if cfg.base.pretrain.epochs > 0:
        if manifest_url is None or manifest_sha is None:
            manifest_url, manifest_sha, _ = prepare_manifest(cfg)
        return pretrain_base(cfg, manifest_url, manifest_sha)
    kwargs = C.base_timm_kwargs(cfg)
    tag = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:12]
    url = storage.join(cfg.output_root, "bases", f"random-{cfg.base.arch}-{tag}.pth")
    if not storage.exists(url):
        log.warning("no base.checkpoint and base.pretrain.epochs is 0: using a randomly initialised %s made on the "
                    "spot (%s); it teaches nothing, use it for pipeline tests only", cfg.base.arch, url)
        torch.manual_seed(0)
        buf = io.BytesIO()
        torch.save({"model": build_vit(kwargs).state_dict()}, buf)
        storage.write_bytes(url, buf.getvalue())
    return storage.absolute(url)


def pretrain_name(cfg: C.PipelineConfig, manifest_sha: str) -> str:
    """The base pre-training run's name: architecture plus a hash of all that determines the weights."""
    what = {"manifest": manifest_sha, "arch": C.base_timm_kwargs(cfg), "preprocess": C.preprocess(cfg).to_dict(),
            "pretrain": dataclasses.asdict(cfg.base.pretrain)}
    return f"mae-{cfg.base.arch}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"


def pretrain_base(cfg: C.PipelineConfig, manifest_url: str, manifest_sha: str) -> str:
    """Pre-train (or reuse, or resume) the pixel-MAE base of ``cfg``; returns its ``mae.pth`` URL."""
    name = pretrain_name(cfg, manifest_sha)
    root = storage.absolute(storage.join(cfg.output_root, "bases"))
    url = storage.join(root, name, "export", "mae.pth")
    if storage.exists(url):
        log.info("reusing pre-trained base %s", url)
        return url
    job = C.to_pretrain_job(cfg, run_name=name, storage_path=root, manifest_url=manifest_url)
    log.info("pre-training the base model: pixel MAE %s for %d epochs (%s)", cfg.base.arch, job.epochs, name)
    _start_ray(cfg, cfg.train.num_workers > 0)
    started = time.perf_counter()
    run_train(job, address=cfg.ray.address)
    write_run_logs(storage.join(root, name))
    log.info("base pre-training done in %.0f s: %s", time.perf_counter() - started, url)
    if not storage.exists(url):
        raise RuntimeError(f"base pre-training {name} finished without writing {url}")
    return url


@dataclass
class CacheReady:
    """A cache ready for training, and whether this call extracted into it."""

    url: str
    spec: CacheSpec
    extract: ExtractResult | None
    reused: bool


@dataclass(frozen=True)
class ResolvedCache:
    """A configuration's cache, resolved once: the extract job at the cache's location, with working URLs, and the
    spec (hence the key) its targets have."""

    job: ExtractJob
    spec: CacheSpec


def resolve_cache(cfg: C.PipelineConfig, cache_url: str | None = None) -> ResolvedCache:
    """Resolve ``cfg`` into its cache spec: build (or find) the manifest, resolve the base checkpoint (pre-training
    it when the config asks) and hash it, once. The cache lives at ``cache_url`` or at the key's registry location.
    """
    manifest_url, manifest_sha, n_images = prepare_manifest(cfg)
    checkpoint_url = prepare_base(cfg, manifest_url, manifest_sha)
    checkpoint_sha = hashlib.sha256(storage.read_bytes(checkpoint_url)).hexdigest()
    job = C.to_extract_job(cfg, cache_url="", manifest_url=storage.absolute(manifest_url),
                           checkpoint_url=storage.absolute(checkpoint_url))
    spec = build_spec(job, manifest_sha, n_images, checkpoint_sha,
                      extraction_precision(job.precision, None))  # the workers' own replaces it
    url = storage.absolute(cache_url or cache_url_for(cfg.output_root, spec.key))
    return ResolvedCache(dataclasses.replace(job, cache_url=url), spec)


def _extract_job(cfg: C.PipelineConfig, cache_url: str | None) -> tuple[ExtractJob, str]:
    """The config's extract job at its registry location (or ``cache_url``), and its cache key."""
    resolved = resolve_cache(cfg, cache_url)
    return resolved.job, resolved.spec.key


def request_fingerprint(cfg: C.PipelineConfig) -> str:
    """SHA-256 hex of the configuration's cache-determining inputs, as written (nothing is read): the data
    (source, path, limit, input policy), the base (checkpoint URL without its secrets, or the pre-training recipe;
    architecture, checkpoint key), the preprocessing and the extraction settings that enter the cache key."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "test_path"}
    data["path"] = storage.redact_url(storage.absolute(cfg.data.path))
    checkpoint = cfg.base.checkpoint
    ex = cfg.extract
    what = {
        "data": data,
        "base": {"checkpoint": storage.redact_url(storage.absolute(checkpoint)) if checkpoint else None,
                 "checkpoint_key": cfg.base.checkpoint_key, "timm_kwargs": C.base_timm_kwargs(cfg),
                 "pretrain": None if checkpoint else dataclasses.asdict(cfg.base.pretrain)},
        "preprocess": C.preprocess(cfg).to_dict(),
        "targets": {"k_max": ex.k_max, "last_layers": ex.last_layers, "view_seed": ex.seed,
                    "views_per_image": ex.views_per_image},
    }
    if ex.codec != "float16":  # absent for float16: the requests recorded before codecs existed still match
        what["targets"]["codec"] = ex.codec
    return hashlib.sha256(canonical_json(what).encode()).hexdigest()


def _checkpoint_size(cfg: C.PipelineConfig) -> int | None:
    """The configured base checkpoint's size in bytes (a stat, not a read), or None without ``base.checkpoint`` or
    when the store does not answer (e.g. an expired presigned URL: the check is then skipped)."""
    if not cfg.base.checkpoint:
        return None
    try:
        return storage.size(storage.absolute(cfg.base.checkpoint))
    except OSError as exc:
        log.debug("no size for base.checkpoint %s (%s)", storage.redact_url(cfg.base.checkpoint), exc)
        return None


def _registry_cache_url(cfg: C.PipelineConfig) -> str:
    """The registry location of the cache that the extraction of ``cfg``'s request recorded.

    Raises:
        FileNotFoundError: nothing is recorded for this request, or the base checkpoint changed size since.
    """
    fingerprint = request_fingerprint(cfg)
    row = recorded_request(cfg.output_root, fingerprint)
    if row is None:
        raise FileNotFoundError(
            f"no target cache recorded for this configuration under {storage.redact_url(cfg.output_root)} (request "
            f"{fingerprint[:16]}, {storage.redact_url(request_url(cfg.output_root, fingerprint))} is absent): run "
            "`run_pipeline.py extract` (or `run`) with this configuration first (a complete cache is reused, not "
            "extracted again), or pass --cache")
    size = _checkpoint_size(cfg)
    if row.get("checkpoint_size") is not None and size is not None and size != row["checkpoint_size"]:
        raise FileNotFoundError(
            f"base.checkpoint {storage.redact_url(cfg.base.checkpoint)} has {size} bytes, {row['checkpoint_size']} "
            "when its cache was extracted: the base changed; run `run_pipeline.py extract` again")
    return storage.absolute(cache_url_for(cfg.output_root, row["cache_key"]))


def locate_cache(cfg: C.PipelineConfig, cache_url: str | None = None) -> CacheReady:
    """The cache for ``cfg``: ``cache_url``, or the one the extraction of this configuration recorded in the
    registry. Reads neither the images nor the base checkpoint and writes nothing: the training stage checks the
    cache's fit and completeness before it starts.

    Raises:
        FileNotFoundError: no cache is recorded for the configuration, or none is at the location; the message
            names what to run.
    """
    url = storage.absolute(cache_url) if cache_url else _registry_cache_url(cfg)
    try:
        cache = open_cache(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"no target cache at {storage.redact_url(url)}: run `run_pipeline.py extract` (or "
                                "`run`) first") from None
    spec = cache.spec
    manifest = storage.absolute(storage.join(cfg.output_root, "manifests", f"{spec.manifest_sha256[:16]}.parquet"))
    checkpoint = storage.absolute(cfg.base.checkpoint) if cfg.base.checkpoint else None
    return CacheReady(url, spec.with_working_urls(checkpoint, manifest), None, reused=True)


def ensure_cache(cfg: C.PipelineConfig, cache_url: str | None = None) -> CacheReady:
    """Extract the configuration's cache, or reuse the complete cache with the same key (registry or
    ``cache_url``); a half-finished cache is resumed. A cache at its registry location is recorded for the
    configuration's request (:func:`request_fingerprint`), so ``train`` finds it without resolving it again.

    A complete cache whose ledger lacks the rows of some units (a crash between a run's last unit and its ledger
    row, or a killed extraction) gets them derived from the units' completion markers
    (:func:`pipeline.ledger.record_unrecorded_units`, idempotent)."""
    resolved = resolve_cache(cfg, cache_url)
    job, key = resolved.job, resolved.spec.key
    working = (job.checkpoint_url, job.manifest_url)
    _start_ray(cfg, cfg.extract.num_actors > 0)
    ready = None
    with contextlib.suppress(FileNotFoundError):
        cache = open_cache(job.cache_url)
        if cache.spec.key == key and len(cache.complete_units()) == cache.n_units:
            log.info("reusing complete cache %s (key %s)", job.cache_url, key[:12])
            ledger.record_unrecorded_units(job.cache_url)
            ready = CacheReady(job.cache_url, cache.spec.with_working_urls(*working), None, reused=True)
    if ready is None:
        result = run_extract(job, num_actors=cfg.extract.num_actors, address=cfg.ray.address,
                             threads_per_actor=cfg.extract.threads_per_actor, spec=resolved.spec)
        spec = open_cache(job.cache_url).spec.with_working_urls(*working)
        write_config_attr(job.cache_url, C.resolved_dict(cfg))
        if result.units_written:
            ledger.record_extraction(job.cache_url, result, spec)
        ledger.record_unrecorded_units(job.cache_url)
        ready = CacheReady(job.cache_url, spec, result, reused=False)
    if cache_url is None:
        record_request(cfg.output_root, request_fingerprint(cfg), key, _checkpoint_size(cfg))
    return ready


def train_from(cfg: C.PipelineConfig, cache: CacheReady, run_name: str | None = None) -> TrainResult:
    """Train one run from a ready cache, then write its logs and its ledger row."""
    name = run_name or C.default_run_name(cfg)
    job = C.to_train_job(cfg, cache_url=cache.url, run_name=name, storage_path=runs_root(cfg.output_root),
                         manifest_url=cache.spec.manifest_uri, checkpoint_url=cache.spec.checkpoint)
    run_dir = storage.join(job.storage_path, name)
    _start_ray(cfg, cfg.train.num_workers > 0)
    started = time.perf_counter()
    # config.yaml is written by run_train once the run is accepted (name free, configuration unchanged)
    result = run_train(job, address=cfg.ray.address, run_files={"config.yaml": C.dump_yaml(cfg).encode()})
    wall = time.perf_counter() - started
    history = write_run_logs(run_dir)
    last = history[-1] if history else {}
    m = cfg.model
    macs = tec_step_macs(job.timm_kwargs, cache.spec.embed_dim, cache.spec.num_heads, num_patches(job.timm_kwargs),
                         mask_ratio=m.mask_ratio, adapters=m.adapters, attention_target=m.attention_target,
                         topk=m.topk, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                         decoder_heads=m.decoder_heads)
    views = int(last.get("views_served", 0))
    ledger.record_run(cache.url, run_name=name, run_dir=run_dir, target_source=job.target_source,
                      views_served=views, bytes_read=int(last.get("bytes_read", 0)),
                      train_macs=views * macs["train_macs_per_sample"], wall_seconds=wall,
                      epochs=float(last.get("epoch", 0.0)),
                      base_macs_per_view=cache.spec.base_forward_macs_per_view,
                      object_store_bytes=last.get("object_store_bytes"),
                      local_cache_bytes=last.get("local_cache_bytes"))
    return result


def run(cfg: C.PipelineConfig) -> dict[str, Any]:
    """``extract`` (or reuse) then ``train``; returns a summary for the CLI."""
    cache = ensure_cache(cfg)
    result = train_from(cfg, cache)
    return {"cache": cache.url, "cache_key": cache.spec.key, "cache_reused": cache.reused,
            "run_dir": result.run_dir, "export": result.export_path,
            "final": {k: result.metrics.get(k) for k in ("step", "epoch", "loss", "loss_fea", "loss_att")}}


def export_run(run_dir: str, out_dir: str | None = None) -> str:
    """Export the encoder of a run's latest checkpoint (e.g. of an unfinished or interrupted run).

    Returns:
        The URL of the written ``encoder.pth``.
    """
    job = TrainJob.from_dict(json.loads(storage.read_bytes(storage.join(run_dir, "config.json"))))
    model = job.build_model()
    model.load_state_dict(latest_checkpoint_state(run_dir)["model"])
    return write_export(job, model, out_dir or storage.join(run_dir, "export"))
