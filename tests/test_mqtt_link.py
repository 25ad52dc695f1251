"""MqttLink against a real Mosquitto: QoS 1 delivery, last will, broker restarts, kill -9 with a backlog,
non-blocking publishing, bounds, TLS, passwords, MQTT 3.1.1 mode."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from edge_ad.errors import InputError
from edge_ad.mqtt import MqttLink, MqttSettings, schema
from edge_ad.mqtt.broker import TlsFiles, find_mosquitto_passwd, free_port, make_password_file
from edge_ad.mqtt.collector import Collector
from edge_ad.mqtt.outbox import Outbox
from edge_ad.mqtt.settings import BrokerSettings

FAST = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "keepalive_s": 5}


def _settings(url: str, tmp_path, device: str = "d1", **kw) -> MqttSettings:
    return MqttSettings(url=url, site="t", device=device, outbox_path=tmp_path / f"outbox-{device}.sqlite",
                        **{**FAST, **kw})


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _last(col: Collector, kind: str) -> dict:
    msgs = col.of_kind(kind)
    return msgs[-1].json() if msgs else {}


def _results(col: Collector) -> list[dict]:
    return [m.json() for m in col.of_kind("result")]


def test_results_arrive_with_qos1_ids_and_seq(mosquitto, tmp_path):
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/+/result") as col:
        link = MqttLink(_settings(mosquitto.url, tmp_path)).start()
        ids = [link.publish_result({"score": i / 10, "ng": i == 7, "part_id": f"p{i}"}) for i in range(20)]
        assert col.wait_ids(20, 10)
        msgs = col.of_kind("result")
        assert all(m.qos == 1 and not m.retain for m in msgs)
        bodies = [m.json() for m in msgs]
        assert [b["id"] for b in bodies] == ids                   # in order
        assert [b["seq"] for b in bodies] == list(range(1, 21))
        assert bodies[7]["ng"] is True and bodies[3]["part_id"] == "p3"
        assert all(b["site"] == "t" and b["device"] == "d1" and b["schema_version"] == 1 for b in bodies)
        assert _wait(lambda: link.stats()["outbox_depth"] == 0, 5)
        st = link.stats()
        assert st["acked"] == 20 and st["connected"] and st["ack_latency_ms"]["n"] == 20
        link.stop()


def _canonical(text: str) -> bool:
    """``text`` is a UUID in its canonical form (36 characters, with dashes, lower case)."""
    return str(uuid.UUID(text)) == text


def test_ids_are_canonical_uuids_and_a_backlog_of_hex_ids_goes_out_as_it_is(mosquitto, tmp_path):
    """Result ids were uuid4().hex (32 hex digits) while event ids, and docs/mqtt.md, are dashed UUIDs. Every id
    edge-ad makes is now the dashed form; results an earlier edge-ad left in the outbox carry hex ids: they are
    sent as they are, and de-duplicated on them like the new ones."""
    old = MqttLink(_settings(mosquitto.url, tmp_path))            # never connected: its results wait in the outbox
    hex_ids = [old.publish_result({"id": uuid.uuid4().hex, "score": 0.1, "ng": False}) for _ in range(3)]
    old.stop()
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/+") as col:
        link = MqttLink(_settings(mosquitto.url, tmp_path))       # the same outbox file: the backlog an upgrade finds
        try:
            new = [link.publish_result({"score": 0.2, "ng": False}) for _ in range(2)]
            event = link.publish_event({"type": "ng", "result_id": new[0]})
            link.start()
            assert col.wait_ids(6, 10), col.unique_ids()
        finally:
            link.stop()
    assert all(_canonical(i) for i in [*new, event, link.outbox.instance]) and not any(map(_canonical, hex_ids))
    assert [b["id"] for b in _results(col)] == hex_ids + new and col.unique_ids() == {*hex_ids, *new, event}
    assert _last(col, "event")["result_id"] == new[0]
    assert all(schema.errors(kind, m.json()) == [] for kind in ("result", "event") for m in col.of_kind(kind))


def test_a_result_holding_a_file_name_that_is_not_utf8_is_stored_not_lost(tmp_path):
    """A result or event holding a lone surrogate (a dir:// image named with a byte that is not UTF-8) was refused
    by the outbox ('a string is not valid Unicode'): the decision never reached MQTT. It is stored with the byte
    as \\xff, as every record writes such a name; a NaN is still refused."""
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{free_port()}", tmp_path))     # never started: all stays stored
    try:
        link.publish_result({"score": 0.1, "ng": False, "truth": {"file": "b\udcff.png"}})
        link.publish_event({"type": "ng", "source": "dir:///data/lot\udcfe"})
        with pytest.raises(InputError, match="NaN"):
            link.publish_result({"score": float("nan"), "truth": {"file": "b\udcff.png"}})
        rows = link.outbox.fetch_after(0, 10)
        assert [r.kind for r in rows] == ["result", "event"]
        assert json.loads(rows[0].payload)["truth"] == {"file": "b\\xff.png"}
        assert json.loads(rows[1].payload)["source"] == "dir:///data/lot\\xfe"
    finally:
        link.stop()


def test_publishing_never_blocks_on_a_dead_broker(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{port}", tmp_path)).start()
    for i in range(100):
        link.publish_result({"score": 0.1, "ng": False})
    link.publish_telemetry({"fps": 10.0})
    elapsed = time.monotonic() - t0
    st = link.stats()
    assert not st["connected"] and st["outbox_depth"] == 100
    assert elapsed < 5.0, f"start + 100 publishes took {elapsed:.2f} s with no broker"
    t1 = time.monotonic()
    link.stop(timeout=10)
    assert time.monotonic() - t1 < 4.0                       # gives up quickly when the broker is unreachable
    with Outbox(tmp_path / "outbox-d1.sqlite") as ob:
        assert ob.depth == 100                                 # kept for the next start


def test_broker_restarts_mid_stream_lose_and_duplicate_nothing(mosquitto, tmp_path):
    n = 400
    with Collector(BrokerSettings(url=mosquitto.url, **FAST), "edge-ad/v1/t/+/result") as col:
        link = MqttLink(_settings(mosquitto.url, tmp_path)).start()
        assert _wait(lambda: link.connected)
        sent = []

        def produce():
            for i in range(n):
                sent.append(link.publish_result({"score": i, "ng": False}))
                time.sleep(0.003)

        producer = threading.Thread(target=produce)
        producer.start()
        for _ in range(2):
            _wait(lambda: len(sent) > n // 3 * (_ + 1), 10)
            mosquitto.stop()
            time.sleep(0.3)
            mosquitto.start()
            assert _wait(lambda: link.connected, 15)   # back before the next cut: two disconnects, not one
        producer.join()
        assert col.wait_ids(n, 30), f"{len(col.unique_ids())} of {n} arrived"
        assert col.unique_ids() == set(sent)
        seqs = sorted({b["seq"] for b in _results(col)})
        assert seqs == list(range(1, n + 1))
        assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
        st = link.stats()
        assert st["disconnects"] >= 2 and st["connects"] >= 3
        link.stop()


class CuttableProxy:
    """A TCP relay between the link and the broker whose cable can be pulled (a network cut), at once
    (:meth:`cut`) or as the client sends a given message (:meth:`cut_at_publish`); it can also turn the
    broker's PUBACKs into refusals (:meth:`refuse_pubacks`)."""

    def __init__(self, target_port: int):
        import socket

        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut_off = False
        self.conns: list = []
        self.lock = threading.Lock()
        self.publish_cuts: list = [b"", 0, 0.0]   # [topic part, connections left to cut at a PUBLISH on it, stall s]
        self.cut_publishes: list[bytes] = []   # the PUBLISH packets cut at so far
        self.puback_refusals: list = [0, 0]    # [reason code, PUBACKs left to give it]
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse_pubacks(self, code: int, times: int) -> None:
        """The next ``times`` PUBACKs of the broker reach the client (MQTT v5) with the reason code ``code``,
        as from a broker that refuses the message (this one took it all the same)."""
        with self.lock:
            self.puback_refusals = [code, times]

    def cut_at_publish(self, topic_part: str, times: int, stall_s: float = 0.0) -> None:
        """The next ``times`` connections are cut as the client sends a PUBLISH whose topic contains
        ``topic_part`` (that packet is not passed on): the link dies while the message is on the wire, as on a
        flaky network or when a broker refuses it. ``stall_s``: the connection first stalls that long (what
        the client sends meanwhile is not passed on either), as a dying network does."""
        with self.lock:
            self.publish_cuts = [topic_part.encode(), times, stall_s]

    def _accept(self):
        import socket

        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            if self.cut_off:
                down.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [down, up]
            threading.Thread(target=self._pump_packets, args=(down, up), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(up, down), daemon=True).start()

    @staticmethod
    def _split(buf: bytes):
        """(the first whole MQTT packet of ``buf``, where its variable header starts) or None: its fixed header
        is the type byte and the remaining length (1 to 4 bytes, 7 bits each)."""
        length, i = 0, 1
        while i < min(len(buf), 5):
            length += (buf[i] & 127) << (7 * (i - 1))
            i += 1
            if not buf[i - 1] & 128:
                return (buf[:i + length], i) if len(buf) >= i + length else None
        return None

    def _cuts(self, packet: bytes, start: int) -> float | None:
        """Is ``packet`` a PUBLISH to cut the connection at? (the stall before the cut, else None)"""
        if packet[0] >> 4 != 3:
            return None
        topic = packet[start + 2:start + 2 + int.from_bytes(packet[start:start + 2], "big")]
        with self.lock:
            part, left, stall_s = self.publish_cuts
            if left <= 0 or part not in topic:
                return None
            self.publish_cuts[1] -= 1
            self.cut_publishes.append(packet)
            return stall_s

    def _pump_packets(self, src, dst):
        """Client to broker, packet by packet, to cut the connection at one."""
        buf, stalled = b"", False
        try:
            while data := src.recv(65536):
                buf += data
                while (found := self._split(buf)) is not None:
                    packet, start = found
                    buf = buf[len(packet):]
                    if not stalled and (stall_s := self._cuts(packet, start)) is not None:
                        if not stall_s:
                            raise OSError("cut")
                        stalled = True
                        threading.Timer(stall_s, self._close, (src, dst)).start()
                    if not stalled:
                        dst.sendall(packet)
        except OSError:
            pass
        self._close(src, dst)

    def _pump_down(self, src, dst):
        """Broker to client, packet by packet, to give PUBACKs the reason code of :meth:`refuse_pubacks`."""
        buf = b""
        try:
            while data := src.recv(65536):
                buf += data
                while (found := self._split(buf)) is not None:
                    packet, start = found
                    buf = buf[len(packet):]
                    with self.lock:
                        code, left = self.puback_refusals
                        if packet[0] >> 4 == 4 and left > 0:     # PUBACK: packet id, reason code
                            self.puback_refusals[1] -= 1
                            packet = bytes([0x40, 3]) + packet[start:start + 2] + bytes([code])
                    dst.sendall(packet)
        except OSError:
            pass
        self._close(src, dst)

    @staticmethod
    def _close(src, dst):
        import socket

        for s in (src, dst):      # shutdown first: a bare close() leaves a socket another thread reads open
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self):
        import socket

        self.cut_off = True
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self):
        self.cut_off = False

    def close(self):
        self.cut()
        self.server.close()


