"""Engine build configuration, profiles and trtexec renderings (CPU); one real build on a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.engine import (
    BuildResult,
    EngineBuildConfig,
    Profile,
    build_engine,
    format_command,
    profiles_for,
    static_profile,
    trtexec_command,
)
from edge_sdk.errors import BackendUnavailableError, EngineBuildError
from runtime.manifest import TensorSpec

CACHE = "TRT-8601-EntropyCalibration2\nx: 3c010a14\ny: 3d8c2d1f\n"
IMAGE = ((1, 3, 224, 224), (8, 3, 224, 224), (16, 3, 224, 224))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"precision": "int4"}, "precision 'int4' is not one of"),
    ({"explicit": "yes"}, "explicit='yes'; expected True or False"),
    ({"sparsity": 1}, "sparsity=1; expected True or False"),
    ({"gpu_fallback": None}, "gpu_fallback=None"),
    ({"explicit": False}, "needs calibration_cache"),
    ({"precision": "fp16", "calibration_cache": CACHE}, "used only for implicit int8"),
    ({"explicit": False, "calibration_cache": "garbage"}, "expected a TensorRT cache header"),
    ({"dla_core": -1}, "dla_core=-1"),
    ({"dla_core": True}, "dla_core=True"),
    ({"dla_core": 0, "precision": "fp32"}, "DLA runs only fp16 or int8"),
    ({"strongly_typed": True, "precision": "fp16"}, "strongly typed build takes its precisions"),
    ({"workspace_mb": 0}, "workspace_mb=0"),
    ({"workspace_mb": 1.5}, "workspace_mb=1.5"),
    ({"timing_cache": ""}, "timing_cache=''"),
    ({"optimization_level": 6}, "optimization_level=6; expected an int from 0 to 5"),
    ({"profiles": [Profile({"x": IMAGE})]}, "expected a tuple of Profile"),
    ({"profiles": (Profile({"x": IMAGE}), Profile({"y": IMAGE}))}, "different inputs"),
])
def test_config_rejects_each_bad_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(EngineBuildError, match=match):
        EngineBuildConfig(**kwargs)


def test_config_errors_carry_a_fix() -> None:
    with pytest.raises(EngineBuildError) as info:
        EngineBuildConfig(precision="int8", explicit=False)
    assert info.value.hint is not None and "explicit=True" in info.value.hint


@pytest.mark.parametrize(("shapes", "match"), [
    ({}, "non-empty mapping"),
    ({"x": ((1, 3), (2, 3))}, r"expected \(min shape, opt shape, max shape\)"),
    ({"x": ((1, 3), (2, 3, 1), (4, 3))}, "same rank"),
    ({"x": ((0, 3), (2, 3), (4, 3))}, "positive ints"),
    ({"x": ((1, 3), (8, 3), (4, 3))}, "axis 0: min 1, opt 8, max 4"),
])
def test_profile_rejects_bad_shapes(shapes: dict[str, Any], match: str) -> None:
    with pytest.raises(EngineBuildError, match=match):
        Profile(shapes)


def test_profile_normalises_lists_to_tuples() -> None:
    profile = Profile({"x": ([1, 3], [2, 3], [4, 3])})  # type: ignore[dict-item]
    assert profile.shapes["x"] == ((1, 3), (2, 3), (4, 3))


def test_profiles_for_image_is_one_dynamic_batch_profile() -> None:
    profiles = profiles_for([TensorSpec("images", "float32", ("batch", 3, 224, 224))])
    assert profiles == (Profile({"images": IMAGE[:2] + ((32, 3, 224, 224),)}),)  # predict_batch(32) fits one run


def test_profiles_for_text_is_one_profile_per_sequence_bucket() -> None:
    specs = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
             TensorSpec("attention_mask", "int64", ("batch", "sequence"))]
    profiles = profiles_for(specs, batch=(1, 4, 8), sequence_buckets=(32, 64, 128))
    assert [p.shapes["input_ids"] for p in profiles] == [
        ((1, 1), (4, 32), (8, 32)), ((1, 33), (4, 64), (8, 64)), ((1, 65), (4, 128), (8, 128))]
    assert all(p.shapes["attention_mask"] == p.shapes["input_ids"] for p in profiles)


def test_profiles_for_text_with_static_batch_keeps_it() -> None:
    profiles = profiles_for([TensorSpec("ids", "int64", (1, "seq"))], sequence_buckets=(16,))
    assert profiles == (Profile({"ids": ((1, 1), (1, 16), (1, 16))}),)


def test_profiles_for_static_inputs_needs_none() -> None:
    assert profiles_for([TensorSpec("images", "float32", (1, 3, 32, 32))]) == ()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"inputs": [TensorSpec("images", "float32", ("b", 3, "h", "w"))]}, "dynamic axis 2 \\('h'\\)"),
    ({"batch": (4, 2, 8)}, "batch=\\(4, 2, 8\\)"),
    ({"sequence_buckets": (64, 32)}, "strictly increasing"),
    ({"sequence_buckets": ()}, "strictly increasing"),
])
def test_profiles_for_rejects_what_it_cannot_express(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"inputs": [TensorSpec("ids", "int64", ("batch", "seq"))], **kwargs}
    with pytest.raises(EngineBuildError, match=match):
        profiles_for(**args)


def test_trtexec_explicit_int8_lets_float_layers_run_fp16() -> None:
    """The Q/DQ graph places int8; INT8 + FP16 lets LayerNorm, Softmax, GELU and the head run fp16 (fp32 when
    strongly typed from the fp32 Q/DQ graph, at half the rate)."""
    assert trtexec_command(EngineBuildConfig(), "m.onnx", "m.engine") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--int8", "--fp16",
        "--memPoolSize=workspace:1024", "--builderOptimizationLevel=3"]
    typed = trtexec_command(EngineBuildConfig(strongly_typed=True), "m.onnx", "m.engine")
    assert "--stronglyTyped" in typed and "--int8" not in typed and "--fp16" not in typed


@pytest.mark.parametrize(("release", "has_level"), [((8, 5), False), ((8, 6), True), ((10, 3), True)])
def test_trtexec_renders_only_flags_that_release_knows(release: tuple[int, int], has_level: bool) -> None:
    """TensorRT 8.5's trtexec (JetPack 5) refuses --builderOptimizationLevel (8.6) and --stronglyTyped (10.0)."""
    cmd = trtexec_command(EngineBuildConfig(), "m.onnx", "m.engine", tensorrt=release)
    assert any(c.startswith("--builderOptimizationLevel") for c in cmd) is has_level
    assert "--memPoolSize=workspace:1024" in cmd and "--stronglyTyped" not in cmd
    if release < (10, 0):
        with pytest.raises(EngineBuildError, match="strongly typed builds need TensorRT >= 10; this is 8"):
            trtexec_command(EngineBuildConfig(strongly_typed=True), "m.onnx", "m.engine", tensorrt=release)


