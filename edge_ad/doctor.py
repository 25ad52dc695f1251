"""``edge-ad doctor``: what this machine can do, what is missing, and the fix for each.

Every check returns a :class:`Check` (name, status, what was found, the fix). ``required`` checks are the
ones ``edge-ad run`` cannot start without; :func:`exit_code` is 0 when none of them failed, 1 otherwise
(``strict``: any warning or failure). Checks never raise: a probe that crashes is reported as failed.

What is checked: Python, numpy, OpenCV (and its GStreamer / FFmpeg / V4L2 support), ONNX Runtime and its
providers, TensorRT, the CUDA driver and GPUs (cuda-python, else ``nvidia-smi``, else the kernel driver
files), the Jetson L4T / JetPack release and power mode, cameras, the MQTT broker (TCP, TLS handshake,
MQTT CONNECT with the credentials, and with a config whether the broker lets the device publish to its topics), an outbox an earlier edge-ad kept at the working directory's reading of a
relative ``mqtt.outbox_path`` (this one reads it from the config's folder), disk space and write access for the
outbox, log and snapshots, the bundle's integrity and calibration (the bundle found as ``run`` finds it,
``model.deploy_dir`` included, and a warning when that deploy folder's ``previous`` link is damaged: no
rollback until it is repaired; what ``run`` does at its start with the release in force, by ``run``'s own
decision: :func:`check_release`), whether a TensorRT engine ``run`` would use exists for this GPU, whether the model opens on the backend,
precision and device ``run`` will use (it is opened and closed again, as ``run`` opens it), and the
systemd service's state (failed or restarting is a warning). Nothing here imports torch, unless the
backend to check is ``torch``.
"""

from __future__ import annotations

import enum
import glob
import importlib.util
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

MIN_PYTHON = (3, 10)
MIN_NUMPY = (1, 24)
DEFAULT_MIN_FREE_MB = 256

# L4T (Jetson Linux) release -> JetPack release. Kept in step with jetson/install.sh.
JETPACK_BY_L4T = {
    "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4",
    "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1",
    "38.2": "7.0", "38.4": "7.1",
}


