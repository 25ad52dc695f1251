"""Gaussian anomaly head in numpy: fit and Mahalanobis distance on backbone features.

The Gaussian model's graph stops at the (frozen, pretrained) backbone features ``feat [B, d, h, w]``.
Its statistics live here, outside the graph, as calibration data: refitting them on the device from new
normal frames is one pass of the graph plus a covariance estimate, and never rebuilds an engine.

Variants (``layout``):
- ``patch``: one Gaussian per feature-map location (PaDiM-like; aligned parts).
- ``shared``: one Gaussian for all locations (parts that are not aligned).
- ``image``: the graph outputs globally pooled features ``[B, d, 1, 1]`` (Rippel et al. 2020); one Gaussian.
Covariances are shrunk towards a scaled identity (Ledoit-Wolf's optimal shrinkage intensity, computed
per Gaussian), which keeps them invertible with few samples.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic
from .errors import InputError

LAYOUTS = ("patch", "shared", "image")


@dataclass(frozen=True)
class GaussianStats:
    mean: np.ndarray        # [L, d] (L = h*w for 'patch', 1 otherwise)
    chol: np.ndarray        # [L, d, d] upper factor U with U^T U = inverse covariance
    layout: str
    n: int

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.astype(np.float32), chol=self.chol.astype(np.float32),
                 layout=np.array(self.layout), n=np.array(self.n))
        atomic.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                return cls(mean=z["mean"], chol=z["chol"], layout=str(z["layout"]), n=int(z["n"]))
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{p}: unreadable Gaussian statistics ({exc})") from exc


def _ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Shrunk covariance of samples ``x [n, d]`` (Ledoit & Wolf 2004)."""
    n, d = x.shape
    xc = x - x.mean(axis=0, keepdims=True)
    s = (xc.T @ xc) / max(n, 1)
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    x2 = xc ** 2
    beta_ = ((x2.T @ x2) / max(n, 1) - s ** 2).sum() / (d * max(n, 1))
    beta = min(beta_, delta)
    shrink = 0.0 if delta == 0 else beta / delta
    cov = (1.0 - shrink) * s + shrink * mu * np.eye(d)
    cov += np.eye(d) * (1e-6 * max(mu, 1e-12))
    return cov


def _upper_factor(cov: np.ndarray) -> np.ndarray:
    """U with U^T U = inv(cov)."""
    prec = np.linalg.inv(cov)
    prec = 0.5 * (prec + prec.T)
    lower = np.linalg.cholesky(prec)
    return lower.T


def fit(feats: np.ndarray, layout: str = "patch") -> GaussianStats:
    """Fit from normal features ``[N, d, h, w]``."""
    if layout not in LAYOUTS:
        raise InputError(f"Gaussian layout '{layout}': expected one of {', '.join(LAYOUTS)}")
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 4:
        raise InputError(f"features have shape {f.shape}; expected [N, d, h, w]")
    n, d, h, w = f.shape
    if n < 2:
        raise InputError(f"a Gaussian needs at least 2 normal images, got {n}")
    if layout == "patch":
        x = f.reshape(n, d, h * w).transpose(2, 0, 1)          # [L, n, d]
        means = x.mean(axis=1)
        chol = np.stack([_upper_factor(_ledoit_wolf(x[i])) for i in range(h * w)])
    else:
        x = f.transpose(0, 2, 3, 1).reshape(-1, d)              # all locations pooled
        means = x.mean(axis=0, keepdims=True)
        chol = _upper_factor(_ledoit_wolf(x))[None]
    return GaussianStats(mean=means.astype(np.float32), chol=chol.astype(np.float32), layout=layout, n=n)


def distance_map(feats: np.ndarray, stats: GaussianStats) -> np.ndarray:
    """Mahalanobis distance per location: ``[B, d, h, w]`` -> ``[B, 1, h, w]`` float32."""
    f = np.asarray(feats, dtype=np.float32)
    b, d, h, w = f.shape
    if stats.mean.shape[-1] != d:
        raise InputError(f"features have {d} channels but the Gaussian statistics have {stats.mean.shape[-1]}")
    x = f.reshape(b, d, h * w).transpose(2, 0, 1)               # [L, B, d]
    if stats.layout == "patch":
        if stats.mean.shape[0] != h * w:
            raise InputError(f"feature map is {h}x{w} but the Gaussian statistics have "
                             f"{stats.mean.shape[0]} locations")
        diff = x - stats.mean[:, None, :]                       # [L, B, d]
        z = np.matmul(diff, stats.chol.transpose(0, 2, 1))      # [L, B, d] = (U diff)^T
    else:
        diff = x - stats.mean[0]
        z = diff @ stats.chol[0].T
    dist = np.sqrt(np.einsum("lbd,lbd->bl", z, z))
    return dist.reshape(b, 1, h, w).astype(np.float32)