def test_trtexec_implicit_int8_reads_the_calibration_file() -> None:
    config = EngineBuildConfig(explicit=False, calibration_cache=CACHE)
    assert trtexec_command(config, "m.onnx", "m.engine", calib_path="/tmp/m.cache", tensorrt=(8, 5)) == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--int8", "--fp16", "--calib=/tmp/m.cache",
        "--memPoolSize=workspace:1024"]
    with pytest.raises(EngineBuildError, match="needs calib_path"):
        trtexec_command(config, "m.onnx", "m.engine")


def test_trtexec_fp16_on_dla_with_gpu_fallback() -> None:
    config = EngineBuildConfig(precision="fp16", dla_core=1)
    assert trtexec_command(config, "m.onnx", "m.engine") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--fp16", "--useDLACore=1", "--allowGPUFallback",
        "--memPoolSize=workspace:1024", "--builderOptimizationLevel=3"]
    no_fallback = trtexec_command(EngineBuildConfig(precision="fp16", dla_core=0, gpu_fallback=False), "m.onnx", "e")
    assert "--useDLACore=0" in no_fallback and "--allowGPUFallback" not in no_fallback


def test_dla_refuses_qdq_int8_and_dynamic_shapes() -> None:
    with pytest.raises(EngineBuildError, match="DLA runs int8 only by implicit calibration"):
        EngineBuildConfig(dla_core=0)
    with pytest.raises(EngineBuildError, match="DLA needs one profile with min = opt = max"):
        EngineBuildConfig(precision="fp16", dla_core=0, profiles=(Profile({"images": IMAGE}),))
    fixed = static_profile([TensorSpec("images", "float32", ("batch", 3, 224, 224))], batch=4)
    assert fixed == (Profile({"images": ((4, 3, 224, 224),) * 3}),)
    assert EngineBuildConfig(explicit=False, calibration_cache=CACHE, dla_core=1, profiles=fixed).dla_core == 1


