"""Typed settings for ``edge-ad run``: a TOML file, ``EDGE_AD_*`` environment overrides, CLI overrides.

Loaded once, validated with pydantic v2, passed down as finished objects; nothing reads the environment
at import time. Precedence (lowest first): defaults < TOML file < environment < command-line flags.

Environment variables name a field by section and key joined with a double underscore, after the
``EDGE_AD_`` prefix: ``EDGE_AD_SOURCE__URI=rtsp://...``, ``EDGE_AD_MQTT__URL=mqtts://broker:8883``,
``EDGE_AD_MQTT__PASSWORD=...``, ``EDGE_AD_PIPELINE__MAX_BATCH=4``. Values are parsed as TOML values
when they parse (``4``, ``true``, ``[0, 0, 640, 480]``) and taken as strings otherwise.

An invalid config raises :class:`~edge_ad.errors.InputError` naming the field, the value and where the
value came from (the file, the environment variable or the flag), before any camera is opened.
The reference of every field is ``docs/runtime.md``; ``examples/edge-ad.toml`` is a documented example.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "EDGE_AD_"
ENV_CONFIG = "EDGE_AD_CONFIG"  # default for --config; not an override
ENV_FILE = "edge-ad.env"      # the service's EnvironmentFile=, next to its config.toml (jetson/)


class Mode(str, enum.Enum):
    """``stream``: infer on the newest frame, drop and count the rest.
    ``trigger``: every triggered frame is inspected, none dropped (the capture waits)."""

    STREAM = "stream"
    TRIGGER = "trigger"


def _empty_is_none(v: Any) -> Any:
    """An empty text is an optional field's "not set": how a flag or the environment removes a value the file
    gives (``--set decision.threshold=``, ``EDGE_AD_OUTPUT__JSONL=``)."""
    return None if isinstance(v, str) and v.strip() == "" else v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class ModelSettings(_Section):
    """Which bundle inspects, on which backend."""

    bundle: Optional[Path] = Field(None, title="Bundle folder (made by edge-ad train); or give deploy_dir")
    deploy_dir: Optional[Path] = Field(None, title="Deploy folder of 'edge-ad bundle install' (its 'current' "
                                                   "bundle runs; MQTT update_model installs into it)")
    golden_dir: Optional[Path] = Field(None, title="Golden images a model update must pass (default "
                                                   "<deploy_dir>/golden)")
    update_key: Optional[Path] = Field(None, title="Key that model update archives must be signed with")
    download_max_mb: float = Field(1024.0, gt=0, allow_inf_nan=False,
                                   title="Largest archive update_model downloads over http(s), in MiB (also at "
                                         "most half the deploy disk's free space)")
    download_timeout_s: float = Field(600.0, gt=0, le=86_400,
                                      title="Longest an update_model download over http(s) may take, in seconds, "
                                            "from the request to the last byte")
    backend: str = Field("auto", title="auto | onnxruntime | tensorrt | torch | openvino (x86 CPUs, optional)")
    precision: Optional[str] = Field(None, title="fp32 | fp16 | int8; empty: the bundle's active graph")
    device: Optional[str] = Field(None, title="cpu | cuda[:N] | tensorrt[:N]; empty: the best this machine has")
    threads: int = Field(0, ge=0, le=1024, title="ONNX Runtime / OpenVINO inference threads (0: its default)")
    thread_spinning: Optional[bool] = Field(None, title="ONNX Runtime intra-op thread spinning (empty: its "
                                                        "default, on; false is faster on cores shared with "
                                                        "other busy processes)")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from .runtime.backends import BACKENDS  # the one list open_backend accepts

        v = v.strip().lower()
        if v not in BACKENDS:
            raise ValueError(f"'{v}': expected {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
        return v

    @field_validator("bundle", "deploy_dir", "golden_dir", "update_key", "thread_spinning", mode="before")
    @classmethod
    def _empty(cls, v: Any) -> Any:
        return _empty_is_none(v)

    @model_validator(mode="after")
    def _bundle_or_deploy(self) -> "ModelSettings":
        if self.bundle is None and self.deploy_dir is None:
            raise ValueError("give bundle (a bundle folder) or deploy_dir (a folder of installed bundles)")
        if self.bundle is not None and self.deploy_dir is not None:
            # the two would disagree after an update: update_model installs into deploy_dir, a restart
            # or reload would run model.bundle again and undo it
            raise ValueError(f"both bundle ({self.bundle}) and deploy_dir ({self.deploy_dir}) are set; give one: "
                             "bundle to run that folder, or deploy_dir to run its 'current' release (and take "
                             "model updates); to run another bundle with this config, also empty deploy_dir "
                             "(--set model.deploy_dir=)")
        return self

    def bundle_path(self) -> Path:
        """The bundle to open: ``bundle``, else the deploy folder's current release."""
        if self.bundle is not None:
            return Path(self.bundle)
        from .calibration import current_path

        return current_path(self.deploy_dir)

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: Any) -> Any:
        if _empty_is_none(v) is None:
            return None
        from .runtime.backends.onnxruntime import parse_device  # the widest grammar; backends check the rest

        v = str(v).strip().lower()
        try:
            parse_device(v)
        except InputError:
            raise ValueError(f"'{v}': expected cpu, cuda[:N] or tensorrt[:N] (N a device index; empty: the best "
                             "this machine has)") from None
        return v

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        if _empty_is_none(v) is None:
            return None
        v = str(v).strip().lower()
        if v not in ("fp32", "fp16", "int8"):
            raise ValueError(f"'{v}': expected fp32, fp16 or int8 (or empty for the bundle's active graph)")
        return v


