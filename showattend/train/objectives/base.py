"""The one interface every training objective has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from showattend import config as C
from showattend import distributed as D
from showattend.data.coco import ImageRecord
from showattend.data.images import Preprocessor
from showattend.models.captioner import Captioner
from showattend.train.state import TrainState
from showattend.vocab import Vocab

__all__ = ["Objective", "StepLoss", "TrainingData", "global_mean"]

StepLoss = tuple[torch.Tensor, dict[str, float]]  # (loss to backpropagate, logged statistics)


@dataclass(frozen=True)
class TrainingData:
    """What :meth:`Objective.bind` may read: the run's training records, vocabulary, the one
    preprocessing (its geometry maps boxes onto the grid), the annotation grid (h, w) and the
    human boxes' annotations (``data.entities``, "" when none)."""

    records: list[ImageRecord]
    vocab: Vocab
    preprocess: Preprocessor
    grid: tuple[int, int]
    entities: str = ""


class Objective:
    """The loss of one batch, and what it logs. The training loop knows nothing else of it.

    An objective is built per run from the config and the process group; ``loss`` gets the
    (possibly DDP-wrapped) model, a batch of images (or cached annotations when ``features``)
    and captions, and the run's :class:`TrainState` (where an objective keeps what must survive
    a resume, such as a moving-average baseline). Under torchrun each rank returns its share of
    the global batch's loss, weighted so that DDP's gradient average equals one process's step.
    """

    name: ClassVar[str] = ""
    #: keys of the records this objective logs that ``curves.png`` should draw
    curve_keys: ClassVar[tuple[str, ...]] = ()
    #: True: an epoch visits each training image once (one of its captions stands for it)
    #: instead of each caption
    per_image: ClassVar[bool] = False

    def __init__(self, cfg: C.Config, dist: D.Dist = D.SINGLE):
        self.cfg = cfg
        self.dist = dist

    def applies_to(self, model: Captioner) -> bool:  # pragma: no cover - interface
        """Whether this objective can train ``model`` (e.g. REINFORCE needs sampled locations)."""
        raise NotImplementedError

    def bind(self, data: TrainingData) -> None:
        """Build, once per run, what the objective needs from the training data (box targets,
        reference statistics). Most objectives need nothing."""

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
             state: TrainState, *, stats: bool = False, features: bool = False,
             image_ids: torch.Tensor | None = None) -> StepLoss:
        """Loss of one batch (not yet backpropagated) and its logged statistics (``stats``:
        also the expensive diagnostics of a step that will be logged). ``image_ids`` (B,): the
        image of each caption, for objectives that :meth:`bind` per-image data."""
        raise NotImplementedError  # pragma: no cover - interface

    def token_weight(self, n: int) -> float:
        """This rank's share of the global batch's ``n`` tokens/captions (1 without torchrun)."""
        return D.token_weight(n, self.dist)[0]


def global_mean(loss: torch.Tensor, dist: D.Dist) -> float:
    """The loss of the whole global batch from the ranks' share-weighted losses."""
    return D.all_sum([float(loss.detach())], dist)[0] / dist.world


