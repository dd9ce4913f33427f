"""Robustness: bad inputs, damaged files, crashes, signals, non-finite numbers and CLI misuse.

One test (or parametrised group) per row of the reliability table in the README; each checks the
message a user sees *and* that nothing was lost (checkpoints byte-identical, good inputs still
processed, runs resumable). Image decoding and annotation readers are covered in detail by
tests/test_images.py and tests/test_coco_readers.py; here they are exercised end to end.

In-process runs patch out the training-curve plot (matplotlib costs seconds per epoch on these
machines) and Java (PTBTokenizer start-up); neither is what these tests are about. The
kill-and-resume test runs the real console script in subprocesses.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import showattend
import showattend.metrics
import showattend.train as T
import showattend.train.loop as L
import showattend.train.run_files as RF
from showattend import loading
from showattend import config as C
from showattend.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from showattend.cli import main
from showattend.data.coco import ImageRecord
from showattend.data.datasets import CaptionDataset, ImageSource
from showattend.data.images import ImageLoadError
from showattend.io import atomic_torch_save, atomic_write_bytes
from showattend.models.captioner import Captioner
from showattend.vocab import Vocab

from conftest import signal_at_step, tiny_toml

EXE = Path(sys.executable).with_name("showattend")

def write_config(path: Path, out: Path, data: Path, n_train: int = 48, epochs: int = 2) -> Path:
    # deterministic single-threaded settings so resumed runs can be compared bit for bit
    path.write_text(tiny_toml(out, data, n_train=n_train, n_eval=8, epochs=epochs, batch_size=8,
                              beam=1, train_extra="threads = 1\ndeterministic = true"))
    return path


def tiny_cfg(tmp: Path, data: Path, *overrides: str, out: str = "run", **kw) -> C.Config:
    return C.load_config(write_config(tmp / f"{out}.toml", tmp / out, data, **kw), list(overrides))


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """The tiny run's data (48/8/8 images), generated once for this module."""
    from showattend.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes48")
    generate_shapes(root, n_train=48, n_val=8, n_test=8, seed=5, progress=False)
    return root


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class _Quiet:
    """Undo what fit() changes process-wide, and skip curve plotting / Java in-process."""

    def __init__(self):
        self.mp = pytest.MonkeyPatch()

    def __enter__(self):
        self.threads = torch.get_num_threads()
        self.det = torch.are_deterministic_algorithms_enabled()
        self.mp.setattr(RF, "plot_run", lambda *a, **k: None)
        self.mp.setattr(showattend.metrics, "_java_available", lambda: False)
        return self.mp

    def __exit__(self, *exc):
        self.mp.undo()
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.det)
        torch.set_flush_denormal(False)


@pytest.fixture
def quiet():
    with _Quiet() as mp:
        yield mp


def run_fit(cfg: C.Config, **kw) -> T.RunResult:
    return T.fit(cfg, progress=False, **kw)


def read_jsonl(path: Path, drop: tuple[str, ...] = ("elapsed",)) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def assert_same_training_state(a: Path, b: Path) -> None:
    """Model and optimiser tensors bit-identical; counters equal (wall time aside)."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    oa, ob = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for pid in oa:
        for k in oa[pid]:
            assert torch.equal(oa[pid][k], ob[pid][k]), (pid, k)
    sa = {k: v for k, v in ca["train_state"].items() if k != "elapsed"}
    sb = {k: v for k, v in cb["train_state"].items() if k != "elapsed"}
    assert sa == sb
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])


def make_checkpoint(path: Path, tmp: Path, data: Path,
                    captions=("a red circle above a blue square",),
                    **payload_overrides) -> Path:
    """A valid, untrained checkpoint in the training format (no training needed)."""
    cfg = tiny_cfg(tmp, data, out="ckpt_cfg")
    vocab = Vocab.build(captions)
    model = Captioner.from_config(cfg, len(vocab))
    opt = T.build_optimizer(model, cfg.train)
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
               "config": C.to_dict(cfg), "vocab": vocab.to_dict(),
               "preprocess": loading.make_preprocess(cfg, model).to_dict(),
               "train_state": T.TrainState().to_dict(), "rng": {"torch": torch.get_rng_state()}}
    payload.update(payload_overrides)
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shapes_data) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(tmp / "model.pt", tmp, shapes_data)


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("showattend: error: ") and "Traceback" not in err[0]
    return err[0]


# =============================================================================================
# Images
# =============================================================================================


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _png_chunk(b"IEND", b""))


def _noise(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def make_image_folder(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Every awkward kind of file from the issue: (good paths, bad path → expected reason)."""
    folder.mkdir()
    deep = np.linspace(0, 65535, 32 * 24).reshape(24, 32).astype(np.uint16)
    frames = [Image.new("P", (20, 20), i) for i in (10, 200)]
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° on display
    nested = folder / "album.jpg"  # a directory with an image extension: walked, not read
    nested.mkdir()
    writers = {
        "plain.jpg": lambda p: _noise().save(p),
        "dot.png": lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
        "deep16.png": lambda p: Image.fromarray(deep).save(p),  # 16-bit greyscale PNG
        "cmyk.jpg": lambda p: Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(p),
        "anim.gif": lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]),
        "rotated.jpg": lambda p: _noise(60, 30).save(p, exif=exif),
        "album.jpg/inner.png": lambda p: _noise(seed=1).save(p),
    }
    for name, write in writers.items():
        write(folder / name)
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    (folder / "readme.txt").write_text("not an image, and not an image extension: ignored")

    bad: dict[Path, str] = {}
    for fmt, name in (("JPEG", "truncated.jpg"), ("PNG", "truncated.png")):
        b = io.BytesIO()
        _noise(seed=2).save(b, format=fmt)
        (folder / name).write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
        bad[folder / name] = "cannot read image"
    (folder / "notes.jpg").write_text("hello, I am text\n")
    bad[folder / "notes.jpg"] = "cannot identify"
    (folder / "empty.png").write_bytes(b"")
    bad[folder / "empty.png"] = "empty file"
    (folder / "bomb.png").write_bytes(_bomb_png(200_000, 200_000))
    bad[folder / "bomb.png"] = "decompression bomb"
    return sorted(folder / name for name in writers), bad


