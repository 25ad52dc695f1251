"""Evaluation metrics, pure numpy (OpenCV only for connected components).

* :func:`image_auroc`  area under the ROC of image scores; the Mann-Whitney U statistic with average
  ranks, so a tie between a normal and a defective score counts one half.
* :func:`pixel_auroc`  the same over every pixel of every map (ties grouped by threshold, which gives the
  same tie-correct value).
* :func:`aupro`        area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (Bergmann et al., MVTec AD, IJCV 2021): each connected component of a ground-truth mask
  (8-connectivity) is one region; at every threshold PRO is the mean over all regions of the fraction of
  the region above the threshold, FPR the fraction of all defect-free pixels above it. Computed exactly
  at every distinct score (no threshold grid), integrated with the trapezoid rule, with the curve
  interpolated linearly at the limit.
* :func:`binary_stats` precision, recall, F1, FPR at a threshold. A sample is predicted defective when its
  score is **greater than** the threshold (as ``scoring.score`` decides NG).
* :func:`defect_type_report` / :func:`format_report` the overall and per-defect-type table of an eval.

Degenerate inputs: when only one class is present (no normal or no defective image; no defect-free or
no defective pixel) the AUROC / AUPRO is undefined and the functions return ``nan`` (``None`` in the
JSON-safe report). Malformed inputs (length or shape mismatch, non-finite scores, labels other than 0/1)
raise :class:`edge_ad.errors.InputError`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError

NAN = float("nan")
GOOD = "good"


# ---------------------------------------------------------------------------- input checks
def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise InputError(f"metrics: {s.size} scores but {y.size} labels")
    if s.size and not np.isfinite(s).all():
        raise InputError(f"metrics: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if y.dtype != bool:
        if y.size and not np.isin(y, (0, 1)).all():
            raise InputError("metrics: labels must be 0 (normal) or 1 (defective)")
        y = y.astype(bool)
    return s, y


def _pixels(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Flatten maps ``[N, H, W]`` (or a list of [H, W] arrays of any sizes) and their masks."""
    if isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray):
        if maps.shape != masks.shape:
            raise InputError(f"metrics: maps {maps.shape} and masks {masks.shape} differ in shape")
        s, y = maps.ravel(), masks.ravel()
    else:
        maps, masks = list(maps), list(masks)
        if len(maps) != len(masks):
            raise InputError(f"metrics: {len(maps)} maps but {len(masks)} masks")
        for i, (m, g) in enumerate(zip(maps, masks)):
            if np.shape(m) != np.shape(g):
                raise InputError(f"metrics: map {i} is {np.shape(m)} but its mask is {np.shape(g)}")
        if not maps:
            return np.zeros(0), np.zeros(0, bool)
        s = np.concatenate([np.asarray(m).ravel() for m in maps])
        y = np.concatenate([np.asarray(g).ravel() for g in masks])
    s = np.asarray(s, dtype=np.float32 if np.asarray(s).dtype.itemsize <= 4 else np.float64)
    if s.size and not np.isfinite(s).all():
        raise InputError("metrics: anomaly maps hold NaN or infinite values")
    return s, (y > 0) if y.dtype != bool else y


# ---------------------------------------------------------------------------- ROC
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def image_auroc(scores, labels) -> float:
    """AUROC of image scores (labels 1 = defective): P(defective score > normal) + 0.5 P(tie).

    ``nan`` when one of the two classes is absent.
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    u = _average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, descending; starts at (0, 0) with threshold +inf.

    A point means "predict defective when score >= threshold". Raises InputError when a class is absent.
    """
    s, y = _scores_labels(scores, labels)
    return _roc(s, y)


def _roc(s: np.ndarray, y: np.ndarray):
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError("ROC needs both normal and defective samples")
    order = np.argsort(-s, kind="mergesort")
    ss = s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ss.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y[order], dtype=np.int64)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, ss[last]]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def pixel_auroc(maps, masks) -> float:
    """AUROC over all pixels of ``maps`` against boolean ``masks`` (same shapes). ``nan`` if a class is absent.

    Exact and tie-correct: the defect-free scores are sorted once and every defective score is placed
    among them by binary search (millions of pixels take seconds, not the minutes of a full argsort).
    """
    s, y = _pixels(maps, masks)
    if not y.any() or y.all():
        return NAN
    return _mann_whitney_sorted(np.sort(s[~y]), np.sort(s[y]))


