"""Generic images made offline: a stand-in for ImageNet where none is at hand.

EfficientAD distills its teacher on ImageNet and draws its penalty-term images from it; this runtime
downloads nothing, and most factory PCs have no ImageNet copy. ``generic_image`` paints a "dead leaves"
picture (Lee, Mumford & Huang 2001; used as pretraining data by Baradad et al., NeurIPS 2021, "Learning
to see by looking at noise"): occluding shapes whose sizes follow a power law, as objects in natural
images do, each filled with a flat colour, a colour gradient, oriented stripes or smooth noise, with
random blur and sensor noise. The pictures share the statistics that matter for local features (edges
at every scale and orientation, occlusions, textures), not any object's appearance.

``write_generic(folder, count)`` writes them as JPEG files for ``edge-ad distill-teacher --data`` and
``edge-ad train --penalty-dir``; every image is a function of ``(seed, index)``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import InputError


def _check(size: int, seed: int, index: int = 0) -> None:
    if int(size) < 32 or int(size) > 4096:
        raise InputError(f"generic image size {size}: expected 32..4096 pixels")
    if int(seed) < 0 or int(index) < 0:
        raise InputError(f"generic image seed {seed} / index {index}: expected non-negative integers")


def _fill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One shape's paint, float32 [h, w, 3] in 0..255."""
    import cv2

    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(0, 4)
    if kind == 0:  # flat
        return np.broadcast_to(c0, (h, w, 3))
    if kind == 1:  # linear gradient between two colours
        c1 = rng.uniform(0, 255, 3).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(a) * x + np.sin(a) * y)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        return c0 + t[..., None] * (c1 - c0)
    if kind == 2:  # oriented stripes, sine or square
        c1 = rng.uniform(0, 255, 3).astype(np.float32)
        a = rng.uniform(0, np.pi)
        period = float(np.exp(rng.uniform(np.log(3.0), np.log(max(4.0, min(h, w) / 3)))))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        s = np.sin(2 * np.pi * (np.cos(a) * x + np.sin(a) * y) / period + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.5:
            s = np.sign(s)
        t = 0.5 + 0.5 * s
        return c0 + t[..., None] * (c1 - c0)
    # smooth noise at a random scale, coloured around c0
    cells = int(rng.integers(2, 33))
    n = rng.standard_normal((cells, cells, 3)).astype(np.float32)
    n = cv2.resize(n, (w, h), interpolation=cv2.INTER_CUBIC)
    return c0 + rng.uniform(10, 60) * n


def generic_image(size: int = 256, seed: int = 0, index: int = 0) -> np.ndarray:
    """A dead-leaves picture, RGB uint8 ``[size, size, 3]``; a pure function of ``(seed, index)``."""
    import cv2

    _check(size, seed, index)
    s = int(size)
    rng = np.random.default_rng([int(seed), int(index), 0x6E1E])
    img = _fill(rng, s, s).astype(np.float32).copy()
    # radii from p(r) ~ r^-2 between s/80 and s/3 (inverse CDF): enough large shapes to cover the
    # picture, many small ones; painted in random order, so shapes occlude each other at every scale
    r_min, r_max = s / 80.0, s / 3.0
    n = int(rng.integers(80, 240))
    u = rng.random(n)
    radii = 1.0 / (1 / r_min - u * (1 / r_min - 1 / r_max))
    for r in radii:
        r = float(r)
        cy, cx = rng.uniform(-r, s + r, 2)
        box = int(np.ceil(2 * r)) + 2
        y0, x0 = int(cy - r) - 1, int(cx - r) - 1
        mask = np.zeros((box, box), np.uint8)
        c = (int(round(cy - y0)), int(round(cx - x0)))
        shape = rng.integers(0, 4)
        if shape == 0:
            cv2.circle(mask, (c[1], c[0]), max(1, int(r)), 255, -1, cv2.LINE_AA)
        elif shape == 1:
            axes = (max(1, int(r)), max(1, int(r * rng.uniform(0.2, 1.0))))
            cv2.ellipse(mask, (c[1], c[0]), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif shape == 2:
            rect = ((float(c[1]), float(c[0])), (2 * r * rng.uniform(0.3, 1.0), 2 * r * rng.uniform(0.3, 1.0)),
                    float(rng.uniform(0, 180)))
            cv2.fillPoly(mask, [cv2.boxPoints(rect).astype(np.int32)], 255, cv2.LINE_AA)
        else:
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            pts = np.stack([c[1] + r * np.cos(ang), c[0] + r * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        # clip the shape's box to the image
        iy0, ix0, iy1, ix1 = max(0, y0), max(0, x0), min(s, y0 + box), min(s, x0 + box)
        if iy1 <= iy0 or ix1 <= ix0:
            continue
        m = mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].astype(np.float32)[..., None] / 255.0
        paint = _fill(rng, iy1 - iy0, ix1 - ix0)
        region = img[iy0:iy1, ix0:ix1]
        region *= 1.0 - m
        region += m * paint
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 2.0)))
    img += rng.uniform(0, 8) * rng.standard_normal(img.shape).astype(np.float32)
    if rng.random() < 0.2:
        img[:] = img.mean(axis=2, keepdims=True)
    return np.clip(img, 0, 255).astype(np.uint8)


