"""Image decoding and the one preprocessing step every backend shares.

Frames are RGB ``uint8`` arrays ``[H, W, 3]``. The model input is ``float32 [B, 3, H, W]`` in 0..255
(RGB); normalization (ImageNet mean/std or the backbone's own scaling) lives inside each graph.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

# The formats every reader of images (train, eval, run dir://, calibrate, golden sets, the guard) lists and
# decodes, all through load_image. WebP and the PNM family (PBM/PGM/PPM) are decoded by OpenCV itself (its
# bundled libwebp, its own PNM reader), so a Jetson's JetPack OpenCV reads them as a workstation's pip
# wheel does. Left out on purpose: GIF (only OpenCV >= 4.11 reads it), JPEG 2000 (a build option that
# differs between builds), EXR / HDR (float formats, EXR off by default at run time).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm", ".pnm")
# Files of an image folder skipped without a word: the operating system's own (a folder copied from Windows
# or a Mac). Hidden files (names starting with ".", e.g. macOS "._NAME.png" AppleDouble twins) are too.
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
# warnings given once: (folder, extensions) of files not read; folders of 16-bit images using few bits
_warned: set[tuple[str, tuple[str, ...]]] = set()
_low_bits_warned: set[str] = set()
_warned_lock = threading.Lock()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H, W, 3]`` (grayscale, 16-bit and float are converted).

    The EXIF orientation of a JPEG or TIFF is applied, so a camera or phone picture stored sideways is
    seen upright, as every image viewer shows it (IMREAD_UNCHANGED would ignore it)."""
    return to_rgb8(read_image(path)[0], where=str(path))


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(image, data)``: an image file decoded as it is stored (grey, BGR or BGRA; 8-bit, 16-bit or float;
    the EXIF orientation applied), before :func:`to_rgb8`, and the file's bytes (a uint8 array), for a
    reader that also fingerprints the file (:func:`fingerprint`). :func:`load_image` is this plus
    :func:`to_rgb8`."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {_not_a_file(p)}")
    buf = np.fromfile(str(p), dtype=np.uint8)
    img = decode(p, buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise InputError(f"{p}: not a readable image (expected PNG, JPEG, BMP, TIFF, WebP or PBM/PGM/PPM)")
    return img, buf


def _not_a_file(p: Path) -> str:
    """Why ``p`` is no image file to read: a symbolic link whose target is gone or that loops (named with where
    it points), else not found."""
    if p.is_symlink():
        target = "?"
        try:
            target = os.readlink(p)
            os.stat(p)
        except OSError as exc:   # ENOENT from readlink too: the link went meanwhile
            if exc.errno == errno.ELOOP:
                return f"a symbolic link that loops (to {target}); expected an image file"
            if exc.errno == errno.ENOENT:
                return f"a broken symbolic link (to {target}, which does not exist)"
    return "image not found"


# The most pixels an image may have to be decoded (16384 x 16384, 268 megapixels). Decoding one of 8-bit
# colour takes about 1.6 GB of memory (the decoded pixels and their RGB copy), twice that at 16 bits, and a
# run holds a few frames at once (the frame queue, the batch): a Jetson shares its 8 GB between CPU and
# GPU. The model sees every image resized to its input size (4096 px at most) anyway. OpenCV's own limit
# (2^30 pixels) raised a cv2.error, a traceback, on a 21-byte file whose header claims more.
MAX_IMAGE_PIXELS = 1 << 28


def decode(p: Path, buf: np.ndarray, flags: int, what: str = "image") -> np.ndarray | None:
    """``cv2.imdecode`` of the bytes ``buf`` of the file ``p`` (None where OpenCV cannot read them), its size
    first checked against :data:`MAX_IMAGE_PIXELS` from its header (:func:`header_size`), or for a format
    whose header that does not read, once decoded. An image over it, and an error of OpenCV's
    (its own pixel limit, a damaged file it gives up on), are an :class:`InputError` naming the file
    (``what``: ``image``, ``mask``), so a folder's reader skips it or stops naming it as it does an
    unreadable file."""
    import cv2

    if not buf.size:
        return None
    size = header_size(buf)
    if size is not None:
        _check_pixels(p, what, size, "as its header says")
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        reason = f"OpenCV: {getattr(exc, 'err', None) or str(exc).strip() or type(exc).__name__}"
        if "CV_IO_MAX_IMAGE" in reason:   # a header header_size does not read (BigTIFF, PAM)
            reason = (f"its header declares more pixels than OpenCV decodes (2^30, or a side over 2^20); "
                      f"edge-ad decodes {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels at most")
        raise InputError(f"{p}: not a readable {what}: {reason}") from None
    if size is None and img is not None:
        _check_pixels(p, what, (img.shape[1], img.shape[0]), "decoded")
    return img


def _check_pixels(p: Path, what: str, size: tuple[int, int], how: str) -> None:
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{p}: {what} of {w} x {h} pixels ({w * h / 1e6:.0f} megapixels, {how}); edge-ad decodes "
                         f"images of at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels ({MAX_IMAGE_PIXELS} pixels, "
                         "e.g. 16384 x 16384): scale it down (the model sees it resized to its input size anyway)")


