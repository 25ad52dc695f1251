import numpy as np
import pytest

from edge_ad import scoring
from edge_ad.errors import InputError


def test_quantile_normalization_matches_formula():
    rng = np.random.default_rng(0)
    raw = {"map_st": rng.random((10, 1, 8, 8)), "map_ae": 2 * rng.random((10, 1, 8, 8))}
    norms = scoring.fit_map_norms(raw)
    a = raw["map_st"].ravel()
    qa, qb = np.quantile(a, [0.9, 0.995])
    assert norms["map_st"].q_a == pytest.approx(qa)
    assert norms["map_st"].q_b == pytest.approx(qb)
    assert norms["map_st"].weight == 0.5 and norms["map_ae"].weight == 0.5
    cal = scoring.Calibration(maps=norms, threshold=0.05, map_pad=2)
    comb = scoring.combine(raw, cal)
    assert comb.shape == (10, 12, 12)
    expect = 0.5 * 0.1 * (raw["map_st"][:, 0] - qa) / (qb - qa)
    qa2, qb2 = np.quantile(raw["map_ae"].ravel(), [0.9, 0.995])
    expect += 0.5 * 0.1 * (raw["map_ae"][:, 0] - qa2) / (qb2 - qa2)
    np.testing.assert_allclose(comb[:, 2:-2, 2:-2], expect, rtol=1e-5, atol=1e-6)
    assert np.all(comb[:, :2, :] == 0)
    s = scoring.score(raw, cal)
    np.testing.assert_allclose(s.scores, comb.reshape(10, -1).max(1))
    assert (s.ng == (s.scores > 0.05)).all()


def test_threshold_policies():
    s = np.arange(1, 101, dtype=float)  # 1..100
    assert (s > scoring.threshold_from_policy(s, "fpr:0.01")).sum() == 1
    assert (s > scoring.threshold_from_policy(s, "fpr:0.05")).sum() == 5
    # never more above than the target allows: 200 scores at fpr:0.001 allow none (interpolating would
    # put the threshold between the two largest and call one normal frame NG)
    r = np.random.default_rng(0).random(200)
    assert scoring.threshold_from_policy(r, "fpr:0.001") == r.max()
    assert (r > scoring.threshold_from_policy(r, "fpr:0.012")).sum() == 2          # floor(2.4)
    assert scoring.threshold_from_policy(np.array([1.0, 2.0, 2.0, 2.0]), "fpr:0.3") == 2.0   # ties stay OK
    assert scoring.threshold_from_policy(s, "max") > 100
    t = scoring.threshold_from_policy(s, "sigma:3")
    assert t == pytest.approx(s.mean() + 3 * s.std(ddof=1))
    for bad in ("fpr:2", "fpr:x", "sigma:-1", "mean", "max:3", "max:"):
        with pytest.raises(InputError, match="policy"):
            scoring.threshold_from_policy(s, bad)


def test_calibration_roundtrip_and_errors():
    cal = scoring.Calibration(maps={"map": scoring.MapNorm(0.1, 0.5)}, threshold=0.2, policy="max", version=3,
                              normal={"mean": 0.01}, extra={"gaussian": "g.npz"})
    again = scoring.Calibration.from_dict(cal.to_dict())
    assert again == cal
    with pytest.raises(InputError, match="threshold"):
        scoring.Calibration.from_dict({"maps": {"map": {"q_a": 0, "q_b": 1}}})
    with pytest.raises(InputError, match="maps"):
        scoring.Calibration.from_dict({"maps": {}, "threshold": 1})
    with pytest.raises(InputError, match="lacks map"):
        scoring.combine({"other": np.zeros((1, 1, 2, 2))}, cal)


def test_upsample_keeps_values_in_range():
    comb = np.zeros((1, 4, 4), np.float32)
    comb[0, 1, 1] = 1.0
    up = scoring.upsample(comb, (16, 16))
    assert up.shape == (1, 16, 16)
    assert 0 < up.max() <= 1.0


