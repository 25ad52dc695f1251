"""Native TensorRT backend: a validated engine from the bundle's cache, run by tensor name.

TensorRT 8.6 (JetPack 6.0), 10.x (JetPack 6.1 / 6.2) and 11.x share the name-based API used here:
``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode``, ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3``. One CUDA stream, pinned host buffers and device
buffers sized for the engine's largest batch, allocated once and freed in ``close()``. Opening, each
inference and ``close()`` run with the device made current on the thread that calls them
(:meth:`..cuda.CudaPython.activate`): the runtime opens the backend on one thread and infers on another.

The engine is loaded only after :mod:`engine_cache` accepted it (key, sidecar, sha256, a passed accuracy
guard); a refused engine raises with the reason (``build=True`` compiles and guards a new one instead,
as ``edge-ad compile`` does).
"""

from __future__ import annotations

import logging

import numpy as np

from ...bundle import Bundle
from ...errors import InputError, RuntimeFailure
from . import engine_cache
from .base import Backend, check_outputs, check_precision
from .cuda import cuda_api

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT's Python package is not installed. On a Jetson: sudo apt install "
                "python3-libnvinfer python3-libnvinfer-dev (part of JetPack; in a venv use "
                "--system-site-packages). On an x86 machine with an NVIDIA GPU: pip install tensorrt "
                "cuda-python. Then run 'edge-ad compile'")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise InputError(INSTALL_HINT) from exc
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def trt_supported(version: str) -> bool:
    """TensorRT 8.6 (JetPack 6.0), 10.x and 11.x: the releases whose API this runtime is written for
    (8.5, JetPack 5, lacks parts of it)."""
    parts = str(version).split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return False
    return major > 8 or (major == 8 and minor >= 6)


def parse_device(device: str | None) -> int:
    device = (device or "cuda:0").strip().lower()
    kind, _, idx = device.partition(":")
    if kind not in ("cuda", "gpu", "tensorrt"):
        raise InputError(f"tensorrt device '{device}': expected cuda or cuda:N")
    try:
        return int(idx) if idx else 0
    except ValueError:
        raise InputError(f"tensorrt device '{device}': the device index must be an integer") from None


def current_target(trt, cuda, index: int = 0) -> engine_cache.Target:
    n = cuda.device_count()
    if n <= index:
        raise InputError(f"CUDA device {index} not found ({n} device(s) visible)")
    major, minor = cuda.compute_capability(index)
    name, sm_count, memory_mib = cuda.device_model(index)
    return engine_cache.Target(f"{major}.{minor}", str(trt.__version__), name, sm_count, memory_mib)


class _Logger:
    """A TensorRT logger that keeps the messages, so a failure can say what TensorRT said."""

    def __new__(cls, trt, level=None):
        class Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []
                self.level = int(level if level is not None else trt.ILogger.Severity.WARNING)

            def log(self, severity, msg):
                if int(severity) <= self.level:
                    name = getattr(severity, "name", str(severity))
                    self.messages.append((name, msg))
                    error = int(severity) <= int(trt.ILogger.Severity.ERROR)
                    (log.error if error else log.warning)("TensorRT: %s", msg)

            def errors(self) -> list[str]:
                return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

        return Log()


