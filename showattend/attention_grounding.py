"""Does attention land on the thing a word names? Scored on real photos with Flickr30k Entities.

For each generated word that names a boxed phrase of the photo's reference captions (the rule is
in :func:`photo_targets`), the word's attention map (h, w) is compared with the cells' coverage by
the named thing's boxes (:func:`coverage`), in the model-input geometry:

* attention correctness (Liu et al., AAAI 2017): the attention mass on the boxes, Σ α_cell ·
  coverage_cell, with the map constant over each cell. A uniform map scores the boxes' share of
  the image (the *uniform* baseline); a fixed Gaussian blob at the image centre (σ = 1 cell) is
  the *centre* baseline, which photographers' framing makes hard to beat;
* pointing: the map's peak cell touches the boxes (coverage > 0);
* attention entropy (nats) of those maps.

Boxes are given in the original photo's pixels, the frame of the XML ``<size>``; they are moved
into the model input by :meth:`Preprocessor.map_box`, the same geometry the pixels went through.
When the image file on disk is a resized copy (Flickr8k's 224×224 copies), that is still the right
frame as long as the copy is a plain stretch of the whole photo: stretching twice is one stretch.
A copy that was cropped would need its own boxes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from showattend.data.coco import ImageRecord
from showattend.data.entities import (NOT_VISUAL, Box, PhotoEntities, flickr_id, pixel_box,
                                      read_entities)
from showattend.data.images import Preprocessor
from showattend.vocab import tokenize

FloatBox = tuple[float, float, float, float]  # x0, y0, x1, y1, continuous pixel coordinates

_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
    "teeth": "tooth", "geese": "goose", "mice": "mouse", "oxen": "ox", "buses": "bus",
    "lenses": "lens", "wolves": "wolf", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
    "halves": "half", "calves": "calf", "scarves": "scarf", "hooves": "hoof", "wives": "wife",
    "lives": "life", "loaves": "loaf", "thieves": "thief", "tomatoes": "tomato",
    "potatoes": "potato", "heroes": "hero", "mustaches": "mustache", "moustaches": "moustache",
    "avalanches": "avalanche",
}
# Singular nouns in -ie, whose plural must lose only the -s (not -ies → -y).
_IE_NOUNS = frozenset({
    "movie", "cookie", "hoodie", "beanie", "goalie", "brownie", "zombie", "hippie", "rookie",
    "selfie", "smoothie", "collie", "yorkie", "aussie", "pixie", "magpie", "birdie", "genie",
    "calorie", "prairie", "veggie", "auntie", "sweetie", "newbie", "necktie", "bowtie",
})
# Plurals of nouns in -i / -u, which the "-is / -us are singular" rule would keep.
_PLURAL_IS_US = frozenset({
    "skis", "bikinis", "saris", "taxis", "kiwis", "safaris", "martinis", "yogis", "tutus",
    "menus", "emus", "gurus", "haikus",
})
# Words left alone: plural-only nouns ("shorts" is not a "short"; "glasses" are not a "glass")
# and singulars that end like plurals.
_KEEP = frozenset({
    "jeans", "pants", "shorts", "trousers", "clothes", "glasses", "sunglasses", "goggles",
    "overalls", "tights", "leggings", "pajamas", "pyjamas", "scissors", "binoculars", "series",
    "species", "news", "dreadlocks", "suds", "abdomen", "specimen", "omen", "stamen",
})


def fold_plural(word: str) -> str:
    """Lower-case singular of an English noun: dogs → dog, boxes → box, men → man, people →
    person, puppies → puppy, t-shirts → t-shirt; singulars are returned unchanged, so folding both
    sides of a comparison matches singular with plural. Rules, then a short exception list."""
    w = word.lower()
    if "-" in w:  # the last part carries the number: t-shirts, 3-year-olds
        head, _, last = w.rpartition("-")
        return f"{head}-{fold_plural(last)}" if last else w
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _KEEP or not w.isalpha():
        return w
    if w.endswith("men"):  # firemen, policemen (men, women are in the table)
        return w[:-3] + "man"
    if w.endswith("children"):
        return w[:-8] + "child"
    if w in _PLURAL_IS_US:
        return w[:-1]
    if len(w) <= 3 or not w.endswith("s") or w.endswith(("ss", "us", "is")):
        return w  # bus, grass, dress, tennis, cactus: not plurals
    if w[:-1] in _IE_NOUNS:
        return w[:-1]
    if w.endswith("ies") and len(w) > 4:  # puppies → puppy; but ties → tie (below)
        return w[:-3] + "y"
    if w.endswith(("sses", "xes", "ches", "shes", "zzes")):  # glasses keep their -ss
        return w[:-2]
    return w[:-1]  # dogs, horses, shoes, toys, gloves


@dataclass(frozen=True)
class Target:
    """What a (folded) noun names in one photo: every boxed chain whose phrase ends with it."""

    noun: str
    chains: tuple[str, ...]
    types: tuple[str, ...]
    boxes: tuple[Box, ...]  # original pixels, 1-based inclusive (as in PhotoEntities)


def photo_targets(photo: PhotoEntities, ignore: Collection[str] = ()) -> dict[str, Target]:
    """The matching rule: folded noun → :class:`Target`.

    A phrase of any reference caption counts when its chain is visual (not 0) and has at least one
    box; its noun is its last word (the vocabulary's tokenisation, then :func:`fold_plural`).
    The target of a noun is the union of the boxes of every chain with a phrase ending in it;
    its types are those phrases' types. Nouns in ``ignore`` (singular or plural) are left out.
    """
    ignore = frozenset(fold_plural(w) for w in ignore)
    chains: dict[str, dict[str, None]] = {}
    types: dict[str, dict[str, None]] = {}
    for sentence in photo.sentences:
        for phrase in sentence.phrases:
            if phrase.chain_id == NOT_VISUAL or not photo.boxes.get(phrase.chain_id):
                continue
            tokens = tokenize(phrase.text)
            noun = fold_plural(tokens[-1]) if tokens else ""
            if not noun or noun in ignore:
                continue
            chains.setdefault(noun, {})[phrase.chain_id] = None
            types.setdefault(noun, {}).update(dict.fromkeys(phrase.types))
    return {noun: Target(noun, tuple(c), tuple(types[noun]),
                         tuple(dict.fromkeys(b for chain in c for b in photo.boxes[chain])))
            for noun, c in chains.items()}


def input_boxes(boxes: Sequence[Box], photo: PhotoEntities, preprocessor: Preprocessor,
                image_size: tuple[int, int] | None = None) -> tuple[FloatBox, ...]:
    """A photo's 1-based boxes in model-input pixels; boxes cropped away entirely are dropped.

    ``image_size`` (width, height): the size of the image file the model read, when it is a
    resized copy of the annotated photo (Flickr8k's 224² copies are a plain stretch of the whole
    photo). The boxes are stretched onto that file first, and the model's geometry (stretch or
    crop) is applied to the file's size — what the model saw. None: the file is the photo.
    """
    size = (photo.width, photo.height)
    sx = sy = 1.0
    if image_size is not None and tuple(image_size) != size:
        sx, sy = image_size[0] / photo.width, image_size[1] / photo.height
        size = (int(image_size[0]), int(image_size[1]))
    mapped = []
    for b in boxes:
        x0, y0, x1, y1 = pixel_box(b)
        m = preprocessor.map_box((x0 * sx, y0 * sy, x1 * sx, y1 * sy), size)
        if m is not None:
            mapped.append(m)
    return tuple(mapped)


def coverage(boxes: Sequence[FloatBox], grid: tuple[int, int],
             size: tuple[int, int]) -> np.ndarray:
    """Fraction of each cell of an (h, w) grid over an image of ``size`` (H, W) that lies inside
    the union of ``boxes`` (continuous x0, y0, x1, y1). Exact: the plane is cut at every cell edge
    and box edge, so each piece is wholly inside or outside the union and wholly in one cell."""
    (h, w), (H, W) = grid, size
    out = np.zeros((h, w))  # (h, w)
    if len(boxes) == 0:
        return out
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4)
    b[:, 0::2] = b[:, 0::2].clip(0, W)
    b[:, 1::2] = b[:, 1::2].clip(0, H)
    cell_x, cell_y = np.linspace(0, W, w + 1), np.linspace(0, H, h + 1)
    xs = np.unique(np.concatenate([cell_x, b[:, 0::2].ravel()]))  # (nx + 1,) piece edges
    ys = np.unique(np.concatenate([cell_y, b[:, 1::2].ravel()]))  # (ny + 1,)
    mx, my = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # (nx,), (ny,) piece centres
    inside = ((b[:, None, None, 0] <= mx) & (mx < b[:, None, None, 2])
              & (b[:, None, None, 1] <= my[:, None]) & (my[:, None] < b[:, None, None, 3]))
    area = np.diff(ys)[:, None] * np.diff(xs) * inside.any(axis=0)  # (ny, nx) union, once
    col = (np.searchsorted(cell_x, mx, side="right") - 1).clip(0, w - 1)  # (nx,)
    row = (np.searchsorted(cell_y, my, side="right") - 1).clip(0, h - 1)  # (ny,)
    np.add.at(out, (row[:, None], col[None, :]), area)
    return (out / ((H / h) * (W / w))).clip(0.0, 1.0)  # (h, w)


def centre_blob(grid: tuple[int, int], sigma: float = 1.0) -> np.ndarray:
    """A Gaussian (h, w) map centred on the grid, σ in cells, summing to 1 (the centre baseline).
    On an even grid its peak is a tie among the middle cells; argmax takes the first."""
    h, w = grid
    dy = np.arange(h) - (h - 1) / 2  # (h,)
    dx = np.arange(w) - (w - 1) / 2  # (w,)
    blob = np.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2 * sigma**2))  # (h, w)
    return blob / blob.sum()


def centre_hits(boxes: Sequence[FloatBox], grid: tuple[int, int],
                size: tuple[int, int]) -> np.ndarray:
    """Bool (h, w): the cells whose centre point lies inside one of ``boxes`` (the pointing
    game's test, with the map's peak taken at its cell's centre)."""
    (h, w), (H, W) = grid, size
    cy = (np.arange(h) + 0.5) * (H / h)  # (h,)
    cx = (np.arange(w) + 0.5) * (W / w)  # (w,)
    out = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        out |= ((y0 <= cy) & (cy < y1))[:, None] & ((x0 <= cx) & (cx < x1))[None, :]
    return out


def score_map(alpha: np.ndarray, cover: np.ndarray, hits: np.ndarray) -> tuple[float, bool, float]:
    """(correctness, pointing, entropy in nats) of one map (h, w) against a target's coverage
    (h, w) and its :func:`centre_hits` (h, w).

    The map is renormalised to sum 1, so correctness is the share of attention on the target;
    pointing: the peak cell's centre lies on the target.
    """
    total = float(alpha.sum())
    if not np.isfinite(total) or total <= 0 or float(alpha.min()) < 0:
        raise ValueError("attention map must be finite, non-negative and not all zero")
    p = alpha / total  # (h, w)
    peak = np.unravel_index(int(np.argmax(p)), p.shape)
    nonzero = p[p > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    return float((p * cover).sum()), bool(hits[peak]), entropy


@dataclass(frozen=True)
class WordScore:
    """One generated word that names a boxed thing of its photo, and how its attention did."""

    image: int | str  # the caller's image id, else the position in the inputs
    index: int  # position of the word in the generated caption (= its attention map)
    word: str
    noun: str  # the folded word, the key of the photo's Target
    types: tuple[str, ...]
    chains: tuple[str, ...]
    boxes: tuple[FloatBox, ...]  # the target in model-input pixels; () if cropped away
    uniform: float  # the boxes' share of the image: what a uniform map scores
    correctness: float
    pointing: bool
    entropy: float  # nats
    centre_correctness: float
    centre_pointing: bool


def _image_scores(image: int | str, words: Sequence[str], alphas: np.ndarray,
                  photo: PhotoEntities, preprocessor: Preprocessor,
                  ignore: Collection[str], image_size: tuple[int, int] | None = None
                  ) -> list[WordScore]:
    grid = (alphas.shape[1], alphas.shape[2])
    targets = photo_targets(photo, ignore)
    blob = centre_blob(grid)  # (h, w)
    cache: dict[str, tuple] = {}  # noun → (boxes, coverage, centre hits, centre-blob scores)
    out = []
    for t, word in enumerate(words):
        target = targets.get(fold_plural(word))
        if target is None:
            continue
        if target.noun not in cache:  # a noun's boxes, coverage and centre score, once per photo
            boxes = input_boxes(target.boxes, photo, preprocessor, image_size)
            cover = coverage(boxes, grid, preprocessor.size)  # (h, w)
            hits = centre_hits(boxes, grid, preprocessor.size)  # (h, w)
            cache[target.noun] = (boxes, cover, hits, score_map(blob, cover, hits))
        boxes, cover, hits, (centre, centre_points, _) = cache[target.noun]
        correctness, pointing, entropy = score_map(alphas[t], cover, hits)
        out.append(WordScore(image, t, word, target.noun, target.types, target.chains, boxes,
                             float(cover.mean()), correctness, pointing, entropy, centre,
                             centre_points))
    return out


def word_scores(
    words_list: Sequence[Sequence[str]],
    alphas_list: Sequence[np.ndarray],
    photos: Sequence[PhotoEntities | None],
    preprocessor: Preprocessor,
    *,
    image_ids: Sequence[int | str] | None = None,
    ignore: Collection[str] = (),
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
) -> list[WordScore]:
    """Per-word records for the report and overlays: one per generated word that names a target.

    Per image: the generated ``words`` (no special tokens), their attention maps (T, h, w) with
    T = len(words), the photo's :class:`PhotoEntities` (``None``: no annotations, skipped), and
    the ``preprocessor`` that made the model input (its geometry moves the boxes). Matching is
    :func:`photo_targets`' rule; ``ignore`` lists nouns never to score. ``image_sizes``: per
    image, the (width, height) of the file the model read (see :func:`input_boxes`).
    """
    if not len(words_list) == len(alphas_list) == len(photos):
        raise ValueError(f"word_scores: {len(words_list)} captions, {len(alphas_list)} attention "
                         f"sequences and {len(photos)} photos")
    if image_ids is not None and len(image_ids) != len(photos):
        raise ValueError(f"word_scores: {len(image_ids)} image ids for {len(photos)} photos")
    out: list[WordScore] = []
    for n, (words, alphas, photo) in enumerate(zip(words_list, alphas_list, photos)):
        if photo is None:
            continue
        alphas = np.asarray(alphas, dtype=np.float64)  # (T, h, w)
        if alphas.ndim != 3 or alphas.shape[0] != len(words):
            raise ValueError(f"word_scores: image {n}: attention shape {alphas.shape} does not "
                             f"match {len(words)} words (expected (T, h, w))")
        image = image_ids[n] if image_ids is not None else n
        size = image_sizes[n] if image_sizes is not None else None
        out += _image_scores(image, words, alphas, photo, preprocessor, ignore, size)
    return out


def _means(scores: Sequence[WordScore], suffix: str, full: bool) -> dict[str, float | int]:
    """Mean scores of a group; keys are ``metric + suffix`` ("correctness/type/people")."""
    n = len(scores)

    def mean(values: list[float] | list[bool]) -> float:
        return float(np.mean(values)) if n else 0.0

    correctness = mean([s.correctness for s in scores])
    uniform = mean([s.uniform for s in scores])
    out: dict[str, float | int] = {
        "grounded_words": n,
        "correctness": correctness,
        "correctness_uniform": uniform,
        "correctness_ratio": correctness / uniform if uniform > 0 else 0.0,
        "pointing": mean([s.pointing for s in scores]),
    }
    if full:
        out.update({
            "correctness_centre": mean([s.centre_correctness for s in scores]),
            "pointing_centre": mean([s.centre_pointing for s in scores]),
            "grounded_entropy": mean([s.entropy for s in scores]),
        })
    return {key + suffix: value for key, value in out.items()}


def summarize(scores: Sequence[WordScore], top_nouns: int = 10) -> dict[str, float | int]:
    """Flat metrics (for metrics.json) from :func:`word_scores`' records.

    Overall: ``grounded_words``, ``correctness`` (mean), ``correctness_uniform`` (mean boxes'
    share), ``correctness_ratio`` (their ratio), ``correctness_centre``, ``pointing``,
    ``pointing_centre``, ``grounded_entropy`` (nats, of the scored words), and ``cropped_words`` (targets the crop
    geometry removed, not scored). Per phrase type (a word counts in each of its types) and per
    noun for the ``top_nouns`` most frequent: ``grounded_words``, ``correctness``,
    ``correctness_uniform``, ``correctness_ratio``, ``pointing``, keyed ``/type/<type>`` and
    ``/noun/<noun>`` ("pointing/type/people", "correctness/noun/dog"). Empty groups score 0.0.
    """
    kept = [s for s in scores if s.boxes]
    out = _means(kept, "", full=True)
    out["cropped_words"] = len(scores) - len(kept)
    by_type: dict[str, list[WordScore]] = {}
    for s in kept:
        for kind in s.types:
            by_type.setdefault(kind, []).append(s)
    for kind in sorted(by_type):
        out.update(_means(by_type[kind], f"/type/{kind}", full=False))
    counts = Counter(s.noun for s in kept)
    for noun, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_nouns]:
        out.update(_means([s for s in kept if s.noun == noun], f"/noun/{noun}", full=False))
    return out


def attention_grounding(
    words_list: Sequence[Sequence[str]],
    alphas_list: Sequence[np.ndarray],
    photos: Sequence[PhotoEntities | None],
    preprocessor: Preprocessor,
    *,
    top_nouns: int = 10,
    ignore: Collection[str] = (),
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
) -> dict[str, float | int]:
    """Photo attention grounding in one call: ``summarize(word_scores(...))``; see both."""
    scores = word_scores(words_list, alphas_list, photos, preprocessor, ignore=ignore,
                         image_sizes=image_sizes)
    return summarize(scores, top_nouns)


def photos_for_records(path: str | os.PathLike, records: Sequence[ImageRecord]
                       ) -> list[PhotoEntities | None]:
    """The annotations of each record's photo (matched by the Flickr id in its file name), read
    once from ``path`` (annotations.zip or its folder); None where a photo has none (also for a
    file name without a Flickr id)."""
    ids = [photo_id(r.path) for r in records]
    found = read_entities(path, ids=sorted({i for i in ids if i is not None}))
    return [found.get(i) if i is not None else None for i in ids]


def photo_id(path: str | os.PathLike) -> str | None:
    """The Flickr id an image file's name starts with (``1000268201_693b08cb0e.jpg``), else None."""
    try:
        return flickr_id(Path(path).name)
    except ValueError:
        return None


def file_sizes(records: Sequence[ImageRecord]) -> list[tuple[int, int] | None]:
    """(width, height) of each record's image file (header only); None where it cannot be read."""
    return [file_size(r.path) for r in records]


def file_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image file (header only); None when it cannot be read."""
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError):
        return None
