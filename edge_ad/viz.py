"""Pictures for people, drawn with OpenCV only (no matplotlib in the runtime).

* :func:`heatmap_overlay` / :func:`overlay_jpeg`: an anomaly map blended over its frame, with the
  outline of the region above the threshold; JPEG bytes for NG snapshots and MQTT ``event/image``.
* :func:`grid_png` / :func:`write_grid`: rows of image | ground-truth mask | anomaly map for an eval report.
* :func:`histogram_png` / :func:`write_histogram`: normal vs defective score histogram with the threshold.

All images in and out are RGB ``uint8``; encoding converts to OpenCV's BGR. Files are written through
:mod:`edge_ad.atomic` (temp file, fsync, rename).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import atomic
from .errors import InputError, name_text

BG = (32, 32, 36)
FG = (230, 230, 230)
NORMAL_COLOR = (70, 140, 230)
DEFECT_COLOR = (235, 95, 55)
THRESHOLD_COLOR = (250, 210, 40)


def _cv2():
    import cv2

    return cv2


# ---------------------------------------------------------------------------- encoding / files
def encode_png(rgb: np.ndarray) -> bytes:
    cv2 = _cv2()
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise InputError(f"could not encode a {rgb.shape} image as PNG")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    cv2 = _cv2()
    if not 1 <= int(quality) <= 100:
        raise InputError(f"JPEG quality {quality}: expected 1..100")
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise InputError(f"could not encode a {rgb.shape} image as JPEG")
    return buf.tobytes()


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    atomic.write_bytes(path, encode_png(rgb))


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 85) -> None:
    atomic.write_bytes(path, encode_jpeg(rgb, quality))


# ---------------------------------------------------------------------------- heat maps
def _raw_map(amap: np.ndarray) -> np.ndarray:
    m = np.asarray(amap, dtype=np.float32)
    while m.ndim > 2 and m.shape[0] == 1:  # [1, H, W] or [1, 1, H, W]
        m = m[0]
    if m.ndim != 2:
        raise InputError(f"anomaly map of shape {np.shape(amap)}: expected [H, W] (or [1, H, W])")
    return m


def _as_map(amap: np.ndarray) -> np.ndarray:
    """The map as finite float32 [H, W]: NaN / infinite cells take the finite maximum (drawn hottest by
    :func:`_mark_nonfinite`), so a broken model's map never looks clean."""
    m = _raw_map(amap)
    bad = ~np.isfinite(m)
    if bad.any():
        m = np.where(bad, m[~bad].max() if not bad.all() else 0.0, m).astype(np.float32)
    return m


