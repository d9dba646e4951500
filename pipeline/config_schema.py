"""The pipeline configuration's typed schema: one dataclass per YAML section, plain values only.

Field metadata drives the per-field checks in :mod:`pipeline.config_load`: ``choices`` (allowed values) and ``min``
(smallest allowed number). Rules between fields (topk ≤ k_max, matching patch grids, …) are collected by
:mod:`pipeline.config_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.cache import COMPRESSORS
from stages.cache.codecs import CODECS
from stages.device import AMP_DTYPES, PRECISIONS
from stages.train.job import USER_TARGET_SOURCES as TARGET_SOURCES
from stages.uri_policy import DEFAULT_MAX_IDX_BYTES, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_SCHEMES
from tec_model.archs import ARCHS
from tec_model.tec import ADAPTERS, FEATURE_NORMS

DATA_SOURCES = ("idx", "image_folder", "uri_list")
NORMS = ("imagenet", "fashion_mnist", "custom")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _one_of(values: tuple[Any, ...]) -> dict[str, Any]:
    """Field metadata: the allowed values."""
    return {"choices": values}


def _at_least(low: float) -> dict[str, Any]:
    """Field metadata: the smallest allowed value."""
    return {"min": low}


@dataclass
class DataConfig:
    """The images: a manifest is built from ``path`` by ``source`` (IDX file, ImageFolder tree or URI list).

    The manifest's URIs are read under an input policy (:class:`stages.uri_policy.UriPolicy`): ``allowed_schemes``
    (plain paths are ``file``; link-local and metadata addresses are refused whatever the scheme), ``max_image_bytes``
    per encoded image, ``max_image_pixels`` per decoded image, ``max_idx_bytes`` per IDX file.
    """

    source: str = field(default="idx", metadata=_one_of(DATA_SOURCES))
    path: str = f"{FMNIST_DIR}/train-images-idx3-ubyte.gz"
    limit: int | None = field(default=None, metadata=_at_least(1))
    test_path: str | None = f"{FMNIST_DIR}/t10k-images-idx3-ubyte.gz"
    allowed_schemes: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEMES))
    max_image_bytes: int = field(default=DEFAULT_MAX_IMAGE_BYTES, metadata=_at_least(1))
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata=_at_least(1))
    max_idx_bytes: int = field(default=DEFAULT_MAX_IDX_BYTES, metadata=_at_least(1))


@dataclass
class PretrainConfig:
    """Pixel-MAE pre-training of the base model on the data set, used when ``base.checkpoint`` is null.

    ``epochs: 0`` makes a seeded random base instead (pipeline tests only: a random teacher teaches nothing). Each
    epoch sees a fresh augmented view of every image; resources (workers, threads, GPU) come from ``train``.
    """

    epochs: int = field(default=0, metadata=_at_least(0))
    global_batch: int = field(default=256, metadata=_at_least(1))
    blr: float = 1.5e-4
    weight_decay: float = field(default=0.05, metadata=_at_least(0.0))
    warmup_epochs: float = field(default=0.0, metadata=_at_least(0.0))
    mask_ratio: float = field(default=0.75, metadata=_at_least(0.0))
    decoder_dim: int = field(default=128, metadata=_at_least(1))
    decoder_depth: int = field(default=2, metadata=_at_least(1))
    decoder_heads: int = field(default=4, metadata=_at_least(1))
    seed: int = field(default=1, metadata=_at_least(0))


@dataclass
class BaseConfig:
    """The frozen base model: ``checkpoint`` (any format :mod:`tec_model.checkpoint` reads), or null to pre-train a
    pixel-MAE base on the data set (``pretrain``)."""

    arch: str = field(default="vit_mini_patch4_32", metadata=_one_of(ARCHS))
    timm_overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_key: str | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class PreprocessConfig:
    """View preprocessing; the output size is the base model's ``img_size``, channels its ``in_chans``."""

    norm: str = field(default="imagenet", metadata=_one_of(NORMS))
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    interpolation: str = field(default="bicubic", metadata=_one_of(INTERPOLATIONS))


@dataclass
class ExtractConfig:
    """The extraction stage: view plan, targets kept, cache layout and Ray actor pool."""

    views_per_image: int = field(default=2, metadata=_at_least(1))
    seed: int = field(default=0, metadata=_at_least(0))
    k_max: int = field(default=15, metadata=_at_least(1))
    last_layers: int = field(default=2, metadata=_at_least(1))
    unit_size: int = field(default=64, metadata=_at_least(1))
    batch_size: int = field(default=64, metadata=_at_least(1))
    num_actors: int = field(default=1, metadata=_at_least(0))  # 0: extract in this process, without Ray
    threads_per_actor: int = field(default=1, metadata=_at_least(1))
    compressor: str = field(default="shuffle", metadata=_one_of(COMPRESSORS))
    codec: str = field(default="float16", metadata=_one_of(CODECS))  # int8 / fp8: quantised targets (key changes)
    precision: str = field(default="auto", metadata=_one_of(PRECISIONS))  # auto: bfloat16 on CUDA, float32 on CPU
    max_failed_fraction: float = field(default=0.05, metadata=_at_least(0.0))  # a unit losing more stops the job


