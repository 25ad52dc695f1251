"""Fleet monitor: every device seen under ``edge-ad/v1/<site>/<device>/``, one row each.

:class:`FleetView` is pure: feed it ``(topic, payload)`` and read rows, so it is tested without a broker.
:func:`run_monitor` connects, feeds it, and draws a live table (or streams JSON lines) for ``edge-ad monitor``.
Sources per column: state from the retained ``status`` (birth / will; ``paused`` from the birth or telemetry,
cleared while offline), fps, latency, NG rate, outbox depth and drift from ``telemetry``, the last result from
``result`` (the newest ``seq``), the calibration version from the retained ``calibration`` (else the birth
message), the threshold deciding from the latest result (the newest ``seq``), telemetry or retained
``calibration``'s ``threshold_in_force`` (else the calibration's; the calibration's is kept as
``calibration_threshold``), last seen from the messages received live, else the retained status's ``ts`` (when it
connected or stopped; none for the will, nor for a ``ts`` ahead of the monitor's clock by more than
``clock_skew_s``). A device that is ``online`` but sent nothing for ``stale_after_s`` (by arrival times) shows as
``stale`` (:meth:`FleetView.settle` returns its row once when it turns so). A device whose
clock differs from the monitor's by more than ``clock_skew_s`` (:data:`CLOCK_SKEW_S`, 60 s; estimated from live
telemetry and status; for a device this monitor hears neither from, from the ``ts`` of its new results, which may
come from the outbox's backlog long after they were made: a clock ahead is flagged at once, one behind only from
results that arrive at the pace they were made) is flagged: ``clock_offset_s``, ``clock_skew``, the table's
``CLOCK`` and a WARNING.

Gaps in ``seq`` (results and events each count +1 per device) are counted per device. The messages the
device itself dropped and announced (``output_error`` events whose ``dropped`` names their ``seq`` ranges:
a full outbox, a message too large for the broker or refused by it; and a birth's ``dropped_pending``: what
the full outbox dropped, named at the connect before the backlog, whose event comes behind it) are counted as
dropped (``results_dropped``, ``events_dropped``; the table's ``DROPPED``), whichever comes first, the gap or
the announcement. The announcement usually comes a moment after the gap is seen, so a gap's part not announced
yet is held for ``gap_grace_s`` (:data:`GAP_GRACE_S`), counted nowhere and not warned of (``last_gap``'s
``held``); what is left of it then counts as missing (``results_missing``, ``events_missing``; the table's
``MISSING``), logged as a WARNING: unexplained, such as messages the broker dropped on the way to this
monitor (Mosquitto's ``max_queued_messages``), or drops an older device announced by id only (``too_large``,
``rejected``: ``message_ids``, no ``dropped``), or announced later still (moved to dropped when it comes).
:meth:`FleetView.settle` ends the grace periods that are over (``run_monitor`` calls it every ``interval``).
Repeats (at-least-once delivery: QoS 1, and a device sends its unacknowledged messages again after a
reconnect) are not gaps, nor new: ``results``, ``ng`` and ``events`` count each ``seq`` of an outbox once, a
repeat only adds to ``duplicates`` and changes nothing else in the row. A late message fills its gap again (new:
counted, but the last result, threshold and calibration version shown stay the newest ``seq``'s), and so does,
once, one below the first ``seq`` this count received (it began mid-stream). A new outbox (the birth's
``outbox_instance`` changes, ``seq`` starts at 1) starts counting afresh; a ``seq`` 1 after higher ones starts it
afresh too for a device whose birth names no ``outbox_instance`` (else it is a repeat: a new outbox comes with a
new birth first). After the monitor's own reconnect what was published meanwhile never reached it: the first
``seq`` above the highest received opens no gap (what lies between is new once, should it come late), and what
was received before is still known, so a message the broker or the device sends again after the reconnect is a
repeat (:meth:`FleetView.resync`).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

from paho.mqtt.subscribeoptions import SubscribeOptions

from ..errors import RuntimeFailure, reader_gone
from ..ratelimit import LogLimiter
from . import payloads
from . import topics as _topics
from .client import connect_async, make_client, not_connected, reason_failed, reason_text, refused_text
from .settings import BrokerSettings, Protocol

log = logging.getLogger(__name__)
CLOCK_SKEW_S = 60.0   # a device whose clock differs from the monitor's by more is flagged (clock skew)


@dataclass
class DeviceRow:
    site: str
    device: str
    state: str = "unknown"            # online | offline | unknown (stale is derived when shown); removed: its
    #                                   retained status was cleared (decommission), the row given out once, gone
    reason: str | None = None         # connected | will | stopped
    last_seen: float | None = None    # unix time of the last message from the device
    version: str | None = None
    model_hash: str | None = None
    fps: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    ng_rate: float | None = None
    results: int = 0                  # results seen by this monitor, each (outbox, seq) once
    ng: int = 0
    last_result: dict | None = None   # {"ts", "score", "ng", "seq"} of the newest seq (not a late one)
    calibration_version: int | None = None
    threshold: float | None = None    # the one deciding: latest result / telemetry (else the calibration's)
    calibration_threshold: float | None = None   # the calibration's (a set_threshold without persist differs)
    outbox_depth: int | None = None
    outbox_dropped: int | None = None
    drift: bool | None = None
    paused: bool | None = None
    events: int = 0
    duplicates: int = 0               # results and events received again (at-least-once): not counted again
    results_missing: int = 0          # gaps in the results' seq that no output_error event explains
    events_missing: int = 0           # the same for events
    results_dropped: int = 0          # gaps in the results' seq the device announced as dropped (output_error)
    events_dropped: int = 0           # the same for events
    last_gap: dict | None = None      # {"kind", "from", "to", "missing", "dropped", "seen"}: the latest gap found
    outbox_instance: str | None = None
    clock_offset_s: float | None = None   # the device's clock minus this monitor's (telemetry and status, else results)
    _ng_from_telemetry: bool = field(default=False, repr=False)
    _heard: float | None = field(default=None, repr=False)       # receipt of the last live message (or the first)
    _offsets: list = field(default_factory=list, repr=False)     # ts - receipt of the last telemetry and status
    _result_times: list = field(default_factory=list, repr=False)   # (ts, receipt) of the last new results
    _seq: dict = field(default_factory=dict, repr=False)     # kind -> highest seq received
    _gaps: list = field(default_factory=list, repr=False)    # [kind, first, last, gap's first, gap's last] missing,
    #                                                          still open (a late one fills it)
    _announced: list = field(default_factory=list, repr=False)   # [kind, first, last] announced, no gap seen yet
    # [kind, first, last] below the first seq of this count (it began mid-stream): never received, and no gap
    _unseen: list = field(default_factory=list, repr=False)
    # [kind, first, last, gap's first, gap's last, until]: a fresh gap's part not announced yet, counted nowhere
    # until its announcement comes (dropped), a late message fills it, or the grace period ends (missing)
    _held: list = field(default_factory=list, repr=False)
    # kinds whose next seq above the highest is the first since this monitor's own reconnect: what lies between
    # was published while it was away (never received, no gap), like what lies below the first seq of a count
    _resumed: set = field(default_factory=set, repr=False)
    _stale: bool = field(default=False, repr=False)   # whether it was stale when last given out (consume, settle)

    def _forget_seq(self) -> None:
        self._seq.clear()
        self._gaps.clear()
        self._announced.clear()
        self._held.clear()
        self._unseen.clear()
        self._resumed.clear()

    def _count(self, kind: str, missing: int = 0, dropped: int = 0) -> None:
        if kind == "result":
            self.results_missing += missing
            self.results_dropped += dropped
        else:
            self.events_missing += missing
            self.events_dropped += dropped

    @property
    def missing(self) -> int:
        return self.results_missing + self.events_missing

    @property
    def dropped(self) -> int:
        return self.results_dropped + self.events_dropped

    @property
    def key(self) -> tuple[str, str]:
        return self.site, self.device

    @property
    def telemetry_ng_rate(self) -> float | None:
        """The NG rate of the device's last telemetry interval (its ``ng_rate``); None until telemetry gave one
        (``ng_rate`` is then counted from the results seen, ``ng`` of ``results``)."""
        return self.ng_rate if self._ng_from_telemetry else None

    def shown_state(self, now: float, stale_after_s: float) -> str:
        """``stale``: online, but nothing received from it for ``stale_after_s`` (receipt times only: a
        retained birth's ``ts`` is when it connected, and a device's skewed clock must not make it look stale)."""
        if self.state == "online" and self._heard is not None and now - self._heard > stale_after_s:
            return "stale"
        return self.state

    def clock_skewed(self, bound_s: float = CLOCK_SKEW_S) -> bool:
        return self.clock_offset_s is not None and abs(self.clock_offset_s) > bound_s

    def to_dict(self, now: float | None = None, stale_after_s: float = 60.0,
                clock_skew_s: float = CLOCK_SKEW_S) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        if now is not None:
            d["state"] = self.shown_state(now, stale_after_s)
        d["last_seen"] = _iso(self.last_seen)
        d["clock_skew"] = self.clock_skewed(clock_skew_s)
        return d


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(value: Any) -> float | None:
    """A finite number from a payload field, else None (NaN, 1e400 and ints beyond float are not shown)."""
    return payloads.finite_number(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return int(value)


MAX_OPEN_GAPS = 64    # per device: a message that comes later than this many gaps is counted as missing (a repeat)
GAP_GRACE_S = 5.0     # a gap's part not announced yet waits this long for the device's announcement (output_error)
MAX_ANNOUNCED = 64    # per device: seq ranges announced as dropped before their gap was seen (the oldest go)
SEQ_RANGES_READ = 100  # of an output_error's dropped seq ranges per kind (the device lists 20 at most)
CLOCK_SAMPLES = 5     # a device's clock offset: the largest ts - receipt of its last fresh messages


def _cut(ranges: list, kind: str, lo: int, hi: int) -> tuple[list[list], list[tuple[int, int]]]:
    """Take ``lo..hi`` of ``kind`` out of ``ranges`` (``[kind, first, last, *more]`` each, changed in place; a
    range cut in two keeps its ``more`` in both parts): the parts it held (``[kind, first, last, *more]``), and
    the parts of ``lo..hi`` it did not hold."""
    taken = []
    for r in list(ranges):
        k, a, b, *more = r
        if k != kind or b < lo or a > hi:
            continue
        a2, b2 = max(a, lo), min(b, hi)
        taken.append([k, a2, b2, *more])
        ranges.remove(r)
        if a < a2:
            ranges.append([k, a, a2 - 1, *more])
        if b2 < b:
            ranges.append([k, b2 + 1, b, *more])
    rest, at = [], lo
    for _, a, b, *_more in sorted(taken, key=lambda t: t[1]):
        if at < a:
            rest.append((at, a - 1))
        at = b + 1
    if at <= hi:
        rest.append((at, hi))
    return taken, rest


def _size(ranges: list) -> int:
    """How many ``seq`` the ``[kind, first, last, ...]`` ranges hold."""
    return sum(r[2] - r[1] + 1 for r in ranges)


class FleetView:
    def __init__(self, clock: Callable[[], float] = time.time, stale_after_s: float = 60.0,
                 clock_skew_s: float = CLOCK_SKEW_S, gap_grace_s: float = GAP_GRACE_S):
        self.clock = clock
        self.stale_after_s = stale_after_s
        self.clock_skew_s = clock_skew_s
        self.gap_grace_s = gap_grace_s
        self.devices: dict[tuple[str, str], DeviceRow] = {}
        self._gap_log = LogLimiter()   # per device: the first gap at once, then at most one line a minute
        self._skew_log = LogLimiter()  # per device: at most one clock skew WARNING a minute

    def resync(self) -> None:
        """This monitor reconnected to the broker: what was published while it was away never reached it, and is
        nobody's loss. Each device's next ``seq`` above the highest received opens no gap: what lies between is
        unseen (each new once, should it come late), as below the first ``seq`` of a count. What it received
        before stays known, so a message received again after the reconnect (the device sends again what the
        broker had not acknowledged to it, e.g. after a broker restart) is a repeat, not counted twice; the
        gaps seen before wait out their grace period as before."""
        for row in self.devices.values():
            row._resumed.update(row._seq)

    def _forget(self, row: DeviceRow) -> None:
        self._release_due(row, 0.0, final=True)
        row._forget_seq()

    def settle(self, final: bool = False) -> list[DeviceRow]:
        """Count as missing, and warn of, the parts of gaps held for their announcement longer than
        ``gap_grace_s`` (``final``: all of them, at the stop: nothing more will explain them), and log the missing
        messages the once-a-minute WARNING held back once that minute is over (``final``: at once), so the log
        accounts for every one, also when no later gap reports them. Call it on a timer and at the stop:
        :meth:`consume` ends the grace periods only of the device whose message it applies, and a device that
        falls silent sends nothing to turn it ``stale``. Returns the rows changed: those with gaps counted, and
        those whose shown state turned ``stale`` or back since :meth:`consume` or this last gave them out,
        each once per change."""
        now = self.clock()
        changed = []
        for row in self.rows():
            released = self._release_due(row, now, final)
            if self._stale_turned(row, now) or released:
                changed.append(row)
        for key, n in self._gap_log.flush(force=final).items():
            row = self.devices.get(tuple(key.split("/", 1)))
            log.warning("monitor: %s: %d more result(s) and event(s) missing since the last report%s", key, n,
                        "" if row is None else f", {row.results_missing} results and {row.events_missing} events "
                        "in all")
        return changed

    def _stale_turned(self, row: DeviceRow, now: float) -> bool:
        """Whether the row turned ``stale`` (or back) since it was last given out; notes that it is given out now."""
        stale = row.shown_state(now, self.stale_after_s) == "stale"
        turned, row._stale = stale != row._stale, stale
        return turned

    def _release_due(self, row: DeviceRow, now: float, final: bool = False) -> bool:
        due = [h for h in row._held if final or h[5] <= now]
        if due:
            self._release(row, due)
        return bool(due)

    def consume(self, topic: str, payload: bytes | str, retained: bool = False) -> DeviceRow | None:
        """Apply one message; returns the row it changed, or None when the message is not for a row.
        A ``retained`` message was kept by the broker: it is not a sign of life now (see :meth:`_seen_at`).
        An empty ``status`` (its retained status cleared: ``edge-ad decommission``) removes the device's row:
        returned once more with state ``removed`` (its gaps still held counted as missing), gone from :meth:`rows`."""
        parsed = _topics.parse(topic)
        if parsed is None:
            return None
        site, device, kind = parsed
        if kind not in ("status", "result", "event", "telemetry", "calibration"):
            return None                   # commands, replies, event images
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        key = (site, device)
        if kind == "status" and not raw:   # retained status cleared: the device is gone
            row = self.devices.pop(key, None)
            if row is not None:
                self._forget(row)
                row.state, row.reason, row.paused = "removed", None, None
            return row
        body: Any
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            text = raw.decode("utf-8", errors="replace").strip().lower()
            body = {"state": text} if kind == "status" and text in ("online", "offline") else None
        if not isinstance(body, dict):
            return None
        row = self.devices.get(key)
        if row is None:
            row = self.devices[key] = DeviceRow(site, device)
        now = self.clock()
        self._release_due(row, now)       # the gaps whose grace period is over: missing
        repeat, newest = False, True
        if kind in ("result", "event"):
            seq, before = _int(body.get("seq")), row._seq.get(kind)
            repeat = not self._check_seq(row, kind, seq, now)
            if self.gap_grace_s <= 0:     # no grace period: the gap just seen is due now (with one, it is not)
                self._release_due(row, now)
            new = seq is not None and seq != before and row._seq.get(kind) == seq   # not a repeat, not a late one
            newest = new or seq is None or seq < 1      # a late one (it fills a gap) only counts; no seq: cannot tell
            if kind == "result" and new and not retained and not row._offsets:
                self._check_clock_from_result(row, payloads.parse_time(body.get("ts")), now)
        if repeat:
            row.duplicates += 1           # received before: counted once (results, NG, events), shown as it was
        elif kind == "result":
            self._on_result(row, body, newest)
        else:
            getattr(self, f"_on_{kind}")(row, body)
        if kind == "event" and body.get("type") == "output_error" and not repeat:
            self._announced_drops(row, body.get("dropped"))
        elif kind == "status" and body.get("state") == "online":   # a birth names the full outbox's drops first
            self._announced_drops(row, body.get("dropped_pending"))
        seen = self._seen_at(kind, body, retained, now)
        if seen is not None and (row.last_seen is None or seen > row.last_seen):
            row.last_seen = min(seen, now)
        if not retained or row._heard is None:
            row._heard = now
        if not retained and kind in ("telemetry", "status"):
            self._check_clock(row, payloads.parse_time(body.get("ts")), now)
        self._stale_turned(row, now)      # given out now, as it shows (settle tells when that changes)
        return row

    def _check_clock(self, row: DeviceRow, ts: float | None, now: float) -> None:
        """Estimate the device's clock offset from a message it sent just now: telemetry and status are
        published as they are made (never stored, never re-sent later), so ``ts - receipt`` is the offset
        less the message's delay; the largest over the last :data:`CLOCK_SAMPLES` is the estimate (results
        and events may come from the outbox long after they were made: results are used only for a device that
        sends neither, :meth:`_check_clock_from_result`)."""
        if ts is None:
            return
        row._offsets = (row._offsets + [ts - now])[-CLOCK_SAMPLES:]
        self._set_clock(row, max(row._offsets))

    def _check_clock_from_result(self, row: DeviceRow, ts: float | None, now: float) -> None:
        """A device this monitor hears no telemetry or status from (an ACL, a subscription to its results only):
        the offset from its new results (the newest ``seq`` so far), ``ts - receipt``, the largest over the last
        :data:`CLOCK_SAMPLES`. A result may come from the outbox's backlog, long after it was made: its sample is
        the offset less that delay. So a clock ahead is flagged at once (nothing arrives before it is made), and
        one behind only from results that came at the pace they were made (two or more, their arrival spread at
        least half their ``ts`` spread): a backlog sent after a reconnect arrives much faster than it was made,
        and its old ``ts`` says nothing of the clock."""
        if ts is None:
            return
        row._result_times = (row._result_times + [(ts, now)])[-CLOCK_SAMPLES:]
        offset = max(t - r for t, r in row._result_times)
        if offset < -self.clock_skew_s:
            (t0, r0), (t1, r1) = row._result_times[0], row._result_times[-1]
            if len(row._result_times) < 2 or r1 - r0 < (t1 - t0) / 2:
                return                    # one result, or a backlog catching up: not a clock
        self._set_clock(row, offset)

    def _set_clock(self, row: DeviceRow, offset: float) -> None:
        row.clock_offset_s = round(offset, 1)
        if row.clock_skewed(self.clock_skew_s) and self._skew_log.hit(f"{row.site}/{row.device}"):
            off = row.clock_offset_s
            log.warning("monitor: %s/%s: clock skew %+.0f s: its clock is %.0f s %s this monitor's (its messages' ts "
                        "against their arrival; flagged beyond %g s), and its results, events and telemetry carry "
                        "that time; synchronize its clock (NTP: see jetson/README.md, 'Time') or this monitor's",
                        row.site, row.device, off, abs(off), "ahead of" if off > 0 else "behind",
                        self.clock_skew_s)

    def _seen_at(self, kind: str, body: dict, retained: bool, now: float) -> float | None:
        """When this message says the device was last alive, None when it says nothing about it.

        A message that arrives live comes from the device now, but for the last will, which the broker
        sends for it (no ``ts``): the device was last seen at its messages before. A retained message was
        kept by the broker: only the retained ``status`` tells, by its own ``ts``, when the device was last
        alive (the birth: when it connected; a clean stop: when it stopped; the will has none). A retained
        ``calibration`` carries when that calibration was published (at the process start or a change), which
        says nothing about when the device stopped. A retained ``ts`` more than ``clock_skew_s`` ahead of this
        monitor's clock was written by a clock that is ahead: it says nothing either (a device stopped half an
        hour ago with a clock an hour ahead read "0s ago")."""
        if kind == "status" and body.get("state") != "online" and body.get("ts") is None:
            return None                    # the will
        if not retained:
            return now
        ts = payloads.parse_time(body.get("ts")) if kind == "status" else None
        return ts if ts is not None and ts <= now + self.clock_skew_s else None

    # ------------------------------------------------------------------ seq gaps
    def _check_seq(self, row: DeviceRow, kind: str, seq: int | None, now: float) -> bool:
        """Count the gap ``seq`` leaves or fills; False when this message was received before (a repeat: QoS 1
        is at least once, and a device sends its unacknowledged messages again after a reconnect), True when it
        is new (or has no ``seq``: it cannot tell)."""
        if seq is None or seq < 1:
            return True
        last = row._seq.get(kind)
        if last is None or (seq == 1 and last > 1 and row.outbox_instance is None):
            # the first one seen (those before it never reached this monitor: each is new once), or, for a device
            # whose birth names no outbox_instance, a new outbox file (seq starts again; a device re-sending its
            # backlog re-sends it in order, so 1 again is followed by 2, 3, ...). Knowing the instance, a new
            # file comes with a new birth first (_on_status), and 1 again is a repeat.
            row._unseen[:] = [u for u in row._unseen if u[0] != kind] + ([[kind, 1, seq - 1]] if seq > 1 else [])
            row._seq[kind] = seq
            row._resumed.discard(kind)
            return True
        if seq <= last:               # a repeat, or a late one that closes its gap, or one from before the count
            if self._fills(row, kind, seq):
                return True
            before = bool(_cut(row._unseen, kind, seq, seq)[0])
            del row._unseen[:-MAX_OPEN_GAPS]
            return before
        row._seq[kind] = seq
        gap = seq - last - 1
        resumed = kind in row._resumed    # the first above the highest since this monitor's reconnect
        row._resumed.discard(kind)
        if not gap:
            return True
        announced, unexplained = _cut(row._announced, kind, last + 1, seq - 1)   # announced before the gap
        row._announced[:] = [a for a in row._announced if a[0] != kind or a[1] > seq]
        dropped = _size(announced)
        row._count(kind, 0, dropped)
        if resumed:                       # published while this monitor was away: unseen, no gap
            row._unseen.extend([kind, lo, hi] for lo, hi in unexplained)
            del row._unseen[:-MAX_OPEN_GAPS]
            return True
        row.last_gap = {"kind": kind, "from": last + 1, "to": seq - 1, "missing": 0, "dropped": dropped,
                        "held": gap - dropped, "seen": _iso(now)}
        # the device announces its drops in an output_error event that comes after the gap is seen (a second or
        # so later): the rest waits for it, counted nowhere, for gap_grace_s
        row._held.extend([kind, lo, hi, last + 1, seq - 1, now + self.gap_grace_s] for lo, hi in unexplained)
        if len(row._held) > MAX_OPEN_GAPS:
            self._release(row, row._held[:-MAX_OPEN_GAPS])
        return True

    def _release(self, row: DeviceRow, held: list) -> None:
        """The grace period of these ``held`` parts is over: count them as missing, open (a late message still
        fills them), and warn, one line per gap (the first at once, then at most one line a minute per device)."""
        gaps: dict[tuple, list] = {}
        for h in list(held):
            row._held.remove(h)
            gaps.setdefault((h[0], h[3], h[4]), []).append(h[:5])
        for (kind, first, last), parts in gaps.items():
            missing = _size(parts)
            row._count(kind, missing)
            self._note_gap(row, kind, first, last, missing=missing, held=-missing)
            row._gaps.extend(parts)
            del row._gaps[:-MAX_OPEN_GAPS]
            since = self._gap_log.hit(f"{row.site}/{row.device}", missing)
            if since:
                # the parts still missing, not the whole gap: a late message may have filled some of it meanwhile
                lost = ", ".join(f"{a}" if a == b else f"{a}..{b}" for _, a, b, *_ in sorted(parts, key=lambda p: p[1]))
                whole = "" if lost == f"{first}..{last}" or (first == last and lost == f"{first}") else \
                    f" (of the gap {first}..{last}, the rest arrived late or was announced)"
                log.warning("monitor: %s/%s: %s seq %s%s never arrived, %d of them not announced by the device "
                            "within %g s (%d missing since the last report, %d results and %d events in all): lost "
                            "between the device and this monitor, e.g. by the broker (Mosquitto's "
                            "max_queued_messages: see docs/mqtt.md, 'The broker'), or dropped by the device and "
                            "announced in an output_error event that did not reach this monitor in time (or named by "
                            "id only, by an older device)", row.site, row.device, kind, lost, whole, missing,
                            self.gap_grace_s, since, row.results_missing, row.events_missing)

    @staticmethod
    def _note_gap(row: DeviceRow, kind: str, first: int, last: int, **change: int) -> None:
        """``last_gap``'s counts follow its parts (held, announced, missing once held long enough, filled by a late
        message) while it is the latest gap."""
        g = row.last_gap
        if g is not None and (g["kind"], g["from"], g["to"]) == (kind, first, last):
            for k, n in change.items():
                g[k] += n

    def _announced_drops(self, row: DeviceRow, dropped: Any) -> None:
        """An ``output_error`` event's ``dropped``: the ``seq`` ranges of the results and events the device
        dropped on purpose. The parts of a gap held for it are counted as dropped, those of an open gap (held
        longer than the grace period) are moved from missing to dropped; the parts above the highest ``seq``
        received wait for their gap (at most :data:`MAX_ANNOUNCED` ranges); the rest were received (a repeat),
        or lie before this monitor's count began."""
        if not isinstance(dropped, dict):
            return
        for kind in ("result", "event"):
            k = dropped.get(kind)
            ranges = k.get("seq") if isinstance(k, dict) else None
            if not isinstance(ranges, list):
                continue
            for r in ranges[:SEQ_RANGES_READ]:
                lo, hi = (_int(r[0]), _int(r[1])) if isinstance(r, list) and len(r) == 2 else (None, None)
                if lo is None or hi is None or not 1 <= lo <= hi:
                    continue
                for ranges, was in ((row._gaps, "missing"), (row._held, "held")):
                    for part in _cut(ranges, kind, lo, hi)[0]:
                        n = _size([part])
                        row._count(kind, -n if was == "missing" else 0, n)
                        self._note_gap(row, kind, part[3], part[4], **{was: -n, "dropped": n})
                last = row._seq.get(kind)
                if last is None or hi > last:   # once: a birth names its pending drops again at each connect
                    lo = lo if last is None else max(lo, last + 1)
                    _cut(row._announced, kind, lo, hi)
                    row._announced.append([kind, lo, hi])
            del row._announced[:-MAX_ANNOUNCED]

    def _fills(self, row: DeviceRow, kind: str, seq: int) -> bool:
        """A message that arrives after later ones (a re-send) and lies in a gap: not missing after all (nor
        held). False when it lies in none: received before."""
        filled = False
        for ranges, was in ((row._gaps, "missing"), (row._held, "held")):
            for part in _cut(ranges, kind, seq, seq)[0]:
                row._count(kind, -1 if was == "missing" else 0)
                self._note_gap(row, kind, part[3], part[4], **{was: -1})
                filled = True
        return filled

    # ------------------------------------------------------------------ per kind
    def _on_status(self, row: DeviceRow, b: dict) -> None:
        instance = b.get("outbox_instance")
        if isinstance(instance, str) and b.get("state") == "online":
            if row.outbox_instance is not None and instance != row.outbox_instance:
                self._forget(row)         # a new outbox file: seq starts again at 1
            row.outbox_instance = instance
        state = b.get("state")
        row.state = state if state in ("online", "offline") else "unknown"
        row.reason = b.get("reason") if isinstance(b.get("reason"), str) else None
        if isinstance(b.get("version"), str):
            row.version = b["version"]
        if "model_hash" in b:
            row.model_hash = b["model_hash"] if isinstance(b["model_hash"], str) else None
        if row.state == "offline":   # stopped or died: not paused (the will carries no paused); the next birth says
            row.paused = None
        elif isinstance(b.get("paused"), bool):   # the birth's, re-published on pause / resume (retained)
            row.paused = b["paused"]
        cal = _int(b.get("calibration_version"))
        if cal is not None and row.calibration_version is None:
            row.calibration_version = cal

    @staticmethod
    def _on_telemetry(row: DeviceRow, b: dict) -> None:
        if row.state != "online":
            row.state = "online"          # telemetry flows only from a live device
        row.fps = _num(b.get("fps")) if "fps" in b else row.fps
        lat = b.get("latency_ms")
        if isinstance(lat, dict):
            row.latency_p50_ms = _num(lat.get("p50"))
            row.latency_p99_ms = _num(lat.get("p99"))
        rate = _num(b.get("ng_rate"))
        if rate is not None:
            row.ng_rate = rate
            row._ng_from_telemetry = True
        box = b.get("outbox")
        if isinstance(box, dict):
            row.outbox_depth = _int(box.get("depth"))
            row.outbox_dropped = _int(box.get("dropped"))
        drift = b.get("drift")
        if isinstance(drift, dict) and isinstance(drift.get("drift"), bool):
            row.drift = drift["drift"]
        elif isinstance(drift, bool):
            row.drift = drift
        if isinstance(b.get("paused"), bool):
            row.paused = b["paused"]
        cal = _int(b.get("calibration_version"))
        if cal is not None:
            row.calibration_version = cal
        row.threshold = _num(b.get("threshold")) if "threshold" in b else row.threshold

    @staticmethod
    def _on_result(row: DeviceRow, b: dict, newest: bool = True) -> None:
        """Count the result; only the ``newest`` (the highest ``seq`` of its outbox so far, not a late one that
        fills a gap) is shown: the last result, its threshold and calibration version."""
        row.results += 1
        ng = b.get("ng") is True
        row.ng += int(ng)
        if not row._ng_from_telemetry:
            row.ng_rate = row.ng / row.results
        if not newest:
            return
        ts = b.get("ts") if isinstance(b.get("ts"), str) else _num(b.get("ts"))
        row.last_result = {"ts": ts, "score": _num(b.get("score")), "ng": ng, "seq": _int(b.get("seq"))}
        lat = _num(b.get("latency_ms"))
        if lat is not None and row.latency_p50_ms is None:
            row.latency_p50_ms = lat
        cal = _int(b.get("calibration_version"))
        if cal is not None:
            row.calibration_version = cal
        row.threshold = _num(b.get("threshold")) if "threshold" in b else row.threshold

    @staticmethod
    def _on_event(row: DeviceRow, b: dict) -> None:
        row.events += 1

    @staticmethod
    def _on_calibration(row: DeviceRow, b: dict) -> None:
        version = _int(b.get("version"))
        row.calibration_threshold = _num(b.get("threshold"))
        if "threshold_in_force" in b:   # the device says what decides (re-published when it changes)
            row.threshold = _num(b.get("threshold_in_force"))
        # older devices: a new calibration decides from now on; the same one again (retained, after a
        # reconnect) does not undo a set_threshold without persist that results and telemetry report
        elif row.threshold is None or version != row.calibration_version:
            row.threshold = row.calibration_threshold
        row.calibration_version = version

    # ------------------------------------------------------------------ output
    def rows(self) -> list[DeviceRow]:
        return [self.devices[k] for k in sorted(self.devices)]

    def table(self) -> str:
        return render_table(self.rows(), self.clock(), self.stale_after_s, self.clock_skew_s)


