"""converters.canonical on small hand-built graphs: each rewrite, the check, and when a graph is kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import canonical
from converters.canonical import canonicalize

RNG = np.random.default_rng(0)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _conv_bn_graph() -> onnx.ModelProto:
    """Constant-node weights, a Pad computed from the input's Shape, BatchNorm, Dropout, Identity, ReduceMean."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 1, 1])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["h"], axis=0),  # static axis of a dynamic-batch tensor
        helper.make_node("Sub", ["h", "seven"], ["pad1"]),  # 8 - 7 = 1
        helper.make_node("Concat", ["zeros4", "pad1", "pad1", "zeros2", "pad1", "pad1"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads", ""], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Dropout", ["bn"], ["d"]),
        helper.make_node("Identity", ["d"], ["i"]),
        helper.make_node("ReduceMean", ["i"], ["y"], axes=[2, 3], keepdims=1),
    ]
    ints = {"two": np.array(2, np.int64), "seven": np.array([7], np.int64), "zeros4": np.zeros(2, np.int64),
            "zeros2": np.zeros(2, np.int64)}
    floats = {"g": RNG.uniform(0.5, 1.5, 4), "b": RNG.standard_normal(4), "m": RNG.standard_normal(4),
              "v": RNG.uniform(0.5, 1.5, 4)}
    inits = [numpy_helper.from_array(v, k) for k, v in ints.items()]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in floats.items()]
    return _model(nodes, [x], [y], inits)


def test_constants_shape_reads_pad_batchnorm_dropout_identity_and_means_are_rewritten() -> None:
    model = _conv_bn_graph()
    feeds = {"x": RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    out, report = canonicalize(model, [feeds])
    assert _ops(out) == ["Conv", "GlobalAveragePool"]
    np.testing.assert_allclose(_run(out, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)
    assert [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 8, 8]
    assert report["nodes_before"] == 11 and report["nodes_after"] == 2 and report["checked_on"] == 1
    assert report["rewritten"]["Constant"] == [1, 0] and report["rewritten"]["BatchNormalization"] == [1, 0]
    assert report["max_diff"] <= canonical.TOLERANCE and "basic graph optimizations" in report["by"]
    assert [o.domain for o in out.opset_import] == [""]  # onnxruntime's own domains are not left behind


def _layer_norm_graph(opset: int) -> onnx.ModelProto:
    """LayerNorm over the last axis spelt in primitives, as exporters write it before opset 17."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(RNG.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "beta")]
    return _model(nodes, [x], [y], inits, opset)


@pytest.mark.parametrize("opset", [13, 17])
def test_a_primitive_layer_norm_becomes_one_layernormalization(opset: int) -> None:
    model = _layer_norm_graph(opset)
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    out, report = canonicalize(model, [feeds])
    assert _ops(out) == ["LayerNormalization"]
    np.testing.assert_allclose(_run(out, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)
    assert report.get("opset") == ([13, 17] if opset == 13 else None)


def test_a_graph_already_canonical_is_returned_as_is() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    model = _model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [x], [y],
                   [numpy_helper.from_array(RNG.standard_normal((2, 4)).astype(np.float32), "w")])
    out, report = canonicalize(model, [{"x": np.ones((1, 4), np.float32)}])
    assert out is model and report["rewritten"] == {} and report["nodes_after"] == 1


def test_a_graph_onnxruntime_cannot_load_is_kept_with_the_reason() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Fancy", ["x"], ["y"], domain="vendor.custom")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vendor.custom", 1)])
    out, report = canonicalize(model, [])
    assert out is model and report["kept"].startswith("onnxruntime could not load the graph")


def test_a_rewrite_that_changes_the_function_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is real: a rewritten graph computing something else is not what the package carries."""
    model = _conv_bn_graph()
    original = canonical._optimized

    def wrong(proto: onnx.ModelProto) -> onnx.ModelProto:
        out = original(proto)
        for init in out.graph.initializer:
            if len(init.dims) == 4:  # the folded Conv weight
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return out

    monkeypatch.setattr(canonical, "_optimized", wrong)
    out, report = canonicalize(model, [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}])
    assert out is model and report["kept"].startswith("the rewritten graph differs by")
