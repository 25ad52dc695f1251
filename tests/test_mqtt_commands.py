"""Commands: every command round-trips with its correlation data; malformed / unknown / invalid / failing
commands get error replies and never stop the loop; allow-list and HMAC guard state-changing commands."""

from __future__ import annotations

import json
import threading
import time
import types
import uuid

import pytest

from edge_ad.errors import InputError, RuntimeFailure
from edge_ad.mqtt import COMMANDS, STATE_CHANGING, MqttLink, MqttSettings, payloads, schema
from edge_ad.mqtt.commands import HMAC_KEY, Dispatcher, Incoming, sign, signed_envelope
from edge_ad.mqtt.requester import CommandClient
from edge_ad.mqtt.settings import BrokerSettings
from edge_ad.mqtt.topics import Topics

VALID_ARGS = {
    "status": {},
    "calibrate": {"frames": 64, "policy": "fpr:0.001", "timeout_s": 30},
    "rollback_calibration": {"version": 3},
    "set_threshold": {"threshold": 0.61, "persist": False},
    "inspect": {"count": 2, "part_id": "P-17"},
    "snapshot": {"heatmap": True, "publish": False, "note": "shift start"},
    "pause": {"reason": "maintenance"},
    "resume": {},
    "reload": {"what": "bundle"},
    "update_model": {"url": "file:///opt/bundles/b2.tar", "sha256": "ab" * 32, "activate": True},
}


def _dispatcher(**kw) -> Dispatcher:
    d = Dispatcher(MqttSettings(site="s", device="d", **kw), Topics("s", "d"))
    for name in COMMANDS:
        d.register(name, lambda args, name=name: {"echo": args, "command": name})
    return d


def _msg(name: str, body=None, raw: bytes | None = None, **kw) -> Incoming:
    data = raw if raw is not None else json.dumps(body or {}).encode()
    return Incoming(name, data, **kw)


def _check_reply(reply) -> dict:
    assert schema.errors("reply", reply.body) == []
    return reply.body


# ----------------------------------------------------------------------------- dispatcher (no broker)
def test_every_command_has_a_schema_and_valid_args_pass():
    d = _dispatcher()
    assert set(VALID_ARGS) == set(COMMANDS)
    for name, args in VALID_ARGS.items():
        schema.validate(f"cmd.{name}", args)
        body = _check_reply(d.handle(_msg(name, args, response_topic="r/t", correlation_data=b"c1")))
        assert body["ok"] and body["result"] == {"echo": args, "command": name}


def test_reply_routing_v5_311_and_default():
    d = _dispatcher()
    r = d.handle(_msg("status", response_topic="my/replies", correlation_data=b"\x00\x01"))
    assert r.topic == "my/replies" and r.correlation_data == b"\x00\x01"
    r = d.handle(_msg("status", {"reply_to": "legacy/replies", "correlation_id": "abc"}))
    assert r.topic == "legacy/replies" and r.body["correlation_id"] == "abc" and r.correlation_data is None
    r = d.handle(_msg("status"))
    assert r.topic == "edge-ad/v1/s/d/reply/status"
    # both (CommandClient under v5 sends both, the same): the v5 response topic and correlation data win
    r = d.handle(_msg("status", {"reply_to": "field/replies", "correlation_id": "f1"}, response_topic="prop/replies",
                      correlation_data=b"p1"))
    assert (r.topic, r.correlation_data, r.body["correlation_id"]) == ("prop/replies", b"p1", "f1")


BAD_REPLY_TOPICS = [
    ("fleet/re\u0000ply", "NUL (U+0000)"),          # the broker closed the connection, at every reconnect
    ("fleet/\u0001", "control character (U+0001)"),
    ("fleet/\u0085", "control character (U+0085)"),
    ("fleet/\ufffe", "non-character (U+FFFE)"),
    ("$SYS/x", "starts with '$'"),                     # clients may not publish there
    ("a/#", "wildcard"),
    ("a/+/b", "wildcard"),
    ("x" * 70_000, "70000 bytes long"),                # paho: ValueError, an ERROR with a traceback and the topic
    ("\u00e9" * 513, "1026 bytes long"),               # bytes, not characters
    ("", "is empty"),
]


@pytest.mark.parametrize("topic, why", BAD_REPLY_TOPICS, ids=range(len(BAD_REPLY_TOPICS)))
def test_a_reply_topic_a_broker_or_paho_refuses_is_refused_and_answered_on_the_default_topic(topic, why, caplog):
    """One unsigned status whose reply_to held a NUL cut the device off the broker for good (the reply was sent
    again at every reconnect); '$SYS/...' got it disconnected; a 70 KB one an ERROR with a traceback. The command
    is refused (malformed, naming the field, the value cut) and the refusal goes to reply/<name>, for reply_to and
    the v5 response topic alike, in the signed form too."""
    seen = []
    d = _dispatcher()
    d.register("status", seen.append)
    with caplog.at_level("WARNING"):
        for field, msg in (("'reply_to'", _msg("status", {"reply_to": topic, "correlation_id": "c1"})),
                           ("the MQTT v5 response topic", _msg("status", response_topic=topic, correlation_data=b"c")),
                           ("the MQTT v5 response topic",   # the response topic wins over a good reply_to
                            _msg("status", {"reply_to": "ok/topic"}, response_topic=topic)),
                           ("'reply_to'", _msg("status", raw=signed_envelope(
                               "k", "edge-ad/v1/s/d/cmd/status", json.dumps({"reply_to": topic}).encode())))):
            r = d.handle(msg)
            body = _check_reply(r)
            assert r.topic == "edge-ad/v1/s/d/reply/status" and body["error"]["code"] == "malformed", body
            text = body["error"]["message"]
            assert text.startswith(f"cmd/status: {field} ") and why in text and "Not run" in text, text
            assert len(text) < 600 and r.correlation_data == msg.correlation_data
            assert d.route(msg)[0] == "edge-ad/v1/s/d/reply/status"
            # refused for it whatever else the link refuses it for (busy, retained)
            r = d.error_reply(msg, "busy", "pause: not run")
            assert (r.topic, r.body["error"]["code"]) == ("edge-ad/v1/s/d/reply/status", "malformed")
    assert seen == [] and max(len(r.getMessage()) for r in caplog.records) < 600
    if "non-character" not in why and "1026" not in why:    # the schema says it too (it counts characters)
        assert schema.errors("command", {"reply_to": topic}) != []


@pytest.mark.parametrize("topic", ["edge-ad/v1/s/d2/cmd/pause", "edge-ad/v1/s/d2/result", "edge-ad/v1/p9/d/status",
                                   "edge-ad/v1/s/d/cmd/pause", "edge-ad/v1/s/d/event", "edge-ad/v1/s/d2/reply/status",
                                   "edge-ad/v1/s/d/reply/", "edge-ad/v1/"])
def test_a_reply_topic_under_the_device_tree_is_refused_but_its_own_replies(topic, caplog):
    """reply_to 'edge-ad/v1/p1/cam2/cmd/pause' made the device publish its reply there with its credentials: a
    command to another device (to its own cmd/pause: one it ran itself), or a result or status that passed for
    another device's. Under edge-ad/v1/ only this device's reply/... is taken; the refusal is malformed, on
    reply/<name>, naming the topic and why, and logged."""
    seen = []
    d = _dispatcher()
    d.register("status", seen.append)
    with caplog.at_level("WARNING"):
        for field, msg in (("'reply_to'", _msg("status", {"reply_to": topic, "correlation_id": "c1"})),
                           ("the MQTT v5 response topic", _msg("status", response_topic=topic, correlation_data=b"c"))):
            r = d.handle(msg)
            body = _check_reply(r)
            assert r.topic == "edge-ad/v1/s/d/reply/status" and body["error"]["code"] == "malformed", body
            assert body["error"]["message"].startswith(
                f"cmd/status: {field} {topic!r} is under edge-ad/v1/, where the devices' status, results, events "
                "and commands go: the reply would pass for a message of the device or a command to it; expected "), body
            assert "not under edge-ad/v1/ but for edge-ad/v1/s/d/reply/<name>). Not run" in body["error"]["message"]
            assert d.route(msg)[0] == "edge-ad/v1/s/d/reply/status"
    assert seen == []
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(logged) == 2 and all(m.startswith("command status from ? refused: malformed: cmd/status: ") and
                                    f"{topic!r} is under edge-ad/v1/" in m for m in logged), logged


def test_reply_topics_of_requesters_and_the_devices_own_replies_are_kept():
    d = _dispatcher()
    for topic in ("edge-ad/replies/cli-1", "edge-ad/v1/s/d/reply/status", "edge-ad/v1/s/d/reply/x/y", "edge-ad/v1x/a",
                  "edge-ad/v1", "Edge-AD/v1/s/d2/cmd/pause", "/edge-ad/v1/s/d2/cmd/pause"):
        r = d.handle(_msg("status", {"reply_to": topic}))
        assert r.topic == topic and r.body["ok"], r.body
        assert d.handle(_msg("status", response_topic=topic)).topic == topic


BAD_LEVELS = [(t.replace("fleet/", "x"), w) for t, w in BAD_REPLY_TOPICS[:4]] + [
    ("a/b", "holds '/'"), ("a+b", "wildcard"), ("#", "wildcard"), ("\u00e9" * 129, "258 bytes long"), ("", "is empty"),
    ("d\ud800", "lone surrogate")]


