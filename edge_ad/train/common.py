"""What every training loop shares: images in memory, seeding, augmentation, checkpoints, progress."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import numbers
import os
import random
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import atomic
from ..data.image import (IMAGE_EXTS, PixelFormats, fingerprint, list_images, load_image, read_image, resize_rgb,
                          to_rgb8)
from ..errors import InputError
from ..models import check_image_size, load_weights

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def fast_convolutions(device: str) -> None:
    """On CUDA, let cuDNN pick the fastest convolution algorithms once (training shapes are fixed)."""
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True


def check_run(device: str, max_minutes: float | None, steps: int | None = None, batch_size: int | None = None,
              checkpoint_every: int | None = None, seed: int = 0, image_size: int | None = None,
              lr: float | None = None) -> None:
    """The options every training run shares, checked before any image is loaded (``None``: the default)."""
    if image_size is not None:
        check_image_size(image_size)
    check_device(device)
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every)):
        if value is not None and not (isinstance(value, numbers.Integral) and value >= 1):
            raise InputError(f"{name} {value}: expected a positive whole number")
    if not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**64):  # torch.manual_seed's range
        raise InputError(f"--seed {seed}: expected a whole number from 0 to 2**64 - 1")
    if max_minutes is not None and not max_minutes > 0:
        raise InputError(f"--max-minutes {max_minutes}: expected a positive number of minutes")
    if lr is not None and not (isinstance(lr, numbers.Real) and 0 < lr < math.inf):
        raise InputError(f"--lr {lr}: expected a positive finite number (a learning rate, e.g. 1e-4)")


def check_device(device: str, flag: str = "--device") -> None:
    """A torch training device: cpu, cuda or cuda:N, and CUDA only where torch has it."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise InputError(f"{flag} {device}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{flag} {device}: no CUDA device is available to torch here")


class ImagesSeen:
    """What a training learns of its images while :func:`load_images` reads them: ``prints``, each file's
    ``[bytes, fingerprint]`` (:func:`~edge_ad.data.image.fingerprint`), in the order read, and ``formats``,
    their bit depths and channel counts (shared by the training and validation images' ``ImagesSeen``)."""

    def __init__(self, formats: PixelFormats | None = None):
        self.prints: list[list] = []
        self.formats = formats if formats is not None else PixelFormats()

    def add(self, data: np.ndarray, img: np.ndarray) -> None:
        """One image file: its bytes ``data`` and ``img`` as decoded (:func:`~edge_ad.data.image.read_image`)."""
        self.prints.append([int(data.size), fingerprint(data)])
        self.formats.add(img)


class _ProgressStream:
    """The progress bar's stream (stderr): once a write or flush fails (the pipe's reader gone, as with
    ``edge-ad train ... 2>&1 | head -1``; a closed stream) the progress output is dropped and the training
    goes on, saving its checkpoints and result as usual; it stopped there, nothing saved.

    Off a terminal each state of the bar is a line of its own: tqdm starts each with a carriage return, which
    a log (journald, CI, a file read with grep or less) shows as one ever longer line."""

    def __init__(self, stream):
        self._stream = stream
        self._broken = False
        isatty = getattr(stream, "isatty", None)
        self._lines = not (isatty is not None and isatty())

    def _line(self, text: str) -> str:
        if text.startswith("\r"):           # a new state of the bar (or a blank one that clears it)
            text = text.strip("\r").rstrip()
            return text + "\n" if text else ""
        return "" if text == "\n" else text   # the newline tqdm ends the bar with: every line has one already

    def _guard(self, name, *args):
        if self._broken:
            return None
        try:
            return getattr(self._stream, name)(*args)
        except (OSError, ValueError) as exc:  # BrokenPipeError, EIO, "I/O operation on closed file"
            self._broken = True
            log.warning("progress output dropped, training goes on: stderr cannot be written (%s)", exc)
            return None

    def write(self, text):
        if self._lines:
            text = self._line(text)
            if not text:
                return 0
        return self._guard("write", text)

    def flush(self):
        return self._guard("flush")

    def __getattr__(self, name):  # encoding, fileno, isatty: the stream's
        return getattr(self._stream, name)


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """The training's tqdm progress bar on stderr: on a terminal redrawn ten times a second; in a log (CI,
    journald, a file) a line at the start, one about every 30 s (tqdm's monitor thread wakes every 10 s: a
    stalled bar's line comes 30 to 40 s after the last one) and one at the end (once: not again when the last
    step's line was that end already). A postfix is set with
    ``refresh=False`` (a refresh would print a line in a log at once); a stderr that cannot be written any more
    drops it and the work goes on (:class:`_ProgressStream`). For the loading of the images, the training steps,
    EfficientAD's teacher normalization, the Gaussian model's feature extraction and fit, and the validation
    pass."""
    from tqdm import tqdm

    class Bar(tqdm):
        """Off a terminal, the end is one line: tqdm's close() printed the final state again after the last
        update had printed it (the 100% line twice); it is now left out when nothing changed since that line."""

        shown = None   # (count, postfix) of the last line printed

        def display(self, msg=None, pos=None):
            if msg is None:
                self.shown = (self.n, self.postfix)
            return super().display(msg, pos)

        def close(self):
            if not tty and not getattr(self, "disable", True) and self.shown == (self.n, self.postfix):
                self.leave = False   # its clearing writes nothing in a log (_ProgressStream)
            super().close()

    tty = sys.stderr.isatty()
    return Bar(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
               mininterval=0.1 if tty else 30.0, maxinterval=10.0 if tty else 30.0, file=_ProgressStream(sys.stderr))


