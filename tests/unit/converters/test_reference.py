"""The exact int8 reference: Q/DQ semantics as the ONNX spec defines them, whatever the CPU's kernels do.

Checked against onnx's own ``ReferenceEvaluator`` (a pure-numpy implementation of the spec) on
one-layer graphs whose inputs span the whole quantized range, the case where x86 kernels without
VNNI saturate. Also checked: the graph each CPU family is given is computed exactly by
onnxruntime's fused kernels on this machine, whatever its ISA (the test prints which).
"""

from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import devices
from bench.int8_kernels import EXACT, FORMS, LAYERS, fused_error, probe_model
from converters.reference import fold_constant_dequantize, run_reference
from runtime.backends import this_cpu_int8_graph


def _spec(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    raised = onnx.ModelProto()
    raised.CopyFrom(model)
    raised.opset_import[0].version = 21  # ReferenceEvaluator's per-axis Q/DQ kernels
    return np.asarray(ReferenceEvaluator(raised).run(None, {"x": x})[0])


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_reference_computes_the_spec(kind: str, form: str) -> None:
    model, x = probe_model(kind, form)
    got, want = run_reference(model, [{"x": x}]), _spec(model, x)
    # float32 accumulation order may move a value across one output rounding boundary: one step at most
    step = float(np.abs(want).max()) / 127
    assert got.shape == want.shape and float(np.abs(got - want).max()) <= step * 1.01
    assert np.mean(got == want) >= 0.99


def test_folding_dequantize_is_bit_exact_per_channel() -> None:
    model, x = probe_model("conv3x3", "u8u8")
    folded = fold_constant_dequantize(model)
    assert sum(n.op_type == "DequantizeLinear" for n in folded.graph.node) == 2  # the activations: input, output
    weight = next(i for i in folded.graph.initializer if i.name == "wd")
    q = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "wq")).astype(np.int64)
    s = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "ws"))
    z = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "wz")).astype(np.int64)
    expected = ((q - z[:, None, None, None]).astype(np.float32) * s[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(weight), expected)


def test_the_graph_this_cpu_is_given_runs_exactly_on_its_fused_kernels() -> None:
    info = devices.detect()
    graph, reason = this_cpu_int8_graph()
    errors = {kind: fused_error(*probe_model(kind, graph)) for kind in LAYERS}
    print(f"ISA: {platform.machine()} {sorted(info.cpu_flags)} -> {graph} ({reason}); errors {errors}")
    assert all(e < EXACT for e in errors.values()), errors


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernels only")
def test_seven_bit_weights_are_exact_on_every_x86() -> None:
    errors = {kind: fused_error(*probe_model(kind, "u8s7")) for kind in LAYERS}
    assert all(e < EXACT for e in errors.values()), errors
