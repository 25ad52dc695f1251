"""``edge-ad train``: data -> model -> bundle (checkpoint, manifest, calibration, ONNX).

Presets: ``quick`` fits in tens of CPU minutes (fewer steps, larger batches and learning rate than the
paper); ``paper`` is EfficientAD's published schedule (70,000 steps, batch 1, Adam 1e-4, weight decay
1e-5, x0.1 at 95%), meant for a GPU.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, atomic, gaussian, scoring
from ..bundle import (_TEMP_RE, TRAINING_IMAGES, TRAINING_STATE, Bundle, foreign_entries, is_bundle_folder,
                      now_iso, training_images_bytes)
from ..errors import InputError, RuntimeFailure
from ..models import KINDS, build, check_model_config, default_config, describe, load_weights
from ..models.pdn import pdn
from ..data.mvtec import MVTecCategory, smallest_split, split_train_val
from .common import (ImagesSeen, check_run, file_list_id, load_images, penalty_folder, penalty_images, progress_bar,
                     resume_state, seed_everything)
from .loops import LoopConfig, train_efficientad, train_fader

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "efficientad-s": {"quick": {"steps": 1200, "batch_size": 1, "lr": 3e-4},
                      "paper": {"steps": 70000, "batch_size": 1, "lr": 1e-4}},
    "efficientad-m": {"quick": {"steps": 600, "batch_size": 1, "lr": 3e-4},
                      "paper": {"steps": 70000, "batch_size": 1, "lr": 1e-4}},
    "fader": {"quick": {"steps": 600, "batch_size": 2, "lr": 1e-3},
              "paper": {"steps": 30000, "batch_size": 8, "lr": 1e-3}},
    "gaussian": {"quick": {"steps": 0}, "paper": {"steps": 0}},
}
DEFAULT_POLICY = "max"


def load_teacher_file(path: str | Path) -> tuple[str, int, dict]:
    """A PDN teacher weights file (public ``teacher_small.pth`` / ``teacher_medium.pth`` format:
    the state_dict of the nn.Sequential). Returns (size 's'|'m', out channels, state_dict)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: teacher weights file not found")
    sd = load_weights(p, "teacher file")
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise InputError(f"{p}: expected a PDN state_dict (keys like '0.weight', '3.weight', ...)")
    heads = {k.split(".")[0] for k in sd if isinstance(k, str) and k.endswith(".weight")}
    if not heads or not all(h.isdigit() for h in heads):
        odd = sorted(str(k) for k in sd if not str(k).split(".")[0].isdigit())   # the keys that are wrong
        raise InputError(f"{p}: keys {(odd or sorted(map(str, sd)))[:4]} are not a PDN state_dict "
                         "(expected '0.weight', '3.weight', ...): neither PDN-S nor PDN-M")
    convs = sorted(int(h) for h in heads)
    if convs == [0, 3, 6, 8]:
        size = "s"
    elif convs == [0, 3, 6, 8, 10, 12]:
        size = "m"
    else:
        raise InputError(f"{p}: layer indices {convs} match neither PDN-S (0,3,6,8) nor PDN-M (0,3,6,8,10,12)")
    last = sd[f"{convs[-1]}.weight"]
    if not isinstance(last, torch.Tensor) or last.dim() != 4 or last.shape[0] < 1:
        raise InputError(f"{p}: layer {convs[-1]}.weight is not a 4-d tensor with output channels; expected the "
                         f"last conv's weights (PDN-{size.upper()})")
    channels = int(last.shape[0])
    check_teacher_tensors(p, size, channels, sd)
    return size, channels, sd


def _shape(shape) -> str:
    return "x".join(str(int(n)) for n in shape) or "a scalar"