def test_network_cut_loses_nothing_and_the_will_fires(mosquitto, tmp_path):
    proxy = CuttableProxy(mosquitto.port)
    n = 200
    try:
        with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/#") as col:
            link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path)).start()
            assert _wait(lambda: link.connected)
            sent = []
            for i in range(n):
                sent.append(link.publish_result({"score": i, "ng": False}))
                if i == n // 2:
                    proxy.cut()                                  # pull the cable mid-stream
                    assert col.wait_for(lambda c: _last(c, "status").get("reason") == "will", 10)
                    assert _wait(lambda: not link.connected, 5)
                    proxy.restore()
                time.sleep(0.002)
            assert col.wait_ids(n, 20), f"{len(col.unique_ids())} of {n} arrived"
            assert col.unique_ids() == set(sent)
            assert col.wait_for(lambda c: _last(c, "status").get("state") == "online", 10)
            assert link.stats()["disconnects"] >= 1
            link.stop()
    finally:
        proxy.close()


PUBLISHER = r"""
import sys, time
from edge_ad.mqtt import MqttLink, MqttSettings
url, outbox, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
link = MqttLink(MqttSettings(url=url, site="t", device="sub", outbox_path=outbox, reconnect_min_s=0.1,
                             reconnect_max_s=0.5, keepalive_s=5))
link.start()
for i in range(n):
    link.publish_result({"score": i / 1000, "ng": False, "i": i})
print("stored", flush=True)
if mode == "connected":
    while not link.connected:
        time.sleep(0.02)
    print("connected", flush=True)
elif mode == "drain":
    while link.stats()["outbox_depth"] or not link.connected:
        time.sleep(0.02)
    link.stop()
    print("drained", flush=True)
    sys.exit(0)
time.sleep(120)
"""


def _spawn(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _expect_line(proc: subprocess.Popen, word: str, timeout: float = 20.0) -> None:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or box[0].strip() != word:
        proc.kill()
        raise AssertionError(f"expected {word!r} from the publisher, got {box!r}; stderr: {proc.stderr.read()[-2000:]}")


def test_last_will_marks_a_killed_client_offline(mosquitto, tmp_path):
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/sub/status", persistent=False) as col:
        proc = _spawn(mosquitto.url, tmp_path / "o.sqlite", 0, "connected")
        _expect_line(proc, "stored")
        _expect_line(proc, "connected")
        assert col.wait_for(lambda c: any(m.json()["state"] == "online" for m in c.of_kind("status")), 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert col.wait_for(lambda c: _last(c, "status").get("state") == "offline", 10)
        will = col.of_kind("status")[-1]
        assert will.json()["reason"] == "will"
        assert schema.errors("status", will.json()) == []
        # docs/mqtt.md said every payload carries a ts: the will has none (made at connect); its example is the will
        from pathlib import Path

        doc = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text("utf-8")
        [example] = [json.loads(b) for b in re.findall(r"<!-- schema: status -->\s*```json\n(.*?)```", doc, re.S)
                     if '"reason": "will"' in b]
        assert "ts" not in will.json() and set(will.json()) == set(example), (will.json(), example)
    # retained: a newcomer sees the device offline
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/sub/status", persistent=False) as late:
        assert late.wait_for(lambda c: len(c.of_kind("status")) >= 1, 5)
        first = late.of_kind("status")[0]
        assert first.retain and first.json()["state"] == "offline"


def test_kill_9_with_a_backlog_then_restart_delivers_it(mosquitto_factory, tmp_path):
    broker = mosquitto_factory()
    outbox = tmp_path / "kill.sqlite"
    n = 150
    with Collector(BrokerSettings(url=broker.url, **FAST), "edge-ad/v1/t/sub/result") as col:
        broker.stop()                                               # broker down: everything stays in the outbox
        proc = _spawn(broker.url, outbox, n, "hold")
        _expect_line(proc, "stored")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with Outbox(outbox) as ob:                                 # the kill left no lock behind
            assert ob.depth == n
        broker.start()
        proc = _spawn(broker.url, outbox, 0, "drain")               # a new process, same outbox
        _expect_line(proc, "stored")
        _expect_line(proc, "drained", 30)
        proc.wait(10)
        assert col.wait_ids(n, 20), f"{len(col.unique_ids())} of {n} arrived"
        bodies = _results(col)
        assert sorted({b["i"] for b in bodies}) == list(range(n))
        assert sorted({b["seq"] for b in bodies}) == list(range(1, n + 1))
    with Outbox(outbox) as ob:
        assert ob.depth == 0


def test_bounded_outbox_drops_oldest_and_reports_it(mosquitto_factory, tmp_path):
    broker = mosquitto_factory()
    with Collector(BrokerSettings(url=broker.url, **FAST), "edge-ad/v1/t/d1/#") as col:
        broker.stop()
        link = MqttLink(_settings(broker.url, tmp_path, outbox_max_messages=50))
        for i in range(80):
            link.publish_result({"score": i, "ng": False})
        st = link.stats()
        assert st["outbox_depth"] == 50 and st["outbox_dropped"] == 30
        link.start()
        broker.start()
        assert _wait(lambda: link.connected and link.stats()["outbox_depth"] == 0, 15)
        assert col.wait_ids(50, 10)                      # (the collector is back: QoS 0 telemetry is not queued)
        assert sorted({b["seq"] for b in _results(col)}) == list(range(31, 81))   # the newest 50
        link.publish_telemetry({"fps": 1.0})
        assert col.wait_for(lambda c: len(c.of_kind("telemetry")) >= 1, 10)
        tele = col.of_kind("telemetry")[-1].json()
        assert tele["outbox"]["dropped"] == 30 and tele["fps"] == 1.0
        # named once the outbox had room for the event (it pushed out no 31st)
        assert col.wait_for(lambda c: [e["dropped"]["result"]["seq"] for e in _drop_events(c)] == [[[1, 30]]], 5)
        link.stop()


def test_stop_does_not_wait_for_acknowledged_messages_a_full_disk_kept(mosquitto, tmp_path, caplog):
    """On a full disk the broker's PUBACKs come but the rows cannot be deleted: stop() waited its whole
    flush timeout for an outbox depth of 0 that could not come (every run's stop took 10 s). Delivered rows
    are not waited for; they stay in the file and the next start sends them again (same ids). The failed
    deletes are logged once a minute at most: those held back since are told at the stop."""
    from edge_ad.errors import RuntimeFailure

    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/result") as col, \
            caplog.at_level(logging.ERROR, logger="edge_ad.mqtt.sender"):
        link = MqttLink(_settings(mosquitto.url, tmp_path)).start()

        def full_disk(ids):
            raise RuntimeFailure(f"outbox {link.outbox.path}: delete failed (database or disk is full)")

        link.outbox.delete = full_disk
        ids = [link.publish_result({"score": 0.1 * i, "ng": False}) for i in range(5)]
        assert _wait(lambda: link.stats()["acked"] == 5, 10) and col.wait_ids(5, 10)
        t0 = time.monotonic()
        link.stop(timeout=6.0)
        assert time.monotonic() - t0 < 3.0
        errors = [r.getMessage() for r in caplog.records]
        assert len(errors) == 2 and "acknowledged message(s) not deleted" in errors[0], errors
        assert re.fullmatch(r"mqtt: deleting acknowledged messages from the outbox failed \d+ more time\(s\) since "
                            r"the last report \(the last: outbox .*outbox-d1.sqlite: delete failed \(database or "
                            r"disk is full\)\); 5 acknowledged message\(s\) are still in it \(the next start sends "
                            r"them again\)", errors[1]), errors[1]
        with Outbox(tmp_path / "outbox-d1.sqlite") as ob:
            assert ob.depth == 5                       # kept: sent again by the next start
        again = MqttLink(_settings(mosquitto.url, tmp_path)).start()
        assert _wait(lambda: again.stats()["outbox_depth"] == 0, 10)
        again.stop()
        assert col.wait_for(lambda c: c.duplicates() == 5, 10) and col.unique_ids() == set(ids)


def test_a_damaged_outbox_is_announced_once_connected(mosquitto, tmp_path):
    """A damaged outbox file is moved aside at start (see test_mqtt_outbox): the consumers, whose seq
    starts again at 1, get an outbox_reset event naming the moved file, and a birth with a new instance."""
    (tmp_path / "outbox-d1.sqlite").write_bytes(b"not a database" * 100)
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/#") as col:
        link = MqttLink(_settings(mosquitto.url, tmp_path)).start()
        try:
            moved = link.stats()["outbox_reset"]
            assert moved and moved.startswith(str(tmp_path / "outbox-d1.sqlite.corrupt-"))
            assert col.wait_for(lambda c: _last(c, "event") and _last(c, "status"), 10)
            ev = _last(col, "event")
            assert ev["type"] == "outbox_reset" and ev["seq"] == 1 and ev["moved_to"] == moved
            assert ev["error"] == "file is not a database" and ev["outbox"] == str(tmp_path / "outbox-d1.sqlite")
            assert ev["outbox_instance"] == _last(col, "status")["outbox_instance"] == link.outbox.instance
            schema.validate("event", ev)
        finally:
            link.stop()


def test_events_images_calibration_and_birth(mosquitto, tmp_path):
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/#") as col:
        link = MqttLink(_settings(mosquitto.url, tmp_path, image_min_interval_s=60, image_max_bytes=1024),
                        birth={"model_hash": "abc123", "calibration_version": 2}).start()
        e0 = link.publish_event({"score": 0.95}, jpeg=b"\xff" * 2000)           # too large: not sent
        e1 = link.publish_event({"score": 0.9, "result_id": "r1"}, jpeg=b"\xff\xd8jpeg-bytes")
        e2 = link.publish_event({"score": 0.8}, jpeg=b"\xff\xd8second")          # rate-limited
        assert link.stats()["images_skipped"] == 2                                # both reasons counted
        # a record written before sources were stored redacted: the retained calibration goes to every
        # consumer, so the camera's password in its source is not published
        link.publish_calibration({"version": 5, "threshold": 0.42, "policy": "fpr:0.001",
                                  "source": "edge-ad calibrate: rtsp://admin:s3cret@cam/stream",
                                  "maps": {"map": {"q_a": 0.1, "q_b": 0.9, "weight": 1.0}}})
        assert col.wait_ids(3, 10)
        assert col.wait_for(lambda c: len(c.of_kind("event/image")) == 1 and len(c.of_kind("calibration")) >= 1, 10)
        events = {m.json()["id"]: m.json() for m in col.of_kind("event")}
        assert events[e1]["image"]["bytes"] == len(b"\xff\xd8jpeg-bytes") and events[e1]["type"] == "ng"
        assert events[e2]["image"] is None and events[e2]["image_skipped"] == "rate_limited"
        assert events[e0]["image"] is None and events[e0]["image_skipped"] == "too_large"
        img = col.of_kind("event/image")[0]
        assert img.payload == b"\xff\xd8jpeg-bytes"
        assert dict(img.properties.UserProperty)["event_id"] == e1 and img.properties.ContentType == "image/jpeg"
        cal = col.of_kind("calibration")[-1]
        assert cal.json()["version"] == 5 and cal.json()["threshold"] == 0.42
        assert cal.json()["calibration"]["source"] == "edge-ad calibrate: rtsp://***@cam/stream"
        assert b"s3cret" not in cal.payload
        assert col.wait_for(lambda c: _last(c, "status").get("calibration_version") == 5, 5)
        birth = _last(col, "status")
        assert birth["state"] == "online" and birth["model_hash"] == "abc123"
        link.update_birth(model_hash="def456")
        assert col.wait_for(lambda c: _last(c, "status").get("model_hash") == "def456", 5)
        link.stop()
        assert col.wait_for(lambda c: _last(c, "status").get("state") == "offline", 5)
        assert _last(col, "status")["reason"] == "stopped"


def test_an_event_never_announces_an_image_the_outbox_would_drop(tmp_path):
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{free_port()}", tmp_path, outbox_max_messages=3,
                              image_min_interval_s=0)).start()
    try:
        link.publish_result({"score": 0.1, "ng": False})
        outcome = {}
        e1 = link.publish_event({"score": 0.9}, jpeg=b"\xff\xd8a", image_outcome=outcome)   # 2 + 1 image: fits
        assert outcome["image"]["bytes"] == 3
        link.publish_result({"score": 0.2, "ng": False})         # the outbox now holds 3 (result, event, result)
        outcome = {}                                            # and an image (with its event) would not fit
        e2 = link.publish_event({"score": 0.8}, jpeg=b"\xff\xd8b", image_outcome=outcome)
        assert outcome == {"image": None, "image_skipped": "outbox_full"}
        assert link.stats()["images_skipped"] == 1
        with link.outbox._lock:
            rows = link.outbox._db.execute("SELECT kind, msg_id, payload FROM outbox ORDER BY id").fetchall()
        events = {r[1]: json.loads(r[2]) for r in rows if r[0] == "event"}
        assert e1 not in events or events[e1]["image"] is not None   # (the old image made room for e2)
        assert events[e2]["image"] is None and events[e2]["image_skipped"] == "outbox_full"
        assert not any(r[0] == "image" and r[1] == e2 for r in rows)
    finally:
        link.stop(timeout=5)


