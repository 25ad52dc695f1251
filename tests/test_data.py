"""Datasets (MVTec layout) and the synthetic part generator."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_ad.data.mvtec import MVTecCategory, split_train_val
from edge_ad.data.synthetic import (DEFECTS, KINDS, ConveyorStream, lighting_shift, make_part,
                                    write_category)
from edge_ad.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def _category(root: Path, gray: bool = False, masks: bool = True) -> Path:
    """A tiny hand-made MVTec folder: mixed PNG/JPEG, mixed sizes, colour or grey."""
    rng = np.random.default_rng(0)

    def img(h, w):
        return rng.integers(0, 255, (h, w) if gray else (h, w, 3), dtype=np.uint8)

    _write(root / "train/good/a.png", img(40, 50))
    _write(root / "train/good/b.jpg", img(30, 60))
    _write(root / "train/good/c.png", img(40, 50))
    (root / "train/good/notes.txt").write_text("not an image")
    _write(root / "test/good/g1.jpg", img(40, 50))
    _write(root / "test/scratch/s1.png", img(40, 50))
    _write(root / "test/scratch/s2.jpg", img(36, 44))
    _write(root / "test/dent/d1.png", img(20, 20))
    if masks:
        m = np.zeros((40, 50), np.uint8)
        m[5:10, 5:20] = 255
        _write(root / "ground_truth/scratch/s1_mask.png", m)
        m2 = np.zeros((36, 44), np.uint8)
        m2[1:3, 1:3] = 255
        _write(root / "ground_truth/scratch/s2_mask.png", m2)
    return root


# ---------------------------------------------------------------------------- MVTec loader
def test_listing_and_labels(tmp_path):
    cat = MVTecCategory(_category(tmp_path / "cat"))
    assert [p.name for p in cat.train_paths()] == ["a.png", "b.jpg", "c.png"]
    samples = cat.test_samples()
    assert [(s.path.name, s.defect_type, s.label) for s in samples] == [
        ("g1.jpg", "good", 0), ("d1.png", "dent", 1), ("s1.png", "scratch", 1), ("s2.jpg", "scratch", 1)]
    assert samples[0].mask_path is None and samples[1].mask_path is None
    assert samples[2].mask_path.name == "s1_mask.png"
    assert cat.defect_types() == ["dent", "scratch"]
    assert not cat.has_masks  # 'dent' has no masks
    summ = cat.summary()
    assert summ["train"] == 3 and summ["test"] == {"good": 1, "dent": 1, "scratch": 2}


def test_load_sample_resizes_image_and_mask(tmp_path):
    cat = MVTecCategory(_category(tmp_path / "cat"))
    s1 = cat.test_samples()[2]
    img, mask = cat.load_sample(s1)
    assert img.shape == (40, 50, 3) and img.dtype == np.uint8
    assert mask.dtype == bool and mask.sum() == 5 * 15
    img, mask = cat.load_sample(s1, size=(20, 25))
    assert img.shape == (20, 25, 3) and mask.shape == (20, 25)
    assert set(np.unique(mask)) <= {False, True} and 0 < mask.sum() < 20 * 25
    good = cat.test_samples()[0]
    _, gmask = cat.load_sample(good, size=(16, 16))
    assert gmask.shape == (16, 16) and not gmask.any()
    assert cat.load_mask(s1, image_shape=(40, 50)).sum() == 75
    frames = cat.load_train(size=(32, 32))
    assert len(frames) == 3 and all(f.shape == (32, 32, 3) for f in frames)


def test_grayscale_images_become_rgb(tmp_path):
    cat = MVTecCategory(_category(tmp_path / "cat", gray=True))
    img, _ = cat.load_sample(cat.test_samples()[1])
    assert img.shape == (20, 20, 3)
    assert np.array_equal(img[..., 0], img[..., 1])
    assert cat.check()["has_masks"] is False


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding only the Orientation tag (0x0112)."""
    import struct

    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_exif_orientation_is_applied(tmp_path):
    from edge_ad.data.image import load_image

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40] = 255                       # left half white, as stored
    ok, buf = cv2.imencode(".jpg", img)
    (tmp_path / "rot.jpg").write_bytes(_with_exif_orientation(buf.tobytes(), 6))   # "rotate 90 CW to view"
    got = load_image(tmp_path / "rot.jpg")
    assert got.shape == (80, 40, 3)         # upright, as a viewer shows it: white on top
    assert got[:30].mean() > 240 and got[-30:].mean() < 15