def check_teacher_tensors(p: Path, size: str, channels: int, sd: dict) -> None:
    """Every key of a PDN-``size`` teacher with ``channels`` output channels is in ``sd``, none other, each a
    floating-point tensor of the PDN's shape holding finite values: checked when the file is read, before any
    image loads (a wrong shape or a missing key failed in load_state_dict after the images were loaded; a
    NaN trained every step on loss=nan)."""
    with torch.device("meta"):  # the shapes only: no weights are made
        expected = {k: tuple(v.shape) for k, v in pdn(size, channels).state_dict().items()}
    name = f"PDN-{size.upper()}, {channels} output channels"
    missing = [k for k in expected if k not in sd]
    extra = sorted(str(k) for k in sd if k not in expected)
    if missing or extra:
        said = [f"missing {', '.join(missing)}"] if missing else []
        said += [f"unexpected {', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}"] if extra else []
        raise InputError(f"{p}: not a complete teacher ({name}): {'; '.join(said)} (expected the keys "
                         f"{', '.join(expected)})")
    for k, want in expected.items():
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{p}: layer {k} is a {type(v).__name__}, expected a tensor of shape {_shape(want)} "
                             f"({name})")
        if tuple(v.shape) != want:
            raise InputError(f"{p}: layer {k} has shape {_shape(v.shape)}, expected {_shape(want)} "
                             f"(PDN-{size.upper()})")
        if not v.is_floating_point():
            raise InputError(f"{p}: layer {k} is a tensor of {v.dtype}, expected floating-point weights ({name})")
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise InputError(f"{p}: layer {k} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) of "
                             f"{v.numel()}; the teacher file is damaged or was written by a training that "
                             "diverged: use another teacher file")


@torch.no_grad()
def model_outputs(model, images: torch.Tensor, device: str, batch: int = 8,
                  desc: str | None = None) -> dict[str, np.ndarray]:
    """The model's outputs for ``images``, ``batch`` at a time; with ``desc``, a progress bar of that name
    (:func:`~edge_ad.train.common.progress_bar`: also lines in a log)."""
    outs: dict[str, list[np.ndarray]] = {n: [] for n in model.output_names}
    bar = None if desc is None else progress_bar(int(images.shape[0]), desc, "img")
    for i in range(0, images.shape[0], batch):
        res = model(images[i:i + batch].float().to(device))
        for n, t in zip(model.output_names, res):
            outs[n].append(t.float().cpu().numpy())
        if bar is not None:
            bar.update(min(batch, images.shape[0] - i))
    if bar is not None:
        bar.close()
    return {n: np.concatenate(v) for n, v in outs.items()}


def fit_calibration(kind: str, raw_val: dict[str, np.ndarray], map_pad: int, policy: str,
                    source: str, extra: dict | None = None) -> scoring.Calibration:
    """Map normalization and threshold from raw maps of the validation normals."""
    norms = scoring.fit_map_norms(raw_val)
    cal = scoring.Calibration(maps=norms, threshold=0.0, policy=policy, map_pad=map_pad,
                              source=source, n_frames=int(next(iter(raw_val.values())).shape[0]),
                              extra=extra or {})
    s = scoring.score(raw_val, cal).scores
    return cal.replace(threshold=scoring.threshold_from_policy(s, policy), normal=scoring.normal_stats(s))


