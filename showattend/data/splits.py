"""The records of a run's splits, its vocabulary, and the image source of a split.

Reads every kind of data set the config names (built-in shapes, COCO, Karpathy, Flickr, or a
folder written by ``prepare``) and hands training and evaluation one :class:`Splits`;
:func:`make_source` picks between decoding images on the fly and a prepared store or cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from showattend.data import coco
from showattend.data.coco import ImageRecord
from showattend.data.datasets import ImageSource
from showattend.data.flickr import read_flickr
from showattend.data.images import Preprocessor
from showattend.data.prepared import (PreparedSource, encoder_fingerprint, open_prepared,
                                      use_features)
from showattend.data.shapes import generate_shapes
from showattend.vocab import Vocab

__all__ = ["Splits", "load_splits", "load_vocab", "make_source"]

log = logging.getLogger(__name__)


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
    d = cfg
    objects: dict[str, dict[int, list[dict]]] = {}
    notes: list[str] = []
    prepared = None
    if d.prepared and not source:
        prepared = open_prepared(d.prepared)
        recs = {s: list(prepared.records.get(s, [])) for s in ("train", "val", "test")}
        if d.kind == "shapes":  # grounding boxes of the built-in data stay next to its images
            for s in ("train", "val", "test"):
                if (Path(d.root) / f"objects_{s}.json").is_file():
                    objects[s] = coco.read_objects(Path(d.root) / f"objects_{s}.json")
    elif d.kind == "shapes":
        root = Path(d.root)
        generate_shapes(root, d.n_train, d.n_val, d.n_test, seed=d.seed, progress=progress)
        recs = {s: coco.read_coco_captions(root / f"captions_{s}.json", root, s)
                for s in ("train", "val", "test")}
        objects = {s: coco.read_objects(root / f"objects_{s}.json") for s in ("train", "val", "test")}
    elif d.kind == "coco" and d.test_annotations and not (d.train_annotations or
                                                         d.val_annotations):
        # one captions file: an evaluation-only set (COCO val2017, a user's own captions)
        recs = {"train": [], "val": [],
                "test": coco.read_coco_captions(d.test_annotations, d.root, "test")}
    elif d.kind == "coco":
        recs = _coco_splits(d, notes)
    elif d.kind == "flickr":
        if not d.flickr_captions or not d.flickr_splits:
            raise coco.DataFormatError("data.kind = 'flickr' needs data.flickr_captions (the "
                                       "token file) and data.flickr_splits (the split lists' "
                                       "folder)")
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
    eval_only = not recs.get("train") and not recs.get("val") and d.kind == "coco" and \
        bool(d.test_annotations) and not (d.train_annotations or d.val_annotations)
    for s in ("test",) if eval_only else ("train", "val", "test"):
        if not recs.get(s):
            where = f" of {prepared.path}" if prepared is not None else ""
            raise coco.DataFormatError(f"split '{s}'{where} has no images")
    return Splits(recs["train"], recs["val"], recs["test"], objects, notes, prepared)


def split_fractions(text: str) -> tuple[float, float, float]:
    """data.split "0.8,0.1,0.1" → (train, val, test) shares; each > 0 (val chooses the model,
    test scores it), summing to 1."""
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not 0 < p < 1 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise coco.DataFormatError(f"data.split = {text!r}: give three shares of the images "
                                   f"for train, val and test, each above 0, summing to 1 (e.g. "
                                   f"0.8,0.1,0.1)")
    return parts  # type: ignore[return-value]


def split_images(records: list[ImageRecord], fractions: tuple[float, float, float],
                 seed: int) -> dict[str, list[ImageRecord]]:
    """The images of one captions file drawn into train / val / test (each image in exactly
    one), by ``fractions``, the same for the same seed and file."""
    import random

    order = sorted(records, key=lambda r: r.image_id)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test],
             "train": order[n_val + n_test:]}
    return {s: [ImageRecord(r.image_id, r.path, r.captions, s) for r in rs]
            for s, rs in parts.items()}


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def _coco_splits(d, notes: list[str]) -> dict[str, list[ImageRecord]]:
    """COCO-format captions files: train + val [+ test] keep their roles; one file alone (or the
    same file given twice) is split by ``data.split``. A photo is never in two splits."""
    if not d.train_annotations:
        raise coco.DataFormatError("data.kind = 'coco' needs data.train_annotations (one captions "
                                   "file is split into train/val/test by data.split; with "
                                   "data.val_annotations the two keep their roles)")
    train = coco.read_coco_captions(d.train_annotations, d.root, "train")
    same = [k for k in ("val_annotations", "test_annotations")
            if getattr(d, k) and _same_file(getattr(d, k), d.train_annotations)]
    if same:
        log.warning("data.%s is the same file as data.train_annotations: its images are split "
                    "by data.split (%s) instead, so no photo is trained and tested on",
                    " and data.".join(same), d.split)
    if not d.val_annotations or same:
        fractions = split_fractions(d.split)
        recs = split_images(train, fractions, d.seed)
        notes.append(f"split the {len(train)} images of {Path(d.train_annotations).name}: "
                     f"train {len(recs['train'])} / val {len(recs['val'])} / test "
                     f"{len(recs['test'])} (data.split {d.split}, data.seed {d.seed})")
        return recs
    recs = {"train": train, "val": coco.read_coco_captions(d.val_annotations, d.root, "val")}
    if d.test_annotations:
        recs["test"] = coco.read_coco_captions(d.test_annotations, d.root, "test")
    else:
        # No test file: split val (sorted by image id) into two disjoint halves, so the
        # checkpoint chosen on val is never scored on the same images.
        ordered = sorted(recs["val"], key=lambda r: r.image_id)
        half = len(ordered) // 2
        recs["val"], recs["test"] = ordered[:half], ordered[half:]
    # a photo is its file name (COCO's file names are unique across its splits)
    seen = {r.path.name for r in recs["train"]}
    for s in ("val", "test"):
        kept = [r for r in recs[s] if r.path.name not in seen]
        if len(kept) < len(recs[s]):
            log.warning("%d images of the %s split are also in the train file: left out of %s "
                        "(a photo is never in two splits)", len(recs[s]) - len(kept), s, s)
        recs[s] = kept
        seen |= {r.path.name for r in kept}
    return recs


def load_vocab(cfg, splits: Splits) -> Vocab:
    """The run's vocabulary: a prepared folder's own (built from its train split), else built
    from the train captions with ``data.min_word_freq``."""
    if splits.prepared is not None:
        return splits.prepared.vocab
    return Vocab.build((c for r in splits.train for c in r.captions), cfg.min_word_freq)


def make_source(cfg: Any, splits: Any, records: list[ImageRecord], preprocess: Preprocessor,
                model: Any, cache: bool, desc: str, progress: bool, on_bad: str):
    """The image source of ``records``: a :class:`PreparedSource` when the data is a prepared
    folder (features when :func:`use_features` says so and the model's encoder is the one that
    made them), else an on-the-fly :class:`ImageSource`."""
    folder = getattr(splits, "prepared", None)
    if folder is None:
        return ImageSource(records, preprocess, cache, desc, progress, on_bad=on_bad)
    folder.check_images(cfg)
    feats = use_features(cfg, model, folder)
    if feats and encoder_fingerprint(model.encoder) != folder.manifest["features"]["fingerprint"]:
        # e.g. a checkpoint trained on raw images with the same backbone but other weights: its
        # own encoder must see the images, the cache would describe someone else's features.
        log.warning("the model's encoder is not the one that computed the feature cache in %s: "
                    "encoding images from the store", folder.path)
        feats = False
    return PreparedSource(folder, records, preprocess, feats)
