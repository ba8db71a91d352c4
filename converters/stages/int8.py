"""The int8 stage of ``convert``: calibrate, write both Q/DQ graphs, measure, and fit the accuracy budget."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from converters.calibration.histogram import TensorHistogram
from converters.calibration.methods import CalibrationMethod, TensorRange, choose_range
from converters.calibration.schemes import Scheme
from converters.calibration.readers import Encoder, calibration_reader
from converters.data import Sample
from converters.evaluate import Evaluation, accuracy_points, evaluate, pipeline_for
from converters.html_report import CALIBRATION_FILE
from converters.plots import abs_columns, histogram_png
from converters.equalization import find_clip_pairs
from converters.ir import name_nodes
from converters.quantize import (Calibration, Feeds, Int8Graphs, Placement, Variant, build_variant, layer_sensitivity,
                                 mixed_precision, prepare_int8)
from converters.smoothing import DEFAULT_ALPHA
from edge_sdk.errors import CalibrationError
from runtime.manifest import Manifest, TextPreprocess

log = logging.getLogger(__name__)

GRAPH_FILES = {"u8s8": "model.int8.u8s8.onnx", "u8s7": "model.int8.u8s7.onnx", "s8s8": "model.int8.s8s8.onnx"}
SCALES_FILE = "scales.json"
PLOT_FILE = "reports/histograms.png"
HISTOGRAM_COLUMNS = 256
PLOTTED_LAYERS = 6
#: What each graph is for; the report and README say so.
GRAPH_TARGETS = {"u8s8": "onnxruntime CPU: x86 with VNNI (AVX-512 VNNI, AVX-VNNI), Arm64",
                 "u8s7": "onnxruntime CPU: x86 without VNNI (7-bit weights except depthwise)",
                 "s8s8": "TensorRT (explicit quantization)"}


@dataclass(frozen=True)
class Int8Stage:
    fp32_model: bytes  # the prepared fp32 graph (smoothed / equalized): the scales belong to it
    files: dict[str, bytes]
    golden: dict[str, dict[str, np.ndarray]]  # variant -> outputs on the golden feeds
    report: dict[str, Any]
    evaluation: Evaluation | None


def _logits(model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], output: str) -> np.ndarray:
    """``output`` of ``model`` on every batch; Q/DQ graphs run on the exact reference (ISA-independent)."""
    from converters.reference import run_reference

    return run_reference(model, batches, output)


def _agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    ref, oth = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    cos = np.sum(ref * oth, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(oth, axis=1) + 1e-12)
    return {"top1_agreement": float(np.mean(ref.argmax(1) == oth.argmax(1))), "mean_cosine": float(np.mean(cos))}


def _metric(manifest: Manifest, encoder: Encoder, validation: Sequence[Sample], batches: Sequence[dict[str, np.ndarray]],
            reference: np.ndarray, variant: Variant) -> Callable[[onnx.ModelProto], float]:
    """Points (0-100) a graph of ``variant`` scores on the exact reference: validation accuracy, or
    top-1 agreement with fp32 on the calibration data without labels."""
    output = manifest.postprocess.output

    def score(graph: onnx.ModelProto) -> float:
        if validation and manifest.postprocess.kind == "anomaly":
            return _auroc_points(manifest, graph, encoder, validation)
        if validation:
            return accuracy_points(manifest, graph, encoder, validation, variant.value)
        return 100.0 * _agreement(reference, _logits(graph, batches, output))["top1_agreement"]

    return score


def _held(encoder: Encoder, validation: Sequence[Sample]) -> list[dict[str, np.ndarray]]:
    return [encoder([s.item for s in validation[i:i + 16]]) for i in range(0, len(validation), 16)]


def _auroc_points(manifest: Manifest, graph: onnx.ModelProto, encoder: Encoder, validation: Sequence[Sample]) -> float:
    """An anomaly model's metric: image AUROC on the labelled validation data (0-100), on the reference."""
    from converters.patchcore import auroc

    scores = _logits(graph, _held(encoder, validation), manifest.postprocess.output)
    return 100.0 * auroc(scores, [s.label == manifest.postprocess.labels[1] for s in validation])


