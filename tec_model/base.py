"""The frozen base model and the targets it gives TEC (docs/method.md#2-base-model-targets)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import IO, Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tec_model.archs import build_vit
from tec_model.checkpoint import load_encoder_weights, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)


@dataclass
class BaseTargets:
    """What one base-model forward gives, for N views.

    Attributes:
        features: (N, L, C_base) mean of the last ``last_layers`` block outputs, patch tokens only (cls and register
            tokens dropped), pre-final-norm.
        attn_logits: (N, K+1, H, L) last-block pre-softmax logits; rows [cls, top-K patches] queries, columns the
            patch keys only (cls and register keys dropped).
        topk_index: (N, K) long patch indices, descending by head-mean cls→patch logit.
    """

    features: torch.Tensor
    attn_logits: torch.Tensor
    topk_index: torch.Tensor


def last_block_qk(vit: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of the last block's attention, as its own forward computes them.

    Args:
        vit: a timm ViT.
        x: (N, T, D) the last block's input tokens (prefix tokens first).

    Returns:
        q, k: (N, H, T, d_head) after the block's q/k norms, q already multiplied by the attention scale.
    """
    block = vit.blocks[-1]
    attn = block.attn
    n, t, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return q * attn.scale, k


def compute_targets(vit: VisionTransformer, x: torch.Tensor, last_layers: int, k_max: int) -> BaseTargets:
    """Run a ViT once and build TEC's targets.

    Args:
        vit: a timm ViT (frozen, eval mode).
        x: (N, C_in, S, S) normalised views.
        last_layers: how many final blocks to average for the feature target.
        k_max: how many top patches to keep for the attention target.

    Returns:
        :class:`BaseTargets` in float32 (``topk_index`` long).

    Raises:
        ValueError: a ViT without a class token (its query row is a target), or impossible ``last_layers``/``k_max``.
    """
    depth, n_prefix = len(vit.blocks), vit.num_prefix_tokens  # prefix: cls first, then any register tokens
    if vit.cls_token is None:
        raise ValueError("the base model needs a class token (class_token=True): its attention row is a target")
    if not 1 <= last_layers <= depth:
        raise ValueError(f"last_layers must be in [1, {depth}], got {last_layers}")
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    length = h.shape[1] - n_prefix
    if not 1 <= k_max <= length:
        raise ValueError(f"k_max must be in [1, {length}] (the number of patches), got {k_max}")
    feats = []
    for i, block in enumerate(vit.blocks):
        if i == depth - 1:
            q, k = last_block_qk(vit, h)
        h = block(h)
        if i >= depth - last_layers:
            feats.append(h[:, n_prefix:].float())
    features = torch.stack(feats).mean(0)

    q, k = q.float(), k.float()
    k_patch = k[:, :, n_prefix:]  # (N, H, L, d)
    cls_logits = q[:, :, :1] @ k_patch.transpose(-2, -1)  # (N, H, 1, L)
    topk_index = cls_logits[:, :, 0].mean(1).topk(k_max, dim=-1, sorted=True).indices  # (N, K)
    rows = torch.gather(
        q[:, :, n_prefix:], 2, topk_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
    )  # (N, H, K, d)
    row_logits = rows @ k_patch.transpose(-2, -1)  # (N, H, K, L)
    attn_logits = torch.cat([cls_logits, row_logits], dim=2).transpose(1, 2)  # (N, K+1, H, L)
    return BaseTargets(features=features, attn_logits=attn_logits.contiguous(), topk_index=topk_index)


class BaseModel(nn.Module):
    """A frozen timm ViT that produces TEC targets; never trained, always in eval mode.

    Args:
        timm_kwargs: kwargs of :class:`VisionTransformer` (see :func:`tec_model.archs.vit_kwargs`).
        last_layers: blocks averaged for the feature target (2 in the paper).
        k_max: top patches kept for the attention target (≥ any ``topk`` a run will use).
    """

    def __init__(self, timm_kwargs: dict[str, Any], last_layers: int = 2, k_max: int = 15) -> None:
        super().__init__()
        self.timm_kwargs = dict(timm_kwargs)
        self.vit = build_vit(self.timm_kwargs)
        self.last_layers = last_layers
        self.k_max = k_max
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(
        cls,
        src: str | os.PathLike | IO[bytes] | bytes,
        timm_kwargs: dict[str, Any],
        last_layers: int = 2,
        k_max: int = 15,
        checkpoint_key: str | None = None,
        name: str | None = None,
    ) -> BaseModel:
        """Build the architecture and load encoder weights from any supported checkpoint format (``name``: the
        checkpoint's URL, for error messages when ``src`` is bytes)."""
        model = cls(timm_kwargs, last_layers=last_layers, k_max=k_max)
        state_dict, fmt = unwrap_state_dict(read_checkpoint(src, name=name), key=checkpoint_key)
        load_encoder_weights(model.vit, state_dict)
        log.info("base model loaded (%s format, %d tensors)", fmt, len(state_dict))
        return model

    def train(self, mode: bool = True) -> BaseModel:
        """Stay in eval mode whatever the caller asks: the base model is frozen."""
        return super().train(False)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[-1].attn.num_heads

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> BaseTargets:
        """Targets for a batch of views.

        Args:
            x: (N, C_in, S, S) normalised views.

        Returns:
            :class:`BaseTargets` (features (N, L, C_base), attn_logits (N, K_max+1, H, L), topk_index (N, K_max)).
        """
        return compute_targets(self.vit, x, self.last_layers, self.k_max)
