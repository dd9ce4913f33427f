"""COCO captions / Karpathy split / objects readers: valid files, and every kind of bad file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from showattend.data.coco import (
    DataFormatError,
    ImageRecord,
    check_images_exist,
    read_coco_captions,
    read_karpathy,
    read_objects,
)


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _coco() -> dict:
    return {
        "info": {"description": "tiny"},
        "images": [
            {"id": 42, "file_name": "COCO_val_000042.jpg", "width": 640, "height": 480},
            {"id": 7, "file_name": "sub/COCO_val_000007.jpg"},
            {"id": 9, "file_name": "COCO_val_000009.jpg"},  # no captions
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "A dog on a couch."},
            {"id": 2, "image_id": 42, "caption": "  Two   people\nwalking. "},
            {"id": 3, "image_id": 7, "caption": "a sleeping dog"},
            {"id": 4, "image_id": 42, "caption": "   "},  # empty after stripping: dropped
        ],
    }


def _karpathy_coco() -> dict:
    def sent(raw: str | None, tokens: list[str]) -> dict:
        entry: dict[str, Any] = {"tokens": tokens, "sentid": 0}
        if raw is not None:
            entry["raw"] = raw
        return entry

    return {
        "dataset": "coco",
        "images": [
            {
                "filepath": "train2014", "filename": "a.jpg", "split": "train", "cocoid": 101,
                "imgid": 0, "sentences": [sent("A cat.", ["a", "cat"])],
            },
            {
                "filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 102,
                "imgid": 1, "sentences": [sent("A bird.", ["a", "bird"]), sent("", ["a", "fowl"])],
            },
            {
                "filepath": "val2014", "filename": "c.jpg", "split": "val", "cocoid": 103,
                "imgid": 2, "sentences": [sent(None, ["a", "fish"]), sent("", [])],
            },
            {
                "filepath": "val2014", "filename": "d.jpg", "split": "test", "cocoid": 104,
                "imgid": 3, "sentences": [sent("A horse.", ["a", "horse"])],
            },
        ],
    }


def _karpathy_flickr() -> dict:
    return {
        "dataset": "flickr8k",
        "images": [
            {"filename": "1000.jpg", "split": "train", "imgid": 0,
             "sentences": [{"raw": "A child climbs.", "tokens": ["a", "child", "climbs"]}]},
            {"filename": "1001.jpg", "split": "test", "imgid": 1,
             "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}]},
        ],
    }


def _objects() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "images/train/train_000000.png", "objects": [
                {"colour": "red", "shape": "circle", "size": "small", "bbox": [1, 2, 12, 12]},
                {"colour": "blue", "shape": "square", "size": "large", "bbox": [30.0, 5, 20, 20]},
            ]},
            {"id": 2, "file_name": "images/train/train_000001.png", "objects": []},
        ]
    }


def _error_for(reader, path: Path, *args: Any) -> str:
    with pytest.raises(DataFormatError) as info:
        reader(path, *args)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


# --- COCO captions ---------------------------------------------------------------------------


def test_read_coco_captions(tmp_path: Path) -> None:
    path = _write(tmp_path / "captions_val.json", _coco())
    records = read_coco_captions(path, tmp_path / "imgs", split="val")
    assert [r.image_id for r in records] == [42, 7, 9]  # order of "images"
    by_id = {r.image_id: r for r in records}
    assert by_id[7] == ImageRecord(
        7, tmp_path / "imgs" / "sub" / "COCO_val_000007.jpg",
        ("A dog on a couch.", "a sleeping dog"), "val",
    )
    assert by_id[42].captions == ("Two people walking.",)  # whitespace cleaned, empty dropped
    assert by_id[9].captions == ()  # kept, without captions
    assert all(r.split == "val" for r in records)


def test_coco_default_split_is_train(tmp_path: Path) -> None:
    records = read_coco_captions(_write(tmp_path / "c.json", _coco()), tmp_path)
    assert {r.split for r in records} == {"train"}


def test_coco_unknown_image_id(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"].append({"id": 5, "image_id": 999, "caption": "ghost"})
    message = _error_for(read_coco_captions, _write(tmp_path / "c.json", data), tmp_path)
    assert "annotations[4]" in message and "999" in message


@pytest.mark.parametrize(
    "mutate, entry",
    [
        (lambda d: d.pop("annotations"), "annotations"),
        (lambda d: d.pop("images"), "images"),
        (lambda d: d["images"][1].pop("file_name"), "images[1]"),
        (lambda d: d["images"][0].update(id="42"), "images[0].id"),
        (lambda d: d["images"][0].update(id=True), "images[0].id"),
        (lambda d: d["images"][0].update(id=4.2), "images[0].id"),
        (lambda d: d["images"][2].update(id=42), "duplicate"),
        (lambda d: d["annotations"][2].update(caption=None), "annotations[2].caption"),
        (lambda d: d["annotations"][0].pop("image_id"), "annotations[0]"),
        (lambda d: d.update(images={"id": 1}), "images"),
        (lambda d: d["images"].append("x.jpg"), "images[3]"),
    ],
)
def test_coco_bad_structure(tmp_path: Path, mutate, entry: str) -> None:
    data = _coco()
    mutate(data)
    message = _error_for(read_coco_captions, _write(tmp_path / "c.json", data), tmp_path)
    assert entry in message


def test_coco_top_level_not_an_object(tmp_path: Path) -> None:
    message = _error_for(read_coco_captions, _write(tmp_path / "c.json", [1, 2]), tmp_path)
    assert "expected object, got list" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b'{"images": [', b"not json at all", b"\xff\xfe\x00garbage", b"[" * 100_000],
)
def test_malformed_json(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    for reader, args in [
        (read_coco_captions, (tmp_path,)),
        (read_karpathy, (tmp_path,)),
        (read_objects, ()),
    ]:
        _error_for(reader, path, *args)


def test_truncated_real_file(tmp_path: Path) -> None:
    text = json.dumps(_coco())
    path = tmp_path / "c.json"
    path.write_text(text[: len(text) * 2 // 3])
    assert "invalid JSON" in _error_for(read_coco_captions, path, tmp_path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "no such file" in _error_for(read_coco_captions, tmp_path / "absent.json", tmp_path)
    assert "directory" in _error_for(read_karpathy, tmp_path, tmp_path)


# --- Karpathy splits -------------------------------------------------------------------------


def test_karpathy_coco_style(tmp_path: Path) -> None:
    path = _write(tmp_path / "dataset_coco.json", _karpathy_coco())
    splits = read_karpathy(path, tmp_path / "coco")
    assert set(splits) == {"train", "val", "test"}
    train = splits["train"]
    assert [r.image_id for r in train] == [101, 102]  # restval joins train, cocoid used
    assert all(r.split == "train" for r in train)
    assert train[1].path == tmp_path / "coco" / "val2014" / "b.jpg"
    # Empty raw falls back to tokens.
    assert train[1].captions == ("A bird.", "a fowl")
    # Missing raw falls back to tokens; an empty sentence is dropped.
    assert splits["val"][0].captions == ("a fish",)
    assert splits["test"][0] == ImageRecord(
        104, tmp_path / "coco" / "val2014" / "d.jpg", ("A horse.",), "test"
    )


def test_karpathy_restval_options(tmp_path: Path) -> None:
    path = _write(tmp_path / "dataset_coco.json", _karpathy_coco())
    kept_apart = read_karpathy(path, tmp_path, splits=("train", "restval"), restval=None)
    assert [r.image_id for r in kept_apart["train"]] == [101]
    assert [(r.image_id, r.split) for r in kept_apart["restval"]] == [(102, "restval")]
    dropped = read_karpathy(path, tmp_path, splits=("train",), restval=None)
    assert list(dropped) == ["train"] and len(dropped["train"]) == 1
    only_val = read_karpathy(path, tmp_path, splits="val")
    assert list(only_val) == ["val"]


def test_karpathy_flickr_style(tmp_path: Path) -> None:
    path = _write(tmp_path / "dataset_flickr8k.json", _karpathy_flickr())
    splits = read_karpathy(path, tmp_path / "Flicker8k_Dataset")
    assert splits["val"] == []
    (train,) = splits["train"]
    assert train.image_id == 0  # imgid when there is no cocoid
    assert train.path == tmp_path / "Flicker8k_Dataset" / "1000.jpg"  # no filepath
    assert splits["test"][0].captions == ("A dog runs.",)


@pytest.mark.parametrize(
    "mutate, entry",
    [
        (lambda d: d["images"][0].update(split="dev"), "images[0].split"),
        (lambda d: d["images"][1].pop("sentences"), "images[1]"),
        (lambda d: d["images"][1].pop("imgid"), "images[1]"),
        (lambda d: d["images"][0].update(imgid="0"), "images[0].imgid"),
        (lambda d: d["images"][0].update(filename=3), "images[0].filename"),
        (lambda d: d["images"][0]["sentences"][0].update(raw=5), "sentences[0].raw"),
        (lambda d: d["images"][0]["sentences"][0].update(raw="", tokens=["a", 1]), "tokens[1]"),
        (lambda d: d["images"][0]["sentences"][0].clear(), "sentences[0]"),
        (lambda d: d["images"][1].update(imgid=0), "duplicate"),
        (lambda d: d.update(images=None), "images"),
    ],
)
def test_karpathy_bad_structure(tmp_path: Path, mutate, entry: str) -> None:
    data = _karpathy_flickr()
    mutate(data)
    message = _error_for(read_karpathy, _write(tmp_path / "k.json", data), tmp_path)
    assert entry in message


def test_karpathy_error_in_unrequested_split_still_reported(tmp_path: Path) -> None:
    data = _karpathy_flickr()
    data["images"][1]["sentences"] = "A dog runs."  # test split, but only train is requested
    with pytest.raises(DataFormatError, match=r"images\[1\]\.sentences"):
        read_karpathy(_write(tmp_path / "k.json", data), tmp_path, splits=("train",))


# --- objects ---------------------------------------------------------------------------------


def test_read_objects(tmp_path: Path) -> None:
    objects = read_objects(_write(tmp_path / "objects_train.json", _objects()))
    assert set(objects) == {1, 2}
    assert objects[2] == []
    assert objects[1][0] == {"colour": "red", "shape": "circle", "size": "small",
                             "bbox": [1, 2, 12, 12]}
    assert objects[1][1]["bbox"] == [30.0, 5, 20, 20]


@pytest.mark.parametrize(
    "mutate, entry",
    [
        (lambda d: d["images"][0]["objects"][0].update(bbox=[1, 2, 3]), "objects[0].bbox"),
        (lambda d: d["images"][0]["objects"][1].update(bbox=[1, 2, "3", 4]), "bbox[2]"),
        (lambda d: d["images"][0]["objects"][1].update(bbox=[1, 2, -3, 4]), "objects[1].bbox"),
        (lambda d: d["images"][0]["objects"][0].pop("colour"), "objects[0]"),
        (lambda d: d["images"][0]["objects"][0].update(shape=["circle"]), "objects[0].shape"),
        (lambda d: d["images"][1].pop("objects"), "images[1]"),
        (lambda d: d["images"][1].update(id=1), "duplicate"),
    ],
)
def test_objects_bad_structure(tmp_path: Path, mutate, entry: str) -> None:
    data = _objects()
    mutate(data)
    message = _error_for(read_objects, _write(tmp_path / "o.json", data))
    assert entry in message


# --- check_images_exist ----------------------------------------------------------------------


def test_check_images_exist(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    records = [
        ImageRecord(1, tmp_path / "a.jpg", ("a",), "train"),
        ImageRecord(2, tmp_path / "b.jpg", ("b",), "train"),
        ImageRecord(3, tmp_path / "c.jpg", ("c",), "train"),
    ]
    with pytest.raises(DataFormatError, match=r"2 of 3 image files are missing.*b\.jpg"):
        check_images_exist(records)
    with caplog.at_level(logging.WARNING, logger="showattend.data.coco"):
        kept = check_images_exist(iter(records), on_missing="skip")
    assert kept == records[:1]
    assert "2 of 3" in caplog.text
    assert check_images_exist(records[:1]) == records[:1]
    with pytest.raises(ValueError):
        check_images_exist(records, on_missing="ignore")


# --- property-based: arbitrary JSON never escapes as anything but DataFormatError ------------

_KEYS = ["images", "annotations", "id", "image_id", "caption", "file_name", "filename",
         "filepath", "split", "sentences", "raw", "tokens", "cocoid", "imgid", "objects",
         "colour", "shape", "size", "bbox"]
_SCALARS = (
    st.none() | st.booleans() | st.integers(-5, 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["train", "val", "test", "restval", "", "a dog", "x.jpg"])
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), children, max_size=6),
    max_leaves=30,
)
# Mostly-valid shapes get much deeper into the readers than uniformly random JSON.
_ENTRY = st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=8)
_DOC = _JSON | st.fixed_dictionaries(
    {"images": st.lists(_ENTRY, max_size=4), "annotations": st.lists(_ENTRY, max_size=4)}
)
_PROPERTY = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _run_all_readers(path: Path, root: Path) -> None:
    for call in (
        lambda: read_coco_captions(path, root),
        lambda: read_karpathy(path, root),
        lambda: read_karpathy(path, root, splits=("restval",), restval=None),
        lambda: read_objects(path),
    ):
        try:
            result = call()
        except DataFormatError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            continue
        if isinstance(result, list):
            assert all(isinstance(r, ImageRecord) for r in result)
        else:
            assert isinstance(result, dict)
            for value in result.values():
                assert isinstance(value, list)
                assert all(isinstance(r, (ImageRecord, dict)) for r in value)


@_PROPERTY
@given(doc=_DOC)
def test_random_json_structures(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "random.json"
    path.write_text(json.dumps(doc))
    _run_all_readers(path, tmp_path)


@_PROPERTY
@given(doc=_DOC, cut=st.floats(0.0, 1.0))
def test_random_truncated_json(tmp_path: Path, doc: Any, cut: float) -> None:
    raw = json.dumps(doc).encode()
    path = tmp_path / "cut.json"
    path.write_bytes(raw[: int(len(raw) * cut)])
    _run_all_readers(path, tmp_path)


@_PROPERTY
@given(data=st.binary(max_size=64))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bytes.json"
    path.write_bytes(data)
    _run_all_readers(path, tmp_path)
