"""Drift: do the parts judged OK still score like the normals the calibration was fitted on?

:class:`DriftMonitor` keeps the image scores and decisions of the last ``window`` inspected parts and
compares the **median score of the parts judged OK** with the calibration's normal statistics
(``calibration.normal``: p50, std, n):

- ``shift = (median - normal median) / normal std``: how far the parts moved, in normal standard
  deviations (the effect size);
- ``z = shift / (1.2533 * sqrt(1/n + 1/n_normal))``: the same as a two-sample z-statistic for medians
  (both are estimates), i.e. how sure we are that it moved.

NG parts stay out (whatever the defect rate, defects do not move the statistic), but the OK parts are
censored at the threshold: when the light changes so much that most parts turn NG, an OK-only window
would empty (or keep stale scores) and go blind exactly when drift is largest. So when fewer than half
the parts in the window are OK, the median of *all* parts is used (``basis = "all"``): it is then above
the threshold and flags drift. The median rather than the mean: one odd OK part cannot move it.

Drift is flagged when ``|z| > limit`` **and** ``|shift| >= min_shift`` (default 0.5 standard deviations):
with a window of a few hundred parts the z-statistic alone calls harmless shifts significant, and a
0.5-sigma rise already multiplies the false-alarm rate of an ``fpr:0.001`` threshold by about five
(normally distributed scores). Both directions count: scores falling (a dimmer or blurred image) hide
defects as surely as rising scores raise false alarms. The flag clears with hysteresis, in two ways at
once: the statistic must be back inside a lower band, ``|z| <= 0.8 limit`` or ``|shift| <= 0.8 min_shift``
(on the ``all`` basis the OK parts' own median must be back inside it too, when at least 2 are OK, so that
a window that flips between the bases, about half the parts NG and the OK ones still far from normal, stays
one drift episode), and it must stay there for ``clear_after`` parts in a row (default 50; a part back
outside the band starts the count again). The band alone is not enough: a window's median jumps between
the scores in it, and on a line that repeats a few parts (a looping clip, a small part carousel) it can
cross both limits on every part. So drift lasts at least ``clear_after`` parts, and a statistic flapping
around the limit is one episode: one event when it starts, one when it ends. Nothing is judged before
``min_samples`` parts are in the window (default: a quarter of it).

``update()`` returns a :class:`DriftState` with ``event`` set to ``"drift"`` / ``"drift_cleared"`` on the
update where the flag changes (never otherwise), ``parts_in_drift`` (parts since the flag was raised; on the
``drift_cleared`` update, how long the episode lasted) and ``in_band`` (the count towards ``clear_after``);
the runtime puts ``drift`` in telemetry and publishes the events.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import asdict, dataclass, replace

from ..errors import InputError
from ..scoring import Calibration

HYSTERESIS = 0.8
MEDIAN_SE = math.sqrt(math.pi / 2)   # standard error of a median / that of a mean, normal data


@dataclass(frozen=True)
class DriftState:
    drift: bool
    z: float                 # two-sample z of the median vs the normal median (0 until judged)
    shift: float             # (median - normal median) / normal std
    median: float            # median score of the OK parts (of all parts when most are NG); nan when empty
    mean: float              # mean score of the OK parts in the window (nan when none)
    n: int                   # parts the median is over
    basis: str               # "ok" | "all"
    window: int
    limit: float
    min_shift: float
    normal_median: float
    normal_std: float
    ng_rate: float           # NG fraction over the window
    judged: bool             # False until min_samples parts (or without normal statistics)
    event: str | None = None  # "drift" / "drift_cleared" on the update where the flag changed
    direction: str = ""      # "up" / "down" while drifting
    clear_after: int = 1     # parts in a row back inside the band before a drift clears
    in_band: int = 0         # while drifting: parts in a row back inside the band so far
    parts_in_drift: int = 0  # parts since drift was flagged (on the drift_cleared update: the episode's length)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class DriftMonitor:
    def __init__(self, calibration: Calibration, window: int = 200, limit: float = 3.0,
                 min_shift: float = 0.5, min_samples: int | None = None, clear_after: int = 50):
        if int(window) < 2:
            raise InputError(f"drift window {window}: expected >= 2")
        if not limit > 0:
            raise InputError(f"drift limit {limit}: expected > 0")
        if not min_shift >= 0:
            raise InputError(f"drift min_shift {min_shift}: expected >= 0")
        if int(clear_after) < 1:
            raise InputError(f"drift clear_after {clear_after}: expected >= 1 (parts in a row back inside the "
                             "band before a drift clears)")
        self.window = int(window)
        self.limit = float(limit)
        self.min_shift = float(min_shift)
        self.min_samples = int(min_samples) if min_samples is not None else max(10, self.window // 4)
        self.min_samples = min(max(self.min_samples, 2), self.window)
        normal = calibration.normal or {}
        self.calibration_version = calibration.version
        self.normal_median = float(normal.get("p50", normal.get("mean", math.nan)))
        self.normal_std = float(normal.get("std", math.nan))
        self.normal_n = float(normal.get("n", 0.0)) or math.inf
        self._usable = math.isfinite(self.normal_median) and math.isfinite(self.normal_std)
        if self._usable and self.normal_std <= 0:
            self.normal_std = max(abs(self.normal_median) * 1e-3, 1e-9)
        self._parts: deque[tuple[float, bool]] = deque()
        self._sorted: list[float] = []        # every part in the window
        self._sorted_ok: list[float] = []     # the OK ones
        self._ok_sum = 0.0
        self._ok_n = 0
        self._ng = 0
        self.clear_after = int(clear_after)
        self.drift = False
        self._in_band = 0          # while drifting: parts in a row back inside the band
        self._parts_in_drift = 0   # parts since drift was flagged
        self._last: DriftState | None = None

    def update(self, score: float, ng: bool) -> DriftState:
        """Add one inspected part (its image score and decision); returns the state after it.
        A non-finite score (a failed inference) is not a sample: it changes nothing (``event`` None)."""
        s = float(score)
        if not math.isfinite(s):
            return self.state()
        if len(self._parts) == self.window:
            old, old_ng = self._parts.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            if old_ng:
                self._ng -= 1
            else:
                del self._sorted_ok[bisect.bisect_left(self._sorted_ok, old)]
                self._ok_sum -= old
                self._ok_n -= 1
        self._parts.append((s, bool(ng)))
        bisect.insort(self._sorted, s)
        if ng:
            self._ng += 1
        else:
            bisect.insort(self._sorted_ok, s)
            self._ok_sum += s
            self._ok_n += 1
        if self._ok_n == 0:
            self._ok_sum = 0.0
        self._last = self._judge()
        return self._last

    def state(self) -> DriftState:
        """The state after the last part (``event`` None: it was reported by that part's update)."""
        if self._last is None:
            self._last = self._judge()
            return self._last
        return replace(self._last, event=None)

    @staticmethod
    def _median(v: list[float]) -> float:
        n = len(v)
        if not n:
            return math.nan
        return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])

    def _stat(self, med: float, n: int) -> tuple[float, float]:
        """(z, shift) of a median over n parts."""
        shift = (med - self.normal_median) / self.normal_std
        return shift / (MEDIAN_SE * math.sqrt(1.0 / n + 1.0 / self.normal_n)), shift

    def _within(self, z: float, shift: float) -> bool:
        """Inside the hysteresis band: a flagged drift clears after clear_after such parts in a row."""
        return abs(z) <= HYSTERESIS * self.limit or abs(shift) <= HYSTERESIS * self.min_shift

    def _judge(self) -> DriftState:
        """Judge the window after a new part: raise the flag, count towards clearing it, clear it."""
        total = len(self._parts)
        basis = "ok" if 2 * self._ok_n >= total else "all"
        values = self._sorted_ok if basis == "ok" else self._sorted
        n = len(values)
        med = self._median(values)
        judged = self._usable and total >= self.min_samples and n >= 2
        z = shift = 0.0
        before = self.drift
        if self.drift:
            self._parts_in_drift += 1
        if judged:
            z, shift = self._stat(med, n)
            if self.drift:
                back = self._within(z, shift)
                if back and basis == "all" and self._ok_n >= 2:
                    # a basis change is no recovery: the OK parts must be back too
                    back = self._within(*self._stat(self._median(self._sorted_ok), self._ok_n))
                # back inside the band for clear_after parts in a row: a crossing back out starts again
                self._in_band = self._in_band + 1 if back else 0
                self.drift = self._in_band < self.clear_after
            elif abs(z) > self.limit and abs(shift) >= self.min_shift:
                self.drift, self._in_band, self._parts_in_drift = True, 0, 1
        event = None
        if self.drift != before:
            event = "drift" if self.drift else "drift_cleared"
        in_band, parts_in_drift = (self._in_band, self._parts_in_drift) if (self.drift or event) else (0, 0)
        if not self.drift:
            self._in_band = self._parts_in_drift = 0
        return DriftState(drift=self.drift, z=z, shift=shift, median=med,
                          mean=self._ok_sum / self._ok_n if self._ok_n else math.nan, n=n, basis=basis,
                          window=self.window,
                          limit=self.limit, min_shift=self.min_shift, normal_median=self.normal_median,
                          normal_std=self.normal_std, ng_rate=self._ng / total if total else 0.0, judged=judged,
                          event=event, direction=("up" if shift > 0 else "down") if self.drift else "",
                          clear_after=self.clear_after, in_band=in_band, parts_in_drift=parts_in_drift)
