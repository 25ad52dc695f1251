"""``--adapt``: fine-tune on new normals, re-export, re-quantize and rebuild with the guard, then switch.

For lines that changed more than lighting (EfficientAD, FADeR-style; the Gaussian model's adaptation is
the refit of :func:`edge_ad.calibration.recalibrate`):

0. the frames are screened as a recalibration screens them (:func:`.refit.screen_frames`, the running
   bundle as the line runs it: its backend, precision and device): likely defects are left out, a set that
   is not mostly normal parts or too small is refused, and a set that mostly scores above the threshold in
   force gets a warning;
1. :func:`edge_ad.train.adapt.adapt_bundle` trains the student and autoencoder (or the inpainter) for a
   bounded number of steps on the new normal frames into a **candidate** bundle (a new folder; the
   running bundle is never written), re-exported to ONNX with a calibration from a validation split of
   the new frames;
2. when the line inspects in INT8 or FP16 (its precision, else the running bundle's active graph's), the
   candidate is quantized the same way and checked by the accuracy guard against its FP32 graph
   (:func:`edge_ad.compile.quantize.quantize_bundle`; the new frames are the guard's images);
3. when the line runs TensorRT (:func:`edge_ad.calibration.deploy.engine_needed`: backend ``tensorrt``, or
   ``auto`` on a GPU where TensorRT is here and the running bundle has engines), the candidate's engine is built
   and guarded on the line's device (:func:`edge_ad.compile.tensorrt.compile_bundle`) in the line's precision,
   else ``best`` (INT8, else FP16, else FP32, the first to pass its guard), as ``bundle install`` and
   ``update_model`` build a new release's (:func:`edge_ad.calibration.deploy.build_line_engine`); a candidate quantized or given an engine is
   then calibrated again on its validation split scored as the line will run it (:func:`_calibrate_as_run`), so
   its threshold is in the quantized model's (or the engine's) units, not the FP32 model's;
4. with a golden set, the candidate must judge it no worse than the running bundle
   (:func:`edge_ad.calibration.deploy.check_golden`);
5. with a deploy folder, the candidate is switched in atomically (:func:`install_bundle` on the folder;
   the runtime then runs its health check). Without one, the candidate folder is left for
   ``edge-ad bundle pack`` / ``install`` or a manual switch.

Any failure (:class:`GuardFailure`, :class:`InputError`) leaves the running model as it was, says why and
removes the candidate folder, also one asked for by ``out_dir`` (by default it is written next to the
bundle as ``<bundle>.adapted-<UTC time>``, or in ``<deploy>/candidates/`` for a release of a deploy folder
(:func:`default_candidate`), and removed once installed as a release; an ``out_dir`` is kept once
installed). Needs torch (the ``train`` extra); this module imports it only inside :func:`adapt`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import atomic
from ..bundle import Bundle
from ..errors import GuardFailure, InputError
from .deploy import _has_engines, _tensorrt_here, build_line_engine, engine_needed
from .refit import MIN_FRAMES, Excluded, screen_frames

log = logging.getLogger(__name__)

VALIDATION_SHARE = 10                          # one frame in 10 calibrates the candidate (its validation split)
MIN_ADAPT_FRAMES = MIN_FRAMES * VALIDATION_SHARE   # so that the split holds what a recalibration needs


def validation_frames(n: int) -> int:
    """How many of ``n`` frames the candidate is calibrated on (the rest fine-tune it): one in 10, and never
    fewer than a recalibration needs (the screen may have left a few likely defects out of 200)."""
    return max(n // VALIDATION_SHARE, min(MIN_FRAMES, n))


def validation_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the ``n`` frames the candidate is calibrated on, indices of those it is fine-tuned on), each
    sorted: :func:`validation_frames` of them drawn at random (``seed``). One split for the fine-tuning
    (:func:`edge_ad.train.adapt.adapt_bundle`) and for the calibration fitted again on a quantized
    candidate's scores (:func:`adapt`)."""
    order = np.random.default_rng(seed).permutation(n)
    k = validation_frames(n)
    return np.sort(order[:k]), np.sort(order[k:])


MIN_KEPT_FRAMES = 2 * MIN_FRAMES   # after the screen: the 20 the candidate is calibrated on, as many to fine-tune


