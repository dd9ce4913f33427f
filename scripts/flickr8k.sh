#!/usr/bin/env bash
# From nothing to a test score on Flickr8k photos, with the README's chosen settings: prepare the
# store and the EfficientNet-Lite0 feature cache, train the cross-entropy model with attention
# supervision from the Flickr30k Entities boxes (configs/flickr8k_soft_ensemble.toml: four runs, train.seed
# 0–3, two at a time, joined into one ensemble), evaluate it on the test split with the photo-grounding
# measures. Prints the wall time of each step. (Self-critical fine-tuning is a separate step:
# configs/flickr8k_scst.toml, README "Sequence-level training".)
# Needs, relative to the repository root: data/flickr8k/images/ (8,091 photos), the four official
# text files in data/flickr8k/ and data/flickr8k/annotations.zip (Flickr30k Entities).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SA=.venv/bin/showattend
for f in data/flickr8k/images data/flickr8k/Flickr8k.token.txt data/flickr8k/annotations.zip; do
  if [ ! -e "$f" ]; then
    echo "scripts/flickr8k.sh: $f is missing (see README, 'Real photos: Flickr8k')" >&2
    exit 2
  fi
done
t0=$(date +%s)
step() {  # step NAME COMMAND...: run it, print its wall time
  local name=$1; shift
  local s; s=$(date +%s)
  "$@"
  echo "flickr8k.sh: $name took $(( $(date +%s) - s )) s (total $(( $(date +%s) - t0 )) s)"
}
step prepare $SA -q prepare --config configs/flickr8k_soft_ensemble.toml
step train $SA -q train --config configs/flickr8k_soft_ensemble.toml --no-test  # the next step tests
step evaluate $SA -q evaluate --checkpoint runs/flickr8k_soft_ensemble/best.pt --split test \
  --entities data/flickr8k/annotations.zip
echo "flickr8k.sh: from nothing to the test score in $(( $(date +%s) - t0 )) s"
