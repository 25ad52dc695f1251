"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python or pycuda.

cuda-python (``cuda.bindings.runtime``, or the legacy ``cuda.cudart``) is preferred: it is NVIDIA's
binding and ships for JetPack 6. pycuda is the fallback. Every cuda-python status goes through
:func:`check`, which raises :class:`CudaError` with the error's name (``cudaErrorMemoryAllocation``...);
pycuda's own exceptions are turned into the same error. Buffers are freed explicitly, never left to GC.

The device is current *per thread* (cuda-python: ``cudaSetDevice``; pycuda: the context pushed on the
thread's stack), and the thread that opens a backend is not the one that runs inference (the runtime's
``edge-ad-inference`` thread). So every call that uses the device runs inside :meth:`activate` on the thread
that makes it: cuda-python sets the device there, pycuda pushes the primary context there for the call and
pops it after (pycuda aborts the process when a thread ends with a context still pushed).
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from ...errors import InputError, RuntimeFailure

INSTALL_HINT = ("install cuda-python (pip install 'cuda-python>=12', or 'edge-ad[gpu]'), "
                "or pycuda as a fallback")


class CudaError(RuntimeFailure):
    """A CUDA call failed; the message names the call and the CUDA error."""


def check(result, what: str = "CUDA call"):
    """Check a cuda-python result ``(status, *values)`` (or a bare status); return the value(s).

    The one place a CUDA status is examined: a failure raises :class:`CudaError` with the error name.
    """
    if isinstance(result, tuple):
        status, values = result[0], result[1:]
    else:
        status, values = result, ()
    code = int(getattr(status, "value", status))
    if code != 0:
        raise CudaError(f"{what} failed: {_error_name(status)} ({code})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _error_name(status) -> str:
    try:
        rt = _cudart_module()
        err, name = rt.cudaGetErrorName(status)
        if int(getattr(err, "value", err)) == 0:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # an unknown status or an old binding: fall back to the enum's own name
        pass
    return getattr(status, "name", str(status))


_RT = None


def _cudart_module():
    global _RT
    if _RT is None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart as rt  # older cuda-python (JetPack 6.0 era)
        _RT = rt
    return _RT


class CudaPython:
    """cuda-python runtime API."""

    name = "cuda-python"

    def __init__(self):
        self.rt = _cudart_module()

    def device_count(self) -> int:
        return int(check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    @contextlib.contextmanager
    def activate(self, index: int):
        """Device ``index`` current on the calling thread (``cudaSetDevice`` is per thread: a thread that never
        called it runs on device 0)."""
        check(self.rt.cudaSetDevice(index), f"cudaSetDevice({index})")
        yield

    def compute_capability(self, index: int) -> tuple[int, int]:
        attr = self.rt.cudaDeviceAttr
        major = check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, index),
                      "cudaDeviceGetAttribute(major)")
        minor = check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, index),
                      "cudaDeviceGetAttribute(minor)")
        return int(major), int(minor)

    def device_model(self, index: int) -> tuple[str, int, int]:
        """(CUDA name, SM count, memory in MiB): what tells GPU models apart (on a Jetson the name is "Orin"
        for every Orin module; the SMs and the memory differ)."""
        prop = check(self.rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name), int(prop.multiProcessorCount), int(prop.totalGlobalMem) >> 20

    def mem_info(self) -> tuple[int, int]:
        free, total = check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)

    def stream_create(self):
        return check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    @staticmethod
    def stream_handle(stream) -> int:
        return int(stream)

    def stream_sync(self, stream) -> None:
        check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream) -> None:
        check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def malloc(self, nbytes: int) -> int:
        return int(check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        check(self.rt.cudaFree(ptr), "cudaFree")

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Pinned (page-locked) host buffer as a uint8 numpy array."""
        ptr = int(check(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return np.frombuffer(buf, dtype=np.uint8)

    def host_free(self, arr: np.ndarray) -> None:
        check(self.rt.cudaFreeHost(arr.ctypes.data), "cudaFreeHost")

    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync(host to device)")

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
              "cudaMemcpyAsync(device to host)")

    def close(self) -> None:
        pass


class PyCuda:
    """pycuda driver API on the device's primary context (the one TensorRT's runtime calls use)."""

    name = "pycuda"

    def __init__(self):
        import pycuda.driver as drv

        self.drv = drv
        self._call(drv.init, "cuInit")
        self._ctx = None
        self._dev_allocs: dict[int, object] = {}
        self._host_allocs: dict[int, np.ndarray] = {}

    def _call(self, fn, what: str, *args):
        try:
            return fn(*args)
        except self.drv.Error as exc:  # pycuda names the CUDA error in its message
            raise CudaError(f"{what} failed: {exc}") from exc

    def device_count(self) -> int:
        return int(self._call(self.drv.Device.count, "cuDeviceGetCount"))

    def _primary(self, index: int):
        if self._ctx is None:
            dev = self._call(self.drv.Device, f"cuDeviceGet({index})", index)
            self._ctx = self._call(dev.retain_primary_context, "cuDevicePrimaryCtxRetain")
        return self._ctx

    def _current(self) -> bool:
        """Whether the primary context is the current one of the calling thread (pycuda's per-thread stack)."""
        cur = self._call(self.drv.Context.get_current, "cuCtxGetCurrent")
        return cur is not None and cur == self._ctx

    @contextlib.contextmanager
    def activate(self, index: int):
        """The primary context current on the calling thread for the block: pushed, and popped after, where it
        is not current already."""
        self._primary(index)
        pushed = not self._current()
        if pushed:
            self._call(self._ctx.push, "cuCtxPushCurrent")
        try:
            yield
        finally:
            if pushed:
                self._call(self.drv.Context.pop, "cuCtxPopCurrent")

    def compute_capability(self, index: int) -> tuple[int, int]:
        return tuple(self._call(self.drv.Device(index).compute_capability, "cuDeviceComputeCapability"))

    def device_model(self, index: int) -> tuple[str, int, int]:
        """(CUDA name, SM count, memory in MiB), as :meth:`CudaPython.device_model`."""
        dev = self._call(self.drv.Device, f"cuDeviceGet({index})", index)
        name = str(self._call(dev.name, "cuDeviceGetName"))
        sms = self._call(dev.get_attribute, "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
                         self.drv.device_attribute.MULTIPROCESSOR_COUNT)
        return name, int(sms), int(self._call(dev.total_memory, "cuDeviceTotalMem")) >> 20

    def mem_info(self) -> tuple[int, int]:
        free, total = self._call(self.drv.mem_get_info, "cuMemGetInfo")
        return int(free), int(total)

    def stream_create(self):
        return self._call(self.drv.Stream, "cuStreamCreate")

    @staticmethod
    def stream_handle(stream) -> int:
        return int(stream.handle)

    def stream_sync(self, stream) -> None:
        self._call(stream.synchronize, "cuStreamSynchronize")

    def stream_destroy(self, stream) -> None:
        pass  # pycuda destroys the stream with the object

    def malloc(self, nbytes: int) -> int:
        alloc = self._call(self.drv.mem_alloc, f"cuMemAlloc({nbytes})", nbytes)
        ptr = int(alloc)
        self._dev_allocs[ptr] = alloc
        return ptr

    def free(self, ptr: int) -> None:
        alloc = self._dev_allocs.pop(ptr, None)
        if alloc is not None:
            self._call(alloc.free, "cuMemFree")

    def host_alloc(self, nbytes: int) -> np.ndarray:
        arr = self._call(self.drv.pagelocked_empty, f"cuMemHostAlloc({nbytes})", (nbytes,), np.uint8)
        self._host_allocs[arr.ctypes.data] = arr
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        owner = self._host_allocs.pop(arr.ctypes.data, None)
        if owner is not None and getattr(owner, "base", None) is not None:
            self._call(owner.base.free, "cuMemFreeHost")

    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        self._call(self.drv.memcpy_htod_async, "cuMemcpyHtoDAsync", dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        self._call(self.drv.memcpy_dtoh_async, "cuMemcpyDtoHAsync", dst, src, stream)

    def close(self) -> None:
        """Release the primary context :meth:`activate` retained (pycuda's ``detach``: cuDevicePrimaryCtxRelease),
        once: a second call, or one before any :meth:`activate`, does nothing. Explicitly, not left to the context
        object's destructor, which runs only when nothing refers to it any more (a buffer not freed, a stream, a
        traceback keep it). pycuda releases it on the thread that retained it; elsewhere it lets it go silently."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._call(ctx.detach, "cuDevicePrimaryCtxRelease")


def cuda_api():
    """cuda-python when installed, else pycuda; InputError naming what to install when neither is."""
    try:
        return CudaPython()
    except ImportError:
        pass
    try:
        return PyCuda()
    except ImportError:
        pass
    raise InputError(f"the TensorRT backend needs a CUDA binding: {INSTALL_HINT}")
