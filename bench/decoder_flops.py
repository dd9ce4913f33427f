"""The decoder against the hardware: useful FLOP rate as a fraction of a plain matmul's, one run.

    PYTHONPATH=. .venv/bin/python bench/decoder_flops.py [--device cpu|cuda] [--bf16]

COCO sizes: annotations 14×14×2048 (ResNet-101 grid), vocabulary 10,000, embedding / hidden /
attention 512, batch 32, caption lengths drawn around 13.5 words. The encoder is excluded (the
features are given, as when training from a feature cache). Prints, all measured in this run:

1. the yardstick: a 2048×2048 fp32 matmul (bf16 with --bf16) in GFLOP/s, measured between every
   phase below and averaged, so a machine that speeds up or slows down mid-run moves both sides;
2. training (teacher forcing, forward + backward + Adam): captions/s, the useful GFLOP per
   caption (formula printed), the useful GFLOP/s and its fraction of the matmul rate;
3. batched beam search (beam 5, 32 images, at most 20 words): the same, plus the ratio to the
   same search run image by image.

"Useful" counts multiply-adds of the model's own layers on real tokens only (no padding, no
finished beams); softmax, tanh, top-k and bookkeeping count zero. A forward FLOP of a layer costs
two more in the backward (input and weight gradients), except the annotation projection, whose
input (the cached features) needs no gradient: one more.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from showattend.config import TrainConfig
from showattend.decoding import beam_search
from showattend.losses import doubly_stochastic, masked_cross_entropy
from showattend.models.captioner import Captioner
from showattend.models.encoder import Encoder, Normalisation
from showattend.train import build_optimizer

V, L, D, E, N, A = 10_000, 196, 2048, 512, 512, 512


def build(dev: torch.device) -> Captioner:
    enc = Encoder(torch.nn.Identity(), D, 14, False, Normalisation((0.5,) * 3, (0.25,) * 3))
    return Captioner.build(enc, V, attn_dim=A, embed_dim=E, hidden_dim=N, dropout=0.5).to(dev)


def token_flops() -> int:
    """Forward FLOPs of one decoding step of one caption (multiply-add = 2)."""
    attention = 2 * N * A + 2 * L * A + 2 * L * D + 2 * N  # h proj, v·tanh scores, Σα a, β gate
    lstm = 2 * (E + D + N) * 4 * N
    deep_out = 2 * (N * E + D * E + E * V)  # L_h h, L_z z, L_o
    return attention + lstm + deep_out


def image_flops() -> int:
    """Forward FLOPs done once per image: annotation projection, h_0 and c_0."""
    return 2 * L * D * A + 2 * 2 * D * N


def matmul_rate(dev: torch.device, dtype: torch.dtype, reps: int = 8) -> float:
    a = torch.randn(2048, 2048, device=dev, dtype=dtype)
    b = torch.randn(2048, 2048, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * 2048 ** 3 * reps / (time.perf_counter() - t0) / 1e9


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def captions_batch(b: int, gen: torch.Generator, dev: torch.device) -> tuple[torch.Tensor, int]:
    """<start> w… <end> <pad>… with word counts ~ N(13.5, 3) clipped to 6..24; real tokens."""
    words = (torch.randn(b, generator=gen) * 3 + 13.5).round().clamp(6, 24).long()
    t = int(words.max()) + 2
    caps = torch.randint(4, V, (b, t), generator=gen)
    caps[:, 0] = 1
    for i, w in enumerate(words.tolist()):
        caps[i, w + 1] = 2
        caps[i, w + 2:] = 0
    return caps.to(dev), int((words + 1).sum())  # targets: the words and <end>


def timed_train_step(fwd, opt, caps: torch.Tensor, feats: torch.Tensor, dev: torch.device,
                     amp) -> float:
    """Seconds of one optimiser step: teacher-forced forward (``fwd``: the model or its compiled
    form), CE + doubly stochastic loss, backward, Adam."""
    sync(dev)
    t0 = time.perf_counter()
    with amp:
        out = fwd(None, caps, feats=feats)
        loss = masked_cross_entropy(out, caps[:, 1:]) + doubly_stochastic(
            out.alphas, caps[:, 1:] != 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(dev)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast bf16 (CUDA)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps")
    ap.add_argument("--single", type=int, default=6, help="images searched one by one (timed)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    mm_dtype = torch.bfloat16 if args.bf16 else torch.float32
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16)
    rates = [matmul_rate(dev, mm_dtype)]
    model = build(dev)
    gen = torch.Generator().manual_seed(1)
    tok_f, img_f = token_flops(), image_flops()

    # --- training ---------------------------------------------------------------------------
    model.train()
    opt = build_optimizer(model, TrainConfig())  # what training uses (fused Adam)
    feats = torch.randn(args.batch, L, D, generator=gen).relu().to(dev)  # (B, L, D)
    times, tokens = [], []
    for i in range(args.steps + 2):
        caps, n_tok = captions_batch(args.batch, gen, dev)
        dt = timed_train_step(model, opt, caps, feats, dev, amp)
        if i >= 2:  # the first steps pay one-off allocation costs
            times.append(dt)
            tokens.append(n_tok)
    rates.append(matmul_rate(dev, mm_dtype))
    train_flop = sum(3 * tok_f * n + (2 * 2 * L * D * A + 3 * 4 * D * N) * args.batch
                     for n in tokens)
    train_s = sum(times)
    caps_s = args.batch * len(times) / train_s
    per_caption = train_flop / (args.batch * len(times)) / 1e9
    useful_train = train_flop / train_s / 1e9

    # --- beam search ------------------------------------------------------------------------
    model.eval()
    with torch.no_grad():  # untrained weights end captions at random after a few words; make
        model.decoder.L_o.bias[2] -= 30.0  # <end> unlikely so every search runs its 20 words
    feats = torch.randn(args.images, L, D, generator=gen).relu().to(dev)  # (N, L, D)
    rows = {"n": 0}
    real_step = model.decoder.step

    def counting_step(mem, state, prev, mode, *a, **k):
        rows["n"] += prev.shape[0]  # hypotheses this step computes (all live: see below)
        return real_step(mem, state, prev, mode, *a, **k)

    model.decoder.step = counting_step
    with torch.no_grad(), amp:
        beam_search(model, feats[:2], beam=args.beam, max_len=20)  # warm-up
        rows["n"] = 0
        sync(dev)
        t0 = time.perf_counter()
        batched = beam_search(model, feats, beam=args.beam, max_len=20)
        sync(dev)
        t_batched = time.perf_counter() - t0
        hyp_steps = rows["n"]
        rates.append(matmul_rate(dev, mm_dtype))
        t0 = time.perf_counter()
        singles = [beam_search(model, feats[i: i + 1], beam=args.beam, max_len=20)
                   for i in range(args.single)]
        sync(dev)
        t_single = (time.perf_counter() - t0) / args.single * args.images
    model.decoder.step = real_step
    rates.append(matmul_rate(dev, mm_dtype))
    same = all(torch.equal(s.tokens[0, : int(s.lengths[0]) + 1],
                           batched.tokens[i, : int(s.lengths[0]) + 1])
               for i, s in enumerate(singles))
    beam_flop = hyp_steps * tok_f + args.images * img_f
    useful_beam = beam_flop / t_batched / 1e9

    mm = statistics.mean(rates)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; precision: {'bf16' if args.bf16 else 'fp32'}")
    print(f"matmul 2048² yardstick: {mm:.1f} GFLOP/s (mean of {len(rates)}: "
          f"{', '.join(f'{r:.0f}' for r in rates)})")
    print(f"per token forward FLOPs = 2·[N·A + L·A + L·D + N + (E+D+N)·4N + N·E + D·E + E·V] "
          f"= {tok_f / 1e6:.1f} M; per image = 2·[L·D·A + 2·D·N] = {img_f / 1e6:.1f} M")
    print(f"training: {caps_s:.1f} captions/s; useful work per caption = 3·token·(words+1) + "
          f"2·(L·D·A) + 3·(2·D·N) ≈ {per_caption:.2f} GFLOP (mean {sum(tokens) / len(tokens) / args.batch:.1f}"
          f" tokens); {useful_train:.1f} GFLOP/s = {useful_train / mm:.0%} of the matmul rate")
    print(f"beam {args.beam}, {args.images} images: {args.images / t_batched:.2f} images/s, "
          f"{hyp_steps} hypothesis-steps (≤ images·beam·21), {beam_flop / 1e9:.1f} GFLOP useful; "
          f"{useful_beam:.1f} GFLOP/s = {useful_beam / mm:.0%} of the matmul rate")
    print(f"beam image by image ({args.single} timed): {args.images / t_single:.2f} images/s; "
          f"batched is {t_single / t_batched:.1f}x faster (same captions: {same})")


if __name__ == "__main__":
    main()
