"""Interchangeable inference backends behind one interface (docs/CONTRACTS.md, "Backends").

>>> backend = open_backend(Bundle.open("bundles/mt"), "auto")   # TensorRT engine, else ONNX Runtime (CUDA, else CPU)
>>> outputs = backend.infer(batch)                  # float32 [B, 3, H, W] in 0..255 -> raw outputs
>>> backend.close()

``backend``: ``auto`` | ``onnxruntime`` | ``tensorrt`` | ``torch`` | ``openvino`` (optional, x86 CPUs;
never chosen by ``auto``). ``precision``: ``fp32`` | ``fp16`` |
``int8``; None = the bundle's active precision; ``int8-u8`` names the CPU form of INT8 explicitly
(ONNX Runtime; ``int8_form="s8"`` runs the TensorRT form on the CPU instead). ``device``: ``cpu``, ``cuda[:N]`` or, for onnxruntime,
``tensorrt[:N]`` (its TensorRT execution provider); None = the best this machine has.
Extra keyword options go to the backend (``threads``, ``max_batch``, ``module`` for torch,
``cuda_graphs``, ``build`` for tensorrt).
"""

from __future__ import annotations

import importlib.util
import logging
import os

from ...bundle import Bundle
from ...errors import InputError
from .base import CPU_INT8_FILE, GRAPH_FILES, PRECISIONS, Backend, precision_of_graph, summary_text

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "openvino")

__all__ = ["Backend", "open_backend", "BACKENDS", "PRECISIONS", "GRAPH_FILES", "CPU_INT8_FILE",
           "precision_of_graph", "summary_text", "tensorrt_usable", "available"]


def tensorrt_usable() -> tuple[bool, str]:
    """(True, "") when tensorrt imports and a CUDA device answers; else (False, why not)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    try:
        import tensorrt  # noqa: F401

        from .cuda import cuda_api
        api = cuda_api()
        n = api.device_count()
    except Exception as exc:  # a broken install or no driver: report, never crash a probe
        return False, f"TensorRT/CUDA not usable: {exc}"
    if n < 1:
        return False, "no CUDA device"
    return True, ""


def available() -> dict[str, tuple[bool, str]]:
    """Which backend/device pairs this machine can run, with the reason for each one it cannot."""
    from .onnxruntime import available_providers

    prov = available_providers()
    out = {"onnxruntime:cpu": (bool(prov), "" if prov else "onnxruntime is not installed")}
    out["onnxruntime:cuda"] = ("CUDAExecutionProvider" in prov,
                               "" if "CUDAExecutionProvider" in prov else "onnxruntime has no CUDA provider")
    out["onnxruntime:tensorrt"] = ("TensorrtExecutionProvider" in prov, "" if "TensorrtExecutionProvider" in prov
                                   else "onnxruntime has no TensorRT provider")
    out["tensorrt"] = tensorrt_usable()
    ov = importlib.util.find_spec("openvino") is not None
    out["openvino:cpu"] = (ov, "" if ov else "openvino is not installed (optional: pip install openvino)")
    if importlib.util.find_spec("torch") is None:
        out["torch:cpu"] = out["torch:cuda"] = (False, "torch is not installed")
    else:
        import torch

        out["torch:cpu"] = (True, "")
        out["torch:cuda"] = (torch.cuda.is_available(), "" if torch.cuda.is_available() else "torch has no CUDA device")
    return out


def open_backend(bundle: Bundle | str | os.PathLike, backend: str = "auto", precision: str | None = None,
                 device: str | None = None, **options) -> Backend:
    """The backend that runs ``bundle``'s model: a :class:`~edge_ad.bundle.Bundle` (``Bundle.open(path)``) or
    the path of a bundle folder, opened here as ``Bundle.open`` opens it. Anything else is a TypeError (a
    string used to fail deep inside with ``'str' object has no attribute 'active_precision'``)."""
    if isinstance(bundle, (str, os.PathLike)):
        bundle = Bundle.open(bundle)
    elif not isinstance(bundle, Bundle):
        raise TypeError(f"open_backend: bundle is a {type(bundle).__name__}; expected a Bundle "
                        "(edge_ad.bundle.Bundle.open(path)) or the path of a bundle folder")
    if backend not in BACKENDS:
        raise InputError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")
    if precision == "int8-u8":  # the CPU form of INT8, by name (ONNX Runtime only)
        if backend not in ("auto", "onnxruntime"):
            raise InputError("precision 'int8-u8' (unsigned-activation INT8 for CPUs) runs in onnxruntime only")
        backend, precision = "onnxruntime", "int8"
        options["int8_form"] = "u8"
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)} or int8-u8")
    if backend == "auto":
        return _open_auto(bundle, precision, device, **options)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend, available_providers

        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available_providers() else "cpu"
        return OnnxRuntimeBackend(bundle, precision=precision, device=device, **options)
    if backend == "openvino":  # optional, x86 CPUs: pip install openvino
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(bundle, precision=precision, device=device or "cpu", **options)
    if backend == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, precision=precision, device=device or "cuda:0", **options)
    from .torch import TorchBackend

    return TorchBackend(bundle, precision=precision, device=device, **options)


def _open_auto(bundle: Bundle, precision: str | None, device: str | None, **options) -> Backend:
    if device is None or device.startswith("cuda"):
        ok, why = tensorrt_usable()
        if ok:
            from . import engine_cache
            from .cuda import cuda_api
            from .tensorrt import TensorRTBackend, current_target, import_tensorrt, parse_device

            index = parse_device(device)
            target = current_target(import_tensorrt(), cuda_api(), index)
            chk = engine_cache.select(bundle, target, precision)
            if chk is not None:
                trt_opts = {k: v for k, v in options.items() if k not in ("threads", "max_batch", "spinning")}
                return TensorRTBackend(bundle, precision=chk.meta["precision"], device=f"cuda:{index}", **trt_opts)
            why, build_as = engine_cache.no_engine(bundle, target, precision)
            log.warning("not using TensorRT: %s (%s); using ONNX Runtime", why,
                        engine_cache.compile_command(bundle, build_as))
        else:
            log.info("not using TensorRT: %s", why)
    from .onnxruntime import OnnxRuntimeBackend, available_providers

    if device is None:
        device = "cuda" if "CUDAExecutionProvider" in available_providers() else "cpu"
    options.pop("build", None)
    return OnnxRuntimeBackend(bundle, precision=precision or bundle.active_precision, device=device, **options)
