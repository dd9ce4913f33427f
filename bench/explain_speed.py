"""Speed of ``explain``: every reference caption of the Flickr8k test photos, teacher forced with
the shipped model, from the image files (as ``showattend explain photos/ --references FILE``).

    .venv/bin/python bench/explain_speed.py [--images data/flickr8k/images]
        [--captions data/flickr8k/Flickr8k.token.txt] [--split data/flickr8k/Flickr_8k.testImages.txt]
        [--model flickr8k] [--threads 2] [--limit 1000]

Prints the wall time of the whole call and of its parts in the same run: decoding and
preprocessing the files, the encoder, the teacher-forced pass over all captions, and the model's
own caption (beam of the model's config) that every record carries. Issue 41's target: 5
captions × 1,000 photos in ≤ 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import showattend
from showattend import explain as X
from showattend.report import read_references


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="data/flickr8k/images")
    ap.add_argument("--captions", default="data/flickr8k/Flickr8k.token.txt")
    ap.add_argument("--split", default="data/flickr8k/Flickr_8k.testImages.txt")
    ap.add_argument("--model", default="flickr8k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in Path(args.split).read_text().split() if n.strip()][: args.limit]
    paths = [Path(args.images) / n for n in names]
    refs = read_references(args.captions)
    cap = showattend.load(args.model)
    parts = {"encoder": 0.0, "teacher forcing": 0.0, "own caption": 0.0}
    real_force, real_encode, real_decode = X.teacher_force, cap.model.encode, showattend.api.decode

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] += time.perf_counter() - t
        return run

    X.teacher_force = timed("teacher forcing", real_force)
    cap.model.encode = timed("encoder", real_encode)
    showattend.api.decode = timed("own caption", real_decode)
    t0 = time.perf_counter()
    n_caps = n_imgs = 0
    for _, recs, err in cap.explain_paths(paths, lambda p: refs.get(p.name, []),
                                          batch_size=args.batch_size):
        if recs:
            n_imgs += 1
            n_caps += len(recs)
    wall = time.perf_counter() - t0
    print(f"explain: {n_caps} captions of {n_imgs} photos in {wall:.1f} s "
          f"({n_caps / wall:.0f} captions/s, {args.threads} threads)")
    rest = wall - sum(parts.values())
    for k, v in parts.items():
        print(f"  {k:16s} {v:6.1f} s  ({v / wall:.0%})")
    print(f"  {'files + records':16s} {rest:6.1f} s  ({rest / wall:.0%})")


if __name__ == "__main__":
    main()
