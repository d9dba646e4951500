"""The train stage's data side: the batches each rank reads, as the sample plan (:mod:`stages.train.plan`) orders them.

**Reading** (cached mode). Each batch issues at most ONE :meth:`TargetCache.read_samples` call, for the whole
blocks it needs that are not already held; a small per-process LRU of decoded blocks (2·``shuffle_window`` blocks)
serves the rest. Read amplification, honestly: zarr fetches and decodes whole inner chunks. When a rank's batch
B is at least a window (``shuffle_window·block_size`` samples), a window lies inside one rank's batch and every
chunk is fetched about once. When B is smaller, a window's samples are spread over several ranks (and DataLoader
workers), each of which fetches every chunk it touches: with the LRU, decoded bytes fetched are about
``world_size × num_workers`` times the bytes delivered (without it, up to ``min(block_size, window/B)``×), plus
the invalid and epoch-skipped rows of fetched blocks. Examples (:func:`fetch_amplification`, one worker per rank):
N = 1.28 M, block 16, GB 4096 on 8 ranks: 1.006; N = 20 k, block 16, GB 64 on 2 ranks: 2.0.
:func:`fetch_amplification` computes the exact factor for a plan, and batches report ``bytes_read`` (delivered)
and ``bytes_fetched`` (whole blocks read) so the trainer can log both. ``attn_logits`` inner chunks may hold more
images than a block (e.g. 64 vs 16 for ViT-B): blocks of one chunk can use different views, so that smaller array
(≈20 % of the bytes) can be fetched up to V times per epoch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infra import storage
from stages.cache import open_cache, raw_bytes_per_view
from stages.cache.local_tier import LocalCacheSettings
from stages.cache.spec import CacheSpec
from stages.images import ImageSource
from stages.manifest import expected_sizes, read_manifest
from stages.train.plan import SamplePlan, block_rows, check_plan_fits_cache
from stages.uri_policy import UriPolicy
from stages.views import Preprocess

__all__ = ["SamplePlan", "TrainBatches", "check_plan_fits_cache", "fetch_amplification", "make_loader"]

logger = logging.getLogger(__name__)

_TARGETS = ("features", "attn_logits", "topk_index", "views", "valid")
_PREFETCH_STEPS = 2  # this worker's next steps whose local-cache objects are fetched in the background


class _BlockLRU:
    """Which blocks a batch must fetch, given the ``capacity`` most recently used ones are held (each block maps to
    the :class:`_Fetched` read that holds it, or None where only the accounting matters)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: OrderedDict[int, _Fetched | None] = OrderedDict()

    def missing(self, blocks: np.ndarray) -> list[int]:
        return [int(b) for b in np.unique(blocks) if int(b) not in self.held]

    def admit(self, blocks: np.ndarray, data: dict[int, _Fetched | None]) -> None:
        for b in np.unique(blocks).tolist():
            self.held[b] = data[b] if b in data else self.held[b]
            self.held.move_to_end(b)
        while len(self.held) > self.capacity:
            self.held.popitem(last=False)


@dataclass(frozen=True)
class _Fetched:
    """One read of whole blocks: its rows sorted by their position in the epoch order (rows the epoch does not
    serve last), so every batch that lies wholly inside one read is a contiguous slice of it.

    Attributes:
        keys: int64 (n,) ascending, the rows' sort keys (epoch position; ``order size + row`` when not served).
        arrays: the targets of those rows in that order, (n, ...) each, as :data:`_TARGETS`.
    """

    keys: np.ndarray
    arrays: dict[str, np.ndarray]


def fetch_amplification(plan: SamplePlan, epoch: int = 0, num_workers: int = 1) -> float:
    """Images fetched (whole blocks) / images delivered over one epoch and all ranks, as :class:`TrainBatches` reads.

    1.0 means every block is read once; expect up to about ``world_size·num_workers`` (module docstring).
    """
    fetched = 0
    for rank in range(plan.world_size):
        for worker in range(num_workers):
            lru = _BlockLRU(2 * plan.shuffle_window)
            for step in range(worker, plan.steps_per_epoch(), num_workers):
                blocks = plan.rank_batch(epoch, step, rank)[0] // plan.block_size
                missing = lru.missing(blocks)
                fetched += sum(len(block_rows(plan, b)) for b in missing)
                lru.admit(blocks, dict.fromkeys(missing))
    return fetched / (plan.steps_per_epoch() * plan.global_batch)


