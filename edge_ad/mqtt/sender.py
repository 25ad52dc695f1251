"""Draining the outbox into the MQTT client: the in-flight window, PUBACK bookkeeping, the safety net.

Used by the link's sender thread only (one thread owns all of this state); paho's network thread only
calls :meth:`OutboxSender.acknowledged`, which queues the PUBACK and wakes the sender. That keeps
paho's locks (``on_publish`` runs while paho holds its message lock) and ours apart.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..errors import RuntimeFailure
from ..ratelimit import LogLimiter
from .client import reason_failed, reason_text
from .outbox import Outbox, Row

log = logging.getLogger(__name__)

AckListener = Callable[[str, "str | None", float, float], None]   # (kind, msg_id, created, acked) unix s


@dataclass
class _Inflight:
    row_id: int
    kind: str
    msg_id: str | None
    created: float          # unix time of the outbox write
    sent: float             # monotonic time handed to paho


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


class OutboxSender:
    def __init__(self, outbox: Outbox, window: int, resend_after_s: float, wake: threading.Event,
                 ack_listener: AckListener | None = None):
        self.outbox = outbox
        self.window = window
        self.resend_after_s = resend_after_s
        self._wake = wake
        self._ack_listener = ack_listener
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: dict[int, _Inflight] = {}      # paho message id -> outbox row
        self._cursor = 0                               # highest outbox row id handed to paho
        self._undeleted: list[int] = []                # acknowledged rows a failed delete left in the outbox
        self._delete_log = LogLimiter()
        self.latency_ms: collections.deque = collections.deque(maxlen=10_000)
        self.counters: collections.Counter = collections.Counter({"published": 0, "acked": 0, "rejected": 0,
                                                                  "resent": 0})

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def settled(self) -> bool:
        """Nothing waits for the broker: no message is in flight, and every message still stored is one the
        broker acknowledged but whose delete failed (a full disk). Those are delivered: waiting for the
        outbox to empty cannot make them go, and the next start sends them again (de-duplicated by id).
        Read from any thread (the sender thread replaces ``_undeleted``, never changes it in place)."""
        undeleted = self._undeleted
        return not self._inflight and self.outbox.depth <= len(set(undeleted))

    # ------------------------------------------------------------------ paho's network thread
    def acknowledged(self, mid: int, reason_code) -> None:
        """``on_publish``: a PUBACK (or the send of a QoS 0 message) for ``mid``."""
        self._acks.put((mid, reason_failed(reason_code), reason_code))
        self._wake.set()

    # ------------------------------------------------------------------ the sender thread
    def fill(self, client: paho.Client) -> None:
        """Hand stored messages to paho, oldest first, until ``window`` are unacknowledged."""
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in self.outbox.fetch_after(self._cursor, room):
            if not self._hand_over(client, row):
                break
            self._cursor = row.id

    def _hand_over(self, client: paho.Client, row: Row) -> bool:
        props = None
        if row.kind == "image" and client.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "image/jpeg"
            if row.msg_id:
                props.UserProperty = ("event_id", row.msg_id)
        info = client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props)
        # NO_CONN: paho keeps the message and sends it after the reconnect, so it is in flight all the same
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.debug("mqtt: publish of outbox row %d deferred (%s)", row.id, paho.error_string(info.rc))
            return False
        self._inflight[info.mid] = _Inflight(row.id, row.kind, row.msg_id, row.created, time.monotonic())
        self.counters["published"] += 1
        return True

    def resend_stale(self, client: paho.Client, connected_since: float) -> None:
        """Safety net: a message unacknowledged long after it was sent on a live connection is sent again
        (the broker or paho lost it); the duplicate is removed by the consumer's de-duplication."""
        now = time.monotonic()
        if now - connected_since < self.resend_after_s:
            return
        stale = [mid for mid, f in self._inflight.items() if now - f.sent > self.resend_after_s]
        if not stale:
            return
        row_ids = [self._inflight.pop(mid).row_id for mid in stale]
        resent = sum(1 for row in self.outbox.fetch_ids(row_ids) if self._hand_over(client, row))
        self.counters["resent"] += resent
        log.warning("mqtt: %d messages unacknowledged for %.0f s were sent again", resent, self.resend_after_s)

    def drain_acks(self) -> None:
        """Delete acknowledged messages from the outbox (one transaction for all that arrived). A delete
        that fails (a full disk) is retried on every later pass with the acks that come meanwhile: the rows
        stay counted in the outbox depth until then, and a process that ends first sends them again."""
        done: list[int] = list(self._undeleted)
        now = time.time()
        while True:
            try:
                mid, failed, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue          # birth, reply, calibration, telemetry: not from the outbox
            done.append(entry.row_id)
            if failed:
                self.counters["rejected"] += 1
                log.error("mqtt: the broker refused %s %s: %s (removed from the outbox)", entry.kind,
                          entry.msg_id, reason_text(reason))
                continue
            self.counters["acked"] += 1
            self.latency_ms.append((now - entry.created) * 1000.0)
            if self._ack_listener is not None:
                try:
                    self._ack_listener(entry.kind, entry.msg_id, entry.created, now)
                except Exception:
                    log.exception("mqtt: ack listener raised")
        if not done:
            return
        try:
            self.outbox.delete(done)
        except RuntimeFailure as exc:
            self._undeleted = done
            if self._delete_log.hit("delete"):
                log.error("mqtt: %d acknowledged message(s) not deleted: %s; retried on every pass (logged again in "
                          "%.0f s at the earliest)", len(done), exc, self._delete_log.interval_s)
            return
        self._undeleted = []
        if self._delete_log.clear("delete"):
            log.warning("mqtt: acknowledged messages are deleted from the outbox again")
