"""Topic names. Everything a device publishes or receives lives under ``edge-ad/v1/<site>/<device>/``.

================  =====  ========  ==================================================================
topic             QoS    retained  payload
================  =====  ========  ==================================================================
status            1      yes       birth (``online``) on every connect; last will / stop: ``offline``
result            1      no        one per inspected frame or part (outbox; unique ``id``, ``seq``)
event             1      no        NG events (outbox)
event/image       1      no        JPEG (binary) belonging to an event, rate-limited (outbox); with
                                   ``image_topic_event_id``: ``event/image/<event id>`` (:func:`image_level`)
telemetry         0      no        periodic fps, latency, drops, outbox depth, drift, ...
calibration       1      yes       the calibration in force
cmd/<name>        1      no        commands in; the reply goes to the v5 response topic
reply/<name>      1      no        replies to commands that named no response topic, or one refused
                                   (:func:`reply_topic_problem`: e.g. one under ``edge-ad/v1/`` that is
                                   not this device's ``reply/...``)
================  =====  ========  ==================================================================
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Iterable

from ..errors import InputError

ROOT = "edge-ad/v1"
MAX_REPLY_TOPIC_BYTES = 1024   # a reply topic a requester names (MQTT allows 65535; none needs more than this)
MAX_LEVEL_BYTES = 256          # one level of a topic the device publishes to: a site, a device, an event id
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
        """``event/image/<level>``: the image topic of one event (``image_topic_event_id``), ``<level>`` being
        :func:`image_level` of its id."""
        return f"{self.event_image}/{image_level(event_id)}"

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
    """``value`` if it can be one topic level (a site, a device, a command name: :func:`level_problem`); else
    InputError naming ``what`` and saying why."""
    why = level_problem(value)
    if why is not None:
        raise InputError(f"{what} {value!r} {why}; expected one topic level (UTF-8 without '/', '+', '#', control "
                         f"characters or non-characters, at most {MAX_LEVEL_BYTES} bytes)")
    return value


def level_problem(value: object) -> str | None:
    """Why ``value`` cannot be one topic level, else None. A '/' would publish to another topic, '+' and '#' are
    wildcards a publish may not carry, and a broker closes the connection for a control character or a
    non-character (:func:`_text_problem`, as for a reply topic); at most :data:`MAX_LEVEL_BYTES` bytes."""
    if not isinstance(value, str):
        return "is not a string"
    if not value:
        return "is empty"
    why = _text_problem(value, MAX_LEVEL_BYTES)
    if why is None and any(c in value for c in "/+#"):
        why = "holds '/' (a level separator) or a wildcard ('+' or '#')"
    return why


def image_level(event_id: str) -> str:
    """The topic level an event's image goes to (``event/image/<level>``, ``image_topic_event_id``): the event id
    itself when it can be one topic level (:func:`level_problem`, as the runtime's UUIDs can); else
    ``sha256-`` and the first 32 hex digits of the sha256 of its UTF-8 form, so that no event id, whoever gives
    it, makes a topic the broker closes the connection for or paho refuses. The event's ``image.topic`` names
    the topic either way."""
    if level_problem(event_id) is None:
        return event_id
    return "sha256-" + hashlib.sha256(str(event_id).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _refused_char(c: str) -> bool:
    """A character a broker closes the connection for in a topic name (Mosquitto does, as MQTT 4.7.3 and 1.5.4
    allow): NUL and the other control characters (U+0001-U+001F, U+007F-U+009F) and Unicode non-characters."""
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def string_problem(text: str) -> str | None:
    """Why ``text`` cannot be an MQTT string a broker takes (a topic name, a v5 user property): a character it
    closes the connection for (:func:`_refused_char`), or no UTF-8 form; else None."""
    bad = next((c for c in text if _refused_char(c)), None)
    if bad is not None:
        kind = "NUL" if bad == "\0" else "a control character" if ord(bad) <= 0x9F else "a Unicode non-character"
        return f"holds {kind} (U+{ord(bad):04X}), which a broker closes the connection for"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate): it has no UTF-8 form"
    return None


def _text_problem(text: str, max_bytes: int) -> str | None:
    """:func:`string_problem`, or more than ``max_bytes`` bytes (UTF-8); else None."""
    why = string_problem(text)
    if why is None and len(text.encode("utf-8")) > max_bytes:
        why = f"is {len(text.encode('utf-8'))} bytes long (UTF-8), more than {max_bytes}"
    return why


def reply_topic_problem(topic: object, own: Topics | None = None) -> str | None:
    """Why ``topic`` (a command's v5 response topic or payload ``reply_to``, from anyone who may publish to
    ``cmd/#``) cannot be published to, else None. A reply published to such a topic costs the device its
    connection: the broker closes it for a NUL or control character, a non-character or a '$SYS/...' topic
    (where clients may not publish), paho refuses wildcards and topics over 65535 bytes, and paho sends a QoS 1
    reply again after every reconnect. Expected: UTF-8 without NUL, control characters or non-characters, no
    '+' or '#', not starting with '$', at most :data:`MAX_REPLY_TOPIC_BYTES` bytes.

    Nor a topic under ``edge-ad/v1/`` (:data:`ROOT`) but the ``reply/...`` topics of ``own`` (the device
    answering; None: none): the device publishes its reply with its own credentials, so a reply to
    ``edge-ad/v1/p1/cam2/cmd/pause`` would be a command to that device (to its own ``cmd/...``: one it runs
    itself), and one to another device's ``result`` or ``status`` would pass for that device's message.
    Requesters take their replies outside it (``edge-ad command``: ``edge-ad/replies/<client id>``)."""
    if not isinstance(topic, str):
        return "is not a string"
    if not topic:
        return "is empty"
    why = _text_problem(topic, MAX_REPLY_TOPIC_BYTES)
    if why is None and ("+" in topic or "#" in topic):
        why = "holds a wildcard ('+' or '#'), which a message cannot be published to"
    if why is None and topic.startswith("$"):
        why = "starts with '$' (topics such as $SYS/... belong to the broker: clients may not publish there)"
    if why is None and topic.startswith(f"{ROOT}/") and not (
            own is not None and topic.startswith(own.reply("")) and topic != own.reply("")):
        why = (f"is under {ROOT}/, where the devices' status, results, events and commands go: the reply would "
               "pass for a message of the device or a command to it")
    return why


def fleet_filter(site: str | None = None) -> str:
    """Subscription filter for every device (of one site, when given)."""
    return f"{ROOT}/{site or '+'}/+/#"


def status_filter() -> str:
    """Subscription filter for the ``status`` of every device (the retained ones say which devices exist)."""
    return f"{ROOT}/+/+/status"


KNOWN_SHOWN = 20   # devices named by known_devices_text at most (the closest ones are named apart)


def known_devices_text(site: str, device: str, status_topics: Iterable[str]) -> str:
    """For ``site``/``device``, of which no retained status was found: the devices that have one (the topics of
    the retained statuses read under :func:`status_filter`), with the closest named as a guess, or that there
    are none, so a mistyped site or device shows."""
    names = sorted({f"{p[0]}/{p[1]}" for p in map(parse, status_topics) if p is not None and p[2] == "status"})
    if not names:
        return f"no device has a retained status under {ROOT}/ that this login can read"
    shown = ", ".join(names[:KNOWN_SHOWN]) + (f" and {len(names) - KNOWN_SHOWN} more" if len(names) > KNOWN_SHOWN
                                               else "")
    guess = _guesses(site, device, names)
    return (f"the devices with a retained status under {ROOT}/ are {shown}"
            + (f" (did you mean {' or '.join([', '.join(guess[:-1]), guess[-1]] if guess[1:] else guess)}?)"
               if guess else ""))


def _guesses(site: str, device: str, names: list[str]) -> list[str]:
    """The known ``site/device`` names a mistyped one most likely meant, at most three: a typo is in one of the
    two parts, so the devices of the same site whose names are close, then the same device under another site;
    else the whole name, closer than a short one's common letters make it (``p9/cam9`` is not ``p1/cam2``)."""
    pairs = [n.split("/", 1) for n in names]
    guess = [f"{site}/{d}" for d in difflib.get_close_matches(device, [d for s, d in pairs if s == site], 3, 0.6)]
    guess += [f"{s}/{device}" for s in difflib.get_close_matches(site, [s for s, d in pairs if d == device], 3, 0.0)]
    return guess[:3] or difflib.get_close_matches(f"{site}/{device}", names, n=3, cutoff=0.8)


def parse(topic: str) -> tuple[str, str, str] | None:
    """``edge-ad/v1/<site>/<device>/<kind...>`` -> (site, device, kind), or None for other topics."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/", 2)
    if len(parts) < 3 or not parts[0] or not parts[1] or not parts[2]:
        return None
    return parts[0], parts[1], parts[2]
