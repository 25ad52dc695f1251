"""Reporting: every decision to the outbox (MQTT ``result``) and the JSONL log; NG snapshots and events;
drift tracking. Runs on the pipeline's reporting thread, so a slow disk or broker never stalls inference
(the result queue between them absorbs bursts; the outbox write is a local SQLite insert). A failed
write (a full disk, a broken outbox) is counted per output in ``output_errors`` and never stops the loop.
A result goes to the outbox first (MQTT loses nothing), then to the JSONL log: the next start makes good a
kill between the two (:meth:`Reporter.restore_result_log`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import json
import logging
import threading
import time
from typing import Any, Callable, Optional

from ..errors import RuntimeFailure, name_text
from ..ratelimit import LogLimiter
from .decision import regions_for, upsample_one
from .outputs import JsonlLog, SnapshotStore
from .records import ResultItem
from .telemetry import LatencyWindow

log = logging.getLogger(__name__)
RECENT = 200   # decisions a new model's NG rate is compared with (those of the model in force)

class Reporter:
    def __init__(self, *, source_name: str, jsonl: Optional[JsonlLog] = None,
                 snapshots: Optional[SnapshotStore] = None, link=None, heatmap: bool = True,
                 event_image: bool = True, jpeg_quality: int = 90,
                 drift_factory: Callable[[Any], Any] | None = None, calibration=None,
                 on_event: Callable[[dict], None] | None = None,
                 on_reader_gone: Callable[[str], None] | None = None):
        self.source_name = source_name
        self.jsonl = jsonl
        self.snapshots = snapshots
        self.link = link
        self.heatmap = heatmap
        self.event_image = event_image
        self.jpeg_quality = int(jpeg_quality)
        self._drift_factory = drift_factory
        self._drift_lock = threading.Lock()
        self.drift = drift_factory(calibration) if (drift_factory and calibration is not None) else None
        self.drift_state = None
        self._drift_since: float | None = None   # unix time of the part that raised the drift flagged now
        self.health = None          # a HealthWatch after a model update (edge_ad.calibration)
        self.on_event = on_event or (lambda e: None)
        self.on_reader_gone = on_reader_gone   # (reason): the JSONL log is a pipe whose reader has gone
        self.latency = LatencyWindow()
        self.reported = 0
        self.ok = 0
        self.ng = 0
        self._count_lock = threading.Lock()   # ok and ng change together: counts() reads both at one instant
        self.recent_ng: collections.deque = collections.deque(maxlen=RECENT)   # NG of the latest decisions
        self.events = 0
        # failed writes per output (a full disk, a broken outbox): the decision went on to the other outputs
        self.output_errors = {"jsonl": 0, "outbox": 0, "snapshots": 0, "telemetry": 0}
        self._output_log = LogLimiter()   # per output: logged (and an event) at most once a minute
        self._output_why: dict[str, str] = {}   # per output: the last failure (for the report at the stop)
        self.last_result: dict | None = None

    # ------------------------------------------------------------------ drift
    def reset_drift(self, calibration, reason: str) -> None:
        """A new calibration (or model, or drift settings) is in force: drift is measured afresh against it
        (not at all when the factory is gone: drift disabled). When drift was flagged, a ``drift_cleared``
        event with ``reason`` says so (at once: this is no recovery to wait out), with how long the drift
        lasted: a consumer alarmed by ``drift`` would otherwise never hear the end."""
        self.recent_ng.clear()   # the decisions of what is in force now, not of the model or calibration before
        self._end_drift(self._drift_factory(calibration) if self._drift_factory is not None else None, reason,
                        calibration.version, f"drift tracking restarted ({reason}): scores are measured afresh "
                                             f"against calibration v{calibration.version}")

    def stop_drift(self, calibration, reason: str = "stopped") -> None:
        """The line stops (``calibration``: the one in force): drift tracking ends, and a drift flagged now is
        ended by a ``drift_cleared`` event with ``reason``, as :meth:`reset_drift` ends it; without it the
        episode stayed open for a consumer, and the next run, which measures afresh, could send a second
        ``drift`` before any ``drift_cleared``."""
        self._end_drift(None, reason, calibration.version,
                        f"drift tracking ended ({reason}) while drift was flagged; the next run measures afresh "
                        f"against its calibration")

    def _end_drift(self, monitor, reason: str, version: int, message: str) -> None:
        """Put ``monitor`` (None: no tracking) in place of the drift monitor; a drift flagged until now is ended
        by a ``drift_cleared`` event with ``reason``, ``calibration_version`` ``version`` and ``message``."""
        with self._drift_lock:
            old = self.drift_state
            flagged = old is not None and bool(old.drift)
            lasted = self._drift_lasted(old, time.time()) if flagged else {}
            self.drift = monitor
            self.drift_state = None
            self._drift_since = None
        if flagged:
            # no figures: tracking starts afresh, or ends; 'enabled': drift tracking is on in the settings
            ev = {"type": "drift_cleared", "reason": reason, "calibration_version": version, "drift": False,
                  "enabled": self._drift_factory is not None, **lasted, "message": message}
            log.warning("%s", ev["message"])
            self.event(ev)

    def drift_summary(self) -> dict[str, Any]:
        """``drift`` (bool) and the monitor's figures (z, shift, median, n, parts_in_drift, ...); while drift
        is flagged, ``since``: when it was raised."""
        st = self.drift_state
        if st is None:
            return {"drift": False, "enabled": self.drift is not None}
        out: dict[str, Any] = {}
        for k, v in st.to_dict().items():
            if k == "event" or v is None:
                continue
            out[k] = round(v, 6) if isinstance(v, float) else v
        out["drift"] = bool(st.drift)
        since = self._drift_since
        if st.drift and since is not None:
            from ..mqtt.payloads import iso_from_unix

            out["since"] = iso_from_unix(since)
        return out

    def _drift_lasted(self, state, now: float) -> dict[str, Any]:
        """How long the drift flagged in ``state`` lasted, until ``now`` (unix time): ``since``, ``duration_s``,
        ``parts_in_drift``."""
        from ..mqtt.payloads import iso_from_unix

        since = self._drift_since
        out: dict[str, Any] = {"parts_in_drift": state.parts_in_drift}
        if since is not None:
            out.update(since=iso_from_unix(since), duration_s=round(max(0.0, now - since), 3))
        return out

    def _update_drift(self, score: float, ng: bool, ts: float | None = None) -> None:
        """Add a decision (its score, NG, the frame's unix time ``ts``; default now) to the drift monitor; an
        event and a WARNING when the monitor raises or clears the flag, never otherwise (the monitor's
        hysteresis and ``clear_after`` make a flapping statistic one episode)."""
        ts = time.time() if ts is None else float(ts)
        with self._drift_lock:
            mon = self.drift
            if mon is None:
                return
            self.drift_state = state = mon.update(score, ng)
            if state.event is None:
                return
            lasted = self._drift_lasted(state, ts) if state.event == "drift_cleared" else {}
            self._drift_since = ts if state.drift else None
            summary = self.drift_summary()   # this state's (reset_drift may replace it once the lock is free)
        from ..calibration.drift import HYSTERESIS

        fig = f"z {state.z:+.2f}, shift {state.shift:+.2f} normal std"
        if state.basis == "ok":
            scores, check = "OK scores", ""
        else:   # fewer than half the parts OK: the monitor compares the median of all of them
            ng = "every part" if state.ng_rate >= 1.0 else f"{state.ng_rate:.0%} of the parts"
            scores = f"scores of all parts ({ng} NG in the window, too few OK ones to judge alone)"
            check = ("; a line gone (nearly) all NG may also be a blocked or moved camera or a run of defective "
                     "parts: look before recalibrating")
        if state.drift:
            ev = {"type": "drift", **summary,
                  "message": f"{scores} drifted away from the calibration's normal distribution ({fig}; limits: "
                             f"|z| > {state.limit:g} and |shift| >= {state.min_shift:g}): recalibrate (edge-ad "
                             f"calibrate or the MQTT calibrate command){check}"}
        else:
            ev = {"type": "drift_cleared", **summary, **lasted,
                  "message": f"{scores} are back within the calibration's normal distribution ({fig}; inside "
                             f"{HYSTERESIS:.0%} of the limits for {state.clear_after} parts in a row) after "
                             f"{state.parts_in_drift} parts in drift"
                             + (f" ({lasted['duration_s']:g} s)" if "duration_s" in lasted else "")}
        log.warning("%s", ev["message"])
        self.event(ev)

    # ------------------------------------------------------------------ events
    def event(self, payload: dict, jpeg: bytes | None = None) -> None:
        """A non-result event (source outage, drift, calibration change...): MQTT ``event`` and the log."""
        self.events += 1
        self.on_event(payload)
        if self.link is not None:
            try:
                self.link.publish_event(payload, jpeg=jpeg)
            except Exception as exc:  # an event must never stop the loop
                log.warning("could not queue event %s: %s", payload.get("type"), exc)

    # ------------------------------------------------------------------ failed outputs
    def _write(self, output: str, frame: int | None, write: Callable[[], Any]) -> bool:
        """Run one output's write (of ``frame``'s decision; None: of telemetry); a failure is counted and
        the loop goes on (False). Thread-safe per output."""
        try:
            write()
        except Exception as exc:  # a full disk or a broken outbox must not stop inspection
            self._output_failed(output, frame, exc)
            return False
        self._output_ok(output)
        return True

    def _output_ok(self, output: str) -> None:
        if self._output_log.clear(output):       # failing until now: say once that it works again
            log.warning("%s: writing again (%d failed write(s) in all)", output, self.output_errors[output])
            self.event({"type": "output_restored", "output": output, "failed_total": self.output_errors[output]})

    def _output_failed(self, output: str, frame: int | None, exc: BaseException) -> None:
        """Count a failed write; log it and publish an ``output_error`` event at most once a minute per
        output (with how many failed since: :class:`~edge_ad.ratelimit.LogLimiter`), never once per frame; what
        that holds back is reported at the stop (:meth:`report_held_failures`)."""
        self.output_errors[output] += 1
        if output == "jsonl" and isinstance(exc, BrokenPipeError) and self.on_reader_gone is not None:
            # `--jsonl /dev/stdout | consumer` and the consumer exited: every line from now on would be lost;
            # the run stops (the stop logs why), so no "inspection goes on" error
            self.on_reader_gone(f"the reader of the result log {self.jsonl.path} closed the pipe")
            return
        what = self._output_why[output] = f"{type(exc).__name__}: {exc}"
        since = self._output_log.hit(output)
        if not since:
            return
        log.error("%s: writing%s failed (%s); %d failed write(s) since the last report, %d in all; "
                  "inspection goes on (reported again in %.0f s at the earliest)", output,
                  "" if frame is None else f" frame {frame}", what, since,
                  self.output_errors[output], self._output_log.interval_s)
        ev = {"type": "output_error", "output": output, "error": what, "frame": frame, "failed": since,
              "failed_total": self.output_errors[output]}
        self.event({k: v for k, v in ev.items() if v is not None})

    # ------------------------------------------------------------------ results
    def wants_image(self, ng: bool, request=None) -> bool:
        """Whether a decision's image will become a JPEG (a snapshot file or an MQTT event image): only then
        does the pipeline keep the image on the result queue."""
        asked = request is not None and request.snapshot
        if not (ng or asked):
            return False
        publish = asked and request.publish
        return self.snapshots is not None or (self.link is not None and (self.event_image or publish))

    def _jpeg(self, item: ResultItem, label: str, full=None) -> bytes:
        from .. import viz

        d = item.decision
        req = item.request
        heat = req.heatmap if (req is not None and req.heatmap is not None) else self.heatmap
        if heat and (full is not None or item.combined is not None):
            if full is None:
                full = upsample_one(item.combined, item.image.shape[:2])
            return viz.overlay_jpeg(item.image, full, threshold=d.threshold, label=label,
                                    quality=self.jpeg_quality, max_side=max(item.image.shape[:2]))
        return viz.encode_jpeg(item.image, self.jpeg_quality)

    def report(self, item: ResultItem) -> dict:
        t0 = time.perf_counter()
        d = item.decision
        full = None
        if d.ng and item.combined is not None:
            # the regions of an NG frame: on the map upsampled to the inspected image, here on the reporting
            # thread (the queued item holds only the map at map resolution)
            full = upsample_one(item.combined, tuple(d.image_size))
            d = dataclasses.replace(d, regions=regions_for(item.combined, full, d.threshold, item.min_region_area,
                                                           item.max_regions))
        rec = d.to_dict()
        rec["source"] = self.source_name
        req = item.request
        want_snapshot = item.image is not None and (d.ng or (req is not None and req.snapshot))
        # the JPEG's caption: only for a frame whose picture may be made (not formatted for every OK frame)
        label = f"{'NG' if d.ng else 'OK'} {d.score:.3f} / {d.threshold:.3f}" if want_snapshot else ""
        jpeg = None
        encoded = False     # tried (a failure is counted once)
        if want_snapshot and self.snapshots is not None:
            try:
                encoded = True
                jpeg = self._jpeg(item, label, full)
                stamp = _dt.datetime.fromtimestamp(d.ts, _dt.timezone.utc).strftime("%Y%m%dT%H%M%S_%f")[:-3]
                name = f"{stamp}_{d.seq:08d}_{'NG' if d.ng else 'OK'}.jpg"
                rec["snapshot"] = name_text(self.snapshots.save(name, jpeg))
                self._output_ok("snapshots")
            except Exception as exc:  # a full disk must not stop inspection; the decision still goes out
                self._output_failed("snapshots", d.seq, exc)
        if req is not None and req.note:
            rec["note"] = req.note
        stored = self.link is not None and self._write("outbox", d.seq, lambda: self.link.publish_result(rec))
        if self.jsonl is not None:
            self._write("jsonl", d.seq, lambda: self.jsonl.write(rec))
        with self._count_lock:
            if d.ng:
                self.ng += 1
            else:
                self.ok += 1
        self.recent_ng.append(bool(d.ng))
        publish_snapshot = req is not None and req.snapshot and req.publish
        if stored and (d.ng or publish_snapshot):   # (not when the outbox has just refused the result)
            ev = {"type": "ng" if d.ng else "snapshot", "result_id": d.id, "frame": d.seq, "score": rec["score"],
                  "threshold": rec["threshold"], "regions": rec["regions"], "source": self.source_name,
                  "calibration_version": d.calibration_version}
            for k in ("part_id", "snapshot", "note"):
                if k in rec:
                    ev[k] = rec[k]
            self.events += 1
            with_image = want_snapshot and (self.event_image or publish_snapshot)
            not_due = False
            if with_image and not encoded:
                # made for the event alone: only when the link would send it (a JPEG per NG frame of an all-NG
                # line, nearly all of them rate-limited, was CPU spent for nothing)
                not_due = not self.link.image_due()
                if not not_due:
                    try:
                        jpeg = self._jpeg(item, label, full)
                    except Exception as exc:  # the event still goes out, without its image
                        self._output_failed("snapshots", d.seq, exc)
            image = jpeg if with_image else None
            outcome = req.image if publish_snapshot else None
            self._write("outbox", d.seq, lambda: self.link.publish_event(ev, jpeg=image, image_outcome=outcome,
                                                                         image_not_due=not_due))
        self._update_drift(d.score, d.ng, d.ts)
        if self.health is not None:
            self.health.record(ng=d.ng)
        self.reported += 1
        self.last_result = rec
        if req is not None:
            req.deliver(rec)
        self.latency.add((time.perf_counter() - t0) * 1000.0)
        return rec

    def counts(self) -> tuple[int, int]:
        """(OK, NG) decisions reported so far, read together: telemetry publishes these and derives its interval's
        NG rate from them, so a decision reported meanwhile is in both or in neither."""
        with self._count_lock:
            return self.ok, self.ng

    def restore_result_log(self) -> dict | None:
        """At start, before the first decision: a result is stored in the outbox before its JSONL line is
        written, so a kill (or a power cut) between the two left MQTT with a result the result log lacks. The
        outbox keeps its last result and the id of the one before (:meth:`~edge_ad.mqtt.outbox.Outbox.last_result`):
        when the log's last line is that one before, the missing line is appended (the result as sent, less
        the MQTT fields ``schema_version``, ``seq``, ``site``, ``device``), logged as a WARNING, and returned.
        Anything else is left as it is (the log already has it, or is another file, or lost more than one line
        to a power cut: nothing says where that line would go)."""
        outbox = getattr(self.link, "outbox", None)
        if self.jsonl is None or outbox is None or not self.jsonl.regular:   # a pipe: no line is known there
            return None
        try:
            last = outbox.last_result()
            if last is None:
                return None
            after, payload = last
            rec = json.loads(payload)
            logged = self.jsonl.last_record()
        except (OSError, ValueError, RuntimeFailure) as exc:   # never a reason not to start
            log.warning("%s: could not check it against the MQTT outbox's last result (%s)", self.jsonl.path, exc)
            return None
        logged_id = logged.get("id") if logged is not None else None
        if not isinstance(rec, dict) or rec.get("id") == logged_id or logged_id != after:
            return None
        for key in ("schema_version", "seq", "site", "device"):
            rec.pop(key, None)
        if not self._write("jsonl", rec.get("frame"), lambda: self.jsonl.write(rec)):
            return None
        log.warning("%s: appended result %s (frame %s, %s), which the MQTT outbox stored before the last stop but "
                    "whose line was not written (the run was killed between the two)", self.jsonl.path,
                    rec.get("id"), rec.get("frame"), rec.get("ts"))
        return rec

    def report_held_failures(self) -> None:
        """At the stop: the failed writes the once-a-minute report held back (:meth:`_output_failed`; no later
        failure reports them now), one ERROR and one ``output_error`` event per output, so the log and the events
        account for every one (as ``output_errors`` does)."""
        for output, n in self._output_log.flush(force=True).items():
            what = self._output_why.get(output, "unknown")
            log.error("%s: %d more failed write(s) since the last report (the last: %s), %d in all", output, n, what,
                      self.output_errors[output])
            self.event({"type": "output_error", "output": output, "error": what, "failed": n,
                        "failed_total": self.output_errors[output]})

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
