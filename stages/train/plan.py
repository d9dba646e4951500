"""The train stage's sample plan: which sample each rank sees when, a pure function of its fields.

**Epoch order**: a pure function of ``(seed, epoch)``, identical on every
rank and machine. Images are grouped in blocks of ``block_size`` consecutive indices (block b = images
``[b·bs, (b+1)·bs)``, aligned with the cache's inner chunks along N, see :attr:`TargetCache.block_size`). Random numbers
come from a Philox4x64 bit generator whose key is derived by ``SeedSequence((domain, seed, epoch))``; only its raw
64-bit outputs are used (permutations are ``argsort`` of random keys, stable), so no numpy ``Generator`` algorithm and
no global RNG state is involved. Then:

1. permute the blocks (the first ``n_blocks`` raw outputs are the blocks' sort keys);
2. concatenate the blocks' valid indices in that order (ascending within a block);
3. shuffle the samples within each window of ``shuffle_window`` consecutive permuted blocks (the next ``n_valid``
   raw outputs are the samples' sort keys within their window);
4. truncate to ``steps_per_epoch · global_batch`` (drop_last, as MAE): the last incomplete global batch of an epoch
   is skipped, fewer than ``global_batch`` samples, different ones every epoch.

Global batch ``s`` is ``order[s·GB:(s+1)·GB]``; rank r takes the contiguous slice ``[r·B:(r+1)·B]``, B = GB / world.
Resume = rebuild the order and start at the checkpoint's step; keep the global batch fixed across a resume.

**Views.** Image i uses view ``(epoch + offset(block of i)) mod V`` in an epoch, ``offset`` a pure function of
``(seed, block)``: every image sees each of its V views once in V consecutive epochs, and an epoch reads one view
chunk per block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from stages.cache.spec import CacheMismatchError, CacheSpec, expected_differences
from stages.views import Preprocess

_ORDER_DOMAIN = 0x7EC0_0001  # separates the order stream from the view-offset stream
_VIEW_DOMAIN = 0x7EC0_0002


def _philox(*words: int) -> np.random.Philox:
    """A Philox4x64 bit generator keyed by ``SeedSequence(words)`` (stable across numpy versions)."""
    return np.random.Philox(key=np.random.SeedSequence(list(words)).generate_state(2, np.uint64))


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """Which sample each rank sees at each step of each epoch: a pure function of its fields.

    Attributes:
        valid: (N,) bool; invalid samples are never served.
        block_size: images per read block (the cache's inner chunk size along N; any size in online mode).
        views_per_image: V.
        seed: order seed (≥ 0).
        global_batch: samples per optimiser step over all ranks (before any gradient-accumulation split).
        world_size: number of ranks.
        shuffle_window: blocks whose samples are shuffled together.
    """

    valid: np.ndarray
    block_size: int
    views_per_image: int
    seed: int
    global_batch: int
    world_size: int
    shuffle_window: int = 8
    _orders: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        valid = np.asarray(self.valid)
        if valid.ndim != 1 or valid.dtype != np.bool_:
            raise ValueError(f"valid must be a 1-D bool array, got {valid.dtype} {valid.shape}")
        valid = valid.copy()
        valid.flags.writeable = False
        object.__setattr__(self, "valid", valid)
        for name in ("block_size", "views_per_image", "global_batch", "world_size", "shuffle_window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.global_batch % self.world_size:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of world_size {self.world_size}")
        if self.steps_per_epoch() < 1:
            raise ValueError(f"n_valid = {self.n_valid} samples give no complete global batch of "
                             f"global_batch = {self.global_batch}: lower global_batch or add data")

    def __getstate__(self) -> dict:
        """Pickle without the per-epoch order cache (rebuilt on demand by the receiver)."""
        return {**self.__dict__, "_orders": {}}

    @property
    def n_valid(self) -> int:
        """Number of valid samples."""
        return int(self.valid.sum())

    @property
    def n_blocks(self) -> int:
        """ceil(N / block_size)."""
        return -(-self.valid.size // self.block_size)

    @property
    def batch_per_rank(self) -> int:
        """B = global_batch // world_size."""
        return self.global_batch // self.world_size

    def steps_per_epoch(self) -> int:
        """floor(n_valid / global_batch): the last incomplete global batch of an epoch is skipped (drop_last)."""
        return self.n_valid // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The served image indices of ``epoch``, in order (algorithm in the module docstring).

        Returns:
            int64 (steps_per_epoch·global_batch,), read-only, valid indices only, each at most once.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch not in self._orders:
            # two epochs at a time (the order can be large): the one served and the next, which the local cache's
            # read-ahead asks for over an epoch's last steps, so neither is rebuilt at every one of them
            while len(self._orders) >= 2:
                del self._orders[max(self._orders, key=lambda e: abs(e - epoch))]
            self._orders[epoch] = self._build_order(epoch)
        return self._orders[epoch]

    def _build_order(self, epoch: int) -> np.ndarray:
        bits = _philox(_ORDER_DOMAIN, self.seed, epoch)
        block_rank = np.empty(self.n_blocks, np.int64)
        block_rank[np.argsort(bits.random_raw(self.n_blocks), kind="stable")] = np.arange(self.n_blocks)
        idx = np.flatnonzero(self.valid).astype(np.int64)
        pos = block_rank[idx // self.block_size]
        concat = idx[np.argsort(pos, kind="stable")]
        window = np.sort(pos) // self.shuffle_window
        keys = bits.random_raw(concat.size)
        order = concat[np.lexsort((keys, window))][: self.steps_per_epoch() * self.global_batch]
        order.flags.writeable = False
        return order

    @functools.cached_property
    def _view_offsets(self) -> np.ndarray:
        raw = _philox(_VIEW_DOMAIN, self.seed).random_raw(self.n_blocks)
        return (raw % np.uint64(self.views_per_image)).astype(np.int64)

    def views_for(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """View of each image in ``epoch``: ``(epoch + offset(block)) mod V``; int64 (n,) for (n,) indices."""
        idx = np.asarray(indices, dtype=np.int64)
        return (epoch + self._view_offsets[idx // self.block_size]) % self.views_per_image

    def rank_batch(self, epoch: int, step: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank ``rank``'s share of global batch ``step`` of ``epoch``.

        Returns:
            (indices, views): int64 (B,) each, B = global_batch // world_size.
        """
        if not 0 <= step < self.steps_per_epoch():
            raise IndexError(f"step {step} out of range [0, {self.steps_per_epoch()})")
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range [0, {self.world_size})")
        start = step * self.global_batch + rank * self.batch_per_rank
        idx = self.epoch_order(epoch)[start : start + self.batch_per_rank].copy()
        return idx, self.views_for(epoch, idx)


def block_rows(plan: SamplePlan, block: int) -> range:
    """The image indices of ``block`` (the last block may be short)."""
    return range(block * plan.block_size, min((block + 1) * plan.block_size, plan.valid.size))


def check_plan_fits_cache(url: str, spec: CacheSpec, plan: SamplePlan, preprocess: Preprocess, in_chans: int,
                          view_seed: int | None) -> None:
    """Refuse a cache whose shapes, views or preprocessing differ from a plan's (names every field).

    :func:`stages.train.run.run_train` checks the whole job once (:func:`stages.train.job.check_cache`) before any
    worker starts and its workers pass the checked spec to :class:`TrainBatches`; this is the check of a
    :class:`TrainBatches` built on its own (tests, benchmarks).
    """
    expected = {"n_images": plan.valid.size, "views_per_image": plan.views_per_image,
                "timm_kwargs": {**spec.timm_kwargs, "in_chans": in_chans}, **preprocess.to_dict()}
    if view_seed is not None:
        expected["view_seed"] = view_seed
    if diffs := expected_differences(spec, **expected):
        raise CacheMismatchError(url, diffs)
