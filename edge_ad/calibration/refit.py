"""Recalibration: new normal frames -> a new calibration version, written atomically and kept in history.

``recalibrate(bundle, inspector, frames, policy)``:

1. runs the deployed artefact (the inspector's backend: the same graph or engine and precision that
   inspects) on the frames, once;
2. **screens out defects** (pass 1): each frame's image score under the calibration in force, as a robust
   z-score within the set, ``z = (score - median) / (1.4826 * MAD)``; frames with ``z > screen_z``
   (default 6) are reported and left out. The score screened is the maximum of the combined map without
   its pad (:func:`edge_ad.scoring.unpadded_scores`): EfficientAD pads its map with zeros, so under a
   calibration fitted to the light many good frames score exactly 0, the MAD of such a set collapses and
   ordinary good frames would get z-scores in the hundreds; without the pad they keep their spread (the same
   score wherever the image score is above 0). The reference is the set itself, not the old calibration's
   normal statistics: after a lighting change *every* frame scores far from the old normals, while a
   defective part still stands out from the other new frames. A Gaussian bundle is scored here with the
   statistics it was trained with (``extra["gaussian_prior"]``), not with a refit in force: a refit saw
   earlier calibration frames and scores those far too low (in-sample), so every frame it did not see
   would stand out;
3. refits what calibration holds: for the Gaussian model the Gaussian statistics themselves (a new
   ``gaussian.d/NNNN.npz``: the mean from the new frames, the covariance pooled with the trained one;
   :mod:`.gaussfit`), then the map-normalization quantiles and the image threshold by the policy
   (``fpr:P``, ``max``, ``sigma:K``: :func:`edge_ad.scoring.threshold_from_policy`). Gaussian scores are
   leave-one-out scores (:mod:`.gaussfit`), so the threshold is set on scores of frames the statistics
   did not see, as on a validation split, without giving up any frame;
4. screens again (pass 2) with the same rule on the new scores, and refits once more without the frames
   it flags (a defect hidden by a large lighting change shows up once the model fits the new light);
5. refuses a set with fewer than ``min_frames`` usable frames, or where more than ``max_excluded`` of the
   frames were flagged (the set is then not mostly normal parts, and the median is not a safe reference);
6. writes the Gaussian file (atomic) and then the calibration as a new version (history file, then
   ``calibration.json``, both atomic: :meth:`Bundle.write_calibration`). A power cut at any point leaves
   the previous calibration in force and complete.

It never touches the inspector: the caller swaps the returned calibration in between two frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .. import atomic, gaussian, scoring
from ..bundle import Bundle
from ..data.image import to_batch
from ..errors import InputError, RuntimeFailure, name_text, os_error_text
from ..scoring import Calibration
from . import gaussfit

log = logging.getLogger(__name__)

DEFAULT_POLICY = "fpr:0.001"
SCREEN_Z = 6.0
MIN_FRAMES = 20
MAX_EXCLUDED = 0.25
KEEP_GAUSSIAN = 5
# how the user of each route puts the calibration replaced back (the "most frames above the threshold" warning)
CLI_ROLLBACK = "'edge-ad calibrate --rollback'"
MQTT_ROLLBACK = "the MQTT rollback_calibration command"
# --adapt writes no calibration version into the running bundle: what it puts in force is a release
ADAPT_ROLLBACK = ("'edge-ad bundle rollback' once --deploy has switched the adapted model in (a candidate only "
                  "written is not in force: delete it)")
GAUSSIAN_DIR = "gaussian.d"


@dataclass(frozen=True)
class Excluded:
    """A frame left out of the calibration: its index in the given frames, why, its numbers, and its label
    (what the collector called it: the image file of a folder, ``frame N`` of a camera; "" when none)."""

    index: int
    score: float       # image score (pass 1: under the calibration in force, for a Gaussian bundle with the
                       # trained statistics; pass 2: under the refit)
    z: float           # robust z-score within the set
    reason: str
    label: str = ""

    @property
    def name(self) -> str:
        """The frame as messages name it: its label, else its index in the set."""
        return self.label or f"frame {self.index}"

    def to_dict(self) -> dict:
        return {"index": self.index, "label": self.label or None, "score": _num(self.score), "z": _num(self.z),
                "reason": self.reason}


@dataclass(frozen=True)
class CalibrationResult:
    calibration: Calibration               # written as a new version and in force in the bundle
    previous: Calibration                  # the one in force before
    excluded: tuple[Excluded, ...]
    n_frames: int
    n_used: int
    scores: np.ndarray = field(repr=False)  # image scores of the used frames under the new calibration
    gaussian_file: str | None = None
    timings: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()          # things to check before trusting it (not errors)

    def summary(self) -> dict:
        """JSON-ready summary (CLI output, MQTT command reply)."""
        c, p = self.calibration, self.previous
        return {"version": c.version, "previous_version": p.version, "policy": c.policy,
                "threshold": c.threshold, "previous_threshold": p.threshold, "frames": self.n_frames,
                "n_used": self.n_used, "excluded": [e.to_dict() for e in self.excluded],
                "normal": dict(c.normal), "gaussian_file": self.gaussian_file, "warnings": list(self.warnings),
                "timings_s": {k: round(float(v), 3) for k, v in self.timings.items()}}


def _num(x: float):
    x = float(x)
    return x if np.isfinite(x) else None


def robust_z(scores: np.ndarray, fallback_scale: float | None = None) -> np.ndarray:
    """``(s - median) / scale`` over the finite scores; non-finite scores get +inf.

    The scale is ``1.4826 * MAD``. When more than half the scores tie (a quantized output takes few
    levels) the MAD is 0; the scale is then ``IQR / 1.349``, or when that is 0 too ``1.2533 *`` the mean
    absolute deviation from the median (each the standard deviation for normal data), and not below
    ``fallback_scale`` (the normal standard deviation of the calibration in force): a set this tied says
    little about its own spread. The scale has a floor of 0.1 % of |median| (and 1e-9), so a set of
    near-identical frames does not turn noise into huge z-scores.
    """
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    z = np.full(s.shape, np.inf)
    if not ok.any():
        return z
    v = s[ok]
    med = float(np.median(v))
    dev = np.abs(v - med)
    scale = 1.4826 * float(np.median(dev))
    if not scale > 0:
        q1, q3 = np.quantile(v, [0.25, 0.75])
        scale = float(q3 - q1) / 1.349 or 1.2533 * float(dev.mean())
        if fallback_scale is not None and np.isfinite(fallback_scale):
            scale = max(scale, float(fallback_scale))
    scale = max(scale, 1e-3 * abs(med), 1e-9)
    z[ok] = (v - med) / scale
    return z


def _screen(scores: np.ndarray, index: np.ndarray, screen_z: float, reason: str,
            fallback_scale: float | None = None, labels: Sequence[str] | None = None,
            screen_on: np.ndarray | None = None) -> list[Excluded]:
    """The frames whose robust z-score is above ``screen_z`` (or not finite). ``scores`` are the image
    scores reported; ``screen_on`` (default: ``scores``) what the z-scores are measured on: the scores
    without the map's pad (:func:`edge_ad.scoring.unpadded_scores`), which do not pile up at 0."""
    z = robust_z(scores if screen_on is None else screen_on, fallback_scale)
    out = []
    for i in np.nonzero(~(z <= screen_z))[0]:
        why = "non-finite score" if not np.isfinite(scores[i]) else reason
        k = int(index[i])
        out.append(Excluded(k, float(scores[i]), float(z[i]), why, str(labels[k]) if labels is not None else ""))
    return out


