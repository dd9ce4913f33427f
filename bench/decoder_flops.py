"""The decoder against the hardware: useful FLOP rate as a fraction of a plain matmul's, one run.

    PYTHONPATH=. .venv/bin/python bench/decoder_flops.py [--device cpu|cuda]
        [--precision compare|fp32|bf16|auto]

COCO sizes: annotations 14×14×2048 (ResNet-101 grid), vocabulary 10,000, embedding / hidden /
attention 512, batch 32, caption lengths drawn around 13.5 words. The encoder is excluded (the
features are given, as when training from a feature cache). Prints, all measured in this run:

1. the yardsticks: a 2048×2048 fp32 and bf16 matmul in GFLOP/s, measured between every phase
   below and averaged, so a machine that speeds up or slows down mid-run moves both sides;
2. training (teacher forcing, forward + backward + Adam): captions/s, the useful GFLOP per
   caption (formula printed), the useful GFLOP/s and its fraction of the matmul rate;
3. batched beam search (beam 5, 32 images, at most 20 words): the same, plus the ratio to the
   same search run image by image;
4. with ``--precision compare`` (the default) all of it in fp32 and in bf16 (precision.py), and
   the bf16/fp32 ratios of the same run.

"Useful" counts multiply-adds of the model's own layers on real tokens only (no padding, no
finished beams); softmax, tanh, top-k and bookkeeping count zero. A forward FLOP of a layer costs
two more in the backward (input and weight gradients), except the annotation projection, whose
input (the cached features) needs no gradient: one more.
"""

from __future__ import annotations

import argparse
import time

import torch

from showattend import precision
from showattend.config import TrainConfig
from showattend.decoding import beam_search
from showattend.losses import doubly_stochastic, masked_cross_entropy
from showattend.models.captioner import Captioner
from showattend.models.encoder import Encoder, Normalisation
from showattend.train import build_optimizer

from precision_util import Yardsticks, add_precision_arg, precisions

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


def measure(args, dev: torch.device, prec: str, sticks: Yardsticks) -> dict[str, float]:
    """Training and beam-search speed of the COCO-sized model at ``prec`` (same seeds, so every
    precision sees the same weights, features and captions)."""
    torch.manual_seed(0)
    model = build(dev)
    gen = torch.Generator().manual_seed(1)
    tok_f, img_f = token_flops(), image_flops()
    amp = precision.compute(prec, dev)

    # --- training ---------------------------------------------------------------------------
    model.train()
    opt = build_optimizer(model, TrainConfig())  # what training uses (fused Adam)
    feats = torch.randn(args.batch, L, D, generator=gen).relu().to(dev)  # (B, L, D)
    times, tokens = [], []
    for i in range(args.steps + 2):
        caps, n_tok = captions_batch(args.batch, gen, dev)
        dt = timed_train_step(model, opt, caps, feats, dev, precision.compute(prec, dev))
        if i >= 2:  # the first steps pay one-off allocation costs
            times.append(dt)
            tokens.append(n_tok)
    sticks.measure()
    train_flop = sum(3 * tok_f * n + (2 * 2 * L * D * A + 3 * 4 * D * N) * args.batch
                     for n in tokens)
    train_s = sum(times)

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
        sticks.measure()
        t0 = time.perf_counter()
        singles = [beam_search(model, feats[i: i + 1], beam=args.beam, max_len=20)
                   for i in range(args.single)]
        sync(dev)
        t_single = (time.perf_counter() - t0) / max(args.single, 1) * args.images
    model.decoder.step = real_step
    same = all(torch.equal(s.tokens[0, : int(s.lengths[0]) + 1],
                           batched.tokens[i, : int(s.lengths[0]) + 1])
               for i, s in enumerate(singles))
    return {"caps_s": args.batch * len(times) / train_s,
            "per_caption": train_flop / (args.batch * len(times)) / 1e9,
            "useful_train": train_flop / train_s / 1e9,
            "tokens": sum(tokens) / len(tokens) / args.batch,
            "images_s": args.images / t_batched, "hyp_steps": hyp_steps,
            "beam_flop": hyp_steps * tok_f + args.images * img_f,
            "useful_beam": (hyp_steps * tok_f + args.images * img_f) / t_batched / 1e9,
            "single_s": args.images / t_single, "batched_x": t_single / t_batched,
            "same": same, "tokens_beam": batched.tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    add_precision_arg(ap)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps")
    ap.add_argument("--single", type=int, default=6, help="images searched one by one (timed)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_flush_denormal(True)
    sticks = Yardsticks(dev)
    sticks.measure()
    results = {p: measure(args, dev, p, sticks) for p in precisions(args.precision, dev)}
    tok_f, img_f = token_flops(), image_flops()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; precisions: {', '.join(results)}")
    print(sticks.line())
    print(f"per token forward FLOPs = 2·[N·A + L·A + L·D + N + (E+D+N)·4N + N·E + D·E + E·V] "
          f"= {tok_f / 1e6:.1f} M; per image = 2·[L·D·A + 2·D·N] = {img_f / 1e6:.1f} M")
    for prec, r in results.items():
        print(f"[{prec}] training: {r['caps_s']:.1f} captions/s; useful work per caption = "
              f"3·token·(words+1) + 2·(L·D·A) + 3·(2·D·N) ≈ {r['per_caption']:.2f} GFLOP (mean "
              f"{r['tokens']:.1f} tokens); {r['useful_train']:.1f} GFLOP/s = "
              f"{sticks.fractions(r['useful_train'])}")
        print(f"[{prec}] beam {args.beam}, {args.images} images: {r['images_s']:.2f} images/s, "
              f"{r['hyp_steps']} hypothesis-steps (≤ images·beam·21), {r['beam_flop'] / 1e9:.1f} "
              f"GFLOP useful; {r['useful_beam']:.1f} GFLOP/s = {sticks.fractions(r['useful_beam'])}")
        print(f"[{prec}] beam image by image ({args.single} timed): {r['single_s']:.2f} images/s; "
              f"batched is {r['batched_x']:.1f}x faster (same captions: {r['same']})")
    if len(results) == 2:
        f, b = results["fp32"], results["bf16"]
        same = sum(torch.equal(x, y) for x, y in zip(f["tokens_beam"], b["tokens_beam"]))
        print(f"bf16 / fp32, same run: training step {b['caps_s'] / f['caps_s']:.2f}× "
              f"(target ≥ 1.8× with AMX), batched beam search {b['images_s'] / f['images_s']:.2f}× "
              f"(target ≥ 2×); beam captions identical on {same} of {args.images} (untrained "
              f"weights: near-ties are common)")


if __name__ == "__main__":
    main()
