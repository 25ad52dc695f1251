"""INT8 / FP16 graphs and the accuracy guard (real ONNX Runtime quantizer, real guard, real files)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_ad.bundle import Bundle  # noqa: E402
from edge_ad.compile import guard as guard_mod  # noqa: E402
from edge_ad.compile.guard import GuardLimits  # noqa: E402
from edge_ad.compile.quantize import graph_heads, quantize_bundle  # noqa: E402
from edge_ad.errors import GuardFailure, InputError  # noqa: E402
from edge_ad.runtime.backends import open_backend  # noqa: E402

from test_backends import make_bundle  # noqa: E402

# A random-weight EfficientAD's scores differ between images by less than INT8 noise, so its guard
# result says nothing; these limits pass anything and test the mechanics. The default limits
# (0.005 / 0.99) are tested on a pretrained Gaussian model (fp16) and by the failure test.
PASS_ALL = GuardLimits(max_auroc_drop=1.0, min_rank_corr=-1.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    b, _ = make_bundle(tmp_path_factory.mktemp("quant") / "b")
    return b


@pytest.fixture(scope="module")
def int8(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8") / "b"
    shutil.copytree(base.path, d)
    b = Bundle.open(d)
    res = quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=PASS_ALL, progress=False)
    return b, res


def _nodes(path):
    return onnx.load(str(path)).graph


def test_int8_writes_both_forms_and_switches_in(int8):
    b, res = int8
    assert res.files == ["model.int8.onnx", "model.int8-u8.onnx"]
    b2 = Bundle.open(b.path, verify=True)  # both recorded with their sha256
    assert b2.active_graph == "model.int8.onnx" and b2.active_precision == "int8"
    report = json.loads(b.file("quant_report.json").read_text())
    assert set(report["candidates"]) == {"onnxruntime-int8", "onnxruntime-int8-u8"}
    for e in report["candidates"].values():
        assert e["passed"] and e["n_images"]["normal"] == 4 and e["n_images"]["synthetic"] == 4
        assert {"rank_corr", "max_map_error", "agreement", "auroc"} <= set(e)
    assert b.manifest["quantized"]["int8"]["fp32_nodes"] == res.fp32_nodes


def test_int8_forms_signed_symmetric_and_unsigned(int8):
    b, res = int8
    for fname, act_type in (("model.int8.onnx", onnx.TensorProto.INT8), ("model.int8-u8.onnx", onnx.TensorProto.UINT8)):
        g = _nodes(b.file(fname))
        inits = {i.name: i for i in g.initializer}
        qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
        assert qs, fname
        for q in qs:  # activations: zero point type says signed/unsigned; signed ones are symmetric
            zp = onnx.numpy_helper.to_array(inits[q.input[2]])
            assert inits[q.input[2]].data_type == act_type
            if act_type == onnx.TensorProto.INT8:
                assert np.all(zp == 0)
        # weights: per-channel symmetric int8 (a DequantizeLinear on an int8 initializer with a scale vector)
        wdq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
        assert wdq
        assert any(onnx.numpy_helper.to_array(inits[n.input[1]]).size > 1 for n in wdq)
        assert all(np.all(onnx.numpy_helper.to_array(inits[n.input[2]]) == 0) for n in wdq if len(n.input) > 2)


def test_head_convs_stay_fp32(int8):
    b, res = int8
    assert len(res.fp32_nodes) >= 2   # the last conv of every map path (teacher, student, autoencoder)
    g = _nodes(b.file("model.int8.onnx"))
    produced_by = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.name in res.fp32_nodes:
            w = n.input[1]
            assert w not in produced_by or produced_by[w].op_type != "DequantizeLinear", n.name


def test_cpu_runs_the_u8_form_and_matches_fp32_closely(int8):
    b, _ = int8
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32)
    with open_backend(b, "onnxruntime", None, "cpu") as q, open_backend(b, "onnxruntime", "fp32", "cpu") as f:
        assert q.precision == "int8" and q.graph.name == "model.int8-u8.onnx"
        qo, fo = q.infer(x), f.infer(x)
    for k in fo:
        assert np.isfinite(qo[k]).all() and qo[k].shape == fo[k].shape
    with open_backend(b, "onnxruntime", "int8", "cpu", int8_form="s8") as s8:
        assert s8.graph.name == "model.int8.onnx"
    with open_backend(b, "auto", "int8-u8", "cpu") as u8:
        assert u8.graph.name == "model.int8-u8.onnx"


def test_guard_failure_changes_nothing(base, tmp_path):
    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    before = b.file("manifest.json").read_text()
    strict = GuardLimits(max_auroc_drop=-1.0, min_rank_corr=0.99)  # an AUROC drop below -1 is impossible
    with pytest.raises(GuardFailure, match=r"(?s)nothing was switched in.*onnxruntime-int8: synthetic AUROC fell"):
        quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=strict, progress=False)
    b = Bundle.open(tmp_path / "b", verify=True)
    assert b.active_graph == "model.onnx" and b.active_precision == "fp32"
    assert not b.has("model.int8.onnx") and not b.has("model.int8-u8.onnx")
    report = json.loads(b.file("quant_report.json").read_text())
    assert report["candidates"]["onnxruntime-int8"]["passed"] is False
    assert report["candidates"]["onnxruntime-int8"]["failures"]
    mf_before, mf_after = json.loads(before), json.loads(b.file("manifest.json").read_text())
    assert mf_after["active"] == mf_before["active"]
    assert not list(b.path.glob(".quantize-*"))   # the work folder is gone


def test_fp16_keeps_io_fp32_and_passes_the_default_guard(tmp_path):
    from edge_ad import models
    from edge_ad.compile.export import export_bundle
    from edge_ad.data.synthetic import write_category

    m = models.build("gaussian", 64, pretrained=True)   # ImageNet EfficientNet-Lite0 features
    b = Bundle.create(tmp_path / "g", models.describe(m, "gaussian", 64, models.default_config("gaussian")))
    cat = write_category(tmp_path / "cat", n_train=40, n_test_good=4, n_test_defect=2, size=64, kind="grain")
    b.manifest["training"] = {"data": str(cat)}
    b.save_manifest()
    export_bundle(b, m, progress=False)
    res = quantize_bundle(b, "fp16", guard_normals=16, progress=False)   # default limits
    assert res.files == ["model.fp16.onnx"] and b.active_precision == "fp16"
    assert res.entries[0]["passed"] and res.entries[0]["rank_corr"] >= 0.99
    g = _nodes(b.file("model.fp16.onnx"))
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in g.output)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
    with open_backend(b, "onnxruntime", None, "cpu") as be:
        assert be.precision == "fp16"
        assert be.infer(np.zeros((1, 3, 64, 64), np.float32))["feat"].dtype == np.float32


def test_missing_calibration_source_is_an_input_error(base, tmp_path):
    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    b.manifest.pop("training")
    b.save_manifest()
    with pytest.raises(InputError, match="--calib DIR"):
        quantize_bundle(b, "int8", progress=False)
    with pytest.raises(InputError, match="precision 'int4'"):
        quantize_bundle(b, "int4", progress=False)


def test_graph_heads():
    from onnx import helper, TensorProto

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, 8, 8])
    y = helper.make_tensor_value_info("map", TensorProto.FLOAT, ["b", 1, 8, 8])
    nodes = [helper.make_node("Conv", ["image", "w1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c"], name="c2"),
             helper.make_node("Mul", ["c", "c"], ["sq"], name="sq"),
             helper.make_node("ReduceMean", ["sq"], ["map"], name="mean", keepdims=1, axes=[1])]
    g = helper.make_graph(nodes, "g", [x], [y])
    heads, convs = graph_heads(helper.make_model(g))
    assert convs == ["c2"] and heads == ["sq", "mean"]


def test_guard_metrics():
    assert guard_mod.spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert guard_mod.spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)
    assert list(guard_mod.rankdata(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]
    assert guard_mod.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert guard_mod.auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(guard_mod.auroc(np.array([0.5, 0.6]), np.array([0, 0])))


def test_planted_defects_change_the_image_where_the_mask_is():
    from edge_ad.data.synthetic import make_part

    img = make_part("grain", 64, None, seed=0).image
    rng = np.random.default_rng(1)
    for _ in range(8):
        out, mask = guard_mod.plant_defect(img, rng)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert mask.sum() >= 8
        assert np.abs(out.astype(int) - img.astype(int))[mask].mean() > 5
