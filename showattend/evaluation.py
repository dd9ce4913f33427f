"""Decode a split, score it, evaluate a checkpoint.

Used by training's validation and final test, by ``showattend evaluate`` and by the benches;
it needs the model, the data and the metrics, never the training code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from showattend import config as C
from showattend import metrics as M
from showattend import precision as P
from showattend import runtime
from showattend.attention_grounding import (WordScore, file_sizes, photos_for_records, summarize,
                                           word_scores)
from showattend.data.coco import ImageRecord
from showattend.data.datasets import ImageDataset, ImageSource, collate_images
from showattend.data.entities import EntitiesError, PhotoEntities
from showattend.data.images import Preprocessor
from showattend.data.splits import Splits, load_splits, load_vocab, make_source
from showattend.decoding import decode
from showattend.io import atomic_write_json
from showattend.loading import load_model
from showattend.models.captioner import Captioner
from showattend.progress import progress_bar
from showattend.vocab import Vocab

__all__ = ["decode_records", "score_results", "evaluate_checkpoint", "PhotoBoxes", "grounding_line"]

log = logging.getLogger(__name__)


@torch.no_grad()
def decode_records(model: Captioner, source: ImageSource, vocab: Vocab, device: torch.device,
                   beam: int = 1, max_len: int = 20, length_norm: float = 0.0, batch_size: int = 100,
                   mode: str | None = None, progress: bool = True,
                   precision: str = "fp32", no_repeat_ngram: int = 0,
                   allow_unk: bool = False) -> list[dict[str, Any]]:
    """Caption every good image of ``source``: one dict per image (words, attention, β, …).
    ``precision`` (resolved) "bf16": bf16 products (CPU) or autocast (CUDA) — precision.py."""
    model.eval()
    ds = ImageDataset(source)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_images)
    gh, gw = model.grid
    results = []
    for imgs, idxs, _ in progress_bar(loader, desc="decoding", unit="batch", disable=not progress,
                                      leave=False):
        if imgs is None:
            continue
        imgs = imgs.to(device)
        with runtime.autocast(precision, device):
            # a prepared feature cache holds the annotations already
            feats = imgs if getattr(source, "features", False) else model.encode(imgs)  # (B, L, D)
            dec = decode(model, feats, beam=beam, max_len=max_len, length_norm=length_norm,
                         mode=mode, no_repeat_ngram=no_repeat_ngram, allow_unk=allow_unk)
        for j, i in enumerate(idxs):
            n = int(dec.lengths[j])
            words = vocab.decode(dec.tokens[j, :n].tolist())
            results.append({
                "index": i,
                "image_id": source.records[i].image_id,
                "caption": " ".join(words),
                "words": words,
                "score": float(dec.scores[j]),
                # .float(): numpy has no bfloat16 (decoding under bf16 autocast)
                "alphas": dec.alphas[j, :n].reshape(n, gh, gw).float().cpu().numpy(),  # (n,h,w)
                "betas": dec.betas[j, :n].float().cpu().numpy(),
                "locations": dec.locations[j, :n].cpu().numpy(),
            })
    return results


def score_results(results: list[dict[str, Any]], records: list[ImageRecord],
                  objects: dict[int, list[dict]] | None, meteor: bool = False,
                  photos: PhotoBoxes | None = None) -> dict[str, float]:
    """Caption metrics, grounding (when objects are known), photo grounding against human boxes
    (``photos``) and degeneracy diagnostics."""
    refs = {r.image_id: list(r.captions) for r in records if r.captions}
    hyps = {res["image_id"]: res["caption"] for res in results if res["image_id"] in refs}
    out: dict[str, float] = {}
    if hyps:
        out.update(M.caption_metrics(hyps, {k: refs[k] for k in hyps}, meteor=meteor))
    if objects and results:
        with Image.open(records[results[0]["index"]].path) as im:
            size = (im.height, im.width)
        keep = [r for r in results if r["image_id"] in objects]
        out.update(M.grounding([r["words"] for r in keep], [r["alphas"] for r in keep],
                               [objects[r["image_id"]] for r in keep], size))
    if photos is not None and results:
        out.update(photos.score(results))
    out.update(M.diagnostics([r["caption"] for r in results], [r["alphas"] for r in results]))
    out["images"] = float(len(results))
    return out


@dataclass
class PhotoBoxes:
    """The human boxes (Flickr30k Entities) of a split's photos, read once, and the model's
    preprocessing, whose geometry maps them onto the grid."""

    photos: list[PhotoEntities | None]  # per record of the split
    sizes: list[tuple[int, int] | None]  # per record: the image file's (width, height)
    preprocess: Preprocessor

    @classmethod
    def load(cls, path: str | Path, records: list[ImageRecord],
             preprocess: Preprocessor) -> PhotoBoxes:
        return cls(photos_for_records(path, records), file_sizes(records), preprocess)

    def word_scores(self, results: list[dict[str, Any]]) -> list[WordScore]:
        """Per generated word that names a boxed thing: its correctness and pointing."""
        return word_scores([r["words"] for r in results], [r["alphas"] for r in results],
                           [self.photos[r["index"]] for r in results], self.preprocess,
                           image_ids=[r["image_id"] for r in results],
                           image_sizes=[self.sizes[r["index"]] for r in results])

    def score(self, results: list[dict[str, Any]]) -> dict[str, float]:
        return {k: float(v) for k, v in summarize(self.word_scores(results)).items()}


def grounding_line(metrics: dict[str, float], prefix: str = "") -> str:
    """The photo-grounding summary: the model beside both baselines (``prefix``: of the keys
    ``prefix``correctness…, e.g. "references/")."""
    m = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return (f"correctness {m['correctness']:.3f} (uniform {m['correctness_uniform']:.3f}, "
            f"centre {m['correctness_centre']:.3f}; ratio to uniform "
            f"{m['correctness_ratio']:.2f})  pointing {m['pointing']:.3f} (centre "
            f"{m['pointing_centre']:.3f})  on {int(m['grounded_words'])} words")


def _decoding_config(cfg: C.Config, length_norm: float | None,
                     no_repeat_ngram: int | None, allow_unk: bool | None = None) -> C.Config:
    """The config with this call's decoding choices (None keeps the checkpoint's)."""
    ev = {k: v for k, v in (("length_norm", length_norm), ("no_repeat_ngram", no_repeat_ngram),
                            ("allow_unk", allow_unk)) if v is not None}
    if not ev:
        return cfg
    cfg = C.replace(cfg, eval=ev)
    C.validate(cfg)
    return cfg


def evaluate_checkpoint(path: str | Path, split: str = "test", beam: int | None = None,
                        out_dir: str | Path | None = None, splits: Splits | None = None,
                        device: str | None = None, meteor: bool | None = None,
                        progress: bool = True, mode: str | None = None,
                        summary: bool = False, length_norm: float | None = None,
                        no_repeat_ngram: int | None = None, int8: bool = False,
                        entities: str | Path | None = None,
                        allow_unk: bool | None = None,
                        precision: str | None = None,
                        explain_references: bool = False) -> dict[str, float]:
    """Decode ``split`` with a checkpoint; write metrics_<split>_beam<N>.json and COCO-format
    results_<split>_beam<N>.json next to the checkpoint (or in ``out_dir``); return the metrics.
    ``summary`` also writes metrics.json (the run's headline figures, written by training).
    ``entities`` (else the config's ``data.entities``): Flickr30k Entities annotations, for
    photo grounding against human boxes; ``explain_references``: also the grounding of the
    split's reference captions, teacher forced (keys ``references/…``, Liu et al.'s protocol)."""
    dev = runtime.resolve_device(device or "auto")
    model, vocab, preprocess, cfg, ckpt = load_model(path, dev, int8=int8)
    if mode:
        model.test_mode = mode
    splits = splits or load_splits(cfg.data, progress=progress)
    records = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if load_vocab(cfg.data, splits) != vocab:
        log.warning("the training data's vocabulary differs from the checkpoint's: evaluating "
                    "with the checkpoint's")
    src = make_source(cfg, splits, records, preprocess, model, False, split, progress, "skip")
    beam = beam or cfg.eval.beam
    t0 = time.time()
    cfg = _decoding_config(cfg, length_norm, no_repeat_ngram, allow_unk)
    prec = P.choose(precision or cfg.eval.precision, dev, "evaluation")
    results = decode_records(model, src, vocab, dev, beam=beam, max_len=cfg.eval.max_len,
                             length_norm=cfg.eval.length_norm, batch_size=cfg.eval.batch_size,
                             progress=progress, precision=prec,
                             no_repeat_ngram=cfg.eval.no_repeat_ngram,
                             allow_unk=cfg.eval.allow_unk)
    dt = time.time() - t0
    entities = entities or cfg.data.entities
    photos = PhotoBoxes.load(entities, records, preprocess) if entities else None
    metrics = score_results(results, records, splits.objects.get(split),
                            meteor=cfg.eval.meteor if meteor is None else meteor, photos=photos)
    if explain_references:
        if photos is None:
            raise EntitiesError("scoring the reference captions' attention needs the boxes "
                             "(--entities or data.entities)")
        from showattend.explain import forced_references

        refs = forced_references(model, src, vocab, dev, batch_size=cfg.eval.batch_size,
                                 precision=prec, allow_unk=cfg.eval.allow_unk)
        metrics.update({f"references/{k}": v for k, v in photos.score(refs).items()})
        metrics["references/captions"] = float(len(refs))
    metrics.update(beam=float(beam), length_norm=float(cfg.eval.length_norm), int8=float(int8),
                   bf16=float(prec == "bf16"),
                   no_repeat_ngram=float(cfg.eval.no_repeat_ngram),
                   allow_unk=float(cfg.eval.allow_unk),
                   unk_captions=float(sum("<unk>" in r["words"] for r in results)),
                   decode_images_per_s=len(results) / max(dt, 1e-9),
                   skipped_images=float(len(src.bad)))
    out = Path(out_dir) if out_dir else Path(ckpt["path"]).parent
    tag = f"{split}_beam{beam}" + (f"_{mode}" if mode else "")
    M.write_coco_results(out / f"results_{tag}.json",
                         {r["image_id"]: r["caption"] for r in results})
    atomic_write_json(out / f"metrics_{tag}.json", metrics)
    if summary:
        atomic_write_json(out / "metrics.json", metrics)
    log.info("wrote %s and %s", out / f"metrics_{tag}.json", out / f"results_{tag}.json")
    return metrics


def evaluate_folder(model: str | Path, images: str | Path, annotations: str | Path,
                    beam: int | None = None, device: str | None = None, meteor: bool = True,
                    batch_size: int = 16, out_dir: str | Path | None = None,
                    precision: str | None = None) -> tuple[dict[str, float], list[str]]:
    """Score a model (checkpoint or shipped name) on any COCO-format caption file and the
    folder of its images: every annotated image with captions that exists under ``images`` is
    captioned with the model's own preprocessing and decoding, then scored against its
    references. Returns the metrics and one line per annotated image that is missing or
    unreadable (skipped). ``out_dir``: also write the results and metrics there."""
    import showattend
    from showattend.data.coco import read_coco_captions

    recs = [r for r in read_coco_captions(annotations, images, "test") if r.captions]
    if not recs:
        raise ValueError(f"{annotations} holds no image with captions")
    present = [r for r in recs if r.path.is_file()]
    skipped = [f"{r.path}: not found (image_id {r.image_id})" for r in recs if not r.path.is_file()]
    if not present:
        raise ValueError(f"none of the {len(recs)} annotated images is in {images}")
    cap = showattend.load(model, device=device or "auto", precision=precision)
    by_path = {str(r.path): r for r in present}
    hyps: dict[int, str] = {}
    t0 = time.time()
    for path, c, err in cap.caption_paths([r.path for r in present], beam=beam,
                                          batch_size=batch_size):
        if err is not None:
            skipped.append(str(err))
            continue
        hyps[by_path[str(path)].image_id] = c.caption
    dt = time.time() - t0
    if not hyps:
        raise ValueError("no annotated image could be read")
    refs = {r.image_id: list(r.captions) for r in present if r.image_id in hyps}
    metrics = M.caption_metrics(hyps, refs, meteor=meteor)
    metrics.update(images=float(len(hyps)), skipped_images=float(len(skipped)),
                   beam=float(beam or cap.config.eval.beam), bf16=float(cap.precision == "bf16"),
                   unk_captions=float(sum("<unk>" in h.split() for h in hyps.values())),
                   caption_images_per_s=len(hyps) / max(dt, 1e-9))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        M.write_coco_results(out / "results_folder.json", hyps)
        atomic_write_json(out / "metrics_folder.json", metrics)
    return metrics, skipped
