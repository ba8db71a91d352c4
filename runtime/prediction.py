"""What a pipeline returns: a frozen ``Prediction`` with its scores, backend and timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from edge_sdk.errors import InferenceError
from runtime.manifest import Postprocess


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage for one call (a batch shares one inference time)."""

    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.inference_ms + self.postprocess_ms


@dataclass(frozen=True)
class Prediction:
    """One input's result: the winning label, its score, every label's score, and provenance."""

    label: str
    score: float
    scores: Mapping[str, float]
    backend: str
    timings: Timings
    model: str = ""
    precision: str = "fp32"
    over_threshold: bool = True
    batch_size: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": self.score,
            "scores": dict(self.scores),
            "backend": self.backend,
            "model": self.model,
            "precision": self.precision,
            "over_threshold": self.over_threshold,
            "batch_size": self.batch_size,
            "timings_ms": {
                "preprocess": self.timings.preprocess_ms,
                "inference": self.timings.inference_ms,
                "postprocess": self.timings.postprocess_ms,
                "total": self.timings.total_ms,
            },
            **({"extra": {k: _plain(v) for k, v in self.extra.items()}} if self.extra else {}),
        }


def _plain(value: Any) -> Any:
    """A JSON-ready copy: arrays (an anomaly map) become nested lists rounded to 5 decimals."""
    if isinstance(value, np.ndarray):
        return np.asarray(value, dtype=np.float64).round(5).tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_scores(output: np.ndarray, spec: Postprocess) -> np.ndarray:
    """``[batch, classes]`` probabilities from the raw output tensor, as the manifest declares."""
    if output.ndim != 2 or output.shape[1] != len(spec.labels):
        raise InferenceError(f"model output has shape {list(output.shape)}; expected [batch, {len(spec.labels)}] for the labels")
    return softmax(output) if spec.softmax else output.astype(np.float64)


def to_predictions(
    probs: np.ndarray, spec: Postprocess, *, backend: str, model: str, timings: Sequence[Timings],
    precision: str = "fp32",
) -> list[Prediction]:
    """Wrap each row of class probabilities in a :class:`Prediction`."""
    out = []
    for row, timing in zip(probs, timings):
        best = int(np.argmax(row))
        label = spec.labels[best]
        score = float(row[best])
        out.append(
            Prediction(
                label=label,
                score=score,
                scores=MappingProxyType({lab: float(p) for lab, p in zip(spec.labels, row)}),
                backend=backend,
                timings=timing,
                model=model,
                precision=precision,
                over_threshold=score >= spec.thresholds.get(label, 0.0),
                batch_size=len(probs),
            )
        )
    return out


def anomaly_scores(output: np.ndarray) -> np.ndarray:
    """``[batch]`` anomaly scores from a ``[batch]`` or ``[batch, 1]`` output tensor."""
    if not (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        raise InferenceError(f"anomaly model output has shape {list(output.shape)}; expected [batch] or [batch, 1]")
    return output.reshape(-1).astype(np.float64)


def anomaly_predictions(
    scores: np.ndarray, spec: Postprocess, *, backend: str, model: str, timings: Sequence[Timings],
    precision: str = "fp32", maps: np.ndarray | None = None,
) -> list[Prediction]:
    """Anomaly scores -> predictions: ``score >= threshold`` is the fault label (``labels[1]``).

    ``score`` is the raw anomaly score; ``scores`` holds the decision (1.0 for the decided
    label, 0.0 for the other) so consumers of class scores see a consistent mapping, and
    ``extra`` keeps the score and the threshold, the normalised score when the package declares a
    typical good score (0 for a good part, 1 at the threshold) and the anomaly map ([h, w] float32)
    when the model gives one.
    """
    assert spec.threshold is not None  # guaranteed by Postprocess.from_dict for kind "anomaly"
    normal, fault = spec.labels
    out = []
    for i, (value, timing) in enumerate(zip(scores, timings)):
        is_fault = bool(value >= spec.threshold)
        extra: dict[str, Any] = {"anomaly_score": float(value), "threshold": spec.threshold}
        if spec.normal_score is not None:
            extra["normal_score"] = spec.normal_score
            extra["normalized_score"] = float((value - spec.normal_score) / (spec.threshold - spec.normal_score))
        if maps is not None:
            extra["anomaly_map"] = np.asarray(maps[i], dtype=np.float32)
        out.append(Prediction(
            label=fault if is_fault else normal, score=float(value),
            scores=MappingProxyType({normal: float(not is_fault), fault: float(is_fault)}),
            backend=backend, timings=timing, model=model, precision=precision, over_threshold=is_fault,
            batch_size=len(scores), extra=MappingProxyType(extra)))
    return out