def _anomaly_fidelity(manifest: Manifest, model: onnx.ModelProto, held: Sequence[dict[str, np.ndarray]],
                      ) -> Callable[[onnx.ModelProto], dict[str, float]]:
    """For an anomaly model: ``top1_agreement`` is the share of inputs decided alike at the package's
    threshold, ``mean_cosine`` the mean cosine of the anomaly maps, both against fp32."""
    post = manifest.postprocess
    threshold, map_output = post.threshold, post.map_output
    assert threshold is not None and map_output is not None
    ref_scores, ref_maps = _logits(model, held, post.output), _logits(model, held, map_output)

    def fidelity(graph: onnx.ModelProto) -> dict[str, float]:
        scores, maps = _logits(graph, held, post.output), _logits(graph, held, map_output)
        same = (scores >= threshold) == (ref_scores >= threshold)
        return {"top1_agreement": float(np.mean(same)), "mean_cosine": _agreement(ref_maps, maps)["mean_cosine"]}

    return fidelity


@dataclass(frozen=True)
class _VariantResult:
    graph: onnx.ModelProto
    float_nodes: dict[str, str]
    sensitivity: dict[str, float]
    steps: list[dict[str, Any]]
    metric: float
    rounding: dict[str, Any]


def _fit_variant(
    variant: Variant, model: onnx.ModelProto, cal: Calibration, placement: Placement, sens_batches: Sequence[Feeds],
    score: Callable[[onnx.ModelProto], float], baseline: float, budget: float | None,
    progress: Callable[[str, int, int], None] | None, fidelity: Callable[[onnx.ModelProto], dict[str, float]],
) -> _VariantResult:
    """Choose ``variant``'s weight rounding by measurement (the metric, then top-1 agreement and
    cosine with fp32 on the held-out inputs when the metric ties), measure its layer sensitivities,
    then return layers to float until it meets ``budget``."""
    plain = build_variant(cal, placement, variant)
    scores = {"nearest": score(plain)}
    graph, reconstruction = plain, False
    if cal.statistics is not None and cal.statistics.sums:
        rebuilt = build_variant(cal, placement, variant, reconstruction=True)
        scores["reconstructed"] = score(rebuilt)
        agreement = {"nearest": fidelity(plain), "reconstructed": fidelity(rebuilt)}
        key = {k: (scores[k], agreement[k]["top1_agreement"], agreement[k]["mean_cosine"]) for k in agreement}
        if key["reconstructed"] > key["nearest"]:
            graph, reconstruction = rebuilt, True
    rounding = {"chosen": "reconstructed" if reconstruction else "nearest", "metric": scores,
                "layers": len(cal.statistics.sums) if cal.statistics else 0}
    achieved = max(scores.values())
    steps: list[dict[str, Any]] = [{"float_layers": 0, "metric": achieved, "drop": baseline - achieved,
                                    "within_budget": budget is None or baseline - achieved <= budget}]
    floats: dict[str, str] = {}
    over = budget is not None and baseline - achieved > budget
    sensitivity: dict[str, float] = {}
    if over or variant is Variant.U8S8:  # U8S8's sensitivities are reported; the others only when needed
        tick = (lambda n: progress(f"sensitivity {variant.value}", n, len(placement.layers(variant)))) if progress else None
        sensitivity = layer_sensitivity(model, sens_batches, cal, placement, progress=tick, variant=variant,
                                        reconstruction=reconstruction)
    if budget is not None and over:
        graph, floats, steps = mixed_precision(cal, placement, variant, sensitivity, score, baseline, budget,
                                               reconstruction)
        achieved = next(s["metric"] for s in reversed(steps) if s["float_layers"] == len(floats))
    return _VariantResult(graph, floats, sensitivity, steps, achieved, rounding)


