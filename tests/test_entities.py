"""Flickr30k Entities reader, box geometry and the photo attention-grounding measure."""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from showattend import attention_grounding as G
from showattend.data import entities as E
from showattend.data.entities import EntitiesError, flickr_id, pixel_box, read_entities
from showattend.data.images import Preprocessor

REAL_ZIP = Path(__file__).parents[2] / "shared/flickr8k/flickr30k_entities_flickr8k.zip"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _xml(width: int, height: int, objects: str) -> str:
    return (f"<annotation>\n<filename>x.jpg</filename>\n<size>\n<width>{width}</width>\n"
            f"<height>{height}</height>\n<depth>3</depth>\n</size>\n{objects}</annotation>\n")


def _obj(*names: str, box: tuple[int, int, int, int] | None = None, nobox: int = 0,
         scene: int = 0) -> str:
    tags = "".join(f"<name>{n}</name>\n" for n in names)
    if box is not None:
        x0, y0, x1, y1 = box
        return (f"<object>\n{tags}<bndbox>\n<xmin>{x0}</xmin>\n<ymin>{y0}</ymin>\n"
                f"<xmax>{x1}</xmax>\n<ymax>{y1}</ymax>\n</bndbox>\n</object>\n")
    return f"<object>\n{tags}<scene>{scene}</scene>\n<nobndbox>{nobox}</nobndbox>\n</object>\n"


# Photo 100: 200 x 100. Chain 1 (dogs) has two boxes, chains 2 and 3 share one box, 4 has none,
# 5 is a scene without a box.
XML_100 = _xml(200, 100, _obj("1", box=(11, 21, 60, 70)) + _obj("2", "3", box=(101, 1, 200, 100))
               + _obj("1", box=(41, 41, 80, 90)) + _obj("4", nobox=1) + _obj("5", scene=1, nobox=1))
TXT_100 = (
    "[/EN#1/animals Two dogs] play with [/EN#2/other/animals a red ball] in [/EN#5/scene the park] .\n"
    "[/EN#0/notvisual Nobody] watches [/EN#1/animals the dog] near [/EN#4/other a tree] .\n"
    "\n"
    "[/EN#3/people A man] holds [/EN#2/other the ball] .\n"
)
XML_200 = _xml(50, 40, _obj("7", box=(1, 1, 50, 40)))
TXT_200 = "[/EN#7/scene A field] .\n"


