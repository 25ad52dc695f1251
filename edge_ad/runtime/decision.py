"""From scores and maps to decisions: threshold, OK/NG, defect regions.

Pure numpy / OpenCV functions. A frame is NG when its image score (the maximum of the combined map)
is above the threshold. Its defect regions are the 8-connected components of the full-resolution map
(bilinearly upsampled to the inspected image) above the same threshold, each with its bounding box,
area and peak value, largest peak first. An OK frame has no regions by construction: bilinear
upsampling never exceeds the largest value of the map it interpolates. Conversely an NG frame whose peak
barely passes the threshold can have an upsampled map that stays below it everywhere (interpolation
lowers isolated peaks); its regions are then the map cells above the threshold, scaled to image pixels
(:func:`regions_for`), so every NG decision says where.
"""

from __future__ import annotations

import numpy as np

from .records import Region


def find_regions(full_map: np.ndarray, threshold: float, min_area: int = 1, max_regions: int = 16) -> tuple[Region, ...]:
    """Connected components of ``full_map > threshold`` as Regions (largest peak first)."""
    import cv2

    m = np.asarray(full_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"full_map has shape {m.shape}; expected [H, W]")
    mask = (m > threshold).astype(np.uint8)
    if not mask.any() or max_regions <= 0:
        return ()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return ()
    # peak per label in one pass: sort the above-threshold pixels by label
    lab = labels.ravel()
    vals = m.ravel()
    sel = lab > 0
    lab, vals = lab[sel], vals[sel]
    peaks = np.full(n, -np.inf, dtype=np.float64)
    np.maximum.at(peaks, lab, vals)
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        out.append(Region((x, y, w, h), area, float(peaks[i])))
    out.sort(key=lambda r: r.peak, reverse=True)
    return tuple(out[:max_regions])


def upsample_one(combined: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """One combined map ``[h, w]`` -> ``[H, W]`` with the scoring module's interpolation."""
    from .. import scoring

    return scoring.upsample(combined[None], size_hw)[0]


def regions_for(combined: np.ndarray, full_map: np.ndarray, threshold: float, min_area: int = 1,
                max_regions: int = 16) -> tuple[Region, ...]:
    """Regions of one NG frame: from the full-resolution map, else from the map cells (see module doc)."""
    regs = find_regions(full_map, threshold, min_area, max_regions)
    if regs or max_regions <= 0:
        return regs
    if bool((full_map > threshold).any()):
        # every region is under min_area: an NG part still says where, with its strongest region at its
        # true size (the cell fallback below reported a whole map cell's area instead)
        return find_regions(full_map, threshold, 1, 1)
    cells = find_regions(combined, threshold, 1, max_regions)
    H, W = full_map.shape
    h, w = combined.shape
    sy, sx = H / h, W / w
    out = []
    for r in cells:
        x, y, bw, bh = r.box
        x0, y0 = int(round(x * sx)), int(round(y * sy))
        x1, y1 = min(W, int(round((x + bw) * sx))), min(H, int(round((y + bh) * sy)))
        out.append(Region((x0, y0, max(1, x1 - x0), max(1, y1 - y0)), int(round(r.area * sx * sy)), r.peak))
    return tuple(out)
