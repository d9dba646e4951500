"""Analytic multiply-accumulate counts of a TEC training step and of a base-model forward, for the ledger.

Units (docs/method.md#11-flops-convention): every number here is **MACs; FLOPs = 2×MACs**. The paper's "17.6 G" for a
ViT-B/16 forward is MACs; ``torch.utils.flop_counter.FlopCounterMode`` reports FLOPs (2 per MAC) and counts only
matmul-like ops (linear, matmul/bmm, convolution), and nothing for CPU fused attention. Norms, softmax, GELU,
additions, gathers and the losses are not counted here either (< 1% of a ViT), so with non-fused attention
``FlopCounterMode`` total / 2 equals :func:`tec_step_macs`'s ``forward_macs`` exactly (tests/pipeline/test_flops.py).

Training cost uses the usual rule: forward + backward ≈ 3 × forward (the backward of a matmul is two matmuls of
the same size: the input gradient and the weight gradient). It slightly over-counts: the patch embedding needs no
input gradient, and frozen parameters need no weight gradient.
"""

from __future__ import annotations

from typing import Any

from tec_model.archs import num_patches as count_patches
from tec_model.flops import block_macs, vit_forward_macs
from tec_model.layers import AttentionHead, block_groups
from tec_model.masking import num_visible
from tec_model.tec import check_args

UNIT = "MACs (multiply-accumulates; FLOPs = 2×MACs)"
TRAIN_FACTOR = 3  # forward + backward ≈ 3 × forward
DECODER_MLP_RATIO = 4.0  # MultiTargetDecoder's blocks


def base_macs_per_view(timm_kwargs: dict[str, Any]) -> int:
    """MACs (FLOPs = 2×MACs) of one base-model forward on one full view: patch embedding + all blocks.

    The same formula as :func:`tec_model.flops.vit_forward_macs` (the cache's ``flops.base_forward_macs_per_view``).
    17.56 G for ViT-B/16 at 224, the paper's "17.6 G".
    """
    return vit_forward_macs(timm_kwargs)


def tec_step_macs(
    timm_kwargs_new: dict[str, Any],
    base_embed_dim: int,
    base_num_heads: int,
    num_patches: int,
    *,
    mask_ratio: float = 0.75,
    adapters: str = "both",
    attention_target: bool = True,
    topk: int = 15,
    decoder_dim: int = 512,
    decoder_depth: int = 2,
    decoder_heads: int = 16,
    att_proj_dim: int | None = None,
) -> dict[str, Any]:
    """Forward MACs (FLOPs = 2×MACs) per sample of each part of :class:`tec_model.TECModel`, and the step total.

    With ``C`` the new width, ``L`` patches, ``L_vis = int(L·(1 − mask_ratio))``, ``D`` = D_dec, ``P`` the attention
    projection width, ``k`` = topk, ``paths`` = 2 with the attention target else 1:

    - ``patch_embed_macs``: ``L·p²·C_in·C`` (all patches are embedded, masking comes after);
    - ``encoder_blocks_macs``: ``depth`` timm blocks on ``1 + L_vis`` tokens (:func:`tec_model.flops.block_macs`);
    - ``input_adapter_macs``: ``8·C²``, the cls-token MLP (C → 4C → C). TECModel runs it **once per batch**, so
      per sample it is this divided by the batch size; it is counted whole here (≈ 0.03% of ViT-B's step);
    - ``encoder_adapters_macs``: per group of ``g`` blocks, ``(1 + L_vis)·(g·C·C + 2·C·4D)`` (FC + MLP);
    - ``decoder_embed_macs``: ``paths·(1 + L_vis)·C·D``;
    - ``decoder_blocks_macs``: the shared blocks run once per path on ``1 + L`` tokens:
      ``paths·decoder_depth·block_macs(1 + L, D)``;
    - ``feature_head_macs``: ``L·D·C_base`` (cls dropped before the head);
    - ``attention_head_macs``: qk projection ``(1 + L)·D·2P`` + logits ``(k + 1)·L·P`` (H heads of width P/H).

    Args:
        timm_kwargs_new: the new encoder's VisionTransformer kwargs.
        base_embed_dim: C_base, channels of the feature target.
        base_num_heads: H_base, heads of the attention target (does not change the count; P must divide by it).
        num_patches: L (must match the new model's grid).
        mask_ratio: fraction of masked patches.
        adapters: ``none`` | ``input`` | ``encoder`` | ``both``.
        attention_target: whether the attention path and head exist.
        topk: attention rows besides cls.
        decoder_dim: D_dec. decoder_depth: shared blocks. decoder_heads: their heads (no effect on MACs).
        att_proj_dim: P (default C_base).

    Returns:
        A dict: the parts above, ``forward_macs`` (their sum), ``train_macs_per_sample`` (= 3 × forward:
        forward + backward ≈ 3× forward), ``visible_tokens``, ``num_patches`` and ``unit``.
    """
    kw, proj = timm_kwargs_new, att_proj_dim or base_embed_dim
    problems = [f"{names[0]}: {message}" for names, message in check_args(
        kw, num_patches, adapters=adapters, topk=topk, mask_ratio=mask_ratio, decoder_dim=decoder_dim,
        decoder_heads=decoder_heads)]
    if attention_target and (head := AttentionHead.check_args(proj, base_num_heads)):
        problems.append(head)
    if problems:
        raise ValueError("incompatible TEC model settings: " + "; ".join(problems))
    c, depth, patch, length = kw["embed_dim"], kw["depth"], kw["patch_size"], count_patches(kw)
    vis = num_visible(length, mask_ratio)
    enc_tokens, dec_tokens, d = 1 + vis, 1 + length, decoder_dim
    paths = 2 if attention_target else 1
    hidden = 4 * d  # the encoder adapters' MLP width (4·D_dec)
    enc_adapters = sum(enc_tokens * (len(g) * c * c + 2 * c * hidden) for g in block_groups(depth))
    parts = {
        "patch_embed_macs": length * patch * patch * kw.get("in_chans", 3) * c,
        "encoder_blocks_macs": depth * block_macs(enc_tokens, c, kw.get("mlp_ratio", 4.0)),
        "input_adapter_macs": 8 * c * c if adapters in ("input", "both") else 0,
        "encoder_adapters_macs": enc_adapters if adapters in ("encoder", "both") else 0,
        "decoder_embed_macs": paths * enc_tokens * c * d,
        "decoder_blocks_macs": paths * decoder_depth * block_macs(dec_tokens, d, DECODER_MLP_RATIO),
        "feature_head_macs": length * d * base_embed_dim,
        "attention_head_macs": dec_tokens * d * 2 * proj + (topk + 1) * length * proj if attention_target else 0,
    }
    forward = sum(parts.values())
    return {**parts, "forward_macs": forward, "train_macs_per_sample": TRAIN_FACTOR * forward,
            "visible_tokens": vis, "num_patches": length, "unit": UNIT}


def format_macs(macs: float) -> str:
    """``17.56 GMAC (35.13 GFLOP)``: a MAC count with its FLOP equivalent, in engineering units."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(macs) >= scale:
            return f"{macs / scale:.2f} {prefix}MAC ({2 * macs / scale:.2f} {prefix}FLOP)"
    return f"{macs:.0f} MAC ({2 * macs:.0f} FLOP)"