def _folder(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    for sub in ("Annotations", "Sentences"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _zip(path: Path, files: dict[str, str | bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(prefix + name, text)
    return path


GOOD = {"Annotations/100.xml": XML_100, "Sentences/100.txt": TXT_100,
        "Annotations/200.xml": XML_200, "Sentences/200.txt": TXT_200}


@pytest.fixture(params=["folder", "zip", "zip-prefixed"])
def source(request: pytest.FixtureRequest, tmp_path: Path):
    """Builds a source of the current kind from a {member: text} dict."""
    def make(files: dict[str, str | bytes]) -> Path:
        if request.param == "folder":
            return _folder(tmp_path / "entities", files)
        prefix = "flickr30k_entities/" if request.param == "zip-prefixed" else ""
        return _zip(tmp_path / "annotations.zip", files, prefix)
    return make


# --- reading ---------------------------------------------------------------------------------


def test_parses_phrases_chains_types_boxes_and_flags(source) -> None:
    photos = read_entities(source(GOOD))
    assert list(photos) == ["100", "200"]
    p = photos["100"]
    assert (p.photo_id, p.width, p.height) == ("100", 200, 100)
    assert p.boxes == {"1": ((11, 21, 60, 70), (41, 41, 80, 90)), "2": ((101, 1, 200, 100),),
                       "3": ((101, 1, 200, 100),)}
    assert p.nobox == ("4", "5") and p.scene == ("5",)
    assert len(p.sentences) == 3  # the blank line is no caption
    first = p.sentences[0]
    assert first.text == "Two dogs play with a red ball in the park ."
    assert first.words[first.phrases[1].first_word_index] == "a"
    assert [(ph.text, ph.first_word_index, ph.chain_id, ph.types) for ph in first.phrases] == [
        ("Two dogs", 0, "1", ("animals",)), ("a red ball", 4, "2", ("other", "animals")),
        ("the park", 8, "5", ("scene",))]
    assert p.sentences[1].phrases[0].chain_id == "0"
    assert p.sentences[1].phrases[1].words == ("the", "dog")


def test_subset_by_id_or_flickr8k_name(source) -> None:
    path = source(GOOD)
    photos = read_entities(path, ["200_0a1b2c.jpg", "100"])
    assert list(photos) == ["200", "100"]
    assert list(read_entities(path, ["100"])) == ["100"]


def test_flickr_id() -> None:
    assert flickr_id("1000268201_693b08cb0e.jpg") == "1000268201"
    assert flickr_id("/data/Flicker8k_Dataset/1000268201_693b08cb0e.jpg") == "1000268201"
    assert flickr_id("1000092795.jpg") == flickr_id("1000092795") == "1000092795"
    with pytest.raises(ValueError, match="not a Flickr"):
        flickr_id("COCO_val2014_000000000042.jpg")


def test_missing_files_reported_once_and_skipped(source) -> None:
    files = dict(GOOD, **{"Annotations/300.xml": XML_200, "Sentences/400.txt": TXT_200})
    notes: list[str] = []
    photos = read_entities(source(files), notes=notes)
    assert list(photos) == ["100", "200"]
    assert len(notes) == 1
    assert "2 photos lack" in notes[0] and "first: 300, no Sentences/300.txt" in notes[0]


def test_missing_wanted_ids_are_logged(source, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="showattend.data.entities"):
        photos = read_entities(source(GOOD), ["100", "999"])
    assert list(photos) == ["100"]
    assert "1 photos lack" in caplog.text and "first: 999" in caplog.text


BAD_TXT = [
    ("[/EN#1/people A man] walks .\n[/EN#2/other the dog .\n", 2, "not closed"),
    ("A man] walks .\n", 1, "closes no phrase"),
    ("[/EN#1/people A [/EN#2/other dog] ] .\n", 1, "inside another"),
    ("[/EN1/people A man] .\n", 1, "bad phrase marker"),
    ("ok .\n\n[/EN#1/people ] .\n", 3, "empty phrase"),
    ("[/EN#1/people A m]an] .\n", 1, "stray bracket"),
    (b"fine .\n\xff\xfe bad\n", 2, "not UTF-8"),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD_TXT)
def test_malformed_sentences_named_and_photo_skipped(source, text, line, reason) -> None:
    notes: list[str] = []
    photos = read_entities(source(dict(GOOD, **{"Sentences/100.txt": text})), notes=notes)
    assert list(photos) == ["200"]  # nothing of photo 100 is kept
    assert len(notes) == 1
    assert "Sentences/100.txt" in notes[0] and f"line {line}:" in notes[0] and reason in notes[0]


BAD_XML = [
    (_xml(200, 100, _obj("1", box=(11, 21, "6O", 70))), 13, "not an integer"),
    (_xml(200, 100, _obj("1", box=(60, 21, 11, 70))), 10, "1 <= min <= max"),
    (_xml(200, 100, _obj("1", box=(0, 21, 60, 70))), 10, "1 <= min <= max"),
    (_xml(200, 100, _obj("1", box=(11, 21, 201, 70))), 10, "1 <= min <= max"),
    (_xml(200, 100, "<object>\n<bndbox>\n</object>\n"), 10, "not well-formed"),
    (_xml(200, 100, "<object>\n<scene>1</scene>\n</object>\n"), 8, "without <name>"),
    (_xml(200, 100, _obj("dog", box=(1, 1, 2, 2))), 9, "not a number"),
    ("<annotation>\n<object><name>1</name></object>\n</annotation>\n", 1, "<size>"),
    ('<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY x "xx">]>\n<annotation/>\n', 2, "DTD"),
    ("", 1, "not well-formed"),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD_XML)
def test_malformed_annotations_named_and_photo_skipped(source, text, line, reason) -> None:
    notes: list[str] = []
    photos = read_entities(source(dict(GOOD, **{"Annotations/100.xml": text})), notes=notes)
    assert list(photos) == ["200"]
    assert len(notes) == 1
    assert "Annotations/100.xml" in notes[0] and f"line {line}:" in notes[0] and reason in notes[0]


def test_many_malformed_files_capped(source) -> None:
    files = dict(GOOD)
    files.update({f"Annotations/{i}.xml": "<annotation>" for i in range(1000, 1012)})
    files.update({f"Sentences/{i}.txt": TXT_200 for i in range(1000, 1012)})
    notes: list[str] = []
    assert list(read_entities(source(files), notes=notes)) == ["100", "200"]
    assert len(notes) == 11 and "2 more malformed files" in notes[-1]


def test_oversized_file_refused(source, monkeypatch: pytest.MonkeyPatch) -> None:
    path = source(dict(GOOD, **{"Sentences/100.txt": TXT_100 + " " * 2000}))
    monkeypatch.setattr(E, "MAX_FILE_BYTES", 2000)  # every other file is smaller
    notes: list[str] = []
    assert list(read_entities(path, notes=notes)) == ["200"]
    assert "larger than" in notes[0] and "100.txt" in notes[0]


def test_fatal_problems_raise(tmp_path: Path) -> None:
    with pytest.raises(EntitiesError, match="no such file"):
        read_entities(tmp_path / "nope.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EntitiesError, match="not a zip"):
        read_entities(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EntitiesError, match="Annotations/ and Sentences/"):
        read_entities(tmp_path / "empty")
    with pytest.raises(EntitiesError, match="no Annotations"):
        read_entities(_zip(tmp_path / "other.zip", {"README.txt": "hi"}))
    two = _zip(tmp_path / "two.zip", {"a/Annotations/1.xml": XML_200,
                                      "b/Annotations/1.xml": XML_200})
    with pytest.raises(EntitiesError, match="more than one folder"):
        read_entities(two)
    with pytest.raises(EntitiesError, match="none of the 1 wanted"):
        read_entities(_zip(tmp_path / "good.zip", GOOD), ["555"])
    with pytest.raises(EntitiesError, match="no photos"):
        read_entities(_folder(tmp_path / "bare", {}))
    assert read_entities(tmp_path / "bare", ids=[]) == {}


def test_macos_resource_forks_are_ignored(tmp_path: Path) -> None:
    files = dict(GOOD, **{"__MACOSX/Annotations/._100.xml": b"\x00\x05",
                          "Annotations/._100.xml": b"\x00\x05"})
    assert list(read_entities(_zip(tmp_path / "mac.zip", files))) == ["100", "200"]


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason="shared Flickr30k Entities zip not present")
def test_real_zip() -> None:
    notes: list[str] = []
    photos = read_entities(REAL_ZIP, ["1000268201_693b08cb0e.jpg", "997722733"], notes=notes)
    assert notes == [] and list(photos) == ["1000268201", "997722733"]
    p = photos["1000268201"]
    assert (p.width, p.height) == (375, 500)
    assert p.boxes["18"] == ((8, 152, 108, 340),)
    assert p.nobox == ("21",) and p.scene == ()
    assert len(p.sentences) == 5
    child = p.sentences[0].phrases[0]
    assert (child.text, child.chain_id, child.types) == ("A child", "18", ("people",))


# --- geometry --------------------------------------------------------------------------------


def _landed(pre: Preprocessor, size: tuple[int, int], box: tuple[int, int, int, int]):
    """Where a white 1-based inclusive rectangle on black lands after pre.geometry: the
    extent of the pixels more than half white, as continuous (x0, y0, x1, y1)."""
    img = Image.new("RGB", size)
    x0, y0, x1, y1 = box
    ImageDraw.Draw(img).rectangle((x0 - 1, y0 - 1, x1 - 1, y1 - 1), fill=(255, 255, 255))
    bright = np.asarray(pre.geometry(img))[..., 0] > 127  # (H, W)
    rows, cols = np.nonzero(bright)
    return (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


@pytest.mark.parametrize("resize", ["stretch", "crop"])
@pytest.mark.parametrize(("size", "box"), [
    ((31, 23), (4, 3, 11, 19)), ((23, 31), (9, 12, 20, 31)), ((40, 17), (1, 1, 40, 17)),
    ((40, 17), (30, 2, 38, 9)),
])
def test_map_box_follows_the_resize(resize: str, size, box) -> None:
    # Small photos blown up (x3..x7) so an off-by-one in the original shows as several pixels.
    pre = Preprocessor((96, 128), MEAN, STD, resize)
    mapped = pre.map_box(pixel_box(box), size)
    assert mapped is not None
    assert np.allclose(mapped, _landed(pre, size, box), atol=1.0), (mapped, _landed(pre, size, box))


def test_map_box_crop_clips_and_drops() -> None:
    pre = Preprocessor((64, 64), MEAN, STD, "crop")
    # 128 x 64 photo → 128 x 64 (scale 1), crop columns 32..96.
    assert pre.map_box(pixel_box((1, 1, 20, 64)), (128, 64)) is None  # wholly cropped away
    assert pre.map_box(pixel_box((21, 11, 50, 20)), (128, 64)) == (0.0, 10.0, 18.0, 20.0)
    stretch = Preprocessor((64, 64), MEAN, STD, "stretch")
    assert stretch.map_box(pixel_box((1, 1, 64, 64)), (128, 64)) == (0.0, 0.0, 32.0, 64.0)


# --- coverage, scoring -----------------------------------------------------------------------


def test_coverage_exact_per_cell() -> None:
    # 4 x 4 grid over 40 x 40: cells are 10 px.
    cov = G.coverage([(10.0, 10.0, 20.0, 25.0)], (4, 4), (40, 40))
    expected = np.zeros((4, 4))
    expected[1, 1], expected[2, 1] = 1.0, 0.5
    assert np.allclose(cov, expected)
    assert G.coverage([], (4, 4), (40, 40)).sum() == 0


def test_coverage_counts_overlaps_once() -> None:
    a, b = (0.0, 0.0, 30.0, 20.0), (10.0, 10.0, 40.0, 40.0)
    cov = G.coverage([a, b, a], (4, 4), (40, 40))  # (4, 4)
    union = 30 * 20 + 30 * 30 - 20 * 10
    assert cov.max() <= 1.0
    assert math.isclose(cov.sum() * 100, union)
    assert np.allclose(G.coverage([a, a], (4, 4), (40, 40)), G.coverage([a], (4, 4), (40, 40)))
    # Two boxes overlapping inside one cell: 7 of its 10 columns, not 5 + 5.
    cov = G.coverage([(0.0, 0.0, 5.0, 10.0), (2.0, 0.0, 7.0, 10.0)], (4, 4), (40, 40))
    assert math.isclose(cov[0, 0], 0.7) and cov.sum() == cov[0, 0]


def test_coverage_non_square_grid_and_image() -> None:
    # (H, W) = (30, 60), grid (3, 2): cells 30 wide, 10 high; box covers the right column.
    cov = G.coverage([(30.0, 0.0, 60.0, 30.0)], (3, 2), (30, 60))
    assert np.allclose(cov, [[0, 1], [0, 1], [0, 1]])


def test_score_inside_flat_and_wrong_object() -> None:
    cover = G.coverage([(0.0, 0.0, 20.0, 20.0)], (4, 4), (40, 40))  # top-left 2 x 2 cells
    inside = np.zeros((4, 4))
    inside[0, 0], inside[1, 1] = 2.0, 1.0  # not normalised: the score renormalises
    correctness, pointing, _ = G.score_map(inside, cover, cover > 0.5)
    assert math.isclose(correctness, 1.0) and pointing
    flat = np.full((4, 4), 1 / 16)
    correctness, pointing, entropy = G.score_map(flat, cover, cover > 0.5)
    assert math.isclose(correctness, 0.25) and math.isclose(entropy, math.log(16))
    wrong = np.zeros((4, 4))
    wrong[3, 3] = 0.9
    wrong[2, 3] = 0.1
    assert G.score_map(wrong, cover, cover > 0.5)[:2] == (0.0, False)
    with pytest.raises(ValueError):
        G.score_map(np.zeros((4, 4)), cover, cover > 0.5)


def test_centre_blob() -> None:
    blob = G.centre_blob((7, 7))
    assert math.isclose(blob.sum(), 1.0) and np.unravel_index(blob.argmax(), blob.shape) == (3, 3)
    assert math.isclose(blob[3, 4] / blob[3, 3], math.exp(-0.5))  # sigma = 1 cell


# --- matching ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("plural", "singular"), [
    ("dogs", "dog"), ("boxes", "box"), ("men", "man"), ("women", "woman"), ("people", "person"),
    ("children", "child"), ("puppies", "puppy"), ("horses", "horse"), ("dresses", "dress"),
    ("benches", "bench"), ("shoes", "shoe"), ("leaves", "leaf"), ("firemen", "fireman"),
    ("t-shirts", "t-shirt"), ("collies", "collie"), ("skis", "ski"), ("ties", "tie"),
    ("Dogs", "dog"),
])
def test_fold_plural(plural: str, singular: str) -> None:
    assert G.fold_plural(plural) == G.fold_plural(singular) == singular


@pytest.mark.parametrize("word", ["grass", "bus", "dress", "tennis", "glasses", "shorts", "jeans",
                                  "glass", "short", "cactus", "<unk>", "a"])
def test_fold_plural_leaves_other_words(word: str) -> None:
    assert G.fold_plural(word) == word


def test_photo_targets_rule(tmp_path: Path) -> None:
    # A box named 0 must still not make "nobody" a target: chain 0 is "not visual".
    xml = XML_100.replace("</annotation>", _obj("0", box=(1, 1, 5, 5)) + "</annotation>")
    photo = read_entities(_folder(tmp_path, dict(GOOD, **{"Annotations/100.xml": xml})))["100"]
    targets = G.photo_targets(photo)
    assert set(targets) == {"dog", "ball", "man"}  # park, tree: no box; nobody: chain 0
    assert targets["dog"].chains == ("1",) and len(targets["dog"].boxes) == 2
    # "a red ball" (chain 2) and "the ball" (chain 2): one chain, its box once.
    assert targets["ball"].types == ("other", "animals") and targets["ball"].boxes == (
        (101, 1, 200, 100),)
    assert set(G.photo_targets(photo, ignore={"balls"})) == {"dog", "man"}


def test_union_over_chains_sharing_a_head(tmp_path: Path) -> None:
    # Boxes off the 10-px cell edges, so the exact share differs from the touched cells' share.
    xml = _xml(40, 40, _obj("1", box=(1, 1, 15, 15)) + _obj("2", box=(11, 11, 25, 25)))
    txt = "[/EN#1/animals A dog] and [/EN#2/animals another dog] .\n"
    photo = read_entities(_folder(tmp_path, {"Annotations/1.xml": xml,
                                             "Sentences/1.txt": txt}))["1"]
    pre = Preprocessor((40, 40), MEAN, STD, "stretch")
    [score] = G.word_scores([["dogs"]], [np.full((1, 4, 4), 1 / 16)], [photo], pre)
    assert score.chains == ("1", "2")
    share = (225 + 225 - 25) / 1600  # union: the overlap once
    assert math.isclose(score.uniform, share)
    assert math.isclose(score.correctness, share)  # a flat map scores exactly the area share


def test_word_scores_and_summary(tmp_path: Path) -> None:
    photos = read_entities(_folder(tmp_path, GOOD))
    pre = Preprocessor((50, 100), MEAN, STD, "stretch")  # photo 100 (200 x 100) at half size
    words = ["two", "dogs", "chase", "a", "ball", "<unk>"]
    alphas = np.full((6, 5, 10), 1 / 50)  # (T, h, w): cells are 10 x 10 px
    alphas[1] = 0.0
    alphas[1, 1, 1] = 1.0  # "dogs" looks at (10..20, 10..20): inside the first dog box
    alphas[4] = 0.0
    alphas[4, 0, 0] = 1.0  # "ball" looks at the far left: the ball is on the right half
    scores = G.word_scores([words, ["field"]], [alphas, np.ones((1, 5, 10))],
                           [photos["100"], None], pre, image_ids=["100", "x"])
    assert [(s.image, s.index, s.word, s.noun) for s in scores] == [
        ("100", 1, "dogs", "dog"), ("100", 4, "ball", "ball")]
    dog, ball = scores
    assert dog.boxes == ((5.0, 10.0, 30.0, 35.0), (20.0, 20.0, 40.0, 45.0))
    assert math.isclose(dog.correctness, 1.0) and dog.pointing
    assert (ball.correctness, ball.pointing) == (0.0, False)
    assert math.isclose(ball.uniform, 0.5)
    m = G.summarize(scores)
    assert m["grounded_words"] == 2 and m["pointing"] == 0.5
    assert math.isclose(m["correctness"], 0.5)
    assert math.isclose(m["correctness_uniform"], (dog.uniform + 0.5) / 2)
    assert math.isclose(m["correctness_ratio"], 0.5 / m["correctness_uniform"])
    assert m["grounded_words/type/animals"] == 2 and m["grounded_words/type/other"] == 1
    assert math.isclose(m["correctness/noun/dog"], 1.0) and m["pointing/noun/ball"] == 0.0
    assert m == G.attention_grounding([words, ["field"]], [alphas, np.ones((1, 5, 10))],
                                      [photos["100"], None], pre)
    with pytest.raises(ValueError, match="does not match"):
        G.word_scores([words], [alphas[:3]], [photos["100"]], pre)


def test_pointing_needs_the_peak_cells_centre_on_the_target() -> None:
    """A box that only clips the peak cell's corner gets some correctness but no pointing (the
    pointing game asks whether the peak point is on the thing, not whether the cells touch)."""
    boxes = [(0.0, 0.0, 12.0, 12.0)]  # 40×40 image, 2×2 grid of 20-px cells: centres at 10, 30
    cover = G.coverage(boxes, (2, 2), (40, 40))
    hits = G.centre_hits(boxes, (2, 2), (40, 40))
    assert hits.tolist() == [[True, False], [False, False]]
    corner = [(15.0, 15.0, 25.0, 25.0)]  # touches all four cells, contains no cell centre
    assert not G.centre_hits(corner, (2, 2), (40, 40)).any()
    alpha = np.array([[0.0, 0.0], [0.0, 1.0]])
    c, pointing, _ = G.score_map(alpha, G.coverage(corner, (2, 2), (40, 40)),
                                 G.centre_hits(corner, (2, 2), (40, 40)))
    assert math.isclose(c, 25 / 400) and not pointing
    assert G.score_map(np.array([[1.0, 0.0], [0.0, 0.0]]), cover, hits)[1]
