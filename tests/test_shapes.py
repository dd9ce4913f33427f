"""The synthetic grounded-shapes dataset: determinism, caption/geometry agreement, file layout."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from showattend.data.coco import read_coco_captions, read_objects
from showattend.data.shapes import COLOUR_RGB, COLOURS, SHAPES, SIZES, generate_shapes

N = 20
SIZE = 64
SPLITS = ("train", "val", "test")
_MENTION = rf"a (small|large) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
CAPTION_RE = re.compile(rf"^{_MENTION}(?: (?:above|below|left of) {_MENTION}){{1,2}}$")
MENTION_RE = re.compile(_MENTION)
RELATION_RE = re.compile(r"\b(above|below|left of)\b")


def _generate(out: Path, seed: int = 3, **kwargs) -> Path:
    return generate_shapes(out, n_train=N, n_val=N, n_test=N, seed=seed, image_size=SIZE,
                           progress=False, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("shapes_a") / "data")


@pytest.fixture(scope="module")
def dataset_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("shapes_b") / "data")


def _samples(root: Path, split: str) -> list[tuple[str, np.ndarray, list[dict]]]:
    """(caption, pixels (H, W, 3), objects) per image, joined by image id."""
    captions = json.loads((root / f"captions_{split}.json").read_text())
    objects = read_objects(root / f"objects_{split}.json")
    text = {a["image_id"]: a["caption"] for a in captions["annotations"]}
    out = []
    for image in captions["images"]:
        with Image.open(root / image["file_name"]) as im:
            pixels = np.asarray(im.convert("RGB"))
        out.append((text[image["id"]], pixels, objects[image["id"]]))
    return out


def _all_samples(root: Path) -> list[tuple[str, np.ndarray, list[dict]]]:
    return [s for split in SPLITS for s in _samples(root, split)]


def _expected_relation(a: list[float], b: list[float]) -> str:
    # Recomputed from the boxes, independently of the generator's code.
    dy = (b[1] + b[3] / 2) - (a[1] + a[3] / 2)
    return "above" if dy > SIZE / 8 else "below" if dy < -SIZE / 8 else "left of"


def _is_colour(pixels: np.ndarray, colour: str, tol: int = 50) -> np.ndarray:
    """Boolean mask of pixels within ``tol`` of ``colour`` on every channel."""
    return (np.abs(pixels.astype(int) - np.asarray(COLOUR_RGB[colour])) <= tol).all(-1)


# --- layout and determinism ------------------------------------------------------------------


def test_file_layout(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["image_size"] == SIZE
    assert manifest["n_train"] == manifest["n_val"] == manifest["n_test"] == N
    ids: set[int] = set()
    for split in SPLITS:
        captions = json.loads((dataset / f"captions_{split}.json").read_text())
        assert len(captions["images"]) == len(captions["annotations"]) == N
        for index, image in enumerate(captions["images"]):
            assert image["file_name"] == f"images/{split}/{split}_{index:06d}.png"
            assert image["width"] == image["height"] == SIZE
            with Image.open(dataset / image["file_name"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
        ids.update(image["id"] for image in captions["images"])
        # The generic COCO reader accepts the files and every image exists.
        records = read_coco_captions(dataset / f"captions_{split}.json", dataset, split=split)
        assert len(records) == N and all(r.path.is_file() and len(r.captions) == 1 for r in records)
        objects = read_objects(dataset / f"objects_{split}.json")
        assert set(objects) == {r.image_id for r in records}
    assert len(ids) == 3 * N  # image ids are unique across splits


def test_same_seed_gives_identical_bytes(dataset: Path, dataset_again: Path) -> None:
    names = [f"{kind}_{split}.json" for kind in ("captions", "objects") for split in SPLITS]
    names += [f"images/{split}/{split}_{i:06d}.png" for split in SPLITS for i in (0, 7, N - 1)]
    for name in names:
        assert (dataset / name).read_bytes() == (dataset_again / name).read_bytes(), name


def test_different_seed_gives_different_data(dataset: Path, tmp_path: Path) -> None:
    other = generate_shapes(tmp_path / "other", n_train=3, n_val=0, n_test=0, seed=4,
                            image_size=SIZE, progress=False)
    a = dataset / "images/train/train_000000.png"
    assert a.read_bytes() != (other / "images/train/train_000000.png").read_bytes()


def test_splits_share_no_image(dataset: Path) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for _, pixels, _ in _samples(dataset, split):
            digest = hashlib.sha256(pixels.tobytes()).hexdigest()
            assert digest not in seen, f"{split} image repeats one from {seen.get(digest)}"
            seen[digest] = split


def test_idempotent_second_call_rewrites_nothing(dataset: Path) -> None:
    watched = [dataset / "manifest.json", dataset / "captions_val.json",
               dataset / "images/test/test_000003.png"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert _generate(dataset) == dataset
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_changed_parameters_or_missing_manifest_regenerate(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "d", n_train=2, n_val=1, n_test=1, progress=False)
    captions = (root / "captions_train.json").read_bytes()
    (root / "manifest.json").unlink()  # as after an interrupted run
    generate_shapes(root, n_train=2, n_val=1, n_test=1, progress=False)
    assert (root / "manifest.json").is_file()
    assert (root / "captions_train.json").read_bytes() == captions
    generate_shapes(root, n_train=3, n_val=1, n_test=1, progress=False)
    assert json.loads((root / "manifest.json").read_text())["n_train"] == 3
    assert len(json.loads((root / "captions_train.json").read_text())["images"]) == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 16}, {"n_train": -1}, {"seed": -2}, {"n_val": 2.5}, {"image_size": True}],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "x", **{"n_train": 1, "n_val": 1, "n_test": 1, **kwargs})


# --- captions agree with the pixels and the objects file --------------------------------------


def test_caption_grammar_and_mention_count(dataset: Path) -> None:
    counts = set()
    for caption, _, objects in _all_samples(dataset):
        assert CAPTION_RE.match(caption), caption
        mentions = MENTION_RE.findall(caption)
        assert 2 <= len(mentions) <= 3 and len(mentions) == len(objects)
        counts.add(len(mentions))
    assert counts == {2, 3}  # both scene sizes occur


def test_caption_matches_objects_left_to_right(dataset: Path) -> None:
    for caption, _, objects in _all_samples(dataset):
        ordered = sorted(objects, key=lambda o: o["bbox"][0] + o["bbox"][2] / 2)
        assert [(o["size"], o["colour"], o["shape"]) for o in ordered] == MENTION_RE.findall(
            caption
        )
        pairs = [(o["colour"], o["shape"]) for o in objects]
        assert len(set(pairs)) == len(pairs)  # distinct (colour, shape) per image


def test_relations_agree_with_geometry(dataset: Path) -> None:
    seen = set()
    for caption, _, objects in _all_samples(dataset):
        ordered = sorted(objects, key=lambda o: o["bbox"][0] + o["bbox"][2] / 2)
        expected = [_expected_relation(a["bbox"], b["bbox"]) for a, b in zip(ordered, ordered[1:])]
        assert RELATION_RE.findall(caption) == expected, caption
        seen.update(expected)
    assert seen == {"above", "below", "left of"}


def test_boxes_inside_apart_and_sized(dataset: Path) -> None:
    for caption, _, objects in _all_samples(dataset):
        boxes = [o["bbox"] for o in objects]
        for obj, (x, y, w, h) in zip(objects, boxes):
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE, caption
            assert max(w, h) == SIZES[obj["size"]]  # the size word matches the drawn size
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                apart = (a[0] + a[2] + 2 <= b[0] or b[0] + b[2] + 2 <= a[0]
                         or a[1] + a[3] + 2 <= b[1] or b[1] + b[3] + 2 <= a[1])
                assert apart, f"{caption}: {a} and {b} overlap or touch"
                assert abs((a[0] + a[2] / 2) - (b[0] + b[2] / 2)) >= 4, caption


def test_named_colour_at_box_centre(dataset: Path) -> None:
    names = list(COLOUR_RGB)
    palette = np.asarray([COLOUR_RGB[n] for n in names])
    for caption, pixels, objects in _all_samples(dataset):
        for obj in objects:
            x, y, w, h = obj["bbox"]
            pixel = pixels[int(y + h / 2), int(x + w / 2)].astype(int)
            nearest = names[int(np.abs(palette - pixel).sum(1).argmin())]
            assert nearest == obj["colour"], f"{caption}: {pixel} at centre of {obj}"
            assert np.abs(pixel - COLOUR_RGB[obj["colour"]]).max() <= 50


def test_boxes_are_tight(dataset: Path) -> None:
    # Each box edge touches the object's colour; the line just outside the box does not.
    for caption, pixels, objects in _all_samples(dataset):
        for obj in objects:
            x, y, w, h = obj["bbox"]
            inside = _is_colour(pixels, obj["colour"])
            box = inside[y : y + h, x : x + w]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            if y > 0:
                assert not inside[y - 1, x : x + w].any(), caption
            if x > 0:
                assert not inside[y : y + h, x - 1].any(), caption
            if y + h < SIZE:
                assert not inside[y + h, x : x + w].any(), caption
            if x + w < SIZE:
                assert not inside[y : y + h, x + w].any(), caption


def test_background_is_grey(dataset: Path) -> None:
    for caption, pixels, objects in _all_samples(dataset)[:10]:
        background = np.ones(pixels.shape[:2], dtype=bool)
        for obj in objects:
            x, y, w, h = obj["bbox"]
            background[y : y + h, x : x + w] = False
        bg = pixels[background].astype(int)  # (N, 3)
        assert (bg.max(1) == bg.min(1)).all(), caption  # R = G = B
        assert 40 <= bg.mean() <= 120, caption


def test_other_image_size_scales_objects(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "d96", n_train=5, n_val=0, n_test=0, image_size=96,
                           progress=False)
    for objects in read_objects(root / "objects_train.json").values():
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert max(w, h) == round(SIZES[obj["size"]] * 96 / 64)
            assert x + w <= 96 and y + h <= 96
