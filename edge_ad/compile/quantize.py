"""INT8 (explicit Q/DQ) and FP16 graphs from ``model.onnx``, each passed through the guard before use.

INT8, two forms from one calibration (ONNX Runtime's static quantizer, MinMax ranges over normal images):

- ``model.int8.onnx``    signed symmetric activations and weights (zero points 0), per-channel weights:
                         the explicit-quantization form TensorRT 8.6/10/11 builds from directly;
- ``model.int8-u8.onnx`` unsigned 8-bit activations (asymmetric), signed per-channel weights: the form
                         ONNX Runtime's x86/ARM CPU kernels run fastest (u8 x s8 dot products).

Only the compute-heavy ops (Conv, MatMul, Gemm) are quantized. Layers kept in FP32 (``keep_fp32``):
``head`` (default): the last convolution on every path to an output (the layers whose error lands in
the maps directly); ``none``; ``auto``: the head plus a per-layer sensitivity search, which quantizes one
layer at a time, ranks the layers by the map error each causes alone, and keeps the worst in FP32 until
the whole graph's map error is within ``target_error`` (at most ``max_fp32_layers``). Everything after the
last convolution (the squared differences and channel means that make the maps) stays FP32 in every form.

FP16: ``model.fp16.onnx``, weights and activations in FP16, inputs and outputs FP32, and the map head
(after the last convolution) in FP32.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import Bundle
from ..data.image import load_image, to_batch
from ..errors import InputError, RuntimeFailure
from . import guard as guard_mod
from .export import check_graph
from .guard import GuardLimits

log = logging.getLogger(__name__)

QUANT_OPS = ["Conv", "MatMul", "Gemm"]
KEEP_FP32 = ("head", "none", "auto")
INT8_FORMS = {"int8": "model.int8.onnx", "int8-u8": "model.int8-u8.onnx"}


@dataclass
class QuantizeResult:
    precision: str
    files: list[str]
    entries: list[dict]           # guard entries (quant_report.json)
    fp32_nodes: list[str]
    seconds: float


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
    return [n.name for n in model.graph.node if n.op_type in QUANT_OPS]


# --------------------------------------------------------------------------- calibration data
class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of image files."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], batch: int = 4):
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


def _prepare(src: Path, dst: Path) -> Path:
    """ONNX Runtime's pre-processing (shape inference + graph optimization) before quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # fall back to the plain graph: quantization works without it, just less fused
        log.warning("quantization pre-processing failed (%s); quantizing the graph as exported", exc)
        return src
    return dst


