"""MQTT settings: the broker connection (URL, credentials, TLS) and what the device link adds to it.

Built once (from the config file, the CLI or code) and passed down; nothing here reads the environment
at import time. Credentials come from the settings or, when absent there, from ``EDGE_AD_MQTT_USERNAME``
/ ``EDGE_AD_MQTT_PASSWORD`` (and the command secret from ``EDGE_AD_MQTT_COMMAND_SECRET``), read when a
settings object is built. They are never logged: :func:`redact_url` strips them from any URL shown.
"""

from __future__ import annotations

import contextvars
import enum
import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from ..errors import InputError
from .topics import string_problem

ENV_USERNAME = "EDGE_AD_MQTT_USERNAME"
ENV_PASSWORD = "EDGE_AD_MQTT_PASSWORD"
ENV_COMMAND_SECRET = "EDGE_AD_MQTT_COMMAND_SECRET"

_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("edge_ad_mqtt_settings_where", default="mqtt")
SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True), "ssl": (8883, True)}
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")   # fullmatch: '$' would let a trailing newline through


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a site or device name (``mqtt.site``, ``mqtt.device``), else None."""
    if isinstance(value, str) and _NAME_RE.fullmatch(value):
        return None
    return f"{value!r} is not a topic-safe name: expected 1-64 of A-Z a-z 0-9 _ . -"


def check_name(value: object, what: str) -> str:
    """``value`` if it can be a site or device name (:func:`name_problem`, the rule of ``mqtt.site`` and
    ``mqtt.device``), else InputError naming ``what`` (e.g. ``--site``) and the value: a name no device can have
    (``'plant 1'``, ``'café'``) is refused at once instead of being waited for."""
    why = name_problem(value)
    if why is not None:
        raise InputError(f"{what} {why}")
    return value  # type: ignore[return-value]


def prefix_problem(value: object) -> str | None:
    """Why ``value`` cannot be a topic prefix (``mqtt.homeassistant_prefix``), else None."""
    if (isinstance(value, str) and value and not any(c in value for c in "+#") and not value.startswith("/")
            and not value.endswith("/") and string_problem(value) is None):
        return None
    return (f"{value!r} is not a topic prefix: no wildcards, no leading or trailing '/', no control characters or "
            "non-characters")


def client_id_problem(value: object) -> str | None:
    """Why ``value`` cannot be an MQTT client id (``mqtt.client_id``), else None."""
    why = "is not a string" if not isinstance(value, str) else string_problem(value)
    if why is None and not 0 < len(value.encode("utf-8")) <= 128:
        why = f"is {len(value.encode('utf-8'))} bytes long"
    if why is None:
        return None
    return f"{value!r} {why}: expected 1..128 bytes of UTF-8 without control characters or non-characters"


class Protocol(str, enum.Enum):
    """MQTT protocol version. ``5`` is the default; ``3.1.1`` is for brokers that lack v5 (amqtt):
    command replies then travel by the ``reply_to`` / ``correlation_id`` fields of the command payload."""

    V5 = "5"
    V311 = "3.1.1"


class SyncMode(str, enum.Enum):
    """SQLite ``synchronous`` level of the outbox. ``full`` survives a power cut (an fsync per write,
    about 0.3 ms here); ``normal`` survives a killed process but may lose the last writes on power loss."""

    FULL = "full"
    NORMAL = "normal"


def redact_url(url: str) -> str:
    """``url`` with any user name and password removed (for logs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:                      # a bad port is reported elsewhere; keep it out of the way here
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, parts.fragment))


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _env_secret(name: str) -> SecretStr | None:
    value = _env(name)
    return SecretStr(value) if value is not None else None


class _FromEnv(str):
    """The text of ``$EDGE_AD_MQTT_COMMAND_SECRET``, marked so that an error names the variable, not a field
    of the config."""


def _env_command_secret() -> str | None:
    """``$EDGE_AD_MQTT_COMMAND_SECRET`` when it is set, even to an empty text (refused by the field's check):
    unlike the user name and password, an empty secret is never taken as "not set"."""
    value = os.environ.get(ENV_COMMAND_SECRET)
    return _FromEnv(value) if value is not None else None


SHORT_SECRET = 16   # characters: a shorter command secret is taken, with a WARNING when the link starts


