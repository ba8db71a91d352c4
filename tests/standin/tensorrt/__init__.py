"""API stand-in for the ``tensorrt`` Python package: the surface edge-sdk's runner, builder and
probe call, with the rules TensorRT enforces. Not a GPU and not TensorRT: see ../README.md.

An "engine" is ``MAGIC + JSON header + ONNX bytes``; "executing" it runs the ONNX graph with
onnxruntime's CPU provider (fp16 engines round their float inputs and outputs to float16).
``__version__`` may be set by a test (e.g. "8.5.2") to get that release's rules: before 10.0 two
live execution contexts may not hold the same optimization profile.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from typing import Any

import numpy as np

import _standin_gpu as gpu

__version__ = "10.3.0"
MAGIC = b"EDGE-SDK-TENSORRT-API-STANDIN\n"
EXECUTE_SECONDS = 0.002  # long enough for overlapping calls from two threads to meet


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8
    BF16 = 7
    FP8 = 6


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
          DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
              9: DataType.BOOL, 2: DataType.UINT8, 16: DataType.BF16}


def nptype(dtype: DataType) -> Any:
    if dtype not in _NUMPY:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return _NUMPY[dtype]


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = ILogger.Severity

    def __init__(self, min_severity: Any = ILogger.Severity.WARNING) -> None:
        super().__init__()


def _release() -> tuple[int, int]:
    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


# --- runtime ---------------------------------------------------------------------------------


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        if not gpu.WORKING:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.logger = logger
        self.DLA_core = -1

    def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
        if not bytes(data).startswith(MAGIC):
            return None
        header_line, _, onnx_bytes = bytes(data)[len(MAGIC):].partition(b"\n")
        header = json.loads(header_line)
        if header["tensorrt"] != __version__ or header["sm"] != list(gpu.COMPUTE_CAPABILITY):
            return None  # TensorRT: "engine plan file is not compatible with this version / device"
        wanted = -1 if header["dla_core"] is None else header["dla_core"]
        if wanted != self.DLA_core:
            return None
        return ICudaEngine(header, onnx_bytes)


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        self.header = header
        self._session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self._io = [(t["name"], TensorIOMode.INPUT, DataType[t["dtype"]], t["shape"]) for t in header["inputs"]]
        self._io += [(t["name"], TensorIOMode.OUTPUT, DataType[t["dtype"]], t["shape"]) for t in header["outputs"]]
        self.num_io_tensors = len(self._io)
        self.num_optimization_profiles = max(1, len(header["profiles"]))
        self.profile_owners: dict[int, IExecutionContext] = {}
        self.lock = threading.Lock()

    def get_tensor_name(self, index: int) -> str:
        return str(self._io[index][0])

    def _tensor(self, name: str) -> tuple[Any, ...]:
        return next(t for t in self._io if t[0] == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._tensor(name)[1]  # type: ignore[no-any-return]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensor(name)[2]  # type: ignore[no-any-return]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        profiles = self.header["profiles"]
        if not profiles:
            shape = tuple(self._tensor(name)[3])
            return [shape, shape, shape]
        return [tuple(s) for s in profiles[profile_index][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def create_engine_inspector(self) -> Any:
        precision = self.header["precision"]

        class _Inspector:
            def get_engine_information(self, fmt: Any) -> str:
                return json.dumps({"Layers": [{"Name": "standin", "Outputs": [{"Format/Datatype": precision}]}]})

        return _Inspector()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        half = self.header["precision"] == "fp16"
        if half:
            feeds = {n: v.astype(np.float16).astype(v.dtype) if v.dtype.kind == "f" else v for n, v in feeds.items()}
        names = [t["name"] for t in self.header["outputs"]]
        outputs = dict(zip(names, self._session.run(names, feeds)))
        return {n: v.astype(np.float16).astype(v.dtype) if half and v.dtype.kind == "f" else v
                for n, v in outputs.items()}


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._in_use = threading.Lock()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self.active_optimization_profile = -1
        with engine.lock:  # before 10.0 a new context takes the first profile no other context holds
            free = [p for p in range(engine.num_optimization_profiles) if p not in engine.profile_owners]
            first = 0 if _release() >= (10, 0) else (free[0] if free else -1)
            if first >= 0:
                self._hold(first)

    def _hold(self, profile: int) -> None:
        if _release() < (10, 0):
            owner = self.engine.profile_owners.get(profile)
            if owner is not None and owner is not self:
                raise RuntimeError(f"Profile {profile} has been chosen by another IExecutionContext. "
                                   "Use another profileIndex or destroy the IExecutionContext that uses it.")
            self.engine.profile_owners.pop(self.active_optimization_profile, None)
            self.engine.profile_owners[profile] = self
        self.active_optimization_profile = profile

    def __del__(self) -> None:
        owners = getattr(getattr(self, "engine", None), "profile_owners", {})
        for profile in [p for p, c in owners.items() if c is self]:
            owners.pop(profile, None)

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        with self.engine.lock:
            self._hold(profile_index)
        self._shapes.clear()
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        if self.active_optimization_profile < 0:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.active_optimization_profile)
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            return False  # TensorRT logs "... outside the bounds of optimization profile"
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        symbols: dict[str, int] = {}
        for t in self.engine.header["inputs"]:
            for dim, size in zip(t["shape"], self._shapes.get(t["name"], ())):
                if isinstance(dim, str):
                    symbols[dim] = size
        spec = self.engine._tensor(name)[3]
        return tuple(symbols.get(d, -1) if isinstance(d, str) else int(d) for d in spec)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self._addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not self._in_use.acquire(blocking=False):
            gpu.violation("an execution context was used by two threads at once")
            return False
        try:
            if not gpu.has_current_context():
                gpu.violation("enqueue on a thread with no current CUDA context")
                return False
            feeds = {}
            for t in self.engine.header["inputs"]:
                shape, dtype = self._shapes[t["name"]], np.dtype(_NUMPY[DataType[t["dtype"]]])
                host = np.empty(shape, dtype)
                gpu.copy(host.ctypes.data, self._addresses[t["name"]], host.nbytes)
                feeds[t["name"]] = host
            time.sleep(EXECUTE_SECONDS)
            for name, value in self.engine.run(feeds).items():
                value = np.ascontiguousarray(value.astype(_NUMPY[self.engine.get_tensor_dtype(name)]))
                if value.shape != self.get_tensor_shape(name):
                    gpu.violation(f"output {name} has shape {value.shape}, not {self.get_tensor_shape(name)}")
                    return False
                gpu.copy(self._addresses[name], value.ctypes.data, value.nbytes)
            gpu.executions += 1
            return True
        finally:
            self._in_use.release()


from tensorrt._builder import (  # noqa: E402  - the build side, after the types it uses
    Builder,
    BuilderFlag,
    DeviceType,
    IInt8EntropyCalibrator2,
    IProgressMonitor,
    LayerInformationFormat,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    OnnxParser,
    ProfilingVerbosity,
)

__all__ = ["Builder", "BuilderFlag", "DataType", "DeviceType", "IInt8EntropyCalibrator2", "IProgressMonitor",
           "ILogger", "LayerInformationFormat", "Logger", "MemoryPoolType", "NetworkDefinitionCreationFlag",
           "OnnxParser", "ProfilingVerbosity", "Runtime", "TensorIOMode", "nptype"]
