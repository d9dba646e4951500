"""Reading encoder weights from the checkpoint formats users bring.

Supported (detected from the object's keys):
- MAE: ``{"model": state_dict}`` (decoder, mask token and heads are ignored);
- DINO / iBOT: ``{"teacher" | "student" | "state_dict": state_dict}`` with ``module.`` / ``backbone.`` prefixes
  (projection heads ignored); ``teacher`` is preferred when several are present;
- MoCo v3: ``{"state_dict": ...}`` of the DDP-wrapped MoCo model; the ViT is ``module.base_encoder.*`` (its
  ``head.*`` projection MLP ignored), ``module.momentum_encoder.*`` and ``module.predictor.*`` are ignored.
  MoCo v3's ViT-S has 12 heads: name it ``vit_small_patch16_224_mocov3`` (the weights cannot tell the head count);
- DINOv2: the official layout (``cls_token``, ``pos_embed`` with a cls row, ``register_tokens``, a 2-D
  ``mask_token``, ``blocks.N.ls1.gamma``), plain or as ``{"teacher": {"backbone.*", "dino_head.*", ...}}``, mapped
  onto timm's ``VisionTransformer`` by timm's own ``checkpoint_filter_fn`` (registers become ``reg_token``, the cls
  row of the position embedding is folded into ``cls_token``); a position embedding of another grid is resampled
  (logged), a patch size other than the architecture's is refused;
- a plain timm ``VisionTransformer`` state dict (what :func:`tec_model.export.export_encoder` writes);
- a TEC training state dict (``encoder.*`` keys plus adapters and decoder), bare or saved from a DDP-wrapped
  (``module.``) or torch.compile'd (``_orig_mod.``) model: folded on the fly exactly as export does.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary unpickling
(a pickled callable, a custom class) is refused with :class:`CheckpointError` before anything in it runs.
Encoder weights that hold NaN or infinity are refused too: such a base model would fill the target cache with
non-finite targets, and training on them would stop at its first step.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("teacher", "state_dict", "student", "model", "module")
STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.", "encoder.")
# Prefixes of the training wrappers (DDP's ``module.``, torch.compile's ``_orig_mod.``): stripped before the layout is
# detected, so a wrapped model's state dict is read exactly as the bare model's would be.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Weights of the pre-training machinery around an encoder: present in real checkpoints, never needed here.
IGNORED_PREFIXES = (
    "decoder", "mask_token", "head", "fc_norm", "masked_embed", "predictor", "projector", "dino_head",
    "feature_head", "attention_head", "input_adapter", "encoder_adapter", "target", "ibot_head",
)
MOCO_ENCODER = "base_encoder."  # MoCo v3: the encoder that is kept; its siblings below are dropped
MOCO_SIBLINGS = ("momentum_encoder.", "predictor.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: refused format, missing weights, or the wrong architecture."""


def read_checkpoint(src: str | os.PathLike | IO[bytes] | bytes, name: str | None = None) -> Any:
    """Load a checkpoint object safely (``weights_only=True``) onto the CPU.

    Args:
        src: a local path, an open binary file, or the file's bytes.
        name: how to name the source in errors (defaults to the path).

    Raises:
        CheckpointError: the file needs arbitrary unpickling, or is not a torch checkpoint.
    """
    label = name or (os.fspath(src) if isinstance(src, str | os.PathLike) else "<checkpoint bytes>")
    if isinstance(src, bytes | bytearray):
        src = io.BytesIO(src)
    try:
        # MAE/DeiT training checkpoints carry their argparse ``args``: a plain attribute bag, allowed by name
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _weights_only_detail(str(err))
        if "GLOBAL" not in detail:
            raise CheckpointError(f"{label} is not a readable torch checkpoint ({detail})") from None
        raise CheckpointError(
            f"refused to load {label}: it contains pickled Python objects beyond tensors and plain containers "
            f"(loading it would run code). Re-save its state dict with torch.save(model.state_dict(), path). "
            f"Detail: {detail}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{label} is not a readable torch checkpoint: {err}") from None


