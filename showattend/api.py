"""Python API: load a checkpoint once, caption many images, get words, score, β and maps back.

    cap = showattend.load("runs/demo/best.pt")
    [c] = cap.caption(["dog.jpg"], beam=3)
    c.words, c.score, c.attention.shape  # (n_words, h, w)
    fig = cap.overlay(c)                  # matplotlib Figure, one panel per word
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from showattend import precision as P
from showattend import runtime
from showattend.data.folder import image_batches, iter_image_paths
from showattend.data.images import ImageLoadError, Preprocessor, load_image
from showattend.decoding import decode
from showattend.loading import load_model
from showattend.records import CaptionRecord, display_view
from showattend.report import ModelInfo, Report
from showattend.vocab import UNK_ID, Vocab

if TYPE_CHECKING:
    from showattend.attention_grounding import WordScore
    from showattend.data.entities import PhotoEntities

ImageLike = str | os.PathLike | Image.Image


class Caption(CaptionRecord):
    """One captioned image (:class:`~showattend.records.CaptionRecord`); in Jupyter it shows
    itself as the interactive attention view."""

    def _repr_html_(self) -> str:
        """Jupyter: the interactive attention view of this caption (words, maps, β, beams)."""
        return Report.from_captions({"model": [self]})._repr_html_()


class Captions(list):
    """The list ``caption()`` returns; in Jupyter it shows itself as the interactive view."""

    def __init__(self, items=(), model: dict[str, Any] | None = None):
        super().__init__(items)
        self.model = model or {}  # how they were made: attention kind, grid, beam, mode

    def _repr_html_(self) -> str:
        if not self:
            return "<p>no captions</p>"
        info = ModelInfo(name="model", **self.model) if self.model else None
        return Report.from_captions({"model": list(self)},
                                    models=[info] if info else None)._repr_html_()


def crop_boxes(locations: np.ndarray, grid: tuple[int, int], window: int,
               size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Pixel boxes (x0, y0, x1, y1) of the k×k crops at ``locations`` on an image of size (H, W)."""
    gh, gw = grid
    h, w = size
    boxes = []
    for loc in np.asarray(locations).tolist():
        i, j = divmod(int(loc), gw)
        r = window // 2
        i0, i1 = max(0, i - r), min(gh, i + r + 1)
        j0, j1 = max(0, j - r), min(gw, j + r + 1)
        boxes.append((j0 * w / gw, i0 * h / gh, j1 * w / gw, i1 * h / gh))
    return boxes


def _aux_for_caption(aux: dict[str, torch.Tensor] | None, j: int, n: int, size: tuple[int, int],
                     grid: tuple[int, int], boxes, no_window: bool):
    """(boxes in px, per-head maps (n, H, h, w)) of image j's n words from Decoded.aux.
    ``no_window``: a stochastic kind decoded by expectation/mc looked at no single window."""
    if not aux:
        return boxes, None
    h, w = size
    if "window" in aux and not no_window:
        win = aux["window"][j, :n].float().cpu().numpy()  # (n, 4) fractions x0, y0, x1, y1
        boxes = [(float(x0 * w), float(y0 * h), float(x1 * w), float(y1 * h))
                 for x0, y0, x1, y1 in win.tolist()]
    heads = None
    if "heads" in aux:
        hm = aux["heads"][j, :n]  # (n, H, L)
        heads = hm.reshape(n, hm.shape[1], *grid).float().cpu().numpy()
    return boxes, heads


