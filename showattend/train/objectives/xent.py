"""Cross-entropy with the doubly stochastic attention penalty (the paper's soft objective)."""

from __future__ import annotations

import torch

from showattend.losses import doubly_stochastic, masked_cross_entropy
from showattend.models.captioner import Captioner, CaptionerOutput
from showattend.train.objectives.base import Objective, StepLoss, global_mean
from showattend.train.state import TrainState
from showattend.vocab import PAD_ID

__all__ = ["CrossEntropy"]


class CrossEntropy(Objective):
    """Teacher-forced word cross-entropy + λ Σ_i (1 − Σ_t α_ti)² (``train.alpha_c`` = λ).

    Trains every deterministic attention kind: soft, local, multi-head, differentiable glimpses.
    """

    name = "cross_entropy"
    curve_keys = ("loss", "ce", "ds")

    def applies_to(self, model: Captioner) -> bool:
        return not model.stochastic

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
             state: TrainState, *, stats: bool = False, features: bool = False,
             image_ids: torch.Tensor | None = None) -> StepLoss:
        out, loss, rec = self.terms(model, imgs, caps, features)
        rec["loss"] = global_mean(loss, self.dist)
        return loss, rec

    def terms(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
              features: bool) -> tuple[CaptionerOutput, torch.Tensor, dict[str, float]]:
        """The forward pass, this objective's loss and its records (for objectives that add a
        term to it)."""
        targets = caps[:, 1:]  # (B, T)
        mask = targets != PAD_ID
        # DDP averages gradients over ranks: each rank's per-token (and per-image) means are
        # weighted by its share of the global batch, so the step is that of one process on it
        w_tok = self.token_weight(int(mask.sum()))
        out = model(imgs, caps, feats=imgs if features else None)
        ce = masked_cross_entropy(out, targets, self.cfg.train.label_smoothing)
        ds = doubly_stochastic(out.alphas, mask)
        loss = w_tok * ce + self.cfg.train.alpha_c * self.token_weight(len(caps)) * ds
        return out, loss, {"loss": 0.0, "ce": ce.item(), "ds": ds.item()}
