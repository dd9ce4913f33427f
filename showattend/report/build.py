"""The attention report: captions, maps, β, crop boxes, beam alternatives and scores of one or
more models on a set of images (with human reference boxes and each named word's attention
correctness when Flickr30k Entities annotations are attached), as one self-contained HTML page, a
JSON export and animations.

The page is a template with its script and style inlined (package data in ``assets/``) and the
data as one JSON block. What makes 200-image reports open fast: each attention map travels as
uint8 quantised relative to its own peak (the page draws maps scaled by their peak anyway, so
nothing visible is lost; the peak value is kept to recover α), base64'd, and is decoded by the page
only when its image is shown; images travel as the view the model saw, JPEG (PNG when tiny).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from showattend.data.folder import iter_image_paths
from showattend.data.images import Preprocessor
from showattend.io import atomic_write_json, atomic_write_text
from showattend.vocab import tokenize

if TYPE_CHECKING:
    from showattend.attention_grounding import WordScore
    from showattend.data.entities import PhotoEntities
    from showattend.records import CaptionRecord as Caption, CaptionSource as CaptionerAPI
    from showattend.reference_boxes import EntitiesSource

__all__ = ["ModelInfo", "Entry", "Report", "decode_maps", "encode_maps", "image_data_uri",
           "name_models", "render_page"]

FORMAT_VERSION = 1
_PNG_MAX_PIXELS = 128 * 128  # up to this size an image may stay lossless (PNG), see image_data_uri
_JPEG_QUALITY = 85


@dataclass
class ModelInfo:
    """How one model of a report decoded: shown above its panel and in the JSON export."""

    name: str
    attention: str = "soft"  # "soft" | "hard"
    grid: tuple[int, int] = (0, 0)
    window: int = 1  # hard attention: k of the k×k crop
    beam: int = 1
    mode: str = "expectation"  # test-time attention mode
    checkpoint: str = ""
    # the model's preprocessing: its geometry moves reference boxes into the view (not exported)
    preprocess: Preprocessor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_api(cls, name: str, api: CaptionerAPI, beam: int, mode: str | None,
                 checkpoint: str = "") -> ModelInfo:
        model = api.model
        return cls(name=name, attention=api.attention_kind, grid=tuple(model.grid),
                   window=int(getattr(model.decoder.attention, "window", 1)), beam=beam,
                   mode=mode or model.test_mode, checkpoint=checkpoint,
                   preprocess=api.preprocess)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attention": self.attention, "grid": list(self.grid),
                "window": self.window, "beam": self.beam, "mode": self.mode,
                "checkpoint": self.checkpoint}


@dataclass
class Entry:
    """One image: per model its caption (beam alternatives attached), references, scores."""

    name: str
    path: str
    captions: list[Caption]  # one per model, in the report's model order
    references: list[str] = field(default_factory=list)
    scores: list[dict[str, float] | None] = field(default_factory=list)  # per model
    photo: PhotoEntities | None = None  # its Flickr30k Entities annotations, when attached
    # per model, per beam (the caption's alternatives, best first): the words that name a boxed
    # thing of ``photo``, with reference boxes in view pixels and correctness; [] without photo
    grounding: list[list[list[WordScore]]] = field(default_factory=list)

    def grounding_summary(self, model: int) -> dict[str, Any] | None:
        """Mean correctness and pointing of one model's caption (its best beam) over its words
        that name a boxed thing (None for a caption with no such word: ``words`` 0); None when
        the image has no annotations. What "worst grounding first" sorts by."""
        if not self.grounding:
            return None
        scores = self.grounding[model][0]
        n = len(scores)
        return {"words": n,
                "correctness": float(np.mean([x.correctness for x in scores])) if n else None,
                "pointing": float(np.mean([x.pointing for x in scores])) if n else None}


# --------------------------------------------------------------------------------------------
# Encoding for the page
# --------------------------------------------------------------------------------------------


def encode_maps(attention: np.ndarray) -> tuple[str, list[float]]:
    """(n, h, w) maps → (base64 of uint8 maps, each scaled to its own peak; peaks per map)."""
    a = np.asarray(attention, dtype=np.float64)  # (n, h, w)
    peaks = a.reshape(len(a), -1).max(axis=1) if a.size else np.zeros(len(a))  # (n,)
    safe = np.where(peaks > 0, peaks, 1.0)[:, None, None]
    q = np.rint(np.clip(a / safe, 0.0, 1.0) * 255).astype(np.uint8)  # (n, h, w)
    return base64.b64encode(q.tobytes()).decode("ascii"), [float(f"{p:.6g}") for p in peaks]


def decode_maps(data: str, peaks: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode_maps` (up to the quantisation): (n, h, w) float maps."""
    q = np.frombuffer(base64.b64decode(data), dtype=np.uint8).astype(np.float64)
    q = q.reshape(len(peaks), grid[0], grid[1])  # (n, h, w)
    return q / 255.0 * np.asarray(peaks, dtype=np.float64)[:, None, None]


