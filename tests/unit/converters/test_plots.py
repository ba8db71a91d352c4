"""The histogram plot is a real PNG with one panel per layer and the threshold drawn in red."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from converters.calibration.histogram import HistogramCollector
from converters.calibration.methods import CalibrationMethod, choose_range
from converters.calibration.schemes import Scheme
from converters.plots import HEIGHT, MARGIN, WIDTH, histogram_png


def test_panels_are_stacked_and_mark_the_threshold() -> None:
    collector = HistogramCollector()
    collector.update("a", np.random.default_rng(0).normal(0, 1, 50_000))
    h = collector.histograms()["a"]
    r = choose_range(h, CalibrationMethod.PERCENTILE, Scheme.LINEAR)
    image = cv2.imdecode(np.frombuffer(histogram_png([("a", h, r), ("a again", h, r)]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (2 * HEIGHT, WIDTH, 3)
    red = (image[:, :, 2] > 180) & (image[:, :, 0] < 80) & (image[:, :, 1] < 80)
    columns = np.flatnonzero(red[MARGIN : HEIGHT - MARGIN].any(axis=0))
    assert columns.size and MARGIN < columns.min() < WIDTH - MARGIN  # the threshold line sits inside the plot


def test_no_panels_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one panel"):
        histogram_png([])
