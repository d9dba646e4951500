"""The pipeline configuration: load, override, validate, and turn into the stage jobs and a resolved dict.

A config is a YAML file whose sections mirror :class:`~pipeline.config_schema.PipelineConfig`; every section and
key is optional, and a file may start from another one (``_base_: other.yaml``, see :mod:`pipeline.config_load`).
``key.sub=value`` overrides are applied on top (values parsed as YAML: ``train.epochs=3``, ``preprocess.mean=[0.5]``,
``base.checkpoint=null``). Everything is checked before any work starts (field types and ranges in
:mod:`pipeline.config_load`, rules between fields in :mod:`pipeline.config_checks`); all problems are reported at
once in one :class:`ConfigError`, one per line, each line starting with the key's dotted path.

The helpers below turn a config into the stage jobs (:class:`~stages.extract.ExtractJob`,
:class:`~stages.train.job.TrainJob`) and into a resolved, secret-free dict for run directories and cache attributes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from infra import storage
from infra.redaction import REDACTED, redact_text
from pipeline.config_checks import NAME_MAX, cross_checks, name_problem
from pipeline.config_load import ConfigError, apply_override, build, copy_tree, read_config_file, show
from pipeline.config_schema import PipelineConfig
from stages.extract import ExtractJob
from stages.train.job import TrainJob
from stages.uri_policy import UriPolicy
from stages.views import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from tec_model.archs import vit_kwargs

log = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"secret|password|token|credential|access_key|key_id|session|signature", re.IGNORECASE)
__all__ = ["NAME_MAX", "ConfigError", "PipelineConfig", "base_timm_kwargs", "check_name", "checkpoint_key_for",
           "default_run_name", "dump_yaml", "from_dict", "load_config", "model_timm_kwargs", "name_problem",
           "preprocess", "redact", "resolved_dict", "to_extract_job", "to_pretrain_job", "to_train_job"]


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a YAML config (and its ``_base_`` chain), apply ``key.sub=value`` overrides and validate everything.

    Args:
        path: the YAML file; None gives the defaults.
        overrides: ``key.sub=value`` strings, applied in order after the bases are merged.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem (unknown key, wrong type, impossible or inconsistent value, malformed
            YAML or override, unreadable or cyclic ``_base_``), each line starting with the dotted key (or the
            file, and line for bad YAML).
    """
    raw = {} if path is None else read_config_file(path)
    cfg = from_dict(raw, overrides)
    log.debug("loaded config %s with %d override(s)", path or "<defaults>", len(overrides))
    return cfg


