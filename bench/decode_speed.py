"""Decoder speed at COCO-sized settings: batched vs image-by-image beam search, and training.

    .venv/bin/python bench/decode_speed.py [--images 32] [--beam 5] [--precision fp32|bf16|compare]

Annotations 14×14×2048 (ResNet-101 grid), vocabulary 10,000, embedding/hidden/attention 512,
captions of 16 words — the sizes at which the most-used PyTorch tutorial decodes < 1 image/s with
beam 5 and trains its decoder at ~8 captions/s on 2 CPU cores. The encoder is excluded (features
are given), so this measures the decoder alone. Prints throughputs and their ratios, all measured
in this one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from showattend import precision as P
from showattend.config import TrainConfig
from showattend.decoding import beam_search
from showattend.losses import doubly_stochastic, masked_cross_entropy
from showattend.models.captioner import Captioner
from showattend.models.encoder import Encoder, Normalisation
from showattend.train import build_optimizer

from precision_util import Yardsticks, add_precision_arg, precisions


def build(vocab: int, dim: int, feat: int) -> Captioner:
    enc = Encoder(torch.nn.Identity(), feat, 14, False, Normalisation((0.5,) * 3, (0.25,) * 3))
    return Captioner.build(enc, vocab, attn_dim=dim, embed_dim=dim, hidden_dim=dim, dropout=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    add_precision_arg(ap, default="fp32")
    args = ap.parse_args()
    dev = torch.device("cpu")
    sticks = Yardsticks(dev)
    sticks.measure()
    for prec in precisions(args.precision, dev):
        run(args, prec)
        sticks.measure()
    print(sticks.line())


def run(args, prec: str) -> None:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    dev = torch.device("cpu")
    model = build(10_000, 512, 2048).eval()
    feats = torch.randn(args.images, 196, 2048).relu()  # (N, L, D)

    with torch.no_grad(), P.compute(prec, dev):
        t0 = time.perf_counter()
        batched = beam_search(model, feats, beam=args.beam, max_len=20)
        t_batched = time.perf_counter() - t0
        n_single = min(args.images, 8)
        t0 = time.perf_counter()
        singles = [beam_search(model, feats[i: i + 1], beam=args.beam, max_len=20)
                   for i in range(n_single)]
        t_single = (time.perf_counter() - t0) / n_single * args.images
    same = all(torch.equal(s.tokens[0, : int(s.lengths[0]) + 1],
                           batched.tokens[i, : int(s.lengths[0]) + 1]) for i, s in enumerate(singles))
    print(f"[{prec}] beam {args.beam}: batched {args.images / t_batched:.2f} img/s, image-by-image "
          f"{args.images / t_single:.2f} img/s, ratio {t_single / t_batched:.1f}x "
          f"(same captions: {same})")

    model.train()
    opt = build_optimizer(model, TrainConfig())  # what training uses (fused Adam)
    caps = torch.randint(4, 10_000, (args.batch, 18))
    caps[:, 0], caps[:, -1] = 1, 2
    f = torch.randn(args.batch, 196, 2048).relu()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        with P.compute(prec, dev):
            out = model(None, caps, feats=f)
            loss = masked_cross_entropy(out, caps[:, 1:]) + doubly_stochastic(out.alphas,
                                                                              caps[:, 1:] != 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - t0)
    rate = args.batch / (sum(times) / len(times))
    print(f"[{prec}] training (decoder, batch {args.batch}): {rate:.1f} captions/s; "
          f"vs the tutorial's ~8 captions/s measured on these machines: {rate / 8:.1f}x")


if __name__ == "__main__":
    main()
