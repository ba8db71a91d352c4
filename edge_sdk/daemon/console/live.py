"""The latest frame each source delivered, with its predictions, for the console's live view.

The daemon's stream sink calls :meth:`LiveFrames.observe` for every prediction (one per region of
interest, or one per frame); the console asks :meth:`LiveFrames.jpeg` for the latest frame drawn
with its label, score, regions and anomaly heat map. Frames per second and latency (from capture
to the end of the prediction) are measured over the last ``FPS_WINDOW_S`` seconds of each source, so a
source that stops delivering drops to 0 frames/s.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import cv2
import numpy as np

from runtime.frame import Frame
from runtime.prediction import Prediction
from runtime.sinks import annotate, heat_map

__all__ = ["LiveFrames", "draw"]

MAX_WIDTH = 640  # the live view is downscaled to at most this width
JPEG_QUALITY = 80
FPS_WINDOW_S = 10.0


@dataclass
class _Latest:
    frame: Frame
    predictions: dict[str | None, Prediction] = field(default_factory=dict)  # by region (None: whole frame)
    first_seen: float = field(default_factory=time.time)
    arrivals: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=1000))  # (seen, latency s)


class LiveFrames:
    """Latest frame and predictions per source; thread-safe (written by streams, read by requests)."""

    def __init__(self, rois: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._rois = {name: dict(regions) for name, regions in (rois or {}).items()}
        self._latest: dict[str, _Latest] = {}
        self._lock = threading.Lock()

    def observe(self, frame: Frame, prediction: Prediction) -> None:
        now = time.time()
        roi = prediction.extra.get("roi")
        with self._lock:
            latest = self._latest.get(frame.source_id)
            if latest is None:
                latest = self._latest[frame.source_id] = _Latest(frame)
            if latest.frame.index != frame.index:
                latest.frame, latest.predictions = frame, {}
            if not latest.predictions:
                latest.arrivals.append((now, max(now - frame.timestamp, 0.0)))
            latest.predictions[roi] = prediction

    def stats(self, source: str) -> dict[str, Any]:
        """``fps`` and mean ``latency_ms`` over the last FPS_WINDOW_S (None before the first frame; latency None
        when no frame came within the window), and ``last_frame_at`` (Unix time)."""
        now = time.time()
        with self._lock:
            latest = self._latest.get(source)
            if latest is None:
                return {"fps": None, "latency_ms": None, "last_frame_at": None}
            recent = [a for a in latest.arrivals if a[0] >= now - FPS_WINDOW_S]
            observed = min(FPS_WINDOW_S, now - latest.first_seen)
            last = latest.arrivals[-1][0]
        fps = len(recent) / observed if observed > 0.5 else None
        latency = sum(a[1] for a in recent) / len(recent) * 1e3 if recent else None
        return {"fps": fps, "latency_ms": latency, "last_frame_at": last}

    def jpeg(self, source: str) -> bytes | None:
        """The latest frame of ``source`` drawn with its predictions, as JPEG; None before its first frame."""
        with self._lock:
            latest = self._latest.get(source)
            if latest is None:
                return None
            image, predictions = latest.frame.image, dict(latest.predictions)
        drawn = draw(image, predictions, self._rois.get(source, {}))
        ok, data = cv2.imencode(".jpg", drawn, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        return data.tobytes() if ok else None


def draw(image: np.ndarray, predictions: Mapping[str | None, Prediction],
         rois: Mapping[str, Any]) -> np.ndarray:
    """``image`` with each prediction drawn: the whole frame's as a banner, each region's as a box."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    whole = predictions.get(None)
    out = annotate(image, whole) if whole is not None else image.copy()
    for name, prediction in predictions.items():
        if name is not None and name in rois:
            _draw_region(out, [int(v) for v in rois[name]], name, prediction)
    if out.shape[1] > MAX_WIDTH:
        scale = MAX_WIDTH / out.shape[1]
        out = cv2.resize(out, (MAX_WIDTH, max(1, round(out.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    return out


def _draw_region(out: np.ndarray, box: list[int], name: str, prediction: Prediction) -> None:
    x, y, w, h = box
    if x + w > out.shape[1] or y + h > out.shape[0]:
        return  # the stream refuses such a region too; nothing was predicted in it
    out[y:y + h, x:x + w] = heat_map(np.ascontiguousarray(out[y:y + h, x:x + w]), prediction)
    scored = "threshold" in prediction.extra  # an anomaly score with its threshold: red over it, green under
    colour = ((0, 0, 220) if prediction.over_threshold else (0, 160, 0)) if scored else (160, 90, 0)
    cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 2)
    text = f"{name}: {prediction.label} {prediction.score:.2f}"
    scale = max(0.35, min(out.shape[:2]) / 600)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top = max(y - th - base - 4, 0)
    cv2.rectangle(out, (x, top), (x + tw + 6, top + th + base + 4), colour, thickness=-1)
    cv2.putText(out, text, (x + 3, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
