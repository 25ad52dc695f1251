"""A configured paho-mqtt client (callback API v2): protocol, TLS, credentials, back-off, logging.

Shared by the device link, the fleet monitor, the command client and the result collector, so every
one of them treats URLs, TLS files and credentials the same way.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
import struct
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from ..errors import InputError, RuntimeFailure
from .settings import BrokerSettings, Protocol

log = logging.getLogger(__name__)


def make_client(settings: BrokerSettings, client_id: str, *, persistent: bool = False, jitter: bool = True,
                max_inflight: int | None = None) -> paho.Client:
    """A paho client ready for ``connect_async`` (see :func:`connect_async`). Nothing touches the network.

    ``jitter`` spreads the first reconnect delay over [min, 2*min) so a fleet does not reconnect in
    lock-step after a broker restart. ``persistent`` asks for a session the broker keeps (MQTT 3.1.1:
    ``clean_session=False``; v5 passes ``clean_start`` and the expiry to :func:`connect_async`).
    """
    protocol = paho.MQTTv5 if settings.protocol == Protocol.V5 else paho.MQTTv311
    kwargs: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": client_id,
                              "protocol": protocol}
    if protocol == paho.MQTTv311:
        kwargs["clean_session"] = not persistent
    client = paho.Client(**kwargs)
    user, password = settings.credentials()
    if user is not None or password is not None:
        client.username_pw_set(user, password)
    if settings.tls:
        try:
            client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                           certfile=str(settings.cert_file) if settings.cert_file else None,
                           keyfile=str(settings.key_file) if settings.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise InputError(f"mqtt TLS files (ca_file={settings.ca_file}, cert_file={settings.cert_file}, "
                             f"key_file={settings.key_file}): {exc}") from None
        if settings.tls_insecure:
            client.tls_insecure_set(True)
    elif settings.ca_file or settings.cert_file:
        log.warning("mqtt: ca_file / cert_file given but the URL %s is not mqtts://; TLS is off",
                    settings.safe_url)
    low = settings.reconnect_min_s * (1.0 + random.random()) if jitter else settings.reconnect_min_s
    client.reconnect_delay_set(min_delay=low, max_delay=max(low, settings.reconnect_max_s))
    client.connect_timeout = settings.connect_timeout_s
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)
    if log.isEnabledFor(logging.DEBUG):
        client.enable_logger(logging.getLogger("edge_ad.mqtt.paho"))
    _keep_connect_errors(client)
    if protocol == paho.MQTTv5:
        _read_refusing_pubacks(client)
    return client


class PubackRefusal(ReasonCode):
    """A PUBACK's failure reason code that MQTT v5 does not list for a PUBACK, such as 0x95 Packet too large,
    which Mosquitto 2.0 sends for a message over its ``message_size_limit``: named as the spec names the code
    where it allows it (a CONNACK or DISCONNECT), else ``Unknown reason``."""

    def __init__(self, value: int):
        super().__init__(PacketTypes.PUBACK)
        self.value = int(value)

    def getName(self) -> str:  # noqa: N802 - paho's name
        return next(iter(self.names.get(self.value, {})), "Unknown reason")


def _puback_lists(code: int) -> bool:
    """Does MQTT v5 (paho's table) allow ``code`` in a PUBACK? (The table of an instance: paho 2.0 and 2.1 make it
    in ``__init__``, 2.2 on the class.)"""
    return any(PacketTypes.PUBACK in types for types in ReasonCode(PacketTypes.PUBACK).names.get(code, {}).values())


def _read_refusing_pubacks(client: paho.Client) -> None:
    """Read a PUBACK whose failure reason code (0x80 or more) MQTT v5 does not allow in a PUBACK, and hand it to
    ``on_publish`` as the refusal it is (:class:`PubackRefusal`). paho-mqtt 2.2 rejects such a PUBACK as a malformed
    packet and closes the connection (Protocol error), though its packet id says which message it answers: a
    message Mosquitto 2.0 refuses for its ``message_size_limit`` (0x95) was then sent again at every reconnect,
    and everything behind it in the outbox waited for ever. Other PUBACKs go to paho as they are. Left out (paho
    reads them all itself) when this paho lacks the internals it takes (a later version may read them itself)."""
    handle = getattr(client, "_handle_pubackcomp", None)
    if handle is None or not all(hasattr(client, a) for a in ("_in_packet", "_out_message_mutex", "_out_messages",
                                                               "_do_on_publish")):
        return

    def handle_pubackcomp(cmd):
        try:
            packet = client._in_packet.get("packet", b"") if cmd == "PUBACK" else b""
            if len(packet) < 3 or packet[2] < 0x80 or _puback_lists(packet[2]):
                return handle(cmd)
        except Exception:  # noqa: BLE001 - never kill paho's network thread over this reading: paho reads it
            log.debug("mqtt: PUBACK not read here, paho reads it", exc_info=True)
            return handle(cmd)
        mid, code = struct.unpack("!H", packet[:2])[0], packet[2]
        log.debug("mqtt: PUBACK for message %d with reason code 0x%02X, which MQTT v5 does not allow in a PUBACK: "
                  "taken as a refusal", mid, code)
        with client._out_message_mutex:
            if mid in client._out_messages:
                return client._do_on_publish(mid, PubackRefusal(code), Properties(PacketTypes.PUBACK))
        return paho.MQTT_ERR_SUCCESS

    client._handle_pubackcomp = handle_pubackcomp


def _keep_connect_errors(client: paho.Client) -> None:
    """Keep on ``client`` the error of its last failed connection attempt (``connect_error``; None once one
    succeeds): paho's network thread catches it and retries, and its ``on_connect_fail`` gets no reason, so a
    "cannot connect" could not say whether the port refused, the host was unreachable or TLS failed."""
    attempt = client.reconnect

    def reconnect(*args, **kwargs):
        try:
            done = attempt(*args, **kwargs)
        except OSError as exc:   # refused, unreachable, DNS, TLS (ssl.SSLError), timed out
            client.connect_error = exc
            raise
        client.connect_error = None
        return done

    client.connect_error = None
    client.reconnect = reconnect   # paho's loop calls self.reconnect(): this one


def connect_error_text(exc: OSError, settings: BrokerSettings) -> str:
    """Why a connection attempt to ``settings``' broker failed, in words, with what to check."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or exc
        return (f"TLS: the certificate of {where} was not accepted ({why}); check the CA (--ca-file, mqtt.ca_file) and "
                "that the URL's host name is the one in the certificate")
    if isinstance(exc, ssl.SSLError):
        why = getattr(exc, "reason", None) or exc
        return (f"TLS handshake with {where} failed ({why}): is it a TLS port (mqtts:// talks TLS), and are the CA "
                "and the client certificate and key right?")
    if isinstance(exc, socket.gaierror):
        return f"DNS: the host name {settings.host!r} cannot be resolved ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: no broker listens on that port (it is down, or the port is wrong)"
    if isinstance(exc, TimeoutError):
        return (f"no answer from {where} within {settings.connect_timeout_s:g} s: the host is down or a firewall "
                "drops the connection")
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {where} ({exc.strerror}): the host or its network cannot be reached from here"
    if isinstance(exc, ConnectionResetError):
        return (f"{where} reset the connection ({exc.strerror}): is the URL's scheme the port's (mqtt:// for a plain "
                "port, mqtts:// for a TLS one)?")
    return f"{where}: {exc.strerror or exc}"