@pytest.mark.parametrize("level, why", BAD_LEVELS, ids=range(len(BAD_LEVELS)))
def test_a_topic_level_refuses_what_a_broker_closes_the_connection_for(level, why):
    """check_level (sites and devices of the CLI, command names, event ids) refused only '/', '+', '#' and
    characters below U+0020: a C1 control (U+0085) or a non-character passed, and Mosquitto closes the
    connection for them (reply topics were checked for them already: the same check now). An event id that
    cannot be a level names its image's topic by a hash of it instead."""
    import hashlib

    from edge_ad.mqtt.topics import Topics, check_level, image_level, level_problem

    assert why in level_problem(level)
    with pytest.raises(InputError, match="^--device .* expected one topic level") as exc:
        check_level(level, "--device")
    assert why in str(exc.value)
    assert image_level(level) == "sha256-" + hashlib.sha256(level.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    assert Topics("s", "d").event_image_of(level) == "edge-ad/v1/s/d/event/image/" + image_level(level)
    for good in ("line-3", "\u00e9" * 128, "a$b", "074ca0b9-9a03-4049-bf77-a9ebcf7e9b9b"):
        assert check_level(good, "x") == image_level(good) == good


def test_reply_topics_brokers_take_are_kept():
    d = _dispatcher()
    for topic in ("a$b/\u00e9/x", "plant/replies/" + "x" * 1000, "/lead/slash", "a//b", "\u00e9" * 512):
        r = d.handle(_msg("status", {"reply_to": topic}))
        assert r.topic == topic and r.body["ok"], r.body
        assert d.handle(_msg("status", response_topic=topic)).topic == topic
        assert schema.errors("command", {"reply_to": topic}) == []


@pytest.mark.parametrize("raw, code", [
    (b"{not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b'{"threshold": NaN}', "malformed"),
    (b'{"reply_to": "a/#"}', "malformed"),
])
def test_malformed_payloads(raw, code):
    body = _check_reply(_dispatcher().handle(_msg("set_threshold", raw=raw)))
    assert not body["ok"] and body["error"]["code"] == code


@pytest.mark.parametrize("raw, field, shown", [
    (b'{"threshold": NaN}', "threshold", "NaN"),
    (b'{"threshold": -Infinity, "persist": false}', "threshold", "-Infinity"),
    (b'{"threshold": 1e999}', "threshold", "1e999"),             # was parsed as inf and handed to the handler
    (b'{"threshold": -1e400}', "threshold", "-1e400"),
    (b'{"threshold": 1' + b"0" * 400 + b"}", "threshold", "1000"),   # was: OverflowError in float(), 'internal'
    (b'{"frames": 40, "timeout_s": 1e999}', "timeout_s", "1e999"),
    (b'{"threshold": 0.5, "ts": 1e999}', "ts", "1e999"),
    (b'{"threshold": 0.5, "extra": [1, {"deep": NaN}]}', "extra/1/deep", "NaN"),
], ids=["nan", "-infinity", "1e999", "-1e400", "10**400", "timeout_s", "ts", "nested"])
def test_a_number_that_is_not_a_finite_double_is_refused_at_parse_naming_its_field(raw, field, shown):
    seen = []
    d = _dispatcher()
    for name in ("set_threshold", "calibrate"):
        d.register(name, seen.append)
    body = _check_reply(d.handle(_msg("set_threshold", raw=raw, response_topic="r/t")))
    assert not body["ok"] and body["error"]["code"] == "malformed", body
    msg = body["error"]["message"]
    assert f"field '{field}' is {shown}" in msg and "expected a finite number" in msg, msg
    assert len(msg) < 300 and seen == []
    # in the signed form as well; and a 3.1.1 requester's refusal still goes to its reply_to
    topic = "edge-ad/v1/s/d/cmd/set_threshold"
    d = _dispatcher(command_secret="0123456789abcdef")
    inner = b'{"ts": %d, "reply_to": "my/replies", "correlation_id": "c7", ' % int(time.time()) + raw[1:]
    r = d.handle(_msg("set_threshold", raw=signed_envelope("0123456789abcdef", topic, inner)))
    assert (r.topic, r.body["correlation_id"], r.body["error"]["code"]) == ("my/replies", "c7", "malformed"), r
    assert f"signed payload field '{field}' is {shown}" in r.body["error"]["message"], r.body


SURROGATES = [   # (raw payload, what the refusal names); the escape stays as text in the JSON bytes
    (b'{"command": "inspect", "threshold": "\\ud800"}', "field 'threshold'"),
    (b'{"threshold": "\\ud800", "n": NaN}', "field 'threshold'"),        # the first in the payload: not the NaN
    (b'{"part_id": "ok", "extra": [1, {"deep": "a\\udc00b"}]}', "field 'extra/1/deep'"),
    (b'{"\\ud800": 1}', "field name '\\ud800'"),
    (b'{"threshold": 0.5, "correlation_id": "\\ud800"}', "field 'correlation_id'"),
    (b'{"threshold": 0.5, "client_id": "x\\udfff"}', "field 'client_id'"),
    (b'{"signed": "\\ud800", "hmac-sha256": "00"}', "field 'signed'"),
    (b'"\\ud800"', "payload is a JSON string"),
]


@pytest.mark.parametrize("raw, names", SURROGATES, ids=["threshold", "before-nan", "nested", "key", "correlation_id",
                                                        "client_id", "signed", "whole"])
def test_a_lone_surrogate_is_refused_naming_its_field(raw, names, caplog):
    """A lone surrogate escape anywhere in a command payload was refused as 'payload is not a JSON object (payload
    holds a lone surrogate ...)', naming no field (and a NaN after it was named instead). The refusal names the
    field and says it is not valid Unicode; the reply and the log line are valid UTF-8."""
    seen = []
    d = _dispatcher()
    d.register("set_threshold", seen.append)
    with caplog.at_level("WARNING"):
        body = _check_reply(d.handle(_msg("set_threshold", raw=raw, response_topic="r/t")))
    msg = body["error"]["message"]
    assert body["error"]["code"] == "malformed" and seen == [], body
    assert names in msg and "not valid Unicode" in msg and "NaN" not in msg, msg
    assert "lone surrogate escape (\\ud" in msg, msg
    assert "not a JSON object" not in msg or names == "payload is a JSON string", msg
    json.dumps(body, ensure_ascii=False).encode("utf-8")
    for r in caplog.records:
        r.getMessage().encode("utf-8")


def test_a_lone_surrogate_in_a_signed_payload_is_named_and_the_refusal_goes_where_the_requester_waits():
    """The refusal of a payload with a lone surrogate went to reply/<name> without the correlation_id: a 3.1.1
    requester waiting on its reply_to never got it. The routing fields are read all the same (when they are
    valid themselves), in the plain and the signed form."""
    d = _dispatcher(command_secret="0123456789abcdef")
    inner = b'{"ts": %d, "reply_to": "my/replies", "correlation_id": "c7", "threshold": "\\ud800"}' % int(time.time())
    for raw in (inner, signed_envelope("0123456789abcdef", "edge-ad/v1/s/d/cmd/set_threshold", inner)):
        r = d.handle(_msg("set_threshold", raw=raw))
        assert (r.topic, r.body["correlation_id"], r.body["error"]["code"]) == ("my/replies", "c7", "malformed"), r
        assert "field 'threshold' is not valid Unicode" in r.body["error"]["message"], r.body
    assert "signed payload field 'threshold'" in r.body["error"]["message"]


def test_a_reply_or_result_with_a_lone_surrogate_is_not_called_a_nan():
    """payloads.encode said '(NaN and infinity are not valid JSON)' for a string that is not valid Unicode."""
    from edge_ad.mqtt import payloads

    with pytest.raises(InputError, match=r"reply: a string is not valid Unicode: .* surrogate \(\\udc80\)") as err:
        payloads.encode({"command": "status", "path": "/data/caf\udc80"}, "reply")
    assert "NaN" not in str(err.value) and '"path":"/data/caf' in str(err.value)


def test_any_finite_threshold_passes_negative_ones_too():
    # normalized scores are below 0 where a map is under its 0.9 quantile: a calibration's threshold can be
    d = _dispatcher()
    for value in (-0.25, 0, 1e300, -1e-300):
        body = _check_reply(d.handle(_msg("set_threshold", {"threshold": value})))
        assert body["ok"] and body["result"]["echo"] == {"threshold": value}, body


def test_an_oversized_refused_value_is_not_repeated_whole(caplog):
    """jsonschema quotes the offending value: a 1 MB argument came back whole in the reply and the log."""
    with caplog.at_level("WARNING"):
        body = _dispatcher().handle(_msg("set_threshold", {"threshold": "x" * 1_000_000})).body
    assert body["error"]["code"] == "invalid_args" and "threshold" in body["error"]["message"]
    assert len(body["error"]["message"]) < 1000 and "characters" in body["error"]["message"]
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


def test_a_refusal_says_what_is_wrong_with_a_long_value():
    """jsonschema's message quotes the value whole ('rrr...' is too long), and the reply cut it to 200 characters:
    'pause: reason: 'rrrr... (314 characters)' said neither 'too long' nor the limit, and 314 was the length of the
    message. The message is now made of the error's parts, the value quoted short on its own."""
    d = _dispatcher()
    d.register("tagged", lambda args: {}, {"type": "object", "additionalProperties": False, "properties": {
        "tags": {"type": "array", "maxItems": 3}, "when": {"type": "string", "format": "date-time"},
        "labels": {"type": "object", "maxProperties": 1}}})
    head = repr("z" * 60) + "… (300 characters)"
    expected = {
        ("pause", '{"reason": "%s"}' % ("r" * 300)):
            "pause: reason: a string of 300 characters is too long (at most 256)",
        ("update_model", '{"url": "x", "sha256": "%s"}' % ("z" * 300)):
            f"update_model: sha256: {head} does not match '^[0-9a-fA-F]{{64}}$'",
        ("reload", '{"what": "%s"}' % ("z" * 300)): f"reload: what: {head} is not one of ['config', 'bundle', 'all']",
        ("set_threshold", '{"threshold": "%s"}' % ("z" * 300)):
            f"set_threshold: threshold: {head} is not of type 'number'",
        ("set_threshold", json.dumps({"threshold": [1] * 200})):
            "set_threshold: threshold: an array of 200 items is not of type 'number'",
        ("calibrate", '{"source": ""}'): "calibrate: source: an empty string is too short (at least 1)",
        ("calibrate", '{"frames": 5}'): "calibrate: frames: 5 is less than the minimum of 20",
        ("pause", '{"%s": 1}' % ("z" * 300)): f"pause: (args): unexpected field {head} (expected only 'reason')",
        ("resume", json.dumps({f"k{i}": i for i in range(9)})):
            "resume: (args): unexpected fields 'k0', 'k1', 'k2', 'k3', 'k4' and 4 more (expected none)",
        ("tagged", json.dumps({"tags": list(range(100))})):
            "tagged: tags: an array of 100 items is too long (at most 3)",
        ("tagged", json.dumps({"labels": {"a": 1, "b": 2}})):
            "tagged: labels: an object with 2 fields has too many fields (at most 1)",
        ("tagged", '{"when": "%s"}' % ("z" * 300)): f"tagged: when: {head} is not a 'date-time'",
        # the reserved fields are checked the same way (the command envelope's schema): malformed
        ("status", '{"correlation_id": "%s"}' % ("c" * 300)):
            "cmd/status: correlation_id: a string of 300 characters is too long (at most 256)",
    }
    for (name, payload), message in expected.items():
        body = _check_reply(d.handle(_msg(name, raw=payload.encode())))
        assert body["error"]["message"] == message, (name, body)
    # and a value too large for a message is still cut: 1 MB is not repeated
    body = d.handle(_msg("reload", {"what": "w" * 1_000_000})).body
    assert len(body["error"]["message"]) < 300 and "1000000 characters" in body["error"]["message"]


def test_clip_text_is_the_one_cut_of_quoted_values():
    """The link cut the topics it logs with commands.py's private _short; the helper is now public in
    edge_ad.errors (clip_text) and both modules use it."""
    import edge_ad.mqtt.commands as commands
    import edge_ad.mqtt.link as link
    from edge_ad.errors import clip_text

    assert clip_text("abc", 3) == "abc" and clip_text("abcd", 3) == "abc… (4 characters)"
    assert len(clip_text("x" * 10_000)) < 230
    assert link.clip_text is commands.clip_text is clip_text and not hasattr(commands, "_short")


def test_unknown_invalid_unavailable_failed_internal():
    d = _dispatcher()
    assert d.handle(_msg("reboot")).body["error"]["code"] == "unknown_command"
    bad = d.handle(_msg("set_threshold", {"threshold": "high"})).body
    assert bad["error"]["code"] == "invalid_args" and "threshold" in bad["error"]["message"]
    assert d.handle(_msg("set_threshold", {})).body["error"]["code"] == "invalid_args"          # required
    assert d.handle(_msg("pause", {"bogus": 1})).body["error"]["code"] == "invalid_args"        # no extras
    assert d.handle(_msg("update_model", {"url": "x", "sha256": "nothex"})).body["error"]["code"] == "invalid_args"
    assert d.handle(_msg("update_model", {"url": "x", "sha256": "AB" * 32})).body["ok"]      # sha256sum -b | tr
    empty = Dispatcher(MqttSettings(site="s", device="d"), Topics("s", "d"))
    assert empty.handle(_msg("calibrate")).body["error"]["code"] == "not_available"
    # a command the device's config cannot run (update_model without model.deploy_dir) was listed in the birth's
    # commands and answered 'failed': it is left out of them and answered not_available, saying why
    ran = []
    d.register("update_model", lambda a: ran.append(a) or {}, unavailable="update_model needs model.deploy_dir")
    assert "update_model" not in d.names() and not d.has_handler("update_model") and "pause" in d.names()
    r = d.handle(_msg("update_model", {"url": "x", "sha256": "ab" * 32})).body
    assert r["error"] == {"code": "not_available", "message": "update_model needs model.deploy_dir"} and not ran
    assert d.handle(_msg("update_model", {"url": "x"})).body["error"]["code"] == "invalid_args"   # checked first

    def fails(args):
        raise RuntimeFailure("camera is gone")

    def crashes(args):
        return 1 / 0

    d.register("calibrate", fails)
    d.register("reload", crashes)
    d.register("inspect", lambda args: "not a dict")
    r = _check_reply(d.handle(_msg("calibrate")))
    assert r["error"] == {"code": "failed", "message": "calibrate: camera is gone"}
    for text in ("calibrate: collected 10 of 30 frames", "calibrate needs a source"):   # named once

        def says(args, text=text):
            raise RuntimeFailure(text)

        d.register("calibrate", says)
        assert d.handle(_msg("calibrate")).body["error"]["message"] == text
    assert d.handle(_msg("reload")).body["error"]["code"] == "internal"
    assert d.handle(_msg("inspect")).body["error"]["code"] == "internal"

    def names_a_bad_file(args):   # a file name read with surrogateescape: its lone surrogate cannot be sent as is
        raise RuntimeFailure("cannot read /data/b\udcff.png")

    d.register("calibrate", names_a_bad_file)
    r = _check_reply(d.handle(_msg("calibrate")))                     # encodes: the requester gets its answer
    assert r["error"] == {"code": "failed", "message": "calibrate: cannot read /data/b\\xff.png"}
    assert b"/data/b\\\\xff.png" in payloads.encode(r, "reply")

    def names_a_left_out_file(args):   # a result too: the command ran (a calibration in force), so it is answered ok
        return {"excluded": [{"label": "/data/b\udcff.png"}], "paths": ("/x\udcfe",)}

    d.register("calibrate", names_a_left_out_file)
    r = _check_reply(d.handle(_msg("calibrate")))
    assert r["ok"] and r["result"] == {"excluded": [{"label": "/data/b\\xff.png"}], "paths": ["/x\\xfe"]}, r
    assert d.handle(_msg("status")).body["ok"]                       # still working
    with pytest.raises(InputError):
        d.register("a/b", lambda a: {})


def test_a_long_command_is_logged_when_it_starts_with_its_correlation_id_and_requester(caplog):
    """Only 'command X from Y: ok / refused' was logged, at the end: after a kill in a calibrate or an update_model
    the log could not tell that one had started. A long command (calibrate, update_model, reload) is logged once
    at INFO when it starts, with its correlation id (the v5 correlation data, else the payload's) and requester;
    a quick one, and one refused before it runs, are not."""
    d = _dispatcher()
    caplog.set_level("INFO", logger="edge_ad.mqtt.commands")
    d.handle(_msg("calibrate", {"frames": 64, "client_id": "mes-1"}, response_topic="r/t", correlation_data=b"c-17"))
    d.handle(_msg("update_model", {"url": "file:///b.tar", "sha256": "ab" * 32, "correlation_id": "c-18"}))
    d.handle(_msg("reload", {"correlation_id": "payload"}, correlation_data=b"data"))  # v5's wins, as for the reply
    d.handle(_msg("reload", {"what": "bundle"}))
    d.handle(_msg("status", {}, correlation_data=b"c-19"))
    d.handle(_msg("calibrate", {"frames": 0}, correlation_data=b"c-20"))          # refused: never started
    assert [r.getMessage() for r in caplog.records] == [
        "command calibrate from mes-1 started (correlation id c-17)", "command calibrate from mes-1: ok",
        "command update_model from ? started (correlation id c-18)", "command update_model from ?: ok",
        "command reload from ? started (correlation id data)", "command reload from ?: ok",
        "command reload from ? started (no correlation id)", "command reload from ?: ok",
        "command status from ?: ok",
        "command calibrate from ? refused: invalid_args: calibrate: frames: 0 is less than the minimum of 20"]
    assert all(r.levelname == "INFO" for r in caplog.records[:-1])


def test_allow_list_applies_to_state_changing_commands():
    d = _dispatcher(command_clients=["mes-1"])
    assert d.handle(_msg("status")).body["ok"]                       # read-only: open
    assert d.handle(_msg("pause", user_properties={"client_id": "mes-1"})).body["ok"]
    assert d.handle(_msg("pause", {"client_id": "mes-1"})).body["ok"]
    r = d.handle(_msg("pause", user_properties={"client_id": "intruder"})).body
    assert r["error"]["code"] == "unauthorized" and "allow-list" in r["error"]["message"]
    assert d.handle(_msg("pause")).body["error"]["code"] == "unauthorized"
    strict = _dispatcher(command_clients=["mes-1"], command_auth_all=True)
    assert strict.handle(_msg("status")).body["error"]["code"] == "unauthorized"
    assert "pause" in STATE_CHANGING and "status" not in STATE_CHANGING


def test_hmac_signature_freshness_and_replay():
    now = [1_000_000.0]
    d = _dispatcher(command_secret="s3cret")
    d.clock = lambda: now[0]
    pause = "edge-ad/v1/s/d/cmd/pause"
    payload = json.dumps({"reason": "x", "ts": now[0]}).encode()
    good = {HMAC_KEY: sign("s3cret", pause, payload)}
    assert d.handle(_msg("status")).body["ok"]                       # read-only needs no signature
    r = d.handle(_msg("pause", raw=payload)).body
    assert r["error"]["code"] == "unauthorized" and "signature" in r["error"]["message"]
    r = d.handle(_msg("pause", raw=payload, user_properties={HMAC_KEY: sign("wrong", pause, payload)})).body
    assert r["error"]["message"].endswith("bad HMAC-SHA256 signature")
    assert d.handle(_msg("pause", raw=payload, user_properties=good)).body["ok"]
    r = d.handle(_msg("pause", raw=payload, user_properties=good)).body
    assert r["error"]["code"] == "unauthorized" and "replay" in r["error"]["message"]
    # tampering with the payload breaks the signature
    tampered = payload.replace(b'"x"', b'"y"')
    assert d.handle(_msg("pause", raw=tampered, user_properties=good)).body["error"]["code"] == "unauthorized"
    # stale and missing timestamps
    resume = "edge-ad/v1/s/d/cmd/resume"
    old = json.dumps({"ts": now[0] - 3600}).encode()
    r = d.handle(_msg("resume", raw=old, user_properties={HMAC_KEY: sign("s3cret", resume, old)})).body
    assert r["error"]["message"].startswith("resume: the command is 3600 s older than this device's clock (its "
                                            "'ts'; accepted: within 300 s): made that long ago, or this device's "
                                            "clock is ahead of the sender's")
    ahead = json.dumps({"ts": now[0] + 1000}).encode()           # made 1000 s "later": the device is behind
    r = d.handle(_msg("resume", raw=ahead, user_properties={HMAC_KEY: sign("s3cret", resume, ahead)})).body
    assert "the command is 1000 s newer than this device's clock" in r["error"]["message"]
    assert "this device's clock is behind the sender's" in r["error"]["message"]
    nots = b"{}"
    r = d.handle(_msg("resume", raw=nots, user_properties={HMAC_KEY: sign("s3cret", resume, nots)})).body
    assert "needs 'ts'" in r["error"]["message"]
    # the signed form (any protocol), with an RFC 3339 ts
    reload = "edge-ad/v1/s/d/cmd/reload"
    inner = json.dumps({"what": "config", "ts": "1970-01-12T13:46:40Z"}).encode()
    r = d.handle(_msg("reload", raw=signed_envelope("s3cret", reload, inner))).body
    assert r["ok"] and r["result"]["echo"] == {"what": "config"}
    wrong = signed_envelope("nope", reload, inner)
    assert d.handle(_msg("reload", raw=wrong)).body["error"]["code"] == "unauthorized"


def test_a_ts_that_is_not_a_time_is_malformed_signed_or_not():
    """'ts' was read only to check a signed command's age: an unsigned set_threshold {"ts": "yesterday"} ran (ok
    true), while docs/mqtt.md says a bad reserved field is malformed. Every command's reserved fields are now
    checked in one place; a signed one with such a ts was refused as if it had none."""
    calls = []
    d = _dispatcher()
    d.register("set_threshold", lambda args: calls.append(args) or {})
    expected = ("is not a time: expected unix seconds (a number) or an RFC 3339 date and time "
                "(2025-05-01T12:00:00Z)")
    for ts in ("yesterday", "", "1746100800", "12:00", "z" * 300):
        r = _check_reply(d.handle(_msg("set_threshold", {"threshold": 0.5, "ts": ts, "correlation_id": "c1"})))
        assert r["error"]["code"] == "malformed" and r["correlation_id"] == "c1", r
        assert r["error"]["message"] == f"cmd/set_threshold: ts: {schema.shown(ts)} {expected}", r
    r = d.handle(_msg("set_threshold", {"threshold": 0.5, "ts": [1]})).body
    assert r["error"]["message"] == "cmd/set_threshold: ts: [1] is not of type 'number', 'string'", r
    assert calls == []
    for ts in (1746100800, 1746100800.5, "2025-05-01T12:00:00Z", "2025-05-01T14:00:00.250+02:00"):
        assert d.handle(_msg("set_threshold", {"threshold": 0.5, "ts": ts})).body["ok"]
    assert calls == [{"threshold": 0.5}] * 4
    # signed: the v5 user property and the signed form
    now = 1_000_000.0
    s = _dispatcher(command_secret="s3cret")
    s.clock = lambda: now
    pause = "edge-ad/v1/s/d/cmd/pause"
    payload = json.dumps({"ts": "yesterday"}).encode()
    r = _check_reply(s.handle(_msg("pause", raw=payload, user_properties={HMAC_KEY: sign("s3cret", pause, payload)})))
    assert r["error"] == {"code": "malformed", "message": f"cmd/pause: ts: 'yesterday' {expected}"}, r
    r = _check_reply(s.handle(_msg("pause", raw=signed_envelope("s3cret", pause, payload))))
    assert r["error"] == {"code": "malformed", "message": f"cmd/pause: signed payload: ts: 'yesterday' {expected}"}, r
    good = json.dumps({"ts": "1970-01-12T13:46:40Z"}).encode()
    assert s.handle(_msg("pause", raw=signed_envelope("s3cret", pause, good))).body["ok"]


def test_a_signature_is_good_for_one_command_on_one_device():
    now = 1_000_000.0
    secret = "plant-secret"
    cam1 = _dispatcher(command_secret=secret, command_auth_all=True)
    cam2 = Dispatcher(MqttSettings(site="s", device="cam2", command_secret=secret), Topics("s", "cam2"))
    cam2.register("pause", lambda args: {"paused": True})
    for d in (cam1, cam2):
        d.clock = lambda: now
    payload = json.dumps({"ts": now}).encode()
    status_sig = {HMAC_KEY: sign(secret, "edge-ad/v1/s/d/cmd/status", payload)}
    assert cam1.handle(_msg("status", raw=payload, user_properties=status_sig)).body["ok"]
    # the same bytes and signature, moved to another command or another device: refused
    r = cam1.handle(_msg("pause", raw=payload, user_properties=status_sig)).body
    assert r["error"]["code"] == "unauthorized" and "bad HMAC" in r["error"]["message"]
    pause_sig = {HMAC_KEY: sign(secret, "edge-ad/v1/s/d/cmd/pause", payload)}
    assert cam1.handle(_msg("pause", raw=payload, user_properties=pause_sig)).body["ok"]
    r = cam2.handle(_msg("pause", raw=payload, user_properties=pause_sig)).body
    assert r["error"]["code"] == "unauthorized"
    env = signed_envelope(secret, "edge-ad/v1/s/d/cmd/pause", payload)
    assert cam2.handle(_msg("pause", raw=env)).body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("raw, props, code", [
    (b"[" * 100_000 + b"]" * 100_000, {}, "malformed"),                          # RecursionError
    (b'{"signed": "\\ud800", "hmac-sha256": "00"}', {}, "malformed"),            # surrogate in the signed text
    (b'{"reason": "\\ud800"}', {}, "malformed"),                                 # a surrogate argument
    (b'{"ts": 1000000}', {HMAC_KEY: "\u00e9" * 64}, "unauthorized"),              # non-ASCII signature
])
def test_hostile_payloads_get_a_reply_and_the_worker_goes_on(raw, props, code):
    d = _dispatcher(command_secret="s3cret")
    d.clock = lambda: 1_000_000.0
    r = _check_reply(d.handle(_msg("pause", raw=raw, user_properties=props, response_topic="r/t")))
    assert r["ok"] is False and r["error"]["code"] == code, r
    assert d.route(_msg("pause", raw=raw))[0] == "edge-ad/v1/s/d/reply/pause"
    assert d.handle(_msg("status")).body["ok"]


def test_a_command_whose_message_expiry_passed_while_it_waited_is_not_run():
    now = [1000.0]
    d = Dispatcher(MqttSettings(site="s", device="d"), Topics("s", "d"), clock=lambda: now[0])
    calls = []
    d.register("pause", lambda args: calls.append(args) or {"paused": True})
    msg = _msg("pause", {"reason": "x"}, received=1000.0, expiry_s=4.0)
    now[0] = 1004.5                                     # it waited behind a calibrate past its expiry
    r = _check_reply(d.handle(msg))
    assert r["error"]["code"] == "expired" and "not run" in r["error"]["message"] and calls == []
    now[0] = 1003.9                                     # still within it: runs
    assert d.handle(msg).body["ok"] and calls == [{"reason": "x"}]
    assert d.handle(_msg("pause", received=0.0)).body["ok"]      # no expiry (MQTT 3.1.1): runs when its turn comes


# ----------------------------------------------------------------------------- through a broker
@pytest.fixture
def link(mosquitto, tmp_path):
    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1, reconnect_max_s=0.5, command_queue=2)
    lk = MqttLink(settings)
    calls = []
    for name in COMMANDS:
        if name != "status":
            lk.register_command(name, lambda args, name=name: calls.append(name) or {"done": name, "args": args})
    lk.start()
    deadline = time.monotonic() + 10
    while not lk.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    lk.calls = calls
    yield lk
    lk.stop(timeout=2)


def test_every_command_round_trips_with_correlation_data(link, mosquitto):
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        for name, args in VALID_ARGS.items():
            reply = cc.call("s", "d", name, args, timeout=5)          # matched by its correlation data
            assert schema.errors("reply", reply) == []
            assert reply["ok"] and reply["command"] == name, reply
            assert str(uuid.UUID(reply["correlation_id"])) == reply["correlation_id"]   # a UUID, canonical form
            if name == "status":
                assert reply["result"]["link"]["connected"] is True
                assert set(reply["result"]["birth"]["commands"]) == set(COMMANDS)
            else:
                assert reply["result"] == {"done": name, "args": args}
        # correlation data comes back byte for byte, on the response topic asked for
        raw = cc.send_raw("edge-ad/v1/s/d/cmd/status", b"", "corr-\u00e9-42", timeout=5)
        assert raw["ok"]
    assert link.calls == [n for n in VALID_ARGS if n != "status"]


def test_a_lone_surrogate_through_the_broker_gets_a_reply_naming_its_field(link, mosquitto):
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        for raw, names in SURROGATES:
            for name in ("inspect", "set_threshold"):
                r = cc.send_raw(f"edge-ad/v1/s/d/cmd/{name}", raw, "c1", timeout=5)
                assert r["error"]["code"] == "malformed" and names in r["error"]["message"], (raw, r)
                assert "not valid Unicode" in r["error"]["message"] and "NaN" not in r["error"]["message"], (raw, r)
        assert cc.call("s", "d", "status", timeout=5)["ok"]          # the loop goes on
    assert link.calls == []


def test_malformed_and_unknown_commands_get_error_replies(link, mosquitto):
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        r = cc.send_raw("edge-ad/v1/s/d/cmd/set_threshold", b"{oops", "c1", timeout=5)
        assert r["error"]["code"] == "malformed"
        assert cc.call("s", "d", "self_destruct", timeout=5)["error"]["code"] == "unknown_command"
        assert cc.call("s", "d", "set_threshold", {"threshold": []}, timeout=5)["error"]["code"] == "invalid_args"
        assert cc.call("s", "d", "status", timeout=5)["ok"]          # the loop goes on
    assert link.stats()["command_errors"] == 3


def test_busy_when_the_queue_is_full(link, mosquitto):
    gate = threading.Event()
    link.register_command("pause", lambda args: gate.wait(10) and {"paused": True})
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, cc.call("s", "d", "pause",
                                                                                    timeout=10)))
                   for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        time.sleep(0.3)
        gate.set()
        for t in threads:
            t.join(15)
    codes = sorted(r.get("error", {}).get("code", "ok") for r in results.values())
    assert codes == ["busy", "ok", "ok", "ok"]


