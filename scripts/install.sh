#!/usr/bin/env bash
# Install what edge_ad needs on a fresh Debian/Ubuntu machine (x86-64 workstation or CI).
# On a Jetson use jetson/install.sh instead (system TensorRT and OpenCV with GStreamer).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
make_venv=0
if [ "$PY" = .venv/bin/python ] && [ ! -x .venv/bin/python ]; then make_venv=1; fi
if [ $make_venv = 1 ] && ! python3 -c "import ensurepip" >/dev/null 2>&1; then
  need_apt+=(python3-venv)         # Debian's python3 makes no venv without it
fi
has_pip() { "$PY" -m pip --version >/dev/null 2>&1; }
if [ $make_venv = 0 ] && ! has_pip; then
  need_apt+=(python3-pip)          # stock Ubuntu 22.04 / Debian 11 python3 comes without pip
fi
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "error: ${need_apt[*]} must be installed first (as root: apt-get install ${need_apt[*]}); this user" \
         "is not root and has no sudo" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ $make_venv = 0 ] && ! has_pip; then
  echo "error: $(command -v "$PY") has no pip ('$PY -m pip' fails): install it (Debian/Ubuntu: apt-get install" \
       "python3-pip) or activate a Python environment that has it, then run $0 again" >&2
  exit 1
fi
if [ $make_venv = 1 ]; then
  echo "python3 is externally managed (PEP 668): installing into a virtual environment at .venv" >&2
  python3 -m venv .venv
fi
# torch is pinned (2.13.0). PyPI's Linux torch is the multi-GB CUDA build: unless pip is configured with an
# index or wheel folder of its own (CI's, a company mirror), PyTorch's CPU wheel index is added, whose
# 2.13.0+cpu satisfies the pin and is preferred. (The list is read whole first: 'pip config list | grep -q'
# under pipefail failed whenever grep's early exit cut pip's output, and the index was added on a configured pip.)
pip_config=$("$PY" -m pip config list 2>/dev/null || true)
if ! grep -qE '(index-url|find-links)=' <<<"$pip_config"; then
  export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
  echo "pip has no index configured besides PyPI: adding PyTorch's CPU wheels ($PIP_EXTRA_INDEX_URL)" >&2
fi
# sign: cryptography, for the Ed25519 signatures of bundle archives (bundle keygen, pack --sign-key, install --key)
"$PY" -m pip install -q --disable-pip-version-check -e ".[train,dev,broker,sign]"
