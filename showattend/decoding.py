"""Decoding: greedy and batched beam search. Tensors in, tensors out.

Both run the same step function, so beam size 1 reproduces greedy exactly. Beam search keeps the
whole batch × beams in one tensor (B·K rows) and never loops over images. A finished hypothesis
stays in its slot and can only be extended by <end> at zero cost, so the search always ends with
K complete captions per image; at step ``max_len`` only <end> is allowed, so every image gets a
caption even when no beam ended by itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from showattend.models.attention import repeat_rows
from showattend.models.decoder import State
from showattend.models.packed import decoding
from showattend.vocab import END_ID, PAD_ID, START_ID, UNK_ID


class Decoded(NamedTuple):
    """Best sequence per image. T = steps run; positions after <end> hold <pad>."""

    tokens: torch.Tensor  # (B, T) word ids, then <end>, then <pad>
    lengths: torch.Tensor  # (B,) number of words (without <end>)
    scores: torch.Tensor  # (B,) log p(caption) including <end>
    alphas: torch.Tensor  # (B, T, L) attention distribution at each step
    betas: torch.Tensor  # (B, T) gate value at each step
    locations: torch.Tensor  # (B, T) attended cell (sampled / argmax)
    # per-step extras of the attention kinds that have them (AttentionOutput.aux), (B, T, ...):
    # "heads" (B, T, H, L), "window" (B, T, 4); None for soft and hard attention
    aux: dict[str, torch.Tensor] | None = None


def _mask_logp(logp: torch.Tensor, t: int, max_len: int, allow_unk: bool = True) -> torch.Tensor:
    logp[:, PAD_ID] = float("-inf")
    logp[:, START_ID] = float("-inf")
    if not allow_unk:  # "a boy plays with a <unk>" is no caption: the next best word instead
        logp[:, UNK_ID] = float("-inf")
    if t == max_len:  # forced end: the caption is complete after max_len words
        end = logp[:, END_ID].clone()
        logp.fill_(float("-inf"))
        logp[:, END_ID] = end
    return logp


def _finish(tokens: torch.Tensor, scores: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor,
            locs: torch.Tensor, aux: dict[str, torch.Tensor] | None = None) -> Decoded:
    is_end = tokens == END_ID  # (B, T)
    # every sequence contains <end> (forced at max_len), so argmax finds its first position
    lengths = is_end.int().argmax(1)  # (B,)
    pos = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
    tokens = tokens.masked_fill(pos.unsqueeze(0) > lengths.unsqueeze(1), PAD_ID)
    return Decoded(tokens, lengths, scores, alphas, betas, locs, aux or None)


def _stack_aux(steps: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """Greedy: per-step aux dicts → {name: (B, T, ...)}."""
    if not steps or not steps[0]:
        return None
    return {k: torch.stack([s[k] for s in steps], 1) for k in steps[0]}


def _block_repeats(logp: torch.Tensor, hist: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any word that would repeat an n-gram already in the row's history.

    logp (R, V) next-word log-probs; hist (R, t) words so far (<start> first). A caption such as
    "a man in a blue shirt and a blue shirt" is the classic failure of maximum-likelihood decoding
    on photos; with n = 3 the second "a blue shirt" cannot be produced.
    """
    t = hist.shape[1]
    if n < 2 or t < n - 1:
        return logp
    prefix = hist[:, t - (n - 1):]  # (R, n-1) the last n-1 words
    starts = t - (n - 1)  # earlier n-grams start at 0 … starts-1
    if starts <= 0:
        return logp
    match = torch.ones(hist.shape[0], starts, dtype=torch.bool, device=hist.device)  # (R, S)
    for j in range(n - 1):
        match &= hist[:, j: j + starts] == prefix[:, j: j + 1]
    banned = hist[:, n - 1: n - 1 + starts]  # (R, S) the word that completed each earlier n-gram
    rows, cols = match.nonzero(as_tuple=True)
    if len(rows):
        logp = logp.index_put((rows, banned[rows, cols]),
                              torch.tensor(float("-inf"), device=logp.device))
    return logp