class Status(str, enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class Check:
    """One line of the report. A FAIL of a ``required`` check means ``edge-ad run`` cannot start."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    required: bool = False
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        return d


def _ok(name, detail, **kw) -> Check:
    return Check(name, Status.OK, detail, **kw)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3])


def _run(cmd: Sequence[str], timeout: float = 3.0) -> tuple[int, str]:
    """(exit code, stdout+stderr) of a short command; (127, why) when it cannot run."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{cmd[0]}: no answer within {timeout:g} s"
    except OSError as exc:
        return 126, f"{cmd[0]}: {exc}"
    return p.returncode, (p.stdout + p.stderr).strip()


# ---------------------------------------------------------------------------- Jetson facts
def parse_nv_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.3, GCID: ...`` -> ``"36.4.3"`` (None when not that format)."""
    m = re.search(r"#\s*R(\d+)\s*\(\w+\),\s*REVISION:\s*([0-9.]+)", text)
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2).strip('.')}"


def jetpack_for_l4t(l4t: str) -> str | None:
    """The JetPack release of an L4T version ("36.4.3" -> "6.2"); None when unknown."""
    parts = l4t.split(".")
    for n in (3, 2):
        key = ".".join(parts[:n])
        if key in JETPACK_BY_L4T:
            return JETPACK_BY_L4T[key]
    if parts and parts[0] == "38":
        return "7.x"
    return None


def l4t_version(root: str = "/") -> str | None:
    """This machine's L4T version from /etc/nv_tegra_release (None when not a Jetson)."""
    p = Path(root) / "etc" / "nv_tegra_release"
    try:
        return parse_nv_tegra_release(p.read_text(errors="replace"))
    except OSError:
        pass
    rc, out = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-l4t-core"])
    if rc == 0 and out:
        m = re.match(r"(\d+\.\d+(?:\.\d+)?)", out)
        return m.group(1) if m else None
    return None


# ---------------------------------------------------------------------------- software
def check_python() -> Check:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check("python", Status.FAIL, text, required=True,
                     fix="edge-ad needs Python >= 3.10: JetPack 6 ships it; on JetPack 5 run jetson/install.sh, "
                         "which installs python3.10 and makes the venv with it")
    venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    return _ok("python", text + (", venv" if venv else ""), data={"version": f"{v.major}.{v.minor}.{v.micro}",
                                                                  "venv": venv})


def check_numpy() -> Check:
    try:
        import numpy as np
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return Check("numpy", Status.FAIL, f"not importable ({exc})", required=True,
                     fix="pip install 'numpy>=1.24,<2'")
    if _version_tuple(np.__version__) < MIN_NUMPY:
        return Check("numpy", Status.FAIL, f"{np.__version__} is older than 1.24", required=True,
                     fix="pip install -U 'numpy>=1.24,<2'")
    return _ok("numpy", np.__version__, data={"version": np.__version__})


def parse_opencv_build(info: str) -> dict[str, bool]:
    """Which video I/O back-ends a ``cv2.getBuildInformation()`` text says are built in."""
    found = {"gstreamer": False, "ffmpeg": False, "v4l2": False}
    for line in info.splitlines():
        key, _, value = line.strip().partition(":")
        key = key.strip().lower()
        yes = value.strip().upper().startswith("YES")
        if key == "gstreamer":
            found["gstreamer"] = yes
        elif key == "ffmpeg":
            found["ffmpeg"] = yes
        elif key in ("v4l/v4l2", "v4l2", "v4l"):
            found["v4l2"] = found["v4l2"] or yes
    return found


def _reads_with_ffmpeg(source: str) -> bool:
    """Does ``run`` read this source (a URI, or just its scheme) through OpenCV's FFmpeg? rtsp:// cameras and
    file:// videos do; a file:// still image (an extension dir:// reads: .jpg, .png, ...) does not: the image
    reader decodes it, as it decodes dir:// images."""
    from .errors import InputError

    scheme = source.split("://", 1)[0].lower() if "://" in source else source.lower()
    if scheme in ("rtsp", "rtsps"):
        return True
    if scheme != "file":
        return False
    if "://" not in source:
        return True          # a bare "file": a video, as far as can be told
    try:
        from .runtime.sources import is_still_image, parse_uri

        return not is_still_image(parse_uri(source))
    except InputError:       # a bad URI: the source check says what is wrong with it
        return True


def check_opencv(source: str | None = None) -> list[Check]:
    """OpenCV, and what ``source`` (the URI run reads, or just its scheme) needs of it: GStreamer for csi://,
    FFmpeg for rtsp:// and file:// videos (not for a file:// still image), V4L2 for v4l2://."""
    source_scheme = (source.split("://", 1)[0].lower() if "://" in source else source.lower()) if source else None
    try:
        import cv2
    except Exception as exc:  # noqa: BLE001
        fix = ("on a Jetson: sudo apt install nvidia-opencv (JetPack's OpenCV, with GStreamer) and use a venv "
               "made with --system-site-packages; elsewhere: pip install opencv-python-headless")
        if "numpy" in str(exc).lower():
            fix = ("this OpenCV was built against numpy 1.x: pip install 'numpy>=1.24,<2' in the venv")
        return [Check("opencv", Status.FAIL, f"not importable ({exc})", fix=fix, required=True)]
    where = Path(getattr(cv2, "__file__", "") or "?")
    pip_wheel = "site-packages" in str(where) and "dist-packages" not in str(where)
    io = parse_opencv_build(cv2.getBuildInformation())
    origin = "pip wheel" if pip_wheel else "system"
    out = [_ok("opencv", f"{cv2.__version__} ({origin}, {where.parent})",
               data={"version": cv2.__version__, "path": str(where), "pip_wheel": pip_wheel, **io})]
    need_gst = source_scheme == "csi"
    if io["gstreamer"]:
        out.append(_ok("gstreamer", "OpenCV has GStreamer: csi:// cameras (nvarguscamerasrc) work"))
    else:
        fix = ("csi:// cameras need an OpenCV with GStreamer. On a Jetson: "
               "'pip uninstall -y opencv-python-headless' inside the venv so JetPack's OpenCV is used "
               "(jetson/install.sh does this); v4l2:// USB cameras work without it")
        out.append(Check("gstreamer", Status.FAIL if need_gst else Status.WARN,
                         "OpenCV was built without GStreamer" + (" (a pip wheel)" if pip_wheel else ""),
                         fix=fix, required=need_gst))
    if source and _reads_with_ffmpeg(source) and not io["ffmpeg"]:
        out.append(Check("ffmpeg", Status.FAIL, "OpenCV was built without FFmpeg, which rtsp:// sources and "
                         "file:// videos use", required=True,
                         fix="install an OpenCV with FFmpeg (the pip wheel has it; JetPack's OpenCV has it); a "
                             "file:// still image (.png, .jpg, ...) needs none"))
    if source_scheme == "v4l2" and not io["v4l2"]:
        out.append(Check("v4l2", Status.FAIL, "OpenCV was built without V4L2", required=True,
                         fix="install an OpenCV with V4L/V4L2 video I/O (the pip wheel and JetPack's both have it)"))
    return out


def check_onnxruntime(required: bool = True) -> Check:
    try:
        import onnxruntime as ort
    except Exception as exc:  # noqa: BLE001
        return Check("onnxruntime", Status.FAIL if required else Status.WARN, f"not importable ({exc})",
                     required=required,
                     fix="pip install onnxruntime (or onnxruntime-gpu from the Jetson Zoo for its CUDA provider)")
    providers = list(ort.get_available_providers())
    short = ", ".join(p.replace("ExecutionProvider", "") for p in providers)
    return _ok("onnxruntime", f"{ort.__version__}; providers: {short}",
               data={"version": ort.__version__, "providers": providers})


def check_tensorrt(required: bool = False, l4t: str | None = None) -> Check:
    """TensorRT's Python bindings. ``required``: the config's backend is ``tensorrt``, without which ``run``
    refuses to start (it falls back to ONNX Runtime only with ``auto``). ``l4t``: this Jetson's L4T
    release (None: not a Jetson); on JetPack 5 (L4T 35) TensorRT 8.5 is too old for edge-ad, so the fix
    there is ONNX Runtime, which jetson/install.sh sets up."""
    status = Status.FAIL if required else Status.WARN
    onnx = 'model.backend = "onnxruntime"'
    runs = 'edge-ad run cannot start with model.backend = "tensorrt"' if required else "inference runs on ONNX Runtime"
    instead = f"; or set {onnx} (or \"auto\") to run on ONNX Runtime" if required else ""
    if l4t and l4t.split(".")[0] == "35":
        return Check("tensorrt", status, f"not used on JetPack 5: {runs}", required=required,
                     fix=f"JetPack 5's TensorRT 8.5 is older than the 8.6 edge-ad needs (jetson/install.sh installs "
                         f"no bindings there by default): set {onnx}; JetPack 6 or newer for TensorRT")
    if importlib.util.find_spec("tensorrt") is None:
        fix = ("sudo apt install python3-libnvinfer, and make the venv with --system-site-packages "
               "(jetson/install.sh does both)") if l4t else \
              "pip install tensorrt (x86-64 / SBSA)" + ("" if required else ", or use ONNX Runtime (the default "
                                                                           "without TensorRT)")
        return Check("tensorrt", status, f"not installed: {runs}", fix=fix + instead, required=required)
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001
        return Check("tensorrt", status, f"installed but not importable ({exc}): {runs}",
                     required=required, fix="a TensorRT built for another Python or CUDA: reinstall the "
                     "bindings that match this Python (jetson/install.sh)" + instead)
    from .runtime.backends.tensorrt import trt_supported

    version = str(trt.__version__)
    if not trt_supported(version):
        return Check("tensorrt", status,
                     f"{version} is older than the 8.6 edge-ad needs: no engine can be built; {runs}",
                     fix="JetPack 6 or newer for TensorRT (JetPack 5 ships 8.5)" + instead,
                     required=required, data={"version": version})
    return _ok("tensorrt", version, data={"version": version})


# ---------------------------------------------------------------------------- GPU / CUDA
def _cuda_python_driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
        return driver
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
        return driver


def _cu(result):
    """cuda-python status check: the runtime's one function for it (raises CudaError with the name)."""
    from .runtime.backends.cuda import check

    return check(result, "CUDA driver call")


def _gpus_cuda_python() -> dict:
    drv = _cuda_python_driver()
    _cu(drv.cuInit(0))
    version = int(_cu(drv.cuDriverGetVersion()))
    n = int(_cu(drv.cuDeviceGetCount()))
    gpus = []
    attr = drv.CUdevice_attribute
    for i in range(n):
        dev = _cu(drv.cuDeviceGet(i))
        name = _cu(drv.cuDeviceGetName(128, dev))
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, (bytes, bytearray)) \
            else str(name)
        major = int(_cu(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)))
        minor = int(_cu(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)))
        gpus.append({"index": i, "name": name, "compute_capability": f"{major}.{minor}"})
    return {"driver_cuda": f"{version // 1000}.{(version % 1000) // 10}", "gpus": gpus, "via": "cuda-python"}


def _gpus_nvidia_smi() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    rc, out = _run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"], 5.0)
    if rc != 0:
        return {"error": out.splitlines()[-1] if out else f"nvidia-smi exited {rc}", "gpus": [], "via": "nvidia-smi"}
    gpus = []
    driver = ""
    for i, line in enumerate(l for l in out.splitlines() if l.strip()):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 3:
            gpus.append({"index": i, "name": cells[0], "compute_capability": cells[2]})
            driver = cells[1]
    return {"driver": driver, "gpus": gpus, "via": "nvidia-smi"}