def image_data_uri(view: np.ndarray, max_side: int | None = None) -> str:
    """A data: URI of an (H, W, 3) uint8 image: JPEG (PNG when tiny and compact); optionally
    shrunk so its longer side is at most ``max_side`` (maps and boxes are placed in the view's own
    pixels, so the page scales them to whatever size the picture has)."""
    img = Image.fromarray(np.asarray(view, dtype=np.uint8))
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    tiny = img.width * img.height <= _PNG_MAX_PIXELS
    jpeg = io.BytesIO()
    # tiny images are drawn enlarged: finer quantisation and full-resolution colour there (a
    # 64×64 picture's few-pixel shapes lose their colour to chroma subsampling), ~2.6 KB each
    img.save(jpeg, format="JPEG", quality=92 if tiny else _JPEG_QUALITY,
             subsampling=0 if tiny else 2, optimize=True)
    best, mime = jpeg.getvalue(), "image/jpeg"
    if tiny:
        # lossless when that is not much larger (flat synthetic pictures); a noisy background
        # compresses far better as JPEG
        png = io.BytesIO()
        img.save(png, format="PNG", optimize=True)
        if len(png.getvalue()) <= 1.25 * len(best):
            best, mime = png.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(best).decode("ascii")


def _word_grounding(scores: Sequence[WordScore], n_words: int, full: bool = False
                    ) -> list[dict[str, Any] | None]:
    """Per word of a caption: None, or the reference boxes of the thing it names (view pixels)
    with its correctness, pointing and the uniform map's correctness (the boxes' share of the
    image); rounded for the page, at full precision (with the map's entropy) when ``full``."""
    def r(v: float, digits: int) -> float:
        return float(v) if full else round(float(v), digits)

    out: list[dict[str, Any] | None] = [None] * n_words
    for x in scores:
        rec = {"noun": x.noun, "types": list(x.types),
               "boxes": [[r(v, 2) for v in b] for b in x.boxes],
               "correctness": r(x.correctness, 4), "pointing": bool(x.pointing),
               "uniform": r(x.uniform, 4)}
        if full:
            rec["entropy"] = float(x.entropy)
        out[x.index] = rec
    return out


def _beam_record(c: Caption, grounding: Sequence[WordScore] | None = None) -> dict[str, Any]:
    maps, peaks = encode_maps(c.attention)
    rec = {
        "words": list(c.words),
        "score": round(float(c.score), 4),
        "beta": [round(float(b), 4) for b in np.asarray(c.beta).reshape(-1)],
        "maps": maps,
        "peaks": peaks,
        "loc": [int(x) for x in np.asarray(c.locations).reshape(-1)],
        "boxes": None if c.boxes is None else [[round(float(v), 2) for v in b] for b in c.boxes],
    }
    if grounding is not None:  # the image has reference boxes: per word, None or its boxes
        rec["grounding"] = _word_grounding(grounding, len(c.words))
    if c.logp is not None:  # a caption a person wrote, teacher forced (explain.py)
        rec.update(explained=True, text=c.text, logp=[round(float(v), 4) for v in c.logp],
                   rank=[int(v) for v in c.rank], end_logp=round(float(c.end_logp), 4),
                   unknown=list(c.unknown or []), unknown_at=list(c.unknown_at or []))
    return rec


def beam_record(c: Caption, grounding: Sequence[WordScore] | None = None) -> dict[str, Any]:
    """One caption (a beam, or an explained text) in the page's format."""
    return _beam_record(c, grounding)


def _default_title(models: Sequence[ModelInfo], n: int) -> str:
    names = ", ".join(m.name for m in models)
    return f"Attention report: {names} on {n} image{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


