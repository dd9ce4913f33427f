"""Reader for Flickr30k Entities (Plummer et al., ICCV 2015): phrases, coreference chains, boxes.

The official release (``annotations.zip``, or that zip extracted) holds, per Flickr photo id:

* ``Annotations/<id>.xml`` — PASCAL-VOC-like: ``<size>`` (the original photo's width / height),
  then ``<object>`` elements, each with one or more ``<name>`` (chain ids) and either a
  ``<bndbox>`` with 1-based inclusive pixel corners xmin..xmax, ymin..ymax, or the flags
  ``<nobndbox>`` / ``<scene>`` (0 or 1);
* ``Sentences/<id>.txt`` — the photo's captions, one a line, phrases marked
  ``[/EN#<chain>/<type>[/<type>...] the words]``; chain 0 means "not visual".

:func:`read_entities` reads a zip (members with or without one leading folder) or a folder. As the
other readers do, damage to the whole input (no such path, neither a zip nor a folder with those
two subfolders) raises :class:`EntitiesError`; damage to one photo is reported and that photo left
out whole: a missing file in one summary note, a malformed file in a note naming file and line.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

logger = logging.getLogger(__name__)

ENTITY_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene",
                "other", "notvisual")
NOT_VISUAL = "0"  # the chain id of phrases that name nothing in the photo
MAX_FILE_BYTES = 10 * 2**20  # the real files are < 11 kB; anything this big is not annotation
_MAX_NOTES = 10  # malformed files named one by one, then one line for the rest
_EXAMPLES = 3

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax: 1-based inclusive pixel corners

_MARKER = re.compile(r"\[/EN#(\d+)((?:/[A-Za-z]+)+)")
_MEMBER = re.compile(r"(?P<prefix>(?:[^/]+/)?)(?:Annotations/(?P<xml>[^/]+)\.xml|"
                     r"Sentences/(?P<txt>[^/]+)\.txt)")


class EntitiesError(ValueError):
    """The annotation source as a whole cannot be read (missing, or not the Entities layout)."""


class _Malformed(ValueError):
    """One photo's file is unusable; the message names the file (and line)."""


@dataclass(frozen=True)
class Phrase:
    """A marked phrase: its words, where it starts in the caption, its chain and types."""

    text: str
    words: tuple[str, ...]
    first_word_index: int  # index of words[0] in the caption's words
    chain_id: str  # "0" = not visual
    types: tuple[str, ...]


@dataclass(frozen=True)
class Sentence:
    """One caption without its markup (whitespace tokens, as in the file) and its phrases."""

    text: str
    words: tuple[str, ...]
    phrases: tuple[Phrase, ...]


@dataclass(frozen=True)
class PhotoEntities:
    """Everything the release says about one photo; boxes are in the original photo's pixels."""

    photo_id: str
    width: int
    height: int
    sentences: tuple[Sentence, ...]
    boxes: dict[str, tuple[Box, ...]] = field(default_factory=dict)  # chain id → its boxes
    nobox: tuple[str, ...] = ()  # chains marked <nobndbox>1
    scene: tuple[str, ...] = ()  # chains marked <scene>1


def flickr_id(name: str | os.PathLike) -> str:
    """The Flickr photo id of a file name: ``1000268201_693b08cb0e.jpg`` or ``1000268201.jpg`` →
    ``"1000268201"`` (ids pass through unchanged); ``ValueError`` when there is none."""
    stem = Path(name).name.split(".")[0].split("_")[0]
    if not re.fullmatch(r"[0-9]+", stem):
        raise ValueError(f"not a Flickr photo name or id: {str(name)!r}")
    return stem


def pixel_box(box: Box) -> tuple[float, float, float, float]:
    """1-based inclusive corners → continuous (x0, y0, x1, y1): pixel i spans [i - 1, i)."""
    xmin, ymin, xmax, ymax = box
    return (xmin - 1.0, ymin - 1.0, float(xmax), float(ymax))


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _Malformed(f"{name}: line {line}: not UTF-8 text") from None


def parse_sentences(data: bytes, name: str = "<sentences>") -> tuple[Sentence, ...]:
    """The captions of a ``Sentences/<id>.txt`` file (blank lines skipped).

    Raises ``ValueError`` naming ``name`` and the line for bad markup.
    """
    sentences = []
    for n, line in enumerate(_decode(data, name).split("\n"), 1):
        if line.strip():
            sentences.append(_parse_line(line, f"{name}: line {n}"))
    if not sentences:
        raise _Malformed(f"{name}: no captions")
    return tuple(sentences)