def _weights_only_detail(message: str) -> str:
    """The informative line of torch's weights-only error (the rest is boilerplate)."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()
    return message.strip().splitlines()[-1] if message.strip() else "unpickling failed"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _strip_wrappers(key: str) -> str:
    """``key`` without its leading training-wrapper prefixes (:data:`WRAPPER_PREFIXES`, in any order and number)."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def unwrap_state_dict(obj: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find the encoder state dict inside a checkpoint object and normalise its key names.

    Args:
        obj: what :func:`read_checkpoint` returned.
        key: force a wrapper key (e.g. ``"student"``) instead of auto-detection.

    Returns:
        (state_dict with ``module.``/``backbone.``/``encoder.`` prefixes stripped, detected format name). The
        training wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``) are stripped before the
        layout is detected: a wrapped TEC model's state dict is folded as the bare one's is.
    """
    fmt = "timm"
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"checkpoint has no {key!r} entry (top-level keys: {_keys(obj)})")
        obj, fmt = obj[key], key
    else:
        while isinstance(obj, Mapping) and not _is_state_dict(obj):
            found = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if found is None:
                break
            obj, fmt = obj[found], {"model": "mae", "teacher": "dino/ibot teacher"}.get(found, found)
    if not _is_state_dict(obj):
        raise CheckpointError(
            f"no state dict found in checkpoint (top-level keys: {_keys(obj)}); expected MAE {{'model': ...}}, "
            "DINO/iBOT {'teacher'|'student'|'state_dict': ...}, or a plain timm state dict"
        )
    obj = {_strip_wrappers(k): v for k, v in obj.items()}
    if any(k.startswith("encoder.") for k in obj) and any(k.startswith("input_adapter.") for k in obj):
        from tec_model.export import fold_tec_state_dict  # local import: export imports this module

        return fold_tec_state_dict(obj), "tec"
    state_dict = {_strip(k): v for k, v in obj.items()}
    if any(k.startswith(MOCO_ENCODER) for k in state_dict):
        return _moco_base_encoder(state_dict), "moco v3"
    if is_dinov2_layout(state_dict):
        fmt = "dinov2" if fmt == "timm" else f"dinov2 {fmt}"
    return state_dict, fmt


def _moco_base_encoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoCo v3's ``base_encoder`` weights; the momentum encoder and predictor go, anything else stays (and is then
    reported as weights the architecture lacks)."""
    kept = {k[len(MOCO_ENCODER):]: v for k, v in state_dict.items() if k.startswith(MOCO_ENCODER)}
    dropped = [k for k in state_dict if k.startswith(MOCO_SIBLINGS)]
    others = {k: v for k, v in state_dict.items() if not k.startswith((MOCO_ENCODER, *MOCO_SIBLINGS))}
    log.info("MoCo v3 checkpoint: using base_encoder (%d tensors), ignoring %d momentum_encoder/predictor tensors",
             len(kept), len(dropped))
    return {**others, **kept}


