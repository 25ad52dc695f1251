"""Synthetic parts with planted defects: deterministic, fast, no files needed.

Kinds of part (``KINDS``):

* ``grain``  a fine-grained surface texture (sand-blasted metal, paper) with slow shading;
* ``woven``  a regular woven / knurled texture;
* ``disc``   a machined disc (turned rings, centre hole) on a conveyor belt;
* ``plate``  a rectangular plate with two holes on a conveyor belt.

Defects (``DEFECTS``): ``scratch`` (a thin bright or dark line), ``spot`` (a dark stain), ``crack`` (a
jagged near-black line, sometimes branched), ``missing`` (a piece broken off an object's edge; a hole
through a texture). Each comes with its pixel mask. Defects are drawn with enough contrast (and size
relative to the image) that a simple feature model finds them at 128-256 px, while normal parts vary
(position, size, shading, texture phase, belt position, sensor noise) so "anything different" is not
enough.

Everything is a function of ``seed`` (and an index): the same call gives the same pixels, in any order.
Generation takes about a millisecond per 256x256 image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError

KINDS = ("grain", "woven", "disc", "plate")
OBJECT_KINDS = ("disc", "plate")
DEFECTS = ("scratch", "spot", "crack", "missing")
GOOD = "good"

_TINT = {"grain": (1.0, 0.94, 0.84), "woven": (0.86, 0.92, 1.0), "disc": (1.0, 1.0, 1.0),
         "plate": (0.95, 0.98, 1.04)}
_BELT_PERIOD = 24.0  # px at 256; the belt's stripes move by a fraction of this per conveyor frame


@dataclass(frozen=True)
class SyntheticPart:
    """One generated image: RGB uint8 ``[H, W, 3]``, bool mask ``[H, W]``, label 0/1, defect type."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    defect_type: str  # "good" or one of DEFECTS


@dataclass(frozen=True)
class ConveyorFrame:
    """One frame of a synthetic conveyor stream, with its ground truth."""

    index: int
    image: np.ndarray
    label: int
    defect_type: str
    mask: np.ndarray


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise InputError(f"size {size!r}: expected an int or (height, width)")
        h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32 or h > 8192 or w > 8192:
        raise InputError(f"size {h}x{w}: expected 32..8192 pixels per side")
    return h, w


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"synthetic kind '{kind}': expected one of {', '.join(KINDS)}")
    return kind


def _check_defect(defect: str | None) -> str | None:
    if defect is not None and defect != GOOD and defect not in DEFECTS:
        raise InputError(f"synthetic defect '{defect}': expected one of {', '.join(DEFECTS)}")
    return None if defect in (None, GOOD) else defect


def _rng(seed: int, *keys: int) -> np.random.Generator:
    if int(seed) < 0:
        raise InputError(f"seed {seed}: expected a non-negative integer")
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


