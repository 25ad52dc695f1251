"""The jetson/ deployment files: shellcheck, systemd-analyze verify, the installer's release logic (dry run),
the starting config against the real config loader. Tools that are absent skip their test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from edge_ad import doctor

JETSON = Path(__file__).resolve().parents[1] / "jetson"
INSTALL = JETSON / "install.sh"
SCRIPTS = sorted(JETSON.glob("*.sh"))
UNITS = ("edge-ad.service", "edge-ad-clocks.service")


def _bash(*args, timeout=60, **kw):
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout, **kw)


def _plan(l4t: str, *extra) -> dict:
    res = _bash("--l4t", l4t, "--print-plan", *extra)
    assert res.returncode == 0, res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


# ---------------------------------------------------------------------------- static checks
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shellcheck(script):
    res = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_executable_bash():
    assert SCRIPTS, "no scripts in jetson/"
    for s in SCRIPTS:
        assert os.access(s, os.X_OK), f"{s.name} is not executable"
        assert s.read_text().startswith("#!/usr/bin/env bash\n")
        assert "set -Eeuo pipefail" in s.read_text()


def _render_units(tmp_path: Path) -> list[Path]:
    """The units as install.sh writes them, pointed at executables that exist here."""
    prefix = tmp_path / "opt"
    exe = prefix / "venv" / "bin" / "edge-ad"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    main = tmp_path / "edge-ad.service"
    res = _bash("--l4t", "36.4.3", "--prefix", str(prefix), "--config-dir", str(tmp_path / "etc"),
                "--data-dir", str(tmp_path / "var"), "--user", "inspector", "--render-unit", str(main))
    assert res.returncode == 0, res.stderr
    clocks = tmp_path / "edge-ad-clocks.service"
    clocks.write_text((JETSON / "edge-ad-clocks.service").read_text().replace("/usr/bin/jetson_clocks", "/bin/true"))
    return [main, clocks]


def test_rendered_unit_uses_the_install_paths(tmp_path):
    main, _ = _render_units(tmp_path)
    text = main.read_text()
    assert f"ExecStart={tmp_path}/opt/venv/bin/edge-ad run --config {tmp_path}/etc/config.toml" in text
    assert "User=inspector" in text and "Group=inspector" in text
    assert f"WorkingDirectory={tmp_path}/var" in text
    assert "/opt/edge-ad" not in text and "/var/lib/edge-ad" not in text


def test_unit_contract():
    text = (JETSON / "edge-ad.service").read_text()
    keys = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    assert keys["Type"] == ["notify"]
    assert keys["Restart"] == ["always"]
    assert keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]   # systemctl reload: the loop reloads on SIGHUP
    assert int(keys["WatchdogSec"][0]) > 0
    after = " ".join(keys["After"])
    assert "network-online.target" in after and "nvargus-daemon.service" in after
    assert "network-online.target" in " ".join(keys["Wants"])
    assert "video" in keys["SupplementaryGroups"][0]
    assert keys["PrivateTmp"] == ["no"]  # CSI: nvargus-daemon's socket lives in /tmp
    assert keys["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    for unit in _render_units(tmp_path):
        res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        text = res.stdout + res.stderr
        about_unit = [line for line in text.splitlines() if unit.name in line]
        assert res.returncode == 0 and not about_unit, text


def test_dockerfile_uses_the_installer():
    text = (JETSON / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=nvcr\.io/nvidia/l4t-jetpack:r\$\{L4T\}$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert "jetson/install.sh --l4t" in text and "--no-service" in text and "--no-user" in text
    assert 'ENTRYPOINT ["edge-ad"]' in text and "/tmp/argus_socket" in text
    # the documented `docker run` gives the container what systemd gives the service: edge-ad.env, and
    # time to drain (30 s) and flush the outbox (10 s) on stop
    run = re.search(r"^#\s+docker run .*?edge-ad:r\S+$", text, re.M | re.S).group(0)
    assert "--env-file /etc/edge-ad/edge-ad.env" in run
    assert int(re.search(r"--stop-timeout (\d+)", run).group(1)) >= 40
    assert (JETSON / "Dockerfile.dockerignore").is_file()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint():
    res = subprocess.run(["hadolint", "--failure-threshold", "warning", str(JETSON / "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------- the installer's decisions
@pytest.mark.parametrize("l4t, jetpack, trt, cuda_python, python, bindings, opencv", [
    ("35.2.1", "5.1", "8.5", "cuda-python>=11.4,<12", "python3.10", "none", "pip"),     # 8.5: compile needs 8.6
    ("35.4.1", "5.1.2", "8.5", "cuda-python>=11.4,<12", "python3.10", "none", "pip"),
    ("36.3.0", "6.0", "8.6", "cuda-python>=12.2,<12.3", "python3", "system", "system"),
    ("36.4.0", "6.1", "10.3", "cuda-python>=12.6,<12.7", "python3", "system", "system"),
    ("36.4.3", "6.2", "10.3", "cuda-python>=12.6,<12.7", "python3", "system", "system"),
    ("38.2.0", "7.0", "10.13+", "cuda-python>=13.0,<14", "python3", "system", "system"),
    ("R38.4", "7.1", "10.13+", "cuda-python>=13.0,<14", "python3", "system", "system"),
])
def test_plan_per_release(l4t, jetpack, trt, cuda_python, python, bindings, opencv):
    if Path("/usr/local/cuda/version.json").exists():
        pytest.skip("a CUDA installation here overrides the CUDA version of the plan")
    plan = _plan(l4t)
    assert plan["JETPACK"] == jetpack and plan["TENSORRT"] == trt
    assert plan["CUDA_PYTHON"] == cuda_python and plan["PYTHON"] == python
    assert plan["TRT_BINDINGS"] == bindings and plan["OPENCV"] == opencv
    # the installer and edge-ad doctor agree on the JetPack names
    assert doctor.jetpack_for_l4t(plan["L4T"]) == jetpack


def test_plan_options_and_refusals():
    plan = _plan("36.4.3", "--python", "/usr/bin/python3.12", "--trt-bindings", "none", "--opencv", "pip",
                 "--prefix", "/srv/ead", "--user", "inspector")
    assert plan["PYTHON"] == "/usr/bin/python3.12" and plan["TRT_BINDINGS"] == "none" and plan["OPENCV"] == "pip"
    assert plan["VENV"] == "/srv/ead/venv" and plan["SERVICE_USER"] == "inspector"
    for args, message in ((["--l4t", "32.7.1"], "JetPack 4"), (["--l4t", "35.1.0"], "JetPack 5.0"),
                          (["--l4t", "banana"], "expected a version"), (["--l4t", "36.4", "--opencv", "x"], "--opencv"),
                          (["--l4t", "36.4", "--prefix", "relative"], "absolute"), (["--bogus"], "unknown option"),
                          (["--l4t", "36.4", "--user", "Bad User"], "user name")):
        res = _bash(*args, "--print-plan")
        assert res.returncode != 0 and message in res.stderr, (args, res.stderr)
    assert "Usage:" in _bash("--help").stdout


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this is a Jetson")
def test_refuses_a_non_jetson_without_override():
    res = _bash("--print-plan")
    assert res.returncode != 0 and "not a Jetson" in res.stderr


def test_dry_run_changes_nothing(tmp_path):
    prefix, etc, var = tmp_path / "opt", tmp_path / "etc", tmp_path / "var"
    res = _bash("--l4t", "36.4.3", "--dry-run", "--prefix", str(prefix), "--config-dir", str(etc),
                "--data-dir", str(var), "--clocks", "--enable", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert f"-m venv --system-site-packages {prefix}/venv" in out
    assert "apt-get install -y --no-install-recommends python3-libnvinfer" in out
    assert "apt-get install -y --no-install-recommends nvidia-opencv" in out
    # this checkout is installed as a wheel built from a copy of it (test_source_wheel_is_built_from_a_clean_copy)
    assert f"pip wheel --no-deps --wheel-dir {prefix}/build/wheel" in out
    assert f"pip install --no-deps --upgrade --force-reinstall {prefix}/build/wheel/edge_ad-VERSION-py3-none-any.whl" in out
    assert "without opencv-python-headless" in out
    assert "pip uninstall -y opencv-python-headless opencv-python" in out
    assert "cuda-python\\>=12.6\\,\\<12.7" in out
    assert "numpy>=1.24,<2" in out
    assert "systemctl enable edge-ad-clocks.service" in out and "systemctl enable --now edge-ad.service" in out
    assert "edge-ad doctor" in out
    # edge-ad on PATH (the guide runs `sudo -u edge-ad edge-ad ...`): a link to this prefix's venv
    assert f"ln -sfn {prefix}/venv/bin/edge-ad /usr/local/bin/edge-ad" in out
    assert _plan("36.4.3")["BIN_LINK"] == "/usr/local/bin/edge-ad"
    # the closing steps build the engine as jetson/README.md step 6 does
    assert f"edge-ad compile --bundle {var}/bundle --precision best --calib {var}/normals" in out
    assert not prefix.exists() and not etc.exists() and not var.exists()


@pytest.mark.slow
def test_source_wheel_is_built_from_a_clean_copy(tmp_path):
    """install.sh ran `pip install <checkout>`, which builds in the checkout: it left a root-owned build/ and
    edge_ad.egg-info in the user's clone, and after a `git pull` the next install reused build/lib, shipping
    modules deleted from the source. The wheel (--build-wheel: the one an install of a source folder
    installs) is now built from a temporary copy that leaves those out; the clone is only read."""
    repo = JETSON.parent
    clone = tmp_path / "clone"
    shutil.copytree(repo / "edge_ad", clone / "edge_ad", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "jetson").mkdir()
    for name in ("pyproject.toml", "README.md", "jetson/install.sh"):
        shutil.copy2(repo / name, clone / name)
    # what a build in place left: the module since deleted from the source is still in build/lib
    stale = clone / "build" / "lib" / "edge_ad" / "removed_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("GONE = True\n")
    (clone / "edge_ad.egg-info").mkdir()
    (clone / "edge_ad.egg-info" / "SOURCES.txt").write_text("edge_ad/removed_module.py\n")

    def tree():
        return {str(p.relative_to(clone)): (p.stat().st_mtime_ns, p.stat().st_size) for p in clone.rglob("*")}

    before = tree()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "wheels"
    res = subprocess.run(["bash", str(clone / "jetson" / "install.sh"), "--l4t", "36.4.3", "--python", sys.executable,
                          "--build-wheel", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("edge_ad-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "edge_ad/cli/__init__.py" in names and any(n.startswith("edge_ad/schemas/") for n in names)
    assert not [n for n in names if "removed_module" in n], names
    assert tree() == before                      # no build/, egg-info or anything else written into the clone
    assert not list(tmp.iterdir())               # the temporary copy is removed

    res = subprocess.run(["bash", str(clone / "jetson" / "install.sh"), "--l4t", "36.4.3",
                          "--package", str(tmp_path), "--build-wheel", str(out)], capture_output=True, text=True)
    assert res.returncode == 1 and f"{tmp_path}: not an edge-ad source folder (no pyproject.toml)" in res.stderr


@pytest.mark.parametrize("opencv", ["system", "pip"])
def test_install_sh_installs_the_sign_extra_with_the_requirements(opencv):
    """Ed25519-signed bundle archives (bundle install --key, the config's update_key) need cryptography, the
    sign extra, which install.sh left out with every extra: the requirements it installs (the Python it runs
    on edge-ad's metadata, here this checkout's) are edge-ad's own and its sign extra's, and nothing of the
    train, dev, broker, gpu or bench extras; opencv-python-headless only with --opencv pip."""
    code = re.search(r"<<'PY'\n(.*?)\nPY\n", INSTALL.read_text(), flags=re.S).group(1)
    reqs = subprocess.run([sys.executable, "-", opencv], input=code, capture_output=True, text=True,
                          check=True).stdout.split("\n")
    names = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in reqs if r}
    assert "cryptography>=41" in reqs and not any("extra" in r for r in reqs), reqs
    assert not names & {"torch", "pytest", "amqtt", "cuda-python", "openvino", "matplotlib"}, names
    assert ("opencv-python-headless" in names) == (opencv == "pip"), names
    assert {"numpy", "onnxruntime", "paho-mqtt"} <= names, names


def test_dry_run_jetpack5_builds_trt_bindings_when_asked(tmp_path):
    res = _bash("--l4t", "35.4.1", "--dry-run", "--yes", "--no-service", "--prefix", str(tmp_path / "opt"),
                "--python", "python3.10-that-is-not-here", timeout=120)
    assert res.returncode != 0 and "not found" in res.stderr  # only python3.10 is fetched from deadsnakes
    res = _bash("--l4t", "35.4.1", "--dry-run", "--yes", "--no-service", "--prefix", str(tmp_path / "opt"),
                timeout=120)
    assert res.returncode == 0 and "git clone" not in res.stdout     # by default: ONNX Runtime only
    res = _bash("--l4t", "35.4.1", "--dry-run", "--yes", "--no-service", "--prefix", str(tmp_path / "opt"),
                "--trt-bindings", "build", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    if "add-apt-repository -y ppa:deadsnakes/ppa" not in out:
        assert "python3.10 -m venv" in out  # a python3.10 exists here already
    assert "git clone --depth 1 --branch release/8.5 https://github.com/NVIDIA/TensorRT.git" in out
    assert "TARGET_ARCHITECTURE=aarch64" in out and "PYTHON_MINOR_VERSION=10" in out
    assert "OpenCV from pip (no GStreamer)" in res.stderr
    assert "cuda-python\\>=11.4\\,\\<12" in out
    assert not (tmp_path / "opt").exists()


@pytest.mark.parametrize("l4t, extra, backend, device", [
    ("35.4.1", (), "onnxruntime", "cpu"),                                    # JetPack 5: TensorRT 8.5 is too old
    ("35.4.1", ("--trt-bindings", "build"), "onnxruntime", "cpu"),           # bindings for your own use only
    ("36.4.3", (), "tensorrt", "cuda:0"),
    ("36.4.3", ("--trt-bindings", "none"), "onnxruntime", "cpu"),
])
def test_written_config_runs_without_tensorrt_where_none_is_installed(tmp_path, l4t, extra, backend, device):
    from edge_ad.config import load_settings

    plan = _plan(l4t, *extra)
    assert plan["BACKEND"] == backend and plan["DEVICE"] == device
    var = tmp_path / "var"
    cfg = tmp_path / "config.toml"
    res = _bash("--l4t", l4t, *extra, "--data-dir", str(var), "--render-config", str(cfg))
    assert res.returncode == 0, res.stderr
    s = load_settings(cfg)
    assert (s.model.backend, s.model.device) == (backend, device) and s.model.bundle == var / "bundle"
    res = _bash("--l4t", l4t, *extra, "--dry-run", "--yes", "--no-service", "--prefix", str(tmp_path / "opt"),
                "--config-dir", str(tmp_path / "etc"), "--data-dir", str(var), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f'(backend = "{backend}", device = "{device}")' in res.stdout
    assert ("edge-ad compile" in res.stdout) == (backend == "tensorrt"), res.stdout   # no engine to build


# ---------------------------------------------------------------------------- config and docs
def test_starting_config_is_valid():
    from edge_ad.config import load_settings

    s = load_settings(JETSON / "config.toml")
    assert s.model.backend == "tensorrt" and str(s.model.bundle) == "/var/lib/edge-ad/bundle"
    assert s.source.uri.startswith("csi://")
    mqtt = s.mqtt_settings()
    assert mqtt is not None and str(mqtt.outbox_path).startswith("/var/lib/edge-ad/")


def test_the_broker_config_keeps_what_a_consumer_misses_while_away(mosquitto_binary, tmp_path):
    """A Mosquitto set up with only 'persistence true' (what the docs asked) kept 1000 messages for a
    persistent consumer that was away and dropped the rest without a word to the devices: 801 of 1300
    results arrived. jetson/mosquitto.conf, loaded over Mosquitto's defaults by a real broker (its listener
    and login replaced by the test's), keeps them all."""
    from edge_ad.mqtt import MqttLink, MqttSettings
    from edge_ad.mqtt.broker import Mosquitto
    from edge_ad.mqtt.collector import Collector
    from edge_ad.mqtt.settings import BrokerSettings

    shipped = [line for line in (JETSON / "mosquitto.conf").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    keys = dict(line.split(None, 1) for line in shipped)
    assert keys["persistence"] == "true" and int(keys["autosave_interval"]) <= 300
    assert int(keys["max_queued_messages"]) in range(1, 10**9) and int(keys["max_queued_bytes"]) > 0
    # a payload limit is not announced: v5 drops a larger message, 3.1.1 has it discarded without a word;
    # stated, it overrides one an earlier file sets. A packet limit, if any, takes the largest event image
    assert keys["message_size_limit"] == "0"
    packet_limit = int(keys.get("max_packet_size", 0))
    assert packet_limit == 0 or packet_limit >= MqttSettings().image_max_bytes + 2048
    local = [line for line in shipped if line.split()[0] not in ("listener", "allow_anonymous", "password_file")]
    defaults = ["max_queued_messages 1000", "max_queued_bytes 0", "autosave_interval 1800"]   # Mosquitto 2's
    broker = Mosquitto(tmp_path / "broker", binary=mosquitto_binary, extra_config="\n".join(defaults + local))
    with broker:
        consumer = BrokerSettings(url=broker.url)
        Collector(consumer, "edge-ad/v1/p1/+/result", client_id="mes").start().stop()   # subscribed, then away
        link = MqttLink(MqttSettings(url=broker.url, site="p1", device="cam1", outbox_sync="normal",
                                     outbox_path=tmp_path / "outbox.sqlite")).start()
        for _ in range(1500):
            link.publish_result({"score": 0.1, "ng": False})
        deadline = time.monotonic() + 20
        while link.stats()["acked"] < 1500 and time.monotonic() < deadline:
            time.sleep(0.05)
        link.stop()
        with Collector(consumer, "edge-ad/v1/p1/+/result", client_id="mes") as back:
            back.wait_ids(1500, 10)
            assert len(back.unique_ids()) == 1500
        assert "being dropped" not in broker.log_tail(200)


def test_env_file_is_all_comments_or_assignments():
    for line in (JETSON / "edge-ad.env").read_text().splitlines():
        line = line.strip()
        assert not line or line.startswith("#") or re.match(r"^[A-Z_][A-Z0-9_]*=", line), line


def test_readme_walks_flash_to_service():
    text = (JETSON / "README.md").read_text()
    for step in ("Flash", "Install edge-ad", "capture", "Train a bundle", "TensorRT engine", "start the service",
                 "Recalibrate", "Monitor"):
        assert step.lower() in text.lower(), step
    for cmd in ("edge-ad doctor", "edge-ad capture", "edge-ad train", "edge-ad compile", "edge-ad quantize",
                "edge-ad calibrate", "edge-ad monitor", "edge-ad bundle pack", "edge-ad bundle install",
                "systemctl enable --now edge-ad", "nvpmodel", "jetson_clocks"):
        assert cmd in text, cmd
    for doc in ("CAMERAS.md", "POWER.md"):
        assert (JETSON / doc).is_file()


def _readme_commands(text: str, langs: tuple[str, ...] = ("bash",)) -> list[str]:
    """The commands of a README's text: the lines of its code blocks of ``langs`` ("": a block that names
    none; continuations joined) and its inline code that starts with a command."""
    cmds, block = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if block is None:
                lang, block = line[3:].strip(), []
            else:
                if lang in langs:
                    cmds += [x.strip() for x in "".join(block).replace("\\\n", " ").splitlines() if x.strip()]
                block = None
        elif block is not None:
            block.append(line)
    cmds += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text.replace("```", ""))]
    return [c for c in cmds if c.split()[:1] and c.split()[0] in ("edge-ad", "sudo", "rsync", "ssh", "scp")]


