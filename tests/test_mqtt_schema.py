"""Payload schemas: valid schemas, every payload kind the link really publishes validates, bad payloads
do not, and every example in docs/mqtt.md and README.md validates (so the documentation cannot drift)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import jsonschema
import pytest

from edge_ad.errors import InputError
from edge_ad.mqtt import COMMANDS, MqttLink, MqttSettings, schema
from edge_ad.mqtt.collector import Collector
from edge_ad.mqtt.requester import CommandClient
from edge_ad.mqtt.settings import BrokerSettings
from edge_ad.scoring import Calibration, MapNorm

DOC = Path(__file__).resolve().parent.parent / "docs" / "mqtt.md"


def test_schema_files_are_valid_and_complete():
    names = schema.schema_names()
    for name in schema.PAYLOADS:
        assert name in names
    for name in COMMANDS:
        assert f"cmd.{name}" in names
    for name in names:
        s = schema.load(name)
        jsonschema.validators.validator_for(s).check_schema(s)
        assert s["$id"] == f"urn:edge-ad:v1:{name}" and s.get("title")
    with pytest.raises(InputError, match="no payload schema 'nope'"):
        schema.load("nope")


def test_bad_payloads_are_refused_with_the_field_named():
    good = {"schema_version": 1, "id": "a", "seq": 1, "ts": "2025-01-01T00:00:00.000Z", "site": "s",
            "device": "d", "score": 0.5, "ng": False}
    schema.validate("result", good)
    bad = dict(good)
    del bad["seq"]
    bad["ng"] = "no"
    problems = schema.errors("result", bad)
    assert any("'seq' is a required property" in p for p in problems)
    assert any(p.startswith("ng:") for p in problems)
    with pytest.raises(InputError, match="schema 'result'"):
        schema.validate("result", bad)
    assert schema.errors("status", {"schema_version": 1, "state": "asleep", "site": "s", "device": "d"})
    assert schema.errors("reply", {"schema_version": 1, "ts": "t", "site": "s", "device": "d", "command": "x",
                                   "ok": False})                    # an error reply needs 'error'


def test_model_health_events_of_an_older_edge_ad_still_validate():
    """model_health events made before 372c9c5 have no release (nor rolled_back_to after a rollback); an upgraded
    line's outbox sends them after the upgrade, and the schema a consumer validates with (docs/mqtt.md) refused
    them. Both are optional now (this version always sends them: test_model_update checks that), and are still
    checked when present."""
    head = {"schema_version": 1, "id": "030fac1d-7485-40a5-a537-0a930245f038", "seq": 9,
            "ts": "2026-12-07T02:33:06.938Z", "site": "plant1", "device": "line-157ceb3", "type": "model_health"}
    old = [{**head, "status": "ok", "reason": "20 frames, NG rate 0.400, 0 errors"},   # as edge-ad 157ceb3 sent it
           {**head, "status": "failed", "reason": "NG rate jumped to 0.450 from 0.050 (limit +0.2)", "frames": 20,
            "errors": 0, "ng_rate": 0.45, "elapsed_s": 41.3, "rolled_back": True,
            "restored": "/var/lib/edge-ad/deploy/releases/r0007-20250501T120150Z-9f2c4be01d7a"},
           {**head, "status": "rollback_failed", "restored": "/var/lib/edge-ad/deploy/releases/r0007",
            "reason": "InputError: no model.onnx"}]
    for ev in old:
        assert schema.errors("event", ev) == [], ev
    now = {**old[1], "release": "r0008-20250501T140111Z-0b1de47a3c95", "rollback": "done",
           "rolled_back_to": "r0007-20250501T120150Z-9f2c4be01d7a"}
    assert schema.errors("event", now) == []
    for field, bad in (("release", ""), ("rolled_back_to", None)):
        problems = schema.errors("event", {**now, field: bad})
        assert len(problems) == 1 and problems[0].startswith(f"{field}: "), problems


def test_every_published_payload_matches_its_schema(mosquitto, tmp_path):
    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1)
    cal = Calibration(maps={"map": MapNorm(0.1, 0.9)}, threshold=0.5, policy="max", version=3)
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/s/d/#") as col:
        link = MqttLink(settings, birth={"model_hash": "ab" * 32, "calibration_version": 2})
        link.register_command("pause", lambda args: {"paused": True})
        link.start()
        link.publish_result({"score": 0.7, "ng": True, "threshold": 0.5, "latency_ms": 3.2, "frame": 9,
                             "regions": [{"x": 1, "y": 2, "w": 3, "h": 4, "score": 0.9}], "ts": time.time()})
        link.publish_event({"score": 0.7, "result_id": "r"}, jpeg=b"\xff\xd8\xff")
        link.publish_event({"type": "drift", "message": "OK scores drifted"})
        link.publish_telemetry({"fps": 30.0, "latency_ms": {"p50": 4.0, "p99": 9.0}, "ng_rate": 0.01,
                                "drift": {"drift": False, "z": 0.3}})
        link.publish_calibration(cal)
        with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
            replies = [cc.call("s", "d", "status", timeout=5), cc.call("s", "d", "pause", timeout=5),
                       cc.call("s", "d", "pause", {"x": 1}, timeout=5), cc.call("s", "d", "nope", timeout=5)]
        kinds = ("status", "result", "event", "telemetry", "calibration")
        assert col.wait_for(lambda c: all(c.of_kind(k) for k in kinds) and len(c.of_kind("event")) == 2, 10)
        link.stop()
        assert col.wait_for(lambda c: c.of_kind("status")[-1].json()["state"] == "offline", 5)
    checked = 0
    for kind in kinds:
        for m in col.of_kind(kind):
            assert schema.errors(kind, m.json()) == [], (kind, m.payload)
            checked += 1
    for r in replies:
        assert schema.errors("reply", r) == [], r
    assert checked >= 7
    assert [r["ok"] for r in replies] == [True, True, False, False]


def test_event_images_on_their_own_topic_match_their_events_without_v5_properties(mosquitto, tmp_path):
    """MQTT 3.1.1 has no event_id property, and the sha256 is ambiguous when frames repeat (many events of a
    replayed folder or a still line share one): with image_topic_event_id each JPEG goes to
    event/image/<event id>, the topic its event names, so a 3.1.1 consumer matches it by topic."""
    from edge_ad.mqtt.topics import parse

    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1, protocol="3.1.1", image_min_interval_s=0, image_topic_event_id=True,
                            validate_payloads=True)
    broker = BrokerSettings(url=mosquitto.url, protocol="3.1.1")
    jpeg = b"\xff\xd8 the same frame \xff\xd9"
    with Collector(broker, "edge-ad/v1/s/d/#") as col:
        link = MqttLink(settings).start()
        ids = [link.publish_event({"score": 0.9, "result_id": f"r{i}"}, jpeg=jpeg) for i in range(3)]
        ids.append(link.publish_event({"id": "given-id", "score": 0.8}, jpeg=jpeg))    # an id the caller chose
        images = lambda c: [m for m in c.messages if "/event/image/" in m.topic]      # noqa: E731
        assert col.wait_for(lambda c: len(c.of_kind("event")) == 4 and len(images(c)) == 4, 10)
        link.stop()
    events = {m.json()["id"]: m.json() for m in col.of_kind("event")}
    assert ids[-1] == "given-id" and set(events) == set(ids)
    for event_id, ev in events.items():
        assert schema.errors("event", ev) == [] and ev["image"]["sha256"] == events[ids[0]]["image"]["sha256"]
        assert ev["image"]["topic"] == f"edge-ad/v1/s/d/event/image/{event_id}"
    assert {m.topic: m.payload for m in images(col)} == {events[i]["image"]["topic"]: jpeg for i in ids}
    assert parse(events[ids[0]]["image"]["topic"]) == ("s", "d", f"event/image/{ids[0]}")
    from edge_ad.mqtt.monitor import FleetView

    assert FleetView().consume(events[ids[0]]["image"]["topic"], jpeg) is None          # not a row of the monitor


ODD_EVENT_IDS = ["a/b", "x+y", "#", "ev\u0085x", "\ufdd0nc", "long-" + "x" * 300]   # the last: > 256 bytes


@pytest.mark.parametrize("protocol, on", [("5", True), ("5", False), ("3.1.1", True)])
def test_any_event_id_a_caller_gives_keeps_its_event_and_image_and_the_connection(mosquitto, tmp_path, caplog,
                                                                                  protocol, on):
    """With image_topic_event_id an id with '/' or '+' raised InputError only when a JPEG was given: the whole
    event was lost, while the same id without a JPEG was taken; an id with U+0085 or a non-character made a
    topic (and, under v5, an event_id property) Mosquitto closes the connection for, at every reconnect, the
    outbox blocked behind it. Every event is stored and delivered with its id as given; an image whose id cannot
    be its topic level goes to event/image/sha256-<hash>, the topic its event names, and under v5 carries no
    event_id property when the id is not text the broker takes; the connection is never lost; one WARNING."""
    import hashlib
    import logging

    settings = MqttSettings(url=mosquitto.url, site="s", device="d", outbox_path=tmp_path / "o.sqlite",
                            reconnect_min_s=0.1, protocol=protocol, image_min_interval_s=0, image_topic_event_id=on,
                            validate_payloads=True)
    jpeg = b"\xff\xd8 a frame \xff\xd9"
    with Collector(BrokerSettings(url=mosquitto.url, protocol=protocol), "edge-ad/v1/s/d/#") as col, \
            caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        link = MqttLink(settings).start()
        try:
            given = ODD_EVENT_IDS + ["plain-ok"]
            with_image = [link.publish_event({"id": i, "score": 0.9}, jpeg=jpeg) for i in given]
            without = [link.publish_event({"id": i + "-noimg", "score": 0.9}) for i in given]
            result = link.publish_result({"score": 0.1, "ng": False})
            images = lambda c: [m for m in c.messages if "/event/image" in m.topic]      # noqa: E731
            assert col.wait_for(lambda c: len(c.of_kind("event")) == 2 * len(given) and len(images(c)) == len(given)
                                and c.of_kind("result"), 15)
            deadline = time.monotonic() + 10
            while link.stats()["outbox_depth"] and time.monotonic() < deadline:   # the last acks deleted
                time.sleep(0.02)
            st = link.stats()
        finally:
            link.stop()
    assert with_image == given and without == [i + "-noimg" for i in given]
    assert st["disconnects"] == 0 and st["connects"] == 1 and st["outbox_depth"] == 0
    assert [m.json()["id"] for m in col.of_kind("result")] == [result]
    events = {m.json()["id"]: m.json() for m in col.of_kind("event")}
    assert set(events) == set(with_image) | set(without)
    # with the setting, each on its own topic; without, all on event/image, in order
    image_of = {i: m for m in images(col) for i in given if m.topic == events[i]["image"]["topic"]} if on else \
        dict(zip(given, images(col)))
    for event_id in given:
        topic = events[event_id]["image"]["topic"]
        assert schema.errors("event", events[event_id]) == [] and image_of[event_id].payload == jpeg
        assert image_of[event_id].topic == topic
        if not on:
            assert topic == "edge-ad/v1/s/d/event/image"
        elif event_id == "plain-ok":
            assert topic == "edge-ad/v1/s/d/event/image/plain-ok"
        else:
            assert topic == "edge-ad/v1/s/d/event/image/sha256-" + hashlib.sha256(event_id.encode()).hexdigest()[:32]
        if protocol == "5":
            props = dict(getattr(image_of[event_id].properties, "UserProperty", None) or [])
            assert props.get("event_id") == (None if event_id in ("ev\u0085x", "\ufdd0nc") else event_id)
    warned = [r.getMessage() for r in caplog.records if "mqtt: event id" in r.getMessage()]
    assert len(warned) == 1, warned                     # rate-limited
    assert warned[0].startswith("mqtt: event id 'a/b' holds '/'" if on else "mqtt: event id 'ev\\x85x' holds a")
    # the ones the rate limit held back are told at the stop (every odd id with the setting, 2 without it)
    held = [r.getMessage() for r in caplog.records if "more event(s) since the last report whose id" in r.getMessage()]
    assert held == [f"mqtt: {5 if on else 1} more event(s) since the last report whose id cannot name its image as is "
                    "(the event's image.topic names the topic)"], held


def _doc_examples() -> list[tuple[str, str]]:
    text = DOC.read_text()
    return re.findall(r"<!-- schema: ([\w.]+) -->\s*```json\n(.*?)```", text, flags=re.S)


README = DOC.parent.parent / "README.md"
# the schemas of the examples under each comment of README.md's jsonc block, in order
_README_KINDS = {"status (retained)": ["status"], "result": ["result"], "event": ["event"], "telemetry": ["telemetry"],
                 "calibration (retained)": ["calibration"],
                 "cmd/calibrate (in), and its reply on the response topic": ["cmd.calibrate", "reply"]}


def test_readme_examples_match_the_schemas():
    """README.md's MQTT examples (a jsonc block, one '// kind' comment before each payload) were not tested:
    the event's sha256 was cut short and the calibrate reply lacked schema_version, site and device."""
    block = re.search(r"```jsonc\n(.*?)```", README.read_text(), flags=re.S).group(1)
    sections = re.split(r"^// (.*)\n", block, flags=re.M)[1:]
    titles = sections[0::2]
    assert titles == list(_README_KINDS), titles      # a new example gets its schema here
    for title, body in zip(titles, sections[1::2]):
        objs = [json.loads(part) for part in re.split(r"\n(?=\{)", body.strip())]
        assert len(objs) == len(_README_KINDS[title]), title
        for kind, obj in zip(_README_KINDS[title], objs):
            assert schema.errors(kind, obj) == [], (kind, obj)


