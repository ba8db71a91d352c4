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

from converters import ir
from converters.bias_correction import ChannelMeans, correct_biases, input_axes, input_nodes
from converters.equalization import equalize
from converters.calibration.collect import collect_histograms, tensors_around
from converters.calibration.histogram import TensorHistogram
from converters.calibration.methods import CalibrationMethod, TensorRange, choose_range
from converters.calibration.scales import ScaleFile, TensorScale, data_hash, graph_hash
from converters.calibration.schemes import (Scheme, affine_scale_zero_point, dequantize,
                                              per_channel_weight_params, quantize)
from converters.qdq import Placement, Variant, plan_placement, quantize_attention, weight_max, write_qdq
from converters.reference import run_reference
from converters.rounding import InputStatistics, layer_of, reconstruct, statistics_for
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
    model: onnx.ModelProto  # the graph to quantize: the fp32 graph after smoothing / equalization
    prepared: onnx.ModelProto  # the same graph (kept under this name for the package's model.onnx)
    means: ChannelMeans | None = None  # per-channel input means of Conv/Gemm layers, for bias correction
    original: onnx.ModelProto | None = None  # the graph before smoothing / equalization: every layer in float
    statistics: InputStatistics | None = None  # per-layer input statistics for reconstructed rounding
    rounded: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (node, qmax) -> weights, cached
    bias_corrected: tuple[str, ...] = ()
    smoothed: tuple[str, ...] = ()
    smoothing_alpha: float | None = None
    equalized: tuple[tuple[str, str], ...] = ()
    equalization_skipped: dict[str, str] = field(default_factory=dict)
    range_fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> why MSE replaced the method


@dataclass(frozen=True)
class Int8Graphs:
    """One Q/DQ graph per variant, and per variant the layers that stayed float (node -> why)."""

    graphs: dict[Variant, onnx.ModelProto]
    float_nodes: dict[Variant, dict[str, str]] = field(default_factory=dict)

    @property
    def s8s8(self) -> onnx.ModelProto:
        return self.graphs[Variant.S8S8]

    @property
    def u8s8(self) -> onnx.ModelProto:
        return self.graphs[Variant.U8S8]


def calibrate(
    model: onnx.ModelProto, batches: Sequence[Feeds], placement: Placement, method: CalibrationMethod, *,
    num_bins: int = 2048, progress: Callable[[int], None] | None = None, bias_correction: bool = True,
    mask: str | None = None, reconstruction: bool = True,
) -> Calibration:
    """Histogram the tensors both variants quantize and choose their ranges with ``method``.

    With ``bias_correction`` the per-channel input means of Conv/Gemm layers are measured in
    the same pass and their biases absorb the int8 weight-rounding shift. With ``reconstruction``
    the same pass gathers each layer's input statistics for layer-wise weight rounding
    (``converters.rounding``), which a graph may use instead.
    """
    start = time.perf_counter()
    op_types = sorted({op for ops in placement.op_types.values() for op in ops})
    tensors = tensors_around(model, op_types)
    means = ChannelMeans(input_axes(model, placement.nodes) if bias_correction else {})
    stats = statistics_for(model, placement.nodes) if reconstruction else None

    def observe(name: str, value: np.ndarray) -> None:
        means(name, value)
        if stats is not None:
            stats(name, value)

    hists = collect_histograms(model, batches, tensors, num_bins=num_bins, progress=progress, observe=observe,
                               mask=mask)
    corrected = [n for n in input_nodes(model, placement.nodes) if means.mean(n[1]) is not None]
    fallbacks: dict[str, str] = {}
    linear = {n: _guarded_range(h, method, Scheme.LINEAR, fallbacks) for n, h in hists.items()}
    affine = {n: _guarded_range(h, method, Scheme.AFFINE, fallbacks) for n, h in hists.items()}
    scales = ScaleFile(
        tensors={n: _tensor_scale(hists[n], r) for n, r in linear.items()},
        calibration_hash=data_hash(batches), graph_hash=graph_hash(model.SerializeToString()),
        samples=sum(len(next(iter(b.values()))) for b in batches), method=method.value,
        created_by="edge-sdk converters",
    )
    return Calibration(hists, linear, affine, scales, time.perf_counter() - start, model, model,
                       means if bias_correction else None, statistics=stats,
                       bias_corrected=tuple(n for n, _ in corrected), range_fallbacks=fallbacks)


