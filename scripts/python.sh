# shellcheck shell=bash
# Sourced by install.sh, demo.sh and test.sh (from the repository root): sets PY, the Python that edge_ad is
# installed into and run with. Normally the python3 on PATH (a pyenv / conda / activated virtual
# environment: unchanged). A system python3 that refuses pip installs (PEP 668: stock Debian 12 / Ubuntu
# 23.04+, the EXTERNALLY-MANAGED marker) gets a virtual environment at .venv instead.
externally_managed() {
  python3 - <<'PYEOF'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(marker) else 1)
PYEOF
}
# shellcheck disable=SC2034  # PY is used by the scripts that source this file
if externally_managed; then PY=.venv/bin/python; else PY=python3; fi
