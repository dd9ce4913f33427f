"""Built-in configs: named or by path, shipped inside the package, so a wheel install runs the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from showattend.cli import main
from showattend.config import (ConfigError, builtin_config_dir, builtin_configs, load_config,
                               resolve_config)

REPO = Path(__file__).resolve().parents[1]


def test_builtin_configs_are_the_checkouts_configs() -> None:
    # one copy of the TOML files: the package's configs/ is the top-level configs/
    names = builtin_configs()
    assert {"demo", "demo_hard", "coco_soft", "coco_hard"} <= set(names)
    assert names == sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert builtin_config_dir().resolve() == (REPO / "configs").resolve()


@pytest.mark.parametrize("name", ["demo", "demo_hard.toml", "coco_soft"])
def test_config_by_name(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # names work from any directory
    stem = name.removesuffix(".toml")
    assert resolve_config(name) == builtin_config_dir() / f"{stem}.toml"
    assert load_config(name).name == stem


def test_every_builtin_config_loads() -> None:
    for name in builtin_configs():
        load_config(name)  # parses and validates


def test_existing_path_wins_over_a_builtin_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text('name = "mine"\n')
    assert load_config("demo").name == "mine"
    Path("sub").mkdir()
    Path("sub/x.toml").write_text('name = "by-path"\n')
    assert load_config("sub/x.toml").name == "by-path"


def test_a_directory_named_like_a_builtin_does_not_hide_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("demo").mkdir()
    assert load_config("demo").name == "demo"


@pytest.mark.parametrize("bad", ["nope", "nope.toml", "configs/demo_typo.toml"])
def test_unknown_config_lists_the_builtin_ones(bad: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert "\n" not in msg and bad in msg and "demo, demo_hard" in msg


def test_cli_unknown_config_is_one_line_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "flickr8k_typo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coco_soft" in err[0] and "flickr8k_typo" in err[0]


# --- a real non-editable install ----------------------------------------------------------------

_TINY_DEMO = ["--epochs", "1", "--overlays", "1", "data.n_train=48", "data.n_val=12",
              "data.n_test=12", "train.val_images=0", "train.batch_size=16", "encoder.channels=16",
              "attention.dim=16", "decoder.embed_dim=16", "decoder.hidden_dim=32",
              "eval.meteor=false", "eval.beam=1"]


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_install_runs_the_demo_outside_the_checkout(tmp_path: Path) -> None:
    """Build a wheel, install it (no editable link, no source tree) into a fresh venv and run a
    one-epoch demo from an unrelated directory. torch & co. come from this test's environment
    through a .pth file, so nothing is downloaded or reinstalled."""
    # Build from a clean copy: an in-tree build would reuse a stale build/lib from earlier builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "showattend", src / "showattend", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "configs", src / "configs", ignore=ignore)
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", wheels, src], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("showattend-*.whl")

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    installed = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps",
                      "--no-index", "-q", wheel], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    # the heavy dependencies (torch, ...) from this environment, after the venv's own packages
    (site / "_showattend_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([py, "-c", "import showattend; print(showattend.__file__)"], cwd=elsewhere)
    assert Path(where.stdout.strip()).is_relative_to(venv), where  # the installed copy, not ours
    exe = venv / ("Scripts/showattend.exe" if os.name == "nt" else "bin/showattend")
    demo = _run([exe, "demo", "--out", "run", *_TINY_DEMO], cwd=elsewhere)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "demo (soft attention): test BLEU-4" in demo.stdout
    assert (elsewhere / "run" / "best.pt").is_file()
    assert len(list((elsewhere / "run" / "overlays").glob("*.png"))) == 1
    # the report page's template, script and style are package data inside the wheel
    report = _run([exe, "-q", "inspect", "run/data/images/test", "--checkpoint", "run", "--out",
                   "r.html", "--beam", "1"], cwd=elsewhere)
    assert report.returncode == 0, report.stderr[-2000:]
    page = (elsewhere / "r.html").read_text("utf-8")
    assert "window.showattend = " in page and "{{JS}}" not in page and "{{CSS}}" not in page
    named = _run([exe, "train", "--config", "demo_hard", "--out_dir=x", "train.epochs=0"],
                 cwd=elsewhere)  # a named config resolves in the installed package (then 0 fails)
    assert "train.epochs must be > 0" in named.stderr, named.stderr