def test_readme_reaches_the_service_folders_as_a_user_that_may():
    """install.sh makes /var/lib/edge-ad the service user's (0750): step 5 fetched the normal images with
    `rsync -a jetson:/var/lib/edge-ad/normals/ data/part-a/`, which the login user cannot read (Permission
    denied). Every command of the guide that touches the service's folders runs with sudo (as root or as
    the service user), and sudo over ssh gets a terminal to ask for the password on (ssh -t). The same in
    the top README's short version for the device, which wrote the bundle there as the login user."""
    top = (JETSON.parent / "README.md").read_text()
    top = top[top.index("## Jetson deployment"):]
    top = top[:top.index("\n## ", 1)]
    cmds = _readme_commands((JETSON / "README.md").read_text()) + _readme_commands(top)
    assert any("edge-ad compile" in c for c in _readme_commands(top))
    assert any("jetson:" in c and "normals" in c for c in cmds), cmds
    for c in cmds:
        if "/var/lib/edge-ad" in c and c.split()[0] != "scp":
            assert "sudo" in c, c
        if c.startswith("ssh ") and "sudo" in c:
            assert c.startswith("ssh -t "), c
        if " bundle install " in c and c.startswith("sudo -u edge-ad"):
            # the service user cannot read the login user's home folder (0750): the archive is elsewhere
            assert re.search(r"bundle install /(tmp|var/lib/edge-ad)/", c), c


