"""The backend interface: one loaded graph or engine, float32 ``[B, 3, H, W]`` in, raw outputs out.

Every backend returns the same raw outputs (named by the bundle's ``outputs``), so the one scoring path
(:mod:`edge_ad.scoring` through :class:`edge_ad.inspector.Inspector`) serves them all. Nothing here imports
torch, onnxruntime or tensorrt: each backend module imports its own engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ...errors import InputError

if TYPE_CHECKING:
    from ...bundle import Bundle

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")

# ONNX file of each precision inside a bundle. "int8" has two forms: signed symmetric activations
# (model.int8.onnx, the form TensorRT and GPUs want) and unsigned 8-bit activations for CPUs
# (model.int8-u8.onnx, about twice as fast in ONNX Runtime on x86).
GRAPH_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
CPU_INT8_FILE = "model.int8-u8.onnx"
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")   # platform.machine() of x86 CPUs, lower case


def is_x86() -> bool:
    """Whether this machine's CPU is x86 (``platform.machine()``)."""
    import platform

    return (platform.machine() or "").lower() in X86_MACHINES


def slower_than_fp32(backend) -> tuple[str, str] | None:
    """(why, what to do) when ``backend`` runs FP16 on an x86 CPU through ONNX Runtime, which runs
    ``model.fp16.onnx`` slower than ``model.onnx`` there (docs/compile.md: 216 against 188 ms per frame
    measured): FP16 is for GPUs and TensorRT. None otherwise (ARM CPUs were not measured)."""
    if getattr(backend, "name", "") != "onnxruntime" or getattr(backend, "device", "") != "cpu" \
            or getattr(backend, "precision", "") != "fp16" or not is_x86():
        return None
    return ("ONNX Runtime runs FP16 (model.fp16.onnx) slower than FP32 on an x86 CPU: FP16 is for GPUs and TensorRT",
            "run FP32 on this CPU: model.precision = \"fp32\" (or empty, when the bundle's active graph is FP32)")


def summary_text(summary: dict) -> str:
    """``onnxruntime int8 on cpu (model.int8-u8.onnx)``: a :meth:`Backend.summary` in words (what scored a
    calibration's frames, in messages)."""
    graph = f" ({summary['graph']})" if summary.get("graph") else ""
    return f"{summary['backend']} {summary['precision']} on {summary['device']}{graph}"


def precision_of_graph(name: str) -> str:
    """'model.int8-u8.onnx' -> 'int8' (the precision a graph file holds)."""
    if name == CPU_INT8_FILE:
        return "int8"
    for prec, fname in GRAPH_FILES.items():
        if fname == name:
            return prec
    raise InputError(f"graph '{name}': not one of the bundle's graph files "
                     f"({', '.join(list(GRAPH_FILES.values()) + [CPU_INT8_FILE])})")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    return precision


class Backend:
    """One loaded graph or engine. Subclasses set the attributes and implement ``_run``.

    ``infer`` checks the input once for every backend (dtype, rank, channels, size) and splits a batch
    larger than ``max_batch`` into chunks, so callers never have to know an engine's profile.
    """

    name: str = ""
    precision: str = "fp32"
    device: str = "cpu"
    output_names: list[str]
    image_size: tuple[int, int]
    max_batch: int = 64
    graph: Path | None = None      # the file this backend runs (ONNX graph or TensorRT engine)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._check_batch(batch)
        n = batch.shape[0]
        if n <= self.max_batch:
            return self._run(batch)
        parts = [self._run(batch[i:i + self.max_batch]) for i in range(0, n, self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in self.output_names}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} does not implement _run")

    def close(self) -> None:
        """Release the graph, engine and buffers. Safe to call twice."""

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.precision, "device": self.device,
                "graph": str(self.graph) if self.graph else None, "max_batch": self.max_batch,
                "image_size": list(self.image_size), "outputs": list(self.output_names)}

    def summary(self) -> dict:
        """What runs, for outputs and records: backend, precision, device and the graph's file name."""
        return {"backend": self.name, "precision": self.precision, "device": self.device,
                "graph": self.graph.name if self.graph else None}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision} on {self.device}>"

    # ------------------------------------------------------------------ helpers
    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise InputError(f"backend input: expected a numpy array, got {type(batch).__name__}")
        h, w = self.image_size
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (h, w):
            raise InputError(f"backend input has shape {tuple(batch.shape)}; expected [B, 3, {h}, {w}] "
                             "(edge_ad.data.image.to_batch makes it)")
        if batch.shape[0] == 0:
            raise InputError("backend input: empty batch")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        return np.ascontiguousarray(batch)


def graph_file(bundle: Bundle, precision: str, device_kind: str, int8_form: str = "auto") -> str:
    """Which ONNX file of the bundle runs ``precision`` on this kind of device.

    INT8 on the CPU: the unsigned-activation form when the bundle has it (``int8_form`` 'auto'), or the
    form asked for ('u8' / 's8'); on GPUs always the signed symmetric form. ONNX Runtime and OpenVINO
    both run the u8 form faster on x86 CPUs (docs/compile.md). A CPU form the accuracy guard refused
    (:meth:`Bundle.graph_refusal`) is still the one 'auto' names on the CPU, so that opening it says why it
    is not there and what to do, instead of running the TensorRT form, which was not judged on CPU kernels;
    ``int8_form='s8'`` runs that form on the CPU explicitly.
    """
    check_precision(precision)
    if int8_form not in ("auto", "u8", "s8"):
        raise InputError(f"int8_form '{int8_form}': expected auto, u8 or s8")
    if precision == "int8":
        if int8_form == "u8" or (int8_form == "auto" and device_kind == "cpu" and (
                (bundle.has(CPU_INT8_FILE) and CPU_INT8_FILE in bundle.manifest.get("files", {}))
                or bundle.graph_refusal(CPU_INT8_FILE) is not None)):
            return CPU_INT8_FILE
    return GRAPH_FILES[precision]


def check_outputs(have: Iterable[str], want: list[str], where: str) -> None:
    have = list(have)
    missing = [n for n in want if n not in have]
    if missing:
        raise InputError(f"{where}: outputs {have} lack {missing} named by the bundle's manifest "
                         f"(model.outputs = {want}); re-export with 'edge-ad export'")
