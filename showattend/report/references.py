"""Reference captions for a report, keyed by image file name.

Accepts what people already have: COCO ``captions_*.json`` (also the built-in data's files), a
Karpathy split file (``dataset_flickr8k.json``, ...), a Flickr token file (``Flickr8k.token.txt``)
or a plain JSON object ``{"photo.jpg": ["a caption", ...]}``. Images are matched by base name, so
the folder the references were written for does not matter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from showattend.data.coco import DataFormatError, read_coco_captions, read_data_file, read_karpathy

__all__ = ["read_references"]


def read_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """{image base name: [reference caption, ...]} from any of the formats above.

    Raises :class:`DataFormatError` (naming the file) for a file in none of them.
    """
    p = Path(path)
    raw = read_data_file(p)  # one reader of caption-file bytes (missing file → clear error)
    if p.suffix.lower() != ".json" and b"\t" in raw[:4096]:
        from showattend.data.flickr import read_flickr_tokens

        return {Path(name).name: caps for name, caps in read_flickr_tokens(p).captions.items()}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{p}: not a Flickr token file and not JSON ({exc})") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        records = read_coco_captions(p, ".", "test")
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        records = [r for split in read_karpathy(p, ".", ("train", "val", "test"),
                                                restval="train").values() for r in split]
    elif isinstance(data, dict):
        out: dict[str, list[str]] = {}
        for name, caps in data.items():
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DataFormatError(f"{p}: {name!r}: expected a list of caption strings")
            if caps:
                out[Path(name).name] = [" ".join(c.split()) for c in caps]
        return out
    else:
        raise DataFormatError(f"{p}: expected COCO captions, a Karpathy split file or an object "
                              "{image name: [captions]}")
    refs: dict[str, list[str]] = {}
    for r in records:
        if r.captions:
            refs.setdefault(r.path.name, []).extend(r.captions)
    return refs
