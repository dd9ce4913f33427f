"""Torch datasets over ImageRecords, a shared image cache, and the records/vocabulary builder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Splits:
    """Records of each split after loading."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    objects: dict[str, dict[int, list[dict]]]  # split → image_id → objects (grounding), may be {}
    notes: list[str] = field(default_factory=list)  # what the readers left out, and why
    prepared: Any = None  # the PreparedFolder the records come from (data.prepared), else None


def load_splits(cfg, progress: bool = True, source: bool = False) -> Splits:
    """Read (and for the built-in data, generate) the train/val/test records of a DataConfig.

    With ``data.prepared`` set the records come from that prepared folder (only the images that
    ``prepare`` could read); ``source=True`` reads the original inputs instead (prepare does).
    """
    from showattend.data import coco

    d = cfg
    objects: dict[str, dict[int, list[dict]]] = {}
    notes: list[str] = []
    prepared = None
    if d.prepared and not source:
        from showattend.data.prepared import open_prepared

        prepared = open_prepared(d.prepared)
        recs = {s: list(prepared.records.get(s, [])) for s in ("train", "val", "test")}
        if d.kind == "shapes":  # grounding boxes of the built-in data stay next to its images
            for s in ("train", "val", "test"):
                if (Path(d.root) / f"objects_{s}.json").is_file():
                    objects[s] = coco.read_objects(Path(d.root) / f"objects_{s}.json")
    elif d.kind == "shapes":
        from showattend.data.shapes import generate_shapes

        root = Path(d.root)
        generate_shapes(root, d.n_train, d.n_val, d.n_test, seed=d.seed, progress=progress)
        recs = {s: coco.read_coco_captions(root / f"captions_{s}.json", root, s)
                for s in ("train", "val", "test")}
        objects = {s: coco.read_objects(root / f"objects_{s}.json") for s in ("train", "val", "test")}
    elif d.kind == "coco":
        if not d.train_annotations or not d.val_annotations:
            raise coco.DataFormatError("data.kind = 'coco' needs data.train_annotations and "
                                       "data.val_annotations")
        recs = {"train": coco.read_coco_captions(d.train_annotations, d.root, "train"),
                "val": coco.read_coco_captions(d.val_annotations, d.root, "val")}
        if d.test_annotations:
            recs["test"] = coco.read_coco_captions(d.test_annotations, d.root, "test")
        else:
            # No test file: split val (sorted by image id) into two disjoint halves, so the
            # checkpoint chosen on val is never scored on the same images.
            ordered = sorted(recs["val"], key=lambda r: r.image_id)
            half = len(ordered) // 2
            recs["val"], recs["test"] = ordered[:half], ordered[half:]
    elif d.kind == "flickr":
        if not d.flickr_captions or not d.flickr_splits:
            raise coco.DataFormatError("data.kind = 'flickr' needs data.flickr_captions (the "
                                       "token file) and data.flickr_splits (the split lists' "
                                       "folder)")
        from showattend.data.flickr import read_flickr

        recs = read_flickr(d.flickr_captions, d.flickr_splits, d.root, notes=notes)
    else:
        if not d.split_file:
            raise coco.DataFormatError("data.kind = 'karpathy' needs data.split_file")
        recs = coco.read_karpathy(d.split_file, d.root)
    if d.objects and d.kind != "shapes":
        for s in ("train", "val", "test"):
            p = Path(d.objects.format(split=s))
            if p.is_file():
                objects[s] = coco.read_objects(p)
    if not source:  # prepare prints them in its summary instead
        for note in notes:
            log.warning("%s", note)
    if d.max_images > 0:
        recs = {s: r[: d.max_images] for s, r in recs.items()}
    for s in ("train", "val", "test"):
        if not recs.get(s):
            where = f" of {prepared.path}" if prepared is not None else ""
            raise coco.DataFormatError(f"split '{s}'{where} has no images")
    return Splits(recs["train"], recs["val"], recs["test"], objects, notes, prepared)


def load_vocab(cfg, splits: Splits) -> Vocab:
    """The run's vocabulary: a prepared folder's own (built from its train split), else built
    from the train captions with ``data.min_word_freq``."""
    if splits.prepared is not None:
        return splits.prepared.vocab
    return Vocab.build((c for r in splits.train for c in r.captions), cfg.min_word_freq)
