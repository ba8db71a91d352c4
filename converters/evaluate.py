"""Accuracy of a pipeline on labelled samples: the measured metric conversion is judged by."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from converters.data import Sample
from runtime.manifest import Manifest
from runtime.pipeline import DEFAULT_MAX_BATCH, Encoder, Pipeline
from runtime.prediction import Prediction
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.backends import Served
from runtime.select import Selection

if TYPE_CHECKING:  # the report imports this module on devices without onnx
    import onnx


@dataclass(frozen=True)
class Evaluation:
    samples: int
    accuracy: float
    per_class: dict[str, float] = field(default_factory=dict)
    median_latency_ms: float = 0.0
    backend: str = ""
    #: true label -> predicted label -> count (labels as the samples and predictions name them)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "accuracy": self.accuracy,
            "per_class": dict(self.per_class),
            "median_latency_ms": self.median_latency_ms,
            "backend": self.backend,
            "confusion": {truth: dict(row) for truth, row in self.confusion.items()},
        }


def evaluate(pipeline: Pipeline, samples: Sequence[Sample], *, max_batch: int = DEFAULT_MAX_BATCH) -> Evaluation:
    """Predict every labelled sample in batches and score the top-1 label."""
    predictions: list[Prediction] = pipeline.predict_batch([s.item for s in samples], max_batch=max_batch)
    hits: dict[str, list[bool]] = {}
    confusion: dict[str, dict[str, int]] = {}
    for sample, pred in zip(samples, predictions):
        hits.setdefault(str(sample.label), []).append(pred.label == sample.label)
        row = confusion.setdefault(str(sample.label), {})
        row[str(pred.label)] = row.get(str(pred.label), 0) + 1
    total = sum(sum(h) for h in hits.values())
    per_item_ms = [p.timings.total_ms / p.batch_size for p in predictions]
    return Evaluation(
        samples=len(samples),
        accuracy=total / len(samples),
        per_class={label: sum(h) / len(h) for label, h in sorted(hits.items())},
        median_latency_ms=statistics.median(per_item_ms),
        backend=pipeline.backend,
        confusion={truth: dict(sorted(row.items())) for truth, row in sorted(confusion.items())},
    )


def pipeline_for(manifest: Manifest, model: "onnx.ModelProto", encoder: Encoder, graph: str = "fp32") -> Pipeline:
    """A CPU pipeline over an in-memory graph, with the package's own pre/post-processing.

    An int8 graph runs on the exact reference (``converters.reference``), so what is measured is
    the graph's own accuracy, the same on every workstation, not this CPU's integer kernels."""
    from converters.reference import reference_runner

    if graph == "fp32":
        runner = OnnxRuntimeRunner(model.SerializeToString(), manifest.inputs, manifest.outputs)
    else:
        runner = reference_runner(model, manifest.inputs, manifest.outputs)
    return Pipeline(manifest, Selection("onnxruntime-cpu", runner.activate(), (), Served.of_graph(graph)), encoder)


def accuracy_points(manifest: Manifest, model: "onnx.ModelProto", encoder: Encoder, samples: Sequence[Sample],
                    graph: str = "fp32") -> float:
    """Top-1 accuracy in points (0-100) of ``model`` on labelled ``samples`` (int8 graphs: exact reference)."""
    pipeline = pipeline_for(manifest, model, encoder, graph)
    try:
        return 100.0 * evaluate(pipeline, samples).accuracy
    finally:
        pipeline.close()
