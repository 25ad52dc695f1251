"""Draining the outbox into the MQTT client: the in-flight window, PUBACK bookkeeping, the safety net.

Used by the link's sender thread only (one thread owns all of this state); paho's network thread only
calls :meth:`OutboxSender.acknowledged` and :meth:`OutboxSender.lost`, which queue the PUBACK or the lost
connection (in the order they happened) and wake the sender, and :meth:`OutboxSender.reconnected`. That keeps
paho's locks (``on_publish`` runs while paho holds its message lock) and ours apart.

A message the broker will not take must not block the outbox: a broker disconnects a client that sends a
packet larger than its maximum packet size (Mosquitto's ``max_packet_size``), and paho sends the same message
again after every reconnect, so everything behind it waited for ever. Such a message is dropped from the
outbox (counted in ``dropped_by``, logged, announced through ``on_drop``):

* ``too_large``: its PUBLISH packet is larger than the Maximum Packet Size the broker announced in its
  CONNACK (MQTT v5). It is never handed to paho.
* ``disconnects``: no limit was announced (MQTT 3.1.1, or a v5 broker that announces none but still refuses
  it), and the connection was lost within :data:`POISON_WINDOW_S` of sending it alone,
  :data:`POISON_STRIKES` connections in a row. Which message of those in flight got the connection dropped
  cannot be told (the broker took the ones before it, but their PUBACKs are lost with the connection), so a
  connection lost right after sending makes the sender *probe*: at the next connect paho's copies are dropped
  (:meth:`OutboxSender.reconnected`) and the messages go out again one at a time, each once the previous one
  is acknowledged, the first once the connect's own messages (birth, calibration) are, until one is
  acknowledged.
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
DropListener = Callable[[dict], None]   # a report of dropped messages (see OutboxSender._drop)

POISON_STRIKES = 3      # connections lost right after sending the same message: the broker will not take it
POISON_WINDOW_S = 5.0   # "right after": within this of its send (a broker refuses a packet on its header; a
                        # cut noticed by the keep-alive comes 1.5 keep-alives after the last send)


def publish_size(topic: str, payload_bytes: int, qos: int, properties: Properties | None, v5: bool) -> int:
    """Bytes of the PUBLISH packet paho sends: fixed header, topic, packet id (QoS > 0), the v5 properties
    (with their length; an empty set is one byte) and the payload. What a broker's Maximum Packet Size is
    compared with (MQTT v5 3.1.2.11.4: the total packet size)."""
    rest = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload_bytes
    if v5:
        rest += len(properties.pack()) if properties is not None else 1
    return 1 + (1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4) + rest


def image_properties(event_id: str | None) -> Properties:
    """The v5 PUBLISH properties of an event image."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "image/jpeg"
    if event_id:
        props.UserProperty = ("event_id", event_id)
    return props


@dataclass
class _Inflight:
    row_id: int
    kind: str
    msg_id: str | None
    created: float          # unix time of the outbox write
    sent: float             # monotonic time handed to paho
    topic: str = ""
    size: int = 0           # bytes of the PUBLISH packet
    probe: bool = False     # sent alone, while probing


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


