"""The conversion report: what was built, from what, and how well it does."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from converters.evaluate import Evaluation


@dataclass(frozen=True)
class ConversionReport:
    package: str
    name: str
    task: str
    precision: str
    labels: tuple[str, ...]
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    golden_samples: int
    seconds: float
    validation: Evaluation | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    int8: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    canonicalization: dict[str, Any] | None = None
    anomaly: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "name": self.name,
            "task": self.task,
            "precision": self.precision,
            "labels": list(self.labels),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "golden_samples": self.golden_samples,
            "seconds": round(self.seconds, 3),
            "validation": self.validation.to_dict() if self.validation else None,
            "notes": list(self.notes),
            "int8": self.int8,
            "pruning": self.pruning,
            "canonicalization": self.canonicalization,
            "anomaly": self.anomaly,
        }

    def lines(self) -> list[str]:
        """Human-readable summary for the CLI."""
        out = [
            f"package: {self.package}",
            f"model: {self.name} ({self.task}, {self.precision}, {len(self.labels)} labels)",
            f"golden vectors: {self.golden_samples}",
        ]
        if self.validation:
            v = self.validation
            out.append(f"validation: accuracy {v.accuracy:.3f} on {v.samples} samples ({v.backend}), "
                       f"median {v.median_latency_ms:.2f} ms/sample")
        if self.canonicalization:
            out.append(canonical_line(self.canonicalization))
        if self.anomaly and self.anomaly.get("method") == "patchcore":
            out.extend(anomaly_lines(self.anomaly))
        if self.pruning:
            out.extend(pruning_lines(self.pruning))
        if self.int8:
            out.extend(int8_lines(self.int8))
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"converted in {self.seconds:.1f} s")
        return out


def int8_lines(int8: dict[str, Any]) -> list[str]:
    """Summary of the int8 report: calibration, fidelity, float-kept layers and the most sensitive layers."""
    agreement = int8["agreement_with_fp32"]
    lines = [
        f"int8: {int8['method']} calibration on {int8['samples']} samples in {int8['calibration_seconds']:.1f} s, "
        f"{int8['tensors']} tensors, {int8['family']} placement",
        f"int8 vs fp32: metric {int8['metric_int8']:.2f} vs {int8['metric_fp32']:.2f} points "
        f"(budget {int8['budget']}), top-1 agreement {100 * agreement['top1_agreement']:.1f}%, "
        f"mean cosine {agreement['mean_cosine']:.4f}",
    ]
    if int8.get("measured_by"):
        lines.append(f"int8 figures measured by the {int8['measured_by']}, "
                     f"agreement on {int8.get('agreement_measured_on', 'the calibration data')}")
    relu6 = int8.get("relu6_equalization")
    if relu6:
        measured = "; ".join(f"{k}: " + ", ".join(f"{g} {m['metric']:.2f} ({m['float_layers']} float)"
                                                  for g, m in graphs.items())
                             for k, graphs in relu6["measured"].items())
        per_graph = relu6.get("per_graph", {})
        mixed = [g for g, k in per_graph.items() if k != relu6["chosen"]]
        taken = f"; {', '.join(mixed)} from the {'equalized' if relu6['chosen'] == 'off' else 'unequalized'} one" \
            if mixed else ""
        lines.append(f"ReLU6 equalization {relu6['chosen']} by measurement ({measured}){taken}")
    for graph, g in int8.get("per_graph", {}).items():
        rounding = g.get("weight_rounding", {}).get("chosen", "nearest")
        lines.append(f"  {graph} ({g['target']}): metric {g['metric_int8']:.2f}, agreement "
                     f"{100 * g['top1_agreement']:.1f}%, cosine {g['mean_cosine']:.4f}, "
                     f"{len(g['float_layers'])} layers in float, {rounding} weight rounding, "
                     f"{len(g['mixed_precision_steps'])} mixed-precision steps")
    if int8.get("validation"):
        lines.append(f"int8 validation accuracy: {int8['validation']['accuracy']:.3f}")
    sizes = int8["sizes_bytes"]
    lines.append("sizes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    for node, reason in int8["float_layers"].items():
        lines.append(f"kept in float: {node} ({reason})")
    ranked = sorted((l for l in int8["layers"] if l["sensitivity"] is not None), key=lambda l: -l["sensitivity"])
    for layer in ranked[:5]:
        precision = layer["precision"]
        shown = ", ".join(f"{g} {p}" for g, p in precision.items()) if isinstance(precision, dict) else precision
        lines.append(f"sensitive: {layer['node']} ({layer['op_type']}) error {layer['sensitivity']:.2e}, "
                     f"{layer['method']} amax {layer['amax']:.4g}, {shown}")
    return lines


def anomaly_lines(report: dict[str, Any]) -> list[str]:
    """Summary of an anomaly-detection fit: features, memory bank, threshold, AUROC / F1 (fp32, int8)."""
    layers = ", ".join(f"{m['name']} (stride {m['stride']}, {m['channels']} ch)" for m in report["layers"])
    lines = [f"anomaly model: PatchCore, patches from {layers} ({report['layers_chosen']}), "
             f"{report['grid'][0]}x{report['grid'][1]} grid",
             f"memory bank: {report['memory_bank']:,} of {report['patches']:,} patch features ({report['feature_dim']} "
             f"dims, coreset ratio {report['coreset_ratio']}) from {report['bank_images']} good images, "
             f"fitted in {report['fit_seconds']:.1f} s",
             f"threshold {report['threshold']:.4g}: {report['threshold_rule']}"
             + (f"; typical good score {report['normal_score']:.4g}" if report.get("normal_score") is not None else "")]
    lines.extend(f"anomaly note: {n}" for n in report.get("notes", []))
    v = report.get("validation")
    if v:
        auroc = f"AUROC {v['auroc']:.4f}, " if "auroc" in v else ""
        lines.append(f"anomaly validation (fp32): {auroc}F1 {v['f1']:.3f} (precision {v['precision']:.3f}, "
                     f"recall {v['recall']:.3f}) on {v['samples']} images, {v['defects']} defects")
    for graph, value in (report.get("auroc_int8") or {}).items():
        lines.append(f"anomaly validation ({graph}, exact reference): AUROC {value:.4f}")
    if report.get("latency_ms"):
        lines.append("anomaly latency per image (this CPU, onnxruntime, one at a time): "
                     + ", ".join(f"{k} {v:.2f} ms" for k, v in report["latency_ms"].items()))
    return lines


def canonical_line(report: dict[str, Any]) -> str:
    """``canonical graph: 456 -> 94 nodes (Constant 222 -> 0, Pad 17 -> 0, ...)``, or why it was kept."""
    if report.get("kept"):
        return f"canonical graph: kept as given: {report['kept']}"
    changes = ", ".join(f"{op} {a} -> {b}" for op, (a, b) in sorted(
        report.get("rewritten", {}).items(), key=lambda kv: kv[1][1] - kv[1][0])[:6])
    return (f"canonical graph: {report['nodes_before']} -> {report.get('nodes_after', report['nodes_before'])} nodes"
            + (f" ({changes})" if changes else " (already canonical)"))


def pruning_lines(pruning: dict[str, Any]) -> list[str]:
    """Summary of the pruning report: what was removed, size, accuracy and measured CPU speed."""
    lines = [
        f"pruning: {pruning['method']}, parameters {pruning['params_before']:,} -> {pruning['params_after']:,} "
        f"(non-zero {pruning['nonzero_after']:,}), MACs/sample {pruning['macs_before'] / 1e6:.1f}M -> "
        f"{pruning['macs_after'] / 1e6:.1f}M, file {pruning['size_before'] / 1e6:.1f} -> "
        f"{pruning['size_after'] / 1e6:.1f} MB, CPU speed {pruning['cpu_speedup']:.2f}x",
    ]
    if pruning.get("accuracy_before") is not None:
        lines.append(f"pruning accuracy: {pruning['accuracy_before']:.2f} -> {pruning['accuracy_after']:.2f} points")
    chosen = pruning.get("chosen") or {}
    if chosen.get("ratios"):
        kinds = Counter(key.split(":", 1)[0] for key in chosen["ratios"])
        steps = [s for s in pruning.get("budget_steps", []) if s.get("step") == chosen.get("step")]
        drop = f", -{steps[-1]['drop']:.2f} pts" if steps else ""
        lines.append(f"pruning budget search: step {chosen['step']} of {chosen['of']}, "
                     + ", ".join(f"{n} {k} units" for k, n in kinds.items()) + drop)
    if pruning.get("pattern"):
        lines.append(f"pruning pattern {pruning['pattern']} on {len(pruning.get('layers', []))} layers "
                     "(TensorRT builds enable sparse tactics)")
    lines.extend(f"pruning note: {n}" for n in pruning.get("notes", [])[:5])
    return lines