def test_float_and_16_bit_tiffs_keep_their_contrast(tmp_path):
    from edge_ad.data.image import load_image

    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, :].repeat(8, 0)
    assert cv2.imwrite(str(tmp_path / "f01.tiff"), ramp)                    # 0..1 floats
    assert cv2.imwrite(str(tmp_path / "f255.tiff"), ramp * 255)             # 0..255 floats
    assert cv2.imwrite(str(tmp_path / "u16.tiff"), (ramp * 65535).astype(np.uint16))
    for name in ("f01.tiff", "f255.tiff", "u16.tiff"):
        got = load_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (8, 64, 3), name
        assert got[0, 0, 0] <= 1 and got[0, -1, 0] >= 254, name       # was all black for 0..1 floats
    bad = ramp.copy()
    bad[0, 0] = np.nan
    assert cv2.imwrite(str(tmp_path / "nan.tiff"), bad)
    with pytest.raises(InputError, match="nan.tiff.*NaN"):
        load_image(tmp_path / "nan.tiff")


def test_jpeg_and_16_bit_masks_mean_what_they_show(tmp_path):
    from edge_ad.data.image import load_mask

    m = np.zeros((64, 64), np.uint8)
    m[20:30, 20:40] = 255
    assert cv2.imwrite(str(tmp_path / "m.png"), m)
    assert cv2.imwrite(str(tmp_path / "m.jpg"), m, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert (cv2.imread(str(tmp_path / "m.jpg"), 0) > 0).sum() > 200    # the compression's halo
    assert load_mask(tmp_path / "m.png").sum() == 200
    assert load_mask(tmp_path / "m.jpg").sum() == 200                   # was 252: every halo pixel counted
    labels = np.zeros((64, 64), np.uint16)
    labels[5:10, 5:10] = 1                                              # a 16-bit label image
    assert cv2.imwrite(str(tmp_path / "m16.png"), labels)
    assert load_mask(tmp_path / "m16.png").sum() == 25                  # was 0: 1 >> 8 in 8 bits


def test_image_level_dataset_without_ground_truth(tmp_path):
    cat = MVTecCategory(_category(tmp_path / "cat", masks=False))
    assert all(s.mask_path is None for s in cat.test_samples())
    assert not cat.has_masks
    cat.check()


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(InputError, match="data folder not found"):
        MVTecCategory(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither 'train/' nor 'test/'"):
        MVTecCategory(tmp_path / "empty")
    root = _category(tmp_path / "cat")
    import shutil
    shutil.rmtree(root / "train")
    cat = MVTecCategory(root)
    with pytest.raises(InputError, match=r"train/good.*not found"):
        cat.train_paths()
    assert len(cat.test_samples()) == 4  # the test part still works


def test_unreadable_image_named(tmp_path):
    root = _category(tmp_path / "cat")
    (root / "test/good/broken.png").write_bytes(b"definitely not a png")
    cat = MVTecCategory(root)
    bad = [s for s in cat.test_samples() if s.path.name == "broken.png"][0]
    with pytest.raises(InputError, match="broken.png"):
        cat.load_sample(bad)
    with pytest.raises(InputError, match="broken.png"):
        cat.check()


def test_mask_size_mismatch_named(tmp_path):
    root = _category(tmp_path / "cat")
    _write(root / "ground_truth/scratch/s1_mask.png", np.zeros((41, 50), np.uint8))
    cat = MVTecCategory(root)
    with pytest.raises(InputError, match=r"s1_mask.png: mask is 50x41.*s1.png is 50x40"):
        cat.load_sample(cat.test_samples()[2])


def test_mask_without_image_named(tmp_path):
    root = _category(tmp_path / "cat")
    _write(root / "ground_truth/scratch/zz_mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="zz_mask.png: mask without an image") as err:
        MVTecCategory(root).test_samples()
    # the formats test images are read in, not only '.png or .jpg' (a WebP or TIFF image is one too)
    from edge_ad.data.image import IMAGE_EXTS

    assert str(err.value).endswith(f"(expected {root / 'test/scratch/zz'} with an image extension: "
                                   f"{', '.join(IMAGE_EXTS)})"), str(err.value)


def test_image_without_mask_named(tmp_path):
    root = _category(tmp_path / "cat")
    (root / "ground_truth/scratch/s2_mask.png").unlink()
    with pytest.raises(InputError, match=r"s2.jpg: no mask"):
        MVTecCategory(root).test_samples()


def test_masks_for_unknown_defect_type_named(tmp_path):
    root = _category(tmp_path / "cat")
    _write(root / "ground_truth/hole/h1_mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="ground_truth/hole"):
        MVTecCategory(root).test_samples()


def test_split_train_val_deterministic():
    paths = [Path(f"{i:03d}.png") for i in range(50)]
    tr, va = split_train_val(paths, 0.1, seed=3)
    assert len(va) == 5 and len(tr) == 45 and set(tr).isdisjoint(va) and set(tr) | set(va) == set(paths)
    assert tr == sorted(tr) and va == sorted(va)  # input order kept
    assert split_train_val(paths, 0.1, seed=3) == (tr, va)
    assert split_train_val(paths, 0.1, seed=4)[1] != va
    assert split_train_val(paths[:2], 0.1)[1] and len(split_train_val(paths[:2], 0.1)[0]) == 1
    assert split_train_val(paths, 0.0) == (paths, [])
    with pytest.raises(InputError):
        split_train_val(paths[:1], 0.1)
    with pytest.raises(InputError):
        split_train_val(paths, 1.0)


@pytest.mark.data
@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/magnetic_tile is absent")
def test_real_magnetic_tile_layout():
    cat = MVTecCategory(REAL)
    assert len(cat.train_paths()) == 786
    summ = cat.summary()
    assert summ["test"]["good"] == 166 and summ["has_masks"]
    assert cat.defect_types() == ["blowhole", "break", "crack", "fray", "uneven"]
    bad = [s for s in cat.test_samples() if s.label == 1]
    img, mask = cat.load_sample(bad[0], size=(128, 128))
    assert img.shape == (128, 128, 3) and mask.any()


# ---------------------------------------------------------------------------- synthetic parts
@pytest.mark.parametrize("kind", KINDS)
def test_make_part_deterministic_and_masks(kind):
    a = make_part(kind, 128, None, seed=1, index=2)
    b = make_part(kind, 128, None, seed=1, index=2)
    assert np.array_equal(a.image, b.image) and a.label == 0 and not a.mask.any()
    assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, make_part(kind, 128, None, seed=1, index=3).image)
    for d in DEFECTS:
        p = make_part(kind, 128, d, seed=1, index=2)
        assert p.label == 1 and p.defect_type == d and p.mask.any()
        # the defect is visible: pixels under the mask differ clearly from the same part without it
        diff = np.abs(p.image.astype(int) - a.image.astype(int)).mean(axis=2)
        assert diff[p.mask].mean() > 25, (kind, d)
        assert (diff[~p.mask] > 20).mean() < 0.02, (kind, d)


def test_make_part_non_square_and_errors():
    p = make_part("plate", (96, 160), "scratch", seed=0)
    assert p.image.shape == (96, 160, 3) and p.mask.shape == (96, 160)
    with pytest.raises(InputError, match="kind"):
        make_part("sphere")
    with pytest.raises(InputError, match="defect"):
        make_part("disc", defect="dent")
    with pytest.raises(InputError, match="size"):
        make_part("disc", size=8)


def test_defects_separable_by_a_simple_feature():
    """A trivial model (per-pixel mean/std over normals, max |z|) separates defects: they are visible."""
    size = 128
    normals = np.stack([make_part("disc", size, None, 5, i).image.mean(2) for i in range(30)]).astype(np.float32)
    blur = lambda x: cv2.GaussianBlur(x, (0, 0), 2.0)  # noqa: E731
    normals = np.stack([blur(n) for n in normals])
    mu, sd = normals.mean(0), normals.std(0) + 8.0
    def score(img):
        return float(np.abs((blur(img.mean(2).astype(np.float32)) - mu) / sd).max())
    good = [score(make_part("disc", size, None, 5, 1000 + i).image) for i in range(12)]
    bad = [score(make_part("disc", size, DEFECTS[i % 4], 5, 2000 + i).image) for i in range(12)]
    auc = np.mean([[b > g for g in good] for b in bad])
    assert auc >= 0.9, auc


def test_write_category_roundtrip(tmp_path):
    root = write_category(tmp_path / "syn", n_train=4, n_test_good=2, n_test_defect=2, size=64,
                          kind="grain", seed=7, defects=("scratch", "missing"))
    cat = MVTecCategory(root)
    assert len(cat.train_paths()) == 4
    assert cat.summary()["test"] == {"good": 2, "missing": 2, "scratch": 2}
    assert cat.has_masks
    for s in cat.test_samples():
        img, mask = cat.load_sample(s)
        assert img.shape == (64, 64, 3)
        assert mask.any() == bool(s.label)
    # deterministic: same arguments, same bytes
    again = write_category(tmp_path / "syn2", n_train=4, n_test_good=2, n_test_defect=2, size=64,
                           kind="grain", seed=7, defects=("scratch", "missing"))
    assert (root / "test/scratch/001.png").read_bytes() == (again / "test/scratch/001.png").read_bytes()
    jpg = write_category(tmp_path / "syn3", 2, 1, 1, 64, "woven", 0, defects=("spot",), ext=".jpg")
    assert (jpg / "train/good/000.jpg").is_file() and (jpg / "ground_truth/spot/000_mask.png").is_file()
    MVTecCategory(jpg).check()


def test_conveyor_stream():
    s = ConveyorStream("disc", (96, 128), defect_rate=0.5, seed=3)
    frames = list(s.frames(0, 20))
    assert [f.index for f in frames] == list(range(20))
    labels = [f.label for f in frames]
    assert 0 < sum(labels) < 20
    assert all(f.mask.any() == bool(f.label) for f in frames)
    assert all(f.defect_type == "good" for f in frames if not f.label)
    assert np.array_equal(s.frame(7).image, frames[7].image)  # random access, replayable
    assert frames[0].image.shape == (96, 128, 3)
    assert all(ConveyorStream("grain", 64, defect_rate=0.0).frame(i).label == 0 for i in range(5))
    it = iter(ConveyorStream("plate", 64, seed=1))
    assert next(it).index == 0 and next(it).index == 1
    with pytest.raises(InputError):
        ConveyorStream("disc", defect_rate=1.5)


def test_lighting_shift():
    img = np.array([[0, 64, 128, 200, 255]], np.uint8)
    assert np.array_equal(lighting_shift(img), img)
    out = lighting_shift(img, brightness=30)
    assert out.tolist() == [[30, 94, 158, 230, 255]]
    out = lighting_shift(img, contrast=0.5)
    assert out.tolist() == [[64, 96, 128, 164, 192]]
    rgb = make_part("disc", 64, None, 0).image
    assert lighting_shift(rgb, 20, 1.1).shape == rgb.shape
    with pytest.raises(InputError):
        lighting_shift(img, contrast=0)
    s = ConveyorStream("disc", 64, defect_rate=0.0, seed=2)
    before = s.frame(5).image
    s.set_lighting(brightness=40, contrast=1.0, from_index=5)
    assert not np.array_equal(s.frame(5).image, before)
    assert np.array_equal(s.frame(4).image, ConveyorStream("disc", 64, defect_rate=0.0, seed=2).frame(4).image)
    assert s.frame(5).image.mean() > before.mean() + 20


def test_generic_images_are_deterministic_varied_and_written_whole(tmp_path):
    from edge_ad.data.generic import generic_image, write_generic
    from edge_ad.data.image import list_images, load_image

    a, b = generic_image(96, seed=3, index=5), generic_image(96, seed=3, index=5)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    others = [generic_image(96, seed=3, index=i) for i in range(6)]
    assert not np.array_equal(others[0], others[1])
    assert not np.array_equal(generic_image(96, seed=4, index=5), a)
    # pictures, not flat fields: a spread of intensities in every one, sharp edges in most (some are blurred)
    grey = [img.astype(np.float32).mean(axis=2) for img in others]
    assert all(g.std() > 8 for g in grey)
    assert sum(np.abs(np.diff(g, axis=1)).max() > 30 for g in grey) >= 4
    paths = write_generic(tmp_path / "gen", 4, size=64, seed=1, progress=False)
    assert [p.name for p in list_images(tmp_path / "gen")] == [p.name for p in paths] == \
        [f"generic_{i:06d}.jpg" for i in range(4)]
    assert load_image(paths[2]).shape[:2] == (64, 64)
    assert not list((tmp_path / "gen").glob(".*"))  # no temporary files left
    with pytest.raises(InputError, match="count 0"):
        write_generic(tmp_path / "x", 0)
    with pytest.raises(InputError, match="size 8"):
        generic_image(8)
    with pytest.raises(InputError, match="size 8"):
        write_generic(tmp_path / "y", 2, size=8)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generic_images_never_write_into_a_folder_of_other_files(tmp_path):
    """--out holding anything but a previous run's generic_NNNNNN.jpg is refused untouched (a category's
    train/good would get dead-leaves pictures as 'good' parts); a previous run's folder is replaced as a
    whole, none of its images beyond the new count left behind."""
    from edge_ad.data.generic import write_generic

    gen = tmp_path / "gen"
    write_generic(gen, 5, size=32, progress=False)
    (gen / ".generic_000009.jpg.abc.tmp").write_bytes(b"killed run")
    write_generic(gen, 2, size=32, seed=3, progress=False)
    assert sorted(p.name for p in gen.iterdir()) == ["generic_000000.jpg", "generic_000001.jpg"]
    good = tmp_path / "cat" / "train" / "good"
    good.mkdir(parents=True)
    (good / "generic_000000.jpg").write_bytes(b"mine")
    (good / "part_001.png").write_bytes(b"mine")
    with pytest.raises(InputError, match=r"good: holds part_001.png; expected a new or empty folder"):
        write_generic(good, 2, size=32, progress=False)
    assert (good / "generic_000000.jpg").read_bytes() == b"mine" and len(list(good.iterdir())) == 2
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile: is a file"):
        write_generic(tmp_path / "afile", 2, size=32, progress=False)


def test_generic_images_interrupted_over_a_previous_run_leave_it_whole(tmp_path, monkeypatch):
    """A run over a previous run's folder stopped part-way (Ctrl-C) left the folder with the old count of
    images, the first ones of the new run and the rest of the old, and nothing to tell: the help says the
    folder is replaced as a whole. The images are now written beside it and switched in at the end: the
    previous run's folder stays as it was, and what a killed run left beside it goes at the next run."""
    import edge_ad.data.generic as generic

    gen = tmp_path / "gen"
    generic.write_generic(gen, 4, size=32, seed=0, progress=False)
    before = {p.name: p.read_bytes() for p in gen.iterdir()}
    real_image = generic.generic_image

    def image(size, seed, index):
        if index == 2:
            raise KeyboardInterrupt
        return real_image(size, seed, index)

    monkeypatch.setattr(generic, "generic_image", image)
    with pytest.raises(KeyboardInterrupt):
        generic.write_generic(gen, 6, size=32, seed=1, progress=False)
    assert {p.name: p.read_bytes() for p in gen.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]   # no staging folder left
    monkeypatch.undo()
    # a killed run's staging folder and a replaced folder not yet deleted: removed by the next run
    for name in (".gen.new-0123abcd", ".gen.old-4567cdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generic_000000.jpg").write_bytes(b"x")
    paths = generic.write_generic(gen, 2, size=32, seed=1, progress=False)
    assert paths == [gen / "generic_000000.jpg", gen / "generic_000001.jpg"]
    assert sorted(p.name for p in gen.iterdir()) == ["generic_000000.jpg", "generic_000001.jpg"]
    assert gen.joinpath("generic_000000.jpg").read_bytes() != before["generic_000000.jpg"]   # seed 1's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]
    # a power cut between the switch's two renames: no gen, the complete new folder and the old one beside it;
    # the next run finishes that switch first, so an interruption of its own still leaves a whole folder
    done = {p.name: p.read_bytes() for p in gen.iterdir()}
    os.rename(gen, tmp_path / ".gen.new-89abcdef")
    (tmp_path / ".gen.old-01234567").mkdir()
    monkeypatch.setattr(generic, "generic_image", image)
    with pytest.raises(KeyboardInterrupt):
        generic.write_generic(gen, 6, size=32, seed=2, progress=False)
    assert {p.name: p.read_bytes() for p in gen.iterdir()} == done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]


def test_frames_that_are_not_rgb_uint8_are_named():
    from edge_ad.data.image import to_batch

    ok = np.zeros((10, 12, 3), np.uint8)
    assert to_batch([ok], (8, 8)).shape == (1, 3, 8, 8)
    for bad, words in ((np.zeros((10, 12), np.uint8), "shape (10, 12)"),
                       (np.zeros((10, 12, 3), np.float32), "float32"),
                       (np.zeros((10, 12, 3), np.uint16), "uint16"),
                       (np.zeros((0, 12, 3), np.uint8), "shape (0, 12, 3)"),
                       ([[1, 2, 3]], "list")):
        with pytest.raises(InputError, match=r"frame 1: .*" + re.escape(words) + r".*RGB uint8"):
            to_batch([ok, bad], (8, 8))


def test_images_over_the_pixel_limit_are_named_before_decoding(tmp_path, monkeypatch):
    """A 21-byte PGM whose header claims 100000 x 100000 pixels (and a 40000 x 40000 PNG) made OpenCV raise a
    cv2.error (its 2^30 pixel limit): a traceback in train, eval and calibrate, a dead capture thread in
    run. Every reader now gets an InputError naming the file, its size and edge-ad's limit, read from the
    header before anything is decoded (as an image and as a mask)."""
    from edge_ad.data import image
    from edge_ad.data.image import MAX_IMAGE_PIXELS, header_size, load_image, load_mask, read_image

    huge = tmp_path / "x.pgm"
    huge.write_bytes(b"P5\n100000 100000\n255\n")
    words = r"x\.pgm: %s of 100000 x 100000 pixels \(10000 megapixels, as its header says\); .*at most 268 megapixels"
    for read, what in ((load_image, "image"), (read_image, "image"), (load_mask, "mask")):
        with pytest.raises(InputError, match=words % what):
            read(huge)
    # the sides each format's header declares, nothing decoded (a PNG, TIFF, ... of 53 x 37)
    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".tif", ".webp", ".pgm", ".ppm", ".pbm"):
        for params in ([], [cv2.IMWRITE_WEBP_QUALITY, 101], [cv2.IMWRITE_PXM_BINARY, 0], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
            data = cv2.imencode(ext, img[:, :, 0] if ext in (".pgm", ".pbm") else img, params)[1]
            assert header_size(data) == (53, 37), (ext, params)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()   # behind 128 KB of metadata (two APP segments)
    app = b"\xff\xe2" + (65535).to_bytes(2, "big") + bytes(65533)
    assert header_size(np.frombuffer(jpg[:2] + app + app + jpg[2:], np.uint8)) == (53, 37)
    vp8x = b"RIFF" + bytes(4) + b"WEBPVP8X" + (10).to_bytes(4, "little") + bytes(4) + (29999).to_bytes(3, "little") \
        + (19999).to_bytes(3, "little")   # an extended WebP's canvas
    assert header_size(vp8x) == (30000, 20000)
    for cut in (b"", b"P5", b"\xff\xd8\xff", b"II*\x00\xff\xff\xff\xff", b"\x89PNG\r\n\x1a\n"):
        assert header_size(cut) is None
    # a header it does not read (PAM): OpenCV's own limit is an InputError too, not a cv2.error
    pam = tmp_path / "big.png"
    pam.write_bytes(b"P7\nWIDTH 100000\nHEIGHT 100000\nDEPTH 1\nMAXVAL 255\nTUPLTYPE GRAYSCALE\nENDHDR\n")
    with pytest.raises(InputError, match=r"big\.png: not a readable image: its header declares more pixels than OpenCV"):
        load_image(pam)
    # ... and under OpenCV's, edge-ad's limit holds once decoded
    small = tmp_path / "small.pam"
    small.write_bytes(b"P7\nWIDTH 4\nHEIGHT 3\nDEPTH 1\nMAXVAL 255\nTUPLTYPE GRAYSCALE\nENDHDR\n" + bytes(12))
    assert load_image(small).shape == (3, 4, 3)
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", 11)
    with pytest.raises(InputError, match=r"small\.pam: image of 4 x 3 pixels \(0 megapixels, decoded\)"):
        load_image(small)
    assert MAX_IMAGE_PIXELS == 16384 * 16384


# ---------------------------------------------------------------------------- what a folder lists
def test_hidden_and_system_files_are_skipped_by_every_reader(tmp_path, caplog):
    """A folder copied from a Mac gets a '._NAME' AppleDouble twin per image: train and eval stopped at
    the first ('not a readable image') while run and calibrate skipped them one warning each. Hidden and
    system files are now listed by none of them, without a word."""
    from edge_ad.calibration.collect import collect_frames
    from edge_ad.data.image import list_images
    from edge_ad.runtime.sources import check_startup, open_source, parse_uri

    root = _category(tmp_path / "cat")
    for d in ("train/good", "test/good", "test/scratch"):
        for name in ("._a.png", "._s1.png", ".DS_Store", "Thumbs.db", "desktop.ini"):
            (root / d / name).write_bytes(b"\x00\x05\x16\x07junk")
    (root / "ground_truth/scratch/._s1_mask.png").write_bytes(b"\x00\x05\x16\x07junk")
    caplog.set_level("WARNING")
    cat = MVTecCategory(root)
    assert [p.name for p in cat.train_paths()] == ["a.png", "b.jpg", "c.png"]
    cat.check()    # train and eval decode every listed image and mask: none of the junk is among them
    assert [s.path.name for s in cat.test_samples()] == ["g1.jpg", "d1.png", "s1.png", "s2.jpg"]
    good = root / "test/good"
    assert [p.name for p in list_images(good)] == ["g1.jpg"]
    check_startup(parse_uri(f"dir://{good}"))
    src = open_source(f"dir://{good}")
    src.open()
    assert [f.truth["file"] for f in iter(src.read, None)] == ["g1.jpg"]
    assert len(collect_frames(good, 10, progress=False)) == 1       # calibrate lists the same
    text = caplog.text
    assert "._" not in text and "Thumbs" not in text and "DS_Store" not in text and "skipped" not in text


def test_a_broken_or_looping_link_named_like_an_image_is_an_unreadable_image_not_dropped(tmp_path, caplog):
    """A symbolic link named *.png whose target is gone, or that loops, was in neither list of scan_images (not a
    file, not another format): train, eval and dir:// dropped it without a word. It is an image that cannot be
    read now, as README says for each place: train and eval stop naming it and why, run and calibrate skip it
    with a warning naming it (counted in skipped_images). A link to a folder is still a sub-folder, not read."""
    import os

    from edge_ad.calibration.collect import collect_frames
    from edge_ad.data.image import list_images, load_image
    from edge_ad.runtime.sources import check_startup, open_source, parse_uri

    root = _category(tmp_path / "cat")
    os.symlink(tmp_path / "gone.png", root / "train/good/zz.png")                    # its target removed
    os.symlink("loop_b.png", root / "test/dent/loop_a.png")                          # a loop
    os.symlink("loop_a.png", root / "test/dent/loop_b.png")
    os.symlink(tmp_path / "gone.png", root / "test/good/g2.png")
    os.symlink(root / "test", root / "test/good/sub.png")                            # a folder: skipped
    cat = MVTecCategory(root)
    assert [p.name for p in cat.train_paths()] == ["a.png", "b.jpg", "c.png", "zz.png"]
    with pytest.raises(InputError, match=re.escape(f"{root / 'train/good/zz.png'}: a broken symbolic link (to "
                                                   f"{tmp_path / 'gone.png'}, which does not exist)")):
        load_image(root / "train/good/zz.png")
    with pytest.raises(InputError, match="zz.png"):
        cat.check()                                      # train and eval decode every listed image
    bad = [s for s in cat.test_samples() if s.path.name == "loop_a.png"][0]
    with pytest.raises(InputError, match=re.escape(f"{bad.path}: a symbolic link that loops (to loop_b.png)")):
        cat.load_sample(bad)
    good = root / "test/good"
    assert [p.name for p in list_images(good)] == ["g1.jpg", "g2.png"]
    caplog.set_level("WARNING")
    check_startup(parse_uri(f"dir://{good}"))           # one image can be read: the source starts
    src = open_source(f"dir://{good}")
    src.open()
    assert [f.truth["file"] for f in iter(src.read, None)] == ["g1.jpg"] and src.skipped == 1
    assert "g2.png: a broken symbolic link" in caplog.text
    caplog.clear()
    assert len(collect_frames(good, 10, progress=False)) == 1       # calibrate skips it too, naming it
    assert "g2.png: a broken symbolic link" in caplog.text


def test_files_of_other_formats_are_named_once_and_webp_is_read(tmp_path, caplog):
    """A defect type saved in a format the loader does not list vanished from the eval report, and extra
    training images were dropped, without a word: now a warning names the folder, the count and the
    extensions (once per folder), the eval report keeps it as a note, and so does an empty defect folder.
    WebP and PGM, which OpenCV decodes itself, are read like PNG."""
    from edge_ad.data.image import IMAGE_EXTS, list_images, load_image

    root = _category(tmp_path / "cat")
    img = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    _write(root / "train/good/d.webp", img)
    _write(root / "train/good/e.pgm", img[..., 0])
    _write(root / "test/crack/c1.png", img)
    (root / "test/crack/c2.gif").write_bytes(b"GIF89a")
    (root / "test/crack/c3.gif").write_bytes(b"GIF89a")
    (root / "test/crack/c4").write_bytes(b"no extension")
    (root / "test/empty").mkdir()
    assert ".webp" in IMAGE_EXTS and ".pgm" in IMAGE_EXTS
    assert load_image(root / "train/good/d.webp").shape == (40, 50, 3)
    assert np.array_equal(load_image(root / "train/good/e.pgm")[..., 1], img[..., 0])
    caplog.set_level("WARNING")
    cat = MVTecCategory(root)
    assert [p.name for p in cat.train_paths()] == ["a.png", "b.jpg", "c.png", "d.webp", "e.pgm"]
    assert [s.defect_type for s in cat.test_samples()].count("crack") == 1
    crack = root / "test/crack"
    want = {f"{root / 'train/good'}: 1 file not read (.txt); readable formats are {' '.join(IMAGE_EXTS)}",
            f"{crack}: 3 files not read (.gif, no extension); readable formats are {' '.join(IMAGE_EXTS)}",
            f"{root / 'test/empty'}: no images; defect type 'empty' is not evaluated"}
    assert set(cat.notes) == want
    assert all(n in caplog.text for n in want)
    # a folder listed again (a looping dir:// source) is not warned about again; another extension is
    caplog.clear()
    list_images(crack)
    assert "not read" not in caplog.text
    (crack / "c5.heic").write_bytes(b"x")
    list_images(crack)
    assert f"{crack}: 4 files not read (.gif, .heic, no extension)" in caplog.text


def test_masks_drawn_in_alpha_or_colour_and_empty_masks(tmp_path):
    """Masks drawn in the alpha channel (black or white colour on a transparent layer, as annotation tools
    export) read empty (black) or all defective (white); a red outline in a JPEG read empty too (as grey
    it is 76 < 128). Now the alpha is read where the colour is uniform, any colour channel counts, and
    an empty mask of a defective image is recorded (eval warns and leaves it out of the pixel metrics)."""
    from edge_ad.data.image import load_mask

    m = np.zeros((40, 50), np.uint8)
    m[5:10, 5:20] = 255
    for colour in (0, 255):
        rgba = np.zeros((40, 50, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = m
        _write(tmp_path / f"alpha{colour}.png", rgba)
        assert np.array_equal(load_mask(tmp_path / f"alpha{colour}.png"), m > 0), colour
    opaque = np.dstack([np.dstack([m] * 3), np.full_like(m, 255)])   # colour mask, opaque: the colour counts
    _write(tmp_path / "opaque.png", opaque)
    assert np.array_equal(load_mask(tmp_path / "opaque.png"), m > 0)
    red = np.zeros((40, 50, 3), np.uint8)
    red[..., 2] = m                                                  # BGR: red
    _write(tmp_path / "red.jpg", red)
    assert load_mask(tmp_path / "red.jpg").sum() == 75
    dark_blue = np.zeros((40, 50, 3), np.uint8)
    dark_blue[..., 0] = (m > 0) * 2                                  # a label 2 in the blue channel
    _write(tmp_path / "blue.png", dark_blue)
    assert load_mask(tmp_path / "blue.png").sum() == 75
    root = _category(tmp_path / "cat")
    _write(root / "ground_truth/scratch/s2_mask.png", np.zeros((36, 44), np.uint8))
    cat = MVTecCategory(root)
    cat.check()
    assert {p.name: q.name for p, q in cat.empty_masks.items()} == {"s2.jpg": "s2_mask.png"}


def test_16_bit_images_that_use_only_the_low_bits_are_warned_about(tmp_path, caplog):
    """12-bit camera data in a 16-bit PNG (Mono12: 0..4095) is scaled like 16-bit data to 0..15 of 255, in
    training, eval, run and snapshots alike, and nothing said so. The scaling stays the same for every
    image (a per-image stretch would make scores depend on content), but a warning now names the first
    such file of a folder, the bits it fits in and the conversion."""
    from edge_ad.data.image import load_image

    ramp = np.linspace(0, 4000, 64)[None, :].repeat(8, 0).astype(np.uint16)
    for name in ("a.png", "b.png"):
        _write(tmp_path / "mono12" / name, ramp)
    full = tmp_path / "full"
    full.mkdir()
    assert cv2.imwrite(str(full / "c.png"), (ramp.astype(np.uint32) * 16).astype(np.uint16))
    caplog.set_level("WARNING")
    assert load_image(tmp_path / "mono12/a.png").max() == 15          # unchanged: the same rule for all
    load_image(tmp_path / "mono12/b.png")
    assert load_image(full / "c.png").max() == 250
    warned = [r.getMessage() for r in caplog.records if "16-bit image" in r.getMessage()]
    assert len(warned) == 1, warned                                   # once per folder, none for full range
    assert warned[0].startswith(f"{tmp_path / 'mono12' / 'a.png'}: a 16-bit image whose brightest value is 4000")
    assert "fits in 12 bits" in warned[0] and "0..15 of 255" in warned[0] and "value * 255 / 4095" in warned[0]


def test_the_bit_depth_record_and_what_counts_as_another_bit_depth():
    """What the manifest's 'data' records of a training's images (one value, or a list where they differ;
    low_bits while every 16-bit image fits in 14 bits or fewer), and which frames are of another bit depth:
    a 16-bit frame whose values fit in 14 bits or fewer is low-bit data, as the low-bit warning takes it."""
    from edge_ad.data.image import PixelFormats, TrainedFormat

    f = PixelFormats()
    f.add(np.full((4, 4), 4000, np.uint16))                        # 12-bit grey data in 16 bits
    assert f.record() == {"bit_depth": 16, "channels": 1, "low_bits": 12}
    f.add(np.zeros((4, 4, 3), np.uint8))
    assert f.record() == {"bit_depth": [8, 16], "channels": [1, 3], "low_bits": 12}
    f.add(np.full((4, 4), 60000, np.uint16))                       # full-range 16-bit
    assert f.record() == {"bit_depth": [8, 16], "channels": [1, 3]}
    low = TrainedFormat({"bit_depth": 16, "channels": 1, "low_bits": 12}, "b")
    assert low.matches(16, 12) and low.matches(16, 10)             # a darker frame of the same camera
    assert not low.matches(16, 14) and not low.matches(16, 16) and not low.matches(8, None)
    full = TrainedFormat({"bit_depth": 16, "channels": 3}, "b")
    assert full.matches(16, 16) and not full.matches(16, 12) and not full.matches(32, None)
    assert TrainedFormat({"bit_depth": [8, 16], "channels": 3}, "b").matches(8, None)
    assert low.described() == "16-bit (values within 12 bits) grey images"
