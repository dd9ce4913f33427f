"""Peak memory of batched beam search at COCO sizes: shared memory against a copy per beam.

    PYTHONPATH=. .venv/bin/python bench/beam_memory.py [--images 32] [--beam 5]

Each way runs in its own process (peak resident memory is per process): the decoder of
decoder_flops.py (14×14×2048 annotations, vocabulary 10k, dims 512), random annotations for
``--images`` images, beam search with ``--beam`` beams for 3 words. "copy per beam" is the same
search with the attention's ``shares_memory`` switched off, as the glimpse kinds run it. Prints
each process's peak resident set size and what a process that only builds the model and the
annotations peaks at.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def child(way: str, images: int, beam: int, prec: str = "fp32") -> None:
    sys.path.insert(0, str(HERE))
    from decoder_flops import D, L, build

    from showattend import precision as P
    from showattend.decoding import beam_search

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(torch.device("cpu")).eval()
    feats = torch.randn(images, L, D).relu()
    if way == "copies":
        model.decoder.attention.shares_memory = False
    if way != "baseline":
        with torch.no_grad(), P.compute(prec, torch.device("cpu")):
            beam_search(model, feats, beam=beam, max_len=3)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=("fp32", "bf16", "compare"), default="fp32",
                    help="decode in fp32, bf16 (precision.py: bf16 weight copies for the call), "
                         "or both")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.images, args.beam, args.precision)
        return
    for prec in (("fp32", "bf16") if args.precision == "compare" else (args.precision,)):
        peak = {}
        for way in ("baseline", "shared", "copies"):
            out = subprocess.run([sys.executable, __file__, "--child", way, "--images",
                                  str(args.images), "--beam", str(args.beam), "--precision",
                                  prec], capture_output=True, text=True, check=True)
            peak[way] = int(out.stdout.split()[-1]) / 2 ** 20  # GiB
        print(f"[{prec}] beam {args.beam}, {args.images} images, COCO sizes: peak resident "
              f"memory {peak['shared']:.2f} GiB with shared memory, {peak['copies']:.2f} GiB "
              f"with a copy per beam ({peak['baseline']:.2f} GiB for the model and annotations "
              f"alone)")


if __name__ == "__main__":
    main()
