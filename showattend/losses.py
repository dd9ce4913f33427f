"""Training objectives.

Units (stated once, used everywhere):
* cross-entropy: mean over all non-padded target tokens of the batch;
* doubly stochastic penalty: λ · mean over images and cells of (1 − Σ_t α_ti)², padded steps masked;
* REINFORCE (hard attention): reward r = log p(y | s̃, a) **summed over the words** of a caption;
  the score-function and entropy terms are summed over captions and steps and then divided by the
  same token count as the cross-entropy. The whole loss is therefore the paper's per-caption
  objective scaled by 1/tokens, so λ_r and λ_e keep the paper's relative meaning. With
  ``hard.reward = "to_go"`` location s̃_t is credited with the words from t on instead
  (:func:`location_rewards`), and the per-word terms are summed the same way.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from showattend.vocab import PAD_ID


def token_nll(logits, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T); padded targets give 0.

    ``smoothing`` = ε > 0: cross-entropy against (1 − ε)·one-hot + ε/V instead (label smoothing).

    ``logits``: a (B, T, V) tensor, or the model's teacher-forced output, whose packed rows
    (one per computed position) are scored where they are: no (B, T, V) copy, no softmax over
    padding.
    """
    if hasattr(logits, "packed_logits"):  # models.captioner.CaptionerOutput
        b_idx, t_idx = logits.positions[:, 0], logits.positions[:, 1]  # (P,)
        nll_p = F.cross_entropy(logits.packed_logits, targets[b_idx, t_idx], reduction="none",
                                ignore_index=PAD_ID, label_smoothing=smoothing)  # (P,)
        return nll_p.new_zeros(targets.shape).index_put((b_idx, t_idx), nll_p)  # (B, T)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                          ignore_index=PAD_ID, label_smoothing=smoothing)  # (B, T)
    return nll


