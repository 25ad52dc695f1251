"""Metrics against hand-computed cases (ties included) and brute-force definitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_ad.errors import InputError
from edge_ad.metrics import (aupro, best_f1, binary_stats, defect_type_report, f1_at, format_report,
                             image_auroc, pixel_auroc, pro_curve, roc_curve)
from fixtures_bundle import tiny_bundle  # noqa: F401 (a fixture)


def _brute_auroc(scores, labels):
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


# ---------------------------------------------------------------------------- image AUROC
def test_image_auroc_hand_cases():
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.8, 0.9, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    # positives [3, 2, 2], negatives [2, 1]: pairs 1, 1, .5, 1, .5, 1 -> 5/6
    assert image_auroc([3, 2, 2, 2, 1], [1, 1, 1, 0, 0]) == pytest.approx(5 / 6)
    # every score tied: 0.5
    assert image_auroc([7, 7, 7, 7], [0, 1, 0, 1]) == 0.5
    # one positive at the middle of three negatives
    assert image_auroc([1, 2, 3, 2], [0, 0, 0, 1]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert image_auroc(np.array([0.5, 0.4]), np.array([True, False])) == 1.0


def test_image_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        s = rng.integers(0, 6, n).astype(float)  # many ties
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        assert image_auroc(s, y) == pytest.approx(_brute_auroc(s, y))
        fpr, tpr, thr = roc_curve(s, y)
        assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(_brute_auroc(s, y))
        assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(thr) < 0)


def test_image_auroc_degenerate_and_errors():
    assert math.isnan(image_auroc([1, 2, 3], [0, 0, 0]))
    assert math.isnan(image_auroc([1, 2], [1, 1]))
    assert math.isnan(image_auroc([], []))
    with pytest.raises(InputError, match="3 scores but 2 labels"):
        image_auroc([1, 2, 3], [0, 1])
    with pytest.raises(InputError, match="NaN"):
        image_auroc([1, float("nan")], [0, 1])
    with pytest.raises(InputError, match="labels"):
        image_auroc([1, 2], [0, 2])
    with pytest.raises(InputError, match="both"):
        roc_curve([1, 2], [0, 0])


# ---------------------------------------------------------------------------- pixel AUROC
def test_pixel_auroc_hand_case_and_lists():
    maps = np.array([[[0.9, 0.1], [0.5, 0.5]]])
    masks = np.array([[[1, 0], [1, 0]]], bool)
    # positives .9 .5 ; negatives .1 .5 -> pairs 1, 1, 1, .5 -> 3.5/4
    assert pixel_auroc(maps, masks) == pytest.approx(0.875)
    # lists of different sizes give the same as the concatenation
    m1, g1 = np.array([[0.9, 0.1]]), np.array([[True, False]])
    m2, g2 = np.array([[0.5], [0.5]]), np.array([[True], [False]])
    assert pixel_auroc([m1, m2], [g1, g2]) == pytest.approx(0.875)
    rng = np.random.default_rng(1)
    m = rng.integers(0, 4, (3, 5, 5)).astype(np.float32)
    g = rng.random((3, 5, 5)) > 0.6
    assert pixel_auroc(m, g) == pytest.approx(_brute_auroc(m.ravel(), g.ravel()))


def test_pixel_auroc_degenerate_and_errors():
    assert math.isnan(pixel_auroc(np.ones((2, 3, 3)), np.zeros((2, 3, 3), bool)))
    with pytest.raises(InputError, match="differ in shape"):
        pixel_auroc(np.ones((2, 3, 3)), np.zeros((2, 3, 4), bool))
    with pytest.raises(InputError, match="map 0"):
        pixel_auroc([np.ones((3, 3))], [np.zeros((3, 4), bool)])


# ---------------------------------------------------------------------------- AUPRO
def test_aupro_hand_case_single_region():
    # region {p0, p1} scores 4, 1; normal pixels 3, 2
    maps = [np.array([[4.0, 1.0, 3.0, 2.0]])]
    masks = [np.array([[1, 1, 0, 0]], bool)]
    fpr, pro = pro_curve(maps, masks)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert pro.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert aupro(maps, masks) == pytest.approx(0.5)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_is_per_region_not_per_pixel():
    # 1x7 image: region A = {p0} (score 9), region B = {p2, p3, p4} (9, 1, 1); normals p1=5, p5=0, p6=3
    maps = [np.array([[9.0, 5.0, 9.0, 1.0, 1.0, 0.0, 3.0]])]
    masks = [np.array([[1, 0, 1, 1, 1, 0, 0]], bool)]
    fpr, pro = pro_curve(maps, masks)
    # at t=9: overlaps 1 and 1/3 -> PRO 2/3 (pixel-wise it would be 2/4)
    assert pro[1] == pytest.approx(2 / 3) and fpr[1] == 0
    assert aupro(maps, masks) == pytest.approx(2 / 3)           # flat 2/3 on [0, 0.3]
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(2 / 3 * 2 / 3 + 1 / 3)


def test_aupro_regions_across_images_and_8_connectivity():
    # image 1: one diagonal region (8-connected = 1 region) fully found; image 2: a region never found
    m1 = np.array([[5.0, 0.0], [0.0, 5.0]])
    g1 = np.array([[1, 0], [0, 1]], bool)
    m2 = np.array([[0.0, 0.0], [0.0, 0.0]])
    g2 = np.array([[1, 0], [0, 0]], bool)
    # t=5: PRO (1 + 0)/2 = .5 at FPR 0 (with 4-connectivity it would be (1 + 1 + 0)/3);
    # t=0: PRO 1 at FPR 1; the trapezoid to FPR .3 interpolates .65 -> (.5 + .65)/2
    fpr, pro = pro_curve([m1, m2], [g1, g2])
    assert fpr.tolist() == [0.0, 0.0, 1.0] and pro.tolist() == [0.0, 0.5, 1.0]
    assert aupro([m1, m2], [g1, g2]) == pytest.approx(0.575)


def test_aupro_interpolates_at_limit():
    # PRO rises linearly between FPR 0.2 and 0.4 -> value at 0.3 interpolated
    # 10 normal pixels, one region of 1 pixel
    normals = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    maps = [np.array([normals[:2] + normals[2:4] + [7.5] + normals[4:]], float)]
    masks = [np.array([[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]], bool)]
    # the defect pixel (7.5) is between normals 8 and 7: PRO jumps 0->1 at FPR 0.3 exactly
    fpr, pro = pro_curve(maps, masks)
    assert aupro(maps, masks) == pytest.approx(0.0)
    assert aupro(maps, masks, fpr_limit=0.4) == pytest.approx(0.1 / 0.4)


def _brute_aupro(maps, masks, limit):
    import cv2
    regions = []
    normal_scores = []
    for m, g in zip(maps, masks):
        n, lab = cv2.connectedComponents(g.astype(np.uint8), connectivity=8)
        regions += [m[lab == k] for k in range(1, n)]
        normal_scores.append(m[~g])
    normal_scores = np.concatenate(normal_scores)
    ts = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    pts = [(0.0, 0.0)] + [((normal_scores >= t).mean(), np.mean([(r >= t).mean() for r in regions]))
                          for t in ts]
    x, y = np.array(pts).T
    xs, ys = [], []
    for i in range(len(x)):
        if x[i] <= limit:
            xs.append(x[i]); ys.append(y[i])
        else:
            xs.append(limit); ys.append(y[i - 1] + (limit - x[i - 1]) / (x[i] - x[i - 1]) * (y[i] - y[i - 1]))
            break
    return float(np.sum(np.diff(xs) * (np.array(ys[1:]) + np.array(ys[:-1])) / 2)) / limit


def test_aupro_matches_brute_force():
    rng = np.random.default_rng(2)
    maps, masks = [], []
    for _ in range(4):
        g = np.zeros((12, 12), bool)
        for _ in range(int(rng.integers(0, 3))):
            y, x = rng.integers(0, 10, 2)
            g[y:y + int(rng.integers(1, 4)), x:x + int(rng.integers(1, 4))] = True
        m = rng.integers(0, 8, (12, 12)).astype(float) + 3.0 * g
        maps.append(m)
        masks.append(g)
    masks[0][0, 0] = True
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(_brute_aupro(maps, masks, limit))


def test_aupro_degenerate():
    assert math.isnan(aupro([np.ones((3, 3))], [np.zeros((3, 3), bool)]))
    assert math.isnan(aupro([np.ones((3, 3))], [np.ones((3, 3), bool)]))
    with pytest.raises(InputError):
        aupro([np.ones((3, 3))], [np.zeros((3, 3), bool)], fpr_limit=0)
    with pytest.raises(InputError, match="map 0"):
        aupro([np.ones((3, 3))], [np.zeros((2, 3), bool)])


# ---------------------------------------------------------------------------- F1 and friends
def test_binary_stats_hand_case():
    scores = [0.9, 0.6, 0.5, 0.4, 0.2]
    labels = [1, 0, 1, 0, 0]
    st = binary_stats(scores, labels, 0.5)  # predicted: .9, .6 (strictly greater than .5)
    assert (st["tp"], st["fp"], st["tn"], st["fn"]) == (1, 1, 2, 1)
    assert st["precision"] == 0.5 and st["recall"] == 0.5 and st["f1"] == 0.5
    assert st["fpr"] == pytest.approx(1 / 3) and st["accuracy"] == 0.6
    assert f1_at(scores, labels, 0.45) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    none = binary_stats(scores, labels, 1.0)
    assert math.isnan(none["precision"]) and none["f1"] == 0.0 and none["recall"] == 0.0
    assert math.isnan(binary_stats([1, 2], [0, 0], 1.5)["recall"])
    f1, thr = best_f1(scores, labels)
    assert f1 == pytest.approx(0.8) and 0.4 < thr < 0.5
    assert binary_stats(scores, labels, thr)["f1"] == pytest.approx(f1)
    f1, thr = best_f1([1, 1, 1], [1, 0, 1])  # all tied: predict all
    assert f1 == pytest.approx(0.8) and thr < 1
    assert all(math.isnan(v) for v in best_f1([1, 2], [0, 0]))


# ---------------------------------------------------------------------------- report
def test_defect_type_report():
    scores = [0.1, 0.2, 0.3, 0.9, 0.25, 0.8, 0.7]
    labels = [0, 0, 0, 1, 1, 1, 1]
    types = ["good", "good", "good", "scratch", "scratch", "dent", "dent"]
    maps = [np.full((4, 4), s) for s in scores]
    masks = [np.zeros((4, 4), bool) for _ in scores]
    for i in range(3, 7):
        maps[i][0, 0] = 5.0
        masks[i][0, 0] = True
    r = defect_type_report(scores, labels, types, threshold=0.5, maps=maps, masks=masks)
    json.dumps(r, allow_nan=False)  # JSON-safe
    o = r["overall"]
    assert o["n"] == 7 and o["n_good"] == 3 and o["n_defect"] == 4
    assert o["image_auroc"] == pytest.approx(_brute_auroc(scores, labels))
    assert o["recall"] == 0.75 and o["fpr"] == 0.0 and o["pixel_auroc"] == 1.0 and o["aupro"] == 1.0
    assert r["per_type"]["scratch"]["image_auroc"] == pytest.approx((3 + 2) / 6)
    assert r["per_type"]["scratch"]["recall"] == 0.5
    assert r["per_type"]["dent"]["image_auroc"] == 1.0
    assert r["per_type"]["good"] == {"n": 3, "fpr": 0.0}
    text = format_report(r)
    assert "scratch" in text and "overall" in text and "0.833" in text
    # image-level only (no masks): pixel metrics are None, printed n/a
    r2 = defect_type_report(scores, labels, types)
    assert r2["overall"]["pixel_auroc"] is None and "threshold" not in r2["overall"]
    assert "n/a" in format_report(r2)
    # only defective images: AUROC undefined -> None, not an exception
    r3 = defect_type_report([0.5, 0.6], [1, 1], ["dent", "dent"], threshold=0.55)
    assert r3["overall"]["image_auroc"] is None and r3["per_type"]["dent"]["image_auroc"] is None
    with pytest.raises(InputError, match="labelled normal"):
        defect_type_report([0.1, 0.2], [0, 0], ["good", "dent"])
    with pytest.raises(InputError):
        defect_type_report([0.1, 0.2], [0, 1], ["good"])


def test_images_without_pixel_labels_are_left_out_of_the_pixel_metrics():
    """One defect type without masks made every pixel metric n/a without a reason, and a defective image
    with an empty mask counted all its pixels as normal in the overall figure. A mask of None now leaves
    that image out of the pixel metrics: its type's are n/a, the overall ones are computed over the rest
    and marked."""
    scores = [0.1, 0.2, 0.9, 0.8, 0.7, 0.6]
    labels = [0, 0, 1, 1, 1, 1]
    types = ["good", "good", "scratch", "scratch", "dent", "dent"]
    maps = [np.full((4, 4), 0.1) for _ in scores]
    masks = [np.zeros((4, 4), bool) for _ in scores]
    for i in (2, 3):
        maps[i][0, 0] = 5.0
        masks[i][0, 0] = True
    for i in (4, 5):                 # the dent's defect, where no mask says so
        maps[i][3, 3] = 5.0
    whole = defect_type_report(scores, labels, types, maps=maps, masks=masks)
    assert whole["overall"]["pixel_auroc"] < 1.0          # the dents' "normal" pixels score high
    masks[4] = masks[5] = None
    r = defect_type_report(scores, labels, types, maps=maps, masks=masks)
    json.dumps(r, allow_nan=False)
    o = r["overall"]
    assert o["pixel_auroc"] == 1.0 and o["aupro"] == 1.0 and o["pixel_n_defect"] == 2 and o["n_defect"] == 4
    assert r["per_type"]["scratch"]["pixel_auroc"] == 1.0
    assert r["per_type"]["dent"]["pixel_auroc"] is None and r["per_type"]["dent"]["aupro"] is None
    assert r["per_type"]["dent"]["image_auroc"] == 1.0   # image metrics keep every image
    text = format_report(r)
    assert "1.000*" in text and "* pixel metrics over the good images and the 2 of 4 defective images" in text
    assert "*" not in format_report(whole)


def test_eval_names_what_it_left_out(tmp_path, tiny_bundle, caplog):
    """eval on a folder with a defect type without masks, an empty mask, an empty defect folder and files
    of another format: the pixel metrics cover what has masks, and the report (and the log) says why."""
    import cv2

    from edge_ad.evaluate import evaluate, report_text
    from fixtures_bundle import part_frame

    root = tmp_path / "cat"
    for d in ("test/good", "test/blob", "test/spot", "test/empty", "ground_truth/blob"):
        (root / d).mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(root / f"test/good/{i}.png"), part_frame(i, 64))
    for i in range(3):
        img = part_frame(i, 64, defect=True)
        cv2.imwrite(str(root / f"test/blob/{i}.png"), img)
        cv2.imwrite(str(root / f"test/spot/{i}.png"), img)
        mask = (img[..., 0] < 40).astype(np.uint8) * (255 if i else 0)   # blob/0: an empty mask
        cv2.imwrite(str(root / f"ground_truth/blob/{i}_mask.png"), mask)
    (root / "test/spot/3.gif").write_bytes(b"GIF89a")
    caplog.set_level("WARNING")
    r = evaluate(tiny_bundle.path, root, out_dir=tmp_path / "ev", progress=False, pictures=False)
    o = r["overall"]
    assert o["n_defect"] == 6 and o["pixel_n_defect"] == 2 and o["pixel_auroc"] is not None
    assert r["per_type"]["spot"]["pixel_auroc"] is None and "empty" not in r["per_type"]
    notes = "\n".join(r["notes"])
    assert f"{root / 'test/empty'}: no images; defect type 'empty' is not evaluated" in notes
    assert f"{root / 'test/spot'}: 1 file not read (.gif)" in notes
    assert f"spot has no masks in {root / 'ground_truth'}: left out of the pixel metrics" in notes
    assert f"1 mask(s) of defective images hold no defective pixel ({root / 'ground_truth/blob/0_mask.png'})" in notes
    assert all(n in caplog.text for n in r["notes"])
    assert "note: pixel metrics: spot has no masks" in report_text(r)
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["notes"] == r["notes"]


def test_eval_on_names_that_are_not_utf8_writes_its_report_and_pictures(tmp_path, tiny_bundle):
    """A test image or a defect-type folder named with a byte that is not UTF-8 (Python reads it as a lone
    surrogate, '\\udcff'): eval crashed (SIGSEGV) drawing it in the grid's captions (cv2.putText), and
    report.json and --json held the surrogate. They show each such byte as \\xff, as every record of edge-ad
    does, in valid UTF-8."""
    import os

    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main
    from fixtures_bundle import part_frame

    def png(path, img):   # (OpenCV cannot write to such a path: encoded here)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(cv2.imencode(".png", img)[1].tobytes())

    root = tmp_path / "cat"
    kind = os.fsdecode(b"ray\xe9")                 # 'rayé' in Latin-1, from a Windows share
    for i in range(3):
        png(root / "test/good" / f"{i}.png", part_frame(i, 64))
        img = part_frame(i, 64, defect=True)
        name = os.fsdecode(b"\xff%d" % i)
        png(root / "test" / kind / f"{name}.png", img)
        png(root / "ground_truth" / kind / f"{name}_mask.png", (img[..., 0] < 40).astype(np.uint8) * 255)
    out = tmp_path / "ev"
    res = CliRunner().invoke(main, ["eval", "--bundle", str(tiny_bundle.path), "--data", str(root), "--out",
                                    str(out), "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    text = (out / "report.json").read_bytes().decode("utf-8")
    assert "\\ud" not in text and "\\ud" not in res.stdout
    stored = json.loads(text)
    for r in (printed, stored):
        assert set(r["per_type"]) == {"good", "ray\\xe9"}
        assert [s["path"] for s in r["samples"] if s["type"] != "good"] == [f"test/ray\\xe9/\\xff{i}.png"
                                                                                 for i in range(3)]
    assert (out / "grid.png").stat().st_size > 1000
    res = CliRunner().invoke(main, ["eval", "--bundle", str(tiny_bundle.path), "--data", str(root), "--out",
                                    str(out)])
    assert res.exit_code == 0 and "ray\\xe9" in res.output, res.output
