"""Int8 quantization driven by histogram calibration: ranges, two Q/DQ graphs, sensitivity, mixed precision.

``calibrate`` histograms the tensors around the quantizable ops and picks a
range per tensor (symmetric for TensorRT, affine for the CPU). ``build_int8``
writes the S8S8 and U8S8 graphs. ``layer_sensitivity`` measures each layer's
output error when it alone is quantized, and ``mixed_precision`` returns the
most sensitive layers to float until a metric is within its budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.bias_correction import ChannelMeans, correct_biases, input_axes
from converters.equalization import equalize
from converters.calibration.collect import collect_histograms, tensors_around
from converters.calibration.histogram import TensorHistogram
from converters.calibration.methods import CalibrationMethod, TensorRange, choose_range
from converters.calibration.scales import ScaleFile, TensorScale, data_hash, graph_hash
from converters.calibration.schemes import Scheme, dequantize, per_channel_weight_params, quantize
from converters.qdq import Placement, Variant, plan_placement, write_qdq
from converters.smoothing import DEFAULT_ALPHA, smooth_model
from converters.trt_rules import assert_trt_compatible

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Metric = Callable[[onnx.ModelProto], float]


@dataclass(frozen=True)
class Calibration:
    """Histograms and the chosen ranges of every calibrated tensor."""

    histograms: dict[str, TensorHistogram]
    linear: dict[str, TensorRange]
    affine: dict[str, TensorRange]
    scales: ScaleFile
    seconds: float
    model: onnx.ModelProto  # the graph to quantize: the prepared one, biases corrected when asked
    prepared: onnx.ModelProto  # the fp32 graph after smoothing / equalization (same function)
    bias_corrected: tuple[str, ...] = ()
    smoothed: tuple[str, ...] = ()
    smoothing_alpha: float | None = None
    equalized: tuple[tuple[str, str], ...] = ()
    equalization_skipped: dict[str, str] = field(default_factory=dict)
    range_fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> why MSE replaced the method


@dataclass(frozen=True)
class Int8Graphs:
    s8s8: onnx.ModelProto
    u8s8: onnx.ModelProto
    float_nodes: dict[str, str] = field(default_factory=dict)  # node -> why it stayed float


def calibrate(
    model: onnx.ModelProto, batches: Sequence[Feeds], placement: Placement, method: CalibrationMethod, *,
    num_bins: int = 2048, progress: Callable[[int], None] | None = None, bias_correction: bool = True,
    mask: str | None = None,
) -> Calibration:
    """Histogram the tensors both variants quantize and choose their ranges with ``method``.

    With ``bias_correction`` the per-channel input means of Conv/Gemm layers are measured in
    the same pass and their biases absorb the int8 weight-rounding shift.
    """
    start = time.perf_counter()
    op_types = sorted({op for ops in placement.op_types.values() for op in ops})
    tensors = tensors_around(model, op_types)
    means = ChannelMeans(input_axes(model, placement.nodes) if bias_correction else {})
    hists = collect_histograms(model, batches, tensors, num_bins=num_bins, progress=progress, observe=means,
                               mask=mask)
    corrected_model, corrected = correct_biases(model, placement.nodes, means) if bias_correction else (model, [])
    fallbacks: dict[str, str] = {}
    linear = {n: _guarded_range(h, method, Scheme.LINEAR, fallbacks) for n, h in hists.items()}
    affine = {n: _guarded_range(h, method, Scheme.AFFINE, fallbacks) for n, h in hists.items()}
    scales = ScaleFile(
        tensors={n: _tensor_scale(hists[n], r) for n, r in linear.items()},
        calibration_hash=data_hash(batches), graph_hash=graph_hash(model.SerializeToString()),
        samples=sum(len(next(iter(b.values()))) for b in batches), method=method.value,
        created_by="edge-sdk converters",
    )
    return Calibration(hists, linear, affine, scales, time.perf_counter() - start, corrected_model, model,
                       tuple(corrected), range_fallbacks=fallbacks)


def prepare_int8(
    model: onnx.ModelProto, batches: Sequence[Feeds], method: CalibrationMethod, *,
    smoothing: float | None = DEFAULT_ALPHA, equalization: bool = True, bias_correction: bool = True,
    mask: str | None = None, progress: Callable[[int], None] | None = None,
) -> tuple[Calibration, Placement]:
    """Plan the placement; smooth transformer MatMul inputs (``smoothing`` = migration strength,
    None to skip) or equalize CNN conv pairs; then calibrate (with bias correction). The one
    entry point for ``convert`` and the benchmarks. ``mask`` names the attention-mask input of a
    text model, so that padding positions stay out of the statistics."""
    placement = plan_placement(model)
    smoothed: list[str] = []
    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    if smoothing is not None and placement.family == "transformer":
        model, smoothed = smooth_model(model, batches, placement.nodes, smoothing, mask=mask)
        placement = plan_placement(model)
    elif equalization and placement.family == "cnn":
        model, pairs, skipped = equalize(model)
    cal = calibrate(model, batches, placement, method, progress=progress, bias_correction=bias_correction,
                    mask=mask)
    return replace(cal, smoothed=tuple(smoothed), smoothing_alpha=smoothing if smoothed else None,
                   equalized=tuple(pairs), equalization_skipped=skipped), placement


#: An entropy or percentile range whose expected error exceeds the MSE-optimal range's by this
#: factor is replaced by the MSE range, and the replacement is reported. KL and percentile clip
#: hard where mass piles up at one end (ReLU6 outputs at 6, pooled features, LayerNorm outliers).
RANGE_ERROR_GUARD = 4.0


def _guarded_range(h: TensorHistogram, method: CalibrationMethod, scheme: Scheme, fallbacks: dict[str, str]) -> TensorRange:
    chosen = choose_range(h, method, scheme)
    if method not in (CalibrationMethod.ENTROPY, CalibrationMethod.PERCENTILE):
        return chosen
    mse = choose_range(h, CalibrationMethod.MSE, scheme)
    if chosen.error > RANGE_ERROR_GUARD * max(mse.error, 1e-30):
        fallbacks[f"{h.name} ({scheme.value})"] = (
            f"{method.value} range [{chosen.lo:.4g}, {chosen.hi:.4g}] has {chosen.error / max(mse.error, 1e-30):.0f}x "
            f"the quantization error of the MSE range [{mse.lo:.4g}, {mse.hi:.4g}]; MSE used")
        log.warning("%s: %s", h.name, fallbacks[f"{h.name} ({scheme.value})"])
        return mse
    return chosen


def _tensor_scale(h: TensorHistogram, r: TensorRange) -> TensorScale:
    summary = {"min": h.min, "max": h.max, "count": h.count, "nan_count": h.nan_count,
               "inf_count": h.inf_count, "bins": h.num_bins, "bound": h.bound}
    return TensorScale(name=h.name, amax=r.amax, method=r.method.value, scheme="linear", histogram=summary,
                       error=r.error)


def build_int8(calibration: Calibration, placement: Placement) -> Int8Graphs:
    """Write both Q/DQ graphs from one calibration; the S8S8 one must meet TensorRT's rules."""
    model = calibration.model
    s8 = write_qdq(model, {n: (r.lo, r.hi) for n, r in calibration.linear.items()}, Variant.S8S8, placement)
    assert_trt_compatible(s8)
    u8 = write_qdq(model, {n: (r.lo, r.hi) for n, r in calibration.affine.items()}, Variant.U8S8, placement)
    return Int8Graphs(s8, u8)


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 1
    return 0 if node.op_type == "Conv" else 1