def test_a_hostile_payload_while_busy_does_not_stop_the_network_thread(link, mosquitto):
    gate = threading.Event()
    link.register_command("pause", lambda args: gate.wait(10) and {"paused": True})
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        threads = [threading.Thread(target=lambda: cc.call("s", "d", "pause", timeout=10)) for _ in range(3)]
        for t in threads:                       # one running, two waiting: the queue (2) is full
            t.start()
            time.sleep(0.1)
        time.sleep(0.3)
        # the busy reply is built on paho's network thread; a RecursionError there used to end it
        r = cc.send_raw("edge-ad/v1/s/d/cmd/resume", b"[" * 100_000 + b"]" * 100_000, "deep", timeout=5)
        assert r["error"]["code"] == "busy"
        gate.set()
        for t in threads:
            t.join(15)
        rid = link.publish_result({"score": 0.1, "ng": False})   # deliveries go on (PUBACKs still read)
        assert cc.call("s", "d", "status", timeout=5)["ok"]
        deadline = time.monotonic() + 10
        while link.stats()["outbox_depth"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.stats()["outbox_depth"] == 0, rid


def test_status_is_answered_during_a_long_calibrate_and_other_commands_are_refused_at_once(link, mosquitto):
    """Queued behind a calibrate, a second calibrate, a rollback or an inspect ran minutes after it was sent:
    refused at once (busy, naming the command that runs); status is answered meanwhile."""
    gate = threading.Event()
    link.register_command("calibrate", lambda args: gate.wait(10) and {"calibrated": True})
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("cal", cc.call("s", "d", "calibrate", timeout=10)))
        t.start()
        deadline = time.monotonic() + 5
        while link._long is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cc.call("s", "d", "status", timeout=5)["ok"]     # not held behind it
        for name, args in (("calibrate", {}), ("rollback_calibration", {}), ("set_threshold", {"threshold": 0.5}),
                           ("update_model", VALID_ARGS["update_model"]), ("reload", {}), ("pause", {}),
                           ("inspect", {}), ("snapshot", {})):
            r = cc.call("s", "d", name, args, timeout=5)
            assert schema.errors("reply", r) == [] and r["error"]["code"] == "busy", r
            assert r["error"]["message"].startswith(f"{name}: not run: 'calibrate' (received "), r
        gate.set()
        t.join(15)
        assert out["cal"]["ok"]
        assert cc.call("s", "d", "pause", timeout=5)["ok"]      # runs again once calibrate has finished
    assert link.calls == ["pause"]


