"""Self-attention over the annotation grid: Transformer encoder layers with 2-D positions.

The CNN's annotations each describe one patch; N self-attention layers let every cell look at
every other before the decoder attends, so a cell can carry "the red one *next to* the circle".
The layers sit after the CNN and after a feature cache (the captioner applies them to whatever
annotations it gets), so they train even when the CNN is frozen or skipped.

    x = W_in a + P_row[r] + P_col[c]           learned 2-D position embeddings (factorised)
    x = TransformerEncoder_N(x)                 pre-norm layers, 2·dim feed-forward
    a' = a + W_out LayerNorm(x)                 residual: the annotations keep their own content
"""

from __future__ import annotations

import torch
from torch import nn


class GridSelfAttention(nn.Module):
    """N Transformer encoder layers over (B, L = H·W, D) annotations; output (B, L, D)."""

    def __init__(self, feat_dim: int, grid: tuple[int, int], layers: int, heads: int = 4,
                 dim: int = 128, dropout: float = 0.0):
        super().__init__()
        if layers < 1 or dim % heads:
            raise ValueError(f"self-attention needs layers >= 1 and dim divisible by heads, got "
                             f"layers={layers}, dim={dim}, heads={heads}")
        self.grid = grid
        self.inp = nn.Linear(feat_dim, dim)
        self.row = nn.Parameter(torch.randn(grid[0], dim) * 0.02)  # (H, dim)
        self.col = nn.Parameter(torch.randn(grid[1], dim) * 0.02)  # (W, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True,
                                           norm_first=True)
        # nested tensors only help with padding masks, and warn with norm_first
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, feat_dim)

    def positions(self) -> torch.Tensor:
        """(L, dim) position embedding of every cell, row-major like the annotations."""
        gh, gw = self.grid
        return (self.row.unsqueeze(1) + self.col.unsqueeze(0)).reshape(gh * gw, -1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.inp(feats) + self.positions()  # (B, L, dim)
        x = self.layers(x)  # (B, L, dim)
        return feats + self.out(self.norm(x))  # (B, L, D)
