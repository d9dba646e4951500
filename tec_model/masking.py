"""MAE-style per-sample random masking."""

from __future__ import annotations

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of tokens kept by :func:`random_masking`: ``int(L * (1 - mask_ratio))``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample (argsort of uniform noise).

    Args:
        x: (N, L, D) patch tokens (position embedding already added).
        mask_ratio: fraction of tokens to drop, in [0, 1).
        generator: optional RNG for reproducible masks. The noise is drawn on the generator's device and moved to
            ``x``'s, so a CPU generator gives the same mask whether ``x`` lives on the CPU or on a GPU.

    Returns:
        x_visible: (N, L_vis, D) the kept tokens, L_vis = int(L * (1 - mask_ratio)).
        mask: (N, L) float, 0 = kept, 1 = masked, in the original token order.
        ids_restore: (N, L) long; ``gather(cat(kept, masked), ids_restore)`` restores the original order.
        ids_keep: (N, L_vis) long indices of the kept tokens.
    """
    n, length, dim = x.shape
    len_keep = num_visible(length, mask_ratio)
    draw_on = generator.device if generator is not None else x.device
    noise = torch.rand(n, length, device=draw_on, generator=generator).to(x.device, non_blocking=True)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore, ids_keep


def unshuffle_with_mask_tokens(
    x_visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """Fill dropped positions with a mask token and restore the original order.

    Args:
        x_visible: (N, L_vis, D) visible patch tokens (no cls).
        mask_token: (1, 1, D) learnable token.
        ids_restore: (N, L) from :func:`random_masking`.

    Returns:
        (N, L, D) tokens in original patch order.
    """
    n, len_keep, dim = x_visible.shape
    length = ids_restore.shape[1]
    fill = mask_token.to(x_visible.dtype).expand(n, length - len_keep, dim)
    full = torch.cat([x_visible, fill], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
