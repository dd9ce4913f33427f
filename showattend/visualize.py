"""Attention overlays and training curves: arrays in, matplotlib Figures / PNG files out.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so the
library opens no windows, touches no global figure registry and works on headless machines.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from showattend.io import atomic_savefig

if TYPE_CHECKING:  # annotations only: matplotlib is imported when a figure is made
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["attention_figure", "head_attention_figure", "plot_curves", "save_attention_figure",
           "upsample_attention", "variants_figure"]

Box = tuple[float, float, float, float]

_PANEL_INCHES = 2.2  # width of one panel; height follows the image's aspect ratio
_TITLE_INCHES = 0.4  # room for a one-line panel title


def _new_figure(width: float, height: float) -> Figure:
    # Imported lazily: matplotlib costs ~0.3 s to import and most callers never draw.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot involved
    return fig


def _cell_assignment(n_pixels: int, n_cells: int) -> np.ndarray:
    """(n_pixels, n_cells) one-hot: the grid cell holding each pixel's centre.

    Cell i covers [i n/c, (i+1) n/c); pixel r spans [r, r+1), so its centre r + 1/2 lies in cell
    floor((2r+1) c / 2n). Integer arithmetic keeps centres on a boundary in the upper cell.
    """
    idx = ((2 * np.arange(n_pixels) + 1) * n_cells) // (2 * n_pixels)  # (n_pixels,)
    return np.eye(n_cells)[idx]


def _gaussian_rows(n_pixels: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur as a matrix, each row renormalised so the borders do not fade."""
    pos = np.arange(n_pixels, dtype=np.float64)
    k = np.exp(-0.5 * ((pos[:, None] - pos[None, :]) / sigma) ** 2)  # (n, n)
    return k / k.sum(axis=1, keepdims=True)


