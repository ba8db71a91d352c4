"""Cross-layer equalization keeps the function and evens out per-channel weight ranges."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import pytest

from converters.equalization import BOUND, channel_maxima, equalize, find_clip_pairs, find_pairs, strip_bounds
from converters.qdq import Placement, Variant, plan_placement, write_qdq
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


def test_relu6_and_residual_links_are_skipped_with_reasons_without_calibration_data() -> None:
    pairs, skipped = find_pairs(_chain("Clip"))
    assert pairs == [("dw", "pw")] and "Clip (ReLU6)" in skipped["a"]
    assert [(p.a, p.b, p.hi) for p in find_clip_pairs(_chain("Clip"))] == [("a", "dw", 6.0)]
    _, pairs, skipped = equalize(_chain("Clip"))
    assert pairs == [("dw", "pw")] and "calibration data" in skipped["a"]
    pairs, skipped = find_pairs(builders.cnn_model())
    assert pairs == [("depthwise", "project")] and "residual" in skipped["stem"]


def _relu6_chain() -> onnx.ModelProto:
    """a -> ReLU6 -> depthwise -> ReLU6 -> pointwise, with channel ranges far apart."""
    model = _chain("Clip")
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 1, (4, 3, 3, 3)) * np.array([0.005, 0.05, 0.15, 0.015])[:, None, None, None]
    for init in model.graph.initializer:
        if init.name in ("w1", "b1"):
            init.CopyFrom(numpy_helper.from_array(
                (w1 if init.name == "w1" else np.full(4, 0.01)).astype(np.float32), init.name))
    nodes = list(model.graph.node)
    nodes[2].output[0] = "d2"
    nodes.insert(3, helper.make_node("Clip", ["d2", "lo", "hi"], ["c2"], name="act2"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _inputs(scale: float, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": (rng.normal(0, 1, (1, 3, 8, 8)) * scale).astype(np.float32)} for _ in range(n)]


def test_relu6_pairs_are_equalized_from_calibration_data_keeping_the_function() -> None:
    model, calib = _relu6_chain(), _inputs(1.0)
    equalized, pairs, skipped = equalize(model, calib)
    assert pairs == [("a", "dw"), ("dw", "pw")] and not skipped
    # the same function, also far outside the calibration range where ReLU6 clips hard
    for feeds in calib + _inputs(40.0):
        np.testing.assert_allclose(_run(equalized, feeds["x"]), _run(model, feeds["x"]), rtol=1e-4, atol=1e-4)
    clipped = [n for n in equalized.graph.node if n.name.startswith(BOUND)]
    assert [n.op_type for n in clipped] == ["Relu", "Min", "Relu", "Min"]
    before, after = (channel_maxima(m, calib, ["a1"])["a1"] for m in (model, equalized))
    assert before.max() / before.min() > 20
    np.testing.assert_allclose(after, after.max(), rtol=1e-5)  # before a depthwise conv: every channel at full range
    assert after.max() == pytest.approx(before.max(), rel=1e-5)


def test_int8_graphs_drop_the_bounds_only_where_the_quantizer_saturates_within_them() -> None:
    from converters.reference import run_reference

    from converters.calibration.methods import CalibrationMethod
    from converters.quantize import calibrate

    model, calib = _relu6_chain(), _inputs(1.0)
    equalized, _, _ = equalize(model, calib)
    placement = plan_placement(equalized)
    cal = calibrate(equalized, calib, placement, CalibrationMethod.MINMAX, bias_correction=False)
    ranges = {n: (r.lo, r.hi) for n, r in cal.affine.items()}
    stripped = strip_bounds(equalized, ranges, {"a", "dw", "pw"})
    assert not [n for n in stripped.graph.node if n.op_type == "Min"]
    assert [n.op_type for n in stripped.graph.node] == ["Conv", "Relu", "Conv", "Relu", "Conv"]
    for variant in (Variant.S8S8, Variant.U8S8):
        ranges = {n: (r.lo, r.hi) for n, r in (cal.linear if variant is Variant.S8S8 else cal.affine).items()}
        kept = _qdq_without_stripping(equalized, ranges, variant, placement)
        written = write_qdq(equalized, ranges, variant, placement)
        assert not [n for n in written.graph.node if n.op_type == "Min"]
        for feeds in _inputs(1.0) + _inputs(40.0):  # the quantizer's saturation is the bound, even far out
            np.testing.assert_allclose(run_reference(written, [feeds]), run_reference(kept, [feeds]), atol=1e-5)
    # a bound read by a float layer, or one the int8 range would exceed, stays
    ranges = {n: (r.lo, r.hi) for n, r in cal.affine.items()}
    assert len([n for n in strip_bounds(equalized, ranges, {"a", "pw"}).graph.node if n.op_type == "Min"]) == 1
    wide = {**ranges, "a1": (0.0, 1e6)}
    assert len([n for n in strip_bounds(equalized, wide, {"a", "dw", "pw"}).graph.node if n.op_type == "Min"]) == 1


def _qdq_without_stripping(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], variant: Variant,
                           placement: Placement) -> onnx.ModelProto:
    from converters import qdq

    return qdq._quantize(model, ranges, variant, placement, reduce_range=False)


def test_prepare_int8_can_leave_the_relu6_pairs_unequalized_and_says_so() -> None:
    from converters.calibration.methods import CalibrationMethod
    from converters.quantize import prepare_int8

    model, calib = _relu6_chain(), _inputs(1.0)
    on, _ = prepare_int8(model, calib, CalibrationMethod.MSE)
    off, _ = prepare_int8(model, calib, CalibrationMethod.MSE, relu6=False)
    assert on.equalized == (("a", "dw"), ("dw", "pw")) and any(n.name.startswith(BOUND) for n in on.model.graph.node)
    assert off.equalized == () and not any(n.name.startswith(BOUND) for n in off.model.graph.node)
    assert off.equalization_skipped["a"] == "followed by Clip (ReLU6): ReLU6 equalization off"
    for feeds in calib:  # both prepared graphs compute the model's function
        np.testing.assert_allclose(_run(off.model, feeds["x"]), _run(model, feeds["x"]), rtol=1e-5, atol=1e-6)


def test_the_preparation_is_chosen_by_budget_then_float_layers_then_metric() -> None:
    from converters.quantize import Variant
    from converters.stages.int8 import _preference, _VariantResult

    def graphs(*fits: tuple[float, int]) -> dict[Variant, _VariantResult]:
        return {v: _VariantResult(None, {f"n{i}": "" for i in range(floats)}, {}, [], metric, {})  # type: ignore[arg-type]
                for v, (metric, floats) in zip(Variant, fits)}

    over = graphs((91.3, 0), (90.0, 0), (91.3, 0))  # one graph 1.3 points under a 91.3 baseline
    within_slow = graphs((91.3, 4), (91.3, 0), (91.3, 4))
    within_fast = graphs((91.0, 0), (91.0, 1), (91.3, 0))
    ranked = sorted([over, within_slow, within_fast], key=lambda r: _preference(r, 91.3, 0.5), reverse=True)
    assert ranked == [within_fast, within_slow, over]
    assert _preference(over, 91.3, None)[0]  # no budget: every preparation is within it


def test_each_int8_graph_comes_from_the_preparation_that_ranks_best_for_it() -> None:
    from converters.quantize import Variant
    from converters.stages.int8 import _graph_sources, _VariantResult

    def result(metric: float, floats: int) -> _VariantResult:
        return _VariantResult(None, {f"n{i}": "" for i in range(floats)}, {}, [], metric, {})  # type: ignore[arg-type]

    # as measured on the demo CNN (x86-64 VNNI): equalized, the CPU graphs need 46 float layers and the
    # TensorRT graph none; unequalized, the CPU graphs need 0 / 4 and the TensorRT graph 33
    fits = {True: {Variant.U8S8: result(91.33, 46), Variant.U8S7: result(91.33, 46), Variant.S8S8: result(91.33, 0)},
            False: {Variant.U8S8: result(91.33, 0), Variant.U8S7: result(91.33, 4), Variant.S8S8: result(91.33, 33)}}
    assert _graph_sources(fits, False, 91.33, 0.5) == {Variant.U8S8: False, Variant.U8S7: False, Variant.S8S8: True}
    # within the budget first: a faster graph over the budget loses to a slower one within it
    fits[True][Variant.S8S8] = result(90.0, 0)
    assert _graph_sources(fits, False, 91.33, 0.5)[Variant.S8S8] is False
    # a tie keeps the package's own preparation
    tie = {k: {v: result(91.33, 2) for v in Variant} for k in (True, False)}
    assert set(_graph_sources(tie, True, 91.33, 0.5).values()) == {True}
    assert set(_graph_sources(tie, False, 91.33, 0.5).values()) == {False}