def test_a_command_that_timed_out_waiting_behind_another_does_not_run_later(link, mosquitto):
    gate = threading.Event()
    link.register_command("set_threshold", lambda args: gate.wait(10) and {"threshold": 0.5})
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("thr", cc.call("s", "d", "set_threshold",
                                                                          {"threshold": 0.5}, timeout=10)))
        t.start()
        time.sleep(0.2)                                         # set_threshold holds the command thread
        with pytest.raises(RuntimeFailure, match="busy with another command"):
            cc.call("s", "d", "pause", {"reason": "late"}, timeout=1)
        time.sleep(0.3)                                         # its 1 s expiry has passed on the device too
        gate.set()
        t.join(15)
        assert out["thr"]["ok"]
        assert cc.call("s", "d", "resume", timeout=5)["ok"]     # commands run in order: pause came first
    assert link.calls == ["resume"]                              # the operator was told pause timed out


def test_at_a_stop_every_command_gets_a_reply_and_none_waiting_runs(link, mosquitto):
    """Commands acknowledged to the broker (QoS 1) but waiting, or running, when the device stopped got no reply
    and were lost. From close_commands (the run starts stopping) the ones waiting, and those that come, are
    answered 'failed' without running while status is still answered; stop() answers a command still running
    when its timeout ends (its own reply, should it finish, is not sent) and does not wait longer for it."""
    started, gate = threading.Event(), threading.Event()
    link.register_command("pause", lambda args: started.set() or (gate.wait(10) and {"paused": True}))
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        out = {}

        def call(key, name, args=None):
            out[key] = cc.call("s", "d", name, args, timeout=10)

        threads = [threading.Thread(target=call, args=("pause", "pause"))]
        threads[0].start()
        assert started.wait(5)
        threads.append(threading.Thread(target=call, args=("thr", "set_threshold", {"threshold": 0.5})))
        threads[1].start()
        assert _wait(lambda: link._commands._q.qsize() == 1, 5)
        link.close_commands("SIGTERM")
        threads[1].join(10)
        assert out["thr"]["error"] == {"code": "failed", "message": "set_threshold: not run: the device is stopping "
                                                                    "(SIGTERM); send it again when it is back online"}
        r = cc.call("s", "d", "resume", timeout=5)                 # one that comes while the run stops
        assert r["error"]["code"] == "failed" and "not run: the device is stopping (SIGTERM)" in r["error"]["message"]
        assert cc.call("s", "d", "status", timeout=5)["ok"]         # answered until the link stops
        gate.set()
        threads[0].join(10)
        assert out["pause"]["ok"]                                   # it was running: it finishes
        assert link.calls == []                                     # set_threshold and resume never ran


