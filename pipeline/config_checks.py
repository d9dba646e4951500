"""Checks between fields of a pipeline config, each message under the dotted key a user would change.

Rules that belong to an object are that object's: the ViT sizes are :func:`tec_model.archs.check_vit_kwargs`'s,
the new model's are :func:`tec_model.tec.check_args`'s; this module only maps their argument names onto config
keys and adds the rules that tie sections together (base and new model see the same views, the cache holds
``k_max`` rows of the base model, the batch splits over workers, the warm-up fits in the schedule; for
``base.pretrain`` only when it will run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.config_load import show
from pipeline.config_schema import PipelineConfig
from tec_model.archs import check_vit_kwargs, num_patches, vit_kwargs
from tec_model.tec import check_args

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX = 128
_VIT_INTS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")

Ok = Callable[..., bool]


def cross_checks(cfg: PipelineConfig, bad: set[str]) -> list[str]:
    """Every cross-field problem of ``cfg``; a check is skipped when a field it reads already failed on its own.

    Args:
        cfg: the config as built (failed fields hold their defaults).
        bad: dotted keys that failed their own checks.

    Returns:
        One message per problem, each starting with a dotted key.
    """
    out: list[str] = []

    def ok(*keys: str) -> bool:
        return not any(k in bad or any(b.startswith(k + ".") or k.startswith(b + ".") for b in bad) for k in keys)

    for key, value in (("name", cfg.name), ("train.run_name", cfg.train.run_name)):
        if ok(key) and value is not None and (problem := name_problem(value, key)):
            out.append(problem)
    for key, value in (("output_root", cfg.output_root), ("data.path", cfg.data.path)):
        if ok(key) and not value.strip():
            out.append(f"{key}: must not be empty")
    base = _vit("base", cfg.base.arch, cfg.base.timm_overrides, out) if ok("base.arch", "base.timm_overrides") \
        else None
    new = _vit("model", cfg.model.arch, cfg.model.timm_overrides, out) if ok("model.arch", "model.timm_overrides") \
        else None
    base_len = num_patches(base) if base else None
    out += _model_checks(cfg, new, base, ok)
    if base and ok("preprocess"):
        out += _preprocess_checks(cfg, base["in_chans"])
    out += _extract_checks(cfg, base, ok)
    out += _pretrain_checks(cfg, base, base_len, ok)
    out += _batch_checks(cfg, ok)
    out += _schedule_checks(cfg, ok)
    return out


def _vit(section: str, arch: str, overrides: dict[str, Any], out: list[str]) -> dict[str, Any] | None:
    """The ViT kwargs of one model, or None after recording why they are unusable."""
    try:
        kw = vit_kwargs(arch, **overrides)
    except ValueError as exc:
        kw, problems = None, [f"{section}.timm_overrides: {exc}"]
    else:
        problems = []
    problems[:0] = [f"{section}.timm_overrides.{name}: expected a positive int, got {show(overrides[name])}"
                    for name in _VIT_INTS if name in overrides and not _positive_int(overrides[name])]
    if problems:
        out.extend(problems)
        return None
    vit = check_vit_kwargs(kw)
    out += [f"{_src(section, names, overrides)}: {message}" for names, message in vit]
    return None if vit else kw


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _src(section: str, names: Iterable[str], overrides: dict[str, Any]) -> str:
    """The dotted key a ViT size came from: the first of ``names`` overridden, else the arch."""
    for name in names:
        if name in overrides:
            return f"{section}.timm_overrides.{name}"
    return f"{section}.arch"


def _report(problems: list[tuple[tuple[str, ...], str]], key: Callable[[tuple[str, ...]], str], ok: Ok,
            skip: Iterable[str] = ()) -> list[str]:
    """An owner's ``(argument names, message)`` problems as config lines under ``key(names)``, minus those that
    read a field that failed on its own or an argument in ``skip`` (already reported)."""
    lines = []
    for names, message in problems:
        if set(skip) & set(names) or not ok(*(key((n,)) for n in names)):
            continue
        for name in names[1:]:  # a sibling field the message names, by its dotted key
            sibling = key((name,))
            if sibling.endswith("." + name) and ".timm_overrides." not in sibling:
                message = re.sub(rf"\b{name}\b", sibling, message)
        lines.append(f"{key(names)}: {message}")
    return lines


def _model_checks(cfg: PipelineConfig, new: dict[str, Any] | None, base: dict[str, Any] | None, ok: Ok) -> list[str]:
    """The new model: the same views as the base model, and :class:`~tec_model.tec.TECModel`'s own rules."""
    m, overrides, out = cfg.model, cfg.model.timm_overrides, []
    skip: set[str] = set()
    if new and base:
        for what in ("img_size", "in_chans"):
            if new[what] != base[what]:
                out.append(f"{_src('model', [what], overrides)}: the new model's {what} {new[what]} differs from "
                           f"the base model's {base[what]} (they see the same views)")
                skip.add(what)
    if ok("model.topk", "extract.k_max") and m.topk > cfg.extract.k_max:
        out.append(f"model.topk: {m.topk} > extract.k_max {cfg.extract.k_max} (the cache keeps only k_max "
                   "attention rows)")
        skip.add("topk")
    problems = check_args(new, num_patches(base) if base else None, adapters=m.adapters, feature_norm=m.feature_norm,
                          topk=m.topk, att_tau=m.att_tau, mask_ratio=m.mask_ratio, decoder_dim=m.decoder_dim,
                          decoder_heads=m.decoder_heads)

    def key(names: tuple[str, ...]) -> str:
        return f"model.{names[0]}" if names[0] in _TEC_SCALARS else _src("model", names, overrides)

    return out + _report(problems, key, ok, skip)