def _check_out(out: Path) -> Path:
    """``out`` of :func:`write_generic`: missing, an empty folder or a previous run's (generic_NNNNNN.jpg only;
    older versions wrote them in place, and a killed one left its temp files), in a folder where the new one
    can be made. Returns the folder (a link's target), the one replaced."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; expected a folder to write the generic images into")
    ours = re.compile(r"\.?generic_\d{6}\.jpg(\..*\.tmp)?")   # a previous run's images (and a killed one's temps)
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not ours.fullmatch(p.name))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise InputError(f"{out}: holds {shown}; expected a new or empty folder, or one a previous "
                             "'edge-ad generic-images' wrote (generic_NNNNNN.jpg only): its images are replaced")
    real = Path(os.path.realpath(out))   # a link to the folder: the folder is the one replaced, beside itself
    atomic.check_writable(real.absolute().parent, str(out), f"the images are written beside {real.name} and renamed into place")
    return real


def write_generic(folder: str | os.PathLike, count: int, size: int = 256, seed: int = 0,
                  progress: bool = True) -> list[Path]:
    """Write ``count`` generic images as ``generic_NNNNNN.jpg`` into ``folder``; returns their paths.

    ``folder`` is new, empty, or a previous run's, which is replaced as a whole: the images are written into a
    sibling folder (``.NAME.new-*``) switched in when all are there (:func:`atomic.switch_folder`), so an
    interrupted run (Ctrl-C, a power cut) leaves the previous run's folder as it was, never a mix of two runs,
    and the next run deletes what it left beside the folder."""
    import cv2
    from tqdm import tqdm

    if int(count) < 1:
        raise InputError(f"generic image count {count}: expected at least 1")
    _check(size, seed)  # before the folder is made
    out = Path(folder)
    real = _check_out(out)
    real.parent.mkdir(parents=True, exist_ok=True)
    atomic.tidy_switch(real, what="generic images folder")   # a killed run's; one at work holds its own
    stage = atomic.staging_beside(real)
    stage.mkdir()
    try:
        with atomic.folder_lock(stage, f"{stage}: taken by another edge-ad generic-images; run it again"):
            if real.is_dir():  # the folder keeps its permissions
                os.chmod(stage, real.stat().st_mode & 0o7777)
            names = []
            for i in tqdm(range(int(count)), desc="generic images", unit="img",
                          disable=None if progress else True):
                img = generic_image(size, seed, i)
                ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
                if not ok:
                    raise InputError(f"{out}: could not encode generic image {i} as JPEG")
                names.append(f"generic_{i:06d}.jpg")
                atomic.write_bytes(stage / names[-1], buf.tobytes())
            _check_out(out)   # again: something may have been put there meanwhile
            atomic.switch_folder(stage, real, "generic images folder")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return [out / n for n in names]