def _parse_line(line: str, where: str) -> Sentence:
    """One caption; the marker grammar is the official parser's, with every bracket checked."""
    words: list[str] = []
    phrases: list[Phrase] = []
    open_phrase: tuple[str, tuple[str, ...], int] | None = None  # chain, types, first word
    for token in line.split():
        if token.startswith("["):
            marker = _MARKER.fullmatch(token)
            if open_phrase is not None:
                raise _Malformed(f"{where}: {token!r} opens a phrase inside another")
            if marker is None:
                raise _Malformed(f"{where}: bad phrase marker {token[:40]!r} (expected "
                                 f"[/EN#<chain>/<type>)")
            chain = str(int(marker[1]))  # "018" and "18" are the same chain
            open_phrase = (chain, tuple(marker[2][1:].split("/")), len(words))
            continue
        closes = token.endswith("]")
        word = token[:-1] if closes else token
        if "[" in word or "]" in word:
            raise _Malformed(f"{where}: stray bracket in {token[:40]!r}")
        if closes and open_phrase is None:
            raise _Malformed(f"{where}: ']' in {token[:40]!r} closes no phrase")
        if word:
            words.append(word)
        if closes:
            chain, types, first = open_phrase
            if len(words) == first:
                raise _Malformed(f"{where}: empty phrase of chain {chain}")
            span = tuple(words[first:])
            phrases.append(Phrase(" ".join(span), span, first, chain, types))
            open_phrase = None
    if open_phrase is not None:
        raise _Malformed(f"{where}: phrase of chain {open_phrase[0]} is not closed with ']'")
    return Sentence(" ".join(words), tuple(words), tuple(phrases))


# --------------------------------------------------------------------------------------------
# Annotations (XML)
# --------------------------------------------------------------------------------------------


@dataclass
class _Node:
    tag: str
    line: int
    children: list[_Node] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts).strip()


def _parse_xml(data: bytes, name: str) -> _Node:
    """A minimal element tree with line numbers (ElementTree keeps none); no DTDs or entities."""
    parser = expat.ParserCreate()
    roots: list[_Node] = []
    stack: list[_Node] = []

    def start(tag: str, _attrs: Any) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def refuse(*_args: Any) -> None:  # entity expansion is the classic XML bomb; VOC needs none
        raise _Malformed(f"{name}: line {parser.CurrentLineNumber}: DTD or entity declarations "
                         f"are not allowed")

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = lambda text: stack[-1].parts.append(text) if stack else None
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise _Malformed(f"{name}: line {exc.lineno}: not well-formed XML "
                         f"({expat.ErrorString(exc.code)})") from None
    return roots[0]


def _children(node: _Node, tag: str) -> list[_Node]:
    return [c for c in node.children if c.tag == tag]


def _one(node: _Node, tag: str, name: str) -> _Node:
    found = _children(node, tag)
    if len(found) != 1:
        raise _Malformed(f"{name}: line {node.line}: <{node.tag}> has {len(found)} <{tag}> "
                         f"elements, expected 1")
    return found[0]


