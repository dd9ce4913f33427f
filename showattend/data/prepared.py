"""Reading a prepared data folder (written by :mod:`showattend.data.prepare`).

Layout (``manifest.json`` is written last: a folder without it is unfinished and never read)::

    manifest.json   source, counts, image size, feature settings, skip summary, versions
    records.json    {split: [{row, image_id, file, captions}]} — images that were read only
    vocab.json      the vocabulary of the train split
    images.npy      uint8 (N, H, W, 3): Preprocessor.view of every planned image (row = index)
    features.npy    float16 (N, L, D): the frozen encoder's annotations (optional)
    encoder.pt      state dict of the encoder that computed features.npy

:class:`PreparedSource` serves rows to the torch datasets with the interface of
:class:`~showattend.data.datasets.ImageSource`: normalised images from the store (through
:meth:`Preprocessor.normalize`, the same code as images decoded on the fly), or feature rows from
the cache, in which case the model's encoder is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from showattend.data.coco import DataFormatError, ImageRecord
from showattend.data.images import Preprocessor
from showattend.vocab import Vocab, VocabError

log = logging.getLogger(__name__)

FORMAT = "showattend-prepared"
FORMAT_VERSION = 1
MANIFEST, RECORDS, VOCAB = "manifest.json", "records.json", "vocab.json"
IMAGES, FEATURES, ENCODER = "images.npy", "features.npy", "encoder.pt"


class PreparedDataError(DataFormatError):
    """A prepared folder is missing, unfinished, damaged or made for another configuration."""


# --------------------------------------------------------------------------------------------
# What a feature cache depends on: one function, used when writing and when checking a cache.


def _weights_key(weights: str) -> str:
    # A local weights file is compared by absolute path, so "w.pth" and "./w.pth" agree.
    path = Path(weights)
    return str(path.resolve()) if weights not in ("", "none", "imagenet") and path.is_file() \
        else weights


def feature_settings(cfg: Any, encoder: Any) -> dict[str, Any]:
    """The settings a feature cache made by ``encoder`` under config ``cfg`` depends on."""
    e = cfg.encoder
    norm = encoder.normalisation
    return {"backbone": e.backbone, "weights": _weights_key(e.weights), "grid": e.grid,
            "coords": e.coords, "image_size": [e.image_size, e.image_size], "resize": e.resize,
            "dim": int(encoder.out_dim), "mean": [float(v) for v in norm.mean],
            "std": [float(v) for v in norm.std]}


def encoder_fingerprint(encoder: Any) -> str:
    """sha256 of an encoder's state dict (names, dtypes, shapes, values): which weights exactly."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_frozen(encoder: Any) -> bool:
    """True when no encoder parameter is trained (its features can then be computed once)."""
    return not any(p.requires_grad for p in encoder.parameters())


# --------------------------------------------------------------------------------------------


@dataclass
class PreparedFolder:
    """A finished prepared folder: its manifest, records by split (with store rows) and vocab."""

    path: Path
    manifest: dict[str, Any]
    records: dict[str, list[ImageRecord]]
    rows: dict[tuple[str, int], int]  # (split, image_id) → row of images.npy / features.npy
    vocab: Vocab

    @property
    def images_path(self) -> Path:
        return self.path / IMAGES

    @property
    def features_path(self) -> Path:
        return self.path / FEATURES

    @property
    def has_features(self) -> bool:
        return bool(self.manifest.get("features"))

    def row(self, record: ImageRecord) -> int:
        try:
            return self.rows[record.split, record.image_id]
        except KeyError:
            raise PreparedDataError(f"{self.path}: image_id {record.image_id} of split "
                                    f"{record.split} is not in this prepared folder") from None

    def check_images(self, cfg: Any) -> None:
        """Refuse an image store made at another size or resize mode than ``cfg`` asks."""
        m = self.manifest["images"]
        want = {"image_size": [cfg.encoder.image_size] * 2, "resize": cfg.encoder.resize}
        have = {"image_size": list(m["image_size"]), "resize": m["resize"]}
        if want != have:
            raise PreparedDataError(
                f"the image store in {self.path} holds {_fmt(have)}, the config asks "
                f"{_fmt(want)}: run `showattend prepare` with this config (and --overwrite)")

    def feature_mismatch(self, cfg: Any, encoder: Any) -> str | None:
        """None when the feature cache was made with the settings ``cfg``/``encoder`` give, else
        the differing settings as text."""
        have = self.manifest["features"]["settings"]
        want = feature_settings(cfg, encoder)
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if not diff:
            return None
        return (f"made with {_fmt({k: have.get(k) for k in diff})}, the config asks "
                f"{_fmt({k: want.get(k) for k in diff})}")


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v)) if k == 'image_size' else v}"
                     for k, v in d.items())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: missing (the prepared folder is damaged: run "
                                f"`showattend prepare` again)") from None
    except (OSError, ValueError) as exc:
        raise PreparedDataError(f"{path}: unreadable ({type(exc).__name__}): run `showattend "
                                f"prepare` again") from None


