"""Backend conformance: every backend present gives the same raw maps and the same decisions.

Parameterized over onnxruntime (CPU always; CUDA / TensorRT execution providers when present), native
TensorRT and torch (CPU; CUDA when present); an absent one is skipped with the reason. Reference: the
torch module itself in FP32 on the CPU. FP32 backends must agree to 1e-4 relative (to each map's
maximum) and give identical OK/NG decisions at the calibration threshold.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_ad import models, scoring  # noqa: E402
from edge_ad.bundle import Bundle  # noqa: E402
from edge_ad.data.image import to_batch  # noqa: E402
from edge_ad.data.synthetic import make_part, write_category  # noqa: E402
from edge_ad.errors import InputError  # noqa: E402
from edge_ad.inspector import Inspector  # noqa: E402
from edge_ad.runtime.backends import available, open_backend  # noqa: E402

SIZE = 64


def make_bundle(path, kind="efficientad-s", size=SIZE, seed=0):
    """A bundle with checkpoint, model.onnx and a calibration fitted on synthetic normal parts."""
    from edge_ad.compile.export import export_bundle

    torch.manual_seed(seed)
    m = models.build(kind, size, pretrained=False).eval()
    with torch.no_grad():  # random weights, but keep maps in a sane range
        for p in m.parameters():
            p.mul_(0.5)
    b = Bundle.create(path, models.describe(m, kind, size, models.default_config(kind)))
    cat = write_category(Path(path).parent / f"{Path(path).name}-data", n_train=16, n_test_good=4,
                         n_test_defect=2, size=size, kind="grain", seed=seed)
    b.manifest["training"] = {"data": str(cat)}
    import io
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    b.add_file("checkpoint.pt", data=buf.getvalue())
    export_bundle(b, m, progress=False)
    normals = to_batch([make_part("grain", size, None, seed=1, index=i).image for i in range(8)], (size, size))
    with torch.inference_mode():
        raw = dict(zip(m.output_names, (t.numpy() for t in m(torch.from_numpy(normals)))))
    cal = scoring.Calibration(maps=scoring.fit_map_norms(raw), threshold=0.0, map_pad=int(m.map_pad))
    s = scoring.score(raw, cal).scores
    b.write_calibration(cal.replace(threshold=float(np.quantile(s, 0.5)), policy="fpr:0.5"))
    return b, m


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("backends") / "b")


@pytest.fixture(scope="module")
def batch():
    frames = [make_part("grain", SIZE, d, seed=2, index=i).image
              for i, d in enumerate([None, "scratch", None, "spot", "crack"])]
    return to_batch(frames, (SIZE, SIZE))


@pytest.fixture(scope="module")
def reference(bundle, batch):
    b, m = bundle
    with torch.inference_mode():
        ref = dict(zip(m.output_names, (t.numpy() for t in m(torch.from_numpy(batch)))))
    # threshold halfway between the 3rd and 4th score: some OK, some NG, no score near the threshold
    s = np.sort(scoring.score(ref, b.calibration()).scores)
    b.write_calibration(b.calibration().replace(threshold=float(0.5 * (s[2] + s[3]))))
    return ref


CASES = [
    ("onnxruntime", "cpu", "onnxruntime:cpu"),
    ("onnxruntime", "cuda", "onnxruntime:cuda"),
    ("onnxruntime", "tensorrt", "onnxruntime:tensorrt"),
    ("tensorrt", "cuda:0", "tensorrt"),
    ("torch", "cpu", "torch:cpu"),
    ("torch", "cuda", "torch:cuda"),
    ("openvino", "cpu", "openvino:cpu"),
]


def _open_case(b, backend, device, key):
    ok, why = available()[key]
    if not ok:
        pytest.skip(f"{backend} on {device}: {why}")
    if backend == "tensorrt":  # a real engine, built and guarded on this GPU
        from edge_ad.compile.tensorrt import compile_bundle

        compile_bundle(b, "fp32", max_batch=4, guard_normals=4, progress=False)
    return open_backend(b, backend, "fp32", device)


@pytest.mark.parametrize("backend,device,key", CASES, ids=[c[2] for c in CASES])
def test_conformance(bundle, batch, reference, backend, device, key):
    b, _ = bundle
    be = _open_case(b, backend, device, key)
    try:
        assert be.name == backend
        assert be.precision == "fp32"
        assert be.output_names == b.outputs == ["map_st", "map_ae"]
        assert tuple(be.image_size) == (SIZE, SIZE)
        assert be.max_batch >= 1
        out = be.infer(batch)
        assert list(out) == b.outputs
        for name, ref in reference.items():
            got = out[name]
            assert got.dtype == np.float32 and got.shape == ref.shape
            err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
            assert err <= 1e-4, f"{name}: relative error {err:.2e}"
        cal = b.calibration()
        ref_scored = scoring.score(reference, cal)
        got_scored = Inspector(b, be).inspect_batch(batch)
        assert np.array_equal(ref_scored.ng, got_scored.ng)
        assert ref_scored.ng.any() and not ref_scored.ng.all()  # the decision test means something
        np.testing.assert_allclose(got_scored.scores, ref_scored.scores, rtol=1e-4, atol=1e-6)
    finally:
        be.close()
        be.close()  # twice is fine


def test_onnxruntime_splits_batches_beyond_max_batch(bundle, batch, reference):
    b, _ = bundle
    with open_backend(b, "onnxruntime", "fp32", "cpu", max_batch=2) as be:
        out = be.infer(batch)
    for name, ref in reference.items():
        assert out[name].shape == ref.shape
        assert np.max(np.abs(out[name] - ref)) / np.max(np.abs(ref)) <= 1e-4


def test_bad_inputs_are_refused_with_the_expected_shape(bundle, batch):
    b, _ = bundle
    with open_backend(b, "onnxruntime", "fp32", "cpu") as be:
        with pytest.raises(InputError, match=r"expected \[B, 3, 64, 64\]"):
            be.infer(batch[:, :, :32])
        with pytest.raises(InputError, match="empty batch"):
            be.infer(batch[:0])
        out = be.infer(batch[:1].astype(np.float64))  # converted, not refused
        assert out["map_st"].dtype == np.float32


def test_auto_on_cpu_is_onnxruntime_with_the_active_graph(bundle):
    b, _ = bundle
    with open_backend(b, "auto", device="cpu") as be:
        assert be.name == "onnxruntime" and be.precision == "fp32" and be.device == "cpu"
        assert be.graph.name == "model.onnx"


def test_open_backend_errors_name_the_choices(bundle):
    b, _ = bundle
    with pytest.raises(InputError, match="expected one of auto, onnxruntime, tensorrt, torch, openvino"):
        open_backend(b, "mxnet")
    with pytest.raises(InputError, match="precision 'int4'"):
        open_backend(b, "onnxruntime", "int4")
    with pytest.raises(InputError, match="model.int8.onnx: not found; run 'edge-ad quantize"):
        open_backend(b, "onnxruntime", "int8", "cpu")
    with pytest.raises(InputError, match="onnxruntime device 'tpu'"):
        open_backend(b, "onnxruntime", "fp32", "tpu")
    with pytest.raises(InputError, match="torch fp16 needs a CUDA device"):
        open_backend(b, "torch", "fp16", "cpu")


def test_open_backend_takes_a_bundle_folder_and_the_compile_doc_example_runs(bundle, tmp_path):
    """docs/compile.md showed open_backend(bundle, ...) without saying what bundle is, and a folder's path
    failed deep inside ('str' object has no attribute 'active_precision'). A path is opened with
    Bundle.open, anything else is a TypeError, and the doc's example (Bundle.open, a batch, infer) runs."""
    import re

    import cv2

    b, _ = bundle
    for path in (str(b.path), b.path):
        with open_backend(path, "onnxruntime", device="cpu") as be:
            assert be.name == "onnxruntime" and be.graph == b.file("model.onnx")
    with pytest.raises(TypeError, match="bundle is a int; expected a Bundle"):
        open_backend(3)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "compile.md").read_text()
    code = re.search(r"## Backends\n\n```python\n(.*?)```", doc, flags=re.S).group(1)
    assert 'Bundle.open("bundles/mt")' in code and 'load_image("part.png")' in code
    cv2.imwrite(str(tmp_path / "part.png"), make_part("grain", SIZE, None, seed=3).image[:, :, ::-1])
    names = {}
    exec(code.replace("bundles/mt", str(b.path)).replace("part.png", str(tmp_path / "part.png")), names)
    assert set(names["outputs"]) == set(b.manifest["model"]["outputs"])
    assert all(v.dtype == np.float32 and v.shape[0] == 1 for v in names["outputs"].values())


