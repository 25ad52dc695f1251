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


def _fake_repo(tmp_path: Path, python3: str) -> tuple[Path, dict]:
    """A copy of scripts/ in tmp_path/repo, and an environment whose PATH starts with tmp_path/bin: a
    ``python3`` (the given shell script body), an ``apt-get`` that records its arguments in apt.log and a
    ``sudo`` that runs its command with that PATH."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("python3", python3), ("apt-get", f'echo "$@" >> {tmp_path}/apt.log\n'),
                       ("sudo", 'exec "$@"\n')):
        (bindir / name).write_text("#!/bin/sh\n" + body)
        (bindir / name).chmod(0o755)
    return repo, {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/bin", "HOME": str(tmp_path)}


def test_demo_sh_runs_the_demo_in_the_callers_folder(tmp_path):
    """'/path/to/edge_ad/scripts/demo.sh --out mydemo' writes mydemo where the user is, not in the repo."""
    repo, env = _fake_repo(tmp_path, 'case "$1" in -) exit 1;; esac\necho "cwd=$(pwd) args=$*"\n')
    (repo / "scripts" / "install.sh").write_text("#!/usr/bin/env bash\nexit 0\n")   # installs nothing here
    user = tmp_path / "user"
    user.mkdir()
    res = subprocess.run(["bash", str(repo / "scripts" / "demo.sh"), "--out", "mydemo"], capture_output=True,
                         text=True, env=env, cwd=user)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"cwd={user} args=-m edge_ad demo --out mydemo"


def test_install_sh_asks_for_pip_when_python3_has_none(tmp_path):
    """A python3 without pip (stock Ubuntu 22.04) gets python3-pip from apt-get; still none: an error that
    says what to install, not just 'No module named pip'."""
    repo, env = _fake_repo(tmp_path, 'case "$1" in -) exit 1;; esac\necho "No module named pip" >&2\nexit 1\n')
    res = subprocess.run(["bash", str(repo / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 1
    assert "python3-pip" in (tmp_path / "apt.log").read_text()
    assert "has no pip" in res.stderr and "apt-get install python3-pip" in res.stderr, res.stderr


@pytest.mark.parametrize("pip_config, expected", [("", "https://download.pytorch.org/whl/cpu"),
                                                  ("global.extra-index-url='file:///opt/pypi/simple'", ""),
                                                  (":env:.find-links='/opt/wheels'", ""),
                                                  # a long list: grep -q stops reading at the first line, and
                                                  # pip's write then fails (under pipefail that read as "none")
                                                  ("global.extra-index-url='file:///opt/pypi/simple'\n"
                                                   "$(seq 1 200000)", "")])
def test_install_sh_adds_pytorchs_cpu_index_only_where_pip_has_none(tmp_path, pip_config, expected):
    """PyPI's Linux torch is the CUDA build: a pip with no index of its own gets PyTorch's CPU wheel index;
    a configured one (CI's, a mirror, a wheel folder) is left alone."""
    log = tmp_path / "pip.log"
    repo, env = _fake_repo(tmp_path, f"""case "$1" in -) exit 1;; esac
case "$*" in
  "-m pip config list") printf '%s\\n' "{pip_config}" ;;
  "-m pip install"*) echo "index=$PIP_EXTRA_INDEX_URL" > {log} ;;
esac
exit 0
""")
    res = subprocess.run(["bash", str(repo / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert log.read_text().strip() == f"index={expected}"


def test_install_sh_installs_the_sign_extra(tmp_path):
    """Ed25519 signing (bundle keygen, pack --sign-key) needs cryptography, the sign extra, which install.sh
    left out: the README's commands failed on a machine it had set up."""
    log = tmp_path / "pip.log"
    repo, env = _fake_repo(tmp_path, f"""case "$1" in -) exit 1;; esac
case "$*" in "-m pip install"*) echo "$*" > {log} ;; esac
exit 0
""")
    res = subprocess.run(["bash", str(repo / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split()[-1] == ".[train,dev,broker,sign]", log.read_text()
    from edge_ad.config import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"train", "dev", "broker", "sign"} <= set(extras) and any("cryptography" in r for r in extras["sign"])


def test_install_sh_without_root_or_sudo_names_the_packages_to_install(tmp_path):
    repo, env = _fake_repo(tmp_path, 'case "$1" in -) exit 1;; esac\nexit 0\n')
    bindir = Path(env["PATH"].split(":")[0])
    (bindir / "sudo").unlink()
    (bindir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bindir / "id").chmod(0o755)
    (bindir / "dirname").symlink_to(shutil.which("dirname"))
    env["PATH"] = str(bindir)   # no sudo, no shellcheck, no openssl on it
    res = subprocess.run([shutil.which("bash"), str(repo / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 1
    assert "error: shellcheck openssl must be installed first (as root: apt-get install shellcheck openssl)" \
        in res.stderr, res.stderr
    assert not (tmp_path / "apt.log").exists()