def test_trtexec_sparsity_workspace_timing_cache_and_level() -> None:
    config = EngineBuildConfig(precision="fp32", sparsity=True, workspace_mb=256,
                               timing_cache="/var/cache/edge/timing.cache", optimization_level=5)
    assert trtexec_command(config, "m.onnx", "m.engine") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--sparsity=enable", "--memPoolSize=workspace:256",
        "--timingCacheFile=/var/cache/edge/timing.cache", "--builderOptimizationLevel=5"]


def test_trtexec_dynamic_shapes_render_the_first_profile() -> None:
    specs = [TensorSpec("input_ids", "int64", ("batch", "seq")), TensorSpec("attention_mask", "int64", ("batch", "seq"))]
    config = EngineBuildConfig(precision="fp16", profiles=profiles_for(specs, batch=(1, 8, 16), sequence_buckets=(32, 64)))
    assert trtexec_command(config, "m.onnx", "m.engine")[-3:] == [
        "--minShapes=input_ids:1x1,attention_mask:1x1",
        "--optShapes=input_ids:8x32,attention_mask:8x32",
        "--maxShapes=input_ids:16x32,attention_mask:16x32"]
    image = EngineBuildConfig(profiles=(Profile({"images": IMAGE}),))
    assert trtexec_command(image, "m.onnx", "m.engine")[-1] == "--maxShapes=images:16x3x224x224"


def test_format_command_quotes_for_the_shell() -> None:
    cmd = trtexec_command(EngineBuildConfig(), "my model.onnx", "out/m.engine")
    line = format_command(cmd)
    assert line.startswith("trtexec '--onnx=my model.onnx' --saveEngine=out/m.engine --int8 --fp16")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_names_the_extra() -> None:
    with pytest.raises(BackendUnavailableError, match="tensorrt Python package is not installed") as info:
        build_engine(b"", EngineBuildConfig(precision="fp32"))
    assert info.value.hint is not None and "edge-sdk[tensorrt]" in info.value.hint


def _tiny_conv_onnx() -> bytes:
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 16, 16])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_engine_on_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="needs the tensorrt Python package")
    if not (Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl-gpu").exists()):
        pytest.skip("needs an NVIDIA GPU (no /dev/nvidia0 or /dev/nvhost-ctrl-gpu)")
    calls: list[tuple[str, float]] = []
    profiles = profiles_for([TensorSpec("x", "float32", ("batch", 3, 16, 16))], batch=(1, 2, 4))
    config = EngineBuildConfig(precision="fp16", profiles=profiles, timing_cache=str(tmp_path / "timing.cache"))
    result = build_engine(_tiny_conv_onnx(), config, progress=lambda phase, f: calls.append((phase, f)))
    assert isinstance(result, BuildResult) and len(result.engine) > 1000
    assert result.command.startswith("trtexec --onnx=model.onnx") and "--fp16" in result.command
    assert calls and all(0.0 <= f <= 1.0 for _, f in calls)
    assert (tmp_path / "timing.cache").stat().st_size > 0
