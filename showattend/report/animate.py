"""Animated attention for slides: one frame per word, the heat moving over the image.

Frames are drawn with numpy + Pillow from the same upsampling as the static overlays
(:func:`showattend.visualize.upsample_attention`) and the same colour scale (jet, opacity
0.15 + 0.55·heat), with the caption underneath and the current word highlighted.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from showattend.io import atomic_write_bytes
from showattend.visualize import upsample_attention

if TYPE_CHECKING:
    from showattend.records import CaptionRecord as Caption

__all__ = ["caption_frames", "heat_rgba", "save_animation"]

FORMATS = ("gif", "apng")


def heat_rgba(heat: np.ndarray) -> np.ndarray:
    """(H, W) heat in [0, 1] → (H, W, 4) uint8 jet colours with opacity 0.15 + 0.55·heat (the
    overlay's and the report page's colour scale)."""
    from matplotlib import colormaps

    rgba = colormaps["jet"](np.clip(heat, 0.0, 1.0))  # (H, W, 4) floats
    rgba[..., 3] = 0.15 + 0.55 * heat
    return np.rint(rgba * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (FreeType)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _layout(words: list[str], font, width: int, draw: ImageDraw.ImageDraw
            ) -> list[list[tuple[int, int, int]]]:
    """Wrap words into lines: per line [(word index, x, width)]."""
    space = int(draw.textlength(" ", font=font))
    lines: list[list[tuple[int, int, int]]] = [[]]
    x = 0
    for i, w in enumerate(words):
        tw = int(draw.textlength(w, font=font))
        if lines[-1] and x + tw > width:
            lines.append([])
            x = 0
        lines[-1].append((i, x, tw))
        x += tw + space
    return lines


def caption_frames(caption: Caption, min_side: int = 256, smooth: bool = True
                   ) -> list[Image.Image]:
    """RGB frames: the image with the whole caption, then one per word (its heat map, its crop
    box for hard attention, the word highlighted and its β)."""
    view = np.asarray(caption.view, dtype=np.uint8)  # (h, w, 3) what the model saw
    h, w = view.shape[:2]
    scale = max(1.0, min_side / min(h, w))
    H, W = round(h * scale), round(w * scale)
    # small synthetic images get crisp pixels; photos a smooth resize
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    base = Image.fromarray(view).resize((W, H), resample).convert("RGBA")
    font = _font(max(12, W // 22))
    probe = ImageDraw.Draw(base)
    pad = 8
    words = list(caption.words)
    lines = _layout(words, font, W - 2 * pad, probe)
    line_h = int(font.size * 1.35) if hasattr(font, "size") else 14
    strip = pad * 2 + line_h * (len(lines) + 1)

    def frame(t: int | None) -> Image.Image:
        img = base.copy()
        if t is not None:
            heat = upsample_attention(caption.attention[t], (H, W), smooth=smooth)  # (H, W)
            img = Image.alpha_composite(img, Image.fromarray(heat_rgba(heat), "RGBA"))
            if caption.boxes is not None:
                x0, y0, x1, y1 = (v * scale for v in caption.boxes[t])
                d = ImageDraw.Draw(img)
                d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 0, 0, 255), width=3)
                d.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), outline=(255, 255, 255, 255),
                            width=1)
        canvas = Image.new("RGB", (W, H + strip), (255, 255, 255))
        canvas.paste(img.convert("RGB"), (0, 0))
        d = ImageDraw.Draw(canvas)
        y = H + pad
        for line in lines:
            for i, x, tw in line:
                if t == i:
                    d.rectangle((pad + x - 2, y - 1, pad + x + tw + 2, y + line_h - 3),
                                fill=(255, 214, 0))
                d.text((pad + x, y), words[i], font=font, fill=(0, 0, 0))
            y += line_h
        # "beta", not "β": Pillow's bundled font has no Greek letters
        info = "the whole caption" if t is None else (
            f"word {t + 1}/{len(words)}   beta = {float(np.asarray(caption.beta)[t]):.2f}")
        # black: a grey would be mapped to whatever palette colour is nearest in a GIF frame
        d.text((pad, y), info, font=font, fill=(0, 0, 0))
        return canvas

    return [frame(None)] + [frame(t) for t in range(len(words))]


def save_animation(caption: Caption, path: str | os.PathLike, fmt: str = "gif",
                   duration_ms: int = 800, min_side: int = 256) -> Path:
    """Write the caption's word-by-word animation as GIF or APNG (atomically); loops forever."""
    if fmt not in FORMATS:
        raise ValueError(f"animation format must be one of {FORMATS}, got {fmt!r}")
    frames = caption_frames(caption, min_side=min_side)
    buf = io.BytesIO()
    # the first frame (whole caption) stays twice as long: the viewer reads the caption first
    durations = [2 * duration_ms] + [duration_ms] * (len(frames) - 1)
    if fmt == "gif":
        # one adaptive palette per frame: the jet heat needs colours the photo does not have
        pal = [f.quantize(colors=255, method=Image.Quantize.MEDIANCUT) for f in frames]
        pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:],
                    duration=durations, loop=0, disposal=1, optimize=False)
    else:
        frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:],
                       duration=durations, loop=0, default_image=False)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
