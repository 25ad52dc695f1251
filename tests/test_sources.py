"""Source URIs, real OpenCV video files and folders, camera loss: reconnect with back-off, watchdog, give up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ad.errors import InputError
from edge_ad.runtime.capture import Camera
from edge_ad.runtime.sources import (RawFrame, Source, SourceLost, check_startup, csi_pipeline, has_gstreamer,
                                     open_source, parse_uri, redact_text, redact_uri)
from fixtures_bundle import make_tiny_bundle, part_frame, write_video

EDGE_AD = [sys.executable, "-c", "from edge_ad.cli import main; main()"]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- the parser
def test_parse_every_scheme():
    s = parse_uri("v4l2:///dev/video0?width=640&height=480&fps=30&fourcc=MJPG")
    assert (s.scheme, s.target, s.live) == ("v4l2", "/dev/video0", True)
    assert s.options["width"] == 640 and s.options["fourcc"] == "MJPG"
    assert parse_uri("v4l2://1").target == "1"
    s = parse_uri("csi://0?flip=2")
    assert s.target == "0" and s.options == {"width": 1920, "height": 1080, "fps": 30, "flip": 2, "sensor_mode": -1}
    assert parse_uri("rtsp://cam.local:8554/live?channel=1").target == "rtsp://cam.local:8554/live?channel=1"
    s = parse_uri("file://videos/a.avi?loop=1&fps=native")
    assert (s.target, s.options["loop"], s.options["fps"], s.live) == ("videos/a.avi", True, "native", False)
    assert parse_uri("file:///abs/a.mp4").target == "/abs/a.mp4"
    assert parse_uri("dir://frames").options == {"loop": False, "fps": 0.0}
    s = parse_uri("synthetic://plate?size=64&defect_rate=0.5&seed=3&count=10")
    assert s.options["kind"] == "plate" and s.options["size"] == 64 and s.options["count"] == 10
    assert parse_uri("synthetic://").options["kind"] == "disc"


@pytest.mark.parametrize("uri, words", [
    ("", ["empty", "v4l2:///dev/video0"]),
    ("/dev/video0", ["no scheme", "file:///dev/video0"]),
    ("http://cam/stream", ["unknown scheme", "rtsp://"]),
    ("v4l2://camera", ["neither /dev/videoN nor an index"]),
    ("v4l2:///dev/video0?widht=640", ["unknown option", "widht", "width"]),
    ("v4l2:///dev/video0?width=-1", ["width", "positive"]),
    ("csi://0?flip=9", ["flip", "0..7"]),
    ("csi://left", ["not an index"]),
    ("csi://0?aelock=maybe", ["aelock", "not a boolean", "true/false"]),
    ("csi://0?awblock=2", ["awblock", "not a boolean"]),
    ("csi://0?exposuretimerange=20000000", ["exposuretimerange", "not a range", '"LOW HIGH"', "20000000+20000000"]),
    ("csi://0?exposuretimerange=1+2+3", ["exposuretimerange", "not a range"]),
    ("csi://0?gainrange=low+high", ["gainrange", "not a range", "two numbers"]),
    ("csi://0?gainrange=4+1", ["gainrange", "LOW 4 is above HIGH 1"]),
    ("csi://0?gainrange=0+1", ["gainrange", "> 0"]),
    ("csi://0?exposuretimerange=-5+10", ["exposuretimerange", "> 0"]),
    ("csi://0?ispdigitalgainrange=1+300", ["ispdigitalgainrange", "1..256"]),
    ("csi://0?exposure=10", ["unknown option", "exposure", "aelock", "exposuretimerange"]),
    ("rtsp:///stream", ["no host"]),
    ("rtsp://cam:99999/x", ["port"]),
    ("file://", ["no path"]),
    ("file://a.mp4?loop=maybe", ["loop", "boolean"]),
    ("synthetic://wheel", ["kind", "disc"]),
    ("synthetic://disc?defects=dent", ["defects", "scratch"]),
    ("synthetic://disc?size=16", ["size 16x16", "32..8192"]),
    ("synthetic://disc?contrast=0", ["contrast", "> 0"]),
    ("synthetic://disc?brightness=nan", ["brightness", "finite"]),
    ("synthetic://disc?kind=plate", ["kind 'plate' contradicts synthetic://disc"]),
    ("synthetic://disc#x", ["'#x'", "?name=value"]),
    ("file://a.mp4?fps=nan", ["fps", "finite"]),
    ("dir://parts?fps=inf", ["fps", "finite"]),
    ("v4l2://0?fps=-30", ["fps", "> 0"]),
    ("v4l2://0?fps=nan", ["fps", "finite"]),
])
def test_parse_errors_say_what_was_expected(uri, words):
    with pytest.raises(InputError) as ei:
        parse_uri(uri)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_file_and_dir_paths_are_file_uris(tmp_path):
    assert parse_uri("synthetic://?kind=plate").options["kind"] == "plate"
    assert parse_uri("synthetic://plate?kind=plate").target == "plate"
    # a '#' is part of the name, not a fragment to drop silently
    s = parse_uri("dir://lots/lot#7?loop=1")
    assert (s.target, s.options["loop"]) == ("lots/lot#7", True)
    assert parse_uri("file:///rec/a#b.mp4").target == "/rec/a#b.mp4"
    # percent-encoding is decoded (RFC 8089), so a folder with a space can be named
    assert parse_uri("dir:///data/my%20parts?fps=2").target == "/data/my parts"
    assert parse_uri("file:///data/100%25.mp4").target == "/data/100%.mp4"
    folder = tmp_path / "my parts #2"
    folder.mkdir()
    import cv2

    cv2.imwrite(str(folder / "a.png"), np.full((8, 8, 3), 40, np.uint8))
    from urllib.parse import quote

    spec = parse_uri(f"dir://{quote(str(folder))}")
    check_startup(spec)
    src = open_source(spec)
    src.open()
    assert int(src.read().image.mean()) == 40


def test_resolve_relative_keeps_options_and_leaves_others_alone(tmp_path):
    from edge_ad.runtime.sources import resolve_relative

    got = resolve_relative("file://recordings/line 3.mp4?loop=1&fps=native", tmp_path)
    s = parse_uri(got)
    assert s.target == str(tmp_path / "recordings/line 3.mp4")
    assert s.options["loop"] is True and s.options["fps"] == "native"
    assert parse_uri(resolve_relative("dir://lot#7", tmp_path)).target == str(tmp_path / "lot#7")
    for uri in ("file:///abs/a.mp4", "v4l2://0", "synthetic://disc?size=64", "rtsp://cam/x?a=1"):
        assert resolve_relative(uri, tmp_path) == uri


def test_credentials_never_reach_logs():
    assert redact_uri("rtsp://admin:s3cret@10.1.2.3:554/ch1") == "rtsp://***@10.1.2.3:554/ch1"
    assert redact_uri("rtsp://cam/x?token=abc123&channel=1") == "rtsp://cam/x?token=***&channel=1"
    # a text holding URIs (a calibration record's source): those with secrets redacted, the rest verbatim
    assert (redact_text("calibrate: rtsp://admin:s3cret@cam/1 and csi://0?gainrange=1+1, /data/a?b")
            == "calibrate: rtsp://***@cam/1 and csi://0?gainrange=1+1, /data/a?b")
    with pytest.raises(InputError) as ei:
        parse_uri("rtsp://admin:s3cret@cam:99999/x")
    assert "s3cret" not in str(ei.value)


def test_csi_pipeline_and_missing_gstreamer():
    p = csi_pipeline(1, 1280, 720, 60, flip=2)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ")
    assert "width=(int)1280" in p and "framerate=(fraction)60/1" in p and "flip-method=2" in p
    assert p.endswith("appsink drop=true max-buffers=1 sync=false")
    if has_gstreamer():
        pytest.skip("this OpenCV has GStreamer; the missing-GStreamer message cannot be shown")
    with pytest.raises(InputError) as ei:
        check_startup(parse_uri("csi://0"))
    msg = str(ei.value)
    assert "GStreamer" in msg and "--system-site-packages" in msg


def test_csi_exposure_and_white_balance_lock_reach_nvarguscamerasrc(monkeypatch):
    # jetson/CAMERAS.md: lock exposure with aelock/awblock, or fix exposuretimerange/gainrange
    import edge_ad.runtime.sources as sources

    monkeypatch.setattr(sources, "has_gstreamer", lambda: True)
    uri = ('csi://1?width=1280&height=720&fps=60&aelock=true&awblock=1&exposuretimerange=20000000+20000000'
           '&gainrange=%221%201%22&ispdigitalgainrange=1%202.5')
    spec = parse_uri(uri)
    assert spec.options["aelock"] is True and spec.options["gainrange"] == (1.0, 1.0)
    (pipe, _api), _params = open_source(spec)._capture_args()
    src = pipe.split(" ! ")[0]
    assert src == ('nvarguscamerasrc sensor-id=1 aelock=true awblock=true exposuretimerange="20000000 20000000" '
                   'gainrange="1 1" ispdigitalgainrange="1 2.5"'), src
    # false is passed as given; options left out leave the plugin's defaults
    (pipe, _api), _params = open_source("csi://0?aelock=0")._capture_args()
    assert pipe.startswith("nvarguscamerasrc sensor-id=0 aelock=false ! ")
    assert csi_pipeline(0, 1920, 1080, 30).startswith("nvarguscamerasrc sensor-id=0 ! ")
    # the URIs jetson/CAMERAS.md shows are ones edge-ad accepts
    import re

    doc = (Path(__file__).resolve().parents[1] / "jetson" / "CAMERAS.md").read_text()
    shown = re.findall(r"csi://\d[^\s\"`)]*", doc)
    assert any("aelock=true" in u for u in shown) and any("exposuretimerange=" in u for u in shown)
    for u in shown:
        parse_uri(u)


class _FakeCapture:
    """cv2.VideoCapture of a camera with fixed modes: ``took`` maps a property to what the camera makes of the
    value set (absent: taken as asked); a property never set reads 0, as OpenCV's unsupported ones do."""

    def __init__(self, took=None):
        self.took = took or {}
        self.values: dict[int, float] = {}
        self.order: list[int] = []

    def isOpened(self):
        return True

    def set(self, prop, value):
        self.order.append(prop)
        self.values[prop] = self.took.get(prop, lambda v: v)(value)
        return True

    def get(self, prop):
        return self.values.get(prop, 0.0)

    def release(self):
        pass


