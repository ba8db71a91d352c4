"""Anomaly-score packages: the decision threshold, fitted on labelled validation scores.

An anomaly model outputs one score per input (higher = more anomalous). The package
declares the threshold, so every device decides the same way. Without an explicit
``threshold``, conversion picks the one that maximises balanced accuracy (the mean of
the normal and fault recalls, Youden's J) on the validation data, placed halfway
between the two neighbouring scores so it does not sit on a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edge_sdk.errors import ConversionError


@dataclass(frozen=True)
class ThresholdFit:
    threshold: float
    balanced_accuracy: float
    normal_recall: float
    fault_recall: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "balanced_accuracy": self.balanced_accuracy,
                "normal_recall": self.normal_recall, "fault_recall": self.fault_recall, "samples": self.samples,
                "rule": "max balanced accuracy on the validation data"}


def fit_threshold(scores: Sequence[float] | np.ndarray, is_fault: Sequence[bool] | np.ndarray) -> ThresholdFit:
    """The threshold (``score >= t`` is a fault) with the best balanced accuracy on these scores."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_fault, dtype=bool).reshape(-1)
    if s.shape != y.shape or s.size == 0:
        raise ConversionError(f"{s.size} scores and {y.size} labels; expected the same non-zero number")
    if not np.isfinite(s).all():
        raise ConversionError("the model produced non-finite anomaly scores on the validation data")
    if y.all() or not y.any():
        raise ConversionError(f"validation data has {int(y.sum())} fault and {int((~y).sum())} normal samples; "
                              "fitting a threshold needs both", hint="add both kinds, or pass threshold=<score>")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    values = np.unique(s)
    # Candidates: below everything, between neighbours, above everything.
    candidates = np.concatenate(([values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]))
    best: ThresholdFit | None = None
    for t in candidates:
        predicted = s >= t
        fault_recall = float(predicted[y].mean())
        normal_recall = float((~predicted[~y]).mean())
        fit = ThresholdFit(float(t), (fault_recall + normal_recall) / 2, normal_recall, fault_recall, int(s.size))
        if best is None or fit.balanced_accuracy > best.balanced_accuracy:
            best = fit
    assert best is not None
    return best