class Report:
    """Captions of one or more models on the same images, ready to inspect.

    Build with :meth:`build` (models + image paths) or :meth:`from_captions` (captions you already
    have). ``html()`` is the self-contained page, ``save``/``save_json``/``save_animations`` write
    files, and in Jupyter the object shows itself as the interactive view.
    """

    def __init__(self, models: Sequence[ModelInfo], entries: Sequence[Entry],
                 skipped: Sequence[tuple[str, str]] = (), title: str | None = None,
                 max_side: int | None = 512):
        self.models = list(models)
        self.entries = list(entries)
        self.skipped = list(skipped)  # (path, reason) of images that could not be read
        self.title = title or _default_title(self.models, len(self.entries))
        self.max_side = max_side
        for e in self.entries:
            if len(e.captions) != len(self.models):
                raise ValueError(f"{e.name}: {len(e.captions)} captions for "
                                 f"{len(self.models)} models")
            if not e.scores:
                e.scores = [None] * len(self.models)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def build(cls, models: Mapping[str, CaptionerAPI], inputs: Sequence[str | os.PathLike],
              references: Mapping[str, Sequence[str]] | None = None, beam: int | None = None,
              mode: str | None = None, checkpoints: Mapping[str, str] | None = None,
              title: str | None = None, batch_size: int = 16, progress: bool = False,
              entities: EntitiesSource | None = None) -> Report:
        """Caption every image under ``inputs`` with every model (keeping all beams), attach the
        references (matched by file name) and score each caption (BLEU-4, CIDEr), and the
        reference boxes of ``entities`` (see :meth:`attach_entities`).

        Unreadable images are left out and listed in ``skipped``.
        """
        from showattend.progress import progress_bar

        if not models:
            raise ValueError("a report needs at least one model")
        paths = list(iter_image_paths(inputs))  # folders expanded once, the same for every model
        infos, per_model = [], []
        skipped: dict[str, str] = {}
        for name, api in models.items():
            k = beam or api.config.eval.beam
            infos.append(ModelInfo.from_api(name, api, k, mode,
                                            (checkpoints or {}).get(name, "")))
            caps: dict[str, Caption] = {}
            bar = progress_bar(total=len(paths), desc=f"captioning ({name})", unit="image",
                               disable=not progress)
            for path, c, err in api.caption_paths(paths, beam=k, mode=mode,
                                                  batch_size=batch_size, alternatives=True):
                bar.update(1)
                if err is not None:
                    skipped.setdefault(str(path), err)
                else:
                    caps[str(path)] = c
            bar.close()
            per_model.append(caps)
        order = [p for p in per_model[0] if all(p in caps for caps in per_model)]
        entries = [Entry(name=Path(p).name, path=p, captions=[caps[p] for caps in per_model])
                   for p in order]
        report = cls(infos, entries, sorted(skipped.items()), title)
        if references:
            report.attach_references(references)
            report.explain_references(models, mode)
        if entities is not None:
            report.attach_entities(entities)
        return report

    def explain_references(self, models: Mapping[str, CaptionerAPI], mode: str | None = None
                           ) -> None:
        """Each image's reference captions, explained by each model (teacher forced), joined
        to that model's beams: on the page they open beside the model's own caption."""
        for m, api in enumerate(models.values()):
            for e in self.entries:
                refs = [r for r in e.references or [] if tokenize(r)]  # a word to feed
                if not refs:
                    continue
                c = e.captions[m]
                done = api.explain([e.path], [refs], mode=mode, own_caption=False)
                c.alternatives = list(c.alternatives or [replace(c, alternatives=[])]) + \
                    list(done)

    @classmethod
    def from_captions(cls, captions: Mapping[str, Sequence[Caption]],
                      references: Mapping[str, Sequence[str]] | None = None,
                      models: Sequence[ModelInfo] | None = None, title: str | None = None,
                      entities: EntitiesSource | None = None) -> Report:
        """A report from captions already made: {model name: [Caption per image]} (same images,
        same order for every model); ``references`` and ``entities`` as in :meth:`build`."""
        names = list(captions)
        lists = [list(captions[n]) for n in names]
        if not lists or len({len(x) for x in lists}) != 1:
            raise ValueError("every model needs one caption per image, in the same order")
        if models is None:
            models = []
            for n, caps in zip(names, lists):
                c = caps[0] if caps else None
                grid = tuple(c.attention.shape[1:]) if c is not None else (0, 0)
                hard = c is not None and c.boxes is not None
                models.append(ModelInfo(name=n, attention="hard" if hard else "soft", grid=grid,
                                        beam=max(1, len(c.alternatives)) if c else 1,
                                        mode="argmax" if hard else "expectation"))
        entries = [Entry(name=Path(group[0].image).name, path=group[0].image,
                         captions=list(group)) for group in zip(*lists)]
        report = cls(models, entries, title=title)
        if references:
            report.attach_references(references)
        if entities is not None:
            report.attach_entities(entities)
        return report

    def attach_references(self, references: Mapping[str, Sequence[str]]) -> int:
        """Attach references by image file name and score each model's caption; returns how many
        images have references. BLEU-4 and CIDEr are computed over the report's images that have
        references (CIDEr's document frequencies come from them)."""
        from showattend.metrics import caption_scores

        by_name = {Path(k).name: list(v) for k, v in references.items()}
        with_refs = []
        for i, e in enumerate(self.entries):
            refs = by_name.get(Path(e.path).name) or by_name.get(e.name)
            e.references = list(refs or [])
            if e.references:
                with_refs.append(i)
        if with_refs:
            refs_map = {i: self.entries[i].references for i in with_refs}
            for m in range(len(self.models)):
                scores = caption_scores({i: self.entries[i].captions[m].caption
                                         for i in with_refs}, refs_map)
                for i in with_refs:
                    self.entries[i].scores[m] = scores[i]
        return len(with_refs)

    def attach_entities(self, entities: EntitiesSource) -> int:
        """Attach human boxes (Flickr30k Entities) and score each caption's words against them;
        returns how many images have annotations.

        ``entities``: ``annotations.zip`` or its folder (an image is matched by the Flickr id its
        file name starts with: ``1000268201_693b08cb0e.jpg``), or ``{image path or file name:
        PhotoEntities}``. Every word of every beam that names a boxed thing of its photo (the
        rule of :func:`~showattend.attention_grounding.photo_targets`) gets its reference boxes,
        mapped into the view by the model's preprocessing (``ModelInfo.preprocess``; without
        one, the view is taken as a plain stretch of the whole file), and its correctness and
        pointing. An image file that is a resized copy of the photo is handled (the file's own
        size is read). A source that cannot be read raises ``EntitiesError``.
        """
        from showattend.reference_boxes import caption_word_scores, file_size, photos_for_images

        photos = photos_for_images(entities, [e.path for e in self.entries])
        for e in self.entries:
            e.photo, e.grounding = photos.get(e.path), []
            if e.photo is None:
                continue
            size = file_size(e.path)
            for info, c in zip(self.models, e.captions):
                pre = info.preprocess or Preprocessor(size=c.view.shape[:2], mean=(0.0,) * 3,
                                                      std=(1.0,) * 3)
                e.grounding.append([caption_word_scores(a, e.photo, pre, size)
                                    for a in (c.alternatives or [c])])
        return sum(1 for e in self.entries if e.photo is not None)

    # ---- the page --------------------------------------------------------------------------

    def page_data(self, mode: str = "static", **extra: Any) -> dict[str, Any]:
        """The JSON the page runs on (compact: quantised maps, embedded images)."""
        return {"version": FORMAT_VERSION, "mode": mode, "title": self.title,
                "models": [m.to_dict() for m in self.models],
                "images": [self.entry_data(e) for e in self.entries],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped], **extra}

    def entry_data(self, e: Entry) -> dict[str, Any]:
        """One image in the page's format (the server sends these one at a time)."""
        views: list[str] = []
        seen: dict[bytes, int] = {}
        results = []
        for m, (c, scores) in enumerate(zip(e.captions, e.scores)):
            key = c.view.tobytes()  # models with the same preprocessing share one picture
            if key not in seen:
                seen[key] = len(views)
                views.append(image_data_uri(c.view, self.max_side))
            alts = c.alternatives or [c]
            per_beam = e.grounding[m] if e.grounding else [None] * len(alts)
            res = {"view": seen[key], "w": int(c.view.shape[1]), "h": int(c.view.shape[0]),
                   "scores": scores, "beams": [_beam_record(a, g) for a, g in zip(alts, per_beam)]}
            if c.aspect:  # the page draws the (stretched) view back at the photo's shape
                res["aspect"] = [int(c.aspect[0]), int(c.aspect[1])]
            if e.grounding:  # only images with reference boxes carry these (format 1 + fields)
                res["grounding"] = e.grounding_summary(m)
            results.append(res)
        out = {"name": e.name, "path": e.path, "refs": e.references, "views": views,
               "results": results}
        if e.photo is not None:
            out["entities"] = e.photo.photo_id
        return out

    def html(self, mode: str = "static", **extra: Any) -> str:
        """The whole page: one file, no network needed (script, style, images and maps inline)."""
        return render_page(self.page_data(mode, **extra), self.title)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page atomically; returns its path."""
        atomic_write_text(path, self.html())
        return Path(path)

    # ---- exports ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Everything the page shows at full precision, for people's own notebooks: per image
        and model the caption, words, log p, attention (per word h×w), β, attended cells, crop
        boxes (hard attention), BLEU-4/CIDEr, and every beam alternative; with reference boxes
        attached (:meth:`attach_entities`) also the image's Flickr id (``entities``), per caption
        its ``grounding`` (per word: None, or the named thing's boxes in view pixels,
        correctness, pointing, the uniform map's correctness, entropy) and
        ``grounding_summary`` (means over its scored words)."""
        images = []
        for e in self.entries:
            results = {}
            for m, (info, c, scores) in enumerate(zip(self.models, e.captions, e.scores)):
                alts = c.alternatives or [c]
                per_beam = e.grounding[m] if e.grounding else [None] * len(alts)
                rec = _caption_json(c, per_beam[0])
                rec["scores"] = scores
                rec["alternatives"] = [_caption_json(a, g) for a, g in zip(alts, per_beam)]
                if e.grounding:
                    rec["grounding_summary"] = e.grounding_summary(m)
                results[info.name] = rec
            image = {"name": e.name, "image": e.path, "references": e.references,
                     "results": results}
            if e.photo is not None:
                image["entities"] = e.photo.photo_id
            images.append(image)
        return {"version": FORMAT_VERSION, "title": self.title,
                "models": [m.to_dict() for m in self.models], "images": images,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}

    def save_json(self, path: str | os.PathLike) -> Path:
        atomic_write_json(path, self.to_json(), indent=None)
        return Path(path)

    def save_animations(self, folder: str | os.PathLike, fmt: str = "gif",
                        duration_ms: int = 800) -> list[Path]:
        """One animation per image and model (the heat moving word by word): GIF or APNG."""
        from showattend.report.animate import save_animation

        out, used = [], set()
        ext = {"gif": "gif", "apng": "png"}[fmt]
        for e in self.entries:
            for info, c in zip(self.models, e.captions):
                stem = f"{Path(e.name).stem}.{_safe(info.name)}"
                name, n = f"{stem}.{ext}", 1
                while name in used:  # two inputs with one file name
                    n += 1
                    name = f"{stem}_{n}.{ext}"
                used.add(name)
                out.append(save_animation(c, Path(folder) / name, fmt=fmt,
                                          duration_ms=duration_ms))
        return out

    # ---- Jupyter ---------------------------------------------------------------------------

    def _repr_html_(self) -> str:
        # An iframe keeps the page's ids, styles and keyboard handling apart from the notebook's
        # and from other outputs; srcdoc keeps it self-contained (no file, no server).
        rows = max(1, len(self.models))
        height = 640 if rows <= 2 else 900
        return (f'<iframe class="showattend-report" srcdoc="{html.escape(self.html())}" '
                f'style="width:100%;height:{height}px;border:1px solid #ddd" '
                f'sandbox="allow-scripts"></iframe>')

    def __repr__(self) -> str:
        return (f"Report({len(self.entries)} images, models={[m.name for m in self.models]}, "
                f"skipped={len(self.skipped)})")


