"""An open target cache (:class:`TargetCache`): open or create it, write whole units, read units and samples.

The arrays and their chunking are :mod:`stages.cache.layout`; the identity stored in the group attribute is
:mod:`stages.cache.spec`; claims on units are :mod:`stages.cache.leases` (methods of every open cache).

Completion. :meth:`TargetCache.write_unit` assigns each array's unit range in one call (whole objects), makes the
objects durable (fsync locally; an S3 PUT is durable when it returns), writes the failures table, then the marker.
A unit without a marker is incomplete: readers refuse it (:meth:`TargetCache.require_complete`) and a re-run
rewrites it. Every object is written whole and atomically (a local write goes to a ``*.partial`` temporary file that
is renamed into place; an S3 PUT is atomic), so a crash leaves at worst a stray ``*.partial`` file, which no reader
opens and the unit's next writer deletes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from infra import storage
from stages.cache import layout
from stages.cache.chunk_read import UnitChunkReader, direct_reader
from stages.cache.codecs import decode_all, encode_all
from stages.cache.errors import UnitIncompleteError, no_space_guard
from stages.cache.failures import FAILURES_DIR, FailureRecord, failures_parquet, gather_failures
from stages.cache.layout import ARRAYS, TargetBatch, array_shapes, create_arrays, gather_rows, raw_bytes_per_view
from stages.cache.leases import UnitClaims
from stages.cache.local_tier import LocalCacheSettings, LocalTier
from stages.cache.spec import ATTR_NAME, CacheFormatError, CacheSpec, check_compatible

logger = logging.getLogger(__name__)

_WRITE_CONFIG = {"write_empty_chunks": True}
# Marker fields that describe one run (wall-clock timings), not the unit's content; everything else is deterministic.
RUN_SPECIFIC_MARKER_FIELDS = ("seconds", "timings")


@dataclass(frozen=True)
class CacheSummary:
    """Sizes of the completed part of a cache (bytes are stored object bytes vs decoded array bytes)."""

    n_units: int
    units_complete: int
    images_complete: int
    raw_bytes: int
    stored_bytes: int
    raw_bytes_per_view: int
    stored_bytes_per_view: float
    compression_ratio: float


def _read_spec(url: str) -> CacheSpec | None:
    try:
        meta = json.loads(storage.read_bytes(storage.join(url, "zarr.json")))
    except FileNotFoundError:
        return None
    attrs = meta.get("attributes", {}).get(ATTR_NAME)
    if attrs is None:
        return None
    spec = CacheSpec.from_attrs(attrs)
    if attrs.get("key") != spec.key:
        raise CacheFormatError(f"{url}: stored key {attrs.get('key')} does not match its own fields ({spec.key})")
    return spec


def create_or_open(url: str, spec: CacheSpec, compressor: str = "shuffle") -> TargetCache:
    """Create the cache at ``url`` for ``spec``, or open it if it exists with the same key.

    ``compressor`` (one of :data:`COMPRESSORS`) applies only when creating; it is lossless and not in the key.

    Call it once from the coordinator before fanning out writers (creation writes shared metadata objects);
    writers then call :func:`open_cache` with ``read_only=False``. An existing cache keeps its own layout
    (``unit_size``) and location fields; differences there are logged, not refused.

    Raises:
        CacheMismatchError: the cache exists with a different key; the message names every differing field.
    """
    existing = _read_spec(url)
    if existing is None:
        with no_space_guard(url, "creating it"):
            create_arrays(url, spec, compressor)
        return TargetCache(url, spec, read_only=False)
    check_compatible(url, existing, spec)
    return TargetCache(url, existing, read_only=False)


def open_cache(url: str, expected: CacheSpec | None = None, read_only: bool = True,
               local_cache: LocalCacheSettings | None = None) -> TargetCache:
    """Open an existing cache; with ``expected``, refuse it unless the keys agree. ``local_cache`` (readers): serve
    the complete units' data objects from a node-local directory and count the bytes read
    (:mod:`stages.cache.local_tier`).

    Raises:
        FileNotFoundError: no cache at ``url``.
        CacheMismatchError: ``expected`` given and different.
    """
    existing = _read_spec(url)
    if existing is None:
        raise FileNotFoundError(f"no target cache at {url}")
    if expected is not None:
        check_compatible(url, existing, expected)
    return TargetCache(url, existing, read_only=read_only, local_cache=local_cache)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class TargetCache(UnitClaims):
    """An open target cache. Cheap to construct; open one per process (stores are not fork-safe).

    Attributes:
        url: root URL of the cache.
        spec: the spec stored in the cache.
        read_only: whether writes are refused.
        local: the node-local tier and byte counters (:class:`~stages.cache.local_tier.LocalTier`), or None.
    """

    def __init__(self, url: str, spec: CacheSpec, read_only: bool = True,
                 local_cache: LocalCacheSettings | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.spec = spec
        self.read_only = read_only
        store = storage.zarr_store(self.url, read_only=read_only)
        self.local = None if local_cache is None else LocalTier(self.url, spec, store, local_cache)
        self._group = zarr.open_group(store if self.local is None else self.local.store, mode="r" if read_only
                                      else "r+", zarr_format=3)
        # The STORED arrays (a quantised codec adds scale/offset arrays); reads decode them (:mod:`.codecs`).
        self._arrays = {name: self._group[name].with_config(_WRITE_CONFIG) for name in layout.stored_shapes(spec)}
        # readers decode the chunks themselves (:mod:`.chunk_read`); writers' handles read through zarr
        self._direct = {name: direct_reader(a) for name, a in self._arrays.items()} if read_only else {}
        if self.local is not None:
            self.local.attach(self, self._arrays)

    @property
    def unit_size(self) -> int:
        """U: images per work unit (and per shard)."""
        return self.spec.unit_size

    @property
    def n_units(self) -> int:
        """Number of work units, ceil(N / U)."""
        return -(-self.spec.n_images // self.unit_size)

    def unit_range(self, unit_id: int) -> range:
        """Image indices of unit ``unit_id``."""
        if not 0 <= unit_id < self.n_units:
            raise IndexError(f"unit {unit_id} out of range [0, {self.n_units})")
        return range(unit_id * self.unit_size, min((unit_id + 1) * self.unit_size, self.spec.n_images))

    def unit_objects(self, unit_id: int) -> list[str]:
        """Keys (relative to the cache root) of every object unit ``unit_id`` writes, marker last."""
        keys = []
        for name, arr in self._arrays.items():
            keys.append(f"{name}/{arr.metadata.encode_chunk_key((unit_id,) + (0,) * (arr.ndim - 1))}")
        return [*keys, f"{FAILURES_DIR}/{unit_id}.parquet", f"units/{unit_id}.done"]

    def _marker_url(self, unit_id: int) -> str:
        return storage.join(self.url, "units", f"{unit_id}.done")

    def complete_units(self) -> list[int]:
        """Sorted ids of units whose marker exists (their data is durable)."""
        names = storage.list_objects(storage.join(self.url, "units"))
        return sorted(int(n[: -len(".done")]) for n in names if n.endswith(".done") and "/" not in n)

    def is_complete(self, unit_id: int) -> bool:
        """Whether unit ``unit_id`` has its completion marker."""
        return storage.exists(self._marker_url(unit_id))

    def marker(self, unit_id: int) -> dict[str, Any]:
        """The JSON marker of a complete unit (counts, bytes, seconds, checksums)."""
        try:
            return json.loads(storage.read_bytes(self._marker_url(unit_id)))
        except FileNotFoundError as exc:
            raise UnitIncompleteError(f"{self.url}: unit {unit_id} is not complete") from exc

    def write_unit(
        self,
        unit_id: int,
        features: np.ndarray,
        attn_logits: np.ndarray,
        topk_index: np.ndarray,
        views: np.ndarray,
        valid: np.ndarray,
        failures: Sequence[FailureRecord] = (),
        *,
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Write unit ``unit_id`` (n = its image count) as whole objects, then mark it complete. The targets are
        cast to float16, then stored with the spec's codec (:mod:`stages.cache.codecs`).

        Args:
            unit_id: the unit; its images are :meth:`unit_range`.
            features: (n, V, L, C), cast to float16.
            attn_logits: (n, V, K+1, H, L), cast to float16.
            topk_index: (n, V, K) integer patch indices.
            views: (n, V, 5) integer crop boxes and flips.
            valid: (n,) bool.
            failures: the unit's unreadable images (their rows hold zeros and ``valid`` False).
            overwrite: rewrite a unit that is already complete (its marker is removed first).
            extra: JSON-able fields added to the marker (e.g. the extract stage's timings).
            owner: the claim owner writing; the claim is checked before the data and before the marker.

        Returns:
            The marker written (or, for a complete unit without ``overwrite``, the existing one).

        Raises:
            ClaimLostError: ``owner`` given and the unit's claim is no longer its own.
            CacheFullError: the store ran out of space (the unit stays incomplete).
        """
        if self.read_only:
            raise PermissionError(f"{self.url} is open read-only")
        rows = self.unit_range(unit_id)
        if self.is_complete(unit_id):
            if not overwrite:
                logger.info("%s: unit %d already complete, skipped", self.url, unit_id)
                return self.marker(unit_id)
            storage.delete(self._marker_url(unit_id))
        data = self._coerce(len(rows), features, attn_logits, topk_index, views, valid)
        if owner is not None:
            self.check_claim(unit_id, owner)
        with no_space_guard(self.url, f"writing unit {unit_id}"):
            return self._write_unit_objects(unit_id, rows, data, failures, extra, owner)

    def _write_unit_objects(self, unit_id: int, rows: range, data: dict[str, np.ndarray],
                            failures: Sequence[FailureRecord], extra: dict[str, Any] | None,
                            owner: str | None) -> dict[str, Any]:
        objects = self.unit_objects(unit_id)
        self.remove_partials(unit_id)
        start = time.perf_counter()
        stored = encode_all(self.spec.codec, data)
        for name, arr in self._arrays.items():
            storage.with_retries("write", f"{self.url}/{name}[{rows.start}:{rows.stop}]",
                                 lambda arr=arr, value=stored[name]: arr.__setitem__(slice(rows.start, rows.stop),
                                                                                    value))
        storage.write_bytes(storage.join(self.url, objects[-2]), failures_parquet(failures))
        self._make_durable(objects[:-1])
        marker = {
            "format_version": self.spec.format_version,
            "cache_key": self.spec.key,
            "unit": unit_id,
            "start": rows.start,
            "stop": rows.stop,
            "n_images": len(rows),
            "n_valid": int(data["valid"].sum()),
            "n_failures": len(failures),
            "raw_bytes": len(rows) * self.spec.views_per_image * raw_bytes_per_view(self.spec) + len(rows),
            "stored_bytes": {key: storage.size(storage.join(self.url, key)) for key in objects[:-1]},
            "seconds": round(time.perf_counter() - start, 6),
            "sha256": {name: _sha256(stored[name]) for name in self._arrays},  # of the stored arrays
            **(extra or {}),
        }
        if owner is not None:
            self.check_claim(unit_id, owner)
        storage.write_bytes(self._marker_url(unit_id), json.dumps(marker, sort_keys=True).encode())
        logger.debug("%s: unit %d complete (%d images, %d bytes)", self.url, unit_id, len(rows),
                     sum(marker["stored_bytes"].values()))
        return marker

    def remove_partials(self, unit_id: int) -> list[str]:
        """Delete stray temporary files of unit ``unit_id``'s objects (left by a writer killed mid-write; local
        stores only: an S3 PUT leaves nothing). Call only while holding the unit's claim. Returns the keys removed."""
        if not storage.is_local(self.url):
            return []
        _, root = storage.resolve(self.url)
        removed = []
        for key in self.unit_objects(unit_id):
            parent, _, name = key.rpartition("/")
            folder = Path(root) / parent
            if not folder.is_dir():
                continue
            for pattern in (f"{name}.*.partial", f".{name}.*.partial"):
                for path in folder.glob(pattern):
                    path.unlink(missing_ok=True)
                    removed.append(f"{parent}/{path.name}")
        if removed:
            logger.info("%s: unit %d: removed %d stray temporary file(s)", self.url, unit_id, len(removed))
        return removed

    def _coerce(self, n: int, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, value in zip(ARRAYS, arrays, strict=True):
            shape, dtype = array_shapes(self.spec)[name]
            value = np.asarray(value)
            expected = (n, *shape[1:])
            if value.shape != expected:
                raise ValueError(f"{name}: expected shape {expected}, got {value.shape}")
            out[name] = np.ascontiguousarray(value.astype(dtype, copy=False))
        return out

    def _make_durable(self, keys: list[str]) -> None:
        if not storage.is_local(self.url):
            return
        _, root = storage.resolve(self.url)
        for key in keys:
            storage.fsync_local(f"{root}/{key}")
        for parent in sorted({key.rsplit("/", 1)[0] for key in keys}):
            storage.fsync_local(f"{root}/{parent}")

    def missing_units(self, units: Iterable[int] | None = None) -> list[int]:
        """Sorted ids among ``units`` (default: every unit) that have no completion marker (one listing)."""
        wanted = range(self.n_units) if units is None else units
        return sorted(set(wanted) - set(self.complete_units()))

    def require_complete(self, units: Iterable[int] | None = None, hint: str = "") -> None:
        """Refuse a read of ``units`` (default: every unit) while any of them is incomplete.

        Raises:
            UnitIncompleteError: naming the cache and (the first ten of) the missing units, then ``hint``.
        """
        missing = self.missing_units(units)
        if missing:
            raise UnitIncompleteError(f"{self.url}: units {missing[:10]} are not complete{hint}")

    @property
    def block_size(self) -> int:
        """Images per inner chunk of ``features`` along N: the block size that aligns reads with chunks."""
        return int(self._arrays["features"].chunks[0])

    def valid(self) -> np.ndarray:
        """The (N,) bool ``valid`` array of a complete cache (False where an image could not be read).

        Raises:
            UnitIncompleteError: some unit has no completion marker (its rows would read as invalid).
        """
        self.require_complete(hint="; finish the extraction")
        return np.asarray(self._arrays["valid"][:], dtype=bool)

    def read_unit(self, unit_id: int, check_complete: bool = True) -> TargetBatch:
        """All targets of unit ``unit_id`` (decoded: float16 targets): one whole-object read per array, all V
        views."""
        rows = self.unit_range(unit_id)
        if check_complete:
            self.require_complete([unit_id])
        sel = slice(rows.start, rows.stop)
        got = decode_all(self.spec.codec, {name: arr[sel] for name, arr in self._arrays.items()})
        return TargetBatch(indices=np.arange(rows.start, rows.stop, dtype=np.int64), **got)

    def read_samples(
        self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray | None = None,
        check_complete: bool = True,
    ) -> TargetBatch:
        """Targets of chosen images, in the order given; zarr fetches each needed (inner) chunk once, whole.

        Args:
            indices: (n,) image indices.
            views: (n,) one view per image, or None for all V views.
            check_complete: refuse indices in units without a marker (one listing request).

        Returns:
            A :class:`TargetBatch` (float16 targets, whatever the codec); with ``views`` the view axis is dropped.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.spec.n_images):
            raise IndexError(f"image indices must lie in [0, {self.spec.n_images})")
        if check_complete:
            self.require_complete(np.unique(idx // self.unit_size).tolist())
        if views is None:
            got = {name: gather_rows(arr, idx) for name, arr in self._arrays.items()}
        else:
            vid = np.asarray(views, dtype=np.int64).reshape(-1)
            if vid.shape != idx.shape:
                raise ValueError(f"views has shape {vid.shape}, indices {idx.shape}")
            got = {name: self._pick_views(name, idx, vid) if name != "valid" else self._rows(name, idx)
                   for name in self._arrays}
        return TargetBatch(indices=idx, **decode_all(self.spec.codec, got))

    def _pick_views(self, name: str, idx: np.ndarray, vid: np.ndarray) -> np.ndarray:
        """``array[idx[j], vid[j]]`` for every j, one read per distinct view (only its chunks, each fetched and
        decoded once, whole)."""
        arr = self._arrays[name]
        views = np.unique(vid)
        if (bad := views[(views < 0) | (views >= self.spec.views_per_image)]).size:
            raise IndexError(f"view {bad[0]} out of range [0, {self.spec.views_per_image})")
        direct = self._direct.get(name)
        if direct is not None:  # a ShardReader, or a UnitChunkReader: the same call
            return direct.rows_of(idx, vid)
        out = np.empty((idx.size, *arr.shape[2:]), dtype=arr.dtype)
        for v in views:
            at = np.flatnonzero(vid == v)
            out[at] = gather_rows(arr, idx[at], int(v))
        return out

    def _rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        """``array[idx]`` of an array without a view axis (``valid``)."""
        direct = self._direct.get(name)
        return direct.rows_of(idx) if isinstance(direct, UnitChunkReader) else gather_rows(self._arrays[name], idx)

    def failures(self) -> pa.Table:
        """The failures of every complete unit, one table (columns index, uri, reason, message)."""
        return gather_failures(self.url, self.complete_units())

    def summary(self) -> CacheSummary:
        """Stored vs raw bytes of the complete units (one listing of the cache)."""
        done = self.complete_units()
        sizes = storage.list_objects(self.url)
        stored = sum(sizes.get(key, 0) for u in done for key in self.unit_objects(u)[:-2])
        images = sum(len(self.unit_range(u)) for u in done)
        per_view = raw_bytes_per_view(self.spec)
        raw = images * (self.spec.views_per_image * per_view + 1)
        views = images * self.spec.views_per_image
        return CacheSummary(
            n_units=self.n_units, units_complete=len(done), images_complete=images, raw_bytes=raw,
            stored_bytes=stored, raw_bytes_per_view=per_view,
            stored_bytes_per_view=stored / views if views else 0.0,
            compression_ratio=raw / stored if stored else 0.0,
        )
