"""The OpenVINO runner (the ``[openvino]`` extra) on real graphs: fp32 and the int8 graphs, through selection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from edge_sdk.errors import BackendUnavailableError, InferenceError, InputMismatchError, PackageError
from runtime import backends
from runtime.manifest import TensorSpec
from runtime.package import Package
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import select_runner
from tests import builders

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")

from runtime.runners.base import DEFAULT_MAX_BATCH  # noqa: E402
from runtime.runners.openvino import IR_LAYOUT, OpenVinoRunner, compile_config  # noqa: E402

IMAGE_INPUT = (TensorSpec("image", "float32", ("batch", 3, 8, 8)),)
LOGITS = (TensorSpec("logits", "float32", ("batch", 3)),)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGE_SDK_CACHE", str(cache))
    return cache


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, 8, 8)).astype(np.float32)


def test_fp32_graph_matches_onnxruntime_at_every_batch_size() -> None:
    model = builders.cnn_model(size=8).SerializeToString()
    with OpenVinoRunner(model, IMAGE_INPUT, LOGITS, threads=1) as ov, \
            OnnxRuntimeRunner(model, IMAGE_INPUT, LOGITS, threads=1) as ort:
        for batch in (1, 3, 8, 1, DEFAULT_MAX_BATCH + 9):  # one compiled model; past its batch bound, in chunks
            x = _images(batch, seed=batch)
            got, want = ov.infer({"image": x})["logits"], ort.infer({"image": x})["logits"]
            assert got.shape == (batch, 3)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_outputs_are_copies_not_the_request_memory() -> None:
    with OpenVinoRunner(builders.cnn_model(size=8).SerializeToString(), IMAGE_INPUT, LOGITS, threads=1) as runner:
        first = runner.infer({"image": _images(2, seed=1)})["logits"]
        kept = first.copy()
        runner.infer({"image": _images(2, seed=2)})
        np.testing.assert_array_equal(first, kept)


def test_feeds_are_checked_like_every_runner() -> None:
    with OpenVinoRunner(builders.cnn_model(size=8).SerializeToString(), IMAGE_INPUT, LOGITS) as runner:
        with pytest.raises(InputMismatchError, match="dtype float64; expected float32"):
            runner.infer({"image": np.zeros((1, 3, 8, 8))})
        with pytest.raises(InputMismatchError, match="size 16 on axis 2.*expected 8"):
            runner.infer({"image": np.zeros((1, 3, 16, 8), np.float32)})


def test_a_manifest_that_describes_another_graph_is_refused() -> None:
    wrong = (TensorSpec("image", "float32", ("batch", 3, 16, 16)),)
    refused = r"graph input 'image' has shape \['\?', 3, 8, 8\] but the manifest declares \['batch', 3, 16, 16\]"
    with pytest.raises(PackageError, match=refused):
        OpenVinoRunner(builders.cnn_model(size=8).SerializeToString(), wrong, LOGITS).activate()
    renamed = (TensorSpec("pixels", "float32", ("batch", 3, 8, 8)),)
    with pytest.raises(PackageError, match=r"inputs are \['image'\] but the manifest declares \['pixels'\]"):
        OpenVinoRunner(builders.cnn_model(size=8).SerializeToString(), renamed, LOGITS).activate()
    scores = (TensorSpec("scores", "float32", ("batch", 3)),)
    with pytest.raises(InferenceError, match=r"no outputs \['scores'\]"):
        OpenVinoRunner(builders.cnn_model(size=8).SerializeToString(), IMAGE_INPUT, scores).activate()


def test_a_graph_openvino_cannot_read_is_an_inference_error_and_threads_are_checked() -> None:
    with pytest.raises(InferenceError, match="OpenVINO could not compile the model"):
        OpenVinoRunner(b"not an onnx graph", IMAGE_INPUT, LOGITS).activate()
    with pytest.raises(BackendUnavailableError, match="threads is 0"):
        OpenVinoRunner(b"", IMAGE_INPUT, LOGITS, threads=0)


def test_the_graph_is_computed_in_its_own_precision() -> None:
    config = compile_config(2)
    assert config["INFERENCE_PRECISION_HINT"] == "f32" and config["INFERENCE_NUM_THREADS"] == 2
    assert config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
    with OpenVinoRunner(builders.cnn_model(size=8).SerializeToString(), IMAGE_INPUT, LOGITS, threads=2) as runner:
        assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 2


def test_int8_package_serves_the_cpu_graph_through_selection_with_parity(int8_package: Any) -> None:
    selection = select_runner(int8_package, "openvino-cpu")
    try:
        wanted, _ = backends.this_cpu_int8_graph()
        assert selection.backend == "openvino-cpu" and selection.graph == wanted
        assert selection.precision_label == f"int8-{wanted}"
        assert selection.parity is not None and selection.parity.ok
        # the same graph on onnxruntime: both integer pipelines agree within the int8 parity tolerance
        inputs, _ = int8_package.golden(wanted)
        m = int8_package.manifest
        with OnnxRuntimeRunner(int8_package.read_bytes(m.graphs[wanted]), m.inputs, m.outputs) as ort:
            want = ort.infer(inputs)[m.outputs[0].name]
        got = selection.runner.infer(inputs)[m.outputs[0].name]
        assert np.abs(got - want).max() / max(1.0, float(np.abs(want).max())) < 5e-2
        assert (got.argmax(1) == want.argmax(1)).all()
    finally:
        selection.runner.deactivate()


def test_compiled_models_are_cached_under_the_runtime_cache(int8_package: Any, _cache: Path) -> None:
    selection = select_runner(int8_package, "openvino-cpu", precision="fp32")
    selection.runner.deactivate()
    blobs = list((_cache / "openvino").iterdir())
    assert blobs, "OpenVINO wrote no compiled blob into the cache directory"


def test_predictions_name_the_backend_and_the_graph(image_package: Path) -> None:
    with edge_sdk.load(image_package, backend="openvino-cpu") as model:
        assert model.info["backend"] == "openvino-cpu" and model.info["graph"] == "fp32"
        with edge_sdk.load(image_package, backend="onnxruntime-cpu") as baseline:
            image = builders.write_image_folder(Path(model.info["path"]).parent / "imgs")
            files = sorted(image.rglob("*.png"))
            got, want = model.predict_batch(files), baseline.predict_batch(files)
        assert [p.label for p in got] == [p.label for p in want]
        assert all(p.backend == "openvino-cpu" for p in got)


def test_without_openvino_the_policy_moves_on_and_names_the_extra(image_package: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.runners.openvino as ov_runner

    monkeypatch.setattr(ov_runner, "openvino_version", lambda: None)
    selection = select_runner(Package.open(image_package), "openvino-cpu,onnxruntime-cpu")
    try:
        assert selection.backend == "onnxruntime-cpu"
        assert [(s.backend, s.reason) for s in selection.skipped] == [("openvino-cpu", ov_runner.OPENVINO_MISSING)]
        assert "edge-sdk[openvino]" in selection.skipped[0].reason
    finally:
        selection.runner.deactivate()


def _as_cpu(monkeypatch: pytest.MonkeyPatch, arch: str, graph: str) -> None:
    """Selection's view of another CPU family (the rule under test reads only these two facts)."""
    import dataclasses

    info = dataclasses.replace(backends.device_info(), arch=arch)
    monkeypatch.setattr(backends, "device_info", lambda: info)
    monkeypatch.setattr(backends, "this_cpu_int8_graph", lambda: (graph, f"{arch} facts"))


