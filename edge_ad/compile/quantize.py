"""INT8 (explicit Q/DQ) and FP16 graphs from ``model.onnx``, each passed through the guard before use.

INT8, two forms from one calibration (ONNX Runtime's static quantizer):

- ``model.int8.onnx``    signed symmetric activations and weights (zero points 0), per-channel weights:
                         the explicit-quantization form TensorRT 8.6/10/11 builds from directly;
- ``model.int8-u8.onnx`` unsigned 8-bit activations (asymmetric), signed per-channel weights: the form
                         ONNX Runtime's x86/ARM CPU kernels run fastest (u8 x s8 dot products).

How (each step measured on trained bundles, see docs/compile.md):

1. the FP32 graph is prepared with exact rewrites (:mod:`edge_ad.compile.qgraph`: BatchNorm folding,
   TF-"same" ``Pad`` into the conv, PDN's average pools as depthwise convs, RGB convs widened to 4
   channels);
2. activation ranges from normal images (MinMax by default; Percentile / Entropy on request), computed
   once for every tensor, both forms quantized from them;
3. quantized: Conv, MatMul, Gemm **and their activations** (Clip / Relu: the conv's output is quantized
   over the activation's range, 0..6 after ReLU6, instead of its raw range, which wasted most of the 8
   bits; the u8 form folds the activation into the quantization), and Add, Concat, Resize and Pad between
   convs, so the CPU form stays in 8 bits from one conv to the next;
4. empirical bias correction of every conv, in order of depth, on calibration images, kept when it
   brings the outputs closer to FP32's (:func:`edge_ad.compile.qgraph.correct_bias`).

Everything after the last convolution (the squared differences and channel means that make the maps,
the Gaussian model's pooling) stays FP32 in every form. Convolutions kept in FP32 (``keep_fp32``):

- ``auto`` (default): a per-layer sensitivity search quantizes one convolution at a time and ranks them by
  the map error each causes alone; the outliers (at least ``outlier_factor`` x the median layer's error,
  at most ``max_fp32_layers``) stay FP32. On EfficientNet-Lite0 these are the stem and the first two
  blocks, whose nearly constant channels INT8 cannot resolve; they are cheap at any resolution;
- ``head``: the last convolution on every path to an output (the student's last conv is a quarter of
  EfficientAD-S's compute);
- ``none``: every convolution in INT8.

FP16: ``model.fp16.onnx``, weights and activations in FP16, inputs and outputs FP32, and the map head
(after the last convolution) in FP32.

The guard judges each INT8 form by its target's arithmetic (:data:`JUDGED_ON`): the TensorRT form by the
graph's own Q/DQ arithmetic, the CPU form by this CPU's ONNX Runtime kernels; on an x86 CPU without VNNI,
whose kernels saturate, a CPU form much worse on them than in its own arithmetic is warned about
(:func:`check_cpu_kernels`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import atomic
from ..bundle import Bundle
from ..data.image import load_image, to_batch
from ..errors import InputError, RuntimeFailure
from . import guard as guard_mod
from . import qgraph
from .export import check_graph
from .guard import GuardLimits

log = logging.getLogger(__name__)

CONV_OPS = ["Conv", "MatMul", "Gemm"]
# what is quantized besides the convs: their activations and the cheap ops between convs
QUANT_OPS = CONV_OPS + ["Clip", "Relu", "Add", "Concat", "Resize", "Pad"]
KEEP_FP32 = ("head", "none", "auto")
CALIBRATIONS = ("minmax", "percentile", "entropy")
INT8_FORMS = {"int8": "model.int8.onnx", "int8-u8": "model.int8-u8.onnx"}
# The arithmetic the guard judges each INT8 form by, that of its target: the TensorRT form by the graph's
# own Q/DQ arithmetic ("exact": what TensorRT computes; `edge-ad compile` then guards the engine itself),
# the CPU form by this CPU's ONNX Runtime integer kernels ("fused": what runs it here). They differ on x86
# CPUs without VNNI, where the fused kernels saturate (qgraph.cpu_int8_kernels).
JUDGED_ON = {"int8": "exact", "int8-u8": "fused"}
# on such a CPU: a warning when the CPU form's relative map error on the fused kernels is over this many
# times the exact arithmetic's (and over it by more than SATURATION_MARGIN)
SATURATION_FACTOR = 1.5
SATURATION_MARGIN = 0.01


@dataclass
class QuantizeResult:
    precision: str
    files: list[str]
    entries: list[dict]           # guard entries (quant_report.json)
    fp32_nodes: list[str]
    seconds: float
    details: dict = field(default_factory=dict)   # preparation, calibration, bias correction
    refused: dict = field(default_factory=dict)   # INT8 forms the guard kept out: {file: record (refusal)}


# --------------------------------------------------------------------------- graph analysis
def graph_heads(model) -> tuple[list[str], list[str]]:
    """(head nodes, head convolutions): nodes with no convolution downstream of them, and the last
    convolutions (Conv nodes with no convolution downstream). Nodes are named (unnamed ones get a name)."""
    nodes = list(model.graph.node)
    for i, n in enumerate(nodes):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    consumers: dict[str, list] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    conv_below: dict[str, bool] = {}
    for n in reversed(nodes):  # ONNX graphs are topologically sorted
        below = False
        for t in n.output:
            for c in consumers.get(t, []):
                if c.op_type in ("Conv", "ConvTranspose") or conv_below.get(c.name, False):
                    below = True
        conv_below[n.name] = below
    heads = [n.name for n in nodes if not conv_below[n.name] and n.op_type not in ("Conv", "ConvTranspose")]
    head_convs = [n.name for n in nodes if not conv_below[n.name] and n.op_type in ("Conv", "ConvTranspose")]
    return heads, head_convs


def quantizable_nodes(model) -> list[str]:
    """The convolutions (Conv / MatMul / Gemm) of a graph: the layers ``keep_fp32`` chooses from."""
    return [n.name for n in model.graph.node if n.op_type in CONV_OPS]


# --------------------------------------------------------------------------- calibration
class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of image files."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], batch: int = 2):
        self.paths, self.size, self.batch = list(paths), size, batch
        self.i = 0

    def get_next(self):
        if self.i >= len(self.paths):
            return None
        chunk = self.paths[self.i:self.i + self.batch]
        self.i += self.batch
        return {"image": to_batch([load_image(p) for p in chunk], self.size)}

    def rewind(self):
        self.i = 0

    def __len__(self):
        return (len(self.paths) + self.batch - 1) // self.batch


class _One:
    """A reader that yields one batch (the calibrators are fed batch by batch to bound their memory)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def get_next(self):
        b, self.batch = self.batch, None
        return b


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def _has_cache_option() -> bool:
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def calibrate(src: Path, reader: _Reader, cache: Path, method: str = "minmax",
              percentile: float = 99.99) -> Path:
    """Activation ranges of every float tensor of ``src`` over the reader's images, written to ``cache``
    (ONNX Runtime's calibration-cache JSON); both INT8 forms and every trial of the sensitivity search
    quantize from it."""
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.quantize import save_tensors_data

    if method not in CALIBRATIONS:
        raise InputError(f"calibration '{method}': expected one of {', '.join(CALIBRATIONS)}")
    if not _has_cache_option():   # an older onnxruntime: quantize_static calibrates on every call instead
        return cache
    extra = {"percentile": percentile} if method == "percentile" else {}
    chatter = io.StringIO()   # the histogram calibrators print progress on every batch
    try:
        with tempfile.TemporaryDirectory(prefix="calib-", dir=cache.parent) as tmp, \
                contextlib.redirect_stdout(chatter):
            cal = create_calibrator(Path(src), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                    calibrate_method=_method(method), extra_options=extra)
            reader.rewind()
            while (batch := reader.get_next()) is not None:
                cal.collect_data(_One(batch))
            data = cal.compute_data()
            del cal
        save_tensors_data(data, cache)
    except (InputError, RuntimeFailure):
        raise
    except Exception as exc:  # onnxruntime.quantization raises ValueError, RuntimeError, onnx errors...
        raise RuntimeFailure(f"INT8 calibration ({method}) of {src} failed: {type(exc).__name__}: {exc}") from exc
    return cache


