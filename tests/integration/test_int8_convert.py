"""int8 conversion of small CNN and transformer graphs built here, checked for fidelity to fp32.

Stated fidelity (random weights, random data): every int8 graph, computed by the exact reference
(the same on every CPU), keeps a mean logits cosine >= 0.99 to fp32 on held-out inputs and top-1
agreement >= 90%; the graph this CPU serves is checked through ``edge_sdk.load``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edge_sdk
from converters.calibration.scales import ScaleFile, parse_trt_cache
from converters.reference import run_reference
from converters.trt_rules import check_trt_qdq
from runtime.backends import this_cpu_int8_graph
from runtime.package import Package
from tests import builders


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _exact(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return run_reference(onnx.load_from_string(model_bytes), [feeds])


@pytest.fixture
def cnn_int8(tmp_path: Path) -> tuple[Path, Path]:
    onnx.save(builders.cnn_model(), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(3)
    np.save(tmp_path / "calib.npy", rng.random((64, 3, 16, 16), dtype=np.float32) * 2 - 1)
    pre = {"resize": [16, 16], "mean": [127, 127, 127], "std": [128, 128, 128]}
    edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "cnn.edgepkg", task="image-classification",
                     labels=builders.COLOR_LABELS, preprocess=pre, calibration=tmp_path / "calib.npy",
                     quantize="int8", method="entropy", budget=None)
    return tmp_path / "cnn.edgepkg", tmp_path / "cnn.onnx"


def test_cnn_int8_package_keeps_fidelity_and_carries_both_graphs(cnn_int8: tuple[Path, Path]) -> None:
    pkg_path, fp32_path = cnn_int8
    package = Package.open(pkg_path)
    m = package.manifest
    assert m.precision == "int8" and set(m.graphs) == {"u8s8", "u8s7", "s8s8"}
    s8 = onnx.load_from_string(package.read_bytes(m.graphs["s8s8"]))
    u8 = onnx.load_from_string(package.read_bytes(m.graphs["u8s8"]))
    assert check_trt_qdq(s8) == []
    zero_points = [i for i in u8.graph.initializer if i.name.endswith("zero_point") and i.data_type == onnx.TensorProto.UINT8]
    assert zero_points, "the CPU graph uses uint8 activations"
    x = {"image": np.random.default_rng(99).random((32, 3, 16, 16), dtype=np.float32) * 2 - 1}
    ref = _run(fp32_path.read_bytes(), x)
    for graph in (u8, s8):
        out = _exact(graph.SerializeToString(), x)
        assert _cosine(ref, out) >= 0.99
        assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.9
    report = m.reports["int8"]
    assert report["method"] == "entropy" and report["samples"] == 64
    assert {l["node"] for l in report["layers"]} == {"stem", "depthwise", "project", "head"}
    assert all(l["sensitivity"] is not None and l["sensitivity"] >= 0 for l in report["layers"])


def test_scale_file_renders_a_trt_cache(cnn_int8: tuple[Path, Path]) -> None:
    pkg_path, fp32_path = cnn_int8
    package = Package.open(pkg_path)
    scales = ScaleFile.from_json(package.read_bytes("scales.json").decode())
    assert scales.graph_hash  # tied to the graph it was made for
    header, table = parse_trt_cache(scales.to_trt_cache("8.5.2"))
    assert header == "TRT-8502-EntropyCalibration2"
    assert "image" in table and table["image"] == pytest.approx(scales.tensors["image"].amax / 127, rel=1e-6)


def test_loading_picks_int8_on_cpu_unless_fp32_is_asked(cnn_int8: tuple[Path, Path]) -> None:
    pkg_path, _ = cnn_int8
    image = np.random.default_rng(5).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    with edge_sdk.load(pkg_path) as int8, edge_sdk.load(pkg_path, precision="fp32") as fp32:
        graph, _ = this_cpu_int8_graph()
        assert int8.info["graph"] == graph and fp32.info["graph"] == "fp32"
        a, b = int8.predict(image), fp32.predict(image)
        assert a.precision == f"int8-{graph}" and b.precision == "fp32"
        assert a.scores.keys() == b.scores.keys()


def test_transformer_int8_quantizes_projections_and_attention(tmp_path: Path, tokenizer_file: Path) -> None:
    onnx.save(builders.transformer_model(), tmp_path / "enc.onnx")
    words = builders.VOCAB[4:]
    rng = np.random.default_rng(4)
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 9))) for _ in range(96)]
    (tmp_path / "calib.txt").write_text("\n".join(texts[:64]))
    report = edge_sdk.convert(tmp_path / "enc.onnx", tmp_path / "enc.edgepkg", task="text-classification",
                              labels=builders.TEXT_LABELS, tokenizer=tokenizer_file, calibration=tmp_path / "calib.txt",
                              quantize="int8", budget=None, max_length=16)
    assert report.int8 is not None and report.int8["family"] == "transformer"
    projections = {"mm_q", "mm_k", "mm_v", "mm_o", "mm_f1", "mm_f2", "mm_logits"}
    layers = {l["node"]: l["precision"] for l in report.int8["layers"]}
    assert set(layers) == projections | {"mm_scores", "mm_ctx"}
    assert report.int8["attention_layers"] == ["mm_scores", "mm_ctx"]
    for node in ("mm_scores", "mm_ctx"):  # int8 where the kernels are exact, float for x86 without VNNI
        assert layers[node] == {"u8s8": "int8", "s8s8": "int8", "u8s7": "fp32"}
    package = Package.open(tmp_path / "enc.edgepkg")
    graphs = {v: onnx.load_from_string(package.read_bytes(package.manifest.graphs[v])) for v in ("u8s8", "s8s8", "u8s7")}
    for variant, graph in graphs.items():
        nodes = {n.name: n for n in graph.graph.node}
        writers = {o: n for n in graph.graph.node for o in n.output}
        inits = {i.name: i for i in graph.graph.initializer}
        for node in ("mm_scores", "mm_ctx"):
            feeding = [writers.get(i) for i in nodes[node].input]
            if variant == "u8s7":
                assert not any(w is not None and w.op_type == "DequantizeLinear" for w in feeding)
                continue
            assert [w.op_type for w in feeding] == ["DequantizeLinear", "DequantizeLinear"]  # type: ignore[union-attr]
            for dq in feeding:  # symmetric int8: zero point 0
                zero = onnx.numpy_helper.to_array(inits[dq.input[2]])  # type: ignore[union-attr]
                assert zero.dtype == np.int8 and int(zero) == 0
        softmax_in = writers.get(nodes["softmax"].input[0])
        assert softmax_in is None or softmax_in.op_type != "DequantizeLinear"  # softmax stays float
    assert not check_trt_qdq(graphs["s8s8"])
    per_graph = report.int8["per_graph"]
    assert per_graph["u8s8"]["mean_cosine"] >= 0.99 and per_graph["s8s8"]["mean_cosine"] >= 0.99  # exact reference
    with edge_sdk.load(tmp_path / "enc.edgepkg") as int8, edge_sdk.load(tmp_path / "enc.edgepkg", precision="fp32") as fp32:
        a = np.array([list(p.scores.values()) for p in int8.predict_batch(texts[64:])])
        b = np.array([list(p.scores.values()) for p in fp32.predict_batch(texts[64:])])
    assert _cosine(a, b) >= 0.98 and np.mean(a.argmax(1) == b.argmax(1)) >= 0.9  # the graph this CPU serves


def test_budget_returns_sensitive_layers_to_float(tmp_path: Path, image_folder: Path) -> None:
    onnx.save(builders.cnn_model(size=8), tmp_path / "cnn.onnx")
    report = edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "p.edgepkg", task="image-classification",
                              labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(),
                              calibration=image_folder, validation=image_folder, quantize="int8", budget=0.0)
    int8 = report.int8
    assert int8 is not None and int8["metric_fp32"] - int8["metric_int8"] <= 0.0
    chosen = [s for s in int8["mixed_precision_steps"] if s["float_layers"] == len(int8["float_layers"])]
    assert chosen and chosen[-1]["drop"] <= 0.0
    for node, reason in int8["float_layers"].items():
        assert reason.startswith("mixed precision: sensitivity rank")
    with zipfile.ZipFile(tmp_path / "p.edgepkg") as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["reports"]["int8"]["float_layers"] == int8["float_layers"]


def test_smoothing_keeps_the_fp32_function_and_the_residual_paths(tmp_path: Path, tokenizer_file: Path) -> None:
    from converters.ir import name_nodes
    from converters.qdq import plan_placement
    from converters.smoothing import smooth_model

    model = name_nodes(builders.transformer_model())
    ids = np.array([[2, 4, 5, 13, 14, 3], [2, 7, 8, 3, 0, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    smoothed, names = smooth_model(model, [feeds], plan_placement(model).nodes, alpha=1.0)
    assert set(names) == {"mm_q", "mm_k", "mm_v", "mm_o", "mm_f1", "mm_f2", "mm_logits"}
    np.testing.assert_allclose(_run(smoothed.SerializeToString(), feeds), _run(model.SerializeToString(), feeds),
                               rtol=1e-4, atol=1e-5)
    muls = [n for n in smoothed.graph.node if n.name.endswith("_smooth_Mul")]
    assert len(muls) == 5  # h0 (shared by q, k, v), ctx, h1, g, pooled
    consumers_of_h0 = [n.name for n in smoothed.graph.node if "h0" in n.input]
    assert consumers_of_h0 == ["h0_smooth_Mul"]
    consumers_of_x1 = {n.name for n in smoothed.graph.node if "x1" in n.input}
    assert "res2" in consumers_of_x1  # residual paths keep the unsmoothed tensor


def test_unsmoothed_transformer_keeps_float_readers_on_float_tensors(tmp_path: Path, tokenizer_file: Path) -> None:
    onnx.save(builders.transformer_model(post_ln=True), tmp_path / "enc.onnx")  # h0 feeds q/k/v and res1
    (tmp_path / "calib.txt").write_text("bearing noise\noil leak at the pump\nthe pump is hot\ngrinding oil drip\n")
    edge_sdk.convert(tmp_path / "enc.onnx", tmp_path / "enc.edgepkg", task="text-classification",
                     labels=builders.TEXT_LABELS, tokenizer=tokenizer_file, calibration=tmp_path / "calib.txt",
                     quantize="int8", budget=None, smoothing=None)
    package = Package.open(tmp_path / "enc.edgepkg")
    for variant in ("u8s8", "u8s7", "s8s8"):
        graph = onnx.load_from_string(package.read_bytes(package.manifest.graphs[variant])).graph
        dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        readers = {n.name for n in graph.node for i in n.input if i in dq_outputs}
        attention = set() if variant == "u8s7" else {"mm_scores", "mm_ctx"}  # int8 attention where it is exact
        assert readers == {"mm_q", "mm_k", "mm_v", "mm_o", "mm_f1", "mm_f2", "mm_logits"} | attention, variant
        nodes = {n.name: n for n in graph.node}
        assert list(nodes["res1"].input) == ["h0", "o"] and list(nodes["res2"].input) == ["h1", "f2"]
