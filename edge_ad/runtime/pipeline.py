"""The inspection pipeline: capture -> bounded queue -> inference -> bounded queue -> reporting.

Three threads, each owning one stage:

- **capture** reads the :class:`~edge_ad.runtime.capture.Camera`, applies ROI and rotation, and puts
  frozen :class:`Frame` records on the frame queue. Stream mode: the queue's policy is ``drop_oldest``
  (the newest frame wins; every frame pushed out is counted in ``dropped``). Trigger mode: ``block``
  (nothing is dropped; the capture waits), and with a ``command`` / ``gpio`` / plug-in trigger only
  frames released by the :class:`TriggerGate` are queued.
- **inference** takes one frame, plus up to ``max_batch - 1`` more that already wait (batching only
  when frames queue up, so a lone frame is never delayed), runs the Inspector, decides OK / NG, and
  puts :class:`ResultItem` records on the result queue (``block``). An NG (or snapshot) item carries the
  combined map at the model's map resolution, never a full-resolution map; it carries the image only when
  the reporting will make a snapshot or event image of it, and only while the images held in the queue
  stay within ``result_queue_image_bytes`` (past it the image is left out and counted in
  ``snapshots_skipped``: the decision is still reported). A slow disk then costs bounded memory.
- **reporting** (:class:`~edge_ad.runtime.reporting.Reporter`) finds the regions of NG frames (on the
  full-resolution map it upsamples there), writes the outbox, JSONL and snapshots.

Stopping: ``request_stop()`` stops the capture, whose ``finally`` closes the frame queue; inference
drains it and closes the result queue; reporting drains that. Nothing accepted into a queue is lost.
``on_stop(reason)`` is called at the first ``request_stop()`` (the runtime stops taking MQTT commands), then
the live calibrations and ``inspect`` requests waiting for frames end (``cancelled``): no frame will come.
When the drain outlasts its deadline, ``abandon()`` ends it: frames not inferred yet are counted in
``discarded_at_stop``, decisions not reported yet in ``unreported``; a thread still busy with one batch or
one write is left to finish it alone and touches no queue or counter afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .. import scoring
from ..data.image import resize_rgb, to_batch
from ..errors import EdgeADError, InputError, RuntimeFailure
from .capture import Camera
from .queues import STOP, BoundedQueue, DropPolicy
from .records import Decision, Frame, ResultItem
from .sources import SourceLost
from .telemetry import LatencyWindow
from .triggers import TriggerGate

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_ERRORS = 5
RESULT_QUEUE_IMAGE_BYTES = 256 * 2**20   # images held in the result queue for snapshots (default)
SKIPPED_LOG_S = 60.0                     # skipped snapshot images are logged at most this often


def roi_misfit(image: np.ndarray, roi: Optional[list[int]], where: str = "") -> str:
    """Why ``roi`` = [x, y, w, h] does not fit ``image`` ("" when it does, or when there is no ROI): the
    frame's size and the ROI, after ``where`` (the frame: a folder's file, a camera's frame number)."""
    if not roi:
        return ""
    x, y, w, h = roi
    H, W = image.shape[:2]
    if x + w <= W and y + h <= H:
        return ""
    return (f"{where + ': ' if where else ''}source.roi {roi} reaches outside the {W}x{H} frame "
            f"(x + width <= {W}, y + height <= {H})")