def test_v4l2_settings_are_read_back_and_those_not_taken_named():
    """cap.set's values were never read back: a camera that rounds 1920x1080 to 1280x720 or MJPG to YUYV
    went unnoticed. set_v4l2_settings sets in order (the format first) and gives each value not taken."""
    import cv2

    from edge_ad.runtime.sources import set_v4l2_settings

    yuyv = float(cv2.VideoWriter_fourcc(*"YUYV"))
    cam = _FakeCapture({cv2.CAP_PROP_FRAME_WIDTH: lambda v: 1280.0, cv2.CAP_PROP_FRAME_HEIGHT: lambda v: 720.0,
                        cv2.CAP_PROP_FPS: lambda v: 29.97, cv2.CAP_PROP_FOURCC: lambda v: yuyv})
    asked = {"fps": 30.0, "height": 1080, "width": 1920, "fourcc": "MJPG", "buffer": 1}
    assert set_v4l2_settings(cam, asked) == [("fourcc", "MJPG", "YUYV"), ("width", 1920, 1280),
                                             ("height", 1080, 720), ("fps", 30.0, 29.97)]
    assert cam.order == [cv2.CAP_PROP_FOURCC, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT,
                         cv2.CAP_PROP_FPS, cv2.CAP_PROP_BUFFERSIZE]
    assert cam.values[cv2.CAP_PROP_BUFFERSIZE] == 1.0
    # taken as asked (an fps read back as 30.000001 too), and one the camera does not report (None)
    cam = _FakeCapture({cv2.CAP_PROP_FPS: lambda v: 30.000001, cv2.CAP_PROP_BUFFERSIZE: lambda v: 0.0})
    assert set_v4l2_settings(cam, {"fourcc": "MJPG", "width": 640, "fps": 30.0, "buffer": 2}) == [("buffer", 2, None)]
    assert cam.values[cv2.CAP_PROP_FOURCC] == float(cv2.VideoWriter_fourcc(*"MJPG"))
    with pytest.raises(TypeError, match="exposure"):
        set_v4l2_settings(cam, {"exposure": 100})


