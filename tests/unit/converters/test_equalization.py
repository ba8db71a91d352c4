"""Cross-layer equalization keeps the function and evens out per-channel weight ranges."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from converters.equalization import equalize, find_pairs
from tests import builders


def _chain(activation: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (4, 3, 3, 3)) * np.array([0.01, 1.0, 5.0, 0.2])[:, None, None, None]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 1, (4, 1, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32), "w3")]
    act = {"Relu": helper.make_node("Relu", ["c1"], ["a1"], name="act"),
           "Clip": helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act")}[activation]
    if activation == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="a"), act,
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=4, name="dw"),
             helper.make_node("Conv", ["c2", "w3"], ["y"], name="pw")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ranges(model: onnx.ModelProto, name: str) -> np.ndarray:
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def test_relu_chain_is_equalized_without_changing_the_output() -> None:
    model = _chain("Relu")
    x = np.random.default_rng(1).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    equalized, pairs, _ = equalize(model)
    assert pairs == [("a", "dw"), ("dw", "pw")]
    np.testing.assert_allclose(_run(equalized, x), _run(model, x), rtol=1e-4, atol=1e-5)
    spread = lambda r: r.max() / r.min()  # noqa: E731
    assert spread(_ranges(equalized, "w1")) < spread(_ranges(model, "w1")) / 10


def test_relu6_and_residual_links_are_skipped_with_reasons() -> None:
    pairs, skipped = find_pairs(_chain("Clip"))
    assert pairs == [("dw", "pw")] and "Clip (ReLU6)" in skipped["a"]
    pairs, skipped = find_pairs(builders.cnn_model())
    assert pairs == [("depthwise", "project")] and "residual" in skipped["stem"]