def test_auto_prefers_openvino_only_where_it_was_measured_faster(int8_package: Any, image_package: Path,
                                                                 text_package: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    image_fp32, text_fp32 = Package.open(image_package), Package.open(text_package)
    _as_cpu(monkeypatch, "x86_64", "u8s8")  # x86-64 with VNNI: transformers and int8 CNNs on OpenVINO
    assert backends.openvino_gives_way(text_fp32) is None
    assert backends.openvino_gives_way(text_fp32, "int8") is None
    assert "fp32 CNN graphs faster" in (backends.openvino_gives_way(image_fp32) or "")
    assert backends.openvino_gives_way(int8_package) is None and backends.openvino_gives_way(int8_package, "int8") is None
    assert "fp32 CNN graphs faster" in (backends.openvino_gives_way(int8_package, "fp32") or "")
    _as_cpu(monkeypatch, "x86_64", "u8s7")  # x86-64 without VNNI
    assert "without VNNI" in (backends.openvino_gives_way(text_fp32) or "")
    _as_cpu(monkeypatch, "aarch64", "u8s8")
    assert "aarch64" in (backends.openvino_gives_way(text_fp32) or "")


def test_under_auto_the_faster_cpu_backend_serves_and_the_other_says_why(image_package: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _as_cpu(monkeypatch, "x86_64", "u8s8")  # the rule's view only: fp32 is exact on every CPU
    selection = select_runner(Package.open(image_package), "auto")
    try:
        assert selection.backend == "onnxruntime-cpu"
        reasons = {s.backend: s.reason for s in selection.skipped}
        assert "fp32 CNN graphs faster" in reasons["openvino-cpu"]
    finally:
        selection.runner.deactivate()
    # an explicit policy is walked as written
    selection = select_runner(Package.open(image_package), "openvino-cpu,onnxruntime-cpu")
    try:
        assert selection.backend == "openvino-cpu" and selection.skipped == ()
    finally:
        selection.runner.deactivate()


def test_auto_on_this_machine_serves_from_the_backend_its_cpu_facts_name(int8_package: Any, text_package: Path) -> None:
    graph, _ = backends.this_cpu_int8_graph()
    arch = backends.device_info().arch
    selection = select_runner(Package.open(text_package), "auto")  # a transformer
    try:
        expected = "openvino-cpu" if arch == "x86_64" and graph == "u8s8" else "onnxruntime-cpu"
        assert selection.backend == expected, f"{arch}, CPU int8 graph {graph}"
        assert selection.parity is not None and selection.parity.ok
    finally:
        selection.runner.deactivate()
    selection = select_runner(int8_package, "auto")  # an int8 CNN: where OpenVINO's int8 was measured faster
    try:
        assert selection.backend == expected and selection.graph == graph, f"{arch}, CPU int8 graph {graph}"
    finally:
        selection.runner.deactivate()
    selection = select_runner(int8_package, "auto", precision="fp32")  # its fp32 graph: onnxruntime everywhere
    try:
        assert selection.backend == "onnxruntime-cpu" and selection.graph == "fp32"
    finally:
        selection.runner.deactivate()


def test_the_batch_axis_is_compiled_bounded_with_and_without_a_cache(tmp_path: Path) -> None:
    model = builders.cnn_model(size=8).SerializeToString()
    for cache in (None, tmp_path / "ov"):
        with OpenVinoRunner(model, IMAGE_INPUT, LOGITS, threads=1, cache_dir=cache) as runner:
            batch = runner.compiled.inputs[0].get_partial_shape()[0]
            assert (batch.get_min_length(), batch.get_max_length()) == (1, DEFAULT_MAX_BATCH)
    fixed = builders.cnn_model(size=8)  # batch 2 fixed in the graph: nothing to bound, compiled as it says
    for value in (*fixed.graph.input, *fixed.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    with OpenVinoRunner(fixed.SerializeToString(), (TensorSpec("image", "float32", (2, 3, 8, 8)),),
                        (TensorSpec("logits", "float32", (2, 3)),), threads=1) as runner:
        assert runner.compiled.inputs[0].get_partial_shape().is_static
        assert runner.infer({"image": _images(2)})["logits"].shape == (2, 3)


def test_the_cached_ir_is_named_by_the_graph_content_and_rewritten_when_it_changed(tmp_path: Path) -> None:
    model = builders.cnn_model(size=8).SerializeToString()
    cache = tmp_path / "ov"
    with OpenVinoRunner(model, IMAGE_INPUT, LOGITS, threads=1, cache_dir=cache) as runner:
        want = runner.infer({"image": _images(2)})["logits"]
    files = sorted(p.name for p in (cache / "graphs").iterdir())
    stem = f"{hashlib.sha256(model).hexdigest()}.{IR_LAYOUT}"
    assert files == [f"{stem}.bin", f"{stem}.json", f"{stem}.xml"]  # no scratch folder left behind
    weights = cache / "graphs" / f"{stem}.bin"
    record = json.loads((cache / "graphs" / f"{stem}.json").read_text())
    assert record["bin"] == hashlib.sha256(weights.read_bytes()).hexdigest() and record["bounded"] is True
    good = weights.read_bytes()
    other = OpenVinoRunner(builders.cnn_model(size=8, seed=7).SerializeToString(), IMAGE_INPUT, LOGITS, threads=1,
                           cache_dir=tmp_path / "other")
    with other:
        pass
    [wrong] = (tmp_path / "other" / "graphs").glob("*.bin")
    weights.write_bytes(wrong.read_bytes())  # another model's weights under this name
    with OpenVinoRunner(model, IMAGE_INPUT, LOGITS, threads=1, cache_dir=cache) as runner:
        np.testing.assert_allclose(runner.infer({"image": _images(2)})["logits"], want, rtol=1e-5, atol=1e-6)
    assert weights.read_bytes() == good
    (cache / "graphs" / f"{stem}.json").write_text("{")  # a record cut short by a crash
    with OpenVinoRunner(model, IMAGE_INPUT, LOGITS, threads=1, cache_dir=cache) as runner:
        np.testing.assert_allclose(runner.infer({"image": _images(2)})["logits"], want, rtol=1e-5, atol=1e-6)
    assert json.loads((cache / "graphs" / f"{stem}.json").read_text())["bin"] == record["bin"]


@pytest.fixture(scope="module")
def anomaly_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PatchCore package on a small CNN with an int8 backbone: OpenVINO 2026.4 computes its head wrongly."""
    root = tmp_path_factory.mktemp("anomaly")
    parts = builders.write_parts(root / "parts", size=96)
    edge_sdk.convert(builders.save(builders.backbone_model(size=96), root / "backbone.onnx"), root / "p.edgepkg",
                     task="anomaly-detection", normal=parts / "good", validation=parts / "val", coreset_ratio=0.1,
                     preprocess={"resize": [96, 96], "mean": [127, 127, 127], "std": [64, 64, 64]},
                     quantize="int8", budget=None, report=False)
    return root / "p.edgepkg"


def test_an_int8_graph_openvino_gets_wrong_is_served_by_onnxruntime_int8_not_openvino_fp32(anomaly_int8: Path) -> None:
    package = Package.open(anomaly_int8)
    graph, _ = backends.this_cpu_int8_graph()
    selection = select_runner(package, "openvino-cpu,onnxruntime-cpu")
    try:
        assert selection.backend == "onnxruntime-cpu" and selection.precision_label == f"int8-{graph}"
        [skipped] = selection.skipped
        assert skipped.backend == f"openvino-cpu (int8-{graph})" and "failed the golden-vector check" in skipped.reason
    finally:
        selection.runner.deactivate()
    alone = select_runner(package, "openvino-cpu")  # nothing after it: it steps down to its own fp32
    try:
        assert alone.backend == "openvino-cpu" and alone.precision_label == "fp32"
    finally:
        alone.runner.deactivate()


def test_auto_leaves_int8_anomaly_packages_to_onnxruntime(anomaly_int8: Path) -> None:
    graph, _ = backends.this_cpu_int8_graph()
    selection = select_runner(Package.open(anomaly_int8), "auto")  # this machine, whatever its ISA
    try:
        assert selection.backend == "onnxruntime-cpu" and selection.precision_label == f"int8-{graph}"
        skipped = {s.backend: s.reason for s in selection.skipped}
        assert "openvino-cpu" in skipped
        if backends.device_info().arch == "x86_64" and graph == "u8s8":
            assert "anomaly models" in skipped["openvino-cpu"]
    finally:
        selection.runner.deactivate()
