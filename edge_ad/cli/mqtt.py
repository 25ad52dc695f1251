"""``edge-ad monitor`` (fleet view over MQTT), ``edge-ad command`` (send one command, print the reply) and
``edge-ad decommission`` (take a stopped device off the broker)."""

from __future__ import annotations

import json
import os
import sys

import click

from ..errors import DeviceWentOffline, InputError, RuntimeFailure
from . import main
from .types import Seconds


# where --mqtt comes from when not given, first set first: this command's own variable, then the one `edge-ad run`
# reads mqtt.url from (a shell set up for the loop reaches the same broker)
MQTT_URL_ENV = ("EDGE_AD_MQTT_URL", "EDGE_AD_MQTT__URL")


class _EnvOption(click.Option):
    """An option read from several environment variables, named one by one when it is missing (click writes
    the list as a Python list: ``(env var: '['A', 'B']')``)."""

    def get_error_hint(self, ctx) -> str:
        hint = click.Parameter.get_error_hint(self, ctx)
        names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar or ())
        return hint + (f" (or ${', $'.join(names)})" if names else "")


def _broker_options(f):
    f = click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True,
                     help="MQTT protocol version.")(f)
    f = click.option("--insecure", is_flag=True, help="TLS: do not check the broker's host name.")(f)
    f = click.option("--key", "key_file", type=click.Path(dir_okay=False), help="TLS client key (PEM).")(f)
    f = click.option("--cert", "cert_file", type=click.Path(dir_okay=False),
                     help="TLS client certificate (PEM).")(f)
    f = click.option("--ca-file", "--ca", "ca_file", type=click.Path(dir_okay=False),
                     help="TLS CA certificate (PEM) of an mqtts:// broker; --ca is the same option (as doctor's "
                          "--ca-file and the config's mqtt.ca_file).")(f)
    f = click.option("--username", default=None,
                     help="Broker user name (default $EDGE_AD_MQTT_USERNAME; the password comes from "
                          "$EDGE_AD_MQTT_PASSWORD only).")(f)
    f = click.option("--mqtt", "url", cls=_EnvOption, required=True, envvar=list(MQTT_URL_ENV), show_envvar=True,
                     help="Broker URL: mqtt://host[:port] or mqtts://host[:port]. Default: $EDGE_AD_MQTT_URL, "
                          "else $EDGE_AD_MQTT__URL (the variable 'edge-ad run' reads its mqtt.url from).")(f)
    return f


def _broker(url, username, ca_file, cert_file, key_file, insecure, protocol):
    from ..mqtt.settings import BrokerSettings

    kw = {"url": url, "ca_file": ca_file, "cert_file": cert_file, "key_file": key_file, "tls_insecure": insecure,
          "protocol": protocol, "reconnect_min_s": 0.5, "reconnect_max_s": 5.0}
    if username is not None:
        kw["username"] = username
    return BrokerSettings(**kw)


@main.command("monitor")
@_broker_options
@click.option("--site", default=None, help="Only this site (default: every site).")
@click.option("--json", "as_json", is_flag=True, help="Stream one JSON line per device update instead of a table (and one when the monitor "
                   "loses or regains the broker: {\"monitor\": \"disconnected\" | \"reconnected\", ...}).")
@click.option("--duration", type=Seconds(min=0), default=None,
              help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--interval", type=Seconds(min=0.1), default=1.0, show_default=True,
              help="Table refresh interval (s); in a log or a pipe, the least time between two tables "
                   "(one is printed after each change, after a line with the time in UTC: -- 2026-12-07T03:01:32Z --).")
@click.option("--stale-after", type=Seconds(min=1), default=60.0, show_default=True,
              help="An online device silent this long shows as stale (s).")
@click.option("--clock-skew", type=Seconds(min=1), default=60.0, show_default=True,
              help="A device whose clock differs from this machine's by more is flagged (CLOCK: skew +N s) (s).")
@click.option("--gap-grace", type=Seconds(min=0), default=5.0, show_default=True,
              help="A gap in a device's seq waits this long for the device's announcement of its drops before "
                   "it counts as MISSING and is warned of (s).")
