"""An entropy range that clips a ReLU6 output hard is replaced by the MSE range, and says so."""

from __future__ import annotations

import numpy as np

from converters.calibration.histogram import HistogramCollector
from converters.calibration.methods import CalibrationMethod, choose_range
from converters.calibration.schemes import Scheme
from converters.quantize import RANGE_ERROR_GUARD, _guarded_range


def _relu6_histogram():  # type: ignore[no-untyped-def]
    collector = HistogramCollector()
    collector.update("relu6", np.clip(np.random.default_rng(0).normal(0.0, 2.0, 200_000), 0.0, 6.0))
    return collector.histograms()["relu6"]


def test_degenerate_entropy_range_falls_back_to_mse_and_is_recorded() -> None:
    h = _relu6_histogram()
    entropy = choose_range(h, CalibrationMethod.ENTROPY, Scheme.LINEAR)
    mse = choose_range(h, CalibrationMethod.MSE, Scheme.LINEAR)
    assert entropy.error > RANGE_ERROR_GUARD * mse.error  # the failure mode is real on this data
    fallbacks: dict[str, str] = {}
    chosen = _guarded_range(h, CalibrationMethod.ENTROPY, Scheme.LINEAR, fallbacks)
    assert chosen == mse and chosen.amax > 5.0
    assert "entropy range" in fallbacks["relu6 (linear)"] and "MSE used" in fallbacks["relu6 (linear)"]


def test_reasonable_ranges_are_kept() -> None:
    collector = HistogramCollector()
    collector.update("gauss", np.random.default_rng(1).normal(0.0, 1.0, 200_000))
    h = collector.histograms()["gauss"]
    fallbacks: dict[str, str] = {}
    for method in (CalibrationMethod.ENTROPY, CalibrationMethod.PERCENTILE, CalibrationMethod.MINMAX):
        assert _guarded_range(h, method, Scheme.LINEAR, fallbacks) == choose_range(h, method, Scheme.LINEAR)
    assert fallbacks == {}