def packed_weights(fn: Callable[..., Decoded]) -> Callable[..., Decoded]:
    """Run a decoding function with the decoder's weights packed once for the whole call
    (models/packed.py): every step multiplies a few rows by the same matrices."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs) -> Decoded:
        with contextlib.ExitStack() as packs:  # an ensemble packs each member's weights
            for dec in getattr(model.decoder, "members", (model.decoder,)):
                packs.enter_context(decoding(dec))
            return fn(model, *args, **kwargs)

    return run


@torch.no_grad()
@packed_weights
def greedy(model, feats: torch.Tensor, max_len: int = 20, mode: str | None = None,
           no_repeat_ngram: int = 0, allow_unk: bool = False) -> Decoded:
    """Greedy decoding from annotations feats (B, L, D); <unk> is never chosen unless
    ``allow_unk``."""
    mode = mode or _test_mode(model)
    b = feats.shape[0]
    mem = model.memory(feats)
    state = model.decoder.init_state(feats)
    prev = torch.full((b,), START_ID, dtype=torch.long, device=feats.device)
    done = torch.zeros(b, dtype=torch.bool, device=feats.device)
    score = feats.new_zeros(b)
    hist = prev.unsqueeze(1)  # (B, 1) only read when blocking repeats
    toks, alphas, betas, locs, aux = [], [], [], [], []
    for t in range(max_len + 1):
        out = model.decoder.step(mem, state, prev, mode)
        logp = torch.log_softmax(out.logits.float(), -1)  # (B, V)
        if no_repeat_ngram:
            logp = _block_repeats(logp, hist, no_repeat_ngram)
        logp = _mask_logp(logp, t, max_len, allow_unk)
        best, tok = logp.max(-1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, END_ID), tok)
        score = score + torch.where(done, torch.zeros_like(best), best)
        toks.append(tok)
        alphas.append(out.attn.alpha)
        betas.append(out.beta)
        locs.append(out.attn.location)
        aux.append(out.attn.aux)
        done = done | (tok == END_ID)
        state, prev = out.state, tok
        if no_repeat_ngram:
            hist = torch.cat([hist, tok.unsqueeze(1)], 1)
        if bool(done.all()):
            break
    return _finish(torch.stack(toks, 1), score, torch.stack(alphas, 1), torch.stack(betas, 1),
                   torch.stack(locs, 1), _stack_aux(aux))


@torch.no_grad()
@packed_weights
def beam_search(model, feats: torch.Tensor, beam: int = 3, max_len: int = 20,
                length_norm: float = 0.0, mode: str | None = None,
                no_repeat_ngram: int = 0, keep_beams: bool = False,
                allow_unk: bool = False) -> Decoded:
    """Batched beam search; returns the best of ``beam`` finished hypotheses per image (never
    extending a hypothesis by <unk> unless ``allow_unk``).

    Ranking of finished hypotheses uses score / (words + 1) ** length_norm (0 = raw log-prob).
    ``keep_beams``: return all K finished hypotheses instead, as B·K rows (image-major, each
    image's K in ranked order, best first; row i·K is what ``keep_beams=False`` returns).
    Each step stores only its new word, attention map and a back-pointer per beam; the best
    sequence is rebuilt at the end (no re-copying of histories). An image whose beams have all
    ended leaves the working batch, so late steps cost only what the still-open images need.
    """
    mode = mode or _test_mode(model)
    b, k = feats.shape[0], beam
    dev = feats.device
    n_cells = feats.shape[1]
    steps = max_len + 1
    # Per step, indexed by global beam row (image · K + beam): the word chosen, the row it
    # extended at the previous step, and the attention/gate/location that produced it.
    h_tok = torch.full((steps, b * k), PAD_ID, dtype=torch.long, device=dev)
    h_from = torch.zeros(steps, b * k, dtype=torch.long, device=dev)
    h_alpha = feats.new_zeros(steps, b * k, n_cells)
    h_beta = feats.new_zeros(steps, b * k)
    h_loc = torch.zeros(steps, b * k, dtype=torch.long, device=dev)
    h_aux: dict[str, torch.Tensor] = {}  # attention extras (per-head maps, windows), same rows
    final = torch.zeros(b, k, device=dev)  # scores of the finished beams (fp32 logp)
    final_len = torch.zeros(b, k, dtype=torch.long, device=dev)  # words before <end>
    last = torch.zeros(b, dtype=torch.long, device=dev)  # step at which each image finished

    work = torch.arange(b, device=dev)  # images still searching
    # the annotation projection and h_0/c_0 depend on the image only: once per image, then K rows
    mem = model.memory(feats)
    # kinds that share memory score the K beams of an image against its one copy (attention.py);
    # the others get K copies
    shared = bool(getattr(model.decoder.attention, "shares_memory", False))
    if not shared:
        mem = repeat_rows(mem, k)  # each (B·K, ...)
    state = repeat_rows(model.decoder.init_state(feats), k)
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    prev = torch.full((b * k,), START_ID, dtype=torch.long, device=dev)
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    n_words = torch.zeros(b * k, dtype=torch.long, device=dev)
    hist = prev.unsqueeze(1)  # (R, t) words so far; only kept when blocking repeats
    ended = None
    for t in range(steps):
        n = len(work)
        out = model.decoder.step(mem, state, prev, mode)
        logp = torch.log_softmax(out.logits.float(), -1)  # (n·K, V)
        if no_repeat_ngram:
            logp = _block_repeats(logp, hist, no_repeat_ngram)
        logp = _mask_logp(logp, t, max_len, allow_unk)
        v = logp.shape[1]
        if ended is None:
            ended = torch.full_like(logp[:1], float("-inf"))
            ended[0, END_ID] = 0.0
        fin_rows = done.nonzero().squeeze(1)
        if len(fin_rows):  # finished: only <end>, free (rewrites those rows only)
            logp.index_copy_(0, fin_rows, ended.expand(len(fin_rows), -1))
        cand = logp.add_(scores.reshape(-1, 1)).view(n, k * v)  # (n, K·V) in place
        scores, idx = cand.topk(k, dim=1)  # (n, K)
        offsets = (torch.arange(n, device=dev) * k).unsqueeze(1)  # (n, 1)
        origin = (idx // v + offsets).reshape(-1)  # (n·K,) working row each new beam extends
        tok = (idx % v).reshape(-1)  # (n·K,)
        rows = (work.unsqueeze(1) * k + torch.arange(k, device=dev)).reshape(-1)  # global rows
        h_tok[t, rows] = tok
        h_from[t, rows] = rows[origin]
        h_alpha[t, rows] = out.attn.alpha[origin].to(h_alpha.dtype)  # bf16 under autocast
        h_beta[t, rows] = out.beta[origin].to(h_beta.dtype)
        h_loc[t, rows] = out.attn.location[origin]
        for name, v in (out.attn.aux or {}).items():
            if name not in h_aux:
                h_aux[name] = v.new_zeros(steps, b * k, *v.shape[1:])
            h_aux[name][t, rows] = v[origin].to(h_aux[name].dtype)
        n_words = n_words[origin] + ((~done[origin]) & (tok != END_ID)).long()
        # a beam at -inf (more beams than the vocabulary can fill) can never win: count it done
        done = done[origin] | (tok == END_ID) | scores.reshape(-1).isinf()
        state = State(out.state.h[origin], out.state.c[origin])
        prev = tok
        if no_repeat_ngram:
            hist = torch.cat([hist[origin], tok.unsqueeze(1)], 1)
        img_done = done.reshape(n, k).all(1)  # (n,)
        if bool(img_done.any()):
            fin = work[img_done]
            final[fin] = scores[img_done]
            final_len[fin] = n_words.reshape(n, k)[img_done]
            last[fin] = t
            keep = ~img_done
            if not bool(keep.any()):
                break
            keep_rows = keep.repeat_interleave(k)  # (n·K,)
            work, scores = work[keep], scores[keep]
            mem = type(mem)(*(x[keep if shared else keep_rows] for x in mem))
            state = State(state.h[keep_rows], state.c[keep_rows])
            prev, done, n_words = prev[keep_rows], done[keep_rows], n_words[keep_rows]
            if no_repeat_ngram:
                hist = hist[keep_rows]
    ranked = final
    if length_norm:
        ranked = final / (final_len.float() + 1) ** length_norm
    if keep_beams:  # stable: among equal scores the lower beam comes first, as argmax picks it
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, K)
    else:
        order = ranked.argmax(1, keepdim=True)  # (B, 1)
    n_out = order.shape[1]
    imgs = torch.arange(b, device=dev).repeat_interleave(n_out)  # (R,) R = B·n_out output rows
    order = order.reshape(-1)  # (R,)
    cur = imgs * k + order  # (R,) global row of each output's final beam
    last_r = last[imgs]  # (R,)
    t_run = int(last.max()) + 1
    r = len(cur)
    toks = torch.full((r, t_run), PAD_ID, dtype=torch.long, device=dev)
    alphas = feats.new_zeros(r, t_run, n_cells)
    betas = feats.new_zeros(r, t_run)
    locs = torch.zeros(r, t_run, dtype=torch.long, device=dev)
    aux = {name: v.new_zeros(r, t_run, *v.shape[2:]) for name, v in h_aux.items()}
    for t in range(t_run - 1, -1, -1):  # follow the back-pointers from each image's last step
        live = last_r >= t  # (R,)
        toks[:, t] = torch.where(live, h_tok[t, cur], toks[:, t])
        alphas[:, t] = torch.where(live.unsqueeze(1), h_alpha[t, cur], alphas[:, t])
        betas[:, t] = torch.where(live, h_beta[t, cur], betas[:, t])
        locs[:, t] = torch.where(live, h_loc[t, cur], locs[:, t])
        for name, v in h_aux.items():
            keep = live.view(-1, *([1] * (v.dim() - 2)))
            aux[name][:, t] = torch.where(keep, v[t, cur], aux[name][:, t])
        cur = torch.where(live, h_from[t, cur], cur)
    return _finish(toks, final[imgs, order], alphas, betas, locs, aux)


def decode(model, feats: torch.Tensor, beam: int = 1, max_len: int = 20, length_norm: float = 0.0,
           mode: str | None = None, no_repeat_ngram: int = 0, keep_beams: bool = False,
           allow_unk: bool = False) -> Decoded:
    """Greedy for beam 1, beam search otherwise (``keep_beams``: B·beam rows, see beam_search).
    The unknown word is never generated unless ``allow_unk`` (``eval.allow_unk``)."""
    mode = applicable_mode(model, mode)
    if beam <= 1:
        return greedy(model, feats, max_len, mode, no_repeat_ngram, allow_unk)
    return beam_search(model, feats, beam, max_len, length_norm, mode, no_repeat_ngram,
                       keep_beams=keep_beams, allow_unk=allow_unk)


_MODE_WARNED: set[str] = set()


def applicable_mode(model, mode: str | None) -> str | None:
    """``mode`` where the model's attention kind reads it (soft and hard attention and their
    glimpses); otherwise None, said once per kind in one log line instead of ignored silently."""
    if mode is None:
        return None
    attn = model.decoder.attention
    if mode in getattr(attn, "test_modes", ("expectation",)):
        return mode
    kind = str(getattr(attn, "mode_label", getattr(attn, "kind", type(attn).__name__)))
    if kind not in _MODE_WARNED:
        _MODE_WARNED.add(kind)
        logging.getLogger(__name__).warning(
            "--mode %s does not apply to %s attention (it always decodes with its own context); "
            "ignored", mode, kind)
    return None


class Sampled(NamedTuple):
    """Captions drawn from the model (multinomial, word by word); positions after <end> hold
    <pad>. ``noise`` (B, T) are the uniform draws that fixed the sampled attention locations
    (hard attention), so teacher forcing with the same draws replays the same locations."""

    tokens: torch.Tensor  # (B, T)
    lengths: torch.Tensor  # (B,) words, without <end>
    noise: torch.Tensor | None  # (B, T) or None (soft attention)


@torch.no_grad()
@packed_weights
def sample(model, feats: torch.Tensor, max_len: int = 20, temperature: float = 1.0,
           generator: torch.Generator | None = None, repeats: int = 1) -> Sampled:
    """Draw ``repeats`` captions per row of feats (B, L, D), image-major (B·repeats rows), from
    p(w_t | w_<t, image)^(1/temperature): the same step function as decoding; <pad> and <start>
    are never drawn, and <end> is forced after ``max_len`` words. Stochastic attention samples
    its locations too (its training mode, "sample"), soft attention uses its expected context.
    Draws come from ``generator`` or the global stream (which a checkpoint saves, so resumed runs
    repeat them). The attention memory is computed once per image, as in beam search."""
    mode = "sample" if getattr(model, "stochastic", False) else "expectation"
    b, dev = feats.shape[0] * repeats, feats.device
    mem = model.memory(feats)
    if repeats > 1 and not getattr(model.decoder.attention, "shares_memory", False):
        mem = repeat_rows(mem, repeats)
    state = repeat_rows(model.decoder.init_state(feats), repeats)
    prev = torch.full((b,), START_ID, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    noise = torch.rand(b, max_len + 1, device=dev, generator=generator) \
        if mode == "sample" else None
    toks = []
    for t in range(max_len + 1):
        out = model.decoder.step(mem, state, prev, mode,
                                 noise=noise[:, t] if noise is not None else None)
        logp = _mask_logp(torch.log_softmax(out.logits.float() / temperature, -1), t, max_len)
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, END_ID), tok)
        toks.append(tok)
        done = done | (tok == END_ID)
        state, prev = out.state, tok
        if bool(done.all()):
            break
    fin = _finish(torch.stack(toks, 1), feats.new_zeros(b), feats.new_zeros(b, 1, 1),
                  feats.new_zeros(b, 1), feats.new_zeros(b, 1))
    if noise is not None:
        noise = noise[:, : fin.tokens.shape[1]]
    return Sampled(fin.tokens, fin.lengths, noise)


def _test_mode(model) -> str:
    return getattr(model, "test_mode", None) or "expectation"