def _labels(labels: Sequence[str] | None, n: int) -> list[str] | None:
    """The frames' labels, one per frame the model pass saw (None: none given), as valid Unicode: a file name
    that is not UTF-8 shows its bytes as ``\\xfe`` (:func:`~edge_ad.errors.name_text`), in messages, replies and
    the calibration record's ``excluded_labels``."""
    if labels is None:
        return None
    labels = [name_text(str(x)) for x in labels]
    if len(labels) != n:
        raise InputError(f"calibration: {len(labels)} labels for {n} frames; expected one per frame")
    return labels


# ----------------------------------------------------------------------------- the model pass
def _run_model(inspector, frames: Iterable[np.ndarray], batch_size: int, progress: bool, total: int | None):
    """One pass of the deployed artefact: (kept outputs, image scores under the calibration in force, the
    same without the map's pad (what the screen measures: :func:`edge_ad.scoring.unpadded_scores`), n)."""
    from tqdm import tqdm

    cur = inspector.calibration
    gaussian = inspector.bundle.kind == "gaussian"
    kept: dict[str, list[np.ndarray]] = {}
    scores: list[np.ndarray] = []
    unpadded: list[np.ndarray] = []
    n = 0
    buf: list[np.ndarray] = []
    bar = tqdm(total=total, desc="calibrate: inference", unit="frame", disable=None if progress else True,
               leave=False)

    def flush():
        nonlocal n
        batch = to_batch(buf, inspector.image_size)
        outs = inspector.raw_outputs(batch)
        maps = inspector.head(outs, cur)
        scored = scoring.score(maps, cur)
        scores.append(scored.scores.astype(np.float64))
        unpadded.append(scoring.unpadded_scores(scored.combined, cur.map_pad).astype(np.float64))
        keep = {"feat": outs["feat"]} if gaussian else {k: maps[k] for k in cur.maps}
        for k, v in keep.items():
            kept.setdefault(k, []).append(np.asarray(v, np.float32))
        n += len(buf)
        bar.update(len(buf))
        buf.clear()

    try:
        for i, f in enumerate(frames):
            f = np.asarray(f)
            if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
                raise InputError(f"calibration frame {i}: shape {f.shape} dtype {f.dtype}; expected RGB uint8 "
                                 "[H, W, 3]")
            buf.append(f)
            if len(buf) >= batch_size:
                flush()
        if buf:
            flush()
    finally:
        bar.close()
    if n == 0:
        return {}, np.zeros(0), np.zeros(0), 0
    return {k: np.concatenate(v) for k, v in kept.items()}, np.concatenate(scores), np.concatenate(unpadded), n


