"""The attention-kind registry: ``attention.kind`` → a module built from explicit arguments.

Like the score-function registry in attention.py: a new kind is one builder here. ``heads > 1``
wraps H single-head modules of a kind that supports it (soft, local) in MultiHeadAttention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from showattend.models.attention import HardAttention, SoftAttention, build_score
from showattend.models.glimpse import (GaussianGlimpseAttention, HardGlimpseAttention,
                                       STNGlimpseAttention)
from showattend.models.heads import MultiHeadAttention
from showattend.models.local import LocalAttention, default_sigma


@dataclass(frozen=True)
class AttentionArgs:
    """Everything an attention builder may need (config-free, so tests build them directly)."""

    feat_dim: int
    hidden_dim: int
    grid: tuple[int, int]
    score: str = "additive"
    attn_dim: int = 128
    window: int = 1  # hard: crop size on the grid
    mc_samples: int = 8
    heads: int = 1
    local_window: float = 5  # local: window side in cells (math.inf: the whole grid)
    local_sigma: float = 0.0  # local: σ in cells (0: Luong's default; math.inf: no Gaussian)
    glimpse_size: int = 16  # glimpse_*: G, the glimpse's side in pixels

    def make_score(self) -> nn.Module:
        return build_score(self.score, self.feat_dim, self.hidden_dim, self.attn_dim)


def _soft(a: AttentionArgs) -> nn.Module:
    return SoftAttention(a.make_score(), a.grid)


def _hard(a: AttentionArgs) -> nn.Module:
    return HardAttention(a.make_score(), a.grid, window=a.window, mc_samples=a.mc_samples)


def _local(a: AttentionArgs) -> nn.Module:
    sigma = a.local_sigma or (math.inf if math.isinf(a.local_window)
                              else default_sigma(int(a.local_window)))
    return LocalAttention(a.make_score(), a.grid, a.hidden_dim, a.attn_dim, a.local_window, sigma)


def _glimpse_hard(a: AttentionArgs) -> nn.Module:
    return HardGlimpseAttention(a.make_score(), a.grid, a.feat_dim, a.glimpse_size, a.mc_samples)


def _glimpse_gaussian(a: AttentionArgs) -> nn.Module:
    return GaussianGlimpseAttention(a.make_score(), a.grid, a.feat_dim, a.hidden_dim,
                                    a.glimpse_size)


def _glimpse_stn(a: AttentionArgs) -> nn.Module:
    return STNGlimpseAttention(a.make_score(), a.grid, a.feat_dim, a.hidden_dim, a.glimpse_size)


ATTENTIONS: dict[str, Callable[[AttentionArgs], nn.Module]] = {
    "soft": _soft,
    "hard": _hard,
    "local": _local,
    "glimpse_hard": _glimpse_hard,
    "glimpse_gaussian": _glimpse_gaussian,
    "glimpse_stn": _glimpse_stn,
}
MULTI_HEAD = ("soft", "local")  # kinds whose heads can run in parallel


def build_attention(kind: str, args: AttentionArgs) -> nn.Module:
    """Attention module by registry name (``args.heads`` > 1: multi-head, soft and local only)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(ATTENTIONS)}")
    if args.heads == 1:
        return ATTENTIONS[kind](args)
    if args.heads < 1 or kind not in MULTI_HEAD:
        raise ValueError(f"attention heads = {args.heads}: multi-head exists for "
                         f"{' and '.join(MULTI_HEAD)} attention only (got {kind})")
    if args.attn_dim % args.heads:
        raise ValueError(f"attention dim {args.attn_dim} is not divisible by {args.heads} heads")
    per_head = replace(args, attn_dim=args.attn_dim // args.heads, heads=1)
    return MultiHeadAttention([ATTENTIONS[kind](per_head) for _ in range(args.heads)],
                              args.feat_dim)