def run_int8(
    proto: onnx.ModelProto, manifest: Manifest, encoder: Encoder, *, task: str, calibration: str | os.PathLike[str],
    validation: Sequence[Sample], fp32: Evaluation | None, golden_in: dict[str, np.ndarray], method: str,
    budget: float | None, samples: int, smoothing: float | None = DEFAULT_ALPHA,
    progress: Callable[[str, int, int], None] | None = None,
) -> Int8Stage:
    """Calibrate ``proto`` on ``calibration`` and produce every int8 graph, the scale file and the report.

    Each graph (``u8s8``, ``u8s7``, ``s8s8``) is measured on the exact reference and fitted to the
    budget on its own, so the package meets it whichever graph a device runs."""
    model = name_nodes(proto)
    chosen = CalibrationMethod.parse(method)
    reader = calibration_reader(calibration, task=task, inputs=manifest.inputs, encode=encoder, limit=samples)
    batches = list(reader)
    mask = manifest.preprocess.attention_mask if isinstance(manifest.preprocess, TextPreprocess) else None
    output = manifest.postprocess.output
    reference = _logits(model, batches, output)
    anomaly_map = manifest.postprocess.kind == "anomaly" and manifest.postprocess.map_output is not None
    if validation and anomaly_map:
        baseline = _auroc_points(manifest, model, encoder, validation)
    else:
        baseline = 100.0 * fp32.accuracy if (validation and fp32) else 100.0
    # fidelity figures on the held-out validation inputs when there are any, else on the calibration data
    held = _held(encoder, validation) or batches
    held_ref = _logits(model, held, output) if validation else reference

    def agreement(graph: onnx.ModelProto) -> dict[str, float]:
        return _agreement(held_ref, _logits(graph, held, output))

    fidelity = _anomaly_fidelity(manifest, model, held) if anomaly_map else agreement  # decisions and maps

    def fit(relu6: bool) -> tuple[Calibration, Placement, dict[Variant, _VariantResult]]:
        cal, placement = prepare_int8(model, batches, chosen, smoothing=smoothing, mask=mask, relu6=relu6,
                                      progress=(lambda n: progress("calibration", n, len(reader))) if progress else None)
        return cal, placement, {v: _fit_variant(v, model, cal, placement, batches[:1],
                                                _metric(manifest, encoder, validation, batches, reference, v), baseline,
                                                budget, progress, fidelity)
                                for v in Variant}

    fits = {True: fit(True)}
    perfect = _preference(fits[True][2], baseline, budget)[:2] == (True, 0)  # nothing to gain from the other
    if fits[True][1].family == "cnn" and find_clip_pairs(model) and not perfect:
        fits[False] = fit(False)  # ReLU6 equalization is kept only where it measurably helps this model
    relu6 = max(fits, key=lambda k: _preference(fits[k][2], baseline, budget))  # the fp32 graph's and the scales'
    cal, placement, _ = fits[relu6]
    source = _graph_sources({k: f[2] for k, f in fits.items()}, relu6, baseline, budget)
    results = {v: fits[source[v]][2][v] for v in Variant}
    relu6_choice = None if len(fits) == 1 else {
        "chosen": "on" if relu6 else "off",
        "per_graph": {v.value: "on" if k else "off" for v, k in source.items()},
        "measured": {("on" if k else "off"): {v.value: {"metric": r.metric, "float_layers": len(r.float_nodes)}
                                              for v, r in f[2].items()} for k, f in fits.items()},
        "rule": "every graph within the budget, then fewest layers in float, then the highest metrics; "
                "each int8 graph from the preparation that ranks best for it alone"}
    evaluation = None
    if validation:
        pipeline = pipeline_for(manifest, results[Variant.U8S8].graph, encoder, "u8s8")
        try:
            evaluation = evaluate(pipeline, validation)
        finally:
            pipeline.close()
    graphs = Int8Graphs({v: r.graph for v, r in results.items()}, {v: r.float_nodes for v, r in results.items()})
    golden = {v.value: {output: _logits(g, [golden_in], output)} for v, g in graphs.graphs.items()}
    files = {GRAPH_FILES[v.value]: g.SerializeToString() for v, g in graphs.graphs.items()}
    panels = _panels(cal.model, cal, results[Variant.U8S8].sensitivity)
    files.update({SCALES_FILE: cal.scales.to_json().encode("utf-8"), PLOT_FILE: histogram_png(panels),
                  CALIBRATION_FILE: json.dumps(calibration_record(panels, cal), indent=1).encode("utf-8")})
    per_graph = {v.value: {"target": GRAPH_TARGETS[v.value], "metric_int8": r.metric, "weight_rounding": r.rounding,
                           "float_layers": dict(r.float_nodes), "mixed_precision_steps": r.steps,
                           **fidelity(r.graph)}
                 for v, r in results.items()}
    report = _report(cal.model, cal, placement, graphs, results[Variant.U8S8].sensitivity, files, proto,
                     budget, baseline, per_graph)
    report["agreement_measured_on"] = f"{'validation' if validation else 'calibration'} data, {len(held_ref)} inputs"
    report["relu6_equalization"] = relu6_choice
    return Int8Stage(cal.prepared.SerializeToString(), files, golden, report, evaluation)