def fake_quantize_node(model: onnx.ModelProto, node_name: str, act: TensorRange) -> onnx.ModelProto:
    """A copy of ``model`` where only ``node_name`` sees int8: Q/DQ on its input, int8-rounded weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == node_name)
    weights = {i.name: i for i in out.graph.initializer}
    w_init = weights[node.input[1]]
    w = numpy_helper.to_array(w_init)
    params = per_channel_weight_params(w, _weight_axis(node))
    w_init.CopyFrom(numpy_helper.from_array(dequantize(quantize(w, params), params).astype(w.dtype), w_init.name))
    scale, tag = np.float32(max(act.amax, 1e-30) / 127.0), f"{node_name}_sens"
    out.graph.initializer.extend([numpy_helper.from_array(np.array(scale), f"{tag}_scale"),
                                  numpy_helper.from_array(np.array(0, np.int8), f"{tag}_zp")])
    src = node.input[0]
    qdq = [helper.make_node("QuantizeLinear", [src, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"], name=f"{tag}_Q"),
           helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"],
                            name=f"{tag}_DQ")]
    node.input[0] = f"{tag}_dq"
    position = list(out.graph.node).index(node)
    for offset, q in enumerate(qdq):
        out.graph.node.insert(position + offset, q)
    return out


def _run(model: onnx.ModelProto, batches: Sequence[Feeds]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return np.concatenate([session.run([first], b)[0] for b in batches]).astype(np.float64)


def layer_sensitivity(
    model: onnx.ModelProto, batches: Sequence[Feeds], calibration: Calibration, placement: Placement,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Relative output error (MSE / output power) of each layer quantized alone, on a few batches."""
    reference = _run(model, batches)
    power = float(np.mean(reference**2)) or 1.0
    inputs = {n.name: n.input[0] for n in calibration.model.graph.node if n.input}
    result = {}
    for node in placement.nodes:
        act = calibration.linear.get(inputs[node])
        if act is None:
            continue
        quantized = _run(fake_quantize_node(calibration.model, node, act), batches)
        result[node] = float(np.mean((quantized - reference) ** 2)) / power
        if progress:
            progress(1)
    return result


