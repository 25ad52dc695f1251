"""``edge-ad run``: build the loop from validated settings, run it until stopped, shut down cleanly.

Build order is chosen so that every input error surfaces before a camera is opened: settings (already
validated), the source URI, the bundle (sha256 of every file), the backend, the calibration, the output
folders, the trigger. Then the MQTT link starts (it never blocks on a dead broker), the pipeline threads
start, and systemd hears ``READY=1``.

The main thread supervises: the camera watchdog, telemetry every ``telemetry.interval_s``, systemd
``WATCHDOG=1`` while the threads are healthy, ``--duration`` / ``--max-frames`` bounds, and signals.
SIGTERM / SIGINT stop the capture and drain both queues (every accepted frame is inspected and
reported), flush the outbox, publish the offline status, and exit 0. The drain ends at one deadline,
``pipeline.drain_timeout_s`` after the stop request (``Pipeline.abandon``: what is left is counted). A
second SIGINT aborts at once. SIGHUP reloads the bundle (a calibration or model changed on disk), and a
failed health check swaps the restored model back in, each on a thread of its own: a model swap may take a
minute, and the supervisor goes on meanwhile (watchdog, stop).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..bundle import Bundle, CalibrationHold
from ..config import Settings
from ..data.image import expect_trained_format, put_expected_format
from ..errors import EdgeADError, InputError, RuntimeFailure, os_error_text
from ..ratelimit import LogLimiter
from ..scoring import threshold_in_force
from .capture import Camera
from .commands import Commands
from .outputs import JsonlLog, SnapshotStore
from .pipeline import Pipeline
from .reporting import Reporter
from .sources import check_startup, open_source, parse_uri
from .systemd import Notifier
from .telemetry import STAGES, RateCounter, Telemetry
from .triggers import TriggerGate, load_trigger

log = logging.getLogger(__name__)

STATUS_VERSIONS = 20   # the newest calibration versions 'status' lists (a history holds thousands: --list has all)
ABANDON_GRACE_S = 0.5   # after the stop deadline: how long idle pipeline threads get to see the closed queues
SWAP_WAIT_S = 60.0     # a model swap waits this long for a batch still in the old backend before closing it
RELOAD_STOP_WAIT_S = 10.0   # a stop waits this long for a model change (SIGHUP reload, health rollback) still
#                             running on its thread before closing the backend


class LockedBackend:
    """One inference at a time on a shared backend: the loop and a recalibration may both infer, and a
    TensorRT execution context is not thread-safe. Everything else passes through."""

    def __init__(self, backend):
        self._backend = backend
        self._lock = threading.Lock()

    def infer(self, batch):
        with self._lock:
            return self._backend.infer(batch)

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def open_inspector(bundle: Bundle, settings: Settings, warn: bool = True):
    """Backend + Inspector for a bundle, as the settings ask. ``warn``: log a warning when what opened runs slower
    than FP32 would on this machine (FP16 on an x86 CPU: :func:`slower_than_fp32`; doctor says it its own way)."""
    from ..inspector import Inspector
    from .backends import open_backend
    from .backends.base import slower_than_fp32

    m = settings.model
    options: dict[str, Any] = {"max_batch": max(settings.pipeline.max_batch, 1)}
    if m.threads:
        options["threads"] = m.threads
    if m.thread_spinning is not None and m.backend in ("auto", "onnxruntime"):
        options["spinning"] = m.thread_spinning
    backend = LockedBackend(open_backend(bundle, m.backend, m.precision, m.device, **options))
    slow = slower_than_fp32(backend) if warn else None
    if slow:
        log.warning("%s; %s", *slow)
    try:
        return Inspector(bundle, backend)
    except BaseException:
        backend.close()
        raise


def _drift_factory(settings: Settings):
    if not settings.drift.enabled:
        return None
    from ..calibration import DriftMonitor

    d = settings.drift
    return lambda cal: DriftMonitor(cal, window=d.window, limit=d.limit, clear_after=d.clear_after)


def reload_text(done: dict) -> str:
    """A bundle reload's result (``Service.reload("bundle")["bundle"]``) in words, for the log."""
    if "model" not in done:   # a model swap
        return (f"model {done['previous_model_hash']} -> {done['model_hash']} ({done['bundle']}), calibration "
                f"v{done['calibration_version']}")
    if done.get("calibration") == "unchanged":
        return f"model and calibration v{done['calibration_version']} unchanged"
    if done["model"] == "refit":
        return (f"model refit {done['previous_model_hash']} -> {done['model_hash']} (the Gaussian statistics of "
                f"calibration v{done['calibration_version']}), calibration v{done['calibration_version']} in force")
    return f"model unchanged, calibration v{done['calibration_version']} in force"