def name_models(checkpoints: Sequence[str]) -> dict[str, str]:
    """{display name: checkpoint path} for ``--checkpoint`` values: ``NAME=PATH`` names a model
    explicitly; otherwise the run folder's name (``runs/flickr8k_soft/best.pt`` → flickr8k_soft),
    numbered when two would share one."""
    out: dict[str, str] = {}
    for spec in checkpoints:
        name, sep, path = str(spec).partition("=")
        if not sep or not name or Path(spec).exists():
            path = str(spec)
            p = Path(path)
            name = p.name if p.is_dir() else (p.parent.name if p.stem in ("best", "last")
                                             and p.parent.name else p.stem)
            name = name or "model"
        base, n = name, 1
        while name in out:
            n += 1
            name = f"{base}_{n}"
        out[name] = path
    return out


def _caption_json(c: Caption, grounding: Sequence[WordScore] | None = None) -> dict[str, Any]:
    rec = c.to_json()
    rec["locations"] = [int(x) for x in np.asarray(c.locations).reshape(-1)]
    if grounding is not None:
        rec["grounding"] = _word_grounding(grounding, len(c.words), full=True)
    return rec


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _asset(name: str) -> str:
    return resources.files("showattend.report").joinpath("assets", name).read_text("utf-8")


def render_page(data: dict[str, Any], title: str) -> str:
    """Fill the page template: style, script and data inline."""
    # "</script>" or "<!--" inside the JSON would end or confuse the <script> element; outside
    # strings JSON has no "<", and inside them "\u003c" is the same character.
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    parts = {"TITLE": html.escape(title), "CSS": _asset("report.css"),
             "JS": _asset("report.js"), "DATA": payload}
    # one pass: text inserted for one marker is never searched for another
    return re.sub(r"\{\{(TITLE|CSS|JS|DATA)\}\}", lambda m: parts[m.group(1)],
                  _asset("report.html"))
