"""Readers for the Flickr8k / Flickr30k text files as their users download them.

* the token file (``Flickr8k.token.txt``, ``results_20130124.token``): one caption a line,
  ``NAME.jpg#K<TAB>caption``, five captions per image;
* the split lists (``Flickr_8k.trainImages.txt``, ``...devImages.txt``, ``...testImages.txt``):
  one file name a line (the official train list has CRLF line ends).

They give the same :class:`ImageRecord` lists as the COCO / Karpathy readers in ``coco.py``.
Structural damage (binary data, a line without a tab, an empty file, a name in two split lists)
raises :class:`DataFormatError` naming the file and the line. Entries that are wrong but harmless
— the official token file's ``2258277193_586949ec62.jpg.1``, which names no image file, and
captioned images that no split list mentions — are left out and *reported* (returned as notes and
logged), never a crash.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from showattend.data.coco import DataFormatError, ImageRecord, read_data_file

logger = logging.getLogger(__name__)

FLICKR_SPLITS = ("train", "val", "test")
# Which split a list file belongs to, from its name: Flickr_8k.devImages.txt → val.
_SPLIT_WORDS = {"train": ("train",), "val": ("dev", "val"), "test": ("test",)}
_NAME_KEY = re.compile(r"^(?P<name>[^#\t]+)#(?P<k>\d+)$")
_EXAMPLES = 3  # notes quote at most this many examples of one problem


@dataclass
class FlickrCaptions:
    """Contents of a token file: captions per image name (in ``#k`` order) and reader notes."""

    captions: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)


def _image_extensions() -> set[str]:
    # Every extension Pillow can open: a name ending otherwise (".jpg.1") names no image file.
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _text_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without their LF / CRLF ends; hostile bytes → DataFormatError."""
    raw = read_data_file(path)
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM left by an editor
        raw = raw[3:]
    lines = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if b"\x00" in line:
            raise DataFormatError(f"{path}: line {n}: binary data (NUL byte), not a text file")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: line {n}: not UTF-8 text (byte {exc.start + 1}); "
                                  f"binary or another encoding") from None
        lines.append(text[:-1] if text.endswith("\r") else text)
    if not any(line.strip() for line in lines):
        raise DataFormatError(f"{path}: empty file")
    return lines


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def read_flickr_tokens(path: str | os.PathLike) -> FlickrCaptions:
    """Read a Flickr token file: ``{name: [caption, ...]}`` with captions in ``#k`` order.

    Blank lines are ignored and captions are whitespace-normalised (empty ones dropped). Names
    that are not image file names are left out and reported in ``notes``.
    """
    path = Path(path)
    extensions = _image_extensions()
    by_name: dict[str, dict[int, str]] = {}
    first_line: dict[tuple[str, int], int] = {}
    bad_names: dict[str, int] = {}  # name → first line
    for n, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataFormatError(f"{path}: line {n}: expected NAME#K<TAB>CAPTION, found no tab")
        key, caption = line.split("\t", 1)
        match = _NAME_KEY.match(key.strip())
        if match is None:
            raise DataFormatError(f"{path}: line {n}: expected NAME#K before the tab (K a "
                                  f"number), got {key.strip()[:60]!r}")
        name, k = match["name"], int(match["k"])
        if Path(name).suffix.lower() not in extensions:
            bad_names.setdefault(name, n)
            continue
        if (name, k) in first_line:
            raise DataFormatError(f"{path}: line {n}: duplicate caption {name}#{k} (first at "
                                  f"line {first_line[name, k]})")
        first_line[name, k] = n
        text = " ".join(caption.split())
        if text:
            by_name.setdefault(name, {})[k] = text
    if not by_name:
        raise DataFormatError(f"{path}: no captions of image files")
    notes = [f"{path}: line {line}: {name!r} does not name an image file; its captions are "
             f"left out" for name, line in bad_names.items()]
    captions = {name: [caps[k] for k in sorted(caps)] for name, caps in by_name.items()}
    return FlickrCaptions(captions, notes)


def read_split_list(path: str | os.PathLike) -> list[str]:
    """Image names of a split list, one a line (LF or CRLF); blank lines and repeats dropped."""
    path = Path(path)
    names: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(_text_lines(path), 1):
        name = line.strip()
        if not name:
            continue
        if len(name.split()) != 1 or "#" in name:
            raise DataFormatError(f"{path}: line {n}: expected one image file name, got "
                                  f"{name[:60]!r}")
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def find_split_lists(directory: str | os.PathLike) -> dict[str, Path]:
    """The train / val / test list files of a Flickr split folder, recognised by name.

    ``*train*.txt`` → train, ``*dev*.txt`` or ``*val*.txt`` → val, ``*test*.txt`` → test (token
    files excluded). A missing or ambiguous split raises :class:`DataFormatError`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataFormatError(f"{directory}: no such folder (expected the Flickr split lists)")
    candidates = sorted(p for p in directory.iterdir() if p.is_file()
                        and p.suffix.lower() == ".txt" and "token" not in p.name.lower())
    out: dict[str, Path] = {}
    for split in FLICKR_SPLITS:
        found = [p for p in candidates
                 if any(word in p.name.lower() for word in _SPLIT_WORDS[split])]
        if not found:
            raise DataFormatError(f"{directory}: no {split} list (a *.txt file whose name "
                                  f"contains {' or '.join(_SPLIT_WORDS[split])})")
        if len(found) > 1:
            raise DataFormatError(f"{directory}: more than one {split} list: "
                                  f"{', '.join(p.name for p in found)}")
        out[split] = found[0]
    return out


