"""Store-and-forward outbox: a SQLite (WAL) table of messages waiting for the broker's acknowledgement.

Every result, event and event image is written here (one transaction, fsync'd in ``full`` sync mode)
before anything is sent, and deleted only when the broker acknowledged it (PUBACK). A broker restart,
a network cut, ``kill -9`` or a power cut therefore loses nothing: whoever opens the file next sends
what is left, oldest first.

The outbox is bounded by a message count and by payload bytes. When a write would exceed a bound, the
oldest event images go first, then the oldest messages of any kind; every dropped message is counted
in ``dropped`` (persisted in the file), and named (:class:`DropNames`: per kind, how many, the first and
last id, the ``seq`` ranges) until the link announces them, once the outbox has room for its event
(:meth:`Outbox.take_full_drops`; kept in memory, and in the file when it is closed with some not announced
yet: a power cut loses them, not the count). A message dropped while it was in flight may still arrive.
The sender also drops a message the broker will not take (:meth:`Outbox.drop`: larger than the broker's
maximum packet size, or refused by a PUBACK reason code that is final, such as Not authorized): counted in
``dropped`` too, and per reason in ``dropped_by``.

Per-kind sequence numbers (``seq``) are allocated in the same transaction as the insert and persisted,
so they increase monotonically per device across restarts; a consumer sees a gap only for a dropped
message. The same transaction keeps a copy of the last result stored and the id of the result stored before
it (:meth:`Outbox.last_result`), also once its row is delivered and deleted: the runtime stores a result here
before it writes its line in the result log, and gives that log the line a kill cut off (see
:meth:`edge_ad.runtime.reporting.Reporter.restore_result_log`). ``instance`` is a random id made when the file
is created: if the file is ever replaced, the sequence restarts and the instance changes (both appear in the
device's birth message).

A file that is not a readable SQLite database (malformed, truncated, not a database: a power cut on storage
that lied about fsync, a disk error) is moved aside at open as ``NAME.corrupt-<UTC time>`` and an empty
outbox starts (``reset`` says so; the link announces it with an ``outbox_reset`` event): the line keeps
inspecting, and only the messages that file held are lost. A file locked by another program, or one that
cannot be read for its permissions or an I/O error, is still refused (it may be sound). A lock another
program takes later, while the line runs, fails the writes it blocks after a short wait (counted by the
caller), never holds the line up (see :meth:`Outbox._begin`).

The writer (the inspection thread) and the sender use separate connections; only the writer's commits
are fsync'd (see :class:`Outbox`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InputError, RuntimeFailure
from ..ratelimit import LogLimiter
from .settings import SyncMode

log = logging.getLogger(__name__)

KINDS = ("result", "event", "image")
DROP_IDS_PER_EVENT = 100    # message ids an output_error event for dropped messages names at most
SEQ_RANGES_MAX = 20         # seq ranges named per kind in one report of a full outbox's drops (more: counted)
FULL_EVENT_ROOM = 8192      # bytes kept free for the event that names a full outbox's drops (at most ~6 KiB)
# why messages were dropped (``dropped_by``): "full" (a bound), or the sender's reasons (:meth:`Outbox.drop`): the
# broker announced a smaller maximum packet size, or refused the message for good (a PUBACK reason code)
DROP_REASONS = ("full", "too_large", "rejected")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    retain INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    msg_id TEXT,
    meta TEXT
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_SQLITE_BUSY, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 11, 26


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Is the file not a readable SQLite database (malformed, truncated, not a database at all)? Not a lock
    held by another program, a permission or an I/O error: those are refused as they are (the file may be
    fine, and moving it aside would lose what it holds)."""
    code = getattr(exc, "sqlite_errorcode", None)       # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _busy(exc: sqlite3.Error) -> bool:
    """``database is locked``: another connection holds the lock this one waited for, past its busy timeout."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == _SQLITE_BUSY
    return "database is locked" in str(exc).lower()


_LOCKED_HINT = "another program, e.g. a sqlite3 shell inside a transaction, holds a lock on the file"


def waiting_in(path: str | Path) -> int:
    """The messages the outbox file ``path`` holds (not yet acknowledged by a broker), read without opening it as
    an :class:`Outbox`: no lock is taken and nothing is written (a file this run does not use, e.g. one an
    earlier revision kept elsewhere). :class:`sqlite3.Error` when it cannot be read or is not an outbox (no
    ``outbox`` table)."""
    from urllib.parse import quote

    db = sqlite3.connect(f"file:{quote(str(Path(path).absolute()))}?mode=ro", uri=True, timeout=1.0)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


class DropNames:
    """The messages a full outbox dropped since the last report, named in a bounded space however many they
    are: per kind, how many, the first and last id, and the ``seq`` ranges of results and events (the first
    :data:`SEQ_RANGES_MAX`; the messages in further ranges are counted in ``seq_more``); the ids of all of them
    while they are at most :data:`DROP_IDS_PER_EVENT` (``ids`` is None past that, or when one has no id)."""

    def __init__(self, report: dict | None = None):
        """Empty, or the names of an earlier :meth:`report` (kept in the file over a restart)."""
        self.count = int(report["count"]) if report else 0
        self.kinds: dict[str, dict] = dict(report["kinds"]) if report else {}
        self.ids: list[str] | None = report["ids"] if report else []

    def add(self, kind: str, msg_id: str | None, seq: int | None) -> None:
        self.count += 1
        if self.ids is not None and (msg_id is None or self.count > DROP_IDS_PER_EVENT):
            self.ids = None
        elif self.ids is not None:
            self.ids.append(msg_id)
        k = self.kinds.setdefault(kind, {"count": 0, "first_id": msg_id})
        k["count"] += 1
        k["last_id"] = msg_id
        if seq is None:
            return
        ranges = k.setdefault("seq", [])
        if "seq_more" in k:
            k["seq_more"] += 1
        elif ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        elif len(ranges) < SEQ_RANGES_MAX:
            ranges.append([seq, seq])
        else:
            k["seq_more"] = 1

    def spills(self, kind: str, seq: int | None) -> bool:
        """Would :meth:`add` of ``seq`` (of ``kind``) count it in ``seq_more`` instead of a listed range?"""
        k = self.kinds.get(kind)
        if seq is None or k is None:
            return False
        ranges = k.get("seq", [])
        return "seq_more" in k or (len(ranges) >= SEQ_RANGES_MAX and seq != ranges[-1][1] + 1)

    def report(self) -> dict:
        """``{"count", "kinds": {kind: {"count", "first_id", "last_id", "seq"?, "seq_more"?}}, "ids"}``"""
        kinds = {kind: {key: v for key, v in k.items() if v is not None} for kind, k in self.kinds.items()}
        return {"count": self.count, "kinds": kinds, "ids": self.ids}


def _field_of(payload: bytes | None, key: str):
    """Field ``key`` of a stored result or event (None for an image, or a payload without one)."""
    if payload is None:
        return None
    try:
        return json.loads(payload).get(key)
    except (ValueError, AttributeError):
        return None


def _seq_of(payload: bytes | None) -> int | None:
    """The ``seq`` of a stored result or event (None for an image, or a payload without one)."""
    seq = _field_of(payload, "seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _id_of(payload: bytes | None) -> str | None:
    """The ``id`` of a stored result or event (None for a payload without one)."""
    msg_id = _field_of(payload, "id")
    return msg_id if isinstance(msg_id, str) and msg_id else None


@dataclass(frozen=True)
class Row:
    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float          # unix time of the write
    msg_id: str | None      # the payload's id (results, events) or the event id (images)
    meta: dict

    @property
    def seq(self) -> int | None:
        """The ``seq`` of a result or event (read from its payload), None for an image."""
        return None if self.kind == "image" else _seq_of(self.payload)


class Outbox:
    """Two SQLite connections on one file: the writer's (``put``, any caller thread; ``sync`` mode) and the
    sender's (``fetch_after`` / ``fetch_ids`` / ``delete``; ``synchronous=NORMAL``: a delete lost to a
    power cut only means a message is sent twice, so deletes need no fsync and never hold up a write)."""

    def __init__(self, path: str | Path, max_messages: int = 100_000, max_bytes: int = 256 * 1024 * 1024,
                 sync: SyncMode | str = SyncMode.FULL):
        if max_messages < 1:
            raise InputError(f"outbox max_messages {max_messages}: expected >= 1")
        if max_bytes < 1:
            raise InputError(f"outbox max_bytes {max_bytes}: expected >= 1")
        self.path = Path(path)
        self.max_messages = int(max_messages)
        self.max_bytes = int(max_bytes)
        try:
            sync = SyncMode(sync)
        except ValueError:
            raise InputError(f"outbox sync '{sync}': expected full or normal") from None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"outbox {self.path}: cannot make its folder ({exc})") from None
        self._lock = threading.Lock()        # the writer connection, and every write transaction
        self._rlock = threading.Lock()       # the sender connection (taken before _lock)
        self._stat = threading.Lock()        # count / bytes / dropped (changed by deltas)
        self._closed = False
        self._no_wait: set[int] = set()      # connections whose last write found the file locked (see _begin)
        self._full_log = LogLimiter()        # drops are logged at once, then at most once a minute
        self._full_names = DropNames()       # ... and named, for take_full_drops (under _stat; _open may load some)
        self._full_taken = float("-inf")     # when take_full_drops last returned some (monotonic)
        # set when the file was damaged and moved aside at open: {"moved_to", "error", "ts"}
        self.reset: dict | None = None
        self._lockfile = self._lock_exclusive()
        try:
            try:
                self._open(sync)
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                # not a readable SQLite database (a power cut on a card that lied about fsync, a bad
                # sector): it would stop the line at every start, for messages it cannot give back anyway
                self._close_connections()
                moved = self._move_aside()
                self.reset = {"moved_to": str(moved), "error": str(exc), "ts": time.time()}
                self._open(sync)
                log.error("outbox %s was not a readable SQLite database (%s): moved aside to %s (with its -wal "
                          "and -shm, if any); started an empty outbox: the messages it held that were not delivered "
                          "yet are lost, seq starts again at 1 and the birth's outbox_instance is now %s", self.path,
                          exc, moved, self.instance)
        except (sqlite3.Error, OSError) as exc:
            self._close_connections()
            self._release()
            if isinstance(exc, sqlite3.Error) and _busy(exc):
                raise RuntimeFailure(f"outbox {self.path}: cannot open ({exc} for more than "
                                     f"{self.OPEN_BUSY_TIMEOUT_S:g} s: {_LOCKED_HINT}); stop that program or "
                                     "point mqtt.outbox_path elsewhere") from None
            raise RuntimeFailure(f"outbox {self.path}: cannot open ({exc})") from None
        except BaseException:
            self._close_connections()
            self._release()
            raise

    def _open(self, sync: SyncMode) -> None:
        """Both connections, the schema, and the state read back (a scan of the whole table: a damaged file
        shows here, at start, rather than in the first write)."""
        self._db = self._connect(sync)
        self._db.executescript(_SCHEMA)
        self._rdb = self._connect(SyncMode.NORMAL)
        with self._lock:
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
            self._count, self._bytes = int(row[0]), int(row[1])
            self.instance = self._meta_get("instance")
            if self.instance is None:
                self.instance = str(uuid.uuid4())
                self._meta_set("instance", self.instance)
            self._dropped = int(self._meta_get("dropped") or 0)
            self._last_result_id = _id_of(self._meta_get("last.result"))   # the result the next one follows
            # only the sender's reasons are stored: "full" is the rest of the total (files made before had no
            # reasons, and all their drops were "full")
            self._dropped_by = {r: int(self._meta_get(f"dropped.{r}") or 0) for r in DROP_REASONS[1:]}
            names = self._meta_get("full_names")        # dropped for a bound, not announced at the last close
            if names is not None:
                try:
                    self._full_names = DropNames(json.loads(names))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("outbox %s: the names of the messages dropped before the last stop are unreadable "
                                "(%s): only their count is kept", self.path, exc)
                self._db.execute("DELETE FROM meta WHERE key = 'full_names'")
            # the write lock, taken and given back: the reads above succeed in WAL mode while another program
            # holds a write transaction on the file, and the first result would find the lock instead (it
            # waited a minute per write, holding up the line); refused here, at start, as documented
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
        for db in (self._db, self._rdb):
            db.execute(f"PRAGMA busy_timeout={int(self.WRITE_BUSY_TIMEOUT_S * 1000)}")

    def _close_connections(self) -> None:
        for name in ("_rdb", "_db"):
            db = self.__dict__.pop(name, None)
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error:
                    pass

    def _move_aside(self) -> Path:
        """Rename the damaged file to ``NAME.corrupt-<UTC time>`` (its ``-wal`` and ``-shm`` follow as
        ``NAME.corrupt-<UTC time>-wal`` / ``-shm``, so SQLite tools find them: a file kept for whoever wants to
        look at it, never deleted). Returns the new path."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while moved.exists():
            moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.replace(self.path, moved)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, moved.with_name(moved.name + suffix))
        except OSError as exc:
            raise RuntimeFailure(f"outbox {self.path} is not a readable SQLite database and cannot be moved aside "
                                 f"({exc.strerror or exc}): move it (and its -wal, -shm) away by hand to start "
                                 "with an empty outbox (the messages it held are lost)") from None
        return moved

    def _lock_exclusive(self):
        """One process per outbox file: a second sender would send the same backlog and fight over the
        MQTT session. The lock is the kernel's, so a killed process leaves none behind."""
        try:
            import fcntl
        except ImportError:          # not POSIX: no guard
            return None
        path = self.path.with_name(self.path.name + ".lock")
        try:
            fh = open(path, "a+")
        except OSError as exc:
            raise RuntimeFailure(f"outbox {self.path}: cannot open its lock file {path} ({exc})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            if holder == str(os.getpid()):
                raise RuntimeFailure(f"outbox {self.path} is already open in this process: stop (close) the "
                                     "other MqttLink / Outbox first") from None
            raise RuntimeFailure(f"outbox {self.path} is in use by another process (pid {holder}); one "
                                 "device link per outbox file") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return fh

    def _release(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()       # closing the file releases the lock
            self._lockfile = None

    @property
    def wal_limit(self) -> int:
        """Bytes the write-ahead log (``PATH-wal``) grows to before a checkpoint copies it into the file, and is
        cut back to after one: ``outbox_max_bytes`` within 64 KiB .. 4 MiB (SQLite's own default is 4 MiB of
        pages, and a WAL that is never truncated: a 1 MiB outbox kept a 4 MiB -wal beside it)."""
        return max(64 * 1024, min(4 * 1024 * 1024, self.max_bytes))

    # How long a connection waits for a lock another program holds on the file: at open (a short transaction
    # of a sqlite3 shell may end; one that does not refuses the start), and for a write once running. This
    # process never waits on itself: its write transactions take turns under _lock (the sender's deletes
    # too), readers never block a writer in WAL mode, and the automatic checkpoint never waits for a lock.
    OPEN_BUSY_TIMEOUT_S = 5.0
    WRITE_BUSY_TIMEOUT_S = 1.0

    def _connect(self, sync: SyncMode) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                             timeout=self.OPEN_BUSY_TIMEOUT_S)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync.value.upper()}")
        # both per connection, and both connections write (inserts; the sender's deletes)
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA wal_autocheckpoint={max(16, self.wal_limit // page)}")
        db.execute(f"PRAGMA journal_size_limit={self.wal_limit}")
        return db

    # ------------------------------------------------------------------ meta
    def _meta_get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _meta_set(self, key: str, value) -> None:
        """Set ``key`` to ``value``: bytes are kept as they are (a BLOB), anything else as its text."""
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, value if isinstance(value, bytes) else str(value)))

    def _begin(self, db: sqlite3.Connection, what: str) -> None:
        """``BEGIN IMMEDIATE`` on ``db`` (the caller holds ``_lock``). A lock another program holds is waited
        for WRITE_BUSY_TIMEOUT_S once; while it lasts the next writes of this connection fail at once (no
        wait), until one gets through: a file held locked for minutes costs the line one short wait, not one
        per result (the reporting thread would fall behind and hold up inference). The caller counts each
        failure (``output_errors.outbox``; the sender retries its deletes)."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            if id(db) not in self._no_wait:
                self._no_wait.add(id(db))
                db.execute("PRAGMA busy_timeout=0")
            raise RuntimeFailure(f"outbox {self.path}: {what} failed ({exc}: {_LOCKED_HINT}; the next writes "
                                 "fail at once while it lasts)") from None
        if id(db) in self._no_wait:
            self._no_wait.discard(id(db))
            db.execute(f"PRAGMA busy_timeout={int(self.WRITE_BUSY_TIMEOUT_S * 1000)}")

    # ------------------------------------------------------------------ write
    def put(self, kind: str, topic: str, payload: bytes | Callable[[int], bytes], *, qos: int = 1,
            retain: bool = False, msg_id: str | None = None, meta: dict | None = None) -> tuple[int, int]:
        """Store one message; returns (row id, seq). Beyond the bounds the oldest messages are dropped and
        counted, images first; an image that would push out a result or an event, and a message larger than
        ``max_bytes`` alone, is dropped itself (its row id is then gone).

        ``payload`` is bytes, or a function ``seq -> bytes`` called inside the transaction with the next
        sequence number of ``kind`` (so the number in the payload is the one persisted).
        """
        if kind not in KINDS:
            raise InputError(f"outbox kind '{kind}': expected one of {', '.join(KINDS)}")
        meta_text = json.dumps(meta, separators=(",", ":")) if meta else None
        with self._lock:
            self._check_open()
            try:
                self._begin(self._db, "write")
                try:
                    seq_key = f"seq.{kind}"
                    seq = int(self._meta_get(seq_key) or 0) + 1
                    data = payload(seq) if callable(payload) else bytes(payload)
                    size = len(data)
                    cur = self._db.execute(
                        "INSERT INTO outbox(kind, topic, payload, qos, retain, size, created, msg_id, meta) "
                        "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (kind, topic, data, int(qos), int(bool(retain)), size, time.time(), msg_id, meta_text))
                    row_id = int(cur.lastrowid)
                    self._meta_set(seq_key, seq)
                    if kind == "result":   # in the seq's transaction: no fsync more (Outbox.last_result)
                        self._meta_set("last.result.after", self._last_result_id or "")
                        self._meta_set("last.result", data)
                    with self._stat:
                        count, nbytes = self._count + 1, self._bytes + size
                    dropped = dropped_bytes = 0
                    named: list[tuple] = []          # (kind, msg_id, seq) of each dropped message
                    while count > self.max_messages or nbytes > self.max_bytes:
                        # older images go first; an image never pushes out a result or an event (it
                        # drops itself instead), and a message larger than the whole bound drops itself
                        # without emptying the backlog first
                        # (id, size, kind, msg_id, the payload of a result or event: for its seq)
                        victim = None
                        if size <= self.max_bytes:
                            victim = self._db.execute(
                                f"SELECT {self._VICTIM} FROM outbox WHERE kind = 'image' AND id != ? ORDER BY id "
                                "LIMIT 1", (row_id,)).fetchone()
                        if victim is None and (kind == "image" or size > self.max_bytes):
                            victim = (row_id, size, kind, msg_id, None if kind == "image" else data)
                        if victim is None:
                            victim = self._db.execute(
                                f"SELECT {self._VICTIM} FROM outbox ORDER BY id LIMIT 1").fetchone()
                        self._db.execute("DELETE FROM outbox WHERE id = ?", (victim[0],))
                        count, nbytes = count - 1, nbytes - int(victim[1])
                        dropped, dropped_bytes = dropped + 1, dropped_bytes + int(victim[1])
                        named.append((victim[2], victim[3], _seq_of(victim[4])))
                        if victim[0] == row_id:
                            log.warning("outbox %s: a %s message of %d bytes does not fit (%d messages, %d "
                                        "bytes max, results and events kept): dropped", self.path, kind, size,
                                        self.max_messages, self.max_bytes)
                            break
                    if dropped:
                        self._meta_set("dropped", self._dropped + dropped)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # a failed COMMIT may have ended it: keep the real error
                        self._db.execute("ROLLBACK")
                    raise
                if kind == "result":
                    self._last_result_id = _id_of(data) if msg_id is None else msg_id
                # deltas, not totals: a delete may have committed (and counted) since our COMMIT
                with self._stat:
                    self._count += 1 - dropped
                    self._bytes += size - dropped_bytes
                    self._dropped += dropped
                    for name in named:
                        self._full_names.add(*name)
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"outbox {self.path}: write failed ({exc})") from None
            since = self._full_log.hit("full", dropped) if dropped else 0
            if since:     # not one line per message on a line whose broker is down for hours
                log.warning("outbox %s full (%d messages, %d bytes max): dropped %d oldest since the last report "
                            "(%d in all); reported again in %.0f s at the earliest", self.path, self.max_messages,
                            self.max_bytes, since, self._dropped, self._full_log.interval_s)
            return row_id, seq

    _VICTIM = "id, size, kind, msg_id, CASE WHEN kind = 'image' THEN NULL ELSE payload END"

    @property
    def full_drops_pending(self) -> bool:
        """Messages dropped for a bound that :meth:`take_full_drops` has not handed out yet."""
        return self._full_names.count > 0

    def full_drops_named(self) -> dict | None:
        """The messages dropped for a bound that :meth:`take_full_drops` has not handed out yet, named per kind
        (:meth:`DropNames.report`'s ``kinds``: how many, the first and last id, the ``seq`` ranges), without
        taking them; None when there are none. The link's birth carries them (``dropped_pending``)."""
        with self._stat:
            if not self._full_names.count:
                return None
            return json.loads(json.dumps(self._full_names.report()["kinds"]))     # a copy: they keep growing

    def take_full_drops(self, now: bool = False) -> dict | None:
        """The messages dropped for a bound since the last call, named (:meth:`DropNames.report`, with
        ``max_messages``, ``max_bytes`` and ``dropped_total``, the ``full`` drops since the file was made), for
        the link to announce in an event: once the outbox has room for that event (storing it must not push out
        one more message: a full outbox keeps the names meanwhile, bounded, also over a restart), and at most
        once per :data:`~edge_ad.ratelimit.REPORT_EVERY_S` (as the log) unless ``now`` (the stop). None when
        there are none, or not yet."""
        at = time.monotonic()
        with self._stat:
            if (not self._full_names.count or (not now and at - self._full_taken < self._full_log.interval_s)
                    or self._count + 1 > self.max_messages
                    or self._bytes + min(FULL_EVENT_ROOM, self.max_bytes // 4) > self.max_bytes):
                return None
            names, self._full_names, self._full_taken = self._full_names, DropNames(), at
            total = self._dropped - sum(self._dropped_by.values())
        return {**names.report(), "max_messages": self.max_messages, "max_bytes": self.max_bytes,
                "dropped_total": total}

    # ------------------------------------------------------------------ read / delete (the sender)
    _COLUMNS = "id, kind, topic, payload, qos, retain, created, msg_id, meta"

    def fetch_after(self, after_id: int, limit: int) -> list[Row]:
        """Up to ``limit`` messages with id > ``after_id``, oldest first."""
        with self._rlock:
            self._check_open()
            try:
                rows = self._rdb.execute(f"SELECT {self._COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                         (int(after_id), int(limit))).fetchall()
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"outbox {self.path}: read failed ({exc})") from None
        return [self._row(r) for r in rows]

    def fetch_ids(self, ids: Iterable[int]) -> list[Row]:
        """The messages with these ids that are still stored, oldest first."""
        ids = sorted({int(i) for i in ids})
        out: list = []
        with self._rlock:
            self._check_open()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                out.extend(self._rdb.execute(f"SELECT {self._COLUMNS} FROM outbox WHERE id IN ({marks}) "
                                             "ORDER BY id", chunk).fetchall())
        return [self._row(r) for r in out]

    @staticmethod
    def _row(r) -> Row:
        return Row(int(r[0]), r[1], r[2], bytes(r[3]), int(r[4]), bool(r[5]), float(r[6]), r[7],
                   json.loads(r[8]) if r[8] else {})

    def delete(self, ids: Iterable[int]) -> int:
        """Remove acknowledged messages; ids already gone (dropped) are ignored. Returns how many went."""
        ids = list(ids)
        if not ids:
            return 0
        with self._rlock, self._lock:       # write transactions take turns here, never in SQLite's busy wait
            self._check_open()
            try:
                self._begin(self._rdb, "delete")
                gone = gone_bytes = 0
                try:
                    for start in range(0, len(ids), 500):
                        chunk = ids[start:start + 500]
                        marks = ",".join("?" * len(chunk))
                        row = self._rdb.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox "
                                                f"WHERE id IN ({marks})", chunk).fetchone()
                        self._rdb.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                        gone, gone_bytes = gone + int(row[0]), gone_bytes + int(row[1])
                    with self._stat:      # before COMMIT: a put that follows sees them
                        self._count -= gone
                        self._bytes -= gone_bytes
                    try:
                        self._rdb.execute("COMMIT")
                    except BaseException:
                        with self._stat:
                            self._count += gone
                            self._bytes += gone_bytes
                        raise
                except BaseException:
                    if self._rdb.in_transaction:
                        self._rdb.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"outbox {self.path}: delete failed ({exc})") from None
        return gone

    def drop(self, ids: Iterable[int], reason: str) -> int:
        """Remove messages that will never be delivered (the broker refuses them: ``reason`` is one of
        :data:`DROP_REASONS` but "full") and count them in ``dropped`` and ``dropped_by[reason]``, in one
        transaction. Ids already gone are ignored. Returns how many went."""
        if reason not in DROP_REASONS[1:]:
            raise InputError(f"outbox drop reason '{reason}': expected one of {', '.join(DROP_REASONS[1:])}")
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0
        with self._rlock, self._lock:
            self._check_open()
            try:
                self._begin(self._db, "drop")   # as put and delete: a lock another program holds fails fast
                try:
                    marks = ",".join("?" * len(ids))
                    row = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({marks})",
                                           ids).fetchone()
                    gone, gone_bytes = int(row[0]), int(row[1])
                    if gone:
                        self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
                        self._meta_set("dropped", self._dropped + gone)
                        self._meta_set(f"dropped.{reason}", self._dropped_by[reason] + gone)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"outbox {self.path}: drop failed ({exc})") from None
            with self._stat:
                self._count -= gone
                self._bytes -= gone_bytes
                self._dropped += gone
                self._dropped_by[reason] += gone
        return gone

    # ------------------------------------------------------------------ state
    @property
    def depth(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def dropped_by(self) -> dict[str, int]:
        """``dropped`` per reason (since the file was made): ``full`` (a bound), ``too_large`` (larger than the
        maximum packet size the broker announced), ``rejected`` (refused by the broker for good: a PUBACK reason
        code such as 0x87 Not authorized)."""
        with self._stat:
            by = dict(self._dropped_by)
            return {"full": max(0, self._dropped - sum(by.values())), **by}

    def image_fits(self, size: int, plus_messages: int = 0, plus_bytes: int = 0) -> bool:
        """Would an image of ``size`` bytes be kept, after ``plus_messages`` messages of ``plus_bytes``
        (the event that announces it) are stored? Older images give way; results and events never do."""
        with self._lock:
            self._check_open()
            try:
                n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox "
                                        "WHERE kind != 'image'").fetchone()
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"outbox {self.path}: read failed ({exc})") from None
        return (int(n) + plus_messages + 1 <= self.max_messages
                and int(b) + plus_bytes + int(size) <= self.max_bytes)

    def last_result(self) -> tuple[str | None, bytes] | None:
        """``(after, payload)`` of the last result stored, kept when its row is gone (delivered, dropped):
        ``after`` is the id of the result stored before it (None: it was the first). None when this file
        stored no result yet (or only before this was kept)."""
        with self._lock:
            self._check_open()
            try:
                payload = self._meta_get("last.result")
                after = self._meta_get("last.result.after")
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"outbox {self.path}: read failed ({exc})") from None
        if payload is None:
            return None
        return (after or None), bytes(payload)

    def next_seq(self, kind: str) -> int:
        with self._lock:
            self._check_open()
            return int(self._meta_get(f"seq.{kind}") or 0) + 1

    def stats(self) -> dict:
        return {"depth": self._count, "bytes": self._bytes, "dropped": self._dropped, "dropped_by": self.dropped_by,
                "max_messages": self.max_messages, "max_bytes": self.max_bytes}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeFailure(f"outbox {self.path} is closed")

    def close(self) -> None:
        with self._rlock, self._lock:
            if self._closed:
                return
            self._closed = True
            held = self._full_log.flush(force=True).get("full", 0)
            if held:   # drops since the last report: the log accounts for every one (the summary counts them too)
                log.warning("outbox %s full: dropped %d oldest since the last report (%d in all)", self.path, held,
                            self._dropped)
            if self._full_names.count:   # not announced (no room for the event): the next start does it
                try:
                    self._meta_set("full_names", json.dumps(self._full_names.report(), separators=(",", ":")))
                except sqlite3.Error as exc:
                    log.warning("outbox %s: the names of the %d message(s) dropped since the last report are lost "
                                "(%s); their count is kept", self.path, self._full_names.count, exc)
            self._rdb.close()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._release()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