def mixed_precision(
    calibration: Calibration, placement: Placement, sensitivity: dict[str, float],
    metric: Metric, baseline: float, budget: float,
) -> tuple[Int8Graphs, list[dict[str, Any]]]:
    """Return the most sensitive layers to float, doubling the count, until ``baseline - metric <= budget``.

    ``metric`` scores a U8S8 graph in points (accuracy or agreement, 0-100).
    """
    order = sorted(sensitivity, key=lambda n: sensitivity[n], reverse=True)
    steps: list[dict[str, Any]] = []
    kept = 0
    while True:
        floats = order[:kept]
        current = Placement(placement.family, tuple(n for n in placement.nodes if n not in floats),
                            placement.op_types)
        graphs = build_int8(calibration, current) if current.nodes else None
        score = metric(graphs.u8s8) if graphs else baseline
        steps.append({"float_layers": kept, "metric": score, "drop": baseline - score})
        log.info("mixed precision: %d layers in float -> metric %.2f (drop %.2f)", kept, score, baseline - score)
        if baseline - score <= budget or graphs is None:
            reasons = {n: f"mixed precision: sensitivity rank {i + 1} (error {sensitivity[n]:.2e})"
                       for i, n in enumerate(floats)}
            if graphs is None:
                raise_budget(budget, steps)
            return Int8Graphs(graphs.s8s8, graphs.u8s8, reasons), steps  # type: ignore[union-attr]
        kept = max(1, kept * 2)
        if kept >= len(order):
            kept = len(order)


def raise_budget(budget: float, steps: list[dict[str, Any]]) -> None:
    from edge_sdk.errors import CalibrationError

    raise CalibrationError(
        f"no int8 layer set stays within the accuracy budget of {budget} points (tried {len(steps)} steps)",
        hint="raise the budget, or convert without quantize='int8'")


__all__ = ["Calibration", "Int8Graphs", "build_int8", "calibrate", "layer_sensitivity", "mixed_precision",
           "plan_placement", "prepare_int8"]
