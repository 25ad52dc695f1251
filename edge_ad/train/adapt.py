"""Fine-tune a trained bundle on new normal images (``edge-ad calibrate --adapt``).

For lines that changed more than lighting: the student and autoencoder (EfficientAD) or the inpainter
(FADeR-style) train for a bounded number of steps on the new normals, starting from the bundle's
weights; the teacher / backbone stay frozen (EfficientAD's teacher normalization is kept, so scores stay
comparable). The result is a *candidate* bundle in a new folder: re-exported ONNX, a fresh calibration
from a validation split of the new images. The caller validates it (quantization guard, golden set)
and switches it in; the running bundle is never modified here.

The Gaussian model has no gradient training: its adaptation *is* the refit of ``edge-ad calibrate``.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import scoring
from ..bundle import NOT_SHIPPED, Bundle, now_iso
from ..calibration.adapt import check_kept_frames, validation_split
from ..data.image import resize_rgb
from ..errors import InputError
from ..models import load_from_bundle
from .common import seed_everything
from .loops import LoopConfig, train_efficientad, train_fader
from .pipeline import PRESETS, fit_calibration, model_outputs

log = logging.getLogger(__name__)
SKIP = {*NOT_SHIPPED, "calibration.d", "gaussian.d"}  # a candidate starts its own calibration history


def adapt_bundle(bundle_dir: str | Path, frames: Sequence[np.ndarray], out_dir: str | Path, steps: int = 200,
                 batch_size: int = 1, lr: float | None = None, seed: int = 0, device: str = "cpu",
                 policy: str | None = None, export: bool = True) -> Bundle:
    """Fine-tune on ``frames`` (RGB uint8) and write the candidate bundle to ``out_dir``."""
    src = Bundle.open(bundle_dir, verify=True)
    kind = src.kind
    if kind == "gaussian":
        raise InputError("the Gaussian model has no weights to fine-tune: 'edge-ad calibrate' (without "
                         "--adapt) refits its statistics, which is its adaptation")
    check_kept_frames(len(frames))   # screened: what calibrate --adapt requested was checked before
    if steps < 1:
        raise InputError(f"--adapt-steps {steps}: expected >= 1")
    out = Path(out_dir)
    if out.resolve() == src.path.resolve():
        raise InputError(f"{out}: the candidate must go to a new folder, not the running bundle")
    if out.exists():
        shutil.rmtree(out)
    seed_everything(seed)
    size = src.image_size[0]
    imgs = torch.from_numpy(np.stack([resize_rgb(f, (size, size)).transpose(2, 0, 1) for f in frames]).copy())
    val_idx, train_idx = validation_split(len(imgs), seed)
    n_val = len(val_idx)
    val, train = imgs[val_idx], imgs[train_idx]
    model = load_from_bundle(src, device)
    lr = lr if lr is not None else PRESETS[kind]["quick"]["lr"] * 0.5
    # EfficientAD: the teacher normalization of the original training is kept (scores stay comparable)
    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, state_path=None,
                     fit_teacher_norm=False)
    t0 = time.time()
    if kind.startswith("efficientad"):
        info = train_efficientad(model, train, cfg)
    else:
        info = train_fader(model, train, cfg)
    model.to("cpu").eval()

    out.mkdir(parents=True)
    for item in src.path.iterdir():
        if item.name in SKIP or item.name.startswith(".") or item.name.startswith("calibration"):
            continue
        if item.is_file():
            shutil.copy2(item, out / item.name)
    cand = Bundle.open(out)
    cand.manifest["files"] = {k: v for k, v in cand.manifest["files"].items() if (out / k).is_file()}
    for name in [n for n in cand.manifest["files"] if n.startswith("model.") and n != "model.onnx"]:
        cand.remove_file(name, save=False)  # quantized graphs of the old weights are stale
    cand.manifest["active"] = {"graph": "model.onnx", "precision": "fp32"}
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    cand.add_file("checkpoint.pt", data=buf.getvalue(), save=False)
    cand.manifest["adapted"] = {"from": str(src.path), "from_model_hash": src.model_hash(), "steps": steps,
                                "frames": len(frames), "lr": lr, "date": now_iso(),
                                "seconds": round(time.time() - t0, 1), "final_losses": info.get("final_losses")}
    cand.save_manifest()
    raw_val = model_outputs(model, val, "cpu")
    old = src.calibration()
    cal = fit_calibration(kind, raw_val, old.map_pad, policy or old.policy,
                          source=f"--adapt on {len(frames)} new normal frames ({n_val} for validation)")
    cand.write_calibration(cal)
    if export:
        from ..compile.export import export_bundle

        export_bundle(cand, module=model)
    return cand


def score_frames(bundle: Bundle, frames: Sequence[np.ndarray]) -> np.ndarray:
    """Image scores of ``frames`` under the bundle's calibration with its torch model (for tests/reports)."""
    model = load_from_bundle(bundle)
    size = bundle.image_size[0]
    x = torch.from_numpy(np.stack([resize_rgb(f, (size, size)).transpose(2, 0, 1) for f in frames]).copy())
    return scoring.score(model_outputs(model, x, "cpu"), bundle.calibration()).scores
