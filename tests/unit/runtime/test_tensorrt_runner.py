"""The TensorRT runner against the tensorrt / cuda-python / pycuda API stand-ins (tests/standin).

The stand-ins implement the documented API surface and check the rules TensorRT and CUDA enforce
(one thread per execution context at a time, a CUDA context current on the calling thread, shapes
inside the active profile, distinct profiles per live context before TensorRT 10). They are not
a GPU: these tests prove the runner's logic, never GPU behaviour. One test at the end runs on
real hardware and skips elsewhere.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from converters.engine import EngineBuildConfig, Profile, build_engine, profiles_for, static_profile
from edge_sdk.errors import BackendUnavailableError, InferenceError, InputMismatchError
from runtime.manifest import TensorSpec
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.runners.tensorrt import (
    BufferPool,
    EngineIO,
    TensorRTRunner,
    _as_engine_dtype,
    check_io_names,
    discover_io,
    numpy_dtype,
)
from tests import builders
from tests.threads import run_together

IMAGE = (TensorSpec("image", "float32", ("batch", 3, 8, 8)),)
LOGITS = (TensorSpec("logits", "float32", ("batch", 3)),)
TEXT = tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in ("input_ids", "attention_mask", "token_type_ids"))


def _engine(model: Any, config: EngineBuildConfig) -> bytes:
    return build_engine(model.SerializeToString(), config).engine


def _image_engine(batch: tuple[int, int, int] = (1, 8, 32), precision: str = "fp32") -> bytes:
    return _engine(builders.image_model(), EngineBuildConfig(precision=precision, profiles=profiles_for(IMAGE, batch)))


def _images(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32)}


def _cpu(model: Any, inputs: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with OnnxRuntimeRunner(model.SerializeToString(), inputs, LOGITS) as cpu:
        return cpu.infer(feeds)["logits"]


# --- with the API stand-ins ----------------------------------------------------------------


@pytest.mark.parametrize("binding", ["cuda-python", "pycuda"])
def test_runs_and_frees_everything(trt_standin: Any, binding: str) -> None:
    runner = TensorRTRunner(_image_engine(), IMAGE, LOGITS, cuda=binding)
    with runner:
        for n in (2, 7, 1):  # grow, then shrink into the buffers already there
            np.testing.assert_allclose(runner.infer(_images(n))["logits"], _cpu(builders.image_model(), IMAGE,
                                                                                _images(n)), rtol=1e-6)
    assert trt_standin.live_allocations() == 0 and trt_standin.violations == []


@pytest.mark.parametrize("binding", ["cuda-python", "pycuda"])
def test_threads_each_get_a_context_with_the_cuda_context_current(trt_standin: Any, binding: str) -> None:
    """The daemon's HTTP threads and a stream share one runner: pycuda needs the context pushed in
    every calling thread, and TensorRT an execution context per concurrent call."""
    runner = TensorRTRunner(_image_engine(), IMAGE, LOGITS, cuda=binding, max_contexts=3).activate()
    want = {seed: _cpu(builders.image_model(), IMAGE, _images(4, seed)) for seed in range(6)}

    def work(seed: int) -> None:
        for _ in range(5):
            np.testing.assert_allclose(runner.infer(_images(4, seed))["logits"], want[seed], rtol=1e-6)

    errors = run_together(work, range(6))
    assert errors == [] and trt_standin.violations == []
    assert 1 < runner.contexts <= 3 and trt_standin.executions == 30
    runner.deactivate()
    assert trt_standin.live_allocations() == 0


def test_the_stand_in_catches_a_context_shared_by_two_threads(trt_standin: Any) -> None:
    """Negative control: the concurrency rule the threading test relies on is really checked."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(_image_engine())
    context = engine.create_execution_context()
    cudart.cudaSetDevice(0)
    context._in_use.acquire()  # another thread is inside execute
    assert context.execute_async_v3(0) is False
    assert trt_standin.violations == ["an execution context was used by two threads at once"]


