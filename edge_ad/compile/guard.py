"""The accuracy guard: a quantized graph or a compiled engine against the FP32 graph, through the one
scoring path (:class:`edge_ad.inspector.Inspector`'s head + :mod:`edge_ad.scoring`).

Images: held-out normal images (the bundle's validation images by default), the same images with
synthetic defects planted on them (always), and a real MVTec-layout test folder when one is given.
Measures, candidate vs FP32:

- ``rank_corr``        Spearman rank correlation of the image scores over all guard images;
- ``max_map_error``    largest absolute difference of the normalized combined maps (score units; the
                       threshold is in the same units) and ``max_map_error_rel`` = that / threshold;
- ``auroc``            image AUROC normal vs synthetic defects (and vs real defects), FP32 and candidate,
                       and the drop;
- ``agreement``        fraction of images whose OK/NG decision at the calibration threshold is the same;
- ``rel_map_error``    mean over the raw outputs of ||candidate - FP32|| / ||FP32 - its mean||
                       (:func:`edge_ad.compile.qgraph.output_error`; reported).

Limits (:class:`GuardLimits`; defaults: AUROC drop <= 0.005, rank correlation >= 0.99; decision
agreement and map error are reported and can be limited too). Results are merged into
``quant_report.json`` under the candidate's name. A failure raises :class:`GuardFailure` naming every
limit that was exceeded; callers switch nothing in when it does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import scoring
from ..bundle import Bundle, now_iso
from ..data.image import IMAGE_EXTS, list_images, load_image, spread, to_batch
from ..errors import GuardFailure, InputError
from ..scoring import Calibration, Scored
from .qgraph import output_error

log = logging.getLogger(__name__)

REPORT = "quant_report.json"


@dataclass(frozen=True)
class GuardLimits:
    max_auroc_drop: float = 0.005
    min_rank_corr: float = 0.99
    min_agreement: float | None = None     # e.g. 0.98; None: reported, not limited
    max_map_error_rel: float | None = None  # relative to the threshold; None: reported, not limited


@dataclass
class GuardSet:
    """Guard images as one model-input batch with a label (0 normal / 1 defect) and a group per image."""

    batch: np.ndarray                         # float32 [N, 3, H, W]
    labels: np.ndarray                        # int [N]
    groups: np.ndarray                        # str [N]: "normal", "synthetic", "real"
    sources: list[str] = field(default_factory=list)
    reference: dict[str, np.ndarray] | None = None   # FP32 outputs, computed once for all candidates
    # an INT8 graph's outputs in its own Q/DQ arithmetic, by graph path: computed once for the checks that need
    # them on a CPU whose kernels saturate (quantize.exact_outputs)
    exact: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.batch.shape[0])


# --------------------------------------------------------------------------- image selection
def training_images(bundle: Bundle, calib_dir: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """(calibration pool, held-out normals) from ``--calib DIR`` or the bundle's training record.

    With ``calib_dir``: its images (or those of ``DIR/train/good``); the held-out normals are the last
    quarter of them (never used for calibration). Without: ``manifest["training"]["data"]`` (an MVTec
    category folder) minus ``manifest["training"]["val_images"]``, which are the held-out normals.
    """
    if calib_dir is not None:
        imgs = _folder_images(Path(calib_dir))
        if len(imgs) < 8:
            raise InputError(f"{calib_dir}: {len(imgs)} images; calibration and the guard need at least 8 "
                             "normal images")
        k = max(4, len(imgs) // 4)
        return imgs[:-k], imgs[-k:]
    training = bundle.manifest.get("training") or {}
    data = training.get("data")
    if not data:
        raise InputError(f"{bundle.path}: the manifest records no training data (training.data); give the "
                         "normal images with --calib DIR")
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: training data folder recorded in the manifest not found; give the normal "
                         "images with --calib DIR")
    pool = _folder_images(root)
    val = [Path(p) for p in training.get("val_images", []) if Path(p).is_file()]
    vs = {p.resolve() for p in val}
    pool = [p for p in pool if p.resolve() not in vs]
    if not val:
        k = max(4, len(pool) // 10)
        pool, val = pool[:-k], pool[-k:]
    if len(pool) < 4:
        raise InputError(f"{root}: too few normal images ({len(pool)} for calibration, at least 4 needed); "
                         "give more with --calib DIR")
    if len(val) < 4:
        raise InputError(f"{root}: the bundle's validation split holds {len(val)} normal images, and the guard "
                         "needs at least 4 held out (never calibrated on); give normal images with --calib DIR "
                         "(8 or more: the last quarter is held out), or train with a larger --val-fraction "
                         "(4 of the training images or more)")
    return pool, val


def _folder_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"{root}: folder not found")
    for sub in (root / "train" / "good", root / "good", root):
        if sub.is_dir():
            imgs = list_images(sub)
            if imgs:
                return imgs
    raise InputError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in it or in train/good")


def real_test_images(test_dir: str | Path, limit: int = 100) -> list[tuple[Path, int]]:
    """MVTec-layout test folder (``DIR/test/<type>/`` or ``DIR/<type>/``): good -> 0, any other -> 1."""
    root = Path(test_dir)
    if (root / "test").is_dir():
        root = root / "test"
    if not (root / "good").is_dir():
        raise InputError(f"{test_dir}: expected an MVTec-layout test folder with good/ and defect folders")
    items: list[tuple[Path, int]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = 0 if sub.name == "good" else 1
        items += [(p, label) for p in list_images(sub)]
    good = [it for it in items if it[1] == 0]
    bad = [it for it in items if it[1] == 1]
    if not good or not bad:
        raise InputError(f"{test_dir}: needs both good and defective test images")
    if limit and len(items) > limit:
        if limit < 2:
            raise InputError(f"test limit {limit}: expected at least 2 (one good and one defective image)")
        ng = min(max(1, round(limit * len(good) / len(items))), limit - 1)   # both kinds, at most limit
        good, bad = spread(good, ng), spread(bad, limit - ng)
    return good + bad


# --------------------------------------------------------------------------- synthetic defects
def plant_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of an RGB uint8 image with one planted defect (scratch, stain, hole or a displaced patch)
    and its mask. Sizes scale with the image; contrast is relative to the local brightness."""
    import cv2

    img = image.astype(np.float32).copy()
    h, w = img.shape[:2]
    m = min(h, w)
    mask = np.zeros((h, w), np.uint8)
    kind = rng.choice(["scratch", "stain", "hole", "patch"])
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    mean = float(img.mean())
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        ln = m * rng.uniform(0.25, 0.45) / 2
        p0 = (int(cx - np.cos(ang) * ln), int(cy - np.sin(ang) * ln))
        p1 = (int(cx + np.cos(ang) * ln), int(cy + np.sin(ang) * ln))
        cv2.line(mask, p0, p1, 255, max(2, m // 80), cv2.LINE_AA)
        value = np.full(3, 245.0 if mean < 128 else 15.0, np.float32)
    elif kind == "stain":
        axes = (int(m * rng.uniform(0.05, 0.1)), int(m * rng.uniform(0.04, 0.08)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, m / 150))
        value = np.array([0.35 * mean + 10, 0.3 * mean + 5, 0.25 * mean], np.float32)
    elif kind == "hole":
        n = 8
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = m * rng.uniform(0.04, 0.09, n)
        poly = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(mask, [poly], 255, cv2.LINE_AA)
        value = np.full(3, 10.0, np.float32)
    else:  # a patch of the image itself, rotated and moved: same texture statistics, wrong structure
        s = max(4, int(m * rng.uniform(0.12, 0.2)))
        sx, sy = int(rng.uniform(0, w - s)), int(rng.uniform(0, h - s))
        patch = np.rot90(img[sy:sy + s, sx:sx + s], k=int(rng.integers(1, 4))).copy()
        x0, y0 = int(np.clip(cx - s / 2, 0, w - s)), int(np.clip(cy - s / 2, 0, h - s))
        img[y0:y0 + s, x0:x0 + s] = patch * 0.8 + 20
        mask[y0:y0 + s, x0:x0 + s] = 255
        return np.clip(img, 0, 255).astype(np.uint8), mask > 127
    a = (mask.astype(np.float32) / 255.0)[..., None]
    img = img * (1 - a) + value[None, None, :] * a
    return np.clip(img, 0, 255).astype(np.uint8), mask > 127


def prepare_guard_set(bundle: Bundle, normals: Sequence[Path], test_dir: str | Path | None = None,
                      test_limit: int = 100, n_normal: int = 32, seed: int = 0) -> GuardSet:
    """Held-out normals, the same with planted defects, and the real test images when given."""
    size = bundle.image_size
    normals = spread(normals, n_normal)
    if len(normals) < 4:
        raise InputError(f"the guard needs at least 4 held-out normal images, got {len(normals)}")
    frames = [load_image(p) for p in normals]
    rng = np.random.default_rng(seed)
    defects = [plant_defect(f, rng)[0] for f in frames]
    parts = [to_batch(frames, size), to_batch(defects, size)]
    labels = [0] * len(frames) + [1] * len(defects)
    groups = ["normal"] * len(frames) + ["synthetic"] * len(defects)
    sources = [str(p) for p in normals] + [f"{p} + synthetic defect" for p in normals]
    if test_dir is not None:
        items = real_test_images(test_dir, test_limit)
        parts.append(to_batch([load_image(p) for p, _ in items], size))
        labels += [lab for _, lab in items]
        groups += ["real"] * len(items)
        sources += [str(p) for p, _ in items]
    return GuardSet(np.concatenate(parts), np.asarray(labels), np.asarray(groups), sources)


# --------------------------------------------------------------------------- metrics
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation; NaN when a score is not finite. Two constant vectors rank alike (1.0); one
    constant against one that varies shares no order (0.0): a model that scores every image the same
    must not pass for a perfect copy."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    sa, sb = float((ra ** 2).sum()), float((rb ** 2).sum())
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float((ra * rb).sum() / np.sqrt(sa * sb))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC (Mann-Whitney U with tie correction); NaN without both classes."""
    y = np.asarray(labels).astype(bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


# --------------------------------------------------------------------------- scoring
def guard_calibration(bundle: Bundle, reference: dict[str, np.ndarray], normal_idx: np.ndarray):
    """(calibration, Gaussian stats or None): the bundle's calibration when it has one; otherwise one
    fitted on the FP32 outputs of the held-out normals (threshold policy 'max')."""
    from .. import gaussian

    if bundle.has("calibration.json"):
        return bundle.calibration(), None
    stats = None
    raw = {k: v[normal_idx] for k, v in reference.items()}
    if bundle.kind == "gaussian":
        stats = gaussian.fit(raw["feat"], layout="shared")
        raw = {"map": gaussian.distance_map(raw["feat"], stats)}
    cal = Calibration(maps=scoring.fit_map_norms(raw), threshold=0.0,
                      map_pad=int(bundle.model.get("map_pad", 0)), source="guard (no calibration in bundle)")
    s = scoring.score(raw, cal).scores
    return cal.replace(threshold=scoring.threshold_from_policy(s, "max")), stats


def score_outputs(bundle: Bundle, outputs: dict[str, np.ndarray], cal: Calibration, stats=None) -> Scored:
    """Raw backend outputs -> Scored, through the Inspector's head (the Gaussian numpy head) + scoring."""
    if stats is not None:
        from .. import gaussian

        return scoring.score({"map": gaussian.distance_map(outputs["feat"], stats)}, cal)
    from ..inspector import Inspector

    insp = Inspector(bundle, backend=None, calibration=cal)
    return scoring.score(insp.head(outputs, cal), cal)


def infer_all(backend, batch: np.ndarray, chunk: int = 8) -> dict[str, np.ndarray]:
    parts = [backend.infer(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(bundle: Bundle, candidate, gset: GuardSet, reference_backend=None,
             limits: GuardLimits | None = None, name: str | None = None,
             outputs: dict[str, np.ndarray] | None = None) -> dict:
    """Compare ``candidate`` (a Backend) with FP32 on the guard set; returns the report entry. ``outputs``: the
    candidate's outputs on the guard images when they were computed already: not computed again, and
    ``candidate`` may then be None (the entry's ``backend`` is None and ``name`` names it)."""
    from ..runtime.sources import redact_text   # the entry is stored in the bundle: no camera credentials

    limits = limits or GuardLimits()
    if gset.reference is None:
        if reference_backend is None:
            from ..runtime.backends.onnxruntime import OnnxRuntimeBackend

            reference_backend = OnnxRuntimeBackend(bundle, precision="fp32", device="cpu")
        gset.reference = infer_all(reference_backend, gset.batch)
    ref_out = gset.reference
    cand_out = infer_all(candidate, gset.batch) if outputs is None else outputs
    cal, stats = guard_calibration(bundle, ref_out, np.nonzero(gset.groups == "normal")[0])
    ref = score_outputs(bundle, ref_out, cal, stats)
    cand = score_outputs(bundle, cand_out, cal, stats)

    raw_err = {}
    for k in ref_out:
        r, c = ref_out[k].astype(np.float64), cand_out[k].astype(np.float64)
        raw_err[k] = float(np.max(np.abs(c - r)) / (np.max(np.abs(r)) + 1e-12))
    map_err = float(np.max(np.abs(cand.combined - ref.combined)))
    thr = float(cal.threshold)
    entry = {
        "candidate": name or f"{candidate.name}-{candidate.precision}",
        "backend": candidate.describe() if candidate is not None else None,
        "checked": now_iso(),
        "n_images": {g: int((gset.groups == g).sum()) for g in ("normal", "synthetic", "real")},
        "calibration": {"version": cal.version, "threshold": thr, "source": redact_text(cal.source) or "bundle"},
        "rank_corr": spearman(ref.scores, cand.scores),
        "non_finite": int(np.sum(~np.isfinite(cand.scores))),   # images the candidate would not decide
        "max_map_error": map_err,
        "max_map_error_rel": map_err / abs(thr) if thr else float("inf"),
        "max_raw_error_rel": raw_err,
        "rel_map_error": output_error(ref_out, cand_out),
        "agreement": float(np.mean(ref.ng == cand.ng)),
        "auroc": {},
        "limits": asdict(limits),
    }
    selections = (("synthetic", np.isin(gset.groups, ["normal", "synthetic"])), ("real", gset.groups == "real"))
    for group, sel in selections:
        if not np.any(gset.groups == group):
            continue
        a_ref = auroc(ref.scores[sel], gset.labels[sel])
        a_cand = auroc(cand.scores[sel], gset.labels[sel])
        pos = int(np.sum(gset.labels[sel] == 1))
        # pairs: normal x defect pairs the AUROC counts; one pair ranked the other way moves it by 1/pairs
        entry["auroc"][group] = {"fp32": a_ref, "candidate": a_cand, "drop": a_ref - a_cand,
                                 "pairs": pos * (int(np.sum(sel)) - pos)}
    failures = judge(entry, limits)
    entry["passed"] = not failures
    entry["failures"] = failures
    return entry


def judge(entry: dict, limits: GuardLimits) -> list[str]:
    """The limits an :func:`evaluate` entry breaks, as messages (empty: it passes ``limits``). Lets a
    caller that measured under relaxed limits judge the same entry again under others."""
    failures = []
    if entry.get("non_finite"):
        failures.append(f"{entry['non_finite']} image score(s) not finite (NaN or inf): such frames get no "
                        "decision at run time")
    for group, a in entry["auroc"].items():
        if not a["drop"] <= limits.max_auroc_drop:
            failures.append(f"{group} AUROC fell {a['drop']:.4f} ({a['fp32']:.4f} -> {a['candidate']:.4f}; "
                            f"limit {limits.max_auroc_drop})")
    if not entry["rank_corr"] >= limits.min_rank_corr:
        failures.append(f"score rank correlation {entry['rank_corr']:.4f} < {limits.min_rank_corr}")
    if limits.min_agreement is not None and not entry["agreement"] >= limits.min_agreement:
        failures.append(f"decision agreement {entry['agreement']:.4f} < {limits.min_agreement}")
    if limits.max_map_error_rel is not None and not entry["max_map_error_rel"] <= limits.max_map_error_rel:
        failures.append(f"map error {entry['max_map_error_rel']:.4f} of the threshold > {limits.max_map_error_rel}")
    return failures


def write_report(bundle: Bundle, entries: Sequence[dict], meta: dict | None = None) -> Path:
    """Merge entries (by candidate name) into ``quant_report.json`` and record it in the manifest, with the
    top-level manifest fields ``meta`` (e.g. ``active``) as one change (:meth:`Bundle.replace_files`): a
    power cut leaves the old report and manifest or the new ones. (Written, then recorded, a cut between
    the two left a report whose sha256 the manifest refused: a bundle that no longer opened.)"""
    bundle.replace_files({REPORT: report_data(bundle, entries)}, meta=meta)
    return bundle.file(REPORT)


def report_data(bundle: Bundle, entries: Sequence[dict]) -> bytes:
    """The bytes of ``quant_report.json`` with ``entries`` merged in (by candidate name), for a change that
    writes it with other files (:meth:`Bundle.replace_files`)."""
    p = bundle.file(REPORT)
    report = {"schema_version": 1, "candidates": {}}
    if p.is_file():
        try:
            old = json.loads(p.read_text("utf-8"))
            if isinstance(old, dict) and isinstance(old.get("candidates"), dict):
                report = old
        except (OSError, ValueError):
            log.warning("%s: unreadable; starting a new report", p)
    for e in entries:
        report["candidates"][e["candidate"]] = e
    report["updated"] = now_iso()
    report["model_sha256"] = bundle.graph_hash("model.onnx")
    return (json.dumps(report, indent=2, sort_keys=True, default=_jsonable) + "\n").encode()


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)


def raise_on_failure(entries: Sequence[dict]) -> None:
    bad = [e for e in entries if not e["passed"]]
    if bad:
        lines = [f"{e['candidate']}: " + "; ".join(e["failures"])
                 + (f" (the engine in use, {e['kept']}, is kept and still runs)" if e.get("kept") else "")
                 for e in bad]
        raise GuardFailure("accuracy guard failed, nothing was switched in (see quant_report.json):\n  "
                           + "\n  ".join(lines))


def summary(entry: dict) -> str:
    a = "; ".join(f"{g} AUROC {v['fp32']:.4f} -> {v['candidate']:.4f}" for g, v in entry["auroc"].items())
    return (f"{entry['candidate']}: {'PASS' if entry['passed'] else 'FAIL'}  rank corr {entry['rank_corr']:.4f}, "
            f"agreement {entry['agreement']:.3f}, max map error {entry['max_map_error_rel']:.3f} of threshold; {a}")
