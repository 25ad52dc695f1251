"""A configured paho-mqtt client (callback API v2): protocol, TLS, credentials, back-off, logging.

Shared by the device link, the fleet monitor, the command client and the result collector, so every
one of them treats URLs, TLS files and credentials the same way.
"""

from __future__ import annotations

import logging
import random
import ssl
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from ..errors import InputError
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
    return client


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
