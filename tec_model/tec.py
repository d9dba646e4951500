"""The new model TEC trains: a timm ViT encoder with input/encoder adapters and a multi-target decoder."""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.layers import Mlp
from torch import nn

from tec_model.archs import build_vit, check_vit_kwargs, num_patches
from tec_model.layers import AttentionHead, EncoderAdapter, MultiTargetDecoder
from tec_model.losses import FeatureNorm, attention_loss, feature_loss, normalize_features
from tec_model.masking import num_visible, random_masking
from tec_model.pos_embed import sincos_2d

Adapters = Literal["none", "input", "encoder", "both"]
ADAPTERS = ("none", "input", "encoder", "both")
FEATURE_NORMS = ("patch", "channel", "none")


Problem = tuple[tuple[str, ...], str]  # (the argument names a problem reads, the first to blame; its message)


def check_args(
    timm_kwargs: dict[str, Any] | None,
    base_num_patches: int | None,
    *,
    adapters: str = "both",
    feature_norm: str = "patch",
    topk: int = 15,
    att_tau: float = 1.8,
    mask_ratio: float = 0.75,
    decoder_dim: int = 512,
    decoder_heads: int = 16,
) -> list[Problem]:
    """Why these :class:`TECModel` arguments cannot make a model; empty when they can.

    Args:
        timm_kwargs: the new encoder's ViT kwargs; None when unknown (the rules on them are skipped).
        base_num_patches: L of the base model; None when unknown.
        adapters, feature_norm, topk, att_tau, mask_ratio, decoder_dim, decoder_heads: as :class:`TECModel`.

    Returns:
        One ``(names, message)`` per problem: the arguments it reads (ViT sizes by their timm kwarg name), the one
        to blame first, and a message that reads after ``"<name>: "``.
    """
    out: list[Problem] = []
    length = base_num_patches
    if timm_kwargs is not None:
        kw = timm_kwargs
        out += check_vit_kwargs(kw)
        if out:
            return out
        length = num_patches(kw)
        if base_num_patches is not None and length != base_num_patches:
            out.append((("patch_size", "img_size"), f"the new model has L={length} patches (img_size {kw['img_size']}"
                        f" / patch_size {kw['patch_size']}) but the base model has L={base_num_patches} (the "
                        "targets are per base patch)"))
        if kw["embed_dim"] % 4:
            out.append((("embed_dim",), f"the new model's embed_dim {kw['embed_dim']} must be divisible by 4 (2-D "
                        "sin-cos position embedding)"))
        if kw.get("reg_tokens", 0) or not kw.get("class_token", True) or kw.get("no_embed_class", False):
            out.append((("reg_tokens", "class_token", "no_embed_class"), "the new model must be a plain ViT (a class "
                        "token, no register tokens, position embedding over cls + patches): register/no-class-token "
                        "architectures serve as base models only"))
    if decoder_heads < 1 or decoder_dim % 4 or decoder_dim % decoder_heads:
        out.append((("decoder_dim", "decoder_heads"),
                    f"{decoder_dim} must be divisible by 4 and by decoder_heads {decoder_heads}"))
    if adapters not in ADAPTERS:
        out.append((("adapters",), f"must be one of {ADAPTERS}, got {adapters!r}"))
    if feature_norm not in FEATURE_NORMS:
        out.append((("feature_norm",), f"must be one of {FEATURE_NORMS}, got {feature_norm!r}"))
    if length is not None and not 1 <= topk <= length:
        out.append((("topk",), f"must be in [1, {length}], got {topk}"))
    if att_tau <= 0:
        out.append((("att_tau",), f"must be > 0, got {att_tau}"))
    if not 0 <= mask_ratio < 1:
        out.append((("mask_ratio",), f"must be in [0, 1), got {mask_ratio}"))
    elif length is not None and num_visible(length, mask_ratio) < 1:
        out.append((("mask_ratio",), f"{mask_ratio} leaves no visible patch out of {length}"))
    return out


