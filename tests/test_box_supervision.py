"""Attention supervision from human boxes (an objective of its own) and photo grounding in
evaluation: the loss on hand-built maps, the targets of a hand-built photo, the objective in a
run, and ``evaluate --entities`` on a model trained here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_toml
from showattend import config as C
from showattend.cli import main
from showattend.config import Config, load_config
from showattend.data.coco import ImageRecord
from showattend.data.images import Preprocessor
from showattend.losses import box_attention_loss
from showattend.train import fit
from showattend.train.objectives import BoxSupervision, TrainingData, objective_for
from showattend.train.objectives.box_supervision import box_targets
from showattend.vocab import Vocab

PRE = Preprocessor(size=(40, 40), mean=(0.5,) * 3, std=(0.25,) * 3)


def _xml(w: int, h: int, boxes: dict[str, tuple[int, int, int, int]]) -> str:
    objs = "".join(f"<object><name>{c}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for c, b in boxes.items())
    return (f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"{objs}</annotation>")


def _entities(root: Path, photos: dict[str, tuple[str, str]]) -> Path:
    for sub in ("Annotations", "Sentences"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for pid, (xml, txt) in photos.items():
        (root / "Annotations" / f"{pid}.xml").write_text(xml)
        (root / "Sentences" / f"{pid}.txt").write_text(txt)
    return root


def test_mass_loss_is_minus_log_correctness_and_ce_is_cross_entropy():
    cover = torch.zeros(1, 2, 4)
    cover[0, :, 0] = 1.0  # cell 0 wholly inside the box
    cover[0, :, 1] = 0.5  # cell 1 half inside
    alphas = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    mask = torch.tensor([[True, False]])  # only the first word names the thing
    assert math.isclose(float(box_attention_loss(alphas, cover, mask, "mass")),
                        -math.log(0.5 + 0.25), rel_tol=1e-6)
    q = torch.tensor([2 / 3, 1 / 3, 0, 0])
    expected = -(q * torch.log(alphas[0, 0].clamp_min(1e-8))).sum()
    assert math.isclose(float(box_attention_loss(alphas, cover, mask, "ce")), float(expected),
                        rel_tol=1e-6)
    inside = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]])
    assert float(box_attention_loss(inside, cover, mask, "mass")) == pytest.approx(0.0, abs=1e-6)
    none = box_attention_loss(alphas.requires_grad_(), cover, torch.zeros(1, 2, dtype=torch.bool))
    assert float(none) == 0.0
    with pytest.raises(ValueError, match="mass"):
        box_attention_loss(alphas, cover, mask, "l2")


def test_mass_gradient_moves_attention_onto_the_box():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    cover = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    box_attention_loss(torch.softmax(logits, -1), cover, torch.tensor([[True]])).backward()
    g = logits.grad[0, 0]
    assert g[0] < 0 and (g[1:] > 0).all()  # descent raises the box cell's score, lowers others


def test_box_targets_follow_the_evaluation_rule(tmp_path: Path):
    # photo 17: 40×40, dog in the left half, a man top-right
    ents = _entities(tmp_path / "ents", {"17": (
        _xml(40, 40, {"1": (1, 1, 20, 40), "2": (21, 1, 40, 20)}),
        "[/EN#1/animals Two dogs] run .\n[/EN#2/people A man] waves at [/EN#1/animals the dog] .\n"
        "[/EN#0/notvisual Nobody] sees [/EN#3/other it] .\n")})
    rec = ImageRecord(image_id=5, path=str(tmp_path / "17_abc.jpg"), captions=["x"], split="train")
    vocab = Vocab.build(["two dogs run", "a man waves at the dog", "it is a cat"], 1)
    targets = box_targets(TrainingData([rec], vocab, PRE, (2, 2), str(ents)))
    table = targets[5]
    dog, dogs, man = (vocab.itos.index(w) for w in ("dog", "dogs", "man"))
    assert set(table) == {dog, dogs, man}  # "it": chain 3 has no box; "cat": not in the photo
    assert table[dog].tolist() == [1.0, 0.0, 1.0, 0.0] and table[dogs] is table[dog]
    assert table[man].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_batch_targets_mark_the_words_that_name_boxed_things():
    obj = BoxSupervision(C.replace(Config(), supervision={"weight": 1.0}))
    obj.targets = {7: {5: torch.tensor([1.0, 0.0])}, 8: {}}
    caps = torch.tensor([[1, 4, 5, 2, 0], [1, 5, 5, 2, 0]])  # <start> w w <end> <pad>
    cover, mask = obj.batch_targets(caps, torch.tensor([7, 8]), 2)
    assert mask.tolist() == [[False, True, False, False], [False] * 4]
    assert cover[0, 1].tolist() == [1.0, 0.0] and float(cover.sum()) == 1.0


def test_supervision_is_chosen_by_its_weight_and_needs_entities(tmp_path: Path):
    from conftest import tiny_model

    cfg = C.replace(Config(), supervision={"weight": 0.5})
    assert isinstance(objective_for(cfg, tiny_model("soft")), BoxSupervision)
    assert not isinstance(objective_for(Config(), tiny_model("soft")), BoxSupervision)
    assert not isinstance(objective_for(cfg, tiny_model("hard")), BoxSupervision)
    with pytest.raises(Exception, match="data.entities"):
        objective_for(cfg, tiny_model("soft")).bind(TrainingData([], Vocab.build([], 1), PRE,
                                                                 (2, 2), ""))


def _flickr_like(shapes: Path, out: Path) -> tuple[Path, Path]:
    """The built-in shapes images as a Flickr-style data set (``<id>_s.png``, a token file and
    split lists) and Flickr30k-Entities-style annotations of every object, named by its shape."""
    import shutil

    photos, tokens = {}, []
    images = out / "images"
    images.mkdir(parents=True)
    fid = 1000
    for split, listname in (("train", "train"), ("val", "dev"), ("test", "test")):
        caps = json.loads((shapes / f"captions_{split}.json").read_text())
        objs = {im["id"]: im["objects"]
                for im in json.loads((shapes / f"objects_{split}.json").read_text())["images"]}
        text = {a["image_id"]: a["caption"] for a in caps["annotations"]}
        names = []
        for im in caps["images"]:
            fid += 1
            name = f"{fid}_s.png"
            shutil.copy(shapes / im["file_name"], images / name)
            names.append(name)
            tokens.append(f"{name}#0\t{text[im['id']]}")
            boxes = {str(k + 1): (o["bbox"][0] + 1, o["bbox"][1] + 1, o["bbox"][0] + o["bbox"][2],
                                  o["bbox"][1] + o["bbox"][3]) for k, o in enumerate(objs[im["id"]])}
            txt = " and ".join(f"[/EN#{k + 1}/other a {o['colour']} {o['shape']}]"
                               for k, o in enumerate(objs[im["id"]])) + " .\n"
            photos[str(fid)] = (_xml(64, 64, boxes), txt)
        (out / f"Flickr_8k.{listname}Images.txt").write_text("\n".join(names) + "\n")
    (out / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    return out, _entities(out / "entities", photos)


FLICKR_TOML = """
name = "f"
out_dir = "{out}"
[data]
kind = "flickr"
root = "{root}/images"
flickr_captions = "{root}/Flickr8k.token.txt"
flickr_splits = "{root}"
entities = "{ents}"
[encoder]
channels = 16
[attention]
dim = 16
[decoder]
embed_dim = 16
hidden_dim = 32
[supervision]
weight = {weight}
[train]
epochs = 1
batch_size = 16
log_every = 1
[eval]
beam = 1
meteor = false
batch_size = 8
"""


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory):
    from showattend.data.shapes import generate_shapes

    tmp = tmp_path_factory.mktemp("flickr_like")
    generate_shapes(tmp / "shapes", n_train=48, n_val=8, n_test=8, seed=5, progress=False)
    return _flickr_like(tmp / "shapes", tmp / "flickr")


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_training_with_entities_validates_and_evaluates_against_boxes(flickr_like, tmp_path,
                                                                       capsys, weight):
    root, ents = flickr_like
    cfg_path = tmp_path / "f.toml"
    cfg_path.write_text(FLICKR_TOML.format(out=tmp_path / "run", root=root, ents=ents,
                                           weight=weight))
    result = fit(load_config(cfg_path), progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    val = [r for r in log if r["kind"] == "val"]
    # the objective: the box term only when its weight is on, on some words of every few batches
    assert all(("box" in r) == (weight > 0) for r in train)
    if weight:
        assert sum(r["box_words"] for r in train) > 0
    assert val and "val_correctness" in val[0] and "val_correctness_uniform" in val[0]
    m = result.test_metrics  # data.entities reaches the final test evaluation too
    assert m["grounded_words"] > 0 and 0 < m["correctness_uniform"] < 1
    # the same checkpoint through the CLI with --entities: the same figures, and the line
    assert main(["-q", "evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                 "--entities", str(ents), "--no-meteor", "--out", str(tmp_path / "ev")]) == 0
    out, err = capsys.readouterr()
    cli = json.loads(out.strip().splitlines()[-1])
    assert cli["correctness"] == pytest.approx(m["correctness"], abs=1e-4)
    assert cli["pointing"] == pytest.approx(m["pointing"], abs=1e-4)
    assert "correctness" in err and "uniform" in err and "centre" in err and "pointing" in err
