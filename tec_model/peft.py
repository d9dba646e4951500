"""Parameter-efficient fine-tuning with the adapters TEC kept (the paper's Tab. 5; docs/finetune.md).

A kept-adapter export (:func:`tec_model.export.export_with_adapters`) holds the encoder with its cls token as
trained, the input adapter and the encoder adapter. :func:`build_peft_model` rebuilds from it a timm
``VisionTransformer`` wrapped with those adapters (:class:`AdaptedViT`) and a linear head, and freezes what the
setting leaves fixed:

* ``tune="input"`` (Tab. 5 "+Input adapter FT", a prompt): the input adapter turns the frozen cls token into the
  prompt the frozen encoder reads; the input adapter and the head are trained. The encoder adapter is not used.
* ``tune="both"`` (Tab. 5 "+Encoder adapter FT"): the encoder adapter merges every block's output into the tokens
  the head reads, as it fed the decoder in pre-training; both adapters and the head are trained.

The encoder is frozen in both (``requires_grad=False``). Pure torch + timm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tec_model.archs import build_vit
from tec_model.checkpoint import CheckpointError, load_encoder_weights
from tec_model.export import ENCODER_ADAPTER_PREFIX, ENCODER_PREFIX, INPUT_ADAPTER_PREFIX
from tec_model.layers import EncoderAdapter, block_groups

Tune = Literal["input", "both"]
TUNES = ("input", "both")
POOLS = ("token", "avg")
HEAD_INIT_STD = 0.01  # MAE's linear probe initialises its head with trunc_normal(std=0.01)


def split_kept(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """A kept-adapter export's parts: (encoder as timm names, input adapter, encoder adapter), prefixes removed.

    Raises:
        CheckpointError: the state dict has no ``encoder.*`` weights (not a kept-adapter export).
    """
    parts: list[dict[str, torch.Tensor]] = []
    for prefix in (ENCODER_PREFIX, INPUT_ADAPTER_PREFIX, ENCODER_ADAPTER_PREFIX):
        parts.append({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    if not parts[0]:
        keys = ", ".join(sorted(state_dict)[:8])
        raise CheckpointError(f"not a kept-adapter export: no encoder.* weights (keys: {keys}); write one with "
                              "tec_model.export.export_with_adapters (the train stage's export/encoder_adapters.pth)")
    return tuple(parts)


class AdaptedViT(nn.Module):
    """A frozen-encoder classifier: input adapter on the cls token, optional encoder adapter, linear head.

    Args:
        encoder: a timm ViT with a class token and a position embedding over cls + patches (a TEC new model).
        num_classes: outputs of the head.
        input_adapter: the cls-token MLP (C → 4C → C).
        encoder_adapter: merges the block outputs into the tokens the head reads; None reads the final-normed tokens.
        pool: ``token`` (the cls token, as MAE's linear probe) or ``avg`` (mean of the patch tokens).
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, input_adapter: nn.Module,
                 encoder_adapter: EncoderAdapter | None = None, pool: str = "token") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.encoder, self.input_adapter, self.encoder_adapter = encoder, input_adapter, encoder_adapter
        self.pool = pool
        dim = encoder.embed_dim
        # MAE's linear probe: an affine-free BatchNorm before the linear layer
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head[1].bias)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The tokens the head pools.

        Args:
            imgs: (N, C_in, S, S).

        Returns:
            (N, 1 + L, C): the encoder adapter's output, or the encoder's final-normed tokens without it; cls first.
        """
        enc = self.encoder
        cls = self.input_adapter(enc.cls_token) + enc.pos_embed[:, :1]
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        outputs = []
        for block in enc.blocks:
            x = block(x)
            outputs.append(x)
        outputs[-1] = enc.norm(x)
        return self.encoder_adapter(outputs) if self.encoder_adapter is not None else outputs[-1]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Args: imgs: (N, C_in, S, S). Returns: (N, num_classes) logits."""
        tokens = self.forward_features(imgs)
        return self.head(tokens[:, 0] if self.pool == "token" else tokens[:, 1:].mean(dim=1))