def test_image_due_and_one_image_per_interval_whatever_the_callers(tmp_path):
    """image_due() tells a caller whether an event image would be sent now, so that it encodes one only then;
    publish_event decides again and records the image it sends in one step under the link's lock. Two events
    published at once both passed the interval check before either recorded its image: two images within
    image_min_interval_s."""
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{free_port()}", tmp_path, image_min_interval_s=3600))
    try:
        assert link.image_due()
        both_checked = threading.Barrier(2, timeout=10)
        fits = link.outbox.image_fits

        def image_fits(*a, **kw):           # both callers between the interval check and the send
            both_checked.wait()
            return fits(*a, **kw)

        link.outbox.image_fits = image_fits
        outcomes = [{}, {}]
        threads = [threading.Thread(target=link.publish_event, args=({"score": 0.9}, b"\xff\xd8" + bytes([i])),
                                    kwargs={"image_outcome": outcomes[i]}) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(bool(o["image"]) for o in outcomes) == [False, True], outcomes
        assert [o.get("image_skipped") for o in outcomes if not o["image"]] == ["rate_limited"]
        assert [r.kind for r in link.outbox.fetch_after(0, 10)].count("image") == 1
        assert not link.image_due()
        # an event whose image was not encoded because none was due: skipped and counted as a jpeg would be
        outcome = {}
        link.publish_event({"score": 0.8}, image_not_due=True, image_outcome=outcome)
        assert outcome == {"image": None, "image_skipped": "rate_limited"}
        assert link.stats()["images_skipped"] == 2
        link.publish_event({"type": "drift"}, image_outcome=(outcome := {}))     # no image at all: nothing said
        assert outcome == {} and link.stats()["images_skipped"] == 2
    finally:
        link.stop(timeout=0)


def test_telemetry_carries_images_skipped(tmp_path):
    """Only the status command's link block said how many event images were skipped: a fleet watching
    telemetry could not see it. The link adds images_skipped to every telemetry body (the telemetry.path line
    too), the count stats() gives."""
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{free_port()}", tmp_path, image_min_interval_s=3600,
                              image_max_bytes=1024, validate_payloads=True))
    try:
        assert link.publish_telemetry({"fps": 1.0})["images_skipped"] == 0
        link.publish_event({"score": 0.9}, jpeg=b"\xff\xd8a")                 # sent
        link.publish_event({"score": 0.9}, jpeg=b"\xff\xd8b")                 # rate_limited
        link.publish_event({"score": 0.9}, jpeg=b"\xff" * 2000)               # too_large
        link.publish_event({"score": 0.9}, image_not_due=True)                 # rate_limited, not encoded
        body = link.publish_telemetry({"fps": 1.0, "images_skipped": 99})      # the link's count wins
        assert body["images_skipped"] == link.stats()["images_skipped"] == 3
        assert json.loads(link._telemetry[-1])["images_skipped"] == 3
        schema.validate("telemetry", body)
    finally:
        link.stop(timeout=0)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(folder, name: str = "ca"):
    """A test CA and a server (localhost) and client certificate signed by it, EC P-256."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=edge-ad test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    for who, usage, san in (("server", "serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"),
                            ("client", "clientAuth", "")):
        (folder / f"{who}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                           f"extendedKeyUsage={usage}\n{san}authorityKeyIdentifier=keyid\n"
                                           "subjectKeyIdentifier=hash\n")
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj",
                 f"/CN={'localhost' if who == 'server' else 'edge-ad-client'}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=folder)
    return folder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test CA")
def test_tls_with_a_test_ca_and_client_certificate(mosquitto_factory, tmp_path):
    pki = _make_pki(tmp_path / "pki")
    broker = mosquitto_factory(tls=TlsFiles(pki / "ca.pem", pki / "server.pem", pki / "server.key"))
    assert broker.url.startswith("mqtts://localhost:")
    tls = {"ca_file": pki / "ca.pem", "cert_file": pki / "client.pem", "key_file": pki / "client.key"}
    with Collector(BrokerSettings(url=broker.url, **tls), "edge-ad/v1/t/+/result") as col:
        link = MqttLink(_settings(broker.url, tmp_path, **tls)).start()
        rid = link.publish_result({"score": 0.5, "ng": False})
        assert col.wait_ids(1, 10) and col.unique_ids() == {rid}
        link.stop()
    # a client that trusts another CA does not connect, and says why
    other = _make_pki(tmp_path / "other", "otherca")
    bad = MqttLink(_settings(broker.url, tmp_path, device="bad", ca_file=other / "otherca.pem",
                             cert_file=pki / "client.pem", key_file=pki / "client.key")).start()
    bad.publish_result({"score": 0.5, "ng": False})
    time.sleep(1.0)
    assert not bad.connected and bad.stats()["outbox_depth"] == 1
    assert bad.stats()["last_error"]
    bad.stop(timeout=1)


@pytest.mark.skipif(find_mosquitto_passwd() is None, reason="needs mosquitto_passwd")
def test_password_from_environment_and_never_logged(mosquitto_factory, tmp_path, monkeypatch, caplog):
    pw = make_password_file(tmp_path / "passwd", {"edge": "Sup3r-Secret"})
    broker = mosquitto_factory(password_file=pw)
    caplog.set_level(logging.DEBUG, logger="edge_ad")
    monkeypatch.setenv("EDGE_AD_MQTT_USERNAME", "edge")
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", "Sup3r-Secret")
    good = MqttLink(_settings(broker.url, tmp_path)).start()
    assert _wait(lambda: good.connected, 10)
    good.stop()
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", "wrong-Secret")
    bad = MqttLink(_settings(broker.url.replace("mqtt://", "mqtt://edge:wrong-Url-Secret@"), tmp_path,
                             device="d2")).start()
    assert _wait(lambda: bad.stats()["last_error"] and "refused" in bad.stats()["last_error"], 10)
    assert not bad.connected
    bad.stop(timeout=1)
    # the device's log and last_error say what to check on the device (not a CLI tool's options)
    said = bad.stats()["last_error"]
    assert said.startswith(f"the broker {bad.settings.safe_url} refused the connection: "), said
    assert "mqtt.username" in said and "EDGE_AD_MQTT_PASSWORD in edge-ad.env" in said and "ACL" in said, said
    assert "--username" not in said, said
    assert any(r.levelno == logging.ERROR and "EDGE_AD_MQTT_PASSWORD in edge-ad.env" in r.getMessage()
               for r in caplog.records), caplog.text
    text = caplog.text
    assert "Sup3r-Secret" not in text and "wrong-Secret" not in text and "wrong-Url-Secret" not in text


@pytest.mark.skipif(find_mosquitto_passwd() is None, reason="needs mosquitto_passwd")
def test_a_refused_login_is_an_error_once_not_at_every_retry(mosquitto_factory, tmp_path, monkeypatch, caplog):
    """A broker that refuses the device's login refuses every retry alike: the link logged an ERROR at each one
    (with reconnect_max_s 60, one a minute for as long as nobody fixes the password: the log is nothing else).
    The first refusal is an ERROR with the reason and the fix, the next only after REFUSED_LOG_S (10 minutes) or
    when the reason changes, each with how many since; all are counted (connect_refused), the ones held back are
    told at the stop, and the connection that finally succeeds says how many refusals came before it."""
    from edge_ad.mqtt import link as link_mod

    pw = tmp_path / "passwd"
    broker = mosquitto_factory(password_file=make_password_file(pw, {"edge": "right-one"}))
    errors = lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]   # noqa: E731
    with caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        bad = MqttLink(_settings(broker.url.replace("mqtt://", "mqtt://edge:wrong-one@"), tmp_path,
                                 reconnect_min_s=0.05, reconnect_max_s=0.1)).start()
        try:
            assert _wait(lambda: bad.stats()["connect_refused"] >= 5, 20), bad.stats()
            assert len(errors()) == 1, errors()
            assert errors()[0].startswith(f"mqtt: the broker {bad.settings.safe_url} refused the connection: Not "
                                          "authorized (check the user name and password: mqtt.username"), errors()
            assert "1 refusal(s) since the last report, 1 in all: connect_refused; logged again in 600 s at the " \
                   "earliest, or when the reason changes" in errors()[0]
            bad._refused_login("the broker refused the connection: Server unavailable")   # another reason: at once
            assert len(errors()) == 2 and "Server unavailable" in errors()[1]
            make_password_file(pw, {"edge": "wrong-one"})       # the broker takes the device's password now
            broker.restart()
            assert _wait(lambda: bad.connected, 20)
            n = bad.stats()["connect_refused"]
        finally:
            bad.stop(timeout=1)
    assert len(errors()) == 2, errors()                      # the stop: none held back (reported at the change)
    accepted = [r.getMessage() for r in caplog.records if "accepted the connection after" in r.getMessage()]
    assert accepted == [f"mqtt: the broker {bad.settings.safe_url} accepted the connection after refusing it {n} "
                        "time(s) in a row"], accepted

    caplog.clear()                                           # held back, then told: after the interval, at the stop
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{free_port()}", tmp_path, device="d2"))
    with caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        for _ in range(3):
            link._refused_login("refused: Not authorized")
        monkeypatch.setattr(link_mod, "REFUSED_LOG_S", 0.0)
        link._refused_login("refused: Not authorized")
        monkeypatch.setattr(link_mod, "REFUSED_LOG_S", 600.0)
        link._refused_login("refused: Not authorized")
        link.stop()
    assert len(errors()) == 3 and "(3 refusal(s) since the last report, 4 in all" in errors()[1], errors()
    assert errors()[2] == "mqtt: the broker refused the connection 1 more time(s) since the last report (5 in all): " \
                          "refused: Not authorized"
    assert link.stats()["connect_refused"] == 5


def test_mqtt_311_mode(mosquitto, tmp_path):
    broker = BrokerSettings(url=mosquitto.url, protocol="3.1.1")
    with Collector(broker, "edge-ad/v1/t/+/result") as col:
        link = MqttLink(_settings(mosquitto.url, tmp_path, protocol="3.1.1")).start()
        rid = link.publish_result({"score": 0.1, "ng": False})
        assert col.wait_ids(1, 10) and col.unique_ids() == {rid}
        link.stop()


def test_embedded_broker_fallback_speaks_311(tmp_path):
    pytest.importorskip("amqtt", reason="the embedded broker needs amqtt (pip install amqtt)")
    from edge_ad.mqtt.broker import EmbeddedBroker
    from edge_ad.mqtt.requester import CommandClient

    with EmbeddedBroker() as broker:
        assert broker.protocol == "3.1.1"
        client = BrokerSettings(url=broker.url, protocol="3.1.1")
        with Collector(client, "edge-ad/v1/t/+/#", persistent=False) as col:
            link = MqttLink(_settings(broker.url, tmp_path, protocol="3.1.1"))
            link.register_command("pause", lambda args: {"paused": True})
            link.start()
            ids = [link.publish_result({"score": 0.1, "ng": False}) for _ in range(20)]
            assert col.wait_ids(20, 10) and col.unique_ids() == set(ids)
            with CommandClient(client) as cc:
                reply = cc.call("t", "d1", "pause", timeout=5)
            assert reply["ok"] and reply["correlation_id"]
            link.stop()


def test_start_broker_prefers_mosquitto(tmp_path, mosquitto_binary):
    from edge_ad.mqtt.broker import Mosquitto, start_broker

    broker = start_broker(tmp_path / "b")
    try:
        assert isinstance(broker, Mosquitto) and broker.protocol == "5" and broker.running
    finally:
        broker.close()


@pytest.mark.parametrize("script, says", [
    ("exit 3", "exited with code 3 before listening; no output, nothing in its log"),
    ("echo 'Error: bad option' >&2; exit 1", "exited with code 1 before listening; its output and log"),
])
def test_broker_that_exits_at_once_says_why(tmp_path, script, says):
    """A mosquitto that exits before listening: the error names its exit code and its output (it said
    'did not start within 10 s:' with nothing after it)."""
    from edge_ad.errors import RuntimeFailure
    from edge_ad.mqtt.broker import Mosquitto

    fake = tmp_path / "mosquitto"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeFailure) as ei:
        Mosquitto(tmp_path / "b", binary=str(fake)).start(timeout=5)
    assert says in str(ei.value)
    if "bad option" in script:
        assert "Error: bad option" in str(ei.value)


def test_an_unreachable_broker_is_a_warning_at_once_then_at_most_once_a_minute(tmp_path, caplog):
    """A wrong URL or a broker that is down must show: the first failed connect is a WARNING naming the
    broker and the outbox depth; the retries after it (seconds apart here) stay at DEBUG."""
    port = free_port()
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{port}", tmp_path))
    link.outbox.put("result", "t/x", b"{}", msg_id="r1")
    fails = []
    real = link._on_connect_fail
    link._on_connect_fail = lambda *a: (real(*a), fails.append(1))   # counted after the real callback ran
    with caplog.at_level(logging.DEBUG, logger="edge_ad.mqtt.link"):
        link.start()
        try:
            assert _wait(lambda: len(fails) >= 3, 20), "the link did not retry"
        finally:
            link.stop(timeout=1)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot connect" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert f"127.0.0.1:{port}" in warned[0].getMessage() and "1 results and events waiting" in warned[0].getMessage()
    assert link.stats()["last_error"] == (f"cannot connect to mqtt://127.0.0.1:{port}: connection refused by "
                                          f"127.0.0.1:{port}: no broker listens on that port (it is down, or the "
                                          "port is wrong)")


def test_publish_size_is_the_packet_paho_writes():
    """The size compared with the broker's Maximum Packet Size is the whole PUBLISH packet, byte for byte."""
    import types

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_ad.mqtt.sender import image_properties, publish_size

    topic = "edge-ad/v1/t/d1/event/image"
    for protocol, v5 in ((paho.MQTTv5, True), (paho.MQTTv311, False)):
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        written = []
        client._sock = types.SimpleNamespace(close=lambda: None)      # "connected": publish writes its packet
        client._packet_queue = lambda command, packet, mid, qos, info=None: (written.append(bytes(packet)),
                                                                             paho.MQTT_ERR_SUCCESS)[1]
        for n in (0, 100, 125, 16_000, 16_383, 2_100_000):              # the length field: 1 to 4 bytes
            for props in ((None, image_properties("a" * 36)) if v5 else (None,)):
                for qos in (0, 1):
                    written.clear()
                    client.publish(topic, b"x" * n, qos=qos, properties=props)
                    assert len(written) == 1 and len(written[0]) == publish_size(topic, n, qos, props, v5)


