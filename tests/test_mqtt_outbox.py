"""The SQLite outbox: order, persistence, per-kind sequence numbers, bounds (oldest / images dropped first)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from edge_ad.errors import InputError, RuntimeFailure
from edge_ad.mqtt.outbox import Outbox


def _json(seq: int, **kw) -> bytes:
    return json.dumps({"seq": seq, **kw}).encode()


def test_order_seq_and_wal(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for i in range(5):
        ob.put("result", "t/result", lambda seq, i=i: _json(seq, i=i), msg_id=f"r{i}")
    ob.put("event", "t/event", lambda seq: _json(seq))
    rows = ob.fetch_after(0, 100)
    assert [r.msg_id for r in rows[:5]] == [f"r{i}" for i in range(5)]
    assert [json.loads(r.payload)["seq"] for r in rows] == [1, 2, 3, 4, 5, 1]     # per-kind counters
    assert ob.depth == 6 and ob.bytes == sum(len(r.payload) for r in rows)
    assert [r.id for r in ob.fetch_after(rows[2].id, 2)] == [rows[3].id, rows[4].id]
    mode = sqlite3.connect(tmp_path / "o.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    ob.close()


@pytest.mark.parametrize("max_bytes, limit", [(128 * 1024, 128 * 1024), (2048, 64 * 1024),
                                              (256 * 1024 * 1024, 4 * 1024 * 1024)])
def test_the_write_ahead_log_stays_near_the_outbox_bound(tmp_path, max_bytes, limit):
    """The -wal file grew to SQLite's 4 MiB of pages between checkpoints and was never cut back (no
    journal_size_limit): a 1 MiB outbox kept 4 MiB more beside it. Now it checkpoints at wal_limit bytes
    (max_bytes within 64 KiB .. 4 MiB) and is truncated to that after each checkpoint."""
    path = tmp_path / "o.sqlite"
    ob = Outbox(path, max_bytes=max_bytes, sync="normal")
    assert ob.wal_limit == limit
    for db in (ob._db, ob._rdb):   # both connections write: inserts, the sender's deletes
        assert db.execute("PRAGMA journal_size_limit").fetchone()[0] == limit
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] * 4096 == limit
    if max_bytes > 4 * 1024 * 1024:
        return
    wal, payload, largest = tmp_path / "o.sqlite-wal", bytes(range(256)) * 6, 0
    for i in range(1200):                        # ~1.8 MiB written, acknowledged and deleted as the sender does
        ob.put("result", "edge-ad/v1/s/d/result", payload, msg_id=f"r{i}")
        if i % 20 == 19:
            ob.delete([r.id for r in ob.fetch_after(0, 15)])
        largest = max(largest, wal.stat().st_size)
    # a checkpoint happens once the log passes the limit: it ends a little past it (the frames of the
    # commit that crossed it), not at 1.8 MiB
    assert largest <= limit + 64 * 1024, largest
    ob.close()


def test_delete_and_persistence_across_reopen(tmp_path):
    path = tmp_path / "o.sqlite"
    ob = Outbox(path)
    ids = [ob.put("result", "t", lambda s: _json(s))[0] for _ in range(10)]
    assert ob.delete(ids[:4] + [999_999]) == 4          # unknown ids are ignored
    assert ob.delete(ids[:4]) == 0                       # deleting twice is harmless
    instance = ob.instance
    ob.close()
    ob = Outbox(path)
    assert ob.depth == 6 and ob.instance == instance
    assert [r.id for r in ob.fetch_after(0, 100)] == ids[4:]
    _, seq = ob.put("result", "t", lambda s: _json(s))
    assert seq == 11                                      # the sequence survives a restart
    assert [r.id for r in ob.fetch_ids([ids[5], ids[4], 12345])] == [ids[4], ids[5]]
    ob.close()


def test_count_bound_drops_oldest_and_counts(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=10)
    for _ in range(25):
        ob.put("result", "t", lambda s: _json(s))
    seqs = [json.loads(r.payload)["seq"] for r in ob.fetch_after(0, 100)]
    assert seqs == list(range(16, 26))
    assert ob.depth == 10 and ob.dropped == 15
    ob.close()
    with Outbox(tmp_path / "o.sqlite", max_messages=10) as again:
        assert again.dropped == 15                          # the counter is persisted


def test_messages_the_broker_refuses_are_dropped_and_counted_per_reason(tmp_path):
    """The sender drops a message the broker will not take (over its maximum packet size, or refused for good
    by a PUBACK reason code): gone from the outbox, counted in dropped with those a full outbox dropped, and per
    reason; both persisted."""
    ob = Outbox(tmp_path / "o.sqlite", max_messages=4)
    for _ in range(6):
        ob.put("result", "t", lambda s: _json(s))              # 2 dropped: full
    rows = ob.fetch_after(0, 10)
    assert ob.drop([rows[0].id], "too_large") == 1
    assert ob.drop([rows[0].id, rows[1].id], "too_large") == 1      # one was gone already
    assert ob.drop([rows[2].id], "rejected") == 1
    assert ob.depth == 1 and ob.bytes == len(rows[3].payload) and ob.dropped == 5
    assert ob.dropped_by == {"full": 2, "too_large": 2, "rejected": 1}
    # a lost connection is never a reason: it cannot be told from a network fault (nothing is dropped for it)
    for reason in ("full", "disconnects"):
        with pytest.raises(InputError, match=f"drop reason '{reason}': expected one of too_large, rejected"):
            ob.drop([rows[3].id], reason)
    assert ob.depth == 1
    ob.close()
    with Outbox(tmp_path / "o.sqlite", max_messages=4) as again:
        assert again.dropped == 5 and again.dropped_by == {"full": 2, "too_large": 2, "rejected": 1}
        assert again.stats()["dropped_by"]["too_large"] == 2


def test_drops_of_a_full_outbox_are_logged_at_once_then_at_most_once_a_minute(tmp_path, monkeypatch, caplog):
    """A broker down for hours on a 50 fps line: one WARNING per dropped message flooded the journal."""
    from edge_ad import ratelimit

    ob = Outbox(tmp_path / "o.sqlite", max_messages=10)
    with caplog.at_level("WARNING", logger="edge_ad.mqtt.outbox"):
        for _ in range(25):
            ob.put("result", "t", lambda s: _json(s))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "full (10 messages" in lines[0] and "dropped 1 oldest since" in lines[0]
        monkeypatch.setattr(ratelimit, "REPORT_EVERY_S", 0.0)     # the minute has passed
        ob.put("result", "t", lambda s: _json(s))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "dropped 15 oldest since the last report (16 in all)" in lines[1]
    assert ob.dropped == 16
    # drops held back when the outbox closes are told then: the log accounts for every one
    monkeypatch.setattr(ratelimit, "REPORT_EVERY_S", 60.0)
    with caplog.at_level("WARNING", logger="edge_ad.mqtt.outbox"):
        for _ in range(3):
            ob.put("result", "t", lambda s: _json(s))
        assert len(caplog.records) == 2                     # within the minute: held back
        ob.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "dropped 3 oldest since the last report (19 in all)" in lines[2]


def test_byte_bound_drops_images_first(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=1000, max_bytes=10_000)
    ob.put("result", "t/result", b"r" * 1000)
    ob.put("image", "t/event/image", b"i" * 4000, msg_id="e1")
    ob.put("result", "t/result", b"r" * 1000)
    ob.put("image", "t/event/image", b"i" * 3000, msg_id="e2")
    assert ob.depth == 4 and ob.bytes == 9000
    ob.put("result", "t/result", b"r" * 1500)           # 10500 > 10000: the oldest image goes
    kinds = [(r.kind, r.msg_id) for r in ob.fetch_after(0, 100)]
    assert ("image", "e1") not in kinds and ("image", "e2") in kinds
    assert ob.bytes == 6500 and ob.dropped == 1
    ob.put("result", "t/result", b"r" * 6000)           # 12500: the other image goes
    assert "image" not in [r.kind for r in ob.fetch_after(0, 100)]
    assert ob.bytes == 9500 and ob.dropped == 2
    first = ob.fetch_after(0, 1)[0].id
    ob.put("result", "t/result", b"r" * 1000)           # 10500, no image left: the oldest result goes
    assert ob.fetch_after(0, 1)[0].id > first
    assert ob.bytes == 9500 and ob.dropped == 3
    ob.close()


def test_an_image_never_pushes_out_results_and_a_huge_message_drops_only_itself(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=1000, max_bytes=10_000)
    for _ in range(8):
        ob.put("result", "t/result", b"r" * 1000)
    ob.put("image", "t/event/image", b"i" * 1500, msg_id="e1")   # 9500: fits
    ob.put("image", "t/event/image", b"i" * 1500, msg_id="e2")   # the older image makes room
    assert [r.msg_id for r in ob.fetch_after(0, 100) if r.kind == "image"] == ["e2"] and ob.dropped == 1
    ob.put("image", "t/event/image", b"i" * 3000, msg_id="e3")   # even without e2 no room: e3 drops itself
    rows = ob.fetch_after(0, 100)
    assert [r.kind for r in rows].count("result") == 8 and "e3" not in [r.msg_id for r in rows]
    assert ob.dropped == 3 and ob.bytes == 8000                  # e2 went first, then e3 itself
    ob.put("event", "t/event", b"e" * 20_000)                    # larger than the whole bound
    assert [r.kind for r in ob.fetch_after(0, 100)].count("result") == 8 and ob.dropped == 4
    assert ob.depth == 8 and ob.bytes == 8000
    ob.close()


def test_a_failed_commit_reports_its_own_cause(tmp_path):
    """A full disk (here a file-size limit) fails the COMMIT; the error names SQLite's cause, not the
    'cannot rollback' of a transaction SQLite already ended."""
    code = f"""