def deserialize(trt, logger, data: bytes, where: str):
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        errs = "; ".join(logger.errors()[-3:]) or "no message"
        raise RuntimeFailure(f"{where}: TensorRT could not deserialize the engine ({errs}); it is corrupt "
                             "or was built by another TensorRT version")
    return runtime, engine


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str | None = None, device: str | None = "cuda:0",
                 build: bool = False, engine_path=None, **build_options):
        self._cuda = None
        self._bufs: list = []
        self._stream = None
        trt = import_tensorrt()
        self._trt = trt
        index = parse_device(device)
        cuda = cuda_api()
        self._cuda = cuda
        self._index = index
        with cuda.activate(index):
            self._open(trt, cuda, index, bundle, precision, build, engine_path, build_options)

    def _open(self, trt, cuda, index: int, bundle: Bundle, precision, build, engine_path, build_options) -> None:
        self.device = f"cuda:{index}"
        self.image_size = bundle.image_size
        self.output_names = bundle.outputs
        target = current_target(trt, cuda, index)
        self.target = target

        if engine_path is not None:  # an explicit file (compile's guard, before it is accepted)
            self.precision = check_precision(precision or "fp32")
            path = engine_path
        else:
            asked = check_precision(precision) if precision is not None else None
            chk = engine_cache.select(bundle, target, asked)
            if chk is None:
                why, build_as = engine_cache.no_engine(bundle, target, precision)
                if not build:
                    raise InputError(f"no usable TensorRT engine: {why}. Build one on this device: "
                                     f"{engine_cache.compile_command(bundle, build_as)}")
                log.warning("no usable TensorRT engine (%s); building a new one (%s)", why, build_as)
                from ...compile.tensorrt import compile_bundle

                compile_bundle(bundle, build_as, device=index, **build_options)
                chk = engine_cache.select(bundle, target, asked)
                if chk is None:
                    raise RuntimeFailure("TensorRT engine still refused after building: "
                                         f"{engine_cache.no_engine(bundle, target, precision)[0]}")
            self.precision = chk.meta["precision"]
            path = chk.engine
        self.graph = path
        self._logger = _Logger(trt)
        self._runtime, self._engine = deserialize(trt, self._logger, path.read_bytes(), str(path))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeFailure(f"{path}: TensorRT could not create an execution context "
                                 "(out of GPU memory?)")
        self._setup_io(path)

    def _setup_io(self, path) -> None:
        trt, eng, cuda = self._trt, self._engine, self._cuda
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != ["image"]:
            raise InputError(f"{path}: engine inputs {inputs}; expected ['image']")
        check_outputs(outputs, self.output_names, str(path))
        h, w = self.image_size
        mn, _opt, mx = (tuple(s) for s in eng.get_tensor_profile_shape("image", 0))
        if tuple(mx[1:]) != (3, h, w) or mn[0] > 1:
            raise InputError(f"{path}: engine profile {mn}..{mx} does not take [1..N, 3, {h}, {w}]")
        self.max_batch = int(mx[0])
        self._stream = cuda.stream_create()
        self._ctx_shape(self.max_batch)
        self._io = {}
        for n in ["image"] + list(self.output_names):
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(n)))
            shape = tuple(self._context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeFailure(f"{path}: tensor '{n}' has unresolved shape {shape} at batch {self.max_batch}")
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host = cuda.host_alloc(nbytes)
            self._bufs.append(("host", host))
            dev = cuda.malloc(nbytes)
            self._bufs.append(("dev", dev))
            self._io[n] = (host, dev, dtype)
            if not self._context.set_tensor_address(n, dev):
                raise RuntimeFailure(f"{path}: set_tensor_address('{n}') refused")
        for n in outputs:  # outputs the bundle does not use still need an address
            if n not in self._io:
                dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(n)))
                nbytes = int(np.prod(tuple(self._context.get_tensor_shape(n)))) * dtype.itemsize
                dev = cuda.malloc(nbytes)
                self._bufs.append(("dev", dev))
                self._context.set_tensor_address(n, dev)

    def _ctx_shape(self, b: int) -> None:
        h, w = self.image_size
        if not self._context.set_input_shape("image", (b, 3, h, w)):
            raise RuntimeFailure(f"TensorRT refused input shape [{b}, 3, {h}, {w}] "
                                 f"(engine profile: batch 1..{self.max_batch})")

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._cuda.activate(self._index):   # on this thread: inference runs on another than the opening one
            return self._run_here(batch)

    def _run_here(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cuda, ctx, stream = self._cuda, self._context, self._stream
        b = batch.shape[0]
        self._ctx_shape(b)
        host, dev, dtype = self._io["image"]
        nbytes = batch.size * dtype.itemsize
        np.copyto(host[:nbytes].view(dtype).reshape(batch.shape), batch, casting="unsafe")
        cuda.htod_async(dev, host[:nbytes], stream)
        if not ctx.execute_async_v3(cuda.stream_handle(stream)):
            errs = "; ".join(self._logger.errors()[-3:]) or "no message"
            raise RuntimeFailure(f"TensorRT execute_async_v3 failed ({errs})")
        views = {}
        for n in self.output_names:
            ohost, odev, odt = self._io[n]
            shape = tuple(ctx.get_tensor_shape(n))
            nbytes = int(np.prod(shape)) * odt.itemsize
            cuda.dtoh_async(ohost[:nbytes], odev, stream)
            views[n] = (ohost[:nbytes], odt, shape)
        cuda.stream_sync(stream)
        return {n: v.view(dt).reshape(shape).astype(np.float32) for n, (v, dt, shape) in views.items()}

    def close(self) -> None:
        cuda = self._cuda
        if cuda is None:
            return
        errors = []
        try:
            with cuda.activate(self._index):
                # the context and engine go before the memory they point at
                self._context = None
                self._engine = None
                self._runtime = None
                for kind, buf in reversed(self._bufs):
                    try:
                        cuda.host_free(buf) if kind == "host" else cuda.free(buf)
                    except RuntimeFailure as exc:
                        errors.append(str(exc))
                self._bufs = []
                if self._stream is not None:
                    try:
                        cuda.stream_destroy(self._stream)
                    except RuntimeFailure as exc:
                        errors.append(str(exc))
                    self._stream = None
        except RuntimeFailure as exc:   # the device could not be made current here
            errors.append(str(exc))
        self._cuda = None
        try:
            cuda.close()   # pycuda: releases the primary context it retained
        except RuntimeFailure as exc:
            errors.append(str(exc))
        if errors:
            raise RuntimeFailure("TensorRT backend: freeing CUDA resources failed: " + "; ".join(errors))

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
