"""Training on one's own captioned photos: one COCO-format captions file split into train / val /
test, the official COCO 2014 and 2017 folder layouts, a prepared folder that says how it was
encoded, and the warnings a user can act on. Planted once each: the split leaking an image into
two splits, the layout lookup missing the prefix folder, a disagreeing flag silently overridden
— each failed here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from prep_fixtures import captions_for, draw
from showattend import config as C
from showattend.cli import main
from showattend.data.coco import ImageRecord, locate_image, read_coco_captions
from showattend.data.prepared import PreparedDataError, adopt_folder_encoder
from showattend.data.splits import split_fractions, split_images

COLOURS, SHAPES = ("red", "green", "blue"), ("circle", "square")


def _coco_file(path: Path, names: list[str], first_id: int = 1) -> Path:
    images, anns = [], []
    for i, name in enumerate(names):
        iid = first_id + i
        images.append({"id": iid, "file_name": name, "width": 48, "height": 40})
        colour, shape = COLOURS[i % 3], SHAPES[(i // 3) % 2]
        anns += [{"id": iid * 10 + k, "image_id": iid, "caption": c}
                 for k, c in enumerate(captions_for(colour, shape))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def _layout(root: Path, split: str, prefix: str = "", n: int = 30) -> Path:
    """An official COCO layout: ROOT/<split>/<prefix>000000000123.jpg and
    ROOT/annotations/captions_<split>.json (2017: no prefix; 2014: "COCO_val2014_")."""
    names = [f"{prefix}{100 + i:012d}.jpg" for i in range(n)]
    (root / split).mkdir(parents=True)
    for i, name in enumerate(names):
        draw(root / split / name, COLOURS[i % 3], SHAPES[(i // 3) % 2])
    return _coco_file(root / "annotations" / f"captions_{split}.json", names, 100)


def _layout_2017(root: Path, n: int = 30) -> Path:
    return _layout(root, "val2017", "", n)


def _layout_2014(root: Path, n: int = 30) -> Path:
    return _layout(root, "val2014", "COCO_val2014_", n)


def test_split_is_disjoint_complete_seeded_and_follows_the_fractions():
    recs = [ImageRecord(i, Path(f"{i}.jpg"), ("a cap",), "train") for i in range(233)]
    parts = split_images(recs, (0.8, 0.1, 0.1), seed=0)
    ids = {s: [r.image_id for r in rs] for s, rs in parts.items()}
    assert sum(len(v) for v in ids.values()) == 233
    assert set(ids["train"]) | set(ids["val"]) | set(ids["test"]) == set(range(233))
    assert not (set(ids["train"]) & set(ids["val"]) or set(ids["train"]) & set(ids["test"])
                or set(ids["val"]) & set(ids["test"]))
    assert (len(ids["val"]), len(ids["test"])) == (23, 23)
    assert all(r.split == s for s, rs in parts.items() for r in rs)
    again = split_images(list(reversed(recs)), (0.8, 0.1, 0.1), seed=0)
    assert {s: [r.image_id for r in rs] for s, rs in again.items()} == ids  # order-free, seeded
    other = split_images(recs, (0.8, 0.1, 0.1), seed=1)
    assert [r.image_id for r in other["val"]] != ids["val"]
    for bad in ("0.8,0.2", "0.9,0.1,0.1", "1,0,0", "a,b,c"):
        with pytest.raises(Exception, match="data.split"):
            split_fractions(bad)


def test_images_are_found_where_the_official_layouts_put_them(tmp_path):
    f17 = _layout_2017(tmp_path / "c17", n=4)
    recs = read_coco_captions(f17, tmp_path / "c17", "train")
    assert all(r.path.is_file() and r.path.parent.name == "val2017" for r in recs)
    f14 = _layout_2014(tmp_path / "c14", n=4)
    # the 2014 names carry their folder: found from the root whatever the file is called
    renamed = f14.rename(f14.parent / "my_captions.json")
    recs = read_coco_captions(renamed, tmp_path / "c14", "train")
    assert all(r.path.is_file() and r.path.parent.name == "val2014" for r in recs)
    # a name found nowhere keeps root/file_name (reported as missing where it is read)
    assert locate_image(tmp_path, "COCO_train2014_000000000001.jpg") == \
        tmp_path / "COCO_train2014_000000000001.jpg"


def test_one_captions_file_in_the_2017_layout_prepares_and_trains(tmp_path, capsys):
    from conftest import tiny_toml

    root = tmp_path / "coco"
    ann = _layout_2017(root)
    for p in sorted((root / "val2017").glob("*.jpg"))[:5]:  # the file lists photos not here
        p.unlink()
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_toml(tmp_path / "run", tmp_path / "unused", epochs=1, batch_size=8))
    out = tmp_path / "prep"
    assert main(["-q", "prepare", "--config", str(cfg), "--images", str(root), "--annotations",
                 str(ann), "--out", str(out), "--no-features", "--encoder.image_size=32",
                 "--encoder.grid=4"]) == 0
    got = capsys.readouterr()
    assert "split the 30 images of captions_val2017.json: train 24 / val 3 / test 3" in got.out
    m = json.loads((out / "manifest.json").read_text())
    recs = json.loads((out / "records.json").read_text())
    files = {s: {e["file"] for e in recs[s]} for s in ("train", "val", "test")}
    assert not (files["train"] & files["val"] or files["train"] & files["test"]
                or files["val"] & files["test"])
    assert sum(len(v) for v in files.values()) == 25 and m["skipped"]["total"] == 5
    assert m["images"]["shape"][0] == 25  # no store rows for files that are not there
    missing = [ln for ln in got.err.splitlines() if "missing" in ln]
    assert len(missing) == 1 and missing[0].startswith("showattend: 5 images missing")
    assert m["source"]["split"] == "0.8,0.1,0.1"
    # train from the folder with no encoder flag: its settings come from the manifest
    assert main(["-q", "train", "--config", str(cfg), f"--data.prepared={out}",
                 "--train.epochs=1", "--no-test"]) == 0
    got = capsys.readouterr()
    assert "encoder settings from the prepared folder" in got.err
    assert "image_size 32 (config: 64)" in got.err and "grid" not in got.err.split("folder")[0]
    assert "Warning" not in got.err and "PTBTokenizer" not in got.err
    # a flag that disagrees with the folder: one line naming both values
    assert main(["-q", "train", "--config", str(cfg), f"--data.prepared={out}",
                 "--encoder.image_size=64", "--no-test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--encoder.image_size=64" in err and "= 32" in err


def test_same_file_twice_is_split_apart_and_shared_images_leave_val(tmp_path, caplog):
    from showattend.data.splits import load_splits

    root = tmp_path / "coco"
    ann = _layout_2017(root, n=20)
    d = C.replace(C.Config(), data={"kind": "coco", "root": str(root),
                                    "train_annotations": str(ann), "val_annotations": str(ann)})
    with caplog.at_level(logging.WARNING):
        s = load_splits(d.data, progress=False)
    assert "same file" in caplog.text
    paths = [{r.path for r in getattr(s, k)} for k in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2]) and sum(map(len, paths)) == 20
    # two files sharing some photos: the shared ones stay in train only, said in one line
    data = json.loads(ann.read_text())
    shared = [im["file_name"] for im in data["images"][:8]]
    own = [f"{900 + i:012d}.jpg" for i in range(8)]
    names = [n for pair in zip(shared, own) for n in pair]  # ids alternate shared / own
    val = _coco_file(tmp_path / "val.json", names, 200)
    d = C.replace(d, data={"val_annotations": str(val)})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = load_splits(d.data, progress=False)
    # (no test file: the val file's 8 images are halved into val and test first)
    assert "4 images of the val split are also in the train file" in caplog.text
    assert "4 images of the test split are also in the train file" in caplog.text
    assert not ({r.path for r in s.train} & ({r.path for r in s.val} | {r.path for r in s.test}))


def test_config_values_yield_to_the_folder_but_flags_do_not(tmp_path):
    folder = tmp_path / "prep"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "images": {"image_size": [224, 224], "resize": "stretch"},
        "features": {"settings": {"backbone": "efficientnet_lite0", "weights": "imagenet",
                                  "grid": 7, "coords": False, "image_size": [224, 224],
                                  "resize": "stretch"}}}))
    cfg = C.load_config("coco_soft", [f"data.prepared={json.dumps(str(folder))}",
                                      'encoder.backbone="resnet101"', "encoder.grid=14"])
    got, line = adopt_folder_encoder(cfg, set())
    assert (got.encoder.backbone, got.encoder.grid) == ("efficientnet_lite0", 7)
    assert "backbone efficientnet_lite0 (config: resnet101)" in line
    with pytest.raises(PreparedDataError, match="encoder.grid = 7"):
        adopt_folder_encoder(cfg, {"encoder.grid"})


def test_grid_finer_than_the_backbone_is_said_once(caplog):
    from showattend.models import captioner

    captioner._GRID_WARNED.clear()
    with caplog.at_level(logging.WARNING):
        captioner.warn_upsampled_grid("efficientnet_lite0", 14, 224)
        captioner.warn_upsampled_grid("efficientnet_lite0", 14, 224)
        captioner.warn_upsampled_grid("efficientnet_lite0", 7, 224)
        captioner.warn_upsampled_grid("resnet101", 14, 448)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "7×7 grid at 224 px" in lines[0]
    assert C.load_config("coco_soft").encoder.grid == 7


def test_workers_are_capped_at_the_cores():
    import os

    from showattend.train.loop import capped_workers

    cores = len(os.sched_getaffinity(0))
    assert capped_workers(64) == cores and capped_workers(0) == 0


def test_maps_are_drawn_on_the_photo_at_its_own_shape(tmp_path):
    """A tall photo, stretched to a square for the model: the overlay and the report draw the
    view back at 1:2, with the crop boxes stretched along (planted: aspect not passed to the
    overlay → the figure's photo stays square)."""
    import numpy as np
    import torch
    from PIL import Image

    from conftest import tiny_model
    from showattend.api import CaptionerAPI
    from showattend.data.images import Preprocessor
    from showattend.report import Report
    from showattend.vocab import Vocab

    vocab = Vocab.build(["a red circle above a blue square"])
    api = CaptionerAPI(tiny_model("hard", vocab_size=len(vocab)).eval(), vocab,
                       Preprocessor((32, 32), (0.5,) * 3, (0.25,) * 3), C.Config(),
                       torch.device("cpu"))
    tall = tmp_path / "tall.png"
    Image.new("RGB", (50, 100), "red").save(tall)
    [c] = api.caption([str(tall)], beam=1, max_len=4)
    assert c.aspect == (50, 100) and c.view.shape[:2] == (32, 32)
    fig = api.overlay(c)
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape[0] == 2 * shown.shape[1]  # 32 × 16: the photo's 1:2
    if c.words:
        x0, y0, x1, y1 = fig.axes[1].patches[0].get_bbox().bounds if fig.axes[1].patches else (
            0, 0, 1, 1)
        assert x1 <= 16 + 1e-6  # crop boxes scaled into the 16-pixel-wide drawing
    page = Report.from_captions({"m": [c]}).page_data()  # the report's and serve's page
    assert page["images"][0]["results"][0]["aspect"] == [50, 100]
    # a crop-mode model draws its (square) view as it saw it
    api.preprocess = Preprocessor((32, 32), (0.5,) * 3, (0.25,) * 3, resize="crop")
    [c] = api.caption([str(tall)], beam=1, max_len=4)
    assert c.aspect is None
    assert np.asarray(api.overlay(c).axes[0].images[0].get_array()).shape[:2] == (32, 32)


def test_no_built_in_config_asks_for_a_finer_grid_than_its_backbone_gives():
    from showattend.models.backbones import get_backbone

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.toml")):
        e = C.load_config(str(path)).encoder
        spec = get_backbone(e.backbone)
        if spec.pretrained:
            assert e.grid <= spec.grid_at(e.image_size), (path.name, e.grid)