def test_a_v4l2_camera_that_rounds_a_setting_is_warned_about_once(monkeypatch, caplog):
    """open() warns about each setting the camera did not take, naming it, the value asked and the one taken,
    and does not fail; a reconnect that finds the same values says nothing again."""
    import cv2

    opened = []

    def capture(*args):
        opened.append(_FakeCapture({cv2.CAP_PROP_FRAME_WIDTH: lambda v: 1280.0, cv2.CAP_PROP_FPS: lambda v: 15.0}))
        return opened[-1]

    monkeypatch.setattr(cv2, "VideoCapture", capture)
    src = open_source("v4l2://0?width=1920&height=720&fps=30&fourcc=MJPG")
    with caplog.at_level("WARNING", logger="edge_ad.runtime.sources"):
        for _ in range(2):
            src.open()
            src.close()
    said = [r.getMessage() for r in caplog.records]
    hint = " (a camera keeps to the formats, sizes and rates it has: 'v4l2-ctl --list-formats-ext' lists them)"
    uri = "v4l2://0?width=1920&height=720&fps=30&fourcc=MJPG"
    assert said == [f"{uri}: width 1920 asked, the camera took 1280{hint}",
                    f"{uri}: fps 30 asked, the camera took 15{hint}"]
    assert len(opened) == 2 and opened[1].order == opened[0].order   # set again at the reconnect


# ----------------------------------------------------------------------------- real files and folders
def test_file_source_reads_rgb_frames_and_ends(tmp_path):
    frames = [part_frame(i, 64, defect=(i == 2)) for i in range(5)]
    frames[1] = frames[1].copy()
    frames[1][:, :, 0] = 250  # a red frame: checks RGB order after OpenCV's BGR
    path = write_video(tmp_path / "v.avi", frames)
    src = open_source(f"file://{path}")
    src.open()
    got = []
    while (f := src.read()) is not None:
        got.append(f)
    src.close()
    assert [f.index for f in got] == [0, 1, 2, 3, 4]
    assert got[0].image.shape == (64, 64, 3) and got[0].image.dtype == np.uint8
    r, g, b = (got[1].image[..., c].mean() for c in range(3))
    assert r > 200 and g < 160 and b < 160


def test_file_uri_of_a_still_image_reads_it_as_dir_and_eval_do(tmp_path):
    """file://part.jpg went through FFmpeg: the EXIF orientation was ignored (a sideways part scored NG
    where eval said OK) and a 16-bit PNG was rounded otherwise. A still image is now read by load_image,
    one frame (loop=1 repeats it), and checked at start like a folder's images."""
    import cv2

    from edge_ad.data.image import load_image
    from test_data import _with_exif_orientation

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40] = 255
    ok, buf = cv2.imencode(".jpg", img)
    (tmp_path / "rot.jpg").write_bytes(_with_exif_orientation(buf.tobytes(), 6))
    ramp = (np.linspace(0, 65535, 64)[None, :].repeat(8, 0) + 127).clip(0, 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "u16.png"), ramp)
    for name in ("rot.jpg", "u16.png"):
        spec = parse_uri(f"file://{tmp_path / name}")
        check_startup(spec)
        src = open_source(spec)
        src.open()
        f = src.read()
        assert np.array_equal(f.image, load_image(tmp_path / name)), name   # as dir:// and eval read it
        assert f.truth == {"file": name} and src.read() is None
    assert f.image.shape == (8, 64, 3)
    src = open_source(f"file://{tmp_path / 'rot.jpg'}?loop=1")
    src.open()
    frames = [src.read() for _ in range(3)]
    assert [f.image.shape for f in frames] == [(80, 40, 3)] * 3 and [f.index for f in frames] == [0, 0, 0]
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(InputError, match=r"source file://.*bad\.png: .*bad\.png: not a readable image"):
        check_startup(parse_uri(f"file://{tmp_path / 'bad.png'}"))
    with pytest.raises(InputError, match=r"image file .*gone\.jpg not found"):
        check_startup(parse_uri(f"file://{tmp_path / 'gone.jpg'}"))


def test_file_loop_and_pacing(tmp_path):
    path = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(3)])
    src = open_source(f"file://{path}?loop=1&fps=50")
    src.open()
    t0 = time.monotonic()
    idx = [src.read().index for _ in range(8)]
    dt = time.monotonic() - t0
    src.close()
    assert idx == [0, 1, 2, 0, 1, 2, 0, 1]
    assert dt >= 7 / 50 * 0.8  # paced like a 50 fps camera


def test_dir_source_name_order(tmp_path):
    import cv2

    for name, v in (("b.png", 20), ("a.png", 10), ("c.jpg", 30), ("notes.txt", 0)):
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            cv2.imwrite(str(tmp_path / name), np.full((8, 8, 3), v, np.uint8))
    src = open_source(f"dir://{tmp_path}")
    src.open()
    vals = []
    while (f := src.read()) is not None:
        vals.append((f.truth["file"], int(f.image.mean())))
    assert [v[0] for v in vals] == ["a.png", "b.png", "c.jpg"]
    assert [v[1] for v in vals[:2]] == [10, 20]
    # looping: each pass counts from 0 again, as a looping file does
    src = open_source(f"dir://{tmp_path}?loop=1")
    src.open()
    got = [(f.index, f.truth["file"]) for f in (src.read() for _ in range(5))]
    assert got == [(0, "a.png"), (1, "b.png"), (2, "c.jpg"), (0, "a.png"), (1, "b.png")]


def test_synthetic_source_plants_known_defects():
    src = open_source("synthetic://disc?size=64&defect_rate=0.5&seed=1&count=12")
    src.open()
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    assert len(frames) == 12 and frames[0].image.shape == (64, 64, 3)
    labels = [f.truth["label"] for f in frames]
    assert 0 < sum(labels) < 12
    assert all((f.truth["defect_type"] == "good") == (f.truth["label"] == 0) for f in frames)


def test_missing_file_or_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        check_startup(parse_uri(f"file://{tmp_path}/missing.mp4"))
    with pytest.raises(InputError, match="folder"):
        check_startup(parse_uri(f"dir://{tmp_path}/missing"))


