"""The model a fine-tuning run trains, built from its checkpoint (docs/finetune.md#1-protocols-and-recipes).

* ``finetune``: a timm ``VisionTransformer`` with ``num_classes`` outputs, ``global_pool`` (``avg``: patch mean
  then a fresh ``fc_norm``, the final norm dropped, as MAE's fine-tuning model) and ``drop_path_rate``; the encoder
  weights come from any checkpoint :mod:`tec_model.checkpoint` reads (a TEC export, a kept-adapter export, folded on
  the fly, an MAE / DINO / iBOT / MoCo v3 / timm file), checked strictly against the architecture first. The head
  is initialised as MAE's: ``trunc_normal(std=2e-5)`` weights, zero bias.
* ``peft_prompt`` / ``peft_both``: :func:`tec_model.peft.build_peft_model` on a kept-adapter export: the encoder
  frozen, the input adapter (and for ``peft_both`` the encoder adapter) and a linear head trained.

Every file is read with ``weights_only=True``.
"""

from __future__ import annotations

import logging

from timm.layers import trunc_normal_
from torch import nn

from infra import storage
from stages.finetune.job import FinetuneInputError, FinetuneJob
from tec_model import CheckpointError, build_vit, load_encoder_weights, read_checkpoint, unwrap_state_dict
from tec_model.peft import build_peft_model

log = logging.getLogger(__name__)

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head: trunc_normal_(head.weight, std=2e-5)
FRESH_PREFIXES = ("head.", "fc_norm.")  # what a fine-tuning model adds to the encoder


def build_model(job: FinetuneJob) -> nn.Module:
    """The job's model on the CPU, with its checkpoint's weights and the protocol's parameters frozen.

    Raises:
        FinetuneInputError: the checkpoint does not fit ``timm_kwargs`` (another architecture), or lacks what the
            protocol trains; the message names ``checkpoint_url`` and the checkpoint loader's reasons.
    """
    obj = read_checkpoint(storage.read_bytes(job.checkpoint_url), name=storage.redact_url(job.checkpoint_url))
    try:
        if job.protocol == "finetune":
            model = _finetune_model(job, obj)
        else:
            state = obj if isinstance(obj, dict) else {}
            model = build_peft_model(job.timm_kwargs, state, "input" if job.protocol == "peft_prompt" else "both",
                                     job.num_classes, pool=job.global_pool, drop_path_rate=job.drop_path)
    except CheckpointError as err:
        raise FinetuneInputError(f"checkpoint_url: {storage.redact_url(job.checkpoint_url)} does not fit this run "
                                 f"(timm_kwargs: embed_dim {job.timm_kwargs.get('embed_dim')}, depth "
                                 f"{job.timm_kwargs.get('depth')}, protocol {job.protocol}): {err}") from None
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %d of %d parameters trained", job.protocol, trained, sum(p.numel() for p in model.parameters()))
    return model


def _finetune_model(job: FinetuneJob, obj: object) -> nn.Module:
    """A classification ViT whose encoder weights come from ``obj`` (checked strictly on a plain ViT first)."""
    state_dict, fmt = unwrap_state_dict(obj, key=job.checkpoint_key)
    plain = build_vit({**job.timm_kwargs, "num_classes": 0, "global_pool": "token"})
    load_encoder_weights(plain, state_dict)
    model = build_vit({**job.timm_kwargs, "num_classes": job.num_classes, "global_pool": job.global_pool,
                       "drop_path_rate": job.drop_path})
    own = model.state_dict()
    result = model.load_state_dict({k: v for k, v in plain.state_dict().items() if k in own}, strict=False)
    if stray := [k for k in result.missing_keys if not k.startswith(FRESH_PREFIXES)]:
        raise CheckpointError(f"the classification model lacks encoder weights {stray[:10]}")
    trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(model.head.bias)
    log.info("fine-tuning a %s checkpoint; fresh: %s", fmt, ", ".join(sorted(result.missing_keys)))
    return model
