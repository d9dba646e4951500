"""Reading encoder weights from the checkpoint formats users bring.

Supported (detected from the object's keys):
- MAE: ``{"model": state_dict}`` (decoder, mask token and heads are ignored);
- DINO / iBOT: ``{"teacher" | "student" | "state_dict": state_dict}`` with ``module.`` / ``backbone.`` prefixes
  (projection heads ignored); ``teacher`` is preferred when several are present;
- a plain timm ``VisionTransformer`` state dict (what :func:`tec_model.export.export_encoder` writes);
- a TEC training state dict (``encoder.*`` keys plus adapters and decoder): folded on the fly exactly as export does.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary unpickling
(a pickled callable, a custom class) is refused with :class:`CheckpointError` before anything in it runs.
Encoder weights that hold NaN or infinity are refused too: such a base model would fill the target cache with
non-finite targets, and training on them would stop at its first step.
"""

from __future__ import annotations

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
# Weights of the pre-training machinery around an encoder: present in real checkpoints, never needed here.
IGNORED_PREFIXES = (
    "decoder", "mask_token", "head", "fc_norm", "masked_embed", "predictor", "projector", "dino_head",
    "feature_head", "attention_head", "input_adapter", "encoder_adapter", "target",
)


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
        (state_dict with ``module.``/``backbone.``/``encoder.`` prefixes stripped, detected format name).
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
    if any(k.startswith("encoder.") for k in obj) and any(k.startswith("input_adapter.") for k in obj):
        from tec_model.export import fold_tec_state_dict  # local import: export imports this module

        return fold_tec_state_dict(obj), "tec"
    return {_strip(k): v for k, v in obj.items()}, fmt


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
            mismatches or weights holding NaN/inf.
    """
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
