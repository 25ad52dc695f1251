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

import contextlib
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
                st = cls(mean=z["mean"], chol=z["chol"], layout=str(z["layout"]), n=int(z["n"]))
        except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
            raise InputError(f"{p}: unreadable Gaussian statistics ({type(exc).__name__}: {exc or 'empty file'}); "
                             "expected an .npz with mean, chol, layout and n") from exc
        st.check(p)
        return st

    def check(self, where: str | os.PathLike) -> None:
        """:class:`InputError` naming ``where`` unless the arrays fit together and are finite."""
        m, c = self.mean, self.chol
        if self.layout not in LAYOUTS:
            raise InputError(f"{where}: layout '{self.layout}': expected one of {', '.join(LAYOUTS)}")
        if m.ndim != 2 or c.shape != (m.shape[0], m.shape[1], m.shape[1]) or m.size == 0:
            raise InputError(f"{where}: mean has shape {m.shape} and chol {c.shape}; expected [L, d] and "
                             "[L, d, d]")
        for name, a in (("mean", m), ("chol", c)):
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                raise InputError(f"{where}: {name} holds values that are not finite numbers (dtype {a.dtype})")


_LOCATIONS_PER_CHUNK = 128  # Gaussians fitted at once (work arrays [128, n, d] and [128, d, d] in float64)


def blas_single_thread():
    """Run the batched small-matrix algebra on one BLAS thread.

    Thousands of 100 x 100 inversions gain nothing from BLAS threads, and on a loaded CPU (inference
    running beside a recalibration) OpenBLAS threads spin against each other: measured on 2 busy cores,
    a 200-frame refit took 9-18 s with 2 threads and 1.6-1.9 s with one. Needs ``threadpoolctl``
    (a dependency); without it, nothing changes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _ledoit_wolf_many(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shrunk covariances of ``x [L, n, d]`` -> (cov ``[L, d, d]``, shrinkage ``[L]``); float64.

    Ledoit & Wolf (2004) optimal shrinkage towards a scaled identity, for L sample sets at once.
    """
    L, n, d = x.shape
    nn = max(n, 1)
    xc = x - x.mean(axis=1, keepdims=True)
    xct = np.ascontiguousarray(xc.transpose(0, 2, 1))
    s = np.matmul(xct, xc) / nn                                   # [L, d, d]
    mu = np.trace(s, axis1=1, axis2=2) / d                        # [L]
    eye = np.eye(d)
    dev = s - mu[:, None, None] * eye
    delta = np.einsum("lij,lij->l", dev, dev) / d
    del dev
    x2t = xct * xct
    x2 = np.ascontiguousarray(x2t.transpose(0, 2, 1))
    m2 = np.matmul(x2t, x2) / nn
    m2 -= s * s
    beta_ = m2.sum(axis=(1, 2)) / (d * nn)
    del m2, x2, x2t, xct, xc
    beta = np.minimum(beta_, delta)
    shrink = np.divide(beta, delta, out=np.zeros_like(delta), where=delta != 0)
    cov = (1.0 - shrink)[:, None, None] * s + (shrink * mu)[:, None, None] * eye
    cov += eye * (1e-6 * np.maximum(mu, 1e-12))[:, None, None]
    return cov, shrink


def _upper_factors(cov: np.ndarray) -> np.ndarray:
    """U with U^T U = inv(cov), for ``cov [L, d, d]`` ."""
    try:
        prec = np.linalg.inv(cov)
        prec = 0.5 * (prec + prec.transpose(0, 2, 1))
        lower = np.linalg.cholesky(prec)
    except np.linalg.LinAlgError as exc:
        raise InputError(f"the Gaussian refit failed: a covariance is not positive definite ({exc}); the "
                         "calibration frames may be identical or blank") from exc
    return lower.transpose(0, 2, 1)


def _samples(f: np.ndarray, layout: str):
    """Yield (slice of Gaussians, samples ``[l, n', d]`` float64) in memory-bounded chunks."""
    n, d, h, w = f.shape
    if layout == "patch":
        flat = f.reshape(n, d, h * w)
        step = _LOCATIONS_PER_CHUNK
        for a in range(0, h * w, step):
            yield slice(a, min(a + step, h * w)), np.asarray(flat[:, :, a:a + step], np.float64).transpose(2, 0, 1)
    else:
        yield slice(0, 1), np.asarray(f, np.float64).transpose(0, 2, 3, 1).reshape(1, -1, d)


def fit_with_shrinkage(feats: np.ndarray, layout: str = "patch",
                       done: Callable[[int], Any] | None = None) -> tuple[GaussianStats, np.ndarray]:
    """Fit from normal features ``[N, d, h, w]``; also returns the Ledoit-Wolf shrinkage per Gaussian.
    ``done(k)`` is called after each chunk with the number of Gaussians it fitted (``h * w`` in all for the
    patch layout, else 1): a progress bar's ``update``."""
    if layout not in LAYOUTS:
        raise InputError(f"Gaussian layout '{layout}': expected one of {', '.join(LAYOUTS)}")
    f = np.asarray(feats)
    if f.ndim != 4:
        raise InputError(f"features have shape {f.shape}; expected [N, d, h, w]")
    n, d, h, w = f.shape
    if n < 2:
        raise InputError(f"a Gaussian needs at least 2 normal images, got {n}")
    locs = h * w if layout == "patch" else 1
    means = np.empty((locs, d), np.float64)
    chol = np.empty((locs, d, d), np.float32)
    shrink = np.empty(locs, np.float64)
    with blas_single_thread():
        for sl, x in _samples(f, layout):
            means[sl] = x.mean(axis=1)
            cov, shrink[sl] = _ledoit_wolf_many(x)
            chol[sl] = _upper_factors(cov)
            if done is not None:
                done(sl.stop - sl.start)
    return GaussianStats(mean=means.astype(np.float32), chol=chol, layout=layout, n=n), shrink


def fit(feats: np.ndarray, layout: str = "patch", done: Callable[[int], Any] | None = None) -> GaussianStats:
    """Fit from normal features ``[N, d, h, w]``; ``done`` as for :func:`fit_with_shrinkage`."""
    return fit_with_shrinkage(feats, layout, done)[0]


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