def test_a_video_whose_path_is_not_utf8_is_refused_naming_it_not_a_crash(tmp_path):
    """file:// of a video named with a byte that is not UTF-8 (Python holds it as the lone surrogate '\\udcff'):
    OpenCV's VideoCapture crashed the process (SIGSEGV). It is an input error naming the file (its byte as
    \\xff) and the fix."""
    import os

    odd = tmp_path / os.fsdecode(b"v\xff.avi")
    os.rename(write_video(tmp_path / "v.avi", [part_frame(0, 32)]), odd)
    with pytest.raises(InputError, match=r"v\\xff\.avi: OpenCV cannot open a video whose path is not valid UTF-8 .*"
                                         "rename the file or its folder"):
        check_startup(parse_uri(f"file://{odd}"))


def test_undecodable_file_or_unreadable_folder_is_an_input_error(tmp_path):
    import cv2

    text = tmp_path / "text.mp4"
    text.write_text("hello\n")
    with pytest.raises(InputError, match=r"text\.mp4 is not a video OpenCV/FFmpeg can decode"):
        check_startup(parse_uri(f"file://{text}"))
    check_startup(parse_uri(f"file://{write_video(tmp_path / 'v.avi', [part_frame(0, 32)])}"))  # a real one passes
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"no images .* in {empty}"):
        check_startup(parse_uri(f"dir://{empty}"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not a png")
    with pytest.raises(InputError, match=r"none of the 1 images .*/a\.png: not a readable image"):
        check_startup(parse_uri(f"dir://{junk}"))
    cv2.imwrite(str(junk / "b.png"), np.full((8, 8, 3), 50, np.uint8))
    check_startup(parse_uri(f"dir://{junk}"))  # one readable image is enough


def test_dir_source_skips_unreadable_images_without_replaying(tmp_path):
    import cv2

    for name, v in (("a.png", 10), ("c.png", 30)):
        cv2.imwrite(str(tmp_path / name), np.full((8, 8, 3), v, np.uint8))
    (tmp_path / "b.png").write_text("truncated")
    cam = Camera(open_source(f"dir://{tmp_path}"), threading.Event(), backoff_initial_s=0.01)
    got = []
    while (f := cam.read()) is not None:
        got.append(f.truth["file"])
    cam.close()
    assert got == ["a.png", "c.png"] and cam.outages == 0  # was a, a, a, ...: each bad image reopened the folder
    src = open_source(f"dir://{tmp_path}?loop=1")
    src.open()
    assert [src.read().truth["file"] for _ in range(4)] == ["a.png", "c.png", "a.png", "c.png"]
    for name in ("a.png", "c.png"):
        (tmp_path / name).write_text("gone bad")
    with pytest.raises(SourceLost, match="none of the 3 images can be read"):
        for _ in range(4):
            src.read()


def test_dir_source_skips_and_counts_an_image_over_the_pixel_limit(tmp_path, caplog):
    """An image whose header declares more pixels than OpenCV decodes raised a cv2.error that killed the
    capture thread (and a traceback at the start's probe). It is skipped with a warning naming its size and
    counted in skipped_images, as an unreadable image is (docs/runtime.md)."""
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.full((8, 8, 3), 10, np.uint8))
    (tmp_path / "b.pgm").write_bytes(b"P5\n100000 100000\n255\n")
    caplog.set_level("WARNING", logger="edge_ad.runtime.sources")
    check_startup(parse_uri(f"dir://{tmp_path}"))   # a.png is readable
    src = open_source(f"dir://{tmp_path}?loop=1")
    src.open()
    assert [src.read().truth["file"] for _ in range(3)] == ["a.png"] * 3 and src.skipped == 2
    said = [r.getMessage() for r in caplog.records if "b.pgm" in r.getMessage()]
    assert len(said) == 1 and "100000 x 100000 pixels" in said[0], said
    (tmp_path / "a.png").unlink()
    with pytest.raises(InputError, match=r"none of the 1 images .*b\.pgm: image of 100000 x 100000 pixels"):
        check_startup(parse_uri(f"dir://{tmp_path}"))


def test_looping_dir_warns_once_per_unreadable_image_and_counts_every_skip(tmp_path, caplog):
    """A looping dir:// said 'skipped ... not a readable image' at every pass (every 2.5 s for 25 images at
    10 fps, forever). It is said once per file; every skip is still counted; a file that becomes readable is
    read (and warned about again should it break once more)."""
    import cv2

    for name, v in (("a.png", 10), ("c.png", 30)):
        cv2.imwrite(str(tmp_path / name), np.full((8, 8, 3), v, np.uint8))
    (tmp_path / "b.png").write_text("truncated")
    caplog.set_level("WARNING", logger="edge_ad.runtime.sources")
    src = open_source(f"dir://{tmp_path}?loop=1")
    src.open()
    assert [src.read().truth["file"] for _ in range(8)] == ["a.png", "c.png"] * 4   # 4 passes
    said = [r.getMessage() for r in caplog.records if "b.png" in r.getMessage()]
    assert len(said) == 1 and "not a readable image" in said[0] and "once per file" in said[0], said
    assert src.skipped == 4
    cv2.imwrite(str(tmp_path / "b.png"), np.full((8, 8, 3), 20, np.uint8))        # fixed: simply read
    assert [src.read().truth["file"] for _ in range(3)] == ["a.png", "b.png", "c.png"]
    (tmp_path / "b.png").write_text("broken again")                                 # a new fault: said again
    assert [src.read().truth["file"] for _ in range(2)] == ["a.png", "c.png"]
    said = [r.getMessage() for r in caplog.records if "b.png" in r.getMessage()]
    assert len(said) == 2 and src.skipped == 5


# ----------------------------------------------------------------------------- outages
def test_removed_video_reconnects_when_it_comes_back(tmp_path):
    path = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(4)])
    events = []
    stop = threading.Event()
    cam = Camera(open_source(f"file://{path}?loop=1"), stop, on_event=events.append, backoff_initial_s=0.05,
                 backoff_max_s=0.2)
    assert cam.read().index == 0
    moved = tmp_path / "away.avi"
    os.replace(path, moved)             # unplugged: the next rewind finds no file
    threading.Timer(0.5, lambda: os.replace(moved, path)).start()
    t0 = time.monotonic()
    idx = [cam.read().index for _ in range(6)]
    assert time.monotonic() - t0 >= 0.4
    cam.close()
    assert idx[:3] == [1, 2, 3] and idx[3:] == [0, 1, 2]
    types = [e["type"] for e in events]
    assert types == ["source_lost", "source_restored"]
    assert "not found" in events[0]["reason"]
    assert cam.outages == 1 and cam.reconnects == 1 and cam.open_failures >= 1


