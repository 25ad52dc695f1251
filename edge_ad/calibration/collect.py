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
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..data.image import list_images, load_image, spread
from ..errors import InputError, RuntimeFailure

log = logging.getLogger(__name__)


def collect_frames(source: str | os.PathLike, n: int, *, every: int = 1, timeout_s: float | None = 600.0,
                   progress: bool = True) -> list[np.ndarray]:
    """Up to ``n`` RGB uint8 frames from ``source`` (a folder, ``dir://`` or any source URI)."""
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
            raise InputError(f"{folder}: no images ({', '.join(('.png', '.jpg', '.bmp', '.tif'))})")
        loaded: dict[Path, np.ndarray] = {}
        bad: set[Path] = set()
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
                        loaded[p] = load_image(p)
                        bar.update(1)
                    except (InputError, OSError) as exc:
                        log.warning("skipped %s", exc)
                        bad.add(p)
        finally:
            bar.close()
        if not picked:
            raise InputError(f"{folder}: none of the {len(paths)} images can be read")
        return [loaded[p] for p in picked]
    return _from_uri(text, n, int(every), timeout_s, progress)


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


def _from_uri(uri: str, n: int, every: int, timeout_s: float | None, progress: bool) -> list[np.ndarray]:
    from tqdm import tqdm

    from ..runtime.sources import SourceLost, check_startup, open_source, parse_uri

    spec = parse_uri(uri)
    check_startup(spec)   # a missing or undecodable video is bad input (exit 2), as for 'edge-ad run'
    src = open_source(spec)
    frames: list[np.ndarray] = []
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
                    frames.append(f.image)
                    bar.update(1)
    except SourceLost as exc:
        raise RuntimeFailure(f"calibration source failed: {exc}") from exc
    finally:
        src.close()
    if not frames:
        raise InputError(f"{spec.safe_uri}: delivered no frames")
    return frames