COLUMNS = ("SITE", "DEVICE", "STATE", "FPS", "LAT p50/p99 ms", "NG %", "LAST RESULT", "CAL", "OUTBOX", "MISSING",
           "DROPPED", "DRIFT", "SEEN", "CLOCK")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render_table(rows: list[DeviceRow], now: float, stale_after_s: float = 60.0,
                 clock_skew_s: float = CLOCK_SKEW_S) -> str:
    """A plain-text table, one line per device (no colour codes, so it is safe in logs)."""
    lines = [COLUMNS]
    for r in rows:
        last = "-"
        if r.last_result is not None:
            last = f"{'NG' if r.last_result['ng'] else 'OK'} {_fmt(r.last_result['score'], '.3f')}"
        outbox = "-" if r.outbox_depth is None else str(r.outbox_depth)
        if r.outbox_dropped:
            outbox += f" ({r.outbox_dropped} dropped)"
        seen = "-" if r.last_seen is None else f"{max(0.0, now - r.last_seen):.0f}s ago"
        state = r.shown_state(now, stale_after_s) + (" paused" if r.paused else "")
        lat = f"{_fmt(r.latency_p50_ms, '.1f')}/{_fmt(r.latency_p99_ms, '.1f')}"
        lines.append((r.site, r.device, state, _fmt(r.fps, '.1f'), lat,
                      _fmt(None if r.ng_rate is None else 100 * r.ng_rate, '.2f'), last,
                      "-" if r.calibration_version is None else str(r.calibration_version), outbox,
                      str(r.missing), str(r.dropped), {True: "DRIFT", False: "ok", None: "-"}[r.drift], seen,
                      "-" if r.clock_offset_s is None else
                      f"skew {r.clock_offset_s:+.0f}s" if r.clock_skewed(clock_skew_s) else "ok"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _clock_time(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def stamp_line(t: float) -> str:
    """The line before each table the monitor prints off a terminal: when it was printed (ISO 8601, UTC)."""
    return f"-- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t))} --"


def broker_line(down_since: float | None) -> str:
    """The table's note on the monitor's own connection: empty while connected."""
    if down_since is None:
        return ""
    return f"DISCONNECTED from broker since {_clock_time(down_since)}, reconnecting (rows show what was last seen)"


def run_monitor(broker: BrokerSettings, *, site: str | None = None, as_json: bool = False,
                duration: float | None = None, interval: float = 1.0, stale_after_s: float = 60.0,
                out: TextIO | None = None, live: bool | None = None, connect_timeout: float = 10.0,
                stop: threading.Event | None = None, clock_skew_s: float = CLOCK_SKEW_S,
                gap_grace_s: float = GAP_GRACE_S) -> FleetView:
    """Watch the fleet until ``duration`` s pass (forever when None), ``stop`` is set, or Ctrl-C. The first
    connection to the broker counts in ``duration`` and waits at most ``connect_timeout`` s (or ``duration``):
    then a :class:`RuntimeFailure` names the broker and why (:func:`~edge_ad.mqtt.client.not_connected`).

    ``as_json``: one JSON line per device update on ``out``, and one when a device turns ``stale`` (silent for
    ``stale_after_s``: seen within ``interval`` s), its next message's line saying it is back; a device whose
    retained status is cleared (``edge-ad decommission``) gets a last line with state ``removed``. Otherwise a
    table: redrawn in place every ``interval`` s when ``live`` (default: ``out`` is a terminal); else (a log, a
    pipe) printed after each change (a device turning ``stale`` too), at most every ``interval`` s, so that a
    reader following the log sees the fleet as it goes, and, when a ``duration`` is given, once more when the run
    ends (the fleet then); each such table after a line with the time it was printed (:func:`stamp_line`:
    ``-- 2026-12-07T03:01:32Z --``, UTC).

    When the monitor loses the broker it reconnects by itself and says so: the table gets a
    ``DISCONNECTED from broker since HH:MM:SS`` line, ``as_json`` writes ``{"monitor": "disconnected", ...}``
    and then ``{"monitor": "reconnected", ...}``; after the reconnect it subscribes again, and the broker
    sends the retained status and calibration of every device again.

    A gap in a device's ``seq`` waits ``gap_grace_s`` for the device's announcement before it counts as missing
    (:meth:`FleetView.settle`, every ``interval`` s; at the end those still held count as missing, and the
    missing messages the once-a-minute WARNING held back are logged).

    When the reader of ``out`` closes it (``edge-ad monitor --json | head -1``, a consumer that exited) the
    monitor stops at once and raises the BrokenPipeError, also when nothing more was to be written (the closed
    pipe is seen within ``interval`` s): every line from then on would be lost.
    """
    out = out or sys.stdout
    live = out.isatty() if live is None else live
    view = FleetView(stale_after_s=stale_after_s, clock_skew_s=clock_skew_s, gap_grace_s=gap_grace_s)
    lock = threading.Lock()
    connected = threading.Event()
    problem: list[str] = []
    dirty = threading.Event()
    stop = stop or threading.Event()
    down: dict[str, Any] = {"since": None, "stopping": False}   # the monitor's own link to the broker
    gone: list[BrokenPipeError] = []   # the reader of ``out`` closed it: the monitor stops (raised at the end)

    def emit(line: dict) -> None:   # one JSON line, from paho's thread (under lock)
        if gone:
            return
        try:
            out.write(json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n")
            out.flush()
        except BrokenPipeError as exc:   # not one error per message: the main loop stops and raises it
            gone.append(exc)
            stop.set()
            dirty.set()

    def log_table(end: str) -> None:   # off a terminal: when, the monitor's own connection, the table
        with lock:
            text, note_line = view.table(), broker_line(down["since"])
        out.write(stamp_line(time.time()) + "\n" + (f"{note_line}\n" if note_line else "") + text + end)
        out.flush()

    def note(state: str, **extra) -> None:   # a JSON line about the monitor's connection (under lock)
        if as_json:
            emit({"monitor": state, "broker": broker.safe_url, "ts": _iso(time.time()), **extra})

    def settle(final: bool = False) -> bool:   # held gaps whose grace is over (final: all) become missing
        with lock:
            changed = view.settle(final)
            if as_json:
                for row in changed:
                    emit(row.to_dict(view.clock(), stale_after_s, clock_skew_s))
        return bool(changed)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_failed(reason_code):
            problem.append(refused_text(broker, reason_code))
            return
        filt = _topics.fleet_filter(site)
        if broker.protocol == Protocol.V5:
            client.subscribe(filt, options=SubscribeOptions(qos=1))
        else:
            client.subscribe(filt, qos=1)
        with lock:
            since = down["since"]
            if since is not None:
                down["since"] = None
                view.resync()             # what was published meanwhile never reached us: no device's loss
                log.warning("monitor: reconnected to %s", broker.safe_url)
                note("reconnected", since=_iso(since), down_s=round(time.time() - since, 3))
        dirty.set()
        connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        with lock:
            if down["stopping"] or down["since"] is not None or not connected.is_set():
                return
            down["since"] = time.time()
            log.warning("monitor: disconnected from %s (%s); reconnecting", broker.safe_url,
                        reason_text(reason_code))
            note("disconnected", since=_iso(down["since"]), reason=reason_text(reason_code))
        dirty.set()

    def on_message(client, userdata, message):
        try:   # an exception here would end paho's network thread: the view would freeze silently
            with lock:
                row = view.consume(message.topic, message.payload, retained=bool(message.retain))
                if row is None:
                    return
                if as_json:
                    emit(row.to_dict(view.clock(), stale_after_s, clock_skew_s))
            dirty.set()
        except Exception:
            log.exception("monitor: message on %s ignored", message.topic)

    client = make_client(broker, f"edge-ad-monitor-{uuid.uuid4().hex[:10]}", persistent=False, jitter=False)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    connect_async(client, broker, clean_start=True)
    client.loop_start()
    try:
        t0 = time.monotonic()
        wait = connect_timeout if duration is None else min(connect_timeout, duration)   # the run, connect included
        while not connected.wait(0.1):
            if problem:
                raise RuntimeFailure(f"monitor: {problem[0]}")
            if time.monotonic() - t0 > wait:
                raise not_connected(client, broker, "monitor", wait)
        end = None if duration is None else t0 + duration
        last_draw = float("-inf")
        pending = False
        while (end is None or time.monotonic() < end) and not stop.is_set():
            wait = interval if end is None else max(0.0, min(interval, end - time.monotonic()))
            if dirty.wait(wait):
                dirty.clear()
                pending = True
            pending = settle() or pending
            if not gone and reader_gone(out):   # closed while there was nothing to write
                gone.append(BrokenPipeError(errno.EPIPE, "the reader closed the monitor's output"))
            if gone:
                raise gone[0]
            if as_json:
                continue
            now = time.monotonic()
            since = now - last_draw
            if live and since >= 0.2 and (pending or since >= interval):
                with lock:
                    text, note_line = view.table(), broker_line(down["since"])
                out.write("\x1b[H\x1b[2J" + f"edge-ad monitor  {broker.safe_url}  {_iso(time.time())}\n"
                          + (f"{note_line}\n" if note_line else "") + "\n" + text + "\n")
                out.flush()
                last_draw, pending = now, False
            elif not live and pending and since >= interval:   # a log: a table after each change, as it comes
                log_table("\n\n")
                last_draw, pending = now, False
        if gone:
            raise gone[0]
    except KeyboardInterrupt:
        settle(final=True)
    else:
        settle(final=True)   # a gap still held: nothing more will explain it while this monitor runs
        if not as_json and not live and duration is not None:
            log_table("\n")
    finally:
        with lock:
            down["stopping"] = True
        client.disconnect()
        client.loop_stop()
    return view