import resource, signal
from edge_ad.mqtt.outbox import Outbox
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ob = Outbox({str(tmp_path / "o.sqlite")!r}, sync="normal")
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    for i in range(1000):
        ob.put("result", "t/result", b"x" * 2000)
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("RuntimeFailure") and "write failed" in out, out
    assert "cannot rollback" not in out


def test_failed_payload_build_leaves_nothing(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")

    def bad(seq):
        raise InputError("result: NaN")

    with pytest.raises(InputError):
        ob.put("result", "t", bad)
    assert ob.depth == 0 and ob.next_seq("result") == 1
    with pytest.raises(InputError, match="kind"):
        ob.put("bogus", "t", b"x")
    ob.close()


def test_concurrent_writers_and_deleter(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", sync="normal")
    stop = threading.Event()
    deleted = []

    def deleter():
        after = 0
        deadline = time.monotonic() + 60
        while (not stop.is_set() or ob.depth) and time.monotonic() < deadline:
            rows = ob.fetch_after(after, 50)
            if rows:
                after = rows[-1].id
                ob.delete([r.id for r in rows])
                deleted.extend(json.loads(r.payload)["seq"] for r in rows)

    t = threading.Thread(target=deleter)
    t.start()
    writers = [threading.Thread(target=lambda: [ob.put("result", "t", lambda s: _json(s)) for _ in range(200)])
               for _ in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    t.join(timeout=20)
    assert sorted(deleted) == list(range(1, 601)) and ob.depth == 0 and ob.bytes == 0
    ob.close()


def test_one_process_per_outbox_file(tmp_path):
    path = tmp_path / "o.sqlite"
    code = ("import sys, time; from edge_ad.mqtt.outbox import Outbox; ob = Outbox(sys.argv[1]); "
            "print('open', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(RuntimeFailure, match=rf"in use by another process \(pid {proc.pid}\)"):
            Outbox(path)
    finally:
        proc.kill()
        proc.wait()
    with Outbox(path) as ob:                               # a killed holder leaves no lock behind
        assert ob.depth == 0
        with pytest.raises(RuntimeFailure, match="already open in this process"):
            Outbox(path)
    Outbox(path).close()                                   # closed: free again


def _three_in_flight(tmp_path):
    """An outbox of 3 results and a sender that handed them to a stand-in paho client (message ids 1, 2, 3)."""
    import types

    import paho.mqtt.client as paho

    from edge_ad.mqtt.sender import OutboxSender

    class Client:
        protocol = paho.MQTTv311
        mids = iter(range(1, 100))

        def publish(self, *a, **kw):
            return types.SimpleNamespace(rc=paho.MQTT_ERR_SUCCESS, mid=next(self.mids))

    ob = Outbox(tmp_path / "o.sqlite")
    for _ in range(3):
        ob.put("result", "t", lambda s: _json(s))
    out = OutboxSender(ob, window=10, resend_after_s=60.0, wake=threading.Event())
    out.fill(Client())
    return ob, out


def test_an_acked_message_whose_delete_fails_is_deleted_on_a_later_pass(tmp_path, caplog):
    """A full disk fails the delete of acknowledged rows: the sender keeps their ids and deletes them once
    it can (they stayed in the outbox for the whole run, and the next start sent them again)."""
    ob, out = _three_in_flight(tmp_path)
    real, full = ob.delete, [True]

    def delete(ids):
        if full[0]:
            raise RuntimeFailure(f"outbox {ob.path}: delete failed (database or disk is full)")
        return real(ids)

    ob.delete = delete
    out.acknowledged(1, 0)
    out.acknowledged(2, 0)
    with caplog.at_level("WARNING", logger="edge_ad.mqtt.sender"):
        out.drain_acks()                 # no exception for the sender loop to log with a traceback
        out.acknowledged(3, 0)
        out.drain_acks()
        assert ob.depth == 3 and out.inflight == 0
        full[0] = False                  # room again: the next pass deletes all three
        out.drain_acks()
    assert ob.depth == 0 and out.counters["acked"] == 3
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(msgs) == 2 and msgs[0][0] == "ERROR" and "2 acknowledged message(s) not deleted" in msgs[0][1]
    assert "disk is full" in msgs[0][1] and not any(r.exc_info for r in caplog.records)
    assert "deleted from the outbox again" in msgs[1][1]
    ob.close()


def test_connection_losses_and_failed_deletes_held_back_from_the_log_are_told_at_the_stop(tmp_path, caplog):
    """The connection lost again and again right after the same message, and deletes of acknowledged messages
    failing on a full disk, are logged at most once a minute: those after the first were counted but never logged
    when the link stopped within the minute. The stop's report_drops(final=True) logs them ('N more')."""
    from edge_ad.mqtt.sender import LOSS_REPEATS

    ob, out = _three_in_flight(tmp_path)
    first = out._inflight[1]

    def delete(ids):
        raise RuntimeFailure(f"outbox {ob.path}: delete failed (database or disk is full)")

    ob.delete = delete
    with caplog.at_level("WARNING", logger="edge_ad.mqtt.sender"):
        for _ in range(LOSS_REPEATS + 2):                   # logged at the 3rd, the 4th and 5th held back
            out.lost(time.monotonic())
            out.drain_acks()
        for mid in (2, 3):                                  # acknowledged, never deleted: logged, then held back
            out.acknowledged(mid, 0)
            out.drain_acks()
        out.drain_acks()
        out.report_drops()                                  # within the minute: nothing more
        assert len(caplog.records) == 2
        out.report_drops(final=True)                        # the stop
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [m[0] for m in msgs] == ["WARNING", "ERROR", "WARNING", "ERROR"], msgs
    assert "lost 3 times in a row right after sending result" in msgs[0][1]
    assert msgs[2][1] == ("mqtt: the connection was lost 2 more time(s) right after sending the same message since "
                          f"the last report (the last: result {first.msg_id} on t, 5 times in a row); nothing is "
                          "dropped for it")
    assert msgs[3][1] == (f"mqtt: deleting acknowledged messages from the outbox failed 2 more time(s) since the last "
                          f"report (the last: outbox {ob.path}: delete failed (database or disk is full)); 2 "
                          "acknowledged message(s) are still in it (the next start sends them again)")
    ob.close()


def test_what_paho_held_at_a_lower_limit_is_handed_over_again_replies_included(tmp_path, caplog):
    """A limit lower than before takes back all of paho's copies (it cannot drop one alone). The outbox's
    are handed over again (one over the limit dropped); a command reply was lost with them, and its requester
    waited in vain: it is published again as it was, unless over the limit (logged). A retained birth is not:
    every connect publishes it again, newer."""
    import types

    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_ad.mqtt.sender import OutboxSender

    def message(mid, topic, payload, retain=False, props=None):
        m = paho.MQTTMessage(mid, topic.encode())
        m.payload, m.qos, m.retain, m.properties = payload, 1, retain, props
        return m

    class Client:
        protocol = paho.MQTTv5
        mids = iter(range(1, 100))

        def __init__(self):
            self.sent, self.held = [], []

        def publish(self, topic, payload, qos=0, retain=False, properties=None):
            mid = next(self.mids)
            self.sent.append((mid, topic, payload, retain, properties))
            self.held.append(message(mid, topic, payload, retain, properties))
            return types.SimpleNamespace(rc=paho.MQTT_ERR_SUCCESS, mid=mid)

        def drop_out_messages(self):
            held, self.held = self.held, []
            return held

    ob = Outbox(tmp_path / "o.sqlite")
    for note in ("", "n" * 3000, ""):
        ob.put("result", "t/result", lambda s, note=note: _json(s, note=note))
    out = OutboxSender(ob, window=10, resend_after_s=60.0, wake=threading.Event())
    client = Client()
    out.reconnected(client, None)
    out.fill(client)                                            # the three results, no limit known
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"c1"
    client.publish("replies/a", b'{"ok": true}', 1, False, props)   # the link's reply, birth, oversized reply
    client.publish("t/status", b'{"state": "online"}', 1, True)
    client.publish("replies/b", b"r" * 3000, 1, False)
    client.sent.clear()
    with caplog.at_level("WARNING", logger="edge_ad.mqtt.sender"):
        out.reconnected(client, 2000)                           # the broker came back with a limit
        out.fill(client)
    again = [(topic, payload, retain, p) for _, topic, payload, retain, p in client.sent]
    assert again[0] == ("replies/a", b'{"ok": true}', False, props)          # as it was, properties included
    assert [t for t, *_ in again[1:]] == ["t/result", "t/result"]            # the first and last result
    assert ob.depth == 2 and ob.dropped_by["too_large"] == 1 and out.inflight == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("on replies/b, in flight at the reconnect, not sent again" in e and "(2000 bytes" in e
               for e in errors), errors
    assert not any("t/status" in e for e in errors)
    client.sent.clear()
    out.reconnected(client, 2000)                               # the same limit: paho keeps and resends its own
    out.fill(client)
    assert client.sent == [] and len(client.held) == 3
    ob.close()


def _side_files(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_outbox_file_is_moved_aside_and_a_fresh_one_starts(tmp_path, caplog, damage):
    """An outbox file that is not a readable SQLite database (a power cut on a card that lied about fsync)
    made every start fail ('cannot open (database disk image is malformed)'): no frame was inspected, and
    systemd restarted the service every 5 s forever. It is moved aside as NAME.corrupt-<UTC time> with its
    -wal and -shm, and an empty outbox starts (seq from 1, a new instance), logged as an ERROR naming it."""
    path = tmp_path / "o.sqlite"
    ob = Outbox(path)
    old_instance = ob.instance
    for i in range(300):
        ob.put("result", "t", lambda s: _json(s, pad="x" * 600))
    ob.close()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage, not SQLite" * 200)
    else:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    damaged = path.read_bytes()
    with caplog.at_level("ERROR", logger="edge_ad.mqtt.outbox"):
        ob = Outbox(path)
    try:
        assert ob.reset is not None and ob.depth == 0 and ob.instance != old_instance
        moved = tmp_path / ob.reset["moved_to"]
        assert moved.parent == tmp_path and re.fullmatch(r"o\.sqlite\.corrupt-\d{8}T\d{6}Z", moved.name)
        assert moved.read_bytes() == damaged                     # kept as it was, for whoever wants to look
        assert ob.reset["error"] in ("file is not a database", "database disk image is malformed")
        assert set(_side_files(path)) <= {"o.sqlite", "o.sqlite-wal", "o.sqlite-shm", "o.sqlite.lock", moved.name,
                                           moved.name + "-wal", moved.name + "-shm"}
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(moved) in errors[0] and "not a readable SQLite database" in errors[0]
        assert ob.put("result", "t", lambda s: _json(s))[1] == 1  # seq starts again
    finally:
        ob.close()
    with Outbox(path) as again:                                  # the new file is kept from now on
        assert again.reset is None and again.depth == 1


def test_an_outbox_locked_by_another_program_or_unopenable_is_refused_not_moved(tmp_path, monkeypatch):
    """Only a damaged file is moved aside: one another program holds a lock on (a sqlite3 shell in a
    transaction) or that cannot be opened at all may be sound, so run is refused as before, nothing moved."""
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        ob.put("result", "t", lambda s: _json(s))
    code = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('PRAGMA locking_mode=EXCLUSIVE'); db.execute('BEGIN EXCLUSIVE'); "
            "db.execute('DELETE FROM outbox WHERE id < 0'); print('locked', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    monkeypatch.setattr(Outbox, "OPEN_BUSY_TIMEOUT_S", 0.2)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeFailure, match=r"cannot open \(database is locked for more than 0.2 s: another "
                                                 r"program, e\.g\. a sqlite3 shell"):
            Outbox(path)
    finally:
        proc.kill()
        proc.wait()
    assert path.is_file() and not list(tmp_path.glob("o.sqlite.corrupt-*"))
    with Outbox(path) as ob:                                      # sound, with its message
        assert ob.reset is None and ob.depth == 1
    folder = tmp_path / "adir.sqlite"
    folder.mkdir()
    with pytest.raises(RuntimeFailure, match="cannot open"):
        Outbox(folder)
    assert folder.is_dir() and not list(tmp_path.glob("adir.sqlite.corrupt-*"))


def _hold_write_lock(path):
    """Another program in a write transaction on the outbox (a sqlite3 shell after BEGIN): in WAL mode it
    lets readers in, so only a write finds it. Returns the process, once it holds the lock."""
    code = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc) -> None:
    proc.stdin.close()           # its readline returns: the process ends, and with it the transaction
    proc.wait(timeout=10)


def test_an_outbox_another_program_holds_a_write_lock_on_is_refused_at_start(tmp_path, monkeypatch):
    """The open only read, which WAL mode allows under another writer: the start succeeded and every write
    then waited a minute for the lock (3 frames took 89 s, exit 0). The open takes the write lock once."""
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        ob.put("result", "t", lambda s: _json(s))
    monkeypatch.setattr(Outbox, "OPEN_BUSY_TIMEOUT_S", 0.2)
    proc = _hold_write_lock(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeFailure) as err:
            Outbox(path)
        assert time.monotonic() - t0 < 5
        assert err.value.exit_code == 1
        assert str(err.value).startswith(f"outbox {path}: cannot open (database is locked for more than 0.2 s: "
                                         "another program, e.g. a sqlite3 shell inside a transaction, holds a lock "
                                         "on the file); stop that program or point mqtt.outbox_path elsewhere")
    finally:
        _release(proc)
    with Outbox(path) as ob:                                      # nothing moved or lost; free again
        assert ob.reset is None and ob.depth == 1


def test_a_write_lock_taken_while_running_fails_writes_fast_and_they_resume_after_it(tmp_path):
    """A lock another program takes once the outbox is open: the first write blocked waits a short while, the
    next ones fail at once (the caller counts them; the line is not held up), and writes succeed again as soon
    as it is released. The sender's deletes likewise."""
    path = tmp_path / "o.sqlite"
    ob = Outbox(path)
    try:
        ob.put("result", "t", lambda s: _json(s))
        proc = _hold_write_lock(path)
        try:
            waits = []
            for _ in range(5):
                t0 = time.monotonic()
                with pytest.raises(RuntimeFailure, match=r"write failed \(database is locked: another program, "
                                                         r"e\.g\. a sqlite3 shell"):
                    ob.put("result", "t", lambda s: _json(s))
                waits.append(time.monotonic() - t0)
            assert 0.5 <= waits[0] < 3 and max(waits[1:]) < 0.2, waits
            with pytest.raises(RuntimeFailure, match=r"delete failed \(database is locked"):
                ob.delete([1])
            assert ob.depth == 1 and [r.id for r in ob.fetch_after(0, 10)] == [1]     # reads go on
        finally:
            _release(proc)
        assert ob.put("result", "t", lambda s: _json(s))[1] == 2      # nothing half-written: seq 2 follows 1
        assert ob.delete([1]) == 1 and ob.depth == 1
        proc = _hold_write_lock(path)      # the short wait is back once a write got through
        try:
            t0 = time.monotonic()
            with pytest.raises(RuntimeFailure, match="write failed"):
                ob.put("result", "t", b"{}")
            assert time.monotonic() - t0 >= 0.5
        finally:
            _release(proc)
    finally:
        ob.close()


def test_a_log_limiter_reports_what_it_held_back_once_the_interval_is_over_or_at_once_when_forced():
    """hit() reports the first occurrence, then holds the others back for the interval; only a later hit
    reported them, so occurrences with none after them were never logged. flush() reports them once the
    interval is over (a timer), or at once (the stop)."""
    from edge_ad.ratelimit import LogLimiter

    lim = LogLimiter(every_s=0.2)
    assert lim.hit("a") == 1 and lim.hit("a") == 0 and lim.hit("a", 2) == 0 and lim.hit("b") == 1
    assert lim.flush() == {}                          # within the interval
    assert lim.flush(force=True) == {"a": 3}          # b has nothing held back
    assert lim.flush(force=True) == {} and lim.hit("a") == 0     # the interval starts again at a flush
    time.sleep(0.25)
    assert lim.flush() == {"a": 1} and lim.hit("a") == 0


def test_a_refusal_for_good_is_dropped_and_announced_one_for_now_is_sent_again_after_a_back_off(tmp_path, caplog,
                                                                                                monkeypatch):
    """A PUBACK with a failure reason code deleted the message from the outbox whatever the code, with one log
    line: not counted in dropped_by, not announced, and a "try later" (0x97 Quota exceeded, 0x80 Unspecified
    error, 0x83 Implementation specific error) lost a result for good. A final refusal (0x87 Not authorized, 0x90
    Topic name invalid, 0x99 Payload format invalid) is dropped as 'rejected' now (counted, announced through
    on_drop with its reason code); any other stays in the outbox and is sent again after its own back-off
    (1 s, doubling), nothing being handed over for 1 s after such a refusal (no hot loop)."""
    import types

    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from edge_ad.mqtt import sender
    from edge_ad.mqtt.sender import OutboxSender

    clock = [1000.0]
    monkeypatch.setattr(sender, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))

    class Client:
        protocol = paho.MQTTv5
        mids = iter(range(1, 100))

        def __init__(self):
            self.sent = []

        def publish(self, topic, payload, qos=0, retain=False, properties=None):
            mid = next(self.mids)
            self.sent.append((mid, json.loads(payload)["i"]))
            return types.SimpleNamespace(rc=paho.MQTT_ERR_SUCCESS, mid=mid)

    def puback(mid, code):
        out.acknowledged(mid, ReasonCode(PacketTypes.PUBACK, identifier=code))

    ob = Outbox(tmp_path / "o.sqlite")
    for i in range(6):
        ob.put("result", "t/result", lambda s, i=i: _json(s, i=i), msg_id=f"r{i}")
    announced: list[dict] = []
    out = OutboxSender(ob, window=10, resend_after_s=60.0, wake=threading.Event(), on_drop=announced.extend)
    client = Client()
    out.fill(client)
    assert [i for _, i in client.sent] == [0, 1, 2, 3, 4, 5]
    with caplog.at_level("WARNING", logger="edge_ad.mqtt.sender"):
        for (mid, _), code in zip(client.sent, (0x87, 0x90, 0x99, 0x97, 0x80, 0x83)):
            puback(mid, code)
        out.drain_acks()
        out.report_drops(now=True)
        assert ob.dropped_by == {"full": 0, "too_large": 0, "rejected": 3}
        assert ob.depth == 3 and out.retry_waiting == 3 and out.counters["rejected"] == 6 and out.inflight == 0
        assert [(d["message_id"], d["reason"], d["reason_code"]) for d in announced] == [
            ("r0", "rejected", 0x87), ("r1", "rejected", 0x90), ("r2", "rejected", 0x99)]
        assert "r0 on t/result dropped: the broker refused it: Not authorized (reason code 0x87)" in announced[0]["error"]
        assert out.settled            # nothing waits for the broker: the stop does not wait for a back-off

        client.sent.clear()
        ob.put("result", "t/result", lambda s: _json(s, i=6), msg_id="r6")
        out.fill(client)
        assert client.sent == []      # the broker said "not now": nothing is handed over for a second
        clock[0] += 1.0
        out.fill(client)
        assert [i for _, i in client.sent] == [3, 4, 5, 6]       # the refused ones first, then the next
        (m3, _), *others = client.sent
        puback(m3, 0x97)              # refused again: its back-off doubles
        for mid, _ in others:
            puback(mid, 0)
        out.drain_acks()
        assert ob.depth == 1 and out.retry_waiting == 1 and ob.dropped_by["rejected"] == 3
        client.sent.clear()
        clock[0] += 1.0
        out.fill(client)
        assert client.sent == []      # 2 s this time
        clock[0] += 1.0
        out.fill(client)
        assert [i for _, i in client.sent] == [3]
        puback(client.sent[0][0], 0)
        out.drain_acks()
    assert ob.depth == 0 and out.retry_waiting == 0 and out.counters["acked"] == 4
    assert ob.dropped_by == {"full": 0, "too_large": 0, "rejected": 3} and len(announced) == 3
    warned = [r.getMessage() for r in caplog.records if "for now:" in r.getMessage()]
    assert len(warned) == 1, warned             # 4 refusals for now, logged once (at most once a minute)
    assert "result r3 on t/result for now: Quota exceeded (reason code 0x97)" in warned[0]
    assert "kept in the outbox and sent again in 1 s" in warned[0]
    assert any("took the messages it had refused" in r.getMessage() for r in caplog.records)
    ob.close()


def test_a_full_outbox_names_what_it_drops_per_kind_in_bounded_space(tmp_path, monkeypatch):
    """A full outbox's drops were only counted (and logged as a count): a consumer could not tell which results
    were lost. They are named now, per kind: how many, the first and last id, the seq ranges, and every id while
    they are few; in a bounded report however many (20 seq ranges a kind, the rest counted). They are handed out
    once the outbox has room for the event that names them (storing it must not push out one more), at most
    once a minute (at once while stopping), and kept in the file over a stop that had no room for them."""
    from edge_ad import ratelimit

    ob = Outbox(tmp_path / "o.sqlite", max_messages=10, sync="normal")

    def deliver_one():            # what the sender does with the oldest once the broker acknowledged it
        ob.delete([ob.fetch_after(0, 1)[0].id])

    for i in range(12):
        ob.put("result", "t/result", lambda s: _json(s), msg_id=f"r{i}")
    ob.put("image", "t/image", b"\xff\xd8", msg_id="e1")         # an image never pushes out a result: itself
    ob.put("event", "t/event", lambda s: _json(s), msg_id="ev1")
    assert ob.take_full_drops() is None and ob.full_drops_pending      # full: no room for the event yet
    deliver_one()
    rep = ob.take_full_drops()
    assert rep == {"count": 4, "ids": ["r0", "r1", "e1", "r2"], "max_messages": 10, "max_bytes": ob.max_bytes,
                   "dropped_total": 4,
                   "kinds": {"result": {"count": 3, "first_id": "r0", "last_id": "r2", "seq": [[1, 3]]},
                             "image": {"count": 1, "first_id": "e1", "last_id": "e1"}}}
    assert ob.take_full_drops() is None and not ob.full_drops_pending
    for i in (12, 13):
        ob.put("result", "t/result", lambda s: _json(s), msg_id=f"r{i}")      # the second pushes out r4
    deliver_one()
    assert ob.take_full_drops() is None                              # within the minute ...
    assert ob.take_full_drops(now=True)["kinds"] == {"result": {"count": 1, "first_id": "r4", "last_id": "r4",
                                                                "seq": [[5, 5]]}}      # ... but stopping
    for i in (14, 15):
        ob.put("result", "t/result", lambda s: _json(s), msg_id=f"r{i}")      # pushes out r6
    assert ob.take_full_drops(now=True) is None                      # no room
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", max_messages=10, sync="normal")      # the next start
    assert ob.take_full_drops(now=True) is None and ob.full_drops_pending
    deliver_one()
    assert ob.take_full_drops(now=True)["ids"] == ["r6"]
    for i in range(3000):      # the sender delivers one now and then: the dropped seqs come in many ranges
        ob.put("result", "t/result", lambda s: _json(s), msg_id=f"x{i}")
        if i % 7 == 0:
            deliver_one()
    deliver_one()
    monkeypatch.setattr(ratelimit, "REPORT_EVERY_S", 0.0)             # the minute has passed
    rep = ob.take_full_drops()
    result = rep["kinds"]["result"]
    assert rep["ids"] is None and result["count"] > 2000
    assert rep["count"] == sum(k["count"] for k in rep["kinds"].values())
    assert len(result["seq"]) == 20 and result["seq_more"] > 0
    assert sum(b - a + 1 for a, b in result["seq"]) + result["seq_more"] == result["count"]
    assert result["last_id"].startswith("x") and result["seq"][0][0] > 7         # r7 on: r6 was the last named
    assert len(json.dumps(rep)) < 1500
    ob.close()