# ---------------------------------------------------------------------------- normal parts
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled with bicubic interpolation."""
    import cv2

    gh, gw = max(2, int(round(cells * h / max(h, w)))), max(2, int(round(cells * w / max(h, w))))
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    import cv2

    n = rng.standard_normal((h, w)).astype(np.float32)
    s = max(0.8, min(h, w) / 200.0)
    n = cv2.GaussianBlur(n, (0, 0), s)
    n *= 1.0 / (n.std() + 1e-6)
    return 128.0 + rng.uniform(-6, 6) + 16.0 * n + 8.0 * _smooth_noise(rng, h, w, 4)


def _woven(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    m = min(h, w)
    p = m / 16.0 * rng.uniform(0.97, 1.03)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    fx, fy = rng.uniform(0, 2 * np.pi, 2)
    warp = np.sin(2 * np.pi * x / p + fx)
    weft = np.sin(2 * np.pi * y / p + fy)
    weave = warp * weft  # alternating over/under
    fine = np.cos(4 * np.pi * (x + y) / p)
    g = 120.0 + rng.uniform(-6, 6) + 36.0 * weave + 6.0 * fine
    return g + 5.0 * rng.standard_normal((h, w)).astype(np.float32) + 5.0 * _smooth_noise(rng, h, w, 3)


def _belt(rng: np.random.Generator, h: int, w: int, offset: float) -> np.ndarray:
    m = min(h, w)
    period = _BELT_PERIOD * m / 256.0
    x = np.arange(w, dtype=np.float32)[None, :]
    stripes = 6.0 * np.sin(2 * np.pi * (x + offset) / period)
    g = 52.0 + stripes + 3.0 * rng.standard_normal((h, w)).astype(np.float32)
    return np.broadcast_to(g, (h, w)).astype(np.float32)


def _disc(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    m = min(h, w)
    cy = h / 2 + rng.uniform(-0.02, 0.02) * m
    cx = w / 2 + rng.uniform(-0.02, 0.02) * m
    r = 0.36 * m * rng.uniform(0.98, 1.02)
    y = np.arange(h, dtype=np.float32)[:, None] - cy
    x = np.arange(w, dtype=np.float32)[None, :] - cx
    d = np.sqrt(x * x + y * y)
    part = (d <= r) & (d >= 0.25 * r)
    light = rng.uniform(-0.4, 0.4)
    shade = 150.0 + 35.0 * (1.0 - d / r) + 18.0 * (np.cos(light) * x + np.sin(light) * y) / r
    rings = 7.0 * np.sin(d * 2 * np.pi / (m / 40.0) + rng.uniform(0, 2 * np.pi))
    return (shade + rings).astype(np.float32), part


def _plate(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    m = min(h, w)
    cy = h / 2 + rng.uniform(-0.02, 0.02) * m
    cx = w / 2 + rng.uniform(-0.02, 0.02) * m
    hw, hh = 0.36 * m * rng.uniform(0.98, 1.02), 0.24 * m * rng.uniform(0.98, 1.02)
    rad = int(round(0.06 * m))
    part8 = np.zeros((h, w), np.uint8)
    x0, x1, y0, y1 = int(cx - hw), int(cx + hw), int(cy - hh), int(cy + hh)
    cv2.rectangle(part8, (x0 + rad, y0), (x1 - rad, y1), 1, -1)
    cv2.rectangle(part8, (x0, y0 + rad), (x1, y1 - rad), 1, -1)
    for px, py in ((x0 + rad, y0 + rad), (x1 - rad, y0 + rad), (x0 + rad, y1 - rad), (x1 - rad, y1 - rad)):
        cv2.circle(part8, (px, py), rad, 1, -1)
    hole_r = int(round(0.05 * m))
    for px in (int(cx - 0.6 * hw), int(cx + 0.6 * hw)):
        cv2.circle(part8, (px, int(cy)), hole_r, 0, -1)
    y = np.arange(h, dtype=np.float32)[:, None] - cy
    x = np.arange(w, dtype=np.float32)[None, :] - cx
    light = rng.uniform(-0.5, 0.5)
    shade = 165.0 + 22.0 * (np.cos(light) * x / hw + np.sin(light) * y / hh)
    brushed = 4.0 * np.sin(2 * np.pi * y / (m / 60.0) + rng.uniform(0, 2 * np.pi))
    return (shade + brushed).astype(np.float32), part8.astype(bool)


def _normal(kind: str, rng: np.random.Generator, h: int, w: int, belt_offset: float | None):
    """Gray float image, part mask (None for textures), background (for objects)."""
    if kind == "grain":
        return _grain(rng, h, w), None, None
    if kind == "woven":
        return _woven(rng, h, w), None, None
    if belt_offset is None:
        belt_offset = rng.uniform(0, _BELT_PERIOD * min(h, w) / 256.0)
    bg = _belt(rng, h, w, belt_offset)
    shade, part = _disc(rng, h, w) if kind == "disc" else _plate(rng, h, w)
    return np.where(part, shade, bg).astype(np.float32), part, bg


# ---------------------------------------------------------------------------- defects
def _thickness(m: int) -> int:
    return max(2, int(round(m / 110.0)))


def _pick_point(rng: np.random.Generator, h: int, w: int, region: np.ndarray | None, margin: float):
    if region is not None:
        ys, xs = np.nonzero(region)
        i = int(rng.integers(len(ys)))
        return float(xs[i]), float(ys[i])
    m = min(h, w) * margin
    return float(rng.uniform(m, w - m)), float(rng.uniform(m, h - m))


def _draw_defect(defect: str, g: np.ndarray, part: np.ndarray | None, bg: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (alpha float32 [H, W] in 0..1, value image float32 [H, W]) for one defect."""
    import cv2

    h, w = g.shape
    m = min(h, w)
    canvas = np.zeros((h, w), np.uint8)
    inner = None
    if part is not None:
        inner = cv2.erode(part.astype(np.uint8), np.ones((5, 5), np.uint8),
                          iterations=max(1, m // 64)).astype(bool)
        if not inner.any():
            inner = part
    if defect in ("scratch", "crack"):
        x, y = _pick_point(rng, h, w, inner, 0.2)
        ang = rng.uniform(0, 2 * np.pi)
        length = m * (rng.uniform(0.22, 0.4) if defect == "scratch" else rng.uniform(0.25, 0.45))
        steps = 1 if defect == "scratch" else 10
        pts = [(x, y)]
        for _ in range(steps):
            if defect == "crack":
                ang += rng.uniform(-0.7, 0.7)
            x += np.cos(ang) * length / steps
            y += np.sin(ang) * length / steps
            pts.append((x, y))
        poly = np.round(np.array(pts)).astype(np.int32)
        t = _thickness(m) if defect == "scratch" else _thickness(m) + int(rng.integers(0, 2))
        cv2.polylines(canvas, [poly], False, 255, t, cv2.LINE_AA)
        if defect == "crack" and rng.random() < 0.5:  # a branch
            k = int(rng.integers(2, len(pts) - 2))
            bx, by = pts[k]
            ba = ang + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
            branch = [(bx, by)]
            for _ in range(4):
                ba += rng.uniform(-0.6, 0.6)
                bx += np.cos(ba) * length / 10
                by += np.sin(ba) * length / 10
                branch.append((bx, by))
            cv2.polylines(canvas, [np.round(np.array(branch)).astype(np.int32)], False, 255,
                          max(1, t - 1), cv2.LINE_AA)
        if defect == "scratch":
            value = np.full((h, w), 240.0 if rng.random() < 0.5 else 25.0, np.float32)
        else:
            value = np.full((h, w), 12.0, np.float32)
        alpha = canvas.astype(np.float32) / 255.0
    elif defect == "spot":
        x, y = _pick_point(rng, h, w, inner, 0.15)
        a, b = m * rng.uniform(0.04, 0.08), m * rng.uniform(0.03, 0.06)
        cv2.ellipse(canvas, (int(x), int(y)), (int(a), int(b)), float(rng.uniform(0, 180)), 0, 360, 255, -1,
                    cv2.LINE_AA)
        alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), max(0.8, m / 200.0))
        alpha = np.clip(alpha * 1.6, 0.0, 0.92)
        dark = rng.uniform(35.0, 60.0)
        value = np.full((h, w), dark, np.float32)
    elif defect == "missing":
        if part is not None:  # a bite out of the part's edge, showing the belt behind
            contours, _ = cv2.findContours(part.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            outline = max(contours, key=len).reshape(-1, 2)
            x, y = (float(v) for v in outline[int(rng.integers(len(outline)))])
            r = m * rng.uniform(0.08, 0.13)
            cv2.circle(canvas, (int(x), int(y)), int(r), 255, -1)
            canvas[~part] = 0
            value = bg
        else:  # a hole through the texture
            x, y = _pick_point(rng, h, w, None, 0.18)
            n = 9
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = m * rng.uniform(0.04, 0.09, n)
            poly = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], 1)
            cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], 255, cv2.LINE_AA)
            value = np.full((h, w), 18.0, np.float32)
        alpha = canvas.astype(np.float32) / 255.0
    else:
        raise InputError(f"synthetic defect '{defect}': expected one of {', '.join(DEFECTS)}")
    if part is not None and defect != "missing":
        alpha = alpha * part
    return alpha, value