@dataclass
class ModelConfig:
    """The new model and TEC's switches."""

    arch: str = field(default="vit_micro_patch4_32", metadata=_one_of(ARCHS))
    timm_overrides: dict[str, Any] = field(default_factory=dict)
    adapters: str = field(default="both", metadata=_one_of(ADAPTERS))
    feature_norm: str = field(default="patch", metadata=_one_of(FEATURE_NORMS))
    attention_target: bool = True
    topk: int = field(default=15, metadata=_at_least(1))
    att_tau: float = 1.8
    mask_ratio: float = field(default=0.75, metadata=_at_least(0.0))
    decoder_dim: int = field(default=512, metadata=_at_least(1))
    decoder_depth: int = field(default=2, metadata=_at_least(1))
    decoder_heads: int = field(default=16, metadata=_at_least(1))


@dataclass
class LocalCacheConfig:
    """``train.local_cache``: a node-local copy of a REMOTE target cache's objects, fetched once per node per run
    and shared by every rank and loader worker of the node (:mod:`stages.cache.local_tier`).

    ``dir`` is a directory on each node's local disk (null: off); ``max_bytes`` bounds it (null: unbounded; below
    the cache's size a fixed set of objects stays local and the rest is read by byte range); ``verify_local``
    hashes each local file fully on its first use in each process (default: a size check only). A cache on a local
    path is read in place: it is already local. See docs/pipeline.md#local-cache.
    """

    dir: str | None = None
    max_bytes: int | None = field(default=None, metadata=_at_least(0))
    verify_local: bool = False


@dataclass
class TrainConfig:
    """The training stage (MAE's recipe; ``global_batch`` counts samples per optimiser step)."""

    target_source: str = field(default="cache", metadata=_one_of(TARGET_SOURCES))
    run_name: str | None = None
    epochs: int = field(default=1, metadata=_at_least(1))
    global_batch: int = field(default=256, metadata=_at_least(1))
    accum_steps: int = field(default=1, metadata=_at_least(1))
    blr: float = 1.5e-4
    weight_decay: float = field(default=0.05, metadata=_at_least(0.0))
    warmup_epochs: float = field(default=0.0, metadata=_at_least(0.0))
    min_lr: float = field(default=0.0, metadata=_at_least(0.0))
    seed: int = field(default=0, metadata=_at_least(0))
    shuffle_window: int = field(default=8, metadata=_at_least(1))
    num_workers: int = field(default=2, metadata=_at_least(0))  # 0: train in this process, without Ray
    use_gpu: bool = False
    threads_per_worker: int = field(default=1, metadata=_at_least(1))
    loader_workers: int = field(default=1, metadata=_at_least(0))
    checkpoint_every: int = field(default=100, metadata=_at_least(1))
    keep_checkpoints: int = field(default=2, metadata=_at_least(1))
    max_failures: int = field(default=0, metadata=_at_least(-1))
    log_every: int = field(default=10, metadata=_at_least(1))
    max_steps: int | None = field(default=None, metadata=_at_least(1))
    amp_dtype: str = field(default="bfloat16", metadata=_one_of(AMP_DTYPES))
    local_cache: LocalCacheConfig = field(default_factory=LocalCacheConfig)


@dataclass
class FinetuneConfig:
    """Fine-tuning recipe (docs/finetune.md#1-protocols-and-recipes): each null keeps the protocol's preset
    (:data:`stages.finetune.PRESETS`); ``layer_decay: 1.0`` scales every layer alike. Resources come from ``train``."""

    epochs: int | None = field(default=None, metadata=_at_least(1))
    batch_size: int | None = field(default=None, metadata=_at_least(1))
    blr: float | None = field(default=None, metadata=_at_least(0.0))
    min_lr: float | None = field(default=None, metadata=_at_least(0.0))
    warmup_epochs: float | None = field(default=None, metadata=_at_least(0.0))
    layer_decay: float | None = field(default=None, metadata=_at_least(0.0))
    weight_decay: float | None = field(default=None, metadata=_at_least(0.0))
    drop_path: float | None = field(default=None, metadata=_at_least(0.0))
    smoothing: float | None = field(default=None, metadata=_at_least(0.0))
    mixup: float | None = field(default=None, metadata=_at_least(0.0))
    cutmix: float | None = field(default=None, metadata=_at_least(0.0))
    eval_crop: float | None = field(default=None, metadata=_at_least(0.0))
    crop_scale: list[float] | None = None  # the training views' RandomResizedCrop area range [min, max]
    eval_every: int | None = field(default=None, metadata=_at_least(1))  # epochs between test scores (and the last)


@dataclass
class RayConfig:
    """Where Ray runs: ``address`` None starts a local cluster with ``num_cpus`` (None: all)."""

    address: str | None = None
    num_cpus: int | None = field(default=None, metadata=_at_least(1))


@dataclass
class PipelineConfig:
    """The whole pipeline configuration (one YAML file; every section optional)."""

    name: str = "tec"
    output_root: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)
