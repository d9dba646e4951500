"""Load, override, validate and resolve the pipeline configuration (issue 5 item 2).

A config is a YAML file whose sections mirror :class:`~pipeline.config_schema.PipelineConfig`; every section and
key is optional. ``key.sub=value`` overrides are applied on top (values parsed as YAML: ``train.epochs=3``,
``preprocess.mean=[0.5]``, ``base.checkpoint=null``). Everything is checked before any work starts; all problems
are reported at once in one :class:`ConfigError`, one per line, each line starting with the key's dotted path.

The helpers below turn a config into the stage jobs (:class:`~stages.extract.ExtractJob`,
:class:`~stages.train_job.TrainJob`) and into a resolved, secret-free dict for run directories and cache attributes.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import secrets
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from infra.redaction import REDACTED, redact_text
from pipeline.config_schema import PipelineConfig
from stages.extract import ExtractJob
from stages.train.job import TrainJob
from stages.uri_policy import UriPolicy
from stages.views import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from tec_model.archs import vit_kwargs
from tec_model.masking import num_visible

log = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"secret|password|token|credential|access_key|key_id|session|signature", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX = 128
_VIT_INTS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


class ConfigError(ValueError):
    """An invalid configuration. ``errors`` holds one message per problem, each starting with a dotted key."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as every config author expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate everything.

    Args:
        path: the YAML file; None gives the defaults.
        overrides: ``key.sub=value`` strings, applied in order.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem (unknown key, wrong type, impossible or inconsistent value, malformed
            YAML or override), each line starting with the dotted key (or the file and line for bad YAML).
    """
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read config file ({exc.strerror or exc})"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: cannot read config file (not UTF-8 text: {exc})"]) from exc
        try:
            raw = yaml.load(text, _Loader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError([f"{where}: malformed YAML: {problem}"]) from exc
    cfg = from_dict({} if raw is None else raw, overrides)
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
        raise ConfigError([f"<config>: expected a mapping at the top level, got {_show(raw)}"])
    raw = _copy(raw)
    for item in overrides:
        _apply_override(raw, item, errors)
    cfg = _build(PipelineConfig, raw, "", errors, bad)
    errors += _cross_checks(cfg, bad)
    if errors:
        raise ConfigError(errors)
    return cfg


def _copy(raw: Any) -> Any:
    return {k: _copy(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


def _apply_override(raw: dict, item: str, errors: list[str]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        errors.append(f"{key or item}: an override must look like key.sub=value, got {item!r}")
        return
    try:
        value = yaml.load(text, _Loader)  # a SafeLoader subclass
    except yaml.YAMLError:
        errors.append(f"{key}: cannot parse override value {text!r} as YAML")
        return
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            errors.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
            return
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, errors: list[str], bad: set[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, recording every problem under its dotted key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix}: expected a mapping, got {_show(raw)}")
        bad.add(prefix)
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key in raw:
        if key not in fields:
            dotted = _join(prefix, str(key))
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {_join(prefix, close[0])}?)" if close else f" (known: {', '.join(fields)})"
            errors.append(f"{dotted}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        dotted, tp = _join(prefix, name), hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], dotted, errors, bad)
            continue
        try:
            value = _coerce(raw[name], tp, dotted)
            _check_meta(value, f.metadata, dotted)
        except _FieldError as exc:
            errors.append(str(exc))
            bad.add(dotted)
            continue
        kwargs[name] = value
    return cls(**kwargs)


class _FieldError(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (ints widen to floats; nothing else converts), else raise :class:`_FieldError`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except _FieldError:
            raise _FieldError(f"{key}: expected {_type_name(tp)}, got {_show(value)}") from None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, list):
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise _FieldError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _check_meta(value: Any, meta: Any, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _FieldError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    low = meta.get("min")
    if low is not None and value < low:
        raise _FieldError(f"{key}: must be >= {low}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------------- cross-field checks
def _cross_checks(cfg: PipelineConfig, bad: set[str]) -> list[str]:
    """Checks between fields; a check is skipped when a field it reads already failed on its own."""
    out: list[str] = []

    def ok(*keys: str) -> bool:
        return not any(k in bad or any(b.startswith(k + ".") or k.startswith(b + ".") for b in bad) for k in keys)

    for key, value in (("name", cfg.name), ("train.run_name", cfg.train.run_name)):
        if ok(key) and value is not None and (problem := name_problem(value, key)):
            out.append(problem)
    for key, value in (("output_root", cfg.output_root), ("data.path", cfg.data.path)):
        if ok(key) and not value.strip():
            out.append(f"{key}: must not be empty")

    base_ok, new_ok = ok("base.arch", "base.timm_overrides"), ok("model.arch", "model.timm_overrides")
    base_kw = _vit_checks(cfg.base.arch, cfg.base.timm_overrides, "base", out) if base_ok else None
    new_kw = _vit_checks(cfg.model.arch, cfg.model.timm_overrides, "model", out) if new_ok else None
    if new_kw and new_kw["embed_dim"] % 4:
        out.append(f"{_src('model', 'embed_dim', cfg.model.timm_overrides)}: the new model's embed_dim "
                   f"{new_kw['embed_dim']} must be divisible by 4 (2-D sin-cos position embedding)")
    base_len = _grid(base_kw)
    if base_kw and new_kw:
        for what in ("img_size", "in_chans"):
            if new_kw[what] != base_kw[what]:
                out.append(f"{_src('model', what, cfg.model.timm_overrides)}: the new model's {what} {new_kw[what]} "
                           f"differs from the base model's {base_kw[what]} (they see the same views)")
        new_len = _grid(new_kw)
        if new_kw["img_size"] == base_kw["img_size"] and new_len != base_len:
            out.append(f"{_src('model', 'patch_size', cfg.model.timm_overrides)}: the new model has L={new_len} "
                       f"patches but the base model has L={base_len} (the targets are per base patch)")
    if base_kw and ok("preprocess"):
        out += _preprocess_checks(cfg, base_kw["in_chans"])

    ex, m, t = cfg.extract, cfg.model, cfg.train
    if base_len and ok("extract.k_max") and ex.k_max > base_len:
        out.append(f"extract.k_max: {ex.k_max} exceeds the base model's {base_len} patches")
    if base_kw and ok("extract.last_layers") and ex.last_layers > base_kw["depth"]:
        out.append(f"extract.last_layers: {ex.last_layers} exceeds the base model's depth {base_kw['depth']}")
    if ok("model.topk", "extract.k_max") and m.topk > ex.k_max:
        out.append(f"model.topk: {m.topk} > extract.k_max {ex.k_max} (the cache keeps only k_max attention rows)")
    if ok("model.att_tau") and m.att_tau <= 0:
        out.append(f"model.att_tau: must be > 0, got {m.att_tau}")
    p = cfg.base.pretrain
    for sec, obj in (("model", m), ("base.pretrain", p)):
        out += _masked_model_checks(sec, obj, base_len, ok)
    for sec, obj, accum in (("train", t, t.accum_steps), ("base.pretrain", p, 1)):
        if ok(f"{sec}.global_batch", "train.num_workers", "train.accum_steps") and \
                obj.global_batch % (max(1, t.num_workers) * accum):
            out.append(f"{sec}.global_batch: {obj.global_batch} is not divisible by train.num_workers × "
                       f"{sec}.accum_steps ({t.num_workers} × {accum})" if sec == "train" else
                       f"{sec}.global_batch: {obj.global_batch} is not divisible by train.num_workers "
                       f"({t.num_workers})")
        if ok(f"{sec}.blr") and obj.blr <= 0:
            out.append(f"{sec}.blr: must be > 0, got {obj.blr}")
    return out


def _masked_model_checks(sec: str, obj: Any, base_len: int | None, ok: Any) -> list[str]:
    """Mask ratio and decoder shape of a masked-image model section (``model`` or ``base.pretrain``)."""
    out = []
    if ok(f"{sec}.mask_ratio"):
        if obj.mask_ratio >= 1:
            out.append(f"{sec}.mask_ratio: must be in [0, 1), got {obj.mask_ratio}")
        elif base_len and num_visible(base_len, obj.mask_ratio) < 1:
            out.append(f"{sec}.mask_ratio: {obj.mask_ratio} leaves no visible patch out of {base_len}")
    if ok(f"{sec}.decoder_dim", f"{sec}.decoder_heads") and \
            (obj.decoder_dim % obj.decoder_heads or obj.decoder_dim % 4):
        out.append(f"{sec}.decoder_dim: {obj.decoder_dim} must be divisible by 4 and by {sec}.decoder_heads "
                   f"{obj.decoder_heads}")
    return out


def _vit_checks(arch: str, overrides: dict[str, Any], section: str, out: list[str]) -> dict[str, Any] | None:
    """The ViT kwargs of one model, or None after recording why they are unusable."""
    problems = []
    for name in _VIT_INTS:
        value = overrides.get(name)
        if name in overrides and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{section}.timm_overrides.{name}: expected a positive int, got {_show(value)}")
    try:
        kw = vit_kwargs(arch, **overrides)
    except ValueError as exc:
        problems.append(f"{section}.timm_overrides: {exc}")
    if problems:
        out.extend(problems)
        return None
    if kw["img_size"] % kw["patch_size"]:
        out.append(f"{_src(section, 'patch_size', overrides)}: img_size {kw['img_size']} is not a multiple of "
                   f"patch_size {kw['patch_size']}")
        return None
    if kw["embed_dim"] % kw["num_heads"]:
        out.append(f"{_src(section, 'num_heads', overrides)}: embed_dim {kw['embed_dim']} is not divisible by "
                   f"num_heads {kw['num_heads']}")
        return None
    return kw


def _src(section: str, name: str, overrides: dict[str, Any]) -> str:
    """The dotted key a ViT size came from: the override when set, else the arch."""
    return f"{section}.timm_overrides.{name}" if name in overrides else f"{section}.arch"


def _grid(kw: dict[str, Any] | None) -> int | None:
    return (kw["img_size"] // kw["patch_size"]) ** 2 if kw else None


def _preprocess_checks(cfg: PipelineConfig, in_chans: int) -> list[str]:
    p, out = cfg.preprocess, []
    for key in ("crop_scale", "crop_ratio"):
        lo_hi = getattr(p, key)
        upper = 1.0 if key == "crop_scale" else float("inf")
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= upper:
            bound = " <= 1" if key == "crop_scale" else ""
            out.append(f"preprocess.{key}: expected [min, max] with 0 < min <= max{bound}, got {lo_hi}")
    if p.norm == "custom":
        for key in ("mean", "std"):
            values = getattr(p, key)
            if values is None:
                out.append(f"preprocess.{key}: required when preprocess.norm is 'custom' ({in_chans} values)")
            elif len(values) != in_chans:
                out.append(f"preprocess.{key}: has {len(values)} values but the base model takes in_chans={in_chans}")
        if p.std is not None and any(s <= 0 for s in p.std):
            out.append(f"preprocess.std: every value must be > 0, got {p.std}")
    else:
        out += [f"preprocess.{key}: only used with preprocess.norm 'custom' (norm is {p.norm!r})"
                for key in ("mean", "std") if getattr(p, key) is not None]
        if p.norm == "imagenet" and in_chans != 3:
            out.append(f"preprocess.norm: 'imagenet' has 3 channels but the base model takes in_chans={in_chans} "
                       "(use 'fashion_mnist' or 'custom')")
    return out


def name_problem(value: Any, key: str) -> str | None:
    """Why ``value`` cannot be the name ``key`` (a name that becomes one directory or object name), or None.

    A name is 1 to :data:`NAME_MAX` letters, digits, ``.``, ``_`` or ``-``, starts with a letter or digit (so it is
    never empty, ``.``, ``..`` or hidden) and holds no ``..``; ``/`` is refused, so it stays one path component.
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        return (f"{key}: {value!r} must be letters, digits, '.', '_' or '-', start with a letter or digit and hold "
                "no '..' (a directory name)")
    if len(value) > NAME_MAX:
        return f"{key}: {value[:16]!r}... is {len(value)} characters long, at most {NAME_MAX} (a directory name)"
    return None