def _screen_scores(feats: np.ndarray, stats: gaussian.GaussianStats, cur: Calibration, batch: int) -> np.ndarray:
    """Image scores of Gaussian features under ``stats``, normalized as ``cur`` (the robust z-score of the
    screen does not depend on the scale)."""
    return np.concatenate([scoring.score({"map": gaussian.distance_map(feats[i:i + batch], stats)}, cur).scores
                           for i in range(0, len(feats), batch)]).astype(np.float64)


# ----------------------------------------------------------------------------- fitting
def _fit(cur: Calibration, kept: dict, used: np.ndarray, policy: str, prior, prior_weight: float | None,
         cache: dict):
    """(calibration without version, image scores of the used frames, the same without the map's pad (what
    the screen measures), Gaussian stats or None)."""
    weights = {name: norm.weight for name, norm in cur.maps.items()}
    stats = None
    if prior is not None:
        feats = kept["feat"][used]
        stats, loo = gaussfit.refit(feats, prior, prior_weight, cache)
        raw = {"map": gaussfit.loo_distance_map(feats, stats, loo)}
    else:
        raw = {k: v[used] for k, v in kept.items()}
    same = ("are the frames all the same (a frozen camera, one image copied)? calibrate on frames of different "
            "normal parts; the calibration in force is unchanged")
    try:
        norms = scoring.fit_map_norms(raw, weights={k: weights.get(k, 1.0 / len(raw)) for k in raw}, flat_ok=False)
    except InputError as exc:
        raise InputError(f"calibration frames: {exc}: {same}") from None
    tmp = Calibration(maps=norms, threshold=0.0, policy=policy, map_pad=cur.map_pad)
    scored = scoring.score(raw, tmp)
    s = scored.scores.astype(np.float64)
    u = scoring.unpadded_scores(scored.combined, tmp.map_pad).astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise RuntimeFailure("recalibration produced non-finite scores; the calibration in force is unchanged")
    if not np.ptp(s) > 1e-6 * max(1.0, float(np.abs(s).max())):
        raise InputError(f"calibration frames: the image scores of the {s.size} frames used are all {s[0]:.6g}, "
                         f"with no spread to set a threshold from: {same}")
    thr = scoring.threshold_from_policy(s, policy)
    return tmp.replace(threshold=thr, normal=scoring.normal_stats(s)), s, u, stats


def _gaussian_name(bundle: Bundle, version: int, cur: Calibration) -> str:
    """``gaussian.d/NNNN.npz`` for the version about to be written, unless a kept calibration uses it."""
    used = _referenced_gaussian(bundle) | {str(cur.extra.get("gaussian", ""))}
    name = f"{GAUSSIAN_DIR}/{version:04d}.npz"
    k = 1
    while name in used:
        name = f"{GAUSSIAN_DIR}/{version:04d}-{k}.npz"
        k += 1
    return name


