"""The FLOPs ledger beside a target cache: what extraction spent and what each training run saved.

Units: every ``*_macs`` column is **MACs (multiply-accumulates); FLOPs = 2×MACs**
(docs/method.md#11-flops-convention), from the analytic formulas of :mod:`pipeline.flops`.
Bytes are bytes, seconds are seconds.

Layout: one Parquet **object per row**, so concurrent writers never share an object (no read-modify-write):

- ``<cache_url>/ledger/extract-<timestamp>-<random>.parquet``, one per extraction run that wrote something
  (:data:`EXTRACT_SCHEMA`), listing the units it wrote;
- ``<cache_url>/ledger/extract-recovered-<hash>.parquet``: units complete in the cache that no row lists (their
  run crashed between its last unit and its row, or was killed), derived from their completion markers by
  :func:`record_unrecorded_units`. The name is a hash of the unit list, so deriving again writes the same object.
  A derived row that shares a unit with a run's own row (that run was only late) is ignored by :func:`read_ledger`,
  as is one sharing a unit with an earlier derived row, so no unit is counted twice; its other units are derived
  again by the next call;
- ``<cache_url>/ledger/run-<run_name>.parquet``, one per training run that used the cache (:data:`RUN_SCHEMA`);
  recording the same run again (after a resume) replaces its object.

Every write goes through :mod:`infra.storage` (atomic whole-object writes, any fsspec URL). URLs in rows and log
lines are redacted (:func:`infra.storage.redact_url`: no userinfo, no presigned signature or token).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from infra import storage
from pipeline.flops import UNIT, base_macs_per_view
from stages.train.job import USER_TARGET_SOURCES as TARGET_SOURCES

if TYPE_CHECKING:
    from stages.cache.spec import CacheSpec
    from stages.extract import ExtractResult

log = logging.getLogger(__name__)

LEDGER_DIR = "ledger"

EXTRACT_SCHEMA = pa.schema([
    ("cache_key", pa.string()),
    ("timestamp", pa.string()),
    ("images", pa.int64()),  # valid images written by this run
    ("views", pa.int64()),  # views written by this run (images × V)
    ("n_images", pa.int64()),  # N of the cache
    ("views_per_image", pa.int64()),  # V of the cache
    ("base_macs_per_view", pa.int64()),
    ("base_macs_total", pa.int64()),  # views × base_macs_per_view
    ("bytes_written", pa.int64()),  # stored bytes of the units this run wrote (pro rata by complete units)
    ("cache_stored_bytes", pa.int64()),  # stored bytes of the whole cache after this run
    ("wall_seconds", pa.float64()),
    ("work_seconds", pa.float64()),
    ("device_seconds", pa.float64()),  # sum over device kinds
    ("device_seconds_json", pa.string()),  # {"cpu": s, "cuda": s, ...}: forward seconds by device kind
    ("units_json", pa.string()),  # JSON list of the units this row covers (null in rows from before it was kept)
    ("recovered", pa.bool_()),  # derived from completion markers: wall and work seconds unknown (0.0)
], metadata={"units": UNIT})

RUN_SCHEMA = pa.schema([
    ("run_name", pa.string()),
    ("run_dir", pa.string()),
    ("target_source", pa.string()),  # cache | online
    ("views_served", pa.int64()),
    ("base_macs_per_view", pa.int64()),
    ("base_macs_avoided", pa.int64()),  # views_served × base_macs_per_view for cache runs, 0 for online ones
    ("bytes_read", pa.int64()),
    ("train_macs", pa.int64()),  # the run's own training MACs (forward + backward)
    ("wall_seconds", pa.float64()),
    ("epochs", pa.float64()),
    ("timestamp", pa.string()),
    # network: bytes the run read from the cache's store (the object store for a remote cache) and bytes its
    # node-local cache served (null in rows written before they were kept)
    ("object_store_bytes", pa.int64()),
    ("local_cache_bytes", pa.int64()),
], metadata={"units": UNIT})


def ledger_url(cache_url: str) -> str:
    """``<cache_url>/ledger``."""
    return storage.join(cache_url, LEDGER_DIR)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _safe_name(name: str) -> str:
    """A run name usable as one object name (anything outside ``[A-Za-z0-9._-]`` becomes ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    if not safe:
        raise ValueError(f"run name {name!r} gives an empty object name")
    return safe


def _write_row(url: str, schema: pa.Schema, row: dict[str, Any]) -> None:
    table = pa.Table.from_pylist([row], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(url, buf.getvalue())


def record_extraction(cache_url: str, result: ExtractResult, spec: CacheSpec) -> dict[str, Any]:
    """Write the ledger row of one extraction run (MACs; FLOPs = 2×MACs).

    ``base_macs_per_view`` is the cache's ``flops.base_forward_macs_per_view`` (or, when missing, the analytic
    count of ``spec.timm_kwargs``). ``bytes_written`` is this run's share of the cache's stored bytes (those of its
    complete units), pro rata by units: the units it wrote over every complete unit, those complete when it started
    and those other jobs wrote meanwhile included, so concurrent extractors' rows add up to the cache's size (exact
    when it wrote every unit). A run that wrote no unit spent nothing and writes no
    object (a re-run that found the cache complete is not an extraction).

    Args:
        cache_url: the cache root (fsspec URL or local path).
        result: what :func:`stages.extract.run_extract` returned.
        spec: the cache's spec.

    Returns:
        The row as a dict (keys of :data:`EXTRACT_SCHEMA`), plus ``url``: its object, or None when nothing was
        written.
    """
    per_view = int(spec.base_forward_macs_per_view or base_macs_per_view(spec.timm_kwargs))
    written = len(result.units_written)
    complete = written + len(result.units_skipped) + len(result.units_by_others)  # the units stored_bytes covers
    share = written / complete if complete else 0.0
    stamp = _now()
    row = {
        "cache_key": result.cache_key or spec.key, "timestamp": stamp,
        "images": int(result.images_written), "views": int(result.views_written),
        "n_images": int(spec.n_images), "views_per_image": int(spec.views_per_image),
        "base_macs_per_view": per_view, "base_macs_total": int(result.views_written) * per_view,
        "bytes_written": round(result.stored_bytes * share), "cache_stored_bytes": int(result.stored_bytes),
        "wall_seconds": float(result.wall_seconds), "work_seconds": float(result.work_seconds),
        "device_seconds": float(sum(result.device_seconds.values())),
        "device_seconds_json": json.dumps(result.device_seconds, sort_keys=True),
        "units_json": json.dumps(sorted(result.units_written)), "recovered": False,
    }
    if not written:
        log.info("ledger: extraction of %s wrote no unit; nothing recorded", storage.redact_url(cache_url))
        return {**row, "url": None}
    url = storage.join(ledger_url(cache_url), f"extract-{stamp}-{uuid.uuid4().hex[:8]}.parquet")
    _write_row(url, EXTRACT_SCHEMA, row)
    log.info("ledger: extraction of %d views spent %d base MACs (FLOPs = 2×MACs) -> %s",
             row["views"], row["base_macs_total"], storage.redact_url(url))
    return {**row, "url": url}


def record_run(
    cache_url: str,
    run_name: str,
    run_dir: str,
    target_source: str,
    views_served: int,
    bytes_read: int,
    train_macs: int,
    wall_seconds: float,
    epochs: float,
    base_macs_per_view: int,
    *,
    object_store_bytes: int | None = None,
    local_cache_bytes: int | None = None,
) -> dict[str, Any]:
    """Write (or replace) the ledger row of one training run (MACs; FLOPs = 2×MACs).

    Args:
        cache_url: the cache the run used (for an online run: the cache it would have used, if any).
        run_name: the run's name; its object is ``ledger/run-<run_name>.parquet`` (unsafe characters → ``_``).
        run_dir: where the run's checkpoints and metrics live (stored redacted).
        target_source: ``cache`` (targets read from the cache) or ``online`` (base model run every step).
        views_served: training samples served over all ranks (one view each).
        bytes_read: target bytes read from the cache (whatever the caller measured; the train metrics'
            ``bytes_read_rank0`` is rank 0's share only).
        train_macs: the run's own training MACs (forward + backward, e.g. views × ``train_macs_per_sample``).
        wall_seconds: the run's wall time.
        epochs: epochs completed (fractional when stopped mid-epoch).
        base_macs_per_view: MACs of one base forward (the cache's ``flops.base_forward_macs_per_view``).
        object_store_bytes: bytes read from the cache's store over all ranks (the train metrics' field of the
            same name); None: not measured.
        local_cache_bytes: bytes served from the node-local cache (``train.local_cache``) over all ranks.

    Returns:
        The row (keys of :data:`RUN_SCHEMA`) plus ``url``, its object.
    """
    if target_source not in TARGET_SOURCES:
        raise ValueError(f"target_source must be one of {TARGET_SOURCES}, got {target_source!r}")
    avoided = int(views_served) * int(base_macs_per_view) if target_source == "cache" else 0
    row = {
        "run_name": run_name, "run_dir": storage.redact_url(str(run_dir)), "target_source": target_source,
        "views_served": int(views_served), "base_macs_per_view": int(base_macs_per_view),
        "base_macs_avoided": avoided, "bytes_read": int(bytes_read), "train_macs": int(train_macs),
        "wall_seconds": float(wall_seconds), "epochs": float(epochs), "timestamp": _now(),
        "object_store_bytes": None if object_store_bytes is None else int(object_store_bytes),
        "local_cache_bytes": None if local_cache_bytes is None else int(local_cache_bytes),
    }
    url = storage.join(ledger_url(cache_url), f"run-{_safe_name(run_name)}.parquet")
    _write_row(url, RUN_SCHEMA, row)
    log.info("ledger: run %s (%s) served %d views, avoided %d base MACs (FLOPs = 2×MACs) -> %s",
             run_name, target_source, row["views_served"], avoided, storage.redact_url(url))
    return {**row, "url": url}


def read_ledger(cache_url: str) -> tuple[pa.Table, pa.Table]:
    """Every ledger row of a cache (MACs; FLOPs = 2×MACs).

    Returns:
        ``(extractions, runs)``: tables with :data:`EXTRACT_SCHEMA` and :data:`RUN_SCHEMA`, ordered by timestamp
        (empty tables when the cache has no ledger).
    """
    root = ledger_url(cache_url)
    tables: dict[str, list[pa.Table]] = {"extract": [], "run": []}
    for key in sorted(storage.list_objects(root)):
        kind = key.split("-", 1)[0]
        if "/" in key or not key.endswith(".parquet") or kind not in tables:
            continue
        schema = EXTRACT_SCHEMA if kind == "extract" else RUN_SCHEMA
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, key))))
        for name in schema.names:  # columns added since the object was written read as null
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
        tables[kind].append(table.select(schema.names).cast(schema))
    out = []
    for kind, schema in (("extract", EXTRACT_SCHEMA), ("run", RUN_SCHEMA)):
        table = pa.concat_tables(tables[kind]) if tables[kind] else schema.empty_table()
        out.append(table.sort_by("timestamp") if table.num_rows else table)
    return _without_superseded(out[0]), out[1]


