"""TEC's building blocks around a timm encoder: encoder adapters, the multi-target decoder, the attention head."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from tec_model.masking import unshuffle_with_mask_tokens
from tec_model.pos_embed import sincos_2d

# The official TEC decoder (blocks and per-path norms) uses LayerNorm eps 1e-6, as the encoder does; its encoder
# adapters are built with torch's default eps (1e-5), and so are ours.
DECODER_LN_EPS = 1e-6


def block_groups(depth: int, group_size: int = 3) -> list[range]:
    """Consecutive block groups for the encoder adapters: ``depth // group_size`` groups, the last one taking
    the remainder (at least one group).

    >>> [list(g) for g in block_groups(7)]
    [[0, 1, 2], [3, 4, 5, 6]]
    """
    n = max(1, depth // group_size)
    starts = [i * group_size for i in range(n)] + [depth]
    return [range(starts[i], starts[i + 1]) for i in range(n)]


class EncoderAdapter(nn.Module):
    """Merge all block outputs into the decoder input (docs/method.md#43-encoder-adapters).

    concat(block outputs) → LayerNorm → per group ``Z = FC(g·C → C)``, ``Z' = Z + MLP(Z)`` → Σ groups → LayerNorm.

    Args:
        embed_dim: C, the encoder width.
        depth: number of encoder blocks.
        hidden_dim: the adapter MLP's hidden width (4·D_dec in the paper).
        group_size: blocks per group (3).
    """

    def __init__(self, embed_dim: int, depth: int, hidden_dim: int, group_size: int = 3) -> None:
        super().__init__()
        self.groups = block_groups(depth, group_size)
        self.embed_dim = embed_dim
        self.norm = nn.LayerNorm(depth * embed_dim)
        self.fc = nn.ModuleList(nn.Linear(len(g) * embed_dim, embed_dim) for g in self.groups)
        self.mlp = nn.ModuleList(Mlp(embed_dim, hidden_dim, embed_dim, act_layer=nn.GELU) for _ in self.groups)
        self.out_norm = nn.LayerNorm(embed_dim)

    def forward(self, block_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Args: block_outputs: ``depth`` tensors (N, T, C), the last one after the encoder's final norm.

        Returns: (N, T, C).
        """
        h = self.norm(torch.cat(block_outputs, dim=-1))
        c = self.embed_dim
        out = 0
        for group, fc, mlp in zip(self.groups, self.fc, self.mlp, strict=True):
            z = fc(h[..., group.start * c : group.stop * c])
            out = out + z + mlp(z)
        return self.out_norm(out)

    def group_contributions(self, block_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Mean L2 norm of each group's ``Z'`` (the paper's Fig. 7 analysis). Returns (G,) fractions."""
        h = self.norm(torch.cat(block_outputs, dim=-1))
        c = self.embed_dim
        norms = []
        for group, fc, mlp in zip(self.groups, self.fc, self.mlp, strict=True):
            z = fc(h[..., group.start * c : group.stop * c])
            norms.append((z + mlp(z)).norm(dim=-1).mean())
        norms_t = torch.stack(norms)
        return norms_t / norms_t.sum()


class MultiTargetDecoder(nn.Module):
    """Target-specific input paths into one shared transformer stack (docs/method.md#44-multi-target-decoder-and-heads).

    Each path has its own ``Linear(C → D_dec)``, mask token and final norm; the blocks are shared and run once per
    path. Fixed 2-D sin-cos position embeddings (zero cls row) are added after un-shuffling.

    Args:
        embed_dim: C, encoder width.
        grid_size: (rows, cols) of the patch grid.
        paths: names of the target paths, e.g. ``("feature", "attention")``.
        decoder_dim: D_dec.
        depth: number of shared blocks (2).
        num_heads: heads of the shared blocks.
        mlp_ratio: MLP ratio of the shared blocks.
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        paths: tuple[str, ...],
        decoder_dim: int = 512,
        depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.embed = nn.ModuleDict({p: nn.Linear(embed_dim, decoder_dim) for p in paths})
        self.mask_token = nn.ParameterDict({p: nn.Parameter(torch.zeros(1, 1, decoder_dim)) for p in paths})
        self.register_buffer("pos_embed", sincos_2d(decoder_dim, grid_size).unsqueeze(0), persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=DECODER_LN_EPS)
        self.blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.norm = nn.ModuleDict({p: norm_layer(decoder_dim) for p in paths})
        for token in self.mask_token.values():
            nn.init.normal_(token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, path: str) -> torch.Tensor:
        """Decode one path.

        Args:
            latent: (N, 1 + L_vis, C) encoder output, cls first.
            ids_restore: (N, L) from masking.
            path: which target path.

        Returns:
            (N, 1 + L, D_dec) decoded tokens, cls first, patches in original order.
        """
        x = self.embed[path](latent)
        patches = unshuffle_with_mask_tokens(x[:, 1:], self.mask_token[path], ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm[path](x)


class AttentionHead(nn.Module):
    """Predict the base model's attention rows from decoded tokens.

    ``Linear(D_dec → 2P)`` gives Q and K, split into the base model's H heads; queries are [cls, the selected
    patches], keys are all patches; logits are scaled by ``P^-0.5``.

    Args:
        decoder_dim: D_dec.
        proj_dim: P, divisible by ``num_heads``.
        num_heads: H_base.
    """

    def __init__(self, decoder_dim: int, proj_dim: int, num_heads: int) -> None:
        super().__init__()
        problem = self.check_args(proj_dim, num_heads)
        if problem:
            raise ValueError(problem)
        self.qk = nn.Linear(decoder_dim, 2 * proj_dim)
        self.num_heads = num_heads
        self.scale = proj_dim**-0.5

    @staticmethod
    def check_args(proj_dim: int, num_heads: int) -> str | None:
        """Why ``proj_dim`` cannot be split into ``num_heads`` heads, or None."""
        if num_heads < 1 or proj_dim % num_heads:
            return f"att_proj_dim {proj_dim} is not divisible by the base model's {num_heads} heads"
        return None

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (N, 1 + L, D_dec) decoded tokens (cls first).
            rows: (N, k) patch indices of the query rows (besides cls).

        Returns:
            (N, k + 1, H, L) logits.
        """
        n, t, _ = x.shape
        q, k = self.qk(x).reshape(n, t, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (N, H, T, d) each
        query_idx = torch.cat([torch.zeros_like(rows[:, :1]), rows + 1], dim=1)  # cls = token 0
        q = torch.gather(q, 2, query_idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        logits = (q @ k[:, :, 1:].transpose(-2, -1)) * self.scale  # (N, H, k+1, L)
        return logits.transpose(1, 2)
