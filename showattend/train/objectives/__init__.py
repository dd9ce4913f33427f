"""Training objectives: each a unit with one interface (:class:`Objective`).

The loop asks :func:`objective_for` which objective trains the run's model and calls its
``loss`` for every batch; a new objective (a sequence-level reward, attention supervision) is a
new module here and one line in ``OBJECTIVES``, not a branch in the loop.
"""

from __future__ import annotations

import torch

from showattend import config as C
from showattend import distributed as D
from showattend.models.captioner import Captioner
from showattend.train.objectives.base import Objective, StepLoss, TrainingData, global_mean
from showattend.train.objectives.box_supervision import BoxSupervision
from showattend.train.objectives.hard import HardAttention, score_function_grad_variance
from showattend.train.objectives.scst import SelfCritical
from showattend.train.objectives.xent import CrossEntropy
from showattend.train.state import TrainState

__all__ = ["Objective", "StepLoss", "TrainingData", "OBJECTIVES", "objective_for", "train_step", "global_mean",
           "CrossEntropy", "HardAttention", "BoxSupervision", "SelfCritical",
           "score_function_grad_variance"]

#: the objectives, in the order :func:`objective_for` tries them
OBJECTIVES: tuple[type[Objective], ...] = (SelfCritical, BoxSupervision, CrossEntropy,
                                            HardAttention)


def objective_for(cfg: C.Config, model: Captioner, dist: D.Dist = D.SINGLE) -> Objective:
    """The objective that trains ``model``: the first of ``OBJECTIVES`` that applies to it."""
    for cls in OBJECTIVES:
        obj = cls(cfg, dist)
        if obj.applies_to(model):
            return obj
    raise ValueError(f"no training objective applies to a {type(model).__name__}")


def train_step(model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor, cfg: C.Config,
               state: TrainState, stats: bool = False, features: bool = False,
               dist: D.Dist = D.SINGLE, image_ids: torch.Tensor | None = None,
               objective: Objective | None = None) -> StepLoss:
    """Loss of one batch (not yet backpropagated) and its logged statistics, by ``objective``
    (the run's, bound to its data) or else the model's. ``features=True``: ``imgs`` are cached
    annotations (B, L, D), the encoder is skipped. ``model`` may be wrapped in DDP."""
    objective = objective or objective_for(cfg, D.unwrap(model), dist)
    return objective.loss(model, imgs, caps, state, stats=stats, features=features,
                          image_ids=image_ids)