class OutboxSender:
    def __init__(self, outbox: Outbox, window: int, resend_after_s: float, wake: threading.Event,
                 ack_listener: AckListener | None = None, on_drop: DropListener | None = None):
        self.outbox = outbox
        self.window = window
        self.resend_after_s = resend_after_s
        self._wake = wake
        self._ack_listener = ack_listener
        self._on_drop = on_drop
        # the broker's Maximum Packet Size (its CONNACK, MQTT v5), None when it announced none
        self.max_packet: int | None = None
        self._acks: queue.SimpleQueue = queue.SimpleQueue()   # PUBACKs and lost connections, in their order
        self._requeue: queue.SimpleQueue = queue.SimpleQueue()  # paho message ids it dropped at a connect
        self._probing = False                          # one message at a time: a connection was lost after a send
        self._suspect: tuple[int, int] | None = None   # (outbox row, connections lost right after sending it alone)
        self._poison: dict[int, str] = {}              # outbox row -> why it must not be sent again
        self._undropped: dict[int, str] = {}           # rows to drop whose delete failed (a full disk): retried
        self._drop_log = LogLimiter()
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
        undeleted, undropped = self._undeleted, self._undropped
        return not self._inflight and self.outbox.depth <= len(set(undeleted) | set(undropped))

    # ------------------------------------------------------------------ paho's network thread
    def acknowledged(self, mid: int, reason_code) -> None:
        """``on_publish``: a PUBACK (or the send of a QoS 0 message) for ``mid``."""
        self._acks.put((mid, reason_failed(reason_code), reason_code))
        self._wake.set()

    def lost(self, connected_since: float) -> None:
        """``on_disconnect`` of a connection made at ``connected_since`` (monotonic): queued behind the
        PUBACKs that came before it, so the sender sees which message was unacknowledged when it was lost."""
        self._acks.put((None, time.monotonic(), connected_since))
        self._wake.set()

    def reconnected(self, client: paho.Client, max_packet: int | None) -> None:
        """``on_connect`` (before anything is published on the new connection, and before paho sends again the
        messages it holds): take the broker's Maximum Packet Size, and when paho may hold a message the
        broker will not take (probing after a connection lost right after a send, one found to get the
        connection dropped, a limit lower than before), drop paho's copies: the sender hands them over again
        itself (:meth:`fill`: one at a time while probing; the one found is dropped). Replies and retained
        messages in flight are lost with them (the retained ones are published again on connect)."""
        lowered = max_packet is not None and (self.max_packet is None or max_packet < self.max_packet)
        self.max_packet = max_packet
        if (self._probing or self._poison or lowered) and self._inflight:     # (truth of a dict: atomic)
            for message in client.drop_out_messages():
                self._requeue.put(message.mid)
            self._wake.set()

    # ------------------------------------------------------------------ the sender thread
    def fill(self, client: paho.Client, ready: bool = True) -> None:
        """Hand stored messages to paho, oldest first, until ``window`` are unacknowledged (one while
        probing, and none before ``ready``: the messages published at connect are acknowledged)."""
        self._take_back()
        if self._probing and not ready:
            return
        window = 1 if self._probing else self.window
        skip = ({f.row_id for f in self._inflight.values()} | set(self._undeleted) | set(self._undropped))
        while True:
            room = window - len(self._inflight)
            if room <= 0:
                return
            rows = self.outbox.fetch_after(self._cursor, room)
            if not rows:
                return
            for row in rows:
                if row.id not in skip and not self._hand_over(client, row):
                    return
                self._cursor = row.id

    def _hand_over(self, client: paho.Client, row: Row) -> bool:
        """Publish ``row``; False when paho cannot take it now. A message larger than the broker's Maximum
        Packet Size is dropped instead (True: done with it)."""
        v5 = client.protocol == paho.MQTTv5
        props = image_properties(row.msg_id) if row.kind == "image" and v5 else None
        size = publish_size(row.topic, len(row.payload), row.qos, props, v5)
        limit = self.max_packet
        reason = self._poison.pop(row.id, None)
        if reason is None and limit is not None and size > limit:
            reason = "too_large"     # the broker would disconnect us for it, at every reconnect, the outbox behind it
        if reason is not None:
            self._drop(row.id, row.kind, row.msg_id, row.topic, size, reason)
            return True
        info = client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props)
        # NO_CONN: paho keeps the message and sends it after the reconnect, so it is in flight all the same
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.debug("mqtt: publish of outbox row %d deferred (%s)", row.id, paho.error_string(info.rc))
            return False
        self._inflight[info.mid] = _Inflight(row.id, row.kind, row.msg_id, row.created, time.monotonic(),
                                             row.topic, size, self._probing)
        self.counters["published"] += 1
        return True

    def _take_back(self) -> None:
        """The messages paho dropped at a connect (:meth:`reconnected`) are no longer in flight: the cursor goes
        back to the oldest of them, so :meth:`fill` hands them over again in order (and drops the one found
        to get the connection dropped)."""
        rows: list[int] = []
        while True:
            try:
                mid = self._requeue.get_nowait()
            except queue.Empty:
                break
            entry = self._inflight.pop(mid, None)
            if entry is not None:        # else a reply or retained message (published again on connect)
                rows.append(entry.row_id)
        if rows:
            self._cursor = min(self._cursor, min(rows) - 1)

    def _drop(self, row_id: int, kind: str, msg_id: str | None, topic: str, size: int, reason: str) -> None:
        """Drop a message the broker will not take from the outbox (counted in ``dropped_by[reason]``); log it
        and report it through ``on_drop`` at once, then at most once a minute with how many since."""
        if self._suspect is not None and self._suspect[0] == row_id:
            self._suspect = None
        try:
            self.outbox.drop([row_id], reason)
        except RuntimeFailure as exc:     # a full disk: retried on every pass; never sent meanwhile
            self._undropped = {**self._undropped, row_id: reason}
            log.error("mqtt: %s; retried on every pass", exc)
        limit = self.max_packet
        why = (f"its {size}-byte packet is larger than the broker's maximum packet size ({limit} bytes, announced "
               "at connect)" if reason == "too_large" else
               f"the connection was lost right after each of its last {POISON_STRIKES} sends (a broker disconnects "
               "a client that sends a packet larger than its max_packet_size)")
        since = self._drop_log.hit(reason)
        if not since:
            return
        log.error("mqtt: %s %s on %s dropped from the outbox: %s; %d message(s) dropped for this since the last "
                  "report, %d in all (reported again in %.0f s at the earliest)", kind, msg_id, topic, why, since,
                  self.outbox.dropped_by.get(reason, 0), self._drop_log.interval_s)
        if self._on_drop is not None:
            try:
                self._on_drop({"reason": reason, "kind": kind, "message_id": msg_id, "topic": topic,
                               "bytes": size, "max_packet_size": limit if reason == "too_large" else None,
                               "error": f"{kind} {msg_id} on {topic} dropped: {why}", "dropped": since,
                               "dropped_total": self.outbox.dropped_by.get(reason, 0)})
            except Exception:
                log.exception("mqtt: drop listener raised")

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

    def _judge_loss(self, lost_at: float, connected_since: float) -> None:
        """A connection was lost (the PUBACKs that came before it are counted). Lost within
        :data:`POISON_WINDOW_S` of a send: probe from the next connect (see the module's docstring). Lost so
        while probing, right after the probe was sent alone on it: the probe is suspect; the same message
        suspect :data:`POISON_STRIKES` times in a row is one the broker will not take, dropped at the next
        connect (paho's copy by :meth:`reconnected`, the outbox's by :meth:`_hand_over`). paho sends every
        unacknowledged message again as it reconnects, so "sent" is then the connect."""
        sent = [f for f in self._inflight.values() if f.sent <= lost_at]
        if not any(lost_at - max(f.sent, connected_since) <= POISON_WINDOW_S for f in sent):
            self._suspect = None          # nothing in flight, or a cut long after: no message's doing
            return
        probe = sent[0] if len(sent) == 1 and sent[0].probe and sent[0].sent >= connected_since else None
        if not self._probing or probe is None:
            self._probing = True          # which one is unknown: one at a time from the next connect
            return
        strikes = self._suspect[1] + 1 if self._suspect is not None and self._suspect[0] == probe.row_id else 1
        self._suspect = (probe.row_id, strikes)
        if strikes >= POISON_STRIKES and probe.row_id not in self._poison:
            self._poison[probe.row_id] = "disconnects"
            if self._drop_log.hit("found"):     # (the drop itself is logged as an ERROR)
                log.warning("mqtt: the connection was lost right after sending %s %s (%d bytes) alone %d times in "
                            "a row: the broker does not take it (a packet over its max_packet_size?); it is dropped "
                            "at the next connect", probe.kind, probe.msg_id, probe.size, strikes)

    def drain_acks(self) -> None:
        """Delete acknowledged messages from the outbox (one transaction for all that arrived). A delete
        that fails (a full disk) is retried on every later pass with the acks that come meanwhile: the rows
        stay counted in the outbox depth until then, and a process that ends first sends them again."""
        done: list[int] = list(self._undeleted)
        now = time.time()
        for row_id, reason in list(self._undropped.items()):
            try:
                self.outbox.drop([row_id], reason)
            except RuntimeFailure:
                break
            self._undropped = {k: v for k, v in self._undropped.items() if k != row_id}
        while True:
            try:
                mid, failed, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            if mid is None:       # a lost connection: (None, when, connected since)
                self._judge_loss(failed, reason)
                continue
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue          # birth, reply, calibration, telemetry: not from the outbox
            if self._suspect is not None and self._suspect[0] == entry.row_id:
                self._suspect = None
            self._poison.pop(entry.row_id, None)      # it got through after all
            if entry.probe:
                self._probing = False                 # the connection carries messages again: the full window
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