def monitor(url, username, ca_file, cert_file, key_file, insecure, protocol, site, as_json, duration, interval,
            stale_after, clock_skew, gap_grace):
    """Live table of every device under edge-ad/v1/<site>/<device>/: online or offline, fps, latency,
    NG rate, last result, calibration version, outbox depth, drift, last seen, clock skew. A lost broker
    connection is shown (and retried) until it is back."""
    from ..mqtt.monitor import run_monitor
    from ..mqtt.settings import check_name

    if site is not None:   # a name no device can have would show nothing
        check_name(site, "--site")
    broker = _broker(url, username, ca_file, cert_file, key_file, insecure, protocol)
    run_monitor(broker, site=site, as_json=as_json, duration=duration, interval=interval,
                stale_after_s=stale_after, out=sys.stdout, clock_skew_s=clock_skew, gap_grace_s=gap_grace)


@main.command("command")
@_broker_options
@click.option("--site", required=True, help="Site of the device.")
@click.option("--device", required=True, help="Device name.")
@click.option("--timeout", type=Seconds(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the reply. MQTT v5: also the command's message expiry (rounded up): "
                   "the broker drops a command it could not deliver by then, and the device does not start "
                   "one that waited that long behind another command, so it never runs late.")
@click.option("--client-id", "claim", default=None, help="Requester id the device's allow-list checks.")
@click.option("--even-offline", is_flag=True,
              help="Send also when the device's retained status says it is offline (the broker queues the command "
                   "in its persistent session; MQTT v5: dropped after --timeout s), and wait for the reply.")
@click.argument("name")
@click.argument("args", required=False)
def command(url, username, ca_file, cert_file, key_file, insecure, protocol, site, device, timeout, claim,
            even_offline, name, args):
    """Send command NAME (status, calibrate, set_threshold, pause, ...) with ARGS (a JSON object) to a
    device and print its reply. Signed with $EDGE_AD_MQTT_COMMAND_SECRET when set. Exit code 1 when
    the device answers with an error (an 'unauthorized' one with a hint on stderr: --client-id, the secret)
    or not within --timeout, or when it stops, or comes back after its will as another process (killed or a
    power cut, then restarted), while it waits: the command's outcome is unknown; 3, nothing sent, when its retained status
    says it is offline (--even-offline sends all the same). When no status is retained for it (a mistyped
    --site or --device, or an ACL that hides it), a note on stderr names the devices that have one, and it
    sends and waits all the same."""
    from ..mqtt.requester import CommandClient, stale_online_text
    from ..mqtt.settings import check_name
    from ..mqtt.topics import check_level

    for value, what in ((site, "--site"), (device, "--device")):   # a name no device can have waits for nothing
        check_name(value, what)
    check_level(name, "NAME")
    parsed = {}
    if args:
        try:
            parsed = json.loads(args)
        except ValueError as exc:
            raise InputError(f"ARGS {args!r}: not JSON ({exc}); expected an object like '{{\"threshold\": 0.5}}'")
        if not isinstance(parsed, dict):
            raise InputError(f"ARGS {args!r}: expected a JSON object")
    secret = os.environ.get("EDGE_AD_MQTT_COMMAND_SECRET") or None
    broker = _broker(url, username, ca_file, cert_file, key_file, insecure, protocol)
    client = CommandClient(broker, secret=secret).start(timeout=min(timeout, 10.0))
    try:
        status = client.last_status(site, device) if even_offline else client.check_online(site, device, timeout)
        if status is None:   # a typo waits the whole --timeout for nothing; an ACL may hide a device that answers
            click.echo(client.no_status_note(site, device, timeout), err=True)
        try:
            reply = client.call(site, device, name, parsed, timeout=timeout, claim=claim)
        except RuntimeFailure as exc:   # no reply: an 'online' status may be one the device could not replace
            if status is None or status[0] != "online" or isinstance(exc, DeviceWentOffline):
                raise
            raise RuntimeFailure(f"{exc} {stale_online_text(site, device, status[1])}") from exc
    finally:
        client.stop()
    click.echo(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        error = reply.get("error") or {}
        if error.get("code") == "unauthorized":
            click.echo(_unauthorized_hint(str(error.get("message") or ""), claim or client.client_id,
                                          secret is not None), err=True)
        sys.exit(1)


def _unauthorized_hint(message: str, claim: str, signed: bool) -> str:
    """What an operator can change when the device refused the command, by what its message says: the
    allow-list, the signature, a replay or the clocks (a message it does not know: each of them)."""
    allow = (f"the device's allow-list (mqtt.command_clients) does not hold the requester id {claim!r}: give an "
             "allowed one with --client-id")
    unsigned = "it was not signed: set $EDGE_AD_MQTT_COMMAND_SECRET to the device's mqtt.command_secret"
    secret = "check that $EDGE_AD_MQTT_COMMAND_SECRET holds the device's mqtt.command_secret"
    if "allow-list" in message:
        what = allow + ("" if signed else f"; if the device also asks for a signature, {unsigned}")
    elif "than this device's clock" in message or "from the device clock" in message:
        what = ("the command's time ('ts') and the device's clock differ by more than it accepts "
                "(mqtt.command_max_skew_s): synchronize this machine's clock and the device's (NTP; see "
                "jetson/README.md, 'Time')")
    elif "replay" in message:
        what = "the device already received this very signed command: send it again (a new 'ts' signs it anew)"
    elif not signed:
        what = unsigned
    elif "signature" in message:
        what = f"the signature does not match: {secret}"
    else:
        what = f"if the device has an allow-list, {allow}; {secret}, and that the clocks are synchronized"
    return f"hint: the device refused the command: {what}."


@main.command("decommission")
@_broker_options
@click.option("--site", required=True, help="Site of the device.")
@click.option("--device", required=True, help="Device name.")
@click.option("--client-id", default=None,
              help="The MQTT client id whose session to drop (default: the one the device's retained status names, "
                   "else edge-ad-<site>-<device>).")
@click.option("--homeassistant-prefix", default="homeassistant", show_default=True,
              help="The device's mqtt.homeassistant_prefix: its Home Assistant discovery configs are cleared too.")
@click.option("--force", is_flag=True,
              help="Take the device also when its last status is the will (the broker published it for a lost "
                   "connection: the device may still be running behind a network cut), when the broker holds no "
                   "retained message of it that this login can read (a mistyped --site or --device, a device "
                   "decommissioned already, or an ACL that hides its topics), and when its status says online "
                   "but it publishes nothing for --silence s (one that stopped while the broker was down gets no "
                   "will).")
@click.option("--silence", type=Seconds(min=0.1), default=None,
              help="With --force, a device whose status says online is taken only when it publishes nothing for "
                   "this long (s); default: 3 x the telemetry interval its birth names + 2 s (32 s for the default "
                   "10 s).")
@click.option("--timeout", type=Seconds(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for the broker at each step.")
def decommission(url, username, ca_file, cert_file, key_file, insecure, protocol, site, device, client_id,
                 homeassistant_prefix, force, silence, timeout):
    """Take a stopped device off the broker for good: clear its retained status, calibration and Home
    Assistant discovery configs (so it leaves edge-ad monitor and Home Assistant), and drop the persistent
    session the broker keeps for its client id (the commands queued for it go with it). Refused, changing
    nothing, while its retained status says online: stop edge-ad on the device first (with --force, one that
    publishes nothing for --silence s is taken: a device that stopped while the broker was down gets no will and
    says online for ever); and, without --force,
    while it is the will, or when the broker holds no retained message of it (a mistyped --site or --device: the
    devices it holds are named). A topic the broker still holds after it was cleared (its ACL does not let this
    login publish there) fails the run (exit 1), naming each and why; the status is cleared last."""
    from ..mqtt.decommission import decommission as run
    from ..mqtt.settings import client_id_problem, name_problem, prefix_problem

    # the device config's rules, named by option (MqttSettings would name mqtt.site, mqtt.device, ...)
    problems = [f"{what} {check(value)}" for value, what, check in (
        (site, "--site", name_problem), (device, "--device", name_problem),
        (client_id, "--client-id", client_id_problem), (homeassistant_prefix, "--homeassistant-prefix", prefix_problem))
        if value is not None and check(value) is not None]
    if problems:
        raise InputError("; ".join(problems))
    broker = _broker(url, username, ca_file, cert_file, key_file, insecure, protocol)
    done = run(broker, site, device, client_id=client_id, homeassistant_prefix=homeassistant_prefix,
               timeout=timeout, force=force, silence_s=silence, progress=lambda said: click.echo(said, err=True))
    click.echo(json.dumps(done, indent=2))
    for warning in done["warnings"]:
        click.echo(f"warning: {warning}", err=True)