def _mann_whitney_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    below = np.searchsorted(neg, pos, side="left").astype(np.int64)
    upto = np.searchsorted(neg, pos, side="right").astype(np.int64)
    wins = float(below.sum()) + 0.5 * float((upto - below).sum())
    return wins / (float(pos.size) * float(neg.size))


# ---------------------------------------------------------------------------- PRO
def pro_curve(maps, masks, max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve as (fpr, pro) vertices from (0, 0) to (1, 1), thresholds descending.

    With ``max_fpr`` < 1 the curve stops at the first vertex whose FPR reaches ``max_fpr`` (only the
    highest defect-free scores are sorted, which is what makes AUPRO at 0.3 fast on large sets).

    Exact at every distinct pixel score: between two distinct defect-free scores the FPR is constant and
    PRO rises vertically; where defect-free and defective pixels share a score the segment is diagonal
    (the tie counts half, as in the ROC). Raises InputError when the masks hold no defect region or no
    defect-free pixel.
    """
    import cv2

    maps = list(maps) if not isinstance(maps, np.ndarray) else maps
    masks = list(masks) if not isinstance(masks, np.ndarray) else masks
    if len(maps) != len(masks):
        raise InputError(f"metrics: {len(maps)} maps but {len(masks)} masks")
    neg_parts, pos_parts, w_parts = [], [], []
    n_regions = 0
    for i, (m, g) in enumerate(zip(maps, masks)):
        m = np.asarray(m)
        g = np.asarray(g) > 0
        if m.shape != g.shape or m.ndim != 2:
            raise InputError(f"metrics: map {i} is {m.shape} but its mask is {g.shape} (expected equal [H, W])")
        neg_parts.append(m[~g])
        if g.any():
            n_lab, lab = cv2.connectedComponents(g.astype(np.uint8), connectivity=8)
            sizes = np.bincount(lab[g], minlength=n_lab).astype(np.float64)
            pos_parts.append(m[g])
            w_parts.append(1.0 / sizes[lab[g]])
            n_regions += n_lab - 1
    if not neg_parts:
        raise InputError("PRO needs at least one map")
    neg = np.concatenate(neg_parts)
    n_neg = neg.size
    if n_regions == 0 or n_neg == 0:
        raise InputError("PRO needs at least one defect region and one defect-free pixel")
    if not np.isfinite(neg).all():
        raise InputError("metrics: anomaly maps hold NaN or infinite values")
    k = int(np.ceil(max_fpr * n_neg)) + 1
    full = k >= n_neg
    if not full:  # keep every normal score >= the k-th highest (whole groups of ties)
        kth = np.partition(neg, n_neg - k)[n_neg - k]
        neg = neg[neg >= kth]
    neg = np.sort(neg.astype(np.float64))
    pos = np.concatenate(pos_parts).astype(np.float64)
    if not np.isfinite(pos).all():
        raise InputError("metrics: anomaly maps hold NaN or infinite values")
    order = np.argsort(pos, kind="stable")
    pos, w = pos[order], np.concatenate(w_parts)[order]
    cum = np.r_[0.0, np.cumsum(w)]
    total = cum[-1]

    starts = np.r_[0, np.flatnonzero(np.diff(neg)) + 1]  # first index of each distinct normal score
    u = neg[starts][::-1]                                 # distinct normal scores, descending
    fpr_at = (neg.size - starts[::-1]) / n_neg            # FPR when thresholding at u (score >= u)
    fpr_before = np.r_[0.0, fpr_at[:-1]]
    w_ge = total - cum[np.searchsorted(pos, u, side="left")]
    w_gt = total - cum[np.searchsorted(pos, u, side="right")]
    tail_x, tail_y = ([1.0], [total / n_regions]) if full else ([], [])
    x = np.r_[0.0, np.column_stack([fpr_before, fpr_at]).ravel(), tail_x]
    y = np.r_[0.0, np.column_stack([w_gt, w_ge]).ravel() / n_regions, tail_y]
    y = np.minimum(y, 1.0)
    keep = np.r_[True, (np.diff(x) != 0) | (np.diff(y) != 0)]
    return x[keep], y[keep]


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, ``fpr_limit``], divided by ``fpr_limit`` (1.0 is perfect).

    ``nan`` when the masks hold no defect region or no defect-free pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise InputError(f"fpr_limit {fpr_limit}: expected 0 < limit <= 1")
    try:
        fpr, pro = pro_curve(maps, masks, max_fpr=fpr_limit)
    except InputError as exc:
        if "PRO needs at least one defect region" in str(exc):
            return NAN
        raise
    return _area_to(fpr, pro, fpr_limit) / fpr_limit


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the (non-decreasing x) curve from x[0] to ``limit``, interpolating at ``limit``."""
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < limit:
        t = (limit - x[k - 1]) / (x[k] - x[k - 1])
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y[k - 1] + t * (y[k] - y[k - 1])]
    return _trapezoid(xs, ys)


