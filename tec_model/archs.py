"""Named ViT sizes, from tiny test models to the paper's ViT-B/L, as kwargs for timm's VisionTransformer.

Names follow timm's ``vit_<size>_patch<p>_<img>`` convention. The paper sizes and the DINOv2 sizes are the ones
timm ships (the DINOv2 ones with timm's 518×518 input, LayerScale ``init_values=1e-5`` and, for ``_reg4_``, four
register tokens outside the position embedding); MoCo v3's ViT-S, which has 12 heads where timm's has 6, has its
own name. The small sizes (32×32 input, patch 4; the DINOv2-like one 56×56, patch 14) are registered with timm's
model registry on import, so ``timm.create_model("vit_pico_patch4_32", num_classes=0)`` works wherever
:mod:`tec_model` was imported.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

# (embed_dim, depth, num_heads, patch_size, img_size)
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    # tests and demos (32×32 input, patch 4 → 64 patches)
    "vit_pico_patch4_32": (48, 3, 3, 4, 32),  # S-like: head dim 16
    "vit_nano_patch4_32": (96, 3, 6, 4, 32),  # B-like relative to pico: twice the width and heads
    "vit_micro_patch4_32": (128, 6, 4, 4, 32),  # demo new model / base model
    "vit_mini_patch4_32": (192, 6, 6, 4, 32),  # demo base model, larger
    # tests: a DINOv2-with-registers-like ViT (56×56 input, patch 14 → 16 patches, 4 registers, LayerScale)
    "vit_pico_patch14_reg4_dinov2": (48, 3, 3, 14, 56),
    # the paper's sizes, exactly as timm defines them
    "vit_tiny_patch16_224": (192, 12, 3, 16, 224),
    "vit_small_patch16_224": (384, 12, 6, 16, 224),
    "vit_base_patch16_224": (768, 12, 12, 16, 224),
    "vit_large_patch16_224": (1024, 24, 16, 16, 224),
    # MoCo v3's ViT-S: timm's ViT-S width and depth with 12 heads (head dim 32)
    "vit_small_patch16_224_mocov3": (384, 12, 12, 16, 224),
    # DINOv2 bases, as timm defines them (518×518 input → 37×37 = 1369 patches)
    "vit_small_patch14_dinov2": (384, 12, 6, 14, 518),
    "vit_base_patch14_dinov2": (768, 12, 12, 14, 518),
    "vit_small_patch14_reg4_dinov2": (384, 12, 6, 14, 518),
    "vit_base_patch14_reg4_dinov2": (768, 12, 12, 14, 518),
}
# Kwargs beyond the size, as timm's own entrypoints set them.
_DINOV2 = {"init_values": 1e-5}
_DINOV2_REG4 = {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True}
_EXTRA: dict[str, dict[str, Any]] = {
    "vit_pico_patch14_reg4_dinov2": _DINOV2_REG4,
    "vit_small_patch14_dinov2": _DINOV2,
    "vit_base_patch14_dinov2": _DINOV2,
    "vit_small_patch14_reg4_dinov2": _DINOV2_REG4,
    "vit_base_patch14_reg4_dinov2": _DINOV2_REG4,
}
_SMALL = ["vit_pico_patch4_32", "vit_nano_patch4_32", "vit_micro_patch4_32", "vit_mini_patch4_32",
          "vit_pico_patch14_reg4_dinov2"]

ARCHS: tuple[str, ...] = tuple(_SIZES)


def vit_kwargs(arch: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`timm.models.vision_transformer.VisionTransformer` of a named size.

    Args:
        arch: one of :data:`ARCHS`.
        **overrides: replace any kwarg (e.g. ``img_size=28``, ``in_chans=1``).

    Returns:
        A plain, JSON-serialisable dict (the cache stores it as ``base_model.timm_kwargs``).
    """
    if arch not in _SIZES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    embed_dim, depth, num_heads, patch_size, img_size = _SIZES[arch]
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": patch_size,
        "in_chans": 3,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "num_classes": 0,
        "global_pool": "token",
        **_EXTRA.get(arch, {}),
    }
    unknown = set(overrides) - _ALLOWED_OVERRIDES
    if unknown:
        raise ValueError(f"unsupported ViT override(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_OVERRIDES)}")
    kwargs.update(overrides)
    return kwargs


_ALLOWED_OVERRIDES = {
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "qk_norm", "num_classes", "global_pool", "class_token", "reg_tokens", "no_embed_class", "init_values",
    "drop_path_rate",
}


def build_vit(timm_kwargs: dict[str, Any]) -> VisionTransformer:
    """Build a timm ViT from plain kwargs (as returned by :func:`vit_kwargs` or stored in a cache)."""
    return VisionTransformer(**timm_kwargs)


def num_patches(timm_kwargs: dict[str, Any]) -> int:
    """L, the number of patch tokens for these kwargs (square images).

    Raises:
        ValueError: ``img_size`` is not a multiple of ``patch_size``.
    """
    img, patch = timm_kwargs["img_size"], timm_kwargs["patch_size"]
    if img % patch:
        raise ValueError(_NOT_A_MULTIPLE.format(img=img, patch=patch))
    return (img // patch) ** 2


_NOT_A_MULTIPLE = "img_size {img} is not a multiple of patch_size {patch}"
_SIZE_INTS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


def check_vit_kwargs(timm_kwargs: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Why these ViT kwargs cannot make a square-image ViT; empty when they can. Absent kwargs are not checked.

    Returns:
        One ``(kwarg names, message)`` per problem: the kwargs it reads, the one to blame first.
    """
    kw = timm_kwargs
    problems = [((name,), f"expected a positive int, got {_show(kw[name])}") for name in _SIZE_INTS
                if name in kw and (not isinstance(kw[name], int) or isinstance(kw[name], bool) or kw[name] < 1)]
    if problems:
        return problems
    if "img_size" in kw and "patch_size" in kw and kw["img_size"] % kw["patch_size"]:
        problems.append((("patch_size", "img_size"),
                         _NOT_A_MULTIPLE.format(img=kw["img_size"], patch=kw["patch_size"])))
    if "embed_dim" in kw and "num_heads" in kw and kw["embed_dim"] % kw["num_heads"]:
        problems.append((("num_heads", "embed_dim"),
                         f"embed_dim {kw['embed_dim']} is not divisible by num_heads {kw['num_heads']}"))
    return problems


def _show(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _small_entrypoint(name: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; load a checkpoint instead")
    for factory_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(factory_only, None)
    return build_vit(vit_kwargs(name, **kwargs))


def _register_small() -> None:
    for name in _SMALL:
        if name in timm.list_models(name):
            continue
        fn = partial(_small_entrypoint, name)
        fn.__name__ = name  # type: ignore[attr-defined]
        fn.__module__ = __name__  # type: ignore[attr-defined]
        register_model(fn)


_register_small()