def test_text_uses_the_profile_that_holds_each_length(trt_standin: Any) -> None:
    """Profiles seq 1-32, 33-64, 65-128: texts of 60 and 120 tokens run only after switching profile."""
    model = builders.text_model()
    runner = TensorRTRunner(_engine(model, EngineBuildConfig(precision="fp32", profiles=profiles_for(TEXT))),
                            TEXT, LOGITS).activate()
    rng = np.random.default_rng(1)
    for length in (60, 120, 10, 128):
        feeds = {"input_ids": rng.integers(0, len(builders.VOCAB), (3, length)),
                 "attention_mask": np.ones((3, length), np.int64), "token_type_ids": np.zeros((3, length), np.int64)}
        np.testing.assert_allclose(runner.infer(feeds)["logits"], _cpu(model, TEXT, feeds), rtol=1e-6)
    with pytest.raises(InputMismatchError, match=r"fit none of the engine's optimization profiles \(profile 0: "):
        runner.infer({n: np.ones((1, 129), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")})
    runner.deactivate()
    assert trt_standin.violations == []


def test_a_batch_beyond_every_profile_is_split_and_padded(trt_standin: Any) -> None:
    runner = TensorRTRunner(_image_engine(batch=(2, 4, 8)), IMAGE, LOGITS).activate()
    for n in (1, 8, 19, 32):  # 1 pads to the minimum batch 2; 19 = 8 + 8 + 3
        got = runner.infer(_images(n))["logits"]
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, _cpu(builders.image_model(), IMAGE, _images(n)), rtol=1e-6)
    runner.deactivate()


def test_a_fixed_shape_dla_engine_runs_any_batch_on_its_core(trt_standin: Any) -> None:
    config = EngineBuildConfig(precision="fp16", dla_core=1, profiles=static_profile(IMAGE, batch=4))
    engine = _engine(builders.image_model(), config)
    with pytest.raises(InferenceError, match="could not deserialize"):  # runtime.DLA_core must name its core
        TensorRTRunner(engine, IMAGE, LOGITS).activate()
    with TensorRTRunner(engine, IMAGE, LOGITS, dla_core=1) as runner:
        got = runner.infer(_images(6))["logits"]
    np.testing.assert_allclose(got, _cpu(builders.image_model(), IMAGE, _images(6)), rtol=2e-2, atol=2e-2)


def test_tensorrt_8_5_gives_every_profile_its_own_context(trt_standin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before TensorRT 10 two live contexts may not hold one profile ("Profile 0 has been chosen by another
    IExecutionContext"): concurrent texts of different lengths each get their profile's context."""
    import tensorrt

    monkeypatch.setattr(tensorrt, "__version__", "8.5.2")
    model = builders.text_model()
    runner = TensorRTRunner(_engine(model, EngineBuildConfig(precision="fp32", profiles=profiles_for(TEXT))),
                            TEXT, LOGITS, max_contexts=8).activate()

    def work(length: int) -> None:
        feeds = {"input_ids": np.full((2, length), 4), "attention_mask": np.ones((2, length), np.int64),
                 "token_type_ids": np.zeros((2, length), np.int64)}
        for _ in range(4):
            np.testing.assert_allclose(runner.infer(feeds)["logits"], _cpu(model, TEXT, feeds), rtol=1e-6)

    errors = run_together(work, (20, 60, 100, 30, 70, 110))
    assert errors == [] and trt_standin.violations == [] and runner.contexts == 3
    runner.deactivate()


def test_tensorrt_8_5_with_one_profile_serves_threads_from_one_context(trt_standin: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorrt

    monkeypatch.setattr(tensorrt, "__version__", "8.5.2")
    runner = TensorRTRunner(_image_engine(), IMAGE, LOGITS, max_contexts=4).activate()

    def work(seed: int) -> None:
        np.testing.assert_allclose(runner.infer(_images(3, seed))["logits"],
                                   _cpu(builders.image_model(), IMAGE, _images(3, seed)), rtol=1e-6)

    assert run_together(work, range(5)) == [] and trt_standin.violations == [] and runner.contexts == 1
    runner.deactivate()


def test_replicas_share_one_deserialized_engine(trt_standin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorrt

    engine = _image_engine()
    loads = []
    original = tensorrt.Runtime.deserialize_cuda_engine
    monkeypatch.setattr(tensorrt.Runtime, "deserialize_cuda_engine",
                        lambda self, data: loads.append(1) or original(self, data))
    replicas = [TensorRTRunner(engine, IMAGE, LOGITS).activate() for _ in range(3)]
    assert len(loads) == 1
    for r in replicas:
        r.deactivate()
    TensorRTRunner(engine, IMAGE, LOGITS).activate().deactivate()  # released by all: loaded again
    assert len(loads) == 2


def test_cuda_init_failure_is_a_backend_error_not_a_crash(trt_standin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorrt

    engine = _image_engine()
    trt_standin.WORKING = False  # no usable device: neither binding starts
    with pytest.raises(BackendUnavailableError, match="no CUDA binding for TensorRT runs here"):
        TensorRTRunner(engine, IMAGE, LOGITS).activate()
    trt_standin.WORKING = True

    def nullptr(self: Any, logger: Any) -> None:  # createInferRuntime failed: what trt.Runtime raises then
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(tensorrt.Runtime, "__init__", nullptr)
    runner = TensorRTRunner(engine, IMAGE, LOGITS)
    with pytest.raises(BackendUnavailableError, match="TensorRT could not start on this GPU: TypeError"):
        runner.activate()
    assert runner.is_active is False and trt_standin.live_allocations() == 0


def test_cuda_python_for_a_newer_driver_falls_back_to_pycuda(trt_standin: Any) -> None:
    """pip install cuda-python gives 13.x, which needs a CUDA 13 driver; JetPack 6 is CUDA 12."""
    from runtime.runners.cuda import load_cuda

    trt_standin.RUNTIME_VERSION = 13000
    assert load_cuda("auto").name == "pycuda"
    with pytest.raises(BackendUnavailableError, match="cudaErrorInsufficientDriver") as caught:
        load_cuda("cuda-python")
    assert "pip install 'cuda-python>=12,<13'" in str(caught.value)
    with TensorRTRunner(_image_engine(), IMAGE, LOGITS) as runner:
        assert runner.infer(_images(2))["logits"].shape == (2, 3)


def test_an_engine_with_bf16_io_is_refused_clearly() -> None:
    bf16 = SimpleNamespace(name="BF16")
    with pytest.raises(BackendUnavailableError, match="engine tensor 'logits' has TensorRT type BF16, which numpy"):
        numpy_dtype("logits", bf16)
    assert numpy_dtype("x", SimpleNamespace(name="HALF")) == np.float16


# --- without any stand-in ------------------------------------------------------------------


_INPUT, _OUTPUT = "INPUT", "OUTPUT"
FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT=_INPUT, OUTPUT=_OUTPUT))
HALF, FLOAT, INT32 = (SimpleNamespace(name=n) for n in ("HALF", "FLOAT", "INT32"))


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


def test_discovers_io_through_bindings_of_the_first_profile() -> None:
    engine = Engine8([("ids", True, INT32), ("mask", True, INT32), ("logits", False, FLOAT)], profiles=2)
    io, named = discover_io(engine, FAKE_TRT)
    assert named is False
    assert [(t.name, t.is_input, t.index) for t in io] == [("ids", True, 0), ("mask", True, 1), ("logits", False, 2)]


def test_engine_with_other_names_is_refused_naming_both() -> None:
    io = [EngineIO("input", True, np.dtype(np.float32), 0), EngineIO("logits", False, np.dtype(np.float32), 1)]
    with pytest.raises(InferenceError, match=r"inputs are \['input'\]; the package declares \['image'\].*engine build"):
        check_io_names(io, IMAGE, LOGITS)


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


def test_buffers_are_reused_when_shapes_shrink_and_grown_when_they_grow() -> None:
    cuda = NumpyCuda()
    pool = BufferPool(cuda)  # type: ignore[arg-type]
    host, device = pool.get("image", (4, 3, 8, 8), np.dtype(np.float32))
    assert host.shape == (4, 3, 8, 8) and pool.capacity("image") == 4 * 3 * 64
    small, again = pool.get("image", (1, 3, 8, 8), np.dtype(np.float32))
    assert small.shape == (1, 3, 8, 8) and again == device and cuda.allocs == 1
    big, grown = pool.get("image", (8, 3, 8, 8), np.dtype(np.float32))
    assert big.shape == (8, 3, 8, 8) and grown != device
    assert (cuda.allocs, cuda.frees, pool.capacity("image")) == (2, 1, 8 * 3 * 64)
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


def test_unknown_cuda_binding_or_context_count_is_refused() -> None:
    with pytest.raises(BackendUnavailableError, match=r"cuda is 'cupy'; expected one of \['auto', 'cuda-python', 'pycuda'\]"):
        TensorRTRunner(b"", IMAGE, LOGITS, cuda="cupy")
    with pytest.raises(BackendUnavailableError, match="max_contexts is 0"):
        TensorRTRunner(b"", IMAGE, LOGITS, max_contexts=0)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_activate_without_tensorrt_names_the_extra() -> None:
    runner = TensorRTRunner(b"not an engine", IMAGE, LOGITS)  # constructing needs nothing
    with pytest.raises(BackendUnavailableError, match=r"edge-sdk\[tensorrt\]"):
        runner.activate()
    assert runner.is_active is False


# --- on real hardware --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_onnxruntime_on_gpu() -> None:
    pytest.importorskip("tensorrt", reason="needs the tensorrt package and an NVIDIA GPU")
    if importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
        pytest.skip("needs cuda-python or pycuda")
    model = builders.image_model()
    try:
        engine = _engine(model, EngineBuildConfig(precision="fp32", profiles=(Profile({"image": (
            (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}),)))
    except (RuntimeError, TypeError) as exc:  # no GPU / driver behind the tensorrt package
        pytest.skip(f"TensorRT cannot build on this machine: {exc}")
    with TensorRTRunner(engine, IMAGE, LOGITS) as trt_runner:
        for batch in (2, 4, 1, 9):  # grow, shrink into the existing buffers, then split beyond the profile
            x = _images(batch)
            np.testing.assert_allclose(trt_runner.infer(x)["logits"], _cpu(model, IMAGE, x), rtol=1e-3, atol=1e-3)