def upsample_attention(
    alpha: np.ndarray, size: tuple[int, int], smooth: bool = True
) -> np.ndarray:
    """Upsample an (h, w) attention map to image size (H, W), normalised to [0, 1].

    Cell (i, j) maps exactly onto pixels [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h) for any grid and
    image shape. ``smooth`` blurs with a Gaussian of sigma half a cell per axis. The result is
    divided by its maximum (a uniform map becomes all ones); an all-zero map comes back as zeros.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"attention map must be 2-D (h, w), got shape {a.shape}")
    H, W = (int(s) for s in size)
    if H <= 0 or W <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    h, w = a.shape
    rows = _cell_assignment(H, h)  # (H, h)
    cols = _cell_assignment(W, w)  # (W, w)
    if smooth:
        # Blur the assignment matrices instead of the (H, W) image: the separable blur of the
        # nearest-neighbour upsampling, at O(H^2 + W^2 + H W h) rather than O(H W (H + W)).
        rows = _gaussian_rows(H, 0.5 * H / h) @ rows  # (H, h)
        cols = _gaussian_rows(W, 0.5 * W / w) @ cols  # (W, w)
    up = rows @ a @ cols.T  # (H, W)
    # Scale by the maximum, not min-max: min-max would stretch a nearly uniform map's noise into
    # full-contrast blobs that look like sharp attention. Only negative input shifts the zero.
    lo, hi = min(float(up.min()), 0.0), float(up.max())
    if not hi > lo:  # all-zero (or NaN) map: nothing to show
        return np.zeros((H, W))
    return (up - lo) / (hi - lo)


def _escape(text: str) -> str:
    # A word such as "$5" would otherwise switch matplotlib into mathtext and may fail to parse.
    return text.replace("$", r"\$")


def attention_figure(
    image: np.ndarray,
    words: Sequence[str],
    alphas: np.ndarray,
    betas: np.ndarray | None = None,
    boxes: Sequence[Box | None] | None = None,
    title: str | None = None,
    cols: int = 5,
    ref_boxes: Sequence[Sequence[Box] | None] | None = None,
    ref_scores: Sequence[float | None] | None = None,
    notes: Sequence[str] | None = None,
) -> Figure:
    """Figure: the image captioned with ``words``, then one heat-map overlay per word.

    ``image`` (H, W, 3) uint8 (or (H, W) grey); ``alphas`` (T, h, w) one map per word; ``betas``
    (T,) gate values shown as "word (β=0.83)"; ``boxes`` per word (x0, y0, x1, y1) pixel
    rectangles (hard-attention crops; None for no box); ``title`` goes above all panels.
    ``ref_boxes`` per word: the reference boxes of the thing it names (human boxes, e.g. Flickr30k
    Entities, in the same pixels), drawn dashed green, or None for a word that names none;
    ``ref_scores`` per word: its attention correctness against them (None: none), put in the
    panel's title; ``notes`` per word: one more line under its panel title (an explained
    caption's log p). Returns a ``matplotlib.figure.Figure`` (T + 1 image axes, ``cols`` per
    row).
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"image must be (H, W, 3) or (H, W), got shape {img.shape}")
    a = np.asarray(alphas, dtype=np.float64)
    T = len(words)
    if a.ndim != 3 or a.shape[0] != T:
        raise ValueError(f"alphas shape {a.shape} does not match {T} words (expected (T, h, w))")
    b = None if betas is None else np.asarray(betas, dtype=np.float64).reshape(-1)  # (T,)
    if b is not None and b.shape[0] != T:
        raise ValueError(f"{b.shape[0]} betas for {T} words")
    if boxes is not None and len(boxes) != T:
        raise ValueError(f"{len(boxes)} boxes for {T} words")
    _check_refs(ref_boxes, ref_scores, T)
    if notes is not None and len(notes) != T:
        raise ValueError(f"{len(notes)} notes for {T} words")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")

    H, W = img.shape[:2]
    n_panels = T + 1
    ncols = min(cols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    panel_h = _PANEL_INCHES * H / W
    caption = " ".join(words)
    # The caption title may wrap over several lines; give the first row the room it needs.
    caption_lines = textwrap.wrap(_escape(caption), width=30) or [""]
    scored = ref_scores is not None and any(v is not None for v in ref_scores)
    has_refs = ref_boxes is not None and any(v for v in ref_boxes)
    extra = (0.18 * (len(caption_lines) - 1) + (0.35 + 0.2 * title.count("\n") if title else 0.0)
             + (0.18 * nrows if scored else 0.0) + (0.2 if has_refs else 0.0)
             + (0.18 * nrows if notes is not None else 0.0))
    fig = _new_figure(ncols * _PANEL_INCHES, nrows * (panel_h + _TITLE_INCHES) + extra)
    if title:
        fig.suptitle(_escape(title), fontsize=11)

    # extent puts pixel r on [r, r+1), the same coordinates as attention cells and boxes.
    extent = (0, W, H, 0)
    cmap = "gray" if img.ndim == 2 else None
    ax = fig.add_subplot(nrows, ncols, 1)
    ax.imshow(img, extent=extent, cmap=cmap, interpolation="nearest")
    ax.set_title("\n".join(caption_lines), fontsize=9)
    ax.set_axis_off()
    if has_refs:
        _ref_legend(ax)

    for t, word in enumerate(words):
        label = _escape(word) if b is None else f"{_escape(word)} (β={b[t]:.2f})"
        if ref_scores is not None and ref_scores[t] is not None:
            label += f"\ncorrectness {ref_scores[t]:.2f}"
        if notes is not None and notes[t]:
            label += f"\n{_escape(notes[t])}"
        _heat_panel(fig.add_subplot(nrows, ncols, t + 2), img, a[t], label, 10,
                    None if boxes is None else boxes[t],
                    None if ref_boxes is None else ref_boxes[t])
    return fig


def _check_refs(ref_boxes: Sequence[Sequence[Box] | None] | None,
                ref_scores: Sequence[float | None] | None, n_words: int) -> None:
    if ref_boxes is not None and len(ref_boxes) != n_words:
        raise ValueError(f"{len(ref_boxes)} reference-box entries for {n_words} words")
    if ref_scores is not None and len(ref_scores) != n_words:
        raise ValueError(f"{len(ref_scores)} reference scores for {n_words} words")


def _heat_panel(ax: Axes, img: np.ndarray, alpha: np.ndarray, title: str, fontsize: float,
                box: Box | None = None, ref_boxes: Sequence[Box] | None = None) -> None:
    """One word's panel: the image, its attention map (h, w) upsampled over it, title, the crop
    box and the reference boxes."""
    H, W = img.shape[:2]
    extent = (0, W, H, 0)  # pixel r on [r, r+1), the coordinates of attention cells and boxes
    heat = upsample_attention(alpha, (H, W))  # (H, W) in [0, 1]
    ax.imshow(img, extent=extent, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    # Opacity grows with the heat so unattended regions keep the image readable.
    ax.imshow(heat, extent=extent, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.15 + 0.55 * heat,
              interpolation="bilinear")
    ax.set_title(title, fontsize=fontsize)
    if box is not None:
        _draw_box(ax, box)
    for ref in ref_boxes or ():
        _draw_ref_box(ax, ref)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_off()


def head_attention_figure(
    image: np.ndarray,
    words: Sequence[str],
    alphas: np.ndarray,
    head_alphas: np.ndarray,
    boxes: Sequence[Box | None] | None = None,
    title: str | None = None,
    panel_inches: float = 1.5,
    ref_boxes: Sequence[Sequence[Box] | None] | None = None,
    ref_scores: Sequence[float | None] | None = None,
) -> Figure:
    """Multi-head attention: one row per word, the mean map first, then one panel per head.

    ``alphas`` (T, h, w) the mean map, ``head_alphas`` (T, H, h, w); ``boxes`` per word drawn on
    the mean panel (e.g. local attention's window); ``ref_boxes`` / ``ref_scores`` per word as in
    :func:`attention_figure`, on every panel of the word's row (the score in the mean panel's
    title). Returns a Figure of T × (H + 1) axes.
    """
    img = np.asarray(image)
    a = np.asarray(alphas, dtype=np.float64)
    ha = np.asarray(head_alphas, dtype=np.float64)
    T = len(words)
    if a.ndim != 3 or a.shape[0] != T or ha.ndim != 4 or ha.shape[0] != T \
            or ha.shape[2:] != a.shape[1:]:
        raise ValueError(f"maps {a.shape} and per-head maps {ha.shape} do not match {T} words "
                         f"(expected (T, h, w) and (T, H, h, w))")
    if boxes is not None and len(boxes) != T:
        raise ValueError(f"{len(boxes)} boxes for {T} words")
    _check_refs(ref_boxes, ref_scores, T)
    H, W = img.shape[:2]
    n_heads = ha.shape[1]
    ncols, nrows = n_heads + 1, max(T, 1)
    fig = _new_figure(ncols * panel_inches, nrows * (panel_inches * H / W + 0.3) + 0.4)
    if title:
        fig.suptitle(_escape(title), fontsize=10)
    for t, word in enumerate(words):
        maps = [a[t]] + [ha[t, k] for k in range(n_heads)]
        score = None if ref_scores is None else ref_scores[t]
        for k, m in enumerate(maps):
            label = f"{_escape(word)}: mean" if k == 0 else f"head {k}"
            if k == 0 and score is not None:
                label += f" (correctness {score:.2f})"
            _heat_panel(fig.add_subplot(nrows, ncols, t * ncols + k + 1), img, m, label, 8,
                        boxes[t] if k == 0 and boxes is not None else None,
                        None if ref_boxes is None else ref_boxes[t])
    return fig


def variants_figure(
    image: np.ndarray,
    rows: Sequence[tuple[str, Sequence[str], np.ndarray, Sequence[Box | None] | None]],
    panel_inches: float = 1.1,
) -> Figure:
    """Several models on one image: one row per model (label, words, maps (T, h, w), boxes per
    word or None), a panel per word with its map and box. Rows may have different lengths."""
    img = np.asarray(image)
    if not rows:
        raise ValueError("variants_figure: no rows")
    for label, words, alphas, boxes in rows:
        if np.asarray(alphas).shape[0] != len(words) or (boxes is not None
                                                         and len(boxes) != len(words)):
            raise ValueError(f"variants_figure: row {label!r}: maps/boxes do not match "
                             f"{len(words)} words")
    H, W = img.shape[:2]
    ncols = max(len(r[1]) for r in rows) + 1
    panel_h = panel_inches * H / W
    fig = _new_figure(ncols * panel_inches, len(rows) * (panel_h + 0.4))
    extent = (0, W, H, 0)
    cmap = "gray" if img.ndim == 2 else None
    for r, (label, words, alphas, boxes) in enumerate(rows):
        ax = fig.add_subplot(len(rows), ncols, r * ncols + 1)
        ax.imshow(img, extent=extent, cmap=cmap, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(_escape(label), width=16)), fontsize=6)
        ax.set_axis_off()
        a = np.asarray(alphas, dtype=np.float64)
        for t, word in enumerate(words):
            _heat_panel(fig.add_subplot(len(rows), ncols, r * ncols + t + 2), img, a[t],
                        _escape(word), 7, None if boxes is None else boxes[t])
    return fig


def _draw_box(ax: Axes, box: Box) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    # White with a dark outline: visible on both the hot and the cold end of the colormap.
    for colour, width in (("black", 3.0), ("white", 1.5)):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                               edgecolor=colour, linewidth=width))


