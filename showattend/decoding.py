"""Decoding: greedy and batched beam search. Tensors in, tensors out.

Both run the same step function, so beam size 1 reproduces greedy exactly. Beam search keeps the
whole batch × beams in one tensor (B·K rows) and never loops over images. A finished hypothesis
stays in its slot and can only be extended by <end> at zero cost, so the search always ends with
K complete captions per image; at step ``max_len`` only <end> is allowed, so every image gets a
caption even when no beam ended by itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from showattend.models.decoder import State
from showattend.vocab import END_ID, PAD_ID, START_ID


class Decoded(NamedTuple):
    """Best sequence per image. T = steps run; positions after <end> hold <pad>."""

    tokens: torch.Tensor  # (B, T) word ids, then <end>, then <pad>
    lengths: torch.Tensor  # (B,) number of words (without <end>)
    scores: torch.Tensor  # (B,) log p(caption) including <end>
    alphas: torch.Tensor  # (B, T, L) attention distribution at each step
    betas: torch.Tensor  # (B, T) gate value at each step
    locations: torch.Tensor  # (B, T) attended cell (sampled / argmax)


def _mask_logp(logp: torch.Tensor, t: int, max_len: int) -> torch.Tensor:
    logp[:, PAD_ID] = float("-inf")
    logp[:, START_ID] = float("-inf")
    if t == max_len:  # forced end: the caption is complete after max_len words
        end = logp[:, END_ID].clone()
        logp.fill_(float("-inf"))
        logp[:, END_ID] = end
    return logp


def _finish(tokens: torch.Tensor, scores: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor,
            locs: torch.Tensor) -> Decoded:
    is_end = tokens == END_ID  # (B, T)
    # every sequence contains <end> (forced at max_len), so argmax finds its first position
    lengths = is_end.int().argmax(1)  # (B,)
    pos = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
    tokens = tokens.masked_fill(pos.unsqueeze(0) > lengths.unsqueeze(1), PAD_ID)
    return Decoded(tokens, lengths, scores, alphas, betas, locs)


@torch.no_grad()
def greedy(model, feats: torch.Tensor, max_len: int = 20, mode: str | None = None) -> Decoded:
    """Greedy decoding from annotations feats (B, L, D)."""
    mode = mode or _test_mode(model)
    b = feats.shape[0]
    mem = model.memory(feats)
    state = model.decoder.init_state(feats)
    prev = torch.full((b,), START_ID, dtype=torch.long, device=feats.device)
    done = torch.zeros(b, dtype=torch.bool, device=feats.device)
    score = feats.new_zeros(b)
    toks, alphas, betas, locs = [], [], [], []
    for t in range(max_len + 1):
        out = model.decoder.step(mem, state, prev, mode)
        logp = _mask_logp(torch.log_softmax(out.logits.float(), -1), t, max_len)  # (B, V)
        best, tok = logp.max(-1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, END_ID), tok)
        score = score + torch.where(done, torch.zeros_like(best), best)
        toks.append(tok)
        alphas.append(out.attn.alpha)
        betas.append(out.beta)
        locs.append(out.attn.location)
        done = done | (tok == END_ID)
        state, prev = out.state, tok
        if bool(done.all()):
            break
    return _finish(torch.stack(toks, 1), score, torch.stack(alphas, 1), torch.stack(betas, 1),
                   torch.stack(locs, 1))


@torch.no_grad()
def beam_search(model, feats: torch.Tensor, beam: int = 3, max_len: int = 20,
                length_norm: float = 0.0, mode: str | None = None) -> Decoded:
    """Batched beam search; returns the best of ``beam`` finished hypotheses per image.

    Ranking of finished hypotheses uses score / (words + 1) ** length_norm (0 = raw log-prob).
    """
    mode = mode or _test_mode(model)
    b, k = feats.shape[0], beam
    dev = feats.device
    feats_k = feats.repeat_interleave(k, 0)  # (B·K, L, D)
    mem = model.memory(feats_k)
    state = model.decoder.init_state(feats_k)
    scores = feats.new_zeros(b, k)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    prev = torch.full((b * k,), START_ID, dtype=torch.long, device=dev)
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)  # (B, 1)
    toks = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    alphas = feats.new_empty(b * k, 0, feats.shape[1])
    betas = feats.new_empty(b * k, 0)
    locs = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    for t in range(max_len + 1):
        out = model.decoder.step(mem, state, prev, mode)
        logp = _mask_logp(torch.log_softmax(out.logits.float(), -1), t, max_len)  # (B·K, V)
        v = logp.shape[1]
        ended = torch.full_like(logp[:1], float("-inf"))
        ended[0, END_ID] = 0.0
        logp = torch.where(done.unsqueeze(1), ended, logp)  # finished: only <end>, free
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * v)  # (B, K·V)
        scores, idx = cand.topk(k, dim=1)  # (B, K)
        origin = (idx // v + offsets).reshape(-1)  # (B·K,) row each new beam extends
        tok = (idx % v).reshape(-1)  # (B·K,)
        state = State(out.state.h[origin], out.state.c[origin])
        toks = torch.cat([toks[origin], tok.unsqueeze(1)], 1)
        alphas = torch.cat([alphas[origin], out.attn.alpha[origin].unsqueeze(1)], 1)
        betas = torch.cat([betas[origin], out.beta[origin].unsqueeze(1)], 1)
        locs = torch.cat([locs[origin], out.attn.location[origin].unsqueeze(1)], 1)
        done = done[origin] | (tok == END_ID)
        prev = tok
        if bool(done.all()):
            break
    lengths = (toks == END_ID).int().argmax(1)  # (B·K,) words before the first <end>
    ranked = scores.reshape(-1)
    if length_norm:
        ranked = ranked / (lengths.float() + 1) ** length_norm
    best = ranked.reshape(b, k).argmax(1) + offsets.squeeze(1)  # (B,)
    return _finish(toks[best], scores.reshape(-1)[best], alphas[best], betas[best], locs[best])


def decode(model, feats: torch.Tensor, beam: int = 1, max_len: int = 20, length_norm: float = 0.0,
           mode: str | None = None) -> Decoded:
    """Greedy for beam 1, beam search otherwise."""
    if beam <= 1:
        return greedy(model, feats, max_len, mode)
    return beam_search(model, feats, beam, max_len, length_norm, mode)


def _test_mode(model) -> str:
    return getattr(model, "test_mode", None) or "expectation"
