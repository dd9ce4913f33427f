"""Variance of hard attention's score-function gradient on photos, estimator against estimator,
in one run: the same model, the same training batches, only the estimator changes.

    .venv/bin/python bench/hard_variance.py [--config configs/flickr8k_hard.toml]
        [--checkpoint runs/flickr8k_hard/best.pt] [--batches 6 --replicates 12 --batch-size 32]
        [--json runs/hard_variance.json]

For each batch of training captions (cached photo features), each estimator's gradient of the
attention parameters is drawn ``replicates`` times (new location samples and dropout masks each
time); its variance is the trace of the covariance of those draws, summed over parameters and
averaged over batches. The score-function term alone is measured (no expected-context mixing,
entropy bonus and box term off): the gradient's mean is the same for every estimator (all are
unbiased, tests/test_hard_estimators.py), so the variance is what tells them apart. The model is
the checkpoint given, else the config's warm start. "moving" uses the mean caption reward of the
batch's draws as its baseline — the value a well-converged moving average holds, so the ratio is
not flattered by a stale average.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from showattend import config as C
from showattend.checkpoint import load_checkpoint
from showattend.data.datasets import collate_captions
from showattend.losses import location_rewards, token_nll
from showattend.train.objectives.hard import HardAttention
from showattend.train.setup import setup_run
from showattend.train.state import TrainState
from showattend.vocab import PAD_ID

ESTIMATORS = [  # (label, hard.* overrides)
    ("moving average, 1 sample (before)", {"n_samples": 1, "baseline": "moving", "reward": "caption"}),
    ("moving average, 2 samples", {"n_samples": 2, "baseline": "moving", "reward": "caption"}),
    ("leave-one-out, 2 samples", {"n_samples": 2, "baseline": "loo", "reward": "caption"}),
    ("leave-one-out, 2 samples, reward to go", {"n_samples": 2, "baseline": "loo", "reward": "to_go"}),
    ("leave-one-out, 4 samples, reward to go", {"n_samples": 4, "baseline": "loo", "reward": "to_go"}),
]


def _grad(model, obj, feats, caps, ids, state, params) -> torch.Tensor:
    loss, _ = obj.loss(model, feats, caps, state, features=True, image_ids=ids)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                      for x, p in zip(g, params)])


def _mean_reward(model, feats, caps) -> float:
    """The batch's mean caption reward under sampled locations (the moving baseline's value)."""
    with torch.no_grad():
        out = model(feats, caps, mode="sample", feats=feats)
        targets = caps[:, 1:]
        return float(location_rewards(token_nll(out, targets), targets != PAD_ID).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/flickr8k_hard.toml")
    ap.add_argument("--checkpoint", default="", help="weights to measure at (default: the "
                                                     "config's train.init)")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--replicates", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="hard_variance_")
    cfg = C.load_config(args.config, [f'out_dir="{tmp}"', "data.num_workers=0"])
    run = setup_run(cfg, resume=False, progress=False, splits=None)
    model = run.model
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint)["model"])
    model.train()
    params = [p for p in model.decoder.attention.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(run.train_ds), generator=g)
    rows = {label: [] for label, _ in ESTIMATORS}
    norms = {label: [] for label, _ in ESTIMATORS}
    t0 = time.time()
    for b in range(args.batches):
        items = [run.train_ds[int(i)] for i in order[b * args.batch_size:(b + 1) * args.batch_size]]
        feats, caps, ids, _ = collate_captions(items)
        for label, hard in ESTIMATORS:
            c = C.replace(cfg, hard={**hard, "mix_mode": "off", "lambda_e": 0.0},
                          supervision={"weight": 0.0})
            obj = HardAttention(c)
            torch.manual_seed(1000 * b + 7)
            state = TrainState()
            if hard["baseline"] == "moving":
                state.baseline = sum(_mean_reward(model, feats, caps) for _ in range(4)) / 4
            draws = torch.stack([_grad(model, obj, feats, caps, ids, state, params)
                                 for _ in range(args.replicates)])  # (R, P)
            state_b = state.baseline
            assert state_b is None or isinstance(state_b, float)
            rows[label].append(float(draws.var(0).sum()))
            norms[label].append(float(draws.mean(0).norm()))
    base = sum(rows[ESTIMATORS[0][0]]) / args.batches
    table = []
    print(f"score-function gradient of the attention parameters, {args.batches} batches × "
          f"{args.batch_size} captions, {args.replicates} draws each ({time.time() - t0:.0f} s)")
    print("| estimator | variance (trace) | ratio to the moving average |")
    print("|---|---|---|")
    for label, _ in ESTIMATORS:
        v = sum(rows[label]) / args.batches
        n = sum(norms[label]) / args.batches
        table.append({"estimator": label, "variance": v, "ratio": v / base, "mean_norm": n})
        print(f"| {label} | {v:.3g} | {v / base:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "batches": args.batches,
                                               "replicates": args.replicates,
                                               "checkpoint": args.checkpoint or cfg.train.init},
                                              indent=1))


if __name__ == "__main__":
    main()
