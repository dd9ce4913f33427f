"""Reference boxes for captions of image files: the human boxes (Flickr30k Entities) of the things
a caption's words name, and how much of each word's attention falls on them.

The glue between files on disk and :mod:`showattend.attention_grounding` (which owns the matching
rule and the scores), for the report (``inspect --entities``) and the overlays
(``caption --overlay-dir --entities``): find each image's annotations by the Flickr id in its
file name, score a :class:`~showattend.api.Caption`'s words, and lay the records out per word.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING


from showattend.attention_grounding import FloatBox, WordScore, file_size, photo_id, word_scores
from showattend.data.entities import EntitiesError, PhotoEntities, read_entities
from showattend.data.images import Preprocessor

if TYPE_CHECKING:
    from showattend.records import CaptionRecord as Caption

__all__ = ["EntitiesSource", "caption_word_scores", "file_size", "per_word", "photos_for_images"]

# annotations.zip or its folder, or annotations already read: {image path or file name: photo}
EntitiesSource = str | os.PathLike | Mapping[str, PhotoEntities]


def photos_for_images(source: EntitiesSource, paths: Iterable[str | os.PathLike]
                      ) -> dict[str, PhotoEntities]:
    """``{str(path): PhotoEntities}`` for the images that have annotations.

    ``source`` is the Flickr30k Entities ``annotations.zip`` or its folder (an image is matched by
    the Flickr id its file name starts with, ``1000268201_693b08cb0e.jpg``; other names have
    none), or a mapping keyed by image path or file name. A source that cannot be read raises
    :class:`~showattend.data.entities.EntitiesError` even when no image has a Flickr id; images
    it does not annotate are simply absent from the result.
    """
    paths = [str(p) for p in paths]
    if isinstance(source, Mapping):
        by_name = {Path(str(k)).name: v for k, v in source.items()}
        found = {p: source.get(p) or by_name.get(Path(p).name) for p in paths}
        return {p: photo for p, photo in found.items() if photo is not None}
    read_entities(source, ids=[])  # checks the source itself; reads no photo
    ids = {p: photo_id(p) for p in paths}
    wanted = sorted({i for i in ids.values() if i is not None})
    if not wanted:
        return {}
    try:
        photos = read_entities(source, ids=wanted)
    except EntitiesError:  # the source is readable (checked above): it has none of these photos
        return {}
    return {p: photos[i] for p, i in ids.items() if i is not None and i in photos}


def caption_word_scores(caption: Caption, photo: PhotoEntities, preprocess: Preprocessor,
                        image_size: tuple[int, int] | None = None) -> list[WordScore]:
    """The words of ``caption`` that name a boxed thing of ``photo``: their reference boxes in the
    pixels of ``caption.view`` (the model input ``preprocess`` made), correctness and pointing.

    ``image_size``: (width, height) of the file the model read, when it is a resized copy of the
    annotated photo (Flickr8k's 224² copies); default: read from ``caption.image`` when that is a
    file, else the photo's own size. A thing the model's crop cut away entirely is not scored
    (as :func:`~showattend.attention_grounding.summarize` leaves it out).
    """
    if image_size is None:
        image_size = file_size(caption.image) if os.path.isfile(caption.image) else None
    scores = word_scores([caption.words], [caption.attention], [photo], preprocess,
                         image_ids=[caption.image], image_sizes=[image_size])
    return [s for s in scores if s.boxes]


def per_word(scores: Sequence[WordScore], n_words: int
             ) -> tuple[list[list[FloatBox] | None], list[float | None]]:
    """Word scores laid out per word of a caption of ``n_words`` words: (reference boxes, or None
    for a word that names no boxed thing; its correctness, or None)."""
    boxes: list[list[FloatBox] | None] = [None] * n_words
    correct: list[float | None] = [None] * n_words
    for s in scores:
        if not 0 <= s.index < n_words:
            raise ValueError(f"word score for word {s.index} of a {n_words}-word caption")
        boxes[s.index] = list(s.boxes)
        correct[s.index] = s.correctness
    return boxes, correct
