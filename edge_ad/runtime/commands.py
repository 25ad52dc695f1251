"""The loop's MQTT command handlers (registered on :class:`edge_ad.mqtt.MqttLink`).

Each handler takes the validated argument dict and returns a result dict; an
:class:`~edge_ad.errors.EdgeADError` becomes an error reply. Handlers run on the link's command worker
(one at a time; ``status`` on a thread of its own), never on the inference thread: a long ``calibrate``
keeps the loop inspecting with the old calibration, and the new one is swapped in between two batches.

=======================  ===========================================================================
status                   pipeline, source, model, calibration, drift, outbox, settings (redacted)
set_threshold            ``threshold`` [, ``persist`` = true: a new calibration version]
inspect                  the decisions of the next ``count`` frames (trigger mode: releases them)
snapshot                 a JPEG of the next frame with its heat map [, ``publish``, ``note``]
pause / resume           stop / restart inspecting (cameras keep being read, frames are skipped)
reload                   ``what`` = bundle (calibration or model changed on disk) | config | all
calibrate                refit calibration on ``frames`` normal frames (live, or a ``source`` folder)
rollback_calibration     put ``version`` (default: the one in force replaced) back in force
update_model             install a bundle archive (verified, checked on golden images), swap it in
=======================  ===========================================================================
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from typing import TYPE_CHECKING

from ..errors import InputError, RuntimeFailure, os_error_text
from ..scoring import check_policy

if TYPE_CHECKING:  # pragma: no cover
    from .service import Service

log = logging.getLogger(__name__)

COMMAND_NAMES = ("status", "set_threshold", "inspect", "snapshot", "pause", "resume", "reload", "calibrate",
                 "rollback_calibration", "update_model")


class Commands:
    """Handlers bound to a running :class:`~edge_ad.runtime.service.Service`."""

    def __init__(self, service: "Service", inspect_timeout_s: float = 30.0):
        self.svc = service
        self.inspect_timeout_s = float(inspect_timeout_s)
        self._busy = threading.Lock()   # one calibration / model change at a time
        self._link = None

    def register(self, link) -> None:
        """Every command on ``link``; one this line's config cannot run (:meth:`unavailable`) is left out of the
        birth's ``commands`` and answered ``not_available``, saying why."""
        self._link = link
        for name in COMMAND_NAMES:
            link.register_command(name, getattr(self, name), unavailable=self.unavailable(name))

    def unavailable(self, name: str) -> str | None:
        """Why this line cannot run command ``name`` whatever its arguments (a setting the config lacks, which
        only a restart changes); None when it can."""
        if name == "update_model":
            return self.svc.update_model_unavailable()
        return None

    def _by(self, command: str) -> str:
        """What made a calibration version or a rollback: ``MQTT <command>``, with the requester's id when the
        command carried one (recorded in the version's ``source`` and the bundle's rollback record)."""
        who = self._link.dispatcher.requester() if self._link is not None else None
        return f"MQTT {command}" + (f" (client {who})" if who else "")

    # ------------------------------------------------------------------ read-only
    def status(self, args: dict) -> dict:
        return self.svc.status()

    def inspect(self, args: dict) -> dict:
        count = int(args.get("count", 1))
        req = self._wait_frames(count, part_id=args.get("part_id"))
        return {"count": len(req.results), "results": req.results}

    def snapshot(self, args: dict) -> dict:
        req = self._wait_frames(1, snapshot=True, publish=bool(args.get("publish", False)),
                                note=str(args.get("note", "")), heatmap=args.get("heatmap"))
        rec = req.results[0]
        out = {"snapshot": rec.get("snapshot"), "published": bool(req.image.get("image")), "result": rec}
        if args.get("publish") and not out["published"]:   # rate limited, too large, outbox full or not stored
            out["image_skipped"] = req.image.get("image_skipped") or "not_stored"
        return out

    def _wait_frames(self, count: int, **kw):
        pipe = self.svc.pipeline
        if pipe.paused.is_set():
            raise InputError("inspection is paused; send 'resume' first")
        heatmap = kw.pop("heatmap", None)
        req = pipe.inspect_request(count, **kw)
        if heatmap is not None:
            req.heatmap = bool(heatmap)
        timeout = self.inspect_timeout_s + 0.5 * count
        if not req.done.wait(timeout):
            pipe.cancel_request(req)
            cam = self.svc.camera.stats()
            why = "the source is in an outage" if cam["in_outage"] else "no frame arrived"
            raise RuntimeFailure(f"got {len(req.results)} of {count} frames within {timeout:g} s: {why} "
                                 f"({cam['uri']})")
        if req.cancelled and len(req.results) < count:   # the run is stopping: its frames will not come
            pipe.cancel_request(req)
            raise RuntimeFailure(f"cancelled after {len(req.results)} of {count} frames: the run is stopping "
                                 f"({req.cancelled})")
        return req

    # ------------------------------------------------------------------ state changes
    def pause(self, args: dict) -> dict:
        self.svc.pipeline.pause()
        reason = str(args.get("reason", ""))
        self.svc.event({"type": "paused", "reason": reason})
        self.svc.update_birth(paused=True)
        return {"paused": True}

    def resume(self, args: dict) -> dict:
        self.svc.pipeline.resume()
        self.svc.event({"type": "resumed"})
        self.svc.update_birth(paused=False)
        return {"paused": False}

    def set_threshold(self, args: dict) -> dict:
        try:
            thr = float(args["threshold"])
        except OverflowError:       # an integer beyond a double (the MQTT link refuses it before it gets here)
            thr = math.inf
        # any finite value, negative ones too: normalized scores are below 0 where a map is under its 0.9
        # quantile, and an 'image' layout Gaussian's fpr: or sigma: threshold can be (docs/mqtt.md)
        if not math.isfinite(thr):
            raise InputError(f"threshold {args['threshold']!r}: expected a finite number")
        persist = bool(args.get("persist", True))
        svc = self.svc
        old = svc.effective_threshold()
        if not persist:
            if svc.transient_threshold is None:   # what decides again once a calibration swap drops it
                svc.override_under_transient = svc.pipeline.threshold_override
            svc.pipeline.threshold_override = thr
            svc.transient_threshold = thr         # until the next calibration is swapped in
            svc.publish_calibration()             # its threshold_in_force
            svc.event({"type": "threshold", "threshold": thr, "previous": old, "persisted": False})
            return {"threshold": thr, "previous": old, "persisted": False}
        with self._busy, self._changing_calibration("set_threshold"), svc.bundle.calibration_lock():
            svc.check_calibration_current("set_threshold")
            cal = svc.inspector.calibration
            new = svc.bundle.write_calibration(cal.replace(version=0, created="", threshold=thr, policy="manual",
                                                           source=f"{self._by('set_threshold')}: was "
                                                                  f"{cal.threshold:g}"))
            svc.swap_calibration(new, reason="set_threshold", decides=True)   # the calibration holds it now
        return {"threshold": thr, "previous": old, "persisted": True, "calibration_version": new.version}

    def rollback_calibration(self, args: dict) -> dict:
        version = args.get("version")
        with self._busy, self._changing_calibration("rollback_calibration"):
            before = self.svc.inspector.calibration.version
            cal = self.svc.rollback_calibration(int(version) if version is not None else None,
                                                by=self._by("rollback_calibration"))
            in_force = self.svc.effective_threshold()
        return {"version": cal.version, "previous_version": before, "threshold": cal.threshold,
                "policy": cal.policy, "threshold_in_force": in_force}

    def calibrate(self, args: dict) -> dict:
        svc = self.svc
        n = int(args.get("frames", svc.settings.calibration.frames))
        policy = check_policy(str(args.get("policy", svc.settings.calibration.policy)))  # before the frames
        timeout = float(args.get("timeout_s", svc.settings.calibration.timeout_s))
        source = args.get("source") or "live"
        if not self._busy.acquire(blocking=False):
            raise RuntimeFailure("another calibration or model change is running; try again when it finished")
        try:
            with self._changing_calibration("calibrate"):   # before the frames: a read-only bundle is known now
                return svc.calibrate(n, policy, source, timeout, by=self._by("calibrate"))
        finally:
            self._busy.release()

    @contextlib.contextmanager
    def _changing_calibration(self, what: str):
        """Around a write of a new calibration: refused at once when the bundle folder cannot be written,
        and a disk error on the way (read-only, full) is a ``failed`` reply naming the file."""
        path = self.svc.bundle.path
        if not os.access(path, os.W_OK | os.X_OK):
            why = "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "not writable"
            raise RuntimeFailure(f"{what}: {path}: {why}; the calibration in force is unchanged")
        try:
            yield
        except OSError as exc:
            raise RuntimeFailure(f"{what}: {os_error_text(exc)}; the calibration in force is unchanged") from exc

    def reload(self, args: dict) -> dict:
        what = str(args.get("what", "bundle"))
        with self._busy:
            return self.svc.reload(what)

    def update_model(self, args: dict) -> dict:
        if not self._busy.acquire(blocking=False):
            raise RuntimeFailure("another calibration or model change is running; try again when it finished")
        try:
            return self.svc.update_model(args)
        finally:
            self._busy.release()

