"""What the image crop itself costs on photos: a training step of `glimpse_hard` (a window of the
photo's pixels at every word, encoded by a small CNN; the encoder must run on the pixels, so the
feature cache cannot be used) against a step of the feature-crop hard model of
configs/flickr8k_hard.toml on the feature cache — the same batches, alternated, in one run.

    .venv/bin/python bench/glimpse_cost.py [--config configs/flickr8k_hard.toml] [--steps 6]

Prints seconds per batch of each and their ratio, and what an epoch of Flickr8k would take.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from showattend import config as C
from showattend.data.datasets import collate_captions
from showattend.train.objectives import train_step
from showattend.train.setup import setup_run


def _run(cfg: C.Config):
    run = setup_run(cfg, resume=False, progress=False, splits=None)
    run.model.train()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/flickr8k_hard.toml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = C.load_config(args.config, [f'out_dir="{tempfile.mkdtemp()}"'])
    runs = {
        "hard, 3×3 feature crop (feature cache)": _run(base),
        "glimpse_hard, pixel crop (image store)": _run(C.replace(
            base, attention={"kind": "glimpse_hard"}, data={"features": "off"},
            train={"init": ""})),
    }
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(next(iter(runs.values())).train_ds), generator=g)
    times = {k: [] for k in runs}
    for step in range(args.steps + 1):  # the first step of each warms up and is not counted
        idx = order[step * 32:(step + 1) * 32]
        for name, run in runs.items():
            imgs, caps, ids, _ = collate_captions([run.train_ds[int(i)] for i in idx])
            features = getattr(run.train_ds.source, "features", False)
            t = time.perf_counter()
            loss, _ = train_step(run.train_model, imgs, caps, run.cfg, run.state,
                                 features=features, image_ids=ids, objective=run.objective)
            loss.backward()
            run.optimizer.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - t)
    batches = len(next(iter(runs.values())).train_ds) // 32
    ref = None
    for name, ts in times.items():
        s = sum(ts) / len(ts)
        ref = ref or s
        print(f"{name}: {s:.2f} s per batch of 32 captions ({s / ref:.1f}×), an epoch ≈ "
              f"{s * batches / 60:.0f} min on {args.threads} threads")


if __name__ == "__main__":
    main()