def quantize_int8_form(src: Path, dst: Path, form: str, cache: Path, reader: _Reader | None,
                       exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> Path:
    """Write one INT8 form (``int8`` signed symmetric / ``int8-u8`` unsigned activations) of ``src``.

    ``cache`` holds the calibration ranges: the first call calibrates (``reader``), later calls reuse it.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    signed = form == "int8"
    extra = {"ActivationSymmetric": signed, "WeightSymmetric": True}
    if reader is not None:
        reader.rewind()
    try:
        quantize_static(
            str(src), str(dst), calibration_data_reader=reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANT_OPS, per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) if only else None,
            calibrate_method=CalibrationMethod.MinMax, extra_options=extra, calibration_cache_path=str(cache))
    except Exception as exc:  # onnxruntime.quantization raises ValueError, RuntimeError, onnx errors...
        raise RuntimeFailure(f"INT8 quantization ({form}) of {src} failed: {type(exc).__name__}: {exc}") from exc
    return dst


def _map_error(sess_ref_out: dict[str, np.ndarray], path: Path, batch: np.ndarray) -> float:
    """Mean over outputs of ||q - r|| / ||r - mean(r)|| (0 = identical; 1 = as large as the signal)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(list(sess_ref_out), {"image": batch})
    errs = []
    for (name, r), q in zip(sess_ref_out.items(), outs):
        r = r.astype(np.float64)
        errs.append(float(np.linalg.norm(q - r) / (np.linalg.norm(r - r.mean()) + 1e-12)))
    return float(np.mean(errs))


def sensitivity_search(src: Path, work: Path, cache: Path, reader: _Reader, batch: np.ndarray,
                       base_exclude: Sequence[str], target_error: float = 0.05, max_fp32_layers: int = 6,
                       progress: bool = True) -> tuple[list[str], list[dict]]:
    """Per-layer sensitivity (signed form, the stricter one), then a greedy FP32 fallback of the worst."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref_sess = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, {"image": batch})))
    model = onnx.load(str(src), load_external_data=False)
    cands = [n for n in quantizable_nodes(model) if n not in set(base_exclude)]
    table = []
    for i, node in enumerate(cands):
        out = work / f"one-{i}.onnx"
        quantize_int8_form(src, out, "int8", cache, reader, only=[node])
        err = _map_error(ref, out, batch)
        table.append({"node": node, "error_alone": err})
        out.unlink()
        if progress:
            guard_mod.log.info("sensitivity %d/%d %s: %.4f", i + 1, len(cands), node, err)
    table.sort(key=lambda r: -r["error_alone"])
    exclude = list(base_exclude)
    trial = work / "trial.onnx"
    for step in range(max_fp32_layers + 1):
        quantize_int8_form(src, trial, "int8", cache, reader, exclude=exclude)
        err = _map_error(ref, trial, batch)
        log.info("sensitivity: %d layer(s) kept in FP32 -> map error %.4f", len(exclude), err)
        if err <= target_error or step == max_fp32_layers or step >= len(table):
            break
        exclude.append(table[step]["node"])
    return exclude, table


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
                    samples: int = 64, keep_fp32: str = "head", test_dir: str | os.PathLike | None = None,
                    limits: GuardLimits | None = None, guard_normals: int = 32, test_limit: int = 100,
                    target_error: float = 0.05, max_fp32_layers: int = 6, threads: int = 0,
                    progress: bool = True) -> QuantizeResult:
    """Make the ``precision`` graph(s), guard them against FP32, record them and make them active.

    On a guard failure: ``quant_report.json`` records why, the new graphs are not kept, the active graph
    is unchanged, and :class:`edge_ad.errors.GuardFailure` is raised.
    """
    import onnx

    from ..runtime.backends.onnxruntime import OnnxRuntimeBackend

    if precision not in ("int8", "fp16"):
        raise InputError(f"precision '{precision}': expected int8 or fp16")
    if keep_fp32 not in KEEP_FP32:
        raise InputError(f"keep_fp32 '{keep_fp32}': expected one of {', '.join(KEEP_FP32)}")
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
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=bundle.path) as tmp:
        work = Path(tmp)
        if precision == "fp16":
            _say(progress, "converting to FP16 (FP32 inputs, outputs and map head)")
            made["fp16"] = convert_fp16(src, work / "model.fp16.onnx")
        else:
            calib = guard_mod.spread(pool, samples)
            _say(progress, f"calibrating INT8 on {len(calib)} normal images "
                           f"({len(held_out)} held out for the guard)")
            prepped = _prepare(src, work / "prepared.onnx")
            model = onnx.load(str(prepped), load_external_data=False)
            _, head_convs = graph_heads(model)
            fp32_nodes = list(head_convs) if keep_fp32 in ("head", "auto") else []
            cache = work / "calibration.json"
            reader = _Reader(calib, bundle.image_size)
            if keep_fp32 == "auto":
                probe = to_batch([load_image(p) for p in guard_mod.spread(calib, 4)], bundle.image_size)
                _say(progress, "measuring per-layer INT8 sensitivity")
                fp32_nodes, table = sensitivity_search(prepped, work, cache, reader, probe, fp32_nodes,
                                                       target_error, max_fp32_layers, progress)
                log.info("sensitivity table: %s", table[:10])
            for form, fname in INT8_FORMS.items():
                made[form] = quantize_int8_form(prepped, work / fname, form, cache,
                                                reader if not cache.is_file() else None, exclude=fp32_nodes)
        for form, path in made.items():
            check_graph(path, bundle.outputs, bundle.image_size, where=f"{form} graph")
        entries = []
        for form, path in made.items():
            prec = "int8" if form.startswith("int8") else form
            cand = OnnxRuntimeBackend(bundle, precision=prec, device="cpu", graph=path, threads=threads)
            _say(progress, f"guard: {form} vs FP32 on {len(gset)} images")
            e = guard_mod.evaluate(bundle, cand, gset, ref_backend, limits, name=f"onnxruntime-{form}")
            e["graph"] = path.name
            e["fp32_nodes"] = fp32_nodes
            cand.close()
            entries.append(e)
            _say(progress, guard_mod.summary(e))
        guard_mod.write_report(bundle, entries)
        guard_mod.raise_on_failure(entries)
        files = []
        for form, path in made.items():
            name = path.name
            bundle.add_file(name, src=path, save=False)
            files.append(name)
        graph = "model.fp16.onnx" if precision == "fp16" else "model.int8.onnx"
        bundle.manifest.setdefault("quantized", {})[precision] = {
            "files": files, "source_sha256": bundle.model_hash("model.onnx"), "fp32_nodes": fp32_nodes,
            "keep_fp32": keep_fp32, "samples": min(samples, len(pool)) if precision == "int8" else 0}
        bundle.set_active(graph, precision)   # saves the manifest
    ref_backend.close()
    return QuantizeResult(precision, files, entries, fp32_nodes, time.perf_counter() - t0)


def _say(progress: bool, msg: str) -> None:
    if progress:
        import click

        click.echo(msg, err=True)
    log.info(msg)