def prepare_int8(
    model: onnx.ModelProto, batches: Sequence[Feeds], method: CalibrationMethod, *,
    smoothing: float | None = DEFAULT_ALPHA, equalization: bool = True, bias_correction: bool = True,
    mask: str | None = None, progress: Callable[[int], None] | None = None, relu6: bool = True,
) -> tuple[Calibration, Placement]:
    """Plan the placement; smooth transformer MatMul inputs (``smoothing`` = migration strength,
    None to skip) or equalize CNN conv pairs; then calibrate (with bias correction). The one
    entry point for ``convert`` and the benchmarks. ``mask`` names the attention-mask input of a
    text model, so that padding positions stay out of the statistics. ``relu6=False`` leaves the
    pairs joined by ReLU6 unequalized (``equalize`` without calibration data)."""
    original = model
    placement = plan_placement(model)
    smoothed: list[str] = []
    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    if smoothing is not None and placement.family == "transformer":
        model, smoothed = smooth_model(model, batches, placement.nodes, smoothing, mask=mask)
        placement = plan_placement(model)
    elif equalization and placement.family == "cnn":
        model, pairs, skipped = equalize(model, batches if relu6 else None)
        if not relu6:
            skipped = {a: "followed by Clip (ReLU6): ReLU6 equalization off" if why.startswith("followed by Clip (ReLU6)")
                       else why for a, why in skipped.items()}
    cal = calibrate(model, batches, placement, method, progress=progress, bias_correction=bias_correction,
                    mask=mask)
    return replace(cal, original=original, smoothed=tuple(smoothed), smoothing_alpha=smoothing if smoothed else None,
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


def quantizable_model(calibration: Calibration, placement: Placement, variant: Variant,
                      reconstruction: bool = False) -> onnx.ModelProto:
    """The graph ``variant`` quantizes. Only its int8 layers change: with ``reconstruction`` their
    weights take the levels chosen by layer-wise reconstruction (no bias correction needed), the
    others get bias correction for the variant's weight rounding. Float layers keep fp32 weights."""
    if not placement.nodes:
        return calibration.model
    rounded: list[str] = []
    model = calibration.model
    if reconstruction and calibration.statistics is not None:
        model, rounded = _with_reconstructed_weights(calibration, placement.nodes, variant)
    if calibration.means is None:
        return model
    rest = tuple(n for n in placement.nodes if n not in set(rounded))
    corrected, _ = correct_biases(model, rest, calibration.means, weight_max(variant))
    return corrected


def _with_reconstructed_weights(calibration: Calibration, nodes: Sequence[str], variant: Variant,
                                ) -> tuple[onnx.ModelProto, list[str]]:
    stats = calibration.statistics
    if stats is None:
        return calibration.model, []
    out = onnx.ModelProto()
    out.CopyFrom(calibration.model)
    inits = {i.name: i for i in out.graph.initializer}
    readers: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    chosen, done = set(nodes), []
    levels = weight_max(variant)
    for node in out.graph.node:
        hessian = stats.hessian(node.name) if node.name in chosen else None
        if hessian is None or readers.get(node.input[1], 0) != 1:  # shared weights keep plain rounding
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        layer = layer_of(node, weight)
        if layer is None:
            continue
        key = (node.name, levels(node))
        if key not in calibration.rounded:
            calibration.rounded[key] = reconstruct(weight, layer, hessian, key[1])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(calibration.rounded[key].astype(weight.dtype),
                                                              node.input[1]))
        done.append(node.name)
    return out, done


def build_variant(calibration: Calibration, placement: Placement, variant: Variant,
                  reconstruction: bool = False) -> onnx.ModelProto:
    """One Q/DQ graph; layers outside ``placement`` stay float with their fp32 weights and biases."""
    ranges = calibration.linear if variant is Variant.S8S8 else calibration.affine
    graph = write_qdq(quantizable_model(calibration, placement, variant, reconstruction),
                      {n: (r.lo, r.hi) for n, r in ranges.items()}, variant, placement,
                      attention_amax={n: r.amax for n, r in calibration.linear.items()})
    if variant is Variant.S8S8 and placement.layers(variant):
        assert_trt_compatible(graph)
    return graph


def build_int8(calibration: Calibration, placement: Placement) -> Int8Graphs:
    """Every variant's Q/DQ graph from one calibration; the S8S8 one must meet TensorRT's rules."""
    return Int8Graphs({v: build_variant(calibration, placement, v) for v in Variant})


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 1
    return 0 if node.op_type == "Conv" else 1


