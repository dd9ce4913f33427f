"""The attention family on the built-in data, same data, budget and seed for every variant.

    .venv/bin/python bench/compare_attention.py --out runs/compare [--epochs 2 --n-train 800
        --set decoder.hidden_dim=128] [--overlays docs] [--only soft local ...]

Trains each variant from configs/demo*.toml with the same data, epochs and seed, evaluates its
best checkpoint on the held-out test split (beam 3; stochastic kinds in `argmax` mode) and prints
one markdown table: BLEU-4, CIDEr, grounding, strict grounding, training time, parameters.

Variants (issue 17): soft, hard, local, soft with 4 heads, soft with 2 self-attention layers,
glimpse_hard, glimpse_gaussian, glimpse_stn. Also available with --only: hard_pure (REINFORCE
without the expected-context mixing) and hard_warm_pure (the same, warm-started from soft).
``--overlays DIR`` draws every variant's maps and windows for one test image into
DIR/attention_family.png (one row per variant) and the 4-head model's per-head maps into
DIR/attention_heads.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from showattend.config import load_config
from showattend.evaluation import evaluate_checkpoint
from showattend.train import fit

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [  # (run directory, config, overrides, label in the table)
    ("soft", "demo.toml", [], "soft"),
    ("hard", "demo_hard.toml", [], "hard (REINFORCE, 0.5 mixing)"),
    ("local", "demo.toml", ['attention.kind="local"'], "local-p (window 5, σ 1)"),
    ("soft_4heads", "demo.toml", ["attention.heads=4"], "soft, 4 heads"),
    ("soft_2sa", "demo.toml", ["encoder.self_attention_layers=2"], "soft + 2 self-attention layers"),
    ("glimpse_hard", "demo_hard.toml", ['attention.kind="glimpse_hard"'],
     "glimpse_hard (16 px crop, REINFORCE)"),
    ("glimpse_gaussian", "demo.toml", ['attention.kind="glimpse_gaussian"'],
     "glimpse_gaussian (DRAW, 16×16)"),
    ("glimpse_stn", "demo.toml", ['attention.kind="glimpse_stn"'], "glimpse_stn (affine, 16×16)"),
]
EXTRA = [
    ("hard_pure", "demo_hard.toml", ['hard.mix_mode="off"'], "hard, no mixing"),
    ("hard_warm_pure", "demo_hard.toml", ['hard.mix_mode="off"'], "hard, no mixing, warm soft"),
]


def run_variant(name: str, config: str, out: Path, data: Path, args, extra: list[str]) -> dict:
    overrides = [f'out_dir="{out / name}"', f'data.root="{data}"', f"train.epochs={args.epochs}",
                 f"data.n_train={args.n_train}", f"data.n_val={args.n_val}",
                 f"data.n_test={args.n_test}", f"train.val_images={args.n_val}",
                 "train.early_stop=0", "eval.meteor=false", f"train.seed={args.seed}",
                 f"train.threads={args.threads}", *args.set, *extra]
    if name == "hard_warm_pure":
        overrides.append(f'hard.warm_start="{out / "soft" / "best.pt"}"')
    cfg = load_config(ROOT / "configs" / config, overrides)
    t0 = time.time()
    result = fit(cfg, progress=False, evaluate_test=False)
    wall = time.time() - t0
    if result.interrupted:  # Ctrl-C / SIGTERM: fit saved last.pt; stop instead of going on
        raise SystemExit(f"interrupted while training {name} (its last.pt is in "
                         f"{out / name}); no table written")
    from showattend.loading import load_model

    model = load_model(out / name / "best.pt", "cpu")[0]
    mode = "argmax" if model.stochastic else None
    m = evaluate_checkpoint(out / name / "best.pt", "test", beam=3, meteor=False, progress=False,
                            mode=mode)
    row = {"variant": name, "kind": cfg.attention.kind, "test_mode": mode or "-",
           "epochs": result.epochs, "train_s": round(result.train_seconds, 1),
           "wall_s": round(wall, 1), "params": sum(p.numel() for p in model.parameters()),
           "BLEU-4": m["BLEU-4"], "CIDEr": m["CIDEr"], "grounding": m["grounding"],
           "grounding_strict": m["grounding_strict"]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], labels: dict[str, str]) -> str:
    head = ("| variant | BLEU-4 | CIDEr | grounding | strict grounding | training time | "
            "parameters |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {labels.get(r['variant'], r['variant'])} | {r['BLEU-4']:.3f} | {r['CIDEr']:.2f} | "
             f"{r['grounding']:.3f} | {r['grounding_strict']:.3f} | {r['train_s']:.0f} s | "
             f"{r['params'] / 1e6:.2f} M |" for r in rows]
    return head + "\n".join(lines) + "\n"


def overlays(out: Path, data: Path, names: list[str], labels: dict[str, str], dest: Path,
             image_index: int) -> None:
    """Every variant's words, maps and windows on the same test image (one row per variant)."""
    import showattend
    from showattend.data.coco import read_coco_captions
    from showattend.io import atomic_savefig
    from showattend.visualize import head_attention_figure, variants_figure

    rec = read_coco_captions(data / "captions_test.json", data, "test")[image_index]
    rows, view = [], None
    for name in names:
        cap = showattend.load(out / name / "best.pt", device="cpu")
        [c] = cap.caption([rec.path], beam=3)
        view = c.view
        rows.append((labels.get(name, name), c.words, c.attention, c.boxes))
        if c.head_attention is not None:  # the first 5 words keep the PNG small
            k = min(5, len(c.words))
            atomic_savefig(head_attention_figure(c.view, c.words[:k], c.attention[:k],
                                                 c.head_attention[:k], title=c.caption),
                           dest / "attention_heads.png", dpi=60)
    atomic_savefig(variants_figure(view, rows), dest / "attention_family.png", dpi=60)
    _palette(dest / "attention_family.png", dest / "attention_heads.png")
    print(f"overlays of test image {Path(rec.path).name} -> {dest}")


