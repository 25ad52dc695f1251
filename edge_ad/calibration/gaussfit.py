"""Refit a Gaussian model's statistics on the device, with honest (leave-one-out) scores.

**What is refitted.** The mean comes from the new frames alone (a lighting change moves it). The
covariance is the new frames' scatter pooled with a prior covariance worth ``kappa`` frames
(:func:`refit`)::

    Sigma' = (n S + kappa Sigma_prior) / (n + kappa)          S: the new frames' covariance (divisor n)

``kappa`` defaults to ``min(prior.n, n)``: the prior counts as much as the new frames, at most as much as
the frames it came from. A few hundred frames cannot estimate a 100 x 100 covariance per location well;
the prior keeps the structure the model learnt on many more. The prior is the statistics the bundle was
trained with (:mod:`.refit` carries its name along as ``extra["gaussian_prior"]``), never the last
recalibration's: pooling with a refit that saw the same frames (the same folder calibrated twice)
would count them twice, and scores would no longer be honest (measured: every held-out part flagged).
Measured on magnetic_tile (features of the trained Gaussian bundle; calibration on 83 test/good images,
held-out normals and defects; mean of 6 random splits), image AUROC / recall at a 1 % FPR target:
keeping the old statistics (new normalization and threshold only) 0.912 / 42 %; a fresh fit from the
83 frames (Ledoit-Wolf) 0.899 / 32 %; pooled with kappa = 83: about 0.94 / 55-61 %. After a lighting
shift (+30 grey levels, contrast 0.8): 0.905 / 28 %, 0.898 / 26 %, 0.937 / 55 %.
``kappa=0`` is a fresh fit from the new frames only (:func:`fit_fresh`: the same Ledoit-Wolf estimate as
:func:`edge_ad.gaussian.fit`, computed for many locations at once; use it when the view itself changed).

**Leave-one-out distances.** Scores of the frames a Gaussian was fitted on are far too low: with 100
feature dimensions and a few hundred frames, a threshold set on in-sample scores flags nearly every new
normal part (measured on magnetic_tile: 99.8 % false positives at a 1 % target). Holding frames out
fixes that but costs frames or extra fits. Instead, each frame's distance as if it had been left out
follows in closed form from its in-sample squared distance ``q`` (Sherman-Morrison on a rank-one
downdate ``Sigma_-i = c Sigma - g d d^T``, ``d = x - mean``, residual ``x - mean_-i = r d``)::

    D_-i^2 = r^2 (q / c + (g / c^2) q^2 / (1 - g q / c))

- pooled with a prior: ``r = n/(n-1)``, ``c = (n+kappa)/(n-1+kappa)``, ``g = n/((n-1)(n-1+kappa))``: exact;
- fresh Ledoit-Wolf fit with shrinkage ``s``: ``r = c = n/(n-1)``, ``g = (1-s) n/(n-1)^2``, holding the
  shrinkage target and intensity fixed (both move by O(1/n)); within a few percent of exact refits.

It costs nothing beyond the in-sample distances. For the ``shared`` layout (one Gaussian pooled over
every location of every frame) a frame is a tiny part of the sample and in-sample distances are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import gaussian
from ..gaussian import _samples, _upper_factors, blas_single_thread
from ..errors import InputError



@dataclass(frozen=True)
class LooTerms:
    """Per-Gaussian terms of the leave-one-out formula (arrays of length L, or scalars)."""

    r: float
    c: np.ndarray
    g: np.ndarray
    exact: bool


def _check(feats: np.ndarray, layout: str) -> np.ndarray:
    if layout not in gaussian.LAYOUTS:
        raise InputError(f"Gaussian layout '{layout}': expected one of {', '.join(gaussian.LAYOUTS)}")
    f = np.asarray(feats)
    if f.ndim != 4:
        raise InputError(f"features have shape {f.shape}; expected [N, d, h, w]")
    if f.shape[0] < 3:
        raise InputError(f"a Gaussian refit needs at least 3 normal frames, got {f.shape[0]}")
    return f


def fit_fresh(feats: np.ndarray, layout: str) -> tuple[gaussian.GaussianStats, LooTerms]:
    """Ledoit-Wolf fit from the new frames only (``[N, d, h, w]``), as :func:`edge_ad.gaussian.fit`."""
    with blas_single_thread():
        return _fit_fresh(feats, layout)


def _fit_fresh(feats: np.ndarray, layout: str) -> tuple[gaussian.GaussianStats, LooTerms]:
    f = _check(feats, layout)
    n = f.shape[0]
    stats, shrink = gaussian.fit_with_shrinkage(f, layout)
    r = n / (n - 1.0)
    return stats, LooTerms(r=r, c=np.full(stats.mean.shape[0], r), g=(1.0 - shrink) * n / (n - 1.0) ** 2,
                           exact=False)


MAX_PRIOR_WEIGHT = 1e9  # frames; more overflows nothing useful (the new frames would count for nothing)


def check_prior_weight(kappa: float | None) -> float | None:
    """The prior weight (frames) as a float: None, or a finite number >= 0."""
    if kappa is None:
        return None
    k = float(kappa)
    if not (math.isfinite(k) and 0 <= k <= MAX_PRIOR_WEIGHT):
        raise InputError(f"Gaussian prior weight {kappa}: expected a number of frames from 0 to "
                         f"{MAX_PRIOR_WEIGHT:.0e} (0: a fit from the new frames alone)")
    return k


def refit(feats: np.ndarray, prior: gaussian.GaussianStats, kappa: float | None = None,
          cache: dict | None = None) -> tuple[gaussian.GaussianStats, LooTerms]:
    """New mean from ``feats``; covariance pooled with ``prior``'s worth ``kappa`` frames (module doc).

    ``kappa`` None: ``min(prior.n, N)``; 0: :func:`fit_fresh`. ``cache``: a dict kept between refits
    with the same prior (the prior's covariances, one inversion saved per refit).
    """
    with blas_single_thread():
        return _refit(feats, prior, kappa, cache if cache is not None else {})


def _refit(feats: np.ndarray, prior: gaussian.GaussianStats, kappa: float | None,
           cache: dict) -> tuple[gaussian.GaussianStats, LooTerms]:
    f = _check(feats, prior.layout)
    n, d, h, w = f.shape
    if kappa is None:
        kappa = float(min(max(int(prior.n), 1), n))
    kappa = check_prior_weight(kappa)
    if kappa == 0:
        return _fit_fresh(f, prior.layout)
    locs = h * w if prior.layout == "patch" else 1
    if prior.mean.shape != (locs, d) or prior.chol.shape != (locs, d, d):
        raise InputError(f"the Gaussian statistics in force have shape {prior.mean.shape} but the features give "
                         f"{locs} locations x {d} channels; recalibrate with prior weight 0 (a fresh fit)")
    means = np.empty((locs, d), np.float64)
    chol = np.empty((locs, d, d), np.float32)
    eye = np.eye(d)
    for sl, x in _samples(f, prior.layout):
        m = x.mean(axis=1)
        means[sl] = m
        xc = x - m[:, None, :]
        scatter = np.matmul(np.ascontiguousarray(xc.transpose(0, 2, 1)), xc)      # n * S
        key = (id(prior), sl.start, sl.stop)
        cov_prior = cache.get(key)
        if cov_prior is None:
            u = prior.chol[sl].astype(np.float64)
            try:
                cov_prior = np.linalg.inv(np.matmul(u.transpose(0, 2, 1), u))
            except np.linalg.LinAlgError as exc:
                raise InputError(f"the Gaussian statistics in force are singular ({exc}); recalibrate with "
                                 "prior weight 0 (a fresh fit)") from exc
            cache[key] = cov_prior
        per_frame = x.shape[1] / n                                                 # samples per frame
        cov = (scatter + kappa * per_frame * cov_prior) / (x.shape[1] + kappa * per_frame)
        mu = np.trace(cov, axis1=1, axis2=2) / d
        cov += eye * (1e-6 * np.maximum(mu, 1e-12))[:, None, None]
        chol[sl] = _upper_factors(cov)
    stats = gaussian.GaussianStats(mean=means.astype(np.float32), chol=chol, layout=prior.layout,
                                   n=int(round(n + kappa)))
    c = (n + kappa) / (n - 1.0 + kappa)
    g = n / ((n - 1.0) * (n - 1.0 + kappa))
    return stats, LooTerms(r=n / (n - 1.0), c=np.full(locs, c), g=np.full(locs, g), exact=True)


def loo_distance_map(feats: np.ndarray, stats: gaussian.GaussianStats, loo: LooTerms) -> np.ndarray:
    """Distance maps ``[N, 1, h, w]`` of the N frames ``stats`` was fitted on, each as if left out."""
    with blas_single_thread():
        dist = gaussian.distance_map(feats, stats).astype(np.float64)
    if stats.layout == "shared":
        return dist.astype(np.float32)
    h, w = dist.shape[2:]
    shape = (1, 1, h, w) if np.size(loo.c) == h * w else (1, 1, 1, 1)
    c = np.asarray(loo.c, np.float64).reshape(shape)
    g = np.asarray(loo.g, np.float64).reshape(shape)
    q = dist * dist
    den = np.maximum(1.0 - g * q / c, 1e-3)
    return (loo.r * np.sqrt(q / c + (g / (c * c)) * q * q / den)).astype(np.float32)
