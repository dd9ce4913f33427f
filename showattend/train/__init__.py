"""Training, in rooms. A run starts in :mod:`~showattend.train.fit`:

- :mod:`.setup`      — resume or start, device and processes, data, model, optimiser (``Run``)
- :mod:`.loop`       — one epoch: batches in a fixed order, one objective step each, signals
- :mod:`.objectives` — the losses, one unit each (cross-entropy + doubly stochastic penalty,
  hard-attention REINFORCE); the loop only calls ``Objective.loss``
- :mod:`.validation` — validation after each epoch and model selection on its metric
- :mod:`.schedule`   — the learning-rate schedule and plateau/early-stop bookkeeping
- :mod:`.run_files`  — config, metrics log, checkpoints and curves in the run folder
- :mod:`.state`      — what a run carries across steps and resumes

Runtime choices (device, precision, threads, denormals, determinism) are in
:mod:`showattend.runtime`; decoding and scoring a split in :mod:`showattend.evaluation`.
"""

from showattend.runtime import TrainingError
from showattend.train.fit import fit
from showattend.train.loop import train_one_epoch
from showattend.train.objectives import Objective, objective_for, train_step
from showattend.train.schedule import lr_at
from showattend.train.setup import build_optimizer
from showattend.train.state import RunResult, TrainState

__all__ = ["fit", "train_one_epoch", "train_step", "Objective", "objective_for", "lr_at",
           "build_optimizer", "RunResult", "TrainState", "TrainingError"]