def _check_array(path: Path, shape: list[int], dtype: str) -> None:
    """The .npy file exists with the shape and dtype the manifest says (a truncated or swapped
    file is refused here instead of failing inside a DataLoader worker)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: missing: run `showattend prepare` again") from None
    except (OSError, ValueError) as exc:
        raise PreparedDataError(f"{path}: damaged ({' '.join(str(exc).split())}): run "
                                f"`showattend prepare` again") from None
    if list(arr.shape) != list(shape) or str(arr.dtype) != dtype:
        raise PreparedDataError(f"{path}: holds {arr.dtype} {list(arr.shape)}, the manifest says "
                                f"{dtype} {list(shape)}: run `showattend prepare` again")


def open_prepared(path: str | Path) -> PreparedFolder:
    """Open a finished prepared folder; every problem is a one-line :class:`PreparedDataError`."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise PreparedDataError(f"prepared folder {p} not found: run `showattend prepare` first")
    manifest_path = p / MANIFEST
    if not manifest_path.is_file():
        raise PreparedDataError(f"{p} is not a finished prepared folder (no {MANIFEST}): run "
                                f"`showattend prepare` (an interrupted one resumes)")
    stat = manifest_path.stat()
    return _open(p, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _open(p: Path, _mtime_ns: int, _size: int) -> PreparedFolder:
    # Cached on the manifest's mtime/size: training reads the folder, then evaluation of the same
    # run reads it again; a re-prepared folder has a new manifest and is read afresh.
    manifest = _read_json(p / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PreparedDataError(f"{p / MANIFEST} is not a showattend prepared-folder manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(f"{p} has prepared-folder version {manifest.get('format_version')}"
                                f", this showattend reads version {FORMAT_VERSION}: prepare again")
    try:
        vocab = Vocab.from_dict(_read_json(p / VOCAB))
    except VocabError as exc:
        raise PreparedDataError(f"{p / VOCAB}: {exc}") from None
    raw = _read_json(p / RECORDS)
    records: dict[str, list[ImageRecord]] = {}
    rows: dict[tuple[str, int], int] = {}
    try:
        for split, entries in raw.items():
            records[split] = []
            for e in entries:
                rec = ImageRecord(int(e["image_id"]), Path(e["file"]), tuple(e["captions"]), split)
                records[split].append(rec)
                rows[split, rec.image_id] = int(e["row"])
        images = manifest["images"]
        _check_array(p / IMAGES, images["shape"], "uint8")
        if manifest.get("features"):
            _check_array(p / FEATURES, manifest["features"]["shape"], "float16")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PreparedDataError(f"{p}: malformed records or manifest ({type(exc).__name__}: "
                                f"{exc}): run `showattend prepare` again") from None
    return PreparedFolder(p, manifest, records, rows, vocab)


# --------------------------------------------------------------------------------------------


FOLDER_ENCODER_KEYS = ("backbone", "weights", "grid", "coords", "image_size", "resize")


def folder_encoder_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The encoder settings a prepared folder was made with: those of its feature cache, else
    (no cache) its image store's size and resize mode."""
    f = manifest.get("features")
    have = dict(f["settings"]) if f else {}
    have["image_size"] = list(manifest["images"]["image_size"])
    have["resize"] = manifest["images"]["resize"]
    out = {k: have[k] for k in FOLDER_ENCODER_KEYS if k in have}
    out["image_size"] = int(out["image_size"][0])
    return out


def adopt_folder_encoder(cfg: Any, explicit: set[str]) -> tuple[Any, str | None]:
    """``cfg`` with the encoder settings of its prepared folder (``data.prepared``), so a folder
    trains without its settings repeated: a value from the config file yields to the folder's
    (said in the returned line); one given on the command line (``explicit``: keys such as
    "encoder.grid") that disagrees is refused, naming both values."""
    from showattend import config as C

    if not cfg.data.prepared or not (Path(cfg.data.prepared) / MANIFEST).is_file():
        return cfg, None
    have = folder_encoder_settings(_read_json(Path(cfg.data.prepared) / MANIFEST))
    changes = {}
    for key, value in have.items():
        mine = getattr(cfg.encoder, key)
        if key == "weights":
            mine = _weights_key(mine)
        if mine == value:
            continue
        if f"encoder.{key}" in explicit:
            raise PreparedDataError(f"--encoder.{key}={getattr(cfg.encoder, key)} disagrees "
                                    f"with the prepared folder {cfg.data.prepared}, made with "
                                    f"encoder.{key} = {value}: drop the flag, or prepare the "
                                    f"folder again with it")
        changes[key] = value
    if not changes:
        return cfg, None
    line = (f"encoder settings from the prepared folder {cfg.data.prepared}: "
            + ", ".join(f"{k} {v} (config: {getattr(cfg.encoder, k)})" for k, v in changes.items()))
    return C.replace(cfg, encoder=changes), line


def use_features(cfg: Any, model: Any, folder: PreparedFolder) -> bool:
    """Whether ``model`` should read ``folder``'s feature cache instead of encoding images.

    Yes when ``data.features`` is "auto", the encoder is frozen and the folder has a cache; a
    cache made with other encoder settings than ``cfg`` asks is refused (PreparedDataError).
    """
    if cfg.data.features == "off" or not is_frozen(model.encoder):
        return False
    if not folder.has_features:
        log.info("%s has no feature cache: encoding images from the store", folder.path)
        return False
    if getattr(model, "needs_pixels", False):
        # a glimpse is taken from the pixels at every word; the cache holds CNN features only
        raise PreparedDataError(
            f"attention.kind = {model.attention_kind!r} takes glimpses of the image's pixels, "
            f"but the feature cache in {folder.path} holds CNN features only: set "
            f"data.features = \"off\" to read the images from the store")
    why = folder.feature_mismatch(cfg, model.encoder)
    if why is not None:
        raise PreparedDataError(
            f"the feature cache in {folder.path} was {why}: run `showattend prepare` with this "
            f"config (and --overwrite), or set data.features = \"off\" to encode images from the "
            f"store")
    return True


def load_cache_encoder(model: Any, folder: PreparedFolder) -> None:
    """Load the encoder that computed the cache into ``model`` (so a checkpoint trained on the
    features captions raw images with exactly the same annotations)."""
    import torch

    path = folder.path / ENCODER
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state)
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: missing: run `showattend prepare` again") from None
    except Exception as exc:  # noqa: BLE001 - zip/pickle/shape errors alike
        raise PreparedDataError(f"{path}: cannot load into the model's encoder: "
                                f"{str(exc).strip().splitlines()[0]}") from None
    if encoder_fingerprint(model.encoder) != folder.manifest["features"]["fingerprint"]:
        raise PreparedDataError(f"{path} does not match the fingerprint in the manifest: run "
                                f"`showattend prepare` again")


class PreparedSource:
    """Rows of a prepared folder by record index, with :class:`ImageSource`'s interface.

    ``features=True``: (L, D) float32 annotation rows from the cache; else normalised images
    (3, H, W) from the uint8 store. The memory map is opened lazily in each process, so
    DataLoader workers share the page cache instead of copying arrays.
    """

    def __init__(self, folder: PreparedFolder, records: list[ImageRecord],
                 preprocess: Preprocessor, features: bool):
        self.records = records
        self.preprocess = preprocess
        self.features = features
        self.bad: dict[int, str] = {}  # failed images were left out by prepare
        self.rows = [folder.row(r) for r in records]
        self.path = folder.features_path if features else folder.images_path
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None  # each worker maps the file itself
        return state

    def _rows(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getitem__(self, i: int):
        import torch

        row = np.array(self._rows()[self.rows[i]])  # a copy: the map is read-only
        if self.features:
            return torch.from_numpy(row.astype(np.float32))  # (L, D)
        return self.preprocess.normalize(row)  # (3, H, W)
