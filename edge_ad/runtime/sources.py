"""Frame sources as URIs: one parser, one small class per kind of camera.

=====================================  ===========================================================
``v4l2:///dev/video0`` / ``v4l2://0``  USB / V4L2 camera (path or index). Options: width, height,
                                       fps, fourcc (e.g. MJPG), buffer.
``csi://0``                            Jetson CSI camera through GStreamer ``nvarguscamerasrc``.
                                       Options: width, height, fps, flip (0-7), sensor_mode, and the
                                       Argus controls aelock, awblock, exposuretimerange, gainrange,
                                       ispdigitalgainrange (ranges "LOW HIGH").
``rtsp://[user:pass@]host[:port]/...`` RTSP (FFmpeg). The query string belongs to the camera's URL.
``file://clip.mp4``                    A video file (relative or ``file:///abs/path``). Options:
                                       loop=1, fps=N|native (pace like a camera; default: as fast as
                                       it decodes). A still image (``file://part.png``, any extension
                                       of IMAGE_EXTS) is read as dir:// reads its images (one frame;
                                       ``loop=1`` repeats it), never through FFmpeg.
``dir://folder``                       The images of a folder in name order. Options: loop, fps.
``synthetic://disc``                   Generated parts with planted defects (edge_ad.data.synthetic).
                                       Options: kind, size, defect_rate, defects, seed, fps, count,
                                       brightness, contrast, lighting_from.
=====================================  ===========================================================

The capture contract follows jetson-utils: ``read()`` returns a frame, ``None`` at the end of a finite
stream, and raises :class:`SourceLost` when the camera fails (the capture loop then reconnects with
back-off). Frames are RGB ``uint8 [H, W, 3]``. Credentials never reach a log, a record or a message: use
:func:`redact_uri` (:func:`redact_text` for a text that holds a URI).

Files and folders are checked once before anything starts (:func:`check_startup`): a file:// that is
missing or not a video OpenCV can decode, or a dir:// without one readable image, is an input error,
not an outage to wait out. Later failures (a looping file removed while running) are outages as usual.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

import numpy as np

from ..errors import InputError, RuntimeFailure, name_text

log = logging.getLogger(__name__)

SCHEMES = ("v4l2", "csi", "rtsp", "rtsps", "file", "dir", "synthetic")
_SECRET_KEYS = re.compile(r"(pass(word)?|pwd|secret|token|key|auth|signature|sig)", re.I)


class SourceLost(RuntimeFailure):
    """The camera could not be opened or stopped delivering frames (reconnect may help)."""


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"'{v}' is not a boolean (1/0, true/false)")


def _finite(v: str) -> float:
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{v} is not a finite number")
    return f


def _fps(v: str) -> float | str:
    """Pacing of a file, folder or generated source: N frames per second, 0 (as fast as it goes) or native."""
    if v.strip().lower() == "native":
        return "native"
    f = _finite(v)
    if f < 0:
        raise ValueError(f"{v} is negative; expected frames per second > 0, 0 (no pacing) or native")
    return f


def _rate(v: str) -> float:
    """Pacing of a folder or generated source: N frames per second or 0 (as fast as it goes); they have no
    native rate (only a video file has one)."""
    if v.strip().lower() == "native":
        raise ValueError("'native' is a video file's own frame rate, and this source has none; expected frames "
                         "per second > 0 or 0 (no pacing)")
    return float(_fps(v))


def _pos_float(v: str) -> float:
    f = _finite(v)
    if f <= 0:
        raise ValueError(f"{v}: expected a number > 0")
    return f


def _fourcc(v: str) -> str:
    if len(v) != 4:
        raise ValueError(f"'{v}' is not a four-character code such as MJPG or YUYV")
    return v


def _flip(v: str) -> int:
    i = int(v)
    if not 0 <= i <= 7:
        raise ValueError(f"{v} is not 0..7 (nvvidconv flip-method)")
    return i


def _pos_int(v: str) -> int:
    i = int(v)
    if i <= 0:
        raise ValueError(f"{v} is not a positive integer")
    return i


def _nonneg_int(v: str) -> int:
    i = int(v)
    if i < 0:
        raise ValueError(f"{v} is negative")
    return i


def _range(example: str, bounds: tuple[float, float] | None = None) -> Callable[[str], tuple[float, float]]:
    """An nvarguscamerasrc range property: "LOW HIGH", two numbers > 0 (within ``bounds`` if given) with
    LOW <= HIGH. Quotes around it are allowed: the plugin ignores them too."""
    expected = f"both numbers in {bounds[0]:g}..{bounds[1]:g}" if bounds else "both numbers > 0"

    def conv(v: str) -> tuple[float, float]:
        try:
            lo, hi = (_finite(p) for p in v.replace('"', " ").replace("'", " ").split())
        except ValueError:
            raise ValueError(f"'{v}' is not a range; expected \"LOW HIGH\": two numbers separated by a space "
                             f"(+ or %20 in a URI), e.g. {example}") from None
        if not all(bounds[0] <= x <= bounds[1] if bounds else x > 0 for x in (lo, hi)):
            raise ValueError(f"'{v}': expected {expected}")
        if lo > hi:
            raise ValueError(f"'{v}': LOW {lo:g} is above HIGH {hi:g}; expected \"LOW HIGH\" with LOW <= HIGH")
        return lo, hi

    return conv


# nvarguscamerasrc properties a csi:// URI may set (gst-inspect-1.0 nvarguscamerasrc): exposure in ns, gains
# as factors. The plugin drops a malformed range, or an ISP digital gain range outside 1..256, with a line on
# stdout and goes on with auto exposure: so they are checked here, when the URI is read.
_ARGUS_CONTROLS = {"aelock": (_bool, None), "awblock": (_bool, None),
                   "exposuretimerange": (_range("20000000+20000000 (ns)"), None),
                   "gainrange": (_range("1+1"), None),
                   "ispdigitalgainrange": (_range("1+1", (1.0, 256.0)), None)}


_OPTIONS: dict[str, dict[str, tuple[Callable[[str], Any], Any]]] = {
    "v4l2": {"width": (_pos_int, None), "height": (_pos_int, None), "fps": (_pos_float, None),
             "fourcc": (_fourcc, None), "buffer": (_pos_int, None)},
    "csi": {"width": (_pos_int, 1920), "height": (_pos_int, 1080), "fps": (_pos_int, 30),
            "flip": (_flip, 0), "sensor_mode": (int, -1), **_ARGUS_CONTROLS},
    "rtsp": {},
    "rtsps": {},
    "file": {"loop": (_bool, False), "fps": (_fps, 0.0)},
    "dir": {"loop": (_bool, False), "fps": (_rate, 0.0)},
    "synthetic": {"kind": (str, None), "size": (_pos_int, 256), "defect_rate": (_finite, 0.2),
                  "defects": (str, ""), "seed": (_nonneg_int, 0), "fps": (_rate, 0.0),
                  "count": (_nonneg_int, 0), "brightness": (_finite, 0.0), "contrast": (_pos_float, 1.0),
                  "lighting_from": (_nonneg_int, 0)},
}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source URI. ``target`` is the device, path, URL or synthetic kind."""

    scheme: str
    target: str
    options: Mapping[str, Any] = field(default_factory=dict)
    uri: str = ""

    @property
    def live(self) -> bool:
        """A camera that keeps producing frames whether or not they are read."""
        return self.scheme in ("v4l2", "csi", "rtsp", "rtsps")

    @functools.cached_property
    def safe_uri(self) -> str:
        """The URI as messages, results and the birth name it: credentials redacted, a byte of a folder or file
        name that is not UTF-8 as ``\\xfe`` (:func:`~edge_ad.errors.name_text`). Made once (every frame names
        it)."""
        return name_text(redact_uri(self.uri))


