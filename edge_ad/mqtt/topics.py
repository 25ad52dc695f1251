"""Topic names. Everything a device publishes or receives lives under ``edge-ad/v1/<site>/<device>/``.

================  =====  ========  ==================================================================
topic             QoS    retained  payload
================  =====  ========  ==================================================================
status            1      yes       birth (``online``) on every connect; last will / stop: ``offline``
result            1      no        one per inspected frame or part (outbox; unique ``id``, ``seq``)
event             1      no        NG events (outbox)
event/image       1      no        JPEG (binary) belonging to an event, rate-limited (outbox)
telemetry         0      no        periodic fps, latency, drops, outbox depth, drift, ...
calibration       1      yes       the calibration in force
cmd/<name>        1      no        commands in; the reply goes to the v5 response topic
reply/<name>      1      no        replies to commands that named no response topic
================  =====  ========  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

ROOT = "edge-ad/v1"
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
