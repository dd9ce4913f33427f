"""`caption` on a folder of photos: end to end against the encoder's forward alone, one run.

    PYTHONPATH=. .venv/bin/python bench/caption_speed.py [--images 64] [--beam 3]

ResNet-101 at 256² (the COCO config's backbone; its weights do not change its speed, so random
ones — nothing to download), batch 16, vocabulary 10,000, decoder dims 512, beam 3. Photos: the
Flickr8k images (data/flickr8k/images) re-encoded as 640×480 JPEGs, so that every file costs a
real JPEG decode and resize; generated pictures when Flickr8k is absent. Prints, in one run:

1. the encoder's forward alone on ready tensors (the floor any captioning pipeline pays),
   timed before and after every pipeline run below;
2. `CaptionerAPI.caption_paths` end to end (decode + preprocess + encoder + beam search) with
   0, 1 and 2 DataLoader workers, and its ratio to (1) timed around it — the bar is ≤ 1.25×;
3. the decoder alone (beam search on given features), fp32 against the dynamic int8 decoder,
   and the int8 pipeline end to end;
4. with ``--precision compare`` (the default) or ``bf16``: the encoder alone and the pipeline
   end to end (1 worker) in fp32 and in bf16 (precision.py: bf16 convolutions in channels_last,
   bf16 decoder products), their ratio, the fp32 and bf16 matmul yardsticks of the same run, and
   how many captions the two precisions share.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from showattend import config as C
from showattend import precision as P
from showattend.api import CaptionerAPI
from showattend.decoding import decode
from showattend.models.captioner import Captioner
from showattend.quantize import quantize_decoder
from showattend.loading import make_preprocess
from showattend.vocab import Vocab

from precision_util import Yardsticks, add_precision_arg, precisions

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, n: int) -> str:
    src = next((p for p in (ROOT / "data/flickr8k/images", Path("/work/data/flickr8k/images"))
                if p.is_dir()), None)
    files = sorted(src.glob("*.jpg"))[:n] if src else []
    rng = np.random.default_rng(0)
    for i in range(n):
        if files:
            im = Image.open(files[i % len(files)]).convert("RGB").resize((640, 480))
        else:
            im = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        im.save(folder / f"photo{i:04d}.jpg", quality=90)
    return f"Flickr8k photos from {src}" if files else "generated pictures"


def build(image_size: int) -> CaptionerAPI:
    cfg = C.load_config(ROOT / "configs" / "coco_soft.toml",
                        ['encoder.weights="none"', f"encoder.image_size={image_size}",
                         "eval.beam=3"])
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(10_000 - 4))])
    model = Captioner.from_config(cfg, len(vocab)).eval()
    with torch.no_grad():  # untrained: make <end> unlikely so captions run their full length
        model.decoder.L_o.bias[2] -= 30.0
    return CaptionerAPI(model, vocab, make_preprocess(cfg, model), cfg, torch.device("cpu"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    add_precision_arg(ap)
    ap.add_argument("--only-precision", action="store_true",
                    help="skip the worker and int8 comparisons (1–3): only the precisions")
    args = ap.parse_args()
    if args.only_precision:
        return precision_comparison(args)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    api = build(args.size)
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        what = make_photos(folder, n)
        paths = sorted(folder.glob("*.jpg"))
        pre = api.preprocess
        pixels = torch.stack([pre.normalize(pre.view(Image.open(p))) for p in paths])
        def encoder_alone() -> float:
            with torch.no_grad():
                return timed(lambda: [api.model.encode(pixels[i: i + args.batch])
                                      for i in range(0, n, args.batch)])

        def pipeline(workers: int) -> None:
            out = list(api.caption_paths([folder], beam=args.beam, batch_size=args.batch,
                                         workers=workers))
            assert len(out) == n and all(c is not None for _, c, _ in out)

        with torch.no_grad():
            feats = api.model.encode(pixels[: args.batch])  # (16, L, D); also a warm-up
        pipeline(0)  # warm-up
        # the machine's speed drifts within a run: each pipeline is compared with the mean of the
        # encoder timings taken just before and just after it
        encs = [encoder_alone()]
        t_pipe, t_enc_at = {}, {}
        for w in (0, 1, 2):
            t_pipe[w] = timed(lambda w=w: pipeline(w))
            encs.append(encoder_alone())
            t_enc_at[w] = (encs[-2] + encs[-1]) / 2
        t_enc = sum(encs) / len(encs)
        with torch.no_grad():
            t_dec32 = min(timed(lambda: decode(api.model, feats, beam=args.beam, max_len=20))
                          for _ in range(2))
            words32 = decode(api.model, feats, beam=args.beam, max_len=20).tokens
            quantize_decoder(api.model)
            t_dec8 = min(timed(lambda: decode(api.model, feats, beam=args.beam, max_len=20))
                         for _ in range(2))
            words8 = decode(api.model, feats, beam=args.beam, max_len=20).tokens
        best = min(t_pipe, key=lambda w: t_pipe[w] / t_enc_at[w])
        t_pipe8 = timed(lambda: pipeline(best))
        t_enc8 = (encs[-1] + encoder_alone()) / 2

    per = 1000 / n
    print(f"{n} photos ({what}, 640×480 JPEG), ResNet-101 at {args.size}², batch {args.batch}, "
          f"beam {args.beam}, {torch.get_num_threads()} torch threads")
    print(f"encoder forward alone: {t_enc * per:.0f} ms/image (mean of {len(encs)}: "
          f"{', '.join(f'{e * per:.0f}' for e in encs)})")
    for w, t in t_pipe.items():
        print(f"caption end to end, {w} workers: {t * per:.0f} ms/image = "
              f"{t / t_enc_at[w]:.2f}x the encoder alone (timed around it: "
              f"{t_enc_at[w] * per:.0f} ms/image)")
    print(f"decoder alone (beam {args.beam}, batch {args.batch}): fp32 "
          f"{t_dec32 / args.batch * 1000:.0f} ms/image, int8 {t_dec8 / args.batch * 1000:.0f} "
          f"ms/image = {t_dec32 / t_dec8:.2f}x faster; same words as fp32 in "
          f"{float((words32 == words8).float().mean()):.0%} of positions (untrained weights)")
    print(f"caption end to end with the int8 decoder, {best} workers: {t_pipe8 * per:.0f} "
          f"ms/image = {t_pipe8 / t_enc8:.2f}x the encoder alone")
    if args.precision != "fp32":
        precision_comparison(args)


def precision_comparison(args) -> None:
    """Encoder alone and `caption` end to end (1 worker) at each precision, same photos."""
    dev = torch.device("cpu")
    sticks = Yardsticks(dev)
    sticks.measure()
    torch.manual_seed(0)
    api = build(args.size)
    n = args.images
    enc, pipe, caps = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        what = make_photos(folder, n)
        pre = api.preprocess
        pixels = torch.stack([pre.normalize(pre.view(Image.open(p)))
                              for p in sorted(folder.glob("*.jpg"))])
        for prec in precisions(args.precision, dev):
            api.precision = prec
            with torch.no_grad(), P.compute(prec, dev):
                api.model.encode(pixels[: args.batch])  # warm-up (and channels_last, once)
                enc[prec] = min(timed(lambda: [api.model.encode(pixels[i: i + args.batch])
                                               for i in range(0, n, args.batch)])
                                for _ in range(2))
            list(api.caption_paths([folder], beam=args.beam, batch_size=args.batch,
                                   workers=1))  # warm-up
            out = []
            pipe[prec] = timed(lambda: out.extend(api.caption_paths(
                [folder], beam=args.beam, batch_size=args.batch, workers=1)))
            caps[prec] = [c.caption for _, c, _ in out]
            sticks.measure()
    per = 1000 / n
    print(f"{n} photos ({what}), ResNet-101 at {args.size}², batch {args.batch}, beam "
          f"{args.beam}, {torch.get_num_threads()} torch threads")
    print(sticks.line())
    for prec in enc:
        print(f"[{prec}] encoder forward alone {enc[prec] * per:.0f} ms/image; caption end to "
              f"end (1 worker) {pipe[prec] * per:.0f} ms/image")
    if len(enc) == 2:
        same = sum(a == b for a, b in zip(caps["fp32"], caps["bf16"]))
        print(f"bf16 / fp32, same run: encoder {enc['fp32'] / enc['bf16']:.2f}×, caption end to "
              f"end {pipe['fp32'] / pipe['bf16']:.2f}× (target ≥ 3× with AMX); same caption on "
              f"{same} of {n} photos (untrained weights: near-ties are common)")


if __name__ == "__main__":
    main()
