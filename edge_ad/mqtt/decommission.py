"""Taking a device off the broker for good (``edge-ad decommission``).

A device leaves state on the broker after it stopped: its retained messages (:func:`~edge_ad.mqtt.link.
retained_topics`: ``status``, ``calibration``, the Home Assistant discovery configs), which keep it in
``edge-ad monitor`` and Home Assistant for ever, and its persistent session (``clean_start=False`` with
``session_expiry_s``; MQTT 3.1.1: ``clean_session=False``, kept until the broker's own expiry), which keeps
queueing the commands sent to it. :func:`decommission`:

1. reads the device's retained ``status`` and refuses, changing nothing, while it says ``online``: the
   device must be stopped first (a running device would publish them again at once, and the session is
   its live connection). Forced, it takes one that says ``online`` only when the device publishes nothing
   while it watches (:func:`_heard`) for :data:`SILENCE_INTERVALS` of the telemetry intervals its birth names
   (plus :data:`SILENCE_MARGIN_S`; or ``silence_s``): a device killed while the broker was down keeps an
   ``online`` status for ever, since a broker restarted from its saved state had no connection to lose and
   publishes no will; a running device sends telemetry every interval. (Connecting with its client id to
   see whether it is connected would take its session over, disconnecting a live device.) Unless forced, it
   also refuses while the status is the will (the broker published it for a lost
   connection: the device may still run behind a network cut), and while the broker holds no retained message
   of it this login can read (a mistyped site or device, which names the devices that have a retained status;
   one decommissioned already or never connected; an ACL that hides its topics);
2. clears every retained topic (an empty retained message, QoS 1, each acknowledged), its ``status`` last,
   and reads them back: a broker whose ACL does not let this login publish there refuses the clear (MQTT v5:
   PUBACK 0x87 Not authorized) or acknowledges and drops it (3.1.1). What is still held then fails the run,
   naming each topic and why (the PUBACK's reason code, or the 3.1.1 silent drop), with what was cleared; the
   ``status`` is cleared only once everything else is (a refusal leaves the device's last status as it was,
   not a half-cleared device without one), and the session is not dropped;
3. drops the session: connects with the device's client id (given, else the one its retained status
   names, else the default ``edge-ad-<site>-<device>``) and a clean start (v5: session expiry 0;
   3.1.1: ``clean_session=True``), which makes the broker discard the old session, and disconnects, so
   the new, empty one ends too.

:func:`read_retained` is how it knows which retained messages the broker holds: it subscribes, then
publishes a marker to a topic of its own and waits for it to come back. The broker sends the retained
messages of a subscription before it handles a later message of the same client, so once the marker is
back every retained message has arrived (no waiting for a time).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable

import paho.mqtt.client as paho

from ..errors import RuntimeFailure
from .client import connect_async, make_client, not_connected, reason_failed, reason_text, reason_value, refused_text
from .link import retained_topics
from .payloads import finite_number, status_since, status_state
from .settings import BrokerSettings, MqttSettings, Protocol, client_id_problem
from .topics import KINDS, Topics, known_devices_text, parse, status_filter

MARKER_ROOT = "edge-ad/decommission"
SILENCE_INTERVALS = 3       # telemetry intervals a device whose status says online must stay silent to be taken
SILENCE_MARGIN_S = 2.0      # ... and these seconds more
DEFAULT_TELEMETRY_S = 10.0  # telemetry.interval_s's default: for a birth that does not name it (an older edge-ad)


def _connected(broker: BrokerSettings, client_id: str, timeout: float, *, on_connect=None,
               **callbacks) -> paho.Client:
    """A client connected with a clean start (``on_connect(client)`` runs in the CONNACK callback; the other
    ``callbacks``, such as ``on_message``, are set before it connects); raises :class:`RuntimeFailure` naming
    the broker when it is not within ``timeout``."""
    done = threading.Event()
    problem: list[str] = []
    client = make_client(broker, client_id, persistent=False, jitter=False)

    def connected(c, userdata, flags, reason_code, properties):
        if reason_failed(reason_code):
            problem.append(f"{refused_text(broker, reason_code)} (client id {client_id!r})")
        elif on_connect is not None:
            on_connect(c)
        done.set()

    client.on_connect = connected
    for name, callback in callbacks.items():
        setattr(client, name, callback)
    connect_async(client, broker, clean_start=True)
    client.loop_start()
    if not done.wait(timeout) or problem:
        failure = RuntimeFailure(problem[0]) if problem else not_connected(client, broker, "decommission", timeout)
        client.disconnect()
        client.loop_stop()
        raise failure
    return client


def _close(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


def read_retained(broker: BrokerSettings, filters: list[str], timeout: float = 10.0) -> dict[str, bytes]:
    """{topic: payload} of the retained messages the broker holds under ``filters`` (empty ones are not
    kept by the broker). Returns once the broker has sent them all (see the module's docstring)."""
    marker = f"{MARKER_ROOT}/{uuid.uuid4().hex}"
    found: dict[str, bytes] = {}
    back = threading.Event()

    def subscribe(c):
        c.subscribe([(f, 1) for f in filters] + [(marker, 1)])

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        c.publish(marker, b"1", qos=1)

    def on_message(c, userdata, message):
        if message.topic == marker:
            back.set()
        elif message.retain and message.payload:
            found[message.topic] = bytes(message.payload)

    client = _connected(broker, f"edge-ad-decommission-{uuid.uuid4().hex[:10]}", timeout, on_connect=subscribe,
                        on_message=on_message, on_subscribe=on_subscribe)
    try:
        if not back.wait(timeout):
            raise RuntimeFailure(f"{broker.safe_url}: the retained messages under {', '.join(filters)} did not "
                                 f"arrive within {timeout:g} s (the broker's ACL must let this login subscribe to "
                                 f"them and publish and subscribe to {MARKER_ROOT}/#)")
    finally:
        _close(client)
    return found


def _heard(broker: BrokerSettings, site: str, device: str, window: float, timeout: float) -> str | None:
    """Watch ``site``/``device`` for ``window`` s, from when the broker holds the subscription: the topic of the
    first message the device publishes (telemetry, results, events, a status or calibration published now: not
    one the broker kept retained, nor a command or reply others publish under its topics), or None when it
    published nothing."""
    base = Topics(site, device).base
    heard: list[str] = []
    came, ready = threading.Event(), threading.Event()

    def on_message(c, userdata, message):
        parsed = parse(message.topic)
        if not message.retain and parsed is not None and parsed[2].startswith(KINDS):
            heard.append(message.topic)
            came.set()

    client = _connected(broker, f"edge-ad-decommission-{uuid.uuid4().hex[:10]}", timeout,
                        on_connect=lambda c: c.subscribe(f"{base}/#", 1), on_message=on_message,
                        on_subscribe=lambda *a: ready.set())
    try:
        if not ready.wait(timeout):
            raise RuntimeFailure(f"{broker.safe_url}: the subscription to {base}/# was not acknowledged within "
                                 f"{timeout:g} s; nothing was changed")
        came.wait(window)
    finally:
        _close(client)
    return heard[0] if heard else None


def _telemetry_interval(status: dict) -> float | None:
    """The telemetry interval a device's birth names (``telemetry_interval_s``), None when it names none."""
    v = finite_number(status.get("telemetry_interval_s"))
    return v if v is not None and v > 0 else None


def _clear(broker: BrokerSettings, topics: list[str], timeout: float) -> dict[str, str]:
    """Publish an empty retained message (QoS 1) to each of ``topics``, each acknowledged within ``timeout``;
    returns {topic: why} of those the broker refused in its PUBACK (MQTT v5)."""
    refused: dict[int, str] = {}

    def on_publish(c, userdata, mid, reason_code, properties):
        if reason_failed(reason_code):
            code = reason_value(reason_code)
            refused[mid] = reason_text(reason_code) + (f", reason code 0x{code:02X}" if code is not None else "")

    client = _connected(broker, f"edge-ad-decommission-{uuid.uuid4().hex[:10]}", timeout, on_publish=on_publish)
    try:
        sent = [(topic, client.publish(topic, b"", qos=1, retain=True)) for topic in topics]
        for topic, info in sent:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise RuntimeFailure(f"{broker.safe_url}: clearing {topic} was not acknowledged within {timeout:g} s; "
                                     "run decommission again")
    finally:
        _close(client)
    return {topic: refused[info.mid] for topic, info in sent if info.mid in refused}


def _not_cleared(broker: BrokerSettings, where: str, left: dict[str, bytes], refused: dict[str, str],
                 cleared: list[str], status_topic: str) -> RuntimeFailure:
    """The failure for retained messages still held after they were cleared: each topic and why, what was
    cleared, and what to do."""
    login = broker.credentials()[0]
    v5 = broker.protocol == Protocol.V5
    why: dict[str, list[str]] = {}     # why -> the topics it holds for that
    for t in sorted(left):
        why.setdefault(f"the broker refused the clear: {refused[t]}" if t in refused else
                       "the broker acknowledged the clear and still holds it: something published it again (is the "
                       "device running?)" if v5 else
                       "the broker acknowledged the clear and dropped it: MQTT 3.1.1 cannot say why, most often its "
                       "ACL", []).append(t)
    kept = (f"; its status {status_topic} is cleared last, so it was left as it was" if status_topic not in left
            and status_topic not in cleared else "")
    if refused.keys() & left.keys() or not v5:
        todo = (f"the broker's ACL must let this login ({repr(login) if login else 'anonymous'}) publish to them: "
                "allow it (or clear them as a user that may), then run decommission again")
    else:
        todo = "stop whatever publishes them (edge-ad on the device), then run decommission again"
    return RuntimeFailure(
        f"{broker.safe_url} still holds {len(left)} retained message(s) of {where} after decommission cleared them: "
        + "; ".join(f"{', '.join(ts)} ({w})" for w, ts in why.items())
        + f". To take it off, {todo}. Cleared: " + (", ".join(cleared) or "none") + kept
        + "; the session was not dropped")


def decommission(broker: BrokerSettings, site: str, device: str, *, client_id: str | None = None,
                 homeassistant_prefix: str = "homeassistant", timeout: float = 10.0,
                 force: bool = False, silence_s: float | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Clear every retained message of ``site``/``device`` and drop its broker session; refuse (nothing
    changed, :class:`RuntimeFailure`) while its retained status says ``online`` (with ``force``: while the device
    publishes something within ``silence_s``, default :data:`SILENCE_INTERVALS` x the telemetry interval its
    birth names + :data:`SILENCE_MARGIN_S`, said first to ``progress``), and, unless ``force``, while
    it is the last will (the device may be running behind a network cut) or when the broker holds no retained
    message of it that this login can read (:func:`_nothing_held`). The session dropped is that of
    ``client_id`` when given, else of the client id the retained status names (:func:`_session_client_id`).
    Returns what was done, with ``warnings``."""
    settings = MqttSettings(site=site, device=device, client_id=client_id,
                            homeassistant_prefix=homeassistant_prefix, command_secret=None)
    topics = retained_topics(settings)
    status_topic = Topics(site, device).status
    held = read_retained(broker, topics, timeout)
    if not held and not force:
        raise RuntimeFailure(_nothing_held(broker, site, device, client_id or settings.effective_client_id, timeout))
    state, body = status_state(held[status_topic]) if status_topic in held else (None, {})
    warnings: list[str] = []
    if state == "online":
        since = status_since(body)
        interval = _telemetry_interval(body)
        window = silence_s if silence_s is not None else \
            SILENCE_INTERVALS * (interval or DEFAULT_TELEMETRY_S) + SILENCE_MARGIN_S
        how = (f"{window:g} s (--silence)" if silence_s is not None else
               f"{window:g} s ({SILENCE_INTERVALS} x its telemetry interval of {interval:g} s + "
               f"{SILENCE_MARGIN_S:g} s)" if interval is not None else
               f"{window:g} s ({SILENCE_INTERVALS} x the default telemetry interval of {DEFAULT_TELEMETRY_S:g} s + "
               f"{SILENCE_MARGIN_S:g} s: its birth names none)")
        said = (f"{site}/{device} is online{since} (its retained status on {status_topic}, client id "
                f"{body.get('client_id') or settings.effective_client_id})")
        if not force:
            raise RuntimeFailure(f"{said}: stop edge-ad on it first (sudo systemctl disable --now edge-ad), then "
                                 "decommission it; if it is stopped already (killed, powered off, cut off the "
                                 "network), wait for its will: the broker publishes it 1.5 x the device's "
                                 "mqtt.keepalive_s (30 s by default) after the connection was lost. A device that "
                                 "stopped while the broker was down gets no will (a broker restarted from its saved "
                                 "state had no connection to lose) and says online for ever: --force takes it once "
                                 f"it has published nothing for {how}. Nothing was changed")
        if progress is not None:
            progress(f"{said}: watching {window:g} s for a message from it (--force takes it only if it publishes "
                     "nothing)")
        topic = _heard(broker, site, device, window, timeout)
        if topic is not None:
            raise RuntimeFailure(f"{said} and running: it published on {topic} while decommission watched. Stop "
                                 "edge-ad on it first (sudo systemctl disable --now edge-ad), then decommission it; "
                                 "nothing was changed")
        warnings.append(f"the retained status of {site}/{device} on {status_topic} says online{since}, but it "
                        f"published nothing for {how}: taken as a status left by a device that is not running (one "
                        "that stopped while the broker was down gets no will: a broker restarted from its saved "
                        "state had no connection to lose) (taken: --force)")
    if state == "offline" and body.get("reason") == "will":
        why = (f"the last status of {site}/{device} on {status_topic} is its will: the broker published it when the "
               "device's connection was lost, as it does for a device powered off and for one still running behind "
               "a network cut, which would publish everything again and start a new session when it reconnects")
        if not force:
            raise RuntimeFailure(f"{why}. Make sure edge-ad is stopped on it (sudo systemctl disable --now edge-ad) "
                                 "or that it is gone for good, then run decommission again with --force; nothing "
                                 "was changed")
        warnings.append(f"{why} (taken: --force)")
    if not held:   # a Mosquitto ACL that denies reading grants the subscription and delivers nothing
        warnings.append(f"the broker holds no retained message of {site}/{device} that this login can read: it was "
                        "decommissioned already or never connected; or the broker's ACL does not let this login read "
                        "its topics, and then it was not checked to be stopped, nor were the clears checked (taken: "
                        "--force)")
    session, source = _session_client_id(settings, client_id, body, warnings)
    cleared: list[str] = []
    # the status last: while something else cannot be cleared, the device keeps its last status
    for batch in ([t for t in topics if t != status_topic], [status_topic]):
        refused = _clear(broker, batch, timeout)
        left = read_retained(broker, batch, timeout)   # under 3.1.1 a broker drops a refused publish silently
        if left:
            raise _not_cleared(broker, f"{site}/{device}", left, refused,
                               cleared + [t for t in batch if t not in left], status_topic)
        cleared += batch
    # the device's own client id with a clean start: the broker discards the session it kept, and the new one
    # (session expiry 0, or clean_session=True under 3.1.1) ends with this connection
    _close(_connected(broker, session, timeout))
    return {"site": site, "device": device, "status": state or "none", "reason": body.get("reason"),
            "cleared": cleared, "held": sorted(held), "session_dropped": session, "client_id_from": source,
            "warnings": warnings}


def _nothing_held(broker: BrokerSettings, site: str, device: str, session: str, timeout: float) -> str:
    """Why a device of which the broker holds no retained message this login can read is not decommissioned
    without ``force``: a mistyped site or device (the devices that have a retained status are named), one
    decommissioned already or never connected, or an ACL that hides its topics; nothing was changed."""
    try:
        known = known_devices_text(site, device, read_retained(broker, [status_filter()], timeout))
    except RuntimeFailure as exc:
        known = f"the devices that have one could not be read ({exc})"
    return (f"{broker.safe_url} holds no retained message of {site}/{device} that this login can read (no status, "
            f"calibration or Home Assistant config): is --site or --device mistyped? {known[0].upper()}{known[1:]}. "
            "Else it was decommissioned already or never connected, or the broker's ACL does not let this login read "
            "its topics (then it cannot be checked to be stopped, nor can the clears be checked). Nothing was changed; "
            f"--force clears its topics and drops the session of client id {session!r} all the same")


def _session_client_id(settings: MqttSettings, given: str | None, status: dict,
                       warnings: list[str]) -> tuple[str, str]:
    """The client id whose session to drop, and where it came from: ``given`` (``--client-id``); else the one
    the device's retained status names (``status``: every status a device publishes carries it, its
    ``mqtt.client_id`` included); else ``edge-ad-<site>-<device>`` (``default``: the device's own unless its
    config sets ``mqtt.client_id``). What does not add up goes to ``warnings``."""
    named = status.get("client_id")
    if named is not None and client_id_problem(named) is not None:
        warnings.append(f"the client id its retained status names cannot be one, not used: {client_id_problem(named)}")
        named = None
    if given is not None:
        if named is not None and named != given:
            warnings.append(f"--client-id {given!r} is not the client id its retained status names ({named!r}): "
                            f"the session of {given!r} was dropped, not that of {named!r} (run again with "
                            f"--client-id {named!r} to drop that one)")
        return given, "--client-id"
    if named is not None:
        return named, "status"
    warnings.append(f"no retained status names its client id: the session of the default one, "
                    f"{settings.effective_client_id!r}, was dropped; give --client-id when the device's config sets "
                    "mqtt.client_id")
    return settings.effective_client_id, "default"