def is_dinov2_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether normalised keys are the official DINOv2 layout (its 2-D ``mask_token``; MAE's is 3-D)."""
    token = state_dict.get("mask_token")
    return token is not None and token.dim() == 2 and "cls_token" in state_dict


def _keys(obj: Any) -> str:
    return ", ".join(sorted(map(str, obj))[:12]) if isinstance(obj, Mapping) else type(obj).__name__


def load_encoder_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load encoder weights strictly, ignoring known pre-training heads.

    Args:
        model: the target timm ViT.
        state_dict: normalised keys (see :func:`unwrap_state_dict`).

    Returns:
        The ignored checkpoint keys (logged at INFO).

    Raises:
        CheckpointError: listing missing encoder weights, unexpected weights (wrong architecture), shape
            mismatches or weights holding NaN/inf; a DINOv2 checkpoint whose register tokens the architecture
            lacks (or the other way round).
    """
    if is_dinov2_layout(state_dict):
        state_dict = dinov2_to_timm(model, state_dict)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    extra = [k for k in state_dict if k not in own]
    ignored = sorted(k for k in extra if k.startswith(IGNORED_PREFIXES))
    unexpected = sorted(set(extra) - set(ignored))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    nonfinite = sorted(
        k for k in own
        if k in state_dict and state_dict[k].is_floating_point() and state_dict[k].shape == own[k].shape
        and not bool(torch.isfinite(state_dict[k]).all())
    )
    problems = []
    if missing:
        problems.append(f"missing encoder weights ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"weights the architecture lacks ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:20]))
    if nonfinite:
        problems.append(f"weights holding NaN or inf ({len(nonfinite)}): {', '.join(nonfinite[:20])}")
    if problems:
        what = "does not fit the architecture" if missing or unexpected or shapes else "is unusable"
        raise CheckpointError(f"checkpoint {what} — " + " | ".join(problems))
    model.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    if ignored:
        log.info("ignored %d non-encoder checkpoint weights (heads/decoder): %s", len(ignored), ", ".join(ignored[:8]))
    return ignored


def dinov2_to_timm(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official DINOv2 state dict onto a timm ViT with timm's own ``checkpoint_filter_fn``.

    The patch embedding is kept out of timm's filter, which would resample it to another patch size: a checkpoint of
    another patch size is reported as a shape mismatch instead.

    Args:
        model: the target timm ViT (its register tokens, ``no_embed_class`` and grid decide the mapping).
        state_dict: normalised keys in the DINOv2 layout (see :func:`is_dinov2_layout`).

    Returns:
        timm keys: ``reg_token``, ``cls_token`` (with the cls position folded in), ``pos_embed`` over patches only
        when the checkpoint has registers.

    Raises:
        CheckpointError: the checkpoint's register tokens do not match the architecture's, or its position
            embedding cannot be resampled to the architecture's grid.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn  # keeps import time low for plain formats

    no_embed_class = _check_dinov2_registers(model, state_dict.get("register_tokens"))
    sd = dict(state_dict)
    patch = sd.pop("patch_embed.proj.weight", None)
    pos = sd.get("pos_embed")
    if pos is None or pos.dim() != 3:
        got = None if pos is None else tuple(pos.shape)
        raise CheckpointError(f"DINOv2 checkpoint has no usable pos_embed (got {got}; expected (1, 1 + patches, C))")
    try:
        out = checkpoint_filter_fn(sd, model)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"DINOv2 checkpoint does not fit the architecture — pos_embed {tuple(pos.shape)} vs "
                              f"model {tuple(model.pos_embed.shape)}: {err}") from None
    if patch is not None:
        out["patch_embed.proj.weight"] = patch
    ckpt_patches, model_patches = pos.shape[1] - 1, model.pos_embed.shape[1] - (not no_embed_class)
    if ckpt_patches != model_patches:
        log.warning("DINOv2 position embedding resampled by timm from %d to %d patch positions (grid %s)",
                    ckpt_patches, model_patches, tuple(model.patch_embed.grid_size))
    return out


def _check_dinov2_registers(model: nn.Module, registers: torch.Tensor | None) -> bool:
    """Refuse a DINOv2 checkpoint whose register tokens the architecture lacks, or the other way round (timm's
    mapping assumes registers go with ``no_embed_class``). Returns the model's ``no_embed_class``."""
    model_regs = int(getattr(model, "num_reg_tokens", 0))
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    if registers is not None and not (model_regs and no_embed_class):
        raise CheckpointError(
            f"checkpoint is a DINOv2 ViT with register tokens (register_tokens {tuple(registers.shape)}) but the "
            f"architecture has {model_regs} register tokens (no_embed_class {no_embed_class}): name a "
            "vit_*_patch14_reg4_dinov2 arch or set reg_tokens and no_embed_class"
        )
    if registers is None and (model_regs or no_embed_class):
        raise CheckpointError(
            f"checkpoint is a DINOv2 ViT without register tokens but the architecture has {model_regs} register "
            f"tokens (no_embed_class {no_embed_class}): name a vit_*_patch14_dinov2 arch"
        )
    return no_embed_class