def check_kept_frames(n: int) -> None:
    """Refuse frames (those the screen kept) too few for :func:`validation_frames`'s split: 20 to calibrate
    the candidate on and as many more to fine-tune it on. Not :func:`check_adapt_frames`: a few likely
    defects the screen leaves out of 200 must not refuse the request."""
    if n < MIN_KEPT_FRAMES:
        raise InputError(f"--adapt on {n} frames: the candidate is calibrated on {MIN_FRAMES} of them (its "
                         f"validation split) and fine-tuned on the rest: at least {MIN_KEPT_FRAMES} are needed")


def check_adapt_frames(n: int) -> None:
    """Refuse, before any frame is collected, a request too small for one in 10 to calibrate on."""
    if n // VALIDATION_SHARE < MIN_FRAMES:
        raise InputError(f"--adapt on {n} frames: the candidate is calibrated on one frame in {VALIDATION_SHARE} "
                         f"(its validation split), and a calibration needs at least {MIN_FRAMES} frames: give "
                         f"--frames {MIN_ADAPT_FRAMES} or more")


@dataclass(frozen=True)
class AdaptResult:
    candidate: Path                    # the adapted bundle folder (the release folder once installed)
    precision: str                     # what it inspects in
    steps: int
    engine: dict | None = None         # compile_bundle's guard entry when an engine was built
    quantized: list[str] = field(default_factory=list)
    golden: dict | None = None
    install: object | None = None      # InstallResult when switched in through a deploy folder
    seconds: float = 0.0
    excluded: tuple[Excluded, ...] = ()  # frames left out as likely defects (the screen of a recalibration)
    warnings: tuple[str, ...] = ()     # most frames above the threshold in force: check they are normal parts
    threshold: float | None = None     # the image threshold of the candidate's calibration (its validation split)
    scored_on: dict | None = None      # what screened the frames (Backend.summary: backend, precision, device)
    # a quantized candidate (or one with an engine): its calibration is fitted again on the validation split's scores
    # as the line runs it (calibrated_on, Backend.summary); fp32_threshold: the threshold the FP32 model's gave
    fp32_threshold: float | None = None
    calibrated_on: dict | None = None

    def summary(self) -> dict:
        return {"candidate": str(self.candidate), "precision": self.precision, "steps": self.steps,
                "threshold": self.threshold, "fp32_threshold": self.fp32_threshold,
                "calibrated_on": self.calibrated_on, "scored_on": self.scored_on,
                "quantized": self.quantized, "engine": None if self.engine is None else self.engine.get("engine"),
                "golden": self.golden, "installed": None if self.install is None else self.install.summary(),
                "seconds": round(self.seconds, 1), "excluded": [e.to_dict() for e in self.excluded],
                "warnings": list(self.warnings)}


WORK_PREFIX = ".adapt-frames-"   # beside the bundle: the frames the candidate is quantized and guarded on


def remove_stale_work(bundle_dir: str | os.PathLike) -> list[Path]:
    """Delete the frame folders (``.adapt-frames-*``) that killed ``--adapt`` runs left beside the bundle at
    ``bundle_dir``: a run at work holds its folder's lock (:func:`edge_ad.atomic.remove_unheld` keeps it).
    Each one removed is named in an INFO line; returns them."""
    removed = []
    for left in sorted(Path(bundle_dir).absolute().parent.glob(WORK_PREFIX + "*")):
        if left.is_dir() and not left.is_symlink() and atomic.remove_unheld(left):
            log.info("removed %s: the frames of an 'edge-ad calibrate --adapt' that was killed", left)
            removed.append(left)
    return removed


def _write_frames(frames: Sequence[np.ndarray], folder: Path) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        ok, buf = cv2.imencode(".png", cv2.cvtColor(np.asarray(f), cv2.COLOR_RGB2BGR))
        if not ok:
            raise InputError(f"adapt frame {i}: could not encode")
        (folder / f"{i:05d}.png").write_bytes(buf.tobytes())
    return folder


def default_candidate(bundle_dir: Path, stamp: str) -> Path:
    """Where ``adapt`` writes its candidate without ``out_dir``: next to the bundle as
    ``<bundle>.adapted-<stamp>``; for a release of a deploy folder in ``<deploy>/candidates/`` instead, never
    among its releases (a candidate is no release: it never passed an install)."""
    from .deploy import CANDIDATES, release_deploy_dir

    deploy = release_deploy_dir(bundle_dir)
    parent = deploy / CANDIDATES if deploy is not None else bundle_dir.parent
    return parent / f"{bundle_dir.name}.adapted-{stamp}"


