"""Torch datasets over ImageRecords: captions, images, a shared image cache, and their collation."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from showattend.data.coco import ImageRecord
from showattend.data.images import ImageLoadError, Preprocessor
from showattend.progress import progress_bar
from showattend.vocab import PAD_ID, UNK_ID, Vocab

log = logging.getLogger(__name__)


class ImageSource:
    """Preprocessed image tensors by record index: in-memory cache or load on demand.

    Bad images are skipped and counted (``bad``: index → reason), never crash an epoch — unless
    ``on_bad="error"`` (config data.on_bad_image), which raises the first ImageLoadError instead.
    """

    def __init__(self, records: list[ImageRecord], preprocess: Preprocessor, cache: bool,
                 desc: str = "images", progress: bool = True, on_bad: str = "skip"):
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
        self.records = records
        self.preprocess = preprocess
        self.on_bad = on_bad
        self.bad: dict[int, str] = {}
        self.cache: list[torch.Tensor | None] | None = None
        if cache:
            self.cache = []
            bar = progress_bar(records, desc=f"loading {desc}", unit="img", disable=not progress,
                               leave=False)
            for i, rec in enumerate(bar):
                self.cache.append(self._load(i, rec))

    def _load(self, i: int, rec: ImageRecord) -> torch.Tensor | None:
        try:
            return self.preprocess(rec.path)
        except ImageLoadError as exc:
            if self.on_bad == "error":
                raise ImageLoadError(f"{exc} (image_id {rec.image_id}; data.on_bad_image = "
                                     f"'error', use 'skip' to leave such images out)") from None
            self.bad[i] = str(exc)
            return None

    def __getitem__(self, i: int) -> torch.Tensor | None:
        if self.cache is not None:
            return self.cache[i]
        return self._load(i, self.records[i])


class CaptionDataset(Dataset):
    """Training items: one per (image, caption) → (image (3,H,W), ids (n+2,), image_id).

    Captions that teach nothing — no word at all ("!!!") or only words outside the vocabulary —
    are left out and counted in ``skipped`` (reason → count, first example in ``first_skipped``).
    """

    def __init__(self, source: ImageSource, vocab: Vocab, max_len: int):
        self.source = source
        self.items: list[tuple[int, list[int]]] = []
        self.skipped: dict[str, int] = {}
        self.first_skipped: dict[str, str] = {}
        for i, rec in enumerate(source.records):
            if i in source.bad:
                continue
            for cap in rec.captions:
                ids = vocab.encode(cap, max_len)
                words = ids[1:-1]
                if words and any(w != UNK_ID for w in words):
                    self.items.append((i, ids))
                    continue
                reason = "only unknown words" if words else "no words"
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                self.first_skipped.setdefault(reason, f"image_id {rec.image_id}: {cap!r}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        i, ids = self.items[idx]
        img = self.source[i]
        if img is None:
            return None
        return img, torch.tensor(ids, dtype=torch.long), self.source.records[i].image_id


class ImageDataset(Dataset):
    """Evaluation items: one per image → (image (3,H,W), record index)."""

    def __init__(self, source: ImageSource):
        self.source = source
        self.indices = [i for i in range(len(source.records)) if i not in source.bad]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int):
        i = self.indices[idx]
        img = self.source[i]
        if img is None:
            return None
        return img, i


def collate_captions(batch):
    """Pad captions with <pad>; drop items whose image failed to load (counted in n_bad)."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    if not good:
        return None, None, None, n_bad
    imgs = torch.stack([b[0] for b in good])  # (B, 3, H, W)
    longest = max(len(b[1]) for b in good)
    caps = torch.full((len(good), longest), PAD_ID, dtype=torch.long)  # (B, T+1)
    for j, b in enumerate(good):
        caps[j, : len(b[1])] = b[1]
    ids = torch.tensor([b[2] for b in good])
    return imgs, caps, ids, n_bad


def collate_images(batch):
    """Stack images; drop failed ones."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, [], len(batch)
    return torch.stack([b[0] for b in good]), [b[1] for b in good], len(batch) - len(good)
