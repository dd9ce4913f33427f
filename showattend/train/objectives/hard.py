"""Hard attention: the score-function (REINFORCE) estimator for the sampled locations.

The reward of a caption is log p(y | s̃, a) with its sampled locations s̃; a moving-average
baseline (kept in :class:`TrainState`, so resume continues it), an entropy bonus, and the
paper's trick of training on the expected context with probability ``hard.mix_prob``.
"""

from __future__ import annotations

import math

import torch

from showattend import config as C
from showattend import distributed as D
from showattend.losses import doubly_stochastic, masked_cross_entropy, reinforce_loss, token_nll
from showattend.models.captioner import Captioner
from showattend.train.objectives.base import Objective, StepLoss, global_mean
from showattend.train.state import TrainState
from showattend.vocab import PAD_ID

__all__ = ["HardAttention", "mix_for_batch", "score_function_grad_variance"]


def mix_for_batch(cfg: C.HardConfig, b: int) -> tuple[str, torch.Tensor | None]:
    """The paper's trick: use the expected context with probability mix_prob."""
    if cfg.mix_mode == "batch":
        if float(torch.rand(())) < cfg.mix_prob:
            return "expectation", None
        return "sample", None
    if cfg.mix_mode == "sample":
        return "sample", torch.rand(b) < cfg.mix_prob
    return "sample", None


class HardAttention(Objective):
    """Cross-entropy of the sampled-location captions + the score-function term for the
    locations (``hard.lambda_r``), an entropy bonus (``hard.lambda_e``), and the doubly
    stochastic penalty on the captions that used the expected context."""

    name = "hard_reinforce"
    curve_keys = ("loss", "ce", "ds", "reward", "baseline", "adv_std", "entropy", "sf_grad_var")

    def applies_to(self, model: Captioner) -> bool:
        return model.stochastic

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
             state: TrainState, *, stats: bool = False, features: bool = False,
             image_ids: torch.Tensor | None = None) -> StepLoss:
        core, h, dist = D.unwrap(model), self.cfg.hard, self.dist
        w_tok = self.token_weight(int((caps[:, 1:] != PAD_ID).sum()))
        feats = imgs if features else core.encode(imgs)  # (B, L, D)
        if h.n_samples > 1:
            feats = feats.repeat_interleave(h.n_samples, 0)  # (B·N, L, D)
            caps = caps.repeat_interleave(h.n_samples, 0)
        targets, mask = caps[:, 1:], caps[:, 1:] != PAD_ID
        mode, mix = mix_for_batch(h, feats.shape[0])
        if dist.enabled and h.mix_mode == "batch":  # one decision for the global batch: the
            mode = D.broadcast(mode, dist)  # ranks must run the same collectives below
        if mix is not None:
            mix = mix.to(feats.device)
        out = model(imgs, caps, mode=mode, mix=mix, feats=feats)
        if mode == "expectation":
            return self._expected(out, targets, mask, caps, w_tok)
        sampled = ~mix if mix is not None else torch.ones(feats.shape[0], dtype=torch.bool,
                                                         device=feats.device)
        # The doubly stochastic penalty is a soft-attention regulariser: it applies to the
        # captions that used the expected context only, so with mixing off the attention
        # parameters learn through the score-function term alone (as the estimator prescribes).
        ds = (doubly_stochastic(out.alphas[~sampled], mask[~sampled]) if bool((~sampled).any())
              else out.alphas.new_zeros(()))
        baseline = self._baseline(state, out, targets, sampled)
        hl = reinforce_loss(out, targets, out.log_probs, out.entropies, baseline, h.lambda_r,
                            h.lambda_e, sampled)
        loss = w_tok * hl.loss + self.cfg.train.alpha_c * self.token_weight(
            int((~sampled).sum())) * ds
        self._update_baseline(state, baseline, hl.reward, sampled)
        rec = {"loss": global_mean(loss, dist), "ce": float(hl.ce.detach()),
               "reward": float(hl.reward.mean()), "baseline": float(baseline),
               "adv_std": float(hl.advantage[sampled].std()) if int(sampled.sum()) > 1 else 0.0,
               "entropy": float(hl.entropy.detach()), "soft_batch": 0.0}
        if bool((~sampled).any()):  # the penalty exists only for expected-context captions
            rec["ds"] = float(ds.detach())
        if stats:
            rec["sf_grad_var"] = score_function_grad_variance(core, hl, out, targets, h, sampled)
        return loss, rec

    def _expected(self, out, targets, mask, caps, w_tok: float) -> StepLoss:
        """A batch on the expected context: the soft objective."""
        ds = doubly_stochastic(out.alphas, mask)
        ce = masked_cross_entropy(out, targets)
        loss = w_tok * ce + self.cfg.train.alpha_c * self.token_weight(len(caps)) * ds
        return loss, {"loss": global_mean(loss, self.dist), "ce": float(ce.detach()),
                      "ds": float(ds.detach()), "soft_batch": 1.0}

    def _baseline(self, state: TrainState, out, targets, sampled: torch.Tensor) -> float:
        """The moving-average baseline, started at the first sampled captions' mean reward."""
        if state.baseline is not None:
            return state.baseline
        # start the moving average at the first rewards, not at 0 — of the sampled captions
        # only, like every later update (expected-context captions are not estimator draws)
        with torch.no_grad():
            r0 = -token_nll(out, targets).sum(1)[sampled]  # (S,)
        r_sum, r_cnt = D.all_sum([float(r0.sum()), float(len(r0))], self.dist)
        # no sampled caption yet: the advantages are all masked to 0 anyway
        return r_sum / r_cnt if r_cnt else 0.0

    def _update_baseline(self, state: TrainState, baseline: float, reward: torch.Tensor,
                         sampled: torch.Tensor) -> None:
        h = self.cfg.hard
        r_sum, r_cnt = D.all_sum([float(reward[sampled].sum()), float(sampled.sum())], self.dist)
        if r_cnt:
            r = r_sum / r_cnt  # mean reward of the sampled captions (of the global batch)
            if math.isfinite(r):  # one non-finite batch (skipped by nan_policy) must not poison b
                state.baseline = h.baseline_decay * baseline + (1 - h.baseline_decay) * r


def score_function_grad_variance(model: Captioner, hl, out, targets, h: C.HardConfig,
                                 sampled: torch.Tensor, chunks: int = 4) -> float:
    """Variance (trace, per parameter) of the score-function gradient on the attention
    parameters, estimated from ``chunks`` disjoint sub-batches (each an independent estimate)."""
    params = [p for p in model.decoder.attention.parameters() if p.requires_grad]
    mask = targets != PAD_ID
    logp_s = (out.log_probs * mask).sum(1)  # (B,)
    idx = torch.arange(len(logp_s), device=logp_s.device)[sampled]
    if len(idx) < chunks:
        return float("nan")
    grads = []
    for part in idx.chunk(chunks):
        sf = -(h.lambda_r * hl.advantage[part] * logp_s[part]).sum() / mask[part].sum().clamp_min(1)
        g = torch.autograd.grad(sf, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([x.flatten() if x is not None else torch.zeros_like(p).flatten()
                                for x, p in zip(g, params)]))
    G = torch.stack(grads)  # (chunks, P)
    return float(G.var(0).sum())