# what to check when the broker refuses the login: a CLI tool's (its options) and the device's (its service files)
CLI_LOGIN_HINT = "check the user name and password: --username and $EDGE_AD_MQTT_PASSWORD, or mqtt.username"
DEVICE_LOGIN_HINT = ("check the user name and password: mqtt.username in the config, EDGE_AD_MQTT_PASSWORD in "
                     "edge-ad.env or the URL's password, and that the broker's ACL lets this user connect")


def refused_text(settings: BrokerSettings, reason_code: Any, hint: str = CLI_LOGIN_HINT) -> str:
    """The broker answered the connection with a refusal (a failed CONNACK): its reason, and for the login
    refusals what to check (``hint``: :data:`CLI_LOGIN_HINT` for a CLI tool, :data:`DEVICE_LOGIN_HINT` for the
    device's link)."""
    why = f"the broker {settings.safe_url} refused the connection: {reason_text(reason_code)}"
    if reason_value(reason_code) in (0x86, 0x87, 4, 5):   # bad user name or password, not authorized (3.1.1: 4, 5)
        why += f" ({hint})"
    return why


def not_connected(client: paho.Client, settings: BrokerSettings, what: str, timeout: float,
                  refused: str | None = None) -> RuntimeFailure:
    """The error of a client (``what``: whose) that had no connection within ``timeout`` s: the broker's URL and
    the reason (``refused``: the broker's refusal, :func:`refused_text`; else the last attempt's error)."""
    exc = getattr(client, "connect_error", None)
    why = refused or (connect_error_text(exc, settings) if exc is not None else
                      f"no MQTT answer from {settings.host}:{settings.port} (a TLS port reached with mqtt://, or a "
                      "broker too busy to answer?)")
    return RuntimeFailure(f"{what}: cannot connect to {settings.safe_url} within {timeout:g} s: {why}")


def connect_async(client: paho.Client, settings: BrokerSettings, *, clean_start: bool,
                  session_expiry_s: int = 0) -> None:
    """Start connecting in paho's network thread (call ``loop_start`` after). Never blocks on the broker."""
    if settings.protocol == Protocol.V5:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry_s:
            props.SessionExpiryInterval = int(session_expiry_s)
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s,
                             clean_start=clean_start, properties=props)
    else:
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)


def is_v5(client: paho.Client) -> bool:
    return client.protocol == paho.MQTTv5


def reason_failed(reason_code: Any) -> bool:
    """True for a failed CONNACK / PUBACK / SUBACK reason (paho gives ReasonCode objects in API v2)."""
    failure = getattr(reason_code, "is_failure", None)
    if failure is not None:
        return bool(failure)
    try:
        return int(reason_code) >= 0x80 or (0 < int(reason_code) < 6)
    except (TypeError, ValueError):
        return True


def reason_text(reason_code: Any) -> str:
    name = getattr(reason_code, "getName", None)
    return name() if callable(name) else str(reason_code)


def reason_value(reason_code: Any) -> int | None:
    """The number of a reason code (paho's ReasonCode, or an int); None when it has none."""
    try:
        return int(getattr(reason_code, "value", reason_code))
    except (TypeError, ValueError):
        return None