def fake_quantize_node(model: onnx.ModelProto, node_name: str, act: TensorRange,
                       variant: Variant = Variant.S8S8) -> onnx.ModelProto:
    """A copy of ``model`` where only ``node_name`` sees int8 as ``variant`` does: Q/DQ on its input
    (symmetric int8 for S8S8, uint8 with a zero point for the CPU variants) and rounded weights."""
    out = ir.copy(model)
    node = next(n for n in out.graph.node if n.name == node_name)
    weights = {i.name: i for i in out.graph.initializer}
    w_init = weights[node.input[1]]
    w = numpy_helper.to_array(w_init)
    params = per_channel_weight_params(w, _weight_axis(node), weight_max(variant)(node))
    w_init.CopyFrom(numpy_helper.from_array(dequantize(quantize(w, params), params).astype(w.dtype), w_init.name))
    tag = f"{node_name}_sens"
    if variant is Variant.S8S8:
        scale, zero = np.array(np.float32(max(act.amax, 1e-30) / 127.0)), np.array(0, np.int8)
    else:
        scale, zero = affine_scale_zero_point(min(act.lo, 0.0), max(act.hi, 1e-30))
        scale, zero = np.array(scale, np.float32), np.array(zero, np.uint8)
    out.graph.initializer.extend([numpy_helper.from_array(scale, f"{tag}_scale"),
                                  numpy_helper.from_array(zero, f"{tag}_zp")])
    src = node.input[0]
    qdq = [helper.make_node("QuantizeLinear", [src, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"], name=f"{tag}_Q"),
           helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"],
                            name=f"{tag}_DQ")]
    node.input[0] = f"{tag}_dq"
    position = list(out.graph.node).index(node)
    for offset, q in enumerate(qdq):
        out.graph.node.insert(position + offset, q)
    return out


def layer_sensitivity(
    model: onnx.ModelProto, batches: Sequence[Feeds], calibration: Calibration, placement: Placement,
    progress: Callable[[int], None] | None = None, variant: Variant = Variant.S8S8, reconstruction: bool = False,
) -> dict[str, float]:
    """Relative output error (MSE / output power) of each layer quantized alone as ``variant`` does it,
    computed by the exact reference on a few batches (the same on every CPU). The attention MatMuls
    ``variant`` quantizes are layers too (both inputs in int8)."""
    reference = run_reference(model, batches).astype(np.float64)
    power = float(np.mean(reference**2)) or 1.0
    inputs = {n.name: list(n.input) for n in calibration.model.graph.node if n.input}
    ranges = calibration.linear if variant is Variant.S8S8 else calibration.affine
    result = {}
    attention = set(placement.layers(variant)) - set(placement.nodes)
    for node in placement.layers(variant):
        if node in attention:
            amax = {t: calibration.linear[t].amax for t in inputs[node][:2] if t in calibration.linear}
            if len(amax) < 2:
                continue
            quantized_graph = quantize_attention(ir.copy(calibration.model), amax, [node])
        else:
            act = ranges.get(inputs[node][0])
            if act is None:
                continue
            single = quantizable_model(calibration, replace(placement, nodes=(node,)), variant, reconstruction)
            quantized_graph = fake_quantize_node(single, node, act, variant)
        quantized = run_reference(quantized_graph, batches).astype(np.float64)
        result[node] = float(np.mean((quantized - reference) ** 2)) / power
        if progress:
            progress(1)
    return result


def mixed_precision(
    calibration: Calibration, placement: Placement, variant: Variant, sensitivity: dict[str, float],
    metric: Metric, baseline: float, budget: float, reconstruction: bool = False,
) -> tuple[onnx.ModelProto, dict[str, str], list[dict[str, Any]]]:
    """The fewest most-sensitive layers returned to float that keep ``baseline - metric <= budget``.

    ``metric`` scores a graph of ``variant`` in points (accuracy or agreement, 0-100), measured by
    the exact reference. With ``k`` the number of layers in float (most sensitive first), ``k = 0``
    is measured first; then a bisection between the largest failing and the smallest passing ``k``
    measured so far, where every layer in float (the fp32 graph itself, which meets any budget)
    passes. At most ``log2(layers) + 2`` graphs are measured and the result is always one that was
    measured within the budget. Returns the graph, its float layers with reasons, and every step.
    """
    order = sorted(sensitivity, key=lambda n: sensitivity[n], reverse=True)
    order += [n for n in placement.layers(variant) if n not in sensitivity]  # unmeasured: last, yet float at the end
    steps: list[dict[str, Any]] = []
    graphs: dict[int, onnx.ModelProto] = {}

    def within(k: int) -> bool:
        current = placement.without(set(order[:k]))
        graphs[k] = (build_variant(calibration, current, variant, reconstruction) if current.layers(variant)
                     else calibration.original or calibration.model)
        score = metric(graphs[k])
        steps.append({"float_layers": k, "metric": score, "drop": baseline - score,
                      "within_budget": baseline - score <= budget})
        log.info("mixed precision (%s): %d layers in float -> metric %.2f (drop %.2f)", variant.value, k, score,
                 baseline - score)
        return bool(steps[-1]["within_budget"])

    failing, passing = 0, len(order)
    if not within(0):
        if not within(passing):
            raise_budget(budget, steps)  # the fp32 graph itself misses the metric: a metric defect
        while passing - failing > 1:
            middle = (failing + passing) // 2
            if within(middle):
                passing = middle
            else:
                failing = middle
    else:
        passing = 0
    reasons = {n: f"mixed precision: sensitivity rank {i + 1} " + (f"(error {sensitivity[n]:.2e})" if n in sensitivity
                                                                     else "(not measured)")
               for i, n in enumerate(order[:passing])}
    return graphs[passing], reasons, steps


def raise_budget(budget: float, steps: list[dict[str, Any]]) -> None:
    from edge_sdk.errors import CalibrationError

    raise CalibrationError(
        f"not even the fp32 graph stays within the accuracy budget of {budget} points (tried {len(steps)} steps)",
        hint="the metric is not reproducible: check that validation predictions are deterministic")


__all__ = ["Calibration", "Int8Graphs", "Variant", "build_int8", "build_variant", "calibrate",
           "layer_sensitivity", "mixed_precision", "plan_placement", "prepare_int8"]
