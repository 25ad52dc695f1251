"""Scoring: raw anomaly maps from any backend -> normalized map, image score, decision.

This is the one scoring path shared by torch, ONNX Runtime and TensorRT. Everything here is numpy and
takes its constants as arguments (a :class:`Calibration`), so recalibration never touches a graph or an
engine, and every backend scores identically given identical raw maps.

Per map ``m`` named in the calibration: ``n = 0.1 * (m - q_a) / (q_b - q_a)`` (EfficientAD's quantile
normalization; q_a / q_b are the 0.9 / 0.995 quantiles over held-out normal images). The combined map is
the weighted sum of the normalized maps, padded by ``map_pad`` cells on each side with the combined
map's minimum-free value 0 (EfficientAD's maps lose 4 cells per side to its unpadded convolutions), and
upsampled bilinearly to the input image size when a full-resolution map is wanted.

The image score is the maximum of the combined map at map resolution. It is exact (no interpolation
error), cheap, and equal to what the upsampled map's maximum approaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from typing import Mapping

import numpy as np

from .errors import InputError

Q_A = 0.9
Q_B = 0.995


@dataclass(frozen=True)
class MapNorm:
    q_a: float
    q_b: float
    weight: float = 1.0

    def apply(self, m: np.ndarray) -> np.ndarray:
        span = self.q_b - self.q_a
        if not span > 0:
            span = 1e-12
        return (0.1 / span) * (m - self.q_a)


@dataclass(frozen=True)
class Calibration:
    """What calibration holds: map normalization, threshold, normal-score statistics.

    ``version`` 0 means "not yet written to a bundle". ``normal`` holds statistics of the normalized
    image scores of the normal images the calibration was fitted on (mean, std, n, quantiles), used by
    drift detection and the threshold policies.
    """

    maps: Mapping[str, MapNorm]
    threshold: float
    policy: str = "max"
    version: int = 0
    map_pad: int = 0
    normal: Mapping[str, float] = field(default_factory=dict)
    created: str = ""
    source: str = ""
    n_frames: int = 0
    extra: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema_version"] = 1
        d["maps"] = {k: asdict(v) for k, v in self.maps.items()}
        d["normal"] = dict(self.normal)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "calibration") -> "Calibration":
        try:
            maps = {str(k): MapNorm(float(v["q_a"]), float(v["q_b"]), float(v.get("weight", 1.0)))
                    for k, v in d["maps"].items()}
            if not maps:
                raise ValueError("'maps' is empty")
            thr = float(d["threshold"])
            if not math.isfinite(thr):
                raise ValueError(f"threshold {thr} is not finite")
            return cls(
                maps=maps,
                threshold=thr,
                policy=str(d.get("policy", "max")),
                version=int(d.get("version", 0)),
                map_pad=int(d.get("map_pad", 0)),
                normal={str(k): float(v) for k, v in dict(d.get("normal", {})).items()},
                created=str(d.get("created", "")),
                source=str(d.get("source", "")),
                n_frames=int(d.get("n_frames", 0)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where}: invalid calibration ({exc!r}); expected 'maps' "
                             "{name: {q_a, q_b, weight}} and a finite 'threshold'") from exc

    def replace(self, **changes) -> "Calibration":
        d = self.to_dict()
        d.update(changes)
        if "maps" in changes:
            d["maps"] = {k: (asdict(v) if isinstance(v, MapNorm) else v) for k, v in changes["maps"].items()}
        return Calibration.from_dict(d)


def fit_map_norms(raw: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
                  q_a: float = Q_A, q_b: float = Q_B) -> dict[str, MapNorm]:
    """Quantile normalization constants from raw maps of normal validation images.

    ``raw[name]`` is an array ``[N, 1, h, w]`` (or ``[N, h, w]``) of that map over N normal images.
    Default weights: equal, summing to 1 (0.5 / 0.5 for EfficientAD's two maps).
    """
    if not raw:
        raise InputError("no raw maps to fit the normalization on")
    names = list(raw)
    if weights is None:
        weights = {n: 1.0 / len(names) for n in names}
    out = {}
    for n in names:
        a = np.asarray(raw[n], dtype=np.float64).ravel()
        if a.size == 0:
            raise InputError(f"map '{n}': no values to fit the normalization on")
        qa, qb = np.quantile(a, [q_a, q_b])
        if not qb > qa:  # flat maps (tiny data sets): keep the normalization finite
            qb = qa + max(abs(qa) * 1e-6, 1e-12)
        out[n] = MapNorm(float(qa), float(qb), float(weights[n]))
    return out


def combine(raw: Mapping[str, np.ndarray], cal: Calibration) -> np.ndarray:
    """Normalized, weighted, padded combined map ``[B, h + 2*pad, w + 2*pad]`` (float32)."""
    total = None
    for name, norm in cal.maps.items():
        if name not in raw:
            raise InputError(f"backend output lacks map '{name}' named in the calibration "
                             f"(outputs: {sorted(raw)})")
        m = np.asarray(raw[name], dtype=np.float32)
        if m.ndim == 4:
            m = m[:, 0]
        elif m.ndim != 3:
            raise InputError(f"map '{name}' has shape {m.shape}; expected [B, 1, h, w] or [B, h, w]")
        part = norm.weight * norm.apply(m)
        total = part if total is None else total + part
    assert total is not None
    if cal.map_pad:
        p = cal.map_pad
        total = np.pad(total, ((0, 0), (p, p), (p, p)), mode="constant", constant_values=0.0)
    return total.astype(np.float32, copy=False)


def image_scores(combined: np.ndarray) -> np.ndarray:
    """Image score per frame: the maximum of the combined map."""
    return combined.reshape(combined.shape[0], -1).max(axis=1)


def upsample(combined: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``[B, h, w]`` maps to ``[B, H, W]`` (OpenCV, half-pixel centres)."""
    import cv2

    h, w = size_hw
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in combined])


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray        # [B] image scores
    combined: np.ndarray      # [B, h', w'] normalized combined maps at map resolution (padded)
    ng: np.ndarray            # [B] bool: score > threshold