def check_cuda(required: bool = False, jetson_l4t: str | None = None) -> list[Check]:
    """The CUDA driver and GPUs; plus whether the TensorRT backend's CUDA binding is importable."""
    info = None
    errors = []
    has_cuda_python = importlib.util.find_spec("cuda") is not None
    if has_cuda_python:
        try:
            info = _gpus_cuda_python()
        except Exception as exc:  # noqa: BLE001 - no driver, no device, an old binding
            errors.append(f"cuda-python: {exc}")
    if info is None or not info.get("gpus"):
        smi = _gpus_nvidia_smi()
        if smi and smi.get("gpus"):
            info = smi
        elif smi and smi.get("error"):
            errors.append(f"nvidia-smi: {smi['error']}")
    out: list[Check] = []
    if info and info.get("gpus"):
        gpus = ", ".join(f"{g['name']} (sm_{g['compute_capability'].replace('.', '')})" for g in info["gpus"])
        drv = info.get("driver_cuda") or info.get("driver") or "?"
        what = "CUDA driver API" if "driver_cuda" in info else "driver"
        out.append(_ok("cuda", f"{what} {drv}; {len(info['gpus'])} GPU(s): {gpus} [via {info['via']}]", data=info))
    else:
        proc = Path("/proc/driver/nvidia/version")
        if proc.is_file():
            first = proc.read_text(errors="replace").splitlines()[0] if proc.stat().st_size else ""
            detail = f"kernel driver present ({first.strip()[:80]})"
        elif jetson_l4t or glob.glob("/dev/nvhost-ctrl-gpu") or Path("/dev/nvgpu").exists():
            detail = f"Jetson integrated GPU (L4T {jetson_l4t or '?'})"
        else:
            detail = ""
        if detail:
            fix = "pip install cuda-python matching the CUDA version (jetson/install.sh picks it) to query the GPU"
            if errors:
                detail += "; " + "; ".join(errors)
                fix = ("the CUDA driver did not answer: check that this user is in the 'video' group "
                       "(sudo usermod -aG video $USER, then log in again) and that no container hides /dev/nv*")
            out.append(Check("cuda", Status.WARN, detail, fix=fix, data={"errors": errors}))
        else:
            out.append(Check("cuda", Status.FAIL if required else Status.WARN,
                             "no NVIDIA GPU found" + (f" ({'; '.join(errors)})" if errors else "")
                             + ": inference runs on the CPU", required=required,
                             fix="on a Jetson, flash JetPack; on a PC, install the NVIDIA driver"))
    if importlib.util.find_spec("tensorrt") is not None:
        binding = "cuda-python" if has_cuda_python else ("pycuda" if importlib.util.find_spec("pycuda") else "")
        if binding:
            out.append(_ok("cuda-binding", f"{binding} (used by the TensorRT backend)"))
        else:
            out.append(Check("cuda-binding", Status.FAIL if required else Status.WARN,
                             "TensorRT is installed but neither cuda-python nor pycuda is", required=required,
                             fix="pip install cuda-python matching the CUDA major.minor, e.g. "
                                 "'cuda-python==12.6.*' on JetPack 6.1/6.2 (jetson/install.sh does it)"))
    return out


def check_platform() -> Check:
    l4t = l4t_version()
    if not l4t:
        import platform
        return Check("platform", Status.SKIP, f"not a Jetson ({platform.machine()}, {platform.system()})")
    jp = jetpack_for_l4t(l4t) or "unknown JetPack"
    detail = f"Jetson L4T R{l4t} (JetPack {jp})"
    data: dict[str, Any] = {"l4t": l4t, "jetpack": jp}
    model = Path("/proc/device-tree/model")
    if model.is_file():
        name = model.read_bytes().rstrip(b"\0").decode(errors="replace")
        detail += f", {name}"
        data["model"] = name
    if shutil.which("nvpmodel"):
        rc, out = _run(["nvpmodel", "-q"], 3.0)
        m = re.search(r"NV Power Mode:\s*(\S+)", out)
        if rc == 0 and m:
            mode = m.group(1)
            nums = re.findall(r"^\s*(\d+)\s*$", out, re.M)
            detail += f", power mode {mode}" + (f" ({nums[-1]})" if nums else "")
            data["power_mode"] = mode
    fix = "" if jetpack_for_l4t(l4t) else "an L4T release this version of edge-ad was not tested on"
    return Check("platform", Status.OK if not fix else Status.WARN, detail, fix=fix, data=data)


# ---------------------------------------------------------------------------- cameras
def _video_devices() -> list[dict]:
    out = []
    for dev in sorted(glob.glob("/dev/video*"), key=lambda p: int(re.sub(r"\D", "", p) or 0)):
        name_file = Path("/sys/class/video4linux") / Path(dev).name / "name"
        try:
            name = name_file.read_text().strip()
        except OSError:
            name = ""
        out.append({"device": dev, "name": name, "access": os.access(dev, os.R_OK | os.W_OK)})
    return out


def _argus() -> tuple[bool, str]:
    """(daemon present, state) for nvargus-daemon (Jetson CSI cameras)."""
    if not (shutil.which("nvargus-daemon") or Path("/usr/sbin/nvargus-daemon").exists()):
        return False, "absent"
    if shutil.which("systemctl"):
        rc, out = _run(["systemctl", "is-active", "nvargus-daemon"], 3.0)
        return True, out.strip() or ("active" if rc == 0 else "unknown")
    return True, "unknown"


def check_cameras(source: str | None = None) -> list[Check]:
    devices = _video_devices()
    present, argus = _argus()
    listing = ", ".join(f"{d['device']}" + (f" ({d['name']})" if d["name"] else "") for d in devices)
    detail = (listing or "no /dev/video* devices") + (f"; nvargus-daemon {argus}" if present else "")
    data = {"devices": devices, "nvargus": argus}
    if source is None:
        if devices or present:
            return [_ok("cameras", detail, data=data)]
        return [Check("cameras", Status.WARN, detail, data=data,
                      fix="plug in a USB camera (then it shows as /dev/videoN) or connect a CSI camera; "
                          "file://, rtsp:// and synthetic:// sources need none")]
    out = [_ok("cameras", detail, data=data)] if (devices or present) else \
        [Check("cameras", Status.SKIP, detail, data=data)]
    out.append(check_source(source, devices, present, argus))
    return out


def check_source(uri: str, devices: list[dict] | None = None, argus_present: bool | None = None,
                 argus_state: str = "") -> Check:
    """The configured source: the device exists and is accessible, the file exists, the host answers."""
    from .errors import InputError

    try:
        from .runtime.sources import parse_uri, redact_uri
        spec = parse_uri(uri)
        scheme, target, safe = spec.scheme, spec.target, redact_uri(uri)
    except InputError as exc:
        return Check("source", Status.FAIL, str(exc), required=True, fix="fix the source URI (see docs of edge-ad run)")
    if scheme == "v4l2":
        dev = f"/dev/video{target}" if str(target).isdigit() else str(target)
        if not os.path.exists(dev):   # run starts and waits for it with back-off, as for an RTSP camera
            return Check("source", Status.WARN, f"{safe}: {dev} does not exist (yet): run starts and waits for it",
                         fix="plug the camera in (ls /dev/video*; v4l2-ctl --list-devices) or fix the URI")
        if not os.access(dev, os.R_OK | os.W_OK):
            return Check("source", Status.FAIL, f"{safe}: no read/write access to {dev}", required=True,
                         fix="add the user to the 'video' group: sudo usermod -aG video $USER (the service user "
                             "made by jetson/install.sh is in it)")
        return _ok("source", f"{safe}: {dev} present and accessible")
    if scheme == "csi":
        if argus_present is None:
            argus_present, argus_state = _argus()
        if not argus_present:
            return Check("source", Status.FAIL, f"{safe}: nvargus-daemon not found (not a Jetson?)", required=True,
                         fix="csi:// needs a Jetson with JetPack (nvargus-daemon); use v4l2:// for a USB camera")
        if argus_state not in ("active", "unknown"):
            return Check("source", Status.WARN, f"{safe}: nvargus-daemon is {argus_state}",
                         fix="sudo systemctl enable --now nvargus-daemon")
        return _ok("source", f"{safe}: nvargus-daemon {argus_state}")
    if scheme in ("rtsp", "rtsps"):
        from urllib.parse import urlsplit
        parts = urlsplit(uri)
        port = parts.port or 554
        err = _tcp_probe(parts.hostname or "", port, 3.0)
        if err:
            return Check("source", Status.WARN, f"{safe}: {err}",
                         fix="check the camera's address and network; run reconnects with back-off meanwhile")
        return _ok("source", f"{safe}: {parts.hostname}:{port} answers")
    if scheme in ("file", "dir"):
        from .data.image import IMAGE_EXTS
        from .runtime.sources import check_startup

        p = Path(target)
        try:
            check_startup(spec)  # what run checks: the file decodes, the folder has a readable image
        except InputError as exc:
            if not p.exists():
                fix = "fix the path"
            elif scheme == "dir":
                fix = f"put readable images ({' '.join(IMAGE_EXTS)}) in the folder"
            elif _reads_with_ffmpeg(uri):
                fix = "give a video OpenCV/FFmpeg can decode"
            else:             # a still image: read as dir:// images are, not by FFmpeg
                fix = "give an image file the image reader can decode (a valid, complete file)"
            return Check("source", Status.FAIL, str(exc), required=True, fix=fix)
        if scheme == "file":
            return _ok("source", f"{safe}: {p} ({p.stat().st_size} bytes, decodes)")
        return _ok("source", f"{safe}: folder {p}")
    return _ok("source", f"{safe}: generated frames, no camera needed")