class RoiFilter:
    """Whether ``source.roi`` fits each frame a source delivers; ``run``'s capture thread and ``edge-ad capture
    --config`` decide alike. A folder's image it does not fit (a smaller one among the others) is skipped with
    a warning naming the file and counted (``skipped``), as an unreadable one is: stopping made a restarted
    service list the folder again and replay it from the first image up to the same file (warned about once per
    file, however many passes a looping folder makes). A folder the ROI
    fits no image of is an InputError (one pass of it in a row, or at its end: :meth:`at_end`), as is a camera
    frame it does not fit (the ROI, or the camera's resolution, is wrong)."""

    def __init__(self, roi: Optional[list[int]]):
        self.roi = roi
        self.skipped = 0          # a folder's images the ROI does not fit (smaller ones): skipped, named
        self._fitted = False      # some frame fitted the ROI
        self._misfits = 0         # folder images in a row the ROI did not fit
        self._warned: set[str] = set()   # folder images warned about: once each, not at every loop pass

    def fits(self, raw, cam) -> bool:
        """Whether the ROI fits ``raw``, a frame :class:`~edge_ad.runtime.capture.Camera` ``cam`` read (False:
        skip it, it was logged and counted)."""
        if not self.roi:
            return True
        name = (raw.truth or {}).get("file") if not cam.source.live else None
        why = roi_misfit(raw.image, self.roi, f"{cam.name} {name}" if name else f"{cam.name} frame {raw.index}")
        if not why:
            self._fitted = True
            self._misfits = 0
            return True
        if name is None:
            raise InputError(why)
        self.skipped += 1
        self._misfits += 1
        if name not in self._warned:   # a looping dir:// of 25 images at 10 fps repeated it every 2.5 s
            self._warned.add(name)
            log.warning("skipped %s (said once per file; every skip counts in skipped_images)", why)
        listed = int(getattr(cam.source, "listed", 0) or 0)
        if listed and self._misfits >= listed:   # a looping folder would skip forever
            raise InputError(f"source.roi {self.roi} fits none of the {listed} images of {cam.name} "
                             "(each was skipped with a warning); expected x + width and y + height within "
                             "the images")
        return False

    def at_end(self, cam) -> None:
        """``cam``'s source ended: an InputError when the ROI fitted none of the images it delivered."""
        if self.skipped and not self._fitted:
            raise InputError(f"source.roi {self.roi} fits none of the {self.skipped} images {cam.name} delivered "
                             "(each was skipped with a warning); expected x + width and y + height within the "
                             "images")


def apply_roi_rotate(image: np.ndarray, roi: Optional[list[int]], rotate: int, where: str = "") -> np.ndarray:
    """Crop ``roi`` = [x, y, w, h] (checked against the frame: InputError naming ``where``, the frame's
    size and the ROI) then rotate clockwise by ``rotate``."""
    import cv2

    if roi:
        why = roi_misfit(image, roi, where)
        if why:
            raise InputError(why)
        x, y, w, h = roi
        image = image[y:y + h, x:x + w]
    if rotate == 90:
        image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    elif rotate == 180:
        image = cv2.rotate(image, cv2.ROTATE_180)
    elif rotate == 270:
        image = cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return np.ascontiguousarray(image)


def _finite_frames(scores: np.ndarray, frames: list, cal) -> list[int]:
    """Indices of the frames whose image score is a finite number. A score that is not decides nothing:
    when no frame of the batch has one, the batch is an inference error (counted in ``inference_errors``);
    otherwise the others are decided and the caller reports the rest as an inference error."""
    good = [i for i, s in enumerate(scores) if np.isfinite(s)]
    if not good:
        raise RuntimeFailure(_not_finite(scores, frames, range(len(frames)), cal))
    return good


def _not_finite(scores: np.ndarray, frames: list, bad, cal) -> str:
    bad = list(bad)
    i = bad[0]
    return (f"image score {float(scores[i])} of frame {frames[i].seq} ({len(bad)} of {len(frames)} in the "
            f"batch): expected a finite number; the model output or calibration v{cal.version} is broken, so "
            "no decision was made")


@dataclass
class InspectRequest:
    """An MQTT ``inspect`` waiting for the decisions of the next ``count`` frames."""

    count: int
    part_id: Optional[str] = None
    snapshot: bool = False          # keep the image and map of these frames even when OK (snapshot command)
    publish: bool = False           # and send the snapshot as an MQTT event with its JPEG
    heatmap: Optional[bool] = None  # overlay the map on that snapshot (None: output.heatmap)
    note: str = ""
    image: dict = field(default_factory=dict)   # what became of the published JPEG (image / image_skipped)
    t_created: float = field(default_factory=time.time)
    assigned: int = 0
    results: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: str = ""   # why it was cancelled (the run is stopping): ``done`` is set with fewer frames

    def deliver(self, record: dict) -> None:
        self.results.append(record)
        if len(self.results) >= self.count:
            self.done.set()