def test_the_telemetry_examples_give_ng_rate_over_their_interval():
    """docs/mqtt.md's and README.md's telemetry said "frames": 86400, "ng": 190, "ng_rate": 0.0022, which is 190 of
    86 400, the rate since the start; ng_rate is over the interval (the counts beside it are since the start): the
    example must be an NG share of the parts of its interval (fps x interval_s), and not the one since the start."""
    readme = re.search(r"^// telemetry\n(\{.*?\})\n// ", README.read_text(), flags=re.S | re.M).group(1)
    examples = [json.loads(b) for k, b in _doc_examples() if k == "telemetry"] + [json.loads(readme)]
    for ex in examples:
        parts = round(ex["fps"] * ex["interval_s"])
        assert any(round(k / parts, 4) == ex["ng_rate"] for k in range(parts + 1)), ex
        assert ex["ng_rate"] != round(ex["ng"] / (ex["ok"] + ex["ng"]), 4), ex


def test_model_hash_is_a_whole_sha256():
    """README.md and docs/mqtt.md showed "model_hash": "9f2c41d0a7b3" (12 hex digits) in the status and result
    examples, though the device sends the whole sha256 (Bundle.model_hash), and the schemas, which the doc
    examples are checked against, took any string. They now take 64 lowercase hex digits (or null)."""
    for kind, base in (("status", {"schema_version": 1, "state": "online", "ts": "2025-05-01T12:00:00.386Z",
                                   "site": "plant1", "device": "line3-cam1"}),
                       ("result", {"schema_version": 1, "id": "r1", "seq": 1, "ts": "2025-05-01T12:00:00.385Z",
                                   "site": "plant1", "device": "line3-cam1", "score": 0.7, "ng": True,
                                   "threshold": 0.5})):
        assert schema.errors(kind, {**base, "model_hash": hashlib.sha256(b"m").hexdigest()}) == []
        assert schema.errors(kind, {**base, "model_hash": None}) == []
        for bad in ("9f2c41d0a7b3", "A" * 64, "ab" * 32 + "0"):
            found = schema.errors(kind, {**base, "model_hash": bad})
            assert len(found) == 1 and found[0].startswith("model_hash: '"), (kind, found)
            assert found[0].endswith(" does not match '^[0-9a-f]{64}$'"), (kind, found)


def test_docs_examples_match_the_schemas():
    examples = _doc_examples()
    kinds = {k for k, _ in examples}
    assert {"status", "result", "event", "telemetry", "calibration", "reply"} <= kinds
    for kind, body in examples:
        obj = json.loads(body)
        assert schema.errors(kind, obj) == [], (kind, body)
