"""A subscriber that records what arrives and de-duplicates results and events by ``id``.

Delivery from a device is at least once: a consumer keeps a persistent session (so nothing is lost
while it is away or the broker restarts) and drops repeats by ``id``. This class is that consumer in
its simplest form; tests and ``bench/mqtt.py`` use it to count what arrived.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..errors import RuntimeFailure
from .client import connect_async, make_client, not_connected, reason_failed
from .settings import BrokerSettings, Protocol
from . import topics as _topics


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float                 # unix time of arrival
    properties: object = None

    def json(self):
        return json.loads(self.payload)


class Collector:
    def __init__(self, broker: BrokerSettings, topic_filter: str = _topics.fleet_filter(), *,
                 client_id: str | None = None, persistent: bool = True, session_expiry_s: int = 3600,
                 on_message: Callable[[Received], None] | None = None):
        self.broker = broker
        self.filter = topic_filter
        self.client_id = client_id or f"edge-ad-collector-{uuid.uuid4().hex[:10]}"
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self._user_cb = on_message
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.messages: list[Received] = []
        self.counts: dict[str, int] = {}          # id -> times received (results and events)
        self.first_seen: dict[str, float] = {}
        self._subscribed = threading.Event()
        self.connects = 0
        self._client: paho.Client | None = None

    # ------------------------------------------------------------------ control
    def start(self, timeout: float = 10.0) -> "Collector":
        client = make_client(self.broker, self.client_id, persistent=self.persistent, jitter=False)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        connect_async(client, self.broker, clean_start=not self.persistent,
                      session_expiry_s=self.session_expiry_s if self.persistent else 0)
        client.loop_start()
        if not self._subscribed.wait(timeout):
            failure = RuntimeFailure(f"collector: no subscription on {self.broker.safe_url} within {timeout:g} s") \
                if self.connects else not_connected(client, self.broker, "collector", timeout)
            self.stop()
            raise failure
        return self

    def stop(self) -> None:
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()
            self._client = None

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_failed(reason_code):
            return
        self.connects += 1
        if self.broker.protocol == Protocol.V5:
            client.subscribe(self.filter, options=SubscribeOptions(qos=1))
        else:
            client.subscribe(self.filter, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if reason_codes and not any(reason_failed(rc) for rc in reason_codes):
            self._subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        rec = Received(message.topic, bytes(message.payload), bool(message.retain), int(message.qos), time.time(),
                       getattr(message, "properties", None))
        parsed = _topics.parse(message.topic)
        msg_id = None
        if parsed is not None and parsed[2] in ("result", "event"):
            try:
                msg_id = json.loads(rec.payload).get("id")
            except (ValueError, AttributeError):
                msg_id = None
        with self._cond:
            self.messages.append(rec)
            if msg_id is not None:
                self.counts[msg_id] = self.counts.get(msg_id, 0) + 1
                self.first_seen.setdefault(msg_id, rec.at)
            self._cond.notify_all()
        if self._user_cb is not None:
            self._user_cb(rec)

    # ------------------------------------------------------------------ queries
    def of_kind(self, kind: str) -> list[Received]:
        """Messages whose topic kind (after ``<site>/<device>/``) is ``kind``."""
        with self._lock:
            msgs = list(self.messages)
        out = []
        for m in msgs:
            parsed = _topics.parse(m.topic)
            if parsed is not None and parsed[2] == kind:
                out.append(m)
        return out

    def unique_ids(self) -> set[str]:
        with self._lock:
            return set(self.counts)

    def duplicates(self) -> int:
        """Extra copies received (at-least-once delivery), removed by de-duplication."""
        with self._lock:
            return sum(c - 1 for c in self.counts.values())

    def wait_for(self, predicate: Callable[["Collector"], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(timeout=min(left, 0.1))

    def wait_ids(self, n: int, timeout: float) -> bool:
        return self.wait_for(lambda c: len(c.counts) >= n, timeout)
