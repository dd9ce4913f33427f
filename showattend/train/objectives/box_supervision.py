"""Attention supervision from human boxes (Liu et al., AAAI 2017): an objective of its own.

Cross-entropy + the doubly stochastic penalty, plus ``supervision.weight`` × a term that pulls
the map of every caption word naming a boxed phrase of its photo towards the boxes
(:func:`showattend.losses.box_attention_loss`). Which words, and which boxes, follow the
evaluation's rule exactly (:mod:`showattend.attention_grounding`): a word is supervised when,
after folding plurals, it is the head noun of a boxed phrase in any of the photo's reference
captions; its target is the union of the boxes of every such chain, mapped onto the grid through
the model's own preprocessing. Only the training split's boxes are read.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from showattend import config as C
from showattend import distributed as D
from showattend.attention_grounding import (coverage, file_sizes, fold_plural, input_boxes,
                                            photo_targets, photos_for_records)
from showattend.data.entities import PhotoEntities
from showattend.data.images import Preprocessor
from showattend.losses import box_attention_loss
from showattend.models.captioner import Captioner
from showattend.runtime import TrainingError
from showattend.train.objectives.base import StepLoss, TrainingData, global_mean
from showattend.train.objectives.xent import CrossEntropy
from showattend.train.state import TrainState

__all__ = ["BoxSupervision", "box_targets"]

log = logging.getLogger(__name__)

Targets = dict[int, dict[int, torch.Tensor]]  # image_id → token id → cell coverage (L,)


def _photo_table(photo: PhotoEntities, size: tuple[int, int] | None, folded: dict[str, list[int]],
                 preprocess: Preprocessor, grid: tuple[int, int]) -> dict[int, torch.Tensor]:
    table: dict[int, torch.Tensor] = {}
    for noun, target in photo_targets(photo).items():
        ids = folded.get(noun)
        if not ids:
            continue
        boxes = input_boxes(target.boxes, photo, preprocess, size)
        cover = coverage(boxes, grid, preprocess.size)  # (h, w)
        if not boxes or not np.any(cover > 0):
            continue  # cropped away: nothing to point at
        row = torch.from_numpy(cover.reshape(-1).astype(np.float32))  # (L,)
        for i in ids:
            table[i] = row
    return table


def box_targets(data: TrainingData) -> Targets:
    """Per training image, per vocabulary word that names a boxed thing of it, the share of each
    grid cell the thing's boxes cover."""
    folded: dict[str, list[int]] = {}
    for i, word in enumerate(data.vocab.itos):
        folded.setdefault(fold_plural(word), []).append(i)
    photos = photos_for_records(data.entities, data.records)
    sizes = file_sizes(data.records)
    out: Targets = {}
    for rec, photo, size in zip(data.records, photos, sizes):
        if photo is not None:
            out[rec.image_id] = _photo_table(photo, size, folded, data.preprocess, data.grid)
    return out


class BoxSupervision(CrossEntropy):
    """Cross-entropy + doubly stochastic penalty + ``supervision.weight`` × the box term."""

    name = "box_supervision"
    curve_keys = ("loss", "ce", "ds", "box", "box_words")

    def __init__(self, cfg: C.Config, dist: D.Dist = D.SINGLE):
        super().__init__(cfg, dist)
        self.targets: Targets | None = None  # built by bind()

    def applies_to(self, model: Captioner) -> bool:
        return self.cfg.supervision.weight > 0 and not model.stochastic

    def bind(self, data: TrainingData) -> None:
        if not data.entities:
            raise TrainingError("supervision.weight > 0 needs the boxes: set data.entities to "
                                "Flickr30k Entities' annotations.zip or its folder")
        self.targets = box_targets(data)
        n = sum(len(t) for t in self.targets.values())
        log.info("attention supervision: %d of %d training images have boxed words (%d image-word "
                 "targets)", sum(bool(t) for t in self.targets.values()), len(data.records), n)

    def batch_targets(self, caps: torch.Tensor, image_ids: torch.Tensor, cells: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cover (B, T, L), mask (B, T)) for the words caps[:, 1:] predict."""
        words = caps[:, 1:].tolist()  # (B, T)
        cover = torch.zeros(len(words), len(words[0]), cells)  # (B, T, L)
        mask = torch.zeros(len(words), len(words[0]), dtype=torch.bool)  # (B, T)
        for b, (row, image_id) in enumerate(zip(words, image_ids.tolist())):
            table = self.targets.get(int(image_id), {}) if self.targets else {}
            for t, w in enumerate(row):
                target = table.get(w)
                if target is not None:
                    cover[b, t] = target
                    mask[b, t] = True
        return cover, mask

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, caps: torch.Tensor,
             state: TrainState, *, stats: bool = False, features: bool = False,
             image_ids: torch.Tensor | None = None) -> StepLoss:
        if image_ids is None:
            raise TrainingError("box supervision needs the image of each caption (image_ids)")
        out, loss, rec = self.terms(model, imgs, caps, features)
        cover, mask = self.batch_targets(caps, image_ids, out.alphas.shape[-1])
        cover, mask = cover.to(out.alphas.device), mask.to(out.alphas.device)
        box = box_attention_loss(out.alphas.float(), cover, mask, self.cfg.supervision.loss)
        loss = loss + self.cfg.supervision.weight * self.token_weight(int(mask.sum())) * box
        rec.update(loss=global_mean(loss, self.dist), box=float(box.detach()),
                   box_words=float(mask.sum()))
        return loss, rec
