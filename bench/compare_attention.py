"""Soft vs hard attention (and hard-attention variants) on the built-in data, same budget.

    .venv/bin/python bench/compare_attention.py --out runs/compare [--epochs 16]

Trains each variant from configs/demo*.toml with the same data, epochs and seed, evaluates the
best checkpoint on the held-out test split (beam 3; hard attention in `argmax` mode, plus
`expectation` for reference), and prints a markdown table of BLEU-4, CIDEr, grounding and
training time. Variants: soft; hard with the paper's 0.5 expected-context mixing; hard with mixing
off (pure REINFORCE); hard with mixing off warm-started from the soft checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from showattend.config import load_config
from showattend.training import evaluate_checkpoint, fit

ROOT = Path(__file__).resolve().parents[1]


def run_variant(name: str, config: str, out: Path, data: Path, epochs: int, extra: list[str]) -> dict:
    overrides = [f'out_dir="{out / name}"', f'data.root="{data}"', f"train.epochs={epochs}",
                 "eval.meteor=false", *extra]
    cfg = load_config(ROOT / "configs" / config, overrides)
    t0 = time.time()
    result = fit(cfg, progress=False, evaluate_test=False)
    wall = time.time() - t0
    row = {"variant": name, "epochs": result.epochs, "train_s": round(result.train_seconds, 1),
           "wall_s": round(wall, 1)}
    modes = ["argmax", "expectation"] if cfg.attention.kind == "hard" else [None]
    for mode in modes:
        m = evaluate_checkpoint(out / name / "best.pt", "test", beam=3, meteor=False,
                                progress=False, mode=mode)
        tag = f"[{mode}]" if mode else ""
        row.update({f"BLEU-4{tag}": m["BLEU-4"], f"CIDEr{tag}": m["CIDEr"],
                    f"grounding{tag}": m["grounding"], f"grounding_strict{tag}": m["grounding_strict"]})
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| variant | test mode | BLEU-4 | CIDEr | grounding | strict | epochs | train time |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        for mode in ("argmax", "expectation", None):
            tag = f"[{mode}]" if mode else ""
            if f"BLEU-4{tag}" not in r:
                continue
            lines.append(f"| {r['variant']} | {mode or 'soft'} | {r[f'BLEU-4{tag}']:.3f} | "
                         f"{r[f'CIDEr{tag}']:.2f} | {r[f'grounding{tag}']:.3f} | "
                         f"{r[f'grounding_strict{tag}']:.3f} | {r['epochs']} | {r['train_s']:.0f} s |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    variants = [  # (run directory, config, overrides)
        ("soft", "demo.toml", []),
        ("hard_mix", "demo_hard.toml", []),
        ("hard_pure", "demo_hard.toml", ['hard.mix_mode="off"']),
        ("hard_warm_pure", "demo_hard.toml",
         ['hard.mix_mode="off"', f'hard.warm_start="{out / "soft" / "best.pt"}"']),
    ]
    rows = []
    for name, config, extra in variants:
        if args.only and name not in args.only:
            continue
        rows.append(run_variant(name, config, out, data, args.epochs, extra))
    md = table(rows)
    (out / "comparison.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
