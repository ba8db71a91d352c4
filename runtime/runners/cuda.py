"""The CUDA bindings the TensorRT runner can use: cuda-python (preferred) or pycuda.

Both hide behind :class:`Cuda`, so the runner is written once. Device pointers are plain ints.
``bound()`` makes the CUDA context current in the calling thread for the duration of a call:
pycuda keeps a context stack per thread, so a context pushed on the thread that activated the
runner is not current on the daemon's HTTP threads or a stream's worker; cuda-python's runtime
API binds the device's primary context per thread on ``cudaSetDevice``. Every binding is
checked with a real call when loaded, so one that imports but cannot run (cuda-python 13 on a
CUDA 12 driver, no device) is passed over for the next, with the reason kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Any, Iterator, Protocol

import numpy as np

from edge_sdk.errors import BackendUnavailableError, InferenceError

log = logging.getLogger(__name__)

CUDA_BINDINGS = ("auto", "cuda-python", "pycuda")


class Cuda(Protocol):
    """The few CUDA calls the runner needs."""

    name: str

    def bound(self) -> contextlib.AbstractContextManager[None]: ...
    def alloc_device(self, nbytes: int) -> int: ...
    def alloc_host(self, count: int, dtype: np.dtype) -> np.ndarray: ...
    def free(self, device: int, host: np.ndarray) -> None: ...
    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None: ...
    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None: ...
    def stream(self) -> Any: ...
    def handle(self, stream: Any) -> int: ...
    def sync(self, stream: Any) -> None: ...
    def destroy_stream(self, stream: Any) -> None: ...
    def release(self) -> None: ...


def _major(version: int) -> int:
    return version // 1000  # CUDA encodes 12.6 as 12060


class CudaPython:
    """cuda-python's runtime API; every call returns ``(err, *values)`` and is checked."""

    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self._rt = cudart
        self._device = device
        self._threads = threading.local()
        self._pinned: dict[int, int] = {}  # id(host array) -> pinned pointer
        driver = self._value(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
        runtime = self._value(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
        count = self._value(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount", driver=driver, runtime=runtime)
        if int(count) <= device:
            raise BackendUnavailableError(f"cuda-python sees {count} CUDA device(s); device {device} is not one")

    def _value(self, result: Any, what: str, **versions: int) -> Any:
        err, *values = result
        if err == self._rt.cudaError_t.cudaSuccess:
            return values[0] if values else None
        name = getattr(err, "name", str(err))
        hint = "check the NVIDIA driver and that /dev/nvidia* (Jetson: /dev/nvhost-*) is readable by this user"
        if "InsufficientDriver" in name and versions:
            hint = (f"this cuda-python is built for CUDA {_major(versions['runtime'])} and the driver is CUDA "
                    f"{_major(versions['driver'])}: pip install 'cuda-python>={_major(versions['driver'])},"
                    f"<{_major(versions['driver']) + 1}'")
        raise BackendUnavailableError(f"cuda-python: {what} failed with {name}", hint=hint)

    def _call(self, result: Any, what: str) -> Any:
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise InferenceError(f"CUDA call {what} failed with {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else None

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        if not getattr(self._threads, "bound", False):
            self._call(self._rt.cudaSetDevice(self._device), "cudaSetDevice")  # this thread's current device
            self._threads.bound = True
        yield

    def alloc_device(self, nbytes: int) -> int:
        return int(self._call(self._rt.cudaMalloc(nbytes), "cudaMalloc"))

    def alloc_host(self, count: int, dtype: np.dtype) -> np.ndarray:
        nbytes = count * dtype.itemsize
        ptr = int(self._call(self._rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_ubyte)), (nbytes,))
        host = raw.view(dtype)
        self._pinned[id(host)] = ptr
        return host

    def free(self, device: int, host: np.ndarray) -> None:
        self._call(self._rt.cudaFree(device), "cudaFree")
        ptr = self._pinned.pop(id(host), None)
        if ptr is not None:
            self._call(self._rt.cudaFreeHost(ptr), "cudaFreeHost")

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync")

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "cudaMemcpyAsync")

    def stream(self) -> Any:
        return self._call(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def handle(self, stream: Any) -> int:
        return int(stream)

    def sync(self, stream: Any) -> None:
        self._call(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: Any) -> None:
        self._call(self._rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def release(self) -> None:
        return None  # the primary context belongs to the process


class PyCuda:
    """pycuda's driver API on the device's primary context (shared with TensorRT and the runtime API)."""

    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as drv

        drv.init()
        if drv.Device.count() <= device:
            raise BackendUnavailableError(
                f"pycuda sees {drv.Device.count()} CUDA device(s); device {device} is not one")
        self._drv = drv
        self._context = drv.Device(device).retain_primary_context()
        self._allocations: dict[int, Any] = {}  # pointer -> DeviceAllocation, kept alive until freed

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        self._context.push()  # onto this thread's context stack
        try:
            yield
        finally:
            self._drv.Context.pop()

    def alloc_device(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(nbytes)
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def alloc_host(self, count: int, dtype: np.dtype) -> np.ndarray:
        return self._drv.pagelocked_empty(count, dtype)  # type: ignore[no-any-return]

    def free(self, device: int, host: np.ndarray) -> None:
        allocation = self._allocations.pop(device, None)
        if allocation is not None:
            allocation.free()
        release = getattr(host.base, "free", None)  # pagelocked_empty's HostAllocation
        if release is not None:
            release()

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._drv.memcpy_htod_async(dst, src, stream)

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._drv.memcpy_dtoh_async(dst, src, stream)

    def stream(self) -> Any:
        return self._drv.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream.handle)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def destroy_stream(self, stream: Any) -> None:
        return None  # pycuda frees a Stream when it is collected

    def release(self) -> None:
        self._context.detach()


def load_cuda(choice: str) -> Cuda:
    """The first CUDA binding that runs here ("auto" tries cuda-python, then pycuda)."""
    if choice not in CUDA_BINDINGS:
        raise BackendUnavailableError(f"cuda is {choice!r}; expected one of {list(CUDA_BINDINGS)}")
    order = ("cuda-python", "pycuda") if choice == "auto" else (choice,)
    reasons = []
    for name in order:
        try:
            return CudaPython() if name == "cuda-python" else PyCuda()
        except ImportError:
            reasons.append(f"{name} is not installed")
        except BackendUnavailableError as exc:
            reasons.append(f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        except Exception as exc:  # noqa: BLE001 - pycuda and cuda-python raise their own error types
            reasons.append(f"{name} failed: {type(exc).__name__}: {exc}")
        log.debug("CUDA binding %s passed over: %s", name, reasons[-1])
    raise BackendUnavailableError(
        f"no CUDA binding for TensorRT runs here: {'; '.join(reasons)}",
        hint="pip install the cuda-python whose major version is the driver's CUDA (JetPack 6: "
             "'cuda-python>=12,<13'), or pycuda (builds against JetPack's CUDA)",
    )