SMALL_PACKETS = "max_packet_size 2000"     # Mosquitto disconnects a client that sends a larger packet


def test_a_message_over_the_announced_packet_size_is_dropped_and_the_outbox_goes_on(mosquitto_factory, tmp_path):
    """MQTT v5: Mosquitto's max_packet_size disconnected the device for one larger message at every
    reconnect, and everything behind it in the outbox waited for ever. The broker announces its limit in the
    CONNACK: a larger message is never sent (dropped from the outbox, counted, announced by an output_error
    event naming it), what follows is delivered, and an event image over it is left out at once."""
    broker = mosquitto_factory(extra_config=SMALL_PACKETS)
    with Collector(BrokerSettings(url=broker.url), "edge-ad/v1/t/d1/#") as col:
        link = MqttLink(_settings(broker.url, tmp_path, image_min_interval_s=0))
        # stored before the limit is known: the sender drops the image (its event went out announcing it)
        e0 = link.publish_event({"score": 0.9}, jpeg=b"\xff\xd8" + b"i" * 5000)
        link.start()
        try:
            assert _wait(lambda: link.stats()["max_packet_size"] == 2000, 10)
            r1 = link.publish_result({"score": 0.1, "ng": False})
            big = link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000})
            r2 = link.publish_result({"score": 0.3, "ng": False})
            outcome = {}
            e1 = link.publish_event({"score": 0.8}, jpeg=b"\xff\xd8" + b"j" * 5000, image_outcome=outcome)
            assert outcome == {"image": None, "image_skipped": "too_large"}    # known now: left out at once
            assert col.wait_for(lambda c: {r1, r2} <= {m.json()["id"] for m in c.of_kind("result")}
                                and e1 in {m.json()["id"] for m in c.of_kind("event")}, 10)
            assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
            st = link.stats()
            assert st["outbox_dropped"] == 2
            assert st["outbox_dropped_by"] == {"full": 0, "too_large": 2, "rejected": 0}
            assert st["disconnects"] == 0 and st["connects"] == 1
            assert big not in {m.json()["id"] for m in col.of_kind("result")} and not col.of_kind("event/image")
            assert col.wait_for(lambda c: {e0, big} <= _dropped_named(c), 10)     # each drop is named
            ev = _drop_events(col)[0]
            assert ev["output"] == "mqtt" and ev["reason"] == "too_large" and ev["kind"] == "image"
            assert ev["message_id"] == e0 and ev["message_ids"][0] == e0
            assert ev["topic"] == "edge-ad/v1/t/d1/event/image"
            assert ev["bytes"] > 5000 and ev["max_packet_size"] == 2000 and ev["failed"] == len(ev["message_ids"])
            assert "larger than the broker's maximum packet size (2000 bytes" in ev["error"]
            schema.validate("event", ev)
        finally:
            link.stop()
    assert "oversize" not in broker.log_tail(200)


def _drop_events(col: Collector) -> list[dict]:
    return [m.json() for m in col.of_kind("event") if m.json().get("type") == "output_error"]


def _dropped_seqs(events: list[dict], kind: str) -> list[int]:
    """The seq of each ``kind`` the output_error ``events`` name as dropped (their ``dropped.<kind>.seq`` ranges)."""
    return [seq for ev in events for a, b in ev.get("dropped", {}).get(kind, {}).get("seq", [])
            for seq in range(a, b + 1)]


def _dropped_named(col: Collector) -> set[str]:
    """The ids of the messages the output_error events received so far name as dropped."""
    return {i for ev in _drop_events(col) for i in ev.get("message_ids", [])}


