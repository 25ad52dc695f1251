"""MQTT reporting: a store-and-forward link per device, remote commands, a fleet monitor.

::

    from edge_ad.mqtt import MqttLink, MqttSettings
    link = MqttLink(MqttSettings(url="mqtts://broker:8883", site="plant1", device="line3",
                                 ca_file="ca.pem"), birth={"model_hash": h, "calibration_version": 4})
    link.register_command("pause", lambda args: runtime.pause(args.get("reason")))
    link.start()                           # returns at once; connects and reconnects in the background
    link.publish_result({"score": 0.42, "ng": False, "threshold": 0.5})   # outbox write only
    link.stop()

Modules: :mod:`settings` (MqttSettings, BrokerSettings), :mod:`link` (MqttLink), :mod:`outbox` (SQLite
store-and-forward), :mod:`commands` (dispatch, HMAC, allow-list), :mod:`schema` (payload schemas),
:mod:`monitor` (fleet view), :mod:`homeassistant` (discovery), :mod:`requester` (send a command),
:mod:`collector` (de-duplicating subscriber), :mod:`decommission` (take a stopped device off the broker),
:mod:`broker` (a local Mosquitto for tests and demos).
"""

from .commands import COMMANDS, STATE_CHANGING, CommandError, sign
from .link import MqttLink
from .outbox import Outbox
from .settings import BrokerSettings, MqttSettings, Protocol, SyncMode, redact_url
from .topics import ROOT, Topics

__all__ = ["COMMANDS", "STATE_CHANGING", "CommandError", "sign", "MqttLink", "Outbox", "BrokerSettings",
           "MqttSettings", "Protocol", "SyncMode", "redact_url", "ROOT", "Topics"]
