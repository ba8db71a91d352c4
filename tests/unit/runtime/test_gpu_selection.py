"""Selection on a machine where tensorrt imports: engines found by their spec, served and judged at
their precision, and every failure passed over to the next backend.

Runs against the tensorrt / cuda-python / pycuda API stand-ins (tests/standin; not a GPU), through
the real `engine build` path, engine cache, selection and parity.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import devices
from converters.device_build import build_for_device
from runtime import backends
from runtime.engine_spec import EngineSpec
from runtime.package import Package
from runtime.select import BACKENDS, replicate, select_runner
from tests import builders
from tests.threads import run_together

DEVICE = "sm87-trt10.3.0"  # what the stand-ins report: compute capability 8.7, TensorRT 10.3.0


def test_the_stand_in_device_is_fingerprinted_through_cuda_python(trt_standin: Any) -> None:
    info = backends.device_info()
    assert (info.gpu_name, info.gpu_compute_capability, info.tensorrt_version) == ("API stand-in GPU", "8.7", "10.3.0")
    assert backends.device_key() == DEVICE


def test_an_fp32_package_without_engine_falls_back_to_cpu(trt_standin: Any, image_package: Path) -> None:
    selection = select_runner(Package.open(image_package))
    try:
        assert selection.backend == "onnxruntime-cpu" and selection.precision_label == "fp32"
        reasons = {s.backend: s.reason for s in selection.skipped}
        assert reasons["tensorrt"].startswith(f"no engine for this device ({DEVICE})")
        assert "edge-sdk engine build" in reasons["tensorrt"]
    finally:
        selection.runner.deactivate()


def test_a_built_fp16_engine_is_found_served_and_judged_as_fp16(trt_standin: Any, image_package: Path) -> None:
    path, result, plan = build_for_device(image_package)
    assert plan.spec == EngineSpec(DEVICE, "fp32", "fp16") and path.name == f"fp32-fp16-{DEVICE}.plan"
    package = Package.open(image_package)
    selection = select_runner(package)
    try:
        assert selection.backend == "tensorrt" and selection.skipped == ()
        assert selection.precision_label == "fp16" and selection.served.engine == plan.spec
        assert selection.parity is not None and selection.parity.tolerance == 2e-2
    finally:
        selection.runner.deactivate()
    fp32 = select_runner(package, precision="fp32")  # no fp32 engine: never the fp16 one tagged fp32
    try:
        assert fp32.backend == "onnxruntime-cpu" and fp32.precision_label == "fp32"
        assert "no TensorRT engine serves precision fp32" in fp32.skipped[0].reason
    finally:
        fp32.runner.deactivate()


def test_an_int8_engine_serves_int8_and_fp32_is_not_answered_with_it(trt_standin: Any, int8_package: Package) -> None:
    _, _, plan = build_for_device(int8_package.path)
    assert plan.spec == EngineSpec(DEVICE, "s8s8", "int8")
    selection = select_runner(int8_package)
    try:
        assert selection.backend == "tensorrt" and selection.precision_label == "int8-s8s8"
        assert selection.parity is not None and selection.parity.tolerance == 5e-2
    finally:
        selection.runner.deactivate()
    fp32 = select_runner(int8_package, precision="fp32")
    try:
        assert fp32.backend == "onnxruntime-cpu" and fp32.graph == "fp32"
    finally:
        fp32.runner.deactivate()


def test_an_int8_engine_failing_parity_falls_back_to_the_fp16_engine(
        trt_standin: Any, int8_package: Package, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorrt

    build_for_device(int8_package.path)
    build_for_device(int8_package.path, precision="fp16")
    original = tensorrt.ICudaEngine.run

    def off_when_int8(self: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = original(self, feeds)
        return {n: v * 1.5 for n, v in out.items()} if self.header["precision"] == "int8" else out

    monkeypatch.setattr(tensorrt.ICudaEngine, "run", off_when_int8)
    selection = select_runner(int8_package)
    try:
        assert selection.backend == "tensorrt" and selection.precision_label == "fp16"
        [skipped] = selection.skipped
        assert skipped.backend == "tensorrt (int8-s8s8)" and "failed the golden-vector check" in skipped.reason
        assert "int8 on the s8s8 graph" in skipped.reason
    finally:
        selection.runner.deactivate()


def test_dla_engines_are_built_fixed_shape_found_on_their_core_and_served_by_tensorrt_dla(
        trt_standin: Any, int8_package: Package, monkeypatch: pytest.MonkeyPatch) -> None:
    live = devices.detect()
    agx = dataclasses.replace(live, jetson_module="NVIDIA Jetson AGX Orin", dla_cores=2)
    monkeypatch.setattr(devices, "detect", lambda *a, **k: agx)
    backends.device_info.cache_clear()
    _, _, plan = build_for_device(int8_package.path, dla_core=1)
    assert plan.spec == EngineSpec(DEVICE, "fp32", "int8", dla_core=1)
    assert plan.config.calibration_cache is not None and plan.config.calibration_cache.startswith("TRT-100300-")
    gpu_first = select_runner(int8_package)  # the default policy does not guess DLA
    assert gpu_first.backend == builders.auto_cpu_backend(int8_package) and gpu_first.skipped[0].backend == "tensorrt"
    gpu_first.runner.deactivate()
    selection = select_runner(int8_package, "dla,cpu")
    try:
        assert selection.backend == "tensorrt-dla" and selection.precision_label == "int8-implicit"
        assert selection.served.engine == plan.spec and selection.runner.dla_core == 1  # type: ignore[attr-defined]
        image = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)
        assert selection.runner.infer({"image": image})["logits"].shape == (5, 3)  # fixed batch 1, five runs
    finally:
        selection.runner.deactivate()


def test_cuda_that_cannot_start_passes_tensorrt_over(trt_standin: Any, image_package: Path) -> None:
    build_for_device(image_package)
    assert backends.device_key() == DEVICE  # probed while the GPU answered; CUDA fails from here on
    trt_standin.WORKING = False
    selection = select_runner(Package.open(image_package))
    try:
        assert selection.backend == "onnxruntime-cpu"
        assert "no CUDA binding for TensorRT runs here" in selection.skipped[0].reason
    finally:
        selection.runner.deactivate()


def test_any_exception_from_a_backend_is_recorded_and_the_next_is_tried(image_package: Path) -> None:
    def broken_probe(package: Package) -> str | None:
        raise RuntimeError("libnvinfer.so.10: cannot open shared object file")

    def broken_factory(package: Package, threads: int | None, precision: str) -> Any:
        raise TypeError("pybind11::init(): factory function returned nullptr")

    registry = {"a": (broken_probe, broken_factory), "b": (lambda p: None, broken_factory), **BACKENDS}
    selection = select_runner(Package.open(image_package), ["a", "b", "cpu"], registry=registry)
    try:
        assert selection.backend == "onnxruntime-cpu"
        assert [s.reason for s in selection.skipped] == [
            "probe failed with RuntimeError: libnvinfer.so.10: cannot open shared object file",
            "activation failed with TypeError: pybind11::init(): factory function returned nullptr"]
    finally:
        selection.runner.deactivate()


def test_replicas_of_the_tensorrt_backend_share_the_engine_and_serve_threads(
        trt_standin: Any, image_package: Path) -> None:
    build_for_device(image_package)
    package = Package.open(image_package)
    selection = select_runner(package)
    runners = replicate(package, selection, 2)
    image = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    want = selection.runner.infer({"image": image})["logits"]

    def work(runner: Any) -> None:
        for _ in range(4):
            np.testing.assert_array_equal(runner.infer({"image": image})["logits"], want)

    errors = run_together(work, [*runners, selection.runner] * 2)
    for r in [*runners, selection.runner]:
        r.deactivate()
    assert errors == [] and trt_standin.violations == [] and trt_standin.live_allocations() == 0


def test_the_ort_tensorrt_provider_serves_and_labels_what_it_computes(image_package: Path,
                                                                     int8_package: Package) -> None:
    fp32_only = Package.open(image_package)
    assert backends._ort_tensorrt_served(fp32_only, "auto") == backends.Served("fp32", "fp16")
    assert backends._ort_tensorrt_served(fp32_only, "fp32") == backends.Served("fp32", "fp32")
    assert backends._ort_tensorrt_served(int8_package, "auto") == backends.Served("s8s8", "int8")
    assert backends._ort_tensorrt_served(int8_package, "fp16").label == "fp16"
    with pytest.raises(Exception, match="has no int8 graph for TensorRT"):
        backends._ort_tensorrt_served(fp32_only, "int8")


def test_the_sdk_serves_an_engine_to_many_threads_and_says_what_served(
        trt_standin: Any, image_package: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """edge_sdk.load -> TensorRT engine -> predictions from the daemon's kind of thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    import edge_sdk
    from edge_sdk.cli import main

    build_for_device(image_package)
    images = sorted(image_folder.rglob("*.png"))
    with edge_sdk.load(image_package, precision="fp32") as cpu:
        want = [cpu.predict(p).label for p in images]
        assert cpu.backend == "onnxruntime-cpu"
    with edge_sdk.load(image_package) as model:
        assert model.info["backend"] == "tensorrt" and model.info["precision_served"] == "fp16"
        assert model.info["engine"] == f"fp32-fp16-{DEVICE}"
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(model.predict, images * 4))
        batch = model.predict_batch(images * 5)  # beyond the profile's 32: split inside the runner
    assert [p.label for p in got] == want * 4 and [p.label for p in batch] == want * 5
    assert {(p.backend, p.precision) for p in got + batch} == {("tensorrt", "fp16")}
    assert trt_standin.violations == [] and trt_standin.live_allocations() == 0
    assert main(["inspect", str(image_package), "--device"]) == 0
    assert f"would serve with: tensorrt (fp16, fp32 graph, engine fp32-fp16-{DEVICE}, parity" in capsys.readouterr().out