def test_every_message_dropped_as_too_large_is_named_by_an_output_error_event(mosquitto_factory, tmp_path, caplog):
    """Only the first too_large drop of each minute was announced (and logged): after a broker limit was
    lowered dozens of queued images and results went at once and 1 was named. Every dropped message is
    named now (message_ids), a burst of them in as few events as the broker's limit allows; the log still
    has one ERROR for the burst."""
    broker = mosquitto_factory(extra_config=SMALL_PACKETS)
    with Collector(BrokerSettings(url=broker.url), "edge-ad/v1/t/d1/#") as col, \
            caplog.at_level(logging.ERROR, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(broker.url, tmp_path))
        # stored before the limit is known (as after a broker restart with a lower max_packet_size)
        big = [link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000}) for _ in range(40)]
        small = [link.publish_result({"score": 0.1, "ng": False}) for _ in range(3)]
        link.start()
        try:
            assert col.wait_for(lambda c: set(big) <= _dropped_named(c), 10), len(_dropped_named(col))
            assert col.wait_for(lambda c: set(small) <= {m.json()["id"] for m in c.of_kind("result")}, 10)
            assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
            st = link.stats()
        finally:
            link.stop()
    assert st["outbox_dropped_by"]["too_large"] == 40         # the events naming them were not dropped too
    events = _drop_events(col)
    assert 2 <= len(events) <= 4, [len(e["message_ids"]) for e in events]     # ~700 bytes + 39 per id in 2000
    assert sum(e["failed"] for e in events) == 40 and [i for e in events for i in e["message_ids"]] == big
    # by seq too (results 1..40, one range per event): a monitor counts them as dropped, not missing
    assert _dropped_seqs(events, "result") == list(range(1, 41))
    assert events[0]["dropped"]["result"]["first_id"] == big[0]
    for ev in events:
        schema.validate("event", ev)
        assert ev["failed"] == len(ev["message_ids"]) and ev["kind"] == "result" and ev["max_packet_size"] == 2000
    logged = [r.getMessage() for r in caplog.records if "dropped from the outbox" in r.getMessage()]
    assert len(logged) == 2 and f"result {big[0]}" in logged[0], logged     # the first at once, the rest at the stop
    assert logged[1].startswith("mqtt: 39 more message(s) dropped from the outbox as too_large")
    assert "40 in all" in logged[1]


def test_the_events_for_dropped_messages_fit_the_brokers_limit_and_keep_their_order(tmp_path):
    """The output_error events name every dropped message in order, 100 ids at most each, fewer when the
    broker's limit needs it, one reason and one limit each (no broker needed: they are stored in the outbox)."""
    link = MqttLink(_settings("mqtt://127.0.0.1:1", tmp_path))
    try:
        link._out.max_packet = 2000

        def drop(i, limit):
            return {"reason": "too_large", "kind": "result", "message_id": f"{i:036d}", "topic": "t",
                    "bytes": 3000, "max_packet_size": limit, "error": f"result {i:036d} on t dropped: ...",
                    "dropped_total": i + 1}

        drops = [drop(i, 2000) for i in range(3)] + [drop(i, 2500) for i in range(3, 80)] + [drop(80, 2000)]
        link._announce_drops(drops)
        rows = link.outbox.fetch_after(0, 100)
    finally:
        link.stop()
    from edge_ad.mqtt.sender import publish_size

    assert all(publish_size(r.topic, len(r.payload), 1, None, True) <= 2000 for r in rows)
    events = [json.loads(r.payload) for r in rows]
    assert [i for e in events for i in e["message_ids"]] == [d["message_id"] for d in drops]
    limits = [e["max_packet_size"] for e in events]     # 77 ids of 36 characters do not fit in one event
    assert limits[0] == 2000 and limits[-1] == 2000 and len(limits) >= 4 and set(limits[1:-1]) == {2500}
    assert all(e["failed"] == len(e["message_ids"]) for e in events)
    assert events[0]["message_id"] == "0" * 36 and events[0]["failed_total"] == 3
    assert "and 2 more message(s) for the same reason" in events[0]["error"]
    for ev in events:
        schema.validate("event", ev)


def test_the_events_for_dropped_messages_list_every_seq(tmp_path):
    """Drops named by seq ranges (dropped.<kind>.seq) list 20 ranges per kind at most: scattered drops (every
    other result too large) are split over as many events as that takes, so none is only counted (seq_more) and
    a monitor can match every one to its gap."""
    link = MqttLink(_settings("mqtt://127.0.0.1:1", tmp_path))
    try:
        drops = [{"reason": "too_large", "kind": kind, "message_id": f"{kind}{seq}", "seq": seq, "topic": "t",
                  "bytes": 3000, "max_packet_size": 2000, "error": "...", "dropped_total": 1}
                 for seq in range(2, 122, 2) for kind in ("result", "event")]
        link._announce_drops(drops)
        events = [json.loads(r.payload) for r in link.outbox.fetch_after(0, 100)]
    finally:
        link.stop()
    assert len(events) == 3 and [len(e["message_ids"]) for e in events] == [40, 40, 40]
    assert _dropped_seqs(events, "result") == _dropped_seqs(events, "event") == list(range(2, 122, 2))
    for ev in events:
        assert all(len(k["seq"]) <= 20 and "seq_more" not in k for k in ev["dropped"].values())
        schema.validate("event", ev)


def test_drops_held_back_from_the_log_are_logged_and_announced_at_the_stop(mosquitto_factory, tmp_path, caplog):
    """The too_large ERROR is logged at most once a minute: the drops after it were only told by a later drop
    (after the minute), so a run that stopped first never logged them. The stop logs them ('N more') and
    announces them before it disconnects."""
    broker = mosquitto_factory(extra_config=SMALL_PACKETS)
    with Collector(BrokerSettings(url=broker.url), "edge-ad/v1/t/d1/#") as col, \
            caplog.at_level(logging.ERROR, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(broker.url, tmp_path)).start()
        try:
            assert _wait(lambda: link.stats()["max_packet_size"] == 2000, 10)
            first = link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000})
            assert col.wait_for(lambda c: first in _dropped_named(c), 10)
            later = [link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000}) for _ in range(3)]
        finally:
            link.stop()
        assert col.wait_for(lambda c: {first, *later} <= _dropped_named(c), 5)
    logged = [r.getMessage() for r in caplog.records if "dropped from the outbox" in r.getMessage()]
    assert len(logged) == 2 and f"result {first}" in logged[0], logged
    assert logged[1].startswith("mqtt: 3 more message(s) dropped from the outbox as too_large")
    assert "4 in all" in logged[1]


def test_telemetry_over_the_packet_size_held_back_from_the_log_is_told_at_the_stop(mosquitto_factory, tmp_path,
                                                                                    caplog):
    """A message not stored in the outbox (here telemetry) over the broker's announced limit is not sent, with an
    ERROR at most once a minute per topic: the ones after the first within the minute were never logged when the
    run stopped first. The stop logs them ('N more')."""
    broker = mosquitto_factory(extra_config=SMALL_PACKETS)
    with caplog.at_level(logging.ERROR, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(broker.url, tmp_path)).start()
        try:
            assert _wait(lambda: link.stats()["max_packet_size"] == 2000, 10)
            for _ in range(3):
                link.publish_telemetry({"note": "n" * 3000})
            assert _wait(lambda: link.stats()["telemetry_dropped"] == 3, 10)
        finally:
            link.stop()
    logged = [r.getMessage() for r in caplog.records if "edge-ad/v1/t/d1/telemetry" in r.getMessage()]
    assert len(logged) == 2 and "not sent: larger than the broker's maximum packet size" in logged[0], logged
    assert logged[1] == ("mqtt: 2 more message(s) on edge-ad/v1/t/d1/telemetry not sent since the last report: "
                         "larger than the broker's maximum packet size (2000 bytes)")


def test_the_results_a_full_outbox_dropped_are_named_so_a_consumer_knows_which_are_lost(mosquitto, tmp_path):
    """A device offline long enough fills its outbox, which drops its oldest results: they were counted, and a
    consumer saw a gap in seq, but nothing said which results were lost rather than late. An output_error
    event (reason full) names them by kind, seq ranges and first / last id: what arrived and what was named
    lost make up every result, and the event stays small however many it names."""
    link = MqttLink(_settings(mosquitto.url, tmp_path, outbox_max_messages=20, outbox_sync="normal"))
    ids = [link.publish_result({"score": 0.1, "ng": False}) for _ in range(150)]      # offline: 130 dropped
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/#") as col:
        link.start()        # the event is stored once the outbox has room: it pushes out no 131st
        try:
            assert col.wait_for(lambda c: ids[-1] in {m.json()["id"] for m in c.of_kind("result")}, 10)
            assert col.wait_for(lambda c: _drop_events(c), 5)
        finally:
            link.stop()
    events = _drop_events(col)
    for ev in events:
        schema.validate("event", ev)
        assert ev["reason"] == "full" and ev["output"] == "mqtt" and set(ev["dropped"]) == {"result"}
        assert len(json.dumps(ev)) < 1500
    first = events[0]
    assert first["failed"] == 130 and "message_ids" not in first        # too many to list: named by seq
    assert first["dropped"]["result"] == {"count": 130, "first_id": ids[0], "last_id": ids[129], "seq": [[1, 130]]}
    assert "dropped the 130 oldest message(s) since the last report: 130 result(s) (seq 1..130)" in first["error"]
    assert len(events) == 1 and link.outbox.dropped == 130
    named = {seq for a, b in first["dropped"]["result"]["seq"] for seq in range(a, b + 1)}
    received = {m.json()["seq"] for m in col.of_kind("result")}
    assert named | received == set(range(1, 151)) and not named & received


