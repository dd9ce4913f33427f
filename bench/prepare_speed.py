"""`prepare`'s feature cache in fp32 and in bf16, one run: ResNet-101 features at 256².

    PYTHONPATH=. .venv/bin/python bench/prepare_speed.py [--images 256] [--precision compare]

Runs the real ``prepare`` (image store, then the float16 feature cache) on the built-in data's
images resized to 256² with a ResNet-101 encoder (random weights: its speed does not depend on
them, and nothing is downloaded), grid 8, batch 32, once per precision into fresh folders, and
prints the feature phase's images/s at each, their ratio, the fp32 and bf16 matmul yardsticks of
the same run, and how far the bf16 features are from the fp32 ones (relative error of the cache).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from showattend import config as C
from showattend.data.prepare import prepare

from precision_util import Yardsticks, add_precision_arg, precisions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="training images of the built-in data")
    ap.add_argument("--backbone", default="resnet101")
    ap.add_argument("--size", type=int, default=256)
    add_precision_arg(ap)
    args = ap.parse_args()
    dev = torch.device("cpu")
    sticks = Yardsticks(dev)
    sticks.measure()
    speed, feats = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in precisions(args.precision, dev):
            out = Path(tmp) / prec
            cfg = C.load_config("demo", [
                f"data.root={Path(tmp) / 'data'}", f"data.prepared={out}",
                f"data.n_train={args.images}", "data.n_val=8", "data.n_test=8",
                f'encoder.backbone="{args.backbone}"', 'encoder.weights="none"',
                f"encoder.image_size={args.size}", f"encoder.grid={args.size // 32}",
                "encoder.coords=false", f'train.precision="{prec}"'])
            res = prepare(cfg, workers=0, progress=False)
            speed[prec] = res.manifest["timing"]["features_per_s"]
            feats[prec] = np.load(out / "features.npy").astype(np.float32)
            sticks.measure()
    print(f"prepare, {args.backbone} at {args.size}² (random weights), {args.images + 16} "
          f"images, {torch.get_num_threads()} torch threads")
    print(sticks.line())
    for prec, s in speed.items():
        print(f"[{prec}] feature cache: {s:.2f} images/s")
    if len(speed) == 2:
        f, b = feats["fp32"], feats["bf16"]
        ok = np.isfinite(f) & np.isfinite(b)  # random weights can overflow float16
        with np.errstate(invalid="ignore"):  # inf − inf where both overflowed: masked out
            rel = float(np.abs(f - b)[ok].sum() / max(np.abs(f)[ok].sum(), 1e-12))
        print(f"bf16 / fp32, same run: prepare's features {speed['bf16'] / speed['fp32']:.2f}× "
              f"(target ≥ 3× with AMX); the bf16 cache differs from the fp32 one by {rel:.2%} "
              f"(summed |difference| / summed |value|, over the {ok.mean():.1%} of values finite in "
              f"both float16 caches)")


if __name__ == "__main__":
    main()
