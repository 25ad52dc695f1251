"""Scoring: raw anomaly maps from any backend -> normalized map, image score, decision.

This is the one scoring path shared by torch, ONNX Runtime and TensorRT. Everything here is numpy and
takes its constants as arguments (a :class:`Calibration`), so recalibration never touches a graph or an
engine, and every backend scores identically given identical raw maps.

Per map ``m`` named in the calibration: ``n = 0.1 * (m - q_a) / (q_b - q_a)`` (EfficientAD's quantile
normalization; q_a / q_b are the 0.9 / 0.995 quantiles over held-out normal images). The combined map is
the weighted sum of the normalized maps, padded by ``map_pad`` cells on each side with the combined
map's minimum-free value 0 (EfficientAD's maps lose 4 cells per side to its unpadded convolutions), and
upsampled bilinearly to the input image size when a full-resolution map is wanted.

The image score is the maximum of the combined map at map resolution: cheap, and independent of the
input size. The paper takes the maximum after upsampling; bilinear interpolation never exceeds its
samples, so that is at most this score, and lower where a peak is a single cell (at 4x upsampling no
output pixel lands exactly on a cell centre).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, asdict
from typing import Mapping

import numpy as np

from .errors import InputError, name_text, valid_unicode

Q_A = 0.9
Q_B = 0.995

SCHEMA_VERSION = 1   # of calibration.json; a file of another version is refused, never half-read
MAX_MAP_PAD = 256    # cells of padding per side (EfficientAD uses 4); more is a corrupt file


def _finite(v: object, what: str) -> float:
    """``v`` as a finite float (JSON numbers only: no strings, no booleans)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise InputError(f"{what} {v!r}: expected a finite number")
    return float(v)