def test_a_command_still_running_when_the_stop_ends_is_answered_and_not_waited_for(link, mosquitto, caplog):
    """A command that outlasts the stop's timeout (a calibrate from a folder, an update_model downloading) got no
    reply: it is answered 'failed' (whether it took effect is unknown) before the link disconnects."""
    held, started = threading.Event(), threading.Event()
    link.register_command("calibrate", lambda args: started.set() or (held.wait(10) and {"calibrated": True}))
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        out = {}
        t = threading.Thread(target=lambda: out.update(cal=cc.call("s", "d", "calibrate", timeout=10)))
        t.start()
        assert started.wait(5)
        t0 = time.monotonic()
        link.stop(timeout=1)
        assert time.monotonic() - t0 < 4
        t.join(10)
    err = out["cal"]["error"]
    assert err["code"] == "failed" and err["message"].startswith(
        "calibrate: interrupted: the device stopped (the link is stopping) before it finished; whether it took "
        "effect is unknown"), err
    with caplog.at_level("WARNING", logger="edge_ad.mqtt"):
        held.set()                                      # it finishes after all: its own reply is not sent
        link._workers[0].join(5)
    assert not link._running and not link._answered_at_stop
    assert any("calibrate finished after the stop answered it (ok): its reply is not sent" in r.getMessage()
               for r in caplog.records)


def test_retained_commands_are_not_run(link, mosquitto):
    import paho.mqtt.client as paho

    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        # published live with the retain flag: refused with a reply, not run
        replied = threading.Event()
        with cc._lock:
            cc._waiting["r1"] = replied
        pub.publish("edge-ad/v1/s/d/cmd/pause", json.dumps({"reason": "stuck",
                    "reply_to": cc.reply_topic, "correlation_id": "r1"}), qos=1, retain=True).wait_for_publish(5)
        assert replied.wait(5)
        r = cc._replies["r1"]
        assert r["error"]["code"] == "malformed" and "retain" in r["error"]["message"]
        assert link.calls == []
        # reconnecting does not deliver it again (it would run at every reconnect)
        link._client.reconnect()
        deadline = time.monotonic() + 10
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cc.call("s", "d", "resume", timeout=5)["ok"]
        assert link.calls == ["resume"]
    pub.loop_stop()
    pub.disconnect()


