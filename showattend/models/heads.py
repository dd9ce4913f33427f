"""Multi-head attention over the annotation grid: H soft (or local) heads attending in parallel.

Head h has its own score projections (and, for local attention, its own centre predictor) and its
own value projection; the context is the concatenation of the heads' contexts projected back to
the annotation width:

    α^h = align_h(a, h_{t−1}),   z^h = Σ_i α^h_i W_v^h a_i,   z = W_o [z^1; …; z^H].

Every head *is* a single-head module (SoftAttention / LocalAttention) run on its own keys and
values, so one head with W_v = W_o = I is exactly the single-head model. The reported map α is
the heads' mean (grounding, the doubly stochastic penalty and the overlays' first row use it);
the per-head maps travel as ``aux["heads"]`` (B, H, L).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from showattend.models.attention import AttentionOutput, Memory


class HeadMemory(NamedTuple):
    """Per-image tensors of H heads (batch first, so decoding can index and repeat them)."""

    feats: torch.Tensor  # (B, L, D) annotations
    keys: torch.Tensor  # (B, H, L, A) each head's score-function projections
    values: torch.Tensor  # (B, H, L, V) each head's value projection W_v^h a


class MultiHeadAttention(nn.Module):
    """H heads with their own projections; context W_o [z^1; …; z^H] of width ``feat_dim``."""

    stochastic = False
    needs_pixels = False

    def __init__(self, heads: list[nn.Module], feat_dim: int, value_dim: int | None = None):
        super().__init__()
        if not heads:
            raise ValueError("multi-head attention needs at least one head")
        kinds = {h.kind for h in heads}
        if len(kinds) != 1 or next(iter(kinds)) not in ("soft", "local"):
            raise ValueError(f"heads must all be soft or all local, got {sorted(kinds)}")
        self.heads = nn.ModuleList(heads)
        self.kind = heads[0].kind
        self.mode_label = f"multi-head {self.kind}"  # decoding.applicable_mode's line
        # each head reads its own keys and values per image: g state rows per image work when
        # the heads' kind supports them (soft does; see attention.py)
        self.shares_memory = bool(getattr(heads[0], "shares_memory", False))
        self.grid = heads[0].grid
        n = len(heads)
        # each head's values: about D / H wide, so W_o sees a concatenation of about D
        self.value_dim = value_dim or -(-feat_dim // n)
        self.value = nn.Linear(feat_dim, n * self.value_dim)
        self.out = nn.Linear(n * self.value_dim, feat_dim)

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    def precompute(self, feats: torch.Tensor) -> HeadMemory:
        b, n_cells, _ = feats.shape
        keys = torch.stack([h.score.precompute(feats) for h in self.heads], 1)  # (B, H, L, A)
        values = self.value(feats).view(b, n_cells, self.n_heads, self.value_dim)  # (B, L, H, V)
        return HeadMemory(feats, keys, values.transpose(1, 2))  # values (B, H, L, V)

    def forward(self, mem: HeadMemory, h: torch.Tensor, mode: str = "expectation",
                mix: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> AttentionOutput:
        outs = [head(Memory(mem.values[:, i], mem.keys[:, i], mem.values[:, i]), h)
                for i, head in enumerate(self.heads)]
        alphas = torch.stack([o.alpha for o in outs], 1)  # (B, H, L)
        context = self.out(torch.cat([o.context for o in outs], 1))  # (B, H·V) → (B, D)
        alpha = alphas.mean(1)  # (B, L)
        entropy = torch.stack([o.entropy for o in outs], 1).mean(1)  # (B,) mean head entropy
        aux = {"heads": alphas}
        if outs[0].aux and "window" in outs[0].aux:  # local heads: each its own window
            aux["head_windows"] = torch.stack([o.aux["window"] for o in outs], 1)  # (B, H, 4)
        return AttentionOutput(context, alpha, alpha.new_zeros(alpha.shape[0]), entropy,
                               alpha.argmax(-1), aux)