def test_a_message_the_broker_refuses_for_good_is_dropped_counted_and_named(mosquitto_factory, tmp_path):
    """An ACL that denies the device's result topic: Mosquitto (MQTT v5) answers each result with PUBACK 0x87
    Not authorized. The link deleted it from the outbox with one log line: not in outbox_dropped_by, no
    output_error event, a silent loss. Refused for good, each is dropped as 'rejected' now: counted, and named
    in output_error events with its reason code; the events, which the ACL allows, arrive."""
    acl = tmp_path / "acl"
    acl.write_text("user col\ntopic read edge-ad/#\n\nuser dev\ntopic write edge-ad/v1/t/d1/status\n"
                   "topic write edge-ad/v1/t/d1/event\ntopic read edge-ad/v1/t/d1/cmd/#\n")
    broker = mosquitto_factory(extra_config=f"acl_file {acl}")
    with Collector(BrokerSettings(url=broker.url, username="col"), "edge-ad/v1/t/d1/#") as col:
        link = MqttLink(_settings(broker.url, tmp_path, username="dev")).start()
        try:
            ids = [link.publish_result({"score": 0.1 * i, "ng": False}) for i in range(3)]
            ng = link.publish_event({"score": 0.9})
            assert col.wait_for(lambda c: set(ids) <= _dropped_named(c), 10), _drop_events(col)
            assert col.wait_for(lambda c: ng in {m.json()["id"] for m in c.of_kind("event")}, 10)
            assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
            st = link.stats()
        finally:
            link.stop()
    assert st["outbox_dropped_by"] == {"full": 0, "too_large": 0, "rejected": 3} and st["outbox_dropped"] == 3
    assert st["rejected"] == 3 and st["disconnects"] == 0 and st["retry_waiting"] == 0 and not col.of_kind("result")
    events = _drop_events(col)
    assert [i for e in events for i in e["message_ids"]] == ids
    # named by seq too, as a full outbox's drops are, so a monitor counts the gap as dropped, not missing
    assert _dropped_seqs(events, "result") == [1, 2, 3]
    ev = events[0]
    assert ev["output"] == "mqtt" and ev["reason"] == "rejected" and ev["reason_code"] == 0x87
    assert ev["kind"] == "result" and ev["message_id"] == ids[0] and ev["topic"] == "edge-ad/v1/t/d1/result"
    assert "the broker refused it: Not authorized (reason code 0x87)" in ev["error"] and "max_packet_size" not in ev
    schema.validate("event", ev)


def test_a_reply_or_retained_message_the_broker_refuses_is_logged_and_counted(mosquitto_factory, tmp_path, caplog):
    """An ACL that denies the device a requester's reply topic: Mosquitto (MQTT v5) answers the reply with
    PUBACK 0x87 and keeps the connection. The link dropped it without a word (not counted, not logged): the
    command ran, its requester timed out, and the docs promised a closed connection and an ERROR. The same for
    a denied retained calibration. Each is an ERROR naming what was refused and why (rate-limited), and counted
    apart from the outbox's 'rejected'."""
    acl = tmp_path / "acl"
    acl.write_text("user col\ntopic read edge-ad/#\ntopic read fleet/#\n\n"
                   "user dev\ntopic write edge-ad/v1/t/d1/status\ntopic write edge-ad/v1/t/d1/result\n"
                   "topic read edge-ad/v1/t/d1/cmd/#\ntopic write fleet/allowed/#\n")
    broker = mosquitto_factory(extra_config=f"acl_file {acl}")
    with Collector(BrokerSettings(url=broker.url, username="col"), "fleet/#") as col, \
            caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(broker.url, tmp_path, username="dev")).start()
        try:
            assert _wait(lambda: link.connected, 10)
            link.publish_calibration({"version": 3, "threshold": 0.5})         # calibration: denied
            for topic in ("fleet/denied/r1", "fleet/denied/r2", "fleet/allowed/r3"):
                _reply_made_now(link, topic)
            result = link.publish_result({"score": 0.1, "ng": False})
            assert col.wait_for(lambda c: c.messages, 10)
            assert _wait(lambda: link.stats()["replies_rejected"] == 2 and link.stats()["retained_rejected"] == 1, 10)
            assert _wait(lambda: link.stats()["acked"] == 1 and not link._replies and not link._retained_mids, 10)
            st = link.stats()
        finally:
            link.stop()
    assert result and [m.topic for m in col.messages] == ["fleet/allowed/r3"]
    assert st["rejected"] == 0 and st["disconnects"] == 0 and st["outbox_dropped"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3, errors                          # the second refused reply: within the minute ...
    assert errors[2] == ("mqtt: the broker refused 1 more command reply(ies) since the last report, 2 in all "
                         "(replies_rejected); their requesters get no reply")     # ... so told at the stop
    reply = next(e for e in errors if "reply" in e)
    assert reply.startswith("mqtt: the broker refused the reply to command status on 'fleet/denied/r1': Not "
                            "authorized (reason code 0x87); its requester gets no reply")
    assert next(e for e in errors if "retained" in e).startswith(
        "mqtt: the broker refused the retained message on edge-ad/v1/t/d1/calibration: Not authorized (reason code "
        "0x87)")


def test_a_message_the_broker_refuses_for_now_is_sent_again_after_a_back_off(mosquitto, tmp_path, monkeypatch):
    """A PUBACK 0x97 Quota exceeded ("not now") deleted the result from the outbox: lost, though the broker
    asked to send it later. It stays in the outbox and is sent again after a back-off: every result arrives,
    nothing is dropped nor announced as dropped."""
    from edge_ad.mqtt import sender

    monkeypatch.setattr(sender, "RETRY_MIN_S", 0.2)     # 1 s in real life
    proxy = CuttableProxy(mosquitto.port)
    try:
        with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/#") as col:
            link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path)).start()
            try:
                ids = [link.publish_result({"score": 0.0, "ng": False})]
                assert _wait(lambda: link.stats()["acked"] == 1, 10)      # the birth's PUBACK went before
                proxy.refuse_pubacks(0x97, 3)
                ids += [link.publish_result({"score": 0.1 * i, "ng": False}) for i in range(1, 4)]
                assert _wait(lambda: link.stats()["acked"] == 4 and link.stats()["outbox_depth"] == 0, 10)
                st = link.stats()
            finally:
                link.stop()
    finally:
        proxy.close()
    assert st["rejected"] == 3 and st["outbox_dropped"] == 0 and st["retry_waiting"] == 0
    assert col.unique_ids() == set(ids) and not _drop_events(col)
    # the broker had taken them all the same: each refusal sent one again (a duplicate, removed by its id)
    assert col.counts[ids[0]] == 1 and sum(col.counts[i] for i in ids) == 4 + 3


def _held_id(packet: bytes) -> str:
    """The ``id`` of the result or event in a PUBLISH packet the proxy cut at."""
    return re.search(rb'"id": ?"([0-9a-f-]{36})"', packet).group(1).decode()


def _loss_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and "times in a row right after sending" in r.getMessage()]


@pytest.mark.parametrize("protocol, broker_config, announced", [
    ("5", "", None),                               # Mosquitto announces no limit unless max_packet_size is set
    ("5", "max_packet_size 3000", 3000),
    ("3.1.1", "max_packet_size 3000", None),       # a limit, never announced
])
def test_connections_cut_right_after_sending_a_result_drop_nothing(mosquitto_factory, tmp_path, caplog, protocol,
                                                                   broker_config, announced):
    """A flaky network cuts the connection as a result is on the wire, 4 connections in a row (paho sends the
    oldest unacknowledged result first at each reconnect): the link took that for a broker refusing the
    message and dropped a valid 196-byte result ('disconnects'), with a limit announced or not. A lost
    connection is never a reason to drop: every result arrives, and the repeated loss is one WARNING naming
    the result, which says the broker took larger packets on this link, or announced a limit the result is
    within (so not its size)."""
    broker = mosquitto_factory(extra_config=broker_config)
    proxy = CuttableProxy(broker.port)
    try:
        with Collector(BrokerSettings(url=broker.url), "edge-ad/v1/t/d1/#") as col, \
                caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
            link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path, protocol=protocol)).start()
            try:
                assert _wait(lambda: link.connected, 10)
                ids = [link.publish_result({"score": 0.1, "ng": False, "note": "n" * 1000})]
                assert _wait(lambda: link.stats()["acked"] == 1, 10)
                assert link.stats()["max_packet_size"] == announced
                proxy.cut_at_publish("/result", 4)
                for i in range(20):
                    ids.append(link.publish_result({"score": i / 100, "ng": False}))
                    time.sleep(0.02)
                assert col.wait_for(lambda c: set(ids) <= {m.json()["id"] for m in c.of_kind("result")}, 30)
                assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
                st = link.stats()
            finally:
                link.stop()
    finally:
        proxy.close()
    assert proxy.publish_cuts[1] == 0 and st["disconnects"] >= 4
    assert st["outbox_dropped"] == 0 and st["outbox_dropped_by"] == {"full": 0, "too_large": 0, "rejected": 0}
    assert sorted({m.json()["seq"] for m in col.of_kind("result")}) == list(range(1, 22))
    assert not [m for m in col.of_kind("event") if m.json().get("type") == "output_error"]
    warned = _loss_warnings(caplog)
    assert len(warned) == 1, warned                         # 4 losses: logged at the 3rd, then rate-limited
    held = _held_id(proxy.cut_publishes[0])                 # the oldest unacknowledged at each loss
    assert f"result {held} on edge-ad/v1/t/d1/result" in warned[0] and "nothing is dropped" in warned[0]
    assert "more likely the network" in warned[0] and "raise that limit" not in warned[0]
    if announced:     # within the announced limit: that says it all
        assert f"announced at connect that it takes packets of up to {announced} bytes" in warned[0]
    else:
        assert "the broker acknowledged a" in warned[0]


def test_connections_cut_right_after_sending_a_result_within_the_announced_limit_do_not_blame_its_size(
        mosquitto_factory, tmp_path, caplog):
    """The broker announced a 3000-byte limit (anything larger is never sent), and the network cut 4
    connections as the first, 196-byte result of the link was on the wire: the WARNING blamed that result's
    size and told the operator to raise the broker's limit (only an acknowledged larger packet said
    otherwise). It says the announced limit rules the size out now: the network or the broker."""
    broker = mosquitto_factory(extra_config="max_packet_size 3000")
    proxy = CuttableProxy(broker.port)
    try:
        with Collector(BrokerSettings(url=broker.url), "edge-ad/v1/t/d1/#") as col, \
                caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
            link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path)).start()
            try:
                assert _wait(lambda: link.stats()["max_packet_size"] == 3000, 10)
                proxy.cut_at_publish("/result", 4)
                ids = [link.publish_result({"score": 0.1, "ng": False}) for _ in range(3)]
                assert col.wait_for(lambda c: set(ids) <= {m.json()["id"] for m in c.of_kind("result")}, 30)
                assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
                st = link.stats()
            finally:
                link.stop()
    finally:
        proxy.close()
    assert proxy.publish_cuts[1] == 0 and st["disconnects"] >= 4 and st["outbox_dropped"] == 0
    warned = _loss_warnings(caplog)
    assert len(warned) == 1, warned
    assert f"result {_held_id(proxy.cut_publishes[0])} on edge-ad/v1/t/d1/result" in warned[0]
    assert "announced at connect that it takes packets of up to 3000 bytes" in warned[0]
    assert "more likely the network" in warned[0] and "raise that limit" not in warned[0]