# ---------------------------------------------------------------------------- broker
def _tcp_probe(host: str, port: int, timeout: float) -> str:
    """'' when a TCP connection opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except socket.gaierror as exc:
        return f"cannot resolve host '{host}' ({exc.strerror or exc})"
    except socket.timeout:
        return f"{host}:{port}: no answer within {timeout:g} s (firewall or wrong address?)"
    except ConnectionRefusedError:
        return f"{host}:{port}: connection refused (nothing listens there)"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def _tls_context(settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file:
        ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    if settings.tls_insecure:
        ctx.check_hostname = False
    return ctx


def _mqtt_connect(settings, timeout: float, publish: Sequence[str] = ()) -> tuple[bool, str, dict[str, Any]]:
    """MQTT CONNECT with the settings' credentials and protocol: (accepted, reason, acks). Once accepted, an empty
    QoS 1 message is published to each topic in ``publish`` (MQTT v5 only: a 3.1.1 PUBACK carries no reason code);
    ``acks`` maps each to the reason code of its PUBACK, None when none came within ``timeout``."""
    import threading

    import paho.mqtt.client as mqtt

    v5 = str(getattr(settings.protocol, "value", settings.protocol)) == "5"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-ad-doctor-{os.getpid()}",
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    user, password = settings.credentials()
    if user is not None:
        client.username_pw_set(user, password)
    if settings.tls:
        client.tls_set_context(_tls_context(settings))
        if settings.tls_insecure:
            client.tls_insecure_set(True)
    done, acked = threading.Event(), threading.Condition()
    result: dict[str, Any] = {}
    acks: dict[int, Any] = {}      # message id -> the reason code of its PUBACK

    def on_connect(_c, _u, _flags, reason_code, _props=None):
        result["ok"] = not reason_code.is_failure
        result["reason"] = str(reason_code)
        done.set()

    def on_publish(_c, _u, mid, reason_code, _props=None):
        with acked:
            acks[mid] = reason_code
            acked.notify_all()

    client.on_connect = on_connect
    client.on_publish = on_publish
    try:
        client.connect(settings.host, settings.port, keepalive=max(5, int(timeout) + 5))
    except Exception as exc:  # noqa: BLE001
        return False, f"connect failed: {exc}", {}
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False, f"no CONNACK within {timeout:g} s (is this an MQTT broker? MQTT v5 refused?)", {}
        sent: dict[str, int] = {}
        if result.get("ok") and v5:
            sent = {topic: client.publish(topic, b"", qos=1).mid for topic in publish}
            with acked:
                acked.wait_for(lambda: set(sent.values()) <= set(acks), timeout)
        with acked:
            return bool(result.get("ok")), str(result.get("reason")), {t: acks.get(mid) for t, mid in sent.items()}
    finally:
        try:
            client.disconnect()
        finally:
            client.loop_stop()


def publish_probe_topics(settings) -> list[str]:
    """The topics of a device (``settings``: its :class:`~edge_ad.mqtt.settings.MqttSettings`) that ``doctor``
    probes for the broker's leave to publish: those of its outbox (``result``, ``event`` and the event image's:
    one the broker refuses is dropped, lost), not the retained ``status`` and ``calibration`` nor ``telemetry``,
    whose consumers would show a probe (an empty status reads as a decommissioned device)."""
    from .mqtt.topics import Topics

    t = Topics(settings.site, settings.device)
    return [t.result, t.event, t.event_image_of("doctor-probe") if settings.image_topic_event_id else t.event_image]


def _check_publish(settings, acks: dict[str, Any], base: str) -> Check:
    """The ``broker-acl`` line: what the broker answered to the probes of :func:`_mqtt_connect` (MQTT v5) of the
    device's topics under ``base``."""
    from .mqtt.client import reason_failed, reason_text, reason_value

    url = settings.safe_url
    login = f"login '{settings.credentials()[0]}'" if settings.credentials()[0] is not None else "the anonymous login"
    refused = {t: rc for t, rc in acks.items() if rc is not None and reason_failed(rc)}
    silent = [t for t, rc in acks.items() if rc is None]
    if refused:
        why = "; ".join(f"{t}: {reason_text(rc)} (reason code 0x{reason_value(rc) or 0:02X})" for t, rc in refused.items())
        return Check("broker-acl", Status.FAIL,
                     f"{url} refused {login} a publish to {len(refused)} of the device's topics ({why}): the "
                     "broker's ACL does not let it write there, and edge-ad run would drop every result, event or "
                     "image it sends there (counted as 'rejected' and named in output_error events, see "
                     "docs/mqtt.md, 'Refused by the broker')",
                     fix=f"let {login} write {base}/# in the broker's ACL (Mosquitto: its acl_file, a 'user' line "
                         f"then 'topic write {base}/#'), or set mqtt.username to the user the ACL grants it")
    if silent:
        return Check("broker-acl", Status.WARN, f"{url}: no PUBACK within the timeout for the probe of "
                                               f"{', '.join(silent)}: whether {login} may publish there is not known",
                     fix="run doctor again with a longer --timeout; check the broker's load and log")
    return _ok("broker-acl", f"{url}: {login} may publish to {', '.join(acks)} (an empty message to each, "
                             "acknowledged)")


def check_broker(settings, timeout: float = 3.0, publish: Sequence[str] | None = None) -> list[Check]:
    """TCP connect, TLS handshake (mqtts://) and MQTT CONNECT; with ``publish`` (the device's topics:
    :func:`publish_probe_topics`) whether the broker lets the login publish there (``broker-acl``: an empty QoS 1
    message to each, MQTT v5; a 3.1.1 PUBACK cannot refuse, so that is not checked). Never required: ``run``
    starts without a broker (results wait in the outbox), so an unreachable broker is a warning and a refused
    TLS, login or publish (which will not fix itself) a failure of an optional check."""
    url = settings.safe_url
    err = _tcp_probe(settings.host, settings.port, timeout)
    if err:
        return [Check("broker", Status.WARN, f"{url}: {err}",
                      fix="start the broker or fix mqtt.url; edge-ad run keeps results in its outbox meanwhile")]
    checks = []
    if settings.tls:
        try:
            ctx = _tls_context(settings)
            with socket.create_connection((settings.host, settings.port), timeout=timeout) as raw:
                with ctx.wrap_socket(raw, server_hostname=settings.host) as tls:
                    version = tls.version()
                    cert = tls.getpeercert() or {}
            subject = dict(x[0] for x in cert.get("subject", ()) if x)
            checks.append(_ok("broker-tls", f"{url}: {version}, certificate of '{subject.get('commonName', '?')}' "
                                            "verified" + (" (host name not checked)" if settings.tls_insecure else "")))
        except ssl.SSLCertVerificationError as exc:
            return [Check("broker-tls", Status.FAIL, f"{url}: certificate not trusted ({exc.verify_message})",
                          fix="set mqtt.ca_file to the CA that signed the broker's certificate "
                              "(tls_insecure only skips the host name check)")]
        except (ssl.SSLError, OSError) as exc:
            return [Check("broker-tls", Status.FAIL, f"{url}: TLS handshake failed ({exc})",
                          fix="is this port TLS (8883)? check the broker's TLS listener, ca_file, cert_file, key_file")]
    try:
        ok, reason, acks = _mqtt_connect(settings, timeout, publish or ())
    except Exception as exc:  # noqa: BLE001
        ok, reason, acks = False, f"{type(exc).__name__}: {exc}", {}
    if ok:
        checks.append(_ok("broker", f"{url}: MQTT CONNECT accepted ({reason})"))
        base = publish[0].rsplit("/", 1)[0] if publish else ""      # edge-ad/v1/<site>/<device>
        if publish and str(getattr(settings.protocol, "value", settings.protocol)) != "5":
            checks.append(Check("broker-acl", Status.SKIP, "MQTT 3.1.1: whether the broker lets the device publish "
                                "to its topics cannot be checked (a 3.1.1 PUBACK carries no reason code: Mosquitto "
                                "acknowledges a publish its ACL denies and discards it, and the device counts it as "
                                f"delivered); let it write {base}/# in the broker's ACL, or use MQTT v5"))
        elif publish:
            checks.append(_check_publish(settings, acks, base))
    else:
        fix = "check mqtt.username / password (or EDGE_AD_MQTT_USERNAME / EDGE_AD_MQTT_PASSWORD) and the broker's ACL"
        if "CONNACK" in reason:
            fix = "check that this port is an MQTT listener; for a 3.1.1-only broker set mqtt.protocol = \"3.1.1\""
        checks.append(Check("broker", Status.FAIL, f"{url}: MQTT CONNECT refused: {reason}", fix=fix))
    return checks


