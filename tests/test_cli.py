"""The CLI end to end on a tiny run, and its one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from showattend.cli import main

from conftest import write_config


def test_train_writes_run_directory(trained):
    _, run = trained
    for name in ("best.pt", "last.pt", "config.json", "metrics.jsonl", "metrics.json", "curves.png"):
        assert (run / name).is_file(), name
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [1, 2]
    assert any(r["kind"] == "train" and np.isfinite(r["loss"]) for r in recs)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("BLEU-4", "CIDEr", "ROUGE-L", "grounding", "grounding_strict", "distinct_captions",
                "attention_entropy", "attention_change"):
        assert key in metrics
    results = json.loads((run / "results_test_beam2.json").read_text())
    assert len(results) == 12 and {"image_id", "caption"} <= set(results[0])


def copy_run(trained, tmp_path: Path) -> Path:
    """A private copy of the session's run: tests that write into a run change the copy only, so
    no test's expectations depend on which tests ran before it."""
    _, run = trained
    return Path(shutil.copytree(run, tmp_path / "run_copy"))


def _val_epochs(run: Path) -> list[int]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in recs if r["kind"] == "val"]


def test_resume_continues_to_more_epochs(trained, tmp_path):
    tmp, run = trained
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    copy = copy_run(trained, tmp_path)
    cfg = write_config(tmp)
    assert main(["-q", "train", "--config", str(cfg), "--resume", "--train.epochs=3",
                 f"--out_dir={copy}"]) == 0
    assert _val_epochs(copy) == [1, 2, 3]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the shared run untouched


def test_train_no_test_ends_without_the_test_evaluation(trained, tmp_path, capsys):
    """`train --no-test` trains and writes best.pt, but prints and writes no test metrics."""
    tmp, _ = trained
    copy = copy_run(trained, tmp_path)
    for old in copy.glob("metrics_test*.json"):
        old.unlink()
    capsys.readouterr()
    assert main(["-q", "train", "--config", str(write_config(tmp)), "--resume", "--no-test",
                 "--train.epochs=3", f"--out_dir={copy}"]) == 0
    assert _val_epochs(copy) == [1, 2, 3] and (copy / "best.pt").is_file()
    assert capsys.readouterr().out == "" and not list(copy.glob("metrics_test*.json"))


def test_caption_json_and_overlays(trained, tmp_path, capsys):
    tmp, run = trained
    imgs = sorted((tmp / "data" / "images" / "test").glob("*.png"))[:3]
    code = main(["-q", "caption", *map(str, imgs), "--checkpoint", str(run / "best.pt"), "--json",
                 "--beam", "2", "--overlay-dir", str(tmp_path / "ov")])
    assert code == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in recs] == [str(p) for p in imgs]
    for r in recs:
        assert set(r) >= {"image", "caption", "words", "score", "attention", "beta"}
        assert len(r["attention"]) == len(r["words"]) == len(r["beta"])
        for m in r["attention"]:
            assert np.array(m).shape == (8, 8)
            assert abs(np.array(m).sum() - 1) < 1e-3
    assert len(list((tmp_path / "ov").glob("*.png"))) == 3