def _min_area(defect: str, m: int) -> float:
    """Smallest visible mask (pixels) accepted for a defect; smaller draws (clipped by the part's edge)
    are re-drawn so every planted defect stays detectable."""
    if defect in ("scratch", "crack"):
        return 0.15 * m * _thickness(m)
    return 0.0012 * m * m


# ---------------------------------------------------------------------------- public API
def make_part(kind: str = "disc", size: int | Sequence[int] = 256, defect: str | None = None,
              seed: int = 0, index: int = 0, belt_offset: float | None = None) -> SyntheticPart:
    """One synthetic part; ``defect`` None / "good" for a normal one.

    ``(seed, index)`` fixes every pixel. ``belt_offset`` (objects only) positions the belt stripes;
    None draws it at random. Raises InputError for an unknown kind / defect or a bad size.
    """
    _check_kind(kind)
    defect = _check_defect(defect)
    h, w = _size_hw(size)
    rng = _rng(seed, 11, index)
    g, part, bg = _normal(kind, rng, h, w, belt_offset)
    mask = np.zeros((h, w), bool)
    if defect is not None:
        for _ in range(20):  # re-draw in the rare case the defect ends up (almost) outside the part
            alpha, value = _draw_defect(defect, g, part, bg, rng)
            mask = alpha > 0.5
            if mask.sum() >= _min_area(defect, min(h, w)):
                break
        g = g + alpha * (value - g)
    g = g + 2.0 * rng.standard_normal((h, w)).astype(np.float32)  # sensor noise
    img = np.clip(g[..., None] * np.asarray(_TINT[kind], np.float32), 0, 255).astype(np.uint8)
    return SyntheticPart(image=img, mask=mask, label=int(defect is not None), defect_type=defect or GOOD)