def load_images(paths: Sequence[Path], size: int, desc: str = "loading images",
                seen: ImagesSeen | None = None) -> torch.Tensor:
    """Images resized to ``size`` as a uint8 tensor ``[N, 3, size, size]`` (kept in memory); each file is
    also added to ``seen`` (its bytes are hashed as they are read: no second read). A progress bar named
    ``desc`` (:func:`progress_bar`: also lines in a log)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with progress_bar(len(paths), desc, "img") as bar:
        for i, p in enumerate(paths):
            img, data = read_image(p)
            if seen is not None:
                seen.add(data, img)
            out[i] = torch.from_numpy(resize_rgb(to_rgb8(img, where=str(p)), (size, size)).transpose(2, 0, 1).copy())
            bar.update(1)
    return out


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator, one_of: bool = False) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of +-``strength`` on 0..255 images, with torchvision's
    ``ColorJitter`` formulas (contrast blends with the grey mean, saturation with the grey image, each
    result clamped to 0..255).

    ``one_of``: EfficientAD's I' (Batzner et al., Algorithm 1) picks ONE of the three at random per image;
    otherwise all three are applied in turn (used for distillation). Draws come from the CPU generator
    ``gen`` (the same on every device) and are moved to ``x``'s device.
    """
    b = x.shape[0]

    def factor():
        return (1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * strength).to(x.device)

    def grey(v):
        return 0.299 * v[:, 0:1] + 0.587 * v[:, 1:2] + 0.114 * v[:, 2:3]

    def brightness(v, f):
        return (v * f).clamp(0, 255)

    def contrast(v, f):
        m = grey(v).mean(dim=(1, 2, 3), keepdim=True)
        return ((v - m) * f + m).clamp(0, 255)

    def saturation(v, f):
        g = grey(v)
        return ((v - g) * f + g).clamp(0, 255)

    ops = (brightness, contrast, saturation)
    if not one_of:
        for op in ops:
            x = op(x, factor())
        return x
    f = factor()
    pick = torch.randint(0, len(ops), (b,), generator=gen).to(x.device).view(b, 1, 1, 1)
    out = torch.empty_like(x, dtype=torch.result_type(x, f))
    for i, op in enumerate(ops):
        out = torch.where(pick == i, op(x, f), out)
    return out


def image_folder(folder: str | os.PathLike, option: str = "--data") -> Path:
    """``folder``, or its ``train/good`` when it holds no images itself but that does (an MVTec category),
    said in a log line naming ``option``."""
    good = Path(folder) / "train" / "good"
    if not list_images(folder) and good.is_dir() and list_images(good):
        log.warning("%s %s holds no images itself: using its train/good (%d images)", option, folder,
                    len(list_images(good)))
        return good
    return Path(folder)


def penalty_folder(folder: str | os.PathLike) -> Path:
    """``--penalty-dir``'s images: the folder's, else its ``train/good`` (as distill-teacher's ``--data``);
    an :class:`InputError` naming it when neither has any."""
    d = image_folder(folder, "--penalty-dir")
    if not list_images(d):
        raise InputError(f"--penalty-dir {folder}: no images ({', '.join(IMAGE_EXTS)}) in it nor in its "
                         "train/good; expected a folder of generic images for the penalty term")
    return d


def penalty_images(folder: str | os.PathLike | None, size: int, limit: int = 2000) -> torch.Tensor | None:
    """Generic images for EfficientAD's penalty term (:func:`penalty_folder`): grayscale with p=0.3, resized
    to 2x, centre crop."""
    if folder is None:
        return None
    paths = list_images(penalty_folder(folder))[:limit]
    rng = np.random.default_rng(0)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        img = resize_rgb(load_image(p), (2 * size, 2 * size))
        c = size // 2
        img = img[c:c + size, c:c + size]
        if rng.random() < 0.3:
            g = img.mean(axis=2, keepdims=True).astype(np.uint8)
            img = np.repeat(g, 3, axis=2)
        out[i] = torch.from_numpy(img.transpose(2, 0, 1).copy())
    return out


def file_list_id(names: Sequence[str]) -> str:
    """A short, comparable description of a list of image file names: their count and a sha256 of the
    names (give names relative to their folder, so a moved folder keeps its id). Contents are not read."""
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{len(names)} files (names sha256 {digest[:16]})"


