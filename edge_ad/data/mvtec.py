"""Datasets in the MVTec AD folder layout (one category folder).

::

    CATEGORY/
      train/good/*.png|jpg                 normal training images
      test/good/*                          normal test images (never have masks)
      test/<defect_type>/*                 defective test images
      ground_truth/<defect_type>/<stem>_mask.png   pixel masks (optional: image-level data sets have none)

Images may be of any format of :data:`edge_ad.data.image.IMAGE_EXTS` (PNG, JPEG, BMP, TIFF, WebP,
PBM/PGM/PPM), grayscale or colour, of any size (sizes may differ between images). Hidden files (".name",
e.g. macOS "._NAME.png") are skipped; other files are not read, and a warning names their folder, count
and extensions (:attr:`MVTecCategory.notes` keeps it for the eval report), as it does for a test/<type>
folder without images. A mask must have the size of its image (``<stem>_mask.<ext>`` or ``<stem>.<ext>``;
see :func:`edge_ad.data.image.load_mask` for what counts as defective). When ``ground_truth/<type>/``
exists, every image of ``test/<type>/`` needs a mask there, and every mask needs an image: a half-labelled
folder would make the pixel metrics silently wrong. A mask of a defective image that holds no defective
pixel is recorded in :attr:`MVTecCategory.empty_masks` (eval warns and leaves it out of the pixel
metrics). ``ground_truth/good/`` is ignored if present (good images are defect-free by definition).
Everything that is wrong raises :class:`edge_ad.errors.InputError` naming the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from .image import IMAGE_EXTS, load_image, load_mask as _read_mask, scan_images, skipped_text, warn_skipped

log = logging.getLogger(__name__)

GOOD = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` 0 for good, 1 for defective; ``mask_path`` None without a mask."""

    path: Path
    defect_type: str
    label: int
    mask_path: Path | None = None

    @property
    def stem(self) -> str:
        return self.path.stem


