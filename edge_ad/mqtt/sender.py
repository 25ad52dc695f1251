"""Draining the outbox into the MQTT client: the in-flight window, PUBACK bookkeeping, the safety net.

Used by the link's sender thread only (one thread owns all of this state); paho's network thread only
calls :meth:`OutboxSender.acknowledged` and :meth:`OutboxSender.lost`, which queue the PUBACK or the lost
connection (in the order they happened) and wake the sender, and :meth:`OutboxSender.reconnected`. That keeps
paho's locks (``on_publish`` runs while paho holds its message lock) and ours apart.

A message the broker will not take must not block the outbox: a broker disconnects a client that sends a
packet larger than its maximum packet size (Mosquitto's ``max_packet_size``), and paho sends the same message
again after every reconnect, so everything behind it waited for ever. When the broker announces its limit in
its CONNACK (MQTT v5), a message over it is never handed to paho: it is dropped from the outbox (reason
``too_large``, counted in ``dropped_by``, logged, announced through ``on_drop``).

A broker that announces no limit (MQTT 3.1.1, or a v5 broker without one) just closes the connection, and
that cannot be told from a network fault (a cut cable, a NAT reset, Wi-Fi roaming, a broker restart): a
message is never dropped for a lost connection, whatever its timing. Each connection lost right after
(re)sending the same oldest unacknowledged message is counted instead (:meth:`OutboxSender._note_loss`), and
:data:`LOSS_REPEATS` such losses in a row are logged as a WARNING naming that message, its size and the broker
setting that would cause it (at most once a minute): the operator sees the reconnect loop and its likely
cause, and nothing is lost.

A PUBACK with a failure reason code (MQTT v5) is the broker refusing one message, and the code says whether
sending it again can help (:data:`PERMANENT_REFUSALS`, from the spec's list for PUBACK, 3.4.2.1). A permanent one
(0x87 Not authorized: an ACL; 0x90 Topic name invalid; 0x99 Payload format invalid) is dropped from the outbox as
a ``too_large`` one is (reason ``rejected``: counted, logged, announced through ``on_drop``); 0x95 Packet too large
(Mosquitto 2.0's answer to a message over its unannounced ``message_size_limit``, read by the client although MQTT
v5 does not allow it in a PUBACK: :func:`~.client.make_client`) is dropped as ``too_large``. Any other (0x97 Quota
exceeded, 0x80 Unspecified error, 0x83 Implementation specific error, a code the spec does not list) means "not
now": the message stays in the outbox and is sent again after a back-off of its own (:data:`RETRY_MIN_S`,
doubling up to :data:`RETRY_MAX_S`), and nothing is handed over for :data:`RETRY_MIN_S` after a refusal, so a
broker that refuses everything for a while is not flooded; logged at most once a minute.
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
from .client import reason_failed, reason_text, reason_value
from .outbox import Outbox, Row
from .topics import string_problem

log = logging.getLogger(__name__)

AckListener = Callable[[str, "str | None", float, float], None]   # (kind, msg_id, created, acked) unix s
DropListener = Callable[[list], None]   # the messages dropped since the last report (OutboxSender.report_drops)

LOSS_REPEATS = 3        # connections lost right after sending the same message, in a row: logged (never dropped)
LOSS_WINDOW_S = 5.0     # "right after": within this of its send (a broker refuses a packet on its header; a
                        # cut noticed by the keep-alive comes 1.5 keep-alives after the last send)
DROP_REPORT_S = 1.0     # dropped messages are announced at most this often (a burst of them: together)
# PUBACK reason codes that refuse the message for good (MQTT v5 3.4.2.1): sending it again cannot help. 0x95 is
# not a PUBACK code in the spec, but Mosquitto 2.0 sends it for a message over its message_size_limit (paho 2.2
# rejects that PUBACK as malformed and closes the connection; the client reads it instead, see
# client._read_refusing_pubacks): such a message is dropped as too_large. Every other failure (0x80, 0x83, 0x91,
# 0x97, an unknown code) is sent again later.
PERMANENT_REFUSALS = frozenset({0x87, 0x90, 0x95, 0x99})
PACKET_TOO_LARGE = 0x95   # of those, the one dropped as too_large (a size limit), not rejected
RETRY_MIN_S = 1.0       # a message refused for now is sent again after this, doubling per refusal ...
RETRY_MAX_S = 60.0      # ... up to this; and after any such refusal nothing is handed over for RETRY_MIN_S


def publish_size(topic: str, payload_bytes: int, qos: int, properties: Properties | None, v5: bool) -> int:
    """Bytes of the PUBLISH packet paho sends: fixed header, topic, packet id (QoS > 0), the v5 properties
    (with their length; an empty set is one byte) and the payload. What a broker's Maximum Packet Size is
    compared with (MQTT v5 3.1.2.11.4: the total packet size)."""
    rest = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload_bytes
    if v5:
        rest += len(properties.pack()) if properties is not None else 1
    return 1 + (1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4) + rest


def image_properties(event_id: str | None) -> Properties:
    """The v5 PUBLISH properties of an event image: its content type, and its event's id (``event_id``) unless
    that id is not text a broker takes (:func:`~.topics.string_problem`: a broker closes the connection for it)."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "image/jpeg"
    if event_id and string_problem(event_id) is None:
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
    refusals: int = 0       # times the broker refused it for now before this send (PUBACK "try later")
    seq: int | None = None  # a result's or event's seq (names it if it is dropped)


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
        self._requeue: queue.SimpleQueue = queue.SimpleQueue()  # paho's messages it dropped at a connect
        self._suspect: tuple[int, int] | None = None   # (outbox row, connections lost in a row right after sending it)
        self._largest_acked = 0                        # bytes of the largest PUBLISH the broker acknowledged
        self._loss_log = LogLimiter()
        self._loss_note = ""                           # the message named by the last connection-loss WARNING
        self._undropped: dict[int, str] = {}           # rows to drop whose delete failed (a full disk): retried
        self._drop_log = LogLimiter()
        self._drops: list[dict] = []                   # dropped messages not announced yet (report_drops)
        self._drops_lock = threading.Lock()            # the stop announces the last ones from its own thread
        self._drops_reported = float("-inf")           # when report_drops last announced some (monotonic)
        self._drop_notes: dict[str, str] = {}          # reason -> why the last message dropped for it was
        # messages the broker refused for now: outbox row -> (when to send it again (monotonic), refusals so far)
        self._retry: dict[int, tuple[float, int]] = {}
        self._hold_until = float("-inf")               # nothing is handed over before this (monotonic)
        self._retry_log = LogLimiter()
        self._inflight: dict[int, _Inflight] = {}      # paho message id -> outbox row
        # copies resend_stale replaced, which paho still holds until their PUBACK: paho message id -> (row, topic)
        self._abandoned: dict[int, tuple[int, str]] = {}
        self._cursor = 0                               # highest outbox row id handed to paho
        self._undeleted: list[int] = []                # acknowledged rows a failed delete left in the outbox
        self._delete_log = LogLimiter()
        self._delete_why = ""                          # why the last delete failed
        self.latency_ms: collections.deque = collections.deque(maxlen=10_000)
        self.counters: collections.Counter = collections.Counter({"published": 0, "acked": 0, "rejected": 0,
                                                                  "resent": 0})

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def retry_waiting(self) -> int:
        """Messages the broker refused for now, waiting in the outbox to be sent again."""
        return len(self._retry)

    @property
    def settled(self) -> bool:
        """Nothing waits for the broker: no message is in flight, and every message still stored is one the
        broker acknowledged but whose delete failed (a full disk), or one it refused for now (it waits for its
        back-off, not for the broker), and no drop waits to be announced (:meth:`report_drops`, the full
        outbox's too). Waiting for
        the outbox to empty cannot make those go: the next start sends them again (the acknowledged ones
        de-duplicated by id). Read from any thread (the sender thread replaces ``_undeleted`` and ``_undropped``,
        never changes them in place; ``_retry`` is copied)."""
        undeleted, undropped, retry = self._undeleted, self._undropped, list(self._retry)
        return (not self._inflight and not self._drops and not self.outbox.full_drops_pending
                and self.outbox.depth <= len(set(undeleted) | set(undropped) | set(retry)))

    # ------------------------------------------------------------------ paho's network thread
    def acknowledged(self, mid: int, reason_code) -> None:
        """``on_publish``: a PUBACK (or the send of a QoS 0 message) for ``mid``."""
        self._acks.put((mid, reason_failed(reason_code), reason_code))
        self._wake.set()

    def lost(self, connected_since: float, protocol_error: bool = False) -> None:
        """``on_disconnect`` of a connection made at ``connected_since`` (monotonic): queued behind the
        PUBACKs that came before it, so the sender sees which message was unacknowledged when it was lost.
        ``protocol_error``: the client closed it on a packet from the broker it could not read (not a network
        fault)."""
        self._acks.put((None, time.monotonic(), (connected_since, protocol_error)))
        self._wake.set()

    def reconnected(self, client: paho.Client, max_packet: int | None) -> None:
        """``on_connect`` (before anything is published on the new connection, and before paho sends again the
        messages it holds): take the broker's Maximum Packet Size. Paho sends every message it holds from
        before the reconnect again (nothing in flight is lost); only when the limit is lower than on the last
        connection (or announced for the first time) may one of them be over it, and paho would get the
        connection dropped for it at every reconnect: then its copies are taken back (``drop_out_messages``:
        paho cannot drop one alone) and the sender thread hands them over again (:meth:`_take_back`): the
        outbox's from the outbox (one over the limit is dropped, ``too_large``), the others (command replies)
        published again unless over the limit."""
        lowered = max_packet is not None and (self.max_packet is None or max_packet < self.max_packet)
        self.max_packet = max_packet
        if lowered:
            self.take_back(client.drop_out_messages())

    def take_back(self, messages: list) -> None:
        """Messages taken back from paho (``drop_out_messages``) that the sender thread hands over again
        (:meth:`_take_back`): at a lowered packet limit (:meth:`reconnected`), and the outbox's and the
        others the link takes back with a command reply it gives up (``MqttLink._replies_at_connect``)."""
        for message in messages:
            self._requeue.put(message)
        if messages:
            self._wake.set()

    # ------------------------------------------------------------------ the sender thread
    def fill(self, client: paho.Client) -> None:
        """Hand stored messages to paho, oldest first, until ``window`` are unacknowledged: first those the
        broker refused for now whose back-off is over, then the next ones. Nothing for :data:`RETRY_MIN_S`
        after such a refusal."""
        self._take_back(client)
        if time.monotonic() < self._hold_until:
            return
        if not self._send_again(client):
            return
        skip = ({f.row_id for f in self._inflight.values()} | set(self._undeleted) | set(self._undropped)
                | set(self._retry))
        while True:
            room = self.window - len(self._inflight)
            if room <= 0:
                return
            rows = self.outbox.fetch_after(self._cursor, room)
            if not rows:
                return
            for row in rows:
                if row.id not in skip and not self._hand_over(client, row):
                    return
                self._cursor = row.id

    def _send_again(self, client: paho.Client) -> bool:
        """Hand over the messages the broker refused for now whose back-off is over, oldest first, as the window
        allows; one the outbox dropped meanwhile (full) is forgotten. False when paho cannot take one now."""
        now = time.monotonic()
        due = sorted(row_id for row_id, (at, _) in self._retry.items() if at <= now)
        due = due[:max(0, self.window - len(self._inflight))]
        if not due:
            return True
        rows = {row.id: row for row in self.outbox.fetch_ids(due)}
        for row_id in due:
            at, refusals = self._retry.pop(row_id)
            row = rows.get(row_id)
            if row is not None and not self._hand_over(client, row, refusals):
                self._retry[row_id] = (at, refusals)
                return False
        return True

    def _hand_over(self, client: paho.Client, row: Row, refusals: int = 0) -> bool:
        """Publish ``row``; False when paho cannot take it now. A message larger than the broker's Maximum
        Packet Size is dropped instead (True: done with it)."""
        v5 = client.protocol == paho.MQTTv5
        props = image_properties(row.msg_id) if row.kind == "image" and v5 else None
        size = publish_size(row.topic, len(row.payload), row.qos, props, v5)
        limit = self.max_packet
        seq = row.seq
        if limit is not None and size > limit:
            # the broker would disconnect us for it, at every reconnect, the outbox waiting behind it
            self._drop(row.id, row.kind, row.msg_id, seq, row.topic, size, "too_large",
                       f"its {size}-byte packet is larger than the broker's maximum packet size ({limit} bytes, "
                       "announced at connect)", f"larger than the broker's maximum packet size, {limit} bytes",
                       max_packet_size=limit)
            return True
        info = client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props)
        # NO_CONN: paho keeps the message and sends it after the reconnect, so it is in flight all the same
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.debug("mqtt: publish of outbox row %d deferred (%s)", row.id, paho.error_string(info.rc))
            return False
        self._abandoned.pop(info.mid, None)   # paho reused the id (65535 messages later): that copy is gone
        self._inflight[info.mid] = _Inflight(row.id, row.kind, row.msg_id, row.created, time.monotonic(),
                                             row.topic, size, refusals, seq)
        self.counters["published"] += 1
        return True

    def _take_back(self, client: paho.Client) -> None:
        """The messages paho dropped at a connect (:meth:`reconnected`) are no longer in flight. For the
        outbox's, the cursor goes back to the oldest of them, so :meth:`fill` hands them over again in order
        (and drops one over the broker's limit); so for an old copy :meth:`resend_stale` replaced (paho keeps it
        until its PUBACK): it is an outbox row, not a reply, and publishing it again as it was would send an
        untracked duplicate (or log an ERROR for a "reply" over the limit). The others are published again as they
        were, unless over the limit: command replies, whose requester waits for them and which nothing else
        sends again. A retained one (birth, calibration, discovery config) is not: every connect publishes those
        again, newer."""
        rows: list[int] = []
        v5 = client.protocol == paho.MQTTv5
        while True:
            try:
                message = self._requeue.get_nowait()
            except queue.Empty:
                break
            entry = self._inflight.pop(message.mid, None)
            abandoned = self._abandoned.pop(message.mid, None)
            if entry is not None:
                rows.append(entry.row_id)
            elif abandoned is not None and abandoned[1] == message.topic:
                rows.append(abandoned[0])     # sent again from the outbox unless in flight, acknowledged or dropped
            elif not message.retain:
                self._publish_again(client, message, v5)
        if rows:
            self._cursor = min(self._cursor, min(rows) - 1)

    def _publish_again(self, client: paho.Client, message: paho.MQTTMessage, v5: bool) -> None:
        """Publish a message paho held from before the reconnect (not from the outbox) again, unless it is larger
        than the broker's Maximum Packet Size (then logged as an ERROR: it cannot be delivered)."""
        props = message.properties if v5 else None
        size = publish_size(message.topic, len(message.payload), message.qos, props, v5)
        limit = self.max_packet
        if limit is not None and size > limit:
            log.error("mqtt: %d-byte message on %s, in flight at the reconnect, not sent again: larger than the "
                      "broker's maximum packet size (%d bytes, announced at connect)", size, message.topic, limit)
            return
        info = client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                              properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.error("mqtt: message on %s, in flight at the reconnect, could not be sent again: %s", message.topic,
                      paho.error_string(info.rc))

    def _drop(self, row_id: int, kind: str, msg_id: str | None, seq: int | None, topic: str, size: int, reason: str,
              why: str, note: str, **fields) -> None:
        """Drop a message the broker will not take from the outbox (counted in ``dropped_by[reason]``: ``too_large``,
        ``rejected``); ``seq`` is a result's or event's (None for an image): the event names it by its ``seq`` as a
        full outbox's drops are named; ``why`` says why in the log and the event, ``note`` in the log's "N more"
        line; ``fields`` (``max_packet_size``, ``reason_code``) go into the event. It is logged at once, then at
        most once a minute with how many since (:meth:`report_drops` logs what is held back once the minute is
        over, and at the stop), and announced through ``on_drop`` by :meth:`report_drops`: every dropped message,
        batched (a burst of them, after a limit was lowered, is one report), so a consumer waiting for an image an
        event announced is told it will not come, and a monitor counts the gap in ``seq`` as dropped."""
        if self._suspect is not None and self._suspect[0] == row_id:
            self._suspect = None
        try:
            self.outbox.drop([row_id], reason)
        except RuntimeFailure as exc:     # a full disk: retried on every pass; never sent meanwhile
            self._undropped = {**self._undropped, row_id: reason}
            log.error("mqtt: %s; retried on every pass", exc)
        self._drop_notes[reason] = note
        with self._drops_lock:
            self._drops.append({"reason": reason, "kind": kind, "message_id": msg_id, "seq": seq, "topic": topic,
                                "bytes": size, "max_packet_size": None, "reason_code": None, **fields,
                                "error": f"{kind} {msg_id} on {topic} dropped: {why}",
                                "dropped_total": self.outbox.dropped_by.get(reason, 0)})
        self._wake.set()                  # the sender's next pass reports it
        since = self._drop_log.hit(reason)
        if since:
            log.error("mqtt: %s %s on %s dropped from the outbox: %s; %d message(s) dropped for this since the last "
                      "report, %d in all (reported again in %.0f s at the earliest; each is named in an output_error "
                      "event)", kind, msg_id, topic, why, since, self.outbox.dropped_by.get(reason, 0),
                      self._drop_log.interval_s)

    def report_drops(self, now: bool = False, final: bool = False) -> None:
        """Announce the messages :meth:`_drop` dropped since the last call through ``on_drop`` (one call with all
        of them), at most once per :data:`DROP_REPORT_S` (``now``: at once, while stopping), and those the full
        outbox dropped, named by :meth:`Outbox.take_full_drops` (one record, reason ``full``, at most once a
        minute and once the outbox has room for the event; while stopping at once); log what the once-a-minute
        lines held back (drops, refusals for now, connection losses right after the same message, failed deletes
        of acknowledged messages) once that minute is over (``final``: at once, at the very end), so the log
        accounts for every one, also when none follows. Called on every pass of the sender thread and at the
        stop (any thread)."""
        for reason, n in self._drop_log.flush(force=final).items():
            log.error("mqtt: %d more message(s) dropped from the outbox as %s since the last report (%s), %d in all; "
                      "each is named in an output_error event", n, reason, self._drop_notes.get(reason, reason),
                      self.outbox.dropped_by.get(reason, 0))
        for n in self._retry_log.flush(force=final).values():
            log.warning("mqtt: the broker refused %d more message(s) for now since the last report; %d wait in the "
                        "outbox to be sent again", n, len(self._retry))
        for n in self._loss_log.flush(force=final).values():
            log.warning("mqtt: the connection was lost %d more time(s) right after sending the same message since the "
                        "last report (the last: %s); nothing is dropped for it", n, self._loss_note)
        for n in self._delete_log.flush(force=final).values():
            log.error("mqtt: deleting acknowledged messages from the outbox failed %d more time(s) since the last "
                      "report (the last: %s); %d acknowledged message(s) are still in it (the next start sends them "
                      "again)", n, self._delete_why, len(self._undeleted))
        at = time.monotonic()
        full = self.outbox.take_full_drops(now=now or final)
        with self._drops_lock:
            drops = []
            if self._drops and (now or final or at - self._drops_reported >= DROP_REPORT_S):
                drops, self._drops = self._drops, []
                self._drops_reported = at
        if full is not None:
            drops.append({"reason": "full", **full})
        if drops and self._on_drop is not None:
            try:
                self._on_drop(drops)
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
        row_ids = []
        for mid in stale:     # paho keeps the old copy until its PUBACK (see _take_back)
            entry = self._inflight.pop(mid)
            self._abandoned[mid] = (entry.row_id, entry.topic)
            row_ids.append(entry.row_id)
        resent = sum(1 for row in self.outbox.fetch_ids(row_ids) if self._hand_over(client, row))
        self.counters["resent"] += resent
        log.warning("mqtt: %d messages unacknowledged for %.0f s were sent again", resent, self.resend_after_s)

    def _note_loss(self, lost_at: float, connected_since: float, protocol_error: bool = False) -> None:
        """A connection was lost (the PUBACKs that came before it are counted). Nothing is dropped for it: a
        broker that refuses a packet over a limit it did not announce closes the connection as a network
        fault does, and a heuristic that cannot tell them apart would drop valid results on a flaky network.
        Lost within :data:`LOSS_WINDOW_S` of a send (paho sends every unacknowledged message again as it
        reconnects, so "sent" is then the connect) with the same oldest unacknowledged outbox message
        :data:`LOSS_REPEATS` times in a row: a WARNING names that message (at most once a minute), so the
        reconnect loop a refused message causes can be told from a flaky network and fixed at the broker. The
        WARNING blames the message's size only when nothing says it fits: not when it is within the limit the
        broker announced, nor when the broker acknowledged a packet as large on this link. When the client closed
        the connection on a reply it could not read (``protocol_error``), it says so: not a network fault. (A PUBACK
        with a failure reason code MQTT v5 does not allow there, Mosquitto 2.0's 0x95 for a message over its
        ``message_size_limit``, is read as a refusal instead: :func:`~.client.make_client`.)"""
        sent = [f for f in self._inflight.values() if f.sent <= lost_at]
        if not any(lost_at - max(f.sent, connected_since) <= LOSS_WINDOW_S for f in sent):
            self._suspect = None          # nothing in flight, or a cut long after: no message's doing
            return
        first = sent[0]                   # the oldest handed to paho: what the broker reads first at a reconnect
        repeats = self._suspect[1] + 1 if self._suspect is not None and self._suspect[0] == first.row_id else 1
        self._suspect = (first.row_id, repeats)
        if repeats < LOSS_REPEATS:
            return
        self._loss_note = f"{first.kind} {first.msg_id} on {first.topic}, {repeats} times in a row"
        since = self._loss_log.hit("loss")
        if not since:
            return
        if self.max_packet is not None and 0 < first.size <= self.max_packet:
            # a packet over the announced limit is never sent (dropped as too_large): this one is within it
            likely = (f"the broker announced at connect that it takes packets of up to {self.max_packet} bytes, so "
                      "it is not refusing this one for its size: more likely the network or the broker drops the "
                      "connection")
        elif protocol_error:
            likely = ("each time the client closed the connection on a reply from the broker it could not read "
                      "(Protocol error), not a network fault: the broker answers this message with a packet the MQTT "
                      "library cannot read (the broker's log says why it refuses it)")
        elif 0 < first.size <= self._largest_acked:
            likely = (f"the broker acknowledged a {self._largest_acked}-byte packet on this link, so unless its limit "
                      "was lowered since, it is not refusing this one for its size: more likely the network or the "
                      "broker drops the connection")
        else:
            likely = ("if the broker refuses a packet this large (Mosquitto's max_packet_size or message_size_limit), "
                      "this repeats at every reconnect while the messages behind it wait: raise that limit above "
                      "mqtt.image_max_bytes + 1 KiB, or lower mqtt.image_max_bytes (MQTT v5 with max_packet_size "
                      "set: the broker announces it and such a message is dropped as too_large instead)")
        log.warning("mqtt: the connection was lost %d times in a row right after sending %s %s on %s (%d bytes, the "
                    "oldest of %d unacknowledged); nothing is dropped, it is sent again at each reconnect: %s; %d "
                    "loss(es) like it since the last report, logged again in %.0f s at the earliest", repeats,
                    first.kind, first.msg_id, first.topic, first.size, len(self._inflight), likely, since,
                    self._loss_log.interval_s)

    def _refused(self, entry: _Inflight, reason) -> None:
        """A PUBACK with a failure reason code for ``entry``: dropped when the code refuses it for good
        (:data:`PERMANENT_REFUSALS`), else kept in the outbox and sent again after its back-off."""
        code = reason_value(reason)
        text = reason_text(reason) + (f" (reason code 0x{code:02X})" if code is not None else "")
        if code == PACKET_TOO_LARGE:    # a size limit the broker did not announce: a too large one, as over one it did
            self._drop(entry.row_id, entry.kind, entry.msg_id, entry.seq, entry.topic, entry.size, "too_large",
                       f"the broker refused its {entry.size}-byte packet for its size: {text}, over a limit it does "
                       "not announce (Mosquitto's message_size_limit); sending it again cannot change that",
                       f"refused by the broker for its size, the last: {text}", reason_code=code)
            return
        if code in PERMANENT_REFUSALS:
            self._drop(entry.row_id, entry.kind, entry.msg_id, entry.seq, entry.topic, entry.size, "rejected",
                       f"the broker refused it: {text}; sending it again cannot change that",
                       f"refused by the broker, the last: {text}", reason_code=code)
            return
        now = time.monotonic()
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** entry.refusals)
        self._retry[entry.row_id] = (now + delay, entry.refusals + 1)
        self._hold_until = max(self._hold_until, now + RETRY_MIN_S)
        since = self._retry_log.hit("refused")
        if since:
            log.warning("mqtt: the broker refused %s %s on %s for now: %s; kept in the outbox and sent again in %.0f s "
                        "(refused %d time(s) in a row; nothing is sent for %.0f s after such a refusal); %d refusal(s) "
                        "since the last report, %d message(s) wait to be sent again (logged again in %.0f s at the "
                        "earliest)", entry.kind, entry.msg_id, entry.topic, text, delay, entry.refusals + 1,
                        RETRY_MIN_S, since, len(self._retry), self._retry_log.interval_s)

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
            if mid is None:       # a lost connection: (None, when, (connected since, protocol error))
                self._note_loss(failed, *reason)
                continue
            entry = self._inflight.pop(mid, None)
            if entry is None:     # birth, reply, calibration, telemetry: not from the outbox; or an old copy
                self._abandoned.pop(mid, None)          # resend_stale replaced: paho has let go of it
                continue
            if self._suspect is not None and self._suspect[0] == entry.row_id:
                self._suspect = None                  # it got through after all
            if failed:
                self.counters["rejected"] += 1
                self._refused(entry, reason)
                continue
            done.append(entry.row_id)
            if entry.refusals and not self._retry and self._retry_log.clear("refused"):
                log.warning("mqtt: the broker took the messages it had refused for now")
            self.counters["acked"] += 1
            self._largest_acked = max(self._largest_acked, entry.size)
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
            self._delete_why = str(exc)
            if self._delete_log.hit("delete"):
                log.error("mqtt: %d acknowledged message(s) not deleted: %s; retried on every pass (logged again in "
                          "%.0f s at the earliest)", len(done), exc, self._delete_log.interval_s)
            return
        self._undeleted = []
        if self._delete_log.clear("delete"):
            log.warning("mqtt: acknowledged messages are deleted from the outbox again")
