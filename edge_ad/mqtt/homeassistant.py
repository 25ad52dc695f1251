"""Home Assistant MQTT discovery: retained ``<prefix>/<component>/<node>/<object>/config`` messages.

With ``homeassistant = true`` the link publishes these on every connect, so the device shows up in a
Home Assistant that already watches the broker: online (connectivity), fps, latency p99, NG rate,
outbox depth, drift (problem) and calibration version. Entities read the low-rate ``telemetry``,
``status`` and ``calibration`` topics only (not every result), and are unavailable while the device's
status is ``offline``. An empty retained payload on the same topics removes them (:func:`removal`;
``edge-ad decommission`` clears them with the device's other retained topics).
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

from .. import __version__
from . import payloads
from .settings import MqttSettings
from .topics import Topics

# (component, object id, name, topic kind, value template, extra config). A value the message lacks (no frame
# inspected in the interval: paused, an idle trigger line, a camera outage send ``latency_ms: {}``) renders
# ``None``, which Home Assistant shows as *unknown*: a template that fails is logged by Home Assistant at
# every message and leaves the entity at its last value, which looks healthy. Every value is tested
# before it is read or rounded (Home Assistant's ``round`` refuses anything but a number).
_ENTITIES: tuple[tuple[str, str, str, str, str, dict], ...] = (
    ("binary_sensor", "online", "Online", "status",
     "{{ 'ON' if value_json.state == 'online' else 'OFF' }}", {"device_class": "connectivity"}),
    ("sensor", "fps", "Frames per second", "telemetry",
     "{{ value_json.fps | round(2) if value_json.fps is number else None }}",
     {"unit_of_measurement": "fps", "state_class": "measurement"}),
    ("sensor", "latency_p99", "Latency p99", "telemetry",
     "{{ value_json.latency_ms.p99 | round(1) if value_json.latency_ms is mapping"
     " and value_json.latency_ms.p99 is number else None }}",
     {"unit_of_measurement": "ms", "state_class": "measurement", "device_class": "duration"}),
    ("sensor", "ng_rate", "NG rate", "telemetry",
     "{{ (value_json.ng_rate * 100) | round(2) if value_json.ng_rate is number else None }}",
     {"unit_of_measurement": "%", "state_class": "measurement"}),
    ("sensor", "outbox_depth", "Outbox depth", "telemetry",
     "{{ value_json.outbox.depth if value_json.outbox is mapping and value_json.outbox.depth is number"
     " else None }}",
     {"state_class": "measurement", "entity_category": "diagnostic"}),
    ("binary_sensor", "drift", "Drift", "telemetry",
     "{{ ('ON' if value_json.drift.drift else 'OFF') if value_json.drift is mapping"
     " and value_json.drift.drift is boolean else None }}",
     {"device_class": "problem"}),
    ("sensor", "calibration_version", "Calibration version", "calibration",
     "{{ value_json.version if value_json.version is number else None }}", {"entity_category": "diagnostic"}),
)


def node_id(site: str, device: str) -> str:
    """``edge_ad_<site>_<device>_<6 hex>``: readable, and unique per site/device even where the readable
    part is not (``p1/line3_cam1`` and ``p1_line3/cam1`` both read ``edge_ad_p1_line3_cam1``)."""
    tag = hashlib.sha256(f"{site}/{device}".encode("utf-8")).hexdigest()[:6]
    return re.sub(r"[^a-zA-Z0-9_-]", "_", f"edge_ad_{site}_{device}") + f"_{tag}"


def _topic(topics: Topics, kind: str) -> str:
    return {"status": topics.status, "telemetry": topics.telemetry, "calibration": topics.calibration}[kind]


def discovery(settings: MqttSettings, birth: Mapping | None = None) -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery config for this device (publish retained, QoS 1)."""
    topics = Topics(settings.site, settings.device)
    node = node_id(settings.site, settings.device)
    birth = birth or {}
    device = {
        "identifiers": [node],
        "name": f"edge-ad {settings.site}/{settings.device}",
        "manufacturer": "edge_ad",
        "model": str(birth.get("model_kind") or "visual anomaly inspection"),
        "sw_version": str(birth.get("version") or __version__),
    }
    out = []
    for component, obj, name, kind, template, extra in _ENTITIES:
        config = {
            "name": name,
            "unique_id": f"{node}_{obj}",
            "state_topic": _topic(topics, kind),
            "value_template": template,
            "device": device,
            "origin": {"name": "edge_ad", "sw_version": __version__},
            **extra,
        }
        if kind != "status":
            config.update({"availability_topic": topics.status,
                           "availability_template": "{{ value_json.state }}",
                           "payload_available": "online", "payload_not_available": "offline"})
        if component == "binary_sensor":
            config.update({"payload_on": "ON", "payload_off": "OFF"})
        topic = f"{settings.homeassistant_prefix}/{component}/{node}/{obj}/config"
        out.append((topic, payloads.encode(config, "homeassistant discovery")))
    return out


def removal(settings: MqttSettings) -> list[str]:
    """Topics to clear (publish an empty retained payload) to remove the device from Home Assistant."""
    return [topic for topic, _ in discovery(settings)]
