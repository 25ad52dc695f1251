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

:meth:`CommandClient.last_status` reads the device's retained ``status`` first (``edge-ad command`` does, and
:meth:`~CommandClient.check_online` refuses to send to a device that is offline: :class:`DeviceOffline`); when
there is none, :meth:`~CommandClient.no_status_note` says so and names the devices that have one.
:meth:`CommandClient.call` watches the device's ``status`` while it waits for the reply: when edge-ad stops there
without answering, or comes back after its will as another process (its birth's ``started`` differs: it was
killed or lost power, and restarted), it stops waiting and raises :class:`DeviceWentOffline` (the command's
outcome is unknown), instead of waiting out the timeout for a reply that cannot come. After a will alone it
waits on (a device that only lost its network answers once it reconnects), and a timeout then says the device
went offline meanwhile instead of quoting the status read before sending.
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

from ..errors import DeviceOffline, DeviceWentOffline, InputError, RuntimeFailure
from . import payloads
from .client import connect_async, make_client, not_connected, reason_failed, refused_text
from .commands import signed_envelope
from .settings import BrokerSettings, Protocol, check_name
from .topics import Topics, check_level, known_devices_text, status_filter

REPLY_ROOT = "edge-ad/replies"
STATUS_WAIT_S = 2.0   # the most last_status waits when neither the status nor its marker comes (an ACL)


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
        # subscription filter -> (set at the first message or None, {topic: payload}) of the retained messages
        # _retained reads
        self._watch: dict[str, tuple[threading.Event | None, dict[str, bytes]]] = {}
        # a device's status topic -> [(the event of a reply awaited from it, what its status said while waiting:
        # "started" of the retained one, "offline" the last offline body, "end" why the wait ended)]
        # (send_raw's status_topic)
        self._gone: dict[str, list[tuple[threading.Event, dict[str, Any]]]] = {}
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
            failure = not_connected(client, self.broker, "command client", timeout, refused=self._error)
            self.stop()
            raise failure
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
            self._error = refused_text(self.broker, reason_code)
            return
        client.subscribe(self.reply_topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._ready.set()

    @staticmethod
    def _status_while_waiting(waiting: list[tuple[threading.Event, dict[str, Any]]], payload: bytes,
                              retained: bool) -> None:
        """A device's status while replies from it are awaited (:meth:`send_raw`). The retained one comes at the
        subscription (retain flag set): the status read before sending, whose ``started`` names the process the
        command went to. A live ``offline`` is kept; when it says edge-ad stopped, or a live ``online`` names
        another process after an offline one (killed and restarted), the wait ends: no reply can come."""
        state, body = payloads.status_state(payload)
        for event, seen in waiting:
            if "end" in seen:   # decided: what came after cannot change why the wait ended
                continue
            if retained:
                seen.setdefault("started", body.get("started"))
            elif state == "offline":
                seen["offline"] = body
                if body.get("reason") == "stopped":
                    seen["end"] = "stopped"
                    event.set()
            elif state == "online" and "offline" in seen:
                if seen.get("started") is not None and body.get("started") != seen["started"]:
                    seen["end"], seen["online"] = "restarted", body
                    event.set()
                elif body.get("started") == seen.get("started"):   # the same process, back: it may answer
                    del seen["offline"]

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:                    # a device's status that last_status or no_status_note reads
            watches = [w for f, w in self._watch.items() if paho.topic_matches_sub(f, message.topic)]
            for first, found in watches:
                found[message.topic] = bytes(message.payload)
                if first is not None:
                    first.set()
            waiting = self._gone.get(message.topic, [])
            if waiting:
                self._status_while_waiting(waiting, bytes(message.payload), message.retain)
        if watches or waiting:
            return
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
             timeout: float = 10.0, claim: str | None = None, watch_status: bool = True) -> dict:
        """Send ``cmd/<name>`` to a device; returns its reply (``{"ok": ..., "result" | "error": ...}``).
        ``claim`` is the client id the allow-list sees (default: this client's id). Raises
        :class:`RuntimeFailure` when no reply comes within ``timeout`` s, and (``watch_status``) raises
        :class:`DeviceWentOffline` as soon as the device stops or restarts while it waits, or at the timeout when
        its will came meanwhile (:meth:`send_raw`)."""
        for value, what in ((site, "site"), (device, "device")):   # a name no device can have: no reply would come
            check_name(value, what)
        check_level(name, "command name")
        corr = str(uuid.uuid4())
        topic = Topics(site, device).cmd(name)
        data, props = self.build(topic, name, args, corr, claim if claim is not None else self.client_id,
                                 timeout=timeout)
        return self.send_raw(topic, data, corr, props, timeout=timeout,
                             status_topic=Topics(site, device).status if watch_status else None)

    def last_status(self, site: str, device: str, wait: float = STATUS_WAIT_S) -> tuple[str, dict] | None:
        """The device's retained ``status`` (:func:`~edge_ad.mqtt.payloads.status_state`: ``online`` /
        ``offline`` / ``unknown`` and its body), or None when the broker holds none this login may read
        (:meth:`_retained`; it returns as soon as the status comes)."""
        topic = Topics(site, device).status
        payload = self._retained(topic, wait, first=True).get(topic)
        return payloads.status_state(payload) if payload else None

    def no_status_note(self, site: str, device: str, timeout: float, wait: float = STATUS_WAIT_S) -> str:
        """What ``edge-ad command`` says when no status is retained for the device (:meth:`last_status` read
        none), before it waits for the reply all the same: a mistyped site or device id, a device that never
        connected, or an ACL that hides its status from this login; and the devices that have a retained status
        (read under :func:`~edge_ad.mqtt.topics.status_filter`), the closest as a guess."""
        known = known_devices_text(site, device, self._retained(status_filter(), wait))
        return (f"note: no status is retained for device {site}/{device} on {self.broker.safe_url}: a mistyped "
                f"--site or --device, a device that never connected, or a broker ACL that hides its status from this "
                f"login; {known}. Waiting for the reply all the same (--timeout {timeout:g} s)")

    def _retained(self, filt: str, wait: float, first: bool = False) -> dict[str, bytes]:
        """{topic: payload} of the retained messages the broker holds under ``filt`` that this login may read
        (empty ones are none). It subscribes, then sends a marker to its own reply topic: the broker sends a
        subscription's retained messages before it handles the client's next message, so once the marker is
        back they have come (as :func:`~edge_ad.mqtt.decommission.read_retained` does); ``first``: it returns at
        the first one. At most ``wait`` s when the marker does not come (an ACL that denies it this login)."""
        client = self._client
        if client is None:
            raise RuntimeFailure("command client is not started")
        came, found = threading.Event(), {}
        marker = f"status-{uuid.uuid4().hex}"
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = marker.encode("utf-8")
        with self._lock:
            self._watch[filt] = (came if first else None, found)
            self._waiting[marker] = came
        try:
            client.subscribe(filt, qos=1)
            client.publish(self.reply_topic, payloads.encode({"correlation_id": marker}, "marker"), qos=1,
                           properties=props)
            came.wait(wait)
        finally:
            with self._lock:
                self._watch.pop(filt, None)
                self._waiting.pop(marker, None)
                self._replies.pop(marker, None)
                found = {t: p for t, p in found.items() if p}
            client.unsubscribe(filt)
        return found

    def check_online(self, site: str, device: str, timeout: float) -> tuple[str, dict] | None:
        """Raise :class:`DeviceOffline` when the device's retained status says it is offline (a command to it
        would wait ``timeout`` s for nothing: see :func:`offline_text`); returns the status (None: none read)."""
        status = self.last_status(site, device)
        if status is not None and status[0] == "offline":
            raise DeviceOffline(offline_text(site, device, status[1], timeout, self.v5))
        return status

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
                 timeout: float = 10.0, status_topic: str | None = None) -> dict:
        """Publish exactly ``data`` on ``topic`` and wait for the reply correlated by ``correlation``.
        ``status_topic``: the device's ``status``, subscribed to before sending (:meth:`_status_while_waiting`):
        a stop, or a restart after its will, while waiting ends the wait with :class:`DeviceWentOffline`, as
        does the timeout after a will (not the retained offline status the subscription brings: the device may
        be offline on purpose, ``--even-offline``)."""
        client = self._client
        if client is None:
            raise RuntimeFailure("command client is not started")
        if self.v5 and properties is None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = self.reply_topic
            properties.CorrelationData = correlation.encode("utf-8")
            properties.MessageExpiryInterval = expiry_s(timeout)
        event, seen = threading.Event(), {}
        with self._lock:
            self._waiting[correlation] = event
            if status_topic is not None:
                self._gone.setdefault(status_topic, []).append((event, seen))
        try:
            if status_topic is not None:   # before the command: the broker handles the two in this order
                client.subscribe(status_topic, qos=1)
            client.publish(topic, data, qos=1, properties=properties)
            answered = event.wait(timeout)
            with self._lock:
                if correlation in self._replies:   # a reply wins over a status that came with it
                    return self._replies.pop(correlation)
                gone = dict(seen)
            if "offline" in gone:
                raise DeviceWentOffline(went_offline_text(topic, gone, None if answered else timeout))
            raise RuntimeFailure(self._no_reply(topic, timeout))
        finally:
            with self._lock:
                self._waiting.pop(correlation, None)
                self._replies.pop(correlation, None)
                others = [w for w in self._gone.pop(status_topic, []) if w[0] is not event]
                if others:   # another call waits on the same device
                    self._gone[status_topic] = others
            if status_topic is not None and not others:
                client.unsubscribe(status_topic)


