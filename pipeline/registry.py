"""Where caches and runs live under an output root, and what ``status`` shows about them.

Layout under ``root`` (any fsspec URL; ``./outputs`` by default):

    <root>/manifests/<sha256[:16]>.parquet   content-addressed manifests
    <root>/bases/<name>.pth                  base checkpoints made on the spot
    <root>/caches/<key[:16]>/                one target cache per cache key
    <root>/requests/<fingerprint[:16]>.json  which cache key a configuration's extraction resolved to
    <root>/runs/<run_name>/                  Ray Train storage of each run (checkpoints, metrics, export)

A cache's directory name is derived from its key, so ``run`` and ``extract`` find a cache by computing the key of
their config (manifest and checkpoint hashes included). ``train`` does not compute it: it looks up the key that the
extraction of the same request (:func:`pipeline.orchestrate.request_fingerprint`: the config's cache-determining
inputs) recorded, so it reads neither the images nor the base checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from infra import storage
from stages.cache import open_cache

log = logging.getLogger(__name__)


def caches_root(root: str) -> str:
    return storage.join(root, "caches")


def runs_root(root: str) -> str:
    return storage.join(root, "runs")


def cache_url_for(root: str, key: str) -> str:
    """The registry location of the cache with this key."""
    return storage.join(caches_root(root), key[:16])


def request_url(root: str, fingerprint: str) -> str:
    """Where the cache key resolved for a request fingerprint is recorded."""
    return storage.join(root, "requests", f"{fingerprint[:16]}.json")


def record_request(root: str, fingerprint: str, cache_key: str, checkpoint_size: int | None) -> None:
    """Record that the request ``fingerprint`` resolves to the cache ``cache_key`` (the base checkpoint then had
    ``checkpoint_size`` bytes); rewritten by every extraction of the request, so the newest resolution wins."""
    row = {"fingerprint": fingerprint, "cache_key": cache_key, "checkpoint_size": checkpoint_size}
    storage.write_bytes(request_url(root, fingerprint), json.dumps(row, indent=2).encode())


def recorded_request(root: str, fingerprint: str) -> dict | None:
    """The record of a request fingerprint (``cache_key``, ``checkpoint_size``), or None when none was recorded."""
    try:
        row = json.loads(storage.read_bytes(request_url(root, fingerprint)))
    except FileNotFoundError:
        return None
    return row if row.get("fingerprint") == fingerprint else None


@dataclass
class CacheInfo:
    """One line of ``status`` for a cache."""

    url: str
    key: str
    base_arch: str
    checkpoint: str
    n_images: int
    views_per_image: int
    stored_bytes: int
    units_complete: int
    units_total: int


@dataclass
class RunInfo:
    """One line of ``status`` for a run."""

    name: str
    run_dir: str
    step: int | None
    epoch: float | None
    loss: float | None
    checkpoints: int
    last_checkpoint: str | None
    exported: bool


def list_caches(root: str) -> list[CacheInfo]:
    """Every cache under ``root`` with its completion (a half-finished extraction shows units done / total)."""
    out = []
    for name in sorted(_children(caches_root(root))):
        url = storage.join(caches_root(root), name)
        try:
            cache = open_cache(url)
        except (FileNotFoundError, KeyError):
            log.debug("%s is not a target cache", url)
            continue
        s, spec = cache.summary(), cache.spec
        kw = spec.timm_kwargs
        out.append(CacheInfo(url, spec.key, f"ViT {kw['embed_dim']}w/{kw['depth']}d/{kw['num_heads']}h "
                                            f"p{kw['patch_size']} {kw['img_size']}px", spec.checkpoint, spec.n_images,
                             spec.views_per_image, s.stored_bytes, s.units_complete, s.n_units))
    return out


def list_runs(root: str) -> list[RunInfo]:
    """Every run under ``root``: progress from its metrics, its checkpoints and whether it was exported."""
    out = []
    for name in sorted(_children(runs_root(root))):
        run_dir = storage.join(runs_root(root), name)
        objects = storage.list_objects(run_dir)
        checkpoints = sorted({key.split("/")[0] for key in objects if key.startswith("checkpoint_") and "/" in key})
        last = {}
        if "metrics.jsonl" in objects:
            lines = storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        out.append(RunInfo(name, run_dir, last.get("step"), last.get("epoch"), last.get("loss"), len(checkpoints),
                           checkpoints[-1] if checkpoints else None, "export/encoder.pth" in objects))
    return out


def _children(url: str) -> list[str]:
    return storage.list_dir(url)
