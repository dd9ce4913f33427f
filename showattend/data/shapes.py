"""The built-in "grounded shapes" dataset: small images of 2–3 coloured shapes with exact captions.

Each caption names every object left to right and the vertical relation between neighbours, e.g.
``a small red circle above a large blue square left of a small green triangle``; the objects
file gives every object's tight pixel box, so attention maps can be scored for grounding.

Everything derives from ``(seed, split, index)`` through :class:`numpy.random.SeedSequence`, so
the same seed gives byte-identical files, splits never share a random stream, and any image can
be regenerated on its own.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from showattend.io import atomic_write_json

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 12, "large": 20}  # side of the shape's box in pixels at image_size 64
SPLITS = ("train", "val", "test")

# Base RGB per colour: pairwise at least ~125 apart (max channel difference), far from the grey
# background, so a jittered, noisy pixel is still unmistakably its colour.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 60),
    "blue": (60, 90, 235),
    "yellow": (235, 220, 60),
    "cyan": (60, 215, 225),
    "magenta": (215, 70, 215),
}

FORMAT_VERSION = 1  # bump when the rendering changes, so old directories are regenerated
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_ID_STRIDE = 1_000_000  # image_id = code * stride + index + 1: unique across splits, stable
_BACKGROUND_LEVELS = (50, 110)
_BACKGROUND_NOISE = 12.0
_OBJECT_NOISE = 6.0
_COLOUR_JITTER = 12
_GAP = 2  # minimum empty pixels between two boxes
_MAX_LAYOUT_TRIES = 1000


def relation(cy_a: float, cy_b: float, image_size: int) -> str:
    """Relation word from object a to its right neighbour b (y grows downwards).

    ``dy = cy_b - cy_a``: ``dy > T`` → "above" (a is higher), ``dy < -T`` → "below", else
    "left of", with ``T = image_size / 8``.
    """
    threshold = image_size / 8
    dy = cy_b - cy_a
    if dy > threshold:
        return "above"
    if dy < -threshold:
        return "below"
    return "left of"


def describe(objects: list[dict[str, Any]], image_size: int) -> str:
    """The caption for ``objects`` (dicts with size, colour, shape, bbox), ordered left to right."""
    ordered = sorted(objects, key=lambda o: o["bbox"][0] + o["bbox"][2] / 2)
    words: list[str] = []
    for i, obj in enumerate(ordered):
        if i:
            prev = ordered[i - 1]["bbox"]
            box = obj["bbox"]
            words.append(relation(prev[1] + prev[3] / 2, box[1] + box[3] / 2, image_size))
        words.append(f"a {obj['size']} {obj['colour']} {obj['shape']}")
    return " ".join(words)


@lru_cache(maxsize=64)
def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of ``shape`` drawn in a ``side``×``side`` box, cropped to its tight extent."""
    centres = np.arange(side) + 0.5  # sample at pixel centres so shapes are symmetric
    yy, xx = np.meshgrid(centres, centres, indexing="ij")  # (side, side)
    c = side / 2
    if shape == "circle":
        mask = (xx - c) ** 2 + (yy - c) ** 2 <= c**2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":  # apex up, base along the bottom edge
        mask = np.abs(xx - c) <= yy / 2
    elif shape == "diamond":
        mask = np.abs(xx - c) + np.abs(yy - c) <= c
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    mask.setflags(write=False)  # shared through the cache
    return mask


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True if boxes [x, y, w, h] a and b are at least _GAP pixels apart along some axis."""
    return (
        a[0] + a[2] + _GAP <= b[0]
        or b[0] + b[2] + _GAP <= a[0]
        or a[1] + a[3] + _GAP <= b[1]
        or b[1] + b[3] + _GAP <= a[1]
    )


def _layout(
    rng: np.random.Generator, masks: list[np.ndarray], image_size: int
) -> list[tuple[int, int, int, int]] | None:
    """Random non-overlapping boxes for ``masks``, or None if this attempt got stuck."""
    min_dx = max(4.0, 4 * image_size / 64)
    # Keep neighbours' vertical offsets away from the relation threshold, so that every
    # relation word is visually clear (a 1-pixel difference would decide it otherwise).
    margin = max(1.0, image_size / 32)
    threshold = image_size / 8
    boxes: list[tuple[int, int, int, int]] = []
    for mask in masks:
        h, w = mask.shape
        for _ in range(50):
            x = int(rng.integers(0, image_size - w + 1))
            y = int(rng.integers(0, image_size - h + 1))
            box = (x, y, w, h)
            cx = x + w / 2
            if all(_separated(box, b) and abs(cx - (b[0] + b[2] / 2)) >= min_dx for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    ordered = sorted(boxes, key=lambda b: b[0] + b[2] / 2)
    for a, b in zip(ordered, ordered[1:]):
        dy = (b[1] + b[3] / 2) - (a[1] + a[3] / 2)
        if abs(abs(dy) - threshold) < margin:
            return None
    return boxes


def render_scene(rng: np.random.Generator, image_size: int = 64) -> tuple[np.ndarray, list[dict]]:
    """Draw one scene: uint8 image (S, S, 3) and its objects ordered left to right.

    Each object is ``{"colour", "shape", "size", "bbox": [x, y, w, h]}`` with the tight box of
    its drawn pixels.
    """
    scale = image_size / 64
    n_objects = int(rng.integers(2, 4))  # 2 or 3
    pairs = rng.choice(len(COLOURS) * len(SHAPES), size=n_objects, replace=False)
    size_names = [("small", "large")[int(k)] for k in rng.integers(0, 2, size=n_objects)]
    specs = [
        (COLOURS[int(p) // len(SHAPES)], SHAPES[int(p) % len(SHAPES)], size_name)
        for p, size_name in zip(pairs, size_names)
    ]
    masks = [_shape_mask(shape, max(3, round(SIZES[size] * scale))) for _, shape, size in specs]

    for _ in range(_MAX_LAYOUT_TRIES):
        boxes = _layout(rng, masks, image_size)
        if boxes is not None:
            break
    else:  # pragma: no cover - needs an image too small for its objects
        raise RuntimeError(f"could not place {n_objects} shapes in a {image_size}px image")

    level = rng.integers(_BACKGROUND_LEVELS[0], _BACKGROUND_LEVELS[1] + 1)
    noise = rng.normal(0.0, _BACKGROUND_NOISE, size=(image_size, image_size, 1))  # grey noise
    canvas = np.repeat(level + noise, 3, axis=2)  # (S, S, 3)
    objects = []
    for (colour, shape, size_name), mask, (x, y, w, h) in zip(specs, masks, boxes):
        rgb = np.asarray(COLOUR_RGB[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        paint = rgb + rng.normal(0.0, _OBJECT_NOISE, size=(h, w, 3))  # (h, w, 3)
        region = canvas[y : y + h, x : x + w]  # view into canvas
        region[mask] = paint[mask]
        objects.append({"colour": colour, "shape": shape, "size": size_name, "bbox": [x, y, w, h]})
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    objects.sort(key=lambda o: o["bbox"][0] + o["bbox"][2] / 2)
    return pixels, objects


def _manifest_matches(out: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files_present = all(
        (out / f"{kind}_{split}.json").is_file()
        for split in SPLITS
        for kind in ("captions", "objects")
    )
    return manifest == params and files_present


def generate_shapes(
    out_dir: str | os.PathLike,
    n_train: int = 6000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write the grounded-shapes dataset to ``out_dir`` and return it as a Path.

    Layout: ``images/{split}/{split}_{index:06d}.png``, ``captions_{split}.json`` (COCO captions
    format, file names relative to ``out_dir``), ``objects_{split}.json`` and, last,
    ``manifest.json`` holding the parameters. If the manifest already matches, nothing is
    rewritten.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for name, value in [*counts.items(), ("seed", seed)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if name in counts and value >= _ID_STRIDE:
            raise ValueError(f"n_{name} must be below {_ID_STRIDE}, got {value}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")

    out = Path(out_dir)
    params = {
        "dataset": "showattend-shapes",
        "version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
    }
    if _manifest_matches(out, params):
        return out
    # Drop an old manifest first: if this run is interrupted, the directory must not look done.
    (out / "manifest.json").unlink(missing_ok=True)

    from showattend.progress import progress_bar  # imported here: only generation needs it

    bar = progress_bar(total=sum(counts.values()), desc="shapes", unit="img", disable=not progress)
    for split in SPLITS:
        code = _SPLIT_CODES[split]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        images, annotations, object_entries = [], [], []
        for index in range(counts[split]):
            rng = np.random.default_rng(np.random.SeedSequence([seed, code, index]))
            pixels, objects = render_scene(rng, image_size)
            file_name = f"images/{split}/{split}_{index:06d}.png"
            # Plain (non-atomic) writes: thousands of fsyncs would dominate the run time, and a
            # crash is caught anyway because the manifest is written only after everything else.
            Image.fromarray(pixels).save(out / file_name, format="PNG")
            image_id = code * _ID_STRIDE + index + 1
            images.append(
                {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
            )
            annotations.append(
                {"id": image_id, "image_id": image_id, "caption": describe(objects, image_size)}
            )
            object_entries.append({"id": image_id, "file_name": file_name, "objects": objects})
            bar.update(1)
        atomic_write_json(
            out / f"captions_{split}.json", {"images": images, "annotations": annotations}, None
        )
        atomic_write_json(out / f"objects_{split}.json", {"images": object_entries}, None)
    bar.close()
    atomic_write_json(out / "manifest.json", params)
    return out