def quantize_int8_form(src: Path, dst: Path, form: str, cache: Path, reader: _Reader | None = None,
                       exclude: Sequence[str] = (), only: Sequence[str] | None = None,
                       method: str = "minmax") -> Path:
    """Write one INT8 form (``int8`` signed symmetric / ``int8-u8`` unsigned activations) of ``src``.

    Ranges come from ``cache`` (:func:`calibrate`); with an ONNX Runtime whose ``quantize_static`` cannot
    read a cache, the reader's images are calibrated again. ``exclude``: nodes left in FP32; ``only``:
    quantize these convolutions and nothing else (their activations included).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    signed = form == "int8"
    extra = {"ActivationSymmetric": signed, "WeightSymmetric": True}
    if signed:   # the TensorRT form: its ONNX parser takes only INT8/FP8 into DequantizeLinear, not INT32
        extra["QuantizeBias"] = False       # biases stay float; TensorRT fuses them into the INT8 conv
    kw = {}
    if _has_cache_option():
        kw["calibration_cache_path"] = str(cache)
        data_reader = None
    else:
        if reader is None:
            raise RuntimeFailure("this onnxruntime cannot reuse a calibration; a calibration reader is needed")
        reader.rewind()
        data_reader = reader
    nodes = None
    if only:
        import onnx

        model = onnx.load(str(src), load_external_data=False)
        chosen = set(only)
        produced = {o: n for n in model.graph.node for o in n.output}
        nodes = list(chosen)
        for n in model.graph.node:  # the activation right after a chosen conv goes with it
            if n.op_type in ("Clip", "Relu") and produced.get(n.input[0]) is not None \
                    and produced[n.input[0]].name in chosen:
                nodes.append(n.name)
    try:
        quantize_static(
            str(src), str(dst), calibration_data_reader=data_reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANT_OPS, per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude), nodes_to_quantize=nodes,
            calibrate_method=_method(method), extra_options=extra, **kw)
    except Exception as exc:  # onnxruntime.quantization raises ValueError, RuntimeError, onnx errors...
        raise RuntimeFailure(f"INT8 quantization ({form}) of {src} failed: {type(exc).__name__}: {exc}") from exc
    return dst


def sensitivity_search(src: Path, work: Path, cache: Path, reader: _Reader | None, batch: np.ndarray,
                       base_exclude: Sequence[str] = (), fixed_exclude: Sequence[str] = (),
                       outlier_factor: float = 5.0, max_fp32_layers: int = 8, progress: bool = True,
                       method: str = "minmax") -> tuple[list[str], list[dict]]:
    """Per-layer INT8 sensitivity: every convolution not in ``base_exclude`` is quantized alone (with its
    activation; signed form, the stricter one) and ranked by the map error it causes on ``batch``
    (:func:`edge_ad.compile.qgraph.map_error`), measured on the graph's own Q/DQ arithmetic (``exact``:
    TensorRT's, the signed form's target, and that of ARM and VNNI CPUs), not on the fused kernels of the
    CPU that quantizes, which saturate on x86 CPUs without VNNI and would rank layers by this CPU's kernel
    error instead of by what INT8 costs them. The outliers, layers whose error is at least
    ``outlier_factor`` times the median layer's, are added to ``base_exclude`` (worst first, at most
    ``max_fp32_layers``).

    ``fixed_exclude``: other nodes never quantized (the map head). Returns (convolutions kept in FP32,
    the table, worst first)."""
    import onnx

    ref_sess = qgraph.session(src)
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, {"image": batch})))
    model = onnx.load(str(src), load_external_data=False)
    cands = [n for n in quantizable_nodes(model) if n not in set(base_exclude) and n not in set(fixed_exclude)]
    table = []
    for i, node in enumerate(cands):
        out = work / f"one-{i}.onnx"
        quantize_int8_form(src, out, "int8", cache, reader, only=[node], exclude=fixed_exclude, method=method)
        table.append({"node": node, "error_alone": qgraph.map_error(ref, out, batch, exact=True)})
        out.unlink()
        if progress:
            log.info("sensitivity %d/%d %s: %.4f", i + 1, len(cands), node, table[-1]["error_alone"])
    table.sort(key=lambda r: -r["error_alone"])
    if not table:
        return list(base_exclude), table
    median = float(np.median([r["error_alone"] for r in table]))
    for r in table:
        r["x_median"] = r["error_alone"] / median if median > 0 else float("inf")
    worst = [r["node"] for r in table if r["x_median"] >= outlier_factor][:max(0, max_fp32_layers)]
    return list(base_exclude) + worst, table


# --------------------------------------------------------------------------- FP16
def convert_fp16(src: Path, dst: Path) -> Path:
    """FP16 weights and activations, FP32 inputs/outputs, the map head after the last conv in FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    heads, _ = graph_heads(model)
    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=heads)
    except Exception as exc:
        raise RuntimeFailure(f"FP16 conversion of {src} failed: {type(exc).__name__}: {exc}") from exc
    toposort(half.graph)
    onnx.save(half, str(dst))
    return dst