def redact_uri(uri: str) -> str:
    """The URI with user, password and secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(str(uri))
    except ValueError:
        return "<unparseable uri>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if _SECRET_KEYS.search(k) else v}" for k, v in pairs)
    out = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    lead = f"{parts.scheme}://"
    if parts.scheme and str(uri).startswith(lead) and not out.startswith(lead):  # dir:///abs came back dir:/abs
        out = lead + out[len(parts.scheme) + 1:]
    return out


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def redact_text(text: str) -> str:
    """``text`` (a message, a calibration record's ``source``: "edge-ad calibrate: rtsp://user:pw@cam/1")
    with each URI in it that carries credentials or secret-looking query values redacted by
    :func:`redact_uri`; other URIs and the rest of the text are kept as written."""
    def one(m: re.Match) -> str:
        safe = redact_uri(m.group(0))
        return safe if "***" in safe else m.group(0)   # redact_uri also respells a query ('+' as ' ')

    return _URI_IN_TEXT.sub(one, str(text))


def parse_uri(uri: str) -> SourceSpec:
    """Parse and check a source URI; raises InputError saying what was expected."""
    if not isinstance(uri, str) or not uri.strip():
        raise InputError("source uri is empty; expected e.g. v4l2:///dev/video0, csi://0, rtsp://host/stream, "
                         "file://clip.mp4, dir://folder or synthetic://")
    uri = uri.strip()
    safe = redact_uri(uri)
    if "://" not in uri:
        raise InputError(f"source uri '{safe}': no scheme; expected one of "
                         f"{', '.join(s + '://' for s in SCHEMES)} (e.g. file://{uri})")
    # a '#' in a file or folder name is part of the path, not a fragment to drop
    paths = uri.split("://", 1)[0].lower() in ("file", "dir")
    try:
        parts = urlsplit(uri, allow_fragments=not paths)
    except ValueError as exc:
        raise InputError(f"source uri '{safe}': not a valid URI ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InputError(f"source uri '{safe}': unknown scheme '{scheme}://'; expected one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if scheme in ("rtsp", "rtsps"):
        if not parts.hostname:
            raise InputError(f"source uri '{safe}': no host; expected rtsp://host[:port]/path")
        try:
            parts.port
        except ValueError:
            raise InputError(f"source uri '{safe}': the port is not a number 1-65535") from None
        return SourceSpec(scheme, uri, {}, uri)

    if parts.fragment:
        raise InputError(f"source uri '{safe}': '#{parts.fragment}' means nothing for {scheme}://; "
                         "expected options as ?name=value")
    raw_opts = dict(parse_qsl(parts.query, keep_blank_values=True))
    allowed = _OPTIONS[scheme]
    opts: dict[str, Any] = {}
    for k, (conv, default) in allowed.items():
        if k in raw_opts:
            try:
                opts[k] = conv(raw_opts.pop(k))
            except ValueError as exc:
                raise InputError(f"source uri '{safe}': option {k}: {exc}") from None
        elif default is not None:
            opts[k] = default
    if raw_opts:
        names = ", ".join(sorted(raw_opts))
        raise InputError(f"source uri '{safe}': unknown option(s) {names} for {scheme}://; expected "
                         f"{', '.join(allowed) or 'none'}")

    target = parts.netloc + parts.path
    if scheme == "v4l2":
        if not target:
            raise InputError(f"source uri '{safe}': no device; expected v4l2:///dev/video0 or v4l2://0")
        if not (target.isdigit() or target.startswith("/dev/")):
            raise InputError(f"source uri '{safe}': device '{target}' is neither /dev/videoN nor an index")
    elif scheme == "csi":
        target = target or "0"
        if not target.isdigit():
            raise InputError(f"source uri '{safe}': sensor '{target}' is not an index (csi://0)")
    elif scheme in ("file", "dir"):
        if not target:
            raise InputError(f"source uri '{safe}': no path; expected {scheme}://relative/path or "
                             f"{scheme}:///absolute/path")
        target = os.path.expanduser(unquote(target))  # file:///my%20parts/ is the folder "my parts"
    elif scheme == "synthetic":
        named = target.strip("/")
        if named and opts.get("kind") and opts["kind"] != named:
            raise InputError(f"source uri '{safe}': kind '{opts['kind']}' contradicts synthetic://{named}; "
                             "give the kind once")
        target = named or str(opts.get("kind") or "disc")
        from ..data.synthetic import DEFECTS, KINDS

        if target not in KINDS:
            raise InputError(f"source uri '{safe}': synthetic kind '{target}': expected one of {', '.join(KINDS)}")
        opts["kind"] = target
        if opts.get("defects"):
            bad = [d for d in str(opts["defects"]).split(",") if d not in DEFECTS]
            if bad:
                raise InputError(f"source uri '{safe}': defects {bad}: expected a comma list of {', '.join(DEFECTS)}")
        try:  # the generator's own checks (size 32..8192, defect_rate 0..1, ...), named with the URI
            _synthetic_stream(opts)
        except InputError as exc:
            raise InputError(f"source uri '{safe}': {exc}") from None
    return SourceSpec(scheme, target, opts, uri)


def _synthetic_stream(opts: Mapping[str, Any]):
    from ..data.synthetic import DEFECTS, ConveyorStream

    defects = tuple(d for d in str(opts.get("defects") or "").split(",") if d) or DEFECTS
    return ConveyorStream(kind=opts["kind"], size=opts["size"], defect_rate=opts["defect_rate"],
                          defects=defects, seed=opts["seed"], brightness=opts["brightness"],
                          contrast=opts["contrast"], lighting_from=opts["lighting_from"])


def resolve_relative(uri: str, base: str | os.PathLike) -> str:
    """``uri`` with a relative file:// or dir:// path taken relative to ``base`` (a config file's folder);
    any other URI unchanged. The options are kept."""
    spec = parse_uri(uri)
    if spec.scheme not in ("file", "dir") or os.path.isabs(spec.target):
        return uri
    parts = urlsplit(uri.strip(), allow_fragments=False)
    path = quote(str(Path(base) / spec.target), safe="/")
    return f"{spec.scheme}://{path}" + (f"?{parts.query}" if parts.query else "")


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class RawFrame:
    """What a source returns: the RGB image, its index in the source, optional ground truth."""

    image: np.ndarray
    index: int
    truth: Mapping[str, Any] | None = None


class Source:
    """Base class: ``open``, ``read`` (RawFrame | None at end | raises SourceLost), ``close``."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.live = spec.live
        self._count = 0
        self._next_t = 0.0          # monotonic time the next paced frame is due
        self._turn_taken = False    # wait_turn() already waited for the frame read() is about to deliver

    @property
    def name(self) -> str:
        return self.spec.safe_uri

    def open(self) -> None:
        raise TypeError(f"{type(self).__name__} does not implement open")

    def read(self) -> RawFrame | None:
        raise TypeError(f"{type(self).__name__} does not implement read")

    def close(self) -> None:
        """Release the device; safe to call twice."""

    def pace_fps(self) -> float:
        """Frames per second this source is paced at (``fps=N`` of a file, folder or generated source);
        0: not paced (cameras pace themselves)."""
        return 0.0

    def wait_turn(self, stop: threading.Event | None = None) -> bool:
        """Wait until the next frame of a paced source is due (no wait when it is not paced).

        :class:`~edge_ad.runtime.capture.Camera` calls this before it starts the watchdog's clock, so the
        pacing sleep is never taken for a blocked read (a source paced slower than ``watchdog_s`` is not an
        outage); the following ``read()`` then does not wait again. A direct ``read()`` without it waits
        itself. False when ``stop`` was set during the wait."""
        fps = self.pace_fps()
        self._turn_taken = False
        if fps and fps > 0:
            now = time.monotonic()
            if self._next_t <= 0 or now - self._next_t > 1.0:
                self._next_t = now
            delay = self._next_t - now
            self._next_t += 1.0 / fps
            if delay > 0:
                if stop is not None:
                    if stop.wait(delay):
                        return False
                else:
                    time.sleep(delay)
        self._turn_taken = True
        return True

    def _pace(self) -> None:
        """Called by ``read()`` before it produces a frame: wait for its turn unless ``wait_turn()`` did."""
        if not self._turn_taken:
            self.wait_turn()
        self._turn_taken = False


def has_gstreamer() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.upper()
    return False


def _gst_value(v: Any) -> str:
    """A property value as gst-launch syntax: booleans true/false, a (low, high) range quoted "low high"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return '"' + " ".join(f"{x:.0f}" if float(x).is_integer() else repr(float(x)) for x in v) + '"'
    return str(v)


def csi_pipeline(sensor: int, width: int, height: int, fps: int, flip: int = 0, sensor_mode: int = -1,
                 **controls: Any) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (Argus), ending in a BGR appsink. ``controls``:
    nvarguscamerasrc properties of :data:`_ARGUS_CONTROLS` (``aelock=True``, ``gainrange=(1.0, 1.0)``);
    None leaves one at the plugin's default."""
    unknown = sorted(set(controls) - set(_ARGUS_CONTROLS))
    if unknown:
        raise TypeError(f"csi_pipeline: unknown control(s) {', '.join(unknown)}; expected {', '.join(_ARGUS_CONTROLS)}")
    mode = f" sensor-mode={sensor_mode}" if sensor_mode >= 0 else ""
    mode += "".join(f" {k}={_gst_value(v)}" for k, v in controls.items() if v is not None)
    return (f"nvarguscamerasrc sensor-id={sensor}{mode} ! "
            f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, "
            f"framerate=(fraction){fps}/1, format=(string)NV12 ! "
            f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
            f"videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false")


OPEN_WAIT_WARN_S = 2.0   # a network camera that has not answered after this long is named in a WARNING
FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"   # OpenCV's FFmpeg backend reads it at each open
_ffmpeg_env_lock = threading.Lock()     # held for each FFmpeg open, from setting the variable to the open's end
_ffmpeg_env_said: set[tuple[str, str]] = set()   # (the environment's value, the source's transport) said


def _option_names(options: str) -> dict[str, str]:
    """``key;value|key;value`` (OpenCV's form; ``key value`` also) as a dict, to name the options in a log
    line without their values (a header option can hold a credential)."""
    pairs = [p.strip() for p in options.split("|") if p.strip()]
    return dict((p.split(";", 1) if ";" in p else (p.split(None, 1) + [""])[:2]) for p in pairs)


@contextlib.contextmanager
def _ffmpeg_options(transport: str | None, where: str):
    """Every open through OpenCV's FFmpeg backend (``where``: a network camera, or a video file) goes through
    here. OpenCV reads OPENCV_FFMPEG_CAPTURE_OPTIONS from the process environment when such a capture opens, so
    each open holds one lock from before it reads the variable to its end: no open sees another's options.
    A network camera's open (``transport``: its ``rtsp_transport``) sets the variable to its transport for
    that open alone and removes it after, so each open (another camera, a reopen with other settings) gets its
    own; a video file's (``transport`` None) opens with the variable as the user left it (unset, or theirs),
    never with a camera's, and waits for a camera's open to end (at most its open_timeout_s). A value the user
    put in the environment is used as it is, said once per value and transport for a camera (INFO when it asks
    for the same transport, else a WARNING that ``source.rtsp_transport`` is not applied)."""
    with _ffmpeg_env_lock:
        user = os.environ.get(FFMPEG_OPTIONS_ENV)
        if transport is not None and user is None:
            os.environ[FFMPEG_OPTIONS_ENV] = f"rtsp_transport;{transport}"
            try:
                yield
            finally:
                os.environ.pop(FFMPEG_OPTIONS_ENV, None)
            return
        if transport is not None and (user, transport) not in _ffmpeg_env_said:
            _ffmpeg_env_said.add((user, transport))
            names = _option_names(user)
            theirs = names.get("rtsp_transport")
            shown = ", ".join(f"rtsp_transport={theirs}" if k == "rtsp_transport" else k for k in names) or "none"
            same = theirs is not None and theirs.strip().lower() == transport
            log.log(logging.INFO if same else logging.WARNING,
                    "%s: %s is set in the environment (options: %s): FFmpeg opens the camera with it%s", where,
                    FFMPEG_OPTIONS_ENV, shown, "" if same else
                    f", not with source.rtsp_transport = {transport} (FFmpeg's default transport applies unless it "
                    f"names one; unset the variable, or put rtsp_transport;{transport} in it)")
        yield


class OpenCVSource(Source):
    """v4l2, csi, rtsp and file sources through ``cv2.VideoCapture``. A network camera (rtsp://, rtsps://) is
    opened and read with ``open_timeout_s`` as FFmpeg's timeout (when this OpenCV can take it, else a WARNING
    says FFmpeg's own applies); one that has not answered after :data:`OPEN_WAIT_WARN_S` is named in a WARNING
    while the open goes on, and one that does not answer in time raises :class:`SourceLost` saying so. Its
    ``rtsp_transport`` is given to FFmpeg at each open; every FFmpeg open, a video file's too, goes through
    :func:`_ffmpeg_options`."""

    def __init__(self, spec: SourceSpec, open_timeout_s: float = 10.0, rtsp_transport: str = "tcp"):
        super().__init__(spec)
        self.open_timeout_s = float(open_timeout_s)
        self.rtsp_transport = rtsp_transport
        self._cap = None
        self._lock = threading.Lock()
        self._index = 0
        self._fps = 0.0
        self._wait_warned = False   # "no answer yet" said since the last open that succeeded
        self._unbounded_warned = False
        self._settings_said: set[tuple[str, Any]] = set()   # (setting, value taken) warned about

    def _capture_args(self):
        import cv2

        s, o = self.spec, self.spec.options
        ms = max(1, round(self.open_timeout_s * 1000))   # whole milliseconds, at least 1
        if s.scheme == "csi":
            if not has_gstreamer():
                raise InputError(
                    f"{s.safe_uri}: this OpenCV ({cv2.__version__}) was built without GStreamer, which csi:// "
                    "cameras need (nvarguscamerasrc). On a Jetson use the system OpenCV from JetPack: create "
                    "the venv with --system-site-packages and 'pip uninstall opencv-python-headless' in it "
                    "(see jetson/README.md), or use v4l2:// for a USB camera.")
            pipe = csi_pipeline(int(s.target), o["width"], o["height"], o["fps"], o["flip"], o["sensor_mode"],
                                **{k: o[k] for k in _ARGUS_CONTROLS if k in o})
            return (pipe, cv2.CAP_GSTREAMER), []
        if s.scheme == "v4l2":
            dev = int(s.target) if s.target.isdigit() else s.target
            if isinstance(dev, str) and not os.path.exists(dev):
                raise SourceLost(f"{s.safe_uri}: {dev} does not exist (camera unplugged?)")
            return (dev, cv2.CAP_V4L2), []
        if s.scheme in ("rtsp", "rtsps"):
            if not _has_open_timeout():
                if not self._unbounded_warned:
                    self._unbounded_warned = True
                    log.warning("%s: this OpenCV (%s) has no CAP_PROP_OPEN_TIMEOUT_MSEC: source.open_timeout_s "
                                "cannot be applied, and opening an unreachable camera waits for FFmpeg's own "
                                "timeout (tens of seconds)", s.safe_uri, cv2.__version__)
                return (s.target, cv2.CAP_FFMPEG), []
            return (s.target, cv2.CAP_FFMPEG), [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        # file
        p = Path(s.target)
        if not p.is_file():
            raise SourceLost(f"{s.safe_uri}: video file {p} not found (removed or not yet written?)")
        if name_text(p) != str(p):   # OpenCV crashes (SIGSEGV) on a path Python holds with a lone surrogate
            raise InputError(f"{s.safe_uri}: OpenCV cannot open a video whose path is not valid UTF-8 (the bytes "
                             "shown as \\xNN); rename the file or its folder")
        return (str(p), cv2.CAP_FFMPEG if _has_ffmpeg() else cv2.CAP_ANY), []

    def open(self) -> None:
        import cv2

        (target, api), params = self._capture_args()
        network = self.spec.scheme in ("rtsp", "rtsps")
        ffmpeg = _ffmpeg_options(self.rtsp_transport if network else None, self.spec.safe_uri) \
            if api == cv2.CAP_FFMPEG else contextlib.nullcontext()    # V4L2, GStreamer: no FFmpeg options
        with ffmpeg:
            waiting = self._say_waiting() if network else None    # (from here: not the wait for another open)
            t0 = time.monotonic()
            try:
                cap = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
            finally:
                if waiting is not None:
                    waiting.cancel()
        if not cap.isOpened():
            cap.release()
            raise SourceLost(f"{self.spec.safe_uri}: could not open ({self._why_not(time.monotonic() - t0)})")
        self._wait_warned = False
        o = self.spec.options
        if self.spec.scheme == "v4l2":
            asked = {k: o[k] for k in ("fourcc", "width", "height", "fps") if o.get(k)}
            self._say_settings(set_v4l2_settings(cap, {**asked, "buffer": o.get("buffer") or 1}))
        self._fps = 0.0  # pacing: only files are paced (cameras pace themselves)
        if self.spec.scheme == "file":
            fps = o.get("fps", 0.0)
            self._fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if fps == "native" else float(fps or 0.0)
        with self._lock:
            self._cap = cap
        self._index = 0

    def _say_settings(self, differ: list[tuple[str, Any, Any]]) -> None:
        """A WARNING for each camera setting that did not take the value asked (:func:`set_v4l2_settings`),
        said once per value the camera took: not again at every reconnect."""
        def shown(v: Any) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        for name, want, took in differ:
            if (name, took) in self._settings_said:
                continue
            self._settings_said.add((name, took))
            if took is None:
                log.warning("%s: %s %s asked; the camera does not report the value it took", self.spec.safe_uri,
                            name, shown(want))
            else:
                hint = "" if name == "buffer" else (" (a camera keeps to the formats, sizes and rates it has: "
                                                    "'v4l2-ctl --list-formats-ext' lists them)")
                log.warning("%s: %s %s asked, the camera took %s%s", self.spec.safe_uri, name, shown(want),
                            shown(took), hint)

    def _say_waiting(self) -> threading.Timer | None:
        """Log that a network camera is being opened (INFO), and start the timer of a WARNING should it still
        not have answered after :data:`OPEN_WAIT_WARN_S` (at most half the timeout), said once until an open
        succeeds: not at every reconnect attempt of an outage. The caller cancels the timer."""
        bound = (f"up to {self.open_timeout_s:g} s (source.open_timeout_s)" if _has_open_timeout()
                 else "for FFmpeg's own timeout")
        log.info("%s: opening; waiting %s for the camera to answer", self.spec.safe_uri, bound)
        if self._wait_warned:
            return None
        after = min(OPEN_WAIT_WARN_S, self.open_timeout_s / 2)

        def warn() -> None:
            self._wait_warned = True
            log.warning("%s: no answer yet after %g s; waiting %s", self.spec.safe_uri, after, bound)

        timer = threading.Timer(after, warn)
        timer.daemon = True
        timer.start()
        return timer

    def _why_not(self, waited: float = 0.0) -> str:
        s = self.spec
        if s.scheme in ("rtsp", "rtsps"):
            where = f"{urlsplit(s.target).hostname}:{urlsplit(s.target).port or 554}"
            if not _has_open_timeout():   # no bound of ours: a timeout cannot be told from a refusal
                return (f"no answer from {where} within FFmpeg's own timeout, the connection refused, or the stream "
                        f"path or credentials are wrong (after {waited:.1f} s)")
            if waited >= 0.9 * self.open_timeout_s:
                return (f"no answer from {where} within source.open_timeout_s = {self.open_timeout_s:g} s: the "
                        "camera is off or unreachable, or the host or port is wrong")
            return (f"{where} refused or closed the connection after {waited:.1f} s: nothing listens on that "
                    "port, or the stream path or credentials are wrong")
        if s.scheme == "v4l2":
            return "device busy, unplugged, or the user is not in the 'video' group"
        if s.scheme == "csi":
            return "is nvargus-daemon running and the sensor connected? (sudo systemctl restart nvargus-daemon)"
        return "not a video OpenCV/FFmpeg can decode"

    def pace_fps(self) -> float:
        return self._fps

    def read(self) -> RawFrame | None:
        cap = self._cap
        if cap is None:
            raise SourceLost(f"{self.spec.safe_uri}: not open")
        self._pace()
        ok, img = cap.read()
        if not ok or img is None:
            if self.spec.scheme == "file":
                if self.spec.options.get("loop"):
                    self.close()
                    self.open()  # raises SourceLost when the file was removed
                    ok, img = self._cap.read()
                    if not ok or img is None:
                        raise SourceLost(f"{self.spec.safe_uri}: no frame after rewinding (empty or corrupt file)")
                else:
                    return None
            else:
                raise SourceLost(f"{self.spec.safe_uri}: no frame (camera stopped, stream ended or timed out)")
        from ..data.image import to_rgb8

        frame = RawFrame(to_rgb8(img, where=self.spec.safe_uri), self._index)
        self._index += 1
        return frame

    def close(self) -> None:
        with self._lock:
            cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


def _fourcc_text(v: float) -> str:
    """A FOURCC code as ``cap.get(CAP_PROP_FOURCC)`` gives it (a float), as its four characters."""
    code = int(v)
    return "".join(chr((code >> 8 * i) & 0xFF) for i in range(4))


# the options of v4l2:// set with cap.set, in the order they are set (the pixel format first: it decides
# which sizes and rates the camera has), and how a value read back with cap.get compares with the one asked
_V4L2_SETTINGS: dict[str, tuple[str, Callable[[Any], float], Callable[[float], Any]]] = {
    # option: (cv2 property, value to set, value read back as the option's)
    "fourcc": ("CAP_PROP_FOURCC", lambda v: float(sum(ord(c) << 8 * i for i, c in enumerate(v))), _fourcc_text),
    "width": ("CAP_PROP_FRAME_WIDTH", float, lambda v: int(round(v))),
    "height": ("CAP_PROP_FRAME_HEIGHT", float, lambda v: int(round(v))),
    "fps": ("CAP_PROP_FPS", float, lambda v: round(float(v), 2)),
    "buffer": ("CAP_PROP_BUFFERSIZE", float, lambda v: int(round(v))),
}


def set_v4l2_settings(cap, asked: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Set the camera settings ``asked`` (v4l2:// options: fourcc, width, height, fps, buffer) with
    ``cap.set``, then read each back with ``cap.get``; the (option, asked, taken) of those the camera did not
    take as asked. ``taken`` is None where the camera reports nothing (``cap.get`` gives 0 or less). A camera
    rounds to the modes it has (1920x1080 asked of a 1280x720 camera gives 1280x720, 30 fps of a 29.97 one
    29.97): the caller warns, nothing fails. An fps is compared at 0.01."""
    import cv2

    unknown = sorted(set(asked) - set(_V4L2_SETTINGS))
    if unknown:
        raise TypeError(f"set_v4l2_settings: unknown setting(s) {', '.join(unknown)}; expected "
                        f"{', '.join(_V4L2_SETTINGS)}")
    order = [k for k in _V4L2_SETTINGS if k in asked]
    for k in order:
        prop, to_cv, _ = _V4L2_SETTINGS[k]
        cap.set(getattr(cv2, prop), to_cv(asked[k]))
    differ = []
    for k in order:
        prop, _, from_cv = _V4L2_SETTINGS[k]
        got = cap.get(getattr(cv2, prop))
        took = from_cv(got) if got and got > 0 else None
        want = round(float(asked[k]), 2) if k == "fps" else asked[k]
        if took != want:
            differ.append((k, asked[k], took))
    return differ


def _has_open_timeout() -> bool:
    """Can this OpenCV bound the open and read of an FFmpeg stream (CAP_PROP_OPEN_TIMEOUT_MSEC and
    CAP_PROP_READ_TIMEOUT_MSEC, given as open params)?"""
    import cv2

    return hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC") and hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC")


def _has_ffmpeg() -> bool:
    import cv2

    return any(line.strip().startswith("FFMPEG:") and "YES" in line
               for line in cv2.getBuildInformation().splitlines())


class DirSource(Source):
    """The images of a folder in name order (listed at open; ``loop`` lists again at the end)."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self._files: list[Path] = []
        self._pos = 0
        self._index = 0
        self.skipped = 0   # unreadable images skipped (the pipeline's skipped_images)
        # unreadable images warned about: once each while they stay unreadable, not at every pass of a
        # looping folder (25 images at 10 fps repeated the warning every 2.5 s, forever)
        self._warned: set[Path] = set()

    @property
    def listed(self) -> int:
        """Images in the folder's listing (the current pass)."""
        return len(self._files)

    def open(self) -> None:
        from ..data.image import IMAGE_EXTS, list_images

        folder = Path(self.spec.target)
        if not folder.is_dir():
            raise SourceLost(f"{self.spec.safe_uri}: folder {folder} not found")
        self._files = list_images(folder)
        if not self._files:
            raise SourceLost(f"{self.spec.safe_uri}: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
        self._pos = 0
        self._index = 0  # each pass counts from 0, as a looping file does

    def pace_fps(self) -> float:
        if self._pos >= len(self._files) and not self.spec.options.get("loop"):
            return 0.0   # the end: nothing to wait for
        fps = self.spec.options.get("fps") or 0.0
        return 0.0 if fps == "native" else float(fps)

    def read(self) -> RawFrame | None:
        """The next readable image. An unreadable one (removed, truncated, not an image) is skipped with
        a warning: raising SourceLost made the reconnect list the folder again and replay it from the
        first image. The warning is said once per file (a looping folder skips it again at every pass,
        and every skip is counted in ``skipped``); a file that becomes readable is read, and warned about
        again should it break once more. A whole pass without one readable image is an outage (loop) or
        the end."""
        from ..data.image import load_image

        self._pace()   # one turn per delivered frame (an unreadable image skipped takes none)
        skipped = 0
        while True:
            if self._pos >= len(self._files):
                if not self.spec.options.get("loop"):
                    return None
                if skipped and skipped >= len(self._files):
                    raise SourceLost(f"{self.spec.safe_uri}: none of the {skipped} images can be read")
                self.open()
                skipped = 0
            p = self._files[self._pos]
            self._pos += 1
            try:
                img = load_image(p)
            except (InputError, OSError) as exc:
                skipped += 1
                self.skipped += 1
                if p not in self._warned:
                    self._warned.add(p)
                    log.warning("%s: skipped %s (said once per file; every skip counts in skipped_images)",
                                self.spec.safe_uri, exc)
                continue
            self._warned.discard(p)
            frame = RawFrame(img, self._index, {"file": name_text(p.name)})   # valid Unicode: JSON can carry it
            self._index += 1
            return frame


class StillImageSource(DirSource):
    """``file://`` of a still image: one frame, decoded by :func:`~edge_ad.data.image.load_image` as ``dir://``,
    ``eval`` and ``train`` decode it. Through FFmpeg (a video's path) the same JPEG lost its EXIF orientation
    and a 16-bit PNG was rounded otherwise, so ``run --source file://part.jpg`` judged another picture than
    ``eval`` did (OK became NG). ``loop=1`` repeats it, ``fps=N`` paces it (``native``: no pacing)."""

    def open(self) -> None:
        p = Path(self.spec.target)
        if not p.is_file():
            raise SourceLost(f"{self.spec.safe_uri}: image file {p} not found (removed or not yet written?)")
        self._files = [p]
        self._pos = 0
        self._index = 0


def is_still_image(spec: SourceSpec) -> bool:
    """A ``file://`` whose extension is an image format's (read as one image, not as a video)."""
    from ..data.image import IMAGE_EXTS

    return spec.scheme == "file" and Path(spec.target).suffix.lower() in IMAGE_EXTS


class SyntheticSource(Source):
    """Generated conveyor frames with planted defects (ground truth in ``RawFrame.truth``)."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self._stream = None
        self._index = 0

    def open(self) -> None:
        self._stream = _synthetic_stream(self.spec.options)

    @property
    def stream(self):
        """The :class:`~edge_ad.data.synthetic.ConveyorStream` (e.g. to change its lighting live)."""
        return self._stream

    def pace_fps(self) -> float:
        o = self.spec.options
        if o.get("count") and self._index >= o["count"]:
            return 0.0   # the end: nothing to wait for
        fps = o.get("fps") or 0.0
        return 0.0 if fps == "native" else float(fps)

    def read(self) -> RawFrame | None:
        o = self.spec.options
        if o.get("count") and self._index >= o["count"]:
            return None
        self._pace()
        f = self._stream.frame(self._index)
        self._index += 1
        return RawFrame(f.image, f.index, {"label": int(f.label), "defect_type": f.defect_type})


def open_source(spec: SourceSpec | str, open_timeout_s: float = 10.0, rtsp_transport: str = "tcp") -> Source:
    """A source object for a URI (not opened yet: call ``open()``; the capture loop does)."""
    if isinstance(spec, str):
        spec = parse_uri(spec)
    if spec.scheme == "dir":
        return DirSource(spec)
    if spec.scheme == "synthetic":
        return SyntheticSource(spec)
    if is_still_image(spec):
        return StillImageSource(spec)
    return OpenCVSource(spec, open_timeout_s=open_timeout_s, rtsp_transport=rtsp_transport)


def check_startup(spec: SourceSpec) -> None:
    """Input errors worth stopping for before anything starts: a file:// that is missing or that OpenCV
    cannot decode a first frame of (a still image: that load_image cannot read), a dir:// that is missing
    or holds no readable image.

    Cameras are not checked here: a camera that is not there yet is waited for with back-off.
    """
    if spec.scheme == "file":
        _probe_file(spec)
    if spec.scheme == "dir":
        _probe_dir(spec)
    if spec.scheme == "csi" and not has_gstreamer():
        OpenCVSource(spec)._capture_args()  # raises the InputError that explains the fix


def _probe_file(spec: SourceSpec) -> None:
    p = Path(spec.target)
    if is_still_image(spec):
        from ..data.image import load_image

        if not p.is_file():
            raise InputError(f"source {spec.safe_uri}: image file {p} not found")
        try:
            load_image(p)
        except InputError as exc:
            raise InputError(f"source {spec.safe_uri}: {exc}") from None
        return
    if not p.is_file():
        raise InputError(f"source {spec.safe_uri}: video file {p} not found")
    src = OpenCVSource(spec)
    try:
        src.open()
        frame = src.read()
    except SourceLost:
        frame = None
    finally:
        src.close()
    if frame is None:
        raise InputError(f"source {spec.safe_uri}: {p} is not a video OpenCV/FFmpeg can decode (no first "
                         "frame); expected a video file such as .mp4, .avi or .mkv")


def _probe_dir(spec: SourceSpec) -> None:
    from ..data.image import IMAGE_EXTS, list_images, load_image

    folder = Path(spec.target)
    if not folder.is_dir():
        raise InputError(f"source {spec.safe_uri}: folder {folder} not found")
    files = list_images(folder)
    if not files:
        raise InputError(f"source {spec.safe_uri}: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    first = None
    for f in files:
        try:
            load_image(f)
            return
        except (InputError, OSError) as exc:
            first = first or exc
    raise InputError(f"source {spec.safe_uri}: none of the {len(files)} images in {folder} can be read "
                     f"(first: {first})")
