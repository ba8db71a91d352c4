"""The build side of the tensorrt API stand-in (not TensorRT; see ../README.md): parses the ONNX
graph's I/O, applies the builder rules edge-sdk must respect (DLA: no Q/DQ, fixed shapes, an
implicit-int8 calibration cache whose header names this TensorRT) and serializes an "engine"."""

from __future__ import annotations

import enum
import json
from typing import Any

import onnx

import _standin_gpu as gpu
import tensorrt as trt


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    GPU_FALLBACK = 3
    SPARSE_WEIGHTS = 6


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class ProfilingVerbosity(enum.IntEnum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class LayerInformationFormat(enum.IntEnum):
    ONELINE = 0
    JSON = 1


class IInt8EntropyCalibrator2:
    def __init__(self) -> None:
        pass


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class _Network:
    def __init__(self, flags: int) -> None:
        self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.model: onnx.ModelProto | None = None


class OnnxParser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self._network = network
        self._errors: list[str] = []

    def parse(self, data: bytes) -> bool:
        try:
            self._network.model = onnx.load_from_string(bytes(data))
        except Exception as exc:  # noqa: BLE001
            self._errors.append(f"ModelImporter: failed to parse the ONNX model: {exc}")
            return False
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"standin timing cache"

    def serialize(self) -> bytes:
        return self.data


class _Config:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.profiles: list[_Profile] = []
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.builder_optimization_level = 3
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.int8_calibrator: Any = None
        self.progress_monitor: Any = None
        self._timing = _TimingCache(b"")

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.workspace = size

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self._timing = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        return self._timing


def _io(values: Any) -> list[dict[str, Any]]:
    specs = []
    for value in values:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
        specs.append({"name": value.name, "dtype": trt._FROM_ONNX[value.type.tensor_type.elem_type].name,
                      "shape": dims})
    return specs


class Builder:
    def __init__(self, logger: Any) -> None:
        if not gpu.WORKING:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        if trt._release() < (10, 0) and not flags & 1:
            raise RuntimeError("TensorRT 8.x needs the EXPLICIT_BATCH flag for ONNX networks")
        if trt._release() < (10, 0) and flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
            raise RuntimeError("strongly typed networks need TensorRT >= 10")
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def _error(self, message: str) -> None:
        self.logger.log(trt.ILogger.Severity.ERROR, message)

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        model = network.model
        assert model is not None
        qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        dla = config.DLA_core if config.default_device_type == DeviceType.DLA else None
        if network.strongly_typed:
            precision = "int8" if qdq else "fp32"
        else:
            precision = "int8" if BuilderFlag.INT8 in config.flags else "fp16" if BuilderFlag.FP16 in config.flags else "fp32"
        if dla is not None and qdq:
            self._error("DLA does not support explicit quantization (Q/DQ layers)")
            return None
        if dla is not None and any(lo != hi for p in config.profiles for lo, _, hi in p.shapes.values()):
            self._error("DLA does not support dynamic shapes: profile min, opt and max must be equal")
            return None
        if precision == "int8" and not qdq:
            calibrator = config.int8_calibrator
            cache = bytes(calibrator.read_calibration_cache()) if calibrator is not None else b""
            major, minor, patch = (int(x) for x in (trt.__version__.split(".") + ["0", "0"])[:3])
            code = major * (10000 if major >= 10 else 1000) + minor * 100 + patch
            if not cache.startswith(f"TRT-{code}".encode()):
                self._error(f"Calibration table does not match TensorRT {trt.__version__} (header {cache[:20]!r})")
                return None
        header = {
            "tensorrt": trt.__version__, "sm": list(gpu.COMPUTE_CAPABILITY), "dla_core": dla, "precision": precision,
            "profiles": [p.shapes for p in config.profiles],
            "inputs": _io(model.graph.input), "outputs": _io(model.graph.output),
        }
        if config.progress_monitor is not None:
            config.progress_monitor.phase_start("Building engine", None, 1)
            config.progress_monitor.step_complete("Building engine", 0)
            config.progress_monitor.phase_finish("Building engine")
        return trt.MAGIC + json.dumps(header).encode() + b"\n" + model.SerializeToString()
