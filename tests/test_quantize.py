"""INT8 / FP16 graphs and the accuracy guard (real ONNX Runtime quantizer, real guard, real files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_ad.bundle import Bundle  # noqa: E402
from edge_ad.compile import guard as guard_mod  # noqa: E402
from edge_ad.compile.guard import GuardLimits  # noqa: E402
from edge_ad.compile import qgraph  # noqa: E402
from edge_ad.compile.quantize import (CONV_OPS, INT8_FORMS, _Reader, calibrate, check_cpu_kernels,  # noqa: E402
                                      graph_heads, quantize_bundle, quantize_int8_form, sensitivity_search)
from edge_ad.errors import GuardFailure, InputError, RuntimeFailure  # noqa: E402
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
    res = quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=PASS_ALL, keep_fp32="head",
                          progress=False, bias_images=4)
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
        # TensorRT's parser refuses a DequantizeLinear of INT32 (ORT's default bias quantization): the
        # signed form, which TensorRT builds, keeps its conv biases in float
        int32_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                    and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
        if act_type == onnx.TensorProto.INT8:
            assert int32_dq == [], [n.name for n in int32_dq[:3]]


def test_activations_are_quantized_over_their_range(int8):
    """A conv followed by ReLU / ReLU6 is quantized over the activation's range (0..6 after ReLU6), not
    over its raw output's; the u8 form folds the activation into that quantization, the s8 form keeps it."""
    b, _ = int8
    u8, s8 = _nodes(b.file("model.int8-u8.onnx")), _nodes(b.file("model.int8.onnx"))
    def after_int8_conv(g):
        produced = {o: n for n in g.node for o in n.output}
        return [n for n in g.node if n.op_type in ("Clip", "Relu") and n.input[0] in produced
                and produced[n.input[0]].op_type == "Conv" and produced[produced[n.input[0]].input[1]].op_type
                == "DequantizeLinear"]

    def after_dq(g):
        produced = {o: n for n in g.node for o in n.output}
        return [n for n in g.node if n.op_type in ("Clip", "Relu") and n.input[0] in produced
                and produced[n.input[0]].op_type == "DequantizeLinear"]

    assert not after_int8_conv(u8) and not after_dq(u8)   # folded into the conv's output quantization
    assert after_dq(s8)                                    # kept between Q/DQ pairs
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in u8.initializer}
    produced = {o: n for n in u8.node for o in n.output}
    after_conv = [n for n in u8.node if n.op_type == "QuantizeLinear" and n.input[0] in produced
                  and produced[n.input[0]].op_type == "Conv"]
    assert after_conv
    zero_at_min = [q for q in after_conv if int(inits[q.input[2]]) == 0]   # rectified: range starts at 0
    assert len(zero_at_min) >= len(after_conv) // 2
    teacher_relu6 = [q for q in zero_at_min if "/teacher/" in q.input[0]]
    assert teacher_relu6 and all(float(inits[q.input[1]]) * 255 <= 6.0 + 1e-4 for q in teacher_relu6)


def test_prepared_graph_is_exact_and_rewritten(base, tmp_path):
    """Pads fused into convs, PDN's average pools as depthwise convs, RGB convs widened: same outputs."""
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32)
    path, done = qgraph.prepare_graph(base.file("model.onnx"), tmp_path / "p.onnx", check_batch=x)
    assert done["pads_fused"] >= 10 and done["pools_to_convs"] == 2
    assert not [n for n in _nodes(path).node if n.op_type in ("Pad", "AveragePool")]
    wide, n = qgraph.widened(path, tmp_path / "w.onnx", check_batch=x)   # the CPU form's graph
    assert n == 3   # teacher stem, student and autoencoder first convs
    g = _nodes(wide)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    pads = [inits[n.input[1]].tolist() for n in g.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(p == [0, 0, 0, 0, 0, 1, 0, 0] for p in pads)   # one per RGB input
    ref = qgraph.session(base.file("model.onnx")).run(None, {"image": x})
    for p in (path, wide):
        for r, c in zip(ref, qgraph.session(p).run(None, {"image": x})):
            assert np.max(np.abs(r - c)) <= 1e-4 * np.max(np.abs(r))
    bad = onnx.load(str(wide))   # a rewrite that changed the numbers is refused
    w = next(i for i in bad.graph.initializer if i.name.endswith("_as_depthwise_w"))
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1.5, w.name))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(RuntimeFailure, match="differs from"):
        qgraph.check_same(wide, tmp_path / "bad.onnx", x)