@pytest.mark.parametrize("loader", [[], ["--batch-size", "3", "--workers", "2"]],
                         ids=["in-process", "2-workers"])
def test_caption_folder_captions_good_reports_bad(checkpoint, tmp_path, capsys, loader):
    """caption over a folder: every good file captioned, each bad one a one-line reason, exit 1
    — also when worker processes decode the files (a bad file is a value, not a dead worker)."""
    good, bad = make_image_folder(tmp_path / "photos")
    missing = tmp_path / "missing.jpg"
    bad[missing] = "no such file"
    code = main(["-q", "caption", str(tmp_path / "photos"), str(missing), "--checkpoint",
                 str(checkpoint), "--beam", "1", "--device", "cpu", *loader])
    out, err = capsys.readouterr()
    assert code == 1
    captioned = [Path(line.split("\t")[0]) for line in out.splitlines()]
    assert sorted(captioned) == good  # nothing good was lost, nothing bad slipped through
    assert all("\t" in line for line in out.splitlines())
    err_lines = err.strip().splitlines()
    assert "Traceback" not in err
    for path, reason in bad.items():
        lines = [ln for ln in err_lines
                 if ln.startswith(f"showattend: skipped: cannot read image {path}:")]
        assert len(lines) == 1 and reason in lines[0], (path, err_lines)
    assert err_lines[-1] == f"showattend: {len(bad)} of {len(good) + len(bad)} images failed"
    assert len(err_lines) == len(bad) + 1  # one line per bad file, one summary

    # the same folder without the bad files: exit 0
    for p in bad:
        p.unlink(missing_ok=True)
    assert main(["-q", "caption", str(tmp_path / "photos"), "--checkpoint", str(checkpoint),
                 "--beam", "1", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(good) and "failed" not in err


def test_caption_api_handles_awkward_images(checkpoint, tmp_path):
    """The Python API: the valid-but-odd images load (1×1, 16-bit, CMYK, GIF, EXIF) and caption."""
    good, bad = make_image_folder(tmp_path / "photos")
    cap = showattend.load(checkpoint, device="cpu")
    results = list(cap.caption_paths([tmp_path / "photos"], beam=1))
    ok = {p for p, c, e in results if e is None}
    failed = {p: e for p, c, e in results if e is not None}
    assert sorted(ok) == good and set(failed) == set(bad)
    for p, e in failed.items():
        assert "\n" not in e and str(p) in e
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        cap.caption([tmp_path / "photos" / "bomb.png"])


def _damage_train_images(data: Path) -> list[Path]:
    imgs = sorted((data / "images" / "train").glob("*.png"))
    raw = imgs[1].read_bytes()
    imgs[1].write_bytes(raw[: len(raw) // 2])  # truncated
    imgs[2].write_text("not a png")  # non-image with an image extension
    imgs[3].write_bytes(b"")  # empty
    imgs[4].unlink()  # referenced but absent
    return imgs[1:5]


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "on-demand"])
def test_training_skips_and_counts_bad_images(quiet, shapes_data, tmp_path, caplog, cache):
    """Bad training images are skipped and counted; every epoch runs to its end."""
    data = copy_data(shapes_data, tmp_path / "data")
    damaged = _damage_train_images(data)
    cfg = tiny_cfg(tmp_path, data, f"--data.cache_in_memory={str(cache).lower()}")
    with caplog.at_level(logging.WARNING):
        result = run_fit(cfg, evaluate_test=False)
    assert result.epochs == 2 and not result.interrupted
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [1, 2]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # 6 batches per epoch, none lost
    state = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    if cache:  # found while caching: reported once, with the first reason
        assert "skipped 4 unreadable train images (first: cannot read image" in caplog.text
        assert str(damaged[0]) in caplog.text
    else:  # found while loading batches: counted every epoch
        assert state["bad_images"] == 8
        assert "skipped 8 unreadable images during training" in caplog.text


@pytest.mark.parametrize("loading", [
    ["--data.cache_in_memory=true"],
    # found inside a DataLoader worker, whose error torch re-raises with a traceback as message
    ["--data.cache_in_memory=false", "--data.num_workers=1"],
], ids=["cached", "worker"])
def test_on_bad_image_error_names_the_file(quiet, shapes_data, tmp_path, capsys, loading):
    """data.on_bad_image = "error": the first bad image stops the run with its path and id."""
    data = copy_data(shapes_data, tmp_path / "data")
    damaged = _damage_train_images(data)
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", data)
    assert main(["-q", "train", "--config", str(cfg), "--data.on_bad_image=error", *loading]) == 2
    line = one_line_error(capsys)
    assert "cannot read image" in line and "image_id" in line
    assert any(str(p) in line for p in damaged)
    assert "data.on_bad_image" in line
    assert not (tmp_path / "run" / "last.pt").exists()


# =============================================================================================
# Data files
# =============================================================================================


def _karpathy(root: Path) -> dict:
    imgs = sorted((root / "images" / "train").glob("*.png"))
    return {"images": [
        {"filepath": "images/train", "filename": p.name, "imgid": i,
         "split": ("train", "val", "test")[i % 3],
         "sentences": [{"raw": "a red circle", "tokens": ["a", "red", "circle"]}]}
        for i, p in enumerate(imgs[:12])]}


@pytest.mark.parametrize("damage, needle", [
    (lambda d: d["images"][4].pop("sentences"), "images[4]: missing key 'sentences'"),
    (lambda d: d["images"][2].update(split="dev"), "images[2].split: unknown split 'dev'"),
    (lambda d: d["images"][7]["sentences"][0].update(raw=5), "images[7].sentences[0].raw"),
    (None, "invalid JSON at line"),
])
def test_bad_split_file_is_one_line_error_naming_file_and_entry(shapes_data, tmp_path, capsys,
                                                                damage, needle):
    split = tmp_path / "dataset_x.json"
    doc = _karpathy(shapes_data)
    if damage is None:
        text = json.dumps(doc)
        split.write_text(text[: len(text) // 2])  # truncated
    else:
        damage(doc)
        split.write_text(json.dumps(doc))
    before = split.read_bytes()
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", shapes_data)
    assert main(["-q", "train", "--config", str(cfg), "--data.kind=karpathy",
                 f"--data.split_file={split}", f"--data.root={shapes_data}"]) == 2
    line = one_line_error(capsys)
    assert str(split) in line and needle in line
    assert split.read_bytes() == before and not (tmp_path / "run" / "last.pt").exists()


def test_empty_and_unknown_word_captions_are_skipped_and_reported(quiet, shapes_data, tmp_path,
                                                                  caplog):
    """Captions with no word, or only out-of-vocabulary words, are left out and reported."""
    data = copy_data(shapes_data, tmp_path / "data")
    path = data / "captions_train.json"
    doc = json.loads(path.read_text())
    anns = doc["annotations"]
    anns[0]["caption"] = "!!! ..."  # no word at all
    anns[1]["caption"] = "   "  # empty: dropped by the reader already
    anns[2]["caption"] = "zorblax quuxify"  # words seen once: unknown with min_word_freq=2
    path.write_text(json.dumps(doc))
    cfg = tiny_cfg(tmp_path, data, "--data.min_word_freq=2", "--train.epochs=1")
    with caplog.at_level(logging.WARNING):
        result = run_fit(cfg, evaluate_test=False)
    assert result.epochs == 1
    assert ("skipped 1 training captions with no words (first: image_id "
            f"{anns[0]['image_id']}: '!!! ...')") in caplog.text
    assert ("skipped 1 training captions with only unknown words (first: image_id "
            f"{anns[2]['image_id']}: 'zorblax quuxify')") in caplog.text
    # the other 45 captions were all used: 6 batches of 8 (the last one short)
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(steps) == 6


def test_caption_dataset_skip_counts_unit():
    vocab = Vocab.build(["a red circle", "a blue square"])
    recs = [ImageRecord(1, Path("x.png"), ("a red circle", "?!", "zzz yyy", "a zzz"), "train")]
    src = ImageSource.__new__(ImageSource)
    src.records, src.bad, src.cache = recs, {}, [torch.zeros(3, 4, 4)]
    ds = CaptionDataset(src, vocab, max_len=10)
    assert len(ds) == 2  # "a zzz" keeps its known word
    assert ds.skipped == {"no words": 1, "only unknown words": 1}


def test_all_captions_unusable_is_a_clear_error(quiet, shapes_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", shapes_data)
    assert main(["-q", "train", "--config", str(cfg), "--data.min_word_freq=100000"]) == 2
    assert "no usable training captions" in one_line_error(capsys)


# =============================================================================================
# Checkpoints
# =============================================================================================

class _Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil_zip = tmp_path / "evil.pt"
    torch.save({"format": "showattend-checkpoint", "format_version": 1, "model": _Evil(marker)},
               evil_zip)
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    # sanity: the payload is real — a plain pickle.load *would* create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists()

    with _nowarn():
        for path in (evil_zip, evil_pickle):
            with pytest.raises(CheckpointError,
                               match=f"refusing to load {path}: .*(would|could) run code"):
                load_checkpoint(path)
            with pytest.raises(CheckpointError, match="refusing"):
                showattend.load(path, device="cpu")
            assert main(["caption", "x.jpg", "--checkpoint", str(path)]) == 2
            assert "refusing to load" in one_line_error(capsys)
            assert main(["evaluate", "--checkpoint", str(path)]) == 2
            assert "refusing to load" in one_line_error(capsys)
    assert "posix.system" in _message(lambda: load_checkpoint(evil_zip))
    assert not marker.exists()


class _nowarn:
    def __enter__(self):
        import warnings

        self.cm = warnings.catch_warnings()
        self.cm.__enter__()
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of evil.pkl

    def __exit__(self, *exc):
        self.cm.__exit__(*exc)


def _message(fn) -> str:
    with pytest.raises(CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_format_version_mismatch(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    future = tmp_path / "future.pt"
    atomic_torch_save({**ckpt, "format_version": 2}, future)
    assert _message(lambda: load_checkpoint(future)) == (
        f"{future} has checkpoint format version 2, this showattend reads version 1")
    atomic_torch_save({k: v for k, v in ckpt.items() if k != "format_version"}, future)
    assert "format version None" in _message(lambda: load_checkpoint(future))


def test_foreign_files_are_not_checkpoints(checkpoint, tmp_path):
    sd = tmp_path / "state_dict.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["model"], sd)  # a bare state dict
    assert _message(lambda: load_checkpoint(sd)) == f"{sd} is not a showattend checkpoint"
    txt = tmp_path / "notes.pt"
    txt.write_text("name = 'tiny'\n")
    assert "is not a showattend checkpoint" in _message(lambda: load_checkpoint(txt))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "corrupt or truncated" in _message(lambda: load_checkpoint(empty))
    lacking = tmp_path / "lacking.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    atomic_torch_save({k: v for k, v in ckpt.items() if k != "vocab"}, lacking)
    assert "lacks 'vocab'" in _message(lambda: load_checkpoint(lacking))


def test_truncated_or_corrupt_checkpoint(checkpoint, tmp_path):
    """Every cut point tried and random byte damage give one clear error, never wrong weights."""
    raw = checkpoint.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(raw[:1])
    assert "not a showattend checkpoint (corrupt" in _message(lambda: load_checkpoint(bad))
    for cut in (4, 10, 100, 1000, len(raw) // 3, len(raw) // 2, len(raw) - 100, len(raw) - 1):
        bad.write_bytes(raw[:cut])
        msg = _message(lambda: load_checkpoint(bad))
        assert msg.startswith(f"corrupt or truncated checkpoint {bad}: ")
    rng = random.Random(7)
    for _ in range(25):  # flipped bytes anywhere, including inside tensor data
        b = bytearray(raw)
        for _ in range(3):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(b))
        msg = _message(lambda: load_checkpoint(bad))
        assert "corrupt" in msg or "not a showattend checkpoint" in msg
    assert load_checkpoint(checkpoint)["format"] == "showattend-checkpoint"  # original intact


def test_checkpoint_config_vs_weights_mismatch(checkpoint, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    cfg = ckpt["config"]
    cfg["decoder"]["hidden_dim"] = 64  # the weights were made with 32
    bad = tmp_path / "mismatch.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    ck2 = torch.load(bad, weights_only=True)
    assert ck2["config"]["decoder"]["hidden_dim"] == 64
    msg = _message(lambda: loading.load_model(bad))
    assert msg.startswith(f"checkpoint {bad} does not match this showattend: ")
    assert main(["caption", "x.jpg", "--checkpoint", str(bad)]) == 2
    assert "does not match" in one_line_error(capsys)
    # vocabulary of the wrong size for the embedding
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["vocab"] = {"words": ckpt["vocab"]["words"] + ["extra"]}
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    assert "does not match" in _message(lambda: loading.load_model(bad))


@pytest.fixture
def trained_run(quiet, shapes_data, tmp_path):
    """A finished 1-epoch in-process run: (config, out dir, data dir)."""
    data = copy_data(shapes_data, tmp_path / "data")
    cfg = tiny_cfg(tmp_path, data, "--train.epochs=1")
    run_fit(cfg, evaluate_test=False)
    return cfg, tmp_path / "run", data


def test_resume_detects_vocabulary_mismatch(trained_run):
    cfg, out, data = trained_run
    before = (out / "last.pt").read_bytes()
    path = data / "captions_train.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["caption"] += " beside a purple hexagon"
    path.write_text(json.dumps(doc))
    with pytest.raises(T.TrainingError, match=r"vocabulary mismatch: the data now gives \d+ "
                                              r"words, the checkpoint has \d+"):
        run_fit(C.replace(cfg, train={"epochs": 2}), resume=True)
    assert (out / "last.pt").read_bytes() == before


def test_resume_with_changed_config_uses_the_checkpoints(trained_run, caplog):
    cfg, out, _ = trained_run
    changed = C.replace(cfg, decoder={"hidden_dim": 64}, train={"epochs": 2})
    with caplog.at_level(logging.WARNING):
        result = run_fit(changed, resume=True, evaluate_test=False)
    assert "resuming with the configuration saved in the checkpoint" in caplog.text
    assert result.epochs == 2
    saved = load_checkpoint(out / "last.pt")
    assert saved["config"]["decoder"]["hidden_dim"] == 32
    assert json.loads((out / "config.json").read_text())["decoder"]["hidden_dim"] == 32


@pytest.mark.parametrize("damage, needle", [
    (lambda c: c.pop("optimizer"), "missing 'optimizer'"),
    (lambda c: c["model"].update({"decoder.lstm.weight_hh": torch.zeros(3, 3)}), "cannot resume"),
    (lambda c: c["train_state"].update(unknown_counter=3), "unexpected keyword"),
])
def test_resume_from_damaged_state_is_a_clear_error(trained_run, damage, needle):
    cfg, out, _ = trained_run
    ckpt = torch.load(out / "last.pt", weights_only=True)
    damage(ckpt)
    save_checkpoint(out / "last.pt", {k: v for k, v in ckpt.items()
                                      if k not in ("format", "format_version")})
    before = (out / "last.pt").read_bytes()
    with pytest.raises(CheckpointError) as info:
        run_fit(C.replace(cfg, train={"epochs": 2}), resume=True)
    msg = str(info.value)
    assert msg.startswith(f"cannot resume from {out / 'last.pt'}: ") and needle in msg
    assert "\n" not in msg
    assert (out / "last.pt").read_bytes() == before


# =============================================================================================
# Crashes: atomic writes, signals, SIGKILL + resume
# =============================================================================================


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    class Boom(RuntimeError):
        pass

    def exploding_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise Boom("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(Boom):
        atomic_torch_save({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_sigkill_during_write_leaves_old_file(tmp_path):
    """A process killed half-way through an atomic write: the target keeps its old bytes."""
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b'{"old": true}\n')
    script = textwrap.dedent(f"""
        import os, signal
        from showattend.io import atomic_write
        with atomic_write({str(target)!r}) as fh:
            fh.write(b'{{"new": tr')
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert target.read_bytes() == b'{"old": true}\n'


def test_stale_temp_files_of_interrupted_writes_are_removed_at_start(trained_run, tmp_path):
    """A write cut short by SIGKILL leaves its temp file; the next start (here a resume with
    nothing left to train) removes it and leaves the real files as they were."""
    cfg, out, _ = trained_run
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    script = textwrap.dedent(f"""
        import os, signal
        from showattend.io import atomic_write
        with atomic_write({str(out / "last.pt")!r}) as fh:
            fh.write(b"half a checkpoint")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    stale = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # the name an interrupted atomic write really leaves: .<target>.<random>.tmp
    assert len(stale) == 1 and stale[0].name.startswith(".last.pt.")
    assert stale[0].read_bytes() == b"half a checkpoint"
    other = out / "notes.tmp"  # not a temp file of ours (no leading dot): left alone
    other.write_text("mine")
    result = run_fit(cfg, resume=True, evaluate_test=False)
    assert result.epochs == 1
    assert not stale[0].exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert other.read_text() == "mine"
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name
    assert load_checkpoint(out / "last.pt")["train_state"]["epoch"] == 1


def test_training_outputs_are_written_atomically(quiet, shapes_data, tmp_path, monkeypatch):
    """Every file a run writes goes through io.atomic_write (temp file, fsync, rename)."""
    import showattend.io as sio

    renamed, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(sio.os, "replace", lambda a, b: (renamed.append(Path(b).name),
                                                         real_replace(a, b))[1])
    monkeypatch.setattr(sio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    cfg = tiny_cfg(tmp_path, shapes_data, "--train.epochs=1")
    run_fit(cfg)
    out = tmp_path / "run"
    written = {p.name for p in out.iterdir()}
    # metrics.jsonl is appended line by line (a cut last line is dropped on resume)
    assert written - {"metrics.jsonl"} <= set(renamed), written - set(renamed)
    assert {"last.pt", "best.pt", "config.json", "metrics.json"} <= set(renamed)
    assert len(synced) >= len(renamed)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("extra", [[], ["--encoder.backbone=resnet9000"]], ids=["ok", "error"])
def test_fit_restores_process_wide_torch_settings(shapes_data, tmp_path, monkeypatch, extra):
    """fit changes threads / determinism / denormal flushing for the run only, also on error
    (flushed denormals left behind broke hypothesis' float strategies in later test files)."""
    monkeypatch.setattr(RF, "plot_run", lambda *a, **k: None)
    monkeypatch.setattr(showattend.metrics, "_java_available", lambda: False)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    other = 2 if threads == 1 else 1  # a thread count the run must change and then restore
    cfg = tiny_cfg(tmp_path, shapes_data, "--train.epochs=1", f"--train.threads={other}", *extra)
    assert cfg.train.deterministic
    try:
        run_fit(cfg, evaluate_test=False)
    except Exception as exc:  # noqa: BLE001 - the error path must restore too
        assert extra and "unknown backbone" in str(exc)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0  # denormals not flushed


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shapes_data):
    """An uninterrupted 2-epoch in-process run to compare interrupted ones with."""
    tmp = tmp_path_factory.mktemp("reference")
    with _Quiet():
        cfg = tiny_cfg(tmp, shapes_data)
        run_fit(cfg)
    return tmp / "run"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_resume_is_bit_identical(quiet, reference_run, shapes_data,
                                                             tmp_path, caplog, sig):
    """SIGINT/SIGTERM mid-epoch: a final last.pt, a clean return; resuming ends identical."""
    real_step = L.train_step
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2, batch 3 of 6
            os.kill(os.getpid(), sig)
        return real_step(*a, **k)

    quiet.setattr(L, "train_step", step)
    cfg = tiny_cfg(tmp_path, shapes_data)
    before = signal.getsignal(sig)  # SIG_IGN when pytest runs as a background job
    with caplog.at_level(logging.WARNING):
        result = run_fit(cfg)
    assert result.interrupted and result.epochs == 1 and not result.test_metrics
    assert f"interrupted by signal {int(sig)}: saved {tmp_path / 'run' / 'last.pt'}" in caplog.text
    state = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 3, 9)
    assert signal.getsignal(sig) == before  # restored

    quiet.setattr(L, "train_step", real_step)
    result = run_fit(cfg, resume=True)
    assert not result.interrupted and result.epochs == 2
    assert_same_training_state(tmp_path / "run" / "last.pt", reference_run / "last.pt")
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(
        reference_run / "metrics.jsonl")
    m, ref = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "run",
                                                                    reference_run))
    m.pop("decode_images_per_s"), ref.pop("decode_images_per_s")
    assert m == ref


def test_lr_at_cosine_and_plateau_values():
    assert T.lr_at(1e-3, 2, 0.5) == pytest.approx(2.5e-4)  # plateau: two decays
    cos = [T.lr_at(1e-3, 5, 0.5, "cosine", s, 100, 0.1) for s in (0, 50, 100, 150)]
    assert cos == pytest.approx([1e-3, 5.5e-4, 1e-4, 1e-4])  # decays ignored, clamped at the end


def test_cosine_schedule_steps_down_and_resumes_bit_identical(quiet, shapes_data, tmp_path):
    """lr follows the half cosine step by step (logged lr = lr used by the next step) and a run
    interrupted mid-epoch resumes to the same weights as an uninterrupted one."""
    sched = ("--train.lr_schedule=cosine", "--train.lr_final=0.1", "--train.log_every=1")
    ref_cfg = tiny_cfg(tmp_path, shapes_data, *sched, out="ref")
    run_fit(ref_cfg, evaluate_test=False)
    logged = [r for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"]
    total = ref_cfg.train.epochs * 6  # 48 training captions in batches of 8
    assert [r["step"] for r in logged] == list(range(1, total + 1))
    base = ref_cfg.train.lr
    for r in logged:  # the lr set for step s (0-based) = r["step"] - 1
        assert r["lr"] == pytest.approx(T.lr_at(base, 0, 0.5, "cosine", r["step"] - 1, total, 0.1))
    assert logged[0]["lr"] == pytest.approx(base) and logged[-1]["lr"] < 0.2 * base

    real_step = signal_at_step(quiet, 9)  # epoch 2, batch 3 of 6
    cfg = tiny_cfg(tmp_path, shapes_data, *sched, out="cut")
    assert run_fit(cfg, evaluate_test=False).interrupted
    quiet.setattr(L, "train_step", real_step)
    run_fit(cfg, resume=True, evaluate_test=False)
    assert_same_training_state(tmp_path / "cut" / "last.pt", tmp_path / "ref" / "last.pt")


def test_cli_exits_cleanly_on_sigint(quiet, shapes_data, tmp_path, capsys):
    real_step = L.train_step
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)

    quiet.setattr(L, "train_step", step)
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", shapes_data)
    assert main(["-q", "train", "--config", str(cfg)]) == 130
    out = capsys.readouterr().out
    assert f"interrupted: saved {tmp_path / 'run' / 'last.pt'}; continue with --resume" in out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["step"] == 2


KILL_SEED = 20240611


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    """The real CLI, killed (SIGTERM once, then SIGKILL at random moments) and resumed until
    done, ends with bit-identical weights and identical metrics.jsonl / metrics.json."""
    data = tmp_path / "data"
    env = {**os.environ, "PATH": str(tmp_path / "no-java")}  # skip ~1 s of Java per evaluation
    env.pop("PYTHONWARNINGS", None)

    def config(name: str) -> Path:
        return write_config(tmp_path / f"{name}.toml", tmp_path / name, data, n_train=72, epochs=3)

    def cmd(cfg: Path, resume: bool) -> list[str]:
        return [str(EXE), "-q", "train", "--config", str(cfg)] + (["--resume"] if resume else [])

    t0 = time.monotonic()
    ref = subprocess.Popen(cmd(config("ref"), False), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    while ref.poll() is None and not (tmp_path / "ref" / "metrics.jsonl").exists():
        time.sleep(0.02)
    startup = time.monotonic() - t0  # imports, data, model: until the first step is logged
    _, stderr = ref.communicate(timeout=300)
    duration = time.monotonic() - t0
    assert ref.returncode == 0, stderr[-2000:]

    cfg = config("killed")
    out = tmp_path / "killed"
    # 1) SIGTERM in the middle of epoch 1: a clean exit 130 with a mid-epoch last.pt
    proc = subprocess.Popen(cmd(cfg, False), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        log = out / "metrics.jsonl"
        recs = log.read_text().splitlines() if log.exists() else []
        if sum('"kind": "train"' in r for r in recs) >= 4:  # 9 batches per epoch
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: saved" in stdout and "Traceback" not in stderr
    assert load_checkpoint(out / "last.pt")["train_state"]["batch_in_epoch"] > 0

    # 2) SIGKILL at random moments (fixed seed), resuming each time, until a run finishes. Each
    # kill time is uniform between 2 s and 70 % of the time this attempt needs to finish (as
    # measured on the uninterrupted run, for the epochs still to do), so kills land all over the
    # run and still land when this attempt runs faster than the reference did (a host's load
    # changes from run to run: with the whole span, a fast attempt could finish before its kill).
    rng = random.Random(KILL_SEED)
    kills: list[tuple[float, float]] = []  # (seconds after start, epochs done before the attempt)
    for attempt in range(8):
        state = load_checkpoint(out / "last.pt")["train_state"]
        done = min(1.0, (state["epoch"] + state["batch_in_epoch"] / 9) / 3)
        remaining = startup + (duration - startup) * (1 - done)
        at = rng.uniform(2.0, max(2.5, 0.7 * remaining)) if len(kills) < 4 else None
        proc = subprocess.Popen(cmd(cfg, True), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = proc.communicate(timeout=at)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            kills.append((round(at, 2), round(done * 3, 2)))
            continue
        assert proc.returncode == 0, stderr[-2000:]
        break
    else:
        pytest.fail(f"the run never finished (kills: {kills})")
    print(f"kills (s after start, epochs done before): {kills}")
    assert len(kills) >= 2, kills

    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(out / name), load_checkpoint(tmp_path / "ref" / name)
        for k in b["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    assert_same_training_state(out / "last.pt", tmp_path / "ref" / "last.pt")
    got, want = read_jsonl(out / "metrics.jsonl"), read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r for r in got if r["kind"] == "val"] == [r for r in want if r["kind"] == "val"]
    assert got == want
    m, r = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "ref"))
    m.pop("decode_images_per_s"), r.pop("decode_images_per_s")
    assert m == r
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no stale temp files


def _signal_at(call: int, sig: int):
    """train_step wrapper that sends ``sig`` to this process at its ``call``-th call."""
    real_step = L.train_step
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return real_step(*a, **k)

    return step


def _train_records(out: Path) -> int:
    log = out / "metrics.jsonl"
    return log.read_text().count('"kind": "train"') if log.exists() else 0


@pytest.mark.parametrize("mix", ["off", "batch", "sample"])
def test_hard_run_killed_and_resumed_is_bit_identical(quiet, shapes_data, tmp_path, mix):
    """A hard-attention run carries more than weights and optimiser: the REINFORCE baseline and
    the RNG stream that draws locations (and, with mixing, which batches or captions use the
    expected context). Stopped by SIGTERM mid-epoch 1, resumed by the real CLI and SIGKILLed in
    epoch 2, resumed again: it ends bit-identical to a run never interrupted."""
    hard = ("--attention.kind=hard", f"--hard.mix_mode={mix}", "--hard.lambda_r=0.05",
            "--hard.lambda_e=0.001")
    ref_cfg = tiny_cfg(tmp_path, shapes_data, *hard, out="ref")
    run_fit(ref_cfg, evaluate_test=False)
    ref = tmp_path / "ref"
    assert load_checkpoint(ref / "last.pt")["train_state"]["baseline"] < 0  # the REINFORCE path ran

    cfg = tiny_cfg(tmp_path, shapes_data, *hard, out="run")
    out = tmp_path / "run"
    # 1) SIGTERM at batch 4 of 6 of epoch 1: a mid-epoch checkpoint (baseline, RNG, position)
    real_step = L.train_step
    quiet.setattr(L, "train_step", _signal_at(4, signal.SIGTERM))
    assert run_fit(cfg, evaluate_test=False).interrupted
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 4) and state["baseline"] is not None
    quiet.setattr(L, "train_step", real_step)
    # 2) the console script resumes and is SIGKILLed during epoch 2 (no handler, no save): the
    # next resume starts from the end of epoch 1 and drops the log lines written after it
    env = {**os.environ, "PATH": str(tmp_path / "no-java")}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen([str(EXE), "-q", "train", "--config", str(tmp_path / "run.toml"),
                             *hard, "--resume"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and _train_records(out) < 8:  # 6 per epoch
            time.sleep(0.01)
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0
    assert _train_records(out) >= 8  # lines of epoch 2 that the resume must drop
    # 3) resumed to the end
    result = run_fit(cfg, resume=True, evaluate_test=False)
    assert result.epochs == 2 and not result.interrupted
    assert_same_training_state(out / "last.pt", ref / "last.pt")  # incl. baseline and RNG
    for k, v in load_checkpoint(ref / "best.pt")["model"].items():
        assert torch.equal(load_checkpoint(out / "best.pt")["model"][k], v), k
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(ref / "metrics.jsonl")


# =============================================================================================
# Numerics
# =============================================================================================


def _poison_step(at: int, kind: str):
    """train_step wrapper: at call ``at`` return a NaN loss, or a finite loss with NaN grads."""
    real = L.train_step
    calls = {"n": 0}

    def step(model, *a, **k):
        loss, rec = real(model, *a, **k)
        calls["n"] += 1
        if calls["n"] == at:
            if kind == "loss":
                loss = loss * float("nan")
            else:  # d/dx sqrt(x) at 0 is inf, times 0 → NaN gradient, while the value stays 0
                p = next(model.parameters())
                loss = loss + torch.sqrt((p * 0).sum())
        return loss, rec

    return step


@pytest.mark.parametrize("kind, what", [("loss", "non-finite loss (nan)"),
                                        ("grad", "non-finite gradient norm")], ids=["loss", "grad"])
def test_non_finite_stops_and_keeps_last_good_checkpoint(quiet, shapes_data, tmp_path, kind, what):
    cfg = tiny_cfg(tmp_path, shapes_data)
    out = tmp_path / "run"
    snapshot = {}
    poisoned = _poison_step(9, kind)  # epoch 2, batch 3

    def step(*a, **k):
        if not snapshot and (out / "last.pt").exists():
            snapshot.update(last=(out / "last.pt").read_bytes(),
                            best=(out / "best.pt").read_bytes())
        return poisoned(*a, **k)

    quiet.setattr(L, "train_step", step)
    with pytest.raises(T.TrainingError) as info:
        run_fit(cfg)
    msg = str(info.value)
    assert msg.startswith(f"{what}") and "epoch 2, step 8" in msg
    assert "last good checkpoint is intact" in msg and "\n" not in msg
    assert (out / "last.pt").read_bytes() == snapshot["last"]
    assert (out / "best.pt").read_bytes() == snapshot["best"]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "val"] == [1]


def test_non_finite_stop_via_cli_is_one_line(quiet, shapes_data, tmp_path, capsys):
    quiet.setattr(L, "train_step", _poison_step(2, "loss"))
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", shapes_data)
    assert main(["-q", "train", "--config", str(cfg)]) == 2
    assert "non-finite loss (nan) at epoch 1, step 1" in one_line_error(capsys)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nan_policy_skip_skips_the_step(quiet, shapes_data, tmp_path, caplog, kind):
    quiet.setattr(L, "train_step", _poison_step(4, kind))
    cfg = tiny_cfg(tmp_path, shapes_data, "--train.nan_policy=skip")
    with caplog.at_level(logging.WARNING):
        result = run_fit(cfg, evaluate_test=False)
    assert result.epochs == 2 and not result.interrupted
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_state"]["skipped_steps"] == 1
    assert ckpt["train_state"]["step"] == 11  # 12 batches, one skipped
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "skipped a batch after step 3 of epoch 1: non-finite" in caplog.text


# =============================================================================================
# CLI: every user error is one line and exit code 2
# =============================================================================================


@pytest.fixture
def existing_run(tmp_path, shapes_data, checkpoint):
    """An out dir with a last.pt that no failed command may touch."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(checkpoint, out / "last.pt")
    cfg = write_config(tmp_path / "c.toml", out, shapes_data)
    return cfg, out, (out / "last.pt").read_bytes()


CLI_ERRORS = [
    # bad flag values (argparse): one line, not the usage block
    (["caption", "a.jpg", "--checkpoint", "{ckpt}", "--beam", "0"], "--beam must be positive"),
    (["caption", "a.jpg", "--checkpoint", "{ckpt}", "--beam", "zero"], "invalid int value: 'zero'"),
    (["evaluate", "--checkpoint", "{ckpt}", "--split", "dev"], "invalid choice: 'dev'"),
    (["train"], "the following arguments are required: --config"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["caption", "a.jpg", "--checkpoint", "{ckpt}", "--frob"], "unrecognized arguments: --frob"),
    # bad config keys and values
    (["train", "--config", "{cfg}", "--train.lrr=1"], "unknown config key train.lrr"),
    (["train", "--config", "{cfg}", "--trian.lr=1"], "unknown config key trian"),
    (["train", "--config", "{cfg}", "--train.lr=abc"], "train.lr: expected float"),
    (["train", "--config", "{cfg}", "--train.lr=nan"], "train.lr is NaN"),
    (["train", "--config", "{cfg}", "--train.lr=inf"], "train.lr must be a finite number > 0"),
    (["train", "--config", "{cfg}", "--train.log_every=0"], "train.log_every must be > 0"),
    (["train", "--config", "{cfg}", "--eval.batch_size=0"], "eval.batch_size must be > 0"),
    (["train", "--config", "{cfg}", "--encoder.channels=0"], "encoder.channels must be > 0"),
    (["train", "--config", "{cfg}", "--data.n_train=-5"], "data.n_train must be >= 0"),
    (["train", "--config", "{cfg}", "--data.max_images=-2"], "data.max_images must be >= 0"),
    (["train", "--config", "{cfg}", "--train.weight_decay=-1"], "train.weight_decay must be >= 0"),
    (["train", "--config", "{cfg}", "--train.nan_policy=ignore"], "train.nan_policy = 'ignore'"),
    (["train", "--config", "{cfg}", "--encoder.backbone=resnet9000"], "unknown backbone"),
    # missing files
    (["train", "--config", "{tmp}/nope.toml"], "config file not found"),
    (["train", "--config", "{cfg}", "--resume", "--out_dir={tmp}/elsewhere"],
     "--resume: no checkpoint"),
    (["caption", "a.jpg", "--checkpoint", "{tmp}/nope.pt"], "checkpoint not found"),
    (["caption", "{tmp}/empty_dir", "--checkpoint", "{ckpt}"], "no images found"),
    (["evaluate", "--results", "{tmp}/r.json", "--annotations", "{tmp}/a.json"], "no such file"),
    (["train", "--config", "{cfg}", "--data.kind=karpathy", "--data.split_file={tmp}/s.json"],
     "no such file"),
    # a GPU asked for where there is none
    (["train", "--config", "{cfg}", "--train.device=cuda"], "no CUDA GPU is available"),
    (["train", "--config", "{cfg}", "--train.device=mps"], "device 'mps' was requested but is not"),
    (["caption", "a.jpg", "--checkpoint", "{ckpt}", "--device", "cuda:1"], "CUDA GPU"),
    (["train", "--config", "{cfg}", "--train.device=tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("argv, needle", CLI_ERRORS, ids=[" ".join(a[:1] + a[-1:])
                                                         for a, _ in CLI_ERRORS])
def test_cli_user_errors_are_one_line_exit_2(existing_run, checkpoint, tmp_path, capsys, argv,
                                             needle):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg, out, before = existing_run
    (tmp_path / "empty_dir").mkdir()
    argv = [a.format(cfg=cfg, ckpt=out / "last.pt", tmp=tmp_path) for a in argv]
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse errors leave through SystemExit
        code = exc.code
    assert code == 2
    line = one_line_error(capsys)
    assert needle in line, line
    assert (out / "last.pt").read_bytes() == before  # nothing lost
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_console_script_errors_have_no_traceback(tmp_path, checkpoint):
    """The installed console script: real exit codes, one stderr line, for a deep error."""
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(checkpoint.read_bytes()[:5000])
    for argv, needle in (
        (["caption", "x.jpg", "--checkpoint", str(bad)], "corrupt or truncated checkpoint"),
        (["caption", "x.jpg", "--checkpoint", str(checkpoint), "--beam", "-3"], "--beam must be"),
    ):
        r = subprocess.run([str(EXE), *argv], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
