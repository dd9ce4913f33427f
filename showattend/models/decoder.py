"""LSTM decoder of Show, Attend and Tell.

Per step t (paper, Sec. 3.1.2):
    α_t, z_t  = attention(a, h_{t-1})
    β_t       = σ(f_β(h_{t-1}))                gating scalar (or per channel)
    h_t, c_t  = LSTM([E y_{t-1}; β_t z_t], (h_{t-1}, c_{t-1}))
    p(y_t)    ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z β_t z_t))    deep output layer
with h_0, c_0 = tanh(MLP(mean_i a_i)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from showattend.models.attention import AttentionOutput, Memory


class State(NamedTuple):
    h: torch.Tensor  # (B, N)
    c: torch.Tensor  # (B, N)


class StepOutput(NamedTuple):
    logits: torch.Tensor  # (B, V)
    state: State
    attn: AttentionOutput
    beta: torch.Tensor  # (B,) mean gate value (per-channel gates are averaged for reporting)


class Decoder(nn.Module):
    """Attention LSTM with gating scalar and deep output (explicit arguments, no config)."""

    def __init__(self, vocab_size: int, feat_dim: int, attention: nn.Module, embed_dim: int = 64,
                 hidden_dim: int = 256, dropout: float = 0.3, beta: str = "scalar",
                 deep_output: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.attention = attention
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(feat_dim, hidden_dim)
        self.init_c = nn.Linear(feat_dim, hidden_dim)
        self.beta_mode = beta
        if beta != "none":
            self.f_beta = nn.Linear(hidden_dim, 1 if beta == "scalar" else feat_dim)
        self.lstm = nn.LSTMCell(embed_dim + feat_dim, hidden_dim)
        self.deep_output = deep_output
        self.dropout = nn.Dropout(dropout)
        if deep_output:
            self.L_h = nn.Linear(hidden_dim, embed_dim)
            self.L_z = nn.Linear(feat_dim, embed_dim, bias=False)
            self.L_o = nn.Linear(embed_dim, vocab_size)
        else:
            self.L_o = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, feats: torch.Tensor) -> State:
        """h_0, c_0 from the mean annotation: feats (B, L, D)."""
        mean = feats.mean(1)  # (B, D)
        return State(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def step(self, mem: Memory, state: State, prev: torch.Tensor, mode: str,
             mix: torch.Tensor | None = None) -> StepOutput:
        """One word: prev (B,) token ids of y_{t-1} → logits for y_t."""
        emb = self.embed(prev)  # (B, E)
        attn = self.attention(mem, state.h, mode=mode, mix=mix)
        z = attn.context  # (B, D)
        if self.beta_mode != "none":
            gate = torch.sigmoid(self.f_beta(state.h))  # (B, 1) or (B, D)
            z = gate * z
            beta = gate.mean(-1)  # (B,)
        else:
            beta = z.new_ones(z.shape[0])
        h, c = self.lstm(torch.cat([emb, z], dim=1), state)  # (B, N)
        if self.deep_output:
            logits = self.L_o(self.dropout(emb + self.L_h(h) + self.L_z(z)))  # (B, V)
        else:
            logits = self.L_o(self.dropout(h))  # (B, V)
        return StepOutput(logits, State(h, c), attn, beta)