def test_a_reply_in_flight_when_the_connection_drops_arrives_after_the_reconnect(mosquitto, tmp_path):
    """A command reply is not in the outbox: only paho sends it again after a reconnect. The link dropped
    paho's copies at the reconnect after a loss close to an outbox send (always, on a running line), and
    the requester never got its reply; it is sent again like any message in flight (the requester does not stop
    at the device's will, which the cut makes the broker publish)."""
    from edge_ad.mqtt.requester import REPLY_ROOT, CommandClient

    proxy = CuttableProxy(mosquitto.port)
    stop = threading.Event()
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path)).start()

    def line():
        while not stop.is_set():
            link.publish_result({"score": 0.1, "ng": False})
            time.sleep(0.02)

    producer = threading.Thread(target=line, daemon=True)
    try:
        assert _wait(lambda: link.connected, 10)
        producer.start()
        with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
            # the network stalls as the reply is sent, and results sent meanwhile are in flight when it dies
            proxy.cut_at_publish(REPLY_ROOT, 1, stall_s=0.3)
            reply = cc.call("t", "d1", "status", timeout=10)
        assert reply["ok"] and proxy.publish_cuts[1] == 0 and link.stats()["connects"] >= 2
        stop.set()
        producer.join(5)
        assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10) and link.stats()["outbox_dropped"] == 0
    finally:
        stop.set()
        link.stop()
        proxy.close()


def test_a_reply_the_connection_is_lost_for_at_every_send_is_given_up_and_named(mosquitto, tmp_path, caplog):
    """paho sends a QoS 1 reply again after every reconnect: a reply the broker closed the connection for (a NUL
    in its topic; a topic its ACL denies) cut the device off for ever, its results waiting, and the WARNING
    blamed a result. A reply is sent twice at most (once more after a reconnect), then given up with an ERROR
    naming it as a reply; the results sent meanwhile all arrive and the connection stays up."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_ad.mqtt.link import REPLY_SENDS

    proxy = CuttableProxy(mosquitto.port)
    stop = threading.Event()
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path))
    ids: list[str] = []

    def line():
        while not stop.is_set():
            ids.append(link.publish_result({"score": 0.1, "ng": False}))
            time.sleep(0.02)

    producer = threading.Thread(target=line, daemon=True)
    requester = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    try:
        with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/d1/result") as col, \
                caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
            link.start()
            assert _wait(lambda: link.connected, 10)
            producer.start()
            requester.connect(mosquitto.host, mosquitto.port)
            requester.loop_start()
            proxy.cut_at_publish("fleet/refused", 10)      # as a broker refusing that topic does, every time
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = "fleet/refused", b"r1"
            requester.publish("edge-ad/v1/t/d1/cmd/status", b"{}", qos=1, properties=props).wait_for_publish(5)
            assert _wait(lambda: any("is given up" in r.getMessage() for r in caplog.records), 15)
            assert _wait(lambda: link.connected, 10)
            stop.set()
            producer.join(5)
            assert col.wait_for(lambda c: set(ids) <= {m.json()["id"] for m in c.of_kind("result")}, 15)
            st = link.stats()
    finally:
        stop.set()
        requester.loop_stop()
        link.stop()
        proxy.close()
    assert 10 - proxy.publish_cuts[1] == REPLY_SENDS == 2     # sent twice, then never again
    assert st["disconnects"] == REPLY_SENDS and st["outbox_dropped"] == 0
    given_up = [r.getMessage() for r in caplog.records if "is given up" in r.getMessage()]
    assert len(given_up) == 1 and given_up[0].startswith("mqtt: the reply to command status on 'fleet/refused'")
    assert "lost each of the 2 times it was sent" in given_up[0]
    assert _loss_warnings(caplog) == []                      # no result is blamed for it


def _reply_made_now(link: MqttLink, topic: str) -> None:
    """A command reply to ``topic`` (its ``reply_to``) through the link's reply path, as a command worker makes one
    when its command finishes."""
    from edge_ad.mqtt.commands import Incoming

    msg = Incoming("status", json.dumps({"reply_to": topic}).encode())
    link._reply_now(link.dispatcher.error_reply(msg, "failed", "made while the broker was away"))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_reply_made_while_the_broker_is_down_goes_out_when_it_is_back_and_the_link_lives_on(
        mosquitto, tmp_path, caplog, protocol):
    """A command finished while the broker was away (a restart, a network cut during a calibrate): paho keeps its
    reply (MQTT_ERR_NO_CONN) and sends it at the next connect, but is_published() raises for such a message. The
    link asked it at that connect: the exception ended paho's network thread, and the device never reconnected
    (no command, the outbox growing) until a restart. The reply arrives after the broker is back, so do the
    results, and nothing is logged as an error."""
    fast = BrokerSettings(url=mosquitto.url, protocol=protocol, **FAST)
    with Collector(fast, "fleet/replies/#") as replies, Collector(fast, "edge-ad/v1/t/d1/result") as results, \
            caplog.at_level(logging.ERROR, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(mosquitto.url, tmp_path, protocol=protocol)).start()
        try:
            assert _wait(lambda: link.connected, 10)
            mosquitto.stop()
            assert _wait(lambda: not link.connected, 10)
            _reply_made_now(link, "fleet/replies/r1")
            result_id = link.publish_result({"score": 0.1, "ng": False})
            mosquitto.start()
            assert _wait(lambda: link.connected, 15)
            assert replies.wait_for(lambda c: c.messages, 15)
            assert results.wait_ids(1, 15) and results.unique_ids() == {result_id}
            assert _wait(lambda: not link._replies, 10)        # acknowledged
            mosquitto.stop()                                    # and it reconnects again, as often as it takes
            assert _wait(lambda: not link.connected, 10)
            mosquitto.start()
            assert _wait(lambda: link.connected, 15)
            st = link.stats()
        finally:
            link.stop()
    reply = replies.messages[0]
    assert reply.topic == "fleet/replies/r1" and reply.json()["error"]["message"] == "made while the broker was away"
    assert st["connects"] == 3 and st["disconnects"] == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_no_paho_callback_raises(tmp_path, caplog):
    """An exception from a paho callback ends paho's network thread, and with it the link for good (no reconnect
    until a restart): each callback logs its own exceptions."""
    link = MqttLink(_settings("mqtt://127.0.0.1:1", tmp_path))
    broken = object()            # no .protocol: the connect and disconnect callbacks fail on it
    try:
        with caplog.at_level(logging.ERROR, logger="edge_ad.mqtt"):
            link._on_connect(broken, None, None, 0, None)
            link._connected = True
            link._on_disconnect(broken, None, None, 0, None)
            link._out.acknowledged = None                        # not callable
            link._on_publish(broken, None, 7, 0, None)
    finally:
        link.stop()
    logged = [r.getMessage() for r in caplog.records if r.exc_info]
    assert [m.split(" (")[0] for m in logged] == ["mqtt: error in the connect callback",
                                                   "mqtt: error in the disconnect callback",
                                                   "mqtt: error in the publish callback for message 7"]


def test_a_reply_made_while_disconnected_is_sent_twice_before_it_is_given_up(mosquitto, tmp_path, caplog):
    """A reply made while the device was disconnected counted as sent once already: it went out once at the
    reconnect, and one more lost connection before its PUBACK (a flaky network) gave it up, its requester left
    without a reply though the command ran. Only real sends count: it is sent again after that loss, and arrives."""
    proxy = CuttableProxy(mosquitto.port)
    with Collector(BrokerSettings(url=mosquitto.url, **FAST), "fleet/replies/#") as replies, \
            caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path)).start()
        try:
            assert _wait(lambda: link.connected, 10)
            proxy.cut()
            assert _wait(lambda: not link.connected, 10)
            _reply_made_now(link, "fleet/replies/r1")
            proxy.cut_at_publish("fleet/replies", 1)            # its first send (at the reconnect) is lost
            proxy.restore()
            assert replies.wait_for(lambda c: c.messages, 15)
            assert _wait(lambda: not link._replies, 10)
            st = link.stats()
        finally:
            link.stop()
            proxy.close()
    assert len(proxy.cut_publishes) == 1 and st["connects"] == 3
    assert [m.topic for m in replies.messages] == ["fleet/replies/r1"]
    assert not [r for r in caplog.records if "is given up" in r.getMessage()]


def test_mqtt_311_a_message_over_the_brokers_limit_is_never_dropped_and_named_in_the_log(mosquitto_factory,
                                                                                         tmp_path, caplog):
    """MQTT 3.1.1 announces no limit: the broker just closes the connection at a larger message, at every
    reconnect, and that cannot be told from a network fault. The link dropped the message on the wire at 3
    such losses in a row ('disconnects'), and so dropped valid results on a flaky network. Nothing is dropped
    now: the results before it arrive, it and those behind it wait in the outbox, and the reconnect loop is
    one WARNING (at most once a minute) naming it, its topic and size, and the settings that end it."""
    broker = mosquitto_factory(extra_config=SMALL_PACKETS)
    with Collector(BrokerSettings(url=broker.url, protocol="3.1.1"), "edge-ad/v1/t/d1/#") as col, \
            caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(broker.url, tmp_path, protocol="3.1.1")).start()
        try:
            assert _wait(lambda: link.connected, 10)
            before = [link.publish_result({"score": 0.1 * i, "ng": False}) for i in range(3)]
            big = link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000})
            after = [link.publish_result({"score": 0.1 * i, "ng": False}) for i in range(3)]
            assert col.wait_for(lambda c: set(before) <= {m.json()["id"] for m in c.of_kind("result")}, 10)
            assert _wait(lambda: link.stats()["disconnects"] >= 6, 20)
            st = link.stats()
        finally:
            link.stop(timeout=1)
    assert st["outbox_dropped"] == 0 and st["outbox_dropped_by"] == {"full": 0, "too_large": 0, "rejected": 0}
    assert st["max_packet_size"] is None and st["outbox_depth"] == 4
    assert not {big, *after} & {m.json()["id"] for m in col.of_kind("result")}
    with Outbox(tmp_path / "outbox-d1.sqlite") as ob:
        assert [r.msg_id for r in ob.fetch_after(0, 10)] == [big, *after]       # kept for a broker that takes it
    warned = _loss_warnings(caplog)
    assert len(warned) == 1, warned
    assert f"result {big} on edge-ad/v1/t/d1/result" in warned[0] and "nothing is dropped" in warned[0]
    assert int(re.search(r"\((\d+) bytes", warned[0]).group(1)) > 3000
    assert "max_packet_size" in warned[0] and "mqtt.image_max_bytes" in warned[0]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_message_over_mosquittos_message_size_limit(mosquitto_factory, tmp_path, caplog, protocol):
    """Mosquitto 2.0's older message_size_limit is not announced. MQTT v5: it answers a larger message with a
    PUBACK reason code 0x95, which MQTT v5 does not allow in a PUBACK: paho-mqtt closed the connection on it
    (Protocol error) and the link sent the message again at every reconnect, the outbox waiting behind it for
    ever. The PUBACK names its message (its packet id): it is read as the refusal it is now, and the message is
    dropped as too_large (as one over an announced limit), counted and named in an output_error event with its
    seq and the reason code; the connection stays, and what follows it arrives. An event's image over the
    limit goes the same way: the event arrives, the image is named as dropped. MQTT 3.1.1: the broker
    acknowledges the message and discards it, which the device cannot see at all (docs/mqtt.md, "The broker")."""
    broker = mosquitto_factory(extra_config="message_size_limit 1000")
    with Collector(BrokerSettings(url=broker.url, protocol=protocol), "edge-ad/v1/t/d1/#") as col, \
            caplog.at_level(logging.WARNING, logger="edge_ad.mqtt"):
        link = MqttLink(_settings(broker.url, tmp_path, protocol=protocol)).start()
        try:
            before = link.publish_result({"score": 0.1, "ng": False})
            big = link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000})
            after = link.publish_result({"score": 0.3, "ng": False})
            event = link.publish_event({"score": 0.9}, jpeg=b"\xff\xd8" + b"j" * 3000)
            link.publish_calibration({"version": 3, "threshold": 0.5, "note": "c" * 3000})     # retained, refused
            got = lambda kind: {m.json()["id"] for m in col.of_kind(kind) if m.json().get("type") != "output_error"}  # noqa
            assert col.wait_for(lambda c: {before, after} <= got("result") and event in got("event"), 10), \
                caplog.text
            if protocol == "5":
                assert col.wait_for(lambda c: {big, event} <= _dropped_named(c), 10), _drop_events(col)
            assert _wait(lambda: link.stats()["outbox_depth"] == 0, 10)
            if protocol == "5":
                assert _wait(lambda: link.stats()["retained_rejected"] == 1, 10)
            st = link.stats()
        finally:
            link.stop(timeout=1)
    assert big not in got("result") and not col.of_kind("event/image") and not _loss_warnings(caplog)
    assert not col.of_kind("calibration")
    assert st["disconnects"] == 0
    if protocol == "3.1.1":      # acknowledged: gone, and only the consumer's seq gap shows it
        assert st["acked"] == 5 and st["outbox_dropped"] == 0
        return
    assert st["outbox_dropped_by"] == {"full": 0, "too_large": 2, "rejected": 0} and st["rejected"] == 2
    events = _drop_events(col)
    assert _dropped_seqs(events, "result") == [2] and {e["reason"] for e in events} == {"too_large"}
    ev = next(e for e in events if e["kind"] == "result")
    assert ev["reason_code"] == 0x95 and ev["message_id"] == big and "max_packet_size" not in ev
    assert "the broker refused its" in ev["error"] and "for its size: Packet too large (reason code 0x95), over a " \
        "limit it does not announce (Mosquitto's message_size_limit)" in ev["error"], ev["error"]
    schema.validate("event", ev)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"result {big} on edge-ad/v1/t/d1/result dropped from the outbox" in e for e in errors), errors
    assert any(e.startswith("mqtt: the broker refused the retained message on edge-ad/v1/t/d1/calibration: Packet "
                            "too large (reason code 0x95); consumers keep the last one it took (it is larger than the "
                            "broker's message_size_limit") for e in errors), errors


def test_mqtt_311_a_birth_over_the_brokers_limit_drops_nothing(mosquitto_factory, tmp_path):
    """The broker drops the connection at every connect for the birth message (larger than its limit, not
    announced under 3.1.1): the link reconnects in a loop, and no outbox message is dropped for it."""
    broker = mosquitto_factory(extra_config="max_packet_size 250")      # the birth is ~300 bytes, results ~160
    link = MqttLink(_settings(broker.url, tmp_path, protocol="3.1.1"))
    ids = [link.publish_result({"score": 0.1, "ng": False}) for _ in range(3)]
    link.start()
    try:
        assert _wait(lambda: link.stats()["disconnects"] >= 6, 20)
        st = link.stats()
        assert st["outbox_depth"] == 3 and st["outbox_dropped"] == 0 and len(ids) == 3
    finally:
        link.stop(timeout=1)


def test_a_limit_lower_than_before_drops_what_paho_holds_over_it_and_sends_the_rest_again(mosquitto_factory,
                                                                                          tmp_path):
    """Messages in flight when the connection is lost are sent again as it comes back: when the broker now
    announces a limit (it restarted with max_packet_size set), paho's copies are taken back before that, and
    one over the limit is dropped instead of getting the connection dropped at every reconnect. The others
    are sent again: the outbox's, and a command reply in flight, which nothing else sends (it was lost)."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    first = mosquitto_factory()
    proxy = CuttableProxy(first.port)
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path))
    started, gate, replied = threading.Event(), threading.Event(), threading.Event()
    link.register_command("pause", lambda args: started.set() or (gate.wait(10) and {"paused": True}))
    send_reply = link._send_reply
    link._send_reply = lambda client, reply: (send_reply(client, reply), replied.set())
    requester = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    link.start()
    try:
        assert _wait(lambda: link.connected, 10) and link.stats()["max_packet_size"] is None
        requester.connect("127.0.0.1", first.port)
        requester.loop_start()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "edge-ad/replies/held", b"held-1"
        requester.publish("edge-ad/v1/t/d1/cmd/pause", b"{}", qos=1, properties=props)
        assert started.wait(10)
        os.kill(first.proc.pid, signal.SIGSTOP)          # a hung broker: what is sent now is not acknowledged
        ids = [link.publish_result({"score": 0.1, "ng": False}),
               link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000}),
               link.publish_result({"score": 0.3, "ng": False})]
        gate.set()
        assert replied.wait(10) and _wait(lambda: link.stats()["inflight"] == 3, 10)
        proxy.cut()
        first.kill()
        second = mosquitto_factory(port=first.port, extra_config=SMALL_PACKETS)
        with Collector(BrokerSettings(url=second.url), "edge-ad/#") as col:
            proxy.restore()
            assert _wait(lambda: link.stats()["outbox_depth"] == 0, 15)
            assert col.wait_for(lambda c: any(m.topic == "edge-ad/replies/held" for m in c.messages), 10)
            reply = next(m for m in col.messages if m.topic == "edge-ad/replies/held")
            assert reply.json()["ok"] and reply.json()["result"] == {"paused": True}
            assert bytes(reply.properties.CorrelationData) == b"held-1"
            assert {ids[0], ids[2]} <= {m.json()["id"] for m in col.of_kind("result")}
        st = link.stats()
        assert st["max_packet_size"] == 2000 and st["outbox_dropped_by"]["too_large"] == 1
        assert st["acked"] >= 3                     # the two small results, and the output_error event
        assert "oversize" not in second.log_tail(200)
    finally:
        requester.loop_stop()
        link.stop()
        proxy.close()