# ---------------------------------------------------------------------------- disk
def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(dirs: Iterable[str | os.PathLike], min_free_mb: int = DEFAULT_MIN_FREE_MB) -> list[Check]:
    """Each folder the run writes to: writable (or creatable), and at least ``min_free_mb`` MiB free."""
    out = []
    seen = set()
    for d in dirs:
        p = Path(d).expanduser()
        if p in seen:
            continue
        seen.add(p)
        base = _existing_ancestor(p)
        if not base.is_dir():
            out.append(Check("disk", Status.FAIL, f"{p}: {base} is not a folder, so {p} cannot be created",
                             required=True, fix="choose another folder (--data-dir / the config's paths)"))
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=base, prefix=".edge-ad-doctor-"):
                pass
        except OSError as exc:
            out.append(Check("disk", Status.FAIL, f"{p}: cannot write in {base} ({exc.strerror or exc})",
                             required=True, fix=f"give the service user write access: sudo chown -R edge-ad {base}"))
            continue
        usage = shutil.disk_usage(base)
        free_mb = usage.free / 2**20
        detail = (f"{p}{'' if base == p.absolute() else f' (to be created in {base})'}: "
                  f"{free_mb / 1024:.1f} GiB free of {usage.total / 2**30:.1f} GiB")
        data = {"path": str(p), "free_mb": round(free_mb, 1), "total_mb": round(usage.total / 2**20, 1)}
        if free_mb < min_free_mb:
            out.append(Check("disk", Status.FAIL, detail + f", below the {min_free_mb} MiB needed", required=True,
                             data=data, fix="free disk space, or lower outbox_max_bytes / snapshots_max_bytes"))
        elif free_mb < 4 * min_free_mb:
            out.append(Check("disk", Status.WARN, detail + " (getting low)", data=data,
                             fix="free disk space before the outbox and snapshots fill it"))
        else:
            out.append(_ok("disk", detail, data=data))
    return out


def check_outbox_left_behind(settings) -> list[Check]:
    """An outbox an earlier edge-ad kept at the working directory's reading of the config's relative
    ``mqtt.outbox_path`` (:meth:`edge_ad.config.Settings.outbox_left_behind`): a required failure when it holds messages
    and the config folder's reading does not exist (``run`` refuses to start), else a warning (``run`` warns).
    Nothing when there is none."""
    left = settings.outbox_left_behind()
    if left is None:
        return []
    data = {"old": str(left.old), "new": str(left.new), "messages": left.messages}
    if left.blocks:
        return [Check("outbox", Status.FAIL, left.what, fix=left.fix, required=True, data=data)]
    return [Check("outbox", Status.WARN, left.what, fix=left.fix, data=data)]


def check_update_key(path: str | os.PathLike) -> list[Check]:
    """``model.update_key``, read as ``update_model`` and ``bundle install`` read it: a key it cannot use (missing,
    empty, a short HMAC secret, an unreadable PEM) made every update refused, found only at the first one. Not
    required: ``run`` starts all the same."""
    from .calibration.package import load_key
    from .errors import InputError

    try:
        key = load_key(path)
    except InputError as exc:
        return [Check("update key", Status.FAIL, f"model.update_key: {exc}: every update_model and bundle install "
                      "will be refused", fix="point model.update_key at the key the archives are signed with (the "
                      "public .pem of 'edge-ad bundle keygen', or an HMAC secret of at least 16 bytes)")]
    except OSError as exc:
        return [Check("update key", Status.FAIL, f"model.update_key: {path}: cannot read it ({exc.strerror}): "
                      "every update_model and bundle install will be refused",
                      fix="make it readable by the service's user (edge-ad)")]
    return [Check("update key", Status.OK, f"{path}: {key.alg} key {key.key_id}: update archives must be signed "
                  "with it", data={"alg": key.alg, "key_id": key.key_id})]


# ---------------------------------------------------------------------------- bundle and engine
def check_previous(deploy_dir: str | os.PathLike) -> list[Check]:
    """A warning when the deploy folder's ``previous`` link is damaged or its release gone: ``run`` starts on
    ``current``, but the rollbacks it blocks (:func:`~edge_ad.calibration.deploy.previous_blocks`) cannot be made
    until it is repaired. Nothing when it is fine."""
    from .calibration.deploy import deployment, previous_blocks, previous_problem

    dep = deployment(deploy_dir)
    problem = previous_problem(dep)
    if problem is None:
        return []
    return [Check("rollback", Status.WARN, f"{problem.what}: run starts on the release in force, but "
                                           f"{previous_blocks(dep)}", fix=problem.fix)]


def check_release(deploy_dir: str | os.PathLike, health_enabled: bool = True) -> tuple[list[Check], Path | None]:
    """What ``run`` does at its start with the deploy folder's release in force, by the code ``run`` decides it with
    (:func:`~edge_ad.calibration.deploy.start_plan`, and :func:`~edge_ad.calibration.deploy.rollback_refusal` for
    whether its rollback can be made): nothing said for a release it simply runs; ok for a pending one it watches;
    a warning when it inspects with a release not watched or judged wrong, or rolls a release that failed back at
    its start (then the release it will run instead is returned, for the bundle checks to check); a required
    failure when that rollback cannot be made (``run`` does not start). Returns (checks, the release folder ``run``
    opens instead of the one in force, or None)."""
    from .calibration.deploy import rollback_refusal, start_plan

    plan = start_plan(deploy_dir, health_enabled)
    dep = plan.dep
    rel = f"the release in force, {dep.current},"
    if plan.action == "watch":
        return [_ok("release", f"{rel} is pending (its health check is not done): run watches its first frames"
                               + (f" and rolls it back to {dep.previous} if they look wrong" if dep.previous else
                                  " (there is no previous release to roll it back to if they look wrong)"))], None
    if plan.action == "unwatched":
        return [Check("release", Status.WARN, f"{rel} is pending and [health] enabled = false: run neither judges it "
                                              "nor rolls it back", fix="set [health] enabled = true to have its first "
                                                                       "frames judged")], None
    if plan.action == "inspect failed":
        return [Check("release", Status.WARN, f"{rel} {plan.verdict}; {plan.why}",
                      fix="edge-ad bundle rollback --to ID (ids: edge-ad bundle status), or install another release")
                ], None
    if plan.action != "roll back":
        return [], None
    refusal = rollback_refusal(dep)
    if refusal is not None:
        return [Check("release", Status.FAIL, f"{rel} {plan.verdict}; and it cannot be rolled back ({refusal}): run "
                                              "does not inspect with a release that failed its health check, so it "
                                              "does not start", required=True, fix=plan.fix())], None
    return [Check("release", Status.WARN, f"{rel} {plan.verdict}: run rolls it back to {dep.previous} at its start, "
                                          f"before it inspects a frame, and runs {dep.previous} (the checks below "
                                          "are of it)",
                  fix="nothing is needed for run to start; 'edge-ad bundle rollback' makes the rollback now")
            ], dep.previous_path


