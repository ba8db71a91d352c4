"""TensorRT explicit-quantization rules on tiny Q/DQ graphs that onnx.checker and onnxruntime accept."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.trt_rules import RULES, assert_trt_compatible, check_trt_qdq
from edge_sdk.errors import ConversionError

RNG = np.random.default_rng(7)


def _model(nodes: list[onnx.NodeProto], x_shape: list[int], y_shape: list[int], inits: dict[str, np.ndarray],
           opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _activation_qdq() -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x")]
    return nodes, {"x_scale": np.array(0.05, np.float32), "x_zp": np.array(0, np.int8)}


def _int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=reduce) / 127).astype(np.float32)
    shape = [-1 if i == axis else 1 for i in range(w.ndim)]
    return np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8), scale


def conv_model(op: str = "Conv", w_axis: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ (per-tensor) -> Conv(W = DQ(int8 initializer, per channel on w_axis))."""
    w = RNG.normal(size=(3, 2, 3, 3) if op == "Conv" else (2, 3, 3, 3)).astype(np.float32)
    w_q, w_scale = _int8_per_channel(w, w_axis)
    nodes, inits = _activation_qdq()
    nodes += [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w", axis=w_axis),
              helper.make_node(op, ["x_dq", "w_dq"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits |= {"w_q": w_q, "w_scale": w_scale, "w_zp": np.zeros(w_scale.size, np.int8)}
    return _model(nodes, [1, 2, 5, 5], [1, 3, 5, 5], inits)


def matmul_model(w_axis: int = 1, op: str = "MatMul", trans_b: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul/Gemm(W = Q/DQ of a float constant, per channel on w_axis)."""
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    _, w_scale = _int8_per_channel(w, w_axis)
    nodes, inits = _activation_qdq()
    nodes += [helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["w_q"], name="q_w", axis=w_axis),
              helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w", axis=w_axis),
              helper.make_node(op, ["x_dq", "w_dq"], ["y"], name="matmul")]
    if op == "Gemm":
        nodes[-1].attribute.append(helper.make_attribute("transB", trans_b))
    inits |= {"w": w, "w_scale": w_scale, "w_zp": np.zeros(w_scale.size, np.int8)}
    k, n = (3, 4) if trans_b else (4, 3)  # W is [4, 3]: [K, N], or [N, K] under transB
    return _model(nodes, [2, k], [2, n], inits)


def _found(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(v.node, v.rule) for v in check_trt_qdq(model)}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    inits = model.graph.initializer
    index = next(i for i, t in enumerate(inits) if t.name == name)
    inits[index].CopyFrom(numpy_helper.from_array(value, name))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0])


@pytest.mark.parametrize("build", [
    pytest.param(conv_model, id="conv-axis0"),
    pytest.param(lambda: conv_model("ConvTranspose"), id="convtranspose-axis0"),
    pytest.param(matmul_model, id="matmul-axis1"),
    pytest.param(lambda: matmul_model(0, "Gemm", trans_b=1), id="gemm-transB-axis0"),
])
def test_valid_graphs_pass_checker_run_on_cpu_and_are_accepted(build: Callable[[], onnx.ModelProto]) -> None:
    model = build()
    onnx.checker.check_model(model, full_check=True)
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    y = _run(model, RNG.uniform(-1, 1, x_shape).astype(np.float32))
    assert np.all(np.isfinite(y)) and y.size > 0
    assert check_trt_qdq(model) == []
    assert_trt_compatible(model)


def test_quantized_matmul_runs_close_to_float() -> None:
    model = matmul_model()
    x = RNG.uniform(-1, 1, (2, 4)).astype(np.float32)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    np.testing.assert_allclose(_run(model, x), x @ w, atol=0.1)


def test_uint8_zero_point_is_refused() -> None:
    model = conv_model()
    _set_init(model, "x_zp", np.array(0, np.uint8))
    assert {("q_x", "zero-point"), ("dq_x", "zero-point")} <= _found(model)


def test_nonzero_zero_point_is_refused() -> None:
    model = conv_model()
    _set_init(model, "x_zp", np.array(3, np.int8))
    assert ("q_x", "zero-point") in _found(model)


def test_missing_zero_point_means_uint8() -> None:
    model = conv_model()
    del _node(model, "q_x").input[2]
    messages = [v.message for v in check_trt_qdq(model) if (v.node, v.rule) == ("q_x", "zero-point")]
    assert messages and "uint8" in messages[0]


def test_missing_dequantize_zero_point_is_refused() -> None:
    model = conv_model()
    del _node(model, "dq_w").input[2]
    assert ("dq_w", "zero-point") in _found(model)


def test_per_channel_activation_is_refused() -> None:
    model = conv_model()
    _set_init(model, "x_scale", np.full(2, 0.05, np.float32))
    _set_init(model, "x_zp", np.zeros(2, np.int8))
    onnx.checker.check_model(model, full_check=True)
    assert ("dq_x", "axis") in _found(model)


def test_conv_weight_on_input_channel_axis_is_refused() -> None:
    model = conv_model(w_axis=1)
    onnx.checker.check_model(model, full_check=True)
    assert _found(model) == {("dq_w", "axis")}


def test_convtranspose_weight_on_output_channel_axis_is_refused() -> None:
    assert _found(conv_model("ConvTranspose", w_axis=1)) == {("dq_w", "axis")}


def test_matmul_weight_on_axis_0_is_refused() -> None:
    model = matmul_model(w_axis=0)
    onnx.checker.check_model(model, full_check=True)
    violations = check_trt_qdq(model)
    assert {(v.node, v.rule) for v in violations} == {("dq_w", "axis")}
    assert "expects axis 1" in violations[0].message


def test_gemm_axis_follows_trans_b() -> None:
    assert _found(matmul_model(1, "Gemm")) == set()
    assert _found(matmul_model(0, "Gemm")) == {("dq_w", "axis")}
    assert _found(matmul_model(1, "Gemm", trans_b=1)) == {("dq_w", "axis")}


def test_scale_count_must_match_channels() -> None:
    model = conv_model()
    _set_init(model, "w_scale", np.full(2, 0.01, np.float32))
    _set_init(model, "w_zp", np.zeros(2, np.int8))
    assert ("dq_w", "axis") in _found(model)


def test_run_time_scale_is_refused() -> None:
    model = conv_model()
    scale_node = helper.make_node("ReduceMax", ["x"], ["x_scale_rt"], name="amax", keepdims=0)
    model.graph.node.insert(0, scale_node)
    _node(model, "q_x").input[1] = "x_scale_rt"
    _node(model, "dq_x").input[1] = "x_scale_rt"
    assert {("q_x", "scale"), ("dq_x", "scale")} <= _found(model)


def test_constant_node_scale_is_accepted() -> None:
    model = conv_model()
    value = numpy_helper.from_array(np.array(0.05, np.float32))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["x_scale_c"], value=value))
    _node(model, "q_x").input[1] = "x_scale_c"
    _node(model, "dq_x").input[1] = "x_scale_c"
    assert check_trt_qdq(model) == []


def test_zero_scale_is_refused() -> None:
    model = conv_model()
    _set_init(model, "x_scale", np.array(0.0, np.float32))
    assert ("q_x", "scale") in _found(model)


def test_quantize_without_dequantize_is_refused() -> None:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="q_x"),
             helper.make_node("Cast", ["x_q"], ["y"], name="cast", to=TensorProto.FLOAT)]
    model = _model(nodes, [4], [4], {"s": np.array(0.1, np.float32), "z": np.array(0, np.int8)})
    assert _found(model) == {("q_x", "pair")}


def test_mismatched_dequantize_scale_is_refused() -> None:
    model = conv_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "x_scale_2"))
    _node(model, "dq_x").input[1] = "x_scale_2"
    assert _found(model) == {("q_x", "pair")}


def test_equal_scale_values_under_other_names_pair_up() -> None:
    model = conv_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32), "x_scale_copy"))
    _node(model, "dq_x").input[1] = "x_scale_copy"
    assert _found(model) == set()


def test_opset_12_is_refused() -> None:
    model = conv_model()
    model.opset_import[0].version = 12
    assert ("<model>", "opset") in _found(model)


def test_weight_from_uint8_constant_is_refused() -> None:
    model = conv_model()
    _set_init(model, "w_q", np.zeros((3, 2, 3, 3), np.uint8))
    _set_init(model, "w_zp", np.zeros(3, np.uint8))
    assert {("conv", "weight"), ("dq_w", "zero-point")} <= _found(model)


def test_weight_computed_at_run_time_is_refused() -> None:
    model = conv_model()
    model.graph.node.insert(0, helper.make_node("Identity", ["w_q"], ["w_q_rt"], name="copy"))
    _node(model, "dq_w").input[0] = "w_q_rt"
    assert ("conv", "weight") in _found(model)


def test_float_graph_has_nothing_to_report() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [4], [4], {}, opset=12)
    assert check_trt_qdq(model) == []


def test_assert_lists_every_violation() -> None:
    model = conv_model(w_axis=1)
    _set_init(model, "x_zp", np.array(3, np.int8))
    with pytest.raises(ConversionError) as info:
        assert_trt_compatible(model)
    text = str(info.value)
    assert "3 TensorRT explicit-quantization rule(s)" in text
    assert all(f"[{rule}] {node}:" in text for node, rule in [("q_x", "zero-point"), ("dq_x", "zero-point"),
                                                            ("dq_w", "axis")])


def test_every_reported_rule_is_documented() -> None:
    model = conv_model(w_axis=1)
    model.opset_import[0].version = 12
    _set_init(model, "x_zp", np.array(0, np.uint8))
    assert {rule for _, rule in _found(model)} <= set(RULES)