def _cal_dict(**changes):
    d = {"schema_version": 1, "maps": {"map": {"q_a": 1.0, "q_b": 2.0, "weight": 1.0}}, "threshold": 0.1,
         "version": 1, "map_pad": 0, "normal": {"mean": 0.05}, "n_frames": 10}
    d.update(changes)
    return d


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("changes, field", [
    ({"maps": {"map": {"q_a": 1.0, "q_b": 2.0, "weight": NAN}}}, r"maps\.map\.weight nan: expected a finite"),
    ({"maps": {"map": {"q_a": INF, "q_b": 2.0}}}, r"maps\.map\.q_a inf: expected a finite"),
    ({"maps": {"map": {"q_a": 1.0, "q_b": -INF}}}, r"maps\.map\.q_b -inf: expected a finite"),
    ({"maps": {"map": {"q_a": 1.0, "q_b": 1.0}}}, r"maps\.map\.q_b 1\.0: expected more than q_a"),
    ({"maps": {"map": {"q_a": 2.0, "q_b": 1.0}}}, r"maps\.map\.q_b 1\.0: expected more than q_a"),
    ({"maps": {"map": {"q_a": 1.0, "q_b": 2.0, "weight": 0}}}, r"maps: every weight is 0; expected at least one weight > 0"),
    ({"maps": {"a": {"q_a": 1.0, "q_b": 2.0, "weight": 1}, "b": {"q_a": 1.0, "q_b": 2.0, "weight": -0.5}}},
     r"maps\.b\.weight -0\.5: expected a finite number >= 0"),
    ({"maps": {"map": {"q_a": "1", "q_b": 2.0}}}, r"maps\.map\.q_a '1': expected a finite number"),
    ({"maps": {"map": {"q_b": 2.0}}}, r"maps\.map: field 'q_a' missing"),
    ({"maps": {"map": 3}}, r"maps\.map 3: expected an object"),
    ({"maps": []}, r"maps \[\]: expected an object"),
    ({"threshold": NAN}, r"threshold nan: expected a finite number"),
    ({"threshold": INF}, r"threshold inf: expected a finite number"),
    ({"threshold": None}, r"threshold None: expected a finite number"),
    ({"threshold": True}, r"threshold True: expected a finite number"),
    ({"schema_version": 99}, r"schema_version 99: this edge_ad reads calibration schema 1"),
    ({"map_pad": -5}, r"map_pad -5: expected an integer >= 0"),
    ({"map_pad": 10**9}, r"map_pad 1000000000: expected an integer >= 0 and <= 256"),
    ({"version": "x"}, r"version 'x': expected an integer >= 0"),
    ({"version": 1.5}, r"version 1\.5: expected an integer"),
    ({"n_frames": -1}, r"n_frames -1: expected an integer >= 0"),
    ({"normal": {"std": NAN}}, r"normal\.std nan: expected a finite number"),
    ({"extra": []}, r"extra \[\]: expected an object"),
    ({"policy": 3}, r"policy 3: expected a string"),
])
def test_calibration_numbers_are_checked_and_the_field_named(changes, field):
    with pytest.raises(InputError, match=r"^cal\.json: " + field):
        scoring.Calibration.from_dict(_cal_dict(**changes), where="cal.json")


def test_a_negative_finite_threshold_is_legal_and_an_old_file_without_schema_version_loads():
    d = _cal_dict(threshold=-0.5)
    del d["schema_version"]
    cal = scoring.Calibration.from_dict(d)
    assert cal.threshold == -0.5 and scoring.Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(InputError, match="expected a calibration"):
        scoring.Calibration.from_dict([], where="x")


def test_a_nan_score_is_never_ok():
    cal = scoring.Calibration(maps={"map": scoring.MapNorm(0.0, 1.0)}, threshold=0.5)
    raw = np.zeros((3, 1, 4, 4), np.float32)
    raw[1, 0, 0, 0] = np.nan
    raw[2] = 100.0
    assert scoring.score(raw={"map": raw}, cal=cal).ng.tolist() == [False, True, True]
    assert scoring.is_ng(float("nan"), 0.5) is True and scoring.is_ng(0.1, 0.5) is False
