"""``edge-ad eval``: accuracy of the exact artefact that will run (any backend, any precision).

Scores and maps come through the same :class:`~edge_ad.inspector.Inspector` the inspection loop uses,
so a reported AUROC is the deployed graph's. Pixel metrics are computed at the model's input size
(masks resized with nearest neighbour), as anomalib and the EfficientAD paper do.

Besides the aggregates, ``report["samples"]`` lists every test image: ``path`` (relative to ``--data``),
``type``, ``score`` and ``decision`` (``NG`` above the threshold, as the loop decides; ``null`` for a score
that is not a finite number), sorted by type, then path. ``report["notes"]`` says what was left out: files
of other formats, a test/<type> folder without images, defect types without masks and masks without a
defective pixel (both left out of the pixel metrics); each is logged as a warning too. ``report["files"]``
names what was written: ``report`` (report.json), and ``grid`` and ``histogram`` (the pictures), paths under
``out_dir`` (default BUNDLE/eval); the text report ends with them (``wrote ...``). A file or defect-type
folder named with a byte that is not UTF-8 is written with it as ``\\xfe`` (:func:`~edge_ad.errors.name_text`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from . import atomic, metrics
from .bundle import Bundle
from .errors import InputError, valid_unicode
from .data.image import load_image, resize_rgb, to_batch, trained_format
from .data.mvtec import MVTecCategory
from .inspector import Inspector

log = logging.getLogger(__name__)


def evaluate(bundle_dir: str | Path, data: str | Path, backend: str = "onnxruntime",
             precision: str | None = None, device: str | None = None, batch: int = 8,
             out_dir: str | Path | None = None, progress: bool = True, pictures: bool = True) -> dict:
    from tqdm import tqdm

    from .runtime.backends import open_backend

    bundle = Bundle.open(bundle_dir)
    out = Path(out_dir) if out_dir else bundle.path / "eval"
    if out.exists() and not out.is_dir():         # checked before the images are inferred, not after
        raise InputError(f"--out {out}: is a file; expected a folder for report.json and the pictures")
    cat = MVTecCategory(data)
    samples = cat.test_samples()
    be = open_backend(bundle, backend, precision, device)
    insp = Inspector(bundle, be)
    size = bundle.image_size
    scores, maps, masks, thumbs = [], [], [], []
    t0 = time.time()
    try:
        with trained_format(bundle):   # frames of another bit depth than training's: warned
            for i in tqdm(range(0, len(samples), batch), desc=f"eval ({be.name} {be.precision})", unit="batch",
                          disable=None if progress else True):
                chunk = samples[i:i + batch]
                frames = [load_image(s.path) for s in chunk]
                sc = insp.inspect_batch(to_batch(frames, size))
                full = insp.full_maps(sc, size)
                scores.extend(sc.scores.tolist())
                for s, m, f in zip(chunk, full, frames):
                    maps.append(m.astype(np.float32))
                    masks.append(cat.load_mask(s, size, image_shape=f.shape[:2]))
                    thumbs.append(resize_rgb(f, size))   # the grid shows them at the maps' size: keep no more
    finally:
        be.close()
    seconds = time.time() - t0
    cal = insp.calibration
    labels = [s.label for s in samples]
    types = [s.defect_type for s in samples]
    notes = list(cat.notes)
    pixel_masks = _pixel_labels(cat, samples, masks, notes)
    report = metrics.defect_type_report(scores, labels, types, threshold=cal.threshold,
                                        maps=maps if pixel_masks is not None else None, masks=pixel_masks)
    report["notes"] = notes
    report.update({"bundle": str(bundle.path), "data": str(cat.path), "backend": be.name,
                   "precision": be.precision,
                   "graph": Path(be.graph).name if getattr(be, "graph", None) else None, "model": bundle.kind, "calibration_version": cal.version,
                   "seconds": round(seconds, 2), "images_per_second": round(len(samples) / max(seconds, 1e-9), 2),
                   "samples": sample_rows(samples, scores, cat.path, cal.threshold)})
    report["files"] = {"report": str(out / "report.json")}
    # a file or defect-type folder named with a byte that is not UTF-8 is written as \xfe (README: Image folders)
    report = valid_unicode(report)
    out.mkdir(parents=True, exist_ok=True)   # once the inputs were read and scored: a refused eval makes none
    atomic.write_json(out / "report.json", report)
    if pictures:
        from . import viz

        report["pictures"] = viz.write_eval_pictures(out, thumbs, masks, maps, scores, labels, types,
                                                     cal.threshold, size, names=[s.stem for s in samples])
        report["files"].update({k: str(out / name) for k, name in report["pictures"].items()})
        atomic.write_json(out / "report.json", report)
    return report


def _pixel_labels(cat: MVTecCategory, samples, masks: list, notes: list[str]) -> list | None:
    """The masks the pixel metrics use: None for an image-level data set (no masks at all), else one per
    sample, None for a defective image without a usable mask, which is left out of the pixel metrics: of a
    defect type without masks (the others are still measured, their overall marked), or whose mask holds no
    defective pixel (an empty mask would count every pixel of a defective image as normal, and lower the
    overall pixel AUROC / AUPRO silently). Each case is logged and added to ``notes``."""
    bad = [s for s in samples if s.label == 1]
    if not any(s.mask_path is not None for s in bad):
        return None
    out = [m if s.label == 0 or (s.mask_path is not None and s.path not in cat.empty_masks) else None
           for s, m in zip(samples, masks)]
    unmasked = sorted({s.defect_type for s in bad if s.mask_path is None})
    if unmasked:
        have = sorted({s.defect_type for s in bad if s.mask_path is not None})
        notes.append(f"pixel metrics: {', '.join(unmasked)} {'has' if len(unmasked) == 1 else 'have'} no masks "
                     f"in {cat.path / 'ground_truth'}: left out of the pixel metrics, which cover good + "
                     f"{', '.join(have)} only")
    empty = [(s, cat.empty_masks[s.path]) for s in bad if s.path in cat.empty_masks]
    if empty:
        shown = ", ".join(str(m) for _, m in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        notes.append(f"pixel metrics: {len(empty)} mask(s) of defective images hold no defective pixel ({shown}): "
                     "those images are left out of the pixel metrics. A mask is read from its colour (any "
                     "non-zero channel; JPEG masks from 128 up, so a 0/1 JPEG reads empty: save it as PNG), or "
                     "from its alpha when its colour is the same everywhere")
    for n in notes[len(cat.notes):]:
        log.warning("%s", n)
    return out


def sample_rows(samples, scores, root: Path, threshold: float) -> list[dict]:
    """One row per test image (see the module doc), sorted by type, then path."""
    rows = []
    for s, score in zip(samples, scores):
        score = float(score)
        finite = math.isfinite(score)
        rows.append({"path": s.path.relative_to(root).as_posix(), "type": s.defect_type,
                     "score": score if finite else None,
                     "decision": ("NG" if score > threshold else "OK") if finite else None})
    return sorted(rows, key=lambda r: (r["type"], r["path"]))


def report_text(report: dict) -> str:
    graph = f" {report['graph']}" if report.get("graph") else ""
    head = (f"{report['model']} ({report['backend']} {report['precision']}{graph}, calibration "
            f"v{report['calibration_version']}) on {report['data']}: {report['overall']['n']} images, "
            f"{report['images_per_second']} img/s")
    notes = "".join(f"\nnote: {n}" for n in report.get("notes") or [])
    files = report.get("files") or {}
    wrote = f"\nwrote {', '.join(files.values())}" if files else ""
    return head + "\n" + metrics.format_report(report) + ("\n" + notes if notes else "") + wrote


def dumps(report: dict) -> str:
    return json.dumps(report, sort_keys=True)
