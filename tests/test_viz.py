"""OpenCV drawings: overlays, eval grid, score histogram (decoded back and checked)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_ad import viz
from edge_ad.errors import InputError


def _decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _frame_and_map():
    frame = np.full((120, 160, 3), 128, np.uint8)
    amap = np.zeros((15, 20), np.float32)
    amap[5:9, 10:15] = 3.0  # a hot region in the right half
    return frame, amap


def test_colorize_scale():
    m = np.array([[0.0, 1.0]], np.float32)
    c = viz.colorize(m)
    assert c.shape == (1, 2, 3) and c.dtype == np.uint8
    assert c[0, 0, 2] > c[0, 0, 0] and c[0, 1, 0] > c[0, 1, 2]  # low blue, high red (RGB)
    assert viz.colorize(np.zeros((4, 4))).shape == (4, 4, 3)  # flat map: no division by zero
    assert viz.colorize(m, size_hw=(8, 10)).shape == (8, 10, 3)


def test_heatmap_overlay_marks_the_hot_region():
    frame, amap = _frame_and_map()
    out = viz.heatmap_overlay(frame, amap, threshold=1.0)
    assert out.shape == frame.shape and out.dtype == np.uint8
    hot = out[60:70, 110:130].astype(int)
    cold = out[10:20, 10:30].astype(int)
    assert hot[..., 0].mean() > cold[..., 0].mean() + 40  # red where the map is high
    # the threshold outline (yellow) is drawn around the region
    yellow = (out[..., 0] > 200) & (out[..., 1] > 170) & (out[..., 2] < 120)
    assert yellow.any() and yellow[:, :70].sum() == 0
    # [1, h, w] maps and grey frames are accepted
    assert viz.heatmap_overlay(frame[..., 0], amap[None]).shape == frame.shape
    with pytest.raises(InputError):
        viz.heatmap_overlay(frame.astype(np.float32), amap)
    with pytest.raises(InputError):
        viz.heatmap_overlay(frame, np.zeros((2, 3, 4, 5)))


def test_normal_map_below_threshold_looks_calm():
    frame, _ = _frame_and_map()
    calm = viz.heatmap_overlay(frame, np.full((15, 20), 0.2, np.float32), threshold=1.0)
    assert calm[..., 2].mean() > calm[..., 0].mean()  # blue-ish, not red


def test_overlay_jpeg_snapshot():
    frame = np.full((720, 1280, 3), 90, np.uint8)
    amap = np.zeros((45, 80), np.float32)
    amap[20:25, 40:50] = 5.0
    data = viz.overlay_jpeg(frame, amap, threshold=1.0, label="NG score 5.00", quality=80)
    assert data[:2] == b"\xff\xd8"
    img = _decode(data)
    assert img.shape == (360, 640, 3)  # downscaled to max_side 640
    assert img[2:20, 2:80].min() < 60  # caption box drawn top-left
    with pytest.raises(InputError, match="quality"):
        viz.overlay_jpeg(frame, amap, quality=0)


def test_grid_png(tmp_path):
    frame, amap = _frame_and_map()
    mask = np.zeros((120, 160), bool)
    mask[40:72, 80:120] = True
    rows = [viz.GridRow(frame, mask, amap, "scratch 3.00 NG"),
            viz.GridRow(frame, None, np.zeros((15, 20), np.float32), "good 0.00 OK")]
    path = tmp_path / "report" / "grid.png"
    viz.write_grid(path, rows, cell=96, threshold=1.0, title="eval")
    img = _decode(path.read_bytes())
    assert img.shape[1] == 3 * 96 + 4 * 4 and img.shape[0] > 2 * 96
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file
    with pytest.raises(InputError, match="does not match"):
        viz.grid_png([viz.GridRow(frame, mask[:10], amap)])
    with pytest.raises(InputError, match="no rows"):
        viz.grid_png([])


def test_histogram_png(tmp_path):
    rng = np.random.default_rng(0)
    normal, defect = rng.normal(0, 1, 200), rng.normal(4, 1, 50)
    path = tmp_path / "hist.png"
    viz.write_histogram(path, normal, defect, threshold=2.0, size_hw=(300, 500))
    img = _decode(path.read_bytes())
    assert img.shape == (300, 500, 3)
    blue = (img[..., 2] > 150) & (img[..., 0] < 120)
    orange = (img[..., 0] > 150) & (img[..., 2] < 100) & (img[..., 1] < 140)
    assert blue[:, :250].sum() > blue[:, 250:].sum()       # normals on the left
    assert orange[:, 250:].sum() > orange[:, :250].sum()   # defects on the right
    yellow = (img[..., 0] > 200) & (img[..., 1] > 170) & (img[..., 2] < 100)
    assert yellow.any()
    # one class only, all equal scores, no threshold: still a picture
    assert _decode(viz.histogram_png([1.0, 1.0], [], None)).shape == (360, 640, 3)
    with pytest.raises(InputError, match="no scores"):
        viz.histogram_png([], [])
    with pytest.raises(InputError, match="NaN"):
        viz.histogram_png([1.0, float("nan")], [])


def test_no_matplotlib_imported():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(viz))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("matplotlib" in str(x) or "torch" in str(x) for x in names)


def test_write_eval_pictures(tmp_path):
    rng = np.random.default_rng(3)
    types = ["good"] * 5 + ["scratch"] * 4 + ["dent"] * 2
    labels = [0 if t == "good" else 1 for t in types]
    scores = [float(v) for v in rng.random(len(types)) + np.array(labels) * 1.5]
    images = [np.full((50, 70, 3), 100, np.uint8) for _ in types]   # original size
    masks = [np.zeros((32, 32), bool) for _ in types]                # at the maps' size
    for i in range(5, 9):
        masks[i][4:10, 4:10] = True                                   # dent: no masks (image-level)
    maps = [rng.random((32, 32)).astype(np.float32) + (3.0 * m) for m in masks]
    idx = viz.pick_examples(scores, types, per_type=3)
    assert len(idx) == 3 + 3 + 2 and [types[i] for i in idx][:3] == ["good"] * 3
    good_scores = [scores[i] for i in idx[:3]]
    assert good_scores == sorted(good_scores) and good_scores[-1] == max(scores[:5])
    res = viz.write_eval_pictures(tmp_path, images, masks, maps, scores, labels, types, 1.2, (32, 32))
    assert res == {"grid": "grid.png", "histogram": "histogram.png"}
    grid = _decode((tmp_path / "grid.png").read_bytes())
    assert grid.shape[0] > 8 * 160
    assert _decode((tmp_path / "histogram.png").read_bytes()).shape == (360, 640, 3)
    with pytest.raises(InputError, match="11 scores"):
        viz.write_eval_pictures(tmp_path, images[:3], masks, maps, scores, labels, types, 1.2)


def test_eval_grid_captions_name_the_files(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(viz, "write_grid", lambda path, rows, **kw: drawn.extend(rows))
    types, scores = ["good", "good", "scratch"], [0.2, 0.9, 2.0]
    names = ["cam1_0001", "cam1_0002", "IMG_20240101_120000_line3_station7"]
    viz.write_eval_pictures(tmp_path, [np.zeros((8, 8, 3), np.uint8)] * 3, [None] * 3,
                            [np.zeros((8, 8), np.float32)] * 3, scores, [0, 0, 1], types, 0.5, names=names)
    assert [r.caption for r in drawn] == ["good cam1_0001  score 0.2 OK", "good cam1_0002  score 0.9 NG",
                                          "scratch IMG_20240101_..ine3_station7  score 2 NG"]
    with pytest.raises(InputError, match="2 names"):
        viz.write_eval_pictures(tmp_path, [np.zeros((8, 8, 3), np.uint8)] * 3, [None] * 3,
                                [np.zeros((8, 8), np.float32)] * 3, scores, [0, 0, 1], types, 0.5, names=names[:2])


def test_captions_draw_any_text_the_same_on_every_opencv(tmp_path, monkeypatch):
    """cv2.putText crashed the process (SIGSEGV) on a lone surrogate (a file or defect-type name with a byte that is
    not UTF-8), and draws other non-ASCII characters differently from one OpenCV to the next. Captions draw
    printable ASCII: such a byte as \\xff, as every record names the file, any other character as '?'."""
    assert viz.drawable("a\udcffb\x00\n\u00e9\u4e2d\ud800~") == "a\\xffb????\\ud800~"
    for text in ("caf\u00e9", "\udcfe" * 50, "\x00", "\ud800", "", "\u4e2d"):
        img = np.zeros((20, 60, 3), np.uint8)
        viz._caption(img, text, (2, 2))                              # never crashes
    a, b = np.zeros((20, 60, 3), np.uint8), np.zeros((20, 60, 3), np.uint8)
    viz._caption(a, "caf\u00e9", (2, 2))
    viz._caption(b, "caf?", (2, 2))
    assert (a == b).all()
    drawn = []
    monkeypatch.setattr(viz, "write_grid", lambda path, rows, **kw: drawn.extend(rows))
    viz.write_eval_pictures(tmp_path, [np.zeros((8, 8, 3), np.uint8)] * 2, [None] * 2,
                            [np.zeros((8, 8), np.float32)] * 2, [0.1, 2.0], [0, 1], ["good", "ray\udce9"], 0.5,
                            names=["\udcff" * 10, "x"])
    assert [r.caption for r in drawn] == ["good \\xff\\xff\\xff\\..f\\xff\\xff\\xff  score 0.1 OK",
                                          "ray\\xe9 x  score 2 NG"], [r.caption for r in drawn]


HOTTEST = (128, 0, 0)   # JET at 255, RGB


def test_nonfinite_map_cells_are_drawn_hottest():
    """NaN / infinite cells of a broken model's map are drawn in the hottest colour (and outlined as above
    the threshold), never as the coolest: a broken map must not look clean."""
    m = np.full((4, 4), 0.1, np.float32)
    m[0, 0], m[3, 3], m[1, 2] = np.nan, np.inf, 0.5
    c = viz.colorize(m)
    assert tuple(c[0, 0]) == HOTTEST and tuple(c[3, 3]) == HOTTEST
    assert c[1, 1, 2] > c[1, 1, 0]                        # finite low cells still blue
    frame = np.full((40, 40, 3), 128, np.uint8)
    out = viz.heatmap_overlay(frame, m, threshold=1.0, alpha=1.0)
    assert out[35, 35, 0] > 100 and out[35, 35, 2] < 30    # the inf cell: red, not blue
    yellow = (out[..., 0] > 200) & (out[..., 1] > 170) & (out[..., 2] < 100)
    assert yellow[:, :20].any() and yellow[20:, 20:].any()  # outlined although the threshold is 1.0
    all_nan = viz.heatmap_overlay(frame, np.full((4, 4), np.nan), threshold=1.0, alpha=1.0)
    assert all_nan[20, 20, 0] > 100 and all_nan[20, 20, 2] < 30
    g = viz.grid_image([viz.GridRow(frame, None, m, "nan")], cell=40)
    assert (np.abs(g.astype(int) - HOTTEST).sum(axis=2) == 0).any()


@pytest.mark.parametrize("thr", [float("nan"), float("inf"), float("-inf")])
def test_histogram_with_a_nonfinite_threshold(thr):
    img = _decode(viz.histogram_png([1.0, 2.0], [3.0], thr))
    assert img.shape == (360, 640, 3)


def test_histogram_legend_clear_of_the_threshold_line():
    rng = np.random.default_rng(0)
    img = viz.histogram_image(rng.normal(0.3, 0.1, 200), rng.normal(0.6, 0.1, 20), 0.98)
    yellow = (img[..., 0] > 200) & (img[..., 1] > 170) & (img[..., 2] < 100)
    x = int(np.argmax(yellow[60:300].sum(axis=0)))       # the dashed line's column
    near = img[40:90, max(0, x - 8):x + 9]
    text = (near > 200).all(axis=2)                       # legend text is near-white
    assert not text.any()
    assert img.shape == (360, 640, 3) and 560 < x < 640


def test_grid_refuses_an_empty_image():
    with pytest.raises(InputError, match="empty"):
        viz.grid_image([viz.GridRow(np.zeros((0, 0, 3), np.uint8), None, np.zeros((4, 4)))])