class Service:
    def __init__(self, settings: Settings, *, max_frames: Optional[int] = None, duration: Optional[float] = None,
                 reload_settings=None, notifier: Notifier | None = None, install_signals: bool = True):
        self.settings = settings
        self.max_frames = max_frames
        self.duration = duration
        self._reload_settings = reload_settings     # () -> Settings, for 'reload config'
        self.notifier = notifier or Notifier()
        self.install_signals = install_signals
        self.link = None
        self.telemetry_log: JsonlLog | None = None
        self.pipeline: Pipeline | None = None
        self._stop_signal: str | None = None
        self.finished = False   # set once run() has stopped everything and made its summary
        self._hup = False
        # the model change running beside the supervisor (_in_background: a SIGHUP reload, a health rollback),
        # what it is, and its unexpected error, raised by the supervisor
        self._change_thread: threading.Thread | None = None
        self._change_what = ""
        self._change_error: BaseException | None = None
        self._signals = 0
        self._events_lock = threading.Lock()
        self.events: list[dict] = []       # the last events (for 'status')
        self.started_wall = time.time()
        self._t0 = time.monotonic()
        self._swap_lock = threading.Lock()
        self._health_waiting = None   # the HealthWatch whose rollback waits for the deploy lock, once said
        # held while a model switch replaces the health watch (update_model, reload): the loop's _check_health
        # skips its turn then, so the watch replaced is neither judged nor announced a second time
        self._health_lock = threading.Lock()
        self._health_log = LogLimiter()   # an error of the health check, polled ten times a second: once a minute
        # calibration.d/.held-*: the calibration version this run decides with, recorded while run() runs, so that
        # 'edge-ad calibrate --prune' keeps it after a calibration written beside the line (not reloaded yet)
        self._hold = None
        self.transient_threshold: float | None = None  # set_threshold {persist: false}, until a calibration swap
        self.override_under_transient: float | None = None  # the override it replaced: back on that swap
        self._build()

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        s = self.settings
        why = s.trigger_problem()   # load_settings refuses it first, naming where each value came from
        if why is not None:         # (settings made otherwise: before the model opens or a file is made)
            raise InputError(why)
        self.spec = parse_uri(s.source.uri)
        check_startup(self.spec)
        self._check_outbox_left_behind()
        self._startup_rollback: dict | None = None
        self.bundle, self.inspector = self._open_model()
        try:
            self._warn_previous()
            self._build_rest()
        except BaseException:
            self.inspector.backend.close()
            if self.link is not None:
                self.link.stop(timeout=1.0)
            raise

    def _check_outbox_left_behind(self) -> None:
        """A relative ``mqtt.outbox_path`` whose outbox an earlier edge-ad kept at the working directory's reading
        of it (:meth:`Settings.outbox_left_behind`): refused while the config folder's reading does not exist yet and
        that outbox holds messages (an empty outbox would start there and they would never be sent), else a WARNING
        at every start (the line already runs on the new one, or the old one holds nothing)."""
        left = self.settings.outbox_left_behind()
        if left is None:
            return
        if left.blocks:
            raise InputError(f"{left.what}; {left.fix}")
        log.warning("%s; %s", left.what, left.fix)

    def _open_model(self) -> tuple[Bundle, Any]:
        """The bundle ``run`` inspects with, opened on the line's backend. A pending release of the deploy folder
        ('edge-ad bundle install' while the line was stopped) that cannot be opened so is rolled back, and the
        restored release opens instead: a crash loop on a release the line cannot run helps nobody. So is one
        that failed its health check before this start (:meth:`_roll_back_failed`), before it inspects a frame."""
        s = self.settings
        self._roll_back_failed()
        try:
            bundle = Bundle.open(s.model.bundle_path(), verify=True)
            return bundle, open_inspector(bundle, s)
        except Exception as exc:
            dep = self._pending_release()
            if dep is None:
                raise
            back = self._roll_back_unopenable(dep, exc)
            bundle = Bundle.open(back.current_path, verify=True)
            return bundle, open_inspector(bundle, s)

    def _warn_previous(self) -> None:
        """A deploy folder whose ``previous`` link is damaged, or points at a release that is gone, runs its
        release in force; a WARNING names the damage, its repair and the rollbacks it blocks until then."""
        from ..calibration.deploy import deployment, previous_blocks, previous_problem

        m = self.settings.model
        if m.deploy_dir is None or m.bundle is not None:
            return
        dep = deployment(m.deploy_dir)
        problem = previous_problem(dep)
        if problem is not None:
            log.warning("%s; the line runs its release in force, %s, but %s", problem, dep.current,
                        previous_blocks(dep))

    def _start_plan(self):
        """What the deploy folder's release in force asks of this line (:func:`edge_ad.calibration.deploy.start_plan`);
        None without a deploy folder."""
        from ..calibration.deploy import start_plan

        m = self.settings.model
        if m.deploy_dir is None or m.bundle is not None:
            return None
        return start_plan(m.deploy_dir, self.settings.health.enabled)

    def _warn_failed(self, how: str, plan=None) -> None:
        """A WARNING when the line ``how`` ("starts", "reloads") on a deploy folder's release in force that was judged
        wrong and inspects all the same (the plan "inspect failed": switched in again by hand with 'edge-ad bundle
        rollback --force', or pending with ``[health] enabled = false``). A pending one with the check on is rolled
        back at the start (:meth:`_roll_back_failed`) or by its health watch, which fails it at once."""
        if plan is None:
            try:   # a warning only: never a reason for a start or a reload (one that has swapped already) to fail
                plan = self._start_plan()
            except EdgeADError as exc:
                log.debug("no start plan to warn from: %s", exc)
                return
        if plan is not None and plan.action == "inspect failed":
            log.warning("the line %s on release %s, which %s; %s", how, plan.dep.current, plan.verdict, plan.why)

    def _pending_release(self):
        """The deploy folder's state when its release in force is pending (not yet confirmed by a health
        check), else None."""
        from ..calibration import deployment

        m = self.settings.model
        if m.deploy_dir is None or m.bundle is not None:
            return None
        dep = deployment(m.deploy_dir)
        return dep if dep.health == "pending" and dep.current_path is not None else None

    def _roll_back_failed(self) -> None:
        """A pending release that failed its health check before this start (the line stopped while its rollback
        waited, or after it was given up: :func:`edge_ad.calibration.deploy.failed_before`) is rolled back here,
        before a frame is inspected with it, with a ``model_health`` event; the restored release opens instead.
        When it cannot be rolled back (no previous release, a damaged ``previous`` link, the deploy folder locked
        or full) the start fails saying how to go on: the line does not inspect with a model known to be wrong.
        With ``[health] enabled = false`` it is left in force, with a WARNING, as a release judged wrong that a
        rollback by hand switched in again is. What to do is :func:`edge_ad.calibration.deploy.start_plan`'s
        (``doctor --config`` says it from the same)."""
        plan = self._start_plan()
        if plan is None or plan.action != "roll back":
            self._warn_failed("starts", plan)
            return
        try:
            self._roll_back_at_start(plan.dep, f"release {plan.dep.current} {plan.verdict}", None)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"{exc}; edge-ad run does not inspect with a release that failed its health check: "
                                 f"{plan.fix()}") from exc

    def _roll_back_unopenable(self, dep, exc: BaseException):
        """Roll the pending release ``dep.current`` back because the line cannot open it (``exc``)."""
        from ..calibration.deploy import run_as

        m = self.settings.model
        return self._roll_back_at_start(dep, f"release {dep.current} cannot be opened as the line runs it "
                                             f"({run_as(m.backend, m.precision, m.device)}): {exc}", exc)

    def _roll_back_at_start(self, dep, reason: str, exc: BaseException | None):
        """Roll the pending release ``dep.current`` back before the line runs it (``reason``, from ``exc`` when an
        error): the state after it. Its ``model_health`` event waits in ``_startup_rollback`` (sent once the
        outputs are built, or by the reload that asked)."""
        back, reason = self._roll_back(dep.current, reason, exc)
        log.error("%s; rolled back to %s", reason, back.current)
        self._startup_rollback = _rolled_back_event(dep.current, reason, back)
        return back

    def _roll_back(self, release: str, reason: str, exc: BaseException | None):
        """Roll ``release``, the deploy folder's release in force, back to the previous one because the line cannot
        run it (``reason``, from ``exc``): (the state after the rollback, ``reason`` plus what its record lacks when
        it is incomplete). When it cannot be rolled back (no previous release or one that cannot be opened, a
        damaged link; a full disk before 'current' moved: nothing changed) a :class:`RollbackFailure` saying so and
        naming the release in force, never an OSError (a reload, a command handler must not crash on one)."""
        from ..calibration import rollback_model
        from ..calibration.deploy import DeployDamaged

        try:
            back = rollback_model(self.settings.model.deploy_dir, reason=reason, failed=True)
        except (RuntimeFailure, DeployDamaged) as nothing:   # DeployDamaged: 'previous' (or 'current') to repair
            raise RollbackFailure(f"{reason}; and it cannot be rolled back ({nothing})", "impossible") from exc
        except OSError as nothing:   # a full disk before 'current' moved: nothing changed
            raise RollbackFailure(f"{reason}; and it cannot be rolled back now ({os_error_text(nothing)}; 'current' "
                                  f"is still {release}): free disk space, then reload or restart", "failed") from exc
        if back.unrecorded is not None:
            reason += f"; rolled back, but its record is incomplete: {back.unrecorded}"
        return back, reason

    def _build_rest(self) -> None:
        s = self.settings
        o = s.output
        # the snapshot folder first: its write check can refuse the run before the result log is created
        snaps = SnapshotStore(o.snapshots_dir, o.snapshots_max_count, o.snapshots_max_bytes,
                              o.jpeg_quality) if o.snapshots_dir else None
        jsonl = JsonlLog(o.jsonl, o.jsonl_max_bytes, o.jsonl_backups, o.jsonl_fsync) if o.jsonl else None
        self.gate = TriggerGate(s.source.frames_per_trigger)
        mode = s.source.mode.value
        self.trigger = load_trigger(s.source.trigger, self.gate, s.source.gpio) if mode == "trigger" else None
        self.telemetry = Telemetry(s.telemetry.tegrastats, s.telemetry.nvml, s.telemetry.interval_s)
        t = s.telemetry
        self.telemetry_log = JsonlLog(t.path, t.max_bytes, t.backups, what="the telemetry file") if t.path else None
        mqtt = s.mqtt_settings()
        if mqtt is not None:
            from ..mqtt.link import MqttLink

            self.link = MqttLink(mqtt, birth=self._birth())
        self._outbox_dropped0 = self.link.outbox.dropped if self.link is not None else 0   # persisted total
        self._outbox_dropped_by0 = dict(getattr(self.link.outbox, "dropped_by", {})) if self.link is not None else {}
        self.reporter = Reporter(source_name=self.spec.safe_uri, jsonl=jsonl, snapshots=snaps, link=self.link,
                                 heatmap=o.heatmap, event_image=o.event_image, jpeg_quality=o.jpeg_quality,
                                 drift_factory=_drift_factory(s), calibration=self.inspector.calibration,
                                 on_event=self._log_event, on_reader_gone=self.stop)
        self.reporter.restore_result_log()   # a line a kill cut off between the outbox and the result log
        src = open_source(self.spec, s.source.open_timeout_s, s.source.rtsp_transport)
        self._stop_all = threading.Event()
        self.camera = Camera(src, self._stop_all, on_event=self.event, reconnect=s.source.reconnect,
                             reconnect_attempts=s.source.reconnect_attempts,
                             backoff_initial_s=s.source.backoff_initial_s, backoff_max_s=s.source.backoff_max_s,
                             watchdog_s=s.source.watchdog_s)
        p = s.pipeline
        self.pipeline = Pipeline(camera=self.camera, inspector=self.inspector, reporter=self.reporter, mode=mode,
                                 gate=self.gate, trigger=s.source.trigger, roi=s.source.roi, rotate=s.source.rotate,
                                 queue_size=p.queue_size, result_queue_size=p.result_queue_size,
                                 max_batch=p.max_batch, threshold=s.decision.threshold,
                                 min_region_area=s.decision.min_region_area, max_regions=s.decision.max_regions,
                                 max_frames=self.max_frames, on_event=self.event,
                                 result_queue_image_bytes=int(p.result_queue_image_mb * 2**20),
                                 on_stop=self._close_commands)
        self.commands = Commands(self)
        if self.link is not None:
            self.commands.register(self.link)
        if self._startup_rollback is not None:
            self.event(self._startup_rollback)
            self._startup_rollback = None
        self._watch_if_pending()

    def _watch_if_pending(self, baseline_ng_rate: float | None = None) -> None:
        """A release switched in while this line was not running it ('edge-ad bundle install', or a restart
        before the verdict) is still pending: watch its first frames here, rolling back when they look wrong."""
        dep = self._pending_release()
        if dep is not None and dep.current_path.resolve() == Path(self.bundle.path).resolve():
            if self._watch_health(dep.current, baseline_ng_rate, "reload"):
                log.info("release %s of %s is pending: its health is watched (rolled back when it fails)",
                            dep.current, self.settings.model.deploy_dir)

    def _watch_health(self, release: str, baseline_ng_rate: float | None, by: str) -> bool:
        """Watch the first frames of ``release`` (which ``by``, update_model or reload, switched in) from now on,
        with the ``[health]`` limits in force now (a reload of them applies to the next watch, not to one
        running), replacing the watch in force (:meth:`_replace_health`). With ``[health] enabled = false``
        none: the release stays pending in deploy.json, neither judged nor rolled back. Whether it is watched."""
        from ..calibration import HealthWatch

        h, d = self.settings.health, self.settings.model.deploy_dir
        watch = None
        if h.enabled:
            watch = HealthWatch(d, baseline_ng_rate=baseline_ng_rate, limits=h.limits(), offered=self._offered,
                                release=release)
        else:
            log.warning("release %s of %s is pending and not watched ([health] enabled = false): it is neither "
                        "judged nor rolled back automatically", release, d)
        self._replace_health(watch, release, by)
        return watch is not None

    def _replace_health(self, watch, release: str, by: str) -> None:
        """Watch ``release`` with ``watch`` (None: not watched) from now on. A watch it replaces whose failed
        verdict's rollback was said to wait for the deploy lock (a ``model_health`` event with rollback
        "waiting") gets its final event now: rollback "dropped", superseded by the new release
        (``superseded_by``), which ``by`` (update_model, reload) switched in. It is never rolled back to over
        the new switch, and without that event a fleet dashboard waited for ever for the outcome, or took the
        new release's verdict for it."""
        old, self.reporter.health = self.reporter.health, watch
        if old is None or old is watch:
            return
        v = old.supersede(release, by)
        if self._health_waiting is old:
            self._health_waiting = None
            if v is not None:
                log.error("the rollback of %s waited for the deploy lock and is dropped: %s", old.release, v.reason)
                self.event({"type": "model_health", **_jsonable(v.to_dict()), "release": old.release,
                            "superseded_by": release})

    def _offered(self) -> int:
        """Frames the pipeline has handed to the model so far (captured, triggered, not paused)."""
        return self.pipeline.captured

    def _birth(self) -> dict:
        b = self.inspector.backend
        return {"model_hash": self.inspector.model_hash, "calibration_version": self.inspector.calibration.version,
                "model_kind": self.bundle.kind, "backend": getattr(b, "name", ""),
                "precision": getattr(b, "precision", ""), "source": self.spec.safe_uri,
                "mode": self.settings.source.mode.value, "paused": False,
                # how often it sends telemetry: how long a device said online may be silent (decommission --force)
                "telemetry_interval_s": self.settings.telemetry.interval_s}

    # ------------------------------------------------------------------ events and state
    def _log_event(self, ev: dict) -> None:
        with self._events_lock:
            self.events.append({"ts": time.time(), **ev})
            del self.events[:-50]

    def event(self, payload: dict) -> None:
        if payload.get("type") == "inference_error" and self.reporter.health is not None:
            for _ in range(int(payload.get("frames", 1))):
                self.reporter.health.record(error=True)
        if payload.get("type") == "model_health":
            payload = self._golden_said(payload)
        self.reporter.event(payload)

    def _golden_said(self, health: dict) -> dict:
        """A ``model_health`` event with ``golden_checked``: whether its release passed a golden check before it was
        switched in (deploy.json's record of the switch: :func:`edge_ad.calibration.deploy.golden_checked`); when
        not, its reason says so plainly. Unchanged when that is not known."""
        from ..calibration.deploy import golden_checked

        d = self.settings.model.deploy_dir
        checked = golden_checked(d, health.get("release")) if d is not None and "golden_checked" not in health else None
        if checked is None:
            return health
        if checked:
            return {**health, "golden_checked": True}
        return {**health, "golden_checked": False,
                "reason": f"{health.get('reason', '')}; no golden check was done before it was switched in"}

    def update_birth(self, **fields) -> None:
        if self.link is not None:
            self.link.update_birth(**fields)

    def effective_threshold(self) -> float:
        return threshold_in_force(self.inspector.calibration.threshold, self.pipeline.threshold_override)

    def publish_calibration(self) -> None:
        """The retained MQTT ``calibration``: the calibration in force and the threshold that decides. Sent
        again whenever either changes (a swap, set_threshold without persist, a reloaded [decision] threshold)."""
        if self.link is not None:
            self.link.publish_calibration(self.inspector.calibration, threshold_in_force=self.effective_threshold())

    def swap_calibration(self, cal, reason: str, decides: bool = False) -> str | None:
        """Put ``cal`` in force between two batches, restart drift tracking, tell MQTT. ``decides``: its
        threshold decides from now on, over any override (a persisted set_threshold). Returns the model hash
        it replaced when ``cal`` changed it (a Gaussian bundle's statistics: other ones, the birth published
        again), else None."""
        with self._swap_lock:
            before, model_before = self.inspector.calibration.version, self.inspector.model_hash
            self.inspector.set_calibration(cal)
            self.reporter.reset_drift(cal, reason)
            self._drop_transient_threshold(f"calibration v{before}")
            if decides:
                self.pipeline.threshold_override = None
            self._hold_calibration()
        log.info("calibration v%d in force (was v%d): %s", cal.version, before, reason)
        refit = self.inspector.model_hash != model_before   # a Gaussian refit: its statistics are the model
        if refit:
            self.update_birth(model_hash=self.inspector.model_hash)
        self.publish_calibration()
        self.event({"type": "calibration", "version": cal.version, "previous_version": before,
                    "threshold": cal.threshold, "policy": cal.policy, "reason": reason,
                    "threshold_in_force": self.effective_threshold()})
        return model_before if refit else None

    def _hold_calibration(self) -> None:
        """Record on disk the bundle and calibration version this run decides with (:class:`CalibrationHold`:
        never raises), while it runs."""
        if self._hold is not None:
            self._hold.put(self.bundle, self.inspector.calibration.version)

    def _drop_transient_threshold(self, what: str) -> None:
        """A this-run-only threshold belongs to the calibration (and model) it was set on: when another is
        put in force, the override it replaced decides again. Called under ``_swap_lock``."""
        transient, self.transient_threshold = self.transient_threshold, None
        if transient is not None:
            self.pipeline.threshold_override = self.override_under_transient
            log.warning("set_threshold %g (this run only) dropped with %s", transient, what)

    def rollback_calibration(self, version: int | None, by: str = "MQTT rollback_calibration"):
        from ..calibration import rollback

        with self.bundle.calibration_lock():
            self.check_calibration_current("rollback_calibration")   # so the default is the one the loop's replaced
            cal = rollback(self.bundle, version, by=by)
            self.swap_calibration(cal, reason=f"rollback to v{cal.version}")
        return cal

    def calibrate(self, frames: int, policy: str, source: str, timeout: float, by: str = "MQTT calibrate") -> dict:
        """Collect normal frames (live or from a folder), refit, swap in between two frames. ``by``: what asked
        (the new version's ``source`` starts with it)."""
        with self.bundle.calibration_lock():   # from before the frames to the swap (edge-ad calibrate beside)
            self.check_calibration_current("calibrate")
            return self._calibrate(frames, policy, source, timeout, by)

    def check_calibration_current(self, what: str) -> None:
        """Refuse to build a new calibration on the one this run has when the bundle's calibration in force
        is another (written by another process, e.g. edge-ad calibrate, and not reloaded yet): it would be
        silently replaced. Called under the bundle's calibration lock."""
        on_disk = self.bundle.calibration().version
        here = self.inspector.calibration.version
        if on_disk != here:
            raise RuntimeFailure(f"{what}: the bundle's calibration in force is v{on_disk} (written by another "
                                 f"process, e.g. edge-ad calibrate) and this run still uses v{here}: send "
                                 "'reload' first; nothing changed")

    def _calibrate(self, frames: int, policy: str, source: str, timeout: float, by: str) -> dict:
        from ..calibration import collect_frames, recalibrate
        from ..calibration.adapt import remove_stale_work
        from ..calibration.collect import is_line_folder
        from ..calibration.refit import MIN_FRAMES, MQTT_ROLLBACK

        remove_stale_work(self.bundle.path)   # the frames a killed 'edge-ad calibrate --adapt' left beside it
        t0 = time.monotonic()
        notes: list[str] = []   # the training images a source folder held, left out
        if source == "live":
            if self.pipeline.paused.is_set():
                raise InputError("inspection is paused: live calibration needs frames; resume first or "
                                 "give a source folder")
            self._check_live_frames_unseen()
            col = self.pipeline.collect_frames(frames)
            if not col.done.wait(timeout):
                self.pipeline.cancel_collector(col)
                raise RuntimeFailure(f"calibrate: collected {len(col.frames)} of {frames} frames within "
                                     f"{timeout:g} s; the calibration in force is unchanged")
            if col.cancelled:
                self.pipeline.cancel_collector(col)
                raise RuntimeFailure(f"calibrate: cancelled after {len(col.frames)} of {frames} frames: the run "
                                     f"is stopping ({col.cancelled}); the calibration in force is unchanged")
            images, labels = list(col.frames), list(col.labels)
            where = f"live {self.spec.safe_uri}"
        else:
            # a folder of frames as the loop inspects them (cropped and rotated already, as 'edge-ad capture
            # --config' saves them: the line's ROI is the size they must have), or the line's own folder,
            # cropped and rotated as the loop reads it; kept at the model's input size. Its images that are
            # the bundle's training images are left out (collect_frames, on the files before they are read)
            src = self.settings.source
            images = collect_frames(source, frames, timeout_s=timeout, progress=False, roi=src.roi,
                                    rotate=src.rotate, folder_roi=is_line_folder(source, src.uri),
                                    size_hw=tuple(self.inspector.image_size), bundle=self.bundle,
                                    min_frames=MIN_FRAMES, notes=notes)
            labels = images.labels   # the files kept: the training images left out have none
            where = parse_uri(source).safe_uri if "://" in source else source
            if len(images) < frames:   # as 'edge-ad calibrate' notes it: the reply says why fewer were used
                notes.append(f"{where} gave {len(images)} frames (asked for {frames})")
            for note in notes:
                log.warning("calibrate: %s", note)
        t_collect = time.monotonic() - t0
        res = recalibrate(self.bundle, self.inspector, images, policy=policy, progress=False,
                          source=f"{by}: {len(images)} frames from {where}", labels=labels,
                          rollback_advice=MQTT_ROLLBACK)   # the fleet operator has no shell on the device
        self.swap_calibration(res.calibration, reason=f"calibrate ({len(images)} frames, policy {policy})")
        out = res.summary()
        out["warnings"] = [*notes, *out["warnings"]]
        out["threshold_in_force"] = self.effective_threshold()   # a [decision] threshold overrides the new one
        out["collect_s"] = round(t_collect, 3)
        return _jsonable(out)

    def _check_live_frames_unseen(self) -> None:
        """Live calibration on a line that replays a folder (``dir://``): refused when the folder holds
        images the bundle was trained on, as some of the frames collected would be those (a threshold set
        on training images calls good parts NG). A folder given as the command's source leaves them out."""
        if self.spec.scheme != "dir":
            return   # a camera, a video, synthetic frames: nothing to compare with the training images
        from ..calibration.collect import training_images
        from ..data.image import list_images

        train = training_images(self.bundle)
        if train is None:
            return
        folder = Path(self.spec.target)
        try:
            paths = list_images(folder)
        except InputError:
            return   # the source itself reports a folder that is gone
        hits = train.matches(paths)
        if hits:
            raise InputError(f"live calibration: {len(hits)} of the {len(paths)} images of the line's source "
                             f"folder {folder} are images {self.bundle.path} was trained on ({train.described}), "
                             "and a threshold set on them calls good parts NG; "
                             f"give the folder as the source (\"source\": \"dir://{folder}\"), which leaves "
                             "them out, or a folder of good parts the model has not seen; the calibration in "
                             "force is unchanged")

    def reload(self, what: str) -> dict:
        out: dict[str, Any] = {}
        if what in ("config", "all"):
            out["config"] = self._reload_config()
        if what in ("bundle", "all"):
            out["bundle"] = self._reload_bundle()
        return out

    def _reload_config(self) -> dict:
        if self._reload_settings is None:
            raise InputError("reload config: this run was not started from a config file")
        new = self._reload_settings()
        old = self.settings
        applied, restart = [], []
        if new.decision != old.decision:
            self.pipeline.threshold_override = new.decision.threshold
            self.transient_threshold = None       # the config's threshold wins over set_threshold's
            self.pipeline.min_region_area = new.decision.min_region_area
            self.pipeline.max_regions = new.decision.max_regions
            applied.append("decision")
            self.publish_calibration()   # the threshold in force may have changed
        if new.calibration != old.calibration:
            applied.append("calibration")
        if new.drift != old.drift:
            self.reporter._drift_factory = _drift_factory(new)
            self.reporter.reset_drift(self.inspector.calibration, "reload config: drift settings changed")
            applied.append("drift")
        if new.telemetry.interval_s != old.telemetry.interval_s:
            applied.append("telemetry.interval_s")
            self.update_birth(telemetry_interval_s=new.telemetry.interval_s)
        if new.health != old.health:
            applied.append("health")   # read when a watch starts: one running keeps its limits
        for sec in ("model", "source", "pipeline", "output", "mqtt"):
            if getattr(new, sec) != getattr(old, sec):
                restart.append(sec)
        keep = {sec: getattr(old, sec) for sec in restart}
        # the readers (tegrastats, NVML, ...) are made at start: only the interval applies now
        if new.telemetry.model_copy(update={"interval_s": old.telemetry.interval_s}) != old.telemetry:
            restart.append("telemetry")
            keep["telemetry"] = old.telemetry.model_copy(update={"interval_s": new.telemetry.interval_s})
        self.settings = new.model_copy(update=keep)
        return {"applied": applied, "restart_required": restart}

    def _reload_bundle(self) -> dict:
        # with a deploy folder, 'current' may point at another release now ('edge-ad bundle install')
        path = self.settings.model.bundle_path() if self.settings.model.deploy_dir is not None else self.bundle.path
        try:
            fresh = Bundle.open(path, verify=True)
            # another release folder ('edge-ad bundle install', 'bundle rollback') is always a switch, whatever its
            # model hash, so that the line runs, calibrates into and watches the release in force (_another_model)
            if self._another_model(fresh):
                return self._reload_model(fresh)
        except Exception as exc:   # a pending release the line cannot open: back to the one that runs
            dep = self._pending_release()
            if dep is None or dep.current_path.resolve() == Path(self.bundle.path).resolve():
                raise
            back = self._roll_back_unopenable(dep, exc)
            ev, self._startup_rollback = self._startup_rollback, None
            self.event(ev)
            raise RuntimeFailure(f"reload: {ev['reason']}; rolled back: 'current' is {back.current}, the running "
                                 "model is unchanged") from exc
        cal = fresh.calibration()
        if cal.version != self.inspector.calibration.version or cal.to_dict() != self.inspector.calibration.to_dict():
            self.bundle = fresh
            self.inspector.bundle = fresh
            replaced = self.swap_calibration(cal, reason="reload")
            if replaced is not None:   # a Gaussian bundle's statistics: the same graph and inspector, another hash
                return {"model": "refit", "model_hash": self.inspector.model_hash, "previous_model_hash": replaced,
                        "calibration_version": cal.version}
            return {"model": "unchanged", "calibration_version": cal.version}
        return {"model": "unchanged", "calibration": "unchanged", "calibration_version": cal.version}

    def _another_model(self, fresh: Bundle) -> bool:
        """Is ``fresh``, the bundle a reload opened, another model than the one running (a model swap: a second
        inspector, the ``model`` event) rather than the same model with another calibration (the calibration path:
        :meth:`swap_calibration`, the ``calibration`` event, as the MQTT calibrate and rollback_calibration give)?
        Another model: another folder (the release ``current`` points at now), another active graph or graph
        contents (:meth:`Bundle.graph_hash`), another training (a bundle retrained in place: the manifest's
        ``created``). A Gaussian bundle's statistics are its model too (its ``model_hash`` covers them), but they
        change with a calibration version: a refit or a rollback (``edge-ad calibrate`` beside the running line)
        puts in force a calibration that names other statistics, which :meth:`Inspector.set_calibration` loads;
        only statistics that changed under the same name (the file replaced) make another model."""
        run = self.bundle
        if Path(fresh.path).resolve() != Path(run.path).resolve() or fresh.active_graph != run.active_graph:
            return True
        if fresh.graph_hash() != run.graph_hash() or fresh.manifest.get("created") != run.manifest.get("created"):
            return True
        if fresh.kind != "gaussian":
            return False
        cal, running = fresh.calibration(), self.inspector.calibration
        same_stats = cal.extra.get("gaussian") == running.extra.get("gaussian")
        return same_stats and fresh.model_hash(calibration=cal) != self.inspector.model_hash

    def _reload_model(self, fresh: Bundle) -> dict:
        """A reload's model switch to ``fresh``, watched when it is the deploy folder's pending release."""
        with self._health_lock:   # the loop's health check waits its turn while the watch is replaced
            baseline = self._ng_rate()   # before the swap, which clears the decisions it counts
            out = self._swap_model(fresh, reason="reload")
            self._watch_if_pending(baseline)
            self._warn_failed("reloads")
        return out

    def _swap_model(self, bundle: Bundle, reason: str) -> dict:
        """Open the new model beside the running one; swap between two batches; close the old one once the
        batch it may be inferring is done (for up to :data:`SWAP_WAIT_S`)."""
        new = open_inspector(bundle, self.settings)
        old = self.pipeline.inspector
        before = old.model_hash
        with self._swap_lock:
            self.pipeline.set_inspector(new)
            self.inspector = new
            self.bundle = bundle
            expect_trained_format(bundle)
            self.reporter.reset_drift(new.calibration, f"model swap ({reason})")
            self._drop_transient_threshold(f"model {before}")
            self._hold_calibration()
        if not self.pipeline.wait_idle(old, SWAP_WAIT_S):   # a batch still in the old backend finishes there
            log.warning("the old model's batch did not finish within %g s of the swap; its backend is closed under "
                        "it", SWAP_WAIT_S)
        old.backend.close()
        self.update_birth(model_hash=new.model_hash, calibration_version=new.calibration.version,
                          backend=getattr(new.backend, "name", ""), precision=getattr(new.backend, "precision", ""))
        self.publish_calibration()
        self.event({"type": "model", "model_hash": new.model_hash, "previous_model_hash": before, "reason": reason,
                    "bundle": str(bundle.path)})
        return {"model_hash": new.model_hash, "previous_model_hash": before,
                "calibration_version": new.calibration.version, "bundle": str(bundle.path)}

    def update_model_unavailable(self) -> str | None:
        """Why this line cannot take a model update (no ``model.deploy_dir``: the MQTT ``update_model`` is then
        answered ``not_available``, and the birth does not list it); None when it can."""
        if self.settings.model.deploy_dir is None:
            return ("update_model needs model.deploy_dir in the config (a folder of installed bundles whose "
                    "'current' release runs; see docs/runtime.md)")
        return None

    def update_model(self, args: dict) -> dict:
        """Install a bundle archive (edge_ad.calibration.install_bundle: verify, golden set, atomic switch),
        swap it in between two batches, and watch its health: a failed check rolls back to the previous
        bundle and reopens it. ``activate`` false only verifies and checks the archive.

        The golden check runs the line's backend, precision and device, and the candidate is opened as the
        line opens it before ``current`` moves; should the swap still fail, ``current`` goes back to the
        running release and the update is reported failed (a RuntimeFailure naming the release in force, also
        when that rollback cannot be written: :meth:`_roll_back`), a rollback made with a ``model_health`` event
        as a health-check rollback sends; one that cannot be made sends one too (rolled_back false, rollback
        "impossible", or "failed" when it could not be written). On a TensorRT line the candidate's engine is
        built and guarded first, on the golden set's good/ images (else its recorded training data when it
        is on this machine; else the update is refused)."""
        from urllib.parse import urlsplit

        from ..calibration.deploy import deploy_lock

        m = self.settings.model
        why = self.update_model_unavailable()
        if why is not None:
            raise InputError(why)
        precision = args.get("precision") or m.precision
        activate = args.get("activate", True)
        if activate and precision != m.precision:
            raise InputError(f"update_model: precision '{precision}' is not the one the line runs with "
                             f"(model.precision: {m.precision or 'empty, each bundle its active graph'}); the "
                             "check must run what will run: leave precision out, or use it with activate false "
                             "to only check")
        with deploy_lock(m.deploy_dir):   # one install at a time; stale staging is cleaned under it
            url = str(args["url"])
            archive = _fetch_archive(url, Path(m.deploy_dir) / "downloads", str(args["sha256"]),
                                     max_mb=m.download_max_mb, timeout_s=m.download_timeout_s)
            try:
                return self._install_update(archive, precision, activate)
            finally:
                # our download: installed or refused, not kept (the scheme as _fetch_archive reads it: " http://"
                # and "HTTP://" are downloads too)
                if urlsplit(url).scheme in ("http", "https"):
                    archive.unlink(missing_ok=True)

    def _install_update(self, archive: Path, precision: str | None, activate: bool) -> dict:
        from ..calibration import deployment, install_bundle
        from ..calibration.deploy import check_archive, engine_needed, open_probe

        m = self.settings.model
        golden = m.golden_dir if m.golden_dir is not None else (
            Path(m.deploy_dir) / "golden" if (Path(m.deploy_dir) / "golden").is_dir() else None)
        key = str(m.update_key) if m.update_key is not None else None
        if not activate:
            # opened as it would run, with or without a golden set (an int8 check of a bundle without an INT8
            # graph said ok): as the line opens it, or in the precision the check asks for
            line = precision == m.precision
            info, model_hash, report = check_archive(
                archive, m.deploy_dir, golden, self.bundle, key, backend=m.backend, precision=precision,
                device=m.device, build=bool(golden) and engine_needed(m.backend, m.device, self.bundle),
                probe=open_probe(m.backend, precision, m.device, opener=(
                    lambda b: open_inspector(b, self.settings)) if line else None, line=line), line=line)
            out = {"activated": False, "model_hash": model_hash, "signed": info.signed,
                   "signature_verified": info.verified, "golden": report, "golden_checked": golden is not None}
            if golden is None:
                out["warnings"] = [self._no_golden("the archive was only verified and opened " + (
                    "as the line runs it" if line else f"in precision {precision}, as the check asks"))]
            return _jsonable(out)
        probe = open_probe(m.backend, m.precision, m.device, opener=lambda b: open_inspector(b, self.settings))
        baseline = self._baseline()   # recorded with the switch: a restart before the verdict judges against it too
        try:
            res = install_bundle(archive, m.deploy_dir, golden, key, backend=m.backend, precision=m.precision,
                                 device=m.device, probe=probe, require_golden=golden is not None, baseline=baseline)
        except OSError as exc:   # a full disk before 'current' moved (after it, the install holds): nothing switched
            raise RuntimeFailure(f"update_model: {os_error_text(exc)}; not installed: 'current' is still "
                                 f"{deployment(m.deploy_dir).current}, the running model is unchanged") from exc
        if res.already_installed and res.path.resolve() == Path(self.bundle.path).resolve():
            return _jsonable({"activated": True, "already_installed": True, "model_hash": self.inspector.model_hash,
                              "install": res.summary()})
        with self._health_lock:   # the loop's health check waits its turn while the watch is replaced
            try:
                out = self._swap_model(Bundle.open(res.path, verify=True), reason="update_model")
            except Exception as exc:
                if res.already_installed:   # nothing was switched: nothing to roll back
                    raise
                why = f"update_model: {res.release} was installed but could not be swapped in ({exc})"
                try:
                    dep, why = self._roll_back(res.release, why, exc)
                except RollbackFailure as failure:   # never an OSError out of the command: the state it left, said
                    why = f"{failure}; the running model is unchanged"
                    # as a health-check rollback that cannot be made says it: a dashboard learns of the release
                    self.event({"type": "model_health", "status": "failed", "reason": why, "release": res.release,
                                "rolled_back": False, "rollback": failure.rollback})
                    raise RuntimeFailure(why) from exc
                self.event(_rolled_back_event(res.release, why, dep))   # as a health-check rollback says it
                raise RuntimeFailure(f"{why}; 'current' is back on {dep.current}, the running model is "
                                     "unchanged") from exc
            watched = not res.already_installed and self._watch_health(
                res.release, baseline["ng_rate"] if baseline else None, "update_model")
        out.update({"activated": True, "install": res.summary(),
                    "health": "unchanged" if res.already_installed else "pending" if watched else "unchecked"})
        warnings = []
        if not res.already_installed:
            out["golden_checked"] = res.golden is not None
            if res.golden is None:
                warnings.append(self._no_golden(
                    f"{res.release} was only verified and opened as the line runs it before it was switched in; "
                    + ("only the health check judges it, on its first frames" if watched else
                       "and the health check is off ([health] enabled = false): nothing judges its decisions")))
        if res.replaced_previous is not None:   # a damaged 'previous' link the install replaced (install_bundle)
            warnings.append(res.replaced_previous)
        if res.unrecorded is not None:   # the switch holds (install_bundle): say what the deploy folder lacks
            warnings.append(f"{res.release} is installed and in force, but the record of the install is "
                            f"incomplete: {res.unrecorded}")
        if warnings:
            out["warnings"] = warnings
        return _jsonable(out)

    def _no_golden(self, what: str) -> str:
        """The reply's warning that update_model made no golden check (``what``: what was done instead)."""
        m = self.settings.model
        return (f"no golden check was done: this device has no golden set (model.golden_dir is not set and "
                f"{Path(m.deploy_dir) / 'golden'} does not exist); {what}")

    def _ng_rate(self) -> float | None:
        """The NG rate of the latest decisions of the model and calibration in force (the baseline a new
        model's health is judged against: not the whole run's, which a badly calibrated start skews); None
        before any OK among them."""
        b = self._baseline()
        return b["ng_rate"] if b else None

    def _baseline(self) -> dict | None:
        """:meth:`_ng_rate` with the number of decisions behind it, ``{"ng_rate": R, "frames": N}`` (as update_model
        records it in deploy.json with its switch); None before any OK among them."""
        recent = list(self.reporter.recent_ng)
        return {"ng_rate": sum(recent) / len(recent), "frames": len(recent)} if recent and not all(recent) else None

    def _check_health(self) -> None:
        """After a model update: roll back when the new model's first frames look wrong. A rollback that
        waits for the deploy lock (an 'edge-ad bundle install' or 'rollback' from a shell holds it), or for
        room to write it (a full disk), keeps the watch, which tries again at later calls: one event says it waits, one more how it ended (or, when an
        update_model or reload switches another release in meanwhile, that it was superseded:
        :meth:`_replace_health`). The restored model is swapped in on a thread of its own (:meth:`_in_background`,
        as a SIGHUP reload), so that the supervisor goes on feeding the watchdog during the swap; while a model
        change runs there the check waits its turn."""
        if self._change_running() or not self._health_lock.acquire(blocking=False):
            return   # a model switch is replacing the watch: checked at the next call
        try:
            self._check_health_locked()
        finally:
            self._health_lock.release()

    def _check_health_locked(self) -> None:
        watch = self.reporter.health
        if watch is None:
            return
        v = watch.poll()
        if v.status == "pending":
            return
        if v.rollback == "waiting":
            if self._health_waiting is not watch:   # said once; the next event is the outcome
                self._health_waiting = watch
                log.error("the new model failed its health check: %s", v.reason)
                self.event({"type": "model_health", **_jsonable(v.to_dict())})
            return
        self.reporter.health = None
        self._health_waiting = None
        if v.status == "ok":
            self.event({"type": "model_health", "status": "ok", "reason": v.reason, "release": v.release,
                        "record": v.record})
            return
        log.error("the new model failed its health check: %s", v.reason)
        self.event({"type": "model_health", **_jsonable(v.to_dict())})
        if v.rolled_back and v.restored is not None:
            failed = Path(self.bundle.path).resolve()
            self._in_background("health rollback", lambda: self._swap_back(v, failed))

    def _swap_back(self, v, failed: Path) -> None:
        """The health check's rollback (``v``, its verdict) moved 'current' back: swap the restored model in
        for ``failed``, the one that ran then, unless a model switch (update_model, reload) replaced that one
        meanwhile (the later switch stands)."""
        with self._health_lock:
            if Path(self.bundle.path).resolve() != failed:
                log.warning("rolled back to %s, but %s runs now (switched in meanwhile): left running", v.restored,
                            self.bundle.path)
                return
            try:
                self._swap_model(Bundle.open(v.restored, verify=True),
                                 reason=f"rollback after health check: {v.reason}")
            except Exception as exc:   # the loop keeps the model it has; a restart runs the restored one
                log.error("rolled back to %s, but it cannot be opened here (%s); the new model keeps inspecting "
                          "until a restart", v.restored, exc)
                self.event({"type": "model_health", "status": "rollback_failed", "release": v.release,
                            "restored": str(v.restored), "rolled_back_to": v.rolled_back_to,
                            "reason": f"{type(exc).__name__}: {exc}"})

    def status(self) -> dict:
        cal = self.inspector.calibration
        b = self.inspector.backend
        with self._events_lock:
            events = list(self.events[-10:])
        ok, ng = self.reporter.counts()
        out = {"version": __version__, "uptime_s": round(time.monotonic() - self._t0, 1),
               "state": "paused" if self.pipeline.paused.is_set() else "running",
               "pipeline": self.pipeline.stats(), "source": self.camera.stats(),
               "model": {"bundle": str(self.bundle.path), "kind": self.bundle.kind, "hash": self.inspector.model_hash,
                         "backend": getattr(b, "name", ""), "precision": getattr(b, "precision", ""),
                         "image_size": list(self.bundle.image_size)},
               "calibration": self._calibration_status(cal),
               "threshold": self.effective_threshold(), "drift": self.reporter.drift_summary(),
               "results": {"ok": ok, "ng": ng,
                           "output_errors": dict(self.reporter.output_errors)},
               "last_result": self.reporter.last_result, "events": _jsonable(events),
               "settings": self.settings.redacted()}
        if self.link is not None:
            out["link"] = self.link.stats()
            out["birth"] = self.link.birth()
        return _jsonable(out)

    def _calibration_status(self, cal) -> dict:
        """The status's ``calibration``: the one this run decides with (``version``, ``threshold``, ``policy``), the
        versions the bundle keeps, bounded whatever the history (``versions``: the newest :data:`STATUS_VERSIONS`;
        ``versions_kept``: how many; ``edge-ad calibrate --list`` lists them all), and ``rollback_to``, the one a
        ``rollback_calibration`` without a version puts back (None: none, or no longer kept)."""
        from ..calibration.refit import rollback_target

        versions = self.bundle.calibration_versions()
        target = rollback_target(self.bundle)
        return {"version": cal.version, "threshold": cal.threshold, "policy": cal.policy,
                "versions": versions[-STATUS_VERSIONS:], "versions_kept": len(versions),
                "rollback_to": target if target in versions else None}

    # ------------------------------------------------------------------ telemetry
    def telemetry_payload(self) -> dict:
        p = self.pipeline
        # each counter is read once: the count sent and the interval's figure made from it are the same reading,
        # so the interval of one message is the difference of its counts and the previous message's (read again
        # later, a frame decided meanwhile was in this message's counts and the next one's interval)
        inspected = p.inspected
        fps, dn, dt = self._rate.rate(inspected)
        cfps, _, _ = self._cap_rate.rate(self.camera.frames)
        # ok and ng are counted together (the result's outputs written, its NG event not yet): the interval's
        # rate is NG over OK + NG, never above 1 (over 'reported', counted after the event, it reached 1.07)
        ok_now, ng_now = self.reporter.counts()
        dng, self._last_ng = ng_now - self._last_ng, ng_now
        drep, self._last_ok = dng + ok_now - self._last_ok, ok_now
        dropped_now = p.dropped
        ddrop, self._last_drop = dropped_now - self._last_drop, dropped_now
        stages = {k: p.latency[k].summary() for k in STAGES if k in p.latency}
        stages["report"] = self.reporter.latency.summary()
        total = stages.pop("total", None)
        host = self.telemetry.host()
        proc = host["process"]
        cal = self.inspector.calibration
        st = p.stats()
        out: dict[str, Any] = {
            "fps": round(fps, 3), "capture_fps": round(cfps, 3), "interval_s": round(dt, 3),
            "latency_ms": {k: v for k, v in (total or {}).items() if k != "n"},
            "stages_ms": {k: v for k, v in stages.items() if v is not None},
            "frames": inspected, "captured": p.captured, "ok": ok_now, "ng": ng_now,
            "ng_rate": round(dng / drep, 4) if drep else 0.0, "dropped": dropped_now, "dropped_interval": ddrop,
            "skipped_untriggered": st["skipped_untriggered"], "skipped_paused": st["skipped_paused"],
            "triggers_dropped_paused": st["triggers_dropped_paused"], "skipped_images": st["skipped_images"],
            "inference_errors": p.inference_errors, "discarded_at_stop": p.discarded_at_stop,
            "unreported": p.unreported, "output_errors": dict(self.reporter.output_errors),
            "snapshots_skipped": p.snapshots_skipped, "queues": st["queues"], "mode": p.mode,
            "paused": p.paused.is_set(), "uptime_s": round(time.monotonic() - self._t0, 1),
            "calibration_version": cal.version, "threshold": self.effective_threshold(),
            "model_hash": self.inspector.model_hash, "source": self.camera.stats(),
            "drift": self.reporter.drift_summary(), "cpu_percent": proc["cpu_percent"],
            "memory_mb": proc["rss_mb"], "process": proc,
        }
        if "jetson" in host:
            j = host["jetson"]
            out["jetson"] = j
            if j.get("temps_c"):
                out["temperatures_c"] = j["temps_c"]
            if j.get("power_total_mw") is not None:
                out["power_w"] = round(j["power_total_mw"] / 1000.0, 3)
        if "gpu" in host:
            out["gpu"] = host["gpu"]
            temps = {f"gpu{g['index']}": g["temp_c"] for g in host["gpu"] if "temp_c" in g}
            if temps:
                out.setdefault("temperatures_c", {}).update(temps)
            watts = [g["power_w"] for g in host["gpu"] if "power_w" in g]
            if watts and "power_w" not in out:
                out["power_w"] = round(sum(watts), 3)
        if self.link is None:
            out["outbox"] = {"depth": 0, "dropped": 0, "connected": False}
        return _jsonable(out)

    def _emit_telemetry(self) -> dict:
        payload = self.telemetry_payload()
        body = None
        if self.link is not None:
            try:
                body = self.link.publish_telemetry(payload)
            except EdgeADError as exc:
                log.warning("telemetry not sent: %s", exc)
        if self.telemetry_log is not None:
            if body is None:  # no MQTT: the same envelope, without the link's site, device and outbox state
                from ..mqtt.payloads import SCHEMA_VERSION, now_iso

                body = {"schema_version": SCHEMA_VERSION, "ts": now_iso(), **payload}
            # a full disk: counted in output_errors, logged once a minute, output_error / output_restored events
            self.reporter._write("telemetry", None, lambda: self.telemetry_log.write(body))
        lat = payload.get("latency_ms") or {}
        log.debug("telemetry: %.1f fps, latency p50 %s ms p99 %s ms, %d frames, %d NG, %d dropped, rss %.0f MB%s",
                 payload["fps"], lat.get("p50"), lat.get("p99"), payload["frames"], payload["ng"],
                 payload["dropped"], payload["memory_mb"], ", DRIFT" if payload["drift"].get("drift") else "")
        self.notifier.status(f"{payload['fps']:.1f} fps, {payload['frames']} frames, {payload['ng']} NG")
        self.last_telemetry = payload
        return payload

    # ------------------------------------------------------------------ run
    def stop(self, reason: str = "stop requested") -> None:
        """Ask a running service to drain and stop (what SIGTERM does); safe from any thread."""
        self._stop_signal = self._stop_signal or reason

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == getattr(signal, "SIGHUP", None):
            self._hup = True
            return
        self._signals += 1
        if self._signals > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = name

    def _healthy(self) -> bool:
        p = self.pipeline
        if p.error is not None:
            return False
        if not all(t.is_alive() for t in p._threads) and not p.stop_capture.is_set():
            return False
        wd = self.settings.source.watchdog_s
        return not (wd > 0 and self.camera.stalled_for > 3 * wd)

    def describe(self) -> str:
        """One line: what inspects what (for the CLI and logs)."""
        b = self.inspector.backend
        return (f"{self.spec.safe_uri} -> {self.bundle.path.name} ({self.bundle.kind}, {getattr(b, 'name', '')} "
                f"{getattr(b, 'precision', '')} on {getattr(b, 'device', '?')}, calibration "
                f"v{self.inspector.calibration.version}, threshold {self.effective_threshold():.4g}, "
                f"{self.pipeline.mode} mode" + (f", MQTT {self.link.settings.safe_url}" if self.link else "") + ")")

    def run(self) -> dict:
        """Run until the source ends, a bound is reached, a signal arrives or a thread fails."""
        old_handlers = {}
        if self.install_signals and threading.current_thread() is threading.main_thread():
            sigs = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
            for sig in sigs:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._rate, self._cap_rate = RateCounter(), RateCounter()
        self._last_ng = self._last_drop = self._last_ok = 0
        self.last_telemetry: dict = {}
        t_start = time.monotonic()
        # frames of another bit depth than the training images' are warned about (once; a model swap changes it)
        expected_before = expect_trained_format(self.bundle)
        with self._swap_lock:
            self._hold = CalibrationHold("edge-ad run")
            self._hold_calibration()
        try:
            if self.link is not None:
                self.link.start()
                self.publish_calibration()
            self.telemetry.start()
            if self.trigger is not None:
                try:
                    self.trigger.start()
                except EdgeADError:
                    raise
                except Exception as exc:  # a plug-in's start(): its error, named, is a config problem
                    raise InputError(f"source.trigger '{self.settings.source.trigger}': start() failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            self.pipeline.start()
            self.notifier.ready(f"inspecting {self.spec.safe_uri}")
            log.debug("edge-ad run: %s -> %s (%s %s, calibration v%d, threshold %.4g, mode %s)",
                        self.spec.safe_uri, self.bundle.path.name, getattr(self.inspector.backend, "name", ""),
                        getattr(self.inspector.backend, "precision", ""), self.inspector.calibration.version,
                        self.effective_threshold(), self.pipeline.mode)
            self._supervise(t_start)
        finally:
            summary = self._shutdown(t_start)
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            put_expected_format(expected_before)
        err = self.pipeline.error or self._nothing_inspected()
        if err is not None:
            if isinstance(err, EdgeADError):
                raise err
            raise RuntimeFailure(str(err))
        return summary

    def _nothing_inspected(self) -> RuntimeFailure | None:
        """A run whose every batch failed inspected nothing: a runtime failure, not a success."""
        p = self.pipeline
        if p.inspected or not p.inference_errors:
            return None
        return RuntimeFailure(f"no frame was inspected: inference failed on all {p.inference_errors} batches "
                              f"({p.captured} frames captured); first error: {p.first_inference_error}")

    def _supervise(self, t_start: float) -> None:
        s = self.settings
        p = self.pipeline
        next_tel = time.monotonic() + s.telemetry.interval_s
        wd_every = self.notifier.watchdog_s / 2.0 if self.notifier.watchdog_s else 0.0
        next_wd = time.monotonic()
        while not p.finished.is_set():
            now = time.monotonic()
            if self._stop_signal and not p.stop_capture.is_set():
                log.info("%s: stopping; draining %d queued frames and %d results", self._stop_signal,
                            len(p.frames), len(p.results))
                p.request_stop(self._stop_signal)
            if self.duration is not None and now - t_start >= self.duration and not p.stop_capture.is_set():
                p.request_stop("duration reached")
            if p.stop_capture.is_set():
                self._stop_all.set()      # wakes a camera waiting out a back-off
                if now - p.stop_requested_at > s.pipeline.drain_timeout_s:
                    break                 # _shutdown() ends the drain (one deadline for the whole stop)
            self._reload_on_sighup()
            self.camera.watchdog(now)
            try:
                self._check_health()
            except EdgeADError as exc:   # polled ten times a second: logged at once, then at most once a minute
                since = self._health_log.hit()
                if since:
                    log.error("model health check: %s (%d time(s) since the last report; reported again in %.0f s at "
                              "the earliest)", exc, since, self._health_log.interval_s)
            if now >= next_tel:
                next_tel = now + self.settings.telemetry.interval_s
                self._emit_telemetry()
            if wd_every and now >= next_wd and self._healthy():
                self.notifier.watchdog()
                next_wd = now + wd_every
            p.finished.wait(0.1)

    def _reload_on_sighup(self) -> None:
        """The supervisor's turn for SIGHUP: start the bundle reload on a thread of its own
        (:meth:`_in_background`). One reload at a time, after a calibration or model change an MQTT command is
        making (:meth:`Commands.reload`), and after a health rollback's swap; SIGHUPs during one make one more
        after it."""
        if self._change_running() or not self._hup:
            return
        self._hup = False
        if self.pipeline.stop_capture.is_set():
            log.info("SIGHUP: not reloaded: the run is stopping")
            return
        self._in_background("SIGHUP reload", lambda: log.info(
            "SIGHUP: bundle reloaded: %s", reload_text(self.commands.reload({"what": "bundle"})["bundle"])))

    def _in_background(self, what: str, change) -> None:
        """Run ``change``, a model change (a SIGHUP reload, a health rollback's swap), on a thread of its own.
        Either ran on the supervisor thread, and a model swap may take a minute (the sha256 of every file, the
        new model opened, up to SWAP_WAIT_S for a batch still in the old one) while no WATCHDOG=1 went out:
        systemd (WatchdogSec=30) killed the line in the middle of it. The supervisor now goes on meanwhile
        (watchdog, telemetry, a stop: :meth:`_join_change`). One at a time (:meth:`_change_running`). An
        EdgeADError is logged; another error is raised from the supervisor, as before."""
        def run() -> None:
            try:
                change()
            except EdgeADError as exc:
                log.error("%s failed: %s", what, exc)
            except Exception as exc:
                self._change_error = exc

        self._change_what = what
        self._change_thread = threading.Thread(target=run, name=what.lower().replace(" ", "-"), daemon=True)
        self._change_thread.start()

    def _change_running(self) -> bool:
        """Whether a model change runs on its thread (:meth:`_in_background`). One that ended is let go here,
        and its error other than an EdgeADError raised, from the supervisor."""
        t = self._change_thread
        if t is None:
            return False
        if t.is_alive():
            return True
        self._change_thread = None
        err, self._change_error = self._change_error, None
        if err is not None:
            raise err
        return False

    def _join_change(self) -> bool:
        """At the stop: wait up to RELOAD_STOP_WAIT_S for a model change still running (the drained pipeline
        leaves it no batch to wait for). True when it still runs: the backend is then not closed under it."""
        t = self._change_thread
        if t is None:
            return False
        t.join(RELOAD_STOP_WAIT_S)
        err, self._change_error = self._change_error, None
        if err is not None:
            log.error("%s failed: %s: %s", self._change_what, type(err).__name__, err, exc_info=err)
        if t.is_alive():
            log.warning("the backend is left open: the %s is still running past the stop", self._change_what)
        return t.is_alive()

    def _close_commands(self, reason: str) -> None:
        """The pipeline's ``on_stop``: the run stops (``reason``), MQTT commands waiting are answered ``failed``
        and none runs any more (``status`` is answered until the link stops): see :meth:`MqttLink.close_commands`.
        An ``inspect`` or a live ``calibrate`` running is cancelled by the pipeline's stop right after, and
        answered ``failed`` too."""
        if self.link is not None:
            self.link.close_commands(reason)

    def _shutdown(self, t_start: float) -> dict:
        p = self.pipeline
        p.request_stop(self._stop_signal or "finished")
        self.notifier.stopping(f"draining: {p.end_reason or self._stop_signal or 'finished'}")
        self._stop_all.set()
        limit = self.settings.pipeline.drain_timeout_s
        drained = p.join(timeout=max(0.0, p.stop_requested_at + limit - time.monotonic()))
        if not drained:
            p.abandon(f"the queues did not drain within pipeline.drain_timeout_s = {limit:g} s")
            p.join(timeout=ABANDON_GRACE_S)     # idle threads see the closed queues and end at once
        # inspection ends here: what follows (closing outputs, the outbox flush: up to 10 s against a hung
        # broker or a full disk) is the stop, and must not show as a slow line in the summary's fps
        t_inspected = time.monotonic()
        reloading = self._join_change()   # before the outbox flush: its model event goes out too
        busy = p.busy()
        if busy:
            log.error("stopping without the %s thread(s), still busy past the stop deadline", ", ".join(busy))
        if self.trigger is not None:
            try:
                self.trigger.stop()
            except Exception:  # a plug-in's stop() must not cost the outbox flush, the log and the backend
                log.exception("source.trigger '%s': stop() failed; stopping the rest anyway",
                              self.settings.source.trigger)
        try:
            final = self._emit_telemetry()
        except Exception as exc:  # never let telemetry block the shutdown
            log.warning("final telemetry failed: %s", exc)
            final = {}
        self.reporter.report_held_failures()   # before the link stops: their events still go out
        # a drift flagged now is ended before the 'stopped' status (the next run measures afresh)
        self.reporter.stop_drift(self.inspector.calibration)
        if "reporting" in busy:   # a write still hangs: closing the log under it would lose that line too
            log.warning("the result log is left open: the reporting thread is still writing")
        else:
            self.reporter.close()
        self.telemetry.stop()
        if self.telemetry_log is not None:
            self.telemetry_log.close()
        outbox_left = outbox = outbox_dropped = outbox_dropped_by = outbox_reset = None
        if self.link is not None:
            self.link.stop(timeout=10.0)
            if hasattr(self.link, "outbox"):
                outbox_left, outbox = self.link.outbox.depth, str(self.link.outbox.path)
                reset = getattr(self.link.outbox, "reset", None)   # a damaged file moved aside at start
                outbox_reset = reset["moved_to"] if reset else None
                outbox_dropped = self.link.outbox.dropped - self._outbox_dropped0   # by this run
                # why: the outbox was full, or the broker does not take the message (over its max_packet_size)
                outbox_dropped_by = {k: v - self._outbox_dropped_by0.get(k, 0)
                                     for k, v in getattr(self.link.outbox, "dropped_by", {}).items()}
        if "inference" in busy:   # never close a backend under a running batch
            log.warning("the backend is left open: a batch is still being inferred past the stop deadline")
        elif not reloading:       # nor one a reload may be opening or swapping in
            try:
                self.inspector.backend.close()
            except Exception as exc:
                log.debug("closing the backend: %s", exc)
        self.notifier.close()
        with self._swap_lock:
            hold, self._hold = self._hold, None
        if hold is not None:
            hold.release()
        inspect_s = t_inspected - t_start
        stop_s = time.monotonic() - t_inspected
        ok, ng = self.reporter.counts()
        summary = {"frames": p.inspected, "captured": p.captured, "ok": ok, "ng": ng,
                   "dropped": p.dropped, "discarded_at_stop": p.discarded_at_stop, "unreported": p.unreported,
                   "output_errors": dict(self.reporter.output_errors), "snapshots_skipped": p.snapshots_skipped,
                   "skipped_untriggered": p.skipped_untriggered, "inference_errors": p.inference_errors,
                   "outages": self.camera.outages, "reconnects": self.camera.reconnects,
                   "duration_s": round(inspect_s, 3), "stop_s": round(stop_s, 3),
                   "fps": round(p.inspected / inspect_s, 3) if inspect_s > 0 else 0.0,
                   "reason": self._stop_signal or p.end_reason or "finished", "drained": drained,
                   "jsonl": str(self.settings.output.jsonl) if self.settings.output.jsonl else None,
                   "outbox_left": outbox_left, "outbox_dropped": outbox_dropped,
                   "outbox_dropped_by": outbox_dropped_by, "outbox": outbox,
                   "outbox_reset": outbox_reset, "rss_mb": (final.get("process") or {}).get("rss_mb")}
        log.debug("edge-ad run finished: %s", summary)   # edge-ad run prints it
        self.finished = True
        return summary


class RollbackFailure(RuntimeFailure):
    """A rollback of a release the line cannot run that could not be made (:meth:`Service._roll_back`); its
    ``model_health`` event's ``rollback`` (``rollback``): "impossible" (no previous release, or one that cannot be
    opened, a damaged link: as the health check's rollback says it) or "failed" (it could not be written, a full
    disk before 'current' moved: nothing changed, 'current' is still the release)."""

    def __init__(self, message: str, rollback: str):
        super().__init__(message)
        self.rollback = rollback


def _rolled_back_event(release: str, reason: str, back) -> dict:
    """The ``model_health`` event of ``release`` rolled back before the line ran it (it cannot be opened, it failed
    its health check before a restart, update_model could not swap it in): ``back`` is the deploy folder's state
    after the rollback, as a health-check rollback's event names it."""
    return {"type": "model_health", "status": "failed", "reason": reason, "release": release, "rolled_back": True,
            "rollback": "done", "restored": str(back.current_path), "rolled_back_to": back.current}


_FETCH_SCHEMES = ("file", "http", "https")   # and a plain local path (no scheme)


def _fetch_archive(url: str, folder: Path, sha256: str, max_mb: float = 1024.0, timeout_s: float = 600.0) -> Path:
    """A local copy of a bundle archive (file://, a path, or http(s)://), checked against ``sha256``.

    A download lands in ``folder`` under a name made from the command's sha256 (``<16 hex>.tar``, or
    ``.tar.gz`` when the URL's path ends in .tar.gz / .tgz: only messages see the suffix, extraction
    detects compression), never from the URL, whose path may end in ``/..``, ``/.`` or nothing, or carry
    any character. It is written to a ``.part`` file and moved in place only once its sha256 matches: a
    failed, refused or interrupted download leaves nothing behind. A mismatch is refused without the
    file's own sha256 (:func:`_check_sha256`).

    A download is bounded (a server streaming forever or trickling must not fill the deploy disk or hold the
    deploy lock): at most ``max_mb`` MiB (``model.download_max_mb``) and at most half the free space of
    ``folder``'s disk (the install unpacks the archive beside it), refused before any byte when the server's
    Content-Length says more; and done within ``timeout_s`` seconds (``model.download_timeout_s``) from the
    request, each wait for the server also bounded by it (at most 60 s). RuntimeFailure naming the URL, the
    limit and the setting."""
    import hashlib
    import http.client
    import shutil
    import time
    import urllib.request
    from urllib.parse import urlsplit

    from .. import atomic

    parts = urlsplit(url)
    if parts.scheme and parts.scheme not in _FETCH_SCHEMES:   # not a relative path "ftp:/host/x.tar" not found
        raise InputError(f"update_model: url scheme '{parts.scheme}:' is not supported; expected "
                         f"{', '.join(s + '://' for s in _FETCH_SCHEMES)} or a local path (a relative file name "
                         "with ':' in it: write it as ./name)")
    if parts.scheme in ("http", "https"):
        where = parts.netloc.rsplit("@", 1)[-1]   # host[:port], without user name and password
        shown = f"{parts.scheme}://{where}{parts.path}"   # nor the query (it may carry a token)
        folder.mkdir(parents=True, exist_ok=True)
        want = sha256.lower()
        dest = folder / (want[:16] + (".tar.gz" if parts.path.lower().endswith((".tar.gz", ".tgz")) else ".tar"))
        tmp = folder / f".{dest.name}.part"   # what install_bundle's cleanup of a killed install removes
        free = shutil.disk_usage(folder).free
        limit = min(int(max_mb * 2**20), free // 2)
        cap = (f"{max_mb:g} MiB (model.download_max_mb)" if limit == int(max_mb * 2**20) else
               f"{limit / 2**20:.1f} MiB, half the free space of {folder} ({free / 2**20:.1f} MiB free: the install "
               "unpacks it beside the download; free disk space)")
        late = (f"update_model: cannot download {shown}: not done within {timeout_s:g} s "
                "(model.download_timeout_s); stopped, nothing kept")
        h = hashlib.sha256()
        deadline = time.monotonic() + timeout_s
        try:
            try:
                with urllib.request.urlopen(url, timeout=min(60.0, timeout_s)) as r, open(tmp, "wb") as fh:
                    length = r.headers.get("Content-Length", "")
                    if length.strip().isdigit() and int(length) > limit:   # refused before any byte
                        raise RuntimeFailure(f"update_model: cannot download {shown}: its Content-Length, "
                                             f"{int(length)} bytes, is over {cap}; nothing downloaded")
                    got = 0
                    while chunk := r.read1(1 << 20):   # what has come: a trickle is checked against the deadline
                        got += len(chunk)
                        if got > limit:
                            raise RuntimeFailure(f"update_model: cannot download {shown}: the archive is larger "
                                                 f"than {cap}; stopped, nothing kept")
                        if time.monotonic() > deadline:
                            raise RuntimeFailure(late)
                        h.update(chunk)
                        fh.write(chunk)
            except TimeoutError as exc:   # a wait for the server: over the deadline or 60 s without a byte
                raise RuntimeFailure(late if time.monotonic() > deadline else
                                     f"update_model: cannot download {shown}: {exc}") from exc
            except (OSError, ValueError, http.client.HTTPException) as exc:   # e.g. InvalidURL (a bad port)
                raise RuntimeFailure(f"update_model: cannot download {shown}: {exc}") from exc
            _check_sha256(shown, h.hexdigest(), sha256)
            os.replace(tmp, dest)
        finally:   # failed, refused or interrupted: no partial or unchecked download stays
            tmp.unlink(missing_ok=True)
        return dest
    dest = _local_path(url, parts)
    if dest.is_dir():
        raise InputError(f"update_model: url {url!r}: {dest} is a folder: update_model takes an archive made "
                         "by 'edge-ad bundle pack' (its sha256 is the file's)")
    if not dest.is_file():
        raise InputError(f"update_model: archive {dest} not found")
    _check_sha256(str(dest), atomic.sha256_file(dest), sha256)
    return dest


def _local_path(url: str, parts) -> Path:
    """The local file that ``url`` (split: ``parts``) names: a file:// URL, percent-decoded as camera sources
    are (file:///my%20parts/b.tar is "/my parts/b.tar"; file://localhost/PATH is PATH), or a plain path, taken
    as written. InputError naming the part of the URL that would be misread: a host (file://nas/b.tar was
    the relative path nas/b.tar), a query or fragment (dropped, so another file than the one meant), a
    leading '~' (never expanded: the service's user is not the sender's)."""
    from urllib.parse import unquote

    where = f"update_model: url {url!r}: "
    if parts.scheme == "file":
        if parts.netloc and not parts.netloc.startswith("~") and parts.netloc.lower() != "localhost":
            raise InputError(f"{where}host '{parts.netloc}' in a file:// URL; expected file:///PATH or "
                             "file://localhost/PATH (three slashes before an absolute path: update_model reads "
                             "files of this device; fetch one from another machine over http:// or https://)")
        for part, mark in ((parts.query, "?"), (parts.fragment, "#")):
            if part:
                raise InputError(f"{where}a file:// URL takes no {'query' if mark == '?' else 'fragment'} "
                                 f"('{mark}{part}'); expected file:///PATH (a '?' or '#' in a file name is "
                                 "written %3F or %23)")
        text = unquote(parts.netloc + parts.path) if parts.netloc.startswith("~") else unquote(parts.path)
    else:
        text = url
    if text.startswith("~"):
        raise InputError(f"{where}'~' is not expanded (the service runs as its own user, with its own home); "
                         "expected an absolute path, e.g. /home/NAME/b2.tar or file:///home/NAME/b2.tar (a "
                         "relative file name starting with '~': write it as ./~NAME)")
    return Path(text)


def _check_sha256(shown: str, got: str, sha256: str) -> None:
    """Refuse an archive whose sha256 is not the command's, without saying what it is: a command may name
    any local file the service can read, and a reply giving its sha256 would hand that to whoever can send
    commands. The operator finds it in the log."""
    if got != sha256.lower():
        log.warning("update_model: %s has sha256 %s, the command says %s; refused", shown, got, sha256.lower())
        raise InputError(f"update_model: {shown}: its sha256 does not match the command's ({sha256[:16]}…); "
                         "refusing it")


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays, Paths, tuples and dataclasses converted)."""
    import dataclasses

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj
