"""Inspector: backend + model head + calibration -> scores and decisions.

The one object the inspection loop, the calibration and evaluation call. It owns no I/O beyond
reading the bundle, holds the calibration in force, and swaps it atomically between frames.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from . import gaussian, scoring
from .bundle import Bundle
from .data.image import to_batch
from .errors import InputError
from .scoring import Calibration, Scored


class Inspector:
    def __init__(self, bundle: Bundle, backend, calibration: Calibration | None = None):
        self.bundle = bundle
        self.backend = backend
        self.image_size = tuple(bundle.image_size)
        self._lock = threading.Lock()
        self._gauss_cache: dict[str, gaussian.GaussianStats] = {}
        self._cal = calibration if calibration is not None else bundle.calibration()
        self._check(self._cal)

    @classmethod
    def open(cls, bundle: Bundle, backend: str = "auto", precision: str | None = None, device: str | None = None,
             **options) -> "Inspector":
        """The model of ``bundle`` opened by :func:`~edge_ad.runtime.backends.open_backend` (``backend``,
        ``precision``, ``device``, ``options``: its graph there and recorded, its outputs those the manifest
        names) under the calibration in force (readable, its maps the model's, a Gaussian model's statistics
        there): what ``edge-ad run`` opens, and what ``bundle install``'s probe, ``doctor`` and ``bundle
        pack`` check a bundle by. The caller closes ``.backend``; here it is closed when the calibration is
        refused."""
        from .runtime.backends import open_backend

        be = open_backend(bundle, backend, precision, device, **options)
        try:
            return cls(bundle, be)
        except BaseException:
            be.close()
            raise

    # ------------------------------------------------------------------ calibration
    @property
    def calibration(self) -> Calibration:
        return self._cal

    def set_calibration(self, cal: Calibration) -> None:
        """Put ``cal`` in force. Validated first; frames already in ``inspect`` finish with the old one."""
        self._check(cal)
        with self._lock:
            self._cal = cal

    def _check(self, cal: Calibration) -> None:
        if self.bundle.kind == "gaussian":
            self.gaussian_stats(cal)
        missing = [n for n in cal.maps if n not in self.map_names()]
        if missing:
            raise InputError(f"calibration v{cal.version} names maps {missing}; this model makes {self.map_names()}")

    def map_names(self) -> list[str]:
        return ["map"] if self.bundle.kind == "gaussian" else list(self.bundle.outputs)

    def gaussian_stats(self, cal: Calibration) -> gaussian.GaussianStats:
        name = str(cal.extra.get("gaussian", ""))
        if not name:
            raise InputError(f"calibration v{cal.version} of a Gaussian model names no statistics file "
                             "(extra.gaussian)")
        st = self._gauss_cache.get(name)
        if st is None:
            p = self.bundle.file(name)
            if not p.is_file():
                raise InputError(f"{p}: Gaussian statistics named by calibration v{cal.version} not found")
            st = gaussian.GaussianStats.load(p)
            self._gauss_cache = {name: st}  # keep one: the one in force
        return st

    @property
    def model_hash(self) -> str:
        """The identity of the model in force (:meth:`Bundle.model_hash`): for a Gaussian bundle it follows
        the statistics the calibration in force names, so a refit changes it."""
        return self.model_hash_of(self._cal)

    def model_hash_of(self, cal: Calibration) -> str:
        """The identity of the model with calibration ``cal``: what scored a batch with ``cal`` (read once for
        the batch, as :meth:`inspect_batch` does), whatever calibration is in force by now."""
        return self.bundle.model_hash(calibration=cal)

    # ------------------------------------------------------------------ inference
    def raw_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.infer(batch)

    def head(self, outputs: dict[str, np.ndarray], cal: Calibration | None = None) -> dict[str, np.ndarray]:
        """Backend outputs -> raw anomaly maps ``[B, 1, h, w]``."""
        if self.bundle.kind == "gaussian":
            cal = cal or self._cal
            return {"map": gaussian.distance_map(outputs["feat"], self.gaussian_stats(cal))}
        return outputs

    def raw_maps(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.head(self.raw_outputs(batch))

    def inspect_batch(self, batch: np.ndarray) -> Scored:
        cal = self._cal  # one calibration for the whole batch
        return scoring.score(self.head(self.raw_outputs(batch), cal), cal)

    def inspect(self, frames: Sequence[np.ndarray]) -> Scored:
        return self.inspect_batch(to_batch(frames, self.image_size))

    def full_maps(self, scored: Scored, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        return scoring.upsample(scored.combined, size_hw or self.image_size)
