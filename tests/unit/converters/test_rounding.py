"""Layer-wise reconstruction of weight rounding: lower output error than nearest rounding, on the
int8 grid the Q/DQ writer reproduces, and input statistics that match the layer's real inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.rounding import _columns, _Layer, output_error, reconstruct

RNG = np.random.default_rng(0)


def _correlated(n: int, k: int) -> np.ndarray:
    base = RNG.standard_normal((n, k))
    return base + 0.8 * base[:, :1]  # one shared direction: rounding errors add up unless steered


@pytest.mark.parametrize("qmax", [127, 64])
def test_reconstruction_lowers_the_output_error_and_stays_on_the_grid(qmax: int) -> None:
    x = _correlated(4000, 48)
    h = x.T @ x / len(x)
    w = RNG.standard_normal((16, 48)).astype(np.float32)
    layer = _Layer("fc", "Gemm")
    scale = np.abs(w).max(1, keepdims=True) / qmax
    nearest = np.clip(np.rint(w / scale), -qmax, qmax) * scale
    rounded = reconstruct(w, layer, h, qmax)
    assert output_error(w, rounded, layer, h) < 0.8 * output_error(w, nearest, layer, h)
    levels = rounded / scale
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
    assert np.all(np.abs(np.rint(levels)) <= qmax) and np.all(np.abs(np.rint(levels)).max(1) == qmax)


def test_depthwise_reconstruction_uses_one_statistic_per_channel() -> None:
    w = RNG.standard_normal((6, 1, 3, 3)).astype(np.float32)
    x = np.stack([_correlated(2000, 9) for _ in range(6)])
    h = np.matmul(x.transpose(0, 2, 1), x) / 2000
    layer = _Layer("dw", "Conv", (3, 3), depthwise=True)
    scale = np.abs(w.reshape(6, -1)).max(1) / 127
    nearest = (np.clip(np.rint(w.reshape(6, -1) / scale[:, None]), -127, 127) * scale[:, None]).reshape(w.shape)
    rounded = reconstruct(w, layer, h, 127)
    assert rounded.shape == w.shape
    assert output_error(w, rounded, layer, h) < output_error(w, nearest, layer, h)


def test_convolution_columns_reproduce_the_convolution() -> None:
    x = RNG.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = RNG.standard_normal((5, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cols = _columns(_Layer("c", "Conv", (3, 3), (2, 2), (1, 1, 1, 1)), x, np.random.default_rng(0))
    got = cols @ w.reshape(5, -1).T  # every position: 2 * 5 * 5 = 50 < the sampling cap
    want = y.transpose(0, 2, 3, 1).reshape(-1, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