def check_bundle(path: str | os.PathLike) -> tuple[list[Check], Any]:
    """Integrity (sha256 of every file), calibration and the active graph. Returns (checks, bundle|None)."""
    from .bundle import Bundle
    from .errors import EdgeADError

    try:
        b = Bundle.open(path, verify=True)
    except EdgeADError as exc:
        return [Check("bundle", Status.FAIL, str(exc), required=True,
                      fix="copy the bundle again (edge-ad bundle install) or re-create it (edge-ad train)")], None
    checks = []
    n = len(b.manifest.get("files", {}))
    h, w = b.image_size
    detail = f"{b.path}: {b.kind} {h}x{w}, {n} files verified, active {b.active_graph} ({b.active_precision})"
    problems = []
    try:
        b.graph_for(None)
    except EdgeADError as exc:
        problems.append(str(exc))
    try:
        cal = b.calibration()
        detail += f", calibration v{cal.version} (threshold {cal.threshold:.4g})"
    except EdgeADError as exc:
        problems.append(str(exc))
    int8_graphs = _int8_graphs()
    refused = [n for n in int8_graphs if b.graph_refusal(n) is not None]
    if refused:
        detail += (f", INT8 {' and '.join(n for n in int8_graphs if n in b.manifest['files'])} only "
                   f"({', '.join(refused)} refused by the guard at quantization)")
    if problems:
        checks.append(Check("bundle", Status.FAIL, detail + "; " + "; ".join(problems), required=True,
                            fix="finish the bundle: edge-ad train writes the graph and calibration; "
                                "edge-ad calibrate refits the calibration"))
    else:
        checks.append(_ok("bundle", detail, data={"kind": b.kind, "files": n, "precision": b.active_precision}))
    if not os.access(b.path, os.W_OK):
        checks.append(Check("bundle-writable", Status.WARN, f"{b.path} is read-only for this user",
                            fix="recalibration writes calibration.d/ in the bundle: give the service user write "
                                "access (sudo chown -R edge-ad BUNDLE)"))
    return checks, b


def _int8_graphs() -> tuple[str, str]:
    """The INT8 graph files: the TensorRT form, the CPU form (each goes in on its own guard verdict)."""
    from .runtime.backends.base import CPU_INT8_FILE, GRAPH_FILES

    return GRAPH_FILES["int8"], CPU_INT8_FILE


def check_engine(bundle, required: bool = False, precision: str | None = None) -> Check:
    """Whether a TensorRT engine built for this GPU and TensorRT version is in the bundle."""
    engines = sorted(p.name for p in bundle.engines_dir.glob("*.engine")) if bundle.engines_dir.is_dir() else []
    listing = f"{len(engines)} engine(s) in the bundle" + (f": {', '.join(engines)}" if engines else "")
    try:
        from .runtime.backends import tensorrt_usable
        ok, why = tensorrt_usable()
    except Exception as exc:  # noqa: BLE001
        ok, why = False, f"TensorRT backend not available ({exc})"
    if not ok:
        if not required:
            return Check("engine", Status.SKIP, f"{listing}; {why}: ONNX Runtime runs the ONNX graph")
        return Check("engine", Status.FAIL, f'{listing}; {why}: edge-ad run cannot start with model.backend = '
                                            '"tensorrt"', required=True,
                     fix="engines are built on the device itself: TensorRT first (the tensorrt line says how), then "
                         f'edge-ad compile --bundle {bundle.path}; or set model.backend = "onnxruntime" (or "auto") '
                         "to run the ONNX graph on ONNX Runtime")
    from .runtime.backends.cuda import cuda_api
    from .runtime.backends.tensorrt import current_target, import_tensorrt

    target = current_target(import_tensorrt(), cuda_api(), 0)
    return engine_verdict(bundle, target, required, precision)


def engine_verdict(bundle, target, required: bool = False, precision: str | None = None) -> Check:
    """The engine check for a known ``target`` (GPU and TensorRT version): the engine ``run`` would open.

    With no ``precision`` (the config leaves it empty) that is :func:`engine_cache.best`, the function the
    TensorRT backend and ``backend = "auto"`` call: the bundle's active precision first, then int8, fp16,
    fp32. So an fp16 engine built from ``model.onnx`` passes for a bundle whose active ONNX graph is int8
    or fp32 (``compile`` only switches the ONNX side when a graph of that precision exists); the detail
    says which engine runs and why the active precision's is not used, and a warning is given when an
    engine of that precision is there but refused (corrupt, changed graph, never passed the guard).
    With a ``precision``, only an engine of that precision counts, as in ``run``."""
    from .runtime.backends import engine_cache

    engines = sorted(p.name for p in bundle.engines_dir.glob("*.engine")) if bundle.engines_dir.is_dir() else []
    where = f"{target.gpu_name} {target.sm}, TensorRT {target.trt_version}"
    wanted = precision or bundle.active_precision
    checked = {p: engine_cache.check(bundle, p, target, require_guard=True) for p in ("int8", "fp16", "fp32")}
    usable = [p for p, c in checked.items() if c.ok]
    pref = checked.get(wanted) or engine_cache.check(bundle, wanted, target, require_guard=True)
    if precision is None:  # what run opens: the same selection, not a copy of it
        chosen = engine_cache.best(bundle, target, prefer=bundle.active_precision)
    else:
        chosen = pref if pref.ok else None
    data = {"usable": usable, "target": where, "engines": engines}
    if chosen is not None:
        got = (chosen.meta or {}).get("precision", wanted)
        data["runs"] = got
        if got == wanted:
            return _ok("engine", f"{wanted} engine for {where} present and verified", data=data)
        detail = (f"{got} engine for {where} present and verified: run uses it, as the bundle's active "
                  f"precision {wanted} has no usable engine ({pref.reason})")
        if pref.engine.is_file():  # there, but refused: something went wrong with it
            return Check("engine", Status.WARN, detail, data=data,
                         fix=f"to run {wanted}: {engine_cache.compile_command(bundle, wanted)} "
                             "(on this device; takes minutes)")
        return _ok("engine", detail, data=data)
    why, build_as = engine_cache.no_engine(bundle, target, precision)   # run's words and hint, the same
    detail = f"no usable {precision + ' ' if precision else ''}engine for {where}: {why}"
    if usable:
        detail += f"; usable: {', '.join(usable)}"
        if precision is not None:
            detail += f" (model.precision = \"{precision}\" asks for {precision} only)"
    return Check("engine", Status.FAIL if required else Status.WARN, detail, required=required, data=data,
                 fix=f"{engine_cache.compile_command(bundle, build_as)} (on this device; takes minutes)" + (
                     f", or leave model.precision empty to run the {', '.join(usable)} engine"
                     if usable and precision is not None else ""))