def test_the_docs_use_the_service_folders_as_a_user_that_may():
    """docs/calibration.md's examples calibrated with the line's /etc/edge-ad config and installed into
    /opt/edge-ad as the login user: on a device set up with install.sh, /var/lib/edge-ad is the service user's
    (0750), the edge-ad.env that --config reads is root's and the service group's (0640), and /opt/edge-ad holds
    the program (root's): Permission denied. Every command of the docs that uses the service's folders runs
    with sudo, as the guide's do, and none keeps a bundle or a deploy folder in /opt/edge-ad."""
    repo = JETSON.parent
    used = []
    for doc in (repo / "README.md", *sorted(repo.glob("docs/*.md"))):
        for c in _readme_commands(doc.read_text(), langs=("bash", "")):
            if "/var/lib/edge-ad" in c or re.search(r"--config[ =]/etc/edge-ad", c):
                used.append(c)
                assert c.startswith("sudo"), (doc.name, c)
            assert not re.search(r"--(deploy|bundle|out)[ =]/opt/edge-ad", c), (doc.name, c)
            if " bundle install " in c and c.startswith("sudo -u edge-ad"):
                assert re.search(r"bundle install /(tmp|var/lib/edge-ad)/", c), c
    assert len(used) >= 10, used


def test_step_references_point_at_the_step_they_mean():
    """jetson/config.toml said 'copy or train the bundle here (jetson/README.md, step 4)', but step 4 is the
    capture and 'Train a bundle, or copy one' is step 5. Every 'jetson/README.md, step N' elsewhere names a
    step whose title shares a word with the line that refers to it; every step N of the guide exists."""
    readme = (JETSON / "README.md").read_text()
    steps = {int(n): title for n, title in re.findall(r"^## (\d+)\. (.+)$", readme, re.M)}
    assert sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) >= 9, steps

    def words(text):
        return set(re.findall(r"[a-z]{4,}", text.lower())) - {"edge", "jetson", "readme", "step", "this", "here"}

    repo = JETSON.parent
    files = [f for f in (*JETSON.iterdir(), *repo.glob("docs/*.md"), repo / "README.md", *repo.glob("examples/*"),
                         *repo.glob("edge_ad/**/*.py")) if f.is_file() and f != JETSON / "README.md"]
    refs = []
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            for n in re.findall(r"jetson/README\.md,? step (\d+)", line):
                refs.append((f.name, int(n), line))
    assert len(refs) >= 2, refs   # config.toml and install.sh's closing steps
    for name, n, line in refs:
        assert n in steps and words(line) & words(steps[n]), (name, line, steps.get(n))
    for n in re.findall(r"\b[Ss]teps? (\d+)\b", readme):
        assert int(n) in steps, n


