"""The frozen records that travel between the pipeline's threads: frames, regions, decisions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np


@dataclass(frozen=True)
class Frame:
    """A captured frame on its way to inference."""

    seq: int                      # running number of accepted frames in this run (0, 1, ...)
    image: np.ndarray             # RGB uint8 [H, W, 3], after ROI crop and rotation
    source_index: int             # frame number in the source (file frame, image index, ...)
    t_wall: float                 # time.time() when its read began (after a paced source's wait)
    t_captured: float             # time.perf_counter() when the read returned
    capture_ms: float             # time spent reading and decoding it (not the pacing wait)
    trigger: str = "stream"       # stream | frame | command | gpio | <plugin name>
    truth: Optional[Mapping[str, Any]] = None   # ground truth of synthetic sources


@dataclass(frozen=True)
class Region:
    """A connected component of the thresholded full-resolution anomaly map."""

    box: tuple[int, int, int, int]   # x, y, width, height in inspected-image pixels
    area: int                        # pixels above the threshold
    peak: float                      # highest map value inside the region

    def to_dict(self) -> dict:
        """The ``result`` schema's region form: box as x, y, w, h; ``score`` is the peak map value."""
        x, y, w, h = self.box
        return {"x": int(x), "y": int(y), "w": int(w), "h": int(h), "area": int(self.area),
                "score": round(float(self.peak), 6)}


@dataclass(frozen=True)
class Decision:
    """One inspected frame: score, decision and everything needed to trace it."""

    id: str
    seq: int
    source_index: int
    ts: float                           # time.time() of capture
    score: float
    threshold: float
    ng: bool
    calibration_version: int
    model_hash: str
    backend: str
    precision: str
    image_size: tuple[int, int]         # inspected image H, W (after ROI / rotation)
    stages_ms: Mapping[str, float]      # capture, queue, preprocess, infer, score
    latency_ms: float                   # capture start to decision
    batch: int
    trigger: str
    regions: tuple[Region, ...] = ()
    truth: Optional[Mapping[str, Any]] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        import datetime as _dt

        d = {
            "id": self.id,
            "frame": self.seq,
            "source_index": self.source_index,
            "ts": _dt.datetime.fromtimestamp(self.ts, _dt.timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "score": round(float(self.score), 6),
            "threshold": round(float(self.threshold), 6),
            "ng": bool(self.ng),
            "decision": "NG" if self.ng else "OK",
            "calibration_version": int(self.calibration_version),
            "model_hash": self.model_hash,
            "backend": self.backend,
            "precision": self.precision,
            "image_size": [int(self.image_size[0]), int(self.image_size[1])],
            "latency_ms": round(float(self.latency_ms), 3),
            "stages_ms": {k: round(float(v), 3) for k, v in self.stages_ms.items()},
            "batch": int(self.batch),
            "trigger": self.trigger,
            "regions": [r.to_dict() for r in self.regions],
        }
        if self.truth is not None:
            d["truth"] = dict(self.truth)
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class ResultItem:
    """What inference hands to reporting: the decision plus what regions and snapshots need.

    It holds nothing of the frame's size but the image a snapshot needs: the anomaly map travels at the
    model's map resolution (``combined``), and the reporting thread upsamples it to the inspected image
    when it needs it (an NG frame's regions, a heat map). The decision of an NG frame made from
    ``combined`` gets its regions there (see :meth:`edge_ad.runtime.reporting.Reporter.report`)."""

    decision: Decision
    image: Optional[np.ndarray] = None     # the inspected image, kept only for a snapshot / event image
    combined: Optional[np.ndarray] = None  # the combined map [h', w'] at map resolution (NG or snapshot)
    t_decided: float = 0.0                 # time.perf_counter() when the decision was made
    request: Any = None                    # the MQTT inspect request waiting for this decision, if any
    min_region_area: int = 4               # decision.min_region_area when the frame was decided
    max_regions: int = 16                  # decision.max_regions when the frame was decided
    image_bytes: int = 0                   # bytes of ``image`` counted against the result queue's budget
