"""What a run carries from step to step and from checkpoint to resume."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrainState", "RunResult", "epoch_order"]


@dataclass
class TrainState:
    """Everything beyond weights that a resumed run needs (saved as ``train_state``)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already done (mid-epoch save)
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best (early stopping and plateau)
    decays: int = 0  # LR decays so far
    since_decay: int = 0
    baseline: float | None = None  # REINFORCE moving-average baseline
    skipped_steps: int = 0
    bad_images: int = 0
    elapsed: float = 0.0  # training seconds so far

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    """What :func:`showattend.train.fit` returns."""

    out_dir: Path
    test_metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    interrupted: bool = False
    train_seconds: float = 0.0
    last: Path | None = None  # the checkpoint an interrupted run saved (continue with resume)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a pure function of (seed, epoch), so resuming repeats it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