def test_removed_video_gives_up_with_a_clear_message(tmp_path):
    path = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(2)])
    cam = Camera(open_source(f"file://{path}?loop=1"), threading.Event(), reconnect_attempts=3,
                 backoff_initial_s=0.01, backoff_max_s=0.02)
    cam.read()
    path.unlink()
    with pytest.raises(SourceLost) as ei:
        for _ in range(10):
            cam.read()
    msg = str(ei.value)
    assert "gave up after 3 reconnect attempt(s)" in msg and "v.avi" in msg and "not found" in msg


def test_dead_rtsp_url_fails_clearly_without_leaking_the_password():
    port = _free_port()   # nothing listens there: connection refused
    events = []
    cam = Camera(open_source(f"rtsp://admin:pw123@127.0.0.1:{port}/stream", open_timeout_s=2.0), threading.Event(),
                 on_event=events.append, reconnect_attempts=2, backoff_initial_s=0.05, backoff_max_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(SourceLost) as ei:
        cam.read()
    assert time.monotonic() - t0 < 20
    msg = str(ei.value)
    assert f"rtsp://***@127.0.0.1:{port}/stream" in msg and "could not open" in msg
    assert "pw123" not in msg and all("pw123" not in str(e) for e in events)
    assert events and events[0]["type"] == "source_lost" and cam.open_failures == 2


def test_an_rtsp_camera_that_never_answers_is_waited_for_open_timeout_s_and_named(caplog):
    """A host that takes the TCP connection and never answers (a camera hung, a wrong port on a live host)
    blocked the open for FFmpeg's own timeout with no word; now open_timeout_s bounds it, a WARNING names the
    camera while the open waits (once until an open succeeds, not at every reconnect), and the error says it
    did not answer in time. A port where nothing listens is said to refuse, at once."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)   # the kernel accepts the connections; nothing ever reads or answers
    port = silent.getsockname()[1]
    src = open_source(f"rtsp://admin:pw123@127.0.0.1:{port}/stream", open_timeout_s=1.0)
    try:
        with caplog.at_level("INFO", logger="edge_ad.runtime.sources"):
            for _ in range(2):
                t0 = time.monotonic()
                with pytest.raises(SourceLost) as ei:
                    src.open()
                assert time.monotonic() - t0 < 15     # not FFmpeg's own 30 s
                msg = str(ei.value)
                assert msg.startswith(f"rtsp://***@127.0.0.1:{port}/stream: could not open (no answer from "
                                      f"127.0.0.1:{port} within source.open_timeout_s = 1 s"), msg
    finally:
        silent.close()
    said = [r for r in caplog.records if r.name == "edge_ad.runtime.sources"]
    waits = [r.getMessage() for r in said if r.levelname == "WARNING"]
    assert waits == [f"rtsp://***@127.0.0.1:{port}/stream: no answer yet after 0.5 s; waiting up to 1 s "
                     "(source.open_timeout_s)"], waits
    assert sum("opening; waiting up to 1 s" in r.getMessage() for r in said if r.levelname == "INFO") == 2
    assert all("pw123" not in r.getMessage() for r in caplog.records)

    refused = _free_port()
    with pytest.raises(SourceLost, match=f"127.0.0.1:{refused} refused or closed the connection after"):
        open_source(f"rtsp://127.0.0.1:{refused}/stream", open_timeout_s=5.0).open()


def test_an_opencv_without_the_open_timeout_opens_rtsp_without_it_and_says_so(monkeypatch, caplog):
    """An OpenCV build without CAP_PROP_OPEN_TIMEOUT_MSEC (an old one) cannot take open_timeout_s: the camera is
    opened without it (it raised AttributeError) and a WARNING says FFmpeg's own timeout applies, once."""
    import cv2

    monkeypatch.delattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC")
    port = _free_port()
    src = open_source(f"rtsp://admin:pw123@127.0.0.1:{port}/stream", open_timeout_s=1.0)
    with caplog.at_level("WARNING", logger="edge_ad.runtime.sources"):
        for _ in range(2):
            with pytest.raises(SourceLost, match="within FFmpeg's own timeout, the connection refused"):
                src.open()
    said = [r.getMessage() for r in caplog.records if "CAP_PROP_OPEN_TIMEOUT_MSEC" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"rtsp://***@127.0.0.1:{port}/stream: this OpenCV"), said


def test_each_rtsp_open_gets_its_own_transport_and_a_users_ffmpeg_options_are_kept(monkeypatch, caplog):
    """rtsp_transport went into OPENCV_FFMPEG_CAPTURE_OPTIONS with os.environ.setdefault: the first open of
    the process set it for good, and a later open with another transport (a second camera, a reopen after a
    reload) got the first one's. Each open now sets its own, under a lock, and removes it after; a value the
    user set in the environment is used as it is, and said once."""
    import cv2

    from edge_ad.runtime import sources

    seen = []
    env = "OPENCV_FFMPEG_CAPTURE_OPTIONS"

    def capture(target, *args):       # what FFmpeg would read at this open, and whether another open could run
        lock = getattr(sources, "_ffmpeg_env_lock", None)
        seen.append((target, os.environ.get(env), lock is not None and lock.locked()))
        return _FakeCapture()

    monkeypatch.setattr(cv2, "VideoCapture", capture)
    monkeypatch.setenv(env, "x")    # (restored after the test)
    monkeypatch.delenv(env)
    tcp = open_source("rtsp://admin:pw@cam1/s", rtsp_transport="tcp")
    udp = open_source("rtsp://cam2/s", rtsp_transport="udp")
    for src in (tcp, udp, tcp):
        src.open()
        src.close()
    assert seen == [("rtsp://admin:pw@cam1/s", "rtsp_transport;tcp", True),
                    ("rtsp://cam2/s", "rtsp_transport;udp", True), ("rtsp://admin:pw@cam1/s", "rtsp_transport;tcp", True)]
    assert env not in os.environ       # nothing left for the next open (a video file's)
    # the user's own options: used as they are, for every open, and said once per value and transport
    seen.clear()
    monkeypatch.setenv(env, "rtsp_transport;udp|headers;Authorization: Basic c2VjcmV0")
    with caplog.at_level("INFO", logger="edge_ad.runtime.sources"):
        for src in (tcp, tcp, udp, udp):
            src.open()
            src.close()
    user = "rtsp_transport;udp|headers;Authorization: Basic c2VjcmV0"
    assert [v for _, v, _ in seen] == [user] * 4
    assert os.environ[env] == user
    said = [(r.levelname, r.getMessage()) for r in caplog.records if env in r.getMessage()]
    assert said == [
        ("WARNING", "rtsp://***@cam1/s: OPENCV_FFMPEG_CAPTURE_OPTIONS is set in the environment (options: "
                    "rtsp_transport=udp, headers): FFmpeg opens the camera with it, not with source.rtsp_transport = "
                    "tcp (FFmpeg's default transport applies unless it names one; unset the variable, or put "
                    "rtsp_transport;tcp in it)"),
        ("INFO", "rtsp://cam2/s: OPENCV_FFMPEG_CAPTURE_OPTIONS is set in the environment (options: "
                 "rtsp_transport=udp, headers): FFmpeg opens the camera with it")]
    assert "c2VjcmV0" not in caplog.text


def test_a_video_file_opened_while_a_camera_opens_gets_no_camera_ffmpeg_options(monkeypatch, tmp_path):
    """A video file's open (OpenCV's FFmpeg backend, which reads OPENCV_FFMPEG_CAPTURE_OPTIONS at each open)
    did not take the lock an rtsp:// open holds while the variable holds its rtsp_transport: a file opened in
    another thread meanwhile was opened with the camera's options. It now waits for the camera's open to end
    and opens with the environment as the user left it (here: unset)."""
    import cv2

    from edge_ad.runtime import sources

    env = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
    monkeypatch.setenv(env, "x")    # (restored after the test)
    monkeypatch.delenv(env)
    real_capture, real_lock = cv2.VideoCapture, sources._ffmpeg_env_lock
    camera_opening, camera_answers, file_waits = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def capture(target, *args):       # a camera that answers when told; a real open of the video file
        seen[str(target)] = os.environ.get(env)
        if str(target).startswith("rtsp://"):
            camera_opening.set()
            camera_answers.wait(30)
            return _FakeCapture()
        file_waits.set()
        return real_capture(target, *args)

    class Watched:                    # the lock, saying when the file's thread asks for it
        def __enter__(self):
            if threading.current_thread().name == "file":
                file_waits.set()
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    monkeypatch.setattr(cv2, "VideoCapture", capture)
    monkeypatch.setattr(sources, "_ffmpeg_env_lock", Watched())
    video = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(3)])
    camera = open_source("rtsp://cam1/s", rtsp_transport="udp")
    clip = open_source(f"file://{video}")
    frames = []

    def read_clip():
        clip.open()
        frames.extend(iter(clip.read, None))
        clip.close()

    threads = [threading.Thread(target=camera.open, name="camera"), threading.Thread(target=read_clip, name="file")]
    threads[0].start()
    assert camera_opening.wait(30)
    threads[1].start()
    assert file_waits.wait(30)        # the file's open asked for the lock (or, unlocked, opened already)
    camera_answers.set()
    for t in threads:
        t.join(30)
    camera.close()
    assert seen == {"rtsp://cam1/s": "rtsp_transport;udp", str(video): None}
    assert len(frames) == 3 and env not in os.environ


