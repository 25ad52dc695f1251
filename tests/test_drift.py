"""Drift: the window's median score against the calibration's normal distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_ad.calibration import DriftMonitor, recalibrate
from edge_ad.errors import InputError
from edge_ad.scoring import Calibration, MapNorm

from fixtures_bundle import copy_bundle, part_frame, tiny_bundle  # noqa: F401


def _cal(mean=0.1, std=0.02, n=200.0, threshold=0.2) -> Calibration:
    return Calibration(maps={"map": MapNorm(0.0, 1.0)}, threshold=threshold, version=3,
                       normal={"mean": mean, "std": std, "n": n})


def _feed(mon, scores, threshold=0.2):
    return [mon.update(float(s), bool(s > threshold)) for s in scores]


def test_normal_scores_never_drift():
    rng = np.random.default_rng(0)
    mon = DriftMonitor(_cal(), window=100, limit=3.0)
    states = _feed(mon, rng.normal(0.1, 0.02, 5000))
    assert not any(s.drift for s in states)
    assert all(s.event is None for s in states)
    last = states[-1]
    assert last.judged and last.n == 100 and abs(last.shift) < 0.5 and last.window == 100


def test_upward_drift_raises_one_event_and_clears_with_hysteresis():
    rng = np.random.default_rng(1)
    mon = DriftMonitor(_cal(), window=100, limit=3.0)
    _feed(mon, rng.normal(0.1, 0.02, 300))
    drifted = _feed(mon, rng.normal(0.13, 0.02, 300))          # +1.5 sigma: the light changed
    events = [s.event for s in drifted if s.event]
    assert events == ["drift"]
    first = next(i for i, s in enumerate(drifted) if s.drift)
    assert first < 100                                          # caught within one window
    st = drifted[-1]
    assert st.drift and st.direction == "up" and st.z > 3 and st.shift > 1.0
    assert st.median == pytest.approx(0.13, abs=0.01) and st.mean == pytest.approx(0.13, abs=0.01)
    back = _feed(mon, rng.normal(0.1, 0.02, 300))
    assert [s.event for s in back if s.event] == ["drift_cleared"]
    assert not back[-1].drift and back[-1].direction == ""


def test_downward_drift_counts_too():
    rng = np.random.default_rng(2)
    mon = DriftMonitor(_cal(), window=50, limit=3.0)
    st = _feed(mon, rng.normal(0.06, 0.02, 200))[-1]            # scores fell: defects would hide
    assert st.drift and st.direction == "down" and st.z < -3


def test_small_significant_shift_is_not_drift_below_min_shift():
    rng = np.random.default_rng(3)
    mon = DriftMonitor(_cal(n=1e6), window=2000, limit=3.0, min_shift=0.5)
    st = _feed(mon, rng.normal(0.1 + 0.2 * 0.02, 0.02, 4000))[-1]   # +0.2 sigma: significant, harmless
    assert st.z > 3 and not st.drift
    mon = DriftMonitor(_cal(n=1e6), window=2000, limit=3.0, min_shift=0.1)
    assert _feed(mon, rng.normal(0.1 + 0.2 * 0.02, 0.02, 4000))[-1].drift


def test_window_statistics_and_ng_rate():
    mon = DriftMonitor(_cal(), window=10, limit=3.0, min_samples=2)
    for i in range(10):
        st = mon.update(0.5 if i % 2 else 0.1, ng=bool(i % 2))
    assert st.n == 5 and st.basis == "ok" and st.mean == pytest.approx(0.1) and st.median == pytest.approx(0.1)
    assert st.ng_rate == pytest.approx(0.5)
    st = mon.update(0.5, ng=True)                               # most parts NG: the median of all parts
    assert st.basis == "all" and st.n == 10 and st.median == pytest.approx(0.5)
    for _ in range(10):
        st = mon.update(0.1, ng=False)
    assert st.ng_rate == 0.0 and st.n == 10 and st.median == pytest.approx(0.1) and st.basis == "ok"
    st = mon.update(float("nan"), ng=False)                     # a failed score is not a sample
    assert st.n == 10 and math.isfinite(st.median)


def test_defects_are_not_drift_but_a_line_gone_all_ng_is():
    rng = np.random.default_rng(4)
    mon = DriftMonitor(_cal(), window=200, limit=3.0)
    s = rng.normal(0.1, 0.02, 3000)
    bad = rng.random(3000) < 0.3                                # 30 % defects, scoring far above normal
    s[bad] = rng.uniform(0.3, 2.0, bad.sum())
    assert not any(st.drift for st in _feed(mon, s))
    st = _feed(mon, rng.normal(0.25, 0.02, 200))[-1]            # every part above the threshold now
    assert st.drift and st.ng_rate == 1.0 and math.isnan(st.mean) and st.basis == "all"


def test_a_window_flipping_between_bases_is_one_drift_episode():
    # the light changed: about half the parts NG, the OK ones far below normal; the OK share
    # crosses one half back and forth, and the median of all parts lands near the normal median
    rng = np.random.default_rng(5)
    mon = DriftMonitor(_cal(), window=40, limit=3.0)
    states = []
    for i in range(2000):
        ng = rng.random() < 0.5
        states.append(mon.update(rng.uniform(0.1, 0.22) if ng else rng.uniform(-0.14, -0.06), ng))
    assert {s.basis for s in states[100:]} == {"ok", "all"}
    assert [s.event for s in states if s.event] == ["drift"]
    back = _feed(mon, rng.normal(0.1, 0.02, 200))               # the light is back: it clears
    assert [s.event for s in back if s.event] == ["drift_cleared"]


def test_a_flapping_statistic_is_one_drift_episode():
    # a line that repeats 4 parts (a looping clip, a small carousel): the window's median jumps between their
    # scores, beyond the limit on one part and back inside the 80 % band on the next; drift was raised and
    # cleared every few parts (984 events in 2000 parts), a WARNING and an MQTT event each
    cycle = [0.07, 0.086, 0.095, 0.12]                          # -1.5, -0.7, -0.25, +1 normal std
    mon = DriftMonitor(_cal(), window=50, limit=3.0)            # clear_after: 50 parts by default
    states = _feed(mon, cycle * 500)
    z = [abs(s.z) for s in states[100:]]
    assert max(z) > 3.0 and min(z) <= 0.8 * 3.0                 # it does cross both limits, over and over
    assert [s.event for s in states if s.event] == ["drift"]
    first = next(i for i, s in enumerate(states) if s.drift)
    assert all(s.drift for s in states[first:]) and states[-1].parts_in_drift == len(states) - first
    assert states[-1].clear_after == 50 and states[-1].in_band < 50
    back = _feed(mon, [0.1] * 200)                              # the parts score like the normals again
    ends = [(i, s) for i, s in enumerate(back) if s.event]
    assert [s.event for _, s in ends] == ["drift_cleared"]
    i, end = ends[0]
    assert not end.drift and end.in_band == 50 and end.parts_in_drift == len(states) - first + i + 1
    assert all(s.in_band == 0 and s.parts_in_drift == 0 and s.event is None for s in back[i + 1:])


def test_drift_clears_only_after_clear_after_parts_in_a_row_back_inside_the_band():
    far, normal = 0.18, 0.1                                     # +4 and 0 normal std
    mon = DriftMonitor(_cal(), window=3, limit=3.0, clear_after=6)
    seq = [far] * 3 + [normal] * 4 + [far] * 2 + [normal] * 8
    states = _feed(mon, seq)
    # the median of 3 parts: back inside the band from the 2nd normal part, out again at the 2nd far one
    assert [s.in_band for s in states] == [0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 0]
    assert [(i, s.event) for i, s in enumerate(states) if s.event] == [(2, "drift"), (15, "drift_cleared")]
    assert states[15].parts_in_drift == 14 and states[16].parts_in_drift == 0
    mon = DriftMonitor(_cal(), window=3, limit=3.0, clear_after=1)   # 1: clear as soon as it is back
    assert [s.event for s in _feed(mon, seq) if s.event] == ["drift", "drift_cleared", "drift", "drift_cleared"]
    st = mon.update(float("nan"), False)                        # not a sample: no count, no event
    assert st.event is None and st.parts_in_drift == 0 and mon.state().event is None


def test_not_judged_before_min_samples_or_without_normal_statistics():
    mon = DriftMonitor(_cal(), window=200)
    st = _feed(mon, [0.5] * 49)[-1]
    assert not st.judged and not st.drift and st.z == 0.0
    st = _feed(mon, [0.15])[-1]                                 # min_samples = window // 4 = 50
    assert st.judged and st.drift and st.event == "drift"
    bare = Calibration(maps={"map": MapNorm(0.0, 1.0)}, threshold=1.0)
    mon = DriftMonitor(bare, window=20)
    st = _feed(mon, [0.9] * 100, threshold=1.0)[-1]
    assert not st.judged and not st.drift
    d = st.to_dict()
    assert d["normal_median"] is None and d["drift"] is False   # JSON-ready (no NaN)


def test_bad_settings_are_refused():
    for kw in ({"window": 1}, {"limit": 0}, {"min_shift": -1}, {"clear_after": 0}):
        with pytest.raises(InputError, match=f"drift {next(iter(kw))}"):
            DriftMonitor(_cal(), **kw)


def test_drift_on_a_real_bundle_after_a_lighting_change_and_gone_after_recalibration(tiny_bundle, tmp_path):
    from edge_ad.inspector import Inspector
    from edge_ad.runtime.backends import open_backend

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    insp = Inspector(b, open_backend(b, "onnxruntime", device="cpu"))
    res = recalibrate(b, insp, [part_frame(i) for i in range(80)], policy="fpr:0.01", progress=False)
    insp.set_calibration(res.calibration)

    def run(cal, frames):
        mon = DriftMonitor(cal, window=60, limit=3.0)
        s = insp.inspect(frames)
        return [mon.update(float(x), bool(n)) for x, n in zip(s.scores, s.ng)][-1]

    assert not run(res.calibration, [part_frame(1000 + i) for i in range(120)]).drift
    shifted = [part_frame(2000 + i, brightness=6.0) for i in range(120)]   # a slightly brighter lamp
    st = run(res.calibration, shifted)
    assert st.drift and st.direction == "up"
    res2 = recalibrate(b, insp, [part_frame(3000 + i, brightness=6.0) for i in range(80)], policy="fpr:0.01",
                       progress=False)
    insp.set_calibration(res2.calibration)
    assert not run(res2.calibration, shifted).drift
