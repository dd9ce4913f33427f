"""Readers for caption annotation files: COCO captions, Karpathy splits, synthetic objects.

Every reader validates what it reads and turns any problem (unreadable file, malformed JSON,
missing key, wrong type, dangling reference) into :class:`DataFormatError` whose one-line message
names the file and the entry, e.g. ``captions.json: annotations[3].image_id: expected int, got
string``. Callers therefore never see a ``KeyError`` or ``TypeError`` from a bad file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")


class DataFormatError(ValueError):
    """An annotation / results file is unreadable or does not have the expected structure."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions (possibly none) in a named split."""

    image_id: int
    path: Path
    captions: tuple[str, ...]
    split: str


# --------------------------------------------------------------------------------------------
# Validation helpers: small and explicit, so each error can say exactly which entry is wrong.

_KINDS: dict[str, Callable[[Any], bool]] = {
    # bool is a subclass of int in Python but never a valid id or coordinate in these files.
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float))
    and not isinstance(v, bool)
    and math.isfinite(v),
    "string": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fail(path: Path, where: str, reason: str) -> DataFormatError:
    return DataFormatError(f"{path}: {where}: {' '.join(reason.split())}")


def _expect(value: Any, kind: str, path: Path, where: str) -> Any:
    """Return ``value`` if it is of JSON ``kind``, else raise naming ``where``."""
    if not _KINDS[kind](value):
        raise _fail(path, where, f"expected {kind}, got {_json_type(value)}")
    return value


def _get(obj: dict, key: str, kind: str, path: Path, where: str, required: bool = True) -> Any:
    """``obj[key]`` checked to be of ``kind``; optional keys that are absent or null give None."""
    if key not in obj or (not required and obj[key] is None):
        if required:
            raise _fail(path, where, f"missing key {key!r}")
        return None
    return _expect(obj[key], kind, path, f"{where}.{key}")


