"""Send a command to a device and wait for its reply (``edge-ad command``, tests, plant tools).

The request names its reply topic (``edge-ad/replies/<client id>``) and a correlation id in the payload
fields ``reply_to`` and ``correlation_id``, and under MQTT v5 also as its response topic and correlation data
(the same values): a v5 device answers on the response topic with the correlation data (the property wins
over the field), a device that speaks 3.1.1 on a v5 broker sees no properties and answers on ``reply_to``
with ``correlation_id`` in the reply; either way the reply comes where this client listens. MQTT v5: the
request also carries a message expiry equal to the reply timeout (rounded up, at least 1 s), so a command
the broker could not deliver in that time (the device is offline) is dropped instead of running when the
device comes back, and the device does not start one that waited that long behind another command
(``expired``); MQTT 3.1.1 has no expiry. The requester id (``claim``) is the payload field ``client_id``
(and, v5, the user property). With a shared secret the payload gets ``ts`` and is sent in the signed form
(``{"signed": ..., "hmac-sha256": ...}``), which devices read whatever their protocol.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any, Mapping

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..errors import InputError, RuntimeFailure
from . import payloads
from .client import connect_async, make_client, reason_failed
from .commands import signed_envelope
from .settings import BrokerSettings, Protocol
from .topics import Topics, check_level

REPLY_ROOT = "edge-ad/replies"


def expiry_s(timeout: float) -> int:
    """The message expiry (MQTT v5) of a request whose reply is awaited ``timeout`` s: at least 1 s."""
    return max(1, math.ceil(timeout))


class CommandClient:
    def __init__(self, broker: BrokerSettings, *, client_id: str | None = None, secret: str | None = None):
        self.broker = broker
        self.client_id = client_id or f"edge-ad-cli-{uuid.uuid4().hex[:10]}"
        self.secret = secret
        self.reply_topic = f"{REPLY_ROOT}/{self.client_id}"
        self._lock = threading.Lock()
        self._waiting: dict[str, threading.Event] = {}
        self._replies: dict[str, dict] = {}
        self._ready = threading.Event()
        self._error: str | None = None
        self._client: paho.Client | None = None

    @property
    def v5(self) -> bool:
        return self.broker.protocol == Protocol.V5

    def start(self, timeout: float = 10.0) -> "CommandClient":
        client = make_client(self.broker, self.client_id, persistent=False, jitter=False)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        connect_async(client, self.broker, clean_start=True)
        client.loop_start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeFailure(f"command client: no connection to {self.broker.safe_url} within {timeout:g} s"
                                 + (f" ({self._error})" if self._error else ""))
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> "CommandClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_failed(reason_code):
            self._error = f"refused: {reason_code}"
            return
        client.subscribe(self.reply_topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._ready.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            body = payloads.decode(message.payload, "reply")
        except InputError:
            return
        key = None
        props = getattr(message, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        if corr is not None:
            key = bytes(corr).decode("utf-8", errors="replace")
        elif isinstance(body, dict) and isinstance(body.get("correlation_id"), str):
            key = body["correlation_id"]
        with self._lock:
            event = self._waiting.get(key) if key is not None else None
            if event is not None:
                self._replies[key] = body
                event.set()

    # ------------------------------------------------------------------ requests
    def build(self, topic: str, name: str, args: Mapping[str, Any] | None, correlation: str,
              claim: str | None = None, timeout: float | None = None) -> tuple[bytes, Properties | None]:
        """The payload and (v5) properties of one request to ``topic`` (``cmd/<name>`` of a device).
        ``timeout``: how long the reply is awaited, the request's message expiry (v5; see :func:`expiry_s`)."""
        body: dict[str, Any] = dict(args or {})
        if self.secret is not None:
            body["ts"] = time.time()
        # in the payload under v5 too: a device configured for 3.1.1 sees no properties (a v5 one reads the
        # properties first; they say the same)
        if claim is not None:
            body["client_id"] = claim
        body["reply_to"] = self.reply_topic
        body["correlation_id"] = correlation
        data = payloads.encode(body, f"cmd/{name} payload")
        if self.secret is not None:     # the signed form: a user property would not reach a 3.1.1 device either
            data = signed_envelope(self.secret, topic, data)
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation.encode("utf-8")
            props.ContentType = "application/json"
            if timeout is not None:
                props.MessageExpiryInterval = expiry_s(timeout)
            if claim is not None:
                props.UserProperty = [("client_id", claim)]
        return data, props

    def call(self, site: str, device: str, name: str, args: Mapping[str, Any] | None = None, *,
             timeout: float = 10.0, claim: str | None = None) -> dict:
        """Send ``cmd/<name>`` to a device; returns its reply (``{"ok": ..., "result" | "error": ...}``).
        ``claim`` is the client id the allow-list sees (default: this client's id)."""
        for value, what in ((site, "site"), (device, "device"), (name, "command name")):
            check_level(value, what)
        corr = uuid.uuid4().hex
        topic = Topics(site, device).cmd(name)
        data, props = self.build(topic, name, args, corr, claim if claim is not None else self.client_id,
                                 timeout=timeout)
        return self.send_raw(topic, data, corr, props, timeout=timeout)

    def _no_reply(self, topic: str, timeout: float) -> str:
        if self.v5:
            offline = (f"offline or busy with another command (the broker drops the command after "
                       f"{expiry_s(timeout)} s, and the device does not start one that waited that long, so it "
                       "will not run late; a device that speaks MQTT 3.1.1 sees no expiry: one it received runs "
                       "when its turn comes)")
        else:
            offline = ("offline or busy with another command (MQTT 3.1.1 has no message expiry: the device runs "
                       "the command when it comes back or when its turn comes)")
        return (f"no reply on {self.reply_topic} to {topic} within {timeout:g} s: the device may be {offline}, "
                "or still running the command it started (calibrate and update_model can take minutes), or the "
                "site / device may be wrong. Check the device's retained status or send 'status' before "
                "resending, or wait longer (--timeout).")

    def send_raw(self, topic: str, data: bytes, correlation: str, properties: Properties | None = None, *,
                 timeout: float = 10.0) -> dict:
        """Publish exactly ``data`` on ``topic`` and wait for the reply correlated by ``correlation``."""
        client = self._client
        if client is None:
            raise RuntimeFailure("command client is not started")
        if self.v5 and properties is None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = self.reply_topic
            properties.CorrelationData = correlation.encode("utf-8")
            properties.MessageExpiryInterval = expiry_s(timeout)
        event = threading.Event()
        with self._lock:
            self._waiting[correlation] = event
        try:
            client.publish(topic, data, qos=1, properties=properties)
            if not event.wait(timeout):
                raise RuntimeFailure(self._no_reply(topic, timeout))
            with self._lock:
                return self._replies.pop(correlation)
        finally:
            with self._lock:
                self._waiting.pop(correlation, None)
