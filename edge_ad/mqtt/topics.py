"""Topic names. Everything a device publishes or receives lives under ``edge-ad/v1/<site>/<device>/``.

================  =====  ========  ==================================================================
topic             QoS    retained  payload
================  =====  ========  ==================================================================
status            1      yes       birth (``online``) on every connect; last will / stop: ``offline``
result            1      no        one per inspected frame or part (outbox; unique ``id``, ``seq``)
event             1      no        NG events (outbox)
event/image       1      no        JPEG (binary) belonging to an event, rate-limited (outbox); with
                                   ``image_topic_event_id``: ``event/image/<event id>``
telemetry         0      no        periodic fps, latency, drops, outbox depth, drift, ...
calibration       1      yes       the calibration in force
cmd/<name>        1      no        commands in; the reply goes to the v5 response topic
reply/<name>      1      no        replies to commands that named no response topic, or one refused
                                   (:func:`reply_topic_problem`)
================  =====  ========  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

ROOT = "edge-ad/v1"
MAX_REPLY_TOPIC_BYTES = 1024   # a reply topic a requester names (MQTT allows 65535; none needs more than this)
KINDS = ("status", "result", "event", "event/image", "telemetry", "calibration")


@dataclass(frozen=True)
class Topics:
    site: str
    device: str

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.site}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def event(self) -> str:
        return f"{self.base}/event"

    @property
    def event_image(self) -> str:
        return f"{self.base}/event/image"

    def event_image_of(self, event_id: str) -> str:
        """``event/image/<event id>``: the image topic of one event (``image_topic_event_id``)."""
        return f"{self.event_image}/{check_level(event_id, 'event id')}"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def calibration(self) -> str:
        return f"{self.base}/calibration"

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def reply(self, name: str) -> str:
        return f"{self.base}/reply/{name}"


def check_level(value: str, what: str) -> str:
    """``value`` if it can be one topic level (a site, a device, a command name); else InputError naming
    ``what``. A '/' would publish to another topic and '+' / '#' are wildcards a publish may not carry."""
    if not isinstance(value, str) or not value or any(c in value for c in "/+#") or any(ord(c) < 32 for c in value):
        raise InputError(f"{what} {value!r}: expected one topic level (no '/', '+', '#' or control characters)")
    return value


def _refused_char(c: str) -> bool:
    """A character a broker closes the connection for in a topic name (Mosquitto does, as MQTT 4.7.3 and 1.5.4
    allow): NUL and the other control characters (U+0001-U+001F, U+007F-U+009F) and Unicode non-characters."""
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def reply_topic_problem(topic: object) -> str | None:
    """Why ``topic`` (a command's v5 response topic or payload ``reply_to``, from anyone who may publish to
    ``cmd/#``) cannot be published to, else None. A reply published to such a topic costs the device its
    connection: the broker closes it for a NUL or control character, a non-character or a '$SYS/...' topic
    (where clients may not publish), paho refuses wildcards and topics over 65535 bytes, and paho sends a QoS 1
    reply again after every reconnect. Expected: UTF-8 without NUL, control characters or non-characters, no
    '+' or '#', not starting with '$', at most :data:`MAX_REPLY_TOPIC_BYTES` bytes."""
    if not isinstance(topic, str):
        return "is not a string"
    if not topic:
        return "is empty"
    bad = next((c for c in topic if _refused_char(c)), None)
    if bad is not None:
        kind = "NUL" if bad == "\0" else "a control character" if ord(bad) <= 0x9F else "a Unicode non-character"
        return f"holds {kind} (U+{ord(bad):04X}), which a broker closes the connection for"
    if "+" in topic or "#" in topic:
        return "holds a wildcard ('+' or '#'), which a message cannot be published to"
    if topic.startswith("$"):
        return "starts with '$' (topics such as $SYS/... belong to the broker: clients may not publish there)"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate): it has no UTF-8 form"
    if size > MAX_REPLY_TOPIC_BYTES:
        return f"is {size} bytes long (UTF-8), more than {MAX_REPLY_TOPIC_BYTES}"
    return None


def fleet_filter(site: str | None = None) -> str:
    """Subscription filter for every device (of one site, when given)."""
    return f"{ROOT}/{site or '+'}/+/#"


def parse(topic: str) -> tuple[str, str, str] | None:
    """``edge-ad/v1/<site>/<device>/<kind...>`` -> (site, device, kind), or None for other topics."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/", 2)
    if len(parts) < 3 or not parts[0] or not parts[1] or not parts[2]:
        return None
    return parts[0], parts[1], parts[2]