def check_backend(bundle, backend: str = "auto", precision: str | None = None, device: str | None = None,
                  settings=None) -> Check:
    """Open the model the way ``edge-ad run`` does, then close it. With ``settings`` (a validated config)
    that is ``run``'s own :func:`edge_ad.runtime.service.open_inspector` (the config's backend, precision,
    device, threads and batch size); without, :func:`open_backend` with ``backend``, ``precision`` and
    ``device``, and the :class:`Inspector` over the bundle's calibration. So a backend that is not
    installed (openvino, torch), a bundle without what the backend needs (checkpoint.pt for torch) or
    without the graph of the asked precision (int8 on a bundle never quantized) fail here as they fail in
    ``run``. TensorRT is opened (and the GPU used) only where ``run`` would open it; the CPU backends need
    no GPU."""
    if settings is not None:
        m = settings.model
        backend, precision, device = m.backend, m.precision, m.device
    asked = f"backend {backend}" + (f", precision {precision}" if precision else "") + \
            (f", device {device}" if device else "")

    def failed(exc: Exception) -> Check:
        return Check("backend", Status.FAIL, f"{asked}: run cannot open the model: {exc}", required=True,
                     fix=_backend_fix(bundle, backend, precision), data={"error": str(exc)})

    try:
        if settings is not None:
            from .runtime.service import open_inspector

            be = open_inspector(bundle, settings, warn=False).backend
        else:
            from .inspector import Inspector

            be = Inspector.open(bundle, backend, precision, device).backend
    except Exception as exc:  # noqa: BLE001 - whatever run would die of is the finding
        return failed(exc)
    try:
        name, prec, dev = getattr(be, "name", backend), getattr(be, "precision", precision), getattr(be, "device", "?")
        graph = getattr(be, "graph", None)
        detail = f"{name} {prec} on {dev}" + (f" ({Path(graph).name})" if graph else "") + ": the model opens"
        if backend == "auto":
            detail += " (backend auto)"
        data = {"backend": name, "precision": prec, "device": str(dev)}
        from .runtime.backends.base import slower_than_fp32

        slow = slower_than_fp32(be)
        if slow:   # run can start, on a slower graph than it could
            return Check("backend", Status.WARN, f"{detail}; {slow[0]}", data=data, fix=slow[1])
        return _ok("backend", detail, data=data)
    finally:
        try:
            be.close()
        except Exception:  # noqa: BLE001 - closing a probe must not hide its finding
            pass


def _backend_fix(bundle, backend: str, precision: str | None) -> str:
    """The fix for a backend that does not open: what the error asks, or another backend / precision."""
    hints = []
    if backend == "openvino":
        hints.append("pip install openvino (x86 CPUs), or model.backend = \"onnxruntime\"")
    elif backend == "torch":
        hints.append("the torch backend needs PyTorch (pip install 'edge-ad[train]') and the bundle's "
                     "checkpoint.pt (bundles from edge-ad train have it), and runs fp32 (fp16 on a CUDA device); "
                     "otherwise model.backend = \"onnxruntime\"")
    elif backend == "tensorrt":
        hints.append(f"edge-ad compile --bundle {bundle.path} on this device, or model.backend = \"auto\"")
    refused = [r for r in map(bundle.graph_refusal, _int8_graphs()) if r is not None] if precision == "int8" else []
    if refused:   # quantizing again here would be refused again: say what the refusal says to do
        hints += [r["fix"] for r in refused]
    elif precision is not None and backend not in ("tensorrt", "torch"):
        make = (f"edge-ad export --bundle {bundle.path}" if precision == "fp32"
                else f"edge-ad quantize --bundle {bundle.path} --precision {precision}")
        hints.append(f"{make} for the {precision} graph, or leave model.precision empty to run the bundle's "
                     f"active graph ({bundle.active_precision})")
    if not hints:
        hints.append("do what the message says (re-copy or re-export the bundle: edge-ad bundle install / "
                     "edge-ad export)")
    return "; ".join(hints)


def check_service(unit: str = "edge-ad.service") -> Check:
    if not shutil.which("systemctl"):
        return Check("service", Status.SKIP, "no systemd here")
    rc, out = _run(["systemctl", "show", unit,
                    "--property=LoadState,ActiveState,SubState,UnitFileState,NRestarts"], 3.0)
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if rc != 0 or not props:
        why = (out.splitlines() or ["no answer"])[0].strip()
        return Check("service", Status.SKIP, f"{unit}: systemd not answering ({why[:100]})")
    if props.get("LoadState") == "not-found":
        return Check("service", Status.SKIP, f"{unit} not installed (jetson/install.sh installs it)")
    active, sub = props.get("ActiveState"), props.get("SubState")
    detail = f"{unit}: {active} ({sub}), {props.get('UnitFileState') or 'unknown'} at boot"
    restarts = props.get("NRestarts", "")
    if restarts.isdigit() and int(restarts) > 0:
        detail += f", restarted {restarts} time(s) by systemd"
    look = f"journalctl -u {unit} -n 100 --no-pager"
    if active == "failed":
        return Check("service", Status.WARN, detail + ": the service failed and is not running", data=props,
                     fix=f"see why: {look}; after the fix: sudo systemctl restart {unit}")
    if sub == "auto-restart":
        return Check("service", Status.WARN, detail + ": the service exited and systemd is about to restart it "
                     "(Restart=always); seen again, it is crash-looping", data=props,
                     fix=f"see why it exits: {look}")
    return _ok("service", detail, data=props)


# ---------------------------------------------------------------------------- all together
def default_outbox_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edge-ad"


def _safe(name: str, fn: Callable[[], Check | list[Check]], required: bool = False) -> list[Check]:
    try:
        res = fn()
    except Exception as exc:  # noqa: BLE001 - a crashing probe is itself a finding
        return [Check(name, Status.FAIL if required else Status.WARN,
                      f"the check itself failed: {type(exc).__name__}: {exc}", required=required)]
    return res if isinstance(res, list) else [res]