class GpioSettings(_Section):
    """A GPIO line as the trigger (``source.trigger = "gpio"``), read with Jetson.GPIO."""

    pin: int = Field(7, ge=0, title="Board pin number (BOARD numbering)")
    edge: str = Field("rising", title="rising | falling | both")
    debounce_ms: int = Field(20, ge=0, le=10_000)

    @field_validator("edge")
    @classmethod
    def _edge(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("rising", "falling", "both"):
            raise ValueError(f"'{v}': expected rising, falling or both")
        return v


class SourceSettings(_Section):
    """Where frames come from and how the camera is kept alive."""

    uri: str = Field(title="Source URI: v4l2:///dev/video0, csi://0, rtsp://..., file://..., dir://..., synthetic://")
    mode: Mode = Field(Mode.STREAM, title="stream | trigger")
    trigger: str = Field("frame", title="trigger mode: frame | command | gpio | module:callable")
    frames_per_trigger: int = Field(1, ge=1, le=1000)
    roi: Optional[list[int]] = Field(None, title="[x, y, width, height] crop in source pixels")
    rotate: int = Field(0, title="0 | 90 | 180 | 270 degrees clockwise, after the crop")
    reconnect: bool = Field(True, title="Reopen a lost source with back-off")
    reconnect_attempts: int = Field(0, ge=0, title="Attempts per outage before giving up (0: forever)")
    backoff_initial_s: float = Field(0.5, gt=0, le=3600)
    backoff_max_s: float = Field(30.0, gt=0, le=3600)
    watchdog_s: float = Field(10.0, ge=0, le=86_400, title="An outage when no frame arrives for this long (0: off)")
    open_timeout_s: float = Field(10.0, gt=0, le=600, title="Network cameras: open and read timeout")
    rtsp_transport: str = Field("tcp", title="tcp | udp")
    gpio: GpioSettings = Field(default_factory=GpioSettings)

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        from .runtime.sources import parse_uri  # one parser, with its own clear messages

        try:
            parse_uri(v)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, v: str) -> str:
        v = v.strip()
        if v in ("frame", "command", "gpio") or (":" in v and all(v.partition(":")[::2])):
            return v
        raise ValueError(f"'{v}': expected frame, command, gpio or 'package.module:callable'")

    @field_validator("roi", mode="before")
    @classmethod
    def _empty(cls, v: Any) -> Any:
        return _empty_is_none(v)

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is None or len(v) == 0:
            return None
        if len(v) != 4:
            raise ValueError(f"{v}: expected [x, y, width, height]")
        x, y, w, h = v
        if x < 0 or y < 0 or w <= 0 or h <= 0:
            raise ValueError(f"{v}: x, y must be >= 0 and width, height > 0")
        return list(v)

    @field_validator("rotate")
    @classmethod
    def _rotate(cls, v: int) -> int:
        if v not in (0, 90, 180, 270):
            raise ValueError(f"{v}: expected 0, 90, 180 or 270")
        return v

    @field_validator("rtsp_transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("tcp", "udp"):
            raise ValueError(f"'{v}': expected tcp or udp")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> "SourceSettings":
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s "
                             f"({self.backoff_initial_s})")
        return self


class PipelineSettings(_Section):
    """Queues between the capture, inference and reporting threads."""

    queue_size: int = Field(2, ge=1, le=10_000, title="Frames waiting for inference")
    result_queue_size: int = Field(256, ge=1, le=1_000_000, title="Results waiting for reporting")
    result_queue_image_mb: float = Field(256.0, ge=0, allow_inf_nan=False,
                                         title="Most MB of images the waiting results hold for snapshots")
    max_batch: int = Field(4, ge=1, le=1024, title="Frames inferred together when several wait")
    drain_timeout_s: float = Field(30.0, gt=0, le=86_400, title="Longest wait for the queues to drain at stop")


class DecisionSettings(_Section):
    """How a score map becomes a decision and defect regions."""

    threshold: Optional[float] = Field(None, allow_inf_nan=False,
                                       title="Override the calibration's threshold (empty: use it)")
    min_region_area: int = Field(4, ge=1, title="Smallest defect region reported (pixels)")
    max_regions: int = Field(16, ge=1, le=1000, title="Most regions reported per frame (largest peaks)")

    @field_validator("threshold", mode="before")
    @classmethod
    def _empty(cls, v: Any) -> Any:
        return _empty_is_none(v)