def score(raw: Mapping[str, np.ndarray], cal: Calibration) -> Scored:
    comb = combine(raw, cal)
    s = image_scores(comb)
    return Scored(scores=s, combined=comb, ng=s > cal.threshold)


def normal_stats(scores: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {}
    q = np.quantile(s, [0.5, 0.9, 0.99])
    return {"n": float(s.size), "mean": float(s.mean()), "std": float(s.std(ddof=1) if s.size > 1 else 0.0),
            "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(s.max()),
            "min": float(s.min())}


def threshold_from_policy(scores: np.ndarray, policy: str) -> float:
    """Image threshold from normal image scores.

    ``fpr:P``   the (1-P) quantile of the normal scores (target false-positive rate P),
    ``max``     the largest normal score plus a 10% margin of the normal score spread (at least 1e-3),
    ``sigma:K`` mean + K standard deviations.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise InputError("threshold policy needs at least one normal score")
    kind, _, arg = policy.partition(":")
    try:
        if kind == "fpr":
            p = float(arg)
            if not 0.0 < p < 1.0:
                raise ValueError
            return float(np.quantile(s, 1.0 - p))
        if kind == "max" and not arg:
            spread = float(s.max() - np.median(s))
            return float(s.max() + max(0.1 * spread, 1e-3))
        if kind == "sigma":
            k = float(arg)
            if not k > 0:
                raise ValueError
            return float(s.mean() + k * (s.std(ddof=1) if s.size > 1 else 0.0))
    except ValueError:
        pass
    raise InputError(f"threshold policy '{policy}': expected 'fpr:P' with 0<P<1, 'max', or 'sigma:K' with K>0")