@dataclass
class FrameCollector:
    """Collects the next ``count`` inspected frames (for recalibration from the live stream): each one as the
    model saw it (after ROI and rotation, resized to its input size: a few KB, where the running service
    held every full camera frame), and its label (``frame SEQ (TS)`` as its result record has them, with
    the file name of a folder source)."""

    count: int
    frames: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: str = ""   # why it was cancelled (the run is stopping): ``done`` is set with fewer frames

    def offer(self, image: np.ndarray, label: str = "") -> None:
        if len(self.frames) < self.count and not self.cancelled:
            self.frames.append(image)
            self.labels.append(label)
            if len(self.frames) >= self.count:
                self.done.set()


def _frame_label(f: Frame) -> str:
    """A collected frame's name in calibration messages: its result record's ``frame`` and ``ts``, and the
    image file it came from (a folder source)."""
    import datetime as dt

    ts = dt.datetime.fromtimestamp(f.t_wall, dt.timezone.utc).isoformat(timespec="milliseconds")
    label = f"frame {f.seq} ({ts.replace('+00:00', 'Z')})"
    file = (f.truth or {}).get("file")
    return f"{file}, {label}" if file else label


class Pipeline:
    def __init__(self, *, camera: Camera, inspector, reporter, mode: str = "stream",
                 gate: TriggerGate | None = None, trigger: str = "stream", roi: Optional[list[int]] = None,
                 rotate: int = 0, queue_size: int = 2, result_queue_size: int = 256, max_batch: int = 4,
                 threshold: Optional[float] = None, min_region_area: int = 4, max_regions: int = 16,
                 max_frames: Optional[int] = None, on_event: Callable[[dict], None] | None = None,
                 result_queue_image_bytes: int = RESULT_QUEUE_IMAGE_BYTES,
                 on_stop: Callable[[str], None] | None = None):
        self.camera = camera
        self._inspector = inspector
        self.reporter = reporter
        self.mode = str(getattr(mode, "value", mode))
        self.gate = gate
        self.trigger = trigger if self.mode == "trigger" else "stream"
        self.gated = self.mode == "trigger" and trigger != "frame"
        self.roi = roi
        self.rotate = int(rotate)
        self.max_batch = int(max_batch)
        self.threshold_override = threshold
        self.min_region_area = int(min_region_area)
        self.max_regions = int(max_regions)
        self.max_frames = int(max_frames) if max_frames else None
        self.on_event = on_event or (lambda e: None)
        self.on_stop = on_stop or (lambda reason: None)
        policy = DropPolicy.DROP_OLDEST if self.mode == "stream" else DropPolicy.BLOCK
        self.frames: BoundedQueue[Frame] = BoundedQueue(queue_size, policy, "frames")
        self.results: BoundedQueue[ResultItem] = BoundedQueue(result_queue_size, DropPolicy.BLOCK, "results")
        # images held by queued results (for snapshots): bounded in bytes, not only in items
        self.result_queue_image_bytes = int(result_queue_image_bytes)
        self.queued_image_bytes = 0
        self.queued_image_bytes_high_water = 0
        self.snapshots_skipped = 0   # snapshot / event images left out because the queue held too many bytes
        self._image_lock = threading.Lock()
        self._skipped_log = (0.0, 0)   # (monotonic of the last log line, skipped since)
        self.stop_capture = threading.Event()
        self.stop_requested_at: Optional[float] = None   # time.monotonic() of the first request_stop()
        self.abandoned = threading.Event()               # the stop deadline passed: see abandon()
        self.paused = threading.Event()
        self.finished = threading.Event()
        self.latency = {k: LatencyWindow() for k in ("capture", "queue", "preprocess", "infer", "score", "total")}
        self._swap_lock = threading.Lock()
        self._swap_cond = threading.Condition(self._swap_lock)
        self._busy: dict[int, int] = {}   # id(inspector) -> batches in its backend now (see wait_idle)
        self._req_lock = threading.Lock()
        self._requests: list[InspectRequest] = []
        self._collectors: list[FrameCollector] = []
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        self.end_reason = ""
        # counters
        self.captured = 0          # frames accepted into the frame queue (or dropped from it)
        self.inspected = 0
        self.skipped_untriggered = 0
        self.roi_filter = RoiFilter(roi)   # a folder's images the ROI does not fit: skipped, named, counted
        self.skipped_paused = 0
        self.triggers_dropped_paused = 0   # triggered frames that came while paused: dropped, not replayed
        self.discarded_at_stop = 0   # frames accepted but never inferred (a failure, max frames, the stop deadline)
        self.unreported = 0          # decisions made but never handed to the reporter (counted in inspected)
        self._in_flight = 0          # frames of the batch being inferred
        self._count_lock = threading.Lock()
        self.inference_errors = 0
        self.first_inference_error = ""   # "Type: message" of the first batch that failed
        self.batches = 0
        self.last_frame_image: Optional[np.ndarray] = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ public
    @property
    def inspector(self):
        return self._inspector

    def set_inspector(self, inspector) -> None:
        """Swap the inspector (a new model): the next batch runs on it. A batch already in the old one's
        backend finishes there: :meth:`wait_idle` before closing it."""
        with self._swap_lock:
            self._inspector = inspector

    def wait_idle(self, inspector, timeout: float) -> bool:
        """Wait until no batch is in ``inspector``'s backend (one swapped out: no new batch takes it), for up to
        ``timeout`` s; whether it is idle. Closing a backend under a batch made its frames an inference
        error instead of decisions."""
        with self._swap_cond:
            return self._swap_cond.wait_for(lambda: not self._busy.get(id(inspector)), timeout)

    @property
    def dropped(self) -> int:
        return self.frames.dropped

    @property
    def skipped_roi(self) -> int:
        """A folder's images the ROI does not fit (smaller ones): skipped with a warning naming them."""
        return self.roi_filter.skipped

    @property
    def skipped_images(self) -> int:
        """Images of a folder (or a still file://) skipped: unreadable ones, and those the ROI does not fit."""
        return self.skipped_roi + int(getattr(getattr(self.camera, "source", None), "skipped", 0) or 0)

    def start(self) -> None:
        self.started_at = time.monotonic()
        for name, target in (("capture", self._capture_loop), ("inference", self._inference_loop),
                             ("reporting", self._report_loop)):
            t = threading.Thread(target=target, name=f"edge-ad-{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self.stop_capture.is_set():
            self.end_reason = self.end_reason or reason
            self.stop_requested_at = time.monotonic()
            self.stop_capture.set()
            try:   # before the requests end: a command waiting behind a cancelled inspect must not start
                self.on_stop(self.end_reason)
            except Exception:  # the stop goes on whatever the hook does
                log.exception("stopping: on_stop failed")
        with self._req_lock:   # a live calibration or an inspect gets no more frames: it ends now, not at its timeout
            # (an inspect whose frames are all assigned gets them: the drain reports them)
            for c in [*self._collectors, *(r for r in self._requests if r.assigned < r.count)]:
                c.cancelled = c.cancelled or self.end_reason or reason
                c.done.set()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float = 30.0) -> bool:
        """Wait for the queues to drain; True when every thread finished within ``timeout`` s.

        A capture stuck in a read (a stalled camera) does not hold up the drain: after a short grace the
        frame queue is closed here, so inference and reporting finish what was accepted.
        """
        deadline = time.monotonic() + timeout
        cap = self._threads[0] if self._threads else None
        if cap is not None:
            cap.join(timeout=min(2.0, timeout))
            if cap.is_alive():
                log.warning("capture is blocked in a read; draining what was captured without it")
                self.frames.close()
        for t in self._threads[1:]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads[1:])

    def busy(self) -> list[str]:
        """Names of the stages whose thread still runs (``capture``, ``inference``, ``reporting``)."""
        return [t.name.removeprefix("edge-ad-") for t in self._threads if t.is_alive()]

    def abandon(self, reason: str) -> None:
        """End a drain that outlasted its deadline: close both queues and count what is left in them. Frames
        still queued, and the batch being inferred, are counted in ``discarded_at_stop`` (its decisions, if
        the backend returns them later, are never made); decisions waiting for the reporting in
        ``unreported``. A thread still busy (a batch in the backend, a write on a slow disk) finishes that
        one item alone; the caller must not close what it uses (see ``busy()``)."""
        with self._count_lock:
            self.abandoned.set()
            self.frames.close()
            frames = len(self.frames.drain_all()) + self._in_flight
            self._in_flight = 0
            self.discarded_at_stop += frames
            self.results.close()
            dropped = self.results.drain_all()
            self._release_images(dropped)
            decisions = len(dropped)
            self.unreported += decisions
        log.error("%s: %d frame(s) discarded before inference (discarded_at_stop), %d decision(s) not reported "
                  "(unreported)", reason, frames, decisions)

    def pause(self) -> None:
        self.paused.set()

    def resume(self) -> None:
        if self.gated and self.gate is not None:
            self.triggers_dropped_paused += self.gate.clear()
        self.paused.clear()

    def inspect_request(self, count: int = 1, part_id: str | None = None, snapshot: bool = False,
                        publish: bool = False, note: str = "") -> InspectRequest:
        """Register an inspect request: the next ``count`` inspected frames are delivered to it. In a
        gated trigger mode it also releases ``count`` frames."""
        req = InspectRequest(int(count), part_id=part_id, snapshot=bool(snapshot), publish=bool(publish),
                             note=str(note or ""))
        with self._req_lock:
            self._requests.append(req)
            if self.stop_capture.is_set():   # the run is stopping: no frames will come
                req.cancelled = self.end_reason or "stop requested"
                req.done.set()
                return req
        if self.gated and self.gate is not None:
            self.gate.fire_frames(req.count, source="inspect command")
        return req

    def cancel_request(self, req: InspectRequest) -> None:
        with self._req_lock:
            if req in self._requests:
                self._requests.remove(req)

    def collect_frames(self, count: int) -> FrameCollector:
        """Register a collector of the next ``count`` inspected frames. In a gated trigger mode those are the
        frames the line's trigger releases (its next parts): firing the gate here would inspect and publish
        frames of no part. With ``trigger = "command"`` only ``inspect`` releases frames: refused."""
        if self.gated and self.trigger == "command":
            raise InputError("live calibration on a line with source.trigger = \"command\" has no frames to "
                             "collect (only the inspect command releases frames); give a folder of normal parts "
                             "instead: \"source\": \"dir:///path/to/normals\"")
        c = FrameCollector(int(count))
        with self._req_lock:
            self._collectors.append(c)
            if self.stop_capture.is_set():   # the run is stopping: no frames will come
                c.cancelled = self.end_reason or "stop requested"
                c.done.set()
        return c

    def cancel_collector(self, c: FrameCollector) -> None:
        with self._req_lock:
            if c in self._collectors:
                self._collectors.remove(c)

    def stats(self) -> dict[str, Any]:
        return {"mode": self.mode, "trigger": self.trigger, "captured": self.captured, "inspected": self.inspected,
                "dropped": self.frames.dropped, "skipped_untriggered": self.skipped_untriggered,
                "skipped_images": self.skipped_images,
                "skipped_paused": self.skipped_paused, "triggers_dropped_paused": self.triggers_dropped_paused,
                "discarded_at_stop": self.discarded_at_stop,
                "unreported": self.unreported, "snapshots_skipped": self.snapshots_skipped,
                "inference_errors": self.inference_errors, "batches": self.batches,
                "paused": self.paused.is_set(),
                "queues": {"frames": len(self.frames), "frames_max": self.frames.maxsize,
                           "frames_high_water": self.frames.high_water, "results": len(self.results),
                           "results_max": self.results.maxsize, "results_high_water": self.results.high_water,
                           "results_image_mb": round(self.queued_image_bytes / 2**20, 1),
                           "results_image_mb_max": round(self.result_queue_image_bytes / 2**20, 1),
                           "results_image_mb_high_water": round(self.queued_image_bytes_high_water / 2**20, 1),
                           "frames_policy": self.frames.policy.value},
                "pending_triggers": self.gate.pending if self.gate is not None else 0}

    # ------------------------------------------------------------------ capture thread
    def _fail(self, exc: BaseException, where: str) -> None:
        if self.error is None:
            self.error = exc
        log.error("%s: %s", where, exc)
        self.request_stop(f"{where} failed")

    def _capture_loop(self) -> None:
        cam = self.camera
        live = cam.source.live
        try:
            while not self.stop_capture.is_set():
                if self.paused.is_set() and not live:
                    self.stop_capture.wait(0.05)
                    continue
                if self.gated and not live and not self.gate.wait(0.1):
                    continue   # a file or folder is read one triggered frame at a time
                if self.max_frames and self.mode == "trigger" and self.captured >= self.max_frames:
                    break
                raw = cam.read()
                t1 = time.perf_counter()
                if raw is None:
                    self.roi_filter.at_end(cam)
                    if not self.stop_capture.is_set():
                        self.end_reason = self.end_reason or "end of stream"
                    break
                if self.paused.is_set():
                    self.skipped_paused += 1
                    if self.gated and self.gate is not None:   # a part that passed while paused is gone:
                        # never inspect a later frame in its place
                        self.triggers_dropped_paused += self.gate.clear()
                    continue
                if not self.roi_filter.fits(raw, cam):   # before the trigger: a skipped image takes none
                    continue
                if self.gated and not self.gate.take():
                    self.skipped_untriggered += 1
                    continue
                image = apply_roi_rotate(raw.image, self.roi, self.rotate)
                t0, wall = cam.read_started        # after a paced source's wait: that is not capture time
                frame = Frame(seq=self.captured, image=image, source_index=raw.index, t_wall=wall,
                              t_captured=t1, capture_ms=(t1 - t0) * 1000.0, trigger=self.trigger,
                              truth=raw.truth)
                if self.frames.put(frame, cancel=self.stop_capture):
                    self.captured += 1
        except SourceLost as exc:
            self._fail(exc, "capture")
        except EdgeADError as exc:
            self._fail(exc, "capture")
        except Exception as exc:  # a bug must stop the loop with a message, not hang it
            log.exception("capture thread crashed")
            self._fail(RuntimeFailure(f"capture: {type(exc).__name__}: {exc}"), "capture")
        finally:
            self.frames.close()
            cam.close()

    # ------------------------------------------------------------------ inference thread
    def _inference_loop(self) -> None:
        consecutive = 0
        try:
            while True:
                got = self.frames.get_batch(self.max_batch, timeout=0.5)
                if got is STOP:
                    break
                if not got:
                    continue
                with self._count_lock:
                    if self.abandoned.is_set():  # taken just as abandon() emptied the queue
                        self.discarded_at_stop += len(got)
                        break
                    if self.max_frames is not None:
                        room = self.max_frames - self.inspected
                        if len(got) > room:
                            self.discarded_at_stop += len(got) - max(room, 0)
                            got = got[:max(room, 0)]
                    self._in_flight = len(got)
                if not got:
                    self.request_stop("max frames reached")
                    continue
                try:
                    items = self._infer(got)
                    consecutive = 0
                except InputError:
                    raise
                except Exception as exc:
                    with self._count_lock:
                        self._in_flight = 0
                        if self.abandoned.is_set():
                            break       # its frames were counted by abandon(); no error of this run
                    consecutive += 1
                    self._inference_error(exc, len(got))
                    if consecutive >= MAX_CONSECUTIVE_ERRORS:
                        raise RuntimeFailure(f"inference failed {consecutive} times in a row; last error: "
                                             f"{type(exc).__name__}: {exc}") from exc
                    continue
                with self._count_lock:
                    if self.abandoned.is_set():
                        break           # too late: abandon() counted these frames in discarded_at_stop
                    self._in_flight = 0
                    self.inspected += len(items)
                lost = [it for it in items if not self.results.put(it)]
                if lost:                # the reporting has stopped (a crash, the stop deadline)
                    self._release_images(lost)
                    with self._count_lock:
                        self.unreported += len(lost)
                    log.error("%d decision(s) (frames %s) not reported: the reporting has stopped", len(lost),
                              ", ".join(str(it.decision.seq) for it in lost))
                if self.max_frames is not None and self.inspected >= self.max_frames:
                    self.request_stop("max frames reached")
        except EdgeADError as exc:
            self._fail(exc, "inference")
        except Exception as exc:
            log.exception("inference thread crashed")
            self._fail(RuntimeFailure(f"inference: {type(exc).__name__}: {exc}"), "inference")
        finally:
            # whatever is still queued after a failure is counted, never silently lost
            with self._count_lock:
                self.frames.close()
                self.discarded_at_stop += len(self.frames.drain_all())
            self.results.close()

    def _inference_error(self, exc: Exception, frames: int) -> None:
        """Count, log and publish (an ``inference_error`` event) frames that got no decision."""
        self.inference_errors += 1
        what = f"{type(exc).__name__}: {exc}"
        self.first_inference_error = self.first_inference_error or what
        if isinstance(exc, EdgeADError):   # a known failure: its message says it all
            log.error("inference failed on %d frame(s): %s", frames, exc)
        else:
            log.exception("inference failed on a batch of %d frames", frames)
        self.on_event({"type": "inference_error", "error": what, "frames": frames})

    def _infer(self, frames: list[Frame]) -> list[ResultItem]:
        with self._swap_lock:
            insp = self._inspector
            self._busy[id(insp)] = self._busy.get(id(insp), 0) + 1   # a swap closes it only when done (wait_idle)
        try:
            t_deq = time.perf_counter()
            t0 = time.perf_counter()
            size = tuple(insp.image_size)
            batch = to_batch([f.image for f in frames], size)
            t1 = time.perf_counter()
            outputs = insp.raw_outputs(batch)
            t2 = time.perf_counter()
        finally:
            with self._swap_cond:
                left = self._busy.pop(id(insp)) - 1
                if left:
                    self._busy[id(insp)] = left
                self._swap_cond.notify_all()
        cal = insp.calibration                     # one calibration for the whole batch
        scored = scoring.score(insp.head(outputs, cal), cal)
        good = _finite_frames(scored.scores, frames, cal)
        if len(good) < len(frames):
            bad = sorted(set(range(len(frames))) - set(good))
            self._inference_error(RuntimeFailure(_not_finite(scored.scores, frames, bad, cal)), len(bad))
        threshold = float(self.threshold_override) if self.threshold_override is not None else float(cal.threshold)
        backend = insp.backend
        bname = getattr(backend, "name", type(backend).__name__)
        prec = getattr(backend, "precision", "")
        model_hash = insp.model_hash_of(cal)       # the same calibration: never a new hash with an old version
        items = []
        n = len(frames)
        with self._req_lock:
            requests = [r for r in self._requests]
            collectors = list(self._collectors)
        for i in good:
            f = frames[i]
            s = float(scored.scores[i])
            ng = scoring.is_ng(s, threshold)
            h, w = f.image.shape[:2]
            extra, request = {}, None
            for r in requests:
                if r.assigned < r.count and f.t_wall >= r.t_created - 0.001:
                    r.assigned += 1
                    request = r
                    if r.part_id:
                        extra["part_id"] = r.part_id
                    break
            asked = request is not None and request.snapshot
            keep = ng or asked
            # the map at map resolution (a copy: no view keeps the batch's arrays alive); the reporting
            # upsamples it for the regions and the heat map. The image only when a snapshot is made of it.
            combined = scored.combined[i].copy() if keep else None
            image, image_bytes = None, 0
            if keep and self.reporter.wants_image(ng, request):
                image_bytes = self._hold_image(f.image, f.seq, asked)
                image = f.image if image_bytes else None
            if collectors:   # the model's input, as to_batch made it: the refit needs no more
                small, label = resize_rgb(f.image, size), _frame_label(f)
                for c in collectors:
                    c.offer(small, label)
            t_dec = time.perf_counter()
            stages = {"capture": f.capture_ms, "queue": (t_deq - f.t_captured) * 1000.0,
                      "preprocess": (t1 - t0) * 1000.0, "infer": (t2 - t1) * 1000.0,
                      "score": (t_dec - t2) * 1000.0}
            total = f.capture_ms + (t_dec - f.t_captured) * 1000.0
            d = Decision(id=str(uuid.uuid4()), seq=f.seq, source_index=f.source_index, ts=f.t_wall, score=s,
                         threshold=threshold, ng=bool(ng), calibration_version=int(cal.version),
                         model_hash=model_hash, backend=bname, precision=prec, image_size=(h, w),
                         stages_ms=stages, latency_ms=total, batch=n, trigger=f.trigger,
                         truth=f.truth, extra=extra)   # regions: found by the reporting (ResultItem)
            items.append(ResultItem(d, image, combined, t_dec, request, min_region_area=self.min_region_area,
                                    max_regions=self.max_regions, image_bytes=image_bytes))
            for k, v in stages.items():
                self.latency[k].add(v)
            self.latency["total"].add(total)
        with self._req_lock:
            self._requests = [r for r in self._requests if r.assigned < r.count]
            self._collectors = [c for c in self._collectors if not c.done.is_set()]
        self.last_frame_image = frames[-1].image
        self.batches += 1
        return items

    def _hold_image(self, image: np.ndarray, seq: int, asked: bool) -> int:
        """Count ``image`` against the result queue's image budget: its bytes, or 0 when it does not fit
        (the snapshot is skipped and counted). An image the ``snapshot`` command asked for always fits."""
        nbytes = max(int(image.nbytes), 1)
        with self._image_lock:
            if asked or self.queued_image_bytes + nbytes <= self.result_queue_image_bytes:
                self.queued_image_bytes += nbytes
                self.queued_image_bytes_high_water = max(self.queued_image_bytes_high_water,
                                                         self.queued_image_bytes)
                return nbytes
            self.snapshots_skipped += 1
            last, since = self._skipped_log
            now = time.monotonic()
            if last and now - last < SKIPPED_LOG_S:
                self._skipped_log = (last, since + 1)
                return 0
            self._skipped_log = (now, 0)
        log.warning("frame %d: snapshot skipped: the result queue already holds %.0f MB of images "
                    "(pipeline.result_queue_image_mb; the disk or outbox is slower than the NG rate); %d skipped "
                    "since the last report, %d in all; the decision is still reported", seq,
                    self.queued_image_bytes / 2**20, since + 1, self.snapshots_skipped)
        return 0

    def _release_images(self, items) -> None:
        """The images of these results left the queue (reported or dropped)."""
        n = sum(getattr(it, "image_bytes", 0) for it in items if it is not None and it is not STOP)
        if n:
            with self._image_lock:
                self.queued_image_bytes = max(0, self.queued_image_bytes - n)

    # ------------------------------------------------------------------ reporting thread
    def _report_loop(self) -> None:
        item = None
        try:
            while True:
                item = self.results.get(timeout=0.5)
                if item is STOP:
                    break
                if item is None:
                    continue
                try:
                    self.reporter.report(item)
                finally:
                    self._release_images([item])
                item = None
        except EdgeADError as exc:
            self._fail(exc, "reporting")
        except Exception as exc:
            log.exception("reporting thread crashed")
            self._fail(RuntimeFailure(f"reporting: {type(exc).__name__}: {exc}"), "reporting")
        finally:
            with self._count_lock:
                self.results.close()
                rest = self.results.drain_all()
                self._release_images(rest)
                left = len(rest) + int(item is not None and item is not STOP)
                self.unreported += left
            if left:  # reporting failed: say how many decisions never reached an output
                log.error("%d decisions were not reported because reporting failed", left)
            self.finished.set()