class CaptionerAPI:
    """A loaded model with its vocabulary and its preprocessing."""

    def __init__(self, model, vocab: Vocab, preprocess: Preprocessor, config, device: torch.device,
                 precision: str = "fp32"):
        self.model = model
        self.vocab = vocab
        self.preprocess = preprocess
        self.config = config
        self.device = device
        self.precision = precision  # resolved: "fp32" | "bf16" (precision.py)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str = "auto", int8: bool = False,
             precision: str | None = None) -> CaptionerAPI:
        """Load a checkpoint (file, or run directory holding best.pt/last.pt); ``int8``: dynamic
        int8 decoder for CPU serving (see :mod:`showattend.quantize`); ``precision`` "auto" |
        "fp32" | "bf16" (None: the checkpoint's ``eval.precision``, fp32 unless set)."""
        dev = runtime.resolve_device(device)
        model, vocab, preprocess, cfg, _ = load_model(checkpoint, dev, int8=int8)
        chosen = P.choose(precision or cfg.eval.precision, dev, "decoding")
        return cls(model, vocab, preprocess, cfg, dev, chosen)

    @property
    def attention_kind(self) -> str:
        return self.model.attention_kind

    @torch.no_grad()
    def caption(self, images: Sequence[ImageLike] | ImageLike, beam: int | None = None,
                max_len: int | None = None, mode: str | None = None,
                batch_size: int = 16, alternatives: bool = False) -> Captions:
        """Caption images (paths or PIL images); an unreadable one raises ImageLoadError.

        ``alternatives``: also keep every beam's hypothesis in ``Caption.alternatives``."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        beam = beam or self.config.eval.beam
        max_len = max_len or self.config.eval.max_len
        out: list[Caption] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start: start + batch_size])
            views, sizes = self._load(chunk)
            batch = torch.stack([self.preprocess.normalize(v) for v in views])  # (B, 3, H, W)
            out.extend(self._caption_batch(chunk, views, batch, beam, max_len, mode,
                                           alternatives, sizes))
        return Captions(out, model={
            "attention": self.attention_kind, "grid": tuple(self.model.grid), "beam": beam,
            "mode": mode or self.model.test_mode,
            "window": int(getattr(self.model.decoder.attention, "window", 1))})

    def _load(self, chunk) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Views (H, W, 3) of paths or PIL images, and each photo's (width, height)."""
        imgs = [im if isinstance(im, Image.Image) else load_image(im) for im in chunk]
        return [self.preprocess.view(im) for im in imgs], [im.size for im in imgs]

    def _caption_batch(self, chunk, views, batch, beam, max_len, mode,
                       alternatives: bool = False, sizes=None) -> list[Caption]:
        with runtime.autocast(self.precision, self.device):  # precision.py
            feats = self.model.encode(batch.to(self.device))  # (B, L, D)
            dec = decode(self.model, feats, beam=beam, max_len=max_len,
                         length_norm=self.config.eval.length_norm, mode=mode,
                         no_repeat_ngram=self.config.eval.no_repeat_ngram,
                         keep_beams=alternatives, allow_unk=self.config.eval.allow_unk)
        k = dec.tokens.shape[0] // len(chunk)  # rows per image: K with alternatives, else 1
        res = []
        for j, src in enumerate(chunk):
            name = str(src) if not isinstance(src, Image.Image) else "<PIL.Image>"
            # a beam at -inf (more beams than the vocabulary could fill) is no hypothesis
            rows = [self._row_caption(dec, j * k + r, name, views[j], mode) for r in range(k)
                    if r == 0 or torch.isfinite(dec.scores[j * k + r])]
            aspect = self._aspect(sizes[j] if sizes else None)
            for row in rows:
                row.aspect = aspect
            # a copy heads the list, so no Caption holds itself (no cycles for repr, eq, pickle)
            res.append(replace(rows[0], alternatives=rows) if alternatives else rows[0])
        return res

    def _aspect(self, size: tuple[int, int] | None) -> tuple[int, int] | None:
        """The photo's (width, height) where the model's view stretches it (else None: a centre
        crop is drawn as the model saw it)."""
        return size if self.preprocess.resize == "stretch" else None

    def _row_caption(self, dec, row: int, name: str, view: np.ndarray, mode) -> Caption:
        """The Caption held in row ``row`` of a decoding result."""
        n = int(dec.lengths[row])
        words = self.vocab.decode(dec.tokens[row, :n].tolist())
        return self._record(name, words, float(dec.scores[row]), dec, row, view, mode)

    def _record(self, name: str, words: list[str], score: float, steps, row: int,
                view: np.ndarray, mode) -> Caption:
        """A Caption from row ``row`` of per-step outputs (``steps``: a decoding result or a
        teacher-forced pass: alphas, betas, locations, aux), its first len(words) steps."""
        gh, gw = self.model.grid
        n = len(words)
        locs = steps.locations[row, :n].cpu().numpy()
        boxes = None
        mode = mode or self.model.test_mode
        # a crop box exists where one location was used: argmax or sample (not expectation/mc)
        if self.attention_kind in ("hard", "soft") and mode in ("argmax", "sample"):
            boxes = crop_boxes(locs, (gh, gw), getattr(self.model.decoder.attention, "window", 1),
                               view.shape[:2])
        boxes, heads = _aux_for_caption(steps.aux, row, n, view.shape[:2], (gh, gw), boxes,
                                        self.model.stochastic and mode not in ("argmax", "sample"))
        return Caption(
            image=name, caption=" ".join(words), words=words, score=score,
            # .float(): numpy has no bfloat16
            attention=steps.alphas[row, :n].reshape(n, gh, gw).float().cpu().numpy(),
            beta=steps.betas[row, :n].float().cpu().numpy(), locations=locs, boxes=boxes,
            view=view, head_attention=heads)

    def caption_paths(self, inputs: Sequence[str | os.PathLike], beam: int | None = None,
                      mode: str | None = None, batch_size: int = 16, workers: int | None = None,
                      alternatives: bool = False
                      ) -> Iterator[tuple[Path, Caption | None, str | None]]:
        """Caption files and folders; yields (path, caption, None) or (path, None, reason), in
        path order. Files are decoded and preprocessed by ``workers`` DataLoader processes (None:
        automatic, 0: in this process) while the model captions the previous batch."""
        beam = beam or self.config.eval.beam
        max_len = self.config.eval.max_len
        paths = list(iter_image_paths(inputs))
        for items in image_batches(paths, self.preprocess, batch_size, workers):
            good = [it for it in items if it.error is None]
            caps = iter(self._caption_batch(
                [str(it.path) for it in good], [it.view for it in good],
                torch.stack([it.pixels for it in good]), beam, max_len, mode,
                alternatives, [it.size for it in good]) if good else [])
            for it in items:
                yield (it.path, None, it.error) if it.error is not None else (it.path, next(caps),
                                                                             None)

    @torch.no_grad()
    def explain(self, images: Sequence[ImageLike] | ImageLike,
                texts: str | Sequence[str] | Sequence[Sequence[str]], mode: str | None = None,
                beam: int | None = None, batch_size: int = 16,
                own_caption: bool = True) -> Captions:
        """Where the model looks for words a person writes: each text fed word by word to the
        model on each image (teacher forcing, :mod:`showattend.explain`). ``texts``: one text or
        a list of texts for every image, or a list of lists, one per image. Returns one Caption
        per (image, text), image-major, with ``logp``, ``rank``, ``top`` per word, ``end_logp``,
        ``unknown`` and the model's own caption (``model_caption``, ``model_score``; beam
        ``beam``, default the config's; None with ``own_caption=False``). ``score`` is the
        text's total log p, <end> included.
        A text with no word raises :class:`~showattend.explain.ExplainError`."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)
        if isinstance(texts, str):
            texts = [texts]
        per_image = (list(texts) if texts and not isinstance(texts[0], str)
                     else [list(texts)] * len(images))
        if len(per_image) != len(images):
            raise ValueError(f"{len(per_image)} lists of texts for {len(images)} images")
        out: list[Caption] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start: start + batch_size]
            views, sizes = self._load(chunk)
            batch = torch.stack([self.preprocess.normalize(v) for v in views])
            names = [str(src) if not isinstance(src, Image.Image) else "<PIL.Image>"
                     for src in chunk]
            for recs in self._explain_batch(names, views, batch,
                                            per_image[start: start + batch_size], mode, beam,
                                            own_caption, sizes):
                out.extend(recs)
        return Captions(out, model={
            "attention": self.attention_kind, "grid": tuple(self.model.grid),
            "beam": beam or self.config.eval.beam, "mode": mode or self.model.test_mode,
            "window": int(getattr(self.model.decoder.attention, "window", 1))})

    def explain_paths(self, inputs: Sequence[str | os.PathLike], texts_for, mode: str | None = None,
                      beam: int | None = None, batch_size: int = 16, workers: int | None = None
                      ) -> Iterator[tuple[Path, list[Caption] | None, str | None]]:
        """:meth:`explain` over files and folders: ``texts_for(path)`` gives each image's texts
        (an image with none is skipped). Yields (path, records, None) or (path, None, reason)."""
        paths = [p for p in iter_image_paths(inputs)]
        for items in image_batches(paths, self.preprocess, batch_size, workers):
            texts = [texts_for(it.path) if it.error is None else [] for it in items]
            good = [(it, ts) for it, ts in zip(items, texts) if ts]
            recs = iter(self._explain_batch(
                [str(it.path) for it, _ in good], [it.view for it, _ in good],
                torch.stack([it.pixels for it, _ in good]), [ts for _, ts in good],
                mode, beam, sizes=[it.size for it, _ in good]) if good else [])
            for it, ts in zip(items, texts):
                if it.error is not None:
                    yield it.path, None, it.error
                elif ts:
                    yield it.path, next(recs), None

    def _explain_batch(self, names: list[str], views: list[np.ndarray], batch: torch.Tensor,
                       texts: list[Sequence[str]], mode: str | None, beam: int | None,
                       own_caption: bool = True, sizes=None) -> list[list[Caption]]:
        from showattend.explain import encode_text, teacher_force

        encoded = [[encode_text(self.vocab, t) for t in ts] for ts in texts]
        with runtime.autocast(self.precision, self.device):  # precision.py
            feats = self.model.encode(batch.to(self.device))  # (B, L, D)
            forced, g = teacher_force(self.model, feats, encoded, mode,
                                      self.config.eval.allow_unk)
            own = decode(self.model, feats, beam=beam or self.config.eval.beam,
                         max_len=self.config.eval.max_len,
                         length_norm=self.config.eval.length_norm, mode=mode,
                         no_repeat_ngram=self.config.eval.no_repeat_ngram,
                         allow_unk=self.config.eval.allow_unk) if own_caption else None
        itos = self.vocab.itos
        out = []
        for i, ts in enumerate(encoded):
            mine = self._row_caption(own, i, names[i], views[i], mode) if own else None
            aspect = self._aspect(sizes[i] if sizes else None)
            recs = []
            for j, t in enumerate(ts):
                r, n = i * g + j, len(t.words)
                lp = forced.logp[r, :n + 1].float().cpu()
                rec = self._record(names[i], t.words, float(lp.sum()), forced, r, views[i], mode)
                rec.text, rec.logp, rec.end_logp = t.text, lp[:n].numpy(), float(lp[n])
                rec.rank = forced.rank[r, :n].cpu().numpy()
                rec.top = [[(itos[int(w)], float(v)) for w, v in zip(ws, vs)]
                           for ws, vs in zip(forced.top_ids[r, :n].tolist(),
                                             forced.top_logp[r, :n].float().tolist())]
                rec.unknown = list(t.unknown)
                rec.unknown_at = [k for k, w in enumerate(t.ids) if w == UNK_ID]
                if mine is not None:
                    rec.model_caption, rec.model_score = mine.caption, mine.score
                rec.aspect = aspect
                recs.append(rec)
            out.append(recs)
        return out

    def word_scores(self, caption: Caption, photo: PhotoEntities,
                    image_size: tuple[int, int] | None = None) -> list[WordScore]:
        """The words of ``caption`` that name a boxed thing of ``photo`` (its Flickr30k Entities
        annotations): per word its reference boxes in the pixels of ``caption.view``, attention
        correctness and pointing (see :mod:`showattend.attention_grounding`). ``image_size``:
        (width, height) of the file the model read, when it is a resized copy of the photo;
        default: read from the caption's file. Pass the result to :meth:`overlay`."""
        from showattend.reference_boxes import caption_word_scores

        return caption_word_scores(caption, photo, self.preprocess, image_size)

    def overlay(self, caption: Caption, smooth: bool = True,
                grounding: Sequence[WordScore] | None = None):
        """Figure: the image the model saw, then one heat-map panel per word (β in the title);
        with several heads, one row per word: the mean map, then each head's. ``grounding``:
        the caption's :meth:`word_scores`; each word that names a boxed thing gets its
        reference boxes drawn (dashed green) and its correctness in the panel title."""
        from showattend.reference_boxes import per_word
        from showattend.visualize import attention_figure, head_attention_figure

        refs, correct = per_word(grounding, len(caption.words)) if grounding else (None, None)
        # drawn at the photo's own shape: the view stretched back, boxes with it
        view, sx, sy = display_view(caption.view, caption.aspect)

        def scaled(b):
            return None if b is None else (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)

        boxes = None if caption.boxes is None else [scaled(b) for b in caption.boxes]
        refs = None if refs is None else [None if r is None else [scaled(b) for b in r]
                                          for r in refs]
        if caption.head_attention is not None:
            return head_attention_figure(view, caption.words, caption.attention,
                                         caption.head_attention, boxes=boxes,
                                         title=caption.caption, ref_boxes=refs,
                                         ref_scores=correct)
        notes, title = None, caption.caption
        if caption.logp is not None:  # an explained text: log p per word, unknown words marked
            unk = set(caption.unknown_at or ())
            notes = [f"log p {lp:.2f}" + (" · not in vocab (<unk>)" if k in unk else "")
                     for k, lp in enumerate(caption.logp)]
            title = (f"explained: \"{caption.caption}\"  log p {caption.score:.2f} (<end> "
                     f"included)")
            if caption.model_caption is not None:
                title += (f"\nthe model's own: \"{caption.model_caption}\"  log p "
                          f"{caption.model_score:.2f}")
        return attention_figure(view, caption.words, caption.attention, caption.beta,
                                boxes=boxes, title=title, ref_boxes=refs,
                                ref_scores=correct, notes=notes)


def load(checkpoint: str | os.PathLike, device: str = "auto", int8: bool = False,
         precision: str | None = None) -> CaptionerAPI:
    """Load a checkpoint for captioning (model + vocabulary + preprocessing); ``int8``: dynamic
    int8 decoder on the CPU; ``precision``: "auto" | "fp32" | "bf16" (precision.py)."""
    return CaptionerAPI.load(checkpoint, device, int8=int8, precision=precision)
