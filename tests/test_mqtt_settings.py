"""MQTT settings: URLs, credentials (settings, URL, environment at build time), TLS files, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge_ad.errors import InputError
from edge_ad.mqtt import MqttSettings, redact_url
from edge_ad.mqtt.settings import BrokerSettings, Protocol


def test_defaults_and_derived():
    s = MqttSettings(url="mqtt://broker.local", site="p1", device="cam-3")
    assert (s.host, s.port, s.tls) == ("broker.local", 1883, False)
    assert s.effective_client_id == "edge-ad-p1-cam-3"
    assert s.effective_outbox_path.name == "outbox-p1-cam-3.sqlite"
    t = MqttSettings(url="mqtts://10.0.0.5", site="p1", device="d")
    assert (t.port, t.tls) == (8883, True)
    assert MqttSettings(url="mqtt://h:1999").port == 1999
    assert MqttSettings(url="mqtt://h", protocol="3.1.1").protocol is Protocol.V311


@pytest.mark.parametrize("url, needle", [
    ("http://host", "scheme 'http'"),
    ("mqtt://", "no host"),
    ("mqtt://host/path", "no path"),
    ("mqtt://host:99999", "url"),
])
def test_bad_url_names_the_field(url, needle):
    with pytest.raises(InputError) as exc:
        MqttSettings(url=url)
    assert "mqtt.url" in str(exc.value) and needle in str(exc.value)


def test_bad_names_and_values():
    with pytest.raises(InputError, match=r"mqtt\.site.*topic-safe"):
        MqttSettings(site="a/b")
    with pytest.raises(InputError, match=r"mqtt\.device"):
        MqttSettings(device="x+")
    with pytest.raises(InputError, match=r"mqtt\.keepalive_s"):
        MqttSettings(keepalive_s=1)
    with pytest.raises(InputError, match=r"mqtt\.bogus"):
        MqttSettings(bogus=1)
    with pytest.raises(InputError, match=r"ca_file .* does not exist"):
        MqttSettings(url="mqtts://h", ca_file="/nonexistent/ca.pem")
    with pytest.raises(InputError, match="needs its key"):
        MqttSettings(url="mqtts://h", cert_file=__file__)
    with pytest.raises(InputError, match=r"cfg\.mqtt\.site"):
        MqttSettings.from_mapping({"site": ""}, where="cfg.mqtt")


def test_an_event_image_must_fit_in_the_outbox():
    with pytest.raises(InputError, match="image_max_bytes 2097152 > outbox_max_bytes 65536"):
        MqttSettings(outbox_max_bytes=64 * 1024)
    assert MqttSettings(outbox_max_bytes=64 * 1024, image_max_bytes=32 * 1024).image_max_bytes == 32 * 1024


def test_credentials_from_env_at_build_time(monkeypatch):
    monkeypatch.delenv("EDGE_AD_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("EDGE_AD_MQTT_PASSWORD", raising=False)
    before = MqttSettings()
    assert before.credentials() == (None, None)
    monkeypatch.setenv("EDGE_AD_MQTT_USERNAME", "edge")
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", "pw-from-env")
    assert before.credentials() == (None, None)          # read when built, not later
    s = MqttSettings()
    assert s.credentials() == ("edge", "pw-from-env")
    assert "pw-from-env" not in repr(s) and "pw-from-env" not in str(s.model_dump())
    explicit = MqttSettings(username="u", password="p")
    assert explicit.credentials() == ("u", "p")


def test_url_credentials_are_used_and_redacted(monkeypatch):
    monkeypatch.delenv("EDGE_AD_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("EDGE_AD_MQTT_PASSWORD", raising=False)
    s = MqttSettings(url="mqtts://alice:s%40cret@broker:8883")
    assert s.credentials() == ("alice", "s@cret")
    assert s.safe_url == "mqtts://***@broker:8883"
    assert "s%40cret" not in repr(s) and "s%40cret" not in str(s) and "***@broker" in repr(s)
    assert "cret" not in s.safe_url
    assert redact_url("mqtt://h:1") == "mqtt://h:1"
    with pytest.raises(InputError) as exc:
        MqttSettings(url="ftp://bob:hunter2@h")
    assert "hunter2" not in str(exc.value)


def test_url_user_info_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("EDGE_AD_MQTT_USERNAME", "service-user")
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", "service-pw")
    # before: ('service-user', 'alice-pw'), a mix of two identities
    assert MqttSettings(url="mqtt://alice:alice-pw@broker").credentials() == ("alice", "alice-pw")
    assert MqttSettings(url="mqtt://broker").credentials() == ("service-user", "service-pw")
    assert MqttSettings(url="mqtt://alice:pw@broker", username="bob").credentials() == ("bob", "pw")


@pytest.mark.parametrize("url", ["mqtt://plant:S3cretPW@broker:99999", "mqtt://plant:S3cretPW@broker:abc"])
def test_a_bad_port_is_an_error_without_the_password(url):
    with pytest.raises(InputError) as exc:          # was a traceback whose pydantic input showed the password
        MqttSettings(url=url)
    assert "S3cretPW" not in str(exc.value) and "mqtt.url" in str(exc.value)
    assert "S3cretPW" not in redact_url(url)


@pytest.mark.parametrize("field, value", [("site", "plant1\n"), ("device", "cam\n"),
                                          ("command_max_skew_s", float("inf")),
                                          ("command_max_skew_s", float("nan")),
                                          ("image_min_interval_s", float("inf"))])
def test_trailing_newlines_and_unbounded_windows_are_refused(field, value):
    with pytest.raises(InputError, match=rf"mqtt\.{field}"):
        MqttSettings(**{field: value})


def test_command_secret_from_env(monkeypatch):
    monkeypatch.setenv("EDGE_AD_MQTT_COMMAND_SECRET", "shh")
    s = MqttSettings()
    assert s.command_secret is not None and s.command_secret.get_secret_value() == "shh"
    assert "shh" not in repr(s)


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_an_empty_command_secret_is_refused_wherever_it_comes_from(monkeypatch, value):
    # was: "" from a config signed commands with an empty HMAC key (anyone could sign them), and an empty
    # $EDGE_AD_MQTT_COMMAND_SECRET (an env file's "EDGE_AD_MQTT_COMMAND_SECRET=") turned signing off silently
    monkeypatch.delenv("EDGE_AD_MQTT_COMMAND_SECRET", raising=False)
    with pytest.raises(InputError, match=r"mqtt\.command_secret.*(empty|blank).*anyone") as ei:
        MqttSettings(command_secret=value)
    assert "EDGE_AD_MQTT_COMMAND_SECRET" not in str(ei.value)
    # an empty user name or password still means "not set" (never sent to the broker)
    assert MqttSettings(username="", password=" ").credentials() == (None, None)
    monkeypatch.setenv("EDGE_AD_MQTT_COMMAND_SECRET", value)
    with pytest.raises(InputError, match=r"mqtt\.command_secret.*\$EDGE_AD_MQTT_COMMAND_SECRET is set but"):
        MqttSettings()
    s = MqttSettings(command_secret="a-long-enough-secret")   # the field wins over the variable, as before
    assert s.command_secret.get_secret_value() == "a-long-enough-secret"


def test_a_short_command_secret_is_taken_with_a_warning_at_start(tmp_path, caplog):
    pytest.importorskip("paho.mqtt")
    from edge_ad.mqtt import MqttLink

    def started(secret):
        caplog.clear()
        link = MqttLink(MqttSettings(url="mqtt://127.0.0.1:1", command_secret=secret,
                                     outbox_path=tmp_path / "o.sqlite"))
        with caplog.at_level("WARNING", logger="edge_ad.mqtt.link"):
            link.start()
        link.stop(timeout=0.5)
        return [r.getMessage() for r in caplog.records if "command_secret is" in r.getMessage()]

    warned = started("k3y")
    assert len(warned) == 1 and "3 characters" in warned[0] and "k3y" not in warned[0]
    assert started("0123456789abcdef") == []


def test_broker_settings_is_the_shared_base():
    b = BrokerSettings(url="mqtt://127.0.0.1:1")
    assert b.port == 1 and not b.tls


def test_mqtt_package_does_not_import_torch():
    code = ("import sys, edge_ad.mqtt, edge_ad.mqtt.monitor, edge_ad.mqtt.broker, edge_ad.mqtt.requester, "
            "edge_ad.mqtt.collector, edge_ad.mqtt.homeassistant; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_unreadable_tls_files_fail_at_start_naming_them(tmp_path):
    from edge_ad.mqtt import MqttLink

    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate")
    link = MqttLink(MqttSettings(url="mqtts://127.0.0.1:1", ca_file=junk, outbox_path=tmp_path / "o.sqlite"))
    with pytest.raises(InputError, match=r"ca_file=.*ca\.pem"):
        link.start()
    link.stop(timeout=0)


def test_the_errors_docs_mqtt_md_quotes_are_the_ones_raised(monkeypatch):
    """docs/mqtt.md quoted `mqtt.url = 'http://x': Value error, scheme ...` and `mqtt.command_secret: Value error,
    $EDGE_AD_MQTT_COMMAND_SECRET is set but empty ...`: pydantic's 'Value error, ' prefix, which the messages never
    carry (the settings strip it). The quotes are now checked against the errors raised, and no document quotes
    that prefix."""
    import re
    from pathlib import Path

    from edge_ad.config import load_settings

    root = Path(__file__).resolve().parents[1]
    text = " ".join((root / "docs" / "mqtt.md").read_text("utf-8").split())   # quotes may wrap lines

    def quoted(after: str) -> str:
        return re.search(re.escape(after) + r".*?`([^`]+)`", text).group(1)

    with pytest.raises(InputError) as ei:
        MqttSettings(url="http://x")
    assert quoted("A bad value raises `InputError` naming the field, e.g.") == str(ei.value)
    monkeypatch.setenv("EDGE_AD_MQTT_COMMAND_SECRET", "")
    with pytest.raises(InputError) as ei:
        load_settings(None, [(["model", "bundle"], "b", "t"), (["source", "uri"], "synthetic://", "t"),
                             (["mqtt", "site"], "p1", "t")], environ={})
    # a quote with '...' leaves text out: the rest, in order, is the message's
    parts = quoted("naming where it came from, e.g.").split(" ... ")
    assert len(parts) == 2 and parts[0] in str(ei.value) and str(ei.value).endswith(parts[1]), (parts, str(ei.value))
    assert str(ei.value).index(parts[0]) < str(ei.value).rindex(parts[1])
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "jetson").glob("*.md"))]:
        assert "Value error," not in doc.read_text("utf-8"), doc
