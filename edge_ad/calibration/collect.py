"""Collect calibration frames from a folder or a camera URI.

- A folder (a plain path or ``dir://folder``): ``n`` images spread evenly over the folder in name order
  (all of them when it holds fewer), so a folder captured over a shift is sampled over the whole shift
  (``every`` > 1 is refused: it means nothing here).
  An unreadable one (truncated, not an image) is skipped with a warning naming it, as ``edge-ad run``
  does, and not counted: the ``n`` are spread over the readable images; a folder where none is readable
  is an error.
- Any other source URI (``v4l2://``, ``csi://``, ``rtsp://``, ``file://``, ``synthetic://``; see
  :mod:`edge_ad.runtime.sources`): the next ``n`` frames, taking one frame in ``every`` (a moving line
  shows more variety that way), until the source ends or ``timeout_s`` passes.

**Training images are not calibration frames.** A model scores the images it was fitted on lower than
any unseen part (the Gaussian statistics contain them, a network was trained on them), so a threshold set
on them is far too low and the line calls every good part NG afterwards (a Gaussian bundle calibrated on
its own ``train/good``: 200 of 200 good parts NG). Given the ``bundle``, a folder's images that are the
bundle's training images (:func:`training_images`: the recorded training folder when it is on this
machine, minus its validation split, which the model never saw, and the fingerprints of the training
image files the bundle records, which a device without that folder goes by) are left out before the ``n``
are spread, with a warning, and the folder is refused (InputError) when fewer than ``min_frames`` others
remain.

The frames are those the line inspects: the line's ``source.roi`` and ``source.rotate`` (``roi``,
``rotate``) are applied to every frame of a source URI by the loop's own
:func:`~edge_ad.runtime.pipeline.apply_roi_rotate`, as ``edge-ad run`` and ``edge-ad capture --config`` apply
them. A folder's images are taken as the loop inspects them, already cropped and rotated (what
``edge-ad capture --config`` saves), unless the folder is the line's own source (``folder_roi``: ``run``
reads it and crops every image, skipping, with a warning naming it, one the ROI does not fit: so does the
calibration); with an ``roi`` an image of another folder whose size is not the crop's is refused, naming it:
it is not a frame the loop inspects.

Each frame is kept at the model's input size (``size_hw``), resized when it is collected by
:func:`~edge_ad.data.image.resize_rgb`, the resize :func:`~edge_ad.data.image.to_batch` does before
inference: the model sees the same pixels (the scores are identical), and 1000 frames of a 1080p camera
take 12 MB at 64 px instead of 6 GB. ``labels`` say what each frame is, for messages: the image file of a
folder, ``frame N`` of a source URI (with its capture time for a live camera).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..data.image import FINGERPRINT_HEX, IMAGE_EXTS, list_images, load_image, resize_rgb, spread
from ..errors import InputError, RuntimeFailure

log = logging.getLogger(__name__)


class CollectedFrames(list):
    """The frames :func:`collect_frames` returns (a list of RGB uint8 arrays) and ``labels``, one per frame:
    what to call it in a message (``/data/normals/0042.png``, ``frame 17``)."""

    def __init__(self, frames=(), labels=()):
        super().__init__(frames)
        self.labels: list[str] = list(labels)


def collect_frames(source: str | os.PathLike, n: int, *, every: int = 1, timeout_s: float | None = 600.0,
                   progress: bool = True, roi: Sequence[int] | None = None, rotate: int = 0,
                   folder_roi: bool = False, size_hw: tuple[int, int] | None = None, bundle=None,
                   min_frames: int = 1, notes: list[str] | None = None, open_timeout_s: float = 10.0,
                   rtsp_transport: str = "tcp") -> CollectedFrames:
    """Up to ``n`` RGB uint8 frames from ``source`` (a folder, ``dir://`` or any source URI), with their
    labels (module doc). ``roi`` / ``rotate``: the line's ``source.roi`` / ``source.rotate``, applied to the
    frames of a source URI, and of a folder when ``folder_roi`` (the folder is the line's source); for
    another folder an ``roi`` is the size its images must have. ``size_hw``: the model's input size (H, W),
    each frame is kept resized to it (None: as read). ``open_timeout_s`` / ``rtsp_transport``: the line's
    ``source.open_timeout_s`` / ``source.rtsp_transport``, with which a network camera is opened.

    ``bundle`` (the bundle being calibrated): a folder's images that are its training images are left
    out (:func:`leave_out_training_images`; the warning is appended to ``notes``, else logged), and the
    folder is refused when fewer than ``min_frames`` others remain. The check compares the image files
    themselves, before any image is read, cropped, rotated or resized."""
    from tqdm import tqdm

    n = int(n)
    if n < 1:
        raise InputError(f"--frames {n}: expected >= 1")
    if int(every) < 1:
        raise InputError(f"every {every}: expected >= 1")
    text = os.fspath(source)
    folder = _folder_of(text)
    if folder is not None and int(every) > 1:
        raise InputError(f"--every {every}: a folder ({text}) is sampled evenly over its images, not frame by "
                         "frame; --every is for cameras, videos and synthetic:// sources: leave it out")
    if folder is not None:
        paths = list_images(folder)
        if not paths:
            raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTS)})")   # the formats list_images reads
        note = ""
        if bundle is not None:   # on the files as they are, before any is read, cropped, rotated or resized
            paths, note = leave_out_training_images(bundle, folder, paths, min_frames)
        prepare = _preparer(roi, rotate, folder_roi, size_hw, expect=None if folder_roi else _crop_size(roi, rotate))
        loaded: dict[Path, np.ndarray] = {}
        bad: set[Path] = set()
        skipped: list[str] = []   # why each image was skipped (logged at once, summed up in ``notes``)
        misfit = 0
        bar = tqdm(total=min(n, len(paths)), desc="calibrate: reading", unit="frame", leave=False,
                   disable=None if progress else True)
        try:
            while True:   # spread over the readable ones: an unreadable pick is replaced, not lost
                picked = spread([p for p in paths if p not in bad], n)
                new = [p for p in picked if p not in loaded]
                if not new:
                    break
                for p in new:
                    try:
                        img = load_image(p)
                        bar.update(1)
                    except (InputError, OSError) as exc:
                        log.warning("skipped %s", exc)
                        skipped.append(str(exc))
                        bad.add(p)
                        continue
                    try:
                        loaded[p] = prepare(img, str(p))   # the full image goes now: one held at a time
                    except InputError as exc:
                        if not folder_roi:   # another folder: an image of another size is not one the line inspects
                            raise
                        # the line's own folder: 'run' skips an image its ROI does not fit, naming it; so does this
                        log.warning("skipped %s (edge-ad run skips it too)", exc)
                        skipped.append(str(exc))
                        misfit += 1
                        bad.add(p)
        finally:
            bar.close()
        if not picked:
            raise InputError(f"{folder}: none of the {len(paths)} images can be read"
                             + (f" or fits source.roi {list(roi)} ({misfit} do not)" if misfit else ""))
        # the count known now: the training images' note says how many frames the others gave, and the
        # images skipped are summed up where a remote caller reads them (the MQTT reply's warnings), not only
        # in the device's log
        if note:
            took = (f"the other {len(paths)}" if len(picked) == len(paths) else
                    f"{len(picked)} of the other {len(paths)}")
            _note(notes, f"{note}: left out, calibrating on {took}")
        if skipped and notes is not None:
            notes.append(skipped_note(folder, len(paths), skipped, roi if misfit else None))
        return CollectedFrames([loaded[p] for p in picked], [str(p) for p in picked])
    return _from_uri(text, n, int(every), timeout_s, progress, _preparer(roi, rotate, True, size_hw),
                     open_timeout_s, rtsp_transport)


SKIPPED_SHOWN = 5   # images named in the note on the skipped ones (each is named in the log)


def skipped_note(folder: Path, n_images: int, skipped: Sequence[str], roi: Sequence[int] | None = None) -> str:
    """The images of ``folder`` (of ``n_images``) skipped while collecting, as one warning: how many and why
    (``skipped``: each one's message, which names the file), at most :data:`SKIPPED_SHOWN` of them."""
    why = "unreadable" + (f", or source.roi {list(roi)} does not fit them" if roi else "")
    shown = "; ".join(skipped[:SKIPPED_SHOWN])
    more = f"; and {len(skipped) - SKIPPED_SHOWN} more (each named in the log)" if len(skipped) > SKIPPED_SHOWN else ""
    return (f"{len(skipped)} of the {n_images} images of {folder} skipped ({why}), as edge-ad run skips them: "
            f"{shown}{more}")


def _note(notes: list[str] | None, text: str) -> None:
    """A warning for the caller (``notes``: the CLI prints them, the MQTT reply carries them), else logged."""
    if notes is not None:
        notes.append(text)
    else:
        log.warning("%s", text)


def is_line_folder(source: str | os.PathLike, line_uri: str | None) -> bool:
    """Whether ``source`` is a folder the line itself reads (its ``source.uri`` is ``dir://`` of it): then
    ``run`` crops and rotates its images, and so must a calibration on it (``folder_roi``)."""
    if not line_uri or not str(line_uri).startswith("dir://"):
        return False
    try:
        here, there = _folder_of(os.fspath(source)), _folder_of(str(line_uri))
    except InputError:
        return False
    return here is not None and there is not None and here.resolve() == there.resolve()


def _crop_size(roi: Sequence[int] | None, rotate: int) -> tuple[int, int] | None:
    """(H, W) of the frames the loop inspects with ``roi`` and ``rotate`` (None without an ROI: unknown)."""
    if not roi:
        return None
    _, _, w, h = roi
    return (w, h) if rotate in (90, 270) else (h, w)


def _preparer(roi, rotate: int, crop: bool, size_hw, expect: tuple[int, int] | None = None):
    """``prepare(image, where)``: the frame as the loop inspects it (``crop``: through the loop's ROI and
    rotation), checked against ``expect`` (H, W), resized to ``size_hw``; ``where`` names it in errors."""
    from ..runtime.pipeline import apply_roi_rotate   # the loop's own step, not a copy of it

    def prepare(img: np.ndarray, where: str) -> np.ndarray:
        if crop and (roi or rotate):
            try:
                img = apply_roi_rotate(img, list(roi) if roi else None, int(rotate))
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
        if expect is not None and img.shape[:2] != tuple(expect):
            h, w = img.shape[:2]
            raise InputError(
                f"{where}: a {w}x{h} image; the line inspects {expect[1]}x{expect[0]} crops (source.roi {list(roi)}, "
                f"rotate {rotate}), and a folder is taken as the loop inspects its frames (as 'edge-ad capture "
                "--config' saves them). Whole camera frames? Crop them first: edge-ad capture --config LINE.toml "
                f"--source dir://{Path(where).parent} --out CROPPED --frames N; or calibrate on the camera itself")
        return img if size_hw is None else resize_rgb(img, tuple(size_hw))

    return prepare


def _folder_of(text: str) -> Path | None:
    if text.startswith("dir://"):
        from ..runtime.sources import parse_uri

        return Path(parse_uri(text).target)
    if "://" in text:
        return None
    p = Path(text)
    if not p.exists():
        raise InputError(f"--source {text}: no such folder (give a folder of images or a source URI such as "
                         "v4l2:///dev/video0, csi://0, rtsp://..., file://clip.mp4, dir://folder)")
    if not p.is_dir():
        raise InputError(f"--source {text}: not a folder (for a video give file://{text})")
    return p


def _from_uri(uri: str, n: int, every: int, timeout_s: float | None, progress: bool, prepare,
              open_timeout_s: float = 10.0, rtsp_transport: str = "tcp") -> CollectedFrames:
    from tqdm import tqdm

    from ..runtime.sources import SourceLost, check_startup, open_source, parse_uri

    spec = parse_uri(uri)
    check_startup(spec)   # a missing or undecodable video is bad input (exit 2), as for 'edge-ad run'
    src = open_source(spec, open_timeout_s, rtsp_transport)
    frames = CollectedFrames()
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    seen = 0
    try:
        src.open()
        with tqdm(total=n, desc="calibrate: capturing", unit="frame", leave=False,
                  disable=None if progress else True) as bar:
            while len(frames) < n:
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeFailure(f"{spec.safe_uri}: {len(frames)} of {n} frames within {timeout_s:g} s")
                f = src.read()
                if f is None:
                    if spec.live:
                        continue  # a live camera with no new frame yet
                    break
                seen += 1
                if (seen - 1) % every == 0:
                    label = f"frame {f.index}" + (f" ({_stamp(time.time())})" if spec.live else "")
                    frames.append(prepare(f.image, f"{spec.safe_uri} {label}"))
                    frames.labels.append(label)
                    bar.update(1)
    except SourceLost as exc:
        raise RuntimeFailure(f"calibration source failed: {exc}") from exc
    finally:
        src.close()
    if not frames:
        raise InputError(f"{spec.safe_uri}: delivered no frames")
    return frames


def _stamp(t: float) -> str:
    """A capture time as the result records write ``ts`` (UTC, RFC 3339, milliseconds)."""
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------- training images
@dataclass(frozen=True)
class TrainingImages:
    """The images a bundle's model was fitted on, as far as this machine can tell: the recorded training
    folder's files when it is here, and the fingerprints the bundle records
    (:data:`~edge_ad.bundle.TRAINING_IMAGES`)."""

    folder: Path | None       # the recorded training data's normal images (DATA/train/good), when on this machine
    files: tuple[Path, ...]   # its images but the validation split
    n_val: int                # validation split images (never fitted on: fine to calibrate on)
    n_train: int | None       # training images the manifest records (training.n_train)
    prints: frozenset[tuple[int, str]] = frozenset()   # (bytes, fingerprint) of the training image files
    recorded: Path | None = None   # the bundle's training_images.json, when it has one

    @property
    def described(self) -> str:
        """Where the training images are known from, for messages."""
        if self.folder is not None:
            return f"the recorded training data {self.folder}, the same files or the same bytes"
        return f"the same bytes as training images whose fingerprints {self.recorded} records"

    def matches(self, paths: Iterable[Path]) -> list[Path]:
        """The ``paths`` that are training images: the same file (device and inode, so also through a link,
        a bind mount or another spelling of the path) or the same bytes (sha256 of a training file here, or
        a fingerprint the bundle records; only files of a size some training image has are read, so a
        folder of other images costs a ``stat`` each)."""
        from ..atomic import sha256_file

        ids: set[tuple[int, int]] = set()
        by_size: dict[int, list[Path]] = {}
        for t in self.files:
            try:
                st = t.stat()
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
            by_size.setdefault(st.st_size, []).append(t)
        print_sizes = {n for n, _ in self.prints}
        digests: dict[int, set[str]] = {}
        out = []
        for p in paths:
            try:
                st = p.stat()
                if (st.st_dev, st.st_ino) in ids:
                    out.append(p)
                    continue
                if st.st_size not in by_size and st.st_size not in print_sizes:
                    continue
                if st.st_size not in digests:
                    digests[st.st_size] = set()
                    for t in by_size.get(st.st_size, ()):
                        try:
                            digests[st.st_size].add(sha256_file(t))
                        except OSError:
                            pass
                digest = sha256_file(p)
                if digest in digests[st.st_size] or (st.st_size, digest[:FINGERPRINT_HEX]) in self.prints:
                    out.append(p)
            except OSError:
                continue   # unreadable: the loader skips it with its own warning
        return out


def training_images(bundle) -> TrainingImages | None:
    """The images ``bundle``'s model was fitted on: the normal images of the training data folder its
    manifest records (``training.data``, ``train/good``) but the validation split (``training.val_images``:
    held out from the fit, the training calibrated on them), when that folder is on this machine, and the
    fingerprints of the training image files the bundle records (``training_images.json``, written by
    ``edge-ad train``: a bundle trained elsewhere recognises copies of its training images by them). None
    when neither is here (a bundle of an older edge-ad trained elsewhere): nothing to compare with.
    Images added to the folder since the training are counted as training images (the manifest records
    how many there were, not which)."""
    from ..bundle import TRAINING_IMAGES
    from ..data.mvtec import MVTecCategory

    training = bundle.manifest.get("training") or {}
    recorded = bundle.training_fingerprints()   # None: an older bundle
    data = training.get("data")
    paths: list[Path] | None = None
    if data and Path(data).is_dir():
        try:
            paths = MVTecCategory(data).train_paths()
        except (InputError, OSError):
            pass
    if paths is None and recorded is None:
        return None
    n_train = training.get("n_train")
    n_train = int(n_train) if isinstance(n_train, int) else None
    prints = recorded["train"] if recorded is not None else frozenset()
    where = bundle.file(TRAINING_IMAGES) if recorded is not None else None
    if paths is None:   # the folder is not here: the fingerprints alone
        return TrainingImages(folder=None, files=(), n_val=len(recorded["val"]), n_train=n_train, prints=prints,
                              recorded=where)
    val = {os.path.realpath(v) for v in training.get("val_images") or []}
    files = tuple(p for p in paths if os.path.realpath(p) not in val)
    return TrainingImages(folder=Path(data) / "train" / "good", files=files, n_val=len(paths) - len(files),
                          n_train=n_train, prints=prints, recorded=where)


def leave_out_training_images(bundle, folder: Path, paths: list[Path],
                              min_frames: int = 1) -> tuple[list[Path], str]:
    """``paths`` (the images of calibration folder ``folder``) without the bundle's training images, and
    a warning saying how many were left out and why ("" when none; :func:`collect_frames` adds how many
    frames the others gave). Raises InputError when fewer than
    ``min_frames`` remain: the folder is then (mostly) the training data, and a calibration on it would
    call every unseen good part NG."""
    train = training_images(bundle)
    if train is None:
        return paths, ""
    hits = set(train.matches(paths))
    if not hits:
        return paths, ""
    rest = [p for p in paths if p not in hits]
    n_recorded = "" if train.folder is None or train.n_train in (None, len(train.files)) else (
        f"; it holds {len(train.files)} besides the validation split, the training recorded {train.n_train}: "
        "images added since count as training images too")
    why = (f"{len(hits)} of the {len(paths)} images of {folder} are images {bundle.path} was trained on "
           f"({train.described}{n_recorded}); "
           "a model scores its own training images far lower than any new part, so a threshold set on them "
           "would call good parts NG")
    need = max(int(min_frames), 1)
    if len(rest) < need:
        held = (f"{train.n_val} images of {train.folder}" if train.folder is not None else
                f"{train.n_val} images, on the machine that trained it")
        val = (f", or on its validation split ({held} the training held out, listed as training.val_images in "
               "manifest.json)" if train.n_val >= need else "")
        left = f"the {len(rest)} other images are" if len(rest) != 1 else "the 1 other image is"
        raise InputError(f"{why}; {left} fewer than the {need} a calibration needs: "
                         "calibrate on images of good parts the model has not seen (capture new ones, e.g. "
                         "'edge-ad capture --config LINE.toml --source CAMERA --out DIR': --config saves them "
                         "cropped and turned as the line inspects them, which a line with source.roi or rotate "
                         f"needs){val}; the calibration in force is unchanged")
    return rest, why