def header_size(buf: bytes | np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` an image file's header declares (its bytes, as :func:`read_image` reads them), for
    PNG, JPEG, BMP, TIFF (its first page, as OpenCV reads it), WebP and PBM/PGM/PPM; None for another
    format or a header cut short (OpenCV then says what it makes of the file). Nothing is decoded."""
    b = bytes(buf[:1 << 16])   # every header here but a JPEG's, which may follow large metadata
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
            return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
        if b[:2] == b"\xff\xd8":
            return _jpeg_size(buf)
        if b[:2] == b"BM" and len(b) >= 26:
            if int.from_bytes(b[14:18], "little") == 12:   # OS/2 BITMAPCOREHEADER: 16-bit sides
                return int.from_bytes(b[18:20], "little"), int.from_bytes(b[20:22], "little")
            return (abs(int.from_bytes(b[18:22], "little", signed=True)),
                    abs(int.from_bytes(b[22:26], "little", signed=True)))   # negative height: top-down rows
        if b[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(b, "little" if b[:2] == b"II" else "big")
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            return _webp_size(b)
        if len(b) > 2 and b[0:1] == b"P" and b[1:2] in b"123456" and b[2:3].isspace():
            return _pnm_size(b)
    except (IndexError, ValueError):
        return None
    return None


def _jpeg_size(b: bytes | np.ndarray) -> tuple[int, int] | None:
    """The frame header's (SOF0..SOF15) sides of a JPEG, its segments walked from the start (only their
    lengths read); None where the scan or the end comes first."""
    def word(i: int) -> int:
        return int.from_bytes(bytes(b[i:i + 2]), "big")

    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = int(b[i + 1])
        if marker == 0xFF:   # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:   # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):   # the end, the scan
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (word(i + 7), word(i + 5)) if i + 9 <= len(b) else None
        i += 2 + word(i + 2)
    return None


def _tiff_size(b: bytes, order: str) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of a TIFF's first directory (SHORT or LONG values)."""
    ifd = int.from_bytes(b[4:8], order)
    n = int.from_bytes(b[ifd:ifd + 2], order)
    sides: dict[int, int] = {}
    for k in range(n):
        e = ifd + 2 + 12 * k
        tag, kind = int.from_bytes(b[e:e + 2], order), int.from_bytes(b[e + 2:e + 4], order)
        if tag in (256, 257) and kind in (3, 4):
            sides[tag] = int.from_bytes(b[e + 8:e + (10 if kind == 3 else 12)], order)
    return (sides[256], sides[257]) if len(sides) == 2 else None


def _webp_size(b: bytes) -> tuple[int, int] | None:
    """The canvas of an extended WebP (VP8X), else the lossy (VP8) or lossless (VP8L) frame's sides."""
    chunk = b[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    if chunk == b"VP8L":
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        return int.from_bytes(b[26:28], "little") & 0x3FFF, int.from_bytes(b[28:30], "little") & 0x3FFF
    return None


def _pnm_size(b: bytes) -> tuple[int, int] | None:
    """Width and height of a PBM/PGM/PPM header (``P5 640 480 255``; ``#`` comments to the line's end)."""
    words: list[bytes] = []
    for line in b[2:].split(b"\n"):
        words += line.split(b"#", 1)[0].split()
        if len(words) >= 2:
            return int(words[0]), int(words[1])
    return None


FINGERPRINT_HEX = 16   # hex digits of a file's sha256 kept as its fingerprint (64 bits)


def fingerprint(data: bytes | np.ndarray) -> str:
    """An image file's content fingerprint: the first :data:`FINGERPRINT_HEX` hex digits of the sha256 of
    its bytes (``data``, as :func:`read_image` gives them). The bytes, not the decoded pixels: a copy of
    the file (cp, scp, rsync, a USB stick, a tar) keeps them, and no decoding is needed to compare, while
    the pixels a JPEG decodes to may differ between the libjpeg of a workstation and of a Jetson; a file
    re-encoded (another format, quality or metadata) is another file."""
    import hashlib

    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_HEX]


def to_rgb8(img: np.ndarray, where: str = "image", bgr: bool = True) -> np.ndarray:
    """Any decoded image (gray, BGR, BGRA, 16-bit, float) -> RGB uint8 ``[H, W, 3]``.

    16-bit images are taken as full-range 16-bit data: scaled by 1/256, the same for every image, so a
    score never depends on an image's content range. 10- to 14-bit camera data stored in 16 bits (a Mono12
    PNG holds 0..4095) therefore reads dark: :func:`_warn_low_bits` says so. Float images (e.g. 32-bit
    TIFF) are taken as 0..1 when no value exceeds 1, else as 0..255.

    While a command inspects with a bundle that records the bit depth its model was trained on
    (:func:`trained_format`), an image of another bit depth is warned about (:class:`TrainedFormat`)."""
    import cv2

    brightest = int(img.max()) if img.dtype == np.uint16 and img.size else None
    expected = _expected
    if expected is not None:
        expected.check(img, brightest, where)
    if img.dtype == np.uint16:
        if brightest is not None:
            _warn_low_bits(brightest, where)
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        if not np.isfinite(img).all():
            raise InputError(f"{where}: float image holds NaN or infinite pixels")
        scale = 255.0 if img.size and float(img.max()) <= 1.0 else 1.0
        img = np.clip(np.rint(img * scale), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    raise InputError(f"{where}: unsupported image shape {img.shape}")


LOW_BITS = 14   # a 16-bit image whose values all fit in this many bits is warned about (0..63 of 255 or less)


def fits_in(brightest: int) -> int:
    """The bits a 16-bit image whose brightest value is ``brightest`` fits in: 8, 10, 12, 14 or 16."""
    return next((d for d in (8, 10, 12, 14) if brightest < 1 << d), 16)


def pixel_format(img: np.ndarray, brightest: int | None = None) -> tuple[int, int, int | None]:
    """``(bit depth, channels, bits)`` of an image as decoded (:func:`read_image`, or a camera frame before
    :func:`to_rgb8`): the bits of a sample as stored (8, 16; 32 for float), the channels (1 grey, 2 grey and
    alpha, 3 colour, 4 colour and alpha), and for a 16-bit image the bits its brightest value
    (``brightest``, computed when not given) fits in (:func:`fits_in`; None for other depths)."""
    depth = 32 if img.dtype.kind == "f" else 8 * img.dtype.itemsize
    channels = 1 if img.ndim == 2 else int(img.shape[2])
    bits = None
    if img.dtype == np.uint16:
        if brightest is None and img.size:
            brightest = int(img.max())
        bits = fits_in(brightest) if brightest is not None else 16
    return depth, channels, bits


_CHANNELS = {1: "grey", 2: "grey+alpha", 3: "colour", 4: "colour+alpha"}


def _depth_text(depth: int, bits: int | None = None) -> str:
    """``8-bit``, ``16-bit``, ``16-bit (values within 12 bits)`` (16-bit using only its low bits), ``32-bit float``."""
    if depth == 32:
        return "32-bit float"
    if depth == 16 and bits is not None and bits <= LOW_BITS:
        return f"16-bit (values within {bits} bits)"
    return f"{depth}-bit"


def _listed(value) -> list:
    """A record's field, one value or a list of them (mixed images), as a list."""
    return list(value) if isinstance(value, list) else [] if value is None else [value]


class PixelFormats:
    """The bit depths and channel counts of a set of images (a training's), added one by one as they are
    read, and :meth:`record`, what the manifest's ``data`` records of them."""

    def __init__(self):
        self.depths: set[int] = set()
        self.channels: set[int] = set()
        self.bits16 = 0   # the most bits a 16-bit image's brightest value fits in

    def add(self, img: np.ndarray) -> None:
        depth, channels, bits = pixel_format(img)
        self.depths.add(depth)
        self.channels.add(channels)
        if bits is not None:
            self.bits16 = max(self.bits16, bits)

    def record(self) -> dict:
        """``{"bit_depth": 8 | 16 | 32, "channels": 1..4}`` (a sorted list where the images differ), and for
        16-bit images whose values all fit in :data:`LOW_BITS` bits or fewer ``"low_bits"``: the bits
        they fit in (as :func:`_warn_low_bits` detects it)."""
        def one(values):
            v = sorted(values)
            return v[0] if len(v) == 1 else v

        out: dict = {"bit_depth": one(self.depths), "channels": one(self.channels)}
        if 16 in self.depths and self.bits16 <= LOW_BITS:
            out["low_bits"] = self.bits16
        return out


class TrainedFormat:
    """The bit depth a bundle's model was trained on (its manifest's ``data``: :meth:`PixelFormats.record`),
    which :func:`to_rgb8` compares each image with while a command inspects with that bundle
    (:func:`trained_format`). An image of another bit depth is warned about, naming both, once per bit
    depth: its pixels do not come out as the training images' did. A 16-bit image whose values fit in
    :data:`LOW_BITS` bits or fewer is low-bit data (as :func:`_warn_low_bits` takes it): another depth
    than full-range 16-bit images, and than 16-bit images whose values fit in fewer bits."""

    def __init__(self, record: dict, bundle: str):
        self.depths = _listed(record.get("bit_depth"))
        self.channels = _listed(record.get("channels"))
        self.low_bits = record.get("low_bits")
        self.bundle = bundle
        self._warned: set[tuple[int, bool]] = set()

    def matches(self, depth: int, bits: int | None) -> bool:
        """Whether an image of ``depth`` (and ``bits``: :func:`pixel_format`) is of the training's bit depth."""
        if not self.depths:
            return True   # nothing recorded to compare with
        if depth not in self.depths:
            return False
        if depth != 16 or bits is None:
            return True
        return bits > LOW_BITS if self.low_bits is None else bits <= self.low_bits

    def described(self) -> str:
        """``16-bit (values within 12 bits) grey images``: what the model was trained on."""
        depths = " and ".join(_depth_text(d, self.low_bits if d == 16 else None) for d in self.depths)
        return f"{depths} {'/'.join(_CHANNELS.get(c, f'{c}-channel') for c in self.channels)} images"

    def check(self, img: np.ndarray, brightest: int | None, where: str) -> None:
        depth, channels, bits = pixel_format(img, brightest)
        if self.matches(depth, bits):
            return
        low = bits is not None and bits <= LOW_BITS
        with _warned_lock:
            if (depth, low) in self._warned:
                return
            self._warned.add((depth, low))
        seen = f"{_depth_text(depth, bits)} {_CHANNELS.get(channels, f'{channels}-channel')}"
        further = (_depth_text(depth) if depth != 16 else
                   f"16-bit (values within {LOW_BITS} bits or fewer)" if low else "full-range 16-bit")
        log.warning("%s: %s %s image, and %s was trained on %s (manifest.json 'data'): its pixels do not come "
                    "out as the training images' did, so its scores may not match those its threshold was set on "
                    "(false alarms, or defects missed). Give it images of the bit depth it was trained on, or "
                    "train it on images like this one (README: Image folders, bit depth); further %s images "
                    "are not warned about", where, "an" if seen.startswith("8") else "a", seen, self.bundle,
                    self.described(), further)


_expected: TrainedFormat | None = None   # set by trained_format / expect_trained_format


def expect_trained_format(bundle) -> TrainedFormat | None:
    """From now on :func:`to_rgb8` compares each image with the bit depth ``bundle``'s model was trained on
    (a :class:`~edge_ad.bundle.Bundle`; one whose manifest records none, trained by an older edge-ad, or
    None: nothing is compared). For the whole process: the frames of a run are converted in its capture
    thread. Returns the expectation it replaces."""
    global _expected
    record = (getattr(bundle, "manifest", None) or {}).get("data") if bundle is not None else None
    with _warned_lock:
        before = _expected
        _expected = TrainedFormat(record, str(bundle.path)) if isinstance(record, dict) else None
    return before


def put_expected_format(before: TrainedFormat | None) -> None:
    """Put back the expectation :func:`expect_trained_format` replaced (it returned it)."""
    global _expected
    with _warned_lock:
        _expected = before


@contextlib.contextmanager
def trained_format(bundle):
    """``with trained_format(bundle):`` :func:`expect_trained_format` while inside (``edge-ad calibrate``,
    ``eval``), the expectation before it put back at the end."""
    before = expect_trained_format(bundle)
    try:
        yield
    finally:
        put_expected_format(before)


def _warn_low_bits(brightest: int, where: str) -> None:
    """Warn, once per folder (or source), about a 16-bit image that uses only its low bits: 12-bit camera
    data (Mono12, BayerRG12 exported LSB-aligned) becomes 0..15 of 255, ten grey levels, in training, eval,
    run and snapshots alike, and nothing failed to say so."""
    depth = fits_in(brightest)
    if depth > LOW_BITS:
        return
    key = os.path.dirname(where) if os.sep in where else where
    with _warned_lock:
        if key in _low_bits_warned:
            return
        _low_bits_warned.add(key)
    log.warning("%s: a 16-bit image whose brightest value is %d of 65535 (it fits in %d bits): 16-bit images "
                "are read as full-range 16-bit data, scaled by 1/256, so it reads as 0..%d of 255 and loses its "
                "detail. If this is %d-bit camera data stored in 16 bits, convert the images to 8 bits (value * "
                "255 / %d) for training, eval and run alike (README: Image folders, bit depth); further such "
                "images here are not warned about", where, brightest, depth, brightest >> 8, depth,
                (1 << depth) - 1)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth mask as bool ``[H, W]``.

    Lossless masks (PNG, BMP, TIFF, WebP, PNM; 8 or 16 bits, so label images with value 1 count): a pixel
    is defective when any colour channel is non-zero (a red or blue outline counts; as grey, dark blue was
    0). JPEG masks: when a channel reaches half the full value (128), since the compression rings faint
    non-zero pixels around every edge that would otherwise grow the defect.

    A mask with an alpha channel whose colour is the same everywhere (black, or white, on a transparent
    layer, as some annotation tools export) is drawn in its alpha: defective where the alpha is non-zero.
    The colour of such a file says nothing (all normal, or all defective), its alpha does. A mask whose
    colour varies is read from its colour, whatever its alpha."""
    import cv2

    p = Path(path)
    buf = np.fromfile(str(p), dtype=np.uint8) if p.is_file() else np.zeros(0, np.uint8)
    # ANYCOLOR applies the EXIF orientation as load_image does, so a mask stays aligned with its image
    m = decode(p, buf, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH, "mask")
    if m is None:
        raise InputError(f"{p}: not a readable mask image")
    if m.size and m.min() == m.max():   # uniform colour: the drawing, if any, is in the alpha channel
        full = decode(p, buf, cv2.IMREAD_UNCHANGED, "mask")
        if full is not None and full.ndim == 3 and full.shape[2] in (2, 4) and full.shape[:2] == m.shape[:2]:
            a = full[:, :, -1]
            if a.min() != a.max():
                return a > 0
    if m.ndim == 3:
        m = m.max(axis=2)
    if p.suffix.lower() in (".jpg", ".jpeg"):
        return m >= (np.iinfo(m.dtype).max + 1) // 2 if m.dtype.kind == "u" else m >= 0.5
    return m > 0


def resize_rgb(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size_hw
    if img.shape[0] == h and img.shape[1] == w:
        return img
    interp = cv2.INTER_AREA if (img.shape[0] > h and img.shape[1] > w) else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def to_batch(frames: Sequence[np.ndarray], size_hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 frames of any size -> model input ``float32 [B, 3, H, W]`` in 0..255."""
    h, w = size_hw
    out = np.empty((len(frames), 3, h, w), dtype=np.float32)
    for i, f in enumerate(frames):
        if (not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3
                or 0 in f.shape):
            got = (f"{f.dtype} array of shape {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__)
            raise InputError(f"frame {i}: got a {got}; expected an RGB uint8 array [H, W, 3] "
                             "(load_image gives one; to_rgb8(frame, bgr=False) converts grey, 16-bit and float frames)")
        out[i] = resize_rgb(f, size_hw).transpose(2, 0, 1)
    return out


def spread(items: Sequence, n: int) -> list:
    """``n`` items evenly spread over the list, in order (deterministic; the whole list when it is
    shorter or ``n`` <= 0, which callers use as "no limit")."""
    items = list(items)
    if n <= 0 or len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def scan_images(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(images, others)`` of a folder, both in name order (no recursion): ``images`` the files with an
    extension of :data:`IMAGE_EXTS`, ``others`` the files that are not read (another extension). Hidden
    files (a name starting with ".": macOS AppleDouble "._NAME.png", .DS_Store) and the system's own
    (Thumbs.db, desktop.ini) are in neither, and neither are sub-folders (a link to one too), FIFOs or sockets.
    A symbolic link whose target is gone or that loops is listed as a file: an image named so is one that cannot
    be read (:func:`read_image` says why), which each reader treats as it treats an unreadable image."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{d}: folder not found")
    images, others = [], []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.name.lower() in SYSTEM_FILES:
            continue
        if not p.is_file() and not (p.is_symlink() and not p.exists()):   # exists() follows it: False when broken
            continue
        (images if p.suffix.lower() in IMAGE_EXTS else others).append(p)
    return images, others


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder in name order (no recursion; hidden files skipped: see :func:`scan_images`).

    Other files are not read: the first time a folder is listed with such files, a warning names the
    folder, their count and extensions (a defect type saved as .gif would otherwise vanish unseen)."""
    images, others = scan_images(folder)
    if others:
        warn_skipped(folder, others)
    return images


def skipped_text(folder: str | os.PathLike, others: Sequence[Path]) -> str:
    """``"FOLDER: 3 files not read (.gif, .txt); readable formats are .png, ..."``"""
    exts = sorted({p.suffix.lower() or "no extension" for p in others})
    n = len(others)
    return (f"{folder}: {n} file{'s' if n != 1 else ''} not read ({', '.join(exts)}); readable formats are "
            f"{' '.join(IMAGE_EXTS)}")


def warn_skipped(folder: str | os.PathLike, others: Sequence[Path]) -> None:
    """Log :func:`skipped_text` once per folder and set of extensions (a looping dir:// source lists its
    folder at every pass)."""
    key = (os.path.abspath(folder), tuple(sorted({p.suffix.lower() for p in others})))
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("%s", skipped_text(folder, others))