def _prior_name(cal: Calibration) -> str:
    """The Gaussian statistics a refit pools with: those the bundle was trained with (see gaussfit)."""
    return str(cal.extra.get("gaussian_prior") or cal.extra.get("gaussian") or "")


def _referenced_gaussian(bundle: Bundle, versions: Sequence[int] | None = None,
                         keys: Sequence[str] = ("gaussian", "gaussian_prior")) -> set[str]:
    out = set()
    for v in (bundle.calibration_versions() if versions is None else versions):
        try:
            extra = json.loads(bundle.calibration_version_file(v).read_text("utf-8")).get("extra") or {}
        except (OSError, ValueError, AttributeError):
            continue
        out.update(str(extra[k]) for k in keys if isinstance(extra, dict) and extra.get(k))
    return out


def prune_gaussian(bundle: Bundle, keep: int = KEEP_GAUSSIAN) -> list[str]:
    """Delete Gaussian statistics files no recent calibration uses; returns the names removed.

    The manifest stops naming them before they are deleted; a failure (disk, permissions) is logged and
    left for the next call, which also removes files left unrecorded by a kill between the two steps.

    Kept: the files of the ``keep`` newest calibration versions, of the one in force and of those running
    processes decide with (:meth:`Bundle.calibration_holders`), and every prior (the statistics the bundle
    was trained with, which each refit pools with). Each file is
    tens of MB (``[h*w, d, d]`` float32), so the whole history cannot stay on a device; the calibration
    JSON history stays complete, and :func:`rollback` refuses (clearly) a version whose file is gone.
    """
    versions = bundle.calibration_versions()
    keep_names = _referenced_gaussian(bundle, versions[-max(keep, 1):])
    keep_names |= _referenced_gaussian(bundle, versions, keys=("gaussian_prior",))
    done: list[str] = []
    try:
        _remove_gaussian(bundle, keep_names, done)
    except OSError as exc:   # the new calibration is in force already: logged, finished by the next call
        log.warning("%s: could not remove old Gaussian statistics (%s); they are removed at the next "
                    "recalibration", bundle.path, exc)
    return done


def _unused_gaussian(bundle: Bundle, keep_names: set[str]) -> tuple[list[str], list[str]]:
    """The Gaussian statistics files besides ``keep_names``, those of the calibration in force (its own and its
    prior) and those of the versions running processes decide with (:meth:`Bundle.calibration_holders`):
    (those the manifest records, all of them: recorded or only on disk)."""
    d = bundle.file(GAUSSIAN_DIR)
    if not d.is_dir():
        return [], []
    try:
        cal = bundle.calibration()
        keep_names = keep_names | {str(cal.extra.get("gaussian", "")), _prior_name(cal)}
    except InputError:
        pass
    # the statistics a running edge-ad run decides with (a calibration written beside it, not reloaded yet)
    keep_names = keep_names | _referenced_gaussian(bundle, sorted(bundle.calibration_holders()))
    gone = [n for n in bundle.manifest["files"] if n.startswith(GAUSSIAN_DIR + "/") and n not in keep_names]
    on_disk = [f"{GAUSSIAN_DIR}/{p.name}" for p in sorted(d.iterdir()) if p.is_file() and p.suffix == ".npz"]
    return gone, sorted({*gone, *(n for n in on_disk if n not in keep_names)})