def lighting_shift(image: np.ndarray, brightness: float = 0.0, contrast: float = 1.0,
                   gamma: float = 1.0) -> np.ndarray:
    """A lighting change: ``((x/255)**gamma * 255 - 128) * contrast + 128 + brightness``, clipped, uint8.

    brightness in grey levels (e.g. +30), contrast a factor (e.g. 0.8), gamma > 0. Works on any uint8
    image (grey or RGB); used to test recalibration after the light changed.
    """
    if not contrast > 0 or not gamma > 0:
        raise InputError(f"lighting_shift: contrast ({contrast}) and gamma ({gamma}) must be > 0")
    lut = np.arange(256, dtype=np.float32) / 255.0
    lut = (lut ** gamma) * 255.0
    lut = np.clip((lut - 128.0) * contrast + 128.0 + brightness, 0, 255).round().astype(np.uint8)
    return lut[np.asarray(image, dtype=np.uint8)]


def write_category(root: str | os.PathLike, n_train: int = 60, n_test_good: int = 20,
                   n_test_defect: int = 5, size: int | Sequence[int] = 256, kind: str = "disc",
                   seed: int = 0, defects: Sequence[str] = DEFECTS, ext: str = ".png") -> Path:
    """Write an MVTec-layout category folder of synthetic parts; returns ``root``.

    ``n_test_defect`` images *per defect type* (one folder per entry of ``defects``), each with
    ``ground_truth/<type>/<stem>_mask.png`` (0/255). ``ext`` ".png" or ".jpg". Train, test-good and
    each defect type use separate seed streams, so no test image repeats a training image. Files are
    written directly (not fsync'ed): the folder is reproducible from the arguments.
    """
    import cv2

    root = Path(root)
    _check_kind(kind)
    for d in defects:
        _check_defect(d)
    if ext.lower() not in (".png", ".jpg", ".jpeg"):
        raise InputError(f"ext '{ext}': expected .png or .jpg")
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if int(n) < 0:
            raise InputError(f"{name} {n}: expected >= 0")

    def put(path: Path, img: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
        ok, buf = cv2.imencode(path.suffix, img, params)
        if not ok:
            raise InputError(f"{path}: could not encode image")
        path.write_bytes(buf.tobytes())

    (root / "train" / GOOD).mkdir(parents=True, exist_ok=True)
    (root / "test" / GOOD).mkdir(parents=True, exist_ok=True)
    for i in range(int(n_train)):
        put(root / "train" / GOOD / f"{i:03d}{ext}", make_part(kind, size, None, seed, index=i).image)
    for i in range(int(n_test_good)):
        put(root / "test" / GOOD / f"{i:03d}{ext}", make_part(kind, size, None, seed, index=100_000 + i).image)
    for k, d in enumerate(defects):
        for i in range(int(n_test_defect)):
            p = make_part(kind, size, d, seed, index=200_000 + 10_000 * k + i)
            put(root / "test" / d / f"{i:03d}{ext}", p.image)
            put(root / "ground_truth" / d / f"{i:03d}_mask.png", p.mask.astype(np.uint8) * 255)
    return root


class ConveyorStream:
    """Frames of parts passing under a camera: each frame one part, some defective, with ground truth.

    ``frame(i)`` is a pure function of (seed, i) and the lighting in force, so a ``synthetic://`` camera
    source can replay or skip frames. Object kinds show the belt moving between frames. A lighting change
    can be scheduled (``lighting_from``) or switched live (``set_lighting``) to exercise recalibration.
    """

    def __init__(self, kind: str = "disc", size: int | Sequence[int] = 256, defect_rate: float = 0.2,
                 defects: Sequence[str] = DEFECTS, seed: int = 0, brightness: float = 0.0,
                 contrast: float = 1.0, lighting_from: int = 0):
        self.kind = _check_kind(kind)
        self.size = _size_hw(size)
        if not 0.0 <= float(defect_rate) <= 1.0:
            raise InputError(f"defect_rate {defect_rate}: expected 0..1")
        self.defect_rate = float(defect_rate)
        self.defects = tuple(d for d in defects if _check_defect(d))
        if self.defect_rate > 0 and not self.defects:
            raise InputError("defects: at least one defect type is needed when defect_rate > 0")
        self.seed = int(seed)
        self._rng(0)  # validates the seed
        self.set_lighting(brightness, contrast, lighting_from)

    def _rng(self, i: int) -> np.random.Generator:
        return _rng(self.seed, 23, i)

    def set_lighting(self, brightness: float = 0.0, contrast: float = 1.0, from_index: int = 0) -> None:
        """Apply a lighting shift to frames with index >= ``from_index`` (0, 1.0: none)."""
        if not contrast > 0:
            raise InputError(f"contrast {contrast}: must be > 0")
        self.brightness, self.contrast, self.lighting_from = float(brightness), float(contrast), int(from_index)

    def frame(self, index: int) -> ConveyorFrame:
        r = self._rng(index)
        defective = r.random() < self.defect_rate
        defect = self.defects[int(r.integers(len(self.defects)))] if defective else None
        offset = (index * 0.37 * _BELT_PERIOD) % _BELT_PERIOD * min(self.size) / 256.0
        p = make_part(self.kind, self.size, defect, self.seed, index=300_000 + index,
                      belt_offset=offset if self.kind in OBJECT_KINDS else None)
        img = p.image
        if index >= self.lighting_from and (self.brightness != 0.0 or self.contrast != 1.0):
            img = lighting_shift(img, self.brightness, self.contrast)
        return ConveyorFrame(index=index, image=img, label=p.label, defect_type=p.defect_type, mask=p.mask)

    def frames(self, start: int = 0, count: int | None = None) -> Iterator[ConveyorFrame]:
        """Frames ``start``, ``start+1``, ... (forever when ``count`` is None)."""
        i = start
        while count is None or i < start + count:
            yield self.frame(i)
            i += 1

    def __iter__(self) -> Iterator[ConveyorFrame]:
        return self.frames()
