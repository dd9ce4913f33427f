#!/usr/bin/env bash
# Retrain the shipped photo model `flickr8k` from Flickr8k and compare it with the shipped file:
# prepare, train with configs/flickr8k_soft.toml on one thread (the run that made the shipped
# file), export it, print its SHA-256 beside the registry's. OUT (default runs/flickr8k_model.pt)
# is the exported file. Needs data/flickr8k/ as for scripts/flickr8k.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SA=.venv/bin/showattend
OUT=${1:-runs/flickr8k_model.pt}
$SA -q prepare --config configs/flickr8k_soft.toml
$SA -q train --config configs/flickr8k_soft.toml --train.threads=1
$SA export-model --checkpoint runs/flickr8k_soft/best.pt --name flickr8k --out "$OUT"
.venv/bin/python -c "from showattend.registry import get; print('shipped sha256', get('flickr8k').sha256)"