def save_checkpoint(path: Path, model, optimizer, step: int, gen: torch.Generator, run: dict | None = None,
                    extra: dict | None = None, seconds: float = 0.0) -> None:
    """The training state: weights, optimizer, RNG, ``run`` (what defines the run, checked by
    :func:`resume_state`), ``extra`` (tensors the run needs back at resume, e.g. target statistics) and
    ``seconds`` (the time the run has taken so far, the parts it resumed included)."""
    buf = io.BytesIO()
    torch.save({"step": step, "seconds": float(seconds), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state()},
                "run": dict(run or {}), "extra": dict(extra or {})}, buf)
    atomic.write_bytes(path, buf.getvalue())


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def resume_state(path: Path, run: dict) -> dict:
    """The checkpoint ``path`` for ``--resume``, refused (InputError) when it is missing, unreadable, from
    an edge-ad that did not record its run, or written by a run whose definition differs from ``run``
    (``{option: value}``: what must not change across a resume; the step count, time budget, checkpoint
    interval and device are not in it). Each differing option is named with both values."""
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from (--resume continues the run that wrote this "
                         "file); run without --resume to start from step 0")
    st = load_weights(path, "training checkpoint")
    old = st.get("run")
    if not isinstance(old, dict) or not old:
        raise InputError(f"{path}: this checkpoint does not record the options of the run that wrote it "
                         "(written by an earlier edge-ad), so --resume cannot check that this run continues "
                         "it; run without --resume to start from step 0 (the checkpoint is overwritten)")
    missing = object()
    diff = [f"  {key}: checkpoint {_shown(old.get(key))}; this run {_shown(run.get(key))}"
            for key in list(run) + [k for k in old if k not in run]
            if old.get(key, missing) != run.get(key, missing)]
    if diff:
        free = "--steps, --max-minutes, --checkpoint-every, --device" + (
            " and --policy" if run.get("command") == "edge-ad train" else "")
        raise InputError(f"{path}: --resume refused: this run is not the one that wrote the checkpoint:\n"
                         + "\n".join(diff) + f"\nRerun with the checkpoint's options to continue it ({free} "
                         "may change), or run without --resume to start from step 0 (the checkpoint is "
                         "overwritten)")
    return st


def load_checkpoint(path: Path, st: dict, model, optimizer, gen: torch.Generator) -> int:
    """Restore the weights, optimizer and RNG from ``st``, the checkpoint :func:`resume_state` read from
    ``path`` and accepted, and return the step to continue from."""
    try:
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"]["torch"])
        gen.set_state(st["rng"]["gen"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: checkpoint does not fit this model/run ({str(exc)[:200]})") from exc
    return int(st["step"])


def sample_batch(images: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch (float 0..255) drawn with ``gen`` (a CPU generator) from ``images``, on the images'
    device. The generator's state is checkpointed, so a resumed run draws the same batches as an
    uninterrupted one, on any device."""
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen).to(images.device)
    return images[idx].float()


def planted_anomalies(x: torch.Tensor, gen: torch.Generator, others: torch.Tensor | None = None,
                      p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic anomalies for self-supervised training: for a fraction ``p`` of the images, paste a
    random rectangle of noise, a shifted patch of another image, or a dark/bright blob.
    Returns (corrupted, mask [B,1,H,W])."""
    b, _, h, w = x.shape
    out = x.clone()
    mask = torch.zeros((b, 1, h, w))
    for i in range(b):
        if torch.rand(1, generator=gen).item() > p:
            continue
        ph = int(torch.randint(h // 16, h // 4, (1,), generator=gen))
        pw = int(torch.randint(w // 16, w // 4, (1,), generator=gen))
        y0 = int(torch.randint(0, h - ph, (1,), generator=gen))
        x0 = int(torch.randint(0, w - pw, (1,), generator=gen))
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        if kind == 0:
            patch = torch.rand((3, ph, pw), generator=gen) * 255
        elif kind == 1 and others is not None:
            j = int(torch.randint(0, others.shape[0], (1,), generator=gen))
            sy = int(torch.randint(0, h - ph, (1,), generator=gen))
            sx = int(torch.randint(0, w - pw, (1,), generator=gen))
            patch = others[j, :, sy:sy + ph, sx:sx + pw].float().flip(-1)
        else:
            shift = (torch.rand(1, generator=gen).item() - 0.5) * 200
            patch = (out[i, :, y0:y0 + ph, x0:x0 + pw] + shift).clamp(0, 255)
        yy = torch.linspace(-1, 1, ph).view(-1, 1)
        xx = torch.linspace(-1, 1, pw).view(1, -1)
        ell = ((yy ** 2 + xx ** 2) <= 1).float()  # elliptic blob, not only rectangles
        region = out[i, :, y0:y0 + ph, x0:x0 + pw]
        out[i, :, y0:y0 + ph, x0:x0 + pw] = region * (1 - ell) + patch * ell
        mask[i, 0, y0:y0 + ph, x0:x0 + pw] = ell
    return out, mask


def smooth_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(mask, (size, size))
