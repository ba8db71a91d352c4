"""Bias correction removes the mean output shift of int8 weight rounding.

For Gemm the correction is exact; for Conv the channel mean also counts border pixels that
fewer output windows see, so the shift shrinks by well over 90% rather than vanishing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from converters.bias_correction import ChannelMeans, correct_biases, input_axes
from converters.calibration.schemes import dequantize, per_channel_weight_params, quantize


def _model(op: str, group: int = 1, with_bias: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    if op == "Conv":
        w = rng.normal(0, 0.7, (6, 6 // group, 3, 3)).astype(np.float32)
        shape_in, shape_out = ["n", 6, 8, 8], ["n", 6, 6, 6]
        node = helper.make_node("Conv", ["x", "w", "b"] if with_bias else ["x", "w"], ["y"], group=group, name="layer")
    else:
        w = rng.normal(0, 0.7, (5, 6)).astype(np.float32)
        shape_in, shape_out = ["n", 6], ["n", 5]
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="layer")
    inits = [numpy_helper.from_array(w, "w")]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, w.shape[0]).astype(np.float32), "b"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _round_weights(model: onnx.ModelProto, axis: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w_init = next(i for i in out.graph.initializer if i.name == "w")
    w = numpy_helper.to_array(w_init)
    params = per_channel_weight_params(w, axis)
    w_init.CopyFrom(numpy_helper.from_array(dequantize(quantize(w, params), params).astype(np.float32), "w"))
    return out


def _mean_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return y.mean(axis=tuple(i for i in range(y.ndim) if i != 1))


def _check(model: onnx.ModelProto, x: np.ndarray, axis: int) -> None:
    means = ChannelMeans(input_axes(model, ["layer"]))
    means("x", x)
    corrected, names = correct_biases(model, ["layer"], means)
    assert names == ["layer"]
    reference = _mean_output(model, x)
    shifted = _mean_output(_round_weights(model, axis), x)
    fixed = _mean_output(_round_weights(corrected, axis), x)
    before, after = np.abs(shifted - reference), np.abs(fixed - reference)
    assert before.max() > 1e-3  # rounding really moved the mean
    assert after.max() <= 0.1 * before.max()
    if model.graph.node[0].op_type == "Gemm":
        np.testing.assert_allclose(fixed, reference, atol=1e-5)


def test_conv_and_depthwise_conv_means_are_restored() -> None:
    x = np.random.default_rng(1).uniform(0.5, 3.0, (16, 6, 8, 8)).astype(np.float32)  # ReLU-like, non-zero mean
    _check(_model("Conv"), x, axis=0)
    _check(_model("Conv", group=6), x, axis=0)


def test_conv_without_bias_gets_one() -> None:
    x = np.random.default_rng(2).uniform(0.0, 2.0, (8, 6, 8, 8)).astype(np.float32)
    model = _model("Conv", with_bias=False)
    _check(model, x, axis=0)


def test_gemm_mean_is_restored() -> None:
    x = np.random.default_rng(3).uniform(1.0, 2.0, (64, 6)).astype(np.float32)
    _check(_model("Gemm"), x, axis=0)


def test_layers_without_measured_means_are_left_alone() -> None:
    model = _model("Conv")
    corrected, names = correct_biases(model, ["layer"], ChannelMeans({}))
    assert names == [] and corrected.SerializeToString() == model.SerializeToString()
