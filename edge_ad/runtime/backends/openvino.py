"""OpenVINO backend (optional, x86 industrial PCs): runs the bundle's own ONNX graphs on OpenVINO's CPU
plugin. INT8 runs one of the guarded Q/DQ graphs, so the artefact is one the guard checked: the
unsigned-activation form ``model.int8-u8.onnx`` when the bundle has it (``int8_form`` 'auto'; measured 1-4 %
faster than the signed form on x86, and at least as fast as NNCF's own INT8 model: docs/compile.md), else
``model.int8.onnx``. OpenVINO's low-precision transformations turn either into INT8 kernels.
``pip install openvino``; never needed by the core runtime.

Shapes: OpenVINO is fastest on static shapes, so one compiled model per batch size is kept (at most
``max_batch`` images per call; larger batches are split by :class:`Backend`).
"""

from __future__ import annotations

import numpy as np

from ...bundle import Bundle
from ...errors import InputError, RuntimeFailure
from .base import Backend, check_outputs, check_precision, graph_file


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, bundle: Bundle, precision: str | None = None, device: str | None = "cpu",
                 max_batch: int = 64, threads: int = 0, hint: str = "LATENCY", verify: bool = True,
                 int8_form: str = "auto"):
        try:
            import openvino as ov
        except ImportError as exc:
            raise InputError("the openvino backend needs OpenVINO: pip install openvino") from exc
        self.precision = check_precision(precision or bundle.active_precision)
        if (device or "cpu").lower() != "cpu":
            raise InputError(f"openvino device '{device}': this backend runs on the CPU only")
        self.device = "cpu"
        name = graph_file(bundle, self.precision, "cpu", int8_form)
        path = bundle.check_graph(name, verify=verify)  # on disk and recorded by the manifest
        self.graph = path
        self.image_size = bundle.image_size
        self.max_batch = int(max_batch)
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(path))
        except Exception as exc:  # openvino raises RuntimeError subclasses with the reason
            raise RuntimeFailure(f"{path}: OpenVINO could not read the graph ({exc})") from exc
        names = [o.get_any_name() for o in self._model.outputs]
        check_outputs(names, bundle.outputs, str(path))
        self.output_names = bundle.outputs
        self._config = {"PERFORMANCE_HINT": hint}
        # f32 for every graph: the parts an INT8 graph keeps in float (the layers the guard kept in higher
        # precision, the score maps) must not silently drop to bf16 on CPUs that have it (AMX / AVX512-BF16),
        # or the guard measured on one machine would not hold on another.
        self._config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._requests: dict[int, object] = {}

    def _request(self, n: int):
        req = self._requests.get(n)
        if req is None:
            h, w = self.image_size
            m = self._model.clone()
            m.reshape({m.inputs[0].get_any_name(): [n, 3, h, w]})
            try:
                req = self._core.compile_model(m, "CPU", self._config).create_infer_request()
            except Exception as exc:
                raise RuntimeFailure(f"{self.graph}: OpenVINO could not compile batch {n} ({exc})") from exc
            self._requests[n] = req
        return req

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        req = self._request(batch.shape[0])
        try:
            res = req.infer({0: batch})
        except Exception as exc:
            raise RuntimeFailure(f"{self.graph}: OpenVINO inference failed ({exc})") from exc
        by_name = {k.get_any_name(): v for k, v in res.items()}
        return {n: np.array(by_name[n], dtype=np.float32) for n in self.output_names}

    def close(self) -> None:
        self._requests.clear()
