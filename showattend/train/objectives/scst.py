"""Self-critical sequence training (Rennie et al., CVPR 2017): the score-function estimator on
the caption itself, with CIDEr-D as the reward.

For every image of the batch, K captions are drawn from the model (multinomial, temperature 1,
at most ``eval.max_len`` words); each gets the reward r = CIDEr-D(sample, the image's training
references) − b, where the baseline b is the mean reward of the image's *other* K − 1 samples
(Luo, 2020; ``scst.baseline = "mean"``) or the CIDEr-D of the model's greedy caption (Rennie;
``"greedy"``). The loss is −Σ_k r_k · log p(sample_k) over the sample's real tokens (its words
and <end>), averaged over the samples. Its gradient is the score-function estimate of
∇ E[CIDEr-D]; the baseline does not depend on the sample it is subtracted from, so it adds no
bias (a baseline that included the sample's own reward would).

Hard attention: a sample is a caption *and* its attention locations; log p(sample) is the sum of
the words' and the locations' log-probabilities, so the two score-function terms share one
reward and one baseline (the caption's CIDEr-D, not the per-word log-likelihood reward of
``hard.py``).

With ``supervision.weight`` > 0 the box term of :mod:`box_supervision` is kept: the replayed
maps of the sampled words that name a boxed thing of the photo are pulled to its boxes, so
fine-tuning for CIDEr-D does not undo what the boxes taught the attention.

Samples are drawn without gradient (the fast step-by-step decoder) and then replayed with
teacher forcing (one batched pass, the locations fixed by the same uniform draws), dropout off
in both, so the replay's log-probabilities are exactly those of the distribution sampled from.
The baseline is per image, inside one rank's share of the batch, so torchrun needs no
cross-rank reduction for it; only the logged statistics are summed across ranks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from showattend import distributed as D
from showattend.cider import CiderD
from showattend.decoding import greedy, sample
from showattend.losses import box_attention_loss, token_nll
from showattend.models.captioner import Captioner
from showattend.train.objectives.base import Objective, StepLoss, TrainingData, global_mean
from showattend.train.objectives.box_supervision import BoxSupervision
from showattend.train.state import TrainState
from showattend.vocab import PAD_ID, START_ID, Vocab, tokenize

__all__ = ["SelfCritical", "scst_loss", "leave_one_out_baseline"]


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, K) → the mean of each sample's K − 1 siblings (B, K)."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def scst_loss(seq_logp: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """−mean_k advantage_k · log p(sample_k): seq_logp (N,) summed over each sample's real
    tokens (with gradient), advantage (N,) constants."""
    return -(advantage.detach() * seq_logp).mean()


@contextmanager
def _no_dropout(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class SelfCritical(Objective):
    """CIDEr-D of sampled captions against the image's references, minus a baseline."""

    name = "scst"
    per_image = True  # an epoch visits every training image once (its K samples are the batch)
    curve_keys = ("loss", "reward", "baseline", "adv_std", "greedy_cider", "entropy", "length",
                  "box")

    def applies_to(self, model: Captioner) -> bool:
        return self.cfg.train.objective == "scst"

    def bind(self, data: TrainingData) -> None:
        self.vocab: Vocab = data.vocab
        self.end = " <end>" if self.cfg.scst.end_token else ""
        self.refs = {r.image_id: [" ".join(tokenize(c)) + self.end for c in r.captions]
                     for r in data.records if r.captions}
        self.cider = CiderD(self.refs)  # document frequencies of the training references, once
        self.boxes: BoxSupervision | None = None
        if self.cfg.supervision.weight > 0:
            self.boxes = BoxSupervision(self.cfg, self.dist)
            self.boxes.bind(data)

    def words(self, tokens: torch.Tensor) -> list[str]:
        """(N, T) sampled ids → space-joined words (up to <end>; "<end>" appended with
        ``scst.end_token``, as the references have it then)."""
        return [" ".join(self.vocab.decode(row)) + self.end for row in tokens.tolist()]

    def rewards(self, tokens: torch.Tensor, keys: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.cider.score(self.words(tokens), keys)).float()

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
             state: TrainState, *, stats: bool = False, features: bool = False,
             image_ids: torch.Tensor | None = None) -> StepLoss:
        if image_ids is None:
            raise ValueError("self-critical training needs the image of each batch row")
        core, s = D.unwrap(model), self.cfg.scst
        k, max_len = s.samples, self.cfg.eval.max_len
        feats = imgs if features else core.encode(imgs)  # (B, L, D)
        keys = [int(i) for i in image_ids.tolist()]
        rep_keys = [i for i in keys for _ in range(k)]  # the B·K samples, image-major
        with _no_dropout(model):
            drawn = sample(core, feats.detach(), max_len, repeats=k)
            reward = self.rewards(drawn.tokens, rep_keys).to(feats.device)  # (B·K,)
            greedy_r = None
            if s.baseline == "greedy" or stats or (state.step + 1) % self.cfg.train.log_every == 0:
                g = greedy(core, feats.detach(), max_len)
                greedy_r = self.rewards(g.tokens, keys).to(feats.device)  # (B,)
            base = (greedy_r.repeat_interleave(k) if s.baseline == "greedy"
                    else leave_one_out_baseline(reward.view(-1, k)).flatten())  # (B·K,)
            caps_s = torch.cat([torch.full_like(drawn.tokens[:, :1], START_ID), drawn.tokens], 1)
            out = model(None, caps_s, feats=feats, noise=drawn.noise, repeats=k)
        targets = caps_s[:, 1:]  # (B·K, T)
        mask = targets != PAD_ID
        tok_logp = -token_nll(out, targets) + out.log_probs * core.stochastic  # (B·K, T)
        seq_logp = (tok_logp * mask).sum(1)  # (B·K,)
        adv = reward - base
        loss = self.token_weight(len(adv)) * scst_loss(seq_logp, adv)
        rec = {}
        if self.boxes is not None:
            cover, bmask = self.boxes.batch_targets(caps_s, image_ids.repeat_interleave(k),
                                                    out.alphas.shape[-1])
            cover, bmask = cover.to(out.alphas.device), bmask.to(out.alphas.device)
            box = box_attention_loss(out.alphas.float(), cover, bmask, self.cfg.supervision.loss)
            loss = loss + self.cfg.supervision.weight * self.token_weight(int(bmask.sum())) * box
            rec.update(box=float(box.detach()), box_words=float(bmask.sum()))
        rec |= {"loss": global_mean(loss, self.dist),
               "reward": _mean(reward, self.dist), "baseline": _mean(base, self.dist),
               "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
               "length": _mean(drawn.lengths.float(), self.dist)}
        if greedy_r is not None:
            rec["greedy_cider"] = _mean(greedy_r, self.dist)
        with torch.no_grad():
            logp = torch.log_softmax(out.packed_logits.float(), -1)  # (P, V) real positions
            rec["entropy"] = float(-(logp.exp() * logp).sum(-1).mean())
        return loss, rec


def _mean(x: torch.Tensor, dist: D.Dist) -> float:
    tot, n = D.all_sum([float(x.sum()), float(x.numel())], dist)
    return tot / n if n else float("nan")