def _remove_gaussian(bundle: Bundle, keep_names: set[str], done: list[str]) -> None:
    """Delete :func:`_unused_gaussian`'s files, appending each to ``done``; an OSError is raised as it comes.

    The manifest first: a kill between the two steps leaves unrecorded files (removed next time), never a
    manifest naming files that are gone."""
    gone, removed = _unused_gaussian(bundle, keep_names)
    if gone:
        for n in gone:
            bundle.manifest["files"].pop(n, None)
        bundle.save_manifest()
    for n in removed:
        bundle.file(n).unlink(missing_ok=True)
        done.append(n)


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_history` removed (or, ``dry_run``, would remove) and kept."""

    removed: tuple[int, ...]                 # calibration versions, oldest first
    kept: tuple[int, ...]
    protected: dict = field(default_factory=dict)   # {version: why}: kept besides the newest ones
    gaussian_removed: tuple[str, ...] = ()   # statistics files only the removed versions used
    dry_run: bool = False
    rollbacks_dropped: int = 0               # records of rollbacks.json that put back a version not kept

    def summary(self) -> dict:
        """JSON-ready (``edge-ad calibrate --prune --json``)."""
        return {"removed": list(self.removed), "kept": list(self.kept), "dry_run": self.dry_run,
                "protected": [{"version": v, "why": why} for v, why in sorted(self.protected.items())],
                "gaussian_removed": list(self.gaussian_removed), "rollbacks_dropped": self.rollbacks_dropped}


def prune_history(bundle: Bundle, keep: int, dry_run: bool = False) -> PruneResult:
    """Delete old calibration versions (``calibration.d/NNNN.json``), keeping the ``keep`` newest and, whatever
    their age, the version in force, the one a rollback without a version puts back
    (:meth:`Bundle.previous_calibration_version`), those a running ``edge-ad run`` decides with
    (:meth:`Bundle.calibration_holders`: a calibration written beside it that it has not reloaded yet) and
    version 1, the trained calibration; then the Gaussian statistics files that only the removed versions used.
    ``dry_run``: say what would go, delete nothing (the records of processes that are gone are deleted
    otherwise).

    Takes the bundle's calibration lock (refused, :class:`~edge_ad.errors.Busy`, while a calibration runs).
    Power cuts: versions go oldest first, each one by a single unlink (never half a file), and the statistics
    after them (the manifest first, as :func:`prune_gaussian` does), so a cut at any point leaves a history
    that lists, rolls back and packs; the next prune finishes the job. Last, the records of the rollback log
    (``rollbacks.json``, rewritten atomically) that put back a version not kept are dropped
    (:meth:`Bundle.drop_rollbacks`; those that put back a kept version stay, whatever they replaced).
    Refused (:class:`InputError`, nothing removed) when the calibration in force is missing or unreadable:
    what it needs kept cannot be known.
    """
    if keep < 1:
        raise InputError(f"keep {keep}: expected the number of newest calibration versions to keep, 1 or more")
    with contextlib.nullcontext() if dry_run else bundle.calibration_lock():
        versions = bundle.calibration_versions()
        try:
            cur = bundle.calibration()
        except InputError as exc:
            raise InputError(f"{exc}; nothing pruned: the versions the calibration in force needs cannot be told "
                             "(put one back with 'edge-ad calibrate --rollback VERSION' first)") from None
        protected: dict[int, str] = {}
        held = [(v, holders_text(recs)) for v, recs in
                sorted(bundle.calibration_holders(remove_stale=not dry_run).items())]
        for v, why in ((cur.version, "in force"), (rollback_target(bundle), "a plain --rollback goes back to it"),
                       *held, (1, "the trained calibration")):
            if v in versions and v not in protected:
                protected[v] = why
        kept = sorted(set(versions[-keep:]) | set(protected))
        removed = [v for v in versions if v not in kept]
        keep_names = _referenced_gaussian(bundle, kept)
        if dry_run:
            return PruneResult(tuple(removed), tuple(kept), protected,
                               tuple(_unused_gaussian(bundle, keep_names)[1]), dry_run=True,
                               rollbacks_dropped=bundle.drop_rollbacks(kept, dry_run=True))
        n_gone, done = 0, []
        try:
            for v in removed:   # oldest first: what is left at any point is a history
                try:
                    os.unlink(bundle.calibration_version_file(v))
                except FileNotFoundError:
                    pass
                n_gone += 1
            if removed:
                atomic._fsync_dir(bundle.calibration_dir)
            _remove_gaussian(bundle, keep_names, done)
            dropped = bundle.drop_rollbacks(kept)   # last: a cut before it leaves records the next prune drops
        except OSError as exc:
            raise RuntimeFailure(f"{os_error_text(exc)}: the prune stopped after removing {n_gone} of "
                                 f"{len(removed)} calibration versions and {len(done)} Gaussian statistics "
                                 "files; what is left is a usable history: run it again") from exc
    return PruneResult(tuple(removed), tuple(kept), protected, tuple(done), rollbacks_dropped=dropped)


def holders_text(records: list[dict], what: str = "it", still: bool = False) -> str:
    """``edge-ad run (pid 812) decides with it until it reloads``: the processes that decide with a version
    (:meth:`Bundle.calibration_holders` records), ``what`` naming it (``v2``), ``still`` saying so."""
    who = " and ".join(f"{r.get('by') or 'a process'} (pid {r.get('pid')})" for r in records)
    one = len(records) == 1
    return (f"{who} {'still ' if still else ''}{'decides' if one else 'decide'} with {what} until "
            f"{'it reloads' if one else 'they reload'}")


def rollback_target(bundle: Bundle) -> int | None:
    """The version a rollback without a version puts back (:meth:`Bundle.previous_calibration_version`), None
    when there is none (or the calibration in force is unreadable)."""
    try:
        return bundle.previous_calibration_version()
    except InputError:
        return None


def statistics_kept(bundle: Bundle, cal: Calibration) -> bool:
    """Whether a rollback to ``cal`` can load its model: for the Gaussian model the statistics file it
    names must still be kept (only the last versions keep theirs); other models need none."""
    g = str(cal.extra.get("gaussian") or "")
    return bundle.kind != "gaussian" or bool(g) and bundle.has(g)


def rollback(bundle: Bundle, version: int | None = None, by: str = "") -> Calibration:
    """Put an earlier calibration back in force (byte for byte; default: the one the calibration in force
    replaced, :meth:`Bundle.previous_calibration_version`).

    Checks first the calibration file and the Gaussian statistics it names (present, sha256 as recorded,
    loadable), so a rollback can never leave a calibration in force that the model cannot load. ``by``
    (``cli``, ``mqtt (client ID)``) goes into the bundle's rollback record.
    """
    versions = bundle.calibration_versions()
    target = version
    if target is None and versions:
        target = bundle.previous_calibration_version()   # the one the calibration in force replaced
        if target not in versions:
            raise InputError(f"calibration version {target}, the one calibration v{bundle.calibration().version} "
                             "replaced, is no longer kept (pruned, or deleted by hand); roll back to a kept version "
                             "by its number ('edge-ad calibrate --list' lists them all, the MQTT status's "
                             "calibration.versions the newest); the calibration in force is unchanged")
    if target is not None and target in versions and bundle.kind == "gaussian":
        cal = bundle.calibration_at(target)
        g = str(cal.extra.get("gaussian") or "")
        if not statistics_kept(bundle, cal):
            raise InputError(f"calibration version {target} names Gaussian statistics '{g}', which are no longer "
                             f"kept (only the last {KEEP_GAUSSIAN} versions keep theirs); recalibrate instead")
        try:
            if g in bundle.manifest["files"]:
                bundle.verify([g])
            gaussian.GaussianStats.load(bundle.file(g))
        except InputError as exc:
            raise InputError(f"calibration version {target} cannot be put back in force: {exc}; the calibration "
                             "in force is unchanged") from exc
    return bundle.rollback_calibration(target, by=by)


# ----------------------------------------------------------------------------- the entry point
def recalibrate(bundle: Bundle, inspector, frames: Iterable[np.ndarray], policy: str = DEFAULT_POLICY,
                progress: bool = True, *, screen_z: float = SCREEN_Z, min_frames: int = MIN_FRAMES,
                max_excluded: float = MAX_EXCLUDED, batch_size: int = 16, source: str = "",
                keep_gaussian: int = KEEP_GAUSSIAN, prior_weight: float | None = None,
                labels: Sequence[str] | None = None, rollback_advice: str = CLI_ROLLBACK) -> CalibrationResult:
    """Refit the calibration on new normal frames (RGB uint8) and write it as a new version.

    ``labels``: what to call each frame in messages and in the calibration record (the file names of a
    folder, :class:`~edge_ad.calibration.collect.CollectedFrames` ``.labels``); without them a frame left out
    is named by its index in ``frames``.

    Returns a :class:`CalibrationResult` whose ``calibration`` is already in force in the bundle; the
    inspector is not touched (swap with ``inspector.set_calibration``). Raises :class:`InputError` for a
    bad policy or too few usable frames (nothing written).

    Gaussian model: ``prior_weight`` is how many frames the statistics the bundle was trained with
    count for when the covariance is refitted (None: as many as the new frames, at most as many as they
    came from; 0: a fit from the new frames alone; see :mod:`.gaussfit`).

    ``rollback_advice``: how the caller's user rolls back, named in the warning when most frames score
    above the threshold in force (:data:`CLI_ROLLBACK`; the MQTT ``calibrate`` passes :data:`MQTT_ROLLBACK`:
    its operator has no shell on the device).
    """
    t0 = time.perf_counter()
    scoring.check_policy(policy)  # a bad policy fails before any work
    if not screen_z > 0:
        raise InputError(f"screen_z {screen_z}: expected > 0")
    gaussfit.check_prior_weight(prior_weight)
    if not 0.0 <= max_excluded < 1.0:
        raise InputError(f"max_excluded {max_excluded}: expected 0 <= value < 1")
    min_frames = max(int(min_frames), 3)
    cur = inspector.calibration
    total = len(frames) if isinstance(frames, Sequence) else None
    kept, s_cur, u_cur, n = _run_model(inspector, frames, max(1, int(batch_size)), progress, total)
    labels = _labels(labels, n)
    t_infer = time.perf_counter() - t0
    if n < min_frames:
        raise InputError(f"calibration needs at least {min_frames} normal frames, got {n}; "
                         "the calibration in force is unchanged")

    prior, pname = None, ""
    if bundle.kind == "gaussian":
        pname = _prior_name(cur)
        if pname == cur.extra.get("gaussian"):
            prior = inspector.gaussian_stats(cur)
        elif bundle.has(pname):
            prior = gaussian.GaussianStats.load(bundle.file(pname))
        elif prior_weight == 0:   # a fresh fit needs no trained statistics: the ones in force give the layout
            log.warning("%s (the trained Gaussian statistics) is missing; prior weight 0: the frames are "
                        "screened under calibration v%d and fitted alone", bundle.file(pname), cur.version)
            prior, pname = inspector.gaussian_stats(cur), cur.extra.get("gaussian")
        else:
            raise InputError(f"{bundle.file(pname)}: the Gaussian statistics the bundle was trained with "
                             f"(calibration v{cur.version} extra.gaussian_prior) are missing; recalibrate with "
                             "prior weight 0 (--prior-weight 0: a fit from the new frames alone)")

    s_screen, u_screen, under = s_cur, u_cur, f"calibration v{cur.version}"
    if prior is not None and pname != cur.extra.get("gaussian"):
        # the statistics in force were refitted on earlier calibration frames: the ones among these that
        # they saw would score far too low (in-sample) and every other frame would look like an outlier
        # (a Gaussian map has no pad: its image scores are the unpadded ones)
        s_screen = u_screen = _screen_scores(kept["feat"], prior, cur, max(1, int(batch_size)))
        under = f"the trained statistics ({pname})"
    index = np.arange(n)
    std = cur.normal.get("std")    # the screen's last-resort scale (scores tied beyond the IQR)
    excluded = _screen(s_screen, index, screen_z, f"robust z > {screen_z:g} under {under}", std, labels,
                       u_screen)
    used = np.setdiff1d(index, [e.index for e in excluded])
    _check_usable(n, len(used), excluded, min_frames, max_excluded)

    t1 = time.perf_counter()
    cache: dict = {}
    cal, s_new, u_new, stats = _fit(cur, kept, used, policy, prior, prior_weight, cache)
    more = _screen(s_new, used, screen_z, f"robust z > {screen_z:g} under the refit", std, labels, u_new)
    if more:
        excluded += more
        used = np.setdiff1d(used, [e.index for e in more])
        _check_usable(n, len(used), excluded, min_frames, max_excluded)
        cal, s_new, _, stats = _fit(cur, kept, used, policy, prior, prior_weight, cache)
    del cache
    t_fit = time.perf_counter() - t1
    for e in excluded:
        log.info("calibration frame %d (%s) left out: score %.4g, z %.1f (%s)", e.index, e.name, e.score, e.z,
                 e.reason)
    warnings = _warnings(cur, s_cur, used, rollback_advice)

    version = bundle.next_calibration_version()
    extra = dict(cur.extra)
    extra["recalibration"] = {"previous_version": cur.version, "frames": n, "excluded": [e.index for e in excluded],
                              "screen_z": screen_z,
                              **({"excluded_labels": [e.label for e in excluded]} if labels is not None else {}),
                              "scores": "leave-one-out" if stats is not None else "in-sample"}
    if stats is not None:
        extra["recalibration"]["gaussian_n"] = int(stats.n)
    gname = None
    if stats is not None:
        gname = _gaussian_name(bundle, version, cur)
        stats.save(bundle.file(gname))
        bundle.add_file(gname)
        extra["gaussian"] = gname
        extra["gaussian_prior"] = _prior_name(cur)
    cal = cal.replace(source=source or "recalibrate", n_frames=len(used), extra=extra, created="")
    written = bundle.write_calibration(cal)
    if written.version != version:
        raise RuntimeFailure(f"{bundle.path}: calibration was written as version {written.version}, expected "
                             f"{version}; another process is writing calibrations to this bundle")
    if stats is not None:
        removed = prune_gaussian(bundle, keep_gaussian)
        if removed:
            log.info("removed Gaussian statistics no kept calibration uses: %s", ", ".join(removed))
    t_total = time.perf_counter() - t0
    return CalibrationResult(calibration=written, previous=cur, excluded=tuple(excluded), n_frames=n,
                             n_used=int(len(used)), scores=s_new, gaussian_file=gname,
                             timings={"infer": t_infer, "fit": t_fit, "total": t_total}, warnings=warnings)


def screen_frames(inspector, frames: Sequence[np.ndarray], *, screen_z: float = SCREEN_Z,
                  min_frames: int = MIN_FRAMES, max_excluded: float = MAX_EXCLUDED, batch_size: int = 16,
                  progress: bool = True, labels: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, list[Excluded], tuple[str, ...]]:
    """The refit's first pass alone, for frames something else is fitted on (``--adapt``): the deployed
    artefact scores them under the calibration in force, likely defects are left out (robust z >
    ``screen_z``), and the set is refused as :func:`recalibrate` refuses it (fewer than ``min_frames``
    usable, more than ``max_excluded`` flagged). Returns (indices of the frames kept, those left out, the
    warnings: most frames above the threshold in force). ``labels``: as for :func:`recalibrate`."""
    cur = inspector.calibration
    _, s_cur, u_cur, n = _run_model(inspector, frames, max(1, int(batch_size)), progress, len(frames))
    labels = _labels(labels, n)
    index = np.arange(n)
    excluded = _screen(s_cur, index, screen_z, f"robust z > {screen_z:g} under calibration v{cur.version}",
                       cur.normal.get("std"), labels, u_cur)
    used = np.setdiff1d(index, [e.index for e in excluded])
    _check_usable(n, len(used), excluded, min_frames, max_excluded)
    return used, excluded, _warnings(cur, s_cur, used, ADAPT_ROLLBACK)


def _warnings(cur: Calibration, s_cur: np.ndarray, used: np.ndarray, rollback_advice: str = CLI_ROLLBACK
              ) -> tuple[str, ...]:
    """The screening compares frames with each other; a set made *only* of defects passes it. Say so when
    the set as a whole scores like NG parts under the calibration in force (or a changed light does)."""
    s = s_cur[used]
    s = s[np.isfinite(s)]
    if not s.size:
        return ()
    med = float(np.median(s))
    ng = float(np.mean(s > cur.threshold))
    if ng < 0.5:
        return ()
    msg = (f"{ng:.0%} of the frames used score above the threshold of calibration v{cur.version} "
           f"(median {med:.4g} vs threshold {cur.threshold:.4g})")
    std, p50 = cur.normal.get("std"), cur.normal.get("p50")
    if std and p50 is not None:
        msg += f", {(med - p50) / std:.1f} normal standard deviations above its normal median"
    return (msg + ": fine after a change of light or material, but check that these are normal parts; "
            f"roll back with {rollback_advice} if not",)


def _check_usable(n: int, n_used: int, excluded: list[Excluded], min_frames: int, max_excluded: float) -> None:
    nan = sum(not np.isfinite(e.score) for e in excluded)
    why = ", ".join([f"{len(excluded) - nan} as likely defects"] * (len(excluded) > nan) +
                    [f"{nan} whose score is not a number (the model's output is NaN or infinite on them: check "
                     "the model and its precision)"] * (nan > 0)) or "none"
    if len(excluded) > max_excluded * n:
        far = sorted((e for e in excluded if np.isfinite(e.score)), key=lambda e: -e.z)
        what = (f" (e.g. {', '.join(f'{e.name} (z {e.z:.1f})' for e in far[:5])})" if far else "")
        verdict = ("this does not look like a set of normal parts" if len(far) * 2 >= len(excluded) else
                   "the model gives no usable score on most of them")
        raise InputError(f"{len(excluded)} of {n} calibration frames left out, more than {max_excluded:.0%}: "
                         f"{why}{what}; {verdict}; the calibration in force is unchanged")
    if n_used < min_frames:
        raise InputError(f"only {n_used} of {n} calibration frames are usable ({why} left out); at least "
                         f"{min_frames} are needed; the calibration in force is unchanged")
