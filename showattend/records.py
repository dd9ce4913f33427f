"""The records a captioning model returns: one class, below the API, the report and the page.

:class:`CaptionRecord` holds one captioned image — words, score, maps, gates, locations, boxes —
and, for an explained caption (:mod:`showattend.explain`), each word's log p, rank and the
model's top words. Everything that reads captions (the report, the page, the grounding measures,
animations) imports it from here, so no module below the API needs the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

__all__ = ["CaptionRecord", "CaptionSource", "display_view"]


@dataclass
class CaptionRecord:
    """One captioned image: the record ``caption`` and ``explain`` return (the API's
    :class:`~showattend.api.Caption` adds the notebook view), and what the report, the page and
    the grounding measures read."""

    image: str
    caption: str
    words: list[str]
    score: float  # log p(caption) under the model
    attention: np.ndarray  # (n_words, h, w), each map sums to 1
    beta: np.ndarray  # (n_words,) gate value per word
    locations: np.ndarray  # (n_words,) attended grid cell (argmax or sampled)
    # the window looked at per word (px): hard-attention crop, glimpse window, local window
    boxes: list[tuple[float, float, float, float]] | None
    view: np.ndarray = field(repr=False)  # (H, W, 3) uint8: the preprocessed image the model saw
    # caption(..., alternatives=True): the K beam hypotheses, ranked (the first is this caption)
    alternatives: list[CaptionRecord] = field(default_factory=list, repr=False, compare=False)
    # multi-head attention: (n_words, heads, h, w) one map per head (``attention`` is their mean)
    head_attention: np.ndarray | None = None
    # (width, height) of the photo when ``view`` is a stretched copy of it: overlays, the report
    # and the page draw the view back at this shape (maps and boxes stretch with it)
    aspect: tuple[int, int] | None = None
    # an explained text (explain.py; None for the model's own captions): the text as given, per
    # word its log p, rank (1 = the model's first choice) and the model's top words (word, log p)
    # at that step; log p of <end> (``score`` includes it); the words fed as <unk>
    text: str | None = None
    logp: np.ndarray | None = None  # (n_words,)
    rank: np.ndarray | None = None  # (n_words,)
    top: list[list[tuple[str, float]]] | None = None
    end_logp: float | None = None
    unknown: list[str] | None = None  # by name, in order
    unknown_at: list[int] | None = None  # their positions in ``words``
    model_caption: str | None = None  # the model's own caption of the image, and its log p
    model_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON record: image, caption, words, score, attention (per word H×W), beta; boxes
        where a window was looked at; head_attention (per word, per head H×W) for several heads;
        for an explained text also text, logp, rank, top, end_logp, unknown, unknown_at,
        model_caption and model_score."""
        rec = {"image": self.image, "caption": self.caption, "words": self.words,
               "score": round(self.score, 6),
               "attention": np.round(self.attention, 6).tolist(),
               "beta": np.round(self.beta, 6).tolist()}
        if self.boxes is not None:
            rec["boxes"] = [list(b) for b in self.boxes]
        if self.head_attention is not None:
            rec["head_attention"] = np.round(self.head_attention, 6).tolist()
        if self.logp is not None:  # an explained text
            rec.update(
                text=self.text, logp=np.round(self.logp, 6).tolist(),
                rank=[int(r) for r in self.rank], end_logp=round(float(self.end_logp), 6),
                top=[[[w, round(v, 6)] for w, v in step] for step in self.top],
                unknown=list(self.unknown or []), unknown_at=list(self.unknown_at or []),
                model_caption=self.model_caption,
                model_score=None if self.model_score is None else round(float(self.model_score), 6))
        return rec


class CaptionSource(Protocol):
    """What the report and the page ask of a loaded model (:class:`showattend.api.CaptionerAPI`
    is one): its attention kind, model, preprocessing and config, captions of files, and
    explained texts."""

    model: Any
    preprocess: Any
    config: Any

    @property
    def attention_kind(self) -> str: ...

    def explain(self, images: Sequence[Any], texts: Any, mode: str | None = None,
                beam: int | None = None, batch_size: int = 16,
                own_caption: bool = True) -> list[CaptionRecord]: ...

    def caption_paths(self, inputs: Sequence[str | Path], beam: int | None = None,
                      mode: str | None = None, batch_size: int = 16, workers: int | None = None,
                      alternatives: bool = False
                      ) -> Iterator[tuple[Path, CaptionRecord | None, str | None]]: ...


def display_view(view: np.ndarray, aspect: tuple[int, int] | None
                 ) -> tuple[np.ndarray, float, float]:
    """The view drawn at the photo's own shape: (image, x scale, y scale) where the scales take
    view pixels (crop boxes, reference boxes) to the returned image's. The longer side keeps the
    view's length; without ``aspect``, or at the view's own shape, the view itself."""
    h, w = view.shape[:2]
    if not aspect or aspect[0] <= 0 or aspect[1] <= 0:
        return view, 1.0, 1.0
    pw, ph = aspect
    side = max(h, w)
    dw, dh = (side, max(1, round(side * ph / pw))) if pw >= ph else (max(1, round(side * pw / ph)), side)
    if (dw, dh) == (w, h):
        return view, 1.0, 1.0
    from PIL import Image

    shown = np.asarray(Image.fromarray(np.asarray(view, dtype=np.uint8)).resize(
        (dw, dh), Image.BILINEAR))
    return shown, dw / w, dh / h