class _StallingSource(Source):
    """A camera that delivers two frames, then blocks in read() until released."""

    def __init__(self):
        super().__init__(parse_uri("v4l2:///dev/video9"))
        self.release = threading.Event()
        self.n = 0

    def open(self):
        pass

    def read(self):
        self.n += 1
        if self.n == 3:
            self.release.wait(10)
        return RawFrame(np.zeros((4, 4, 3), np.uint8), self.n)


def test_watchdog_declares_an_outage_when_no_frame_arrives():
    src = _StallingSource()
    events = []
    cam = Camera(src, threading.Event(), on_event=events.append, watchdog_s=0.2)
    cam.read()
    cam.read()
    t = threading.Thread(target=cam.read)
    t.start()
    time.sleep(0.1)
    assert not cam.watchdog()
    time.sleep(0.25)
    assert cam.watchdog() and cam.watchdog_trips == 1 and cam.in_outage
    assert "watchdog" in events[-1]["reason"]
    src.release.set()
    t.join(5)
    assert not cam.in_outage and [e["type"] for e in events] == ["source_lost", "source_restored"]


@pytest.mark.parametrize("kind", ["synthetic", "dir"])
def test_pacing_slower_than_the_watchdog_is_no_outage(tmp_path, kind):
    """A source paced at fps=2 (a frame every 0.5 s) under a 0.2 s watchdog: the pacing wait comes before
    the read and is not a blocked read, so the watchdog checks made while it waits find nothing."""
    if kind == "synthetic":
        uri = "synthetic://disc?size=32&count=3&fps=2"
    else:
        import cv2

        for i in range(3):
            cv2.imwrite(str(tmp_path / f"{i}.png"), part_frame(i, 32))
        uri = f"dir://{tmp_path}?fps=2"
    events = []
    stop = threading.Event()
    cam = Camera(open_source(uri), stop, on_event=events.append, watchdog_s=0.2)
    assert cam.read() is not None            # the first frame is due at once
    got = []
    t = threading.Thread(target=lambda: got.extend([cam.read(), cam.read()]))
    t0 = time.monotonic()
    t.start()
    trips = []
    while t.is_alive() and time.monotonic() - t0 < 5:
        trips.append(cam.watchdog())
        time.sleep(0.05)
    t.join(5)
    assert all(f is not None for f in got) and len(got) == 2
    assert time.monotonic() - t0 >= 0.8      # still paced: two more frames at 2 fps
    assert len(trips) >= 10 and not any(trips)
    assert cam.watchdog_trips == 0 and cam.outages == 0 and events == []
    assert cam.read() is None                # the end comes without a wait
    assert time.monotonic() - t0 < 2.0