def _image_ids(names: list[str]) -> dict[str, int]:
    """Flickr photo ids (the leading number of ``1000268201_693b08cb0e.jpg``) when all names have
    distinct ones, so results files carry the real ids; otherwise 0..N-1 over the sorted names."""
    ids: dict[str, int] = {}
    for name in names:
        match = re.match(r"\d+", Path(name).name)
        if match is None:
            break
        ids[name] = int(match.group())
    if len(ids) == len(names) and len(set(ids.values())) == len(names):
        return ids
    return {name: i for i, name in enumerate(sorted(names))}


def read_flickr(
    token_file: str | os.PathLike,
    split_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    notes: list[str] | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read a Flickr8k/30k token file and its split lists into ``{split: records}``.

    Splits are ``train``, ``val`` (the ``dev`` list) and ``test``; records follow each list's
    order and ``path`` is ``image_root / name``. Listed images without captions, captioned images
    in no list and names that are not image files are left out and reported: appended to
    ``notes`` when given, else logged as warnings. A name in two lists raises
    :class:`DataFormatError`.
    """
    tokens = read_flickr_tokens(token_file)
    lists = {split: read_split_list(p) for split, p in find_split_lists(split_dir).items()}
    root = Path(image_root)
    found = list(tokens.notes)
    owner: dict[str, str] = {}
    for split, names in lists.items():
        for name in names:
            if name in owner:
                raise DataFormatError(f"{find_split_lists(split_dir)[split]}: {name} is also in "
                                      f"the {owner[name]} list")
            owner[name] = split
    uncaptioned = [name for name in owner if name not in tokens.captions]
    if uncaptioned:
        found.append(f"{len(uncaptioned)} listed images have no caption in {token_file} and are "
                     f"left out: {_examples(uncaptioned)}")
    unlisted = sorted(name for name in tokens.captions if name not in owner)
    if unlisted:
        found.append(f"{len(unlisted)} captioned images of {token_file} are in no split list and "
                     f"are left out: {_examples(unlisted)}")
    if notes is not None:
        notes.extend(found)
    else:
        for note in found:
            logger.warning("%s", note)
    ids = _image_ids(sorted(owner))
    return {split: [ImageRecord(ids[name], root / name, tuple(tokens.captions[name]), split)
                    for name in names if name in tokens.captions]
            for split, names in lists.items()}
