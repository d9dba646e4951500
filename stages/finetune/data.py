"""The labelled images of a fine-tuning run: which sample each rank sees when, and its pixels.

Everything random is a pure function of the job's seed, so a resumed run sees exactly what an uninterrupted one
saw: the order of epoch e is a permutation drawn from ``SeedSequence([seed, e])``; global batch s of the epoch is
``order[s·B:(s+1)·B]`` (the last incomplete batch dropped), rank r trains its contiguous slice of it. The training
view of image i in epoch e is view ``e`` of :func:`stages.views.plan_view` (RandomResizedCrop box + horizontal
flip, a counter-based draw of (seed, i, e)) turned into pixels by :func:`stages.views.build_view`, the function
the pre-training views use. Test views are the central square of side ``eval_crop · min(H, W)`` resized to the
output size (MAE's resize-to-256 / centre-crop-224 at ``eval_crop = 0.875``), through the same function.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stages.images import ImageSource
from stages.manifest import expected_sizes
from stages.uri_policy import UriPolicy
from stages.views import Preprocess, plan_view


@dataclass(frozen=True)
class Split:
    """A labelled split as plain lists (travels to loader processes): URIs, labels, recorded source sizes."""

    uris: list[str]
    labels: np.ndarray  # int64 (N,)
    sizes: list[int | None]

    @classmethod
    def of(cls, table: pa.Table, labels: np.ndarray) -> Split:
        return cls(table.column("uri").to_pylist(), labels, expected_sizes(table) if "size" in table.column_names
                   else [None] * table.num_rows)

    def __len__(self) -> int:
        return len(self.uris)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation of 0..n-1, a pure function of (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of an epoch: whole global batches only (MAE's ``drop_last``)."""
    return n // batch_size


def centre_box(height: int, width: int, crop: float) -> np.ndarray:
    """The test view's box: the central square of side ``round(crop · min(H, W))``, unflipped; int32 (5,)."""
    side = max(1, round(crop * min(height, width)))
    return np.array([(height - side) // 2, (width - side) // 2, side, side, 0], dtype=np.int32)


class TrainBatches(IterableDataset):
    """One rank's training batches from step ``start`` of epoch ``epoch`` to the end of epoch ``until - 1``.

    One dataset spans the epochs, so a loader's worker processes start once per run, not once per epoch. Loader
    worker k of n yields the run's batches k, k + n, …, which a DataLoader hands out round-robin: in step order.
    Images are read under ``policy`` (default: the default input policy).
    Yields dicts: ``epoch`` and ``step`` (ints, the step within its epoch), ``pixels`` float32 (b, C, S, S),
    ``labels`` int64 (b,), ``indices`` int64 (b,), with b = ``batch_size / world``.
    """

    def __init__(self, split: Split, preprocess: Preprocess, *, in_chans: int, batch_size: int, world: int,
                 rank: int, epoch: int, start: int, seed: int, crop_scale: tuple[float, float],
                 crop_ratio: tuple[float, float], until: int | None = None, policy: UriPolicy | None = None) -> None:
        per_epoch = steps_per_epoch(len(split), batch_size)
        until = epoch + 1 if until is None else until
        if not 0 <= start <= per_epoch or not 0 <= epoch <= until:
            raise ValueError(f"fine-tune batches: step {start} of epoch {epoch} until epoch {until} is out of range "
                             f"({per_epoch} steps an epoch)")
        self.split, self.preprocess, self.in_chans = split, preprocess, in_chans
        self.batch, self.per_rank, self.rank = batch_size, batch_size // world, rank
        self.per_epoch, self.first, self.stop = per_epoch, epoch * per_epoch + start, until * per_epoch
        self.seed, self.crop_scale, self.crop_ratio, self.policy = seed, crop_scale, crop_ratio, policy

    def __len__(self) -> int:
        """Batches this dataset yields over all DataLoader workers."""
        return max(0, self.stop - self.first)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        source, orders = ImageSource(self.in_chans, policy=self.policy), {}
        for g in range(self.first + worker, self.stop, n_workers):
            epoch, step = divmod(g, self.per_epoch)
            if epoch not in orders:
                orders = {epoch: epoch_order(self.seed, epoch, len(self.split))}
            lo = step * self.batch + self.rank * self.per_rank
            indices = orders[epoch][lo:lo + self.per_rank]
            images = [source.read(self.split.uris[i], self.split.sizes[i]) for i in indices]
            boxes = np.stack([plan_view(self.seed, int(i), epoch, img.shape[0], img.shape[1], self.crop_scale,
                                        self.crop_ratio) for i, img in zip(indices, images, strict=True)])
            yield {"epoch": epoch, "step": step, "pixels": self.preprocess.build_batch(images, boxes),
                   "labels": torch.from_numpy(self.split.labels[indices]), "indices": torch.from_numpy(indices)}


def eval_batches(split: Split, preprocess: Preprocess, *, in_chans: int, crop: float, batch_size: int, rank: int,
                 world: int, policy: UriPolicy | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous share of the test split as (pixels (b, C, S, S), labels (b,)) centre views, read
    under ``policy`` (default: the default input policy)."""
    source = ImageSource(in_chans, policy=policy)
    share = np.array_split(np.arange(len(split)), world)[rank]
    for lo in range(0, len(share), batch_size):
        indices = share[lo:lo + batch_size]
        images = [source.read(split.uris[i], split.sizes[i]) for i in indices]
        boxes = np.stack([centre_box(img.shape[0], img.shape[1], crop) for img in images])
        yield preprocess.build_batch(images, boxes), torch.from_numpy(split.labels[indices])