def read_data_file(path: Path) -> bytes:
    """The bytes of a caption/split file; a missing or unreadable one becomes a DataFormatError."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataFormatError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise DataFormatError(f"{path}: is a directory") from exc
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _load_json(path: Path) -> Any:
    """Parse the JSON file at ``path``; every failure becomes a DataFormatError."""
    raw = read_data_file(path)
    try:
        return json.loads(raw)  # bytes: json detects UTF-8/16/32 itself
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except (ValueError, RecursionError) as exc:  # bad encoding; absurdly deep nesting
        raise DataFormatError(f"{path}: invalid JSON: {type(exc).__name__}") from exc


def _clean_caption(text: str) -> str:
    # Raw COCO captions contain stray newlines and double spaces; they carry no meaning.
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Readers


def read_coco_captions(
    annotations_path: str | os.PathLike, image_root: str | os.PathLike, split: str = "train"
) -> list[ImageRecord]:
    """Read COCO's official ``captions_*.json`` (also the synthetic shapes' captions files).

    Records follow the order of ``images``; each image's captions follow the order of
    ``annotations``. Images without captions are kept with ``captions=()``; empty captions are
    dropped. ``path`` is ``image_root / file_name``.
    """
    path, root = Path(annotations_path), Path(image_root)
    data = _expect(_load_json(path), "object", path, "top level")
    images = _get(data, "images", "list", path, "top level")
    annotations = _get(data, "annotations", "list", path, "top level")

    file_names: dict[int, str] = {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        _expect(entry, "object", path, where)
        image_id = _get(entry, "id", "int", path, where)
        file_name = _get(entry, "file_name", "string", path, where)
        if not file_name.strip():
            raise _fail(path, f"{where}.file_name", "empty file name")
        if image_id in file_names:
            raise _fail(path, f"{where}.id", f"duplicate image id {image_id}")
        file_names[image_id] = file_name

    captions: dict[int, list[str]] = {image_id: [] for image_id in file_names}
    for j, ann in enumerate(annotations):
        where = f"annotations[{j}]"
        _expect(ann, "object", path, where)
        image_id = _get(ann, "image_id", "int", path, where)
        caption = _clean_caption(_get(ann, "caption", "string", path, where))
        if image_id not in captions:
            raise _fail(path, f"{where}.image_id", f"image id {image_id} is not in images")
        if caption:
            captions[image_id].append(caption)

    folders = _image_folders(root, path)
    return [
        ImageRecord(image_id, locate_image(root, name, folders), tuple(captions[image_id]), split)
        for image_id, name in file_names.items()
    ]


_COCO_PREFIX = re.compile(r"^COCO_([A-Za-z]+\d{4})_\d+\.\w+$")  # COCO_train2014_000…9.jpg
_CAPTIONS_SPLIT = re.compile(r"^captions_([A-Za-z]+\d{4})\.json$")  # captions_val2017.json


def _image_folders(root: Path, annotations: Path) -> list[Path]:
    """Folders under ``root`` an image of ``annotations`` may be in besides ``root`` itself: the
    split folder the file is named for (``captions_val2017.json`` → ``val2017/``), when it
    exists."""
    m = _CAPTIONS_SPLIT.match(annotations.name)
    return [root / m.group(1)] if m and (root / m.group(1)).is_dir() else []


def locate_image(root: Path, file_name: str, folders: Sequence[Path] = ()) -> Path:
    """Where an image of a COCO-style file is, as the official layouts put it: ``root /
    file_name``; else under the folder its name's prefix names (``COCO_train2014_….jpg`` →
    ``root/train2014/``); else under one of ``folders`` (the annotations file's split folder).
    An image found nowhere keeps ``root / file_name`` (reported as missing where it is read)."""
    first = root / file_name
    if first.is_file():
        return first
    m = _COCO_PREFIX.match(Path(file_name).name)
    candidates = ([root / m.group(1) / file_name] if m else []) + [f / file_name for f in folders]
    for c in candidates:
        if c.is_file():
            return c
    return first


def _karpathy_caption(sentence: Any, path: Path, where: str) -> str:
    """The caption text of one Karpathy ``sentences`` entry: ``raw``, else joined ``tokens``."""
    _expect(sentence, "object", path, where)
    raw = _get(sentence, "raw", "string", path, where, required=False)
    tokens = _get(sentence, "tokens", "list", path, where, required=False)
    if raw is None and tokens is None:
        raise _fail(path, where, "missing key 'raw' (and no 'tokens')")
    text = _clean_caption(raw or "")
    if not text and tokens is not None:
        for k, token in enumerate(tokens):
            _expect(token, "string", path, f"{where}.tokens[{k}]")
        text = _clean_caption(" ".join(tokens))
    return text


def read_karpathy(
    split_file: str | os.PathLike,
    image_root: str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    restval: str | None = "train",
) -> dict[str, list[ImageRecord]]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr8k.json``, ...).

    Returns ``{split: records}`` for each requested split (empty lists included). ``restval``
    images join the split named by ``restval``; with ``restval=None`` they keep the split name
    ``"restval"`` and can be requested as such. ``image_id`` is ``cocoid`` when present, else
    ``imgid``; ``path`` is ``image_root/filepath/filename`` (``image_root/filename`` without
    ``filepath``). Captions use ``raw``, falling back to the joined ``tokens``; empty ones are
    dropped.
    """
    path, root = Path(split_file), Path(image_root)
    if isinstance(splits, str):  # a bare "train" would otherwise be read as its letters
        splits = (splits,)
    wanted = tuple(splits)
    data = _expect(_load_json(path), "object", path, "top level")
    images = _get(data, "images", "list", path, "top level")

    out: dict[str, list[ImageRecord]] = {name: [] for name in wanted}
    seen: set[int] = set()
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        _expect(entry, "object", path, where)
        split = _get(entry, "split", "string", path, where)
        if split not in KARPATHY_SPLITS:
            raise _fail(path, f"{where}.split", f"unknown split {split!r}")
        image_id = _get(entry, "cocoid", "int", path, where, required=False)
        if image_id is None:
            image_id = _get(entry, "imgid", "int", path, where)
        if image_id in seen:
            raise _fail(path, where, f"duplicate image id {image_id}")
        seen.add(image_id)
        filename = _get(entry, "filename", "string", path, where)
        if not filename.strip():
            raise _fail(path, f"{where}.filename", "empty file name")
        filepath = _get(entry, "filepath", "string", path, where, required=False)
        sentences = _get(entry, "sentences", "list", path, where)
        # Validate every entry, also those of splits not requested: a broken file should fail
        # the same way whichever split is asked for.
        captions = tuple(
            text
            for k, sentence in enumerate(sentences)
            if (text := _karpathy_caption(sentence, path, f"{where}.sentences[{k}]"))
        )
        if split == "restval" and restval is not None:
            split = restval
        if split in out:
            image_path = root / filepath / filename if filepath else root / filename
            out[split].append(ImageRecord(image_id, image_path, captions, split))
    return out


def read_objects(path: str | os.PathLike) -> dict[int, list[dict]]:
    """Read a synthetic-shapes ``objects_{split}.json``: image id → list of object dicts.

    Each object has ``colour``, ``shape`` (strings) and ``bbox`` ``[x, y, w, h]`` in pixels
    (finite numbers, w and h >= 0); ``size`` is optional. Objects are returned as new dicts.
    """
    path = Path(path)
    data = _expect(_load_json(path), "object", path, "top level")
    images = _get(data, "images", "list", path, "top level")
    out: dict[int, list[dict]] = {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        _expect(entry, "object", path, where)
        image_id = _get(entry, "id", "int", path, where)
        if image_id in out:
            raise _fail(path, f"{where}.id", f"duplicate image id {image_id}")
        objects = []
        for k, obj in enumerate(_get(entry, "objects", "list", path, where)):
            o_where = f"{where}.objects[{k}]"
            _expect(obj, "object", path, o_where)
            _get(obj, "colour", "string", path, o_where)
            _get(obj, "shape", "string", path, o_where)
            _get(obj, "size", "string", path, o_where, required=False)
            bbox = _get(obj, "bbox", "list", path, o_where)
            if len(bbox) != 4:
                raise _fail(path, f"{o_where}.bbox", f"expected 4 numbers, got {len(bbox)}")
            for n, value in enumerate(bbox):
                _expect(value, "number", path, f"{o_where}.bbox[{n}]")
            if bbox[2] < 0 or bbox[3] < 0:
                raise _fail(path, f"{o_where}.bbox", "negative width or height")
            objects.append({**obj, "bbox": list(bbox)})
        out[image_id] = objects
    return out


def check_images_exist(
    records: Iterable[ImageRecord], on_missing: str = "error"
) -> list[ImageRecord]:
    """Return the records whose image file exists.

    ``on_missing="error"`` raises :class:`DataFormatError` naming the first missing file and the
    count; ``"skip"`` drops them and logs how many were skipped.
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    records = list(records)
    present: list[ImageRecord] = []
    missing: list[ImageRecord] = []
    for record in records:
        (present if record.path.is_file() else missing).append(record)
    if missing:
        first = missing[0]
        summary = (
            f"{len(missing)} of {len(records)} image files are missing, first: {first.path} "
            f"(image_id {first.image_id})"
        )
        if on_missing == "error":
            raise DataFormatError(f"{summary}; use on_missing='skip' to leave them out")
        logger.warning("skipped %s", summary)
    return present