def _format_validation_error(exc: ValidationError, where: str) -> str:
    """``where.field = value: message`` per error (``where: message`` for one about several fields; no value for
    a secret, a table or a field not given)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
        value = err.get("input")
        if loc == "url" and isinstance(value, str):
            value = redact_url(value)
        field = f"{where}.{loc}" if loc else where
        if loc and "input" in err and loc not in ("password", "command_secret") and value is not None \
                and not isinstance(value, dict):
            lines.append(f"{field} = {value!r}: {msg}")
        else:
            lines.append(f"{field}: {msg}")
    return "; ".join(lines)


class BrokerSettings(BaseModel):
    """How to reach the broker. Shared by the device link, the fleet monitor and the command client."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    url: str = Field("mqtt://127.0.0.1:1883", title="Broker URL: mqtt://host[:port] or mqtts://host[:port]")
    username: str | None = Field(None, title="User name (else the URL's, else $EDGE_AD_MQTT_USERNAME)")
    password: SecretStr | None = Field(None, title="Password (else the URL's, else $EDGE_AD_MQTT_PASSWORD)")
    ca_file: Path | None = Field(None, title="CA certificate (PEM) that signed the broker's certificate")
    cert_file: Path | None = Field(None, title="Client certificate (PEM), for brokers that require one")
    key_file: Path | None = Field(None, title="Client private key (PEM)")
    tls_insecure: bool = Field(False, title="Skip the broker host name check (testing only)")
    protocol: Protocol = Field(Protocol.V5, title="MQTT protocol: 5 or 3.1.1")
    keepalive_s: int = Field(30, ge=5, le=3600, title="Keep-alive interval (s)")
    reconnect_min_s: float = Field(1.0, gt=0, le=60, title="First reconnect delay (s); doubles up to the max")
    reconnect_max_s: float = Field(60.0, gt=0, le=3600, title="Longest reconnect delay (s)")
    connect_timeout_s: float = Field(10.0, gt=0, le=300, title="TCP/TLS connect timeout (s)")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InputError(_format_validation_error(exc, _WHERE.get())) from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "mqtt"):
        """Build from a config table; errors (:class:`InputError`) name ``where.field``."""
        token = _WHERE.set(where)
        try:
            return cls(**dict(data))
        finally:
            _WHERE.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _env_credentials(cls, data: Any) -> Any:
        """The environment's user name and password, only where neither the fields nor the URL give one
        (a URL with alice's user info keeps alice's name, whatever the environment says). An empty one is
        not given (``username = ""``, ``EDGE_AD_MQTT__USERNAME=``), as for every optional field: never an
        empty name or password sent to the broker."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for k in ("username", "password"):
            v = data.get(k)
            if isinstance(v, SecretStr):
                v = v.get_secret_value()
            if isinstance(v, str) and v.strip() == "":
                data[k] = None
        try:
            in_url = urlsplit(str(data.get("url", ""))).username is not None
        except ValueError:
            in_url = False
        if data.get("username") is None and not in_url:
            data["username"] = _env(ENV_USERNAME)
        if data.get("password") is None and not in_url:
            data["password"] = _env_secret(ENV_PASSWORD)
        return data

    @field_validator("ca_file", "cert_file", "key_file", "client_id", "outbox_path", "command_clients",
                     mode="before", check_fields=False)   # the last three: MqttSettings's
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        """An empty text is "not set" (``--set mqtt.outbox_path=`` removes the file's value: the default
        path, not '.')."""
        return None if isinstance(v, str) and v.strip() == "" else v

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, v: Any) -> Any:
        """``protocol = 5`` as docs/mqtt.md writes it (a TOML number, or ``--set mqtt.protocol=5``) is "5"."""
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 5:
            return "5"
        return v.strip() if isinstance(v, str) else v

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a valid broker URL ({exc}); expected mqtt://host[:port] or mqtts://host[:port]")
        if parts.scheme not in SCHEMES:
            raise ValueError(f"scheme '{parts.scheme}': expected one of mqtt://, mqtts:// (or tcp://, ssl://)")
        if not parts.hostname:
            raise ValueError("no host; expected mqtt://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a broker URL has no path, query or fragment; expected mqtt://host[:port]")
        if port == 0:
            raise ValueError("port 0; expected 1..65535")
        return v

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _is_file(cls, v: Path | None) -> Path | None:
        """Each TLS file exists: checked per field, so that the error names it (``mqtt.ca_file = ...``)."""
        if v is not None and not Path(v).is_file():
            raise ValueError("does not exist or is not a file")
        return v

    @field_validator("key_file")
    @classmethod
    def _key_with_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        """A client certificate and its key come together (checked on key_file, validated after cert_file)."""
        if "cert_file" not in info.data:    # cert_file failed its own check, which names it
            return v
        if info.data["cert_file"] is not None and v is None:
            raise ValueError("not set, but cert_file is: a client certificate needs its key")
        if info.data["cert_file"] is None and v is not None:
            raise ValueError("set, but cert_file is not: a client key needs its certificate")
        return v

    @model_validator(mode="after")
    def _check_reconnect(self):
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s {self.reconnect_max_s} < reconnect_min_s {self.reconnect_min_s}")
        return self

    def __repr_args__(self):
        for key, value in super().__repr_args__():
            yield key, (redact_url(value) if key == "url" and isinstance(value, str) else value)

    # ------------------------------------------------------------------ derived
    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or SCHEMES[parts.scheme][0]

    @property
    def tls(self) -> bool:
        return SCHEMES[urlsplit(self.url).scheme][1]

    @property
    def safe_url(self) -> str:
        """The URL without credentials, for logs."""
        return redact_url(self.url)

    def credentials(self) -> tuple[str | None, str | None]:
        """(user name, password): explicit fields first, then the URL's user info, then the environment
        (folded into the fields when the settings were built, only when the URL has no user info)."""
        parts = urlsplit(self.url)
        user = self.username
        password = self.password.get_secret_value() if self.password is not None else None
        if user is None and parts.username:
            user = unquote(parts.username)
        if password is None and parts.password:
            password = unquote(parts.password)
        return user, password


class MqttSettings(BrokerSettings):
    """Settings of one device's link (:class:`edge_ad.mqtt.MqttLink`)."""

    site: str = Field("site", title="Site (plant / line) name: topic level, [A-Za-z0-9_.-]")
    device: str = Field("dev", title="Device name: topic level, [A-Za-z0-9_.-]")
    client_id: str | None = Field(None, title="MQTT client id (default edge-ad-<site>-<device>); keep it stable")
    session_expiry_s: int = Field(3600, ge=0, le=0xFFFFFFFE, title="Broker keeps the session this long offline")
    outbox_path: Path | None = Field(None, title="SQLite outbox (default $XDG_STATE_HOME/edge-ad/outbox-<site>-<device>.sqlite)")
    outbox_max_messages: int = Field(100_000, ge=1, title="Outbox bound: messages (oldest dropped first)")
    outbox_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, title="Outbox bound: payload bytes")
    outbox_sync: SyncMode = Field(SyncMode.FULL, title="Outbox durability: full (power-cut safe) or normal")
    inflight_window: int = Field(64, ge=1, le=10_000, title="Unacknowledged QoS 1 messages in flight at most")
    image_min_interval_s: float = Field(1.0, ge=0, le=86_400, title="At most one event JPEG per this many seconds")
    image_max_bytes: int = Field(2 * 1024 * 1024, ge=1024, title="Larger event JPEGs are not sent")
    image_topic_event_id: bool = Field(False, title="Publish each event JPEG on event/image/<event id> instead of "
                                                    "event/image (MQTT 3.1.1 consumers match it to its event by topic)")
    command_clients: list[str] | None = Field(None, title="Allow-list of requester client ids for state-changing commands")
    command_secret: SecretStr | None = Field(default_factory=_env_command_secret,
                                             title="Shared secret: state-changing commands need an HMAC-SHA256")
    command_auth_all: bool = Field(False, title="Apply the allow-list / HMAC to read-only commands as well")
    command_max_skew_s: float = Field(300.0, gt=0, le=86_400, title="Signed commands: accepted clock difference (s)")
    command_queue: int = Field(16, ge=1, le=1000, title="Commands waiting at most; more get a 'busy' reply")
    homeassistant: bool = Field(False, title="Publish Home Assistant MQTT discovery configs")
    homeassistant_prefix: str = Field("homeassistant", title="Home Assistant discovery prefix")
    validate_payloads: bool = Field(False, title="Check every outgoing payload against its schema (tests)")

    @model_validator(mode="after")
    def _check_image_fits(self):
        if self.image_max_bytes > self.outbox_max_bytes:
            raise ValueError(f"image_max_bytes {self.image_max_bytes} > outbox_max_bytes {self.outbox_max_bytes}: "
                             "an event image must fit in the outbox (expected image_max_bytes <= outbox_max_bytes)")
        return self

    @field_validator("command_secret", mode="before")
    @classmethod
    def _check_secret(cls, v: Any) -> Any:
        """An empty or blank secret is refused, wherever it came from (``command_secret = ""`` of a templated
        config, ``EDGE_AD_MQTT_COMMAND_SECRET=`` in an env file): taken as is, every command would be signed
        with an empty key that anyone can sign with; taken as "not set", signing would silently be off. Not
        setting it at all is how commands go unsigned."""
        text = v.get_secret_value() if isinstance(v, SecretStr) else v
        if isinstance(text, str) and text.strip() == "":
            where = f"${ENV_COMMAND_SECRET} is set but" if isinstance(v, _FromEnv) else "it is"
            remove = (f"unset {ENV_COMMAND_SECRET}" if isinstance(v, _FromEnv) else
                      "remove the field (an empty override does not unset this one)") + \
                " to take commands without a signature"
            raise ValueError(f"{where} {'empty' if not text else 'blank'}: commands would be signed with an empty "
                             "key that anyone can use; expected a long random text (openssl rand -hex 32), or "
                             f"{remove}")
        return str(text) if isinstance(text, _FromEnv) else v

    @field_validator("site", "device")
    @classmethod
    def _check_name(cls, v: str) -> str:
        why = name_problem(v)
        if why is not None:
            raise ValueError(why)
        return v

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, v: str | None) -> str | None:
        why = None if v is None else client_id_problem(v)
        if why is not None:
            raise ValueError(why)
        return v

    @field_validator("homeassistant_prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        why = prefix_problem(v)
        if why is not None:
            raise ValueError(why)
        return v

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edge-ad-{self.site}-{self.device}"

    @property
    def effective_outbox_path(self) -> Path:
        if self.outbox_path is not None:
            return Path(self.outbox_path)
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return Path(state) / "edge-ad" / f"outbox-{self.site}-{self.device}.sqlite"