def _load_part(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load an adapter strictly; a key or shape mismatch becomes a :class:`CheckpointError` naming it."""
    own = module.state_dict()
    problems = sorted(set(own) ^ set(weights))
    problems += [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"the checkpoint's {what} does not fit the architecture: {'; '.join(problems[:10])}")
    module.load_state_dict(weights, strict=True)


def _encoder_adapter(weights: dict[str, torch.Tensor], embed_dim: int, depth: int) -> EncoderAdapter:
    """The encoder adapter sized from its weights (hidden width from the first MLP, group count checked)."""
    fc1 = weights.get("mlp.0.fc1.weight")
    if fc1 is None:
        raise CheckpointError(f"the checkpoint's encoder_adapter has no mlp.0.fc1.weight (keys: {sorted(weights)[:8]})")
    groups = len({k.split(".")[1] for k in weights if k.startswith("fc.")})
    if groups != len(block_groups(depth)):
        raise CheckpointError(f"the checkpoint's encoder_adapter has {groups} block groups, a depth-{depth} encoder "
                              f"has {len(block_groups(depth))}")
    adapter = EncoderAdapter(embed_dim, depth, int(fc1.shape[0]))
    _load_part(adapter, weights, "encoder_adapter")
    return adapter


def build_peft_model(timm_kwargs: dict[str, Any], state_dict: Mapping[str, torch.Tensor], tune: Tune,
                     num_classes: int, pool: str = "token", drop_path_rate: float = 0.0) -> AdaptedViT:
    """The Tab. 5 model of a kept-adapter export, with the parameters ``tune`` leaves fixed frozen.

    Args:
        timm_kwargs: the encoder's ViT kwargs (the new model's; ``num_classes`` / ``global_pool`` are replaced).
        state_dict: a kept-adapter export (:func:`tec_model.export.export_with_adapters`).
        tune: ``input`` (the input adapter as a prompt) or ``both`` (input and encoder adapters); the head is
            always trained, the encoder never.
        num_classes: the head's outputs.
        pool: what the head reads (see :class:`AdaptedViT`).
        drop_path_rate: stochastic depth in the frozen encoder's blocks (a regulariser; no weight changes).

    Raises:
        CheckpointError: not a kept-adapter export, an adapter the setting needs is missing, or weights that do
            not fit the architecture (naming them).
    """
    if tune not in TUNES:
        raise ValueError(f"tune must be one of {TUNES}, got {tune!r}")
    encoder_sd, input_sd, adapter_sd = split_kept(state_dict)
    for needed, weights, name in ((True, input_sd, "input_adapter"), (tune == "both", adapter_sd, "encoder_adapter")):
        if needed and not weights:
            raise CheckpointError(f"the checkpoint has no {name}.* weights, which tune={tune!r} trains: it was "
                                  "pre-trained without that adapter (model.adapters) or is not a kept-adapter export")
    encoder = build_vit({**timm_kwargs, "num_classes": 0, "global_pool": "token", "drop_path_rate": drop_path_rate})
    load_encoder_weights(encoder, encoder_sd)
    dim, depth = encoder.embed_dim, len(encoder.blocks)
    hidden = input_sd.get("fc1.weight", torch.empty(4 * dim, dim)).shape[0]
    input_adapter = Mlp(dim, int(hidden), dim, act_layer=nn.GELU)
    _load_part(input_adapter, input_sd, "input_adapter")
    encoder_adapter = _encoder_adapter(adapter_sd, dim, depth) if tune == "both" else None
    model = AdaptedViT(encoder, num_classes, input_adapter, encoder_adapter, pool)
    model.encoder.requires_grad_(False)
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters an optimiser will update (``requires_grad``), sorted."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)
