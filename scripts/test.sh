#!/usr/bin/env bash
# The test suite on a fresh machine: install, then pytest (GPU / TensorRT / dataset tests skip when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
source scripts/python.sh
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
