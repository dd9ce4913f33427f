"""Data path speed: a prepared folder against decoding JPEGs every time, in one run.

    PYTHONPATH=. .venv/bin/python bench/data_speed.py [--images 512] [--backbone resnet50]

1. DataLoader samples/s (batch 32, 2 workers) reading normalised images from the uint8 store
   of a prepared folder, against the same DataLoader decoding and resizing each JPEG every time
   (the on-the-fly ImageSource);
2. training samples/s (captions through the real train_one_epoch, decoder hidden 512) from the
   float16 feature cache (encoder skipped) against the image store (frozen encoder run on every
   batch).

Uses real photos when data/flickr8k/images (or /work/data/flickr8k/images) and the Flickr8k text
files exist, else generated JPEGs. The encoder's weights do not change its speed, so "none" is
the default (no download). Prints the prepare speeds too, and ratios measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from precision_util import Yardsticks
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from showattend import config as C
from showattend.data.datasets import (CaptionDataset, ImageDataset, ImageSource, collate_images,
                                      load_splits, load_vocab)
from showattend.data.prepare import prepare
from showattend.data.prepared import load_cache_encoder
from showattend.data.splits import make_source
from showattend.models.captioner import Captioner
from showattend.loading import make_preprocess
from showattend.train import TrainState, train_one_epoch

PHOTOS = [Path("data/flickr8k"), Path("/work/data/flickr8k")]
TEXT = [Path("data/flickr8k"), Path("/work/shared/flickr8k")]


def _find(candidates: list[Path], name: str) -> Path | None:
    return next((p for p in candidates if (p / name).exists()), None)


def generated_flickr(root: Path, n: int) -> tuple[Path, Path, Path]:
    """n photo-sized JPEGs (500x375, noise + shapes) in the Flickr8k text layout."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    names, lines = [], []
    for i in range(n):
        arr = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        d.ellipse((100, 80, 300, 280), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        name = f"{10_000 + i}_gen.jpg"
        img.save(images / name, quality=90)
        names.append(name)
        lines += [f"{name}#{k}\ta photo with a round shape number {k}" for k in range(5)]
    (root / "tokens.txt").write_text("\n".join(lines) + "\n")
    splits = root / "splits"
    splits.mkdir()
    k = max(1, n // 10)
    (splits / "trainImages.txt").write_text("\n".join(names[: n - 2 * k]) + "\n")
    (splits / "devImages.txt").write_text("\n".join(names[n - 2 * k: n - k]) + "\n")
    (splits / "testImages.txt").write_text("\n".join(names[n - k:]) + "\n")
    return images, root / "tokens.txt", splits


def loader_speed(source, n_workers: int, batch: int) -> float:
    """Samples/s of one pass of a DataLoader over every image of ``source``."""
    ds = ImageDataset(source)
    loader = DataLoader(ds, batch_size=batch, num_workers=n_workers, collate_fn=collate_images)
    t0 = time.perf_counter()
    n = 0
    for imgs, idx, _ in loader:
        n += len(idx)
    return n / (time.perf_counter() - t0)


def train_speed(cfg: C.Config, model: Captioner, dataset: CaptionDataset) -> float:
    """Captions/s of train_one_epoch (the real loop) over ``dataset``."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    state = TrainState()
    stop = SimpleNamespace(signum=None)
    t0 = time.perf_counter()
    train_one_epoch(model, opt, dataset, cfg, state, torch.device("cpu"), lambda r: None, stop,
                    lambda name: None, progress=False)
    return len(dataset) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="images in the prepared folder")
    ap.add_argument("--captions", type=int, default=256, help="captions per training measurement")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 is faster on a crowded CPU)")
    ap.add_argument("--generated", action="store_true",
                    help="use generated 500x375 JPEGs even when the Flickr8k photos exist")
    ap.add_argument("--work", default=None, help="keep the prepared folder here")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                    help="train.precision of the run measured (precision.py)")
    args = ap.parse_args()
    sticks = Yardsticks(torch.device("cpu"))  # fp32 and bf16 matmul rates of this run
    sticks.measure()

    tmp = Path(args.work or tempfile.mkdtemp(prefix="data_speed_"))
    photos, text = _find(PHOTOS, "images"), _find(TEXT, "Flickr8k.token.txt")
    if photos and text and not args.generated:
        images, tokens, splits = photos / "images", text / "Flickr8k.token.txt", text
        what = f"Flickr8k photos from {images}"
        per_split = args.images // 3  # first images of train, dev and test
    else:
        images, tokens, splits = generated_flickr(tmp / "gen", args.images)
        what = "generated 500x375 JPEGs"
        per_split = 0
    data = {"kind": "flickr", "root": str(images), "flickr_captions": str(tokens),
            "flickr_splits": str(splits), "prepared": str(tmp / "prepared"),
            "max_images": per_split, "min_word_freq": 1}
    cfg = C.from_dict(C.Config, {
        "out_dir": str(tmp / "run"), "data": data,
        "encoder": {"backbone": args.backbone, "weights": args.weights, "grid": args.grid,
                    "image_size": args.size, "coords": False},
        "attention": {"dim": 512}, "decoder": {"embed_dim": 512, "hidden_dim": 512},
        "train": {"batch_size": args.batch, "log_every": 10_000,
                  "precision": args.precision}})  # prepare's encoder and the training steps
    C.validate(cfg)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)

    res = prepare(cfg, workers=args.workers, progress=False)
    m = res.manifest
    n_images = m["images"]["shape"][0]
    print(f"{what}: {n_images} images at {args.size}x{args.size}; encoder {args.backbone} "
          f"(weights {args.weights}), annotations {m['features']['shape'][1:]}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"prepare: decoding {m['timing'].get('images_per_s', float('nan')):.1f} images/s "
          f"({args.workers} workers), features {m['timing'].get('features_per_s', float('nan')):.1f}"
          f" images/s")

    splits = load_splits(cfg.data, progress=False)
    vocab = load_vocab(cfg.data, splits)
    torch.manual_seed(0)
    model = Captioner.from_config(cfg, len(vocab))
    load_cache_encoder(model, splits.prepared)
    pre = make_preprocess(cfg, model)
    records = splits.train + splits.val + splits.test

    # 1. data loading: the uint8 store (features off) against decoding every JPEG
    off = C.replace(cfg, data={"features": "off"})
    store = make_source(off, splits, records, pre, model, False, "bench", False, "skip")
    jpeg = ImageSource(records, pre, cache=False, progress=False)
    s_store = loader_speed(store, args.workers, args.batch)
    s_jpeg = loader_speed(jpeg, args.workers, args.batch)
    print(f"DataLoader ({args.workers} workers, batch {args.batch}, {len(records)} images): "
          f"uint8 store {s_store:.1f} samples/s, JPEG decode {s_jpeg:.1f} samples/s, "
          f"ratio {s_store / s_jpeg:.1f}x")

    # 2. training: the float16 feature cache against the image store (frozen encoder per batch)
    results = {}
    for name, c in (("cache", cfg), ("store", off)):
        src = make_source(c, splits, splits.train, pre, model, False, "train", False, "skip")
        assert src.features == (name == "cache")
        ds = CaptionDataset(src, vocab, cfg.data.max_len)
        ds.items = ds.items[: args.captions]
        results[name] = train_speed(c, model, ds)
    print(f"training (batch {args.batch}, {args.captions} captions, decoder hidden 512): feature "
          f"cache {results['cache']:.1f} samples/s, image store {results['store']:.1f} "
          f"samples/s, ratio {results['cache'] / results['store']:.1f}x")
    print(json.dumps({"store_samples_per_s": round(s_store, 2), "jpeg_samples_per_s":
                      round(s_jpeg, 2), "train_cache_samples_per_s": round(results["cache"], 2),
                      "train_store_samples_per_s": round(results["store"], 2)}))

    sticks.measure()
    print(sticks.line())


if __name__ == "__main__":
    main()
