"""Drift: are the parts judged OK still scoring like the normals the calibration was fitted on?

:class:`DriftMonitor` keeps the image scores of the last ``window`` parts judged OK and compares their
mean with the calibration's normal statistics (``calibration.normal``: mean, std, n):

- ``shift = (window mean - normal mean) / normal std``: how far the OK parts moved, in normal standard
  deviations (the effect size);
- ``z = shift / sqrt(1/n_window + 1/n_normal)``: the same as a two-sample z-statistic (both means are
  estimates), i.e. how sure we are that it moved.

Drift is flagged when ``|z| > limit`` **and** ``|shift| >= min_shift`` (default 0.5 standard deviations):
with a window of a few hundred parts the z-statistic alone calls harmless shifts significant, and a
0.5-sigma rise already multiplies the false-alarm rate of an ``fpr:0.001`` threshold by about four. Both
directions count: scores falling (a dimmer or blurred image) hide defects as surely as rising scores
raise false alarms. The flag clears with hysteresis, when ``|z| <= 0.8 limit`` or
``|shift| <= 0.8 min_shift``. Nothing is judged before ``min_samples`` OK parts are in the window.

``update()`` returns a :class:`DriftState` with ``event`` set to ``"drift"`` / ``"drift_cleared"`` on the
update where the flag changes; the runtime puts ``drift`` in telemetry and publishes the events. NG parts
do not enter the window (they are not normal parts); the window's NG rate is reported beside it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

from ..errors import InputError
from ..scoring import Calibration

HYSTERESIS = 0.8


@dataclass(frozen=True)
class DriftState:
    drift: bool
    z: float                 # two-sample z of the window mean vs the normal mean (0 until judged)
    shift: float             # (window mean - normal mean) / normal std
    mean: float              # mean score of the OK parts in the window (nan when empty)
    std: float
    n: int                   # OK parts in the window
    window: int
    limit: float
    min_shift: float
    normal_mean: float
    normal_std: float
    ng_rate: float           # NG fraction over the last ``window`` parts (OK and NG)
    judged: bool             # False until min_samples OK parts (or without normal statistics)
    event: str | None = None  # "drift" / "drift_cleared" on the update where the flag changed
    direction: str = ""      # "up" / "down" while drifting

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class DriftMonitor:
    def __init__(self, calibration: Calibration, window: int = 200, limit: float = 3.0,
                 min_shift: float = 0.5, min_samples: int | None = None):
        if int(window) < 2:
            raise InputError(f"drift window {window}: expected >= 2")
        if not limit > 0:
            raise InputError(f"drift limit {limit}: expected > 0")
        if not min_shift >= 0:
            raise InputError(f"drift min_shift {min_shift}: expected >= 0")
        self.window = int(window)
        self.limit = float(limit)
        self.min_shift = float(min_shift)
        self.min_samples = int(min_samples) if min_samples is not None else max(10, self.window // 4)
        self.min_samples = min(max(self.min_samples, 2), self.window)
        normal = calibration.normal or {}
        self.calibration_version = calibration.version
        self.normal_mean = float(normal.get("mean", math.nan))
        self.normal_std = float(normal.get("std", math.nan))
        self.normal_n = float(normal.get("n", 0.0)) or math.inf
        self._usable = math.isfinite(self.normal_mean) and math.isfinite(self.normal_std)
        if self._usable and self.normal_std <= 0:
            self.normal_std = max(abs(self.normal_mean) * 1e-3, 1e-9)
        self._ok: deque[float] = deque(maxlen=self.window)
        self._all: deque[bool] = deque(maxlen=self.window)
        self._sum = 0.0
        self._sq = 0.0
        self._updates = 0
        self._ng = 0
        self.drift = False

    def update(self, score: float, ng: bool) -> DriftState:
        """Add one inspected part (its image score and decision); returns the state after it."""
        if len(self._all) == self.window and self._all[0]:
            self._ng -= 1
        self._all.append(bool(ng))
        self._ng += int(bool(ng))
        s = float(score)
        if not ng and math.isfinite(s):
            if len(self._ok) == self.window:
                old = self._ok[0]
                self._sum -= old
                self._sq -= old * old
            self._ok.append(s)
            self._sum += s
            self._sq += s * s
            self._updates += 1
            if self._updates % (4 * self.window) == 0:  # re-sum now and then: no creeping rounding error
                self._sum = math.fsum(self._ok)
                self._sq = math.fsum(v * v for v in self._ok)
        return self._state()

    def state(self) -> DriftState:
        return self._state(report_event=False)

    def _state(self, report_event: bool = True) -> DriftState:
        n = len(self._ok)
        mean = self._sum / n if n else math.nan
        var = max(self._sq / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else 0.0
        judged = self._usable and n >= self.min_samples
        z = shift = 0.0
        before = self.drift
        if judged:
            shift = (mean - self.normal_mean) / self.normal_std
            z = shift / math.sqrt(1.0 / n + 1.0 / self.normal_n)
            if self.drift:
                self.drift = abs(z) > HYSTERESIS * self.limit and abs(shift) > HYSTERESIS * self.min_shift
            else:
                self.drift = abs(z) > self.limit and abs(shift) >= self.min_shift
        event = None
        if report_event and self.drift != before:
            event = "drift" if self.drift else "drift_cleared"
        return DriftState(drift=self.drift, z=z, shift=shift, mean=mean, std=math.sqrt(var), n=n,
                          window=self.window, limit=self.limit, min_shift=self.min_shift,
                          normal_mean=self.normal_mean, normal_std=self.normal_std,
                          ng_rate=self._ng / len(self._all) if self._all else 0.0, judged=judged, event=event,
                          direction=("up" if shift > 0 else "down") if self.drift else "")