def _palette(*paths: Path) -> None:
    """256-colour PNGs: the noisy shapes backgrounds make true-colour overlays large."""
    from PIL import Image

    for p in paths:
        if p.is_file():
            with Image.open(p) as im:
                small = im.convert("RGB").quantize(256)
            small.save(p, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=6000, help="training images (5 captions each)")
    ap.add_argument("--n-val", type=int, default=250, help="validation images (model selection)")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every variant "
                    "(e.g. decoder.hidden_dim=128)")
    ap.add_argument("--overlays-only", action="store_true",
                    help="draw the overlays from the runs already in --out (no training)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    ap.add_argument("--overlays", default=None, help="folder for the overlay PNGs")
    ap.add_argument("--overlay-image", type=int, default=0, help="index of the test image")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    labels = {name: label for name, _, _, label in VARIANTS + EXTRA}
    chosen = [v for v in VARIANTS + EXTRA
              if (args.only is None and v in VARIANTS) or (args.only and v[0] in args.only)]
    if args.overlays_only:
        overlays(out, data, [v[0] for v in chosen], labels, Path(args.overlays or "docs"),
                 args.overlay_image)
        return
    rows = []
    t0 = time.time()
    for name, config, extra, _ in chosen:
        rows.append(run_variant(name, config, out, data, args, extra))
    md = table(rows, labels)
    (out / "comparison.md").write_text(md)
    print(md)
    print(f"total {time.time() - t0:.0f} s; {args.n_train} training images × {args.epochs} "
          f"epochs, seed {args.seed}, test on {args.n_test} images (beam 3)")
    if args.overlays:
        overlays(out, data, [r["variant"] for r in rows], labels, Path(args.overlays),
                 args.overlay_image)


if __name__ == "__main__":
    main()
