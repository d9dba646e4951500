"""Analytic multiply-accumulate (MAC) counts for ViT forwards.

Convention (docs/method.md#11-flops-convention): these are MACs. The paper's "17.6 G" for a ViT-B/16 forward at
224 is MACs; torch's ``FlopCounterMode`` reports 2 FLOPs per MAC. Norms, softmax, GELU and
additions are not counted (< 1% for ViTs).
"""

from __future__ import annotations

from typing import Any

from tec_model.archs import num_patches


def block_macs(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """MACs of one transformer block on ``tokens`` tokens of width ``dim``.

    qkv ``T·D·3D`` + scores ``T·T·D`` + weighted values ``T·T·D`` + projection ``T·D·D`` + MLP ``2·T·D·rD``.
    """
    hidden = int(dim * mlp_ratio)
    return tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * hidden


def vit_forward_macs(timm_kwargs: dict[str, Any], tokens: int | None = None) -> int:
    """MACs of one ViT forward (patch embedding + all blocks) for one image.

    Args:
        timm_kwargs: the ViT's kwargs (img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio, ...).
        tokens: tokens the blocks see (default: all patches plus prefix tokens; pass fewer for a masked encoder).
    """
    patch, dim, length = timm_kwargs["patch_size"], timm_kwargs["embed_dim"], num_patches(timm_kwargs)
    prefix = int(timm_kwargs.get("class_token", True)) + int(timm_kwargs.get("reg_tokens", 0) or 0)
    t = length + prefix if tokens is None else tokens
    embed = length * patch * patch * timm_kwargs.get("in_chans", 3) * dim
    per_block = block_macs(t, dim, timm_kwargs.get("mlp_ratio", 4.0))
    return embed + timm_kwargs["depth"] * per_block
