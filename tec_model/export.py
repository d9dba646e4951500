"""Export a trained TEC encoder: as a plain timm ViT state dict (adapters folded, decoder dropped), or with its
adapters kept unfolded for parameter-efficient fine-tuning (docs/finetune.md#2-peft-with-kept-adapters)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from tec_model.tec import TECModel

# What a kept-adapter export holds: TEC's training layout without the decoder and the heads.
ENCODER_PREFIX = "encoder."
INPUT_ADAPTER_PREFIX = "input_adapter."
ENCODER_ADAPTER_PREFIX = "encoder_adapter."
KEPT_PREFIXES = (ENCODER_PREFIX, INPUT_ADAPTER_PREFIX, ENCODER_ADAPTER_PREFIX)


def fold_cls_token(cls_token: torch.Tensor, adapter: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply the input adapter MLP (fc1 → GELU → fc2) to the cls token, as the model's forward does.

    Exact because the cls position embedding is zero: ``adapter(cls) + 0`` is what every forward adds.

    Args:
        cls_token: (1, 1, C).
        adapter: ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``.

    Returns:
        (1, 1, C).
    """
    h = F.gelu(F.linear(cls_token, adapter["fc1.weight"], adapter["fc1.bias"]))
    return F.linear(h, adapter["fc2.weight"], adapter["fc2.bias"])


def fold_tec_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a :class:`TECModel` state dict into a timm ViT state dict.

    Keeps ``encoder.*`` (prefix removed), folds ``input_adapter.*`` into ``cls_token``, drops everything else.
    """
    out = {k[len("encoder."):]: v.detach().clone() for k, v in state_dict.items() if k.startswith("encoder.")}
    adapter = {k[len("input_adapter."):]: v for k, v in state_dict.items() if k.startswith("input_adapter.")}
    if adapter:
        with torch.no_grad():
            out["cls_token"] = fold_cls_token(out["cls_token"].float(), {k: v.float() for k, v in adapter.items()})
    return out


def export_encoder(model: TECModel) -> dict[str, torch.Tensor]:
    """The trained encoder as a state dict that ``timm.create_model(arch, num_classes=0)`` loads with strict=True."""
    return fold_tec_state_dict(model.state_dict())


def export_with_adapters(model: TECModel) -> dict[str, torch.Tensor]:
    """The encoder with its adapters kept unfolded: ``encoder.*`` (timm names after the prefix, the cls token as
    trained, not folded), ``input_adapter.*`` (the cls-token MLP, docs/method.md#42-input-adapter) and
    ``encoder_adapter.*`` (the block-output merger, docs/method.md#43-encoder-adapters); the decoder and heads are
    dropped.

    :func:`tec_model.peft.build_peft_model` rebuilds a timm ViT with the adapters from it; any loader of
    :mod:`tec_model.checkpoint` reads it as a TEC state dict and folds the input adapter, as :func:`export_encoder`
    does. A model without an adapter has no keys of it.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(KEPT_PREFIXES)}


def export_mae(model: TECModel) -> dict[str, torch.Tensor]:
    """A pixel-MAE model as MAE's checkpoint lays it out: encoder weights under timm names, then ``decoder.*``
    (blocks, norms, position embedding) and ``decoder_pred.*`` (the pixel head).

    Wrap it as ``{"model": ...}``; :func:`tec_model.checkpoint.unwrap_state_dict` reads it as an MAE checkpoint and
    :func:`tec_model.checkpoint.load_encoder_weights` ignores the decoder.
    """
    out = export_encoder(model)
    out.update({f"decoder.{k}": v.detach().clone() for k, v in model.decoder.state_dict().items()})
    out.update({f"decoder_pred.{k}": v.detach().clone() for k, v in model.feature_head.state_dict().items()})
    return out