def _nonfinite(amap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray | None:
    """Mask of the map's NaN / infinite cells at ``size_hw`` (None when there are none)."""
    bad = ~np.isfinite(_raw_map(amap))
    if not bad.any():
        return None
    if bad.shape != tuple(size_hw):
        bad = _cv2().resize(bad.astype(np.uint8), (size_hw[1], size_hw[0]), interpolation=_cv2().INTER_NEAREST) > 0
    return bad


def _mark_nonfinite(heat: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """``heat`` (a colorized map) with the map's NaN / infinite cells in the colour scale's hottest colour."""
    bad = _nonfinite(amap, heat.shape[:2])
    if bad is not None:
        cv2 = _cv2()
        hot = cv2.cvtColor(cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        heat[bad] = hot[0, 0]
    return heat


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame)
    if f.dtype != np.uint8:
        raise InputError(f"frame dtype {f.dtype}: expected uint8")
    if f.ndim == 2:
        return np.repeat(f[..., None], 3, axis=2)
    if f.ndim != 3 or f.shape[2] != 3:
        raise InputError(f"frame of shape {f.shape}: expected RGB [H, W, 3]")
    if f.shape[0] == 0 or f.shape[1] == 0:
        raise InputError(f"frame of shape {f.shape}: empty")
    return f


def colorize(amap: np.ndarray, vmin: float | None = None, vmax: float | None = None,
             size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Anomaly map -> RGB uint8 with the JET colour map (blue low, red high), scaled from vmin to vmax
    (default: the map's own min and max), optionally resized to ``size_hw``."""
    cv2 = _cv2()
    m = _as_map(amap)
    if size_hw is not None and m.shape != tuple(size_hw):
        m = cv2.resize(m, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    span = hi - lo if hi > lo else 1.0
    u8 = np.clip((m - lo) / span * 255.0, 0, 255).astype(np.uint8)
    return _mark_nonfinite(cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB), amap)


def heatmap_overlay(frame: np.ndarray, amap: np.ndarray, alpha: float = 0.45, vmin: float | None = None,
                    vmax: float | None = None, threshold: float | None = None) -> np.ndarray:
    """The map (any size; resized to the frame) blended over the frame; with ``threshold``, the outline
    of the area above it drawn in yellow. Without vmin / vmax, a map that stays below the threshold is
    drawn on a scale up to twice the threshold, so a normal part does not look alarming."""
    cv2 = _cv2()
    f = _as_rgb(frame)
    h, w = f.shape[:2]
    m = _as_map(amap)
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    if vmax is None and threshold is not None:
        vmax = max(float(m.max()), 2.0 * float(threshold)) if threshold > 0 else None
    if vmin is None and threshold is not None:
        vmin = min(float(m.min()), 0.0)
    heat = _mark_nonfinite(colorize(m, vmin, vmax), amap)
    bad = _nonfinite(amap, (h, w))
    out = cv2.addWeighted(f, 1.0 - float(alpha), heat, float(alpha), 0.0)
    if threshold is not None:
        region = ((m > float(threshold)) | (False if bad is None else bad)).astype(np.uint8)
        if region.any():
            contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, THRESHOLD_COLOR, max(1, round(max(h, w) / 320)), cv2.LINE_AA)
    return out


def overlay_jpeg(frame: np.ndarray, amap: np.ndarray, threshold: float | None = None,
                 label: str | None = None, quality: int = 85, max_side: int = 640, **kw) -> bytes:
    """JPEG bytes of :func:`heatmap_overlay` for an NG snapshot, downscaled to ``max_side`` pixels on the
    longer side, with an optional caption (e.g. ``"NG score 2.31"``) in the top-left corner."""
    cv2 = _cv2()
    out = heatmap_overlay(frame, amap, threshold=threshold, **kw)
    h, w = out.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        out = cv2.resize(out, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    if label:
        _caption(out, label, (4, 4))
    return encode_jpeg(out, quality)


# ---------------------------------------------------------------------------- text helpers
def drawable(text: str) -> str:
    """``text`` as the pictures draw it: printable ASCII, a byte of a file name that is not UTF-8 as ``\\xfe``
    (:func:`~edge_ad.errors.name_text`, as every record of edge-ad writes such a name) and any other character as
    ``?``. OpenCV crashed (SIGSEGV) on a lone surrogate, and draws other non-ASCII characters differently from
    one version to the next (4.x a ``?`` per UTF-8 byte, 5.x some Latin letters, a ``?`` for the rest)."""
    return "".join(c if " " <= c <= "~" else "?" for c in name_text(str(text)))


def _text_size(text: str, scale: float) -> tuple[int, int, int]:
    (tw, th), base = _cv2().getTextSize(drawable(text), _cv2().FONT_HERSHEY_SIMPLEX, scale, 1)
    return tw, th, base


def _put(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, color=FG) -> None:
    cv2 = _cv2()
    cv2.putText(img, drawable(text), (int(org[0]), int(org[1])), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1,
                cv2.LINE_AA)


def _caption(img: np.ndarray, text: str, top_left: tuple[int, int], scale: float = 0.45) -> None:
    """Text on a dark box so it reads over any background."""
    cv2 = _cv2()
    tw, th, base = _text_size(text, scale)
    x, y = top_left
    cv2.rectangle(img, (x, y), (x + tw + 6, y + th + base + 6), BG, -1)
    _put(img, text, (x + 3, y + th + 3), scale)


def _fit(img: np.ndarray, cell_hw: tuple[int, int], interp=None) -> np.ndarray:
    """Resize keeping the aspect ratio into a cell, padded with the background colour."""
    cv2 = _cv2()
    ch, cw = cell_hw
    h, w = img.shape[:2]
    s = min(ch / h, cw / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    r = cv2.resize(img, (nw, nh), interpolation=interp if interp is not None else
                   (cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR))
    if r.ndim == 2:
        r = np.repeat(r[..., None], 3, axis=2)
    out = np.empty((ch, cw, 3), np.uint8)
    out[:] = BG
    y0, x0 = (ch - nh) // 2, (cw - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = r
    return out


# ---------------------------------------------------------------------------- eval grid
@dataclass(frozen=True)
class GridRow:
    """One row of an eval grid: the image, its ground-truth mask (None: no mask), its anomaly map."""

    image: np.ndarray
    mask: np.ndarray | None
    amap: np.ndarray
    caption: str = ""


def grid_image(rows: Sequence[GridRow], cell: int = 160, vmin: float | None = None,
               vmax: float | None = None, threshold: float | None = None, title: str = "") -> np.ndarray:
    """RGB grid: one row per sample, columns image | GT mask | anomaly map (+ threshold outline).

    All maps share one colour scale (``vmin``..``vmax``; default the min and max over every map), so
    rows are comparable. Captions go under each row.
    """
    cv2 = _cv2()
    if not rows:
        raise InputError("grid: no rows to draw")
    maps = [_as_map(r.amap) for r in rows]
    lo = min(float(m.min()) for m in maps) if vmin is None else float(vmin)
    hi = max(float(m.max()) for m in maps) if vmax is None else float(vmax)
    pad, cap_h = 4, 18
    head_h = 22 + (20 if title else 0)
    width = 3 * cell + 4 * pad
    height = head_h + len(rows) * (cell + cap_h + pad) + pad
    out = np.empty((height, width, 3), np.uint8)
    out[:] = BG
    if title:
        _put(out, title, (pad, 16), 0.5)
    for c, name in enumerate(("image", "ground truth", "anomaly map")):
        _put(out, name, (pad + c * (cell + pad) + 4, head_h - 6), 0.45)
    for i, (row, m) in enumerate(zip(rows, maps)):
        img = _as_rgb(row.image)
        h, w = img.shape[:2]
        y = head_h + i * (cell + cap_h + pad)
        cells = [_fit(img, (cell, cell))]
        if row.mask is not None:
            mk = np.asarray(row.mask)
            if mk.shape[:2] != (h, w):
                raise InputError(f"grid row {i}: mask {mk.shape} does not match image {img.shape[:2]}")
            cells.append(_fit((mk > 0).astype(np.uint8) * 255, (cell, cell), cv2.INTER_NEAREST))
        else:
            blank = np.empty((cell, cell, 3), np.uint8)
            blank[:] = (60, 60, 64)
            _put(blank, "no mask", (cell // 2 - 28, cell // 2 + 4), 0.45)
            cells.append(blank)
        mm = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) if m.shape != (h, w) else m
        heat = _mark_nonfinite(colorize(mm, lo, hi), row.amap)
        if threshold is not None:
            bad = _nonfinite(row.amap, (h, w))
            region = ((mm > float(threshold)) | (False if bad is None else bad)).astype(np.uint8)
            if region.any():
                contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                thick = max(2, int(np.ceil(2 * max(h, w) / cell)))  # stays visible after fitting the cell
                cv2.drawContours(heat, contours, -1, (255, 255, 255), thick, cv2.LINE_AA)
        cells.append(_fit(heat, (cell, cell)))
        for c, im in enumerate(cells):
            x = pad + c * (cell + pad)
            out[y:y + cell, x:x + cell] = im
        if row.caption:
            _put(out, row.caption[:80], (pad + 2, y + cell + cap_h - 5), 0.42)
    return out


def grid_png(rows: Sequence[GridRow], **kw) -> bytes:
    return encode_png(grid_image(rows, **kw))


def write_grid(path: str | os.PathLike, rows: Sequence[GridRow], **kw) -> None:
    """Write :func:`grid_image` as a PNG (atomically)."""
    atomic.write_bytes(path, grid_png(rows, **kw))


# ---------------------------------------------------------------------------- histogram
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(1, n)
    mag = 10.0 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(first, hi + step * 1e-9, step)]


def histogram_image(normal_scores: Sequence[float], defect_scores: Sequence[float],
                    threshold: float | None = None, bins: int = 40, size_hw: tuple[int, int] = (360, 640),
                    title: str = "image scores") -> np.ndarray:
    """RGB histogram of normal (blue) and defective (orange) scores on shared bins, the threshold as a
    vertical yellow line, axes with ticks, and a legend with the counts."""
    cv2 = _cv2()
    a = np.asarray(normal_scores, dtype=np.float64).ravel()
    b = np.asarray(defect_scores, dtype=np.float64).ravel()
    if a.size + b.size == 0:
        raise InputError("histogram: no scores to draw")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("histogram: scores hold NaN or infinite values")
    if int(bins) < 1:
        raise InputError(f"histogram bins {bins}: expected >= 1")
    H, W = size_hw
    if H < 120 or W < 200:
        raise InputError(f"histogram size {H}x{W}: expected at least 120x200")
    thr = None if threshold is None else float(threshold)
    drawn = thr is not None and np.isfinite(thr)   # a NaN / infinite threshold is named, not drawn
    vals = np.r_[a, b, thr] if drawn else np.r_[a, b]
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    margin = 0.03 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    edges = np.linspace(lo, hi, int(bins) + 1)
    ca, _ = np.histogram(a, edges)
    cb, _ = np.histogram(b, edges)
    cmax = max(1, int(max(ca.max(initial=0), cb.max(initial=0))))

    left, right, top, bottom = 56, 16, 34, 44
    pw, ph = W - left - right, H - top - bottom
    img = np.empty((H, W, 3), np.uint8)
    img[:] = BG
    X = lambda v: int(round(left + (v - lo) / (hi - lo) * pw))  # noqa: E731
    Y = lambda c: int(round(top + ph - c / cmax * ph))  # noqa: E731
    for counts, color in ((ca, NORMAL_COLOR), (cb, DEFECT_COLOR)):
        layer = img.copy()
        for k, c in enumerate(counts):
            if c:
                cv2.rectangle(layer, (X(edges[k]) + 1, Y(c)), (X(edges[k + 1]) - 1, top + ph), color, -1)
        img = cv2.addWeighted(layer, 0.7, img, 0.3, 0.0)
    # axes and ticks
    cv2.line(img, (left, top + ph), (left + pw, top + ph), FG, 1)
    cv2.line(img, (left, top), (left, top + ph), FG, 1)
    for v in _ticks(lo, hi):
        x = X(v)
        cv2.line(img, (x, top + ph), (x, top + ph + 4), FG, 1)
        text = f"{v + 0.0:.3g}"  # + 0.0: no "-0"
        tw, _, _ = _text_size(text, 0.4)
        _put(img, text, (x - tw // 2, top + ph + 18), 0.4)
    for c in _ticks(0, cmax, 4):
        if c != int(c):
            continue
        y = Y(c)
        cv2.line(img, (left - 4, y), (left, y), FG, 1)
        text = str(int(c))
        tw, _, _ = _text_size(text, 0.4)
        _put(img, text, (left - 8 - tw, y + 4), 0.4)
    _put(img, "score", (left + pw // 2 - 18, H - 8), 0.45)
    _put(img, "count", (4, top - 12), 0.4)
    _put(img, title, (left + 4, 20), 0.5)
    x = None
    if drawn:
        x = X(thr)
        for y0 in range(top, top + ph, 8):  # dashed
            cv2.line(img, (x, y0), (x, min(y0 + 4, top + ph)), THRESHOLD_COLOR, 2)
        text = f"threshold {thr:.3g}"
        tw, _, _ = _text_size(text, 0.4)
        tx = x + 4 if x + 4 + tw < W - right else x - 4 - tw
        _put(img, text, (tx, top + 12), 0.4, THRESHOLD_COLOR)
    elif thr is not None:
        _put(img, f"threshold {thr}: not drawn", (left + 8, top + 12), 0.4, THRESHOLD_COLOR)
    # legend, below the threshold's label, top right unless the threshold line runs through it
    entries = [(f"normal (n={a.size})", NORMAL_COLOR), (f"defective (n={b.size})", DEFECT_COLOR)]
    lw = max(_text_size(t, 0.4)[0] for t, _ in entries) + 22
    lx, ly = W - right - lw - 4, top + 32
    if x is not None and lx - 6 <= x <= lx + lw + 6:
        lx = left + 8
    for k, (text, color) in enumerate(entries):
        y = ly + 16 * k
        cv2.rectangle(img, (lx, y - 9), (lx + 12, y + 1), color, -1)
        _put(img, text, (lx + 18, y), 0.4)
    return img


def histogram_png(normal_scores, defect_scores, threshold: float | None = None, **kw) -> bytes:
    return encode_png(histogram_image(normal_scores, defect_scores, threshold, **kw))


def write_histogram(path: str | os.PathLike, normal_scores, defect_scores, threshold: float | None = None,
                    **kw) -> None:
    """Write :func:`histogram_image` as a PNG (atomically)."""
    atomic.write_bytes(path, histogram_png(normal_scores, defect_scores, threshold, **kw))


# ---------------------------------------------------------------------------- eval report pictures
def pick_examples(scores: Sequence[float], types: Sequence[str], per_type: int = 3) -> list[int]:
    """Indices to show per type: ``per_type`` samples spread over that type's score range (lowest,
    middle, highest), so a grid shows both missed and found defects and the worst false alarms."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(list(types), dtype=object)
    order_types = (["good"] if "good" in set(t) else []) + sorted(set(t) - {"good"})
    picked: list[int] = []
    for name in order_types:
        idx = np.flatnonzero(t == name)
        idx = idx[np.argsort(s[idx], kind="stable")]
        k = min(int(per_type), idx.size)
        if k:
            picked += [int(idx[j]) for j in np.unique(np.round(np.linspace(0, idx.size - 1, k)).astype(int))]
    return picked


def write_eval_pictures(out_dir: str | os.PathLike, images: Sequence[np.ndarray],
                        masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                        scores: Sequence[float], labels: Sequence[int], types: Sequence[str],
                        threshold: float | None, size: tuple[int, int] | None = None,
                        per_type: int = 3, cell: int = 160, names: Sequence[str] | None = None) -> dict:
    """The pictures of an eval report, written atomically into ``out_dir``:

    ``grid.png`` (image | ground truth | anomaly map for :func:`pick_examples`, captions with type, file
    name (``names``, e.g. the image stems; the sample's index without them), score and decision) and
    ``histogram.png`` (normal vs defective scores and the threshold). ``size`` (H, W) resizes the images
    to the maps' size when given. A defective sample whose mask is missing or empty shows "no mask".
    Returns ``{"grid": "grid.png", "histogram": "histogram.png"}`` (names in ``out_dir``).
    """
    from pathlib import Path

    from .data.image import resize_rgb

    n = len(scores)
    if names is None:
        names = [f"#{i}" for i in range(n)]
    if not (len(images) == len(masks) == len(maps) == len(labels) == len(types) == len(names) == n):
        raise InputError(f"eval pictures: {n} scores but {len(images)} images, {len(masks)} masks, "
                         f"{len(maps)} maps, {len(labels)} labels, {len(types)} types, {len(names)} names")
    out = Path(out_dir)
    rows = []
    for i in pick_examples(scores, types, per_type):
        img = _as_rgb(images[i])
        if size is not None:
            img = resize_rgb(img, tuple(size))
        mk = masks[i]
        if mk is not None:
            mk = np.asarray(mk) > 0
            if int(labels[i]) == 1 and not mk.any():
                mk = None
            elif mk.shape != img.shape[:2]:
                mk = _cv2().resize(mk.astype(np.uint8), (img.shape[1], img.shape[0]),
                                   interpolation=_cv2().INTER_NEAREST) > 0
        verdict = "" if threshold is None else (" NG" if float(scores[i]) > float(threshold) else " OK")
        name = name_text(names[i])      # a byte that is not UTF-8 as \xfe: cut as shown
        name = name if len(name) <= 28 else name[:13] + ".." + name[-13:]  # the score stays in view
        rows.append(GridRow(img, mk, maps[i], f"{name_text(types[i])} {name}  score {float(scores[i]):.3g}{verdict}"))
    result = {}
    if rows:
        write_grid(out / "grid.png", rows, cell=cell, threshold=threshold,
                   title="anomaly maps (shared colour scale; outline: above threshold)")
        result["grid"] = "grid.png"
    lab = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    if n:
        write_histogram(out / "histogram.png", s[lab == 0], s[lab == 1], threshold)
        result["histogram"] = "histogram.png"
    return result