class OutputSettings(_Section):
    """Local outputs: the JSONL result log and NG snapshots."""

    jsonl: Optional[Path] = Field(Path("edge-ad-results.jsonl"), title="Result log (empty: off)")
    jsonl_max_bytes: int = Field(50_000_000, ge=1024, title="Rotate the log past this size")
    jsonl_backups: int = Field(5, ge=0, le=1000, title="Rotated logs kept (.1 ... .N)")
    jsonl_fsync: bool = Field(False, title="fsync after every line (slower; survives power loss)")
    snapshots_dir: Optional[Path] = Field(None, title="Folder for NG snapshots (empty: off)")
    snapshots_max_count: int = Field(1000, ge=1)
    snapshots_max_bytes: int = Field(500_000_000, ge=1024)
    heatmap: bool = Field(True, title="Overlay the anomaly map on snapshots")
    jpeg_quality: int = Field(90, ge=10, le=100)
    event_image: bool = Field(True, title="Send the NG snapshot with the MQTT event")

    @field_validator("jsonl", "snapshots_dir", mode="before")
    @classmethod
    def _empty_is_off(cls, v: Any) -> Any:
        return _empty_is_none(v)


class TelemetrySettings(_Section):
    interval_s: float = Field(10.0, gt=0, le=86_400)
    path: Optional[Path] = Field(None, title="Also append telemetry as JSON lines to this file")
    max_bytes: int = Field(10_000_000, ge=1024, title="Rotate the telemetry file past this size")
    backups: int = Field(3, ge=0, le=1000, title="Rotated telemetry files kept (.1 ... .N)")
    tegrastats: bool = Field(True, title="Read tegrastats on Jetson (when the binary exists)")
    nvml: bool = Field(True, title="Read NVML (pynvml) when present")

    @field_validator("path", mode="before")
    @classmethod
    def _empty_is_off(cls, v: Any) -> Any:
        return _empty_is_none(v)


class CalibrationSettings(_Section):
    """Defaults of the MQTT ``calibrate`` command."""

    policy: str = Field("fpr:0.001", title="fpr:P | max | sigma:K")
    frames: int = Field(200, ge=20, le=100_000, title="Frames to collect (a refit needs at least 20)")
    timeout_s: float = Field(600.0, gt=0, le=86_400, title="Longest wait for the calibration frames")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        from .scoring import check_policy

        try:
            check_policy(v)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return v


class DriftSettings(_Section):
    enabled: bool = True
    window: int = Field(200, ge=10, le=1_000_000,
                        title="Last parts kept, OK and NG (median of the OK ones; of all when fewer than half "
                              "are OK)")
    limit: float = Field(3.0, gt=0, allow_inf_nan=False,
                         title="Drift when the window's median is this many standard errors off")
    clear_after: int = Field(50, ge=1, le=1_000_000,
                             title="Drift clears once the statistic has stayed below 80 % of the limits for this "
                                   "many parts in a row (a crossing back starts the count again)")


class HealthSettings(_Section):
    """The health check after a model switch of ``model.deploy_dir`` (:class:`edge_ad.calibration.HealthLimits`,
    docs/calibration.md). A reload applies to the next watch; one already running keeps its limits."""

    enabled: bool = Field(True, title="Watch a switched-in release and roll it back when it fails (false: it "
                                      "stays pending, neither judged nor rolled back)")
    window_s: float = Field(120.0, gt=0, le=86_400, allow_inf_nan=False,
                            title="Fail when, this long after the first frame handed to the new model, it has "
                                  "processed none of them or left min_frames unprocessed")
    min_frames: int = Field(20, ge=1, le=1_000_000, title="Frames processed before the verdict")
    max_error_rate: float = Field(0.05, ge=0, le=1, allow_inf_nan=False,
                                  title="Fail above this share of failed inferences")
    max_ng_rate_jump: float = Field(0.2, ge=0, le=1, allow_inf_nan=False,
                                    title="Fail when the NG rate rises more than this (absolute) over the old model's")
    rollback_wait_s: float = Field(600.0, ge=0, le=86_400, allow_inf_nan=False,
                                   title="Longest a rollback waits for a deploy lock held elsewhere, or for room to "
                                         "be written, before it is given up")
    record_wait_s: float = Field(600.0, ge=0, le=86_400, allow_inf_nan=False,
                                 title="Longest a healthy verdict's record in deploy.json is tried before it is "
                                       "given up")

    def limits(self):
        """These limits as the :class:`~edge_ad.calibration.HealthLimits` a HealthWatch takes."""
        from .calibration.deploy import HealthLimits

        return HealthLimits(**self.model_dump(exclude={"enabled"}))