def _without_superseded(ext: pa.Table) -> pa.Table:
    """Drop each derived row that shares a unit with a run's own row or with an earlier derived row we keep."""
    rows = ext.to_pylist()
    seen = {u for r in rows if not r["recovered"] and r["units_json"] for u in json.loads(r["units_json"])}
    keep = []
    for i, r in enumerate(rows):
        if r["recovered"]:
            units = set(json.loads(r["units_json"]))
            if units & seen:
                continue
            seen |= units
        keep.append(i)
    return ext.take(keep) if len(keep) < len(rows) else ext


def record_unrecorded_units(cache_url: str) -> dict[str, Any] | None:
    """Derive one ledger row for the complete units that no row lists, from their completion markers
    (idempotent: the object's name is a hash of the unit list; nothing is written when every unit is listed).

    The row has the units' valid images and views, their base MACs, their stored bytes (exact), and their forward
    seconds by device kind from the markers' timings; ``wall_seconds`` and ``work_seconds`` are unknown (0.0) and
    ``recovered`` is true. Rows written before unit lists were kept make the coverage unknown: then nothing is
    derived.

    Returns:
        The row written (keys of :data:`EXTRACT_SCHEMA` plus ``url``), or None.
    """
    from stages.cache import open_cache

    ext, _ = read_ledger(cache_url)
    listed = ext.column("units_json").to_pylist()
    if any(units is None for units in listed):
        log.info("ledger: %s has rows without unit lists; unrecorded units cannot be told, none derived",
                 storage.redact_url(cache_url))
        return None
    cache = open_cache(cache_url)
    done = cache.complete_units()
    missing = sorted(set(done) - {u for units in listed for u in json.loads(units)})
    if not missing:
        return None
    spec, sizes = cache.spec, storage.list_objects(cache_url)
    stored = {u: sum(sizes.get(key, 0) for key in cache.unit_objects(u)[:-2]) for u in done}
    markers = [cache.marker(u) for u in missing]
    device: dict[str, float] = {}
    for marker in markers:
        timings = marker.get("timings", {})
        if "device" in timings:
            device[timings["device"]] = device.get(timings["device"], 0.0) + float(timings.get("forward_s", 0.0))
    per_view = int(spec.base_forward_macs_per_view or base_macs_per_view(spec.timm_kwargs))
    images = sum(int(m["n_valid"]) for m in markers)
    units_json = json.dumps(missing)
    row = {
        "cache_key": spec.key, "timestamp": _now(), "images": images, "views": images * spec.views_per_image,
        "n_images": int(spec.n_images), "views_per_image": int(spec.views_per_image), "base_macs_per_view": per_view,
        "base_macs_total": images * spec.views_per_image * per_view, "bytes_written": sum(stored[u] for u in missing),
        "cache_stored_bytes": sum(stored.values()), "wall_seconds": 0.0, "work_seconds": 0.0,
        "device_seconds": float(sum(device.values())), "device_seconds_json": json.dumps(device, sort_keys=True),
        "units_json": units_json, "recovered": True,
    }
    digest = hashlib.sha256(units_json.encode()).hexdigest()[:16]
    url = storage.join(ledger_url(cache_url), f"extract-recovered-{digest}.parquet")
    _write_row(url, EXTRACT_SCHEMA, row)
    log.warning("ledger: %d complete unit(s) of %s had no extraction row (a run crashed before writing it); "
                "derived one from their markers -> %s", len(missing), storage.redact_url(cache_url),
                storage.redact_url(url))
    return {**row, "url": url}