def test_caption_folder_reports_bad_files(trained, tmp_path, capsys):
    _, run = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((40, 70, 3), 120, np.uint8)).save(folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "empty.png").write_bytes(b"")
    code = main(["-q", "caption", str(folder), "--checkpoint", str(run)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "good.jpg" in out
    assert "broken.jpg" in err and "empty.png" in err
    assert "2 of 3 images failed" in err
    assert "Traceback" not in err


def test_evaluate_checkpoint_and_results_file(trained, tmp_path, capsys):
    tmp, run = trained
    assert main(["-q", "evaluate", "--checkpoint", str(run / "best.pt"), "--split", "test",
                 "--beam", "1", "--no-meteor", "--out", str(tmp_path)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["beam"] == 1 and 0 <= m["BLEU-4"] <= 1
    res = tmp_path / "results_test_beam1.json"
    assert main(["-q", "evaluate", "--results", str(res), "--annotations",
                 str(tmp / "data" / "captions_test.json"), "--no-meteor"]) == 0
    m2 = json.loads(capsys.readouterr().out)
    assert m2["BLEU-4"] == pytest.approx(m["BLEU-4"], abs=1e-4)
    assert m2["CIDEr"] == pytest.approx(m["CIDEr"], abs=1e-4)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--config", "nope.toml"], "config file not found"),
    (["caption", "x.jpg", "--checkpoint", "missing.pt"], "checkpoint not found"),
    (["evaluate", "--results", "r.json"], "--results and --annotations go together"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("showattend: error:")


def test_unknown_config_key_and_bad_value(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", "--config", str(cfg), "--train.lrr=0.1"]) == 2
    assert "unknown config key train.lrr" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--train.lr=abc"]) == 2
    assert "train.lr: expected float" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--attention.kind=medium"]) == 2
    assert "attention.kind" in capsys.readouterr().err


def test_cuda_requested_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = write_config(tmp_path)
    assert main(["train", "--config", str(cfg), "--train.device=cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_console_script_help_and_bad_flag():
    exe = Path(sys.executable).with_name("showattend")
    for sub in ("demo", "train", "evaluate", "caption"):
        r = subprocess.run([str(exe), sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: showattend" in r.stdout
    r = subprocess.run([str(exe), "caption", "a.jpg", "--checkpoint", "c.pt", "--beam", "zero"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


TINY_DEMO = ["data.n_train=48", "data.n_val=12", "data.n_test=12", "encoder.channels=16",
             "attention.dim=16", "decoder.embed_dim=16", "decoder.hidden_dim=32",
             "train.log_every=1", "eval.meteor=false", "train.batch_size=16"]


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_demo_end_to_end_tiny(tmp_path, capsys, attention):
    out = tmp_path / "demo"
    code = main(["-q", "demo", "--out", str(out), "--attention", attention, "--epochs", "1",
                 "--overlays", "2", *TINY_DEMO])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"demo ({attention} attention): test BLEU-4 ")
    for key in ("CIDEr", "grounding", "held-out images"):
        assert key in line
    for name in ("best.pt", "last.pt", "metrics.json", "metrics.jsonl", "curves.png",
                 "config.toml", "data/captions_train.json", "data/objects_test.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 2
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    if attention == "hard":
        # REINFORCE diagnostics are logged: reward, baseline, advantage spread, entropy, and the
        # variance of the score-function gradient (on steps that sampled locations)
        for key in ("reward", "baseline", "adv_std", "entropy"):
            assert any(key in r for r in train), key
        sampled = [r for r in train if r.get("soft_batch") == 0.0]
        assert sampled and all("sf_grad_var" in r for r in sampled)
        assert all(np.isfinite(r["sf_grad_var"]) for r in sampled)


def test_review_found_user_errors_are_one_line(trained, tmp_path, capsys):
    tmp, run = trained
    empty = tmp_path / "empty_results.json"
    empty.write_text("[]")
    assert main(["evaluate", "--results", str(empty), "--annotations",
                 str(tmp / "data" / "captions_test.json")]) == 2
    assert "holds no results" in capsys.readouterr().err
    img = sorted((tmp / "data" / "images" / "test").glob("*.png"))[0]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["caption", str(img), "--checkpoint", str(run), "--overlay-dir", str(afile)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    cfg = write_config(tmp_path)
    assert main(["train", "--config", str(cfg), "--attention.window=-1"]) == 2
    assert "attention.window must be a positive odd number" in capsys.readouterr().err


def test_overlays_of_same_named_images_do_not_collide(trained, tmp_path):
    tmp, run = trained
    src = sorted((tmp / "data" / "images" / "test").glob("*.png"))[:2]
    for d, s in zip(("d1", "d2"), src):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.png").write_bytes(s.read_bytes())
    assert main(["-q", "caption", str(tmp_path / "d1"), str(tmp_path / "d2"), "--checkpoint",
                 str(run), "--overlay-dir", str(tmp_path / "ov")]) == 0
    assert sorted(p.name for p in (tmp_path / "ov").glob("*.png")) == ["x.png", "x_2.png"]


def test_evaluate_run_dir_from_elsewhere_keeps_run_summary(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path)  # evaluate writes next to the checkpoint
    (tmp_path / "elsewhere").mkdir()
    summary = (run / "metrics.json").read_bytes()
    monkeypatch.chdir(tmp_path / "elsewhere")  # data paths in the checkpoint are absolute
    assert main(["-q", "evaluate", "--checkpoint", str(run), "--beam", "1", "--no-meteor"]) == 0
    assert not list((tmp_path / "elsewhere").iterdir())  # nothing regenerated here
    assert (run / "metrics_test_beam1.json").is_file() and (run / "results_test_beam1.json").is_file()
    assert (run / "metrics.json").read_bytes() == summary  # the run's headline figures stay
    assert oct((run / "metrics_test_beam1.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_demo_epochs_zero_is_an_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--epochs", "0"]) == 2
    assert "train.epochs must be > 0" in capsys.readouterr().err