class OutboxLeftBehind(NamedTuple):
    """An outbox file at ``old``, the working directory's reading of the config's relative ``mqtt.outbox_path``
    (``given``), where edge-ad before 53e6b29 (2026-12-05) kept it; this version reads the path from the config's
    folder (``new``). A line upgraded from such a revision would start an empty outbox at ``new`` and never send
    the ``messages`` waiting in ``old`` (its ``seq`` starting again at 1). ``run`` refuses to start while ``new``
    does not exist and ``old`` holds messages (:attr:`blocks`), and warns otherwise (:attr:`what`, :attr:`fix`);
    ``doctor`` says the same."""

    config: Path
    given: str
    old: Path
    new: Path
    messages: Optional[int]
    unreadable: Optional[str]    # why ``messages`` could not be counted

    @property
    def new_exists(self) -> bool:
        return self.new.exists()

    @property
    def blocks(self) -> bool:
        """Would starting strand messages (or ones that could not be counted)? ``new`` does not exist yet."""
        return self.messages != 0 and not self.new_exists

    @property
    def what(self) -> str:
        """What is wrong, in words."""
        held = ("no message" if self.messages == 0 else f"{self.messages} message(s) not delivered yet"
                if self.unreadable is None else f"messages that could not be counted ({self.unreadable})")
        head = (f"{self.config}: mqtt.outbox_path = {self.given!r} is read from the config file's folder since "
                f"edge-ad 53e6b29 (2026-12-05), {self.new}, but the outbox an earlier edge-ad kept at the working "
                f"directory's reading of it, {self.old}, holds {held}")
        if self.blocks:
            return (f"{head}: starting would begin an empty outbox at {self.new} and never send them (seq would "
                    "start again at 1)")
        if not self.new_exists:
            return f"{head}: run starts an empty outbox at {self.new} (seq starts again at 1)"
        return f"{head}, and the line uses the one at {self.new}" + (
            "" if self.messages == 0 else ": the older one's messages are not sent from there")

    @property
    def fix(self) -> str:
        """What to do about it."""
        keep = f"set mqtt.outbox_path = \"{self.old}\" in {self.config}"
        if self.blocks:
            return (f"{keep} (its absolute path: the outbox stays where it is), or, with the line stopped, move "
                    f"{self.old} (and its -wal and -shm, if there are any) to {self.new}; delete it only if its "
                    "messages are not wanted")
        if self.messages == 0:
            return f"delete {self.old} (nothing is lost)" + ("" if self.new_exists else
                                                              f", or {keep} to go on with it and its seq")
        return (f"to send them, stop the line and run it with mqtt.outbox_path = \"{self.old}\" until they are out "
                "(the outbox depth in telemetry or the run summary is 0), then set it back; delete "
                f"{self.old} once they are sent, or if they are not wanted")


class Settings(_Section):
    """Everything ``edge-ad run`` needs. Sections as in the TOML file."""

    model: ModelSettings
    source: SourceSettings
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    decision: DecisionSettings = Field(default_factory=DecisionSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    mqtt: Optional[dict[str, Any]] = Field(None, title="edge_ad.mqtt.MqttSettings fields; absent: MQTT off")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)

    # where the file was (relative paths in it are resolved against its folder): set by load_settings, never by
    # what it loads (not a field, so a config_dir key in the file, a variable or a flag is an unknown field)
    _config_dir: Optional[Path] = None   # (a leading _: a pydantic private attribute)
    _config_file: Optional[Path] = None
    _outbox_given: Optional[str] = None  # a relative mqtt.outbox_path as the file gives it (see outbox_left_behind)

    @property
    def config_dir(self) -> Optional[Path]:
        """The folder of the config file these settings were loaded from (None: no file)."""
        return self._config_dir

    def outbox_left_behind(self) -> "OutboxLeftBehind | None":
        """An outbox at the working directory's reading of the file's relative ``mqtt.outbox_path``, where
        edge-ad before 53e6b29 (2026-12-05) kept it, when that is not the file this version uses (the path
        read from the config's folder): see :class:`OutboxLeftBehind`. None when there is none (the path is
        absolute, from the environment or a flag, or both readings are the same file)."""
        if self._outbox_given is None or self._config_dir is None or not self.mqtt_enabled:
            return None
        old, new = Path.cwd() / self._outbox_given, self._config_dir / self._outbox_given
        if not old.is_file() or os.path.realpath(old) == os.path.realpath(new) or (
                new.exists() and os.path.samefile(old, new)):
            return None
        import sqlite3

        from .mqtt.outbox import waiting_in

        try:
            messages, unreadable = waiting_in(old), None
        except sqlite3.Error as exc:
            if "no such table" in str(exc):   # an SQLite file, but no outbox
                return None
            messages, unreadable = None, str(exc)
        return OutboxLeftBehind(self._config_file, self._outbox_given, old, new, messages, unreadable)

    def mqtt_settings(self):
        """The validated :class:`edge_ad.mqtt.MqttSettings`, or None when MQTT is off (no ``[mqtt]``
        section, or ``enabled = false`` in it)."""
        if not self.mqtt_enabled:
            return None
        from .mqtt.settings import MqttSettings

        return MqttSettings(**{k: v for k, v in self.mqtt.items() if k != "enabled"})

    @property
    def mqtt_enabled(self) -> bool:
        """An ``[mqtt]`` section without ``enabled = false``."""
        if self.mqtt is None:
            return False
        enabled = self.mqtt.get("enabled", True)
        return not (enabled is False or str(enabled).lower() in ("false", "0", "no", "off"))

    def trigger_problem(self, where=None) -> str | None:
        """Why ``source.trigger`` cannot work with the rest of the settings, None when it can: ``command`` releases
        frames only on the MQTT ``inspect`` command, so with MQTT off nothing could ever be inspected. ``where``
        (a field's dotted name -> where its value came from) adds ``[from ...]`` to each field named."""
        src = self.source
        if not (src.mode is Mode.TRIGGER and src.trigger == "command" and not self.mqtt_enabled):
            return None

        def at(field: str) -> str:
            return f" [from {where(field)}]" if where is not None else ""

        if self.mqtt is None:
            off, on = "no [mqtt] section", "add an [mqtt] section (its url)"
        else:
            off, on = f"mqtt.enabled = false{at('mqtt.enabled')}", "set mqtt.enabled = true"
        return (f"source.trigger = 'command'{at('source.trigger')} (with source.mode = 'trigger'{at('source.mode')}) "
                f"releases frames only on the MQTT inspect command, and MQTT is off ({off}): nothing could ever be "
                f"inspected; {on}, or set source.trigger to 'frame', 'gpio' or a plug-in")

    def redacted(self) -> dict:
        """The settings as a dict with secrets and credentials removed (for logs and ``status``). ``mqtt`` is
        the validated :class:`~edge_ad.mqtt.MqttSettings` the run uses (defaults, the client id and outbox
        path it derives), or ``{"enabled": false}`` when MQTT is off."""
        from .runtime.sources import redact_uri

        d = self.model_dump(mode="json")
        d["source"]["uri"] = redact_uri(self.source.uri)
        d["mqtt"] = self._mqtt_redacted()   # no [mqtt] section is MQTT off too: {"enabled": false}
        return d

    def _mqtt_redacted(self) -> dict:
        from .runtime.sources import redact_uri

        try:
            m = self.mqtt_settings()
        except InputError as exc:  # valid when loaded; a TLS file removed since (the status of a running line)
            return {"enabled": True, "error": str(exc)}
        if m is None:
            return {"enabled": False}
        d = m.model_dump(mode="json")
        for k in ("password", "command_secret"):
            d[k] = "***" if d[k] else None
        return {"enabled": True, **d, "url": redact_uri(m.url), "client_id": m.effective_client_id,
                "outbox_path": str(m.effective_outbox_path)}


