#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the end-to-end demo (no camera, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
source scripts/python.sh
exec "$PY" -m edge_ad demo "$@"