def test_pacing_wait_ends_at_stop():
    stop = threading.Event()
    cam = Camera(open_source("synthetic://disc?size=32&fps=0.05"), stop, watchdog_s=10)
    assert cam.read() is not None            # due at once; the next one in 20 s
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert cam.read() is None and time.monotonic() - t0 < 5


class _PacedSource(Source):
    """A paced source that notes when its pacing wait ended and when its read began (perf_counter)."""

    def __init__(self):
        super().__init__(parse_uri("synthetic://disc?fps=1000"))
        self.marks = []

    def open(self):
        pass

    def wait_turn(self, stop=None):
        ok = super().wait_turn(stop)
        self.marks.append(("waited", time.perf_counter()))
        return ok

    def read(self):
        self._pace()
        self.marks.append(("read", time.perf_counter()))
        return RawFrame(np.zeros((4, 4, 3), np.uint8), len(self.marks))


def test_read_started_is_after_the_pacing_wait():
    """The capture time the pipeline uses (start of stages_ms.capture and latency_ms, and ts) is when the
    read began, after a paced source's wait: that wait is neither capture nor latency."""
    src = _PacedSource()
    cam = Camera(src, threading.Event())
    for _ in range(3):
        wall = time.time()
        assert cam.read() is not None
        (w, waited), (r, read) = src.marks[-2:]
        assert (w, r) == ("waited", "read")
        assert waited <= cam.read_started[0] <= read and cam.read_started[1] >= wall


def test_reconnect_off_fails_at_once(tmp_path):
    path = write_video(tmp_path / "v.avi", [part_frame(0, 32)])
    cam = Camera(open_source(f"file://{path}?loop=1"), threading.Event(), reconnect=False)
    cam.read()
    path.unlink()
    with pytest.raises(SourceLost, match="reconnect is off"):
        cam.read()


# ----------------------------------------------------------------------------- through the CLI
def _config(tmp_path: Path, uri: str, extra: str = "") -> Path:
    bundle = tmp_path / "bundle"
    if not bundle.exists():
        make_tiny_bundle(bundle)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nbundle = "bundle"\nbackend = "onnxruntime"\ndevice = "cpu"\n\n[source]\nuri = "{uri}"\n'
                   f'backoff_initial_s = 0.05\nbackoff_max_s = 0.1\n{extra}\n[output]\njsonl = "out.jsonl"\n'
                   "[drift]\nenabled = false\n")
    return cfg


def test_run_on_a_dead_rtsp_camera_exits_1_with_the_reason(tmp_path):
    port = _free_port()
    cfg = _config(tmp_path, f"rtsp://op:pw999@127.0.0.1:{port}/cam", "reconnect_attempts = 2\nopen_timeout_s = 2\n")
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "error:" in r.stderr and "gave up after 2 reconnect attempt(s)" in r.stderr
    assert "pw999" not in r.stderr + r.stdout


def test_run_on_a_missing_file_exits_2(tmp_path):
    cfg = _config(tmp_path, "file://nope.avi")
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.avi" in r.stderr and "not found" in r.stderr


def test_run_and_capture_on_a_file_that_is_not_a_video_exit_2_at_once(tmp_path):
    text = tmp_path / "text.mp4"
    text.write_text("hello\n")
    cfg = _config(tmp_path, f"file://{text}")
    t0 = time.monotonic()
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{text} is not a video" in r.stderr and "outage" not in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60  # was: reconnecting forever
    from click.testing import CliRunner
    from edge_ad.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    for src in (f"file://{text}", f"dir://{empty}"):
        res = CliRunner().invoke(main, ["capture", "--source", src, "--out", str(tmp_path / "cap"), "--frames", "2"])
        assert res.exit_code == 2 and "error: source" in res.output, res.output
        assert not (tmp_path / "cap").exists()  # no empty output folder