def check_name(value: Any, key: str) -> str:
    """``value`` when it is a valid name for ``key`` (see :func:`name_problem`).

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
        precision=ex.precision, max_failed_fraction=ex.max_failed_fraction,
        uri_policy=UriPolicy.of(cfg.data),
    )


def to_train_job(cfg: PipelineConfig, cache_url: str | None, run_name: str, storage_path: str,
                 manifest_url: str | None = None, checkpoint_url: str | None = None) -> TrainJob:
    """The training job of a config; every ``model.*`` and ``train.*`` field maps onto the same-named job field."""
    ex, m, t = cfg.extract, cfg.model, cfg.train
    model_fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("arch",
                                                                                               "timm_overrides")}
    train_fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "run_name"}
    return TrainJob(
        run_name=check_name(run_name, "run_name"), storage_path=storage_path, timm_kwargs=model_timm_kwargs(cfg),
        base_timm_kwargs=base_timm_kwargs(cfg), preprocess=preprocess(cfg).to_dict(), cache_url=cache_url,
        manifest_url=manifest_url, checkpoint_url=checkpoint_url, views_per_image=ex.views_per_image,
        view_seed=ex.seed, last_layers=ex.last_layers, k_max=ex.k_max, base_precision=ex.precision,
        uri_policy=dataclasses.asdict(UriPolicy.of(cfg.data)), **model_fields, **train_fields,
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