class MVTecCategory:
    """One category folder in the MVTec AD layout. Folders are read lazily and listed once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: data folder not found (expected an MVTec-layout category folder "
                             "with train/good, test/<type> and optionally ground_truth/<type>)")
        if not (self.path / "train").is_dir() and not (self.path / "test").is_dir():
            raise InputError(f"{self.path}: neither 'train/' nor 'test/' found; expected the MVTec AD layout "
                             "train/good, test/<type>, ground_truth/<type>/<stem>_mask.png")
        self._train: list[Path] | None = None
        self._test: list[Sample] | None = None
        # what the listing left out, one line each (files of other formats, a test/<type> without images),
        # each also logged as a warning; the eval report carries them
        self.notes: list[str] = []
        # image -> its mask, for defective images whose mask holds no defective pixel (filled as they load)
        self.empty_masks: dict[Path, Path] = {}

    def __repr__(self) -> str:
        return f"MVTecCategory({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ listing
    def train_paths(self) -> list[Path]:
        """Normal training images (``train/good``), in name order."""
        if self._train is None:
            d = self.path / "train" / GOOD
            if not d.is_dir():
                raise InputError(f"{d}: folder not found; training images go in train/good/")
            paths = self._list(d)
            if not paths:
                raise InputError(f"{d}: no images (expected {', '.join(IMAGE_EXTS)} files)")
            self._train = paths
        return list(self._train)

    def defect_types(self) -> list[str]:
        """Defective test folders (every ``test/<type>`` except ``good``), in name order."""
        return sorted({s.defect_type for s in self.test_samples() if s.label == 1})

    def test_samples(self) -> list[Sample]:
        """Every test image: ``good`` first, then defect types in name order, images in name order."""
        if self._test is None:
            self._test = self._list_test()
        return list(self._test)

    @property
    def has_masks(self) -> bool:
        """True when every defective test image has a pixel mask (pixel metrics are meaningful)."""
        bad = [s for s in self.test_samples() if s.label == 1]
        return bool(bad) and all(s.mask_path is not None for s in bad)

    def summary(self) -> dict:
        """Counts per split and defect type, e.g. for a report header."""
        test = self.test_samples() if (self.path / "test").is_dir() else []
        counts: dict[str, int] = {}
        for s in test:
            counts[s.defect_type] = counts.get(s.defect_type, 0) + 1
        train_dir = self.path / "train" / GOOD
        bad = [s for s in test if s.label == 1]
        return {"path": str(self.path), "train": len(self.train_paths()) if train_dir.is_dir() else 0,
                "test": counts, "has_masks": bool(bad) and all(s.mask_path is not None for s in bad)}

    def _list_test(self) -> list[Sample]:
        test_dir = self.path / "test"
        if not test_dir.is_dir():
            raise InputError(f"{test_dir}: folder not found; test images go in test/good/ and test/<defect_type>/")
        types = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not types:
            raise InputError(f"{test_dir}: no sub-folders; expected test/good/ and test/<defect_type>/")
        gt_root = self.path / "ground_truth"
        if gt_root.is_dir():
            for d in sorted(gt_root.iterdir()):
                if (d.is_dir() and d.name != GOOD and not d.name.startswith(".") and d.name not in types
                        and any(_masks_in(d))):
                    raise InputError(f"{d}: masks for defect type '{d.name}' but no folder "
                                     f"{test_dir / d.name}")
        ordered = ([GOOD] if GOOD in types else []) + [t for t in types if t != GOOD]
        samples: list[Sample] = []
        for t in ordered:
            images = self._list(test_dir / t)
            if not images:   # left out of the report: say so, or its row simply is not there
                note = (f"{test_dir / t}: no images; " + ("no good test images: false alarms are not measured"
                        if t == GOOD else f"defect type '{t}' is not evaluated"))
                self.notes.append(note)
                log.warning("%s", note)   # (its masks, if any, are still checked: each needs an image)
            if t == GOOD:
                samples += [Sample(p, GOOD, 0, None) for p in images]
                continue
            samples += self._with_masks(t, images, gt_root / t)
        if not samples:
            raise InputError(f"{test_dir}: no test images found")
        return samples

    def _list(self, d: Path) -> list[Path]:
        images, others = scan_images(d)
        if others:
            self.notes.append(skipped_text(d, others))
            warn_skipped(d, others)
        return images

    def _with_masks(self, dtype: str, images: list[Path], gt_dir: Path) -> list[Sample]:
        if not gt_dir.is_dir():
            return [Sample(p, dtype, 1, None) for p in images]
        masks = {_mask_stem(m): m for m in _masks_in(gt_dir)}
        if not masks:  # an empty ground_truth/<type>/ folder: image-level labels only
            return [Sample(p, dtype, 1, None) for p in images]
        stems: dict[str, Path] = {}
        for p in images:
            if p.stem in stems:
                raise InputError(f"{p}: two images share the stem '{p.stem}' ({stems[p.stem].name}); "
                                 "their masks could not be told apart")
            stems[p.stem] = p
        out = []
        for p in images:
            m = masks.get(p.stem)
            if m is None:
                raise InputError(f"{p}: no mask {gt_dir / (p.stem + MASK_SUFFIX + '.png')} although "
                                 f"{gt_dir} holds masks for other images of '{dtype}'")
            out.append(Sample(p, dtype, 1, m))
        orphans = sorted(set(masks) - set(stems))
        if orphans:
            raise InputError(f"{masks[orphans[0]]}: mask without an image (expected "
                             f"{self.path / 'test' / dtype / orphans[0]} with an image extension: "
                             f"{', '.join(IMAGE_EXTS)})"
                             + (f"; {len(orphans) - 1} more like it" if len(orphans) > 1 else ""))
        return out

    # ------------------------------------------------------------------ loading
    def load_sample(self, sample: Sample, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image (RGB uint8 ``[H, W, 3]``) and mask (bool ``[H, W]``; all False without a mask).

        ``size`` (H, W) resizes both (image: area/linear, mask: nearest). The mask must have the image's
        size before resizing, else :class:`InputError` naming both files.
        """
        img = load_image(sample.path)
        mask = self._mask_for(sample, img.shape[:2])
        if size is not None:
            from .image import resize_rgb
            img = resize_rgb(img, size)
            mask = _resize_mask(mask, size)
        return img, mask

    def load_mask(self, sample: Sample, size: tuple[int, int] | None = None,
                  image_shape: tuple[int, int] | None = None) -> np.ndarray:
        """The mask of ``sample`` as bool ``[H, W]`` (all False for good / mask-less samples).

        The mask's size is checked against the image (``image_shape`` (H, W) when the caller already
        knows it, else read from the image file). ``size`` (H, W) resizes it with nearest neighbour.
        """
        if image_shape is None:
            image_shape = load_image(sample.path).shape[:2]
        mask = self._mask_for(sample, tuple(image_shape))
        return mask if size is None else _resize_mask(mask, size)

    def load_train(self, size: tuple[int, int] | None = None,
                   paths: Sequence[Path] | None = None) -> list[np.ndarray]:
        """Training images (or ``paths``) as RGB uint8 frames, resized to ``size`` (H, W) when given."""
        from .image import resize_rgb
        out = []
        for p in (self.train_paths() if paths is None else paths):
            img = load_image(p)
            out.append(resize_rgb(img, size) if size is not None else img)
        return out

    def check(self) -> dict:
        """Decode every image and mask once: raises on the first unreadable file or mismatched mask."""
        for p in self.train_paths() if (self.path / "train").is_dir() else []:
            load_image(p)
        for s in self.test_samples() if (self.path / "test").is_dir() else []:
            self.load_sample(s)
        return self.summary()

    def _mask_for(self, sample: Sample, shape_hw: tuple[int, int]) -> np.ndarray:
        h, w = int(shape_hw[0]), int(shape_hw[1])
        if sample.mask_path is None:
            return np.zeros((h, w), dtype=bool)
        m = _read_mask(sample.mask_path)
        if m.shape != (h, w):
            raise InputError(f"{sample.mask_path}: mask is {m.shape[1]}x{m.shape[0]} (WxH) but its image "
                             f"{sample.path} is {w}x{h}; a mask must have its image's size")
        if sample.label == 1 and not m.any():   # checked at full size: a resize may drop a tiny defect
            self.empty_masks[sample.path] = sample.mask_path
        return m


