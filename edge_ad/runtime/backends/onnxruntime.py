"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider on one ONNX graph of a bundle.

``device``: ``cpu``; ``cuda`` / ``cuda:N`` (CUDA execution provider); ``tensorrt`` / ``tensorrt:N``
(ONNX Runtime's TensorRT execution provider, which builds and caches its own engines under
``engines/ort-trt/``; the native TensorRT backend is the one ``edge-ad compile`` validates).
On the CPU, INT8 runs the unsigned-activation form ``model.int8-u8.onnx`` when the bundle has it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ...bundle import Bundle
from ...errors import InputError, RuntimeFailure
from .base import Backend, check_outputs, check_precision, graph_file

log = logging.getLogger(__name__)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise InputError("onnxruntime is not installed: pip install onnxruntime "
                         "(onnxruntime-gpu for CUDA; on a Jetson, NVIDIA's JetPack wheel)") from exc
    return ort


def available_providers() -> list[str]:
    try:
        return list(_import_ort().get_available_providers())
    except InputError:
        return []


def parse_device(device: str | None) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 'tensorrt:0' -> (kind, index)."""
    device = (device or "cpu").strip().lower()
    kind, _, idx = device.partition(":")
    if kind not in ("cpu", "cuda", "tensorrt", "trt"):
        raise InputError(f"onnxruntime device '{device}': expected cpu, cuda[:N] or tensorrt[:N]")
    try:
        index = int(idx) if idx else 0
        if index < 0:
            raise ValueError(idx)
    except ValueError:
        raise InputError(f"onnxruntime device '{device}': the device index must be an integer >= 0") from None
    return ("tensorrt" if kind == "trt" else kind), index


def session_options(threads: int = 0, optimization: str = "all", exact: bool = False,
                    spinning: bool | None = None):
    """ONNX Runtime session options: ``threads`` intra-op threads (0: all cores), graph ``optimization``
    (all | extended | basic | none), ``spinning`` of the intra-op threads (None: ONNX Runtime's default).

    ``exact``: Q/DQ pairs are computed as the graph writes them (dequantized values in float), not fused
    into ONNX Runtime's integer kernels. Those are exact on ARM and on x86 CPUs with VNNI, but on x86 CPUs
    with AVX2 and no VNNI their u8 x s8 products go through VPMADDUBSW, whose 16-bit pair sums saturate
    (ONNX Runtime's quantization docs): a conv's output can be off by tens of quantization steps there.
    The exact arithmetic is what TensorRT and the integer kernels of ARM and VNNI CPUs compute."""
    ort = _import_ort()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise InputError(f"onnxruntime optimization '{optimization}': expected one of {', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, precision: str | None = None, device: str | None = "cpu",
                 threads: int = 0, max_batch: int = 64, graph: str | os.PathLike | None = None,
                 verify: bool = True, optimization: str = "all", int8_form: str = "auto",
                 spinning: bool | None = None, exact: bool = False):
        """``spinning``: ONNX Runtime's intra-op thread spinning (None: its default, on). Off is faster when
        the cores are shared with other busy processes (docs/compile.md, "Threads"). ``exact``: an INT8
        graph's Q/DQ pairs computed as the graph writes them, not by this CPU's fused integer kernels
        (:func:`session_options`; the accuracy guard judges the TensorRT form so)."""
        ort = _import_ort()
        kind, index = parse_device(device)
        self.device = kind if kind == "cpu" else f"{kind}:{index}"
        self.image_size = bundle.image_size
        self.max_batch = int(max_batch)
        if graph is not None:  # an explicit file (the guard compares candidates before they are recorded)
            path = Path(graph)
            self.precision = check_precision(precision or "fp32")
        else:
            self.precision = check_precision(precision or bundle.active_precision)
            name = graph_file(bundle, self.precision, kind, int8_form)
            # on disk and recorded by the manifest (an unrecorded graph is left from another model)
            path = bundle.check_graph(name, verify=verify)
        self.graph = path

        providers = self._providers(kind, index, bundle, ort)
        self.exact = bool(exact)
        so = session_options(threads, optimization, exact=self.exact, spinning=spinning)
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise RuntimeFailure(f"{path}: ONNX Runtime could not load the graph "
                                 f"({type(exc).__name__}: {exc})") from exc
        got = self._sess.get_providers()
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if wanted not in got:
            raise RuntimeFailure(f"ONNX Runtime did not enable {wanted} (session providers: {got}); "
                                 "check the CUDA / TensorRT libraries this onnxruntime build needs")
        self.providers = got
        inputs = self._sess.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "image":
            raise InputError(f"{path}: expected one input named 'image', graph has "
                             f"{[i.name for i in inputs]}; re-export with 'edge-ad export'")
        check_outputs([o.name for o in self._sess.get_outputs()], bundle.outputs, str(path))
        self.output_names = bundle.outputs

    def _providers(self, kind: str, index: int, bundle: Bundle, ort) -> list:
        have = ort.get_available_providers()
        if kind == "cpu":
            return ["CPUExecutionProvider"]
        if kind == "cuda":
            if "CUDAExecutionProvider" not in have:
                raise InputError(f"this onnxruntime has no CUDA provider (providers: {have}); "
                                 "pip install onnxruntime-gpu, or use device 'cpu'")
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        if "TensorrtExecutionProvider" not in have:
            raise InputError(f"this onnxruntime has no TensorRT provider (providers: {have}); "
                             "install onnxruntime-gpu built with TensorRT, or use the native 'tensorrt' backend")
        h, w = bundle.image_size
        cache = bundle.engines_dir / "ort-trt"
        cache.mkdir(parents=True, exist_ok=True)
        opts = {
            "device_id": index,
            "trt_fp16_enable": self.precision in ("fp16", "int8"),
            "trt_int8_enable": self.precision == "int8",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": f"image:1x3x{h}x{w}",
            "trt_profile_opt_shapes": f"image:1x3x{h}x{w}",
            "trt_profile_max_shapes": f"image:{self.max_batch}x3x{h}x{w}",
        }
        rest = [("CUDAExecutionProvider", {"device_id": index})] if "CUDAExecutionProvider" in have else []
        return [("TensorrtExecutionProvider", opts)] + rest + ["CPUExecutionProvider"]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            outs = self._sess.run(self.output_names, {"image": batch})
        except Exception as exc:
            raise RuntimeFailure(f"{self.graph}: ONNX Runtime inference failed ({type(exc).__name__}: {exc})") from exc
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs)}

    def describe(self) -> dict:
        d = super().describe()
        if self.precision == "int8":   # which arithmetic ran the Q/DQ graph (session_options' exact)
            d["int8_arithmetic"] = "exact" if self.exact else "fused"
        return d

    def close(self) -> None:
        self._sess = None
