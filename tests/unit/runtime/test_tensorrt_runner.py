"""The TensorRT runner: what runs without a GPU, and one end-to-end check on real hardware.

The fake engines and CUDA binding below stand in for the hardware APIs (tensorrt,
cuda-python), which cannot exist on CPU-only CI; they mimic those APIs' method names.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_sdk.errors import BackendUnavailableError, InferenceError, InputMismatchError
from runtime.manifest import TensorSpec
from runtime.runners.tensorrt import BufferPool, EngineIO, TensorRTRunner, _as_engine_dtype, check_io_names, discover_io
from tests import builders

IMAGE = (TensorSpec("image", "float32", ("batch", 3, 8, 8)),)
LOGITS = (TensorSpec("logits", "float32", ("batch", 3)),)
_INPUT, _OUTPUT = "INPUT", "OUTPUT"
FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT=_INPUT, OUTPUT=_OUTPUT), nptype=lambda dt: dt)


class Engine10:
    """Named-tensor API (TensorRT >= 8.5, the only one in 10.x)."""

    def __init__(self, tensors: list[tuple[str, str, Any]]) -> None:
        self._tensors = tensors
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i: int) -> str:
        return self._tensors[i][0]

    def get_tensor_mode(self, name: str) -> str:
        return next(t[1] for t in self._tensors if t[0] == name)

    def get_tensor_dtype(self, name: str) -> Any:
        return next(t[2] for t in self._tensors if t[0] == name)


class Engine8:
    """Binding API (TensorRT 8.x and earlier); bindings repeat once per optimization profile."""

    def __init__(self, tensors: list[tuple[str, bool, Any]], profiles: int = 1) -> None:
        self._tensors = tensors + [(f"{n} [profile {p}]", i, d) for p in range(1, profiles) for n, i, d in tensors]
        self.num_bindings = len(self._tensors)
        self.num_optimization_profiles = profiles

    def get_binding_name(self, i: int) -> str:
        return self._tensors[i][0]

    def binding_is_input(self, i: int) -> bool:
        return self._tensors[i][1]

    def get_binding_dtype(self, i: int) -> Any:
        return self._tensors[i][2]


class NumpyCuda:
    """Host memory standing in for a CUDA binding: counts allocations and frees."""

    def __init__(self) -> None:
        self.device: dict[int, bytearray] = {}
        self.allocs = self.frees = 0

    def alloc_device(self, nbytes: int) -> int:
        self.allocs += 1
        self.device[self.allocs] = bytearray(nbytes)
        return self.allocs

    def alloc_host(self, count: int, dtype: np.dtype) -> np.ndarray:
        return np.empty(count, dtype)

    def free(self, device: int, host: np.ndarray) -> None:
        del self.device[device]
        self.frees += 1


def test_discovers_io_through_the_named_tensor_api() -> None:
    engine = Engine10([("image", _INPUT, np.float16), ("logits", _OUTPUT, np.float32)])
    io, named = discover_io(engine, FAKE_TRT)
    assert named is True
    assert io == [EngineIO("image", True, np.dtype(np.float16), 0), EngineIO("logits", False, np.dtype(np.float32), 1)]


def test_discovers_io_through_bindings_of_the_first_profile() -> None:
    engine = Engine8([("ids", True, np.int32), ("mask", True, np.int32), ("logits", False, np.float32)], profiles=2)
    io, named = discover_io(engine, FAKE_TRT)
    assert named is False
    assert [(t.name, t.is_input, t.index) for t in io] == [("ids", True, 0), ("mask", True, 1), ("logits", False, 2)]


def test_engine_with_other_names_is_refused_naming_both() -> None:
    io, _ = discover_io(Engine10([("input", _INPUT, np.float32), ("logits", _OUTPUT, np.float32)]), FAKE_TRT)
    with pytest.raises(InferenceError, match=r"inputs are \['input'\]; the package declares \['image'\].*engine build"):
        check_io_names(io, IMAGE, LOGITS)


def test_engine_with_other_output_names_is_refused() -> None:
    io, _ = discover_io(Engine10([("image", _INPUT, np.float32), ("probs", _OUTPUT, np.float32)]), FAKE_TRT)
    with pytest.raises(InferenceError, match=r"outputs are \['probs'\]; the package declares \['logits'\]"):
        check_io_names(io, IMAGE, LOGITS)
    check_io_names(io, IMAGE, (TensorSpec("probs", "float32", ("batch", 3)),))  # matching names pass


def test_buffers_are_reused_when_shapes_shrink_and_grown_when_they_grow() -> None:
    cuda = NumpyCuda()
    pool = BufferPool(cuda)
    host, device = pool.get("image", (4, 3, 8, 8), np.dtype(np.float32))
    assert host.shape == (4, 3, 8, 8) and pool.capacity("image") == 4 * 3 * 64
    small, again = pool.get("image", (1, 3, 8, 8), np.dtype(np.float32))
    assert small.shape == (1, 3, 8, 8) and again == device and cuda.allocs == 1
    big, grown = pool.get("image", (8, 3, 8, 8), np.dtype(np.float32))
    assert big.shape == (8, 3, 8, 8) and grown != device
    assert (cuda.allocs, cuda.frees, pool.capacity("image")) == (2, 1, 8 * 3 * 64)
    assert len(cuda.device[grown]) == 8 * 3 * 64 * 4
    pool.get("logits", (0, 3), np.dtype(np.float32))  # empty tensors still get a valid pointer
    pool.clear()
    assert cuda.device == {} and pool.capacity("image") == 0


def test_feeds_are_cast_only_within_the_same_kind() -> None:
    ids = np.array([[1, 2]], np.int64)
    assert _as_engine_dtype("ids", ids, np.dtype(np.int32)).dtype == np.int32
    with pytest.raises(InputMismatchError, match="do not fit the engine's int32"):
        _as_engine_dtype("ids", np.array([2**40], np.int64), np.dtype(np.int32))
    with pytest.raises(InputMismatchError, match="'ids' has dtype int64, but the TensorRT engine takes float32"):
        _as_engine_dtype("ids", ids, np.dtype(np.float32))


def test_unknown_cuda_binding_is_refused() -> None:
    with pytest.raises(BackendUnavailableError, match=r"cuda is 'cupy'; expected one of \['auto', 'cuda-python', 'pycuda'\]"):
        TensorRTRunner(b"", IMAGE, LOGITS, cuda="cupy")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_activate_without_tensorrt_names_the_extra() -> None:
    runner = TensorRTRunner(b"not an engine", IMAGE, LOGITS)  # constructing needs nothing
    with pytest.raises(BackendUnavailableError, match=r"edge-sdk\[tensorrt\]"):
        runner.activate()
    assert runner.is_active is False


def _build_engine(trt: Any, onnx_bytes: bytes) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # the only mode in 10.x
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        raise AssertionError([str(parser.get_error(i)) for i in range(parser.num_errors)])
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "TensorRT failed to build the engine"
    return bytes(serialized)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_onnxruntime_on_gpu() -> None:
    trt = pytest.importorskip("tensorrt", reason="needs the tensorrt package and an NVIDIA GPU")
    if importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
        pytest.skip("needs cuda-python or pycuda")
    from runtime.runners.onnxrt import OnnxRuntimeRunner

    model = builders.image_model().SerializeToString()
    try:
        engine = _build_engine(trt, model)
    except (RuntimeError, TypeError) as exc:  # no GPU / driver behind the tensorrt package
        pytest.skip(f"TensorRT cannot build on this machine: {exc}")
    rng = np.random.default_rng(0)
    with TensorRTRunner(engine, IMAGE, LOGITS) as trt_runner, OnnxRuntimeRunner(model, IMAGE, LOGITS) as cpu:
        for batch in (2, 4, 1):  # grow, then shrink into the existing buffers
            x = rng.random((batch, 3, 8, 8), dtype=np.float32)
            got, want = trt_runner.infer({"image": x})["logits"], cpu.infer({"image": x})["logits"]
            assert got.shape == want.shape == (batch, 3)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert trt_runner.is_active is False