# ----------------------------------------------------------------------------- loading
def _parse_scalar(text: str, path: list[str] | None = None) -> Any:
    """An override's text as a TOML value when it is one (4, true, [1, 2], "x"), else the string. For a
    text field (a name, a password, a path) the text is kept whole: device 42, password 123456 or
    123#456 are strings there, not a number or a number and a TOML comment. A quoted "x" is unquoted."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if path is not None and not isinstance(value, str) and _is_text_field(path):
        return text
    return value


def _is_text_field(path: list[str]) -> bool:
    """Does ``path`` name a field whose type is text (str, SecretStr, Path, or Optional of one)?"""
    import typing

    from pydantic import SecretStr

    model: Any = Settings
    if path and path[0] == "mqtt":
        from .mqtt.settings import MqttSettings

        model, path = MqttSettings, path[1:]
    field = None
    for i, key in enumerate(path):
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return False
        field = fields[key]
        model = field.annotation
        if i < len(path) - 1:
            args = [a for a in typing.get_args(model) if a is not type(None)]
            model = args[0] if args and not hasattr(model, "model_fields") else model
    if field is None:
        return False
    ann = field.annotation
    kinds = [a for a in (typing.get_args(ann) or (ann,)) if a is not type(None)]
    return bool(kinds) and all(k in (str, SecretStr, Path) for k in kinds)


def _set_path(tree: dict, path: list[str], value: Any, origin: str, origins: dict) -> None:
    node = tree
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value
    origins[tuple(path)] = origin


def env_overrides(environ: Mapping[str, str] | None = None) -> list[tuple[list[str], Any, str]]:
    """``EDGE_AD_SECTION__KEY[__SUB]=value`` -> [(path, value, origin)]; other EDGE_AD_* names ignored."""
    environ = os.environ if environ is None else environ
    sections = set(Settings.model_fields)
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if path[0] not in sections or any(not p for p in path):
            close = _close_match(path[0], sections) if path[0] else None
            hint = f"did you mean {_env_name([close, *path[1:]])}? " if close and all(path[1:]) else ""
            raise InputError(f"environment variable {name}: '{path[0]}' is not a config section ({hint}expected "
                             f"EDGE_AD_<SECTION>__<KEY> with SECTION one of {', '.join(sorted(sections))})")
        out.append((path, _parse_scalar(environ[name], path), f"environment variable {name}"))
    return out


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(path) -> str:
    """The EDGE_AD_* variable that sets the config field at ``path`` (``EDGE_AD_OUTPUT__SNAPSHOTS_DIR``)."""
    return ENV_PREFIX + "__".join(str(p).upper() for p in path)


def _close_match(name: str, known) -> str | None:
    """The one of ``known`` that ``name`` most likely misspells (difflib, case aside), else None."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _unknown_field(loc: tuple, known, origin: str, list_known: bool = True) -> str:
    """What to say of the unknown field at ``loc`` whose table has the fields ``known`` (None: not known): the
    field it most likely misspells, written as where it came from writes it (an EDGE_AD_* variable, else
    ``section.key``); without one, the table's fields (``list_known``)."""
    msg = "unknown field"
    if known is None:
        return msg
    close = _close_match(loc[-1], known)
    if close is not None:
        path = (*loc[:-1], close)
        spelled = _env_name(path) if origin.startswith("environment variable") else ".".join(map(str, path))
        return f"{msg}; did you mean {spelled}?"
    if not list_known:
        return msg
    table = f"the [{'.'.join(map(str, loc[:-1]))}] fields" if len(loc) > 1 else "the sections"
    return f"{msg} ({table}: {', '.join(sorted(known))})"


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """The variables of a systemd ``EnvironmentFile=`` (jetson/edge-ad.env): ``NAME=value`` lines; blank
    lines and lines starting with ``#`` or ``;`` are skipped; whitespace around the name and the value is
    dropped; a value in single quotes is taken verbatim, one in double quotes with the backslash before
    a double quote, backslash, dollar or backtick removed, an unquoted one with every backslash escape
    undone. A line that is none of these (no ``=``, a bad name, a quote left open: values spanning lines
    are not supported) is an :class:`InputError` naming ``file:line`` (never the value: it may be a secret)."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read the environment file ({getattr(exc, 'strerror', None) or exc})") \
            from exc
    if text.startswith("\ufeff"):   # systemd reads the mark as part of the first name, as edge-ad would
        raise InputError(f"{p}: the file starts with a UTF-8 byte-order mark (some Windows editors write one), which "
                         "systemd does not read either; save it without one (sed -i '1s/^\\xEF\\xBB\\xBF//' "
                         f"{p})")
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        where = f"{p}:{n}"
        if not sep:
            raise InputError(f"{where}: no '=' in this line; expected NAME=value (e.g. EDGE_AD_MQTT_PASSWORD=..., "
                             "comments start with #)")
        if not _ENV_NAME.fullmatch(name):
            raise InputError(f"{where}: {name!r} is not a variable name; expected NAME=value with NAME made of "
                             "letters, digits and _, not starting with a digit")
        if value[:1] in ("'", '"'):
            if len(value) < 2 or value[-1] != value[0]:
                raise InputError(f"{where}: {name}'s value opens a {value[0]} quote that does not close at the end "
                                 "of the line (values spanning lines are not supported)")
            value = value[1:-1] if value[0] == "'" else re.sub(r'\\([\\"`$])', r"\1", value[1:-1])
        else:
            value = re.sub(r"\\(.)", r"\1", value)
        out[name] = value
    return out


def default_env_file(config: str | os.PathLike | None) -> Path | None:
    """``edge-ad.env`` next to ``config`` when that file exists (the service's EnvironmentFile=), else None."""
    if config is None:
        return None
    p = Path(config).parent / ENV_FILE
    return p if p.is_file() else None


class ServiceEnviron(NamedTuple):
    """What :func:`service_environ` gives: the environment, the file applied (None: none) and the names of
    its variables (the values may be secrets: say the names)."""

    environ: dict[str, str]
    env_file: Path | None
    names: tuple[str, ...]


def service_environ(config: str | os.PathLike | None, env_file: str | os.PathLike | None = None) -> ServiceEnviron:
    """The environment the service runs ``config`` with, for a command that must see what it sees
    (``calibrate``, ``capture``, ``bundle install``; ``doctor`` reads the file itself to report on it): this
    process's environment with the variables of ``env_file`` (default: :func:`default_env_file`) over it, as
    systemd's EnvironmentFile= gives them to the service whatever the shell has. ``env_file`` without
    ``config`` is an :class:`InputError` (it only changes the config's values); a bad file one naming
    ``file:line`` (:func:`read_env_file`), none of it applied."""
    if env_file is not None and config is None:
        raise InputError("--env-file needs --config (it changes the config's values)")
    env_file = Path(env_file) if env_file is not None else default_env_file(config)
    env = read_env_file(env_file) if env_file is not None else {}
    return ServiceEnviron({**os.environ, **env}, env_file, tuple(sorted(env)))


@contextlib.contextmanager
def applied_environ(values: Mapping[str, str]):
    """``os.environ`` with ``values`` over it for the block (as systemd gives the service an EnvironmentFile's
    values, whatever the caller's shell has), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_set_option(text: str) -> tuple[list[str], Any, str]:
    """``section.key=value`` (a ``--set`` flag) -> (path, value, origin)."""
    key, sep, value = text.partition("=")
    path = [p.strip() for p in key.strip().split(".")]
    if not sep or len(path) < 2 or any(not p for p in path):
        raise InputError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. --set pipeline.max_batch=8")
    return path, _parse_scalar(value.strip(), path), f"--set {key.strip()}"


def _where(loc: tuple, origins: dict, config_path: Path | None) -> str:
    key = tuple(str(p) for p in loc)
    for n in range(len(key), 0, -1):
        o = origins.get(key[:n])
        if o:
            return o
    # an unknown section or table set by a longer path (--set nope.x=1 makes 'nope')
    below = [o for k, o in origins.items() if k[:len(key)] == key]
    if below:
        return below[0]
    return str(config_path) if config_path else "defaults"


def _shown_input(field: str, value: Any) -> str:
    """A refused value as an error message may show it: a secret field's as ***, a URI without its
    credentials (an error lands in the journal)."""
    if any(w in field.lower() for w in ("password", "secret", "token")):
        return "***"
    if isinstance(value, str) and "://" in value:
        from .runtime.sources import redact_uri

        return repr(redact_uri(value))
    return repr(value)


class CaptureSourceSettings(SourceSettings):
    """``[source]`` for a command that is also given its source on the command line (``capture --source``,
    ``calibrate --source``): ``uri`` may be absent, the command then says the source is required; the rest
    (roi, rotate, reconnect ...) as for ``run``, and a uri given is checked as for ``run``."""

    uri: Optional[str] = Field(None, title=SourceSettings.model_fields["uri"].title)


class CaptureSettings(Settings):
    """The settings of a command that reads the source only (``edge-ad capture``, and ``edge-ad calibrate``,
    which opens its bundle itself): ``[model]`` may be absent (frames are captured before any bundle exists),
    and is checked as usual when it is there; ``[source]`` and its ``uri`` may be absent too (given as
    ``--source``)."""

    model: Optional[ModelSettings] = None
    source: CaptureSourceSettings = Field(default_factory=CaptureSourceSettings)


def _table_fields(schema: type[BaseModel], loc: tuple) -> list[str] | None:
    """The fields of the table at ``loc`` (``()``: the sections; ``("source", "gpio")``) of ``schema``, None when
    that is not a settings model (``[mqtt]``, a plain table: :func:`_check_mqtt_keys`)."""
    model: Any = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        model = next((t for t in (field.annotation, *get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None:
            return None
    return list(model.model_fields)


def _format_errors(exc: ValidationError, origins: dict, config_path: Path | None, prefix: tuple = (),
                   schema: type[BaseModel] | None = None, missing_hint: str = "") -> str:
    """``FILE: invalid config: field: what [from origin]; ...``, and ``missing_hint`` at the end when a required
    field is missing that nothing gave (no file, variable or flag: ``[from defaults]``)."""
    lines = []
    unset = False
    for err in exc.errors():
        loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = ""
        if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
            got = f" (got {_shown_input(field, err['input'])})"
        where = _where(loc, origins, config_path)
        if err["type"] == "extra_forbidden":
            msg = _unknown_field(loc, None if schema is None else _table_fields(schema, loc[:-1]), where)
        unset = unset or (err["type"] == "missing" and where == "defaults")
        lines.append(f"{field}: {msg}{got} [from {where}]")
    head = f"{config_path}: invalid config" if config_path else "invalid config"
    return head + ": " + "; ".join(lines) + (f"; {missing_hint}" if unset and missing_hint else "")


def _check_mqtt_keys(table: dict, origins: dict, config_path: Path | None) -> None:
    """An :class:`InputError` naming each key of ``[mqtt]`` that is not a field (nor ``enabled``) and the known
    ones: checked whether or not MQTT is on, so a typo in a section turned off is not kept for later."""
    from .mqtt.settings import MqttSettings

    known = {"enabled", *MqttSettings.model_fields}
    unknown = sorted(set(table) - known)
    if unknown:
        froms = {k: _where(("mqtt", k), origins, config_path) for k in unknown}
        where = "; ".join(f"mqtt.{k}: {_unknown_field(('mqtt', k), known, froms[k], list_known=False)} "
                          f"[from {froms[k]}]" for k in unknown)
        fields = "" if all(_close_match(k, known) for k in unknown) else \
            f" (the [mqtt] fields: {', '.join(sorted(known))})"
        raise InputError(f"{config_path or 'config'}: invalid config: {where}{fields}")


def load_settings(config: str | os.PathLike | None = None, overrides: list[tuple[list[str], Any, str]] = (),
                  environ: Mapping[str, str] | None = None, schema: type[Settings] | None = None,
                  for_run: bool = False, missing_hint: str = "") -> Settings:
    """Read the TOML file (optional), apply env then ``overrides`` ((path, value, origin) tuples), validate
    (against ``schema``: :class:`Settings`, or :class:`CaptureSettings` for a command that opens no model).
    ``for_run``: also refuse what ``run`` would refuse at start (:meth:`Settings.trigger_problem`), for ``run``
    and ``doctor``; commands that read only some sections (``bundle install`` its ``[model]``) leave it out.
    ``missing_hint`` ends the error when a required field is missing that nothing gave (what to give instead).

    Relative paths in the file are taken relative to the file's folder; relative paths given in the
    environment or on the command line are taken relative to the working directory.
    """
    tree: dict = {}
    origins: dict = {}
    cfg_path = Path(config) if config else None
    if cfg_path is not None:
        if not cfg_path.is_file():
            raise InputError(f"{cfg_path}: config file not found")
        try:
            # utf-8-sig: a byte-order mark (Notepad and other Windows editors write one) is not TOML, and
            # tomllib refused it as "Invalid statement (at line 1, column 1)"
            tree = tomllib.loads(cfg_path.read_text("utf-8-sig"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{cfg_path}: unreadable ({exc})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{cfg_path}: not valid TOML ({exc})") from exc
    file_paths = _relative_file_paths(tree)
    # the [mqtt] fields the file itself gives: an error about another one does not blame the file
    file_mqtt = set(tree["mqtt"]) if isinstance(tree.get("mqtt"), dict) else set()
    mqtt_given = []  # origins of [mqtt] fields given after (over) the latest mqtt.enabled
    for path, value, origin in list(env_overrides(environ)) + list(overrides):
        _set_path(tree, path, value, origin, origins)
        file_paths.discard(tuple(path))
        if path[0] == "mqtt":
            mqtt_given = [] if path[1:] == ["enabled"] else mqtt_given + [f"{'.'.join(path)} [from {origin}]"]
    # the [mqtt] paths the file gives relative, as given: read from its folder (edge-ad before 53e6b29 read them
    # from the working directory): an error about one says so, and the outbox's old place is looked at
    mqtt_relative = {key: tree["mqtt"][key] for sec, key in file_paths if sec == "mqtt"}
    # [mqtt] is a plain table checked by MqttSettings (its TLS files must exist): resolve its paths first
    for sec, key in sorted(p for p in file_paths if p[0] == "mqtt"):
        tree["mqtt"][key] = str(cfg_path.resolve().parent / tree["mqtt"][key])
        file_paths.discard((sec, key))
    try:
        s = (schema or Settings).model_validate(tree)
    except ValidationError as exc:
        raise InputError(_format_errors(exc, origins, cfg_path, schema=schema or Settings,
                                        missing_hint=missing_hint)) from None
    if mqtt_given and not s.mqtt_enabled:
        # a --mqtt-url that the file's enabled = false would silently drop
        where = origins.get(("mqtt", "enabled"), cfg_path or "defaults")
        raise InputError(f"{cfg_path or 'config'}: invalid config: {', '.join(mqtt_given)} given but "
                         f"mqtt.enabled = false [from {where}]: give --set mqtt.enabled=true as well to run with "
                         "MQTT, or leave the override out to run without")
    if s.mqtt is not None:
        _check_mqtt_keys(s.mqtt, origins, cfg_path)   # a typo is one with enabled = false too
        from .mqtt.settings import ENV_COMMAND_SECRET

        if "command_secret" not in s.mqtt and ENV_COMMAND_SECRET in os.environ:
            # MqttSettings reads it itself: an error about it names the variable, not the config file
            origins[("mqtt", "command_secret")] = f"environment variable {ENV_COMMAND_SECRET}"
        try:
            s.mqtt_settings()
        except ValidationError as exc:
            raise InputError(_format_errors(exc, origins, cfg_path, prefix=("mqtt",))) from None
        except InputError as exc:  # MqttSettings names the field itself ("mqtt.url = ...: ...")
            # the origins of the fields the message names, not of every [mqtt] override (an unrelated
            # EDGE_AD_MQTT__PASSWORD would be blamed for an outbox bound in the file), and the file only when
            # it gives one of them (an empty EDGE_AD_MQTT_COMMAND_SECRET was 'from ... or cfg.toml' with no
            # command_secret in cfg.toml)
            named = {str(k[1]) for k in origins if len(k) > 1 and k[0] == "mqtt"} | file_mqtt
            named = {k for k in named if re.search(rf"\b{re.escape(k)}\b", str(exc))}
            where = sorted({str(origins[("mqtt", k)]) for k in named if ("mqtt", k) in origins})
            if cfg_path is not None and any(("mqtt", k) not in origins for k in named):
                where.append(str(cfg_path))
            src = f" [from {' or '.join(where or [str(cfg_path or 'defaults')])}]"
            rel = sorted(k for k in mqtt_relative if re.search(rf"\bmqtt\.{k} = [^;]*?: does not exist", str(exc)))
            if rel:   # a file not found where an older edge-ad found it (the working directory)
                given = ", ".join(f"{k} = {mqtt_relative[k]!r}" for k in rel)
                src = (f" ({given} in {cfg_path}: a relative path in the config file is read from the file's folder, "
                       f"{cfg_path.resolve().parent}, not from the working directory){src}")
            raise InputError(f"{cfg_path or 'config'}: invalid config: {exc}{src}") from None
    if for_run and not isinstance(s, CaptureSettings):   # what run would refuse at start
        why = s.trigger_problem(lambda field: _where(tuple(field.split(".")), origins, cfg_path))
        if why is not None:
            raise InputError(f"{cfg_path or 'config'}: invalid config: {why}")
    base = cfg_path.resolve().parent if cfg_path is not None else None
    # only paths that came from the file are relative to the file
    s = _resolve_file_paths(s, base, file_paths)
    s._config_dir = base
    s._config_file = cfg_path
    s._outbox_given = mqtt_relative.get("outbox_path")
    return s


_PATH_FIELDS = (("model", "bundle"), ("model", "deploy_dir"), ("model", "golden_dir"), ("model", "update_key"),
                ("output", "jsonl"), ("output", "snapshots_dir"), ("telemetry", "path"))


_MQTT_PATH_FIELDS = (("mqtt", "ca_file"), ("mqtt", "cert_file"), ("mqtt", "key_file"), ("mqtt", "outbox_path"))


def _relative_file_paths(tree: dict) -> set:
    out = set()
    for sec, key in _PATH_FIELDS + _MQTT_PATH_FIELDS + (("source", "uri"),):
        v = tree.get(sec, {}).get(key) if isinstance(tree.get(sec), dict) else None
        if isinstance(v, str) and v and not Path(v).is_absolute():
            out.add((sec, key))  # source.uri: resolve_relative leaves all but a relative file/dir path alone
    return out


def _resolve_file_paths(s: Settings, base: Path | None, which: set) -> Settings:
    if base is None:
        return s
    from .runtime.sources import resolve_relative

    for sec, key in which:
        section = getattr(s, sec)
        p = getattr(section, key)
        if (sec, key) == ("source", "uri"):
            section.uri = resolve_relative(p, base)
        elif p is not None and not Path(p).is_absolute():
            setattr(section, key, base / p)
    return s