def _masks_in(d: Path):
    return iter(scan_images(d)[0])


def _mask_stem(p: Path) -> str:
    s = p.stem
    return s[: -len(MASK_SUFFIX)] if s.endswith(MASK_SUFFIX) else s


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0


def _n_val(n: int, val_fraction: float) -> int:
    return min(max(1, int(round(n * val_fraction))), n - 1)


def smallest_split(val_fraction: float, each: int = 2) -> int:
    """The fewest images for which :func:`split_train_val` keeps at least ``each`` on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction}: expected 0 < fraction < 1")
    # round(n*f) >= each needs n >= (each - 0.5)/f; n - round(n*f) >= each needs n >= (each - 0.5)/(1-f)
    n = max(2 * each, int((each - 0.5) / val_fraction) - 2, int((each - 0.5) / (1.0 - val_fraction)) - 2)
    while _n_val(n, val_fraction) < each or n - _n_val(n, val_fraction) < each:
        n += 1
    return n


def split_train_val(paths: Sequence[Path], val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Deterministic split of normal training images into (train, validation).

    The validation part (at least one image, at most all but one) is used for calibration quantiles and
    thresholds, never the test set. Both parts keep the input order; the same paths, fraction and seed
    always give the same split, independent of the platform.
    """
    paths = list(paths)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction}: expected 0 <= fraction < 1")
    if val_fraction == 0.0:
        return paths, []
    if len(paths) < 2:
        raise InputError(f"{len(paths)} training image(s): need at least 2 to keep a validation split")
    n_val = _n_val(len(paths), val_fraction)
    order = np.random.default_rng(seed).permutation(len(paths))
    val_idx = set(int(i) for i in order[:n_val])
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val