def from_dict(raw: Any, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Build and validate a config from a plain dict (e.g. a resolved config read back from a run directory).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    errors: list[str] = []
    bad: set[str] = set()
    if not isinstance(raw, dict):
        raise ConfigError([f"<config>: expected a mapping at the top level, got {show(raw)}"])
    raw = copy_tree(raw)
    for item in overrides:
        apply_override(raw, item, errors)
    cfg = build(PipelineConfig, raw, "", errors, bad)
    errors += cross_checks(cfg, bad)
    if errors:
        raise ConfigError(errors)
    return cfg


def check_name(value: Any, key: str) -> str:
    """``value`` when it is a valid name for ``key`` (see :func:`~pipeline.config_checks.name_problem`).

    Raises:
        ConfigError: naming ``key`` and what a name must look like.
    """
    problem = name_problem(value, key)
    if problem:
        raise ConfigError([problem])
    return value


# ------------------------------------------------------------------------------------------- derived values
def base_timm_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """The base model's ``VisionTransformer`` kwargs."""
    return vit_kwargs(cfg.base.arch, **cfg.base.timm_overrides)


def checkpoint_key_for(cfg: PipelineConfig, checkpoint: str, which: str) -> str | None:
    """The checkpoint entry to load ``checkpoint`` from when it is read as ``which`` (``evaluate`` / fine-tuning):
    ``base.checkpoint_key`` for the config's own base checkpoint read as the base, None (auto-detection) for any
    other file or for ``which: model``."""
    if which != "base" or cfg.base.checkpoint is None or cfg.base.checkpoint_key is None:
        return None
    same = storage.absolute(checkpoint) == storage.absolute(cfg.base.checkpoint)
    return cfg.base.checkpoint_key if same else None


def model_timm_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """The new model's ``VisionTransformer`` kwargs."""
    return vit_kwargs(cfg.model.arch, **cfg.model.timm_overrides)


def preprocess(cfg: PipelineConfig) -> Preprocess:
    """View preprocessing: output size = the base model's img_size, mean/std over its in_chans channels."""
    kw = base_timm_kwargs(cfg)
    p, channels = cfg.preprocess, kw.get("in_chans", 3)
    if p.norm == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif p.norm == "fashion_mnist":
        mean, std = FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
    else:
        mean, std = tuple(p.mean or ()), tuple(p.std or ())
    return Preprocess(kw["img_size"], crop_scale=tuple(p.crop_scale), crop_ratio=tuple(p.crop_ratio),
                      interpolation=p.interpolation, mean=mean, std=std)


def default_run_name(cfg: PipelineConfig, now: float | None = None) -> str:
    """``train.run_name`` when set, else ``<name>-<YYYYmmdd-HHMMSS>-<6 random hex digits>`` (local time): two runs
    started in the same second get different names."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return cfg.train.run_name or f"{cfg.name}-{stamp}-{secrets.token_hex(3)}"


def to_extract_job(cfg: PipelineConfig, cache_url: str, manifest_url: str, checkpoint_url: str) -> ExtractJob:
    """The extraction job of a config (``extract.num_actors/threads_per_actor`` go to ``run_extract``)."""
    ex = cfg.extract
    return ExtractJob(
        cache_url=cache_url, manifest_url=manifest_url, checkpoint_url=checkpoint_url,
        timm_kwargs=base_timm_kwargs(cfg), preprocess=preprocess(cfg), views_per_image=ex.views_per_image,
        view_seed=ex.seed, last_layers=ex.last_layers, k_max=ex.k_max, unit_size=ex.unit_size,
        batch_size=ex.batch_size, checkpoint_key=cfg.base.checkpoint_key, compressor=ex.compressor,
        codec=ex.codec, precision=ex.precision, max_failed_fraction=ex.max_failed_fraction,
        uri_policy=UriPolicy.of(cfg.data),
    )


def to_train_job(cfg: PipelineConfig, cache_url: str | None, run_name: str, storage_path: str,
                 manifest_url: str | None = None, checkpoint_url: str | None = None) -> TrainJob:
    """The training job of a config; every ``model.*`` and ``train.*`` field maps onto the same-named job field."""
    ex, m, t = cfg.extract, cfg.model, cfg.train
    model_fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("arch",
                                                                                               "timm_overrides")}
    train_fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "run_name"}
    train_fields["local_cache"] = dataclasses.asdict(t.local_cache)  # the job holds plain values
    return TrainJob(
        run_name=check_name(run_name, "run_name"), storage_path=storage_path, timm_kwargs=model_timm_kwargs(cfg),
        base_timm_kwargs=base_timm_kwargs(cfg), preprocess=preprocess(cfg).to_dict(), cache_url=cache_url,
        manifest_url=manifest_url, checkpoint_url=checkpoint_url, views_per_image=ex.views_per_image,
        view_seed=ex.seed, last_layers=ex.last_layers, k_max=ex.k_max, base_precision=ex.precision, codec=ex.codec,
        base_checkpoint_key=cfg.base.checkpoint_key, uri_policy=dataclasses.asdict(UriPolicy.of(cfg.data)),
        **model_fields, **train_fields,
    )


def to_pretrain_job(cfg: PipelineConfig, run_name: str, storage_path: str, manifest_url: str) -> TrainJob:
    """The pixel-MAE pre-training job of the base model (``base.pretrain``; resources from ``train``)."""
    p, t = cfg.base.pretrain, cfg.train
    kwargs = base_timm_kwargs(cfg)
    resources = {k: getattr(t, k) for k in ("num_workers", "use_gpu", "threads_per_worker", "loader_workers",
                                            "checkpoint_every", "keep_checkpoints", "max_failures", "log_every",
                                            "amp_dtype", "shuffle_window")}
    return TrainJob(
        run_name=check_name(run_name, "run_name"), storage_path=storage_path, timm_kwargs=kwargs,
        base_timm_kwargs=kwargs,
        preprocess=preprocess(cfg).to_dict(), target_source="pixel", manifest_url=manifest_url,
        views_per_image=max(1, p.epochs), view_seed=p.seed, adapters="none", feature_norm="channel",
        attention_target=False, topk=1, k_max=1, mask_ratio=p.mask_ratio, decoder_dim=p.decoder_dim,
        decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads, epochs=p.epochs, global_batch=p.global_batch,
        blr=p.blr, weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs, seed=p.seed,
        uri_policy=dataclasses.asdict(UriPolicy.of(cfg.data)), **resources,
    )


# ----------------------------------------------------------------------------------------- resolved output
def redact(value: Any) -> Any:
    """A copy of ``value`` without secrets: secret-named keys become ``<redacted>``, every URL inside a string
    loses its userinfo and its secret-named parameters' values (:func:`infra.redaction.redact_text`)."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) and value[k] is not None else redact(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def resolved_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The full configuration with defaults filled in, as plain JSON/YAML-able values, secrets redacted."""
    return redact(dataclasses.asdict(cfg))


def dump_yaml(cfg: PipelineConfig) -> str:
    """:func:`resolved_dict` as YAML (loadable again with :func:`load_config`)."""
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False, default_flow_style=False, width=120)
