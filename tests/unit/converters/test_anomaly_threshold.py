"""Fitting an anomaly threshold on labelled validation scores."""

from __future__ import annotations

import numpy as np
import pytest

from converters.anomaly import fit_threshold
from edge_sdk.errors import ConversionError


def test_separable_scores_get_a_threshold_between_the_classes() -> None:
    fit = fit_threshold([0.1, 0.2, 0.3, 0.8, 0.9], [False, False, False, True, True])
    assert fit.threshold == pytest.approx(0.55) and fit.balanced_accuracy == 1.0
    assert fit.normal_recall == fit.fault_recall == 1.0 and fit.samples == 5


def test_overlapping_scores_maximise_balanced_accuracy() -> None:
    rng = np.random.default_rng(0)
    normal, fault = rng.normal(0, 1, 400), rng.normal(2, 1, 100)  # imbalanced: 4 normal per fault
    scores = np.concatenate([normal, fault])
    labels = np.concatenate([np.zeros(400, bool), np.ones(100, bool)])
    fit = fit_threshold(scores, labels)
    assert 0.6 < fit.threshold < 1.4  # the equal-recall point of N(0,1) vs N(2,1) is 1.0
    for t in (fit.threshold - 0.3, fit.threshold + 0.3):  # no nearby threshold does better
        pred = scores >= t
        assert (pred[labels].mean() + (~pred[~labels]).mean()) / 2 <= fit.balanced_accuracy


@pytest.mark.parametrize("scores, labels, match", [
    ([0.1, 0.2], [False, False], "needs both"),
    ([0.1], [True, False], "same non-zero number"),
    ([0.1, float("nan")], [False, True], "non-finite"),
])
def test_bad_validation_is_refused(scores: list, labels: list, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        fit_threshold(scores, labels)
