"""Hard attention: the score-function (REINFORCE) estimator for the sampled locations.

The reward of a caption is log p(y | s̃, a) with its sampled locations s̃ (or, ``hard.reward =
"to_go"``, the words from each location's step on); the baseline is a moving average (kept in
:class:`TrainState`, so resume continues it) or the mean of the caption's other location samples
(``hard.baseline = "loo"``, ``hard.n_samples`` ≥ 2); an entropy bonus, the paper's trick of
training on the expected context with probability ``hard.mix_prob``, and optionally the box term
of attention supervision on the location distribution.
"""

from __future__ import annotations

import math

import torch

from showattend import config as C
from showattend import distributed as D
from showattend.losses import (box_attention_loss, doubly_stochastic, leave_one_out,
                               masked_cross_entropy, reinforce_loss, token_nll)
from showattend.models.captioner import Captioner
from showattend.runtime import TrainingError
from showattend.train.objectives.base import Objective, StepLoss, TrainingData, global_mean
from showattend.train.objectives.box_supervision import BoxSupervision
from showattend.train.state import TrainState
from showattend.vocab import PAD_ID

__all__ = ["HardAttention", "mix_for_batch", "sample_rows", "score_function_grad_variance"]


def mix_for_batch(cfg: C.HardConfig, b: int) -> tuple[str, torch.Tensor | None]:
    """The paper's trick: use the expected context with probability mix_prob."""
    if cfg.mix_mode == "batch":
        if float(torch.rand(())) < cfg.mix_prob:
            return "expectation", None
        return "sample", None
    if cfg.mix_mode == "sample":
        return "sample", torch.rand(b) < cfg.mix_prob
    return "sample", None


