"""What a fine-tuning run is: :class:`FinetuneJob`, its protocol presets, and the checks on its labelled data.

The recipes (docs/finetune.md#1-protocols-and-recipes): ``finetune`` follows the paper's Tab. 10 (MAE's fine-tuning
recipe): AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay, drop path 0.1, label smoothing 0.1, mixup 0.8,
cutmix 1.0, per-step warm-up then cosine; ``peft_both`` takes the same settings (the paper: "the same training
settings as the fully finetuning ... due to more parameters"), without layer decay, whose layers are frozen;
``peft_prompt`` takes the linear probe's (Tab. 11: no mixup, cutmix, smoothing or weight decay), with AdamW at blr
1e-2 where Tab. 11 has LARS at blr 0.1 (batch 16384). Epochs and batch sizes are the job's: the defaults are for tiny
data sets, the replication chooses its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from infra import storage
from stages.train.job import fingerprinted
from stages.uri_policy import UriPolicy
from stages.views import Preprocess

PROTOCOLS = ("finetune", "peft_prompt", "peft_both")
POOLS = ("avg", "token")
# Fields each protocol sets unless the caller does (the dataclass defaults are ``finetune``'s).
PRESETS: dict[str, dict[str, Any]] = {
    "finetune": {},
    "peft_both": {"layer_decay": None, "global_pool": "token"},
    "peft_prompt": {"layer_decay": None, "global_pool": "token", "weight_decay": 0.0, "drop_path": 0.0,
                    "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "blr": 1e-2},
}
# Resources, stopping point and reporting: none changes the trained weights, so they may change across a resume
# (everything else is the run's fingerprint).
MUTABLE_FIELDS = frozenset({
    "run_name", "storage_path", "checkpoint_url", "num_workers", "use_gpu", "threads_per_worker", "loader_workers",
    "stop_after_epochs", "keep_checkpoints", "max_failures", "log_every", "eval_batch_size", "eval_every",
    "uri_policy",
})


class FinetuneInputError(ValueError):
    """Labelled data or a checkpoint that a fine-tuning run cannot use; the message names the field."""


@dataclass(frozen=True)
class FinetuneJob:
    """A fine-tuning run. Plain values only, so it travels to Ray workers as a dict and into the run directory.

    Attributes:
        run_name / storage_path: the run directory ``<storage_path>/<run_name>``; starting the same run again
            resumes it from its latest checkpoint.
        checkpoint_url: the encoder to fine-tune: any format :mod:`tec_model.checkpoint` reads (``finetune``), a
            kept-adapter export (``peft_*``: :func:`tec_model.export.export_with_adapters`).
        checkpoint_key: the entry of a multi-model checkpoint to fine-tune (``teacher``, ``student``, …;
            ``finetune`` only); None: auto-detection.
        uri_policy: the data section's input policy (:class:`stages.uri_policy.UriPolicy` fields; empty: the
            defaults) under which both splits' images are read, as every other stage reads them.
        timm_kwargs: the encoder's ViT kwargs (``num_classes`` / ``global_pool`` / ``drop_path_rate`` are set here).
        protocol: ``finetune`` (every weight), ``peft_prompt`` (input adapter + head on a frozen encoder) or
            ``peft_both`` (both adapters + head).
        num_classes: classes of the head; every label must lie in [0, num_classes).
        preprocess: :class:`stages.views.Preprocess` fields (output size, mean/std, interpolation); the training
            views' crop ranges are ``crop_scale`` / ``crop_ratio`` below, not the pre-training ones.
        epochs / batch_size / blr / min_lr / warmup_epochs: ``lr = blr · batch_size / 256`` (batch over all ranks),
            per-step linear warm-up then half-cycle cosine to ``min_lr``; an epoch is ``floor(n_train / batch)``
            steps.
        opt / opt_kwargs: the optimiser's name and extra arguments for timm's ``create_optimizer_v2``.
        layer_decay: layer-wise lr decay (timm's, by the ViT's ``group_matcher``); None: off.
        weight_decay: on ≥ 2-D weights (biases, norms, tokens and the position embedding exempt, as timm/MAE).
        drop_path / smoothing / mixup / cutmix: stochastic depth, label smoothing, timm ``Mixup`` alphas (0: off).
        global_pool: ``avg`` (patch mean + fc_norm, MAE's fine-tuning) or ``token`` (the cls token).
        crop_scale / crop_ratio: the training views' RandomResizedCrop ranges (+ a horizontal flip).
        eval_crop: test views are the central square of side ``eval_crop · min(H, W)`` resized to the output size
            (MAE: resize to 256, centre crop 224, i.e. 0.875).
        seed: head init, sample order, views, mixup and drop path (all per (seed, epoch | step, rank)).
        num_workers / use_gpu / threads_per_worker / loader_workers: resources; ``num_workers: 0`` trains in this
            process on one device, without Ray.
        amp_dtype: autocast dtype on GPU (CPU runs float32).
        keep_checkpoints / max_failures / log_every (steps) / eval_batch_size: checkpointing, restarts, reporting.
        eval_every: score the test split after every that many epochs, and always after a start's last epoch (the
            other epochs' ``test_top1`` is None). Training draws no randomness from evaluation (every step is seeded
            by its own (seed, step, rank)), so the final weights and score do not depend on it.
        stop_after_epochs: stop this start after that many epochs in all (the schedule still spans ``epochs``).
        checkpoint_sha256 / data_sha256: what the run was started on (set by :func:`stages.finetune.run_finetune`);
            part of the fingerprint, so a resume on other weights or data is refused.
    """

    run_name: str
    storage_path: str
    checkpoint_url: str
    timm_kwargs: dict[str, Any]
    num_classes: int
    preprocess: dict[str, Any]
    protocol: str = "finetune"
    epochs: int = 10
    batch_size: int = 64
    blr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    opt: str = "adamw"
    opt_kwargs: dict[str, Any] = field(default_factory=lambda: {"betas": [0.9, 0.999]})
    layer_decay: float | None = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    global_pool: str = "avg"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    eval_crop: float = 0.875
    seed: int = 0
    num_workers: int = 0
    use_gpu: bool = False
    threads_per_worker: int = 1
    loader_workers: int = 0
    amp_dtype: str = "bfloat16"
    keep_checkpoints: int = 2
    max_failures: int = 0
    log_every: int = 10
    eval_batch_size: int = 256
    eval_every: int = 1
    stop_after_epochs: int | None = None
    checkpoint_sha256: str = ""
    data_sha256: str = ""
    checkpoint_key: str | None = None
    uri_policy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if problems := self.problems():
            raise ValueError("invalid fine-tuning job: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """``field: what is wrong`` for every field that cannot make a run; empty when the job is valid."""
        out = []
        if self.protocol not in PROTOCOLS:
            out.append(f"protocol: must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.global_pool not in POOLS:
            out.append(f"global_pool: must be one of {POOLS}, got {self.global_pool!r}")
        for name in ("num_classes", "epochs", "batch_size", "threads_per_worker", "keep_checkpoints", "log_every",
                     "eval_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "loader_workers", "warmup_epochs", "weight_decay", "drop_path", "smoothing",
                     "mixup", "cutmix", "min_lr", "blr"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs:
            out.append(f"warmup_epochs: {self.warmup_epochs} exceeds epochs {self.epochs}")
        if self.checkpoint_key is not None and self.protocol != "finetune":
            out.append(f"checkpoint_key: {self.protocol} reads a kept-adapter export, not an entry of a multi-model "
                       f"checkpoint (got {self.checkpoint_key!r}; only protocol finetune takes one)")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            out.append(f"layer_decay: must be in (0, 1] or null, got {self.layer_decay}")
        if not 0 <= self.smoothing < 1 or not 0 < self.eval_crop <= 1 or not 0 <= self.drop_path < 1:
            out.append(f"smoothing / drop_path must be in [0, 1) and eval_crop in (0, 1], got {self.smoothing}, "
                       f"{self.drop_path}, {self.eval_crop}")
        if self.num_workers >= 0 and self.batch_size % self.world_size:
            out.append(f"batch_size: {self.batch_size} must be divisible by num_workers ({self.world_size})")
        elif self.mixing and (self.batch_size // self.world_size) % 2:
            out.append(f"batch_size: mixup/cutmix mix each batch with its reverse, so the per-rank batch "
                       f"({self.batch_size // self.world_size}) must be even")
        scale, ratio = self.crop_scale, self.crop_ratio
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1 or len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            out.append(f"crop_scale / crop_ratio: expected [min, max] with 0 < min <= max (<= 1 for the scale), got "
                       f"{list(scale)} / {list(ratio)}")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            out.append(f"stop_after_epochs: must be >= 1 or null, got {self.stop_after_epochs}")
        return out

    @classmethod
    def for_protocol(cls, protocol: str, **fields: Any) -> FinetuneJob:
        """A job with ``protocol``'s preset (:data:`PRESETS`) under ``fields`` (which win)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: must be one of {PROTOCOLS}, got {protocol!r}")
        return cls(**(PRESETS[protocol] | fields), protocol=protocol)

    @property
    def world_size(self) -> int:
        """Ranks that train: ``num_workers`` Ray workers, or 1 in-process (``num_workers == 0``)."""
        return max(1, self.num_workers)

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on): the loss then takes soft targets."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def run_url(self) -> str:
        """The run directory: ``<storage_path>/<run_name>``."""
        return storage.join(self.storage_path, self.run_name)

    def preprocess_obj(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def policy(self) -> UriPolicy:
        """The input policy the images are read under."""
        return UriPolicy(**self.uri_policy)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneJob:
        return cls(**data)

    def replace(self, **changes: Any) -> FinetuneJob:
        return dataclasses.replace(self, **changes)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What must not change across a resume: every field but :data:`MUTABLE_FIELDS`."""
        return fingerprinted(self.to_dict(), MUTABLE_FIELDS, omitted_when_none=("checkpoint_key",))

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`fingerprint_fields`."""
        return hashlib.sha256(json.dumps(self.fingerprint_fields(), sort_keys=True).encode()).hexdigest()

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """``field: run has X, now Y`` for each fingerprinted field in which this job differs from a stored one."""
        ours = self.fingerprint_fields()
        return [f"{k}: run has {stored.get(k)!r}, now {ours[k]!r}" for k in sorted(ours) if stored.get(k) != ours[k]]


def check_labelled(table: pa.Table, num_classes: int, split: str) -> np.ndarray:
    """The labels of a manifest table, refused unless every row has one in [0, num_classes).

    Args:
        table: a manifest (``uri`` and ``label`` columns, as :mod:`stages.manifest` builds it).
        num_classes: the job's class count.
        split: ``train`` or ``test``, named in errors.

    Returns:
        int64 (N,) labels.

    Raises:
        FinetuneInputError: a missing column, an empty split, unlabeled rows (naming ``<split>.label``) or a label
            outside [0, num_classes) (naming ``num_classes``).
    """
    missing = [c for c in ("uri", "label") if c not in table.column_names]
    if missing:
        raise FinetuneInputError(f"{split}: the manifest lacks column(s) {missing} (columns: {table.column_names})")
    if table.num_rows == 0:
        raise FinetuneInputError(f"{split}: no rows: fine-tuning needs labelled images in both splits")
    column = table.column("label")
    if column.null_count:
        raise FinetuneInputError(f"{split}.label: {column.null_count} of {table.num_rows} rows have no label "
                                 "(unlabeled data): fine-tuning needs a label for every image")
    labels = column.to_numpy().astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise FinetuneInputError(f"num_classes: the job has {num_classes} classes, but {split}.label holds labels in "
                                 f"[{low}, {high}]: every label must lie in [0, num_classes)")
    return labels
