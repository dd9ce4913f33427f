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

from showattend import precision
from showattend.models.attention import AttentionOutput, Memory
from showattend.models.packed import Packed, cached
from showattend.models.recurrent import GateTape, RecurrentGates
from showattend.vocab import PAD_ID


# decoding steps with at most this many rows (images × beams) use packed weights (packed.py)
_PACKED_ROWS = 96
# bf16 decoding: the top logits of each row recomputed in fp32 (_refine_top)
_REFINE = 16


class State(NamedTuple):
    h: torch.Tensor  # (B, N)
    c: torch.Tensor  # (B, N)


class StepOutput(NamedTuple):
    logits: torch.Tensor  # (B, V)
    state: State
    attn: AttentionOutput
    beta: torch.Tensor  # (B,) mean gate value (per-channel gates are averaged for reporting)


class TeacherForced(NamedTuple):
    """Outputs over all B·T positions; positions past a caption's end hold zeros. The vocabulary
    logits stay packed: one row per real position (``positions`` says which), since a (B, T, V)
    copy that is mostly padding costs more than the loss computed on it."""

    packed_logits: torch.Tensor  # (P, V)
    alphas: torch.Tensor  # (B, T, L)
    betas: torch.Tensor  # (B, T)
    log_probs: torch.Tensor  # (B, T)
    entropies: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (P, 2) (caption, step) of each packed row


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
        # glimpse models append each cell's pixels after the D annotation channels: not for h_0
        mean = feats[..., : self.init_h.in_features].mean(1)  # (B, D)
        return State(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def _gated_context(self, mem: Memory, h: torch.Tensor, mode: str, mix: torch.Tensor | None,
                       noise: torch.Tensor | None) -> tuple[AttentionOutput, torch.Tensor,
                                                             torch.Tensor]:
        """Attention at state h (B, N): (attention output, β·z (B, D), β reported (B,))."""
        attn = self.attention(mem, h, mode=mode, mix=mix, noise=noise)
        z = attn.context  # (B, D)
        if self.beta_mode != "none":
            gate = torch.sigmoid(self.f_beta(h))  # (B, 1) or (B, D)
            return attn, gate * z, gate.mean(-1)
        return attn, z, z.new_ones(z.shape[0])

    def _output(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Deep output: (P, E), (P, N), (P, D) → logits (P, V) for any number P of positions."""
        layers = [self.L_o] + ([self.L_h, self.L_z] if self.deep_output else [])
        if precision.active() is not None and all(type(m) is nn.Linear for m in layers):
            lin = precision.linear  # bf16 products, float32 in and out (precision.py)
            if self.deep_output:
                u = emb + lin(h, self.L_h.weight, self.L_h.bias) + lin(z, self.L_z.weight)
                return lin(self.dropout(u), self.L_o.weight, self.L_o.bias)
            return lin(self.dropout(h), self.L_o.weight, self.L_o.bias)
        if self.deep_output:
            return self.L_o(self.dropout(emb + self.L_h(h) + self.L_z(z)))
        return self.L_o(self.dropout(h))

    def step(self, mem: Memory, state: State, prev: torch.Tensor, mode: str,
             mix: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """One word: prev (B,) token ids of y_{t-1} → logits for y_t."""
        emb = self.embed(prev)  # (B, E)
        attn, z, beta = self._gated_context(mem, state.h, mode, mix, noise)
        packs = self._decoding_packs(z)
        if packs is not None:
            return StepOutput(*self._packed_tail(packs, emb, z, state), attn, beta)
        h, c = self.lstm(torch.cat([emb, z], dim=1), state)  # (B, N)
        return StepOutput(self._output(emb, h, z), State(h, c), attn, beta)

    def _decoding_packs(self, z: torch.Tensor) -> tuple[Packed, Packed | None, Packed] | None:
        """The LSTM's [W_ih | W_hh], the deep output's [L_h | L_z] and L_o packed for decoding
        (packed.py: a step multiplies a few rows by each, word after word), or None: with
        autograd, off the CPU, in float64, for layers int8 decoding has quantized, or for more
        rows than packing helps (the plain GEMM is as fast from about a hundred rows on)."""
        bf16 = precision.active() is not None  # bf16 packs for any number of rows
        if torch.is_grad_enabled() or z.device.type != "cpu" or z.dtype != torch.float32 or \
                (z.shape[0] > _PACKED_ROWS and not bf16):
            return None
        plain = [self.lstm, self.L_o] + ([self.L_h, self.L_z] if self.deep_output else [])
        if any(type(m) not in (nn.Linear, nn.LSTMCell) for m in plain):
            return None
        lstm = cached(self, "lstm", (self.lstm.weight_ih, self.lstm.weight_hh),
                      (self.lstm.bias_ih, self.lstm.bias_hh), bf16=bf16)
        deep = cached(self, "deep", (self.L_h.weight, self.L_z.weight), (self.L_h.bias,),
                      bf16=bf16) if self.deep_output else None
        out = cached(self, "out", (self.L_o.weight,), (self.L_o.bias,), bf16=bf16)
        if lstm is None or out is None or (self.deep_output and deep is None):
            return None
        return lstm, deep, out

    def _packed_tail(self, packs: tuple[Packed, Packed | None, Packed], emb: torch.Tensor,
                     z: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The LSTM cell and the output layers of ``step`` with packed weights: the same
        arithmetic as ``self.lstm`` and ``_output`` (gate order i, f, g, o)."""
        lstm, deep, out = packs
        gates = lstm(torch.cat([emb, z, state.h], 1))  # (B, 4N)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)  # (B, N)
        h = torch.sigmoid(o) * torch.tanh(c)  # (B, N)
        u = self.dropout(deep(torch.cat([h, z], 1)).add_(emb)) if deep is not None else \
            self.dropout(h)  # (B, E) or (B, N)
        logits = out(u)  # (B, V)
        if _REFINE and getattr(out, "bf16", False):
            logits = _refine_top(logits, u, self.L_o.weight, self.L_o.bias, _REFINE)
        return logits, State(h, c)

    def teacher_forced(self, mem: Memory, state: State, inputs: torch.Tensor,
                       lengths: torch.Tensor, mode: str, mix: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> TeacherForced:
        """All steps of teacher forcing with only the recurrence in the Python loop.

        inputs (B, T) = y_0 … y_{T-1}; lengths (B,) = real steps per caption (the rest is padding);
        noise (B, T) uniform draws for sampled hard attention (drawn here if None).
        The word-embedding part of the LSTM input, the deep output and the vocabulary projection
        do not feed back into the recurrence, so they run once over all real positions as large
        matmuls. Captions are processed longest first and the active batch shrinks as they end, so
        padded positions cost nothing; outputs come back in the caller's order.
        """
        b, t_in = inputs.shape
        n_hid = self.lstm.hidden_size
        dev = inputs.device
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,)
        lens = lengths[order].tolist()
        steps = lens[0] if lens else 0
        active = [sum(1 for n in lens if n > t) for t in range(steps)]  # rows alive at step t
        # packed positions, time-major: row r of step t is caption order[r] at position t
        rows = torch.cat([torch.arange(n, device=dev) for n in active]) if steps else \
            torch.zeros(0, dtype=torch.long, device=dev)  # (P,)
        cols = torch.cat([torch.full((n,), t, device=dev, dtype=torch.long)
                          for t, n in enumerate(active)]) if steps else rows  # (P,)
        emb = self.embed(inputs[order[rows], cols])  # (P, E) real positions only
        e_dim = emb.shape[-1]
        w_ih, w_hh = self.lstm.weight_ih, self.lstm.weight_hh  # (4N, E + D), (4N, N)
        bias = self.lstm.bias_ih + self.lstm.bias_hh  # (4N,)
        # the embedding half of the gates, one matmul, split into the steps' (n_t, 4N) blocks
        # (whose backward is one concatenation, not a full-size scatter per step)
        x_emb = precision.linear(emb, w_ih[:, :e_dim], bias).split(active)
        w_z, w_hh_t = w_ih[:, e_dim:].t(), w_hh.t()  # (D, 4N), (N, 4N)
        mem = _reorder(mem, order)  # Memory or a variant's (kinds.py)
        h, c = state.h[order], state.c[order]  # (B, N)
        mix = mix[order] if mix is not None else None
        if noise is None and mode == "sample":
            noise = torch.rand(b, t_in, device=dev)
        noise = noise[order] if noise is not None else None
        hs, zs, alphas, betas, logps, ents = [], [], [], [], [], []
        # recurrent weight gradients: one matmul over all steps; weights packed once (recurrent.py)
        tape = GateTape(w_z, w_hh_t, b) if steps > 1 else GateTape()
        for t in range(steps):
            n = active[t]
            if n < h.shape[0]:  # captions sorted longest first: the live rows are a prefix
                h, c = h[:n], c[:n]
                mem = type(mem)(*(x[:n] for x in mem))
                mix = mix[:n] if mix is not None else None
            attn, z, beta = self._gated_context(mem, h, mode, mix,
                                                noise[:n, t] if noise is not None else None)
            gates = RecurrentGates.apply(x_emb[t], z, h, w_z, w_hh_t, tape, t)  # (n, 4N)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (n, N)
            h = torch.sigmoid(o) * torch.tanh(c)  # (n, N)
            hs.append(h)
            zs.append(z)
            alphas.append(attn.alpha)
            betas.append(beta)
            logps.append(attn.log_prob)
            ents.append(attn.entropy)
        logits_p = self._output(emb, torch.cat(hs) if hs else h[:0],
                                torch.cat(zs) if zs else mem.feats[:0, 0])  # (P, V)
        dst_b, dst_t = order[rows], cols  # where each packed position goes in (B, T)

        def scatter(packed: list[torch.Tensor], *tail: int) -> torch.Tensor:
            full = packed[0].new_zeros(b, t_in, *tail) if packed else logits_p.new_zeros(
                b, t_in, *tail)
            if packed:
                full = full.index_put((dst_b, dst_t), torch.cat(packed))
            return full

        n_cells = mem.feats.shape[1]
        return TeacherForced(logits_p, scatter(alphas, n_cells), scatter(betas), scatter(logps),
                             scatter(ents), torch.stack([dst_b, dst_t], 1))


def _refine_top(logits: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, m: int) -> torch.Tensor:
    """bf16 logits with their top ``m`` per row recomputed in fp32.

    torch's CPU bf16 product returns bf16, so every logit is rounded (up to 2⁻⁸ of its size: 0.03
    at 8) — enough to reorder near-tied beams (8 % of Flickr8k's test captions changed). The
    words a search can pick are among the top few of each row: those get their exact fp32 value
    (m rows of W gathered, m dot products), the rest keep the rounded one, which moves the
    log-softmax normaliser only by their small probability mass times their rounding."""
    top = logits.topk(min(m, logits.shape[1]), dim=1).indices  # (B, m)
    exact = torch.bmm(weight[top], u.unsqueeze(2)).squeeze(2)  # (B, m)
    if bias is not None:
        exact += bias[top]
    return logits.scatter_(1, top, exact)


def _reorder(mem, order: torch.Tensor):
    """The memory's tensors in ``order`` (rows); a tensor that appears twice (soft attention's
    crops are its annotations) is gathered once, and an order that is already sorted costs
    nothing."""
    if bool((order == torch.arange(len(order), device=order.device)).all()):
        return mem
    done: dict[int, torch.Tensor] = {}
    for x in mem:
        if id(x) not in done:
            done[id(x)] = x.index_select(0, order)
    return type(mem)(*(done[id(x)] for x in mem))

