"""The device's MQTT link: results and events through the outbox, telemetry, status, commands.

Threads:

* the caller (the inspection loop): ``publish_result`` / ``publish_event`` write to the SQLite outbox and
  return; that write is the only synchronous step, nothing waits on the network.
* paho's network thread (``loop_start``): connects with back-off, keeps the session alive, calls the
  ``on_*`` callbacks, which only record facts and wake the sender (``on_connect`` also subscribes and
  publishes the birth, calibration and discovery messages).
* the sender: hands outbox messages to paho, at most ``inflight_window`` unacknowledged at a time and
  in outbox order, deletes them when their PUBACK arrives (:mod:`.sender`), publishes telemetry and
  status updates.
  Messages handed to paho before a disconnect are re-sent by paho after the reconnect (with DUP); a
  new process sends everything left in the outbox from the start.
* the command worker: runs one command at a time and publishes its reply; a second one answers ``status``
  (:data:`~edge_ad.mqtt.commands.QUICK`), so it is never held behind a long ``calibrate``; while a
  :data:`~edge_ad.mqtt.commands.LONG` command waits or runs, the others are refused at once (``busy``).
  Once the device stops (:meth:`MqttLink.close_commands`, :meth:`MqttLink.stop`) the commands still waiting
  and those that come are answered ``failed`` without being run, and one still running when the stop gives up
  on it is answered ``failed`` too: every command gets its reply before the link disconnects.

Delivery is at least once: a message whose PUBACK was lost (a cut between the broker's ack and ours, a
kill before the ack was recorded) is sent again. Consumers de-duplicate on the ``id`` field.

Nothing larger than the broker's Maximum Packet Size (announced in its CONNACK, MQTT v5) is published: the
broker would disconnect the device for it at every reconnect. Such an outbox message is dropped, counted and
announced with an ``output_error`` event (:mod:`.sender`); a too large event image is left out of its event
(``image_skipped: too_large``), a too large status, calibration, discovery config, telemetry or reply is not
sent (logged). A broker that announces no limit (MQTT 3.1.1) just drops the connection, which cannot be
told from a network fault: nothing is dropped for it; the same message sent right before several losses in a
row is named in a WARNING. A message the broker refuses in its PUBACK (MQTT v5) is dropped and announced the
same way when the reason code refuses it for good (Not authorized; Packet too large, Mosquitto's answer for its
``message_size_limit``, as ``too_large``), else kept and sent again after a back-off.
A command reply is sent again after a reconnect once at most (:data:`REPLY_SENDS`; one made while disconnected is
first sent at the reconnect): one the broker closes the connection for is then given up, with an ERROR naming it,
instead of costing the connection at every reconnect. A reply or a retained message (status, calibration, a
discovery config) the broker refuses in its PUBACK (MQTT v5: its ACL) is not sent again: it is logged as an ERROR
and counted (``replies_rejected``, ``retained_rejected``). No paho callback raises: an exception from one would
end paho's network thread, and with it the link, for good.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import __version__
from ..errors import InputError, RuntimeFailure, clip_text, valid_unicode
from ..ratelimit import LogLimiter
from . import homeassistant, payloads, schema
from .client import (DEVICE_LOGIN_HINT, connect_async, connect_error_text, make_client, reason_failed, reason_text,
                     reason_value, refused_text)
from .commands import CLOSED, LONG, QUEUED, QUICK, CommandQueue, Dispatcher, Handler, Incoming
from .outbox import DROP_IDS_PER_EVENT, DropNames, Outbox
from .sender import (LOSS_REPEATS, PACKET_TOO_LARGE, AckListener, OutboxSender, image_properties, percentile,
                     publish_size)
from .settings import SHORT_SECRET, MqttSettings, Protocol
from .topics import Topics, level_problem, string_problem

log = logging.getLogger(__name__)
UNREACHABLE_WARN_S = 60.0   # "cannot connect" is a WARNING at the first failure, then at most this often
REFUSED_LOG_S = 600.0       # a login the broker refuses: an ERROR at the first refusal, then at most this often
# a command reply is sent at most this often: once, and again after one reconnect (paho sends a QoS 1 message in
# flight again at every reconnect; a reply the broker closes the connection for did so for ever). Fewer than the
# losses in a row the sender names an outbox message for, so such a reply is named, not a result sent beside it.
REPLY_SENDS = LOSS_REPEATS - 1
RETAINED_MIDS = 256   # retained messages whose PUBACK is awaited, at most (a connect publishes a handful)


@dataclass
class _SentReply:
    """A command reply paho holds until its PUBACK (see :meth:`MqttLink._replies_at_connect`); ``sends``: how many
    times it was on the wire (0 for one published while disconnected: paho sends it at the next connect)."""

    info: paho.MQTTMessageInfo
    command: str
    topic: str
    size: int
    sends: int = 1


def _acknowledged(info: paho.MQTTMessageInfo) -> bool:
    """Has the broker acknowledged this reply? For one published while disconnected (``MQTT_ERR_NO_CONN``, sent by
    paho at the next connect) ``is_published()`` raises instead of answering; its PUBACK, should it come, removes
    it from the replies (``on_publish``)."""
    return info.rc == paho.MQTT_ERR_SUCCESS and info.is_published()


def _drop_names(drops: list[dict]) -> DropNames:
    """The sender's dropped messages (:meth:`OutboxSender.report_drops`) named per kind, as a full outbox names
    its drops (:class:`DropNames`)."""
    names = DropNames()
    for d in drops:
        names.add(d["kind"], d["message_id"], d.get("seq"))
    return names


def retained_topics(settings: MqttSettings) -> list[str]:
    """Every topic a device's link publishes retained (:meth:`MqttLink._publish_retained`): its ``status``,
    its ``calibration`` and the Home Assistant discovery configs under ``settings.homeassistant_prefix``
    (whether or not ``homeassistant`` is on now: it may have been on before). What ``edge-ad decommission``
    clears (:mod:`edge_ad.mqtt.decommission`)."""
    topics = Topics(settings.site, settings.device)
    return [topics.status, topics.calibration, *homeassistant.removal(settings)]


class MqttLink:
    """One device's connection to the broker. Safe to call from any thread.

    ``ack_listener(kind, msg_id, created, acked)`` (optional) is called from the sender thread for every
    outbox message the broker acknowledged; benchmarks use it to time publish -> PUBACK.
    """

    def __init__(self, settings: MqttSettings, birth: Mapping[str, Any] | None = None, *,
                 ack_listener: AckListener | None = None):
        if not isinstance(settings, MqttSettings):
            raise InputError(f"MqttLink needs MqttSettings, got {type(settings).__name__}")
        self.settings = settings
        self.topics = Topics(settings.site, settings.device)
        self.outbox = Outbox(settings.effective_outbox_path, settings.outbox_max_messages,
                             settings.outbox_max_bytes, settings.outbox_sync)
        self.dispatcher = Dispatcher(settings, self.topics)
        self.dispatcher.register("status", self._status_command, changes_state=False)
        self._birth: dict[str, Any] = dict(birth or {})
        self._calibration: bytes | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._telemetry: collections.deque = collections.deque(maxlen=8)
        self._retained_dirty = False          # birth / calibration changed since last published
        self._connected = False
        self._connected_at = 0.0
        self._unreachable_warned = float("-inf")   # when "cannot connect" was last logged at WARNING
        # the broker refusing the connection (a CONNACK failure: bad login, not authorized): the reason last
        # logged (None: none since the last accepted connection), when, and the refusals not logged since
        self._refusal: str | None = None
        self._refusal_logged = float("-inf")
        self._refusals_held = 0
        self._refusals_in_a_row = 0
        self._started = False
        self._stopping = False
        self._stopped = False
        self._client: paho.Client | None = None
        self._sender: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._commands = CommandQueue(settings.command_queue)
        self._quick = CommandQueue(settings.command_queue)     # QUICK commands: their own worker
        self._long: Incoming | None = None    # the LONG command waiting or running: others are refused meanwhile
        self._replies: dict[int, _SentReply] = {}   # replies paho may still hold, by message id
        self._retained_mids: dict[int, str] = {}    # retained messages (_publish_retained) not acknowledged: topics
        self._closing: str | None = None      # why commands are no longer run (close_commands), once they are not
        self._running: dict[str, Incoming] = {}   # worker thread name -> the command it runs
        self._answered_at_stop: set[int] = set()  # ids of running commands stop() answered (their reply: not sent)
        self._last_image = float("-inf")
        self._started_iso = payloads.now_iso()
        # every key exists from the start, so stats() never iterates a dict that grows under it
        self._counters = collections.Counter({k: 0 for k in ("connects", "disconnects", "telemetry_sent",
                                                             "telemetry_dropped", "images_skipped",
                                                             "replies_rejected", "retained_rejected",
                                                             "connect_refused")})
        self._last_error: str | None = None
        self._out = OutboxSender(self.outbox, settings.inflight_window, max(60.0, 2.0 * settings.keepalive_s),
                                 self._wake, ack_listener, on_drop=self._announce_drops)
        self._drop_events: collections.deque = collections.deque(maxlen=64)   # ids of our output_error events
        # what _store adds to an event (schema_version, id, seq, ts, site, device), at its largest
        self._event_head_bytes = len(payloads.encode({
            "schema_version": payloads.SCHEMA_VERSION, "id": "0" * 36, "seq": 10 ** 12, "ts": payloads.now_iso(),
            "site": settings.site, "device": settings.device}, "event"))
        self._oversize_log = LogLimiter()     # direct publishes (status, telemetry, replies) over the limit
        self._id_log = LogLimiter()           # event ids that cannot name their image as they are
        self._refused_log = LogLimiter()      # replies and retained messages the broker refused
        self._limit_warned: int | None = None
        if self.outbox.reset is not None:
            self._announce_outbox_reset(self.outbox.reset)

    def _announce_outbox_reset(self, reset: dict) -> None:
        """The outbox file was damaged and moved aside (logged by the outbox): tell the consumers, whose
        ``seq`` starts again at 1, with an event stored first in the new outbox (sent once connected)."""
        try:
            self.publish_event({"type": "outbox_reset", "outbox": str(self.outbox.path),
                                "moved_to": reset["moved_to"], "error": reset["error"],
                                "outbox_instance": self.outbox.instance, "ts": reset["ts"]})
        except Exception as exc:  # a full disk: the ERROR in the log and the new outbox_instance still say it
            log.warning("mqtt: could not store the outbox_reset event: %s", exc)

    def _announce_drops(self, drops: list[dict]) -> None:
        """The sender dropped outbox messages the broker will not take (:meth:`OutboxSender.report_drops`: every
        one, batched; the log has them at most once a minute): ``output_error`` events name each of them
        (``message_ids``, and per kind in ``dropped`` as a full outbox's are: the ``seq`` ranges of results and
        events), with the first one's kind, size and topic, and how many in all. As many events as it takes to
        name them all, each small enough for the broker's limit (:data:`DROP_IDS_PER_EVENT` ids at most) and
        listing every ``seq`` (:data:`~.outbox.SEQ_RANGES_MAX` ranges per kind at most). A drop of one of these
        events itself is not announced (on a broker whose limit is below an event's size they would follow each
        other). What the full outbox dropped comes as one record (reason
        ``full``, :meth:`Outbox.take_full_drops`): one event names them by kind (:meth:`_full_event`). Also from
        :meth:`stop`, after the link stopped."""
        for rec in [d for d in drops if d["reason"] == "full"]:
            self._store_drop_event(self._full_event(rec))
        drops = [d for d in drops if d["reason"] != "full" and d.get("message_id") not in self._drop_events]

        def key(d: dict) -> tuple:
            return d["reason"], d.get("max_packet_size"), d.get("reason_code")

        while drops:
            # the first ones for the same reason (limit, reason code) whose seq ranges all fit: one event
            n, names = 0, DropNames()
            while (n < min(len(drops), DROP_IDS_PER_EVENT) and key(drops[n]) == key(drops[0])
                   and not names.spills(drops[n]["kind"], drops[n].get("seq"))):
                names.add(drops[n]["kind"], drops[n]["message_id"], drops[n].get("seq"))
                n += 1
            same = drops[:n]
            while True:
                ev = self._drop_event(same[:n])
                size = len(payloads.encode(ev, "event")) + self._event_head_bytes
                if n == 1 or not self._too_large(self.topics.event, size, image=False):
                    break
                limit = self._out.max_packet or size
                n = max(1, min(n - 1, n * limit // size - 1))     # what fits, the ids being the same size
            drops = drops[n:]
            self._store_drop_event(ev)

    def _store_drop_event(self, ev: dict) -> None:
        try:
            event_id = str(uuid.uuid4())
            self._drop_events.append(event_id)
            self._store("event", self.topics.event, {"id": event_id, **ev}, check_open=False)
        except Exception as exc:  # a full disk, a closed outbox: the log says it already
            log.warning("mqtt: could not store the output_error event for %d dropped message(s): %s", ev["failed"],
                        exc)

    def _full_event(self, rec: dict) -> dict:
        """The ``output_error`` event that names the messages the full outbox dropped (``rec``:
        :meth:`Outbox.take_full_drops`): per kind in ``dropped`` (how many, the first and last id, the ``seq``
        ranges), and every id in ``message_ids`` when they are few enough (and the event still fits the
        broker's limit with them)."""
        parts = []
        for kind, k in rec["kinds"].items():
            ranges = k.get("seq", [])
            seq = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges[:3])
            more = " and more" if len(ranges) > 3 or k.get("seq_more") else ""
            parts.append(f"{k['count']} {kind}(s)" + (f" (seq {seq}{more})" if seq else ""))
        ev = {"type": "output_error", "output": "mqtt", "reason": "full",
              "error": f"outbox full ({rec['max_messages']} messages, {rec['max_bytes']} bytes max): dropped the "
                       f"{rec['count']} oldest message(s) since the last report: {', '.join(parts)}",
              "dropped": rec["kinds"], "message_ids": rec["ids"], "failed": rec["count"],
              "failed_total": rec["dropped_total"]}
        if rec["ids"] and self._too_large(self.topics.event, len(payloads.encode(ev, "event"))
                                          + self._event_head_bytes, image=False):
            ev["message_ids"] = None         # "dropped" still names them
        return {k: v for k, v in ev.items() if v is not None}

    @staticmethod
    def _drop_event(drops: list[dict]) -> dict:
        """The ``output_error`` event that names ``drops`` (one reason, one limit or reason code; the first is
        described): by id (``message_ids``) and per kind (``dropped``: how many, the first and last id, the
        ``seq`` ranges of results and events, as :meth:`_full_event` names a full outbox's)."""
        first = drops[0]
        error = first["error"]
        if len(drops) > 1:
            error += f"; and {len(drops) - 1} more message(s) for the same reason (message_ids)"
        ev = {"type": "output_error", "output": "mqtt", "reason": first["reason"], "error": error,
              "kind": first["kind"], "message_id": first["message_id"], "topic": first["topic"],
              "bytes": first["bytes"], "max_packet_size": first.get("max_packet_size"),
              "reason_code": first.get("reason_code"),
              "dropped": _drop_names(drops).report()["kinds"],
              "message_ids": [d["message_id"] for d in drops if d["message_id"] is not None],
              "failed": len(drops), "failed_total": max(d["dropped_total"] for d in drops)}
        return {k: v for k, v in ev.items() if v is not None}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "MqttLink":
        """Start connecting in the background (``connect_async`` + ``loop_start``); returns at once,
        whether or not a broker is reachable."""
        with self._lock:
            if self._started:
                return self
            if self._stopped:
                raise RuntimeFailure("MqttLink was stopped; make a new one")
            s = self.settings
            client = make_client(s, s.effective_client_id, persistent=True, max_inflight=s.inflight_window)
            self._started = True
        client.will_set(self.topics.status, self._status_bytes("offline", "will"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client
        connect_async(client, s, clean_start=False, session_expiry_s=s.session_expiry_s)
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._workers = [threading.Thread(target=self._command_loop, args=(q,), name=name, daemon=True)
                         for q, name in ((self._commands, "mqtt-commands"), (self._quick, "mqtt-status"))]
        self._sender.start()
        for w in self._workers:
            w.start()
        client.loop_start()
        log.info("mqtt: connecting to %s as %s (outbox %s, %d waiting)", s.safe_url, s.effective_client_id,
                 self.outbox.path, self.outbox.depth)
        n = len(s.command_secret.get_secret_value()) if s.command_secret is not None else None
        if n is not None and n < SHORT_SECRET:   # taken (a requester may share it), but it can be guessed
            log.warning("mqtt: command_secret is %d characters long: a short secret can be guessed, and whoever "
                        "guesses it can sign commands; use %d or more random characters (openssl rand -hex 32)",
                        n, SHORT_SECRET)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what can be flushed within ``timeout`` s, publish the ``offline`` status, disconnect.
        Whatever is still in the outbox stays there for the next start. Messages the broker acknowledged
        but that could not be deleted (a full disk) are not waited for: they were delivered. Commands: see
        :meth:`close_commands`; a command still running at the end of ``timeout`` is answered ``failed``
        (not finished; whether it took effect is unknown) and its own reply, should it finish, is not sent."""
        with self._lock:
            if self._stopped:
                return
            self._stopping = True
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        if self._started:
            self.close_commands("the link is stopping", status_too=True)
            while time.monotonic() < deadline:
                if self._out.settled:
                    break       # empty, or only acknowledged rows a failed delete left (a full disk)
                if not self._connected and time.monotonic() - t0 > min(2.0, timeout):
                    break       # broker unreachable: the backlog waits in the outbox for the next start
                self._wake.set()
                time.sleep(0.02)
            for w in self._workers:
                w.join(timeout=max(0.5, deadline - time.monotonic()))
            self._answer_left_at_stop()
            client = self._client
            if self._connected and client is not None:
                info = client.publish(self.topics.status, self._status_bytes("offline", "stopped"), qos=1,
                                      retain=True)
                try:
                    info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
            with self._lock:
                self._stopped = True
            self._wake.set()
            if self._sender is not None:
                self._sender.join(timeout=5.0)
            if client is not None:
                client.disconnect()
                client.loop_stop()
            self._drain_acks()
            # drops the sender made after its last report (or the flush above had no time to send): their
            # output_error events wait in the outbox for the next start; the log's held-back count is logged
            self._out.report_drops(final=True)
        with self._lock:
            self._stopped = True
        self._log_held(final=True)
        if self._refusals_held:
            log.error("mqtt: the broker refused the connection %d more time(s) since the last report (%d in all): %s",
                      self._refusals_held, self._counters["connect_refused"], self._refusal)
            self._refusals_held = 0
        self.outbox.close()
        log.info("mqtt: stopped (%d messages left in the outbox)", self.outbox.depth)

    def close_commands(self, reason: str, status_too: bool = False) -> None:
        """The device is stopping (``reason``, e.g. ``SIGTERM``): run no more commands. Those waiting are answered
        at once with a ``failed`` reply (``not run: the device is stopping (REASON); send it again ...``), and so
        is every one that comes later; the one running finishes (:meth:`stop` answers it when it outlasts the
        stop). They were acknowledged to the broker as they arrived (QoS 1), so nothing would deliver them again.
        ``status`` is answered until :meth:`stop` (``status_too``: from now on it is refused too). Idempotent; the
        first reason is the one the replies give."""
        with self._lock:
            self._closing = self._closing or reason
            self._commands.close()         # under the lock: a worker decides to run a command under it too
            if status_too:
                self._quick.close()
        for q in (self._commands, self._quick):
            if q.closed:
                for msg in q.drain():
                    self._answer_stopping(msg)

    def _answer_stopping(self, msg: Incoming) -> None:
        """Answer ``msg``, received or waiting while the device stops, without running it."""
        self._done_with(msg)
        log.warning("mqtt: command %s not run: the device is stopping (%s)", msg.name, self._closing)
        self._reply_now(self.dispatcher.error_reply(
            msg, "failed", f"{msg.name}: not run: the device is stopping ({self._closing}); send it again when it "
                           "is back online"))

    def _answer_left_at_stop(self) -> None:
        """At the end of :meth:`stop`: a command still running (its worker did not finish within the stop's
        timeout) is answered ``failed``, and any that slipped into a queue as it closed is answered as waiting."""
        with self._lock:
            running = [m for m in self._running.values() if id(m) not in self._answered_at_stop]
            self._answered_at_stop.update(id(m) for m in running)
        for msg in running:
            self._done_with(msg)
            log.warning("mqtt: command %s still running at the stop: answered 'failed'", msg.name)
            self._reply_now(self.dispatcher.error_reply(
                msg, "failed", f"{msg.name}: interrupted: the device stopped ({self._closing}) before it finished; "
                               "whether it took effect is unknown: check 'status' when the device is back online"))
        for q in (self._commands, self._quick):
            for msg in q.drain():
                self._answer_stopping(msg)

    def _reply_now(self, reply) -> None:
        client = self._client
        if client is not None:
            self._send_reply(client, reply)

    def __enter__(self) -> "MqttLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ publishing (any thread)
    def publish_result(self, payload: Mapping[str, Any]) -> str:
        """Store a result in the outbox (QoS 1 on ``result``); returns its id. Adds ``schema_version``,
        ``id`` (kept if given), ``seq``, ``ts`` (kept if given), ``site`` and ``device``."""
        return self._store("result", self.topics.result, payload)

    def publish_event(self, payload: Mapping[str, Any], jpeg: bytes | None = None,
                      image_outcome: dict | None = None, image_not_due: bool = False) -> str:
        """Store an NG event (QoS 1 on ``event``); returns its id (``id`` kept if given). ``jpeg`` (encoded image
        bytes) follows on ``event/image`` (with ``image_topic_event_id``: ``event/image/<event id>``, or
        ``event/image/sha256-...`` for an id that cannot be one topic level: :func:`~.topics.image_level`) at
        most once per ``image_min_interval_s``; the event says whether it was sent (``image``, with its topic) or
        why not (``image_skipped``), and so does ``image_outcome`` when given (a dict that receives those fields).
        ``image_not_due`` (with no ``jpeg``): the event had an image, not encoded because :meth:`image_due` said
        no; it is skipped as a ``jpeg`` given now would have been (``rate_limited``, counted)."""
        extra: dict[str, Any] = {}
        image = None
        event_id = None
        image_topic = self.topics.event_image
        if jpeg is not None and self.settings.image_topic_event_id and isinstance(payload, Mapping):
            event_id = str(payload.get("id") or uuid.uuid4())     # known before the event is stored: its topic
            image_topic = self.topics.event_image_of(event_id)
        if jpeg is not None and isinstance(payload, Mapping) and payload.get("id"):
            self._odd_event_id(str(payload["id"]), image_topic)
        skipped = "rate_limited" if image_not_due and jpeg is None else None
        if jpeg is not None:
            data = bytes(jpeg)
            if len(data) > self.settings.image_max_bytes or self._too_large(image_topic, len(data)):
                skipped = "too_large"
            elif not self._image_slot(take=False):
                skipped = "rate_limited"
            elif not self.outbox.image_fits(len(data), 1, len(payloads.encode(dict(payload), "event")) + 1024):
                skipped = "outbox_full"   # the outbox would drop the image itself: the event says so instead
            elif not self._image_slot(take=True):
                skipped = "rate_limited"  # another event's image was sent since the look above
            else:
                image = data
                extra = {"image": {"topic": image_topic, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest(), "content_type": "image/jpeg"}}
        if skipped is not None:
            extra = {"image": None, "image_skipped": skipped}
            with self._lock:
                self._counters["images_skipped"] += 1
        fields = {"type": "ng", **dict(payload), **extra} if isinstance(payload, Mapping) else payload
        if event_id is not None:
            fields["id"] = event_id
        event_id = self._store("event", self.topics.event, fields)
        if image_outcome is not None:
            image_outcome.update(extra)
        if image is not None:
            self.outbox.put("image", image_topic, image, msg_id=event_id, meta={"event_id": event_id})
            self._wake.set()
        return event_id

    def image_due(self) -> bool:
        """Would an event image given to :meth:`publish_event` now be sent as far as ``image_min_interval_s``
        goes? A caller that encodes a JPEG for the event alone asks first and encodes only then (else it
        passes ``image_not_due=True``: the event still says ``rate_limited``). A look, not a reservation:
        :meth:`publish_event` decides again and records the image it sends in one step under the lock, so
        callers told True at the same time still send one image per interval (the others' events say
        ``rate_limited``), and an image that is not sent after all (too large, outbox full) leaves the
        interval to the next one. Too large and outbox full are only known with the image."""
        return self._image_slot(take=False)

    def _image_slot(self, take: bool) -> bool:
        """Has ``image_min_interval_s`` passed since the last event image sent? With ``take``, and it has: this
        image is the one sent (its time recorded). The decision and its record in one place, under the lock."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_image < self.settings.image_min_interval_s:
                return False
            if take:
                self._last_image = now
            return True

    def _odd_event_id(self, event_id: str, image_topic: str) -> None:
        """A caller's event id that cannot name its image as is: not one topic level (``image_topic_event_id``:
        the image goes to ``event/image/sha256-...``, :func:`~.topics.image_level`), or not text a broker takes
        (MQTT v5: the image carries no ``event_id`` property, :func:`~.sender.image_properties`). The event and
        its image are published all the same; a WARNING says so, at most once a minute."""
        what = []
        if self.settings.image_topic_event_id and level_problem(event_id) is not None:
            what.append(f"its image goes to {image_topic}")
        if self.settings.protocol == Protocol.V5 and string_problem(event_id) is not None:
            what.append("its image carries no event_id property")
        since = self._id_log.hit() if what else 0
        if since:
            log.warning("mqtt: event id %s %s: %s (the event's image.topic names the topic); %d such event(s) since "
                        "the last report", clip_text(repr(event_id), 80),
                        string_problem(event_id) or level_problem(event_id), " and ".join(what), since)

    def publish_telemetry(self, payload: Mapping[str, Any]) -> dict:
        """Queue telemetry (QoS 0, not stored; dropped while disconnected). Adds the outbox state and
        ``images_skipped`` (event images not sent since the link was made, as in :meth:`stats`). Returns the
        body queued (what ``telemetry.path`` writes too)."""
        self._check_open()
        if not isinstance(payload, Mapping):
            raise InputError(f"telemetry payload must be a mapping, got {type(payload).__name__}")
        body = {"schema_version": payloads.SCHEMA_VERSION, "ts": payloads.now_iso(), "site": self.settings.site,
                "device": self.settings.device, **dict(payload)}
        outbox = {"depth": self.outbox.depth, "bytes": self.outbox.bytes, "dropped": self.outbox.dropped,
                  "connected": self._connected, "inflight": self._out.inflight}
        if isinstance(body.get("outbox"), Mapping):
            outbox = {**dict(body["outbox"]), **outbox}
        body["outbox"] = outbox
        body["images_skipped"] = self._counters["images_skipped"]
        data = payloads.encode(body, "telemetry")
        self._maybe_validate("telemetry", body)
        self._telemetry.append(data)
        self._wake.set()
        return body

    def publish_calibration(self, calibration: Any, threshold_in_force: float | None = None) -> None:
        """Publish the calibration in force (retained; re-published on every connect). Accepts a
        :class:`edge_ad.scoring.Calibration` or its ``to_dict()``. ``threshold_in_force``: the threshold that
        decides, when an override (the config's, a set_threshold without persist) decides instead of the
        calibration's (default: the calibration's). Also updates the birth message's ``calibration_version``."""
        self._check_open()
        cal = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
        if not isinstance(cal, Mapping) or "threshold" not in cal:
            raise InputError("calibration to publish: expected a Calibration or its dict with 'threshold'")
        if isinstance(cal.get("source"), str):   # a record written before sources were stored redacted
            from ..runtime.sources import redact_text

            cal = {**cal, "source": redact_text(cal["source"])}
        version = int(cal.get("version") or 0)
        body = {"schema_version": payloads.SCHEMA_VERSION, "ts": payloads.now_iso(), "site": self.settings.site,
                "device": self.settings.device, "version": version, "threshold": cal["threshold"],
                "threshold_in_force": cal["threshold"] if threshold_in_force is None else float(threshold_in_force),
                "policy": cal.get("policy"), "created": cal.get("created"), "calibration": dict(cal)}
        body = {k: v for k, v in body.items() if v is not None}
        data = payloads.encode(body, "calibration")
        self._maybe_validate("calibration", body)
        with self._lock:
            self._calibration = data
            self._birth["calibration_version"] = version
            self._retained_dirty = True
        self._wake.set()

    def update_birth(self, **fields: Any) -> None:
        """Merge ``fields`` into the birth message and re-publish the retained ``online`` status."""
        self._check_open()
        payloads.encode(fields, "birth fields")
        with self._lock:
            self._birth.update(fields)
            self._retained_dirty = True
        self._wake.set()

    def register_command(self, name: str, handler: Handler, schema_name: str | dict | None = None,
                         changes_state: bool | None = None, unavailable: str | None = None) -> None:
        """``handler(args: dict) -> dict`` runs on the command worker thread; raise an
        :class:`edge_ad.errors.EdgeADError` for an error reply. ``unavailable``: why this device cannot run it
        (not in the birth's ``commands``, answered ``not_available`` with it). See :mod:`edge_ad.mqtt.commands`."""
        self.dispatcher.register(name, handler, schema_name, changes_state, unavailable)
        if self._started:
            self.update_birth()

    # ------------------------------------------------------------------ state
    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict[str, Any]:
        lat = list(self._out.latency_ms)
        c = collections.Counter(dict(self._counters)) + collections.Counter(dict(self._out.counters))
        return {
            "connected": self._connected,
            "outbox_depth": self.outbox.depth,
            "outbox_bytes": self.outbox.bytes,
            "outbox_dropped": self.outbox.dropped,
            "outbox_dropped_by": self.outbox.dropped_by,
            "max_packet_size": self._out.max_packet,
            "inflight": self._out.inflight,
            "retry_waiting": self._out.retry_waiting,
            "published": c["published"],
            "acked": c["acked"],
            "rejected": c["rejected"],
            "replies_rejected": c["replies_rejected"],
            "retained_rejected": c["retained_rejected"],
            "resent": c["resent"],
            "connects": c["connects"],
            "connect_refused": c["connect_refused"],
            "disconnects": c["disconnects"],
            "telemetry_sent": c["telemetry_sent"],
            "telemetry_dropped": c["telemetry_dropped"],
            "images_skipped": c["images_skipped"],
            "commands": self.dispatcher.handled,
            "command_errors": self.dispatcher.errors,
            "ack_latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "n": len(lat)},
            "last_error": self._last_error,
            "outbox_reset": self.outbox.reset["moved_to"] if self.outbox.reset else None,
        }

    # ------------------------------------------------------------------ internals: payloads
    def _check_open(self) -> None:
        if self._stopped:
            raise RuntimeFailure("MqttLink is stopped")

    def _maybe_validate(self, name: str, body: Any) -> None:
        if self.settings.validate_payloads:
            schema.validate(name, body)

    def _store(self, kind: str, topic: str, payload: Mapping[str, Any], check_open: bool = True) -> str:
        if check_open:       # only the stop's last output_error events are stored after it (sent at the next start)
            self._check_open()
        if not isinstance(payload, Mapping):
            raise InputError(f"{kind} payload must be a mapping (dict), got {type(payload).__name__}")
        fields = dict(payload)
        msg_id = fields.pop("id", None)
        msg_id = str(msg_id) if msg_id else str(uuid.uuid4())
        ts = fields.pop("ts", None)
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            ts = payloads.iso_from_unix(float(ts))
        elif not ts:
            ts = payloads.now_iso()
        for key in ("schema_version", "seq", "site", "device"):
            fields.pop(key, None)
        head = {"schema_version": payloads.SCHEMA_VERSION, "id": msg_id}
        tail = {"ts": ts, "site": self.settings.site, "device": self.settings.device, **fields}

        def build(seq: int) -> bytes:
            body = {**head, "seq": seq, **tail}
            try:
                data = payloads.encode(body, kind)
            except InputError:   # a string that is not valid Unicode (a file name that is not UTF-8) is sent as
                body = valid_unicode(body)   # every record writes it (\xfe), not lost; a NaN is still refused
                data = payloads.encode(body, kind)
            self._maybe_validate(kind, body)
            return data

        self.outbox.put(kind, topic, build, msg_id=msg_id)
        self._wake.set()
        return msg_id

    def _too_large(self, topic: str, payload_bytes: int, qos: int = 1, properties: Properties | None = None,
                   image: bool = True) -> bool:
        """Would this message (an event image by default) be larger than the broker's announced Maximum
        Packet Size? (MQTT v5; False while none is known.)"""
        limit = self._out.max_packet
        if limit is None:
            return False
        if image and properties is None:
            properties = image_properties("0" * 36)       # the size of the event_id property it will carry
        return publish_size(topic, payload_bytes, qos, properties, True) > limit

    def _publish_direct(self, client: paho.Client, topic: str, data: bytes, qos: int, retain: bool = False,
                        properties: Properties | None = None):
        """Publish a message that is not stored in the outbox (status, calibration, discovery, telemetry, a
        reply), unless it is larger than the broker's Maximum Packet Size: the broker would disconnect us
        for it (and a retained one is published again at every connect). Such a one is logged, not sent
        (None; else paho's message info)."""
        if client.protocol == paho.MQTTv5 and self._too_large(topic, len(data), qos, properties, image=False):
            since = self._oversize_log.hit(topic)
            if since:
                log.error("mqtt: %d-byte message on %s not sent: larger than the broker's maximum packet size "
                          "(%s bytes); %d such since the last report (reported again in %.0f s at the earliest)",
                          len(data), topic, self._out.max_packet, since, self._oversize_log.interval_s)
            return None
        return client.publish(topic, data, qos=qos, retain=retain, properties=properties)

    def _birth_body(self) -> dict[str, Any]:
        with self._lock:
            extra = dict(self._birth)
        body = {"schema_version": payloads.SCHEMA_VERSION, "state": "online", "reason": "connected",
                "ts": payloads.now_iso(), "site": self.settings.site, "device": self.settings.device,
                "client_id": self.settings.effective_client_id, "version": __version__,
                "protocol": self.settings.protocol.value, "outbox_instance": self.outbox.instance,
                "started": self._started_iso, "commands": self.dispatcher.names()}
        body.update(extra)
        body.update({"schema_version": payloads.SCHEMA_VERSION, "state": "online", "reason": "connected",
                     "site": self.settings.site, "device": self.settings.device})
        # what the full outbox dropped and no output_error event names yet: that event is stored once the outbox
        # has room, behind the backlog, so it reaches a consumer long after the gap the backlog's first message
        # shows; the birth, published at connect before the backlog goes out, names them first
        pending = self.outbox.full_drops_named()
        if pending is not None:
            body["dropped_pending"] = pending
        return body

    def _status_bytes(self, state: str, reason: str) -> bytes:
        if state == "online":
            body = self._birth_body()
        else:
            body = {"schema_version": payloads.SCHEMA_VERSION, "state": "offline", "reason": reason,
                    "site": self.settings.site, "device": self.settings.device,
                    "client_id": self.settings.effective_client_id}
            if reason != "will":
                body["ts"] = payloads.now_iso()
        self._maybe_validate("status", body)
        return payloads.encode(body, "status")

    def _publish_retained(self, client: paho.Client) -> None:
        """Birth, calibration and discovery configs: on every connect and after each change. A topic
        published retained here must be in :func:`retained_topics` (what a decommission clears)."""
        with self._lock:
            self._retained_dirty = False
            calibration = self._calibration
        sent = [(self.topics.status, self._publish_direct(client, self.topics.status,
                                                          self._status_bytes("online", "connected"), 1, True))]
        if calibration is not None:
            sent.append((self.topics.calibration, self._publish_direct(client, self.topics.calibration, calibration,
                                                                       1, True)))
        if self.settings.homeassistant:
            for topic, data in homeassistant.discovery(self.settings, self._birth):
                sent.append((topic, self._publish_direct(client, topic, data, 1, True)))
        with self._lock:   # their PUBACKs say whether the broker took them (_on_publish)
            for topic, info in sent:
                if info is not None and info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                    self._retained_mids[info.mid] = topic
            while len(self._retained_mids) > RETAINED_MIDS:      # acknowledged ones are removed: a bound, not a rule
                self._retained_mids.pop(next(iter(self._retained_mids)))

    # ------------------------------------------------------------------ paho callbacks (network thread)
    # paho's network thread dies with an exception from a callback, and with it the link, for good: no reconnect,
    # no command, the outbox growing, until a restart. Each callback logs its own exceptions instead.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._connect_done(client, flags, reason_code, properties)
        except Exception:
            log.exception("mqtt: error in the connect callback (the link goes on)")

    def _connect_done(self, client, flags, reason_code, properties) -> None:
        if reason_failed(reason_code):
            self._connected = False
            self._last_error = refused_text(self.settings, reason_code, DEVICE_LOGIN_HINT)
            self._refused_login(self._last_error)
            return
        if self._refusal is not None:
            log.warning("mqtt: the broker %s accepted the connection after refusing it %d time(s) in a row",
                        self.settings.safe_url, self._refusals_in_a_row)
            self._refusal, self._refusals_held = None, 0
        limit = getattr(properties, "MaximumPacketSize", None) if client.protocol == paho.MQTTv5 else None
        # before anything is published on this connection, and before paho sends again what it holds
        self._out.reconnected(client, int(limit) if limit is not None else None)
        try:      # whatever happens to the replies, the connection is taken (subscribed, the birth published)
            self._replies_at_connect(client)
        except Exception:
            log.exception("mqtt: error while taking stock of the command replies at connect")
        if limit is not None and limit < self.settings.image_max_bytes + 1024 and self._limit_warned != limit:
            self._limit_warned = limit
            log.warning("mqtt: the broker %s takes packets of at most %d bytes (its max_packet_size), less than "
                        "image_max_bytes (%d) + 1 KiB: larger event images are left out (image_skipped: too_large), "
                        "larger results and events are dropped; lower mqtt.image_max_bytes or raise the broker's "
                        "limit", self.settings.safe_url, limit, self.settings.image_max_bytes)
        self._connected = True
        self._connected_at = time.monotonic()
        self._counters["connects"] += 1
        self._last_error = None
        self._unreachable_warned = float("-inf")
        if client.protocol == paho.MQTTv5:
            # retained commands are not sent at subscribe, and keep their retain flag to be refused
            client.subscribe(self.topics.cmd_filter, options=SubscribeOptions(
                qos=1, noLocal=True, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
        else:
            client.subscribe(self.topics.cmd_filter, qos=1)
        self._publish_retained(client)
        log.info("mqtt: connected to %s (session present: %s, %d waiting in the outbox%s)", self.settings.safe_url,
                 bool(getattr(flags, "session_present", False)), self.outbox.depth,
                 "" if limit is None else f"; the broker takes packets of up to {limit} bytes")
        self._wake.set()

    def _refused_login(self, why: str) -> None:
        """The broker refused the connection (``why``: its reason and what to check). It will refuse every retry
        alike until its password file, its ACL or the device's config changes: an ERROR the first time, then at
        most once per :data:`REFUSED_LOG_S` (with how many since), and at once when the reason changes; counted
        in ``connect_refused``. Paho's network thread only."""
        self._counters["connect_refused"] += 1
        self._refusals_in_a_row = 1 if self._refusal is None else self._refusals_in_a_row + 1
        now = time.monotonic()
        if why == self._refusal and now - self._refusal_logged < REFUSED_LOG_S:
            self._refusals_held += 1
            log.debug("mqtt: %s", why)
            return
        since, self._refusals_held = self._refusals_held + 1, 0
        self._refusal, self._refusal_logged = why, now
        log.error("mqtt: %s; retrying in the background (%d refusal(s) since the last report, %d in all: "
                  "connect_refused; logged again in %.0f s at the earliest, or when the reason changes)", why, since,
                  self._counters["connect_refused"], REFUSED_LOG_S)

    def _on_connect_fail(self, client, userdata) -> None:
        exc = getattr(client, "connect_error", None)   # why (make_client keeps it)
        self._last_error = f"cannot connect to {self.settings.safe_url}" + (
            f": {connect_error_text(exc, self.settings)}" if exc is not None else "")
        now = time.monotonic()
        if now - self._unreachable_warned >= UNREACHABLE_WARN_S and not self._stopping:
            # the first failure, then once a minute while it lasts: a wrong URL or a broker that is down
            # must not look like a healthy line; results wait in the outbox meanwhile
            self._unreachable_warned = now
            log.warning("mqtt: %s; retrying in the background (%d results and events waiting in the outbox %s)",
                        self._last_error, self.outbox.depth, self.outbox.path)
        else:
            log.debug("mqtt: %s", self._last_error)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._disconnected(client, flags, reason_code)
        except Exception:
            log.exception("mqtt: error in the disconnect callback (the link goes on)")

    def _disconnected(self, client, flags, reason_code) -> None:
        was = self._connected
        self._connected = False
        if was:
            self._counters["disconnects"] += 1
            if not self._stopping:
                # right after sending a message the broker refuses? (logged) A v5 "Protocol error" the client
                # raised itself: a packet from the broker it could not read, no network fault (Mosquitto's PUBACK
                # 0x95 for message_size_limit is read: client._read_refusing_pubacks)
                protocol_error = (client.protocol == paho.MQTTv5 and reason_value(reason_code) == 0x82
                                  and not getattr(flags, "is_disconnect_packet_from_server", True))
                self._out.lost(self._connected_at, protocol_error)
                self._last_error = f"disconnected from {self.settings.safe_url}: {reason_text(reason_code)}"
                log.warning("mqtt: %s; reconnecting (%d waiting in the outbox)", self._last_error,
                            self.outbox.depth)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        try:
            with self._lock:
                reply = self._replies.pop(mid, None)
                retained = self._retained_mids.pop(mid, None)
            if reason_failed(reason_code) and (reply is not None or retained is not None):
                self._refused_direct(reply, retained, reason_code)
            self._out.acknowledged(mid, reason_code)
        except Exception:
            log.exception("mqtt: error in the publish callback for message %s (the link goes on)", mid)

    def _refused_direct(self, reply: _SentReply | None, retained: str | None, reason_code) -> None:
        """The broker refused a message that is not in the outbox in its PUBACK (MQTT v5; Mosquitto answers 0x87
        Not authorized for a topic its ACL denies, and keeps the connection): a command reply (its requester gets
        none) or a retained status, calibration or discovery config. Not sent again: counted
        (``replies_rejected``, ``retained_rejected``) and logged as an ERROR, the first at once, then at most
        once a minute per kind with how many since."""
        code = reason_value(reason_code)
        why = f"{reason_text(reason_code)}" + (f" (reason code 0x{code:02X})" if code is not None else "")
        size_fix = ("it is larger than the broker's message_size_limit, which it does not announce: set that to 0 "
                    "and use max_packet_size") if code == PACKET_TOO_LARGE else None
        if reply is not None:
            self._counters["replies_rejected"] += 1
            since = self._refused_log.hit("reply")
            if since:
                log.error("mqtt: the broker refused the reply to command %s on %s: %s; its requester gets no reply "
                          "(%s); %d such since the last report", reply.command, clip_text(repr(reply.topic), 120),
                          why, size_fix or "the broker's ACL must let this device publish to the reply topics of its "
                                           "requesters", since)
        else:
            self._counters["retained_rejected"] += 1
            since = self._refused_log.hit(retained)
            if since:
                log.error("mqtt: the broker refused the retained message on %s: %s; consumers keep the last one it "
                          "took (%s); %d such since the last report", retained, why,
                          size_fix or "let this device publish to it in the broker's ACL", since)

    def _log_held(self, final: bool = False) -> None:
        """Log what the once-a-minute lines of messages not sent or refused held back (the replies and retained
        messages the broker refused, those over its maximum packet size, the events whose id cannot name their
        image), one line per count ("N more since the last report"), once that minute is over (``final``: at
        once, at the stop): without it, a count no later occurrence reported was never logged. Called on every
        pass of the sender thread and by :meth:`stop`."""
        for topic, n in self._oversize_log.flush(force=final).items():
            log.error("mqtt: %d more message(s) on %s not sent since the last report: larger than the broker's maximum "
                      "packet size (%s bytes)", n, topic, self._out.max_packet)
        for key, n in self._refused_log.flush(force=final).items():
            if key == "reply":
                log.error("mqtt: the broker refused %d more command reply(ies) since the last report, %d in all "
                          "(replies_rejected); their requesters get no reply", n, self._counters["replies_rejected"])
            else:
                log.error("mqtt: the broker refused the retained message on %s %d more time(s) since the last report",
                          key, n)
        for n in self._id_log.flush(force=final).values():
            log.warning("mqtt: %d more event(s) since the last report whose id cannot name its image as is (the "
                        "event's image.topic names the topic)", n)

    def _on_message(self, client, userdata, message) -> None:
        try:   # paho's network thread dies with an exception from here, and with it every delivery
            self._take_command(client, message)
        except Exception:
            log.exception("mqtt: command message on %s dropped", getattr(message, "topic", "?"))

    def _take_command(self, client, message) -> None:
        prefix = self.topics.base + "/cmd/"
        if not message.topic.startswith(prefix):
            return
        props = message.properties if client.protocol == paho.MQTTv5 else None
        user = {}
        response_topic = corr = expiry = None
        if props is not None:
            user = {str(k): str(v) for k, v in (getattr(props, "UserProperty", None) or [])}
            response_topic = getattr(props, "ResponseTopic", None) or None
            corr = getattr(props, "CorrelationData", None)
            expiry = getattr(props, "MessageExpiryInterval", None)   # what is left of it (the broker counts)
        msg = Incoming(message.topic[len(prefix):], bytes(message.payload), response_topic,
                       bytes(corr) if corr is not None else None, user,
                       expiry_s=float(expiry) if expiry is not None else None)
        if message.retain:
            if not msg.payload:
                # an empty retained message clears a retained command on the broker (the documented cleanup),
                # and the broker passes it on to the subscribers: no command, nothing to warn of or answer
                log.debug("mqtt: %s: a retained command cleared (an empty retained message): nothing to run",
                          message.topic)
                return
            # a retained command would run again at every reconnect
            log.warning("mqtt: retained command on %s not run (publish commands with retain=false)", message.topic)
            if msg.payload.strip():
                self._send_reply(client, self.dispatcher.error_reply(
                    msg, "malformed", f"cmd/{msg.name}: published with the retain flag; commands are not retained "
                                      "(clear it with an empty retained message and send it again with retain=false)"))
            return
        if msg.name not in QUICK:
            with self._lock:
                long = self._long
                if long is None and msg.name in LONG:
                    self._long = msg
            if long is not None:   # queued, it would run minutes after it was sent, long after its requester gave up
                self._send_reply(client, self.dispatcher.error_reply(
                    msg, "busy", f"{msg.name}: not run: '{long.name}' (received "
                                 f"{time.time() - long.received:.0f} s ago) has not finished; send it again when it "
                                 "has (status answers meanwhile)"))
                return
        outcome = (self._quick if msg.name in QUICK else self._commands).offer(msg)
        if outcome == CLOSED:          # the device is stopping
            self._answer_stopping(msg)
        elif outcome != QUEUED:
            self._done_with(msg)
            reply = self.dispatcher.error_reply(msg, "busy", f"{self.settings.command_queue} commands are waiting; "
                                                              "try again later")
            self._send_reply(client, reply)

    def _done_with(self, msg: Incoming) -> None:
        """``msg`` is answered: when it was the LONG command, other commands are run again."""
        with self._lock:
            if self._long is msg:
                self._long = None

    # ------------------------------------------------------------------ command worker
    def _command_loop(self, commands: CommandQueue) -> None:
        worker = threading.current_thread().name
        while True:
            msg = commands.get()
            if msg is None:
                return
            with self._lock:
                run = not commands.closed      # closed (the device stops): answered, not run
                if run:
                    self._running[worker] = msg
            if not run:
                self._answer_stopping(msg)
                continue
            reply = self.dispatcher.handle(msg)
            self._done_with(msg)    # before the reply: a command sent on it must not find this one running
            with self._lock:
                self._running.pop(worker, None)
                answered = id(msg) in self._answered_at_stop
                self._answered_at_stop.discard(id(msg))
            if answered:
                log.warning("mqtt: command %s finished after the stop answered it (%s): its reply is not sent",
                            msg.name, "ok" if reply.ok else reply.body["error"]["code"])
                continue
            self._reply_now(reply)

    def _send_reply(self, client: paho.Client, reply) -> None:
        try:
            self._maybe_validate("reply", reply.body)
            data = payloads.encode(reply.body, "reply")
            props = None
            if client.protocol == paho.MQTTv5:
                props = Properties(PacketTypes.PUBLISH)
                props.ContentType = "application/json"
                if reply.correlation_data is not None:
                    props.CorrelationData = reply.correlation_data
            info = self._publish_direct(client, reply.topic, data, 1, False, props)
        except ValueError as exc:  # paho refuses the topic (the dispatcher refuses such reply topics first)
            log.error("mqtt: the reply to command %s cannot be sent to %s: %s", reply.body.get("command"),
                      clip_text(repr(reply.topic), 120), exc)
            return
        except Exception:  # a reply that cannot be sent must not stop the worker
            log.exception("mqtt: cannot send the reply to %s", clip_text(repr(reply.topic), 120))
            return
        if info is not None and info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # its PUBACK may have come already: _acknowledged() says so at the next connect. NO_CONN: paho keeps it
            # and sends it at the next connect, the first time it is on the wire (not a send yet)
            with self._lock:
                self._replies[info.mid] = _SentReply(info, str(reply.body.get("command")), reply.topic, len(data),
                                                     sends=1 if info.rc == paho.MQTT_ERR_SUCCESS else 0)

    def _replies_at_connect(self, client: paho.Client) -> None:
        """``on_connect``, before paho sends again the messages it holds from the last connection: a reply sent
        :data:`REPLY_SENDS` times already (each connection since was lost before its PUBACK) is given up, with
        an ERROR naming it: a broker that closes the connection for a reply (its ACL denies the topic) would
        close it again at every reconnect. Paho cannot drop one message alone: its copies are taken back
        (``drop_out_messages``), the other replies published again now, the outbox's handed back to the
        sender (as at a lowered packet limit: :meth:`OutboxSender.reconnected`)."""
        with self._lock:
            pending = {mid: r for mid, r in self._replies.items() if not _acknowledged(r.info)}
            self._replies = pending
            if not any(r.sends >= REPLY_SENDS for r in pending.values()):
                for r in pending.values():
                    r.sends += 1          # paho sends it again now
                return
            self._replies = {}
        others = []
        for message in client.drop_out_messages():
            r = pending.get(message.mid)
            if r is None:
                others.append(message)
            elif r.sends >= REPLY_SENDS:
                log.error("mqtt: the reply to command %s on %s (%d bytes) is given up: the connection was lost each "
                          "of the %d times it was sent, before the broker acknowledged it (a broker closes the "
                          "connection for a reply topic it refuses, e.g. one its ACL denies); its requester gets no "
                          "reply", r.command, clip_text(repr(r.topic), 120), r.size, r.sends)
            else:
                info = client.publish(message.topic, message.payload, qos=message.qos, retain=False,
                                      properties=message.properties)
                with self._lock:
                    self._replies[info.mid] = _SentReply(info, r.command, r.topic, r.size, r.sends + 1)
        self._out.take_back(others)   # handed over again, as at a lowered packet limit

    def _status_command(self, args: dict) -> dict:
        return {"birth": self.birth(), "link": self.stats()}

    def birth(self) -> dict[str, Any]:
        """The birth message as it is published now (retained on ``status``)."""
        return self._birth_body()

    # ------------------------------------------------------------------ sender thread
    def _send_loop(self) -> None:
        last_check = time.monotonic()
        while True:
            self._wake.wait(timeout=0.25)
            self._wake.clear()
            try:
                self._drain_acks()
                if self._stopped:
                    return
                # the drops of the last pass (batched; at once while stopping, so stop() can send them)
                self._out.report_drops(now=self._stopping)
                self._log_held()
                client = self._client
                if client is None:
                    continue
                if not self._connected:
                    self._counters["telemetry_dropped"] += len(self._telemetry)
                    self._telemetry.clear()
                    continue
                if self._retained_dirty:
                    self._publish_retained(client)
                while self._telemetry:
                    if self._publish_direct(client, self.topics.telemetry, self._telemetry.popleft(), 0) is not None:
                        self._counters["telemetry_sent"] += 1
                    else:
                        self._counters["telemetry_dropped"] += 1
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    self._out.resend_stale(client, self._connected_at)
                self._out.fill(client)
            except Exception as exc:  # keep sending whatever happens to one message
                self._last_error = f"sender: {type(exc).__name__}: {exc}"
                log.exception("mqtt: sender error")
                time.sleep(0.1)

    def _drain_acks(self) -> None:
        try:
            self._out.drain_acks()
        except RuntimeFailure:
            if not self._stopped:      # the outbox closed under a late ack while stopping
                raise