def test_capture_of_a_source_that_is_not_there_exits_2_at_once_unless_config_waits(tmp_path):
    """'edge-ad capture --source v4l2:///dev/video0 ...' (the README's example) on a machine without that camera
    printed one outage warning and then waited for it for ever. Without --config a source that cannot be
    opened at the start is exit 2 naming it and what to check, before --out is made; with --config the
    config's reconnect settings wait for it, each outage saying that it retries and how to stop."""
    dev = next(f"/dev/video{n}" for n in range(90, 200) if not os.path.exists(f"/dev/video{n}"))
    out = tmp_path / "n" / "normals"
    for uri, said in ((f"v4l2://{dev}", f"error: v4l2://{dev}: {dev} does not exist (camera unplugged?): cannot "
                                        "capture from it; check that the camera is plugged in"),
                      (f"dir://{tmp_path / 'nope'}", f"error: source dir://{tmp_path / 'nope'}: folder")):
        r = subprocess.run([*EDGE_AD, "capture", "--source", uri, "--out", str(out), "--frames", "3", "--every",
                            "0.5"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and said in r.stderr and "outage" not in r.stderr, r.stderr
        assert not (tmp_path / "n").exists()
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[source]\nuri = "v4l2://{dev}"\nreconnect_attempts = 2\nbackoff_initial_s = 0.05\n')
    r = subprocess.run([*EDGE_AD, "capture", "--config", str(cfg), "--out", str(out), "--frames", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "gave up after 2 reconnect attempt(s)" in r.stderr, r.stderr
    assert (f"retrying with back-off (up to 2 attempts, source.reconnect_attempts of {cfg}); Ctrl-C to stop"
            in r.stderr), r.stderr
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("prefix", ["../../escape_", "nosub/x", "..", ".hidden", "a\\b"])
def test_capture_prefix_is_a_plain_file_name_prefix(tmp_path, prefix):
    from click.testing import CliRunner
    from edge_ad.cli import main

    path = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(3)])
    out = tmp_path / "a" / "b" / "cap"
    res = CliRunner().invoke(main, ["capture", "--source", f"file://{path}", "--out", str(out), "--frames", "2",
                                    "--prefix", prefix])
    assert res.exit_code == 2 and "--prefix" in res.output, res.output
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("escape_*"))  # nothing written anywhere


@pytest.mark.parametrize("every", ["inf", "nan", "-1", "1e300"])
def test_capture_every_must_be_a_finite_number_of_seconds(tmp_path, every):
    from click.testing import CliRunner
    from edge_ad.cli import main

    res = CliRunner().invoke(main, ["capture", "--source", "synthetic://disc?size=32", "--out", str(tmp_path / "c"),
                                    "--frames", "2", "--every", every])
    assert res.exit_code == 2 and "--every" in res.output and not (tmp_path / "c").exists(), res.output


def test_run_duration_must_be_finite():
    from click.testing import CliRunner
    from edge_ad.cli import main

    for bad in ("nan", "inf", "0"):
        res = CliRunner().invoke(main, ["run", "--duration", bad, "--source", "synthetic://disc"])
        assert res.exit_code == 2 and "--duration" in res.output, res.output


def test_capture_saves_frames(tmp_path):
    path = write_video(tmp_path / "v.avi", [part_frame(i, 48) for i in range(6)])
    out = tmp_path / "normals"
    r = subprocess.run([*EDGE_AD, "capture", "--source", f"file://{path}", "--out", str(out), "--frames", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(4)]
    from edge_ad.data.image import load_image

    assert load_image(files[0]).shape == (48, 48, 3)
    # a second session into the same folder goes on numbering: the first frames are not overwritten
    before = files[0].read_bytes()
    r = subprocess.run([*EDGE_AD, "capture", "--source", f"file://{path}", "--out", str(out), "--frames", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "numbering goes on from frame_00004" in r.stderr, r.stderr
    assert [f.name for f in sorted(out.glob("*.png"))] == [f"frame_{i:05d}.png" for i in range(6)]
    assert files[0].read_bytes() == before
    # asking for more frames than a file holds saves what there is and says so
    r = subprocess.run([*EDGE_AD, "capture", "--source", f"file://{path}", "--out", str(tmp_path / "all"),
                        "--frames", "10", "--every", "0.01", "--format", "jpg"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "saved 6 frames" in r.stdout and "source ended" in r.stdout


@pytest.mark.parametrize("sig, code, said", [(2, 130, "interrupted"), (15, 143, "stopped by SIGTERM")])
def test_capture_stopped_by_a_signal_says_so_and_exits_as_stopped(tmp_path, sig, code, said):
    """Ctrl-C (or SIGTERM) ended a capture with exit 0 and "the source ended or capture was interrupted",
    though it knows which: now it says, and exits 130 (143), as a training stopped so does; the frames saved
    so far stay."""
    import signal

    out = tmp_path / "normals"
    p = subprocess.Popen([*EDGE_AD, "capture", "--source", "synthetic://disc?size=32", "--out", str(out),
                          "--frames", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("frame_*.png")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.Signals(sig))
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == code, stderr
    saved = len(list(out.glob("frame_*.png")))
    assert stdout == f"saved {saved} frames to {out} (asked for 1000000; {said})\n" and saved > 0, stderr


def test_capture_config_needs_no_model_and_a_bad_roi_leaves_no_folder(tmp_path):
    """Frames are captured before any bundle exists: a config of [source] alone is enough (it asked for a
    [model] it never used); an ROI outside the frame is an error that leaves no empty --out behind."""
    path = write_video(tmp_path / "v.avi", [part_frame(i, 48) for i in range(4)])
    cfg = tmp_path / "cam.toml"
    cfg.write_text('[source]\nuri = "file://ignored.avi"\nroi = [8, 8, 32, 24]\n')
    out = tmp_path / "normals"
    r = subprocess.run([*EDGE_AD, "capture", "--source", f"file://{path}", "--out", str(out), "--frames", "2",
                        "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from edge_ad.data.image import load_image

    assert load_image(sorted(out.glob("*.png"))[0]).shape == (24, 32, 3)
    cfg.write_text('[source]\nuri = "file://ignored.avi"\nroi = [40, 8, 32, 24]\n')
    r = subprocess.run([*EDGE_AD, "capture", "--source", f"file://{path}", "--out", str(tmp_path / "bad" / "deeper"),
                        "--frames", "2", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "source.roi" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()   # nor the parent it made


def test_capture_config_skips_a_folder_image_the_roi_does_not_fit_as_run_does(tmp_path, caplog):
    """capture --config with dir:// stopped (exit 2, naming no file) at the first image smaller than
    source.roi, where run skips it with a warning naming it (the same RoiFilter now decides both); a folder
    the ROI fits no image of is still exit 2, leaving no empty --out."""
    import cv2
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.data.image import load_image

    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"{i:03d}.png"), part_frame(i, 32 if i == 2 else 96))
    cfg = tmp_path / "cam.toml"
    cfg.write_text('[source]\nuri = "dir://ignored"\nroi = [8, 8, 64, 64]\n')
    out = tmp_path / "normals"
    caplog.set_level("WARNING")
    res = CliRunner().invoke(main, ["capture", "--source", f"dir://{folder}", "--out", str(out), "--frames", "4",
                                    "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "saved 4 frames" in res.output and f"1 images of dir://{folder} skipped" in res.output
    assert (f"skipped dir://{folder} 002.png: source.roi [8, 8, 64, 64] reaches outside the 32x32 frame"
            in caplog.text)
    saved = sorted(out.glob("*.png"))
    assert [load_image(p).shape for p in saved] == [(64, 64, 3)] * 4
    assert load_image(saved[2]).tolist() == load_image(folder / "003.png")[8:72, 8:72].tolist()   # 002 left out
    cfg.write_text('[source]\nuri = "dir://ignored"\nroi = [0, 0, 100, 100]\n')
    res = CliRunner().invoke(main, ["capture", "--source", f"dir://{folder}", "--out", str(tmp_path / "none"),
                                    "--frames", "2", "--config", str(cfg)])
    assert res.exit_code == 2 and "source.roi [0, 0, 100, 100] fits none of the 5 images" in res.output, res.output
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("uri", ["dir://frames?fps=native", "synthetic://disc?fps=native"])
def test_native_pacing_is_refused_where_the_source_has_no_frame_rate(uri):
    """fps=native is a video file's own rate: on a folder or a generated source it paced nothing at all."""
    from edge_ad.errors import InputError

    with pytest.raises(InputError, match="option fps: 'native' is a video file's own frame rate"):
        parse_uri(uri)
    assert parse_uri(uri.replace("native", "12")).options["fps"] == 12.0
