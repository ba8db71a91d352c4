"""The int8 stage of ``convert``: calibrate, write both Q/DQ graphs, measure, and fit the accuracy budget."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from converters.calibration.histogram import TensorHistogram
from converters.calibration.methods import CalibrationMethod, TensorRange
from converters.calibration.readers import Encoder, calibration_reader
from converters.data import Sample
from converters.evaluate import Evaluation, accuracy_points, evaluate, pipeline_for
from converters.plots import histogram_png
from converters.qdq import name_nodes
from converters.quantize import Calibration, Int8Graphs, build_int8, layer_sensitivity, mixed_precision, prepare_int8
from converters.smoothing import DEFAULT_ALPHA
from edge_sdk.errors import CalibrationError
from runtime.manifest import Manifest, TextPreprocess

log = logging.getLogger(__name__)

GRAPH_FILES = {"u8s8": "model.int8.u8s8.onnx", "s8s8": "model.int8.s8s8.onnx"}
SCALES_FILE = "scales.json"
PLOT_FILE = "reports/histograms.png"
PLOTTED_LAYERS = 6


@dataclass(frozen=True)
class Int8Stage:
    fp32_model: bytes  # the prepared fp32 graph (smoothed / equalized): the scales belong to it
    files: dict[str, bytes]
    golden: dict[str, dict[str, np.ndarray]]  # variant -> outputs on the golden feeds
    report: dict[str, Any]
    evaluation: Evaluation | None


def _logits(model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], output: str) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], b)[0] for b in batches])


def _agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    cos = np.sum(reference * other, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1) + 1e-12)
    return {"top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))),
            "mean_cosine": float(np.mean(cos))}


def _metric(manifest: Manifest, encoder: Encoder, validation: Sequence[Sample], batches: Sequence[dict[str, np.ndarray]],
            reference: np.ndarray) -> Callable[[onnx.ModelProto], float]:
    """Points (0-100) a U8S8 graph scores: validation accuracy, or top-1 agreement with fp32 without labels."""
    output = manifest.postprocess.output

    def score(u8: onnx.ModelProto) -> float:
        if validation:
            return accuracy_points(manifest, u8, encoder, validation, "u8s8")
        return 100.0 * _agreement(reference, _logits(u8, batches, output))["top1_agreement"]

    return score


def run_int8(
    proto: onnx.ModelProto, manifest: Manifest, encoder: Encoder, *, task: str, calibration: str | os.PathLike[str],
    validation: Sequence[Sample], fp32: Evaluation | None, golden_in: dict[str, np.ndarray], method: str,
    budget: float | None, samples: int, smoothing: float | None = DEFAULT_ALPHA,
    progress: Callable[[str, int, int], None] | None = None,
) -> Int8Stage:
    """Calibrate ``proto`` on ``calibration`` and produce the int8 graphs, scale file and report."""
    model = name_nodes(proto)
    chosen = CalibrationMethod.parse(method)
    reader = calibration_reader(calibration, task=task, inputs=manifest.inputs, encode=encoder, limit=samples)
    batches = list(reader)
    mask = manifest.preprocess.attention_mask if isinstance(manifest.preprocess, TextPreprocess) else None
    cal, placement = prepare_int8(model, batches, chosen, smoothing=smoothing, mask=mask,
                                  progress=(lambda n: progress("calibration", n, len(reader))) if progress else None)
    graphs = build_int8(cal, placement)
    output = manifest.postprocess.output
    reference = _logits(model, batches, output)
    score = _metric(manifest, encoder, validation, batches, reference)
    baseline = 100.0 * fp32.accuracy if (validation and fp32) else 100.0
    sensitivity = layer_sensitivity(model, batches[:1], cal, placement,
                                    progress=(lambda n: progress("sensitivity", n, len(placement.nodes)))
                                    if progress else None)
    steps: list[dict[str, Any]] = []
    achieved = score(graphs.u8s8)
    if budget is not None and baseline - achieved > budget:
        graphs, steps = mixed_precision(cal, placement, sensitivity, score, baseline, budget)
        achieved = steps[-1]["metric"]
    evaluation = None
    if validation:
        pipeline = pipeline_for(manifest, graphs.u8s8, encoder, "u8s8")
        try:
            evaluation = evaluate(pipeline, validation)
        finally:
            pipeline.close()
    golden = {v: {output: _logits(g, [golden_in], output)} for v, g in (("u8s8", graphs.u8s8), ("s8s8", graphs.s8s8))}
    files = {GRAPH_FILES["u8s8"]: graphs.u8s8.SerializeToString(), GRAPH_FILES["s8s8"]: graphs.s8s8.SerializeToString(),
             SCALES_FILE: cal.scales.to_json().encode("utf-8"), PLOT_FILE: _plot(cal.model, cal, sensitivity)}
    report = _report(cal.model, cal, placement.family, graphs, sensitivity, steps, files, proto, budget, baseline, achieved,
                     _agreement(reference, _logits(graphs.u8s8, batches, output)))
    return Int8Stage(cal.prepared.SerializeToString(), files, golden, report, evaluation)


def _plot(model: onnx.ModelProto, cal: Calibration, sensitivity: dict[str, float]) -> bytes:
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
    return histogram_png(panels)


def _report(
    model: onnx.ModelProto, cal: Calibration, family: str, graphs: Int8Graphs, sensitivity: dict[str, float],
    steps: list[dict[str, Any]], files: dict[str, bytes], proto: onnx.ModelProto, budget: float | None,
    baseline: float, achieved: float, agreement: dict[str, float],
) -> dict[str, Any]:
    layers = []
    for node in model.graph.node:
        if node.name not in sensitivity and node.name not in graphs.float_nodes:
            continue
        r = cal.linear.get(node.input[0])
        layers.append({
            "node": node.name, "op_type": node.op_type, "input": node.input[0],
            "method": r.method.value if r else None, "amax": r.amax if r else None, "error": r.error if r else None,
            "sensitivity": sensitivity.get(node.name),
            "precision": "fp32" if node.name in graphs.float_nodes else "int8",
        })
    return {
        "method": cal.scales.method, "samples": cal.scales.samples, "calibration_seconds": round(cal.seconds, 2),
        "bias_corrected": list(cal.bias_corrected),
        "smoothing": {"alpha": cal.smoothing_alpha, "layers": list(cal.smoothed)} if cal.smoothed else None,
        "equalized_pairs": [list(p) for p in cal.equalized], "equalization_skipped": dict(cal.equalization_skipped),
        "range_fallbacks": dict(cal.range_fallbacks),
        "family": family, "tensors": len(cal.linear), "layers": layers, "float_layers": dict(graphs.float_nodes),
        "budget": budget, "metric_fp32": baseline, "metric_int8": achieved, "agreement_with_fp32": agreement,
        "mixed_precision_steps": steps,
        "sizes_bytes": {"fp32": len(proto.SerializeToString()), **{k: len(v) for k, v in files.items()}},
        "graphs": dict(GRAPH_FILES), "scales": SCALES_FILE, "histogram_plot": PLOT_FILE,
    }


def require_calibration(calibration: object) -> None:
    if calibration is None:
        raise CalibrationError("quantize='int8' and prune= need calibration data",
                               hint="pass calibration=<image folder | text file | .npy/.npz> (a few hundred samples)")
