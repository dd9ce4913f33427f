"""The learning-rate schedule and the model-selection bookkeeping after each validation.

Both are pure functions of :class:`TrainState`, so a resumed run repeats them exactly.
"""

from __future__ import annotations

import math

import torch

from showattend import config as C
from showattend.train.state import TrainState

__all__ = ["lr_at", "set_lr", "record_validation", "should_stop"]


def lr_at(base_lr: float, decays: int, factor: float, schedule: str = "plateau",
          step: int = 0, total: int = 1, final: float = 0.0) -> float:
    """Learning rate: a pure function of the schedule state, so a resumed run repeats it.

    "plateau": ``base_lr`` after ``decays`` plateau decays by ``factor``; "cosine": half a cosine
    from ``base_lr`` at step 0 to ``base_lr * final`` at step ``total`` (plateau decays ignored).
    """
    if schedule == "cosine":
        frac = min(max(step / max(total, 1), 0.0), 1.0)
        return base_lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    return base_lr * factor ** decays


def set_lr(optimizer: torch.optim.Optimizer, decays: int, cfg: C.TrainConfig, step: int = 0,
           total: int = 1) -> None:
    """Every parameter group at :func:`lr_at` of its own base rate."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(g["base_lr"], decays, cfg.lr_decay, cfg.lr_schedule, step, total,
                        cfg.lr_final)


def record_validation(state: TrainState, metric: float, cfg: C.TrainConfig) -> bool:
    """Close an epoch with its validation ``metric``: the best so far, the plateau counters and
    the decays. Returns whether this epoch is the new best (its weights become best.pt)."""
    state.epoch += 1
    state.batch_in_epoch = 0
    improved = metric > state.best
    if improved:
        state.best, state.best_epoch, state.bad_epochs, state.since_decay = metric, state.epoch, 0, 0
    else:
        state.bad_epochs += 1
        state.since_decay += 1
        if state.since_decay >= cfg.lr_patience:
            state.decays += 1
            state.since_decay = 0
    return improved


def should_stop(state: TrainState, cfg: C.TrainConfig) -> bool:
    """Early stopping: ``early_stop`` epochs without improvement (0 = never)."""
    return bool(cfg.early_stop) and state.bad_epochs >= cfg.early_stop


def run_done(state: TrainState, cfg: C.TrainConfig) -> bool:
    """No epoch left to train: ``train.epochs`` reached, or stopped early."""
    return state.epoch >= cfg.epochs or should_stop(state, cfg)