_TEC_SCALARS = ("adapters", "feature_norm", "topk", "att_tau", "mask_ratio", "decoder_dim", "decoder_heads")


def _pretrain_runs(cfg: PipelineConfig) -> bool:
    """Whether ``base.pretrain`` will train the base model: no ``base.checkpoint`` and ``base.pretrain.epochs`` > 0
    (otherwise the base is loaded, or made at random, and none of ``base.pretrain``'s fields is used)."""
    return cfg.base.checkpoint is None and cfg.base.pretrain.epochs > 0


def _pretrain_checks(cfg: PipelineConfig, base: dict[str, Any] | None, base_len: int | None, ok: Ok) -> list[str]:
    """``base.pretrain``: the pixel-MAE's own rules (its encoder is the base architecture when it runs)."""
    p = cfg.base.pretrain
    runs = _pretrain_runs(cfg)
    problems = check_args(base if runs else None, base_len, adapters="none", feature_norm="channel", topk=1,
                          mask_ratio=p.mask_ratio, decoder_dim=p.decoder_dim, decoder_heads=p.decoder_heads)

    def key(names: tuple[str, ...]) -> str:
        own = names[0] in ("mask_ratio", "decoder_dim", "decoder_heads")
        return f"base.pretrain.{names[0]}" if own else _src("base", names, cfg.base.timm_overrides)

    return [line if line.startswith("base.pretrain.") else f"{line} ({_PRETRAINED})"
            for line in _report(problems, key, ok)]


_PRETRAINED = "base.pretrain trains this architecture as a pixel MAE: set base.checkpoint to load one instead"


def _extract_checks(cfg: PipelineConfig, base: dict[str, Any] | None, ok: Ok) -> list[str]:
    """The cache keeps ``k_max`` of the base model's patches and averages its ``last_layers`` blocks."""
    ex, out = cfg.extract, []
    if base and ok("extract.k_max") and ex.k_max > num_patches(base):
        out.append(f"extract.k_max: {ex.k_max} exceeds the base model's {num_patches(base)} patches")
    if base and ok("extract.last_layers") and ex.last_layers > base["depth"]:
        out.append(f"extract.last_layers: {ex.last_layers} exceeds the base model's depth {base['depth']}")
    return out


def _batch_checks(cfg: PipelineConfig, ok: Ok) -> list[str]:
    """The global batch splits over workers (and accumulation steps); the base learning rate is positive.

    ``base.pretrain``'s rows are checked only when it runs (:func:`_pretrain_runs`).
    """
    t, p, out = cfg.train, cfg.base.pretrain, []
    sections = [("train", t, t.accum_steps)] + ([("base.pretrain", p, 1)] if _pretrain_runs(cfg) else [])
    for sec, obj, accum in sections:
        if ok(f"{sec}.global_batch", "train.num_workers", "train.accum_steps") and \
                obj.global_batch % (max(1, t.num_workers) * accum):
            out.append(f"{sec}.global_batch: {obj.global_batch} is not divisible by train.num_workers × "
                       f"{sec}.accum_steps ({t.num_workers} × {accum})" if sec == "train" else
                       f"{sec}.global_batch: {obj.global_batch} is not divisible by train.num_workers "
                       f"({t.num_workers})")
        if ok(f"{sec}.blr") and obj.blr <= 0:
            out.append(f"{sec}.blr: must be > 0, got {obj.blr}")
    return out


def _schedule_checks(cfg: PipelineConfig, ok: Ok) -> list[str]:
    """The warm-up fits in the schedule: ``warmup_epochs <= epochs``, the condition of
    :func:`tec_model.optim.lr_schedule` (``warmup_steps <= total_steps``, both ``× steps per epoch``), for
    ``train``, ``base.pretrain`` when it runs and ``finetune`` when it sets both fields (else its preset's values
    are the job's, which :class:`stages.finetune.FinetuneJob` checks)."""
    f = cfg.finetune
    schedules: list[tuple[str, float | None, float | None]] = [
        ("train", cfg.train.epochs, cfg.train.warmup_epochs), ("finetune", f.epochs, f.warmup_epochs)]
    if _pretrain_runs(cfg):
        schedules.append(("base.pretrain", cfg.base.pretrain.epochs, cfg.base.pretrain.warmup_epochs))
    return [f"{sec}.warmup_epochs: {warmup:g} exceeds {sec}.epochs ({epochs}): the warm-up must fit in the schedule"
            for sec, epochs, warmup in schedules
            if epochs is not None and warmup is not None and ok(f"{sec}.epochs", f"{sec}.warmup_epochs")
            and warmup > epochs]


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