# ---------------------------------------------------------------------------- decisions
def binary_stats(scores, labels, threshold: float) -> dict:
    """Counts and rates when "defective" means ``score > threshold``.

    precision = tp/(tp+fp), recall = tp/(tp+fn), f1 = 2pr/(p+r), fpr = fp/(fp+tn), accuracy. A rate
    whose denominator is zero is ``nan`` (precision with no positive prediction, recall with no
    defective sample, fpr with no normal sample); F1 is 0 when tp == 0 and defects exist.
    """
    s, y = _scores_labels(scores, labels)
    pred = s > float(threshold)
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else NAN
    recall = tp / (tp + fn) if tp + fn else NAN
    if tp + fn == 0:
        f1 = NAN
    elif tp == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / (fp + tn) if fp + tn else NAN,
            "accuracy": (tp + tn) / s.size if s.size else NAN}


def f1_at(scores, labels, threshold: float) -> float:
    return binary_stats(scores, labels, threshold)["f1"]


def best_f1(scores, labels) -> tuple[float, float]:
    """(best F1, threshold) over every threshold "score > t"; t is the midpoint between adjacent
    distinct scores (or just below the lowest). ``(nan, nan)`` when there is no defective sample."""
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return NAN, NAN
    order = np.argsort(-s, kind="mergesort")
    ss = s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ss.size - 1]
    tp = np.cumsum(y[order], dtype=np.int64)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    f1 = 2 * tp / (predicted + n_pos)
    i = int(np.argmax(f1))
    nxt = ss[last[i] + 1] if last[i] + 1 < ss.size else ss[last[i]] - 1.0
    return float(f1[i]), float((ss[last[i]] + nxt) / 2.0)


# ---------------------------------------------------------------------------- reports
def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _pixel_block(idx: np.ndarray, maps, masks, fpr_limit: float) -> dict:
    if maps is None or masks is None:
        return {"pixel_auroc": None, "aupro": None}
    idx = [i for i in idx if masks[i] is not None]   # images without pixel labels count for nothing here
    sub_maps = [maps[i] for i in idx]
    sub_masks = [masks[i] for i in idx]
    return {"pixel_auroc": _clean(pixel_auroc(sub_maps, sub_masks)),
            "aupro": _clean(aupro(sub_maps, sub_masks, fpr_limit))}