def test_corrupt_graph_is_refused(bundle, tmp_path):
    import shutil

    shutil.copytree(bundle[0].path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    data = bytearray(b.file("model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    b.file("model.onnx").write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match manifest.json"):
        open_backend(b, "onnxruntime", "fp32", "cpu")


def test_runtime_backends_import_without_torch():
    code = ("import sys; import edge_ad.runtime.backends as b, edge_ad.runtime.backends.onnxruntime, "
            "edge_ad.runtime.backends.tensorrt, edge_ad.runtime.backends.engine_cache, "
            "edge_ad.runtime.backends.cuda, edge_ad.compile.guard, edge_ad.compile.quantize, "
            "edge_ad.compile.tensorrt; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnxruntime_thread_spinning_option(bundle, batch, reference):
    b, _ = bundle
    for spin, want in ((False, "0"), (True, "1")):
        with open_backend(b, "onnxruntime", "fp32", "cpu", spinning=spin, threads=2) as be:
            entry = be._sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            assert entry == want
            out = be.infer(batch)
        np.testing.assert_allclose(out["map_st"], reference["map_st"], rtol=1e-4, atol=1e-5 * reference["map_st"].max())


def test_run_settings_choose_openvino_and_spinning(bundle, batch):
    from edge_ad.config import load_settings, parse_set_option
    from edge_ad.runtime.service import open_inspector

    b, _ = bundle
    src = parse_set_option("source.uri=synthetic://")
    bad = [src, parse_set_option("model.backend=mxnet")]
    with pytest.raises(InputError, match="model.backend.*expected auto, onnxruntime, tensorrt, torch or openvino"):
        load_settings(None, bad)
    s = load_settings(None, [src, parse_set_option(f"model.bundle={b.path}"),
                             parse_set_option("model.thread_spinning=false")])
    assert s.model.thread_spinning is False
    insp = open_inspector(b, s)
    try:
        be = insp.backend
        assert be.name == "onnxruntime"
        assert be._sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        insp.backend.close()
    ok, why = available()["openvino:cpu"]
    if not ok:
        pytest.skip(why)
    s = load_settings(None, [src, parse_set_option(f"model.bundle={b.path}"), parse_set_option("model.backend=openvino"),
                             parse_set_option("model.thread_spinning=false")])  # ignored by OpenVINO
    insp = open_inspector(b, s)
    try:
        assert insp.backend.name == "openvino"
        assert insp.inspect_batch(batch).scores.shape == (len(batch),)
    finally:
        insp.backend.close()