def run_checks(bundle: str | os.PathLike | None = None, mqtt=None, data_dirs: Sequence[str | os.PathLike] = (),
               source: str | None = None, backend: str = "auto", precision: str | None = None,
               min_free_mb: int = DEFAULT_MIN_FREE_MB, timeout_s: float = 3.0,
               service: bool = True, device: str | None = None,
               resolve_bundle: Callable[[], str | os.PathLike] | None = None, settings=None,
               publish: Sequence[str] | None = None, invalid_config: str | os.PathLike | None = None) -> list[Check]:
    """Run every check. ``mqtt``: a :class:`edge_ad.mqtt.settings.BrokerSettings` (or None: skipped);
    ``publish``: the device's topics to probe on it (:func:`publish_probe_topics`; None: its site and device are
    not known, not probed);
    ``data_dirs``: folders ``run`` writes (default: the outbox folder and the working directory);
    ``backend``, ``precision``, ``device``: what ``run`` will use ("tensorrt" makes TensorRT, CUDA and the
    engine required); the bundle is opened with them as ``run`` opens it (the "backend" check).
    ``resolve_bundle``: when ``bundle`` is None, how ``run`` finds it (a config's
    ``model.bundle_path``, which follows ``model.deploy_dir``'s 'current' link); its error is a required
    failure. ``settings``: the validated config, when there is one: the model is then opened through
    ``run``'s own :func:`open_inspector` with it (its backend, precision, device, threads, batch), so its
    ``model`` section must already carry any override of ``backend`` / ``precision``. ``invalid_config``: the
    config given, when it is invalid: the broker and the bundle it would name are then said to be not checked
    because of it, not "not given"."""
    from .errors import EdgeADError

    unread = f"not checked: the config {invalid_config} is invalid (above)" if invalid_config is not None else ""

    need_trt = backend == "tensorrt"
    l4t = None
    try:
        l4t = l4t_version()
    except Exception:  # noqa: BLE001
        pass
    checks: list[Check] = []
    checks += _safe("python", check_python, True)
    checks += _safe("numpy", check_numpy, True)
    checks += _safe("opencv", lambda: check_opencv(source), True)
    checks += _safe("onnxruntime", lambda: check_onnxruntime(required=not need_trt), not need_trt)
    checks += _safe("tensorrt", lambda: check_tensorrt(need_trt, l4t), need_trt)
    checks += _safe("cuda", lambda: check_cuda(need_trt, l4t), need_trt)
    checks += _safe("platform", check_platform)
    checks += _safe("cameras", lambda: check_cameras(source), bool(source))
    if mqtt is not None:
        broker = _safe("broker", lambda: check_broker(mqtt, timeout_s, publish))
        checks += broker
        if publish is None and any(c.name == "broker" and c.status == Status.OK for c in broker):
            checks.append(Check("broker-acl", Status.SKIP, "whether the broker lets the device publish to its topics "
                                "is not checked (doctor --config LINE.toml --probe-publish checks it, with an empty "
                                "message to each that their consumers receive)"))
    elif unread:
        checks.append(Check("broker", Status.SKIP, f"{unread}: its [mqtt] broker is not known until it is fixed "
                            "(or give --mqtt URL)"))
    else:
        checks.append(Check("broker", Status.SKIP, "no broker given (--mqtt URL or a config with [mqtt])"))
    if settings is not None:
        checks += _safe("outbox", lambda: check_outbox_left_behind(settings))
    dirs = list(data_dirs) or [default_outbox_dir(), Path.cwd()]
    checks += _safe("disk", lambda: check_disk(dirs, min_free_mb), True)
    unresolved = False
    if bundle is None and resolve_bundle is not None:
        try:
            bundle = resolve_bundle()
        except (EdgeADError, OSError) as exc:
            from .calibration.deploy import DeployDamaged

            unresolved = True
            if isinstance(exc, DeployDamaged):   # an install would be refused too: repair the link
                checks.append(Check("bundle", Status.FAIL, f"run cannot find the bundle: {exc.what}", required=True,
                                    fix=exc.fix))
            else:
                checks.append(Check("bundle", Status.FAIL, f"run cannot find the bundle: {exc}", required=True,
                                    fix="install a bundle into the deploy folder (edge-ad bundle install ARCHIVE "
                                        "--deploy DIR), or set model.bundle to a bundle folder (--bundle here)"))
    m = settings.model if settings is not None else None
    if m is not None and m.bundle is None and m.deploy_dir is not None and not unresolved:
        instead: list = [None]

        def _release():
            res, instead[0] = check_release(m.deploy_dir, settings.health.enabled)
            return res

        checks += _safe("release", _release)
        bundle = instead[0] or bundle   # what run opens after its start's rollback
    if bundle is not None:
        found: list = [None]

        def _bundle():
            res, found[0] = check_bundle(bundle)
            return res

        checks += _safe("bundle", _bundle, True)
        if found[0] is not None:
            engine = _safe("engine", lambda: check_engine(found[0], need_trt, precision), need_trt)
            checks += engine
            if need_trt and engine[0].status == Status.FAIL:
                checks.append(Check("backend", Status.SKIP, "tensorrt not opened: the engine check above says "
                                                            "why run cannot (and how to fix it)"))
            else:
                checks += _safe("backend", lambda: check_backend(found[0], backend, precision, device,
                                                                 settings=settings), True)
    elif unread:   # the config's FAIL already says run cannot start
        checks.append(Check("bundle", Status.SKIP, f"{unread}: the model run opens, its backend and engine are not "
                            "known until it is fixed (or give --bundle DIR)"))
    elif not unresolved:   # what run would open is unknown: the summary says run itself was not checked
        checks.append(Check("bundle", Status.SKIP, "no bundle or config given: the model run opens, its backend and "
                            "engine are not checked (give --config LINE.toml, the service's, or --bundle DIR)",
                            data={"not_given": True}))
    if m is not None and m.bundle is None and m.deploy_dir is not None and not unresolved:
        checks += _safe("rollback", lambda: check_previous(m.deploy_dir))
    if m is not None and m.update_key is not None:
        checks += _safe("update key", lambda: check_update_key(m.update_key))
    if service:
        checks += _safe("service", check_service)
    return checks


def exit_code(checks: Sequence[Check], strict: bool = False) -> int:
    """0 when no required check failed (with ``strict`` also no warning or failure): ``run`` can start, or, with
    no bundle or config given (:func:`run_unchecked`), this machine has what it needs; 1 otherwise."""
    bad = [c for c in checks if c.status == Status.FAIL and (c.required or strict)]
    if strict:
        bad += [c for c in checks if c.status == Status.WARN]
    return 1 if bad else 0


def run_unchecked(checks: Sequence[Check]) -> bool:
    """No bundle or config was given: the checks say what this machine can do, not whether ``run`` can start
    (it needs a bundle)."""
    return any(c.name == "bundle" and c.data.get("not_given") for c in checks)


def run_can_start(checks: Sequence[Check]) -> bool | None:
    """Whether ``run`` can start by these checks: False when a required one failed, None when no bundle or config
    was given (nothing else failed: not known), else True."""
    if any(c.status == Status.FAIL and c.required for c in checks):
        return False
    return None if run_unchecked(checks) else True


def summary(checks: Sequence[Check], strict: bool = False) -> str:
    blocking = [c.name for c in checks if c.status == Status.FAIL and c.required]
    optional = [c.name for c in checks if c.status == Status.FAIL and not c.required]
    warns = [c.name for c in checks if c.status == Status.WARN]
    if blocking:
        head = f"edge-ad run cannot start: {', '.join(dict.fromkeys(blocking))}"
    elif run_unchecked(checks):
        done = [c.name for c in checks if c.status != Status.SKIP]
        head = (f"this machine has what edge-ad run needs ({', '.join(dict.fromkeys(done))} checked), but no bundle "
                "or config was given, so whether edge-ad run can start is not known: give --config LINE.toml (the "
                "service's) or --bundle DIR")
    else:
        head = "edge-ad run can start"
    tail = []
    if optional:
        tail.append(f"failed (not needed to start): {', '.join(dict.fromkeys(optional))}")
    if warns:
        tail.append(f"warnings: {', '.join(dict.fromkeys(warns))}")
    if strict and (optional or warns) and not blocking:
        head += ", but --strict counts these"
    return head + (" (" + "; ".join(tail) + ")" if tail else "")


_MARK = {Status.OK: "  ok", Status.WARN: "warn", Status.FAIL: "FAIL", Status.SKIP: "  - "}


def format_report(checks: Sequence[Check], strict: bool = False) -> str:
    width = max(len(c.name) for c in checks) if checks else 8
    lines = []
    for c in checks:
        mark = _MARK[c.status]
        lines.append(f"[{mark}] {c.name.ljust(width)}  {c.detail}")
        if c.fix and c.status in (Status.WARN, Status.FAIL):
            lines.append(f"       {' ' * width}  fix: {c.fix}")
    lines.append("")
    lines.append(summary(checks, strict))
    return "\n".join(lines)


def report_dict(checks: Sequence[Check], strict: bool = False) -> dict:
    code = exit_code(checks, strict)
    return {"ok": code == 0, "exit_code": code, "strict": strict, "run_can_start": run_can_start(checks),
            "summary": summary(checks, strict),
            "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": [c.to_dict() for c in checks]}
