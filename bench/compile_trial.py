"""torch.compile on the decoder: does it pay on this machine? Eager vs compiled, one run.

    PYTHONPATH=. .venv/bin/python bench/compile_trial.py [--device cpu|cuda]

Same sizes as bench/decoder_flops.py (14×14×2048 annotations, vocabulary 10k, dims 512).
1. Beam search (beam 5, 32 images, 20 words): eager `decoder.step` against
   `torch.compile(decoder.step, dynamic=True)` (the working batch shrinks as images finish, so
   shapes are dynamic); compile time reported apart from the steady-state time.
2. Training step (teacher forcing + backward + Adam, batch 32): eager against
   `torch.compile(model, dynamic=True)`; the caption lengths of every batch differ, as in training.
The package ships no compile option unless this shows a clear gain (see bench/README.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from precision_util import Yardsticks

from showattend import precision

from decoder_flops import build, captions_batch, sync, timed_train_step
from showattend.config import TrainConfig
from showattend.decoding import beam_search
from showattend.train import build_optimizer


PREC = "fp32"  # --precision


def time_beam(model, feats, dev, reps: int = 2) -> float:
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        with precision.compute(PREC, dev):  # one block per call: weights fixed inside it
            beam_search(model, feats, beam=5, max_len=20)
        sync(dev)
        out.append(time.perf_counter() - t0)
    return min(out)


def time_train(model, step_model, feats, dev, gen, steps: int) -> tuple[float, float]:
    """(first step incl. compilation, mean of the next ``steps``) in seconds."""
    opt = build_optimizer(model, TrainConfig())  # what training uses (fused Adam)
    times = [timed_train_step(step_model, opt, captions_batch(feats.shape[0], gen, dev)[0], feats,
                              dev, precision.compute(PREC, dev)) for _ in range(steps + 1)]
    return times[0], sum(times[1:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="run eager and compiled inside this precision's block (precision.py)")
    args = ap.parse_args()
    global PREC
    PREC = args.precision
    sticks = Yardsticks(torch.device("cpu"))  # fp32 and bf16 matmul rates of this run
    sticks.measure()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(1)
    model = build(dev).eval()
    with torch.no_grad():
        model.decoder.L_o.bias[2] -= 30.0  # full-length searches (see decoder_flops.py)
    feats = torch.randn(32, 196, 2048, generator=gen).relu().to(dev)  # (N, L, D)
    with torch.no_grad():
        t_eager = time_beam(model, feats, dev)
        eager_step = model.decoder.step
        model.decoder.step = torch.compile(eager_step, dynamic=True)
        t0 = time.perf_counter()
        ref = beam_search(model, feats, beam=5, max_len=20)
        t_first = time.perf_counter() - t0
        t_comp = time_beam(model, feats, dev)
        model.decoder.step = eager_step
        same = torch.equal(ref.tokens, beam_search(model, feats, beam=5, max_len=20).tokens)
    print(f"beam search: eager {t_eager:.2f} s, compiled {t_comp:.2f} s "
          f"({t_eager / t_comp:.2f}x; first call incl. compilation {t_first:.1f} s; "
          f"same captions: {same})")

    model.train()
    first_e, t_e = time_train(model, model, feats, dev, gen, args.steps)
    compiled = torch.compile(model, dynamic=True)
    first_c, t_c = time_train(model, compiled, feats, dev, gen, args.steps)
    print(f"training step (batch 32): eager {t_e:.2f} s, compiled {t_c:.2f} s "
          f"({t_e / t_c:.2f}x; first compiled step {first_c:.1f} s, recompiles as lengths "
          f"change are inside the mean)")

    sticks.measure()
    print(sticks.line())


if __name__ == "__main__":
    main()
