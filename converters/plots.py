"""A PNG of calibration histograms with their chosen thresholds, drawn with OpenCV (no plotting stack)."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from converters.calibration.histogram import TensorHistogram
from converters.calibration.methods import TensorRange

WIDTH, HEIGHT, MARGIN, COLUMNS = 640, 170, 28, 256


def abs_columns(h: TensorHistogram, amax: float, columns: int = COLUMNS) -> tuple[float, np.ndarray]:
    """``|x|`` counts of ``h`` in ``columns`` equal bins from 0 to a span covering all but a 1e-7
    tail of the values and the threshold ``amax`` (5% beyond): the span and the counts."""
    counts = h.abs_counts().astype(np.float64)
    used = max(1, int(np.searchsorted(np.cumsum(counts), counts.sum() * (1 - 1e-7))) + 1)
    span = max(used * h.bin_width, amax) * 1.05
    per_column = np.histogram(h.abs_centres(), bins=np.linspace(0.0, span, columns + 1), weights=counts)[0]
    return span, per_column


def _panel(title: str, h: TensorHistogram, r: TensorRange) -> np.ndarray:
    panel = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    span, per_column = abs_columns(h, r.amax)
    heights = np.log1p(per_column)
    heights = heights / max(heights.max(), 1e-12) * (HEIGHT - 2 * MARGIN)
    plot_w = WIDTH - 2 * MARGIN
    for i, value in enumerate(heights):
        x0 = MARGIN + int(i * plot_w / COLUMNS)
        x1 = MARGIN + int((i + 1) * plot_w / COLUMNS)
        cv2.rectangle(panel, (x0, HEIGHT - MARGIN - int(value)), (max(x0, x1 - 1), HEIGHT - MARGIN), (160, 110, 40), -1)
    x_amax = MARGIN + int(r.amax / span * plot_w)
    cv2.line(panel, (x_amax, MARGIN - 6), (x_amax, HEIGHT - MARGIN), (30, 30, 220), 2)
    cv2.line(panel, (MARGIN, HEIGHT - MARGIN), (WIDTH - MARGIN, HEIGHT - MARGIN), (0, 0, 0), 1)
    cv2.putText(panel, title[:70], (MARGIN, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    label = f"amax {r.amax:.4g} ({r.method.value})  max|x| {h.max_abs:.4g}  |x| log-count"
    cv2.putText(panel, label, (MARGIN, HEIGHT - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (30, 30, 220), 1, cv2.LINE_AA)
    return panel


def histogram_png(panels: Sequence[tuple[str, TensorHistogram, TensorRange]]) -> bytes:
    """One panel per (title, histogram, chosen range), stacked vertically, encoded as PNG."""
    if not panels:
        raise ValueError("histogram_png needs at least one panel")
    image = np.vstack([_panel(*p) for p in panels])
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the histogram plot")
    return data.tobytes()