def test_fuse_pads_handles_asymmetric_same_padding():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["image", "pads"], ["p"], name="pad", mode="constant"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", strides=[2, 2], pads=[1, 0, 0, 0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, 9, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, pads])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(1, 2, 9, 8)).astype(np.float32)
    ref = qgraph.session(m).run(None, {"image": x})[0]
    assert qgraph.fuse_pads(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Conv"]
    assert list(next(a for a in m.graph.node[0].attribute if a.name == "pads").ints) == [1, 1, 1, 2]
    np.testing.assert_allclose(qgraph.session(m).run(None, {"image": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_bias_correction_takes_out_the_mean_shift(base, tmp_path):
    """After correction, every conv's per-channel output mean on the calibration images matches FP32's
    far better, and the maps move closer to FP32's. Both measured on the Q/DQ arithmetic the graph
    defines (what TensorRT, ARM and VNNI CPUs compute): ONNX Runtime's fused kernels on an x86 CPU with
    AVX2 and no VNNI saturate, and their maps say little about the graph."""
    from edge_ad.compile import guard as gm
    from edge_ad.data.image import load_image, to_batch

    pool, _ = gm.training_images(base)
    batch = to_batch([load_image(p) for p in pool[:8]], base.image_size)
    src, _ = qgraph.prepare_graph(base.file("model.onnx"), tmp_path / "p.onnx")
    cache = calibrate(src, _Reader(pool[:8], base.image_size), tmp_path / "cal.json")
    q = quantize_int8_form(src, tmp_path / "q.onnx", "int8", cache)
    before = tmp_path / "before.onnx"
    shutil.copy(q, before)
    summary = qgraph.correct_bias(src, q, batch)
    ref_m, q_m, b_m = onnx.load(str(src)), onnx.load(str(q)), onnx.load(str(before))
    # every quantized conv with a constant bias is corrected: 51 of 53 with onnxruntime 1.32 (the convs made
    # of PDN's pools have none). 1.30's pre-processing leaves the exported chains unfolded: 22 of them read
    # their bias through the exporter's Identity nodes (this random model's zero biases, deduplicated and
    # shared), which the correction follows, giving each conv its own copy
    convs = _quantized_convs_with_bias(b_m)
    assert convs and summary["convs"] == len(convs) and summary["applied"]
    depths = qgraph.conv_depths(b_m)
    assert summary["levels"] == len({depths[c] for c in convs}) > 1
    out_of = {n.name: n.output[0] for n in q_m.graph.node if n.op_type == "Conv"}
    ref_out = {n.name: n.output[0] for n in ref_m.graph.node if n.op_type == "Conv"}
    r = qgraph._channel_means(ref_m, [ref_out[c] for c in convs], batch, 8, 0)
    err = {}
    for name, m in (("before", b_m), ("after", q_m)):
        got = qgraph._channel_means(m, [out_of[c] for c in convs], batch, 8, 0)
        err[name] = np.mean([np.abs(got[out_of[c]] - r[ref_out[c]]).mean() for c in convs])
    assert err["after"] < 0.25 * err["before"]
    fp32 = qgraph.graph_outputs(src, batch, exact=True)
    dist = {k: qgraph.map_error(fp32, p, batch, exact=True) for k, p in (("before", before), ("after", q))}
    assert dist["after"] < dist["before"]
    assert dist["before"] == pytest.approx(summary["map_error_before"], rel=1e-4)
    assert dist["after"] == pytest.approx(summary["map_error_after"], rel=1e-4)


def _quantized_convs_with_bias(model) -> list[str]:
    """Convs of a Q/DQ graph whose weights are dequantized and whose bias is a constant: an initializer, or
    the DequantizeLinear of one (the INT32 bias of the u8 form), read directly or through Identity nodes."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    produced = {o: n for n in g.node for o in n.output}

    def source(t):
        return qgraph._through_identity(t, produced)[0]

    def dequantized(t, of_init=False):
        return t in produced and produced[t].op_type == "DequantizeLinear" and \
            (not of_init or source(produced[t].input[0]) in inits)

    return [n.name for n in g.node if n.op_type == "Conv" and dequantized(n.input[1]) and len(n.input) > 2
            and (source(n.input[2]) in inits or dequantized(source(n.input[2]), of_init=True))]


def _tiny_model(nodes, inits, output="y"):
    from onnx import TensorProto, helper

    outputs = [output] if isinstance(output, str) else list(output)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 4, 4])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [onnx.numpy_helper.from_array(np.asarray(v, dt), k) for k, (v, dt) in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)   # any onnxruntime


def test_bias_correction_measures_the_graphs_own_arithmetic(tmp_path):
    """A conv whose float bias (0.5) is not a multiple of its input scale x weight scale (1): ONNX Runtime's
    fused QLinearConv rounds it into an INT32 bias (0), the Q/DQ graph and FP32 keep it. Bias correction
    must measure the graph's own arithmetic, or it writes this machine's kernel error into the graph
    (here +0.5 into the next conv's bias; on an x86 CPU without VNNI, VPMADDUBSW's saturation)."""
    from onnx import helper

    f, i8 = np.float32, np.int8
    ref = _tiny_model([helper.make_node("Conv", ["image", "w", "b"], ["y1"], name="conv1"),
                       helper.make_node("Conv", ["y1", "w", "b2"], ["y"], name="conv2")],
                      {"w": (np.ones((1, 1, 1, 1)), f), "b": ([0.5], f), "b2": ([0.0], f)})
    q = _tiny_model([helper.make_node("QuantizeLinear", ["image", "one", "zp"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "one", "zp"], ["xd"]),
                     helper.make_node("DequantizeLinear", ["wq", "one", "zp"], ["wd"]),
                     helper.make_node("Conv", ["xd", "wd", "b"], ["y1"], name="conv1"),
                     helper.make_node("QuantizeLinear", ["y1", "half", "zp"], ["y1q"]),
                     helper.make_node("DequantizeLinear", ["y1q", "half", "zp"], ["y1d"]),
                     helper.make_node("Conv", ["y1d", "wd", "b2"], ["y"], name="conv2")],
                    {"one": (1.0, f), "half": (0.5, f), "zp": (0, i8), "wq": (np.ones((1, 1, 1, 1)), i8),
                     "b": ([0.5], f), "b2": ([0.0], f)})
    onnx.save(ref, str(tmp_path / "ref.onnx"))
    onnx.save(q, str(tmp_path / "q.onnx"))
    x = (np.arange(32, dtype=np.float32) % 7).reshape(2, 1, 4, 4)
    want = x + 0.5
    np.testing.assert_array_equal(qgraph.session(tmp_path / "q.onnx", exact=True).run(None, {"image": x})[0], want)
    summary = qgraph.correct_bias(tmp_path / "ref.onnx", tmp_path / "q.onnx", x)
    assert summary["convs"] == 2 and summary["largest_shift"] < 1e-6
    np.testing.assert_array_equal(qgraph.session(tmp_path / "q.onnx", exact=True).run(None, {"image": x})[0], want)


# how the two convs of the quantized graph read their bias (1.0 each): conv name -> its bias input; the nodes that
# make it from the initializers "b", "b1", "b2" and "bq" (INT32 2 at scale 0.5); how many convs get their own copy
# (one reading a shared bias gets a copy, the other keeps the original; a conv whose Identity or DequantizeLinear
# nothing else reads, but whose initializer another Identity reads, gets one too)
_BIAS_WIRING = {
    "identity": ({"conv1": "b1i", "conv2": "b2i"}, [("Identity", ["b1"], "b1i"), ("Identity", ["b2"], "b2i")], 0),
    "shared": ({"conv1": "b", "conv2": "b"}, [], 1),
    "shared_identity": ({"conv1": "bi", "conv2": "bi"}, [("Identity", ["b"], "bi")], 1),
    "identities_of_one": ({"conv1": "bi1", "conv2": "bi2"}, [("Identity", ["b"], "bi1"), ("Identity", ["b"], "bi2")],
                          2),
    "shared_int32": ({"conv1": "bd", "conv2": "bd"}, [("DequantizeLinear", ["bq", "half"], "bd")], 1),
    "int32_identity": ({"conv1": "bd", "conv2": "bd"}, [("Identity", ["bq"], "bqi"),
                                                        ("DequantizeLinear", ["bqi", "half"], "bd")], 1),
}


@pytest.mark.parametrize("wiring", list(_BIAS_WIRING))
def test_bias_correction_follows_identity_nodes_and_corrects_a_shared_bias_per_conv(tmp_path, wiring):
    """Two convs whose FP32 biases are 0 and 0.5, both 1.0 in the quantized graph. A bias read through an
    Identity node (an exporter's, for a deduplicated initializer) was not corrected at all, and a bias that
    both convs read was corrected twice, each time by one conv's error (ending at -0.5 for both). Each conv
    now gets its own copy when the bias is read elsewhere too, and both come out exact."""
    from onnx import helper

    f, i32 = np.float32, np.int32
    w = {"w1": (np.ones((1, 1, 1, 1)), f), "w2": (2 * np.ones((1, 1, 1, 1)), f)}
    ref = _tiny_model([helper.make_node("Conv", ["image", "w1", "r1"], ["y1"], name="conv1"),
                       helper.make_node("Conv", ["image", "w2", "r2"], ["y2"], name="conv2")],
                      {**w, "r1": ([0.0], f), "r2": ([0.5], f)}, output=("y1", "y2"))
    bias_of, made, copies = _BIAS_WIRING[wiring]
    consts = {"b": ([1.0], f), "b1": ([1.0], f), "b2": ([1.0], f), "bq": ([2], i32), "half": (0.5, f)}
    used = {t for _, ins, _ in made for t in ins} | set(bias_of.values())
    q = _tiny_model([helper.make_node(op, ins, [out]) for op, ins, out in made]
                    + [helper.make_node("Conv", ["image", f"w{i}", bias_of[f"conv{i}"]], [f"y{i}"], name=f"conv{i}")
                       for i in (1, 2)],
                    {**w, **{k: v for k, v in consts.items() if k in used}}, output=("y1", "y2"))
    onnx.save(ref, str(tmp_path / "ref.onnx"))
    onnx.save(q, str(tmp_path / "q.onnx"))
    x = (np.arange(32, dtype=np.float32) % 7).reshape(2, 1, 4, 4)
    want = qgraph.session(ref).run(None, {"image": x})
    summary = qgraph.correct_bias(tmp_path / "ref.onnx", tmp_path / "q.onnx", x)
    assert summary["convs"] == 2 and summary["applied"], summary
    assert summary["largest_shift"] == pytest.approx(1.0) and summary["map_error_after"] == pytest.approx(0, abs=1e-6)
    assert summary["biases_copied"] == copies
    got = qgraph.session(tmp_path / "q.onnx", exact=True).run(None, {"image": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)
    m = onnx.load(str(tmp_path / "q.onnx"))
    read = {t for n in m.graph.node for t in n.input} | {o.name for o in m.graph.output}
    assert all(set(n.output) & read for n in m.graph.node) and all(i.name in read for i in m.graph.initializer)


def test_a_bias_correction_that_moves_the_outputs_away_is_left_out(tmp_path):
    """The conv's mean is 1 too high, but an error after it takes that back: correcting the conv's bias
    would move the output 1 away from FP32's, so the graph is left as it was."""
    from onnx import helper

    f = np.float32
    ref = _tiny_model([helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv"),
                       helper.make_node("Add", ["c", "shift"], ["y"])],
                      {"w": (np.ones((1, 1, 1, 1)), f), "b": ([0.0], f), "shift": (0.0, f)})
    q = _tiny_model([helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv"),
                     helper.make_node("Add", ["c", "shift"], ["y"])],
                    {"w": (np.ones((1, 1, 1, 1)), f), "b": ([1.0], f), "shift": (-1.0, f)})
    onnx.save(ref, str(tmp_path / "ref.onnx"))
    onnx.save(q, str(tmp_path / "q.onnx"))
    kept = (tmp_path / "q.onnx").read_bytes()
    x = (np.arange(32, dtype=np.float32) % 5).reshape(2, 1, 4, 4)
    summary = qgraph.correct_bias(tmp_path / "ref.onnx", tmp_path / "q.onnx", x)
    assert summary["largest_shift"] == pytest.approx(1.0)
    assert not summary["applied"] and summary["map_error_after"] > summary["map_error_before"] == 0.0
    assert (tmp_path / "q.onnx").read_bytes() == kept


def test_keep_fp32_none_quantizes_every_conv(base, tmp_path):
    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    res = quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=PASS_ALL, keep_fp32="none",
                          progress=False, bias_images=4)
    assert res.fp32_nodes == []
    for fname in INT8_FORMS.values():
        g = _nodes(b.file(fname))
        produced = {o: n for n in g.node for o in n.output}
        for n in g.node:
            if n.op_type in CONV_OPS:
                assert n.input[1] in produced and produced[n.input[1]].op_type == "DequantizeLinear", n.name
    q = b.manifest["quantized"]["int8"]
    assert q["calibration"] == "minmax" and q["bias_correction"]["int8-u8"]["convs"] > 0
    for bias in q["bias_correction"].values():   # whether the correction was kept, and why
        assert bias["applied"] == (bias["map_error_after"] < bias["map_error_before"])


def test_auto_keeps_the_sensitivity_outliers_in_fp32(base, tmp_path):
    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    res = quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=PASS_ALL, progress=False, bias_images=4,
                          outlier_factor=2.0, max_fp32_layers=3)   # default keep_fp32: auto
    table = res.details["sensitivity"]
    errs = [r["error_alone"] for r in table]
    assert errs == sorted(errs, reverse=True) and len(table) >= 40   # every conv but the map head's
    outliers = [r["node"] for r in table if r["error_alone"] >= 2.0 * np.median(errs)]
    assert res.fp32_nodes == outliers[:3] and res.fp32_nodes
    assert b.manifest["quantized"]["int8"]["keep_fp32"] == "auto"
    assert b.manifest["quantized"]["int8"]["judged"] == {"int8": "exact", "int8-u8": "fused", "sensitivity": "exact"}
    assert b.manifest["quantized"]["int8"]["fp32_nodes"] == res.fp32_nodes


def _guard_images(b):
    """The guard's images for a bundle quantized with ``guard_normals=4``, with FP32's outputs on them."""
    _, held_out = guard_mod.training_images(b)
    gset = guard_mod.prepare_guard_set(b, held_out, n_normal=4)
    gset.reference = qgraph.graph_outputs(b.file("model.onnx"), gset.batch)
    return gset


def test_the_guard_judges_each_int8_form_on_its_targets_arithmetic(int8):
    """The TensorRT form is judged on the graph's own Q/DQ arithmetic (TensorRT's), not on this CPU's fused
    ONNX Runtime kernels, which saturate on x86 CPUs without VNNI; the CPU form on those kernels, which are
    what runs it here. The report and the manifest say which."""
    b, res = int8
    gset = _guard_images(b)
    err = {(form, exact): qgraph.map_error(gset.reference, b.file(f), gset.batch, exact=exact)
           for form, f in INT8_FORMS.items() for exact in (True, False)}
    e = {x["candidate"]: x for x in res.entries}
    s8, u8 = e["onnxruntime-int8"], e["onnxruntime-int8-u8"]
    assert s8["arithmetic"] == "exact" and s8["backend"]["int8_arithmetic"] == "exact"
    assert s8["rel_map_error"] == pytest.approx(err["int8", True], rel=1e-4)
    assert u8["arithmetic"] == "fused" and u8["backend"]["int8_arithmetic"] == "fused"
    assert u8["rel_map_error"] == pytest.approx(err["int8-u8", False], rel=1e-4)
    saturates, cpu = qgraph.cpu_int8_kernels()
    assert u8["cpu"] == cpu and "cpu" not in s8
    if saturates:   # x86 without VNNI: the CPU form's exact error is measured beside, to compare
        assert u8["rel_map_error_exact"] == pytest.approx(err["int8-u8", True], rel=1e-4)
    else:
        assert "rel_map_error_exact" not in u8
    q = b.manifest["quantized"]["int8"]
    assert q["judged"] == {"int8": "exact", "int8-u8": "fused"} and q["cpu"] == cpu   # head: no search
    report = json.loads(b.file("quant_report.json").read_text())["candidates"]
    assert [report[f"onnxruntime-{f}"]["arithmetic"] for f in INT8_FORMS] == ["exact", "fused"]


def test_int8_kernels_that_saturate_are_named_with_both_map_errors(int8, monkeypatch, caplog):
    """On an x86 CPU without VNNI, a CPU form whose map error on the fused kernels is much worse than in
    the graph's own arithmetic gets a warning naming both and what to do; with VNNI (or on ARM) nothing
    is measured. The fused error is set by hand here: how far this CPU's kernels are off is the CPU's."""
    b, _ = int8
    gset = _guard_images(b)
    path = b.file("model.int8-u8.onnx")
    exact = qgraph.map_error(gset.reference, path, gset.batch, exact=True)
    monkeypatch.setattr(qgraph, "cpu_int8_kernels", lambda: (False, "x86_64 with VNNI (avx512_vnni)"))
    e = {"candidate": "onnxruntime-int8-u8", "rel_map_error": 3 * exact + 0.1}
    assert check_cpu_kernels(e, path, gset, progress=False) is None
    assert e == {"candidate": "onnxruntime-int8-u8", "rel_map_error": 3 * exact + 0.1,
                 "cpu": "x86_64 with VNNI (avx512_vnni)"}
    monkeypatch.setattr(qgraph, "cpu_int8_kernels", lambda: (True, "x86_64 without VNNI"))
    with caplog.at_level("WARNING", logger="edge_ad.compile.quantize"):
        msg = check_cpu_kernels(e, path, gset, progress=False)
    assert e["rel_map_error_exact"] == pytest.approx(exact, rel=1e-4) and e["warning"] == msg
    assert e["cpu"] == "x86_64 without VNNI" and "x86_64 without VNNI" in msg
    assert f"{3 * exact + 0.1:.3f}" in msg and f"{exact:.3f}" in msg
    assert "Run FP32 on this CPU" in msg and "FP16" not in msg   # FP16 is slower than FP32 on x86 CPUs
    assert "TensorRT" in msg and "ARM" in msg and "VNNI" in msg
    # logged once at WARNING, its text not prefixed with a second "WARNING:"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [msg]
    assert not msg.startswith("WARNING")
    assert msg in caplog.text
    close = {"candidate": "onnxruntime-int8-u8", "rel_map_error": 1.2 * exact}
    assert check_cpu_kernels(close, path, gset, progress=False) is None
    assert "warning" not in close and close["rel_map_error_exact"] == pytest.approx(exact, rel=1e-4)


def test_the_exact_int8_outputs_are_computed_once_for_both_checks(int8, monkeypatch):
    """On an x86 CPU without VNNI the CPU form's outputs in the graph's own arithmetic were computed twice on the
    guard images: by check_cpu_kernels (their map error) and again by judge_exact (the verdict in that arithmetic,
    when the fused kernels failed). They are computed once now, and the map error and the verdict are those of
    computing them on their own, as before."""
    import onnxruntime as ort

    from edge_ad.compile.quantize import judge_exact
    from edge_ad.runtime.backends.onnxruntime import OnnxRuntimeBackend

    b, _ = int8
    gset = _guard_images(b)
    path = b.file("model.int8-u8.onnx")
    ref = OnnxRuntimeBackend(b, precision="fp32", device="cpu")
    with OnnxRuntimeBackend(b, precision="int8", device="cpu", graph=path, exact=True) as cand:
        alone = guard_mod.evaluate(b, cand, gset, ref, GuardLimits())
    exact_error = qgraph.map_error(gset.reference, path, gset.batch, chunk=8, exact=True)
    images = []   # the images each session in the graph's own arithmetic ran
    real = ort.InferenceSession

    class Counted(real):
        def __init__(self, src, sess_options=None, *a, **k):
            super().__init__(src, sess_options, *a, **k)
            try:
                self.exact = sess_options.get_session_config_entry("session.disable_quant_qdq") == "1"
            except Exception:   # noqa: BLE001 - onnxruntime raises its own type for a key not set
                self.exact = False

        def run(self, names, feed, *a, **k):
            if self.exact:
                images.append(len(feed["image"]))
            return super().run(names, feed, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    monkeypatch.setattr(qgraph, "cpu_int8_kernels", lambda: (True, "x86_64 without VNNI"))
    e = {"candidate": "onnxruntime-int8-u8", "rel_map_error": 1.0}
    check_cpu_kernels(e, path, gset, progress=False)
    got = judge_exact(b, e, path, gset, ref, GuardLimits(), progress=False)
    assert sum(images) == len(gset)                                     # once, not twice
    assert e["rel_map_error_exact"] == exact_error
    assert got == e["exact_guard"] == {k: alone[k] for k in ("passed", "failures", "rank_corr")}
    ref.close()


def test_cpu_int8_kernels_reads_vnni_from_the_cpu_flags(tmp_path, monkeypatch):
    import platform

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(qgraph, "CPUINFO", str(info))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert qgraph.cpu_int8_kernels() == (True, "x86_64 without VNNI")
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert qgraph.cpu_int8_kernels() == (False, "x86_64 with VNNI (avx512_vnni)")
    info.write_text("flags\t\t: avx2 avx_vnni\n")
    assert qgraph.cpu_int8_kernels() == (False, "x86_64 with VNNI (avx_vnni)")
    info.unlink()
    saturates, words = qgraph.cpu_int8_kernels()
    assert saturates and "VNNI unknown" in words
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert qgraph.cpu_int8_kernels() == (False, "aarch64")


def test_the_sensitivity_search_judges_the_graphs_own_arithmetic(base, tmp_path, monkeypatch):
    """Each layer's error alone is measured on the graph's own Q/DQ arithmetic (every session on a trial
    graph is an exact one), not on this CPU's fused kernels: on an x86 CPU without VNNI those would rank
    the layers by how much the kernels saturate (this model's student.3 conv alone: 0.02 exact, 0.46 fused)."""
    pool, _ = guard_mod.training_images(base)
    batch = _to_batch(base, pool[:4])
    src, _ = qgraph.prepare_graph(base.file("model.onnx"), tmp_path / "p.onnx")
    cache = calibrate(src, _Reader(pool[:8], base.image_size), tmp_path / "cal.json")
    convs = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"]
    tried = [c for c in convs if c.startswith("/student/") and c.endswith("/Conv")][1:3]   # two, to keep it short
    rest = [c for c in convs if c not in tried]
    sessions = []
    real = qgraph.session
    monkeypatch.setattr(qgraph, "session",
                        lambda model, *a, **kw: sessions.append((model, kw)) or real(model, *a, **kw))
    kept, table = sensitivity_search(src, tmp_path, cache, None, batch, base_exclude=rest, progress=False)
    monkeypatch.undo()
    trials = [kw for model, kw in sessions if Path(str(model)).name.startswith("one-")]
    assert len(trials) == len(tried) and all(kw.get("exact") for kw in trials)
    assert sorted(r["node"] for r in table) == sorted(tried) and kept[:len(rest)] == rest
    ref = qgraph.graph_outputs(src, batch)
    for r in table:
        one = quantize_int8_form(src, tmp_path / "one.onnx", "int8", cache, only=[r["node"]])
        assert r["error_alone"] == pytest.approx(qgraph.map_error(ref, one, batch, exact=True), rel=1e-4)


def _to_batch(b, paths):
    from edge_ad.data.image import load_image, to_batch

    return to_batch([load_image(p) for p in paths], b.image_size)


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


def test_openvino_runs_the_guarded_int8_forms(int8):
    """OpenVINO picks the u8 form by default (or s8 on request) and its maps track ONNX Runtime's on the
    same graph to within INT8 rounding: the two engines round differently, never by a large amount."""
    pytest.importorskip("openvino")
    b, _ = int8
    x = np.random.default_rng(1).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32)
    for form, name in (("auto", "model.int8-u8.onnx"), ("s8", "model.int8.onnx")):
        with open_backend(b, "openvino", "int8", "cpu", int8_form=form) as ov, \
                open_backend(b, "onnxruntime", "int8", "cpu", int8_form=form) as ref:
            assert ov.graph.name == name == ref.graph.name
            got, want = ov.infer(x), ref.infer(x)
        for k in want:
            assert got[k].shape == want[k].shape and np.isfinite(got[k]).all()
            assert np.abs(got[k] - want[k]).max() <= 0.05 * np.abs(want[k]).max() + 1e-6, k
    with pytest.raises(InputError, match="int8_form 'x8'"):
        open_backend(b, "openvino", "int8", "cpu", int8_form="x8")


def test_guard_failure_changes_nothing(base, tmp_path):
    """... and a killed quantize's work folder (tens of MB, which 'edge-ad train --out' then refused as
    foreign) is removed by the next one, never one another quantize holds."""
    import fcntl
    import os
    from edge_ad.bundle import foreign_entries

    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    before = b.file("manifest.json").read_text()
    for name in (".quantize-killed", ".quantize-at-work"):
        (b.path / name).mkdir()
        (b.path / name / "model.int8.onnx").write_bytes(b"x" * 1000)
    assert foreign_entries(b.path) == []   # edge-ad's own
    fd = os.open(b.path / ".quantize-at-work", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as another quantize at work holds it
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
    os.close(fd)
    assert [p.name for p in b.path.glob(".quantize-*")] == [".quantize-at-work"]   # its own and the killed one's gone


def test_a_failed_guard_keeps_a_bundle_a_cut_re_export_left_whole(base, tmp_path):
    """A re-export cut by a power cut after model.onnx was renamed in (manifest 'replacing', the bundle
    verifies), then a quantize whose guard fails: its report write dropped 'replacing' and kept the old
    sha256 of model.onnx, so the bundle no longer opened. Now the new model.onnx is recorded."""
    import hashlib

    from fixtures_bundle import cut_replace

    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b", verify=True)
    m = onnx.load(str(b.file("model.onnx")))
    m.doc_string = "re-exported"   # the same graph, other bytes
    new = m.SerializeToString()
    b = cut_replace(b, {"model.onnx": new})
    strict = GuardLimits(max_auroc_drop=-1.0, min_rank_corr=0.99)  # an AUROC drop below -1 is impossible
    with pytest.raises(GuardFailure):
        quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=strict, progress=False)
    b = Bundle.open(tmp_path / "b", verify=True)
    assert "replacing" not in b.manifest
    assert b.manifest["files"]["model.onnx"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert json.loads(b.file("quant_report.json").read_text())["candidates"]["onnxruntime-int8"]["passed"] is False


def test_a_failure_while_switching_in_keeps_the_old_graphs(int8, tmp_path, monkeypatch):
    """Disk full while the second form is copied into the bundle: the first was already replaced and the
    manifest still held its old sha256, so the bundle no longer verified (nor packed). Now the old graphs
    stay in force, verified, and the guard report of the new ones (written before, as passed) goes in with
    them or not at all."""
    from fixtures_bundle import disk_full_for

    shutil.copytree(int8[0].path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    old = {n: b.file(n).read_bytes() for n in ("model.int8.onnx", "model.int8-u8.onnx")}
    old_manifest = json.loads(b.file("manifest.json").read_text())
    old_report = b.file("quant_report.json").read_bytes()
    with monkeypatch.context() as m:
        disk_full_for(m, "model.int8-u8.onnx", "copy_file")
        with pytest.raises(OSError, match="No space left"):
            quantize_bundle(b, "int8", samples=8, guard_normals=4, limits=PASS_ALL, keep_fp32="none",
                            bias_correction=False, progress=False)
    b = Bundle.open(tmp_path / "b", verify=True)
    assert b.active_graph == "model.int8.onnx" and b.active_precision == "int8"
    assert {n: b.file(n).read_bytes() for n in old} == old
    mf = b.manifest
    assert mf["quantized"] == old_manifest["quantized"]
    assert all(mf["files"][n] == old_manifest["files"][n] for n in old)
    assert b.file("quant_report.json").read_bytes() == old_report   # no report of graphs not switched in
    assert not list(b.path.glob(".new-*")) and not list(b.path.glob(".quantize-*"))


def test_fp16_keeps_io_fp32_and_passes_the_default_guard(tmp_path, capsys):
    """... and is written for GPUs and TensorRT, not made the active graph: it made a CPU line run FP16, which
    ONNX Runtime runs slower than FP32 on x86 CPUs, without a word. quantize says so; asked for, it runs."""
    from edge_ad import models
    from edge_ad.compile.export import export_bundle
    from edge_ad.data.synthetic import write_category

    m = models.build("gaussian", 64, pretrained=True)   # ImageNet EfficientNet-Lite0 features
    b = Bundle.create(tmp_path / "g", models.describe(m, "gaussian", 64, models.default_config("gaussian")))
    cat = write_category(tmp_path / "cat", n_train=40, n_test_good=4, n_test_defect=2, size=64, kind="grain")
    b.manifest["training"] = {"data": str(cat)}
    b.save_manifest()
    export_bundle(b, m, progress=False)
    res = quantize_bundle(b, "fp16", guard_normals=16, progress=True)   # default limits
    assert res.files == ["model.fp16.onnx"] and b.manifest["files"]["model.fp16.onnx"]
    assert b.active_graph == "model.onnx" and b.active_precision == "fp32"
    assert ("model.fp16.onnx is for GPUs and TensorRT (edge-ad compile --precision fp16, or model.precision = "
            "\"fp16\" on a GPU); the active graph stays, as ONNX Runtime runs FP16 slower than FP32 on x86 CPUs"
            ) in capsys.readouterr().err
    assert res.entries[0]["passed"] and res.entries[0]["rank_corr"] >= 0.99
    g = _nodes(b.file("model.fp16.onnx"))
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in g.output)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
    with open_backend(b, "onnxruntime", None, "cpu") as be:
        assert be.precision == "fp32"
    with open_backend(b, "onnxruntime", "fp16", "cpu") as be:
        assert be.graph.name == "model.fp16.onnx"
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


def test_test_limit_is_at_most_that_many_with_both_kinds(tmp_path):
    import cv2

    from edge_ad.compile.guard import real_test_images

    for sub, n in (("good", 30), ("scratch", 6), ("crack", 4)):
        (tmp_path / "test" / sub).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tmp_path / "test" / sub / f"{i:03d}.png"), np.full((8, 8, 3), i, np.uint8))
    for limit in (2, 3, 11, 39):
        items = real_test_images(tmp_path, limit)
        labels = [lab for _, lab in items]
        assert len(items) == limit and 0 < sum(labels) < limit, (limit, sum(labels))   # was 11 at limit 1
    assert len(real_test_images(tmp_path, 100)) == 40
    with pytest.raises(InputError, match="test limit 1: expected at least 2"):
        real_test_images(tmp_path, 1)


def test_guard_metrics():
    assert guard_mod.spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert guard_mod.spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)
    # a candidate that scores every image the same shares no order with one that varies
    assert guard_mod.spearman(np.array([1, 2, 3, 4.0]), np.full(4, 0.5)) == 0.0
    assert guard_mod.spearman(np.full(4, 0.5), np.full(4, 0.7)) == 1.0
    assert np.isnan(guard_mod.spearman(np.array([1, 2, 3, 4.0]), np.array([1, np.nan, 3, 4.0])))
    entry = {"auroc": {}, "rank_corr": 1.0, "agreement": 1.0, "max_map_error_rel": 0.0, "non_finite": 2}
    assert guard_mod.judge(entry, GuardLimits())[0].startswith("2 image score(s) not finite")
    entry["non_finite"] = 0
    assert guard_mod.judge(entry, GuardLimits()) == []
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


def test_an_entry_judged_again_under_other_limits(int8):
    """An entry measured under relaxed limits (as bench/speed.py keeps every graph) gives, judged again,
    the same verdict evaluate() would have given under those limits."""
    _, res = int8
    e = res.entries[0]
    assert e["passed"] and guard_mod.judge(e, PASS_ALL) == []
    strict = GuardLimits(max_auroc_drop=-1.0, min_rank_corr=1.01, min_agreement=1.01, max_map_error_rel=-1.0)
    msgs = guard_mod.judge(e, strict)
    assert len(msgs) == len(e["auroc"]) + 3
    assert any("rank correlation" in m for m in msgs) and any("decision agreement" in m for m in msgs)


@pytest.mark.parametrize("opt,bad", [("--samples", "0"), ("--samples", "-5"), ("--guard-normals", "0"),
                                     ("--guard-normals", "3"), ("--test-limit", "0"), ("--test-limit", "-1"),
                                     ("--threads", "-1"), ("--min-agreement", "nan"), ("--min-agreement", "1.5"),
                                     ("--max-auroc-drop", "nan"), ("--min-rank-corr", "inf")])
def test_quantize_options_are_checked_before_any_work(tmp_path, opt, bad):
    from click.testing import CliRunner

    from edge_ad.cli import main

    res = CliRunner().invoke(main, ["quantize", "--bundle", str(tmp_path / "missing"), "--precision", "int8",
                                    opt, bad])
    assert res.exit_code == 2 and f"Invalid value for '{opt}'" in res.output, res.output


def test_a_validation_split_too_small_for_the_guard_says_how_to_fix_it(tmp_path):
    """A bundle trained on 20 normals (2 held out) cannot be guarded on its own split: the error names the
    held-out count and both ways out (--calib, a larger --val-fraction), not 'give more images'."""
    from types import SimpleNamespace

    from edge_ad.compile import guard as gm
    from edge_ad.data.synthetic import write_category
    from edge_ad.errors import InputError

    data = write_category(tmp_path / "c", n_train=20, n_test_good=0, n_test_defect=0, size=32, kind="grain")
    imgs = sorted((data / "train" / "good").iterdir())
    b = SimpleNamespace(path=tmp_path / "b", manifest={"training": {"data": str(data),
                                                                    "val_images": [str(p) for p in imgs[-2:]]}})
    with pytest.raises(InputError, match=r"validation split holds 2 normal images.*at least 4 held out.*--calib "
                                         r"DIR.*larger --val-fraction"):
        gm.training_images(b)
    pool, held = gm.training_images(b, data)   # --calib: the last quarter held out
    assert (len(pool), len(held)) == (15, 5)


def test_quantize_says_how_many_held_out_normals_the_guard_uses(base, tmp_path, capsys):
    """It said '(79 held-out normal images are kept for the guard)' and then guarded on the default
    --guard-normals 32 of them. Now it says how many of the held-out normals the guard uses, and how to use
    more (and says it for FP16 too)."""
    from edge_ad.compile.quantize import guard_images_text
    from edge_ad.data.synthetic import write_category

    shutil.copytree(base.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    calib = write_category(tmp_path / "calib", n_train=24, n_test_good=0, n_test_defect=0, size=64, kind="grain")
    res = quantize_bundle(b, "fp16", calib_dir=calib, guard_normals=4, limits=PASS_ALL, progress=True)
    err = capsys.readouterr().err
    assert res.entries[0]["n_images"] == {"normal": 4, "synthetic": 4, "real": 0}
    assert ("(the guard uses 4 of the 6 held-out normal images, and the same 4 with planted defects; "
            "--guard-normals to use more)") in err, err
    assert "held-out normal images are kept" not in err
    assert guard_images_text(6, 6) == ("(the guard uses all 6 held-out normal images, and the same 6 with planted "
                                       "defects)")


U8_FAILS = "score rank correlation 0.9800 < 0.99 (this CPU's kernels, set by the test)"


@pytest.fixture(scope="module")
def cpu_form_refused(int8, tmp_path_factory):
    """`edge-ad quantize --precision int8` on an x86 CPU without VNNI whose fused kernels fail the CPU form, which
    passes in its own arithmetic (both verdicts set here, not this CPU's), on a bundle whose INT8 (both forms,
    from an earlier quantization) was active. Returns (bundle, CLI result)."""
    import functools

    from click.testing import CliRunner

    import edge_ad.compile.quantize as quantize_mod
    from edge_ad.cli import main

    d = tmp_path_factory.mktemp("refused") / "b"
    shutil.copytree(int8[0].path, d)
    real_evaluate, real_quantize = guard_mod.evaluate, quantize_mod.quantize_bundle

    def evaluate(*a, name=None, **k):
        e = real_evaluate(*a, name=name, **k)
        if name == "onnxruntime-int8-u8":   # judged on this CPU's fused kernels
            e.update(passed=False, failures=[U8_FAILS])
        return e

    with pytest.MonkeyPatch.context() as m:
        m.setattr(qgraph, "cpu_int8_kernels", lambda: (True, "x86_64 without VNNI"))
        m.setattr(guard_mod, "evaluate", evaluate)
        m.setattr(quantize_mod, "quantize_bundle", functools.partial(real_quantize, bias_images=4))
        res = CliRunner().invoke(main, ["quantize", "--bundle", str(d), "--precision", "int8", "--samples", "8",
                                        "--guard-normals", "4", "--keep-fp32", "head", "--max-auroc-drop", "1",
                                        "--min-rank-corr", "-1"])
    return Bundle.open(d, verify=True), res


def test_a_cpu_form_refused_on_this_cpus_kernels_keeps_the_tensorrt_form_in(cpu_form_refused):
    """Both INT8 forms went in together or not at all, so on an x86 CPU without VNNI a CPU form failing on its
    fused kernels kept out the TensorRT form, which passed in TensorRT's arithmetic: no INT8 for a Jetson could be
    made there. Now each form goes in on its own verdict: the TensorRT form is written, the CPU form is not (the
    earlier quantization's is removed), the manifest says why and what to do, quantize exits 0 saying so, and the
    active graph goes back from INT8 to FP32, which ONNX Runtime runs on a CPU."""
    b, res = cpu_form_refused
    assert res.exit_code == 0, res.output
    assert "REFUSED model.int8-u8.onnx: the CPU form of INT8 failed the accuracy guard" in res.output
    assert "only that CPU's kernels refused it" in res.output and "quantize on the device that will run it" in res.output
    assert ("model.int8.onnx written and guarded" in res.output and "; model.int8-u8.onnx refused (why above" in
            res.output and "active graph: model.onnx (fp32)" in res.output), res.output
    assert b.has("model.int8.onnx") and not b.file("model.int8-u8.onnx").exists()
    assert "model.int8-u8.onnx" not in b.manifest["files"]
    assert b.active_graph == "model.onnx" and b.active_precision == "fp32"
    q = b.manifest["quantized"]["int8"]
    assert q["files"] == ["model.int8.onnx"] and list(q["refused"]) == ["model.int8-u8.onnx"]
    r = q["refused"]["model.int8-u8.onnx"]
    assert r["cpu_kernels_only"] is True and r["cpu"] == "x86_64 without VNNI" and r["failures"] == [U8_FAILS]
    assert "model.int8.onnx) passed and is in the bundle" in r["fix"] and "edge-ad compile --precision int8" in r["fix"]
    report = json.loads(b.file("quant_report.json").read_text())["candidates"]
    assert report["onnxruntime-int8"]["passed"] and not report["onnxruntime-int8-u8"]["passed"]
    assert report["onnxruntime-int8-u8"]["exact_guard"]["passed"] is True


def test_int8_without_its_cpu_form_is_refused_on_the_cpu_saying_why(cpu_form_refused, tmp_path):
    """Where the CPU form was refused, INT8 on a CPU (run, eval, doctor, the install probe: all open_backend) is
    refused naming why and what to do, not run on the TensorRT form, which was not judged on CPU kernels; the
    TensorRT form is what GPUs open, s8 on the CPU runs when asked by name, and the bundle packs."""
    from click.testing import CliRunner

    from edge_ad import doctor
    from edge_ad.calibration.package import pack_bundle
    from edge_ad.cli import main
    from edge_ad.runtime.backends.base import graph_file

    b, _ = cpu_form_refused
    for precision in ("int8", "int8-u8"):
        with pytest.raises(InputError, match=r"model.int8-u8.onnx: not in the bundle: the CPU form of INT8 failed "
                                             r"the accuracy guard .*x86_64 without VNNI.*quantize on the device that "
                                             r"will run it.*model.int8.onnx\) passed"):
            open_backend(b, "onnxruntime", precision, "cpu")
    with open_backend(b, "onnxruntime", "int8", "cpu", int8_form="s8") as s8:
        assert s8.graph.name == "model.int8.onnx"
    with open_backend(b, "onnxruntime", None, "cpu") as be:
        assert be.precision == "fp32"
    assert graph_file(b, "int8", "cuda") == graph_file(b, "int8", "tensorrt") == "model.int8.onnx"
    r = CliRunner().invoke(main, ["eval", "--bundle", str(b.path), "--data", b.manifest["training"]["data"],
                                  "--precision", "int8"])
    assert r.exit_code == 2 and "the CPU form of INT8 failed the accuracy guard" in r.output, r.output
    c = doctor.check_backend(b, "onnxruntime", "int8", "cpu")
    assert c.status == doctor.Status.FAIL and "quantize on the device that will run it" in c.fix, c
    assert "edge-ad quantize --bundle" not in c.fix   # quantizing again here would be refused again
    checks, _ = doctor.check_bundle(b.path)
    assert "INT8 model.int8.onnx only (model.int8-u8.onnx refused by the guard at quantization)" in checks[0].detail
    assert pack_bundle(b.path, tmp_path / "b.tar").is_file()


def test_a_tensorrt_form_refused_leaves_the_cpu_form_active(tmp_path):
    """The other way round (on a VNNI or ARM CPU the CPU form may pass where the TensorRT form fails): the CPU
    form is the active graph, and INT8 on a GPU is refused naming why and what to do (FP16 on TensorRT)."""
    from fixtures_bundle import make_tiny_bundle

    from edge_ad.compile.quantize import _active_after, refusal
    from edge_ad.runtime.backends.base import graph_file

    b = make_tiny_bundle(tmp_path / "t")
    assert _active_after(b, "int8", ["int8-u8"]) == {"graph": "model.int8-u8.onnx", "precision": "int8"}
    assert _active_after(b, "int8", ["int8"]) is None   # FP32 stays
    e = {"candidate": "onnxruntime-int8", "failures": ["score rank correlation 0.9800 < 0.99"],
         "arithmetic": "exact"}
    b.manifest["quantized"] = {"int8": {"source_sha256": b.graph_hash("model.onnx"), "files": ["model.int8-u8.onnx"],
                                        "refused": {"model.int8.onnx": refusal("int8", e, ["int8-u8"])}}}
    b.save_manifest()
    assert graph_file(b, "int8", "cuda") == "model.int8.onnx"
    with pytest.raises(InputError, match=r"model.int8.onnx: not in the bundle: the TensorRT form of INT8 failed the "
                                         r"accuracy guard in its own Q/DQ arithmetic.*0.9800 < 0.99.*edge-ad compile "
                                         r"--precision fp16.*the CPU form \(model.int8-u8.onnx\) passed"):
        b.check_graph("model.int8.onnx")
    b.manifest["quantized"]["int8"]["source_sha256"] = "0" * 64   # a record of an earlier model says nothing
    with pytest.raises(InputError, match=r"model.int8.onnx: not found; run 'edge-ad quantize --precision int8'"):
        b.check_graph("model.int8.onnx")


def test_the_active_graph_changes_only_to_what_a_cpu_runs_faster(tmp_path):
    """The active graph is what a CPU line runs by default: FP16 (slower than FP32 there) is not made active, one
    active before stays active (its file replaced would have made FP32 active); INT8 is made active with its CPU
    form. --adapt quantizes a candidate like the line (activate=True): then the graph that passed is active."""
    from fixtures_bundle import make_tiny_bundle

    from edge_ad.compile.quantize import _active_after

    b = make_tiny_bundle(tmp_path / "t")
    assert _active_after(b, "fp16", ["fp16"]) is None
    assert _active_after(b, "fp16", ["fp16"], activate=True) == {"graph": "model.fp16.onnx", "precision": "fp16"}
    assert _active_after(b, "int8", ["int8", "int8-u8"]) == {"graph": "model.int8.onnx", "precision": "int8"}
    assert _active_after(b, "int8", ["int8"], activate=True) == {"graph": "model.int8.onnx", "precision": "int8"}
    b.manifest["active"] = {"graph": "model.fp16.onnx", "precision": "fp16"}
    assert _active_after(b, "fp16", ["fp16"]) == {"graph": "model.fp16.onnx", "precision": "fp16"}
    assert _active_after(b, "int8", ["int8"]) is None   # an FP16 line stays FP16


def test_quantize_refuses_a_bundle_it_cannot_write_before_any_work(tmp_path, monkeypatch):
    """The graphs and quant_report.json go into the bundle folder: one this process cannot write is named
    at once (exit 2), not after the calibration images are read and the guard has run."""
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.compile import quantize as quantize_mod
    from fixtures_bundle import make_tiny_bundle, unwritable

    b = make_tiny_bundle(tmp_path / "b")
    unwritable(monkeypatch, b.path)
    monkeypatch.setattr(quantize_mod, "load_image", lambda *a: pytest.fail("images were read"))
    res = CliRunner().invoke(main, ["quantize", "--bundle", str(b.path), "--precision", "int8"])
    assert res.exit_code == 2, res.output
    assert f"error: quantize {b.path}: the folder {b.path.absolute()} is not writable; nothing was changed" \
        in res.output, res.output
