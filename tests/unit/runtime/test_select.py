"""Runner selection: policies, recorded reasons, and failure when nothing can run."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import BackendUnavailableError
from runtime.backends import Served
from runtime.package import Package
from runtime.runners.onnxrt import available_providers
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import BACKENDS, DEFAULT_POLICY, parse_policy, select_runner


def test_parse_policy_expands_auto_aliases_and_lists() -> None:
    assert parse_policy("auto") == DEFAULT_POLICY
    assert parse_policy("cuda, cpu") == ("onnxruntime-cuda", "onnxruntime-cpu")
    assert parse_policy("trt-ep") == ("onnxruntime-tensorrt",)
    assert parse_policy(["trt", "onnxruntime-cpu"]) == ("tensorrt", "onnxruntime-cpu")


@pytest.mark.parametrize("bad", ["gpu", "", ["cpu", "openvino"]])
def test_unknown_backend_is_refused_with_the_choices(bad: object) -> None:
    with pytest.raises(BackendUnavailableError, match="is not known; expected 'auto' or a list of tensorrt"):
        parse_policy(bad)  # type: ignore[arg-type]


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="this machine has onnxruntime CUDA")
def test_auto_falls_back_to_cpu_and_records_why(image_package: Path) -> None:
    selection = select_runner(Package.open(image_package))
    try:
        assert selection.backend == "onnxruntime-cpu" and selection.runner.is_active
        reasons = {s.backend: s.reason for s in selection.skipped}
        # OpenVINO is skipped on every machine for an fp32 CNN: not installed, or measured slower here
        assert list(reasons) == ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "openvino-cpu"]
        assert "not TensorrtExecutionProvider" in reasons["onnxruntime-tensorrt"]
        assert "edge-sdk[tensorrt]" in reasons["tensorrt"] or "engine" in reasons["tensorrt"]
        assert "not CUDAExecutionProvider" in reasons["onnxruntime-cuda"]
        assert "CPUExecutionProvider" in reasons["onnxruntime-cuda"]
    finally:
        selection.runner.deactivate()


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="this machine has onnxruntime CUDA")
def test_policy_without_a_runnable_backend_lists_every_reason(image_package: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="tensorrt: .*; onnxruntime-cuda: .*not CUDAExecutionProvider") as info:
        select_runner(Package.open(image_package), "tensorrt,cuda")
    assert info.value.hint == "add 'onnxruntime-cpu' to the policy"


def test_explicit_cpu_policy_skips_nothing(image_package: Path) -> None:
    selection = select_runner(Package.open(image_package), "cpu", threads=1)
    assert selection.backend == "onnxruntime-cpu" and selection.skipped == ()
    selection.runner.deactivate()


class _ScaledRunner(OnnxRuntimeRunner):
    """A backend standing in for a GPU one whose kernels are off: real onnxruntime, outputs scaled."""

    backend = "fake-gpu"

    def __init__(self, *args, factor: float, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.factor = factor
        self.backend = "fake-gpu"

    def _infer_impl(self, feeds):  # type: ignore[no-untyped-def]
        return {k: v * self.factor for k, v in super()._infer_impl(feeds).items()}


def _registry(factor: float) -> dict:
    def make(package: Package, threads: int | None, precision: str):  # type: ignore[no-untyped-def]
        m = package.manifest
        return _ScaledRunner(package.read_bytes(m.model), m.inputs, m.outputs, factor=factor), Served()

    return {"fake-gpu": (lambda package: None, make), **BACKENDS}


def test_a_backend_failing_parity_is_skipped_and_reported(image_package: Path) -> None:
    selection = select_runner(Package.open(image_package), ["fake-gpu", "cpu"], registry=_registry(1.5))
    try:
        assert selection.backend == "onnxruntime-cpu" and selection.parity is not None and selection.parity.ok
        [skipped] = selection.skipped
        assert skipped.backend == "fake-gpu"
        assert "failed the golden-vector check" in skipped.reason and "tolerance 0.001" in skipped.reason
    finally:
        selection.runner.deactivate()


def test_a_backend_within_tolerance_serves(image_package: Path) -> None:
    selection = select_runner(Package.open(image_package), ["fake-gpu", "cpu"], registry=_registry(1.0 + 1e-5))
    assert selection.backend == "fake-gpu" and selection.skipped == ()
    assert selection.parity is not None and 0 < selection.parity.max_abs_diff <= 1e-3
    selection.runner.deactivate()


def test_parity_check_itself_on_perturbed_outputs(image_package: Path) -> None:
    from edge_sdk.errors import InferenceError
    from runtime.parity import check_parity

    package = Package.open(image_package)
    m = package.manifest
    for factor, ok in ((1.0, True), (1.0005, True), (1.2, False)):
        with _ScaledRunner(package.read_bytes(m.model), m.inputs, m.outputs, factor=factor) as runner:
            if ok:
                assert check_parity(package, runner, "fp32").ok
            else:
                with pytest.raises(InferenceError, match="refusing to serve it"):
                    check_parity(package, runner, "fp32")


def test_tensorrt_provider_options_keep_caches_under_the_runtime_cache(image_package: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.backends import device_key, tensorrt_provider_options

    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    options = tensorrt_provider_options(Package.open(image_package), Served("fp32", "fp32"))
    cache = Path(options["trt_engine_cache_path"])
    assert cache.is_dir() and cache.is_relative_to(tmp_path / "cache") and cache.name == device_key()
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert options["trt_timing_cache_path"] == str(cache) and options["trt_int8_enable"] is False
    assert options["trt_fp16_enable"] is False  # fp32 asked: no fp16 kernels, or parity would judge fp16 as fp32
    int8 = tensorrt_provider_options(Package.open(image_package), Served("s8s8", "int8"))
    assert int8["trt_int8_enable"] is True and int8["trt_fp16_enable"] is True
