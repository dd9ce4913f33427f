"""`prepare` end to end: Flickr/COCO readers, the uint8 store and feature cache, resuming after an
interruption, the skip summary, and training/evaluating/captioning from a prepared folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prep_fixtures import make_coco, make_flickr, prepared_toml
from showattend.cli import main
from showattend.config import load_config
from showattend.data.coco import DataFormatError
from showattend.data.flickr import read_flickr, read_flickr_tokens, read_split_list
from showattend.data.images import Preprocessor
from showattend.data.prepare import input_overrides, prepare
from showattend.data.prepared import PreparedDataError, encoder_fingerprint, open_prepared
from showattend.models.encoder import Encoder
from showattend.vocab import Vocab

SHARED = Path("/work/shared/flickr8k")


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    return make_flickr(tmp_path_factory.mktemp("flickr"))


def _cfg(tmp: Path, fx, name: str, backbone: str = "shapes_cnn", **kw):
    path = prepared_toml(tmp / f"{name}.toml", fx, tmp / f"prep_{name}", tmp / f"run_{name}",
                         backbone=backbone, **kw)
    return path, load_config(path)


def _resnet(tmp: Path, fx, name: str):
    # resnet50 with weights "none" and no fine-tuning: a frozen encoder, so a feature cache.
    return _cfg(tmp, fx, name, backbone="resnet50", grid=2, coords=False)


@pytest.fixture(scope="module")
def store_run(flickr, tmp_path_factory):
    """(config path, config, PrepareResult): the Flickr fixture prepared for a trained encoder."""
    tmp = tmp_path_factory.mktemp("store")
    path, cfg = _cfg(tmp, flickr, "store")
    return path, cfg, prepare(cfg, workers=2, progress=False)


@pytest.fixture(scope="module")
def cache_run(flickr, tmp_path_factory):
    """The Flickr fixture prepared with a frozen resnet50: image store and feature cache."""
    tmp = tmp_path_factory.mktemp("cache")
    path, cfg = _resnet(tmp, flickr, "cache")
    return path, cfg, prepare(cfg, workers=1, progress=False, chunk_size=4, feature_batch=4)


# ---------------------------------------------------------------------------------- readers


def test_flickr_reader_on_generated_files(flickr):
    notes: list[str] = []
    recs = read_flickr(flickr["token"], flickr["splits"], flickr["images"], notes=notes)
    assert {s: len(r) for s, r in recs.items()} == {"train": 8, "val": 3, "test": 3}
    first = recs["train"][0]
    assert first.image_id == 1000 and first.path == flickr["images"] / "1000_0000abcd.jpg"
    # CRLF stripped, #k order kept, whitespace normalised
    assert first.captions[0] == "A red circle ." and len(first.captions) == 5
    assert all("\r" not in c for r in recs["train"] for c in r.captions)
    assert len(notes) == 1 and "2258277193_586949ec62.jpg.1" in notes[0] and "line 8" in notes[0]


@pytest.mark.skipif(not (SHARED / "Flickr8k.token.txt").is_file(), reason="no Flickr8k text files")
def test_flickr_reader_on_the_official_files():
    notes: list[str] = []
    recs = read_flickr(SHARED / "Flickr8k.token.txt", SHARED, "/images", notes=notes)
    assert {s: len(r) for s, r in recs.items()} == {"train": 5997, "val": 1000, "test": 1000}
    assert all(len(r.captions) == 5 for rs in recs.values() for r in rs)
    assert any("2258277193_586949ec62.jpg.1" in n for n in notes)
    assert any("in no split list" in n for n in notes)


@pytest.mark.parametrize("content, expect", [
    (b"", "empty file"),
    (b"\r\n  \n", "empty file"),
    (b"a.jpg#0\tA dog.\nb.jpg#0 no tab here\n", "line 2: expected NAME#K<TAB>CAPTION"),
    (b"a.jpg\tA dog.\n", "line 1: expected NAME#K before the tab"),
    (b"a.jpg#x\tA dog.\n", "line 1: expected NAME#K"),
    (b"a.jpg#0\tA dog.\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n", "line 2: not UTF-8"),
    (b"a.jpg#0\tA dog.\nb.jpg#0\tA\x00cat\n", "line 2: binary data (NUL byte)"),
    (b"a.jpg#0\tA dog.\na.jpg#1\t\xff\xfe caf\xe9\n", "line 2: not UTF-8"),
    (b"a.jpg#0\tA dog.\na.jpg#0\tA cat.\n", "line 2: duplicate caption a.jpg#0 (first at line 1)"),
    (b"x.jpg.1#0\tonly a bad name\n", "no captions of image files"),
])
def test_token_file_hostile_input(tmp_path, content, expect):
    path = tmp_path / "tokens.txt"
    path.write_bytes(content)
    with pytest.raises(DataFormatError) as err:
        read_flickr_tokens(path)
    assert str(path) in str(err.value) and expect in str(err.value)
    assert "\n" not in str(err.value)


def test_split_list_and_folder_errors(tmp_path, flickr):
    lst = tmp_path / "train.txt"
    lst.write_bytes(b"a.jpg\r\nb.jpg\r\n\r\na.jpg\r\n")
    assert read_split_list(lst) == ["a.jpg", "b.jpg"]  # CRLF, blank line and repeat
    lst.write_bytes(b"a.jpg\nb.jpg c.jpg\n")
    with pytest.raises(DataFormatError, match="line 2: expected one image file name"):
        read_split_list(lst)
    with pytest.raises(DataFormatError, match="no such file"):
        read_split_list(tmp_path / "absent.txt")
    # a folder without a test list, and a name listed twice
    d = tmp_path / "lists"
    d.mkdir()
    (d / "Flickr_8k.trainImages.txt").write_text("1000_0000abcd.jpg\n")
    (d / "Flickr_8k.devImages.txt").write_text("1001_0001abcd.jpg\n")
    with pytest.raises(DataFormatError, match="no test list"):
        read_flickr(flickr["token"], d, flickr["images"])
    (d / "Flickr_8k.testImages.txt").write_text("1000_0000abcd.jpg\n")
    with pytest.raises(DataFormatError, match="also in the train list"):
        read_flickr(flickr["token"], d, flickr["images"])


def test_input_overrides_validate_sources():
    assert input_overrides(images="im", flickr_captions="t.txt", flickr_splits="s", out="o") == [
        'data.root="im"', "data.kind=flickr", 'data.flickr_captions="t.txt"',
        'data.flickr_splits="s"', 'data.prepared="o"']
    with pytest.raises(PreparedDataError, match="go together"):
        input_overrides(images="im", flickr_captions="t.txt")
    with pytest.raises(PreparedDataError, match="one source"):
        input_overrides(images="im", split_file="k.json", annotations=["a", "b"])
    # one file: its images are split into train / val / test (data.split)
    assert input_overrides(images="im", annotations=["a"]) == [
        'data.root="im"', "data.kind=coco", 'data.train_annotations="a"']
    with pytest.raises(PreparedDataError, match="train and val"):
        input_overrides(images="im", annotations=["a", "b", "c", "d"])
    with pytest.raises(PreparedDataError, match="need --images"):
        input_overrides(split_file="k.json")


# ---------------------------------------------------------------------------------- prepare


def test_store_holds_the_preprocessor_pixels_and_skips_bad_images(store_run, flickr):
    _, cfg, result = store_run
    folder = open_prepared(cfg.data.prepared)
    m = folder.manifest
    # 14 listed photos, one missing: the store has a row for each of the 13 files that exist
    assert m["images"]["shape"] == [13, 32, 32, 3] and m["features"] is None
    assert "not frozen" in m["features_note"]
    # the skip summary: one of each kind, with the file in the first example
    by = m["skipped"]["by_reason"]
    assert {k: v["count"] for k, v in by.items()} == {"missing": 1, "unreadable": 1,
                                                      "too small": 1, "decompression bomb": 1}
    assert "1002_0002abcd.jpg" in by["missing"]["examples"][0]
    assert "1005_0005abcd.jpg" in by["unreadable"]["examples"][0]
    assert "8x8" in by["too small"]["examples"][0]
    assert "1013_000dabcd.jpg" in by["decompression bomb"]["examples"][0]
    assert m["counts"]["train"] == {"images": 6, "captions": 30}
    assert m["counts"]["val"]["images"] == 2 and m["counts"]["test"]["images"] == 2
    assert any("2258277193_586949ec62.jpg.1" in n for n in m["notes"])
    summary = result.summary()
    assert "missing 1" in summary and "too small 1" in summary and "unreadable 1" in summary
    report = result.skipped_report()  # for stderr: one line per reason, with the first ones
    assert len(report) == 4 and any("1002_0002abcd.jpg" in ln for ln in report)
    # failed images are out of the splits; the vocabulary comes from usable train captions only
    ids = {r.image_id for rs in folder.records.values() for r in rs}
    assert not ids & {1002, 1005, 1009, 1013}
    train_caps = [c for r in folder.records["train"] for c in r.captions]
    assert folder.vocab == Vocab.build(train_caps)
    assert "zebra" not in folder.vocab.stoi and "tree" not in folder.vocab.stoi
    assert "red" in folder.vocab.stoi
    # every stored row is exactly what the one Preprocessor makes of the file, and reading it
    # back through normalize gives the on-the-fly tensor bit for bit
    store = np.load(folder.images_path)
    pre = Preprocessor((32, 32), (0.5,) * 3, (0.25,) * 3)
    for rec in [r for rs in folder.records.values() for r in rs]:
        row = folder.row(rec)
        assert np.array_equal(store[row], pre.view(rec.path))
        assert torch.equal(pre.normalize(store[row]), pre(rec.path))
    failed_rows = [int(k) for k in m["skipped"]["rows"] if int(k) < len(store)]
    assert len(failed_rows) == 3  # unreadable, too small, bomb: rows left blank (missing: none)
    for failed in failed_rows:
        assert not store[failed].any()


def test_train_evaluate_caption_from_the_image_store(store_run, flickr, monkeypatch, capsys):
    path, cfg, _ = store_run
    calls = []
    forward = Encoder.forward
    monkeypatch.setattr(Encoder, "forward", lambda self, x: calls.append(x.shape) or
                        forward(self, x))
    assert main(["-q", "train", "--config", str(path)]) == 0
    assert calls and all(tuple(s[1:]) == (3, 32, 32) for s in calls)  # images reach the encoder
    run = Path(cfg.out_dir)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["vocab"] == open_prepared(cfg.data.prepared).vocab.to_dict()
    assert ckpt["config"]["data"]["prepared"] == str(Path(cfg.data.prepared).resolve())
    results = json.loads((run / "results_test_beam2.json").read_text())
    assert sorted(r["image_id"] for r in results) == [1011, 1012]
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(run / "best.pt"), "--split", "val",
                 "--no-meteor"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and "BLEU-4" in metrics
    img = flickr["images"] / "1000_0000abcd.jpg"
    assert main(["-q", "caption", str(img), "--checkpoint", str(run / "best.pt")]) == 0
    assert capsys.readouterr().out.startswith(f"{img}\t")


def test_train_evaluate_caption_from_the_feature_cache(cache_run, flickr, monkeypatch, capsys):
    path, cfg, result = cache_run
    folder = open_prepared(cfg.data.prepared)
    feats = np.load(folder.features_path)
    assert feats.dtype == np.float16 and feats.shape == (13, 4, 2048)  # a row per existing file
    assert result.features_computed == 10  # the good images only
    # the cache is the frozen encoder's output on the stored pixels
    from showattend.models.captioner import Captioner

    model = Captioner.from_config(cfg, 4)
    model.encoder.load_state_dict(torch.load(Path(cfg.data.prepared) / "encoder.pt",
                                             weights_only=True))
    assert encoder_fingerprint(model.encoder) == folder.manifest["features"]["fingerprint"]
    pre = Preprocessor((32, 32), model.encoder.normalisation.mean,
                       model.encoder.normalisation.std)
    rec = folder.records["train"][0]
    with torch.no_grad():
        want = model.encoder.eval()(pre(rec.path)[None])[0]  # (L, D)
    got = torch.from_numpy(feats[folder.row(rec)].astype(np.float32))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)

    calls = []
    forward = Encoder.forward
    monkeypatch.setattr(Encoder, "forward", lambda self, x: calls.append(x.shape) or
                        forward(self, x))
    assert main(["-q", "train", "--config", str(path)]) == 0
    assert calls == []  # fast path: training, validation and test never ran the encoder
    run = Path(cfg.out_dir)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    enc_state = torch.load(Path(cfg.data.prepared) / "encoder.pt", weights_only=True)
    for k, v in enc_state.items():  # the checkpoint carries the encoder that made the cache
        assert torch.equal(ckpt["model"][f"encoder.{k}"], v), k
    # training ends with evaluate_checkpoint on the test split (what `evaluate` runs): it read
    # the cache too, through the checkpoint's encoder fingerprint
    assert json.loads((run / "metrics_test_beam2.json").read_text())["images"] == 2
    capsys.readouterr()
    img = flickr["images"] / "1012_000cabcd.jpg"
    assert main(["-q", "caption", str(img), "--checkpoint", str(run / "best.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == str(img)
    assert len(calls) == 1  # raw images go through the checkpoint's encoder


def test_coco_fixture_prepare_train_evaluate_from_explicit_inputs(tmp_path, capsys):
    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "prep"
    # the model comes from a config; the inputs are given on the command line
    cfg_path, _ = _cfg(tmp_path, {"images": "x", "token": "x", "splits": "x"}, "coco")
    code = main(["-q", "prepare", "--config", str(cfg_path), "--images", str(fx["images"]),
                 "--annotations", str(fx["train"]), str(fx["val"]), str(fx["test"]),
                 "--out", str(out), "--workers", "2"])
    assert code == 0
    got = capsys.readouterr()
    summary = got.out
    assert "train 5 images / 25 captions" in summary and "missing 1" in summary
    assert "unreadable 1" in summary
    # the skipped images on stderr: one line per reason, never one per image
    assert "1 images missing (left out)" in got.err and "1 images unreadable" in got.err
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["kind"] == "coco" and m["counts"]["test"]["images"] == 3
    run = tmp_path / "run"
    assert main(["-q", "train", "--config", str(cfg_path), f"--data.prepared={out}",
                 f"--out_dir={run}"]) == 0
    results = json.loads((run / "results_test_beam2.json").read_text())
    assert sorted(r["image_id"] for r in results) == [509, 510, 511]

    # one captions file: its three images split into train / val / test, one each, said so
    single = tmp_path / "prep_test"
    assert main(["-q", "prepare", "--config", str(cfg_path), "--images", str(fx["images"]),
                 "--annotations", str(fx["test"]), "--out", str(single), "--no-features"]) == 0
    assert "train 1 images" in capsys.readouterr().out
    m = json.loads((single / "manifest.json").read_text())
    assert [m["counts"][s]["images"] for s in ("train", "val", "test")] == [1, 1, 1]
    assert m["source"]["split"] == "0.8,0.1,0.1" and m["source"]["seed"] == 0
    # and a model scores the same captions file straight from the image folder
    code = main(["-q", "evaluate", "--checkpoint", str(run / "best.pt"), "--images",
                 str(fx["images"]), "--annotations", str(fx["test"]), "--no-meteor"])
    assert code == 0
    got = capsys.readouterr()
    assert json.loads(got.out.strip().splitlines()[-1])["images"] == 3.0
    # an annotated image that is not in the folder is reported and skipped
    data = json.loads(Path(fx["test"]).read_text())
    data["images"].append({"id": 999, "file_name": "gone.jpg", "width": 8, "height": 8})
    data["annotations"].append({"id": 9999, "image_id": 999, "caption": "a red square"})
    extra = tmp_path / "with_missing.json"
    extra.write_text(json.dumps(data))
    assert main(["-q", "evaluate", "--checkpoint", str(run / "best.pt"), "--images",
                 str(fx["images"]), "--annotations", str(extra), "--no-meteor"]) == 0
    got = capsys.readouterr()
    assert "skipped: " in got.err and "gone.jpg: not found (image_id 999)" in got.err
    assert json.loads(got.out.strip().splitlines()[-1])["skipped_images"] == 1.0


# ---------------------------------------------------------------------------------- resuming


class _Stop(Exception):
    pass


def _stop_after(phase: str, k: int):
    seen = []

    def hook(p: str, done: int) -> None:
        if p == phase:
            seen.append(done)
            if len(seen) == k:
                raise _Stop
    return hook


def test_interrupted_prepare_resumes_without_redoing_work(cache_run, flickr, tmp_path):
    _, ref_cfg, _ = cache_run
    ref = Path(ref_cfg.data.prepared)
    _, cfg = _resnet(tmp_path, flickr, "resume")
    out = Path(cfg.data.prepared)
    kw = dict(workers=1, progress=False, chunk_size=4, feature_batch=4)
    with pytest.raises(_Stop):
        prepare(cfg, on_chunk=_stop_after("images", 2), **kw)
    with pytest.raises(PreparedDataError, match="not a finished prepared folder"):
        open_prepared(out)  # nothing half-made is readable
    seen = []
    stop = _stop_after("features", 1)

    def hook(phase: str, done: int) -> None:
        seen.append((phase, done))
        stop(phase, done)

    with pytest.raises(_Stop):  # resumes the images, then stops in the features
        prepare(cfg, on_chunk=hook, **kw)
    # 8 rows were done: the images continue with rows 8-11 and 12 (13 rows: the missing
    # file has none), the features start at 0
    assert seen == [("images", 12), ("images", 13), ("features", 4)]
    assert not (out / "manifest.json").exists()
    done = []
    r = prepare(cfg, on_chunk=lambda p, n: done.append((p, n)), **kw)
    assert r.images_computed == 0  # all 13 rows were decoded by the first two calls
    assert r.features_computed == 10 - 4  # only the features not yet done
    assert done == [("features", 8), ("features", 10)]
    # the result is the uninterrupted run's, bit for bit
    for name in ("images.npy", "features.npy", "records.json", "vocab.json", "encoder.pt"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not (out / ".work").exists()
    # a finished folder is not redone
    again = prepare(cfg, **kw)
    assert again.images_computed == 0 and again.features_computed == 0


def test_killed_prepare_resumes(store_run, flickr, tmp_path):
    """SIGKILL (no cleanup at all) in the middle of the multi-process image phase."""
    _, ref_cfg, _ = store_run
    cfg_path, cfg = _cfg(tmp_path, flickr, "killed")
    out = Path(cfg.data.prepared)
    code = (
        "import os, signal, sys\n"
        "from showattend.config import load_config\n"
        "from showattend.data.prepare import prepare\n"
        "def hook(phase, done):\n"
        "    if done >= 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"prepare(load_config({str(cfg_path)!r}), workers=2, progress=False, chunk_size=2,\n"
        "        on_chunk=hook)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    state = json.loads((out / ".work" / "images.progress.json").read_text())
    done_before = sum(s != "0" for s in state["status"])
    assert 4 <= done_before < 14
    r = prepare(cfg, workers=2, progress=False, chunk_size=2)
    assert r.images_computed == 13 - done_before  # the 13 files that exist
    ref = Path(ref_cfg.data.prepared)
    assert (out / "images.npy").read_bytes() == (ref / "images.npy").read_bytes()
    assert (out / "records.json").read_bytes() == (ref / "records.json").read_bytes()


def test_features_added_to_a_store_only_folder(cache_run, flickr, tmp_path):
    _, ref_cfg, _ = cache_run
    _, cfg = _resnet(tmp_path, flickr, "later")
    first = prepare(cfg, workers=1, progress=False, features=False)
    assert first.manifest["features"] is None and "--no-features" in first.summary()
    second = prepare(cfg, workers=1, progress=False, feature_batch=4)
    assert second.images_computed == 0 and second.features_computed == 10
    ref = Path(ref_cfg.data.prepared)
    out = Path(cfg.data.prepared)
    assert (out / "features.npy").read_bytes() == (ref / "features.npy").read_bytes()


# ---------------------------------------------------------------------------------- refusals


def test_mismatched_cache_or_store_is_refused(cache_run, tmp_path):
    path, cfg, _ = cache_run
    run = tmp_path / "run"
    # another grid: the cache's annotations do not fit the model
    with pytest.raises(PreparedDataError) as err:
        from showattend.train import fit

        fit(load_config(path, ["encoder.grid=1", f"out_dir={json.dumps(str(run))}"]),
            progress=False)
    msg = str(err.value)
    assert "grid=2" in msg and "grid=1" in msg and 'data.features = "off"' in msg
    assert not (run / "last.pt").exists()
    # another image size: neither the cache nor the store can serve it
    assert main(["-q", "train", "--config", str(path), "--encoder.image_size=48",
                 f"--out_dir={run}"]) == 2
    # features off: the same grid change reads the image store instead
    from showattend.data.splits import load_splits
    from showattend.data.splits import make_source
    from showattend.models.captioner import Captioner
    from showattend.loading import make_preprocess

    off = load_config(path, ["encoder.grid=1", "data.features=off"])
    splits = load_splits(off.data)
    model = Captioner.from_config(off, 20)
    src = make_source(off, splits, splits.val, make_preprocess(off, model), model, False, "val",
                      False, "skip")
    assert not src.features and src[0].shape == (3, 32, 32)
    # a model whose encoder is not the one that made the cache (other random weights) reads
    # the store; with the cache's encoder loaded it reads the features
    from showattend.data.prepared import load_cache_encoder

    model = Captioner.from_config(cfg, 20)
    args = (splits.val, make_preprocess(cfg, model), model, False, "val", False, "skip")
    assert not make_source(cfg, splits, *args).features
    load_cache_encoder(model, splits.prepared)
    src = make_source(cfg, splits, *args)
    assert src.features and src[0].shape == (4, 2048) and src[0].dtype == torch.float32
    # re-preparing a finished folder with other settings needs --overwrite
    with pytest.raises(PreparedDataError, match="image_size"):
        prepare(load_config(path, ["encoder.image_size=48"]), workers=1, progress=False)


def test_cli_prepare_errors(tmp_path, flickr, capsys):
    assert main(["prepare"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["prepare", "--images", str(flickr["images"]), "--flickr-captions",
                 str(flickr["token"]), "--out", str(tmp_path / "o")]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["prepare", "--images", str(tmp_path / "nope"), "--flickr-captions",
                 str(flickr["token"]), "--flickr-splits", str(flickr["splits"]), "--out",
                 str(tmp_path / "o")]) == 2
    assert "image folder" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\x01\x02garbage")
    assert main(["prepare", "--images", str(flickr["images"]), "--flickr-captions", str(bad),
                 "--flickr-splits", str(flickr["splits"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1: binary data" in err and str(bad) in err


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "showattend", "prepare", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--flickr-captions" in proc.stdout