def sample_rows(mix: torch.Tensor | None, mode: str, b: int, n: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Which caption each row of the step's batch is, for ``n`` location samples per caption.

    Captions on the expected context are deterministic, so they are kept once; each caption on
    sampled locations is repeated ``n`` times, its rows adjacent (groups of n, after the
    expected-context rows). Returns (caption index per row, the rows' mix flags or None, the
    number of leading expected-context rows)."""
    if n == 1 or mode == "expectation":
        return torch.arange(b), mix, (b if mode == "expectation" else 0)
    if mix is None:
        return torch.arange(b).repeat_interleave(n), None, 0
    exp_idx = torch.nonzero(mix).flatten()
    smp_idx = torch.nonzero(~mix).flatten()
    idx = torch.cat([exp_idx, smp_idx.repeat_interleave(n)])
    rows_mix = torch.zeros(len(idx), dtype=torch.bool)
    rows_mix[:len(exp_idx)] = True
    return idx, rows_mix, len(exp_idx)


class HardAttention(Objective):
    """Cross-entropy of the sampled-location captions + the score-function term for the
    locations (``hard.lambda_r``), an entropy bonus (``hard.lambda_e``), the doubly
    stochastic penalty on the captions that used the expected context, and — with
    ``supervision.weight`` > 0 — the box term on the location distribution α (before a location
    is drawn from it: the one thing of a hard model that boxes can teach by gradient)."""

    name = "hard_reinforce"
    curve_keys = ("loss", "ce", "ds", "reward", "baseline", "adv_std", "entropy", "sf_grad_var",
                  "box")

    def __init__(self, cfg: C.Config, dist: D.Dist = D.SINGLE):
        super().__init__(cfg, dist)
        self.boxes: BoxSupervision | None = None  # bound when supervision.weight > 0

    def applies_to(self, model: Captioner) -> bool:
        return model.stochastic

    def bind(self, data: TrainingData) -> None:
        if self.cfg.supervision.weight > 0:
            self.boxes = BoxSupervision(self.cfg, self.dist)
            self.boxes.bind(data)

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
             state: TrainState, *, stats: bool = False, features: bool = False,
             image_ids: torch.Tensor | None = None) -> StepLoss:
        core, h, dist = D.unwrap(model), self.cfg.hard, self.dist
        w_tok = self.token_weight(int((caps[:, 1:] != PAD_ID).sum()))
        feats = imgs if features else core.encode(imgs)  # (B, L, D)
        mode, mix = mix_for_batch(h, feats.shape[0])
        if dist.enabled and h.mix_mode == "batch":  # one decision for the global batch: the
            mode = D.broadcast(mode, dist)  # ranks must run the same collectives below
        idx, mix, n_exp = sample_rows(mix, mode, len(caps), h.n_samples)
        if h.n_samples > 1 and mode != "expectation":  # rows regrouped (sample_rows)
            idx = idx.to(feats.device)
            feats, caps = feats[idx], caps[idx]  # (R, L, D), (R, T+1)
            image_ids = image_ids[idx.to(image_ids.device)] if image_ids is not None else None
        targets, mask = caps[:, 1:], caps[:, 1:] != PAD_ID
        if mix is not None:
            mix = mix.to(feats.device)
        out = model(imgs, caps, mode=mode, mix=mix, feats=feats)
        if mode == "expectation":
            loss, rec = self._expected(out, targets, mask, caps, w_tok)
            return self._with_boxes(out, caps, image_ids, loss, rec)
        sampled = ~mix if mix is not None else torch.ones(feats.shape[0], dtype=torch.bool,
                                                         device=feats.device)
        # The doubly stochastic penalty is a soft-attention regulariser: it applies to the
        # captions that used the expected context only, so with mixing off the attention
        # parameters learn through the score-function term alone (as the estimator prescribes).
        ds = (doubly_stochastic(out.alphas[~sampled], mask[~sampled]) if bool((~sampled).any())
              else out.alphas.new_zeros(()))
        if h.baseline == "loo":
            baseline = self._leave_one_out(n_exp, h.n_samples)
        else:
            baseline = self._baseline(state, out, targets, sampled)
        hl = reinforce_loss(out, targets, out.log_probs, out.entropies, baseline, h.lambda_r,
                            h.lambda_e, sampled, reward_kind=h.reward)
        loss = w_tok * hl.loss + self.cfg.train.alpha_c * self.token_weight(
            int((~sampled).sum())) * ds
        if h.baseline == "moving":
            self._update_baseline(state, baseline, hl.reward, sampled)
        adv = hl.advantage[sampled]
        # the leave-one-out baselines, logged as their mean for the whole caption (reward − its
        # first step's advantage: the first location is credited with every word)
        first = adv if adv.dim() == 1 else adv[:, :1].flatten()
        b_rec = (float(baseline) if isinstance(baseline, float) else
                 float((hl.reward[sampled] - first).mean()) if len(first) else 0.0)
        rec = {"loss": global_mean(loss, dist), "ce": float(hl.ce.detach()),
               "reward": float(hl.reward.mean()), "baseline": b_rec,
               "adv_std": float(adv.std()) if adv.numel() > 1 else 0.0,
               "entropy": float(hl.entropy.detach()), "soft_batch": 0.0}
        if bool((~sampled).any()):  # the penalty exists only for expected-context captions
            rec["ds"] = float(ds.detach())
        if stats:
            rec["sf_grad_var"] = score_function_grad_variance(core, hl, out, targets, h, sampled,
                                                              n_exp=n_exp)
        return self._with_boxes(out, caps, image_ids, loss, rec)

    @staticmethod
    def _leave_one_out(n_exp: int, n: int):
        """The per-sample baseline: rows before ``n_exp`` (expected context) get 0 (their
        advantage is masked anyway), each later group of n the mean of its other rows."""
        def baseline(credit: torch.Tensor) -> torch.Tensor:
            b = torch.zeros_like(credit)
            b[n_exp:] = leave_one_out(credit[n_exp:], n)
            return b
        return baseline

    def _with_boxes(self, out, caps: torch.Tensor, image_ids: torch.Tensor | None,
                    loss: torch.Tensor, rec: dict[str, float]) -> StepLoss:
        """Add the box term on α — the location distribution, before sampling."""
        if self.boxes is None:
            return loss, rec
        if image_ids is None:
            raise TrainingError("box supervision needs the image of each caption (image_ids)")
        cover, mask = self.boxes.batch_targets(caps, image_ids, out.alphas.shape[-1])
        cover, mask = cover.to(out.alphas.device), mask.to(out.alphas.device)
        box = box_attention_loss(out.alphas.float(), cover, mask, self.cfg.supervision.loss)
        loss = loss + self.cfg.supervision.weight * self.token_weight(int(mask.sum())) * box
        rec.update(loss=global_mean(loss, self.dist), box=float(box.detach()),
                   box_words=float(mask.sum()))
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
                                 sampled: torch.Tensor, chunks: int = 4, n_exp: int = 0) -> float:
    """Variance (trace, per parameter) of the score-function gradient on the attention
    parameters, estimated from ``chunks`` disjoint sub-batches (each an independent estimate:
    the n location samples of a caption stay in one sub-batch, as their baselines tie them)."""
    params = [p for p in model.decoder.attention.parameters() if p.requires_grad]
    mask = targets != PAD_ID
    if hl.advantage.dim() == 1:
        sf_rows = hl.advantage * (out.log_probs * mask).sum(1)  # (B,)
    else:
        sf_rows = (hl.advantage * out.log_probs * mask).sum(1)  # (B,)
    idx = torch.arange(len(sf_rows), device=sf_rows.device)[sampled]
    n = h.n_samples if len(idx) and len(idx) % h.n_samples == 0 else 1
    groups = idx.view(-1, n)  # (G, n)
    if len(groups) < chunks:
        return float("nan")
    grads = []
    for part in groups.chunk(chunks):
        part = part.flatten()
        sf = -(h.lambda_r * sf_rows[part]).sum() / mask[part].sum().clamp_min(1)
        g = torch.autograd.grad(sf, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([x.flatten() if x is not None else torch.zeros_like(p).flatten()
                                for x, p in zip(g, params)]))
    G = torch.stack(grads)  # (chunks, P)
    return float(G.var(0).sum())
