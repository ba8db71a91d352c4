"""On-device engine build planning: graph, config, fingerprint, memory guard, and refusal off-device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import devices
from converters.device_build import build_for_device, check_memory, plan_build
from edge_sdk.errors import BackendUnavailableError, EngineBuildError
from runtime.engine_spec import EngineSpec
from runtime.package import Package

ORIN_NANO = devices.DeviceInfo(arch="aarch64", jetson_module="NVIDIA Jetson Orin Nano Developer Kit",
                               l4t_release="36.3.0", gpu_compute_capability="8.7", tensorrt_version="10.3.0",
                               cuda_version="12.6.68", memory_total_mb=7620, memory_available_mb=5200)


ORIN_AGX = dataclasses.replace(ORIN_NANO, jetson_module="NVIDIA Jetson AGX Orin Developer Kit", dla_cores=2)


def test_plan_builds_the_qdq_graph_for_this_fingerprint(int8_package: Package) -> None:
    plan = plan_build(int8_package, ORIN_NANO, workspace_mb=512)
    assert plan.spec == EngineSpec("sm87-trt10.3.0", "s8s8", "int8")
    assert plan.config.precision == "int8" and plan.config.explicit and not plan.config.strongly_typed
    assert plan.fingerprint.key == devices.fingerprint(ORIN_NANO).key and plan.fingerprint.can_build
    command = plan.command(int8_package)
    assert command.startswith("trtexec --onnx=model.int8.s8s8.onnx --saveEngine=s8s8-int8-sm87-trt10.3.0.plan")
    assert "--int8 --fp16" in command and "--builderOptimizationLevel" in command
    assert "--minShapes=image:1x3x8x8" in command and "--memPoolSize=workspace:512" in command
    jetpack5 = dataclasses.replace(ORIN_NANO, tensorrt_version="8.5.2.2", l4t_release="35.4.1")
    assert "--builderOptimizationLevel" not in plan_build(int8_package, jetpack5).command(int8_package)


def test_fp32_packages_build_fp16_and_dla_is_fixed_shape(image_package: Path) -> None:
    package = Package.open(image_package)
    assert plan_build(package, ORIN_AGX).spec == EngineSpec("sm87-trt10.3.0", "fp32", "fp16")
    plan = plan_build(package, ORIN_AGX, dla_core=0)
    assert plan.spec == EngineSpec("sm87-trt10.3.0", "fp32", "fp16", dla_core=0)
    assert plan.config.dla_core == 0 and plan.fingerprint.key.endswith("-dla0")
    assert [p.shapes["image"] for p in plan.config.profiles] == [((1, 3, 8, 8),) * 3]
    assert "--useDLACore=0" in plan.command(package)
    assert plan_build(package, ORIN_AGX, dla_core=1, dla_batch=4).config.profiles[0].shapes["image"][2][0] == 4
    with pytest.raises(EngineBuildError, match="DLA runs fp16 or int8, not fp32"):
        plan_build(package, ORIN_AGX, dla_core=0, precision="fp32")
    with pytest.raises(EngineBuildError, match="has no s8s8 graph to build an int8 engine from"):
        plan_build(package, ORIN_AGX, precision="int8")


def test_dla_int8_is_implicit_from_the_calibration_cache_of_this_tensorrt(int8_package: Package) -> None:
    """DLA runs no Q/DQ graph: int8 comes from the fp32 graph and the package's scales, rendered with this
    device's TensorRT version (TensorRT ignores a cache whose header names another)."""
    plan = plan_build(int8_package, ORIN_AGX, dla_core=1)
    assert plan.spec == EngineSpec("sm87-trt10.3.0", "fp32", "int8", dla_core=1)
    assert not plan.config.explicit and plan.config.calibration_cache is not None
    assert plan.config.calibration_cache.startswith("TRT-100300-EntropyCalibration2\n")
    assert "--calib=calibration.cache" in plan.command(int8_package)
    jetpack5 = dataclasses.replace(ORIN_AGX, tensorrt_version="8.5.2.2")
    assert plan_build(int8_package, jetpack5, dla_core=0).config.calibration_cache.startswith("TRT-8502-")


def test_a_text_package_is_not_built_for_dla(tmp_path: Path, text_package: Path) -> None:
    with pytest.raises(EngineBuildError, match="DLA engines take fixed shapes only"):
        plan_build(Package.open(text_package), ORIN_AGX, dla_core=0)


def test_memory_guard_refuses_a_build_that_does_not_fit(int8_package: Package) -> None:
    plan = plan_build(int8_package, ORIN_NANO, workspace_mb=4096)
    tight = devices.DeviceInfo(**{**ORIN_NANO.__dict__, "memory_available_mb": plan.needed_mb - 1})
    with pytest.raises(EngineBuildError, match=f"needs about {plan.needed_mb} MB but only {plan.needed_mb - 1} MB"):
        check_memory(plan, tight)
    check_memory(plan, ORIN_NANO)  # 5200 MB available: fits


def test_building_on_a_machine_without_gpu_or_tensorrt_is_refused(int8_package: Package, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    if devices.fingerprint(devices.detect()).can_build:
        pytest.skip("this machine can build TensorRT engines")
    with pytest.raises(BackendUnavailableError, match="cannot build TensorRT engines"):
        build_for_device(int8_package.path)


def test_a_2_4_pruning_record_enables_sparse_tactics(int8_package: Package, tmp_path: Path) -> None:
    from dataclasses import replace

    from runtime.package import write_package

    files = {n: int8_package.read_bytes(n) for n in int8_package.manifest.files}
    reports = {**int8_package.manifest.reports, "pruning": {"pattern": "2:4"}}
    pruned = write_package(replace(int8_package.manifest, reports=reports), files, tmp_path / "pruned.edgepkg")
    assert plan_build(pruned, ORIN_NANO).config.sparsity
    assert not plan_build(int8_package, ORIN_NANO).config.sparsity
    assert "--sparsity=enable" in plan_build(pruned, ORIN_NANO).command(pruned)