def stale_online_text(site: str, device: str, status: dict) -> str:
    """What a command that got no reply from a device whose retained ``status`` says online adds: the status may
    be stale (a device that stopped while the broker was down gets no will), and how to tell."""
    since = payloads.status_since(status)
    return (f"Its retained status says online{since}, which is not proof that it runs: a device that stopped while "
            "the broker was down keeps that status for ever (a broker restarted from its saved state had no "
            f"connection to lose, so it publishes no will); edge-ad monitor shows {site}/{device} stale when it "
            "sends nothing, and edge-ad decommission --force takes a retired one that stays silent.")


def went_offline_text(topic: str, seen: dict, timeout: float | None = None) -> str:
    """What :meth:`CommandClient.send_raw` says when the device's status turned offline while it waited for the
    reply to a command on ``topic`` (``edge-ad/v1/<site>/<device>/cmd/<name>``): ``seen`` as
    :meth:`CommandClient._status_while_waiting` keeps it; ``timeout``: the wait ran out after a will."""
    parts = topic.split("/")
    site, device, name = parts[-4], parts[-3], parts[-1]
    status = seen["offline"]
    reason = status.get("reason")
    if seen.get("end") == "restarted":
        started = seen["online"].get("started")
        why = (f"the broker published its last will, and it came back as another process (started {started}): "
               "it was killed or lost power, and restarted")
    elif reason == "will":
        within = f" within {timeout:g} s" if timeout is not None else ""
        why = ("the broker published its last will, having lost its connection (killed, a power cut, or a network "
               f"cut), and no reply came{within}; it may still answer once it reconnects")
    elif reason == "stopped":
        why = f"edge-ad stopped there{payloads.status_since(status, 'at')} without answering it"
    else:
        why = f"reason {reason!r}" if reason else "no reason given"
    return (f"device {site}/{device} went offline while the command {name} was under way: its status turned "
            f"offline: {why}. Whether the command ran, in part or in full, is unknown: once the device is back, "
            "send 'status' (and check what the command changes: its calibration, its bundle) before resending")


