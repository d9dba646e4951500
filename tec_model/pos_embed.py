"""Fixed 2-D sine-cosine position embeddings (as in MAE), with a zero row for the cls token."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding.

    Args:
        dim: output width (even).
        positions: (M,) positions.

    Returns:
        (M, dim) tensor: the first half sines, the second half cosines.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """2-D sin-cos embedding over a (rows, cols) patch grid, row-major like PatchEmbed's flatten.

    Args:
        dim: embedding width (divisible by 4).
        grid_size: (rows, cols) of the patch grid.
        cls_token: prepend a zero row for the cls token.

    Returns:
        (1 + rows*cols, dim) if ``cls_token`` else (rows*cols, dim), float32.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    rows, cols = grid_size
    gy, gx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    # MAE convention: the first half encodes the column (w) coordinate, the second the row (h).
    emb = torch.cat([sincos_1d(dim // 2, gx.flatten()), sincos_1d(dim // 2, gy.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
