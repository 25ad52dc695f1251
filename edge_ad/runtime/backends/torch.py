"""Torch backend: the eval-mode ``nn.Module`` itself (evaluation during training, reference for parity).

The module comes from the bundle's checkpoint (``edge_ad.models.load_from_bundle``) or is handed in
(``module=``, as training does). ``precision='fp16'`` needs CUDA. ``cuda_graphs=True`` (CUDA only)
captures one graph per batch size on first use and replays it: the launch overhead that dominates
small-batch latency on a GPU goes away.
"""

from __future__ import annotations

import numpy as np

from ...bundle import Bundle
from ...errors import InputError, RuntimeFailure
from .base import Backend, check_outputs, check_precision


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise InputError("the torch backend needs PyTorch: pip install 'edge-ad[train]'") from exc
    return torch


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, precision: str | None = None, device: str | None = "cpu",
                 module=None, max_batch: int = 64, cuda_graphs: bool = False, threads: int = 0):
        torch = _import_torch()
        self._torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device '{self.device}': this torch has no CUDA device; use device 'cpu'")
        self.precision = check_precision(precision or "fp32")
        if self.precision == "int8":
            raise InputError("the torch backend runs fp32 or fp16; INT8 runs in onnxruntime or tensorrt")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise InputError("torch fp16 needs a CUDA device; on the CPU use fp32")
        if threads:
            torch.set_num_threads(int(threads))
        if module is None:
            from ...models import load_from_bundle
            module = load_from_bundle(bundle, device="cpu")
        names = list(getattr(module, "output_names", []))
        check_outputs(names, bundle.outputs, f"torch module {type(module).__name__}")
        self.output_names = bundle.outputs
        self._index = [names.index(n) for n in self.output_names]
        self.image_size = bundle.image_size
        self.max_batch = int(max_batch)
        self.graph = bundle.file("checkpoint.pt") if bundle.has("checkpoint.pt") else None
        module = module.eval().to(self.device)
        if self.precision == "fp16":
            module = module.half()
        self._module = module
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._cuda_graphs = bool(cuda_graphs)
        if self._cuda_graphs and not self.device.startswith("cuda"):
            raise InputError("cuda_graphs needs a CUDA device")
        self._graphs: dict[int, tuple] = {}

    def _forward(self, x):
        if self.precision == "fp32" and self.device.startswith("cuda"):
            # fp32 means fp32: cuDNN would otherwise run the convolutions in TF32 (10-bit mantissa), and
            # scores would drift 1e-3 from every other backend's
            with self._torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                outs = self._module(x)
        else:
            outs = self._module(x)
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        return [outs[i] for i in self._index]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        try:
            with torch.inference_mode():
                x = torch.from_numpy(batch).to(self.device, non_blocking=True).to(self._dtype)
                outs = self._replay(x) if self._cuda_graphs else self._forward(x)
                res = {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeFailure(f"torch backend: CUDA out of memory at batch {batch.shape[0]}") from exc
        return res

    def _replay(self, x):
        torch = self._torch
        b = x.shape[0]
        entry = self._graphs.get(b)
        if entry is None:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm up (cuDNN autotuning, lazy allocations) outside the capture
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            entry = self._graphs[b] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return [o.clone() for o in static_out]

    def close(self) -> None:
        self._graphs.clear()
        self._module = None