def check_adapt(src: Bundle, out: str | os.PathLike | None, golden_dir: str | os.PathLike | None = None,
                device: str = "cpu") -> None:
    """What ``adapt`` refuses, checked before any frame is collected: a Gaussian bundle (nothing to
    fine-tune), an ``out`` folder that exists, a golden folder without golden images, a training device
    torch does not have (and no torch at all)."""
    if src.kind == "gaussian":
        raise InputError("--adapt: the Gaussian model has no weights to fine-tune; 'edge-ad calibrate' without "
                         "--adapt refits its statistics, which is its adaptation")
    if not src.has("checkpoint.pt"):
        raise InputError(f"{src.path / 'checkpoint.pt'}: not found; --adapt fine-tunes the trained weights that "
                         "'edge-ad train' writes there (a bundle without them can be recalibrated, not adapted: "
                         "leave out --adapt, or retrain)")
    if out is not None and Path(out).exists():
        raise InputError(f"{out}: exists; give --adapt-out a new folder")
    if golden_dir is not None:
        from .deploy import golden_images

        golden_images(golden_dir)
    try:
        from ..train.common import check_device   # torch
    except ImportError as exc:
        raise InputError(f"--adapt needs torch (the train extra: pip install 'edge-ad[train]'): {exc}") from None
    check_device(device, "--train-device")


def adapt(bundle_dir, frames: Sequence[np.ndarray], *, steps: int = 200, policy: str | None = None,
          device: str = "cpu", out_dir=None, golden_dir=None, deploy_dir=None, backend: str = "auto",
          precision: str | None = None, run_device: str | None = None, limits=None, progress: bool = True,
          require_golden: bool = True, labels: Sequence[str] | None = None) -> AdaptResult:
    """Fine-tune the bundle at ``bundle_dir`` on ``frames`` (on torch ``device``) and validate the candidate
    (module doc) as the line runs it: on ``backend`` / ``precision`` / ``run_device`` (the line's model
    settings; ``precision`` None: each bundle's active graph, or its best guarded engine), the frames screened
    so, the candidate quantized in that precision (None: the running bundle's active graph's) and, on a TensorRT
    line, its engine built in it (None: ``best``) on ``run_device``, as an install builds one, its golden check and
    install probe run so.
    With ``deploy_dir`` the install's golden rule applies: ``golden_dir``, else ``<deploy>/golden``, else
    refused unless ``require_golden`` is false. ``labels`` name the frames the screen leaves out (as for
    :func:`~edge_ad.calibration.recalibrate`)."""
    from ..inspector import Inspector
    from ..runtime.backends import open_backend
    from ..train.adapt import adapt_bundle   # torch: only here

    t0 = time.perf_counter()
    src = Bundle.open(bundle_dir, verify=True)
    remove_stale_work(src.path)
    keep_out = out_dir is not None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = Path(out_dir) if keep_out else default_candidate(src.path, stamp)
    check_adapt(src, out, golden_dir, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_adapt_frames(len(frames))
    if deploy_dir is not None:
        from .deploy import golden_for

        golden_dir = golden_for(deploy_dir, golden_dir, require_golden)
    be = open_backend(src, backend, precision, run_device)
    scored_on = be.summary()
    try:   # the screen of a recalibration: defects left out, a set of (mostly) defects refused or warned of
        # refused as a recalibration is (more than a quarter flagged); what is kept still holds the 20 frames
        # the candidate is calibrated on (validation_frames) and at least as many more to fine-tune on
        used, excluded, warnings = screen_frames(Inspector(src, be), frames, min_frames=MIN_KEPT_FRAMES,
                                                 progress=progress, labels=labels)
    finally:
        be.close()
    for e in excluded:
        log.info("adapt frame %d (%s) left out: score %.4g, z %.1f (%s)", e.index, e.name, e.score, e.z, e.reason)
    frames = [frames[i] for i in used]
    # the line's precision, as the steps below run the candidate (None: as the line runs each bundle, its active
    # graph or its best guarded engine); the ONNX graphs are quantized in it, else in the running bundle's active
    # graph's (the line inspects in that when it runs ONNX), and an engine is built in it, else 'best' (as an install
    # builds one: the active ONNX precision, FP32 on a bundle never quantized, would make a slow FP32 engine)
    precision = precision.removesuffix("-u8") if precision else None
    graphs = precision or src.active_precision
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=src.path.parent))
    # held while it works: a later calibrate removes the folder once this process is gone (remove_stale_work)
    with atomic.folder_lock(work, f"{work}: taken by another 'edge-ad calibrate --adapt'"):
        try:
            cand = adapt_bundle(src.path, frames, out, steps=steps, policy=policy, device=device)
            quantized: list[str] = []
            engine = None
            calib = _write_frames(frames, work / "normals")
            if graphs in ("int8", "fp16"):
                from ..compile.quantize import quantize_bundle

                # activate: the candidate runs in the line's precision, FP16 or INT8 without its CPU form included
                res = quantize_bundle(cand, graphs, calib_dir=calib, limits=limits, progress=progress,
                                      activate=True)
                quantized = list(res.files)
            if engine_needed(backend, run_device, src):   # as an install builds one: the line's device
                engine = build_line_engine(cand, calib, precision, run_device, progress, limits)
            elif _has_engines(src) and not _tensorrt_here():
                log.warning("the running bundle has TensorRT engines but TensorRT is not importable here; the "
                            "candidate's engine is left for 'edge-ad compile' on the device")
            fp32_threshold = calibrated_on = None
            if quantized or engine is not None:   # the line scores with these, not with the FP32 model: fit on theirs
                fp32_threshold = cand.calibration().threshold
                calibrated_on = _calibrate_as_run(cand, [frames[i] for i in validation_split(len(frames))[0]],
                                                  backend, precision, run_device)
            cand = Bundle.open(cand.path, verify=True)
            threshold = cand.calibration().threshold   # read here: an install may leave no candidate folder
            golden = None
            if golden_dir is not None and deploy_dir is None:
                from .deploy import check_golden, golden_failure

                golden = check_golden(cand, golden_dir, src, backend=backend, precision=precision, device=run_device)
                if not golden["passed"]:
                    raise golden_failure(golden, "--adapt: the adapted model failed the golden-set check")
            install = None
            if deploy_dir is not None:
                from .deploy import install_bundle, open_probe

                install = install_bundle(cand.path, deploy_dir, golden_dir, require_golden=require_golden,
                                         backend=backend, precision=precision, device=run_device, calib_dir=calib,
                                         progress=progress, probe=open_probe(backend, precision, run_device))
                golden = install.golden
            result = AdaptResult(install.path if install is not None else cand.path, cand.active_precision, steps,
                                 engine, quantized, golden, install, time.perf_counter() - t0, tuple(excluded),
                                 warnings, threshold, scored_on, fp32_threshold, calibrated_on)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)   # check_adapt made sure it did not exist: ours, and unusable
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if install is not None and not keep_out:
        shutil.rmtree(out, ignore_errors=True)   # installed as a release: the working copy goes
    return result