def toposort(graph) -> None:
    """Sort a graph's nodes topologically in place (the FP16 converter appends its input casts last)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(t in ready for t in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeFailure(f"graph has a cycle or a missing input at {[n.name for n in rest[:3]]}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# --------------------------------------------------------------------------- the command
def quantize_bundle(bundle: Bundle, precision: str = "int8", calib_dir: str | os.PathLike | None = None,
                    samples: int = 64, keep_fp32: str = "auto", test_dir: str | os.PathLike | None = None,
                    limits: GuardLimits | None = None, guard_normals: int = 32, test_limit: int = 100,
                    outlier_factor: float = 5.0, max_fp32_layers: int = 8, threads: int = 0,
                    progress: bool = True, calibration: str = "minmax", bias_correction: bool = True,
                    bias_images: int = 32, activate: bool = False) -> QuantizeResult:
    """Make the ``precision`` graph(s), guard them against FP32, record them and, for what CPUs run faster, make
    them active.

    INT8: ``samples`` calibration images (from ``calib_dir`` or the bundle's training images, never the
    guard's held-out normals), ranges by ``calibration`` (minmax | percentile | entropy), ``keep_fp32``
    (auto | head | none; auto: the sensitivity search's outliers, at most ``max_fp32_layers``), bias
    correction on ``bias_images`` of the calibration images.

    The guard judges the TensorRT form (``model.int8.onnx``) by the graph's own Q/DQ arithmetic and the CPU
    form by this CPU's ONNX Runtime kernels (:data:`JUDGED_ON`; each report entry's ``arithmetic``).

    Each INT8 form goes in on its own verdict (on an x86 CPU without VNNI the CPU form may fail on this CPU's
    kernels where the TensorRT form passes): a refused form is not written (one of an earlier quantization is
    removed), ``manifest["quantized"]["int8"]["refused"]`` says why and what to do (:func:`refusal`; running
    it is refused with that message), and the result's ``refused`` names it.

    The active graph, what a CPU line runs by default, becomes INT8 only with its CPU form; FP16 is left as it
    was (FP16 is for GPUs and TensorRT: ONNX Runtime runs it slower than FP32 on x86 CPUs). ``activate``: make
    the graph that passed active in any case (``--adapt`` quantizes a candidate like the line that runs it)
    (:func:`_active_after`).

    When no graph passes: ``quant_report.json`` records why, the new graphs are not kept, the active graph
    is unchanged, and :class:`edge_ad.errors.GuardFailure` is raised.
    """
    from ..runtime.backends.onnxruntime import OnnxRuntimeBackend

    if precision not in ("int8", "fp16"):
        raise InputError(f"precision '{precision}': expected int8 or fp16")
    if keep_fp32 not in KEEP_FP32:
        raise InputError(f"keep_fp32 '{keep_fp32}': expected one of {', '.join(KEEP_FP32)}")
    if calibration not in CALIBRATIONS:
        raise InputError(f"calibration '{calibration}': expected one of {', '.join(CALIBRATIONS)}")
    bundle.check_writable("quantize")   # the graphs and quant_report.json go there: known before the guard
    t0 = time.perf_counter()
    src = bundle.graph_for("fp32")
    if "model.onnx" in bundle.manifest["files"]:
        bundle.verify(["model.onnx"])
    pool, held_out = guard_mod.training_images(bundle, calib_dir)
    gset = guard_mod.prepare_guard_set(bundle, held_out, test_dir=test_dir, test_limit=test_limit,
                                       n_normal=guard_normals)
    limits = limits or GuardLimits()
    ref_backend = OnnxRuntimeBackend(bundle, precision="fp32", device="cpu", threads=threads)
    made: dict[str, Path] = {}
    fp32_nodes: list[str] = []
    details: dict = {}
    for left in bundle.path.glob(".quantize-*"):   # a killed quantize's work folder (one at work holds its lock)
        if left.is_dir() and not left.is_symlink():
            atomic.remove_unheld(left)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=bundle.path, ignore_cleanup_errors=True) as tmp, \
            atomic.folder_lock(tmp, f"{tmp}: taken by another edge-ad quantize; quantize again"):
        work = Path(tmp)
        if precision == "fp16":
            _say(progress, "converting to FP16 (FP32 inputs, outputs and map head)")
            made["fp16"] = convert_fp16(src, work / "model.fp16.onnx")
        else:
            fp32_nodes, details = _make_int8(bundle, src, work, pool, samples, keep_fp32, calibration,
                                             bias_correction, bias_images, outlier_factor, max_fp32_layers,
                                             threads, progress, made)
        _say(progress, guard_images_text(int(np.sum(gset.groups == "normal")), len(held_out)))
        for form, path in made.items():
            check_graph(path, bundle.outputs, bundle.image_size, where=f"{form} graph")
        entries = []
        for form, path in made.items():
            prec = "int8" if form.startswith("int8") else form
            arithmetic = JUDGED_ON.get(form)
            cand = OnnxRuntimeBackend(bundle, precision=prec, device="cpu", graph=path, threads=threads,
                                      exact=arithmetic == "exact")
            how = {"exact": " (the graph's own Q/DQ arithmetic, TensorRT's)",
                   "fused": " (this CPU's ONNX Runtime INT8 kernels)"}.get(arithmetic, "")
            _say(progress, f"guard: {form} vs FP32 on {len(gset)} images{how}")
            e = guard_mod.evaluate(bundle, cand, gset, ref_backend, limits, name=f"onnxruntime-{form}")
            e["graph"] = path.name
            e["fp32_nodes"] = fp32_nodes
            cand.close()
            if arithmetic:
                e["arithmetic"] = arithmetic
            if arithmetic == "fused":
                check_cpu_kernels(e, path, gset, threads, progress)
            entries.append(e)
            _say(progress, guard_mod.summary(e))
            if arithmetic == "fused" and not e["passed"] and "rel_map_error_exact" in e:
                judge_exact(bundle, e, path, gset, ref_backend, limits, threads, progress)
        report = guard_mod.report_data(bundle, entries)
        verdicts = dict(zip(made, entries))
        passed = [form for form, e in verdicts.items() if e["passed"]]
        if not passed:   # nothing goes in
            guard_mod.write_report(bundle, entries)
            guard_mod.raise_on_failure(entries)
        # each form goes in on its own verdict: a CPU form refused on this CPU's kernels does not keep out the
        # TensorRT form, which passed in TensorRT's arithmetic (and the other way round)
        refused = {made[form].name: refusal(form, e, passed) for form, e in verdicts.items() if not e["passed"]}
        for name, r in refused.items():
            _say(progress, f"REFUSED {name}: {r['why']}; {r['fix']}")
        files = [made[form].name for form in passed]
        quantized = dict(bundle.manifest.get("quantized", {}))
        quantized[precision] = {
            "files": files, "source_sha256": bundle.graph_hash("model.onnx"), "fp32_nodes": fp32_nodes,
            "keep_fp32": keep_fp32, "samples": min(samples, len(pool)) if precision == "int8" else 0}
        if precision == "int8":
            quantized["int8"].update(
                calibration=calibration, ops=QUANT_OPS, prepared=details.get("prepared", {}),
                judged={**JUDGED_ON, **({"sensitivity": "exact"} if keep_fp32 == "auto" else {})},
                cpu=qgraph.cpu_int8_kernels()[1],
                bias_correction={f: details.get(f"bias_{f}") for f in INT8_FORMS} if bias_correction else None)
            if refused:
                quantized["int8"]["refused"] = refused
        meta = {"quantized": quantized}
        active = _active_after(bundle, precision, passed, activate)
        if active is not None:
            meta["active"] = active
        if precision == "fp16" and (active or bundle.manifest["active"])["graph"] != "model.fp16.onnx":
            _say(progress, "model.fp16.onnx is for GPUs and TensorRT (edge-ad compile --precision fp16, or "
                           "model.precision = \"fp16\" on a GPU); the active graph stays, as ONNX Runtime runs "
                           "FP16 slower than FP32 on x86 CPUs")
        # the graphs, the report of their guard and the manifest change together: a failure leaves the old
        # graphs in force, and no report says a graph not in force passed; a refused form's graph of an earlier
        # quantization goes (it is not of this calibration, and the record says why there is none)
        bundle.replace_files({**{made[form].name: made[form] for form in passed}, guard_mod.REPORT: report},
                             remove=[n for n in refused if n in bundle.manifest["files"] or bundle.has(n)],
                             meta=meta)
    ref_backend.close()
    return QuantizeResult(precision, files, entries, fp32_nodes, time.perf_counter() - t0, details, refused)


def _active_after(bundle: Bundle, precision: str, passed: Sequence[str], activate: bool = False) -> dict | None:
    """The bundle's active graph after a quantization whose graphs ``passed`` go in (None: unchanged).

    The active graph is what ONNX Runtime on a CPU, the default backend, runs when nothing else is asked. So INT8
    is made active when its CPU form passed (``model.int8.onnx``, which CPUs run as its u8 twin; the u8 form
    alone when the TensorRT form was refused); without the CPU form the active graph stays, and an INT8 active
    before goes back to FP32 (its graphs replaced or removed). FP16 is not made active (ONNX Runtime runs it
    slower than FP32 on x86 CPUs; on a GPU ``edge-ad compile`` makes its engine's precision active); one active
    before stays active. ``activate``: the graph that passed is made active in any case (INT8:
    ``model.int8.onnx``, else the u8 form)."""
    int8 = INT8_FORMS["int8" if "int8" in passed else "int8-u8"]
    if activate:
        return {"graph": "model.fp16.onnx" if precision == "fp16" else int8, "precision": precision}
    if precision == "fp16":   # kept when it was active (its file is replaced, which would make FP32 active)
        return {"graph": "model.fp16.onnx", "precision": "fp16"} if bundle.active_graph == "model.fp16.onnx" else None
    if "int8-u8" in passed:
        return {"graph": int8, "precision": "int8"}
    if bundle.active_precision == "int8":
        return {"graph": "model.onnx", "precision": "fp32"}
    return None


def judge_exact(bundle: Bundle, entry: dict, graph: Path, gset: guard_mod.GuardSet, ref_backend,
                limits: GuardLimits, threads: int = 0, progress: bool = True) -> dict:
    """The guard's verdict on an INT8 ``graph`` in its own Q/DQ arithmetic (what ARM CPUs and x86 CPUs with VNNI
    compute), for a CPU form that failed on the fused kernels of a CPU whose kernels saturate: whether only this
    CPU's kernels refused it. Kept in ``entry["exact_guard"]`` (passed, failures, rank_corr) and returned."""
    e = guard_mod.evaluate(bundle, None, gset, ref_backend, limits,
                           name=f"{entry['candidate']} (the graph's own arithmetic)",
                           outputs=exact_outputs(gset, graph, threads))   # check_cpu_kernels' already
    _say(progress, guard_mod.summary(e))
    entry["exact_guard"] = {"passed": e["passed"], "failures": e["failures"], "rank_corr": e["rank_corr"]}
    return entry["exact_guard"]


def refusal(form: str, entry: dict, passed: Sequence[str]) -> dict:
    """The manifest's record of an INT8 form the guard refused (``quantized.int8.refused``, by file name): its
    failures and, in words, why it is not in the bundle (``why``) and what to do (``fix``), which the quantize
    output and every later attempt to run it (:meth:`edge_ad.bundle.Bundle.check_graph`) say."""
    failures = "; ".join(entry["failures"])
    rec = {"form": form, "candidate": entry["candidate"], "failures": list(entry["failures"]),
           "arithmetic": entry.get("arithmetic")}
    if form == "int8-u8":
        cpu = entry.get("cpu") or "unknown CPU"
        kernels_only = bool((entry.get("exact_guard") or {}).get("passed"))
        rec.update(cpu=cpu, cpu_kernels_only=kernels_only)
        why = (f"the CPU form of INT8 failed the accuracy guard when the bundle was quantized, on the ONNX Runtime "
               f"INT8 kernels of that CPU ({cpu}: {failures})")
        if kernels_only:
            why += (", and passed in the graph's own arithmetic, which ARM CPUs and x86 CPUs with VNNI compute: "
                    "only that CPU's kernels refused it")
            fix = ("to run INT8 on a CPU, quantize on the device that will run it (an ARM device, or an x86 CPU with "
                   "VNNI: edge-ad quantize there guards the CPU form on its own kernels); meanwhile run FP32 on CPUs "
                   "(model.precision = \"fp32\")")
        else:
            fix = "run FP32 on CPUs (model.precision = \"fp32\")"
        if "int8" in passed:
            fix += ("; INT8 for TensorRT (model.int8.onnx) passed and is in the bundle: edge-ad compile --precision "
                    "int8 on the device builds its engine")
    else:
        why = (f"the TensorRT form of INT8 failed the accuracy guard in its own Q/DQ arithmetic, which TensorRT "
               f"computes ({failures})")
        fix = "on TensorRT build FP16 instead (edge-ad compile --precision fp16; 'best' falls back to it)"
        if "int8-u8" in passed:
            fix += "; the CPU form (model.int8-u8.onnx) passed and runs INT8 on CPUs"
    rec.update(why=why, fix=fix)
    return rec


def guard_images_text(used: int, held_out: int) -> str:
    """What the guard runs on, said before it runs: ``used`` of the ``held_out`` normal images kept out of
    calibration (``guard_normals`` of them, spread over the set), each also with a planted defect."""
    if used < held_out:
        return (f"(the guard uses {used} of the {held_out} held-out normal images, and the same {used} with planted "
                "defects; --guard-normals to use more)")
    return f"(the guard uses all {held_out} held-out normal images, and the same {held_out} with planted defects)"


def exact_outputs(gset: guard_mod.GuardSet, graph: Path, threads: int = 0) -> dict[str, np.ndarray]:
    """The INT8 ``graph``'s outputs on the guard images in its own Q/DQ arithmetic, computed once per guard set
    (kept in ``gset.exact``): on a CPU whose kernels saturate, :func:`check_cpu_kernels` measures its map error
    on them and :func:`judge_exact` judges them."""
    key = str(graph)
    if key not in gset.exact:
        gset.exact[key] = qgraph.graph_outputs(graph, gset.batch, chunk=8, threads=threads, exact=True)
    return gset.exact[key]


def check_cpu_kernels(entry: dict, graph: Path, gset: guard_mod.GuardSet, threads: int = 0,
                      progress: bool = True) -> str | None:
    """For a guard ``entry`` of an INT8 ``graph`` judged on this CPU's fused kernels: on a CPU whose kernels
    may saturate (:func:`edge_ad.compile.qgraph.cpu_int8_kernels`: x86 without VNNI), also the relative map
    error of the graph's own arithmetic on the guard images (``rel_map_error_exact``), and a warning
    (returned, printed with ``progress``, else logged, and kept in the entry as ``warning``) when the fused
    kernels' is much worse
    (:data:`SATURATION_FACTOR`). Records the CPU in ``entry["cpu"]``."""
    saturates, cpu = qgraph.cpu_int8_kernels()
    entry["cpu"] = cpu
    if not saturates:
        return None
    exact = qgraph.output_error(gset.reference, exact_outputs(gset, graph, threads))
    entry["rel_map_error_exact"] = exact
    fused = entry["rel_map_error"]
    if not fused > SATURATION_FACTOR * exact + SATURATION_MARGIN:
        return None
    msg = (f"{entry['candidate']}: this CPU ({cpu}) runs INT8 through ONNX Runtime kernels whose 16-bit "
           f"sums saturate: relative map error vs FP32 {fused:.3f} on them against {exact:.3f} in the graph's own "
           "arithmetic (what TensorRT, ARM CPUs and x86 CPUs with VNNI compute). The guard judged this CPU's "
           "kernels, what ONNX Runtime runs here. Run FP32 on this CPU (model.precision), or run INT8 "
           "on TensorRT (edge-ad compile), an ARM device or an x86 CPU with VNNI (quantized there when this "
           "guard fails)")
    entry["warning"] = msg
    if progress:
        _say(progress, f"WARNING: {msg}")   # printed (and logged at info: the CLI would print a warning twice)
    else:
        log.warning(msg)
    return msg


def _make_int8(bundle: Bundle, src: Path, work: Path, pool: list[Path], samples: int, keep_fp32: str,
               calibration: str, bias_correction: bool, bias_images: int, outlier_factor: float,
               max_fp32_layers: int, threads: int, progress: bool, made: dict) -> tuple[list[str], dict]:
    """Prepare, calibrate, quantize both forms and correct their biases into ``made``; returns
    (convolutions kept in FP32, details for the manifest)."""
    import onnx

    details: dict = {}
    calib = guard_mod.spread(pool, samples)
    probe = to_batch([load_image(p) for p in guard_mod.spread(calib, 2)], bundle.image_size)
    prepped, details["prepared"] = qgraph.prepare_graph(src, work / "prepared.onnx", check_batch=probe)
    # the CPU form's graph also has its RGB convs widened (an ONNX Runtime speed-up TensorRT does not need)
    cpu_src, widened = qgraph.widened(prepped, work / "prepared-cpu.onnx", check_batch=probe)
    details["prepared"]["rgb_convs_widened_u8"] = widened
    sources = {"int8": prepped, "int8-u8": cpu_src}
    model = onnx.load(str(prepped), load_external_data=False)
    heads, head_convs = graph_heads(model)
    fp32_nodes = list(head_convs) if keep_fp32 == "head" else []
    cache = work / "calibration.json"
    reader = _Reader(calib, bundle.image_size)
    t = time.perf_counter()
    _say(progress, f"calibrating INT8 ({calibration}) on {len(calib)} normal images")
    calibrate(cpu_src, reader, cache, calibration)   # every tensor of both graphs
    details["calibration_s"] = time.perf_counter() - t
    if keep_fp32 == "auto":
        probe = to_batch([load_image(p) for p in guard_mod.spread(calib, 4)], bundle.image_size)
        t = time.perf_counter()
        _say(progress, "measuring per-layer INT8 sensitivity")
        fp32_nodes, table = sensitivity_search(prepped, work, cache, reader, probe, fp32_nodes, heads,
                                               outlier_factor, max_fp32_layers, progress, calibration)
        details["sensitivity"] = table
        details["sensitivity_s"] = time.perf_counter() - t
        _say(progress, f"kept in FP32 ({len(fp32_nodes)} of {len(table)}, error alone >= {outlier_factor:g}x the "
                       f"median layer's): {', '.join(fp32_nodes) or 'none'}")
    bias_batch = None
    if bias_correction:
        bias_batch = to_batch([load_image(p) for p in guard_mod.spread(calib, bias_images)], bundle.image_size)
    for form, fname in INT8_FORMS.items():
        path = quantize_int8_form(sources[form], work / fname, form, cache, reader, exclude=fp32_nodes + heads,
                                  method=calibration)
        if bias_batch is not None:
            _say(progress, f"bias correction ({form}) on {len(bias_batch)} calibration images")
            bias = qgraph.correct_bias(sources[form], path, bias_batch, threads=threads)
            details[f"bias_{form}"] = bias
            if bias["convs"] and not bias["applied"]:
                _say(progress, f"bias correction ({form}) left out: it does not bring the outputs closer to FP32's "
                               f"(map error {bias['map_error_before']:.4g} -> {bias['map_error_after']:.4g})")
        made[form] = path
    return fp32_nodes, details


def _say(progress: bool, msg: str) -> None:
    if progress:
        import click

        click.echo(msg, err=True)
    log.info(msg)