def offline_text(site: str, device: str, status: dict, timeout: float, v5: bool) -> str:
    """Why a command to a device whose retained ``status`` says offline was not sent, and what sending it
    anyway (``--even-offline``) would do: the broker queues it in the device's persistent session, where MQTT v5
    drops it after its expiry (``timeout``) and MQTT 3.1.1 keeps it until the device comes back."""
    since = payloads.status_since(status)
    reason = status.get("reason")
    if reason == "will":
        why = (": its retained status is its last will, which the broker published when it lost the device's "
               "connection (a will carries no time)")
    elif reason == "stopped":
        why = f"{since}: its retained status says edge-ad stopped there"
    else:
        why = f"{since} (its retained status" + (f", reason {reason!r})" if reason else ")")
    if v5:
        late = (f"drops it unless the device is back within {expiry_s(timeout)} s (--timeout, the command's "
                "message expiry), so it never runs late")
    else:
        late = "the device runs it whenever it comes back, however late (MQTT 3.1.1 has no message expiry)"
    return (f"device {site}/{device} is offline{why}. The command was not sent. --even-offline sends it anyway "
            "and waits for the reply: the broker queues it in the device's persistent session while it keeps that "
            f"(MQTT v5: the device's mqtt.session_expiry_s, 1 hour by default), and {late}")