def test_clearing_a_retained_command_is_no_command(link, mosquitto, caplog):
    """docs/mqtt.md says to clear a retained command with an empty retained message to its topic; the broker passes
    that on (retain as published), and the device logged 'WARNING retained command on .../cmd/pause not run
    (publish commands with retain=false)' for the cleanup itself. It is no command: not run, not answered, no
    WARNING (DEBUG)."""
    import paho.mqtt.client as paho

    got = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sub.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("edge-ad/v1/s/d/reply/#", qos=1)
    sub.loop_start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    try:
        assert subscribed.wait(5)
        with caplog.at_level("DEBUG", logger="edge_ad.mqtt.link"):
            pub.publish("edge-ad/v1/s/d/cmd/pause", b'{"reason": "x"}', qos=1, retain=True).wait_for_publish(5)
            pub.publish("edge-ad/v1/s/d/cmd/pause", b"", qos=1, retain=True).wait_for_publish(5)   # the clear
            pub.publish("edge-ad/v1/s/d/cmd/resume", b"", qos=1).wait_for_publish(5)   # taken after it, in order
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert [(t, r["command"], r["ok"]) for t, r in got] == [("edge-ad/v1/s/d/reply/pause", "pause", False),
                                                                ("edge-ad/v1/s/d/reply/resume", "resume", True)], got
        assert link.calls == ["resume"]
        retained = [r for r in caplog.records if "retained command" in r.getMessage()]
        assert [r.levelname for r in retained] == ["WARNING", "DEBUG"], [r.getMessage() for r in retained]
        assert retained[1].getMessage() == ("mqtt: edge-ad/v1/s/d/cmd/pause: a retained command cleared (an empty "
                                            "retained message): nothing to run")
    finally:
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_bad_reply_topic_through_the_broker_costs_no_connection(mosquitto, tmp_path, caplog, protocol):
    """One unsigned status with a NUL in reply_to made the device reconnect every 1.5 s until it was restarted;
    a 70 KB one logged a traceback with the whole topic. Each is refused on reply/status and the link stays up."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_ad.mqtt.collector import Collector

    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1, reconnect_max_s=0.5, protocol=protocol)
    lk = MqttLink(settings)
    lk.start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    sent = [{"reply_to": "fleet/re\u0000ply"}, {"reply_to": "fleet/\u0001"}, {"reply_to": "$SYS/x"},
            {"reply_to": "x" * 70_000}, {"reply_to": "edge-ad/v1/s/d2/cmd/pause"}] + ([{}] if protocol == "5" else [])
    try:
        assert _wait(lambda: lk.connected)
        with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/s/d/reply/#") as col, \
                caplog.at_level("WARNING", logger="edge_ad.mqtt"):
            for i, body in enumerate(sent):
                props = None
                if not body:       # a v5 response topic under $SYS
                    props = Properties(PacketTypes.PUBLISH)
                    props.ResponseTopic, props.CorrelationData = "$SYS/edge", b"v5"
                pub.publish("edge-ad/v1/s/d/cmd/status", json.dumps({**body, "correlation_id": f"c{i}"}), qos=1,
                            properties=props).wait_for_publish(5)
            assert col.wait_for(lambda c: len(c.messages) >= len(sent), 10)
            with CommandClient(BrokerSettings(url=mosquitto.url, protocol=protocol)) as cc:
                assert cc.call("s", "d", "status", timeout=5)["ok"]      # the link answers as before
            st = lk.stats()
        replies = [m.json() for m in col.messages]
        assert [r["correlation_id"] for r in replies] == [f"c{i}" for i in range(len(sent))]
        assert all(r["error"]["code"] == "malformed" and len(r["error"]["message"]) < 600 for r in replies), replies
        assert protocol != "5" or "response topic '$SYS/edge'" in replies[-1]["error"]["message"]
        assert st["connects"] == 1 and st["disconnects"] == 0, st
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        assert max(len(r.getMessage()) for r in caplog.records) < 600
    finally:
        pub.loop_stop()
        lk.stop(timeout=2)


def test_hmac_refusal_through_the_broker(mosquitto, tmp_path):
    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            command_secret="plant-secret", reconnect_min_s=0.1)
    lk = MqttLink(settings)
    lk.register_command("pause", lambda args: {"paused": True})
    lk.start()
    assert _wait(lambda: lk.connected)       # a command sent before it subscribed would be lost
    try:
        with CommandClient(BrokerSettings(url=mosquitto.url)) as plain, \
                CommandClient(BrokerSettings(url=mosquitto.url), secret="guess") as wrong, \
                CommandClient(BrokerSettings(url=mosquitto.url), secret="plant-secret") as right:
            r = plain.call("s", "d", "pause", timeout=5)
            assert r["error"]["code"] == "unauthorized"
            assert wrong.call("s", "d", "pause", timeout=5)["error"]["code"] == "unauthorized"
            assert right.call("s", "d", "pause", {"reason": "test"}, timeout=5)["ok"]
            assert plain.call("s", "d", "status", timeout=5)["ok"]
    finally:
        lk.stop(timeout=2)


def test_a_command_that_timed_out_on_an_offline_device_does_not_run_when_it_comes_back(mosquitto, tmp_path):
    """The request's message expiry is its reply timeout: the broker drops a command it could not deliver
    in time, so the requester's "no reply" does not turn into the command running hours later."""
    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1)
    calls = []

    def start():
        lk = MqttLink(settings)
        lk.register_command("pause", lambda args: calls.append(args) or {"paused": True})
        lk.start()
        assert _wait(lambda: lk.connected)
        return lk

    start().stop(timeout=2)                       # the device has a persistent session, and is offline
    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        with pytest.raises(RuntimeFailure) as err:
            cc.call("s", "d", "pause", {"reason": "late"}, timeout=0.5)
        msg = str(err.value)
        assert "offline" in msg and "still running" in msg and "calibrate" in msg and "status" in msg
        assert "--timeout" in msg and "drops the command after 1 s" in msg
        time.sleep(1.6)                           # the broker's clock is in whole seconds: 1 s expiry, +1
        lk = start()
        try:
            assert cc.call("s", "d", "status", timeout=5)["ok"]   # commands run in order: pause came first
            assert calls == []
        finally:
            lk.stop(timeout=2)


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_cli_says_what_to_change_when_a_command_is_unauthorized(mosquitto, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_ad.cli import main

    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            command_clients=["mes-1"], command_secret="plant-secret", reconnect_min_s=0.1)
    lk = MqttLink(settings)
    lk.register_command("pause", lambda args: {"paused": True})
    lk.start()
    assert _wait(lambda: lk.connected)       # a command sent before it subscribed would be lost
    argv = ["command", "--mqtt", mosquitto.url, "--site", "s", "--device", "d", "--timeout", "5", "pause"]
    try:
        monkeypatch.delenv("EDGE_AD_MQTT_COMMAND_SECRET", raising=False)
        res = CliRunner().invoke(main, argv)
        assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "unauthorized", res.output
        assert "--client-id" in res.stderr and "'edge-ad-cli-" in res.stderr and "not signed" in res.stderr
        assert "$EDGE_AD_MQTT_COMMAND_SECRET" in res.stderr
        res = CliRunner().invoke(main, [*argv, "--client-id", "mes-1"])
        assert res.exit_code == 1 and "HMAC" in json.loads(res.stdout)["error"]["message"]
        assert "not signed" in res.stderr and "allow-list" not in res.stderr   # it passed the allow-list
        monkeypatch.setenv("EDGE_AD_MQTT_COMMAND_SECRET", "guess")
        res = CliRunner().invoke(main, [*argv, "--client-id", "mes-1"])
        assert res.exit_code == 1 and "does not match" in res.stderr and "$EDGE_AD_MQTT_COMMAND_SECRET" in res.stderr
        assert "allow-list" not in res.stderr and "clock" not in res.stderr
        monkeypatch.setenv("EDGE_AD_MQTT_COMMAND_SECRET", "plant-secret")
        with monkeypatch.context() as m:                          # this machine's clock two hours behind
            m.setattr("edge_ad.mqtt.requester.time", types.SimpleNamespace(time=lambda: time.time() - 7200))
            res = CliRunner().invoke(main, [*argv, "--client-id", "mes-1"])
        message = json.loads(res.stdout)["error"]["message"]
        assert res.exit_code == 1 and "the command is 7200 s older than this device's clock" in message, message
        assert "synchronize this machine's clock and the device's" in res.stderr and "allow-list" not in res.stderr
        res = CliRunner().invoke(main, [*argv, "--client-id", "mes-1"])
        assert res.exit_code == 0 and res.stderr == "", res.output
    finally:
        lk.stop(timeout=2)


@pytest.mark.parametrize("ts, since", [("2026-03-01T08:00:00+00:00", " since 2026-03-01T08:00:00+00:00"),
                                       ("", ""), (None, ""), (1772352000, ""), (["x"], "")])
def test_the_time_of_a_retained_status_is_said_alike_or_not_at_all(ts, since):
    """The " since TS" of a device's retained status was written three times, two ways: an empty 'ts' made the
    no-reply note and decommission say "online since , which ..." while the offline message left it out. One
    helper says it now: a non-empty text, else nothing."""
    from edge_ad.mqtt.requester import offline_text, stale_online_text

    body = {"state": "online"} if ts is None else {"state": "online", "ts": ts}
    assert payloads.status_since(body) == since
    assert f"Its retained status says online{since}, which is not proof" in stale_online_text("s", "d", body)
    off = {**body, "state": "offline", "reason": "stopped"}
    assert offline_text("s", "d", off, 10, True).startswith(f"device s/d is offline{since}: its retained status says "
                                                            "edge-ad stopped there.")