def _graph_sources(fits: Mapping[bool, Mapping[Variant, _VariantResult]], primary: bool, baseline: float,
                   budget: float | None) -> dict[Variant, bool]:
    """Which preparation (ReLU6 equalization on or off) each int8 graph comes from: the one that ranks
    best for that graph alone (:func:`_preference`), the package's own (``primary``) on a tie.
    Equalization keeps the model's function, so a graph of either preparation computes the package's
    fp32 model; the fp32 graph and the scales stay the primary preparation's."""
    ordered = sorted(fits, key=lambda k: k != primary)
    return {v: max(ordered, key=lambda k: _preference({v: fits[k][v]}, baseline, budget)) for v in Variant}


def _preference(results: Mapping[Variant, _VariantResult], baseline: float,
                budget: float | None) -> tuple[bool, int, float]:
    """How good a preparation's graphs are, larger is better: all within the budget, then the
    fewest layers in float (speed), then the sum of their metrics."""
    within = all(budget is None or baseline - r.metric <= budget + 1e-9 for r in results.values())
    return within, -sum(len(r.float_nodes) for r in results.values()), sum(r.metric for r in results.values())


def _panels(model: onnx.ModelProto, cal: Calibration,
            sensitivity: dict[str, float]) -> list[tuple[str, TensorHistogram, TensorRange]]:
    """Histograms of the inputs of the most sensitive layers, with their TensorRT (linear) thresholds."""
    inputs = {n.name: (n.op_type, n.input[0]) for n in model.graph.node if n.input}
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    panels: list[tuple[str, TensorHistogram, TensorRange]] = []
    for node in ranked:
        op_type, tensor = inputs[node]
        if tensor in cal.histograms and len(panels) < PLOTTED_LAYERS:
            title = f"{node} ({op_type}) input {tensor}: sensitivity {sensitivity[node]:.2e}"
            panels.append((title, cal.histograms[tensor], cal.linear[tensor]))
    if not panels:  # no sensitivity measured: plot the first calibrated tensors
        panels = [(n, cal.histograms[n], cal.linear[n]) for n in list(cal.histograms)[:PLOTTED_LAYERS]]
    return panels


