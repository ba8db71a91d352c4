"""Accuracy of a pipeline on labelled samples: the measured metric conversion is judged by."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from converters.data import Sample
from runtime.pipeline import Pipeline
from runtime.prediction import Prediction


@dataclass(frozen=True)
class Evaluation:
    samples: int
    accuracy: float
    per_class: dict[str, float] = field(default_factory=dict)
    median_latency_ms: float = 0.0
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "accuracy": self.accuracy,
            "per_class": dict(self.per_class),
            "median_latency_ms": self.median_latency_ms,
            "backend": self.backend,
        }


def evaluate(pipeline: Pipeline, samples: Sequence[Sample], *, max_batch: int = 16) -> Evaluation:
    """Predict every labelled sample in batches and score the top-1 label."""
    predictions: list[Prediction] = pipeline.predict_batch([s.item for s in samples], max_batch=max_batch)
    hits: dict[str, list[bool]] = {}
    for sample, pred in zip(samples, predictions):
        hits.setdefault(str(sample.label), []).append(pred.label == sample.label)
    total = sum(sum(h) for h in hits.values())
    per_item_ms = [p.timings.total_ms / p.batch_size for p in predictions]
    return Evaluation(
        samples=len(samples),
        accuracy=total / len(samples),
        per_class={label: sum(h) / len(h) for label, h in sorted(hits.items())},
        median_latency_ms=statistics.median(per_item_ms),
        backend=pipeline.backend,
    )