def _calibrate_as_run(cand: Bundle, frames: Sequence[np.ndarray], backend: str, precision: str | None,
                      device: str | None) -> dict:
    """Fit ``cand``'s calibration again (map normalization, threshold by its policy, normal statistics), as
    :func:`edge_ad.train.adapt.adapt_bundle` fitted it on the FP32 model's outputs, on the outputs of ``frames``
    (its validation split) scored as the line will run it: ``backend`` / ``precision`` / ``device``, the
    quantized graph or the engine. Written as the candidate's next calibration version (the FP32 one stays in
    its history); returns what scored them (:meth:`Backend.summary`)."""
    from ..data.image import to_batch
    from ..inspector import Inspector
    from ..runtime.backends import open_backend, summary_text
    from ..train.pipeline import fit_calibration

    be = open_backend(cand, backend, precision, device)
    try:
        insp = Inspector(cand, be)
        parts = [insp.raw_maps(to_batch(frames[i:i + 16], insp.image_size)) for i in range(0, len(frames), 16)]
        scored_on = be.summary()
    finally:
        be.close()
    raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ran_on = summary_text(scored_on)
    if not all(np.all(np.isfinite(v)) for v in raw.values()):
        raise GuardFailure(f"--adapt: the candidate's outputs on {ran_on} are not all finite on its {len(frames)} "
                           "calibration frames; the running model is unchanged")
    fp32 = cand.calibration()
    cal = fit_calibration(cand.kind, raw, fp32.map_pad, fp32.policy, source=f"{fp32.source}, scored on {ran_on}")
    written = cand.write_calibration(cal)
    log.info("adapted model: calibration v%d fitted on its scores on %s: threshold %.6g (%.6g on the FP32 model's)",
             written.version, ran_on, written.threshold, fp32.threshold)
    return scored_on
