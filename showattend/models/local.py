"""Local attention: Luong et al.'s (2015) "local-p" on the 2-D annotation grid.

Per step the decoder state predicts a centre on the grid,

    p_t = (H−1, W−1) ⊙ σ(v_pᵀ tanh(W_p h_{t−1}))          continuous (row, column)

and attention is restricted to the square window of ``window`` cells around p_t and weighted by a
Gaussian of the distance to it:

    α_ti ∝ exp(e_ti) · exp(−‖c_i − p_t‖² / 2σ²)   for cells c_i with |c_i − p_t|_∞ ≤ window / 2.

Luong et al. multiply the softmax by the Gaussian without renormalising; here the product is
renormalised so that α sums to 1 like every other kind's map (the doubly stochastic penalty,
grounding and overlays then read all kinds alike). The window's edge is a step function of p_t,
so the centre learns through the Gaussian term — fully differentiable, as in local-p. With an
infinite window and σ = ∞ the map is exactly soft attention's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from showattend.models.attention import AttentionOutput, Memory, _entropy, _grouped_context


def cell_positions(grid: tuple[int, int]) -> torch.Tensor:
    """(L, 2) (row, column) index of every cell, row-major like the annotation grid."""
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float32).repeat_interleave(gw)  # (L,)
    cols = torch.arange(gw, dtype=torch.float32).repeat(gh)  # (L,)
    return torch.stack([rows, cols], 1)


def default_sigma(window: int) -> float:
    """Luong et al.'s σ = D/2 for a window of 2D+1 positions (at least half a cell)."""
    return max((window - 1) / 4, 0.5)


class CentrePredictor(nn.Module):
    """p = (H−1, W−1) ⊙ σ(v_pᵀ tanh(W_p h)): a continuous grid position (row, column)."""

    def __init__(self, hidden_dim: int, attn_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.W_p = nn.Linear(hidden_dim, attn_dim)
        self.v_p = nn.Linear(attn_dim, 2)
        self.register_buffer("extent", torch.tensor([grid[0] - 1, grid[1] - 1],
                                                    dtype=torch.float32), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.v_p(torch.tanh(self.W_p(h)))) * self.extent  # (B, 2)


class LocalAttention(nn.Module):
    """Local-p attention: score function on the window around a predicted centre × a Gaussian.

    ``window`` side of the square window in cells (``math.inf`` or ≥ 2·grid: the whole grid);
    ``sigma`` in cells (``math.inf``: no Gaussian). The score module is named ``score`` as in
    :class:`SoftAttention`, so a soft model's weights load into a local one (plus the centre).
    """

    kind = "local"
    stochastic = False
    needs_pixels = False
    shares_memory = True  # scores, centre and window are per state row; the memory per image

    def __init__(self, score: nn.Module, grid: tuple[int, int], hidden_dim: int, attn_dim: int,
                 window: float = 5, sigma: float = 1.0):
        super().__init__()
        if not window >= 1 or not sigma > 0:
            raise ValueError(f"local attention needs window >= 1 and sigma > 0, got {window}, "
                             f"{sigma}")
        self.score = score
        self.grid = grid
        self.window = window
        self.sigma = sigma
        self.centre = CentrePredictor(hidden_dim, attn_dim, grid)
        self.register_buffer("cells", cell_positions(grid), persistent=False)  # (L, 2)

    def precompute(self, feats: torch.Tensor) -> Memory:
        return Memory(feats, self.score.precompute(feats), feats)

    def align(self, keys: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α (B, L), centre p (B, 2) in cells) at decoder state h (B, N)."""
        e = self.score(keys, h)  # (B, L)
        p = self.centre(h)  # (B, 2)
        d = self.cells.unsqueeze(0) - p.unsqueeze(1)  # (B, L, 2)
        inside = (d.abs() <= self.window / 2).all(-1)  # (B, L): the nearest cell always is
        logits = e
        if math.isfinite(self.sigma):  # log of the Gaussian weight, added before the softmax
            logits = logits - d.pow(2).sum(-1) / (2 * self.sigma ** 2)
        logits = logits.masked_fill(~inside, float("-inf"))
        return torch.softmax(logits, dim=-1), p

    def window_box(self, p: torch.Tensor) -> torch.Tensor:
        """(B, 4) the window around p as (x0, y0, x1, y1) fractions of the image, clipped."""
        gh, gw = self.grid
        half = min(self.window / 2, 2.0 * max(gh, gw))  # an infinite window is the whole image
        y, x = p[:, 0] + 0.5, p[:, 1] + 0.5  # cell centres sit at index + ½ cell
        box = torch.stack([(x - half) / gw, (y - half) / gh, (x + half) / gw, (y + half) / gh], 1)
        return box.clamp(0.0, 1.0)

    def forward(self, mem: Memory, h: torch.Tensor, mode: str = "expectation",
                mix: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> AttentionOutput:
        alpha, p = self.align(mem.keys, h)  # (B, L), (B, 2)
        context = _grouped_context(alpha, mem.feats)  # (B·g, D)
        zeros = alpha.new_zeros(alpha.shape[0])
        return AttentionOutput(context, alpha, zeros, _entropy(alpha), alpha.argmax(-1),
                               {"window": self.window_box(p.detach())})