def _count(v: object, what: str, most: int | None = None) -> int:
    """``v`` as an integer >= 0 (and <= ``most``)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 or (most is not None and v > most):
        bound = f" and <= {most}" if most is not None else ""
        raise InputError(f"{what} {v!r}: expected an integer >= 0{bound}")
    return int(v)


def _text(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise InputError(f"{what} {v!r}: expected a string")
    return v


def _obj(v: object, what: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise InputError(f"{what} {v!r}: expected an object")
    return v


def _maps(v: object, where: str) -> dict[str, "MapNorm"]:
    """The ``maps`` field: {name: {q_a, q_b[, weight]}} with q_b > q_a, weights >= 0 and not all 0."""
    maps = {}
    for name, m in _obj(v, f"{where}: maps").items():
        at = f"{where}: maps.{name}"
        m = _obj(m, at)
        for key in ("q_a", "q_b"):
            if key not in m:
                raise InputError(f"{at}: field '{key}' missing; expected {{q_a, q_b, weight}}")
        qa, qb = _finite(m["q_a"], f"{at}.q_a"), _finite(m["q_b"], f"{at}.q_b")
        if not qb > qa:
            raise InputError(f"{at}.q_b {qb!r}: expected more than q_a ({qa!r}); the normalization divides "
                             "by q_b - q_a")
        w = _finite(m.get("weight", 1.0), f"{at}.weight")
        if w < 0:
            raise InputError(f"{at}.weight {w!r}: expected a finite number >= 0")
        maps[str(name)] = MapNorm(qa, qb, w)
    if not maps:
        raise InputError(f"{where}: maps is empty; expected at least one map {{name: {{q_a, q_b, weight}}}}")
    if not any(m.weight > 0 for m in maps.values()):
        raise InputError(f"{where}: maps: every weight is 0; expected at least one weight > 0")
    return maps


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
        d["schema_version"] = SCHEMA_VERSION
        d["maps"] = {k: asdict(v) for k, v in self.maps.items()}
        d["normal"] = dict(self.normal)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "calibration") -> "Calibration":
        """Check every field (numbers finite, ``q_b > q_a``, weights >= 0 and not all 0, a known
        ``schema_version``) and build the calibration; :class:`InputError` naming ``where`` and the field.
        Its texts (``policy``, ``created``, ``source``, every string in ``extra``) are taken as valid Unicode
        (:func:`~edge_ad.errors.valid_unicode`): a file name that is not UTF-8 among a recalibration's
        ``excluded_labels`` is stored as ``\\xfe``, and a file an edge-ad before that wrote with the lone
        surrogate reads the same way (it stopped ``run`` with MQTT, whose retained calibration could not be
        encoded)."""
        if not isinstance(d, Mapping):
            raise InputError(f"{where}: expected a calibration (a JSON object), got {type(d).__name__}")
        sv = d.get("schema_version", SCHEMA_VERSION)
        if sv != SCHEMA_VERSION or isinstance(sv, bool):
            raise InputError(f"{where}: schema_version {sv!r}: this edge_ad reads calibration schema "
                             f"{SCHEMA_VERSION} only; upgrade edge-ad or recalibrate")
        for key in ("maps", "threshold"):
            if key not in d:
                raise InputError(f"{where}: field '{key}' missing; expected 'maps' {{name: {{q_a, q_b, weight}}}} "
                                 "and a finite 'threshold'")
        return cls(
            maps=_maps(d["maps"], where),
            threshold=_finite(d["threshold"], f"{where}: threshold"),
            policy=name_text(_text(d.get("policy", "max"), f"{where}: policy")),
            version=_count(d.get("version", 0), f"{where}: version"),
            map_pad=_count(d.get("map_pad", 0), f"{where}: map_pad", MAX_MAP_PAD),
            normal={str(k): _finite(v, f"{where}: normal.{k}") for k, v in _obj(d.get("normal", {}),
                                                                                f"{where}: normal").items()},
            created=name_text(_text(d.get("created", ""), f"{where}: created")),
            source=name_text(_text(d.get("source", ""), f"{where}: source")),
            n_frames=_count(d.get("n_frames", 0), f"{where}: n_frames"),
            extra=valid_unicode(dict(_obj(d.get("extra", {}), f"{where}: extra"))),
        )

    def replace(self, **changes) -> "Calibration":
        d = self.to_dict()
        d.update(changes)
        if "maps" in changes:
            d["maps"] = {k: (asdict(v) if isinstance(v, MapNorm) else v) for k, v in changes["maps"].items()}
        return Calibration.from_dict(d)


def fit_map_norms(raw: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
                  q_a: float = Q_A, q_b: float = Q_B, flat_ok: bool = True) -> dict[str, MapNorm]:
    """Quantile normalization constants from raw maps of normal validation images.

    ``raw[name]`` is an array ``[N, 1, h, w]`` (or ``[N, h, w]``) of that map over N normal images.
    Default weights: equal, summing to 1 (0.5 / 0.5 for EfficientAD's two maps). A map whose two quantiles
    are equal gets a tiny spread (kept finite), or with ``flat_ok=False`` is refused (:class:`InputError`).
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
            if not flat_ok:
                raise InputError(f"map '{n}': its {q_a:g} and {q_b:g} quantiles over the {len(raw[n])} frames are "
                                 f"equal ({qa:.6g}), so it cannot be normalized")
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


def unpadded_scores(combined: np.ndarray, map_pad: int) -> np.ndarray:
    """The maximum per frame of a combined map (:func:`combine`) over its own cells, without the
    ``map_pad`` border of zeros.

    It equals the image score wherever that is above 0. The pad's zeros make the image score of a frame
    whose whole map lies below the normalization's ``q_a`` exactly 0; with a calibration fitted to the
    light in force that is many good frames (16 of 40 on an EfficientAD line), and a set whose scores
    pile up at 0 has a collapsed median absolute deviation. This score keeps them apart, so the
    recalibration's defect screen (:mod:`edge_ad.calibration.refit`) measures the set's spread on it.
    """
    p = int(map_pad)
    if p > 0:
        combined = combined[:, p:combined.shape[1] - p, p:combined.shape[2] - p]
    return image_scores(combined)


def upsample(combined: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``[B, h, w]`` maps to ``[B, H, W]`` (OpenCV, half-pixel centres)."""
    import cv2

    h, w = size_hw
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in combined])


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray        # [B] image scores
    combined: np.ndarray      # [B, h', w'] normalized combined maps at map resolution (padded)
    ng: np.ndarray            # [B] bool: score > threshold, or a score that is not a number


def is_ng(scores: np.ndarray | float, threshold: float) -> np.ndarray | bool:
    """NG unless the score is at most the threshold: a NaN score is never OK."""
    return ~(np.asarray(scores) <= threshold) if np.ndim(scores) else not scores <= threshold


def threshold_in_force(calibration_threshold: float, override: float | None) -> float:
    """The image threshold that decides: ``override`` (a ``[decision] threshold`` of the run config, or a
    ``set_threshold`` without persist) when there is one, else the calibration's. The one rule behind the
    service's ``threshold_in_force`` (MQTT replies, ``calibration`` events) and ``edge-ad calibrate
    --config``'s."""
    return float(override) if override is not None else float(calibration_threshold)


def score(raw: Mapping[str, np.ndarray], cal: Calibration) -> Scored:
    comb = combine(raw, cal)
    s = image_scores(comb)
    return Scored(scores=s, combined=comb, ng=is_ng(s, cal.threshold))


def normal_stats(scores: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {}
    q = np.quantile(s, [0.5, 0.9, 0.99])
    return {"n": float(s.size), "mean": float(s.mean()), "std": float(s.std(ddof=1) if s.size > 1 else 0.0),
            "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(s.max()),
            "min": float(s.min())}


def check_policy(policy: str) -> str:
    """``policy`` if :func:`threshold_from_policy` accepts it, else :class:`InputError` (before any work)."""
    threshold_from_policy(np.array([0.0, 1.0]), policy)
    return policy


def threshold_from_policy(scores: np.ndarray, policy: str) -> float:
    """Image threshold from normal image scores.

    ``fpr:P``   the lowest normal score with at most a share P of the normal scores above it (target
                false-positive rate P, met on the scores themselves: the k = floor(P * n) largest are
                above it; with fewer than 1/P scores it is the largest),
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
            k = int(np.floor(p * s.size + 1e-9))   # scores allowed above the threshold
            return float(np.sort(s)[s.size - 1 - k])
        if policy == "max":
            spread = float(s.max() - np.median(s))
            return float(s.max() + max(0.1 * spread, 1e-3))
        if kind == "sigma":
            k = float(arg)
            if not 0 < k < float("inf"):
                raise ValueError
            return float(s.mean() + k * (s.std(ddof=1) if s.size > 1 else 0.0))
    except ValueError:
        pass
    raise InputError(f"threshold policy '{policy}': expected 'fpr:P' with 0<P<1, 'max', or 'sigma:K' with a finite K>0")