def test_a_copy_the_safety_net_replaced_is_not_published_again_as_a_reply_when_the_limit_is_lowered(
        mosquitto_factory, tmp_path, caplog):
    """resend_stale sends a message unacknowledged for long again under a new id; paho keeps the old copy
    until its PUBACK. At a reconnect with a lower limit paho's copies are taken back, and the old copy, not
    tracked as the outbox's, was published again as if it were a command reply: an untracked duplicate of a
    result, and for one over the limit an ERROR about a message 'in flight at the reconnect, not sent
    again'. It goes through the outbox now: the result arrives once, the large one is dropped as too_large."""
    first = mosquitto_factory()
    proxy = CuttableProxy(first.port)
    link = MqttLink(_settings(f"mqtt://127.0.0.1:{proxy.port}", tmp_path))
    link._out.resend_after_s = 0.5          # the safety net, after 60 s at the least in real life
    link.start()
    try:
        with caplog.at_level(logging.ERROR, logger="edge_ad.mqtt"):
            assert _wait(lambda: link.connected, 10)
            time.sleep(0.6)                      # the connection is older than resend_after_s
            os.kill(first.proc.pid, signal.SIGSTOP)          # a hung broker: nothing is acknowledged
            small = link.publish_result({"score": 0.1, "ng": False})
            big = link.publish_result({"score": 0.2, "ng": False, "note": "n" * 3000})
            assert _wait(lambda: link.stats()["resent"] >= 2, 5)     # paho holds the old copies too
            proxy.cut()
            first.kill()
            second = mosquitto_factory(port=first.port, extra_config=SMALL_PACKETS)
            with Collector(BrokerSettings(url=second.url), "edge-ad/v1/t/d1/#") as col:
                proxy.restore()
                assert _wait(lambda: link.stats()["outbox_depth"] == 0, 15)
                assert col.wait_for(lambda c: small in {m.json()["id"] for m in c.of_kind("result")}, 10)
                time.sleep(0.5)                  # a duplicate would follow at once
                st = link.stats()
        assert [m.json()["id"] for m in col.of_kind("result")] == [small]
        assert st["max_packet_size"] == 2000 and st["outbox_dropped_by"]["too_large"] == 1
        assert big in _dropped_named(col)
        assert not [r for r in caplog.records if "in flight at the reconnect" in r.getMessage()]
    finally:
        link.stop()
        proxy.close()


def test_a_puback_the_link_cannot_read_itself_goes_to_paho(monkeypatch):
    """The PUBACK reader for codes MQTT v5 does not allow in a PUBACK (0x95 from Mosquitto's message_size_limit)
    read paho's reason-code table from the class, which paho 2.0 and 2.1 make per instance: its AttributeError
    killed paho's network thread at the first refusing PUBACK, and nothing left the outbox again. The table is
    read from an instance, and whatever fails in that reading hands the PUBACK to paho as it is."""
    import types

    from edge_ad.mqtt import client as mc

    assert mc._puback_lists(0x87) and mc._puback_lists(0x10) and not mc._puback_lists(0x95)
    seen = []
    fake = types.SimpleNamespace(_handle_pubackcomp=lambda cmd: seen.append(cmd) or 0,
                                 _in_packet={"packet": b"\x00\x07\x95"}, _out_message_mutex=threading.Lock(),
                                 _out_messages={7: object()},
                                 _do_on_publish=lambda mid, rc, props: seen.append((mid, rc.value)) or 0)
    mc._read_refusing_pubacks(fake)
    assert fake._handle_pubackcomp("PUBACK") == 0 and seen == [(7, 0x95)]          # read here: a refusal
    seen.clear()

    def broken(code):
        raise AttributeError("type object 'ReasonCode' has no attribute 'names'")

    monkeypatch.setattr(mc, "_puback_lists", broken)
    assert fake._handle_pubackcomp("PUBACK") == 0 and seen == ["PUBACK"]           # paho reads it