def masked_cross_entropy(logits, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean NLL over non-padded tokens: logits (B, T, V) or the model output, targets (B, T);
    ``smoothing``: label smoothing ε (token_nll)."""
    mask = targets != PAD_ID
    return token_nll(logits, targets, smoothing).sum() / mask.sum().clamp_min(1)


def doubly_stochastic(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over images and cells of (1 − Σ_t α_ti)²: alphas (B, T, L), mask (B, T) bool."""
    total = (alphas * mask.unsqueeze(-1).to(alphas.dtype)).sum(1)  # (B, L)
    return ((1.0 - total) ** 2).mean()


class HardLoss(NamedTuple):
    loss: torch.Tensor
    ce: torch.Tensor
    score_function: torch.Tensor  # the surrogate whose gradient is the score-function term
    entropy: torch.Tensor  # mean attention entropy per step (nats)
    reward: torch.Tensor  # (B,) r = log p(y|s̃,a), summed over words
    advantage: torch.Tensor  # (B,) r − b, or (B, T) R_t − b_t for the per-word reward (zero for
    #   samples that used the expected context)


def location_rewards(nll: torch.Tensor, mask: torch.Tensor, kind: str = "caption") -> torch.Tensor:
    """The reward each sampled location is credited with, from the per-token NLL (B, T).

    ``"caption"``: r = log p(y | s̃), the whole caption's log-likelihood (B,), the same for every
    location of the caption. ``"to_go"``: R_t = Σ_{t' ≥ t} log p(y_t' | …) (B, T), the words still
    to come — location s̃_t chooses the context z_t that predicts y_t and (through the LSTM) every
    later word, but no earlier one, so the earlier words are noise in its reward.
    """
    logp = -(nll * mask.to(nll.dtype)).detach()  # (B, T)
    if kind == "caption":
        return logp.sum(1)  # (B,)
    if kind == "to_go":
        return logp.flip(1).cumsum(1).flip(1) * mask.to(nll.dtype)  # (B, T), 0 on padding
    raise ValueError(f"location_rewards: kind must be 'caption' or 'to_go', got {kind!r}")


def leave_one_out(reward: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's baseline the mean of the other n − 1 rows of its group (rows i·n … i·n+n−1
    are the n location samples of one caption): reward (G·n, ...) → same shape. A sample's own
    reward never enters its baseline, so the estimator stays unbiased."""
    if n < 2:
        raise ValueError("leave_one_out needs at least 2 samples per caption")
    g = reward.reshape(-1, n, *reward.shape[1:])  # (G, n, ...)
    return ((g.sum(1, keepdim=True) - g) / (n - 1)).reshape(reward.shape)


def reinforce_loss(logits, targets: torch.Tensor, log_probs: torch.Tensor,
                   entropies: torch.Tensor, baseline: float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                   lambda_r: float,
                   lambda_e: float, sampled: torch.Tensor | None = None,
                   reward_kind: str = "caption") -> HardLoss:
    """Stochastic hard-attention objective (Xu et al., Eq. 12) as a surrogate loss.

    logits (B, T, V) or the model output (see token_nll), targets (B, T), log_probs (B, T) =
    log p(s̃_t) (0 where the expected context was used), entropies (B, T), sampled (B,) bool:
    which captions used sampled locations. ``baseline``: a number, a tensor shaped like the
    reward, or a function of the (detached) reward returning one (per-sample baselines, e.g.
    :func:`leave_one_out`); ``reward_kind``: see
    :func:`location_rewards`.
    """
    mask = targets != PAD_ID  # (B, T)
    n_tok = mask.sum().clamp_min(1)
    nll = token_nll(logits, targets)  # (B, T)
    ce = nll.sum() / n_tok
    reward = -nll.sum(1).detach()  # (B,)
    credit = location_rewards(nll, mask, reward_kind)  # (B,) or (B, T)
    advantage = credit - (baseline(credit) if callable(baseline) else baseline)
    if sampled is not None:
        advantage = advantage * sampled.to(advantage.dtype).view(-1, *([1] * (advantage.dim() - 1)))
    if advantage.dim() == 1:
        sf = -(lambda_r * advantage * (log_probs * mask).sum(1)).sum() / n_tok
    else:
        sf = -(lambda_r * advantage * log_probs * mask).sum() / n_tok
    ent_sum = (entropies * mask).sum()
    ent_term = -lambda_e * ent_sum / n_tok
    return HardLoss(ce + sf + ent_term, ce, sf, ent_sum / n_tok, reward, advantage)


def box_attention_loss(alphas: torch.Tensor, cover: torch.Tensor, mask: torch.Tensor,
                       kind: str = "mass", eps: float = 1e-8) -> torch.Tensor:
    """Attention supervision from boxes: mean over the supervised words of

    - ``"mass"``: −log Σ_i α_ti c_ti, the log of the attention correctness (Liu et al., 2017):
      the mass on the named thing, each cell counted by the share ``c`` of it the boxes cover —
      the measure itself, so the model may put its mass anywhere on the thing;
    - ``"ce"``: −Σ_i q_ti log α_ti with q_t = c_t / Σ_i c_ti, the cross-entropy to the boxes'
      share of each cell (pulls the map towards spreading evenly over the boxes).

    alphas (B, T, L), cover (B, T, L) in [0, 1], mask (B, T) bool: the words that name a boxed
    thing. Zero (with a gradient graph) when no word is supervised.
    """
    m = mask.to(alphas.dtype)  # (B, T)
    n = m.sum()
    if kind == "mass":
        per_word = -torch.log((alphas * cover).sum(-1).clamp_min(eps))  # (B, T)
    elif kind == "ce":
        q = cover / cover.sum(-1, keepdim=True).clamp_min(eps)  # (B, T, L)
        per_word = -(q * torch.log(alphas.clamp_min(eps))).sum(-1)  # (B, T)
    else:
        raise ValueError(f"box_attention_loss: kind must be 'mass' or 'ce', got {kind!r}")
    return (per_word * m).sum() / n.clamp_min(1.0)
