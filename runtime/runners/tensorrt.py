"""TensorRT runner: runs a serialized engine on an NVIDIA GPU (Jetson or desktop).

tensorrt and a CUDA binding (cuda-python or pycuda) are imported on ``activate()``,
never at module import, so this module imports on a CPU-only machine. The two
bindings hide behind the small :class:`_Cuda` protocol so the runner is written once.
TensorRT's I/O API is feature-detected: the named-tensor API (``num_io_tensors``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``; TensorRT >= 8.5,
the only one in 10.x) when present, else the binding API (``execute_async_v2``).
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from edge_sdk.errors import BackendUnavailableError, InferenceError, InputMismatchError
from runtime.manifest import TensorSpec
from runtime.runners.base import Feeds, Runner

log = logging.getLogger(__name__)

CUDA_BINDINGS = ("auto", "cuda-python", "pycuda")
_REBUILD = "rebuild the engine on this device with `edge-sdk engine build`"


class _Cuda(Protocol):
    """The few CUDA calls the runner needs; device pointers are plain ints."""

    def alloc_device(self, nbytes: int) -> int: ...
    def alloc_host(self, count: int, dtype: np.dtype) -> np.ndarray: ...
    def free(self, device: int, host: np.ndarray) -> None: ...
    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None: ...
    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None: ...
    def stream(self) -> Any: ...
    def handle(self, stream: Any) -> int: ...
    def sync(self, stream: Any) -> None: ...
    def close(self, stream: Any) -> None: ...


class _CudaPython:
    """cuda-python runtime API; every call returns ``(err, *values)`` and is checked."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self._rt = cudart
        self._pinned: dict[int, int] = {}  # id(host array) -> pinned pointer

    def _call(self, result: Any, what: str) -> Any:
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise InferenceError(f"CUDA call {what} failed with {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else None

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

    def close(self, stream: Any) -> None:
        if stream is not None:
            self._call(self._rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


class _PyCuda:
    """pycuda driver API on device 0's primary context (shared with TensorRT and the runtime API)."""

    def __init__(self) -> None:
        import pycuda.driver as drv

        drv.init()
        self._drv = drv
        self._context = drv.Device(0).retain_primary_context()
        self._context.push()
        self._allocations: dict[int, Any] = {}  # pointer -> DeviceAllocation, kept alive until freed

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

    def close(self, stream: Any) -> None:
        self._context.pop()


def load_cuda(choice: str) -> _Cuda:
    """The CUDA binding for ``choice`` ("auto" prefers cuda-python, then pycuda)."""
    order = ("cuda-python", "pycuda") if choice == "auto" else (choice,)
    for name in order:
        try:
            return _CudaPython() if name == "cuda-python" else _PyCuda()
        except ImportError:
            log.debug("CUDA binding %s is not installed", name)
    raise BackendUnavailableError(
        f"no CUDA binding for TensorRT: tried {', '.join(order)}",
        hint="pip install cuda-python (preferred) or pip install pycuda",
    )


@dataclass(frozen=True)
class EngineIO:
    """One engine I/O tensor: its name, direction, numpy dtype and binding index."""

    name: str
    is_input: bool
    dtype: np.dtype
    index: int


def discover_io(engine: Any, trt: Any) -> tuple[list[EngineIO], bool]:
    """The engine's I/O tensors and whether the named-tensor API (TensorRT >= 8.5) is in use."""
    if hasattr(engine, "num_io_tensors"):
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [
            EngineIO(n, engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, np.dtype(trt.nptype(engine.get_tensor_dtype(n))), i)
            for i, n in enumerate(names)
        ], True
    # Binding API: with several optimization profiles the bindings repeat per profile; use profile 0's.
    count = engine.num_bindings // max(1, getattr(engine, "num_optimization_profiles", 1))
    return [
        EngineIO(engine.get_binding_name(i), engine.binding_is_input(i), np.dtype(trt.nptype(engine.get_binding_dtype(i))), i)
        for i in range(count)
    ], False


def check_io_names(io: Sequence[EngineIO], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Raise unless the engine's input and output names are exactly the declared ones."""
    for kind, declared, found in (
        ("inputs", sorted(s.name for s in inputs), sorted(t.name for t in io if t.is_input)),
        ("outputs", sorted(s.name for s in outputs), sorted(t.name for t in io if not t.is_input)),
    ):
        if declared != found:
            raise InferenceError(
                f"the TensorRT engine's {kind} are {found}; the package declares {declared}",
                hint=f"the engine was built from a different model; {_REBUILD}",
            )


class BufferPool:
    """Pinned host + device buffers per tensor, grown only when a shape needs more than the capacity."""

    def __init__(self, cuda: _Cuda) -> None:
        self._cuda = cuda
        self._slots: dict[str, tuple[np.ndarray, int]] = {}  # name -> (flat pinned host, device pointer)

    def capacity(self, name: str) -> int:
        """Elements the buffers of ``name`` hold now (0 when none are allocated)."""
        return self._slots[name][0].size if name in self._slots else 0

    def get(self, name: str, shape: Sequence[int], dtype: np.dtype) -> tuple[np.ndarray, int]:
        """A host view shaped ``shape`` and the device pointer for tensor ``name``."""
        count = math.prod(shape)
        if count > self.capacity(name) or name not in self._slots:
            self._release(name)
            size = max(count, 1)
            host = self._cuda.alloc_host(size, dtype)
            self._slots[name] = (host, self._cuda.alloc_device(size * dtype.itemsize))
            log.debug("allocated %d elements of %s for tensor %s", size, dtype, name)
        host, device = self._slots[name]
        return host[:count].reshape(tuple(shape)), device

    def _release(self, name: str) -> None:
        if name in self._slots:
            host, device = self._slots.pop(name)
            self._cuda.free(device, host)

    def clear(self) -> None:
        for name in list(self._slots):
            self._release(name)


def _as_engine_dtype(name: str, value: np.ndarray, want: np.dtype) -> np.ndarray:
    """``value`` in the engine's dtype, when only the width differs (int64 -> int32, float32 -> float16)."""
    if value.dtype == want:
        return value
    if value.dtype.kind != want.kind:
        raise InputMismatchError(
            f"input '{name}' has dtype {value.dtype}, but the TensorRT engine takes {want}",
            hint=f"the engine does not match the package's input specs; {_REBUILD}",
        )
    cast = value.astype(want)
    if want.kind in "iu" and not np.array_equal(cast, value):
        raise InputMismatchError(f"input '{name}' has values that do not fit the engine's {want}")
    return cast


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine; ``cuda`` picks the binding that manages memory and the stream."""

    backend = "tensorrt"

    def __init__(
        self, engine: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *, cuda: str = "auto"
    ) -> None:
        super().__init__(inputs, outputs)
        if cuda not in CUDA_BINDINGS:
            raise BackendUnavailableError(f"cuda is {cuda!r}; expected one of {list(CUDA_BINDINGS)}")
        self._engine_bytes = engine
        self.cuda = cuda
        self._reset()

    def _reset(self) -> None:
        self._cuda: _Cuda | None = None
        self._stream: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._pool: BufferPool | None = None
        self._io: list[EngineIO] = []
        self._named = True

    def _activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError(
                "tensorrt is not installed",
                hint="pip install 'edge-sdk[tensorrt]'; on a Jetson, JetPack ships tensorrt (python3-libnvinfer)",
            ) from None
        self._cuda = cuda = load_cuda(self.cuda)
        try:
            self._stream = cuda.stream()
            self._load(trt, cuda)
        except BaseException:
            self._deactivate_impl()
            raise

    def _load(self, trt: Any, cuda: _Cuda) -> None:
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            self._engine = self._runtime.deserialize_cuda_engine(self._engine_bytes)
        except Exception as exc:  # TensorRT raises untyped errors or returns None
            log.debug("deserialize_cuda_engine raised %s", exc)
            self._engine = None
        if self._engine is None:
            raise InferenceError(
                "TensorRT could not deserialize the engine: it was probably built for another GPU or TensorRT version",
                hint=_REBUILD,
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise InferenceError("TensorRT could not create an execution context (out of GPU memory?)")
        self._io, self._named = discover_io(self._engine, trt)
        self._named = self._named and hasattr(self._context, "execute_async_v3")
        check_io_names(self._io, self.inputs, self.outputs)
        self._pool = BufferPool(cuda)

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        cuda, pool, ctx = self._cuda, self._pool, self._context
        assert cuda is not None and pool is not None  # active
        values = {t.name: _as_engine_dtype(t.name, feeds[t.name], t.dtype) for t in self._io if t.is_input}
        for t in self._io:
            if t.is_input and not self._set_shape(t, values[t.name].shape):
                raise InputMismatchError(
                    f"input '{t.name}' has shape {list(values[t.name].shape)}, outside the engine's optimization profile",
                    hint=f"feed shapes within the profile the engine was built with, or {_REBUILD} with a wider profile",
                )
        pointers: dict[str, int] = {}
        hosts: dict[str, np.ndarray] = {}
        for t in self._io:
            shape = values[t.name].shape if t.is_input else self._shape(t)
            hosts[t.name], pointers[t.name] = pool.get(t.name, shape, t.dtype)
            if t.is_input:
                np.copyto(hosts[t.name], values[t.name])
                cuda.htod(pointers[t.name], hosts[t.name], self._stream)
        handle = cuda.handle(self._stream)
        if self._named:
            for name, pointer in pointers.items():
                ctx.set_tensor_address(name, pointer)
            ok = ctx.execute_async_v3(handle)
        else:
            ok = ctx.execute_async_v2([pointers[t.name] for t in self._io], handle)
        if not ok:
            raise InferenceError("TensorRT failed to enqueue the engine; see the TensorRT log above")
        for t in self._io:
            if not t.is_input:
                cuda.dtoh(hosts[t.name], pointers[t.name], self._stream)
        cuda.sync(self._stream)
        return {s.name: hosts[s.name].astype(np.dtype(s.dtype)) for s in self.outputs}  # astype copies

    def _set_shape(self, t: EngineIO, shape: tuple[int, ...]) -> bool:
        if self._named:
            return bool(self._context.set_input_shape(t.name, shape))
        return bool(self._context.set_binding_shape(t.index, shape))

    def _shape(self, t: EngineIO) -> tuple[int, ...]:
        dims = self._context.get_tensor_shape(t.name) if self._named else self._context.get_binding_shape(t.index)
        shape = tuple(int(d) for d in dims)
        if any(d < 0 for d in shape):
            raise InferenceError(f"output '{t.name}' has data-dependent shape {list(shape)}, which this runner does not support")
        return shape

    def _deactivate_impl(self) -> None:
        try:
            if self._cuda is not None and self._stream is not None:
                self._cuda.sync(self._stream)
            if self._pool is not None:
                self._pool.clear()
            if self._cuda is not None:
                self._cuda.close(self._stream)
        finally:
            self._context = None  # context before engine before runtime: TensorRT 10 frees on release
            self._engine = None
            self._reset()
