"""converters.ir: the one graph index and the edits every pass shares, on real graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import ir
from edge_sdk.errors import InternalError, PruningError
from tests import builders


def _residual() -> onnx.ModelProto:
    """y = x + relu(x @ W) * 2, with a dead branch and a Constant behind an Identity."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["two_c"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Identity", ["two_c"], ["two"], name="id"),
        helper.make_node("Mul", ["r", "two"], ["f"], name="scale"),
        helper.make_node("Add", ["x", "f"], ["y"], name="add"),
        helper.make_node("Neg", ["x"], ["unused"], name="dead"),
    ]
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_index_knows_writers_readers_constants_and_shapes() -> None:
    g = ir.Graph(_residual())
    assert g.writers["f"].name == "scale"
    assert [n.name for n in g.readers["x"]] == ["mm", "add", "dead"]
    assert g.reads("x") == [(g.by_key["mm"], 0), (g.by_key["add"], 0), (g.by_key["dead"], 0)]
    assert g.inputs == {"x"} and g.outputs == {"y"}
    assert "W" in g.constants and "two_c" in g.constants and "h" not in g.constants
    assert float(g.const("two")) == 2.0  # through the Identity
    assert g.const("two", identity=False) is None  # TensorRT's rules: an Identity is computed at run time
    assert g.is_scalar("two") and not g.is_scalar("W")
    assert g.matmul_weight(g.by_key["mm"]) is g.inits["W"]
    assert g.shapes["h"] == (2, 4) and g.dims("y") == (2, 4)
    assert g.family == "cnn" and ir.family(builders.transformer_model()) == "transformer"


def test_nodes_keep_their_identity_so_passes_may_key_on_it() -> None:
    model = _residual()
    g = ir.Graph(model)
    assert all(g.order[id(n)] == i for i, n in enumerate(g.nodes))
    g.by_key["scale"].input[1] = "two_c"  # an edit through the index lands in the model
    assert model.graph.node[4].input[1] == "two_c"


def test_bypass_redirects_reads_and_drops_what_died_without_touching_the_input() -> None:
    model = _residual()
    out = ir.bypass(model, {"y": "x"} | {"f": "x"})
    assert [n.name for n in out.graph.node] == ["add"]  # x + x: the branch and the dead Neg are gone
    assert list(out.graph.node[0].input) == ["x", "x"]
    assert not out.graph.initializer  # W was read only by the branch
    assert len(model.graph.node) == 7  # passes never edit their input


def test_drop_dead_counts_and_keeps_initializers_listed_as_inputs() -> None:
    model = _residual()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4]))
    model.graph.node[0].input[1] = "x"  # nothing reads W any more, but it is a graph input (IR < 4 style)
    assert ir.drop_dead(model) == 1  # the Neg
    assert [i.name for i in model.graph.initializer] == ["W"]


def test_probe_returns_intermediate_tensors_and_graph_inputs() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    [(feeds, values)] = list(ir.probe(_residual(), [{"x": x}], ["r", "x", "f"]))
    assert np.array_equal(values["r"], np.maximum(x, 0)) and np.array_equal(values["f"], 2 * np.maximum(x, 0))
    assert np.array_equal(values["x"], x) and feeds["x"] is x
    assert np.allclose(ir.outputs_on(_residual(), [{"x": x}])[0], x + 2 * np.maximum(x, 0))


def test_probe_names_the_batch_that_does_not_run() -> None:
    bad = {"x": np.zeros((2, 5), np.float32)}
    with pytest.raises(PruningError, match="calibration batch 1 does not run"):
        list(ir.probe(_residual(), [{"x": np.zeros((2, 4), np.float32)}, bad], ["r"], error=PruningError))


def test_check_calls_an_invalid_result_a_bug() -> None:
    model = _residual()
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(InternalError, match="pruned model fails onnx.checker"):
        ir.check(model, "pruned")


def test_name_nodes_names_every_node_once() -> None:
    model = _residual()
    model.graph.node[2].name = ""
    named = ir.name_nodes(model)
    names = [n.name for n in named.graph.node]
    assert all(names) and len(set(names)) == len(names) and model.graph.node[2].name == ""