def test_readme_file_table_lists_every_file_of_the_folder():
    """mosquitto.conf was added without a row in the table at the top of jetson/README.md."""
    text = (JETSON / "README.md").read_text()
    table = text[:text.index("After installation")]
    for f in sorted(JETSON.iterdir()):
        if f.is_file() and f.name != "README.md":
            assert f"`{f.name}`" in table or f"[{f.name}]" in table, f.name


def test_the_broker_config_creates_the_password_file_once():
    """Its header said `mosquitto_passwd -c` for every login: -c recreates the file, so each device's login
    wiped the ones before it (the fleet but the last device refused at connect)."""
    cmds = [line.lstrip("#").strip() for line in (JETSON / "mosquitto.conf").read_text().splitlines()
            if "mosquitto_passwd" in line and line.lstrip("#").strip().startswith("sudo")]
    assert len(cmds) >= 2 and " -c " in cmds[0] and all(" -c " not in c for c in cmds[1:]), cmds


# ---------------------------------------------------------------------------- camera-check.sh
def test_camera_check_help_is_its_header_comment(tmp_path):
    """--help printed lines 2-10 of the file, which ended with 'set -Eeuo pipefail' (and a longer header would
    have been cut). It prints the comment at the top, without '#', up to the first line that is not one."""
    script = JETSON / "camera-check.sh"
    lines = script.read_text().splitlines()
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(re.sub(r"^# ?", "", line))
    for opt in ("--help", "-h"):
        res = subprocess.run(["bash", str(script), opt], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and res.stdout.splitlines() == header, res.stdout + res.stderr
    assert any("camera-check.sh snap" in h for h in header) and "set -" not in res.stdout
    # a header grown by a line is printed whole, and still not the code after it
    longer = tmp_path / "camera-check.sh"
    longer.write_text("\n".join([lines[0], "# Added line.", *lines[1:]]) + "\n")
    res = subprocess.run(["bash", str(longer), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.splitlines() == ["Added line.", *header], res.stdout


@pytest.mark.parametrize("gst_rc", [0, 1])
def test_camera_check_exits_non_zero_when_the_capture_fails(tmp_path, gst_rc):
    """camera-check.sh csi / snap: a GStreamer pipeline that fails (no sensor, Argus down) is an error exit
    with a message, not 'exit 0' after the grep of its output. gst-launch-1.0 here is a stand-in script on
    PATH that prints what GStreamer prints and exits with gst_rc."""
    gst = tmp_path / "bin" / "gst-launch-1.0"
    gst.parent.mkdir()
    msg = "Setting pipeline to PLAYING ...\\nrendered: 60, dropped: 0" if gst_rc == 0 else \
        "ERROR: from element /GstPipeline:pipeline0/GstNvArgusCameraSrc: No cameras available"
    gst.write_text(f"#!/bin/sh\nprintf '{msg}\\n'\nexit {gst_rc}\n")
    gst.chmod(0o755)
    env = {**os.environ, "PATH": f"{gst.parent}:{os.environ['PATH']}"}
    for args in (["csi", "0"], ["snap", "csi", "0", str(tmp_path / "s.jpg")]):
        res = subprocess.run(["bash", str(JETSON / "camera-check.sh"), *args], capture_output=True, text=True,
                             env=env, timeout=30)
        if gst_rc == 0:
            assert res.returncode == 0, res.stderr
        else:
            assert res.returncode == 1 and "camera-check: capture failed (gst-launch-1.0 exit 1)" in res.stderr
            assert "No cameras available" in res.stdout + res.stderr


def test_the_docs_name_only_files_the_repository_has():
    """README.md pointed at `shared/DESIGN.md` and `shared/MODELS.md`, files outside the repository that a reader
    of it does not have. Every relative link of README.md, docs/*.md and jetson/*.md, and every `*.md` file they
    name in a code span, is a file of the repository (relative to the document or to its root)."""
    repo = JETSON.parent
    missing = []
    for doc in (repo / "README.md", *sorted(repo.glob("docs/*.md")), *sorted(JETSON.glob("*.md"))):
        text = doc.read_text()
        links = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"[a-z]+:", t)]
        for target in links + re.findall(r"`([\w./-]+\.md)`", text):
            if not ((doc.parent / target).exists() or (repo / target).exists()):
                missing.append((doc.name, target))
    assert not missing, missing