def test_cli_command_to_an_offline_device_says_so_at_once_and_sends_nothing(mosquitto, tmp_path):
    """`edge-ad command` to a device whose retained status says offline waited the whole --timeout and then said
    'no reply'. It reads that status first: exit 3 at once (a timeout is 1), saying since when and why (a clean
    stop, the will), and nothing is sent, so the device does not run it when it comes back. --even-offline sends
    it: the broker queues it in the device's persistent session and the reply comes once the device is back."""
    import subprocess
    import sys

    import paho.mqtt.client as paho
    from click.testing import CliRunner
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_ad.cli import main

    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1)
    ran = []

    def device():
        lk = MqttLink(settings)
        lk.register_command("pause", lambda args: ran.append(args.get("reason")) or {"paused": True})
        lk.start()
        assert _wait(lambda: lk.connected)
        return lk

    device().stop()                                   # retained status: offline, stopped, with its time
    argv = ["command", "--mqtt", mosquitto.url, "--site", "s", "--device", "d", "--timeout", "60", "pause"]
    res = CliRunner().invoke(main, [*argv, '{"reason": "stopped"}'])
    assert res.exit_code == 3 and res.stdout == "", res.output
    assert "error: device s/d is offline since 20" in res.stderr, res.stderr
    assert "edge-ad stopped there. The command was not sent. --even-offline" in res.stderr
    assert "drops it unless the device is back within 60 s" in res.stderr
    res = CliRunner().invoke(main, [*argv, "--protocol", "3.1.1", '{"reason": "stopped, 3.1.1"}'])
    assert res.exit_code == 3 and "runs it whenever it comes back, however late" in res.stderr, res.output

    watch = paho.Client(CallbackAPIVersion.VERSION2, client_id="t-watch", protocol=paho.MQTTv5)
    sent = []
    watch.on_message = lambda c, u, m: sent.append(m.topic) if "/cmd/" in m.topic else None
    watch.connect(mosquitto.host, mosquitto.port)
    watch.loop_start()
    try:
        will = json.dumps({"schema_version": 1, "state": "offline", "reason": "will", "site": "s", "device": "d",
                           "client_id": settings.effective_client_id}).encode()   # a lost link's, as the broker sends it
        watch.publish(Topics("s", "d").status, will, qos=1, retain=True).wait_for_publish(5)
        res = CliRunner().invoke(main, [*argv, '{"reason": "will"}'])
        assert res.exit_code == 3 and "is offline: its retained status is its last will" in res.stderr, res.output
        watch.subscribe(f"{Topics('s', 'd').base}/cmd/#", qos=1)
        p = subprocess.Popen([sys.executable, "-c", "from edge_ad.cli import main; main()", *argv,
                              '{"reason": "queued"}', "--even-offline"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert _wait(lambda: sent, 30), "the command was not sent"
            lk = device()                             # back: its session delivers what was queued
            out, err = p.communicate(timeout=60)
            lk.stop()
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0 and json.loads(out)["result"] == {"paused": True}, err
        assert ran == ["queued"]                      # the refused ones were never queued before it
    finally:
        watch.disconnect()
        watch.loop_stop()


def test_cli_command_to_a_device_without_a_retained_status_says_so_and_names_the_devices_that_have_one(
        mosquitto_factory, tmp_path):
    """`edge-ad command` to a mistyped device id waited the whole --timeout without a word (an ACL can hide a
    device's status, so it sends all the same). When no status is retained for that device it now says so on
    stderr at once, naming the devices that have one (the closest as a guess), and still waits: a reply that
    comes (a device whose status the broker's ACL hides from this login) is printed as before, exit 0."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    acl = tmp_path / "acl"
    acl.write_text("user dev\ntopic readwrite edge-ad/#\n\n"
                   "user cli\ntopic read edge-ad/v1/p1/cam1/status\ntopic write edge-ad/v1/+/+/cmd/#\n"
                   "topic readwrite edge-ad/replies/#\n")             # cam2's status hidden from the CLI
    broker = mosquitto_factory(extra_config=f"acl_file {acl}")
    links = []
    for device in ("cam1", "cam2"):
        lk = MqttLink(MqttSettings(url=broker.url, site="p1", device=device, username="dev",
                                   outbox_path=tmp_path / f"{device}.sqlite", reconnect_min_s=0.1)).start()
        links.append(lk)
        assert _wait(lambda: lk.connected)
    try:
        argv = ["command", "--mqtt", broker.url, "--username", "cli", "--site", "p1", "--timeout", "30"]
        res = CliRunner().invoke(main, [*argv, "--device", "cam2", "status"])
        assert res.exit_code == 0 and json.loads(res.stdout)["ok"], res.output      # hidden, yet it answers
        assert res.stderr == (
            f"note: no status is retained for device p1/cam2 on {broker.url}: a mistyped --site or --device, a "
            "device that never connected, or a broker ACL that hides its status from this login; the devices with "
            "a retained status under edge-ad/v1/ are p1/cam1 (did you mean p1/cam1?). Waiting for the reply all "
            "the same (--timeout 30 s)\n"), res.stderr
        res = CliRunner().invoke(main, [*argv, "--device", "cam1", "status"])
        assert res.exit_code == 0 and res.stderr == "", res.output             # a status: nothing to say
        res = CliRunner().invoke(main, ["command", "--mqtt", broker.url, "--username", "dev", "--site", "plant9",
                                        "--device", "line3", "--timeout", "0.5", "--even-offline", "status"])
        assert res.exit_code == 1 and res.stdout == "", res.output           # a typo: nothing answers
        note, error = res.stderr.splitlines()
        assert note.startswith("note: no status is retained for device plant9/line3") and note.endswith(
            "the devices with a retained status under edge-ad/v1/ are p1/cam1, p1/cam2. Waiting for the reply all "
            "the same (--timeout 0.5 s)"), note
        assert error.startswith("error: no reply on edge-ad/replies/") and "within 0.5 s" in error, error
    finally:
        for lk in links:
            lk.stop()


def test_commands_over_mqtt_311(mosquitto, tmp_path):
    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            protocol="3.1.1", command_secret="k", reconnect_min_s=0.1)
    lk = MqttLink(settings)
    lk.register_command("set_threshold", lambda args: {"threshold": args["threshold"]})
    lk.start()
    assert _wait(lambda: lk.connected)       # a command sent before it subscribed would be lost
    try:
        broker = BrokerSettings(url=mosquitto.url, protocol="3.1.1")
        with CommandClient(broker, secret="k") as cc:
            r = cc.call("s", "d", "set_threshold", {"threshold": 0.3}, timeout=5)
            assert r["ok"] and r["result"] == {"threshold": 0.3} and "correlation_id" in r
            assert cc.call("s", "d", "status", timeout=5)["ok"]
        with CommandClient(broker) as unsigned:
            assert unsigned.call("s", "d", "set_threshold", {"threshold": 0.3}, timeout=5)["error"]["code"] == \
                "unauthorized"
    finally:
        lk.stop(timeout=2)


def test_the_cli_over_v5_gets_the_reply_of_a_device_that_speaks_311(mosquitto, tmp_path, monkeypatch):
    """edge-ad command (MQTT v5 by default) sent its reply route, requester id and signature as v5 properties
    only, which a device configured for 3.1.1 never sees: the device paused, answered on reply/pause, and the CLI
    exited 1 saying the device may be offline and the command 'will not run late'. The payload carries them too
    (the signature in the signed form): the reply comes back, with an allow-list and a secret on the device."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            protocol="3.1.1", command_clients=["mes-1"], command_secret="plant-secret",
                            reconnect_min_s=0.1)
    calls = []
    lk = MqttLink(settings)
    lk.register_command("pause", lambda args: calls.append(args) or {"paused": True})
    lk.start()
    assert _wait(lambda: lk.connected)       # a command sent before it subscribed would be lost
    monkeypatch.setenv("EDGE_AD_MQTT_COMMAND_SECRET", "plant-secret")
    argv = ["command", "--mqtt", mosquitto.url, "--site", "s", "--device", "d", "--timeout", "5", "--client-id",
            "mes-1"]
    try:
        res = CliRunner().invoke(main, [*argv, "pause", '{"reason": "lunch"}'])
        assert res.exit_code == 0 and res.stderr == "", res.output
        reply = json.loads(res.stdout)
        assert reply["ok"] and reply["result"] == {"paused": True} and calls == [{"reason": "lunch"}]
        res = CliRunner().invoke(main, [*argv, "status"])
        assert res.exit_code == 0 and json.loads(res.stdout)["result"]["birth"]["protocol"] == "3.1.1", res.output
        # and a v5 device gets the same request with the same answer, on the response topic
        v5 = MqttLink(MqttSettings(url=mosquitto.url, site="s", device="v5", outbox_path=tmp_path / "v5.sqlite",
                                   command_clients=["mes-1"], command_secret="plant-secret", reconnect_min_s=0.1))
        v5.register_command("pause", lambda args: calls.append(args) or {"paused": True})
        v5.start()
        try:
            assert _wait(lambda: v5.connected)
            res = CliRunner().invoke(main, [*argv[:6], "v5", *argv[7:], "pause", '{"reason": "v5"}'])
            assert res.exit_code == 0 and json.loads(res.stdout)["ok"], res.output
            assert calls == [{"reason": "lunch"}, {"reason": "v5"}]
        finally:
            v5.stop(timeout=2)
    finally:
        lk.stop(timeout=2)


@pytest.mark.parametrize("policy", ["fpr:5", "sigma:0", "fpr:0"])
def test_calibrate_refuses_a_policy_the_refit_would_refuse_before_collecting_frames(policy):
    """The command checks the policy like the CLI and the config do, before minutes of live frames are
    collected for a refit that would refuse it."""
    from types import SimpleNamespace

    from edge_ad.runtime.commands import Commands

    svc = SimpleNamespace(settings=SimpleNamespace(calibration=SimpleNamespace(frames=64, policy="max",
                                                                                timeout_s=30.0)),
                          calibrate=lambda *a: pytest.fail("frames were collected"))
    schema.validate("cmd.calibrate", {"policy": policy})          # the schema's pattern lets it through
    with pytest.raises(InputError, match=f"threshold policy '{policy}'"):
        Commands(svc).calibrate({"policy": policy})


def test_a_read_only_bundle_is_a_failed_reply_naming_it_not_a_handler_bug(tmp_path, monkeypatch):
    """calibrate, set_threshold and rollback_calibration on a bundle that cannot be written: refused before
    any frame is collected, or (a disk error on the way) a 'failed' reply naming the file, as the CLI says it."""
    import contextlib
    import errno
    from types import SimpleNamespace

    from edge_ad.runtime import commands as runtime_commands
    from edge_ad.runtime.commands import Commands

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "calibration.d" / ".0002.json.tmp"))

    cal = SimpleNamespace(version=1, threshold=0.5, replace=lambda **kw: None)
    svc = SimpleNamespace(settings=SimpleNamespace(calibration=SimpleNamespace(frames=64, policy="max",
                                                                                timeout_s=30.0)),
                          bundle=SimpleNamespace(path=tmp_path, write_calibration=read_only,
                                                 calibration_lock=contextlib.nullcontext),
                          inspector=SimpleNamespace(calibration=cal), calibrate=read_only,
                          rollback_calibration=read_only, effective_threshold=lambda: 0.5,
                          check_calibration_current=lambda what: None)
    d = _dispatcher()
    cmds = Commands(svc)
    for name, args in (("calibrate", {}), ("set_threshold", {"threshold": 0.3}), ("rollback_calibration", {})):
        d.register(name, getattr(cmds, name))
        err = _check_reply(d.handle(_msg(name, args)))["error"]
        assert err["code"] == "failed", err
        assert err["message"] == (f"{name}: {tmp_path}/calibration.d/.0002.json.tmp: read-only file system; "
                                  "the calibration in force is unchanged")
    # the bundle folder itself cannot be written: known before minutes of frames are collected
    monkeypatch.setattr(runtime_commands.os, "access", lambda path, mode: False)
    svc.calibrate = lambda *a, **kw: pytest.fail("frames were collected")
    err = d.handle(_msg("calibrate")).body["error"]
    assert err["code"] == "failed" and err["message"].startswith(f"calibrate: {tmp_path}: ")
    assert "the calibration in force is unchanged" in err["message"]
    # any handler's disk error names its file; an OSError about no file is still a bug
    d.register("reload", lambda args: read_only())
    assert d.handle(_msg("reload")).body["error"]["code"] == "failed"
    d.register("reload", lambda args: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    assert d.handle(_msg("reload")).body["error"]["code"] == "internal"



def test_the_did_you_mean_docs_mqtt_md_quotes_is_the_one_made():
    """docs/mqtt.md quoted 'did you mean plant1/line3-cam1 or plant1/line3-cam2?' for plant1/line3-cam9 in the notes
    of 'command' and 'decommission'; the guesses come closest first, equally close ones the later name first, so
    the line says cam2 first. Both quotes are now the text made."""
    import re
    from pathlib import Path

    from edge_ad.mqtt.topics import known_devices_text

    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text("utf-8").split())
    made = known_devices_text("plant1", "line3-cam9", [f"edge-ad/v1/plant1/line3-cam{i}/status" for i in (1, 2)])
    quoted = re.findall(r"[Tt]he devices with a retained status under edge-ad/v1/ are plant1/line3-cam1, "
                        r"plant1/line3-cam2 \(did you mean [^)]*\)", doc)
    assert len(quoted) == 2 and all(q[1:] == made[1:] for q in quoted), (quoted, made)


