"""torch -> ONNX: one input ``image`` float32 [B, 3, H, W] (0..255 RGB, normalization inside the graph),
dynamic batch, the raw maps named by the bundle's ``outputs`` as outputs. Calibration stays outside.

The exported graph is checked three ways before it replaces ``model.onnx``: the ONNX checker (full check,
with strict shape inference), the output names / ranks / dynamic batch, and a numerical comparison of ONNX
Runtime with the torch module on a random batch of two. A re-export invalidates what was derived from
the old graph (quantized graphs, their report, engines by their key): the derived graphs are removed and
the active graph goes back to FP32.
"""

from __future__ import annotations

import io
import logging
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from ..bundle import Bundle, now_iso
from ..errors import InputError, RuntimeFailure

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DERIVED = ("model.fp16.onnx", "model.int8.onnx", "model.int8-u8.onnx", "quant_report.json")
EXPORT_RTOL = 1e-4


def export_bundle(bundle: Bundle, module=None, opset: int = DEFAULT_OPSET, progress: bool = True,
                  shown_as: str | os.PathLike | None = None) -> Path:
    """Export ``module`` (default: the bundle's checkpoint) to ``bundle/model.onnx``; returns its path.

    ``shown_as``: the path the progress message names instead (training builds the bundle in a staging
    folder that is renamed to its ``--out`` at the end)."""
    import torch

    from . import MAX_OPSET, MIN_OPSET

    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset {opset!r}: expected a whole number {MIN_OPSET}..{MAX_OPSET}")
    bundle.check_writable("export")   # model.onnx and manifest.json go there: known before the export
    if module is None:
        from ..models import load_from_bundle
        module = load_from_bundle(bundle, device="cpu")
    names = list(getattr(module, "output_names", []) or [])
    if names != bundle.outputs:
        raise InputError(f"module output_names {names} differ from the bundle's outputs {bundle.outputs}")
    module = module.eval().to("cpu")
    h, w = bundle.image_size
    gen = torch.Generator().manual_seed(0)
    sample = (torch.rand(2, 3, h, w, generator=gen) * 255.0).float()
    _say(progress, f"exporting {bundle.kind} {h}x{w} to ONNX (opset {opset})")
    buf = io.BytesIO()
    dyn = {"image": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer / constant-folding chatter; the checks below decide
            torch.onnx.export(module, (sample,), buf, input_names=["image"], output_names=names,
                              dynamic_axes=dyn, opset_version=int(opset), do_constant_folding=True,
                              dynamo=False)
    except Exception as exc:  # torch.onnx raises many types (UnsupportedOperatorError, RuntimeError, ...)
        raise RuntimeFailure(f"torch.onnx.export of the {bundle.kind} model failed: {type(exc).__name__}: {exc}") from exc
    data = buf.getvalue()
    model = check_graph(data, names, (h, w), where="exported graph")
    with torch.inference_mode():
        ref = module(sample)
    ref = [t.detach().float().numpy() for t in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    compare_with_onnxruntime(data, sample.numpy(), dict(zip(names, ref)), where="exported graph")

    for name in DERIVED:
        if bundle.has(name):
            log.info("export: removing %s (derived from the previous model.onnx)", name)
    versions = {**bundle.manifest.get("versions", {}),
                "torch": torch.__version__.split("+")[0], "onnx": _onnx_version()}
    # one change: until the new graph is on disk the old bundle stays whole (see Bundle.replace_files)
    bundle.replace_files({"model.onnx": data}, remove=DERIVED, meta={
        "active": {"graph": "model.onnx", "precision": "fp32"}, "versions": versions, "quantized": {},
        "export": {"opset": int(opset), "input": "image", "outputs": names, "dynamic_batch": True,
                   "exported": now_iso(), "ir_version": int(model.ir_version)}})
    _say(progress, f"wrote {shown_as or bundle.file('model.onnx')} ({len(data) / 1e6:.1f} MB)")
    return bundle.file("model.onnx")


def check_graph(data: bytes | os.PathLike, outputs: list[str], image_size: tuple[int, int], where: str):
    """ONNX checker (full, strict shape inference) + the graph contract; returns the loaded model."""
    import onnx

    try:
        model = onnx.load_from_string(data) if isinstance(data, bytes) else onnx.load(str(data))
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # onnx raises ValidationError, InferenceError, DecodeError...
        raise RuntimeFailure(f"{where}: the ONNX checker refused it ({type(exc).__name__}: {exc})") from exc
    g = inferred.graph
    init = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init]
    if [i.name for i in inputs] != ["image"]:
        raise RuntimeFailure(f"{where}: inputs {[i.name for i in inputs]}, expected ['image']")
    dims = inputs[0].type.tensor_type.shape.dim
    h, w = image_size
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(shape) != 4 or not dims[0].dim_param or shape[1:] != [3, h, w]:
        raise RuntimeFailure(f"{where}: input 'image' has shape {shape}; expected [batch, 3, {h}, {w}] "
                             "with a dynamic batch")
    got = [o.name for o in g.output]
    if got != list(outputs):
        raise RuntimeFailure(f"{where}: outputs {got}, expected {list(outputs)}")
    for o in g.output:
        if o.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise RuntimeFailure(f"{where}: output '{o.name}' is not float32")
        od = o.type.tensor_type.shape.dim
        if len(od) != 4 or not od[0].dim_param:
            raise RuntimeFailure(f"{where}: output '{o.name}' has shape "
                                 f"{[d.dim_param or d.dim_value for d in od]}; expected [batch, C, h, w]")
    return model


def compare_with_onnxruntime(data: bytes, batch: np.ndarray, ref: dict[str, np.ndarray], where: str,
                             rtol: float = EXPORT_RTOL) -> float:
    """Run the graph on the CPU and compare with reference outputs; returns the worst relative error."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    outs = sess.run(list(ref), {"image": batch.astype(np.float32)})
    worst = 0.0
    for (name, r), o in zip(ref.items(), outs):
        if o.shape != r.shape:
            raise RuntimeFailure(f"{where}: output '{name}' has shape {o.shape} in ONNX Runtime, {r.shape} in torch")
        err = float(np.max(np.abs(o - r)) / (np.max(np.abs(r)) + 1e-12))
        worst = max(worst, err)
        if not err <= rtol:
            raise RuntimeFailure(f"{where}: ONNX Runtime and torch differ on '{name}' by {err:.2e} "
                                 f"(relative to the map's maximum; limit {rtol:.0e})")
    return worst


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


def _say(progress: bool, msg: str) -> None:
    if progress:
        import click

        click.echo(msg, err=True)
    log.info(msg)
