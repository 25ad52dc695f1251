#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the end-to-end demo (no camera, no GPU needed).
# Relative paths in the arguments (--out DIR) are the caller's: the demo runs in the folder it was started from.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
./scripts/install.sh
source scripts/python.sh
if [[ $PY == */* && $PY != /* ]]; then PY="$PWD/$PY"; fi   # .venv/bin/python, from the caller's folder too
cd "$here"
exec "$PY" -m edge_ad demo "$@"