def _int(node: _Node, name: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", node.text):
        raise _Malformed(f"{name}: line {node.line}: <{node.tag}> is not an integer: "
                         f"{node.text[:40]!r}")
    return int(node.text)


def _box(node: _Node, width: int, height: int, name: str) -> Box:
    xmin, ymin, xmax, ymax = (_int(_one(node, k, name), name)
                              for k in ("xmin", "ymin", "xmax", "ymax"))
    # Corners are 1-based and inclusive: 1 <= min <= max <= size. A 0 (0-based data) or a corner
    # past the edge means the box is in some other frame, so the photo is not trusted.
    if not (1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height):
        raise _Malformed(f"{name}: line {node.line}: box ({xmin}, {ymin}, {xmax}, {ymax}) is not "
                         f"1 <= min <= max <= size in the {width}x{height} image")
    return (xmin, ymin, xmax, ymax)


def _flag(obj: _Node, tag: str, name: str) -> bool:
    nodes = _children(obj, tag)
    return bool(nodes) and _int(nodes[0], name) > 0


def parse_annotation(data: bytes, photo_id: str, sentences: tuple[Sentence, ...] = (),
                     name: str = "<annotation>") -> PhotoEntities:
    """A ``PhotoEntities`` from an ``Annotations/<id>.xml`` file's bytes and the parsed captions.

    Raises ``ValueError`` naming ``name`` and the line for anything malformed.
    """
    root = _parse_xml(data, name)
    if root.tag != "annotation":
        raise _Malformed(f"{name}: line {root.line}: root element is <{root.tag}>, expected "
                         f"<annotation>")
    size = _one(root, "size", name)
    width, height = (_int(_one(size, k, name), name) for k in ("width", "height"))
    if width < 1 or height < 1:
        raise _Malformed(f"{name}: line {size.line}: image size {width}x{height} is not positive")
    boxes: dict[str, list[Box]] = {}
    nobox: dict[str, None] = {}  # dicts as ordered sets: file order, no repeats
    scene: dict[str, None] = {}
    for obj in _children(root, "object"):
        names = _children(obj, "name")
        if not names:
            raise _Malformed(f"{name}: line {obj.line}: <object> without <name>")
        for node in names:
            if not node.text.isdigit():
                raise _Malformed(f"{name}: line {node.line}: chain id {node.text[:40]!r} is not "
                                 f"a number")
        chains = [str(int(node.text)) for node in names]
        bndboxes = _children(obj, "bndbox")
        if len(bndboxes) > 1:
            raise _Malformed(f"{name}: line {obj.line}: <object> with {len(bndboxes)} <bndbox>")
        box = _box(bndboxes[0], width, height, name) if bndboxes else None
        no_box, is_scene = _flag(obj, "nobndbox", name), _flag(obj, "scene", name)
        for chain in chains:
            if box is not None:
                boxes.setdefault(chain, []).append(box)
            if no_box:
                nobox[chain] = None
            if is_scene:
                scene[chain] = None
    return PhotoEntities(photo_id, width, height, sentences,
                         {chain: tuple(b) for chain, b in boxes.items()}, tuple(nobox),
                         tuple(scene))


# --------------------------------------------------------------------------------------------
# Sources: a zip or a folder
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Where each photo's two files are: ids → zip member names or file paths."""

    label: str
    xml: dict[str, str]
    txt: dict[str, str]
    archive: zipfile.ZipFile | None = None

    def name(self, member: str) -> str:
        return f"{self.label}:{member}" if self.archive is not None else member

    def read(self, member: str) -> bytes:
        """The file's bytes, refusing more than MAX_FILE_BYTES whatever the header claims."""
        try:
            if self.archive is not None:
                with self.archive.open(member) as f:
                    data = f.read(MAX_FILE_BYTES + 1)
            else:
                with open(member, "rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise _Malformed(f"{self.name(member)}: cannot read: {exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise _Malformed(f"{self.name(member)}: larger than {MAX_FILE_BYTES} bytes")
        return data


def _zip_index(archive: zipfile.ZipFile, label: str) -> _Source:
    """Index the members ``[prefix/]Annotations/<id>.xml`` and ``[prefix/]Sentences/<id>.txt``."""
    found: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for member in archive.namelist():
        match = _MEMBER.fullmatch(member)
        # __MACOSX/ and ._* entries are resource forks that macOS adds to zips, not annotations.
        if match is None or member.startswith("__MACOSX/") or member.rsplit("/", 1)[-1][:2] == "._":
            continue
        xml, txt = found.setdefault(match["prefix"], ({}, {}))
        if match["xml"] is not None:
            xml[match["xml"]] = member
        else:
            txt[match["txt"]] = member
    prefixes = sorted(p for p, (xml, _) in found.items() if xml)
    if not prefixes:
        raise EntitiesError(f"{label}: no Annotations/<id>.xml members (expected the Flickr30k "
                            f"Entities annotations.zip)")
    if len(prefixes) > 1:
        raise EntitiesError(f"{label}: Annotations/ in more than one folder: "
                            f"{', '.join(p or '(top level)' for p in prefixes)}")
    xml, txt = found[prefixes[0]]
    return _Source(label, xml, txt, archive)


def _folder_index(root: Path, ids: list[str] | None) -> _Source:
    """Index a folder's Annotations/ and Sentences/ (only the wanted ids when given: no listing)."""
    dirs = {"xml": root / "Annotations", "txt": root / "Sentences"}
    if not all(d.is_dir() for d in dirs.values()):
        raise EntitiesError(f"{root}: expected the folders Annotations/ and Sentences/ (the "
                            f"extracted Flickr30k Entities annotations.zip)")
    index: dict[str, dict[str, str]] = {}
    for kind, folder in dirs.items():
        suffix = "." + kind
        if ids is None:
            with os.scandir(folder) as entries:
                files = {Path(e.name).stem: e.path for e in entries
                         if e.name.endswith(suffix) and not e.name.startswith("._")}
        else:
            files = {i: str(folder / (i + suffix)) for i in ids
                     if (folder / (i + suffix)).is_file()}
        index[kind] = files
    return _Source(str(root), index["xml"], index["txt"])


@contextmanager
def _open_source(path: Path, ids: list[str] | None) -> Iterator[_Source]:
    if path.is_dir():
        yield _folder_index(path, ids)
        return
    if not path.exists():
        raise EntitiesError(f"{path}: no such file or folder (expected the Flickr30k Entities "
                            f"annotations.zip or its extracted folder)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EntitiesError(f"{path}: not a zip file nor a folder ({exc})") from None
    with archive:
        yield _zip_index(archive, str(path))


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


def _read_photo(source: _Source, photo_id: str) -> PhotoEntities:
    """Both files of one photo, or _Malformed: nothing is kept from a photo with a bad file."""
    txt, xml = source.txt[photo_id], source.xml[photo_id]
    sentences = parse_sentences(source.read(txt), source.name(txt))
    return parse_annotation(source.read(xml), photo_id, sentences, source.name(xml))


def _wanted(source: _Source, ids: list[str] | None) -> list[str]:
    if ids is None:
        # Numeric order, so the result does not depend on how the zip or folder was written.
        every = set(source.xml) | set(source.txt)
        return sorted(every, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))
    return list(dict.fromkeys(ids))


def _notes(source: _Source, missing: list[str], malformed: list[str]) -> list[str]:
    notes = []
    if missing:
        first = missing[0]
        lacks = [f"{folder}/{first}.{ext}" for folder, ext, have in
                 (("Annotations", "xml", source.xml), ("Sentences", "txt", source.txt))
                 if first not in have]
        notes.append(f"{source.label}: {len(missing)} photos lack their annotation or sentences "
                     f"file and are left out (first: {first}, no {' or '.join(lacks)})")
    notes += [f"{msg}; photo left out" for msg in malformed[:_MAX_NOTES]]
    if len(malformed) > _MAX_NOTES:
        notes.append(f"{source.label}: {len(malformed) - _MAX_NOTES} more malformed files; "
                     f"those photos are left out")
    return notes


def read_entities(
    path: str | os.PathLike,
    ids: Iterable[str | os.PathLike] | None = None,
    notes: list[str] | None = None,
) -> dict[str, PhotoEntities]:
    """Read Flickr30k Entities: ``{flickr id: PhotoEntities}``.

    ``path`` is the release's zip (members ``Annotations/<id>.xml`` and ``Sentences/<id>.txt``,
    at the top or under one folder) or the extracted folder holding those two folders. ``ids``
    (Flickr ids or Flickr8k/30k file names such as ``1000268201_693b08cb0e.jpg``) reads only those
    photos, in that order; default all, in id order. A photo whose XML or sentences file is
    missing, or is malformed, is left out whole and reported: appended to ``notes`` when given,
    else logged as warnings (missing ones in one summary; malformed ones by file and line, the
    first ten). :class:`EntitiesError` when the source is unusable, or no wanted photo is left.
    """
    path = Path(path)
    wanted_ids = None if ids is None else [flickr_id(i) for i in ids]
    out: dict[str, PhotoEntities] = {}
    missing: list[str] = []
    malformed: list[str] = []
    with _open_source(path, wanted_ids) as source:
        wanted = _wanted(source, wanted_ids)
        for photo_id in wanted:
            if photo_id not in source.xml or photo_id not in source.txt:
                missing.append(photo_id)
                continue
            try:
                out[photo_id] = _read_photo(source, photo_id)
            except _Malformed as exc:
                malformed.append(str(exc))
        found = _notes(source, missing, malformed)
    if not out and not wanted and ids is None:
        raise EntitiesError(f"{path}: no photos: Annotations/ and Sentences/ hold no files")
    if not out and wanted:  # an explicit empty `ids` alone may read nothing
        raise EntitiesError(f"{path}: none of the {len(wanted)} wanted photos could be read: "
                            f"{found[0]}")
    if notes is not None:
        notes.extend(found)
    else:
        for note in found:
            logger.warning("%s", note)
    return out