def test_a_mistyped_device_is_guessed_from_its_site_or_its_name_not_from_common_letters():
    """The did-you-mean of 'command' and 'decommission' compared the whole 'site/device' with a loose cutoff, so
    p9/cam9 'meant' p1/cam2 (their common 'p', '/cam'). A typo is in one part: the close devices of the same site,
    then the same device under another site; the whole name only when it is much closer."""
    from edge_ad.mqtt.topics import known_devices_text

    def guess(site, device, *names):
        text = known_devices_text(site, device, [f"edge-ad/v1/{n}/status" for n in names])
        return text.partition("(did you mean ")[2].rstrip("?)")

    assert guess("p9", "cam9", "p1/cam1", "p1/cam2") == ""
    assert guess("plant9", "line3", "p1/cam1", "p1/cam2") == ""
    assert guess("p1", "cam9", "p1/cam1", "p1/cam2") == "p1/cam2 or p1/cam1"
    assert guess("p1", "cam3", "p1/cam1", "p1/cam2", "p2/cam3") == "p1/cam2, p1/cam1 or p2/cam3"
    assert guess("plnt1", "line3-camera1", "plant1/line3-camera1", "plant2/line3-camera2") == "plant1/line3-camera1"


@pytest.mark.parametrize("protocol, how", [("5", "will"), ("3.1.1", "will"), ("5", "stopped"), ("5", "restarted"),
                                           ("3.1.1", "restarted")])
def test_cli_command_stops_waiting_when_the_device_goes_offline_while_it_runs(mosquitto, protocol, how):
    """`edge-ad command --timeout 50 calibrate` to a device killed 9 s in waited the whole 50 s, though the broker
    had published the device's will, and then said its retained status 'says online since ...' (read before
    sending). It watches the device's status while it waits: a clean stop without a reply, or the device back
    after its will as another process (its birth's 'started' differs: killed and restarted), ends the wait at once,
    exit 1, saying the device went offline while the command was under way and that its outcome is unknown. A
    will alone does not end it (a device that only lost its network answers after it reconnects), but the timeout
    then says the device went offline, not what the status read before sending said. Here a fake device with a
    will receives the command and drops its connection (or says it stopped, without answering). The retained
    offline status the watch's subscription brings does not end it (--even-offline waits for a device that is
    offline: see the test above)."""
    import paho.mqtt.client as paho
    from click.testing import CliRunner
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_ad.cli import main

    topics = Topics("s", "d")
    proto = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-device", protocol=proto)
    will = {"schema_version": 1, "state": "offline", "reason": "will", "site": "s", "device": "d",
            "client_id": "fake-device"}
    dev.will_set(topics.status, json.dumps(will), qos=1, retain=True)
    got = threading.Event()
    dev.on_message = lambda c, u, m: got.set()
    dev.connect(mosquitto.host, mosquitto.port)
    online = {**will, "reason": "connected", "state": "online", "ts": "2026-12-07T05:15:12.589Z",
              "started": "2026-12-07T05:15:12.000Z"}
    dev.subscribe(f"{topics.base}/cmd/#", qos=1)
    dev.publish(topics.status, json.dumps(online), qos=1, retain=True)

    def device():   # runs until the command comes, then loses its connection without a DISCONNECT (kill -9)
        while not got.is_set():
            dev.loop(timeout=0.05)
        if how == "stopped":
            stopped = {**will, "reason": "stopped", "ts": "2026-12-07T05:16:00.000Z"}
            dev.publish(topics.status, json.dumps(stopped), qos=1, retain=True)
            dev.disconnect()
            dev.loop(timeout=0.5)
            return
        dev.socket().close()
        if how == "restarted":   # systemd starts it again: a new process, a new birth, once the will is out
            back = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-device-2", protocol=proto)
            back.connect(mosquitto.host, mosquitto.port)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not seen_will.is_set():
                back.loop(timeout=0.05)
            back.publish(topics.status, json.dumps({**online, "started": "2026-12-07T05:16:30.000Z"}), qos=1,
                         retain=True)
            for _ in range(20):
                back.loop(timeout=0.05)
            back.disconnect()

    seen_will = threading.Event()
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="will-watch", protocol=paho.MQTTv5)
    watcher.on_message = lambda c, u, m: seen_will.set() if b'"will"' in m.payload and not m.retain else None
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe(topics.status, qos=1)
    watcher.loop_start()
    t = threading.Thread(target=device, daemon=True)
    t.start()
    timeout = "3" if how == "will" else "120"
    try:
        t0 = time.monotonic()
        res = CliRunner().invoke(main, ["command", "--mqtt", mosquitto.url, "--protocol", protocol, "--site", "s",
                                        "--device", "d", "--timeout", timeout, "calibrate", '{"frames": 30}'])
        waited = time.monotonic() - t0
        t.join(timeout=15)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    assert got.is_set() and res.exit_code == 1 and res.stdout == "", res.output
    why = {"will": "the broker published its last will, having lost its connection (killed, a power cut, or a "
                   "network cut), and no reply came within 3 s; it may still answer once it reconnects",
           "stopped": "edge-ad stopped there at 2026-12-07T05:16:00.000Z without answering it",
           "restarted": "the broker published its last will, and it came back as another process (started "
                        "2026-12-07T05:16:30.000Z): it was killed or lost power, and restarted"}[how]
    assert res.stderr.startswith(
        f"error: device s/d went offline while the command calibrate was under way: its status turned offline: "
        f"{why}. Whether the command ran, in part or in full, is unknown: once the device is back, send 'status'"), \
        res.stderr
    assert "no reply on" not in res.stderr and "says online" not in res.stderr, res.stderr
    assert how == "will" or waited < 60, waited          # the stop and the restart end the wait, not the timeout


def test_the_status_watched_while_a_reply_is_awaited_decides_once():
    """A 'stopped' status ended the wait, and a will that came before the caller woke replaced it: the message
    then took the will's branch, which formats the timeout, None there: a TypeError out of edge-ad command. What
    ends the wait is kept; and a will followed by the same process back online is no longer 'went offline'."""
    from edge_ad.mqtt.requester import CommandClient, went_offline_text

    def _j(obj):
        return json.dumps(obj).encode()

    retained = _j({"state": "online", "started": "t0"})
    stopped = _j({"state": "offline", "reason": "stopped", "ts": "2026-12-07T05:16:00.000Z"})
    will = _j({"state": "offline", "reason": "will"})
    event, seen = threading.Event(), {}
    for payload, is_retained in ((retained, True), (stopped, False), (will, False)):
        CommandClient._status_while_waiting([(event, seen)], payload, is_retained)
    assert event.is_set() and seen["end"] == "stopped" and seen["offline"]["reason"] == "stopped"
    text = went_offline_text("edge-ad/v1/s/d/cmd/calibrate", seen)
    assert "edge-ad stopped there at 2026-12-07T05:16:00.000Z without answering it" in text
    event, seen = threading.Event(), {}
    for payload, is_retained in ((retained, True), (will, False), (_j({"state": "online", "started": "t0"}), False)):
        CommandClient._status_while_waiting([(event, seen)], payload, is_retained)
    assert not event.is_set() and "offline" not in seen                  # back: a timeout is 'no reply' again
    assert "no reply came;" in went_offline_text("edge-ad/v1/s/d/cmd/x", {"offline": {"reason": "will"}})
