#!/usr/bin/env bash
# Set up (if needed) and run the built-in end-to-end demo. Extra arguments go to `showattend demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/showattend demo "$@"