def calibration_record(panels: Sequence[tuple[str, TensorHistogram, TensorRange]], cal: Calibration) -> dict[str, Any]:
    """Each plotted tensor's |x| histogram (``HISTOGRAM_COLUMNS`` equal bins from 0), the range the
    graphs use and the threshold every histogram method would have chosen, with its expected error."""
    tensors = []
    for title, h, chosen in panels:
        span, per_column = abs_columns(h, chosen.amax, HISTOGRAM_COLUMNS)
        candidates: dict[str, dict[str, Any]] = {}
        for method in (CalibrationMethod.ENTROPY, CalibrationMethod.PERCENTILE, CalibrationMethod.MSE,
                       CalibrationMethod.MINMAX):
            try:
                r = choose_range(h, method, Scheme.LINEAR)
            except CalibrationError as exc:
                candidates[method.value] = {"error": None, "amax": None, "why": exc.message}
                continue
            candidates[method.value] = {"amax": r.amax, "error": r.error}
        affine = cal.affine.get(h.name)
        tensors.append({
            "title": title, "tensor": h.name, "span": span, "bin_width": span / HISTOGRAM_COLUMNS,
            "counts": [int(round(c)) for c in per_column], "max_abs": h.max_abs, "values": int(h.count),
            "linear": {"method": chosen.method.value, "amax": chosen.amax, "error": chosen.error},
            "affine": {"method": affine.method.value, "lo": affine.lo, "hi": affine.hi} if affine else None,
            "candidates": candidates, "fallback": cal.range_fallbacks.get(h.name),
        })
    return {"units": "the tensor's own values (activations, dimensionless)", "method": cal.scales.method,
            "samples": cal.scales.samples, "tensors": tensors}


def _report(
    model: onnx.ModelProto, cal: Calibration, placement: Placement, graphs: Int8Graphs, sensitivity: dict[str, float],
    files: dict[str, bytes], proto: onnx.ModelProto, budget: float | None, baseline: float,
    per_graph: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    main = per_graph[Variant.U8S8.value]
    cpu_floats = graphs.float_nodes.get(Variant.U8S8, {})
    layers = []
    for node in model.graph.node:
        if node.name not in sensitivity and node.name not in cpu_floats:
            continue
        r = cal.linear.get(node.input[0])
        layers.append({
            "node": node.name, "op_type": node.op_type, "input": node.input[0],
            "method": r.method.value if r else None, "amax": r.amax if r else None, "error": r.error if r else None,
            "sensitivity": sensitivity.get(node.name),
            "precision": {v.value: "int8" if node.name in placement.layers(v) and node.name not in
                          graphs.float_nodes.get(v, {}) else "fp32" for v in graphs.graphs},
        })
    return {
        "method": cal.scales.method, "samples": cal.scales.samples, "calibration_seconds": round(cal.seconds, 2),
        "measured_by": "exact reference (Q/DQ semantics on float kernels; the same on every CPU)",
        "bias_corrected": list(cal.bias_corrected),
        "smoothing": {"alpha": cal.smoothing_alpha, "layers": list(cal.smoothed)} if cal.smoothed else None,
        "equalized_pairs": [list(p) for p in cal.equalized], "equalization_skipped": dict(cal.equalization_skipped),
        "range_fallbacks": dict(cal.range_fallbacks),
        "family": placement.family, "attention_layers": list(placement.attention),
        "tensors": len(cal.linear), "layers": layers,
        "float_layers": dict(cpu_floats), "budget": budget, "metric_fp32": baseline, "metric_int8": main["metric_int8"],
        "agreement_with_fp32": {k: main[k] for k in ("top1_agreement", "mean_cosine")},
        "mixed_precision_steps": main["mixed_precision_steps"], "per_graph": per_graph,
        "sizes_bytes": {"fp32": len(proto.SerializeToString()), **{k: len(v) for k, v in files.items()}},
        "graphs": dict(GRAPH_FILES), "scales": SCALES_FILE, "histogram_plot": PLOT_FILE,
        "calibration_histograms": CALIBRATION_FILE,
    }


def require_calibration(calibration: object) -> None:
    if calibration is None:
        raise CalibrationError("quantize='int8' and prune= need calibration data",
                               hint="pass calibration=<image folder | text file | .npy/.npz> (a few hundred samples)")
