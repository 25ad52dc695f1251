"""scripts/: shellcheck, and which Python install.sh / demo.sh / test.sh use (PEP 668 system pythons get .venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_scripts():
    res = subprocess.run(["shellcheck", "-x", "--severity=style", *map(str, SCRIPTS)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def _chosen_python(tmp_path: Path, python3: str) -> str:
    """PY as scripts/python.sh sets it, with ``python3`` on PATH being the given interpreter."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / "python3"
    if link.exists():
        link.unlink()
    link.symlink_to(python3)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run(["bash", "-c", f"source {ROOT / 'scripts' / 'python.sh'}; echo \"$PY\""],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _externally_managed(python: str) -> bool:
    code = ("import os, sys, sysconfig; m = os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'); "
            "print(sys.prefix == sys.base_prefix and os.path.isfile(m))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_python_choice_follows_pep668(tmp_path):
    """The Python running the tests (pyenv, a venv, ...) is used as it is; a system python3 that refuses
    pip installs (EXTERNALLY-MANAGED) is replaced by the project's .venv."""
    expected = ".venv/bin/python" if _externally_managed(sys.executable) else "python3"
    assert _chosen_python(tmp_path, sys.executable) == expected
    system = Path("/usr/bin/python3")
    if not (system.exists() and _externally_managed(str(system))):
        pytest.skip("no externally managed /usr/bin/python3 here")
    assert _chosen_python(tmp_path, str(system)) == ".venv/bin/python"


def test_scripts_use_the_chosen_python():
    """demo.sh / test.sh run edge_ad and pytest with the Python install.sh installed into (not whatever
    'edge-ad' is on PATH)."""
    for name in ("install.sh", "demo.sh", "test.sh"):
        text = (ROOT / "scripts" / name).read_text()
        assert "source scripts/python.sh" in text, name
        assert os.access(ROOT / "scripts" / name, os.X_OK), name
    assert 'exec "$PY" -m edge_ad demo' in (ROOT / "scripts" / "demo.sh").read_text()
    assert 'exec "$PY" -m pytest' in (ROOT / "scripts" / "test.sh").read_text()