class TECModel(nn.Module):
    """Target-enhanced conditional mask reconstruction (docs/method.md#4-the-new-model).

    Base and new model may differ in width, depth and heads: the feature head predicts ``C_base`` channels and the
    attention head uses ``H_base`` heads. They must agree on the number of patches L.

    Args:
        timm_kwargs: the new encoder's :class:`VisionTransformer` kwargs (see :func:`tec_model.archs.vit_kwargs`).
        base_embed_dim: C_base, channels of the feature target.
        base_num_heads: H_base, heads of the attention target.
        base_num_patches: L of the base model.
        adapters: ``none`` | ``input`` | ``encoder`` | ``both``.
        feature_norm: feature-target normalisation, ``patch`` | ``channel`` | ``none``.
        attention_target: predict the base model's attention rows.
        topk: attention rows besides cls (≤ the cache's K_max).
        att_tau: temperature on the attention target.
        mask_ratio: default fraction of masked patches.
        decoder_dim: D_dec. decoder_depth: shared blocks. decoder_heads: their heads.
        att_proj_dim: P of the attention head (default C_base).
    """

    def __init__(
        self,
        timm_kwargs: dict[str, Any],
        base_embed_dim: int,
        base_num_heads: int,
        base_num_patches: int,
        *,
        adapters: Adapters = "both",
        feature_norm: FeatureNorm = "patch",
        attention_target: bool = True,
        topk: int = 15,
        att_tau: float = 1.8,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 16,
        att_proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        problems = check_args(timm_kwargs, base_num_patches, adapters=adapters, feature_norm=feature_norm, topk=topk,
                              att_tau=att_tau, mask_ratio=mask_ratio, decoder_dim=decoder_dim,
                              decoder_heads=decoder_heads)
        if problems:
            raise ValueError("incompatible TEC model settings: " + "; ".join(f"{n[0]}: {m}" for n, m in problems))
        self.encoder = build_vit(timm_kwargs)
        grid = self.encoder.patch_embed.grid_size
        embed_dim, depth = self.encoder.embed_dim, len(self.encoder.blocks)
        self.feature_norm = feature_norm
        self.attention_target = attention_target
        self.topk = topk
        self.att_tau = att_tau
        self.mask_ratio = mask_ratio

        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, zero cls row
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_2d(embed_dim, grid).unsqueeze(0))
        use_input = adapters in ("input", "both")
        use_encoder = adapters in ("encoder", "both")
        self.input_adapter = Mlp(embed_dim, 4 * embed_dim, embed_dim, act_layer=nn.GELU) if use_input else None
        self.encoder_adapter = EncoderAdapter(embed_dim, depth, 4 * decoder_dim) if use_encoder else None
        paths = ("feature", "attention") if attention_target else ("feature",)
        self.decoder = MultiTargetDecoder(embed_dim, grid, paths, decoder_dim, decoder_depth, decoder_heads)
        self.feature_head = nn.Linear(decoder_dim, base_embed_dim)
        self.attention_head = (
            AttentionHead(decoder_dim, att_proj_dim or base_embed_dim, base_num_heads) if attention_target else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE-style init: xavier-uniform linears (patch embedding as a linear), normal(0.02) tokens."""
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and not name.startswith("encoder.patch_embed"):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def cls_token(self) -> torch.Tensor:
        """(1, 1, C) the cls token as the encoder sees it (through the input adapter when present)."""
        cls = self.encoder.cls_token
        return self.input_adapter(cls) if self.input_adapter is not None else cls

    def _blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder blocks on (N, T, C) tokens; returns every block output, the last after the final norm."""
        outputs = []
        for block in self.encoder.blocks:
            x = block(x)
            outputs.append(x)
        outputs[-1] = self.encoder.norm(x)
        return outputs

    def _with_cls(self, patches: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token() + self.encoder.pos_embed[:, :1]
        return torch.cat([cls.expand(patches.shape[0], -1, -1), patches], dim=1)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder alone on full images, as the exported timm model computes ``forward_features``.

        Args:
            imgs: (N, C_in, S, S).

        Returns:
            (N, 1 + L, C) final-normed tokens, cls first.
        """
        enc = self.encoder
        return self._blocks(self._with_cls(enc.patch_embed(imgs) + enc.pos_embed[:, 1:]))[-1]

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        Args:
            imgs: (N, C_in, S, S).
            mask_ratio: fraction of patches masked.
            generator: optional RNG for the masks.

        Returns:
            latent: (N, 1 + L_vis, C) decoder input (adapter output, or the final-normed tokens).
            mask: (N, L) 1 = masked.
            ids_restore: (N, L).
        """
        enc = self.encoder
        x, mask, ids_restore, _ = random_masking(enc.patch_embed(imgs) + enc.pos_embed[:, 1:], mask_ratio, generator)
        outputs = self._blocks(self._with_cls(x))
        latent = self.encoder_adapter(outputs) if self.encoder_adapter is not None else outputs[-1]
        return latent, mask, ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, topk_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict both targets.

        Args:
            latent: (N, 1 + L_vis, C). ids_restore: (N, L).
            topk_index: (N, ≥topk) the base model's selected patches (first ``topk`` used); None without the
                attention target.

        Returns:
            pred_features: (N, L, C_base); pred_attn: (N, topk + 1, H_base, L) or None.
        """
        pred_features = self.feature_head(self.decoder(latent, ids_restore, "feature")[:, 1:])
        if self.attention_head is None:
            return pred_features, None
        decoded = self.decoder(latent, ids_restore, "attention")
        return pred_features, self.attention_head(decoded, topk_index[:, : self.topk].long())

    def forward_loss(
        self,
        pred_features: torch.Tensor,
        pred_attn: torch.Tensor | None,
        features: torch.Tensor,
        attn_logits: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss ``L_fea + L_att`` and its parts.

        Args:
            pred_features: (N, L, C_base). pred_attn: (N, topk+1, H, L) or None.
            features: (N, L, C_base) raw base features (normalised here). attn_logits: (N, ≥topk+1, H, L) or None.
            mask: (N, L) 1 = masked.
        """
        loss_fea = feature_loss(pred_features, normalize_features(features, self.feature_norm), mask)
        parts = {"loss_fea": loss_fea.detach()}
        loss = loss_fea
        if pred_attn is not None:
            loss_att = attention_loss(pred_attn, attn_logits[:, : self.topk + 1], self.att_tau)
            parts["loss_att"] = loss_att.detach()
            loss = loss + loss_att
        return loss, parts

    def forward(
        self,
        imgs: torch.Tensor,
        features: torch.Tensor,
        attn_logits: torch.Tensor | None = None,
        topk_index: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One TEC step's forward.

        Args:
            imgs: (N, C_in, S, S) the same views the base model saw.
            features: (N, L, C_base). attn_logits: (N, K_max+1, H, L). topk_index: (N, K_max).
            mask_ratio: overrides the default. generator: RNG for the masks.

        Returns:
            (loss, {"loss_fea", "loss_att"}, mask (N, L)).
        """
        if self.attention_target and (attn_logits is None or topk_index is None):
            raise ValueError("the attention target is on: attn_logits and topk_index are required")
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred_features, pred_attn = self.forward_decoder(latent, ids_restore, topk_index)
        loss, parts = self.forward_loss(pred_features, pred_attn, features, attn_logits, mask)
        return loss, parts, mask