def defect_type_report(scores, labels, defect_types: Sequence[str], threshold: float | None = None,
                       maps=None, masks=None, fpr_limit: float = 0.3) -> dict:
    """Overall and per-defect-type metrics of one evaluation, JSON-safe (undefined values are None).

    ``scores``/``labels``/``defect_types`` per test image ("good" for normals); ``maps``/``masks`` per
    image (same [H, W] per pair), or None for image-level data sets; masks of good images all False.
    A mask of None: that image has no pixel labels (a defect type without masks, a mask that is empty);
    it is left out of the pixel metrics, and ``overall["pixel_n_defect"]`` counts the defective images
    they were computed on (below ``n_defect``: :func:`format_report` marks the overall values with "*").
    Per defect type, the AUROCs and AUPRO compare that type against all good images; ``recall`` is the
    fraction of that type found at ``threshold``. The "good" row carries the false-alarm rate (fpr).
    """
    s, y = _scores_labels(scores, labels)
    types = list(defect_types)
    if len(types) != s.size:
        raise InputError(f"metrics: {s.size} scores but {len(types)} defect types")
    if maps is not None and masks is not None:
        maps, masks = list(maps), list(masks)
        if len(maps) != s.size or len(masks) != s.size:
            raise InputError(f"metrics: {s.size} scores but {len(maps)} maps and {len(masks)} masks")
        if not any(g is not None and np.asarray(g).any() for g in masks):
            maps = masks = None  # no pixel labels at all: image-level data set
    t = np.asarray(types, dtype=object)
    good_idx = np.flatnonzero(~y)

    overall = {"n": int(s.size), "n_good": int((~y).sum()), "n_defect": int(y.sum()),
               "image_auroc": _clean(image_auroc(s, y))}
    overall.update(_pixel_block(np.arange(s.size), maps, masks, fpr_limit))
    if masks is not None:
        overall["pixel_n_defect"] = int(sum(1 for i in np.flatnonzero(y) if masks[i] is not None))
    bf1, bthr = best_f1(s, y)
    overall["best_f1"], overall["best_f1_threshold"] = _clean(bf1), _clean(bthr)
    if threshold is not None:
        st = binary_stats(s, y, threshold)
        overall.update({k: _clean(st[k]) for k in ("threshold", "f1", "precision", "recall", "fpr", "accuracy")})

    per_type: dict[str, dict] = {}
    if good_idx.size:
        row = {"n": int(good_idx.size)}
        if threshold is not None:
            row["fpr"] = _clean(float((s[good_idx] > threshold).mean()))
        per_type[GOOD] = row
    for name in sorted(set(types) - {GOOD}):
        idx = np.flatnonzero(t == name)
        if not y[idx].all():
            raise InputError(f"metrics: defect type '{name}' has samples labelled normal")
        both = np.r_[good_idx, idx]
        row = {"n": int(idx.size), "image_auroc": _clean(image_auroc(s[both], y[both]))}
        row.update(_pixel_block(both, maps, masks, fpr_limit))
        if threshold is not None:
            row["recall"] = float((s[idx] > threshold).mean())
        per_type[name] = row
    return {"overall": overall, "per_type": per_type, "fpr_limit": fpr_limit}


def format_report(report: Mapping) -> str:
    """A fixed-width text table of :func:`defect_type_report` (``n/a`` where a value is undefined)."""
    def f(v, digits=3):
        return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    cols = ("type", "n", "img AUROC", "pix AUROC", "AUPRO", "recall", "fpr")
    rows = []
    o = report["overall"]
    for name, r in report["per_type"].items():
        rows.append((name, f(r.get("n")), f(r.get("image_auroc")), f(r.get("pixel_auroc")), f(r.get("aupro")),
                     f(r.get("recall")), f(r.get("fpr"))))
    # pixel metrics over part of the defective images (the others have no masks): marked, and said below
    part = o.get("pixel_n_defect") is not None and o["pixel_n_defect"] < o.get("n_defect", 0)
    star = "*" if part else ""
    rows.append(("overall", f(o["n"]), f(o["image_auroc"]),
                 f(o["pixel_auroc"]) + (star if o["pixel_auroc"] is not None else ""),
                 f(o["aupro"]) + (star if o["aupro"] is not None else ""), f(o.get("recall")), f(o.get("fpr"))))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i])  # noqa: E731
                               for i, v in enumerate(r))
    out = [line(cols), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    tail = []
    if o.get("threshold") is not None:
        tail.append(f"at threshold {o['threshold']:.4g}: F1 {f(o.get('f1'))}, precision {f(o.get('precision'))}, "
                    f"recall {f(o.get('recall'))}, false alarms {f(o.get('fpr'))}")
    if o.get("best_f1") is not None:
        tail.append(f"best F1 {f(o['best_f1'])} at threshold {o['best_f1_threshold']:.4g}")
    tail.append(f"AUPRO integrated to FPR {report.get('fpr_limit', 0.3)}, normalized")
    if part and (o["pixel_auroc"] is not None or o["aupro"] is not None):
        tail.append(f"* pixel metrics over the good images and the {o['pixel_n_defect']} of {o['n_defect']} "
                    "defective images that have a mask with a defect")
    return "\n".join(out + [""] + tail)