class TrainBatches(IterableDataset):
    """Yields this rank's batches from step ``start_step`` of ``epoch`` on, as dicts of tensors: to the end of that
    epoch, or across epochs up to ``until`` (one DataLoader, and one set of worker processes, for a whole run).

    Every batch has ``epoch`` and ``step`` (ints, the step within its epoch), ``indices`` int64 (B,), ``views``
    int64 (B,), ``boxes`` int32 (B, 5) (crop top, left, height, width, flip) and ``pixels`` float32 (B, C, S, S).
    Cached mode (``cache_url``) adds the stored targets ``features`` float16 (B, L, C_base), ``attn_logits``
    float16 (B, K_max+1, H, L), ``topk_index`` int64 (B, K_max), ``bytes_read`` (decoded target bytes delivered) and
    ``bytes_fetched`` (decoded bytes of the whole blocks read for this batch; 0 when all were held),
    ``object_store_bytes`` and ``local_cache_bytes`` (bytes this process read from the cache's store and from the
    node-local cache since its previous batch); pixels are rebuilt from the STORED boxes. Online mode plans the boxes
    with ``preprocess.plan(view_seed, ...)`` (identical to the cache's rows by construction).

    Stores and filesystems are opened inside the iterating process, once for all its epochs. Steps are counted
    globally, ``g = epoch · steps_per_epoch + step``: with several DataLoader workers, worker w yields ``g0 + w,
    g0 + w + nw, ...`` and the DataLoader interleaves them back in order.

    Args:
        plan: the sample plan.
        epoch: the epoch to serve.
        rank: this rank.
        start_step: first global step to serve (resume position; 0 for a fresh epoch).
        manifest_url: the Parquet manifest (image URIs).
        preprocess: view preprocessing; must match the cache's.
        in_chans: model input channels (1 or 3).
        cache_url: the target cache (cached mode), or None (online mode).
        view_seed: the view-plan seed; required online, checked against the cache if given.
        uri_policy: which source URIs may be read and how much of them (default: the default policy).
        checked_spec: the cache's spec as the caller already checked it against this plan (the training workers:
            :func:`stages.train.run.run_train` checks once before they start); None: the cache is opened and checked
            here (:func:`check_plan_fits_cache`).
        local_cache: the node-local cache of a remote cache's objects (:mod:`stages.cache.local_tier`; None or no
            ``dir``: off, bytes still counted).
        until: the global step to stop before (``epochs · steps_per_epoch`` for a whole run; at least the start);
            None: the end of ``epoch``.
    """

    def __init__(self, plan: SamplePlan, epoch: int, rank: int, start_step: int, *, manifest_url: str,
                 preprocess: Preprocess, in_chans: int, cache_url: str | None = None,
                 view_seed: int | None = None, uri_policy: UriPolicy | None = None,
                 checked_spec: CacheSpec | None = None, local_cache: LocalCacheSettings | None = None,
                 until: int | None = None) -> None:
        super().__init__()
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} out of range [0, {plan.world_size})")
        if not 0 <= start_step <= plan.steps_per_epoch() or epoch < 0:
            raise ValueError(f"start_step {start_step} / epoch {epoch} out of range "
                             f"(steps_per_epoch {plan.steps_per_epoch()})")
        per_epoch = plan.steps_per_epoch()
        first = epoch * per_epoch + start_step
        until = (epoch + 1) * per_epoch if until is None else until
        if until < first:
            raise ValueError(f"until {until} is before the first step {first} (epoch {epoch}, step {start_step})")
        if cache_url is None and view_seed is None:
            raise ValueError("online mode (no cache_url) needs view_seed")
        if cache_url is not None and checked_spec is None:
            cache = open_cache(cache_url)
            check_plan_fits_cache(cache_url, cache.spec, plan, preprocess, in_chans, view_seed)
            if plan.block_size % cache.block_size:
                logger.warning("block_size %d is not a multiple of the cache's inner chunk (%d images): reads "
                               "fetch more than they deliver", plan.block_size, cache.block_size)
        self.plan, self.epoch, self.rank, self.start_step = plan, epoch, rank, start_step
        self.first, self.until = first, until
        self.manifest_url, self.preprocess, self.in_chans = manifest_url, preprocess, in_chans
        self.cache_url, self.view_seed, self.uri_policy = cache_url, view_seed, uri_policy
        self.local_cache = local_cache

    def __len__(self) -> int:
        """Batches this dataset yields over all DataLoader workers."""
        return self.until - self.first

    def __iter__(self):
        """Yield batch dicts (see the class docstring) for this worker's steps, in increasing order."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        reader = _Reader(self)
        per_epoch = self.plan.steps_per_epoch()
        steps = range(self.first + worker, self.until, n_workers)
        for i, g in enumerate(steps):
            reader.prefetch(steps[i + 1 : i + 1 + _PREFETCH_STEPS])
            epoch, step = divmod(g, per_epoch)
            reader.set_epoch(epoch)
            yield reader.batch(step)


class _Reader:
    """Per-process resources of a :class:`TrainBatches` iteration: manifest URIs, image source, cache, block LRU."""

    def __init__(self, ds: TrainBatches) -> None:
        self.ds, self.plan = ds, ds.plan
        table, _ = read_manifest(ds.manifest_url, storage.storage_options(storage.protocol_of(ds.manifest_url)))
        self.uris: list[str] = table.column("uri").to_pylist()
        # Each source's size as the manifest recorded it: an image that changed since is refused, not paired with
        # targets of its old pixels (SourceChangedError naming it).
        self.sizes = expected_sizes(table)
        first = self.uris[0] if self.uris else ""
        self.source = ImageSource(ds.in_chans, storage.storage_options(storage.protocol_of(first)))
        if ds.uri_policy is not None:
            self.source = self.source.with_policy(ds.uri_policy)
        self.cache = (open_cache(ds.cache_url, local_cache=LocalCacheSettings.of(ds.local_cache))
                      if ds.cache_url is not None else None)
        self._io = (0, 0)  # (store, local cache) bytes counted so far
        self.epoch = -1
        self.set_epoch(ds.epoch)
        if self.cache is not None:  # complete: the plan's valid rows come from TargetCache.valid(), which checks it
            self.bytes_per_view = raw_bytes_per_view(self.cache.spec)

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` from now on: its order, and an empty block LRU (held blocks are another epoch's views)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.lru = _BlockLRU(2 * self.plan.shuffle_window)
            self._epoch_position: np.ndarray | None = None

    def prefetch(self, steps: range) -> None:
        """Fetch the local cache's objects of global ``steps`` (this worker's next ones) on a background thread."""
        if self.cache is not None and self.cache.local.enabled:
            for g in steps:
                epoch, step = divmod(g, self.plan.steps_per_epoch())
                self.cache.local.prefetch(g, self.plan.rank_batch(epoch, step, self.ds.rank)[0])

    def _io_since_last(self, step: int) -> dict[str, int]:
        """Bytes read from the store and from the local cache since the previous batch (``step``'s prefetch
        settled first, so every fetch lands in some batch)."""
        self.cache.local.settle(self.epoch * self.plan.steps_per_epoch() + step)
        now = self.cache.local.counters()
        store, local = (a - b for a, b in zip(now, self._io, strict=True))
        self._io = now
        return {"object_store_bytes": store, "local_cache_bytes": local}

    def batch(self, step: int) -> dict[str, object]:
        """This rank's batch of step ``step`` of the current epoch (:meth:`set_epoch`), as the class describes."""
        idx, views = self.plan.rank_batch(self.epoch, step, self.ds.rank)
        images = [self.source.read(self.uris[i], expected_size=self.sizes[i]) for i in idx.tolist()]
        out: dict[str, object] = {"epoch": self.epoch, "step": step, "indices": torch.from_numpy(idx),
                                  "views": torch.from_numpy(views)}
        if self.cache is None:
            boxes = np.stack([self.ds.preprocess.plan(self.ds.view_seed, i, v, *img.shape[:2]) for i, v, img
                              in zip(idx.tolist(), views.tolist(), images, strict=True)])
        else:
            targets, fetched = self._targets(idx)
            out.update(self._io_since_last(step))
            boxes = targets["views"]
            out.update(features=torch.from_numpy(targets["features"]),
                       attn_logits=torch.from_numpy(targets["attn_logits"]),
                       topk_index=torch.from_numpy(targets["topk_index"].astype(np.int64)),
                       bytes_read=idx.size * self.bytes_per_view, bytes_fetched=fetched)
        out["boxes"] = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.int32))
        out["pixels"] = self.ds.preprocess.build_batch(images, boxes)
        return out

    def _positions(self) -> np.ndarray:
        """int64 (N,): each image's position in this epoch's order, -1 where the epoch does not serve it."""
        if self._epoch_position is None:
            order = self.plan.epoch_order(self.epoch)
            self._epoch_position = np.full(self.plan.valid.size, -1, np.int64)
            self._epoch_position[order] = np.arange(order.size)
        return self._epoch_position

    def _fetch(self, missing: list[int]) -> _Fetched:
        """ONE read of the whole ``missing`` blocks (their epoch views), rows in epoch-order position."""
        rows = np.concatenate([np.arange(r.start, r.stop) for r in (block_rows(self.plan, b) for b in missing)])
        pos = self._positions()[rows]
        keys = np.where(pos >= 0, pos, self.plan.valid.size + rows)
        sort = np.argsort(keys, kind="stable")
        rows, keys = rows[sort], keys[sort]
        got = self.cache.read_samples(rows, views=self.plan.views_for(self.epoch, rows), check_complete=False)
        return _Fetched(keys, {name: getattr(got, name) for name in _TARGETS})

    def _targets(self, idx: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Rows of ``idx`` (their epoch views) from held blocks plus ONE read of the missing whole blocks.

        A batch whose rows all lie in one read is a slice of it (no copy); otherwise each read's rows (a contiguous
        run of it) are copied into place once.
        """
        blocks = idx // self.plan.block_size
        missing = self.lru.missing(blocks)
        data: dict[int, _Fetched | None] = {}
        fetched = 0
        if missing:
            record = self._fetch(missing)
            fetched = record.keys.size * self.bytes_per_view
            data = dict.fromkeys(missing, record)
        unique, block_of = np.unique(blocks, return_inverse=True)
        records = [data[b] if b in data else self.lru.held[b] for b in unique.tolist()]
        pos = self._positions()[idx]
        distinct = list({id(r): r for r in records}.values())
        if len(distinct) == 1:
            out = self._rows_of(distinct[0], pos, idx)
        else:
            record_of = np.array([next(k for k, r in enumerate(distinct) if r is rec) for rec in records])[block_of]
            out = {name: np.empty((idx.size, *a.shape[1:]), a.dtype) for name, a in distinct[0].arrays.items()}
            for k, record in enumerate(distinct):
                at = np.flatnonzero(record_of == k)
                for name, part in self._rows_of(record, pos[at], idx[at]).items():
                    out[name][at] = part
        if not out["valid"].all():
            raise ValueError(f"samples {idx[~out['valid']].tolist()} are invalid in the cache but valid in the plan")
        self.lru.admit(blocks, data)
        return out, fetched

    @staticmethod
    def _rows_of(record: _Fetched, pos: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at epoch positions ``pos`` (ascending) of ``record``: a view when they are contiguous there."""
        src = np.searchsorted(record.keys, pos)
        if src.size and (src[-1] >= record.keys.size or not np.array_equal(record.keys[src], pos)):
            raise RuntimeError(f"reader: samples {idx.tolist()} are not where their block's read put them")
        if src.size and src[-1] - src[0] == src.size - 1:
            return {name: a[src[0] : src[-1] + 1] for name, a in record.arrays.items()}
        return {name: a[src] for name, a in record.arrays.items()}


def make_loader(dataset: IterableDataset, num_workers: int = 1, prefetch: int = 2,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``'s ready-made batches; workers use ``spawn`` and read ahead.

    Args:
        dataset: ready-made batches whose worker k of n yields batches k, k + n, … (this module's and
            :mod:`stages.finetune.data`'s ``TrainBatches``), so the loader serves them in order.
        num_workers: reader processes (0: read in this process, for tests and debugging).
        prefetch: batches each worker reads ahead (``prefetch_factor``), so reading overlaps compute.
        pin_memory: pin batches in page-locked memory (when feeding a CUDA device, so ``non_blocking`` copies
            overlap compute).
    """
    if num_workers == 0:
        return DataLoader(dataset, batch_size=None, num_workers=0, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, multiprocessing_context="spawn",
                      prefetch_factor=prefetch, pin_memory=pin_memory)
