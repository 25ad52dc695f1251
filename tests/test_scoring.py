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
    assert scoring.threshold_from_policy(s, "max") > 100
    t = scoring.threshold_from_policy(s, "sigma:3")
    assert t == pytest.approx(s.mean() + 3 * s.std(ddof=1))
    for bad in ("fpr:2", "fpr:x", "sigma:-1", "mean", "max:3"):
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