def check_out_folder(out: Path) -> None:
    """``--out`` of a training: a new or empty folder, one holding only training state (an interrupted run to
    ``--resume``), or a bundle folder (replaced as a whole at the end) whose parent folder is writable.
    Anything else is refused, naming it: files that are not a bundle's are never deleted."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; expected a bundle folder (new, empty, or "
                         "holding a bundle to replace)")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir() if not _TEMP_RE.match(p.name))  # edge-ad's temp files
        if names and not is_bundle_folder(out) and not set(names) <= set(TRAINING_STATE):
            raise InputError(f"--out {out}: not empty and holds no bundle (no edge-ad manifest.json; it holds "
                             f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); expected a new or empty "
                             "folder, or a bundle folder to replace (nothing was changed)")
        foreign = foreign_entries(out)
        if foreign:
            raise InputError(f"--out {out}: holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, "
                             "which no bundle holds; training replaces the bundle folder as a whole, so move "
                             "them away or choose another --out (nothing was changed)")
    why = f"the new bundle is built beside {out.name} and renamed into place"
    atomic.check_writable(out.absolute().parent, f"--out {out}", why)
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: the folder {out} is not writable ({why})")


def tidy_out(out: Path) -> None:
    """Before a training into ``out``, what a cut-off one left there and beside it: a power cut between
    :func:`_switch_in`'s two renames (``out`` missing, ``.NAME.old-*`` beside it) is finished by renaming the
    complete new bundle (``.NAME.new-*``, with its training state for ``--resume``) into place; other
    ``.NAME.new-*`` (a training killed while building it), ``.NAME.old-*`` (once ``out`` is whole) and the
    temp files of a checkpoint being written (``.train_state.pt.*.tmp``) are deleted. A staging folder
    another training still holds (it locks it) is left alone."""
    atomic.tidy_switch(out, lambda stage: Bundle.open(stage, verify=True), "bundle")
    if out.is_dir():
        temp = re.compile(rf"^\.({'|'.join(map(re.escape, TRAINING_STATE))})\..+\.tmp$")
        for p in out.iterdir():
            if temp.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def _switch_in(stage: Path, out: Path, state: Path | None) -> None:
    """Put the bundle built in ``stage`` at ``out``; the bundle there before (if any) is removed
    (:func:`atomic.switch_folder`: a failure or power cut leaves the old bundle or the new one whole). With
    ``state`` (this run's training state, in ``out``) it moves into the new bundle for a later ``--resume``."""
    if out.is_dir():
        check_out_folder(out)  # again: something may have been put there during the training
    if state is not None:
        os.replace(state, stage / state.name)
    try:
        atomic.switch_folder(stage, out, "bundle")
    except BaseException:
        if state is not None and (stage / state.name).exists():
            os.replace(stage / state.name, state)
        raise


def train_bundle(model_kind: str, data: str | Path, out: str | Path, image_size: int = 256,
                 steps: int | None = None, preset: str = "quick", teacher: str | None = None, seed: int = 0,
                 device: str = "cpu", resume: bool = False, penalty_dir: str | None = None,
                 policy: str = DEFAULT_POLICY, val_fraction: float = 0.1, batch_size: int | None = None,
                 lr: float | None = None, max_minutes: float | None = None, export: bool = True,
                 config: dict | None = None, checkpoint_every: int = 500) -> Bundle:
    """Train a ``model_kind`` model on the MVTec-layout category ``data`` into the bundle folder ``out``.

    One training at a time per ``out``, for the whole run: two into the same folder (two shells) both wrote
    checkpoints there and switched their bundles in, each other's files mixed. The second is refused at once
    (:class:`InputError`, exit 2) naming the folder and the first one's pid; ``--resume`` of a run that was
    stopped takes the folder as any training does.

    A fresh run that fails (an error, a non-finite loss, Ctrl-C) before it saved a checkpoint leaves nothing it
    made: the ``out`` folder it made (the gradient-trained models make it for their checkpoints) is removed while
    still empty, and so are the folders above it it made; an ``out`` that was there before stays as it was."""
    real = Path(os.path.realpath(out))  # a link to a bundle folder: the folder is the one guarded
    check_out_folder(real)   # its clear messages (a folder that is not writable) before the lock file is made
    made = not real.exists()
    with atomic.output_lock(real, f"--out {out}: another edge-ad train into this folder is running (pid {{pid}}); "
                            "try again when it has finished, or choose another --out (nothing was changed)"):
        try:
            return _train_bundle(model_kind, data, out, image_size=image_size, steps=steps, preset=preset,
                                 teacher=teacher, seed=seed, device=device, resume=resume, penalty_dir=penalty_dir,
                                 policy=policy, val_fraction=val_fraction, batch_size=batch_size, lr=lr,
                                 max_minutes=max_minutes, export=export, config=config,
                                 checkpoint_every=checkpoint_every)
        except BaseException:
            if made:   # empty: no checkpoint to --resume from (one saved keeps it); the lock removes the parents
                atomic._rmdir_quietly(real)
            raise


def _train_bundle(model_kind: str, data: str | Path, out: str | Path, image_size: int = 256,
                  steps: int | None = None, preset: str = "quick", teacher: str | None = None, seed: int = 0,
                  device: str = "cpu", resume: bool = False, penalty_dir: str | None = None,
                  policy: str = DEFAULT_POLICY, val_fraction: float = 0.1, batch_size: int | None = None,
                  lr: float | None = None, max_minutes: float | None = None, export: bool = True,
                  config: dict | None = None, checkpoint_every: int = 500) -> Bundle:
    if model_kind not in KINDS:
        raise InputError(f"--model '{model_kind}': expected one of {', '.join(KINDS)}")
    if preset not in ("quick", "paper"):
        raise InputError(f"--preset '{preset}': expected quick or paper")
    if resume and model_kind == "gaussian":
        raise InputError("--resume: the gaussian model is fitted in one pass, with no steps or checkpoint to "
                         "resume from; train it without --resume")
    check_run(device, max_minutes, steps, batch_size, checkpoint_every, seed, image_size, lr)
    scoring.check_policy(policy)  # validate early
    check_model_config(model_kind, config, image_size)
    out = Path(out)
    real = Path(os.path.realpath(out))  # a link to a bundle folder: the folder is replaced, the link kept
    tidy_out(real)
    check_out_folder(real)
    cfg = default_config(model_kind)
    cfg.update(config or {})
    teacher_sd = None
    teacher_id = teacher_record = None
    if model_kind.startswith("efficientad"):
        teacher_id = teacher_record = "lite0"
        if teacher and teacher != "lite0":
            tsize, tch, teacher_sd = load_teacher_file(teacher)
            teacher_record = {"file": str(Path(teacher).resolve()), "sha256": atomic.sha256_file(teacher)}
            teacher_id = f"a PDN file with sha256 {teacher_record['sha256'][:16]}"
            if tsize != model_kind[-1]:
                raise InputError(f"--teacher {teacher}: a PDN-{tsize.upper()} teacher does not fit {model_kind}")
            cfg.update(teacher="pdn", teacher_channels=tch)
        else:
            cfg.update(teacher="lite0", teacher_channels=None)
        if penalty_dir is not None:  # its images, or its train/good's: checked before any image is loaded
            penalty_dir = penalty_folder(penalty_dir)
    seed_everything(seed)
    t_start = time.time()
    paths = MVTecCategory(data).train_paths()
    train_paths, val_paths = split_train_val(paths, val_fraction, seed) if len(paths) > 1 else (paths, [])
    if len(val_paths) < 2 or len(train_paths) < 2:
        need = smallest_split(val_fraction) if 0 < val_fraction < 1 else 4
        other = "larger" if len(val_paths) < 2 else "smaller"
        raise InputError(f"{data}: {len(paths)} normal training images are too few: the validation split "
                         f"(val fraction {val_fraction}) keeps {len(val_paths)} and training {len(train_paths)}, "
                         f"and each needs at least 2; give at least {need} images, or a {other} --val-fraction")
    p = dict(PRESETS[model_kind][preset])
    if steps is not None:
        p["steps"] = int(steps)
    if batch_size is not None:
        p["batch_size"] = int(batch_size)
    if lr is not None:
        p["lr"] = float(lr)
    # checkpoints go where --resume looks for them, beside the bundle in force, which stays whole until the
    # new one is complete (it is built in a sibling folder and replaces the old one as a whole)
    state_path = real / TRAINING_STATE[0]
    # what defines the run: saved in each checkpoint; --resume is refused (before any image is loaded)
    # unless it matches. The step count, time budget, checkpoint interval, device and policy may change.
    run = {"command": "edge-ad train", "--model": model_kind, "--preset": preset,
           "model config": json.dumps(cfg, sort_keys=True, default=str), "--image-size": int(image_size),
           "--seed": int(seed), "--val-fraction": float(val_fraction), "--data": str(Path(data).resolve()),
           "validation split": file_list_id([v.name for v in val_paths]),
           "training images": file_list_id([t.name for t in train_paths]), "--teacher": teacher_id,
           "--penalty-dir": str(Path(penalty_dir).resolve()) if penalty_dir and teacher_id else None,
           "--batch-size": p.get("batch_size"), "learning rate": p.get("lr")}
    resume_from = resume_state(state_path, run) if resume else None
    # the files' fingerprints and the images' bit depths, taken as they are read
    seen_train = ImagesSeen()
    seen_val = ImagesSeen(seen_train.formats)
    train_imgs = load_images(train_paths, image_size, "loading train images", seen_train)
    val_imgs = load_images(val_paths, image_size, "loading validation images", seen_val)

    model = build(model_kind, image_size, cfg)
    if teacher_sd is not None:
        model.teacher.load_state_dict(teacher_sd)

    train_info: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    gauss_stats = None
    lc = None if model_kind == "gaussian" else LoopConfig(  # the gradient-trained models' loop
        steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"], seed=seed, device=device, resume=resume,
        state_path=state_path, checkpoint_every=checkpoint_every,
        max_seconds=None if max_minutes is None else 60.0 * max_minutes, run=run, resume_from=resume_from,
        started=t_start, lr_flag="--lr")
    if lc is not None:
        real.mkdir(parents=True, exist_ok=True)
    if model_kind.startswith("efficientad"):
        pen = penalty_images(penalty_dir, image_size)
        if pen is None:
            log.warning("penalty term skipped: no --penalty-dir of generic images given (EfficientAD uses "
                        "ImageNet); the student is then not pushed away from teacher features on "
                        "unrelated images")
        train_info = train_efficientad(model, train_imgs, lc, pen)
        train_info.update(teacher=teacher_record, penalty=pen is not None, penalty_dir=None if pen is None else
                          {"path": str(Path(penalty_dir).resolve()), "images": int(pen.shape[0])})
    elif model_kind == "fader":
        train_info = train_fader(model, train_imgs, lc)
    else:
        model.to(device).eval()
        feats = model_outputs(model, train_imgs, device, desc="features of the train images")["feat"]
        layout = "patch" if cfg["layout"] == "patch" else "shared"
        with progress_bar(feats.shape[2] * feats.shape[3] if layout == "patch" else 1, "fitting the Gaussians",
                          "location") as bar:
            gauss_stats = gaussian.fit(feats, layout, bar.update)
        train_info = {"steps": 0, "fitted_on": int(train_imgs.shape[0])}
    earlier = train_info.pop("earlier_seconds", 0.0)  # of the runs a --resume continues
    model.to("cpu").eval()

    raw_val = model_outputs(model, val_imgs, "cpu", desc="scoring the validation images")
    if gauss_stats is not None:
        extra["gaussian"] = "gaussian.d/0001.npz"
        raw_val = {"map": gaussian.distance_map(raw_val["feat"], gauss_stats)}
    cal = fit_calibration(model_kind, raw_val, int(getattr(model, "map_pad", 0)), policy,
                          source=f"validation split of {Path(data) / 'train' / 'good'} ({len(val_paths)} images)",
                          extra=extra)

    info = describe(model, model_kind, image_size, cfg)
    # the new bundle is built in a sibling folder and switched in whole: no file of a bundle that was at
    # --out before (graphs, quantized graphs, calibration history, Gaussian statistics, engines, eval
    # report) survives to mix with the new model, and a failure or interruption leaves that bundle as it was
    real.parent.mkdir(parents=True, exist_ok=True)
    stage = atomic.staging_beside(real)
    stage.mkdir()
    try:
        with atomic.folder_lock(stage, f"{stage}: taken by another edge-ad train tidying up beside {real.name}; "
                                "train again"):   # held to the end: tidy_out of another training leaves it alone
            if real.is_dir():  # the folder keeps its permissions
                os.chmod(stage, real.stat().st_mode & 0o7777)
            bundle = Bundle.create(stage, info)
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            bundle.add_file("checkpoint.pt", data=buf.getvalue(), save=False)
            # what a calibration on a device, without the training folder, recognises copies of them by
            bundle.add_file(TRAINING_IMAGES, data=training_images_bytes(seen_train.prints, seen_val.prints),
                            save=False)
            if gauss_stats is not None:
                gauss_stats.save(bundle.file(extra["gaussian"]))
                bundle.add_file(extra["gaussian"], save=False)
            bundle.manifest["versions"].update({"torch": torch.__version__})
            # what the images were (run, calibrate and eval warn about frames of another bit depth)
            bundle.manifest["data"] = seen_train.formats.record()
            bundle.manifest["training"] = {
                "data": str(Path(data).resolve()), "preset": preset, "seed": seed, "device": device,
                "image_size": image_size, "policy": policy, "val_fraction": val_fraction, "date": now_iso(), "edge_ad": __version__,
                "n_train": len(train_paths), "val_images": [str(Path(v).resolve()) for v in val_paths],
                "batch_size": p.get("batch_size"), "lr": p.get("lr"),
                "seconds": round(earlier + time.time() - t_start, 1), **train_info,
            }
            bundle.save_manifest()
            bundle.write_calibration(cal)
            if export:
                from ..compile.export import export_bundle

                export_bundle(bundle, module=model, shown_as=Path(out) / "model.onnx")
            # this run's training state (kept for --resume with more steps; not part of the bundle): only when
            # this run wrote it or resumed from it, never an older run's
            state = state_path if lc is not None and state_path.is_file() and (
                resume or train_info.get("steps", 0) > train_info.get("resumed_at", 0)) else None
            _switch_in(stage, real, state)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return Bundle.open(out)