# Reference boxes: dashed bright green over a dark outline, unlike the solid white crop box.
REF_BOX_COLOUR = "#39ff6a"
REF_BOX_LABEL = "reference boxes (Flickr30k Entities)"
REF_BOX_GID = "reference-box"  # the gid of the dashed patches (tests and tools find them by it)


def _draw_ref_box(ax: Axes, box: Box) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black",
                           linewidth=2.6, alpha=0.7))
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=REF_BOX_COLOUR,
                           linewidth=1.4, linestyle=(0, (3, 2)), gid=REF_BOX_GID))


def _ref_legend(ax: Axes) -> None:
    """The legend line under the image panel: what the dashed green boxes are."""
    from matplotlib.patches import Rectangle

    handle = Rectangle((0, 0), 1, 1, fill=False, edgecolor=REF_BOX_COLOUR, linewidth=1.4,
                       linestyle=(0, (3, 2)))
    ax.legend([handle], [REF_BOX_LABEL], loc="upper center", bbox_to_anchor=(0.5, 0.0),
              fontsize=6.5, frameon=False, handlelength=1.6, borderaxespad=0.2)


def save_attention_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically, then close it (do not use ``fig`` afterwards)."""
    try:
        atomic_savefig(fig, path)
    finally:
        # A figure made by the caller through pyplot stays in pyplot's registry until closed;
        # pyplot is only consulted if the caller already imported it.
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(fig)
        fig.clear()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _curve_panels(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str] | None
) -> list[tuple[str, str, list[float], list[float]]]:
    """(key, x-axis name, xs, ys) per panel of :func:`plot_curves`, points sorted by x."""
    if keys is None:
        keys = []
        for rec in records:
            keys += [k for k, v in rec.items()
                     if k not in ("step", "epoch") and k not in keys and _is_number(v)]
    if not keys:
        raise ValueError("plot_curves: no numeric values to plot")

    panels: list[tuple[str, str, list[float], list[float]]] = []
    for key in keys:
        rows = [r for r in records if _is_number(r.get(key))]
        if not rows:
            raise ValueError(f"plot_curves: no record has a numeric {key!r}")
        order = ("step", "epoch") if "loss" in key.lower() else ("epoch", "step")
        axis = next((x for x in order if all(_is_number(r.get(x)) for r in rows)), None)
        if axis is None:
            raise ValueError(f"plot_curves: records with {key!r} lack a numeric step or epoch")
        pts = sorted((float(r[axis]), float(r[key])) for r in rows)
        panels.append((key, axis, [p[0] for p in pts], [p[1] for p in pts]))
    return panels


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    keys: Sequence[str] | None = None,
) -> None:
    """Plot training records (JSONL rows with "step" and/or "epoch") to a PNG at ``path``.

    One panel per key (default: every numeric key but "step" and "epoch"). Keys containing
    "loss" are drawn against "step" when their records have one, other keys (metrics) against
    "epoch" when they have one; otherwise the other axis is used.
    """
    panels = _curve_panels(records, keys)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.0 * ncols, 3.0 * nrows)
    for n, (key, axis, xs, ys) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        # Markers only where points are few (per-epoch metrics); a line alone hides 1-2 points.
        ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, linewidth=1.2)
        ax.set_title(_escape(key), fontsize=10)
        ax.set_xlabel(axis)
        ax.grid(True, alpha=0.3)
    atomic_savefig(fig, path, dpi=100)
    fig.clear()
