"""Runner selection: policies, recorded reasons, and failure when nothing can run."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import BackendUnavailableError
from runtime.package import Package
from runtime.runners.onnxrt import available_providers
from runtime.select import DEFAULT_POLICY, parse_policy, select_runner


def test_parse_policy_expands_auto_aliases_and_lists() -> None:
    assert parse_policy("auto") == DEFAULT_POLICY
    assert parse_policy("cuda, cpu") == ("onnxruntime-cuda", "onnxruntime-cpu")
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
        assert list(reasons) == ["tensorrt", "onnxruntime-cuda"]
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
